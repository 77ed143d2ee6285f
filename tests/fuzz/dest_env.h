/*
 * The destination environment of the fuzz targets that feed the real
 * incoming path (fuzz_dest, fuzz_multifd) and of the recorder of their seeds
 * (mkseeds_dest): guest memory and one in-memory "test" device (its state
 * stream validated like a real one), in the same configuration on both
 * sides so that recorded streams load.
 */
#ifndef VFM_FUZZ_DEST_ENV_H
#define VFM_FUZZ_DEST_ENV_H

#include <stddef.h>
#include <stdint.h>

#include "../unit/testdev.h"
#include "vfiomig/migration.h"

#define FZ_PAGE      4096u
#define FZ_MEM       (64u << 10)
#define FZ_DEV_STATE (8u << 10)

struct fz_side {
	struct vfm_guest_mem *mem;
	struct testdev *td;
	struct vfm_migration *m;
};

/* seed 0: a destination (empty memory); otherwise a source with content.
 * ops may be NULL. Returns 0, or -1 (message on stderr). */
int fz_side_init(struct fz_side *s, unsigned seed, const struct vfm_vm_ops *ops, void *opaque);
void fz_side_free(struct fz_side *s);

/*
 * Recomputes the checksum of every record of the stream in buf (after the
 * 16-byte stream header), in place, so that a mutated payload reaches the
 * decoders instead of being rejected by the record checksum. Stops at the
 * first record whose length runs past the end.
 */
void fz_fix_checksums(unsigned char *buf, size_t len);

/* The library's log goes nowhere (every bad input would print a line). */
void fz_quiet(void);

#endif
