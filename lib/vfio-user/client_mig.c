/*
 * Migration v2 and DMA logging over vfio-user: DEVICE_FEATURE (MIGRATION,
 * MIG_DEVICE_STATE, DMA_LOGGING_*), MIG_DATA_READ/WRITE as the data session,
 * and DEVICE_RESET.
 *
 * vfio-user has no data_fd, so no VFIO_MIG_GET_PRECOPY_INFO, and its feature
 * list (1, 2, 6, 7, 8) has no MIG_DATA_SIZE (9). Our server library adds both
 * as DEVICE_FEATURE extensions; precopy_info and stop_copy_size PROBE for
 * them once and answer -ENOTSUP without asking when a server has not got
 * them, so the engine estimates instead (docs/interop.md).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "util/logging.h"
#include "vfio-user/client.h"
#include "vfiomig/vfu_server.h"

static int feature_bad_reply(struct vfu_client *c, uint32_t flags, const struct vfu_msg *m,
			     size_t need, struct vfm_error *err)
{
	return vfm_error_set(err, VFM_EPROTOCOL,
			     "%s: vfio-user server at %s: DEVICE_FEATURE %s reply of %zu bytes, need %zu",
			     c->id, c->name, vfu_feature_name(flags), m->len, need);
}

/*
 * One DEVICE_FEATURE: data (len bytes) goes out, and the reply must carry at
 * least reply_len bytes of feature data. argsz = the largest reply we take:
 * an echo for SET and PROBE, the data for GET. Lock held.
 */
static int feature(struct vfu_client *c, uint32_t flags, const void *data, size_t len,
		   size_t reply_len, struct vfu_msg *reply, struct vfm_error *err)
{
	struct vfu_device_feature f = { .flags = flags };
	struct iovec iov[2] = { { &f, sizeof(f) }, { (void *)data, len } };
	int r;

	f.argsz = (uint32_t)(sizeof(f) + (len > reply_len ? len : reply_len));
	r = vfu_cli_request(c, VFU_CMD_DEVICE_FEATURE, iov, 2, NULL, 0, reply, err);
	if (r)
		return vfm_error_set(err, r, "%s: DEVICE_FEATURE %s%s%s", c->id,
				     flags & VFU_FEATURE_PROBE ? "PROBE " : "",
				     flags & VFU_FEATURE_GET ? "GET " : "SET ",
				     vfu_feature_name(flags));
	if (reply->len < sizeof(f) + reply_len) {
		r = feature_bad_reply(c, flags, reply, sizeof(f) + reply_len, err);
		vfu_msg_release(reply);
	}
	return r;
}

static int flags_locked(struct vfu_client *c, struct vfm_error *err)
{
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfu_feature_migration m;
	int r;

	if (c->mig_flags_known)
		return 0;
	r = feature(c, VFU_FEATURE_MIGRATION | VFU_FEATURE_GET, NULL, 0, sizeof(m), &reply, err);
	if (r)
		return r;
	memcpy(&m, (char *)reply.payload + sizeof(struct vfu_device_feature), sizeof(m));
	vfu_msg_release(&reply);
	if (m.flags & ~(uint64_t)VFM_MIG_ALL)
		vfm_debug(c->id, "ignoring unknown migration flags %#" PRIx64,
			  (uint64_t)(m.flags & ~(uint64_t)VFM_MIG_ALL));
	c->mig_flags = m.flags & VFM_MIG_ALL;
	c->mig_flags_known = true;
	return 0;
}

static int state_locked(struct vfu_client *c, enum vfm_state *out, struct vfm_error *err)
{
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfu_feature_mig_state s;
	int r;

	r = feature(c, VFU_FEATURE_MIG_DEVICE_STATE | VFU_FEATURE_GET, NULL, 0, sizeof(s),
		    &reply, err);
	if (r)
		return r;
	memcpy(&s, (char *)reply.payload + sizeof(struct vfu_device_feature), sizeof(s));
	vfu_msg_release(&reply);
	if (s.device_state >= VFM_STATE_COUNT)
		return vfm_error_set(err, VFM_EPROTOCOL, "%s: vfio-user server at %s reported state %" PRIu32,
				     c->id, c->name, s.device_state);
	c->state = (enum vfm_state)s.device_state;
	c->state_known = true;
	*out = c->state;
	return 0;
}

static int mig_get_flags(struct vfm_device *dev, uint64_t *flags, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	int r = vfu_cli_lock(c, err);

	if (r)
		return r;
	r = flags_locked(c, err);
	if (!r)
		*flags = c->mig_flags;
	vfu_cli_unlock(c);
	return r;
}

static int mig_get_state(struct vfm_device *dev, enum vfm_state *state, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	int r = vfu_cli_lock(c, err);

	if (r)
		return r;
	r = state_locked(c, state, err);
	vfu_cli_unlock(c);
	return r;
}

/*
 * The server walks the intermediate arcs itself; we only need the path to
 * know whether the final arc opens a data session.
 */
static int mig_set_state(struct vfm_device *dev, enum vfm_state new_state, bool *session_opened,
			 struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	struct vfu_feature_mig_state s = { .device_state = (uint32_t)new_state, .data_fd = -1 };
	enum vfm_state path[VFM_STATE_COUNT], from, last_from;
	struct vfu_msg reply = VFU_MSG_INIT;
	size_t len;
	int r;

	*session_opened = false;
	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	r = flags_locked(c, err);
	if (!r && !c->state_known)
		r = state_locked(c, &from, err);
	if (r)
		goto out;
	from = c->state;
	if (vfm_fsm_path(c->mig_flags, from, new_state, path, &len)) {
		r = vfm_error_set(err, -EINVAL, "%s: %s -> %s is not a valid request", c->id,
				  vfm_state_name(from), vfm_state_name(new_state));
		goto out;
	}
	if (len == 0)
		goto out;
	r = feature(c, VFU_FEATURE_MIG_DEVICE_STATE | VFU_FEATURE_SET, &s, sizeof(s), 0, &reply,
		    err);
	vfu_msg_release(&reply);
	c->data_drained = false;
	if (r) {
		/* Any intermediate state is possible now: ask before trusting. */
		c->state_known = false;
		goto out;
	}
	last_from = len > 1 ? path[len - 2] : from;
	c->state = new_state;
	*session_opened = vfm_arc_opens_session(last_from, new_state);
out:
	vfu_cli_unlock(c);
	return r;
}

static void mig_end_session(struct vfm_device *dev)
{
	struct vfu_client *c = cli_of(dev);

	pthread_mutex_lock(&c->lock);
	c->data_drained = false;
	pthread_mutex_unlock(&c->lock);
}

/*
 * MIG_DATA_READ in max_data_xfer_size requests. The spec: a reply shorter
 * than asked means no more data. In PRE_COPY* we take it at its word and
 * answer the caller's next read with -ENOMSG without a round trip (at worst
 * data waits for the next iteration). In STOP_COPY only an empty reply ends
 * the stream, so a server that returns less than it has mid-stream cannot
 * make us drop the rest; the end then stays the end without more requests.
 */
static ssize_t mig_read_data(struct vfm_device *dev, void *buf, size_t len,
			     struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	size_t total = 0;
	bool stop_copy, shm, empty = false, short_reply = false;
	uint32_t max;
	int r;

	/* 0 would read as "end of stream". */
	if (!len)
		return vfm_error_set(err, -EINVAL, "%s: MIG_DATA_READ of 0 bytes", c->id);
	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	if (!c->state_known || !vfm_state_is_saving(c->state)) {
		r = vfm_error_set(err, -EINVAL, "%s: MIG_DATA_READ in state %s", c->id,
				  c->state_known ? vfm_state_name(c->state) : "unknown");
		goto out;
	}
	stop_copy = c->state == VFM_STATE_STOP_COPY;
	if (c->data_drained) {
		/* End of stream stays the end; "nothing now" is said once. */
		if (!stop_copy)
			c->data_drained = false;
		r = stop_copy ? 0 : -ENOMSG;
		goto out;
	}
	shm = vfu_cli_shm_ready(c);
	max = shm && c->shm_size < c->neg.max_xfer ? (uint32_t)c->shm_size : c->neg.max_xfer;
	while (total < len) {
		uint32_t chunk = (uint32_t)(len - total < max ? len - total : max);
		struct vfu_mig_data req = { .argsz = sizeof(req) + chunk, .size = chunk }, rep;
		struct vfu_msg reply = VFU_MSG_INIT;
		const uint8_t *data;

		/* With the window the reply is {argsz, size, offset} alone. */
		if (shm)
			req.argsz = sizeof(struct vfu_mig_shm_data);
		r = vfu_cli_simple(c, VFU_CMD_MIG_DATA_READ, &req, sizeof(req), &reply, err);
		if (r)
			goto out;
		if (shm) {
			uint32_t got;

			r = vfu_cli_shm_read_reply(c, &reply, chunk, &data, &got, err);
			vfu_msg_release(&reply);
			if (r)
				goto out;
			rep.size = got;
		} else {
			/* libvfio-user sends the whole buffer it allocated: size says how much is data. */
			if (reply.len >= sizeof(rep))
				memcpy(&rep, reply.payload, sizeof(rep));
			if (reply.len < sizeof(rep) || rep.size > chunk ||
			    reply.len - sizeof(rep) < rep.size) {
				r = vfm_error_set(err, VFM_EPROTOCOL,
						  "%s: vfio-user server at %s: MIG_DATA_READ reply of %zu bytes for %" PRIu32,
						  c->id, c->name, reply.len, chunk);
				vfu_msg_release(&reply);
				goto out;
			}
			data = (const uint8_t *)reply.payload + sizeof(rep);
		}
		if (shm && c->view_want)
			c->view_got = data;   /* left in the window: one request */
		else
			memcpy((char *)buf + total, data, rep.size);
		if (!shm)
			vfu_msg_release(&reply);
		total += rep.size;
		if (rep.size < chunk || c->view_got) {
			empty = rep.size == 0;
			short_reply = rep.size < chunk;
			break;
		}
	}
	if (total) {
		/* Short in pre-copy: the next read says "nothing now" at once. */
		c->data_drained = !stop_copy && short_reply;
		r = 0;
	} else if (stop_copy) {
		c->data_drained = empty;   /* end of stream, and it stays so */
		r = 0;
	} else {
		r = -ENOMSG;
	}
out:
	vfu_cli_unlock(c);
	return r ? r : (ssize_t)total;
}

static ssize_t mig_write_data(struct vfm_device *dev, const void *buf, size_t len,
			      struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	size_t total = 0;
	int r;

	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	if (!c->state_known || c->state != VFM_STATE_RESUMING) {
		r = vfm_error_set(err, -EINVAL, "%s: MIG_DATA_WRITE in state %s", c->id,
				  c->state_known ? vfm_state_name(c->state) : "unknown");
		goto out;
	}
	if (vfu_cli_shm_ready(c)) {
		/* The window: one copy into it, a 16-byte request per block. */
		uint32_t max = c->shm_size < c->neg.peer_max_xfer ? (uint32_t)c->shm_size
								  : c->neg.peer_max_xfer;

		while (total < len && !r) {
			uint32_t chunk = (uint32_t)(len - total < max ? len - total : max);

			r = vfu_cli_shm_write(c, (const char *)buf + total, chunk, err);
			total += chunk;
		}
		goto out;
	}
	while (total < len) {
		uint32_t max = cli_send_max(c);
		uint32_t chunk = (uint32_t)(len - total < max ? len - total : max);
		/* argsz covers the data: libvfio-user refuses less. */
		struct vfu_mig_data req = { .argsz = sizeof(req) + chunk, .size = chunk };
		struct iovec iov[2] = { { &req, sizeof(req) }, { (char *)buf + total, chunk } };
		struct vfu_msg reply = VFU_MSG_INIT;

		r = vfu_cli_request(c, VFU_CMD_MIG_DATA_WRITE, iov, 2, NULL, 0, &reply, err);
		vfu_msg_release(&reply);
		if (r)
			goto out;
		total += chunk;
	}
out:
	vfu_cli_unlock(c);
	return r ? r : (ssize_t)total;
}

ssize_t vfm_vfio_user_read_data_view(struct vfm_device *dev, void *buf, size_t len,
				     const void **data, struct vfm_error *err)
{
	struct vfu_client *c;
	ssize_t n;

	*data = buf;
	if (!vfm_device_is_vfio_user(dev))
		return vfm_device_read_data(dev, buf, len, err);
	c = cli_of(dev);
	/* The generic layer's session checks and byte counts, then the view. */
	c->view_want = true;
	c->view_got = NULL;
	n = vfm_device_read_data(dev, buf, len, err);
	if (n > 0 && c->view_got)
		*data = c->view_got;
	c->view_want = false;
	c->view_got = NULL;
	return n;
}

/*
 * Whether the server has extension feature id, asked once with a PROBE.
 * Any error reply means no: servers answer an unknown feature differently
 * (our server library and the kernel ENOTTY; libvfio-user EINVAL, from
 * device_feature_flags_supported() returning 0 in lib/libvfio-user.c at
 * efd091b; others ENOTSUP/ENOSYS), and a PROBE has no state or argument
 * that could fail it otherwise. No reply within the timeout also means no:
 * the request is abandoned, the connection stays, and a server that hangs
 * on it must not cost a timeout per iteration. Lock held.
 */
static int ext_probe(struct vfu_client *c, uint32_t id, enum cli_ext *ext, struct vfm_error *err)
{
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfm_error e = { 0 };
	int r;

	if (*ext != CLI_EXT_UNPROBED)
		return 0;
	r = feature(c, id | VFU_FEATURE_GET | VFU_FEATURE_PROBE, NULL, 0, 0, &reply, &e);
	vfu_msg_release(&reply);
	if (c->dead)
		return vfm_error_set(err, r ? r : -ENOTCONN, "%s", e.msg);
	*ext = r ? CLI_EXT_ABSENT : CLI_EXT_PRESENT;
	if (r)
		vfm_info(c->id, "the vfio-user server has no DEVICE_FEATURE %#" PRIx32
			 " (%s): estimating instead", id, e.msg);
	return 0;
}

/*
 * GET of a vfiomig extension feature with len bytes of data (see
 * docs/vfio-user-server.md, docs/interop.md). -ENOTSUP when the server does
 * not have it (probed once); the connection stays up either way. A GET that
 * times out marks the feature absent too (never a timeout per pass).
 */
static int ext_get(struct vfu_client *c, uint32_t id, enum cli_ext *ext, void *out, size_t len,
		   struct vfm_error *err)
{
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfm_error e = { 0 };
	int r;

	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	r = ext_probe(c, id, ext, &e);
	if (!r && *ext == CLI_EXT_ABSENT) {
		r = -ENOTSUP;
	} else if (!r) {
		r = feature(c, id | VFU_FEATURE_GET, NULL, 0, len, &reply, &e);
		if (!r) {
			memcpy(out, (char *)reply.payload + sizeof(struct vfu_device_feature), len);
			vfu_msg_release(&reply);
		} else if (r == -ETIMEDOUT && !c->dead) {
			vfm_warn(c->id, "DEVICE_FEATURE %#" PRIx32 " timed out: not asking again", id);
			*ext = CLI_EXT_ABSENT;
		}
	}
	vfu_cli_unlock(c);
	if (r == -ENOTSUP)
		return vfm_error_set(err, r, "%s: the vfio-user server has no feature %#" PRIx32,
				     c->id, id);
	if (r && err)
		vfm_error_set(err, r, "%s", e.msg);
	return r;
}

static int mig_precopy_info(struct vfm_device *dev, uint64_t *initial_bytes,
			    uint64_t *dirty_bytes, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	uint64_t v[2];
	int r = ext_get(c, VFM_VFU_FEATURE_PRECOPY_INFO, &c->ext_precopy_info, v, sizeof(v), err);

	if (!r) {
		*initial_bytes = v[0];
		*dirty_bytes = v[1];
	}
	return r;
}

static int mig_stop_copy_size(struct vfm_device *dev, uint64_t *bytes, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);

	return ext_get(c, VFM_VFU_FEATURE_MIG_DATA_SIZE, &c->ext_data_size, bytes, sizeof(*bytes),
		       err);
}

const struct vfm_migration_ops vfu_cli_mig_ops = {
	.get_flags = mig_get_flags,
	.get_state = mig_get_state,
	.set_state = mig_set_state,
	.end_session = mig_end_session,
	.read_data = mig_read_data,
	.write_data = mig_write_data,
	.precopy_info = mig_precopy_info,
	.stop_copy_size = mig_stop_copy_size,
};

int vfu_cli_reset(struct vfm_device *dev, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	struct vfu_msg reply = VFU_MSG_INIT;
	int r = vfu_cli_lock(c, err);

	if (r)
		return r;
	r = vfu_cli_simple(c, VFU_CMD_DEVICE_RESET, NULL, 0, &reply, err);
	vfu_msg_release(&reply);
	c->data_drained = false;
	/*
	 * Ask before trusting, either way: libvfio-user's DEVICE_RESET leaves
	 * the migration state as it was (lib/libvfio-user.c device_reset() at
	 * efd091b calls the reset callback only), where the kernel's reset
	 * returns the device to RUNNING.
	 */
	c->state_known = false;
	vfu_cli_unlock(c);
	return r;
}

/* ---- DMA logging ---- */

bool vfu_cli_probe_logging(struct vfu_client *c)
{
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfm_error e = { 0 };
	int r;

	r = feature(c, VFU_FEATURE_DMA_LOGGING_START | VFU_FEATURE_SET | VFU_FEATURE_PROBE,
		    NULL, 0, 0, &reply, &e);
	vfu_msg_release(&reply);
	if (r)
		vfm_debug(c->id, "no DMA logging: %s", e.msg);
	return r == 0;
}

static int log_start(struct vfm_device *dev, const struct vfm_iova_range *ranges,
		     uint32_t num_ranges, uint64_t *page_size, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	struct vfu_dma_logging_control ctl = { .page_size = *page_size, .num_ranges = num_ranges };
	size_t len = sizeof(ctl) + num_ranges * sizeof(struct vfu_dma_logging_range);
	struct vfu_msg reply = VFU_MSG_INIT;
	char *buf;
	int r;

	buf = malloc(len);
	if (!buf)
		return vfm_error_set(err, -ENOMEM, "%s: no memory for DMA logging ranges", c->id);
	memcpy(buf, &ctl, sizeof(ctl));
	for (uint32_t i = 0; i < num_ranges; i++) {
		struct vfu_dma_logging_range rg = { ranges[i].iova, ranges[i].length };

		memcpy(buf + sizeof(ctl) + i * sizeof(rg), &rg, sizeof(rg));
	}
	r = vfu_cli_lock(c, err);
	if (!r) {
		r = feature(c, VFU_FEATURE_DMA_LOGGING_START | VFU_FEATURE_SET, buf, len,
			    sizeof(ctl), &reply, err);
		vfu_cli_unlock(c);
	}
	free(buf);
	if (r)
		return r;
	/* The reply carries the page size the server chose. */
	memcpy(&ctl, (char *)reply.payload + sizeof(struct vfu_device_feature), sizeof(ctl));
	vfu_msg_release(&reply);
	if (ctl.page_size >= 4096 && !(ctl.page_size & (ctl.page_size - 1)))
		*page_size = ctl.page_size;
	else
		vfm_warn(c->id, "DMA logging: ignoring page size %#" PRIx64 " from the server",
			 ctl.page_size);
	return 0;
}

static int log_stop(struct vfm_device *dev, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	struct vfu_msg reply = VFU_MSG_INIT;
	int r = vfu_cli_lock(c, err);

	if (r)
		return r;
	r = feature(c, VFU_FEATURE_DMA_LOGGING_STOP | VFU_FEATURE_SET, NULL, 0, 0, &reply, err);
	vfu_msg_release(&reply);
	vfu_cli_unlock(c);
	return r;
}

/*
 * DMA_LOGGING_REPORT in pieces whose bitmap fits max_data_xfer_size. Each
 * piece covers a multiple of 64 pages, so its words OR straight into place.
 */
static int log_report(struct vfm_device *dev, uint64_t iova, uint64_t length,
		      uint64_t page_size, uint64_t *bitmap, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	uint64_t pages_per_msg = (uint64_t)(c->neg.max_xfer / sizeof(uint64_t)) * 64;
	uint64_t piece = page_size > UINT64_MAX / pages_per_msg ? UINT64_MAX
								 : pages_per_msg * page_size;
	int r = vfu_cli_lock(c, err);

	if (r)
		return r;
	for (uint64_t off = 0; off < length && !r; off += piece) {
		uint64_t plen = length - off < piece ? length - off : piece;
		struct vfu_dma_logging_report req = { iova + off, plen, page_size };
		struct vfu_msg reply = VFU_MSG_INIT;
		uint64_t bytes, w0 = off / page_size / 64;
		const char *bits;

		r = vfu_bitmap_size(plen, page_size, &bytes, err);
		if (r)
			break;
		r = feature(c, VFU_FEATURE_DMA_LOGGING_REPORT | VFU_FEATURE_GET, &req, sizeof(req),
			    sizeof(req) + bytes, &reply, err);
		if (r)
			break;
		bits = (const char *)reply.payload + sizeof(struct vfu_device_feature) + sizeof(req);
		for (uint64_t i = 0; i < bytes / sizeof(uint64_t); i++) {
			uint64_t v;

			memcpy(&v, bits + i * sizeof(v), sizeof(v));
			bitmap[w0 + i] |= v;
		}
		vfu_msg_release(&reply);
	}
	vfu_cli_unlock(c);
	return r;
}

const struct vfm_dma_logging_ops vfu_cli_log_ops = {
	.start = log_start,
	.stop = log_stop,
	.report = log_report,
};
