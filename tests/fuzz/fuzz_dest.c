/*
 * Fuzz target: the destination's load of a migration stream through the real
 * incoming path (vfm_migration_incoming on a file: URI), into guest memory
 * and a device: dest.c's records and sections, ram.c's layout, state and
 * page batches (load_layout, ram_load_state, vfm__ram_load_batch), the vfio
 * savable's device data and config. Each record's checksum is recomputed
 * after the mutation (dest_env.c), so mutated payloads reach the decoders.
 * Seeds: real streams recorded by mkseeds_dest (file mode, and the main
 * channel of unix migrations with and without multifd).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dest_env.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int quiet;
	struct vfm_migration_params p;
	struct vfm_error err = { 0 };
	struct fz_side d;
	unsigned char *buf;
	char uri[64];
	int fd;

	if (!quiet++)
		fz_quiet();
	buf = malloc(size ? size : 1);
	fd = memfd_create("fuzz-dest", MFD_CLOEXEC);
	if (!buf || fd < 0)
		abort();
	memcpy(buf, data, size);
	fz_fix_checksums(buf, size);
	if (write(fd, buf, size) != (ssize_t)size)
		abort();
	free(buf);
	if (fz_side_init(&d, 0, NULL, NULL))
		abort();
	vfm_migration_params_default(&p);
	p.timeout_ms = 1000;
	snprintf(uri, sizeof(uri), "file:/proc/self/fd/%d", fd);
	/* FUZZ_VERBOSE=1: what the destination said (a seed must load: "ok"). */
	if (vfm_migration_incoming(d.m, uri, &p, NULL, NULL, &err) && getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "fuzz_dest: %s\n", err.msg);
	else if (getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "fuzz_dest: ok\n");
	fz_side_free(&d);
	close(fd);
	return 0;
}
