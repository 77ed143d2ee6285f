/* See dest_env.h. */
#include <stdio.h>
#include <string.h>

#include "dest_env.h"
#include "migration/stream.h"
#include "vfiomig/log.h"

int fz_side_init(struct fz_side *s, unsigned seed, const struct vfm_vm_ops *ops, void *opaque)
{
	static const struct vfm_vm_ops none = { 0 };
	struct vfm_device_props props;
	struct vfm_error err = { 0 };

	memset(s, 0, sizeof(*s));
	if (vfm_guest_mem_new(FZ_PAGE, &s->mem, &err) ||
	    vfm_guest_mem_add(s->mem, 0, FZ_MEM, "ram", &err))
		goto fail;
	if (seed) {
		/* Some pages with content, the others zero (sent as such). */
		for (uint32_t off = 0; off < FZ_MEM; off += 3 * FZ_PAGE)
			memset(vfm_guest_mem_ptr(s->mem, off, FZ_PAGE), (int)(off / FZ_PAGE + seed),
			       FZ_PAGE / 2);
	}
	if (vfm_migration_new(s->mem, ops ? ops : &none, opaque, &s->m, &err))
		goto fail;
	s->td = testdev_new("dev0", VFM_MIG_ALL, FZ_DEV_STATE, seed, 0);
	vfm_device_props_default(&props);
	snprintf(props.id, sizeof(props.id), "dev0");
	if (vfm_migration_add_device(s->m, testdev_device(s->td), &props, &err))
		goto fail;
	return 0;
fail:
	fprintf(stderr, "fuzz environment: %s\n", err.msg);
	fz_side_free(s);
	return -1;
}

void fz_side_free(struct fz_side *s)
{
	vfm_migration_free(s->m);
	if (s->td)
		testdev_free(s->td);
	vfm_guest_mem_free(s->mem);
	memset(s, 0, sizeof(*s));
}

void fz_fix_checksums(unsigned char *buf, size_t len)
{
	size_t off = VFM_STREAM_HDR_SIZE;

	while (off + sizeof(struct vfm_rec_hdr) <= len) {
		uint32_t plen = vfm_get_le32(buf + off + 8);
		uint64_t sum;

		if (plen > len - off - sizeof(struct vfm_rec_hdr))
			return;
		sum = vfm_rec_checksum(buf + off, buf + off + sizeof(struct vfm_rec_hdr), plen);
		vfm_put_le64(buf + off + 16, sum);
		off += sizeof(struct vfm_rec_hdr) + plen;
	}
}

static void drop(enum vfm_log_level level, const char *line, void *opaque)
{
	(void)level;
	(void)line;
	(void)opaque;
}

void fz_quiet(void)
{
	vfm_log_set_sink(drop, NULL);
}
