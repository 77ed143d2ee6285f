/*
 * Migration v2 and DMA logging over VFIO_DEVICE_FEATURE on a kernel device:
 * state get/set, the data fd (O_NONBLOCK; ENOMSG / 0 / EAGAIN + poll in
 * slices that see a cancel), PRECOPY_INFO in the read loop, MIG_DATA_SIZE,
 * and DMA_LOGGING_START/STOP/REPORT.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/logging.h"
#include "vfio/priv.h"

/* The largest feature payload we send in place (DMA_LOGGING_REPORT, 32 bytes). */
#define FEATURE_PAYLOAD_MAX 32

int kv_feature(struct kv_dev *k, uint32_t flags, void *payload, size_t len)
{
	union {
		struct vfio_device_feature f;
		uint64_t align[(sizeof(struct vfio_device_feature) + FEATURE_PAYLOAD_MAX) / 8];
	} buf;
	int r;

	if (len > FEATURE_PAYLOAD_MAX)
		return -EINVAL;
	memset(&buf, 0, sizeof(buf));
	buf.f.argsz = (uint32_t)(sizeof(buf.f) + len);
	buf.f.flags = flags;
	if (len)
		memcpy(buf.f.data, payload, len);
	r = kv_ioctl(k, k->devfd, VFIO_DEVICE_FEATURE, &buf);
	/* The kernel copies the payload back on failure too (the requested state). */
	if (len)
		memcpy(payload, buf.f.data, len);
	return r;
}

void kv_close_data_fd(struct kv_dev *k)
{
	if (k->data_fd >= 0) {
		k->sys->close(k->sys->opaque, k->data_fd);
		vfm_trace(k->id, "data fd closed");
	}
	k->data_fd = -1;
	k->data_nonblock = false;
}

/*
 * O_NONBLOCK on a new data fd: a driver with nothing to give then answers
 * EAGAIN instead of sleeping in read() or write(), where no cancel reaches
 * the thread (mlx5's mlx5vf_save_read() waits for data only without
 * O_NONBLOCK, drivers/vfio/pci/mlx5/main.c; hisi_acc and mtty never wait).
 * A V1 system-call table or a failing fcntl leaves the fd blocking: reads
 * and writes still work, only a stuck driver cannot be cancelled then.
 */
static void set_data_fd_nonblocking(struct kv_dev *k)
{
	int fl, r;

	k->data_nonblock = false;
	if (k->sys->version < VFM_VFIO_SYS_V2 || !k->sys->fcntl)
		return;
	fl = k->sys->fcntl(k->sys->opaque, k->data_fd, F_GETFL, 0);
	r = fl < 0 ? fl : (fl & O_NONBLOCK) ? 0 :
		k->sys->fcntl(k->sys->opaque, k->data_fd, F_SETFL, fl | O_NONBLOCK);
	if (r < 0) {
		vfm_warn(k->id, "data fd stays blocking (fcntl: %s): a stuck driver cannot be "
			 "cancelled", strerror(-r));
		return;
	}
	k->data_nonblock = true;
}

void vfm_vfio_set_cancel_check(struct vfm_device *dev, bool (*cancelled)(void *opaque),
			       void *opaque)
{
	struct kv_dev *k;

	if (!vfm_device_is_vfio(dev))
		return;
	k = kv_of(dev);
	atomic_store(&k->cancelled, NULL);
	atomic_store(&k->cancel_opaque, opaque);
	atomic_store(&k->cancelled, cancelled);
}

static bool is_cancelled(struct kv_dev *k)
{
	bool (*fn)(void *) = atomic_load(&k->cancelled);

	return fn && fn(atomic_load(&k->cancel_opaque));
}

void kv_probe_features(struct kv_dev *k)
{
	struct vfio_device_feature_migration m = { 0 };
	int r;

	/* ENOTTY (no migration ops) or EINVAL (older kernels): no migration. */
	r = kv_feature(k, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION, &m, sizeof(m));
	if (r == 0) {
		if (m.flags & ~(uint64_t)VFM_MIG_ALL)
			vfm_debug(k->id, "ignoring unknown migration flags %#" PRIx64,
				  (uint64_t)(m.flags & ~(uint64_t)VFM_MIG_ALL));
		k->mig_flags = m.flags & VFM_MIG_ALL;
		k->has_mig = true;
	} else {
		vfm_debug(k->id, "no migration: %s", strerror(-r));
	}
	r = kv_feature(k, VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET |
			  VFIO_DEVICE_FEATURE_DMA_LOGGING_START, NULL, 0);
	k->has_logging = r == 0;
	if (r)
		vfm_debug(k->id, "no DMA logging: %s", strerror(-r));
}

static int mig_get_flags(struct vfm_device *dev, uint64_t *flags, struct vfm_error *err)
{
	*flags = kv_of(dev)->mig_flags;
	return 0;
}

int kv_get_state(struct kv_dev *k, enum vfm_state *out, struct vfm_error *err)
{
	struct vfio_device_feature_mig_state s = { .data_fd = -1 };
	int r = kv_feature(k, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
			   &s, sizeof(s));

	if (r)
		return vfm_error_set(err, r, "%s: GET MIG_DEVICE_STATE: %s", k->id, strerror(-r));
	if (s.device_state >= VFM_STATE_COUNT)
		return vfm_error_set(err, VFM_EPROTOCOL, "%s: kernel reported state %" PRIu32,
				     k->id, s.device_state);
	k->state = (enum vfm_state)s.device_state;
	k->state_known = true;
	/* Out of every session state (after a failed SET): the fd is dead. */
	if (!vfm_state_has_session(k->state))
		kv_close_data_fd(k);
	*out = k->state;
	return 0;
}

static int mig_get_state(struct vfm_device *dev, enum vfm_state *state, struct vfm_error *err)
{
	return kv_get_state(kv_of(dev), state, err);
}

/*
 * One SET with the final state: the kernel walks the arcs itself. The path
 * is computed only to refuse what must never reach the kernel (STOP_COPY ->
 * PRE_COPY* loops forever in some kernels) and to know whether the old
 * session ended on the way.
 */
static int mig_set_state(struct vfm_device *dev, enum vfm_state new_state, bool *session_opened,
			 struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	struct vfio_device_feature_mig_state s = { .device_state = (uint32_t)new_state,
						   .data_fd = -1 };
	enum vfm_state path[VFM_STATE_COUNT], from;
	bool ends_session = false;
	size_t len;
	int r;

	*session_opened = false;
	if (!k->state_known) {
		r = kv_get_state(k, &from, err);
		if (r)
			return r;
	}
	from = k->state;
	if (vfm_fsm_path(k->mig_flags, from, new_state, path, &len))
		return vfm_error_set(err, -EINVAL, "%s: %s -> %s is not a valid request", k->id,
				     vfm_state_name(from), vfm_state_name(new_state));
	if (len == 0)
		return 0;
	for (size_t i = 0; i < len; i++)
		ends_session |= !vfm_state_has_session(path[i]);
	r = kv_feature(k, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, &s,
		       sizeof(s));
	if (r) {
		/* The kernel copied back the requested state: only a GET knows. */
		k->state_known = false;
		return vfm_error_set(err, r, "%s: SET MIG_DEVICE_STATE %s -> %s: %s", k->id,
				     vfm_state_name(from), vfm_state_name(new_state), strerror(-r));
	}
	k->state = new_state;
	if (ends_session)
		kv_close_data_fd(k);
	if (s.data_fd >= 0) {
		/* A second fd while one is open would be a kernel bug; the device
		 * layer reports it (it sees session_opened with a session held). */
		kv_close_data_fd(k);
		k->data_fd = s.data_fd;
		set_data_fd_nonblocking(k);
		*session_opened = true;
		vfm_trace(k->id, "data fd %d%s", s.data_fd, k->data_nonblock ? " (non-blocking)" : "");
	}
	return 0;
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* One read or write's wait for the data fd, over all its EAGAINs. */
struct kv_wait {
	uint64_t deadline;         /* ms, set at the first EAGAIN */
	bool was_ready;            /* the last poll said ready */
	int backoff_ms;            /* > 0: ready yet EAGAIN again, sleep instead */
};

/*
 * The data fd answered EAGAIN: waits for events until the read or write's
 * deadline (k->timeout_ms after its first EAGAIN), in poll() slices of at
 * most VFM_VFIO_CANCEL_SLICE_MS with a cancel check before each. 0: retry;
 * else the error (VFM_ECANCELED, -ETIMEDOUT, poll's).
 *
 * A driver without a poll method always reads as ready (vfs_poll() gives
 * DEFAULT_POLLMASK; mtty's migration files have none, samples/vfio-mdev/
 * mtty.c): when a "ready" fd answers EAGAIN again, the next waits sleep
 * instead, 1 ms doubling up to a slice, so such a driver is not spun on.
 */
static int wait_data_fd(struct kv_dev *k, short events, struct kv_wait *w, const char *what,
			struct vfm_error *err)
{
	uint64_t now = now_ms();
	int r;

	if (!w->deadline)
		w->deadline = now + (uint64_t)k->timeout_ms;
	if (w->was_ready || w->backoff_ms)   /* EAGAIN again after "ready" or a sleep */
		w->backoff_ms = w->backoff_ms ? w->backoff_ms * 2 : 1;
	if (w->backoff_ms > VFM_VFIO_CANCEL_SLICE_MS)
		w->backoff_ms = VFM_VFIO_CANCEL_SLICE_MS;
	w->was_ready = false;
	for (;;) {
		struct pollfd p = { .fd = k->data_fd, .events = events };
		uint64_t left;
		int slice;

		if (is_cancelled(k))
			return vfm_error_set(err, VFM_ECANCELED, "%s: migration cancelled while "
					     "waiting for the data fd", k->id);
		now = now_ms();
		if (now >= w->deadline)
			return vfm_error_set(err, -ETIMEDOUT, "%s: %s within %d ms", k->id, what,
					     k->timeout_ms);
		left = w->deadline - now;
		slice = left < VFM_VFIO_CANCEL_SLICE_MS ? (int)left : VFM_VFIO_CANCEL_SLICE_MS;
		if (w->backoff_ms) {
			/* A sleep: poll() of no fds (EINTR is as good as the time out). */
			k->sys->poll(k->sys->opaque, NULL, 0,
				     w->backoff_ms < slice ? w->backoff_ms : slice);
			return 0;
		}
		r = k->sys->poll(k->sys->opaque, &p, 1, slice);
		if (r == -EINTR || r == 0)
			continue;
		if (r < 0)
			return vfm_error_set(err, r, "%s: poll on the data fd: %s", k->id,
					     strerror(-r));
		if (p.revents & POLLNVAL)
			return vfm_error_set(err, -EBADF, "%s: poll on the data fd: not open", k->id);
		w->was_ready = true;
		return 0;   /* ready, or POLLERR/POLLHUP: the retry reports it */
	}
}

static bool in_precopy(const struct kv_dev *k)
{
	return k->state == VFM_STATE_PRE_COPY || k->state == VFM_STATE_PRE_COPY_P2P;
}

static int precopy_info(struct kv_dev *k, uint64_t *init, uint64_t *dirty, struct vfm_error *err)
{
	struct vfio_precopy_info pi = { .argsz = sizeof(pi) };
	int r;

	if (k->data_fd < 0 || !in_precopy(k))
		return vfm_error_set(err, -EINVAL, "%s: precopy info outside PRE_COPY", k->id);
	r = kv_ioctl(k, k->data_fd, VFIO_MIG_GET_PRECOPY_INFO, &pi);
	if (r)
		return vfm_error_set(err, r, "%s: VFIO_MIG_GET_PRECOPY_INFO: %s", k->id,
				     strerror(-r));
	*init = pi.initial_bytes;
	*dirty = pi.dirty_bytes;
	return 0;
}

/*
 * read() on the data fd. In PRE_COPY* "nothing now" is ENOMSG (or 0 from
 * some drivers, mtty); mlx5 and virtio produce new data only when
 * PRECOPY_INFO is asked at the end of the current data, so it is asked there
 * and the read retried once when it announces bytes. EAGAIN waits in
 * wait_data_fd() (cancel, timeout).
 */
static ssize_t mig_read_data(struct vfm_device *dev, void *buf, size_t len,
			     struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	struct kv_wait w = { 0 };
	bool asked = false;

	if (k->data_fd < 0 || !vfm_state_is_saving(k->state))
		return vfm_error_set(err, -EINVAL, "%s: no saving data session", k->id);
	if (!len)
		return vfm_error_set(err, -EINVAL, "%s: data read of 0 bytes", k->id);
	for (;;) {
		ssize_t n = k->sys->read(k->sys->opaque, k->data_fd, buf, len);
		uint64_t init, dirty;
		int r;

		if (n > 0)
			return n;
		if (n == -EINTR)
			continue;
		if (n == -EAGAIN) {
			r = wait_data_fd(k, POLLIN, &w, "no migration data", err);
			if (r)
				return r;
			continue;
		}
		if (!in_precopy(k)) {
			if (n == 0)
				return 0;   /* STOP_COPY: end of stream */
			return vfm_error_set(err, (int)n, "%s: reading the data fd: %s", k->id,
					     strerror((int)-n));
		}
		if (n != 0 && n != -ENOMSG)
			return vfm_error_set(err, (int)n, "%s: reading the data fd: %s", k->id,
					     strerror((int)-n));
		if (!asked && (k->mig_flags & VFM_MIG_PRE_COPY) &&
		    precopy_info(k, &init, &dirty, NULL) == 0 && init + dirty > 0) {
			asked = true;
			continue;
		}
		return -ENOMSG;
	}
}

static ssize_t mig_write_data(struct vfm_device *dev, const void *buf, size_t len,
			      struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	struct kv_wait w = { 0 };

	if (k->data_fd < 0 || k->state != VFM_STATE_RESUMING)
		return vfm_error_set(err, -EINVAL, "%s: no resuming data session", k->id);
	for (;;) {
		ssize_t n = k->sys->write(k->sys->opaque, k->data_fd, buf, len);
		int r;

		if (n > 0)
			return n;
		if (n == -EINTR)
			continue;
		if (n == -EAGAIN) {
			r = wait_data_fd(k, POLLOUT, &w, "data fd not writable", err);
			if (r)
				return r;
			continue;
		}
		return vfm_error_set(err, n ? (int)n : -EIO, "%s: writing the data fd: %s",
				     k->id, n ? strerror((int)-n) : "no progress");
	}
}

static int mig_precopy_info(struct vfm_device *dev, uint64_t *init, uint64_t *dirty,
			    struct vfm_error *err)
{
	return precopy_info(kv_of(dev), init, dirty, err);
}

static int mig_stop_copy_size(struct vfm_device *dev, uint64_t *bytes, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	struct vfio_device_feature_mig_data_size sz = { 0 };
	int r = kv_feature(k, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, &sz,
			   sizeof(sz));

	if (r)
		return vfm_error_set(err, r, "%s: GET MIG_DATA_SIZE: %s", k->id, strerror(-r));
	*bytes = sz.stop_copy_length;
	return 0;
}

const struct vfm_migration_ops kv_mig_ops = {
	.get_flags = mig_get_flags,
	.get_state = mig_get_state,
	.set_state = mig_set_state,
	.read_data = mig_read_data,
	.write_data = mig_write_data,
	.precopy_info = mig_precopy_info,
	.stop_copy_size = mig_stop_copy_size,
};

/* ---- DMA logging ---- */

static int log_start(struct vfm_device *dev, const struct vfm_iova_range *ranges,
		     uint32_t num_ranges, uint64_t *page_size, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	struct vfio_device_feature_dma_logging_control ctl = { 0 };
	struct vfio_device_feature_dma_logging_range *kr;
	struct vfm_iova_range *fit;
	int n, r;

	fit = malloc(num_ranges * sizeof(*fit));
	kr = malloc(num_ranges * sizeof(*kr));
	if (!fit || !kr) {
		r = vfm_error_set(err, -ENOMEM, "%s: no memory for DMA logging ranges", k->id);
		goto out;
	}
	memcpy(fit, ranges, num_ranges * sizeof(*fit));
	n = vfm_iova_ranges_fit(fit, num_ranges, *page_size, VFM_VFIO_LOG_MAX_RANGES);
	if (n <= 0) {
		r = vfm_error_set(err, -EINVAL, "%s: bad DMA logging ranges", k->id);
		goto out;
	}
	for (int i = 0; i < n; i++)
		kr[i] = (struct vfio_device_feature_dma_logging_range){ fit[i].iova, fit[i].length };
	ctl.page_size = *page_size;
	ctl.num_ranges = (uint32_t)n;
	ctl.ranges = (uintptr_t)kr;
	r = kv_feature(k, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, &ctl,
		       sizeof(ctl));
	if (r) {
		vfm_error_set(err, r, "%s: DMA_LOGGING_START (%d ranges): %s", k->id, n,
			      strerror(-r));
		goto out;
	}
	if (ctl.page_size >= 4096 && !(ctl.page_size & (ctl.page_size - 1)))
		*page_size = ctl.page_size;
	pthread_mutex_lock(&k->as->lock);
	k->dev_log_on = true;
	pthread_mutex_unlock(&k->as->lock);
	vfm_debug(k->id, "DMA logging on: %d ranges, %" PRIu64 "-byte pages", n, *page_size);
out:
	free(fit);
	free(kr);
	return r;
}

static int log_stop(struct vfm_device *dev, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	int r = kv_feature(k, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
			   NULL, 0);

	if (r)
		return vfm_error_set(err, r, "%s: DMA_LOGGING_STOP: %s", k->id, strerror(-r));
	pthread_mutex_lock(&k->as->lock);
	k->dev_log_on = false;
	pthread_mutex_unlock(&k->as->lock);
	return 0;
}

/* The kernel only sets bits (iova_bitmap), so the caller's bitmap is OR-ed into. */
static int log_report(struct vfm_device *dev, uint64_t iova, uint64_t length,
		      uint64_t page_size, uint64_t *bitmap, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	struct vfio_device_feature_dma_logging_report rep = {
		.iova = iova, .length = length, .page_size = page_size,
		.bitmap = (uintptr_t)bitmap,
	};
	int r = kv_feature(k, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
			   &rep, sizeof(rep));

	if (r)
		return vfm_error_set(err, r, "%s: DMA_LOGGING_REPORT 0x%" PRIx64 "+0x%" PRIx64
				     ": %s", k->id, iova, length, strerror(-r));
	return 0;
}

const struct vfm_dma_logging_ops kv_log_ops = {
	.start = log_start,
	.stop = log_stop,
	.report = log_report,
};
