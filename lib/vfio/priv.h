/*
 * Internals of the kernel VFIO backend, shared by its files: open.c (open,
 * close, info, regions, reset, ops tables), sysfs.c (name resolution), dma.c
 * (DMA map/unmap, IOMMU dirty tracking), mig.c (migration, DMA logging),
 * mmap.c (regions mapped into the process).
 */
#ifndef VFM_VFIO_PRIV_H
#define VFM_VFIO_PRIV_H

#include <pthread.h>
#include <stdatomic.h>

#include "compat/vfio_compat.h"
#include "compat/iommufd_compat.h"
#include "vfiomig/vfio.h"

/* vfio-pci places region i at file offset i << 40 but we use the offsets the
 * kernel reports; this bounds how many regions we look at. */
#define KV_MAX_REGIONS 64u
#define KV_MAX_IRQS 16u

enum kv_iommu { KV_IOMMUFD, KV_TYPE1 };

struct kv_region {
	struct vfm_region_info info;
	uint64_t offset;           /* in the device fd */
	/* mmap.c, under its lock: the areas mapped on first request. */
	bool mapped;
	struct vfm_region_area *areas;
	unsigned nareas;
};

struct kv_map {
	uint64_t iova, size;
	void *mapped;              /* our mmap() of the caller's fd, or NULL */
	unsigned refs;             /* devices that mapped exactly this range */
};

/* One per process and IOMMU kind (as.c): an iommufd + IOAS, or a container. */
struct kv_as {
	struct kv_as *next;        /* registry, under its lock */
	const struct vfm_vfio_sys *sys;
	enum kv_iommu iommu;
	int fd;                    /* /dev/iommu or /dev/vfio/vfio */
	uint32_t ioas_id;          /* KV_IOMMUFD */
	bool iommu_set;            /* KV_TYPE1: VFIO_SET_IOMMU done */
	unsigned refs;             /* devices, under the registry lock */

	/* lock guards the rest, and each device's dirty-tracking flags. */
	pthread_mutex_t lock;
	struct kv_map *maps;
	size_t nmaps, maps_cap;
	unsigned dirty_users;      /* KV_TYPE1: devices with container tracking on */
	bool type1_dirty;          /* KV_TYPE1: the container offers dirty tracking */
	unsigned iommu_backed;     /* KV_TYPE1: devices of IOMMU-backed groups in it */
	uint64_t dirty_pgsize;     /* KV_TYPE1: smallest page size of its dirty bitmaps */
	struct vfm_iova_range *iova_ok;  /* IOVAs the IOMMU can map (none: any) */
	uint32_t niova_ok;
};

/* An IOMMU group's fd (type1), shared by the devices of the group. */
struct kv_group {
	struct kv_group *next;
	struct kv_as *as;
	int num, fd;
	unsigned refs;
};

struct kv_dev {
	/* Set at open, never change after. */
	char id[64];
	char name[256];            /* what the user gave, for messages */
	char devname[64];          /* the kernel's name (PCI address, mdev UUID), else "" */
	const struct vfm_vfio_sys *sys;
	int timeout_ms;
	enum kv_iommu iommu;
	int devfd;
	struct kv_as *as;          /* shared, counted */
	struct kv_group *grp;      /* KV_TYPE1, shared, counted */
	int iommufd;               /* KV_IOMMUFD: as->fd (not ours) */
	uint32_t devid, ioas_id, hwpt_id;   /* hwpt_id 0: the IOAS is attached */
	bool hwpt_dirty;           /* the attached HWPT can track dirty pages */
	bool iommu_backed;         /* KV_TYPE1: counted in as->iommu_backed (not an mdev) */
	int container, group;      /* KV_TYPE1: as->fd, grp->fd (not ours) */
	struct vfm_device_info info;
	struct kv_region *regions; /* info.num_regions entries (capped) */
	uint32_t nregions;
	bool has_mig;              /* MIGRATION feature answered */
	uint64_t mig_flags;
	bool has_logging;          /* DMA_LOGGING_START probe answered */

	/*
	 * Migration fields: the device layer calls migration ops under its lock
	 * except read/write, and one reader or writer at a time; data_fd only
	 * changes in set_state/get_state/reset, never during a read or write.
	 */
	int data_fd;               /* -1 when no session */
	bool data_nonblock;        /* O_NONBLOCK set on data_fd */
	enum vfm_state state;      /* last state the kernel confirmed */
	bool state_known;

	/* vfm_vfio_set_cancel_check(): opaque stored before fn, fn cleared first. */
	_Atomic(bool (*)(void *)) cancelled;
	void *_Atomic cancel_opaque;

	/* Under as->lock: what this device mapped, and its tracking flags. */
	struct vfm_iova_range *mine;
	size_t nmine, mine_cap;
	bool iommu_dirty_on;
	bool dev_log_on;           /* device DMA logging started (for unmap) */
};

static inline struct kv_dev *kv_of(struct vfm_device *dev)
{
	return vfm_device_priv(dev);
}

/* ioctl through the seam: 0 / >= 0 or -errno. */
static inline int kv_ioctl(const struct kv_dev *k, int fd, unsigned long req, void *arg)
{
	return k->sys->ioctl(k->sys->opaque, fd, req, arg);
}

/* ---- sys.c ---- */

/* What a NULL opts->sys means: vfm_vfio_set_default_sys()'s, else libc. */
const struct vfm_vfio_sys *kv_default_sys(void);

/* ---- sysfs.c ---- */

/*
 * Resolves name (cdev path, PCI address, mdev UUID or sysfs device path)
 * into the cdev path (cdev_out, "" if the device has none), the device's
 * kernel name for VFIO_GROUP_GET_DEVICE_FD (devname_out, "" if unknown) and
 * its IOMMU group (-1 if unknown).
 */
/* Whether a kernel device name is an mdev's (a UUID; else a PCI address...). */
bool kv_is_mdev_name(const char *name);
int kv_resolve(const char *sysfs_root, const char *name, char *cdev_out, size_t cdev_len,
	       char *devname_out, size_t devname_len, int *group_out, struct vfm_error *err);

/* ---- as.c ---- */

/* The process's address space of that kind for sys, made on first use. */
int kv_as_get(const struct vfm_vfio_sys *sys, enum kv_iommu iommu, const char *id,
	      struct kv_as **out, struct vfm_error *err);
void kv_as_put(struct kv_as *as);
/* Group num's fd in the type1 as (opened, viable, in the container on first use). */
int kv_group_get(struct kv_as *as, int num, const char *id, struct kv_group **out,
		 struct vfm_error *err);
void kv_group_put(struct kv_group *g);

/* ---- dma.c ---- */

int kv_dma_map(struct vfm_device *dev, const struct vfm_dma_map *map, struct vfm_error *err);
int kv_dma_unmap(struct vfm_device *dev, uint64_t iova, uint64_t size, uint64_t page_size,
		 uint64_t *dirty_bitmap, struct vfm_error *err);
/*
 * The type1 container's info (asked again with the argsz it returns): the
 * migration cap (dirty tracking, its page sizes) and the valid IOVA ranges.
 */
void kv_type1_probe(struct kv_dev *k);
/* The IOAS's valid IOVA ranges (IOMMU_IOAS_IOVA_RANGES), after attach. */
void kv_iommufd_probe_ranges(struct kv_dev *k);
/* Lets go of everything this device mapped (close). */
void kv_dma_cleanup(struct kv_dev *k);

/* ---- mmap.c ---- */

/* The device's region_areas op: maps the region's mmap()able areas once. */
int kv_region_areas(struct vfm_device *dev, uint32_t index, struct vfm_region_area *areas,
		    unsigned max, unsigned *count, struct vfm_error *err);
/* Unmaps every region mapped (close). */
void kv_unmap_regions(struct kv_dev *k);

/* ---- mig.c ---- */

extern const struct vfm_migration_ops kv_mig_ops;
extern const struct vfm_dma_logging_ops kv_log_ops;
/* Feature probes at open: migration flags and DMA logging. */
void kv_probe_features(struct kv_dev *k);
/* One VFIO_DEVICE_FEATURE with payload (len bytes, in and out). */
int kv_feature(struct kv_dev *k, uint32_t flags, void *payload, size_t len);
/* GET MIG_DEVICE_STATE into k->state (and *out). */
int kv_get_state(struct kv_dev *k, enum vfm_state *out, struct vfm_error *err);
/* Closes the data fd, if any. */
void kv_close_data_fd(struct kv_dev *k);

#endif
