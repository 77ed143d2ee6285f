/*
 * The vfiomig_mig_shm extension on the server: the client's migration data
 * window. Negotiated in VERSION (both sides state "vfiomig_mig_shm": true),
 * then the client passes a memfd with DEVICE_FEATURE SET
 * VFM_VFU_FEATURE_MIG_SHM; from then on MIG_DATA_READ replies and
 * MIG_DATA_WRITE requests carry {argsz, size, offset} and the bytes are in
 * the window (proto.h struct vfu_mig_shm_data; server-mig.c). The data no
 * longer crosses the socket: the device builds its records straight into
 * the window, and the client writes them to the migration channel from
 * there (docs/performance.md, device-state hops). The window is the
 * client's memory: every offset and size it names is checked against it.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "util/logging.h"
#include "vfio-user/server.h"

uint64_t vfm_vfu_mig_shm_bytes(const struct vfm_vfu_ctx *ctx)
{
	return __atomic_load_n(&ctx->shm_bytes, __ATOMIC_RELAXED);
}

void vfu_srv_mig_shm_release(struct vfm_vfu_ctx *ctx)
{
	if (ctx->shm)
		munmap(ctx->shm, ctx->shm_size);
	ctx->shm = NULL;
	ctx->shm_size = 0;
}

/*
 * SET: { u64 size } and one fd, a regular file (memfd) of at least size
 * bytes, mapped read-write shared. A second SET replaces the window: each
 * request names its own range, so nothing refers to the old one after.
 */
int vfu_srv_mig_shm_set(struct vfm_vfu_ctx *ctx, struct vfu_msg *m, const uint8_t *data,
			struct vfm_error *err)
{
	struct vfu_mig_shm_set req;
	struct stat st;
	void *p;
	int ret;

	if (!ctx->neg.mig_shm)
		return vfm_error_set(err, -EINVAL, "MIG_SHM: vfiomig_mig_shm was not negotiated");
	ret = vfu_check_nfds(m, 1, 1, err);
	if (ret)
		return vfm_error_set(err, ret, "MIG_SHM: one fd needed");
	memcpy(&req, data, sizeof(req));
	if (req.size < 4096 || req.size > VFU_MIG_SHM_MAX || (req.size & 4095))
		return vfm_error_set(err, -EINVAL, "MIG_SHM: window of %" PRIu64 " bytes (4 KiB "
				     "multiples up to %u)", req.size, VFU_MIG_SHM_MAX);
	if (fstat(m->fds[0], &st))
		return vfm_error_set(err, -errno, "MIG_SHM: fstat: %s", strerror(errno));
	/* A shorter file would fault (SIGBUS) on an access past its end. */
	if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < req.size)
		return vfm_error_set(err, -EINVAL, "MIG_SHM: the fd is not a regular file (memfd) of "
				     "at least %" PRIu64 " bytes", req.size);
	p = mmap(NULL, req.size, PROT_READ | PROT_WRITE, MAP_SHARED, m->fds[0], 0);
	if (p == MAP_FAILED)
		return vfm_error_set(err, -errno, "MIG_SHM: mmap of %" PRIu64 " bytes: %s", req.size,
				     strerror(errno));
	vfu_srv_mig_shm_release(ctx);
	ctx->shm = p;
	ctx->shm_size = req.size;
	vfm_debug(ctx->id, "migration data window of %" PRIu64 " bytes", req.size);
	return 0;
}

/*
 * A windowed MIG_DATA_WRITE request: exactly {argsz, size, offset}, the
 * range inside the window and within max_data_xfer_size. *p: the bytes.
 */
int vfu_srv_mig_shm_write_range(struct vfm_vfu_ctx *ctx, const struct vfu_msg *m,
				const uint8_t **p, size_t *len, struct vfm_error *err)
{
	struct vfu_mig_shm_data req;
	int ret;

	ret = vfu_check_payload_exact(m, sizeof(req), err);
	if (ret)
		return vfm_error_set(err, ret, "MIG_DATA_WRITE (window)");
	memcpy(&req, m->payload, sizeof(req));
	if (req.argsz != sizeof(req))
		return vfm_error_set(err, -EINVAL, "MIG_DATA_WRITE (window): argsz %" PRIu32
				     ", expected %zu", req.argsz, sizeof(req));
	if (req.size > ctx->max_xfer || !vfu_range_ok(req.offset, req.size, ctx->shm_size))
		return vfm_error_set(err, -EINVAL, "MIG_DATA_WRITE (window): %" PRIu32 " bytes at "
				     "offset %" PRIu64 " outside the %" PRIu64 "-byte window "
				     "(max_data_xfer_size %" PRIu32 ")", req.size, req.offset,
				     ctx->shm_size, ctx->max_xfer);
	*p = ctx->shm + req.offset;
	*len = req.size;
	return 0;
}
