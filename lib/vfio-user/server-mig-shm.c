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

void vfu_srv_mig_prefetch_drop(struct vfm_vfu_ctx *ctx);

uint64_t vfm_vfu_mig_shm_bytes(const struct vfm_vfu_ctx *ctx)
{
	return __atomic_load_n(&ctx->shm_bytes, __ATOMIC_RELAXED);
}

void vfu_srv_mig_shm_release(struct vfm_vfu_ctx *ctx)
{
	vfu_srv_mig_prefetch_drop(ctx);
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
	vfu_srv_mig_shm_release(ctx);   /* and what was read ahead into it */
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

/* ---- Read-ahead ---- */

/*
 * Up to len bytes of device data into p; *n: how many. An error after some
 * bytes stops there (they were taken from the device and must not be lost);
 * before any, it is returned.
 */
static int device_fill(struct vfm_vfu_ctx *ctx, uint8_t *p, size_t len, size_t *n)
{
	*n = 0;
	while (*n < len) {
		ssize_t got = ctx->mig_ops->read_data(ctx, p + *n, len - *n);

		if (got == 0 || got == -ENOMSG)
			break;
		if (got < 0 || (size_t)got > len - *n) {
			if (*n)
				break;
			return got < 0 ? (int)got : -EIO;
		}
		*n += (size_t)got;
	}
	return 0;
}

void vfu_srv_mig_prefetch_drop(struct vfm_vfu_ctx *ctx)
{
	if (ctx->pf_len)
		vfm_debug(ctx->id, "dropping %" PRIu32 " bytes read ahead (the data session ended)",
			  ctx->pf_len);
	ctx->pf_want = false;
	ctx->pf_len = 0;
	ctx->pf_initial = 0;
	ctx->pf_err = 0;
}

/* k bytes of the read-ahead go to the client: initial ones first. */
static void prefetch_consume(struct vfm_vfu_ctx *ctx, uint32_t k)
{
	ctx->pf_initial -= k < ctx->pf_initial ? k : ctx->pf_initial;
	ctx->pf_off += k;
	ctx->pf_len -= k;
}

/*
 * A windowed MIG_DATA_READ: what was read ahead first, then the device, all
 * contiguous in the window from *base. A full reply asks for the next block
 * to be read ahead (vfu_srv_mig_prefetch(), once the reply is out) into a
 * part of the window that does not overlap it: the client reads the reply's
 * bytes until its next data request (docs/vfio-user-server.md).
 */
int vfu_srv_mig_shm_read(struct vfm_vfu_ctx *ctx, uint32_t size, uint64_t *base, size_t *n,
			 struct vfm_error *err)
{
	size_t have = 0, more = 0;
	int r;

	ctx->pf_want = false;
	if (ctx->pf_err) {
		r = ctx->pf_err;
		ctx->pf_err = 0;
		return vfm_error_set(err, r, "MIG_DATA_READ: device read failed: %s (reading ahead)",
				     vfm_strerror(r));
	}
	*base = 0;
	if (ctx->pf_len) {
		*base = ctx->pf_off;
		if (ctx->pf_len >= size) {
			*n = size;
			prefetch_consume(ctx, size);
			goto out;
		}
		have = ctx->pf_len;
		if (*base + size > ctx->shm_size) {
			memmove(ctx->shm, ctx->shm + *base, have);
			*base = 0;
		}
		prefetch_consume(ctx, (uint32_t)have);
	}
	r = device_fill(ctx, ctx->shm + *base + have, size - have, &more);
	if (r && !have)
		return vfm_error_set(err, r, "MIG_DATA_READ: device read failed: %s", vfm_strerror(r));
	*n = have + more;
out:
	if (*n == size && size && !ctx->pf_len) {
		if (*base >= size) {
			ctx->pf_base = 0;
			ctx->pf_want = true;
		} else if (*base + 2ull * size <= ctx->shm_size) {
			ctx->pf_base = *base + size;
			ctx->pf_want = true;
		}
		ctx->pf_size = size;
	}
	return 0;
}

/*
 * The read-ahead, after a full reply went out: the next block of the same
 * size from the device while the client writes the last one to its
 * migration channel (on the source the device's work and the engine's
 * overlap instead of taking turns). Only in a saving state; initial
 * pre-copy bytes come first (as VFIO_MIG_GET_PRECOPY_INFO counts them), so
 * PRECOPY_INFO and MIG_DATA_SIZE can add back what is held here. A device
 * error is kept for the next READ.
 */
void vfu_srv_mig_prefetch(struct vfm_vfu_ctx *ctx)
{
	enum vfm_state s = vfu_srv_state(ctx);
	uint64_t initial = 0, dirty;
	size_t n;
	int r;

	if (!ctx->pf_want || !ctx->shm || !ctx->mig_ops)
		return;
	ctx->pf_want = false;
	if (!vfm_state_is_saving(s) || ctx->pf_len || ctx->pf_err)
		return;
	if ((s == VFM_STATE_PRE_COPY || s == VFM_STATE_PRE_COPY_P2P) && ctx->mig_ops->precopy_info &&
	    ctx->mig_ops->precopy_info(ctx, &initial, &dirty))
		initial = 0;
	r = device_fill(ctx, ctx->shm + ctx->pf_base, ctx->pf_size, &n);
	if (r) {
		ctx->pf_err = r;
		return;
	}
	if (!n)
		return;
	ctx->pf_off = ctx->pf_base;
	ctx->pf_len = (uint32_t)n;
	ctx->pf_initial = initial < n ? initial : n;
	__atomic_add_fetch(&ctx->pf_reads, 1, __ATOMIC_RELAXED);
	vfm_trace(ctx->id, "read %zu bytes ahead at %" PRIu64, n, ctx->pf_off);
}
