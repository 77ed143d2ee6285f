/*
 * The kernel VFIO backend: opening a device (cdev + iommufd with a fallback
 * to group + type1v2), device/region/IRQ info, region I/O, reset, close and
 * the device-layer ops tables. Migration is in mig.c, DMA in dma.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/logging.h"
#include "vfio/priv.h"

static void kv_close(struct vfm_device *dev);

/*
 * Four tables: migration and DMA logging are each optional (as in the kernel).
 * Region I/O is pread/pwrite on the device fd; region_areas (mmap.c) maps a
 * region's mmap()able areas when a caller asks for them.
 */
#define KV_OPS(name_, mig_, log_)                                             \
	static const struct vfm_device_ops name_ = {                          \
		.backend = "vfio",                                            \
		.get_info = kv_get_info,                                      \
		.region_info = kv_region_info,                                \
		.region_read = kv_region_read,                                \
		.region_write = kv_region_write,                              \
		.dma_map = kv_dma_map,                                        \
		.dma_unmap = kv_dma_unmap,                                    \
		.reset = kv_reset,                                            \
		.close = kv_close,                                            \
		.region_areas = kv_region_areas,                              \
		.mig = mig_,                                                  \
		.log = log_,                                                  \
	}

static int kv_get_info(struct vfm_device *dev, struct vfm_device_info *info,
		       struct vfm_error *err)
{
	*info = kv_of(dev)->info;
	return 0;
}

static const struct kv_region *region_of(struct kv_dev *k, uint32_t index,
					 struct vfm_error *err)
{
	if (index >= k->nregions || !k->regions[index].info.size) {
		vfm_error_set(err, -EINVAL, "%s: no region %" PRIu32, k->id, index);
		return NULL;
	}
	return &k->regions[index];
}

static int kv_region_info(struct vfm_device *dev, uint32_t index, struct vfm_region_info *info,
			  struct vfm_error *err)
{
	const struct kv_region *r = region_of(kv_of(dev), index, err);

	if (!r)
		return err ? err->code : -EINVAL;
	*info = r->info;
	return 0;
}

static ssize_t region_io(struct vfm_device *dev, bool write, uint32_t index, uint64_t offset,
			 void *buf, size_t len, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	const struct kv_region *r = region_of(k, index, err);
	size_t done = 0;

	if (!r)
		return err ? err->code : -EINVAL;
	if (!(r->info.flags & (write ? VFM_REGION_WRITE : VFM_REGION_READ)))
		return vfm_error_set(err, -EACCES, "%s: region %" PRIu32 " is not %s", k->id,
				     index, write ? "writable" : "readable");
	if (offset > r->info.size || len > r->info.size - offset)
		return vfm_error_set(err, -EINVAL, "%s: region %" PRIu32 " access 0x%" PRIx64
				     "+%zu beyond 0x%" PRIx64, k->id, index, offset, len,
				     r->info.size);
	while (done < len) {
		off_t at = (off_t)(r->offset + offset + done);
		ssize_t n = write ? k->sys->pwrite(k->sys->opaque, k->devfd, (char *)buf + done,
						   len - done, at)
				  : k->sys->pread(k->sys->opaque, k->devfd, (char *)buf + done,
						  len - done, at);

		if (n == -EINTR)
			continue;
		if (n < 0)
			return vfm_error_set(err, (int)n, "%s: region %" PRIu32 " %s: %s", k->id,
					     index, write ? "pwrite" : "pread", strerror((int)-n));
		if (n == 0)
			return vfm_error_set(err, -EIO, "%s: region %" PRIu32 " short %s", k->id,
					     index, write ? "write" : "read");
		done += (size_t)n;
	}
	return (ssize_t)len;
}

static ssize_t kv_region_read(struct vfm_device *dev, uint32_t index, uint64_t offset,
			      void *buf, size_t len, struct vfm_error *err)
{
	return region_io(dev, false, index, offset, buf, len, err);
}

static ssize_t kv_region_write(struct vfm_device *dev, uint32_t index, uint64_t offset,
			       const void *buf, size_t len, struct vfm_error *err)
{
	return region_io(dev, true, index, offset, (void *)buf, len, err);
}

/*
 * VFIO_DEVICE_RESET, issued even when the device info does not advertise it:
 * mtty (samples/vfio-mdev/mtty.c, 6.12) leaves VFIO_DEVICE_FLAGS_RESET out yet
 * handles the ioctl (mtty_reset() -> mtty_reset_mig_state()), and a device left
 * in RESUMING after a refused load is the one thing that must not happen
 * (mtty keeps a dangling pointer and oopses the next user, mtty_load_state()).
 * With migration, the state is read back to confirm the reset took.
 */
static int kv_reset(struct vfm_device *dev, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	bool advertised = k->info.flags & VFIO_DEVICE_FLAGS_RESET;
	enum vfm_state st;
	int r;

	r = kv_ioctl(k, k->devfd, VFIO_DEVICE_RESET, NULL);
	/* Whatever happened, the old data fd is dead (ENODEV from now on). */
	kv_close_data_fd(k);
	k->state_known = false;
	if (r && !advertised)
		return vfm_error_set(err, -ENOTSUP, "%s: device has no reset (VFIO_DEVICE_RESET: "
				     "%s)", k->id, strerror(-r));
	if (r)
		return vfm_error_set(err, r, "%s: VFIO_DEVICE_RESET: %s", k->id, strerror(-r));
	if (k->has_mig) {
		r = kv_get_state(k, &st, err);
		if (r)
			return r;
		if (st != VFM_STATE_RUNNING)
			return vfm_error_set(err, -EIO, "%s: still %s after VFIO_DEVICE_RESET",
					     k->id, vfm_state_name(st));
	}
	k->state = VFM_STATE_RUNNING;
	k->state_known = true;
	return 0;
}

/*
 * A device is never closed in RESUMING or ERROR (half a state, or none): it is
 * reset first (kv_reset). Other states are the caller's to choose.
 */
static void reset_if_unsafe(struct kv_dev *k, struct vfm_device *dev)
{
	struct vfm_error e = { 0 };
	enum vfm_state st;

	if (!k->has_mig || k->devfd < 0)
		return;
	if (!k->state_known && kv_get_state(k, &st, NULL))
		k->state = VFM_STATE_ERROR;
	if (k->state != VFM_STATE_RESUMING && k->state != VFM_STATE_ERROR)
		return;
	vfm_warn(k->id, "closing in %s: resetting the device", vfm_state_name(k->state));
	if (kv_reset(dev, &e))
		vfm_err(k->id, "reset at close: %s", e.msg);
}

KV_OPS(ops_mig_log, &kv_mig_ops, &kv_log_ops);
KV_OPS(ops_mig, &kv_mig_ops, NULL);
KV_OPS(ops_log, NULL, &kv_log_ops);
KV_OPS(ops_plain, NULL, NULL);

bool vfm_device_is_vfio(const struct vfm_device *dev)
{
	const struct vfm_device_ops *o = dev ? vfm_device_ops(dev) : NULL;

	return o && (o == &ops_mig_log || o == &ops_mig || o == &ops_log || o == &ops_plain);
}

const char *vfm_vfio_iommu_name(const struct vfm_device *dev)
{
	const struct kv_dev *k;

	if (!vfm_device_is_vfio(dev))
		return NULL;
	k = vfm_device_priv(dev);
	if (k->iommu == KV_TYPE1)
		return "type1v2";
	return k->hwpt_dirty ? "iommufd+dirty-hwpt" : "iommufd";
}

int vfm_vfio_irq_info(struct vfm_device *dev, uint32_t index, struct vfm_irq_info *info,
		      struct vfm_error *err)
{
	struct vfio_irq_info ii = { .argsz = sizeof(ii), .index = index };
	struct kv_dev *k;
	int r;

	if (!vfm_device_is_vfio(dev))
		return vfm_error_set(err, -EINVAL, "not a kernel VFIO device");
	k = kv_of(dev);
	if (index >= k->info.num_irqs)
		return vfm_error_set(err, -EINVAL, "%s: no IRQ index %" PRIu32, k->id, index);
	r = kv_ioctl(k, k->devfd, VFIO_DEVICE_GET_IRQ_INFO, &ii);
	if (r)
		return vfm_error_set(err, r, "%s: VFIO_DEVICE_GET_IRQ_INFO %" PRIu32 ": %s", k->id,
				     index, strerror(-r));
	*info = (struct vfm_irq_info){ index, ii.flags, ii.count };
	return 0;
}

/* ---- Opening ---- */

static void close_fd(struct kv_dev *k, int *fd)
{
	if (*fd >= 0)
		k->sys->close(k->sys->opaque, *fd);
	*fd = -1;
}

static void kv_destroy(struct kv_dev *k)
{
	kv_close_data_fd(k);
	if (k->as)
		kv_dma_cleanup(k);
	kv_unmap_regions(k);
	if (k->iommu_backed) {
		pthread_mutex_lock(&k->as->lock);
		k->as->iommu_backed--;
		pthread_mutex_unlock(&k->as->lock);
	}
	/* The device first: closing it detaches it from the IOAS or container. */
	close_fd(k, &k->devfd);
	if (k->hwpt_id && k->as) {
		struct iommu_destroy d = { .size = sizeof(d), .id = k->hwpt_id };

		kv_ioctl(k, k->iommufd, IOMMU_DESTROY, &d);
	}
	kv_group_put(k->grp);
	kv_as_put(k->as);
	free(k->regions);
	free(k->mine);
	free(k);
}

static void kv_close(struct vfm_device *dev)
{
	struct kv_dev *k = kv_of(dev);

	vfm_debug(k->id, "closing %s", k->name);
	reset_if_unsafe(k, dev);
	kv_destroy(k);
}

/* Attaches the device to a dirty-tracking HWPT when the IOMMU has one. */
static bool attach_dirty_hwpt(struct kv_dev *k)
{
	struct iommu_hw_info hw = { .size = sizeof(hw), .dev_id = k->devid };
	struct iommu_hwpt_alloc ha = {
		.size = sizeof(ha), .flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
		.dev_id = k->devid, .pt_id = k->ioas_id, .data_type = IOMMU_HWPT_DATA_NONE,
	};
	struct vfio_device_attach_iommufd_pt at = { .argsz = sizeof(at) };
	int r;

	r = kv_ioctl(k, k->iommufd, IOMMU_GET_HW_INFO, &hw);
	if (r || !(hw.out_capabilities & IOMMU_HW_CAP_DIRTY_TRACKING)) {
		vfm_debug(k->id, "IOMMU has no dirty tracking%s%s", r ? ": " : "",
			  r ? strerror(-r) : "");
		return false;
	}
	r = kv_ioctl(k, k->iommufd, IOMMU_HWPT_ALLOC, &ha);
	if (r) {
		vfm_debug(k->id, "dirty-tracking HWPT: %s", strerror(-r));
		return false;
	}
	at.pt_id = ha.out_hwpt_id;
	r = kv_ioctl(k, k->devfd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at);
	if (r) {
		struct iommu_destroy d = { .size = sizeof(d), .id = ha.out_hwpt_id };

		vfm_debug(k->id, "attaching the dirty-tracking HWPT: %s", strerror(-r));
		kv_ioctl(k, k->iommufd, IOMMU_DESTROY, &d);
		return false;
	}
	k->hwpt_id = ha.out_hwpt_id;
	k->hwpt_dirty = true;
	return true;
}

static int open_iommufd(struct kv_dev *k, const char *cdev, bool want_dirty,
			struct vfm_error *err)
{
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind) };
	struct vfio_device_attach_iommufd_pt at = { .argsz = sizeof(at) };
	int r;

	r = k->sys->open(k->sys->opaque, cdev, O_RDWR);
	if (r < 0)
		return vfm_error_set(err, r, "%s: open %s: %s", k->id, cdev, strerror(-r));
	k->devfd = r;
	/* The process's iommufd and IOAS, shared with its other devices (as.c). */
	r = kv_as_get(k->sys, KV_IOMMUFD, k->id, &k->as, err);
	if (r)
		goto err_close;
	k->iommufd = k->as->fd;
	k->ioas_id = k->as->ioas_id;
	bind.iommufd = k->iommufd;
	r = kv_ioctl(k, k->devfd, VFIO_DEVICE_BIND_IOMMUFD, &bind);
	if (r) {
		vfm_error_set(err, r, "%s: VFIO_DEVICE_BIND_IOMMUFD: %s", k->id, strerror(-r));
		goto err_close;
	}
	k->devid = bind.out_devid;
	if (!want_dirty || !attach_dirty_hwpt(k)) {
		at.pt_id = k->ioas_id;
		r = kv_ioctl(k, k->devfd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at);
		if (r) {
			vfm_error_set(err, r, "%s: VFIO_DEVICE_ATTACH_IOMMUFD_PT: %s", k->id,
				      strerror(-r));
			goto err_close;
		}
	}
	k->iommu = KV_IOMMUFD;
	kv_iommufd_probe_ranges(k);
	return 0;

err_close:
	close_fd(k, &k->devfd);
	if (k->hwpt_id && k->as) {
		struct iommu_destroy d = { .size = sizeof(d), .id = k->hwpt_id };

		kv_ioctl(k, k->iommufd, IOMMU_DESTROY, &d);
	}
	kv_as_put(k->as);
	k->as = NULL;
	k->iommufd = -1;
	k->hwpt_id = 0;
	k->hwpt_dirty = false;
	return r;
}

static int open_type1(struct kv_dev *k, const char *devname, int group, struct vfm_error *err)
{
	int r;

	if (group < 0 || !devname[0])
		return vfm_error_set(err, -ENODEV, "%s: no IOMMU group known for %s", k->id, k->name);
	/* The process's container and this group's fd, shared (as.c). */
	r = kv_as_get(k->sys, KV_TYPE1, k->id, &k->as, err);
	if (r)
		return r;
	r = kv_group_get(k->as, group, k->id, &k->grp, err);
	if (r)
		goto err_put;
	k->container = k->as->fd;
	k->group = k->grp->fd;
	/* The kernel matches dev_name(): the PCI address, or an mdev's UUID. */
	r = kv_ioctl(k, k->group, VFIO_GROUP_GET_DEVICE_FD, (void *)devname);
	if (r < 0) {
		vfm_error_set(err, r, "%s: VFIO_GROUP_GET_DEVICE_FD %s: %s", k->id, devname,
			      strerror(-r));
		goto err_put;
	}
	k->devfd = r;
	k->iommu = KV_TYPE1;
	kv_type1_probe(k);
	/* Only mdevs pin what they DMA to; any other device's group is backed by
	 * the IOMMU, and type1 then reports every mapped page dirty. */
	if (!kv_is_mdev_name(devname)) {
		pthread_mutex_lock(&k->as->lock);
		k->as->iommu_backed++;
		pthread_mutex_unlock(&k->as->lock);
		k->iommu_backed = true;
	}
	return 0;

err_put:
	kv_group_put(k->grp);
	kv_as_put(k->as);
	k->grp = NULL;
	k->as = NULL;
	k->container = k->group = -1;
	return r;
}

static int load_info(struct kv_dev *k, struct vfm_error *err)
{
	struct vfio_device_info di = { .argsz = sizeof(di) };
	int r = kv_ioctl(k, k->devfd, VFIO_DEVICE_GET_INFO, &di);

	if (r)
		return vfm_error_set(err, r, "%s: VFIO_DEVICE_GET_INFO: %s", k->id, strerror(-r));
	k->info = (struct vfm_device_info){ di.flags, di.num_regions, di.num_irqs };
	k->nregions = di.num_regions < KV_MAX_REGIONS ? di.num_regions : KV_MAX_REGIONS;
	k->regions = calloc(k->nregions ? k->nregions : 1, sizeof(*k->regions));
	if (!k->regions)
		return vfm_error_set(err, -ENOMEM, "%s: no memory for regions", k->id);
	for (uint32_t i = 0; i < k->nregions; i++) {
		struct vfio_region_info ri = { .argsz = sizeof(ri), .index = i };

		k->regions[i].info.index = i;
		/* Absent regions (a PCI device's VGA, say) fail: they stay size 0. */
		if (kv_ioctl(k, k->devfd, VFIO_DEVICE_GET_REGION_INFO, &ri))
			continue;
		k->regions[i].info.flags = ri.flags & (VFM_REGION_READ | VFM_REGION_WRITE |
						       VFM_REGION_MMAP);
		k->regions[i].info.size = ri.size;
		k->regions[i].offset = ri.offset;
	}
	return 0;
}

static int check_opts(const struct vfm_vfio_opts *o, struct vfm_error *err)
{
	if (!o)
		return 0;
	if (o->version != VFM_VFIO_OPTS_V1)
		return vfm_error_set(err, -EINVAL, "vfio options version %" PRIu32 " (want %u)",
				     o->version, VFM_VFIO_OPTS_V1);
	if (o->iommu > VFM_VFIO_IOMMU_LEGACY || o->timeout_ms > INT32_MAX / 2)
		return vfm_error_set(err, -EINVAL, "vfio options: bad iommu mode or timeout");
	if (o->sys && ((o->sys->version != VFM_VFIO_SYS_V1 && o->sys->version != VFM_VFIO_SYS_V2) ||
		       !o->sys->open || !o->sys->close || !o->sys->ioctl || !o->sys->read ||
		       !o->sys->write || !o->sys->pread || !o->sys->pwrite || !o->sys->mmap ||
		       !o->sys->munmap || !o->sys->poll ||
		       (o->sys->version == VFM_VFIO_SYS_V2 && !o->sys->fcntl)))
		return vfm_error_set(err, -EINVAL, "vfio options: incomplete system call table");
	return 0;
}

static const struct vfm_device_ops *ops_for(const struct kv_dev *k)
{
	if (k->has_mig)
		return k->has_logging ? &ops_mig_log : &ops_mig;
	return k->has_logging ? &ops_log : &ops_plain;
}

int vfm_vfio_open(const char *name, const struct vfm_vfio_opts *opts, struct vfm_device **out,
		  struct vfm_error *err)
{
	enum vfm_vfio_iommu mode = opts ? opts->iommu : VFM_VFIO_IOMMU_AUTO;
	char cdev[256], devname[64];
	struct vfm_error e1 = { 0 };
	struct vfm_device *dev;
	struct kv_dev *k;
	int group, r;

	*out = NULL;
	r = check_opts(opts, err);
	if (r)
		return r;
	r = kv_resolve(opts && opts->sysfs_root ? opts->sysfs_root : "/sys", name, cdev,
		       sizeof(cdev), devname, sizeof(devname), &group, err);
	if (r)
		return r;
	k = calloc(1, sizeof(*k));
	if (!k)
		return vfm_error_set(err, -ENOMEM, "no memory for a vfio device");
	snprintf(k->id, sizeof(k->id), "%s", opts && opts->id && *opts->id ? opts->id : "vfio");
	snprintf(k->name, sizeof(k->name), "%s", name);
	snprintf(k->devname, sizeof(k->devname), "%s", devname);
	k->sys = opts && opts->sys ? opts->sys : kv_default_sys();
	k->timeout_ms = (int)(opts && opts->timeout_ms ? opts->timeout_ms
						     : VFM_VFIO_DEFAULT_TIMEOUT_MS);
	k->devfd = k->iommufd = k->container = k->group = k->data_fd = -1;
	k->state = VFM_STATE_RUNNING;

	r = -ENODEV;
	if (mode != VFM_VFIO_IOMMU_LEGACY) {
		if (cdev[0])
			r = open_iommufd(k, cdev, !(opts && opts->no_dirty_hwpt), &e1);
		else
			r = vfm_error_set(&e1, -ENODEV, "%s: %s has no VFIO cdev", k->id, name);
	}
	if (r && mode != VFM_VFIO_IOMMU_IOMMUFD) {
		if (mode == VFM_VFIO_IOMMU_AUTO)
			vfm_debug(k->id, "iommufd: %s; trying the legacy container", e1.msg);
		r = open_type1(k, devname, group, err);
		if (r && mode == VFM_VFIO_IOMMU_AUTO)
			vfm_error_set(err, r, "%s (and iommufd: %s)", k->id, e1.msg);
	} else if (r) {
		vfm_error_set(err, r, "%s", e1.msg);
	}
	if (r)
		goto err_destroy;
	r = load_info(k, err);
	if (r)
		goto err_destroy;
	kv_probe_features(k);
	dev = vfm_device_new(k->id, ops_for(k), k);
	if (!dev) {
		r = vfm_error_set(err, -ENOMEM, "no memory for a device");
		goto err_destroy;
	}
	vfm_info(k->id, "kernel VFIO device %s (%s): %" PRIu32 " regions, %" PRIu32
		 " IRQ types%s%s", name, vfm_vfio_iommu_name(dev), k->info.num_regions,
		 k->info.num_irqs, k->has_mig ? ", migration" : "",
		 k->has_logging ? ", DMA logging" : "");
	*out = dev;
	return 0;

err_destroy:
	kv_destroy(k);
	return r;
}
