/*
 * Migration on the server: DEVICE_FEATURE (migration flags and state, DMA
 * logging, and two vfiomig extensions), combined state requests stepped arc
 * by arc through the state machine, and MIG_DATA_READ/MIG_DATA_WRITE.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "util/logging.h"
#include "vfio-user/server.h"

int vfm_vfu_setup_migration(struct vfm_vfu_ctx *ctx, const struct vfm_vfu_migration_ops *ops,
			    struct vfm_error *err)
{
	if (ctx->realized)
		return vfm_error_set(err, -EBUSY, "%s: migration after realize", ctx->id);
	if (!ops) {
		ctx->mig_ops = NULL;
		return 0;
	}
	if (ops->version != VFM_VFU_MIGRATION_OPS_VERSION)
		return vfm_error_set(err, -EINVAL, "%s: migration ops version %u, expected %u",
				     ctx->id, ops->version, VFM_VFU_MIGRATION_OPS_VERSION);
	if (!(ops->flags & VFM_MIG_STOP_COPY) || (ops->flags & ~VFM_MIG_ALL))
		return vfm_error_set(err, -EINVAL, "%s: migration flags %#" PRIx64
				     " (STOP_COPY required)", ctx->id, ops->flags);
	if (!ops->transition || !ops->read_data || !ops->write_data)
		return vfm_error_set(err, -EINVAL, "%s: migration needs transition, read_data and write_data",
				     ctx->id);
	ctx->mig_ops = ops;
	return 0;
}

enum vfm_state vfm_vfu_mig_state(const struct vfm_vfu_ctx *ctx)
{
	return vfu_srv_state(ctx);
}

uint64_t vfm_vfu_log_reports(const struct vfm_vfu_ctx *ctx)
{
	return __atomic_load_n(&ctx->log_reports, __ATOMIC_RELAXED);
}

void vfm_vfu_mig_set_error(struct vfm_vfu_ctx *ctx)
{
	ctx->mig_error = true;
}

void vfu_srv_mig_reset(struct vfm_vfu_ctx *ctx)
{
	ctx->mig_error = false;
	vfu_srv_mig_prefetch_drop(ctx);
	vfu_srv_set_state(ctx, VFM_STATE_RUNNING);
}

/*
 * Moves the device to target one direct arc at a time along the kernel's
 * path. The whole path is computed first, so a request the state machine
 * refuses never reaches the device. A failing arc stops the walk where it is
 * (or in ERROR when the device says so).
 */
static int mig_set_state(struct vfm_vfu_ctx *ctx, uint32_t target, struct vfm_error *err)
{
	const struct vfm_vfu_migration_ops *ops = ctx->mig_ops;
	enum vfm_state cur = vfu_srv_state(ctx), path[VFM_STATE_COUNT];
	char fl[64];
	size_t n;
	int r;

	if (cur == VFM_STATE_ERROR)
		return vfm_error_set(err, -EINVAL, "MIG_DEVICE_STATE: device is in ERROR, only a reset leaves it");
	if (target >= VFM_STATE_COUNT || !vfm_state_supported(ops->flags, (enum vfm_state)target))
		return vfm_error_set(err, -EINVAL, "MIG_DEVICE_STATE: %s (%" PRIu32 ") is not a state this device (%s) can be asked for",
				     vfm_state_name((enum vfm_state)target), target,
				     vfm_mig_flags_str(ops->flags, fl, sizeof(fl)));
	if (vfm_fsm_path(ops->flags, cur, (enum vfm_state)target, path, &n))
		return vfm_error_set(err, -EINVAL, "MIG_DEVICE_STATE: %s -> %s is forbidden",
				     vfm_state_name(cur), vfm_state_name((enum vfm_state)target));
	for (size_t i = 0; i < n; i++) {
		ctx->mig_error = false;
		r = ops->transition(ctx, cur, path[i]);
		if (r) {
			if (r > 0)
				r = -EIO;
			if (ctx->mig_error)
				vfu_srv_set_state(ctx, VFM_STATE_ERROR);
			ctx->mig_error = false;
			if (!vfm_state_is_saving(vfu_srv_state(ctx)))
				vfu_srv_mig_prefetch_drop(ctx);
			return vfm_error_set(err, r, "MIG_DEVICE_STATE: arc %s -> %s failed (%s), device is %s",
					     vfm_state_name(cur), vfm_state_name(path[i]),
					     vfm_strerror(r), vfm_state_name(vfu_srv_state(ctx)));
		}
		vfm_trace(ctx->id, "state %s -> %s", vfm_state_name(cur), vfm_state_name(path[i]));
		cur = path[i];
		vfu_srv_set_state(ctx, cur);
		/* Out of the saving states the data session is over. */
		if (!vfm_state_is_saving(cur))
			vfu_srv_mig_prefetch_drop(ctx);
	}
	vfm_debug(ctx->id, "device state %s", vfm_state_name(cur));
	return 0;
}

/* ------------------------------------------------------------------------ */
/* DEVICE_FEATURE                                                            */

struct feature {
	uint32_t ops;            /* VFU_FEATURE_GET / SET it supports */
	size_t data;             /* fixed data size of the GET reply or SET request */
};

/* What the feature supports on this device; false: ENOTTY. */
static bool feature_lookup(const struct vfm_vfu_ctx *ctx, uint32_t id, struct feature *f)
{
	const struct vfm_vfu_migration_ops *mig = ctx->mig_ops;

	switch (id) {
	case VFU_FEATURE_MIGRATION:
		*f = (struct feature){ VFU_FEATURE_GET, sizeof(struct vfu_feature_migration) };
		return mig != NULL;
	case VFU_FEATURE_MIG_DEVICE_STATE:
		*f = (struct feature){ VFU_FEATURE_GET | VFU_FEATURE_SET,
				       sizeof(struct vfu_feature_mig_state) };
		return mig != NULL;
	case VFU_FEATURE_DMA_LOGGING_START:
		*f = (struct feature){ VFU_FEATURE_SET, sizeof(struct vfu_dma_logging_control) };
		return true;
	case VFU_FEATURE_DMA_LOGGING_STOP:
		*f = (struct feature){ VFU_FEATURE_SET, 0 };
		return true;
	case VFU_FEATURE_DMA_LOGGING_REPORT:
		*f = (struct feature){ VFU_FEATURE_GET, sizeof(struct vfu_dma_logging_report) };
		return true;
	case VFM_VFU_FEATURE_MIG_DATA_SIZE:
		*f = (struct feature){ VFU_FEATURE_GET, sizeof(uint64_t) };
		return mig && mig->stop_copy_size;
	case VFM_VFU_FEATURE_PRECOPY_INFO:
		*f = (struct feature){ VFU_FEATURE_GET, 2 * sizeof(uint64_t) };
		return mig && mig->precopy_info && (mig->flags & VFM_MIG_PRE_COPY);
	case VFM_VFU_FEATURE_MIG_SHM:
		*f = (struct feature){ VFU_FEATURE_SET, sizeof(struct vfu_mig_shm_set) };
		return mig && ctx->neg.mig_shm;
	default:
		return false;
	}
}

/* A GET reply: the request header with argsz = the full size, then data. */
static void reply_get(struct vfu_srv_reply *r, uint32_t flags, const void *data, size_t len)
{
	struct vfu_device_feature h = { .argsz = (uint32_t)(sizeof(h) + len), .flags = flags };

	memcpy(r->buf, &h, sizeof(h));
	if (data)
		memcpy(r->buf + sizeof(h), data, len);
	r->len = sizeof(h) + len;
}

static void reply_echo(struct vfu_srv_reply *r, const struct vfu_msg *m)
{
	memcpy(r->buf, m->payload, m->len);
	r->len = m->len;
}

static int feature_report(struct vfm_vfu_ctx *ctx, const struct vfu_device_feature *req,
			  const uint8_t *data, struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_dma_logging_report rep;
	struct vfu_device_feature h;
	uint64_t bytes, limit;
	int ret;

	memcpy(&rep, data, sizeof(rep));
	if (!rep.length || rep.iova + rep.length < rep.iova)
		return vfm_error_set(err, -EINVAL, "DMA_LOGGING_REPORT: range %#" PRIx64 "+%#" PRIx64
				     " is empty or wraps", rep.iova, rep.length);
	ret = vfu_bitmap_size(rep.length, rep.page_size, &bytes, err);
	if (ret)
		return vfm_error_set(err, ret, "DMA_LOGGING_REPORT");
	limit = ctx->neg.max_xfer;
	if (bytes > limit)
		return vfm_error_set(err, -E2BIG, "DMA_LOGGING_REPORT: a %" PRIu64
				     "-byte bitmap exceeds max_data_xfer_size %" PRIu64, bytes, limit);
	if (req->argsz < 8 + sizeof(rep) + bytes)
		return vfm_error_set(err, -EINVAL, "DMA_LOGGING_REPORT: argsz %" PRIu32
				     " too small for a %" PRIu64 "-byte bitmap", req->argsz, bytes);
	memset(r->buf + 8 + sizeof(rep), 0, bytes);
	ret = vfu_srv_log_report(ctx, rep.iova, rep.length, rep.page_size,
				 (uint64_t *)(void *)(r->buf + 8 + sizeof(rep)), err);
	if (ret)
		return ret;
	/* The bitmap is in place after the header and the request's fields. */
	h = (struct vfu_device_feature){ .argsz = (uint32_t)(sizeof(h) + sizeof(rep) + bytes),
					 .flags = req->flags };
	memcpy(r->buf, &h, sizeof(h));
	memcpy(r->buf + sizeof(h), &rep, sizeof(rep));
	r->len = h.argsz;
	return 0;
}

static int feature_get(struct vfm_vfu_ctx *ctx, uint32_t id, const struct vfu_device_feature *req,
		       const uint8_t *data, struct vfu_srv_reply *r, struct vfm_error *err)
{
	const struct vfm_vfu_migration_ops *mig = ctx->mig_ops;
	enum vfm_state s = vfu_srv_state(ctx);
	uint64_t v[2];
	int ret;

	switch (id) {
	case VFU_FEATURE_MIGRATION:
		reply_get(r, req->flags, &mig->flags, sizeof(uint64_t));
		return 0;
	case VFU_FEATURE_MIG_DEVICE_STATE: {
		struct vfu_feature_mig_state st = { .device_state = (uint32_t)s, .data_fd = -1 };

		reply_get(r, req->flags, &st, sizeof(st));
		return 0;
	}
	case VFU_FEATURE_DMA_LOGGING_REPORT:
		return feature_report(ctx, req, data, r, err);
	case VFM_VFU_FEATURE_MIG_DATA_SIZE:
		ret = mig->stop_copy_size(ctx, &v[0]);
		if (ret)
			return vfm_error_set(err, ret, "MIG_DATA_SIZE: device failed");
		v[0] += ctx->pf_len;   /* read ahead, not yet given to the client */
		reply_get(r, req->flags, v, sizeof(v[0]));
		return 0;
	case VFM_VFU_FEATURE_PRECOPY_INFO:
		if (s != VFM_STATE_PRE_COPY && s != VFM_STATE_PRE_COPY_P2P)
			return vfm_error_set(err, -EINVAL, "PRECOPY_INFO in %s", vfm_state_name(s));
		ret = mig->precopy_info(ctx, &v[0], &v[1]);
		if (ret)
			return vfm_error_set(err, ret, "PRECOPY_INFO: device failed");
		v[0] += ctx->pf_initial;   /* read ahead, not yet given to the client */
		v[1] += ctx->pf_len - ctx->pf_initial;
		reply_get(r, req->flags, v, sizeof(v));
		return 0;
	}
	return vfm_error_set(err, -ENOTTY, "feature %" PRIu32 " has no GET", id);
}

static int feature_set(struct vfm_vfu_ctx *ctx, uint32_t id, struct vfu_msg *m,
		       const uint8_t *data, size_t dlen, struct vfu_srv_reply *r,
		       struct vfm_error *err)
{
	struct vfu_feature_mig_state st;
	uint64_t pg;
	int ret;

	switch (id) {
	case VFU_FEATURE_MIG_DEVICE_STATE:
		memcpy(&st, data, sizeof(st));
		ret = mig_set_state(ctx, st.device_state, err);
		if (ret)
			return ret;
		reply_echo(r, m);
		return 0;
	case VFU_FEATURE_DMA_LOGGING_START:
		ret = vfu_srv_log_start(ctx, data, dlen, &pg, err);
		if (ret)
			return ret;
		reply_echo(r, m);
		memcpy(r->buf + sizeof(struct vfu_device_feature), &pg, sizeof(pg));
		return 0;
	case VFU_FEATURE_DMA_LOGGING_STOP:
		vfu_srv_log_stop(ctx);
		reply_echo(r, m);
		return 0;
	case VFM_VFU_FEATURE_MIG_SHM:
		ret = vfu_srv_mig_shm_set(ctx, m, data, err);
		if (ret)
			return ret;
		reply_echo(r, m);
		return 0;
	}
	return vfm_error_set(err, -ENOTTY, "feature %" PRIu32 " has no SET", id);
}

/*
 * The kernel's rules (vfio_check_feature): GET/SET bits the feature lacks
 * are EINVAL; PROBE then succeeds and echoes the request; without PROBE
 * argsz must hold the feature's fixed data. Unknown features, and migration
 * features on a device without migration, are ENOTTY.
 */
int vfu_srv_device_feature(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			   struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_device_feature req;
	const uint8_t *data;
	struct feature f;
	uint32_t id, op;
	size_t dlen;
	int ret;

	ret = vfu_check_payload(m, sizeof(req), err);
	if (ret)
		return ret;
	memcpy(&req, m->payload, sizeof(req));
	ret = vfu_check_feature_flags(req.flags, err);
	if (ret)
		return ret;
	id = req.flags & VFU_FEATURE_MASK;
	op = req.flags & (VFU_FEATURE_GET | VFU_FEATURE_SET);
	if (!feature_lookup(ctx, id, &f))
		return vfm_error_set(err, -ENOTTY, "DEVICE_FEATURE: %s (%" PRIu32 ") not supported",
				     vfu_feature_name(id), id);
	if (op & ~f.ops)
		return vfm_error_set(err, -EINVAL, "DEVICE_FEATURE: %s has no %s", vfu_feature_name(id),
				     (op & ~f.ops) == VFU_FEATURE_GET ? "GET" : "SET");
	if (req.flags & VFU_FEATURE_PROBE) {
		reply_echo(r, m);
		return 0;
	}
	if (req.argsz < sizeof(req) + f.data)
		return vfm_error_set(err, -EINVAL, "DEVICE_FEATURE: %s argsz %" PRIu32 " below %zu",
				     vfu_feature_name(id), req.argsz, sizeof(req) + f.data);
	data = (const uint8_t *)m->payload + sizeof(req);
	dlen = m->len - sizeof(req);
	/* GET requests carry data only for REPORT; SET always carries f.data. */
	if ((op == VFU_FEATURE_SET || id == VFU_FEATURE_DMA_LOGGING_REPORT) && dlen < f.data)
		return vfm_error_set(err, -EINVAL, "DEVICE_FEATURE: %s with %zu data bytes, need %zu",
				     vfu_feature_name(id), dlen, f.data);
	if (op == VFU_FEATURE_GET)
		return feature_get(ctx, id, &req, data, r, err);
	return feature_set(ctx, id, m, data, dlen, r, err);
}

/* ------------------------------------------------------------------------ */
/* Migration data                                                            */

int vfu_srv_mig_data_read(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			  struct vfu_srv_reply *r, struct vfm_error *err)
{
	enum vfm_state s = vfu_srv_state(ctx);
	struct vfu_mig_data req, rep;
	uint8_t *out;
	size_t n = 0;
	int ret;

	if (!ctx->mig_ops)
		return vfm_error_set(err, -ENOTTY, "MIG_DATA_READ: device has no migration");
	ret = vfu_check_payload_exact(m, sizeof(req), err);
	if (ret)
		return ret;
	memcpy(&req, m->payload, sizeof(req));
	ret = vfu_check_count(m, req.size, ctx->max_xfer, err);
	/* With a window the reply is {argsz, size, offset} alone. */
	ret = ret ?: vfu_check_argsz(m, req.argsz, ctx->shm ? sizeof(struct vfu_mig_shm_data)
							   : sizeof(req) + (size_t)req.size,
				     UINT32_MAX, err);
	if (ret)
		return ret;
	if (!vfm_state_is_saving(s))
		return vfm_error_set(err, -EINVAL, "MIG_DATA_READ in %s", vfm_state_name(s));
	/* Never more data than the client can receive (its max_data_xfer_size). */
	if (req.size > ctx->neg.peer_max_xfer)
		req.size = ctx->neg.peer_max_xfer;
	if (ctx->shm) {
		/* The device's records go straight into the window. */
		struct vfu_mig_shm_data w = { .argsz = sizeof(w) };
		uint64_t off;

		if (req.size > ctx->shm_size)
			req.size = (uint32_t)ctx->shm_size;
		ret = vfu_srv_mig_shm_read(ctx, req.size, &off, &n, err);
		if (ret)
			return ret;
		w.size = (uint32_t)n;
		w.offset = off;
		memcpy(r->buf, &w, sizeof(w));
		r->len = sizeof(w);
		__atomic_add_fetch(&ctx->shm_bytes, n, __ATOMIC_RELAXED);
		vfm_trace(ctx->id, "MIG_DATA_READ %zu of %" PRIu32 " bytes at %" PRIu64 " in %s "
			  "(window)", n, req.size, w.offset, vfm_state_name(s));
		return 0;
	}
	out = r->buf + sizeof(rep);
	/* Fill the request: a short reply tells the client there is no more. */
	while (n < req.size) {
		ssize_t got = ctx->mig_ops->read_data(ctx, out + n, req.size - n);

		if (got == 0 || got == -ENOMSG)
			break;
		if (got < 0 || (size_t)got > req.size - n) {
			/* Bytes already taken from the device must not be lost. */
			if (n)
				break;
			return vfm_error_set(err, got < 0 ? (int)got : -EIO,
					     "MIG_DATA_READ: device read failed: %s",
					     vfm_strerror(got < 0 ? (int)got : -EIO));
		}
		n += (size_t)got;
	}
	/*
	 * size says how much is data; the reply is padded to what was asked, as
	 * libvfio-user's server does (lib/migration.c handle_mig_data_read(),
	 * efd091b): its client transport takes a reply shorter than the
	 * caller's buffer for a reset connection (tran_sock_recv_fds()).
	 */
	rep = (struct vfu_mig_data){ .argsz = (uint32_t)(sizeof(rep) + req.size), .size = (uint32_t)n };
	memcpy(r->buf, &rep, sizeof(rep));
	memset(r->buf + sizeof(rep) + n, 0, req.size - n);
	r->len = sizeof(rep) + req.size;
	vfm_trace(ctx->id, "MIG_DATA_READ %zu of %" PRIu32 " bytes in %s", n, req.size,
		  vfm_state_name(s));
	return 0;
}

int vfu_srv_mig_data_write(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			   struct vfu_srv_reply *r, struct vfm_error *err)
{
	enum vfm_state s = vfu_srv_state(ctx);
	struct vfu_mig_data req;
	const uint8_t *p;
	size_t left, size;
	int ret;

	if (!ctx->mig_ops)
		return vfm_error_set(err, -ENOTTY, "MIG_DATA_WRITE: device has no migration");
	if (ctx->shm) {
		ret = vfu_srv_mig_shm_write_range(ctx, m, &p, &left, err);
		if (ret)
			return ret;
	} else {
		ret = vfu_check_payload(m, sizeof(req), err);
		if (ret)
			return ret;
		memcpy(&req, m->payload, sizeof(req));
		if (req.size != m->len - sizeof(req))
			return vfm_error_set(err, -EINVAL, "MIG_DATA_WRITE: size %" PRIu32
					     " but %zu data bytes", req.size, m->len - sizeof(req));
		ret = vfu_check_count(m, req.size, ctx->max_xfer, err);
		if (ret)
			return ret;
		p = (const uint8_t *)m->payload + sizeof(req);
		left = req.size;
	}
	if (s != VFM_STATE_RESUMING)
		return vfm_error_set(err, -EINVAL, "MIG_DATA_WRITE in %s", vfm_state_name(s));
	size = left;
	while (left) {
		ssize_t n = ctx->mig_ops->write_data(ctx, p, left);

		if (n <= 0 || (size_t)n > left)
			return vfm_error_set(err, n < 0 ? (int)n : -EIO,
					     "MIG_DATA_WRITE: device took %zd of %zu bytes", n, left);
		p += n;
		left -= (size_t)n;
	}
	if (ctx->shm)
		__atomic_add_fetch(&ctx->shm_bytes, size, __ATOMIC_RELAXED);
	vfm_trace(ctx->id, "MIG_DATA_WRITE %zu bytes%s", size, ctx->shm ? " (window)" : "");
	r->len = 0;
	return 0;
}
