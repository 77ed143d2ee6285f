/*
 * The device layer: the state-machine policy (refuse forbidden requests,
 * recover or reset on failure), data-session bookkeeping and tracing, on top
 * of a backend's ops tables.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/logging.h"
#include "vfiomig/device.h"

/* VFIO_DEVICE_FEATURE_DMA_LOGGING_START takes 1..256 ranges (one 4 KiB page). */
#define VFM_DMA_LOG_MAX_RANGES 256u

struct vfm_device {
	/* Never change after vfm_device_new(). */
	char id[64];
	const struct vfm_device_ops *ops;
	void *priv;

	pthread_mutex_t lock;
	/* Guarded by lock. */
	uint64_t mig_flags;      /* 0 until probed */
	bool probed;
	enum vfm_state state;    /* last state known */
	bool session_open;       /* a data session is held */
	uint64_t bytes_read;     /* data read in the current session */
	uint64_t bytes_written;  /* data written in the current session */
};

struct vfm_device *vfm_device_new(const char *id, const struct vfm_device_ops *ops,
				  void *priv)
{
	struct vfm_device *dev;

	if (!ops || !ops->close)
		return NULL;
	dev = calloc(1, sizeof(*dev));
	if (!dev)
		return NULL;
	snprintf(dev->id, sizeof(dev->id), "%s", id && *id ? id : "dev");
	dev->ops = ops;
	dev->priv = priv;
	dev->state = VFM_STATE_RUNNING;
	pthread_mutex_init(&dev->lock, NULL);
	return dev;
}

void *vfm_device_priv(const struct vfm_device *dev)
{
	return dev->priv;
}

void vfm_device_free(struct vfm_device *dev)
{
	if (!dev)
		return;
	dev->ops->close(dev);
	pthread_mutex_destroy(&dev->lock);
	free(dev);
}

const char *vfm_device_id(const struct vfm_device *dev)
{
	return dev->id;
}

const char *vfm_device_backend(const struct vfm_device *dev)
{
	return dev->ops->backend ? dev->ops->backend : "unknown";
}

const struct vfm_device_ops *vfm_device_ops(const struct vfm_device *dev)
{
	return dev->ops;
}

static const struct vfm_migration_ops *mig_ops(const struct vfm_device *dev)
{
	return dev->ops->mig;
}

int vfm_device_probe_migration(struct vfm_device *dev, struct vfm_error *err)
{
	const struct vfm_migration_ops *mig = mig_ops(dev);
	enum vfm_state st;
	uint64_t flags = 0;
	char fbuf[64];
	int ret;

	if (!mig || !mig->get_flags || !mig->get_state || !mig->set_state ||
	    !mig->read_data || !mig->write_data)
		return vfm_error_set(err, VFM_ENOMIGRATION, "%s: %s backend has no migration",
				     dev->id, vfm_device_backend(dev));
	pthread_mutex_lock(&dev->lock);
	ret = mig->get_flags(dev, &flags, err);
	if (ret) {
		/* ENOTTY/EINVAL from the kernel mean "no migration". */
		if (ret == -ENOTTY || ret == -EINVAL || ret == -ENOTSUP)
			ret = VFM_ENOMIGRATION;
		vfm_error_set(err, ret, "%s: reading migration flags", dev->id);
		goto out;
	}
	if (!(flags & VFM_MIG_STOP_COPY)) {
		ret = vfm_error_set(err, VFM_ENOMIGRATION,
				    "%s: migration flags 0x%" PRIx64 " lack STOP_COPY",
				    dev->id, flags);
		goto out;
	}
	ret = mig->get_state(dev, &st, err);
	if (ret) {
		vfm_error_set(err, ret, "%s: reading device state", dev->id);
		goto out;
	}
	if ((unsigned)st >= VFM_STATE_COUNT) {
		ret = vfm_error_set(err, VFM_EPROTOCOL, "%s: device reported state %u",
				    dev->id, (unsigned)st);
		goto out;
	}
	dev->mig_flags = flags;
	dev->probed = true;
	dev->state = st;
	vfm_debug(dev->id, "migration flags %s, state %s",
		  vfm_mig_flags_str(flags, fbuf, sizeof(fbuf)), vfm_state_name(st));
out:
	pthread_mutex_unlock(&dev->lock);
	return ret;
}

uint64_t vfm_device_mig_flags(const struct vfm_device *dev)
{
	return dev->mig_flags;
}

enum vfm_state vfm_device_state(struct vfm_device *dev)
{
	enum vfm_state st;

	pthread_mutex_lock(&dev->lock);
	st = dev->state;
	pthread_mutex_unlock(&dev->lock);
	return st;
}

bool vfm_device_has_session(struct vfm_device *dev)
{
	bool open;

	pthread_mutex_lock(&dev->lock);
	open = dev->session_open;
	pthread_mutex_unlock(&dev->lock);
	return open;
}

static void drop_session(struct vfm_device *dev)
{
	if (!dev->session_open)
		return;
	vfm_trace(dev->id, "data session closed (read %" PRIu64 ", written %" PRIu64 " bytes)",
		  dev->bytes_read, dev->bytes_written);
	if (mig_ops(dev)->end_session)
		mig_ops(dev)->end_session(dev);
	dev->session_open = false;
}

/* Ask the device (lock held); on success the cache follows. */
static int query_state_locked(struct vfm_device *dev, enum vfm_state *out,
			      struct vfm_error *err)
{
	enum vfm_state st;
	int ret = mig_ops(dev)->get_state(dev, &st, err);

	if (ret)
		return ret;
	if ((unsigned)st >= VFM_STATE_COUNT)
		return vfm_error_set(err, VFM_EPROTOCOL, "%s: device reported state %u",
				     dev->id, (unsigned)st);
	dev->state = st;
	if (!vfm_state_has_session(st))
		drop_session(dev);
	*out = st;
	return 0;
}

int vfm_device_query_state(struct vfm_device *dev, enum vfm_state *state,
			   struct vfm_error *err)
{
	int ret;

	if (!dev->probed)
		return vfm_error_set(err, -EINVAL, "%s: migration not probed", dev->id);
	pthread_mutex_lock(&dev->lock);
	ret = query_state_locked(dev, state, err);
	pthread_mutex_unlock(&dev->lock);
	return ret;
}

static int try_set_locked(struct vfm_device *dev, enum vfm_state new_state,
			  struct vfm_error *err);

static int reset_locked(struct vfm_device *dev, struct vfm_error *err)
{
	int ret;

	if (!dev->ops->reset) {
		/* Stuck in ERROR: whatever session there was is of no use now. */
		drop_session(dev);
		dev->state = VFM_STATE_ERROR;
		return vfm_error_set(err, -ENOTSUP, "%s: device cannot be reset", dev->id);
	}
	drop_session(dev);
	ret = dev->ops->reset(dev, err);
	if (ret) {
		enum vfm_state now;

		vfm_err(dev->id, "reset failed: %s", vfm_strerror(ret));
		/*
		 * A refused reset need not have hurt the device (libvfio-user
		 * refuses DEVICE_RESET in STOP and STOP_COPY, lib/libvfio-user.c
		 * cmd_allowed_when_stopped_and_copying() at efd091b): keep the
		 * state it reports; ERROR only when it says so or cannot say.
		 */
		if (!dev->probed || !mig_ops(dev) || query_state_locked(dev, &now, NULL) ||
		    now == VFM_STATE_ERROR) {
			dev->state = VFM_STATE_ERROR;
		} else {
			vfm_warn(dev->id, "after the failed reset the device reports %s: keeping it",
				 vfm_state_name(now));
		}
		return ret;
	}
	dev->state = VFM_STATE_RUNNING;
	if (dev->probed && mig_ops(dev)) {
		enum vfm_state now;
		struct vfm_error e = { 0 };

		/* A reset need not leave RUNNING behind (libvfio-user keeps the
		 * migration state): read it, and take one step to RUNNING. */
		ret = query_state_locked(dev, &now, &e);
		if (!ret && now != VFM_STATE_RUNNING && now != VFM_STATE_ERROR) {
			vfm_info(dev->id, "after the reset the device reports %s: to RUNNING",
				 vfm_state_name(now));
			ret = try_set_locked(dev, VFM_STATE_RUNNING, &e);
		} else if (!ret && now == VFM_STATE_ERROR) {
			ret = vfm_error_set(&e, -EIO, "the device is in ERROR after the reset");
		}
		if (ret) {
			if (ret == VFM_EPROTOCOL || dev->state == VFM_STATE_ERROR ||
			    query_state_locked(dev, &now, NULL))
				dev->state = VFM_STATE_ERROR;
			vfm_err(dev->id, "after the reset: %s", e.msg);
			return vfm_error_set(err, ret, "%s: after the reset: %s", dev->id, e.msg);
		}
	}
	vfm_trace(dev->id, "state -> RUNNING (reset)");
	return 0;
}

int vfm_device_reset(struct vfm_device *dev, struct vfm_error *err)
{
	int ret;

	pthread_mutex_lock(&dev->lock);
	ret = reset_locked(dev, err);
	pthread_mutex_unlock(&dev->lock);
	return ret;
}

/*
 * One attempt at new_state from the cached state: refused before touching the
 * device when the state machine forbids it. Lock held.
 */
static int try_set_locked(struct vfm_device *dev, enum vfm_state new_state,
			  struct vfm_error *err)
{
	enum vfm_state path[VFM_STATE_COUNT];
	enum vfm_state from = dev->state, last_from;
	bool opened = false, should_open;
	size_t len;
	int ret;

	if (vfm_fsm_path(dev->mig_flags, from, new_state, path, &len))
		return vfm_error_set(err, VFM_EFORBIDDEN, "%s: %s -> %s is not allowed",
				     dev->id, vfm_state_name(from), vfm_state_name(new_state));
	if (len == 0)
		return 0;
	last_from = len > 1 ? path[len - 2] : from;
	should_open = vfm_arc_opens_session(last_from, new_state);
	ret = mig_ops(dev)->set_state(dev, new_state, &opened, err);
	if (ret)
		return ret;
	dev->state = new_state;
	/* A session ends with any path through a state that has none. */
	for (size_t i = 0; i + 1 < len; i++)
		if (!vfm_state_has_session(path[i]))
			drop_session(dev);
	if (!vfm_state_has_session(new_state))
		drop_session(dev);
	if (opened) {
		if (dev->session_open)
			return vfm_error_set(err, VFM_ESESSION,
					     "%s: new data session while one is open", dev->id);
		/* Only the final arc may open one, and only an opening arc. */
		if (!should_open)
			return vfm_error_set(err, VFM_ESESSION,
					     "%s: %s -> %s handed out a data session", dev->id,
					     vfm_state_name(last_from), vfm_state_name(new_state));
		dev->session_open = true;
		dev->bytes_read = dev->bytes_written = 0;
		vfm_trace(dev->id, "data session opened");
	} else if (should_open) {
		/* The final arc should have opened one: the backend disagrees. */
		return vfm_error_set(err, VFM_ESESSION,
				     "%s: %s -> %s opened no data session", dev->id,
				     vfm_state_name(from), vfm_state_name(new_state));
	}
	vfm_trace(dev->id, "state %s -> %s", vfm_state_name(from), vfm_state_name(new_state));
	return 0;
}

int vfm_device_set_state(struct vfm_device *dev, enum vfm_state new_state,
			 enum vfm_state recover, struct vfm_error *err)
{
	enum vfm_state from, now;
	int ret, ret2;

	if (!dev->probed)
		return vfm_error_set(err, -EINVAL, "%s: migration not probed", dev->id);
	pthread_mutex_lock(&dev->lock);
	from = dev->state;
	if (from == VFM_STATE_ERROR && new_state != VFM_STATE_ERROR) {
		ret = vfm_error_set(err, VFM_EFORBIDDEN,
				    "%s: device is in ERROR; only a reset leaves it", dev->id);
		goto out;
	}
	ret = try_set_locked(dev, new_state, err);
	if (ret == 0 || ret == VFM_EFORBIDDEN)
		goto out;

	/* The kernel copies back the requested state on failure: ask. */
	vfm_warn(dev->id, "%s -> %s failed: %s", vfm_state_name(from),
		 vfm_state_name(new_state), err && err->msg[0] ? err->msg : vfm_strerror(ret));
	ret2 = query_state_locked(dev, &now, NULL);
	if (ret2) {
		vfm_warn(dev->id, "cannot read state back: %s; resetting", vfm_strerror(ret2));
		reset_locked(dev, NULL);
		goto out;
	}
	if (recover == VFM_STATE_ERROR || now == VFM_STATE_ERROR) {
		vfm_warn(dev->id, "state %s; resetting", vfm_state_name(now));
		reset_locked(dev, NULL);
		goto out;
	}
	ret2 = try_set_locked(dev, recover, NULL);
	if (ret2) {
		vfm_warn(dev->id, "recovery to %s failed: %s; resetting",
			 vfm_state_name(recover), vfm_strerror(ret2));
		reset_locked(dev, NULL);
		goto out;
	}
	vfm_info(dev->id, "recovered to %s", vfm_state_name(recover));
out:
	pthread_mutex_unlock(&dev->lock);
	return ret;
}

ssize_t vfm_device_read_data(struct vfm_device *dev, void *buf, size_t len,
			     struct vfm_error *err)
{
	ssize_t n;

	pthread_mutex_lock(&dev->lock);
	if (!dev->session_open || !vfm_state_is_saving(dev->state)) {
		pthread_mutex_unlock(&dev->lock);
		return vfm_error_set(err, -EINVAL, "%s: no saving data session (state %s)",
				     dev->id, vfm_state_name(dev->state));
	}
	pthread_mutex_unlock(&dev->lock);

	/* Without the lock: reads may block and only one thread reads. */
	n = mig_ops(dev)->read_data(dev, buf, len, err);
	if (n > 0 && (size_t)n > len)
		return vfm_error_set(err, -EIO, "%s: device returned %zd bytes for a %zu-byte read",
				     dev->id, n, len);
	if (n > 0) {
		pthread_mutex_lock(&dev->lock);
		dev->bytes_read += (uint64_t)n;
		pthread_mutex_unlock(&dev->lock);
		vfm_trace(dev->id, "data block read: %zd bytes", n);
	} else if (n == 0) {
		vfm_trace(dev->id, "data read: end of data");
	} else if (n != -ENOMSG && n != -EAGAIN) {
		vfm_error_set(err, (int)n, "%s: reading migration data", dev->id);
	}
	return n;
}

int vfm_device_write_data(struct vfm_device *dev, const void *buf, size_t len,
			  struct vfm_error *err)
{
	const unsigned char *p = buf;
	ssize_t n;

	pthread_mutex_lock(&dev->lock);
	if (!dev->session_open || dev->state != VFM_STATE_RESUMING) {
		pthread_mutex_unlock(&dev->lock);
		return vfm_error_set(err, -EINVAL, "%s: no resuming data session (state %s)",
				     dev->id, vfm_state_name(dev->state));
	}
	pthread_mutex_unlock(&dev->lock);

	while (len) {
		n = mig_ops(dev)->write_data(dev, p, len, err);
		if (n == -EINTR || n == -EAGAIN)
			continue;
		if (n <= 0 || (size_t)n > len)
			return vfm_error_set(err, n < 0 ? (int)n : -EIO,
					     "%s: writing migration data", dev->id);
		vfm_trace(dev->id, "data block written: %zd bytes", n);
		pthread_mutex_lock(&dev->lock);
		dev->bytes_written += (uint64_t)n;
		pthread_mutex_unlock(&dev->lock);
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int vfm_device_precopy_info(struct vfm_device *dev, uint64_t *initial_bytes,
			    uint64_t *dirty_bytes, struct vfm_error *err)
{
	enum vfm_state st = vfm_device_state(dev);
	int ret;

	if (!mig_ops(dev) || !mig_ops(dev)->precopy_info)
		return vfm_error_set(err, -ENOTSUP, "%s: no precopy info", dev->id);
	if (st != VFM_STATE_PRE_COPY && st != VFM_STATE_PRE_COPY_P2P)
		return vfm_error_set(err, -EINVAL, "%s: precopy info in state %s",
				     dev->id, vfm_state_name(st));
	ret = mig_ops(dev)->precopy_info(dev, initial_bytes, dirty_bytes, err);
	if (ret == 0)
		vfm_trace(dev->id, "precopy info: initial %" PRIu64 ", dirty %" PRIu64,
			  *initial_bytes, *dirty_bytes);
	return ret;
}

int vfm_device_stop_copy_size(struct vfm_device *dev, uint64_t *bytes,
			      struct vfm_error *err)
{
	if (!mig_ops(dev) || !mig_ops(dev)->stop_copy_size)
		return vfm_error_set(err, -ENOTSUP, "%s: no stop-copy size", dev->id);
	return mig_ops(dev)->stop_copy_size(dev, bytes, err);
}

int vfm_device_get_info(struct vfm_device *dev, struct vfm_device_info *info,
			struct vfm_error *err)
{
	if (!dev->ops->get_info)
		return vfm_error_set(err, -ENOTSUP, "%s: no device info", dev->id);
	return dev->ops->get_info(dev, info, err);
}

int vfm_device_region_info(struct vfm_device *dev, uint32_t index,
			   struct vfm_region_info *info, struct vfm_error *err)
{
	if (!dev->ops->region_info)
		return vfm_error_set(err, -ENOTSUP, "%s: no region info", dev->id);
	return dev->ops->region_info(dev, index, info, err);
}

static int region_io(struct vfm_device *dev, bool write, uint32_t index,
		     uint64_t offset, void *buf, size_t len, struct vfm_error *err)
{
	ssize_t n;

	if (offset + len < offset)
		return vfm_error_set(err, -EINVAL, "%s: region %u range overflows", dev->id, index);
	if (write)
		n = dev->ops->region_write ? dev->ops->region_write(dev, index, offset, buf, len, err)
					   : -ENOTSUP;
	else
		n = dev->ops->region_read ? dev->ops->region_read(dev, index, offset, buf, len, err)
					  : -ENOTSUP;
	if (n < 0)
		return vfm_error_set(err, (int)n, "%s: region %u %s at 0x%" PRIx64 "+%zu",
				     dev->id, index, write ? "write" : "read", offset, len);
	if ((size_t)n != len)
		return vfm_error_set(err, -EIO, "%s: region %u short %s (%zd of %zu)", dev->id,
				     index, write ? "write" : "read", n, len);
	return 0;
}

int vfm_device_region_read(struct vfm_device *dev, uint32_t index, uint64_t offset,
			   void *buf, size_t len, struct vfm_error *err)
{
	return region_io(dev, false, index, offset, buf, len, err);
}

int vfm_device_region_write(struct vfm_device *dev, uint32_t index, uint64_t offset,
			    const void *buf, size_t len, struct vfm_error *err)
{
	return region_io(dev, true, index, offset, (void *)buf, len, err);
}

int vfm_device_region_areas(struct vfm_device *dev, uint32_t index,
			    struct vfm_region_area *areas, unsigned max, unsigned *count,
			    struct vfm_error *err)
{
	if (!count || (max && !areas))
		return vfm_error_set(err, -EINVAL, "%s: region areas: no room given", dev->id);
	*count = 0;
	if (!dev->ops->region_areas)
		return vfm_error_set(err, -ENOTSUP, "%s: the %s backend maps no region",
				     dev->id, vfm_device_backend(dev));
	return dev->ops->region_areas(dev, index, areas, max, count, err);
}

int vfm_device_dma_map(struct vfm_device *dev, const struct vfm_dma_map *map,
		       struct vfm_error *err)
{
	if (!dev->ops->dma_map)
		return vfm_error_set(err, -ENOTSUP, "%s: device does no DMA", dev->id);
	if (!map->size || map->iova + map->size < map->iova)
		return vfm_error_set(err, -EINVAL, "%s: bad DMA range", dev->id);
	vfm_debug(dev->id, "dma map 0x%" PRIx64 "+0x%" PRIx64, map->iova, map->size);
	return dev->ops->dma_map(dev, map, err);
}

int vfm_device_dma_unmap(struct vfm_device *dev, uint64_t iova, uint64_t size,
			 uint64_t page_size, uint64_t *dirty_bitmap, struct vfm_error *err)
{
	if (!dev->ops->dma_unmap)
		return vfm_error_set(err, -ENOTSUP, "%s: device does no DMA", dev->id);
	vfm_debug(dev->id, "dma unmap 0x%" PRIx64 "+0x%" PRIx64, iova, size);
	return dev->ops->dma_unmap(dev, iova, size, page_size, dirty_bitmap, err);
}

bool vfm_device_has_dma_logging(const struct vfm_device *dev)
{
	const struct vfm_dma_logging_ops *log = dev->ops->log;

	return log && log->start && log->stop && log->report;
}

int vfm_device_log_start(struct vfm_device *dev, const struct vfm_iova_range *ranges,
			 uint32_t num_ranges, uint64_t *page_size, struct vfm_error *err)
{
	if (!vfm_device_has_dma_logging(dev))
		return vfm_error_set(err, -ENOTSUP, "%s: no DMA logging", dev->id);
	if (!ranges || num_ranges == 0 || num_ranges > VFM_DMA_LOG_MAX_RANGES ||
	    !page_size || *page_size < 4096 || (*page_size & (*page_size - 1)))
		return vfm_error_set(err, -EINVAL, "%s: bad DMA logging request", dev->id);
	for (uint32_t i = 0; i < num_ranges; i++) {
		const struct vfm_iova_range *r = &ranges[i];

		if (!r->length || (r->iova | r->length) & (*page_size - 1) ||
		    r->iova + r->length < r->iova)
			return vfm_error_set(err, -EINVAL, "%s: DMA logging range %u unaligned",
					     dev->id, i);
		/* The kernel refuses overlaps; at most 256 ranges, so pairwise is cheap. */
		for (uint32_t j = 0; j < i; j++)
			if (r->iova < ranges[j].iova + ranges[j].length &&
			    ranges[j].iova < r->iova + r->length)
				return vfm_error_set(err, -EINVAL,
						     "%s: DMA logging ranges %u and %u overlap",
						     dev->id, j, i);
	}
	return dev->ops->log->start(dev, ranges, num_ranges, page_size, err);
}

int vfm_device_log_stop(struct vfm_device *dev, struct vfm_error *err)
{
	if (!vfm_device_has_dma_logging(dev))
		return vfm_error_set(err, -ENOTSUP, "%s: no DMA logging", dev->id);
	return dev->ops->log->stop(dev, err);
}

int vfm_device_log_report(struct vfm_device *dev, uint64_t iova, uint64_t length,
			  uint64_t page_size, uint64_t *bitmap, struct vfm_error *err)
{
	if (!vfm_device_has_dma_logging(dev))
		return vfm_error_set(err, -ENOTSUP, "%s: no DMA logging", dev->id);
	if (page_size < 4096 || (page_size & (page_size - 1)) || !length ||
	    iova + length < iova || !bitmap)
		return vfm_error_set(err, -EINVAL, "%s: bad DMA logging report", dev->id);
	return dev->ops->log->report(dev, iova, length, page_size, bitmap, err);
}
