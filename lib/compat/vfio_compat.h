/*
 * <linux/vfio.h> plus the migration and cdev pieces that Debian 12's 6.1 uAPI
 * headers lack. Every addition is guarded, so a newer system header wins.
 */
#ifndef VFIOMIG_COMPAT_VFIO_COMPAT_H
#define VFIOMIG_COMPAT_VFIO_COMPAT_H

#include <stddef.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/vfio.h>

/*
 * Values are the kernel's (include/uapi/linux/vfio.h); the layouts below are
 * those of the release that introduced each piece. Later kernels may append
 * fields to the cdev structs (argsz says how much the caller passed), so the
 * exact sizes are only asserted for what this header defines itself. The
 * VFM_COMPAT_OWN_* markers say which pieces came from here (tests use them).
 */

/* PRE_COPY (Linux 6.2). States 6/7 are enumerators upstream, so they cannot be
 * tested with #ifndef: they came with VFIO_MIGRATION_PRE_COPY, key on that. */
#ifndef VFIO_MIGRATION_PRE_COPY
#define VFM_COMPAT_OWN_PRE_COPY 1
enum {
	VFIO_DEVICE_STATE_PRE_COPY = 6,
	VFIO_DEVICE_STATE_PRE_COPY_P2P = 7,
};
#define VFIO_MIGRATION_PRE_COPY (1 << 2)
#endif

/* Used on the data fd, only in the PRE_COPY states (Linux 6.2). */
#ifndef VFIO_MIG_GET_PRECOPY_INFO
#define VFM_COMPAT_OWN_PRECOPY_INFO 1
struct vfio_precopy_info {
	__u32 argsz;
	__u32 flags;                  /* must be 0 */
	__aligned_u64 initial_bytes;  /* starts non-zero, falls as data is read */
	__aligned_u64 dirty_bytes;    /* starts at 0 */
};
#define VFIO_MIG_GET_PRECOPY_INFO _IO(VFIO_TYPE, VFIO_BASE + 21)
_Static_assert(sizeof(struct vfio_precopy_info) == 24, "vfio_precopy_info size");
#endif

/* Feature 9, GET only: an estimate of the STOP_COPY data size (Linux 6.2). */
#ifndef VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
#define VFM_COMPAT_OWN_MIG_DATA_SIZE 1
struct vfio_device_feature_mig_data_size {
	__aligned_u64 stop_copy_length;
};
#define VFIO_DEVICE_FEATURE_MIG_DATA_SIZE 9
_Static_assert(sizeof(struct vfio_device_feature_mig_data_size) == 8,
	       "vfio_device_feature_mig_data_size size");
#endif

/* cdev + iommufd (Linux 6.6), all on a /dev/vfio/devices/vfioN fd. */
#ifndef VFIO_DEVICE_BIND_IOMMUFD
#define VFM_COMPAT_OWN_BIND_IOMMUFD 1
struct vfio_device_bind_iommufd {
	__u32 argsz;
	__u32 flags;      /* must be 0 */
	__s32 iommufd;
	__u32 out_devid;  /* the dev_id for iommufd ioctls */
};
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
_Static_assert(sizeof(struct vfio_device_bind_iommufd) == 16,
	       "vfio_device_bind_iommufd size");
#endif

#ifndef VFIO_DEVICE_ATTACH_IOMMUFD_PT
#define VFM_COMPAT_OWN_ATTACH_IOMMUFD_PT 1
struct vfio_device_attach_iommufd_pt {
	__u32 argsz;
	__u32 flags;  /* must be 0 */
	__u32 pt_id;  /* in: IOAS or HWPT id; out: the HWPT actually attached */
};
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
_Static_assert(sizeof(struct vfio_device_attach_iommufd_pt) == 12,
	       "vfio_device_attach_iommufd_pt size");
#endif

#ifndef VFIO_DEVICE_DETACH_IOMMUFD_PT
#define VFM_COMPAT_OWN_DETACH_IOMMUFD_PT 1
struct vfio_device_detach_iommufd_pt {
	__u32 argsz;
	__u32 flags;  /* must be 0 */
};
#define VFIO_DEVICE_DETACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 20)
_Static_assert(sizeof(struct vfio_device_detach_iommufd_pt) == 8,
	       "vfio_device_detach_iommufd_pt size");
#endif

/*
 * What the rest of the library relies on, whichever header supplied it.
 * ioctl numbers: type ';' (0x3b), base 100.
 */
#define VFM_COMPAT_VFIO_IO(n) _IO(0x3b, 100 + (n))
_Static_assert(VFIO_TYPE == 0x3b && VFIO_BASE == 100, "vfio ioctl type/base");
_Static_assert(VFIO_DEVICE_GET_INFO == VFM_COMPAT_VFIO_IO(7), "VFIO_DEVICE_GET_INFO");
_Static_assert(VFIO_DEVICE_GET_REGION_INFO == VFM_COMPAT_VFIO_IO(8),
	       "VFIO_DEVICE_GET_REGION_INFO");
_Static_assert(VFIO_DEVICE_RESET == VFM_COMPAT_VFIO_IO(11), "VFIO_DEVICE_RESET");
_Static_assert(VFIO_IOMMU_MAP_DMA == VFM_COMPAT_VFIO_IO(13), "VFIO_IOMMU_MAP_DMA");
_Static_assert(VFIO_IOMMU_UNMAP_DMA == VFM_COMPAT_VFIO_IO(14), "VFIO_IOMMU_UNMAP_DMA");
_Static_assert(VFIO_DEVICE_FEATURE == VFM_COMPAT_VFIO_IO(17), "VFIO_DEVICE_FEATURE");
/* Same number as VFIO_DEVICE_FEATURE, told apart by the fd it is issued on. */
_Static_assert(VFIO_IOMMU_DIRTY_PAGES == VFM_COMPAT_VFIO_IO(17), "VFIO_IOMMU_DIRTY_PAGES");
_Static_assert(VFIO_DEVICE_BIND_IOMMUFD == VFM_COMPAT_VFIO_IO(18),
	       "VFIO_DEVICE_BIND_IOMMUFD");
_Static_assert(VFIO_DEVICE_ATTACH_IOMMUFD_PT == VFM_COMPAT_VFIO_IO(19),
	       "VFIO_DEVICE_ATTACH_IOMMUFD_PT");
_Static_assert(VFIO_DEVICE_DETACH_IOMMUFD_PT == VFM_COMPAT_VFIO_IO(20),
	       "VFIO_DEVICE_DETACH_IOMMUFD_PT");
_Static_assert(VFIO_MIG_GET_PRECOPY_INFO == VFM_COMPAT_VFIO_IO(21),
	       "VFIO_MIG_GET_PRECOPY_INFO");

#undef VFM_COMPAT_VFIO_IO

_Static_assert(VFIO_DEVICE_FEATURE_MASK == 0xffff && VFIO_DEVICE_FEATURE_GET == 1 << 16 &&
	       VFIO_DEVICE_FEATURE_SET == 1 << 17 && VFIO_DEVICE_FEATURE_PROBE == 1 << 18,
	       "vfio_device_feature flags");
_Static_assert(VFIO_DEVICE_FEATURE_MIGRATION == 1 && VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE == 2 &&
	       VFIO_DEVICE_FEATURE_DMA_LOGGING_START == 6 &&
	       VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP == 7 &&
	       VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT == 8 &&
	       VFIO_DEVICE_FEATURE_MIG_DATA_SIZE == 9,
	       "vfio device feature ids");
_Static_assert(VFIO_MIGRATION_STOP_COPY == 1 << 0 && VFIO_MIGRATION_P2P == 1 << 1 &&
	       VFIO_MIGRATION_PRE_COPY == 1 << 2, "vfio migration flags");
_Static_assert(VFIO_DEVICE_STATE_ERROR == 0 && VFIO_DEVICE_STATE_STOP == 1 &&
	       VFIO_DEVICE_STATE_RUNNING == 2 && VFIO_DEVICE_STATE_STOP_COPY == 3 &&
	       VFIO_DEVICE_STATE_RESUMING == 4 && VFIO_DEVICE_STATE_RUNNING_P2P == 5 &&
	       VFIO_DEVICE_STATE_PRE_COPY == 6 && VFIO_DEVICE_STATE_PRE_COPY_P2P == 7,
	       "vfio device states");
_Static_assert(VFIO_IOMMU_DIRTY_PAGES_FLAG_START == 1 &&
	       VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP == 2 &&
	       VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP == 4 &&
	       VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP == 1, "type1 dirty flags");

/* Field offsets never move; sizes may only grow. */
_Static_assert(offsetof(struct vfio_device_feature, data) == 8, "vfio_device_feature");
_Static_assert(sizeof(struct vfio_device_feature_migration) == 8,
	       "vfio_device_feature_migration");
_Static_assert(sizeof(struct vfio_device_feature_mig_state) == 8 &&
	       offsetof(struct vfio_device_feature_mig_state, data_fd) == 4,
	       "vfio_device_feature_mig_state");
_Static_assert(sizeof(struct vfio_device_feature_dma_logging_control) == 24 &&
	       offsetof(struct vfio_device_feature_dma_logging_control, num_ranges) == 8 &&
	       offsetof(struct vfio_device_feature_dma_logging_control, ranges) == 16,
	       "vfio_device_feature_dma_logging_control");
_Static_assert(sizeof(struct vfio_device_feature_dma_logging_range) == 16,
	       "vfio_device_feature_dma_logging_range");
_Static_assert(sizeof(struct vfio_device_feature_dma_logging_report) == 32 &&
	       offsetof(struct vfio_device_feature_dma_logging_report, bitmap) == 24,
	       "vfio_device_feature_dma_logging_report");
_Static_assert(offsetof(struct vfio_precopy_info, initial_bytes) == 8 &&
	       offsetof(struct vfio_precopy_info, dirty_bytes) == 16,
	       "vfio_precopy_info fields");
_Static_assert(offsetof(struct vfio_device_bind_iommufd, iommufd) == 8 &&
	       offsetof(struct vfio_device_bind_iommufd, out_devid) == 12 &&
	       sizeof(struct vfio_device_bind_iommufd) >= 16,
	       "vfio_device_bind_iommufd fields");
_Static_assert(offsetof(struct vfio_device_attach_iommufd_pt, pt_id) == 8 &&
	       sizeof(struct vfio_device_attach_iommufd_pt) >= 12,
	       "vfio_device_attach_iommufd_pt fields");
_Static_assert(sizeof(struct vfio_device_detach_iommufd_pt) >= 8,
	       "vfio_device_detach_iommufd_pt size");

#endif
