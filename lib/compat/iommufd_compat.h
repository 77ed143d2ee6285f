/*
 * The iommufd uAPI vfiomig uses (IOAS map/unmap, HWPT allocation and dirty
 * tracking): the system's <linux/iommufd.h> when it is new enough, otherwise
 * our own copy of that subset with the same names, values and layouts.
 */
#ifndef VFIOMIG_COMPAT_IOMMUFD_COMPAT_H
#define VFIOMIG_COMPAT_IOMMUFD_COMPAT_H

#include <stddef.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/version.h>

/*
 * iommufd arrived in 6.2, but HWPT_ALLOC and GET_HW_INFO only in 6.6 and dirty
 * tracking (with out_capabilities and the HWPT alloc flags) in 6.7. The older
 * headers cannot be patched up after inclusion, because struct iommu_hw_info
 * and struct iommu_hwpt_alloc grew in 6.7, so anything before 6.7 is ignored.
 */
#if defined(__has_include)
#if __has_include(<linux/iommufd.h>) && LINUX_VERSION_CODE >= KERNEL_VERSION(6, 7, 0)
#define VFM_COMPAT_SYS_IOMMUFD 1
#endif
#endif

#ifdef VFM_COMPAT_SYS_IOMMUFD
#include <linux/iommufd.h>
#else

/* The installed header's guard (headers_install drops the _UAPI prefix). */
#if defined(_IOMMUFD_H) || defined(_UAPI_IOMMUFD_H)
#error "an older <linux/iommufd.h> was included before iommufd_compat.h"
#endif
/* Turn a later #include <linux/iommufd.h> into a no-op instead of a clash. */
#define _IOMMUFD_H
#define VFM_COMPAT_OWN_IOMMUFD 1

/* Layouts are those of Linux 6.7; newer kernels accept them (size says so). */
#define IOMMUFD_TYPE (';')

enum {
	IOMMUFD_CMD_BASE = 0x80,
	IOMMUFD_CMD_DESTROY = 0x80,
	IOMMUFD_CMD_IOAS_ALLOC = 0x81,
	IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84,
	IOMMUFD_CMD_IOAS_MAP = 0x85,
	IOMMUFD_CMD_IOAS_UNMAP = 0x86,
	IOMMUFD_CMD_HWPT_ALLOC = 0x89,
	IOMMUFD_CMD_GET_HW_INFO = 0x8a,
	IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8b,
	IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8c,
};

/* Destroys any object: IOAS, HWPT, ... */
struct iommu_destroy {
	__u32 size;
	__u32 id;
};
#define IOMMU_DESTROY _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)

struct iommu_ioas_alloc {
	__u32 size;
	__u32 flags;  /* must be 0 */
	__u32 out_ioas_id;
};
#define IOMMU_IOAS_ALLOC _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)

/* The IOVA ranges an IOAS can map (what the attached devices' IOMMUs reserve,
 * such as x86's MSI window, left out). -EMSGSIZE: num_iovas says how many. */
struct iommu_iova_range {
	__aligned_u64 start;
	__aligned_u64 last;
};
struct iommu_ioas_iova_ranges {
	__u32 size;
	__u32 ioas_id;
	__u32 num_iovas;
	__u32 __reserved;
	__aligned_u64 allowed_iovas;
	__aligned_u64 out_iova_alignment;
};
#define IOMMU_IOAS_IOVA_RANGES _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)

enum iommufd_ioas_map_flags {
	IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0,  /* else the kernel picks the IOVA */
	IOMMU_IOAS_MAP_WRITEABLE = 1 << 1,   /* device may write */
	IOMMU_IOAS_MAP_READABLE = 1 << 2,    /* device may read */
};

struct iommu_ioas_map {
	__u32 size;
	__u32 flags;  /* enum iommufd_ioas_map_flags */
	__u32 ioas_id;
	__u32 __reserved;
	__aligned_u64 user_va;
	__aligned_u64 length;
	__aligned_u64 iova;  /* in with FIXED_IOVA, else out */
};
#define IOMMU_IOAS_MAP _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)

/* Must cover whole mappings; iova 0, length U64_MAX unmaps everything. */
struct iommu_ioas_unmap {
	__u32 size;
	__u32 ioas_id;
	__aligned_u64 iova;
	__aligned_u64 length;  /* out: bytes unmapped */
};
#define IOMMU_IOAS_UNMAP _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)

enum iommufd_hwpt_alloc_flags {
	IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0,
	/* Attaching a device whose IOMMU cannot track dirty pages then fails. */
	IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1,
};

enum iommu_hwpt_data_type {
	IOMMU_HWPT_DATA_NONE = 0,  /* a kernel-managed HWPT over an IOAS */
};

struct iommu_hwpt_alloc {
	__u32 size;
	__u32 flags;  /* enum iommufd_hwpt_alloc_flags */
	__u32 dev_id;
	__u32 pt_id;  /* the IOAS to take mappings from */
	__u32 out_hwpt_id;
	__u32 __reserved;
	__u32 data_type;  /* IOMMU_HWPT_DATA_NONE; then data_len = data_uptr = 0 */
	__u32 data_len;
	__aligned_u64 data_uptr;
};
#define IOMMU_HWPT_ALLOC _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)

enum iommu_hw_info_type {
	IOMMU_HW_INFO_TYPE_NONE = 0,
};

enum iommufd_hw_capabilities {
	IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0,
};

struct iommu_hw_info {
	__u32 size;
	__u32 flags;  /* must be 0 */
	__u32 dev_id;
	__u32 data_len;  /* may be 0: we only want out_capabilities */
	__aligned_u64 data_uptr;
	__u32 out_data_type;
	__u32 __reserved;
	__aligned_u64 out_capabilities;  /* enum iommufd_hw_capabilities */
};
#define IOMMU_GET_HW_INFO _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)

enum iommufd_hwpt_set_dirty_tracking_flags {
	IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1,  /* clear to disable */
};

struct iommu_hwpt_set_dirty_tracking {
	__u32 size;
	__u32 flags;
	__u32 hwpt_id;
	__u32 __reserved;
};
#define IOMMU_HWPT_SET_DIRTY_TRACKING _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)

enum iommufd_hwpt_get_dirty_bitmap_flags {
	/* Read without clearing, for a range about to be unmapped anyway. */
	IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1,
};

/* Bit (iova / page_size) of the u64 array at data is set for a dirty page. */
struct iommu_hwpt_get_dirty_bitmap {
	__u32 size;
	__u32 hwpt_id;
	__u32 flags;
	__u32 __reserved;
	__aligned_u64 iova;
	__aligned_u64 length;
	__aligned_u64 page_size;
	__aligned_u64 data;  /* user pointer to the bitmap */
};
#define IOMMU_HWPT_GET_DIRTY_BITMAP _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)

_Static_assert(sizeof(struct iommu_destroy) == 8, "iommu_destroy size");
_Static_assert(sizeof(struct iommu_ioas_alloc) == 12, "iommu_ioas_alloc size");
_Static_assert(sizeof(struct iommu_ioas_map) == 40, "iommu_ioas_map size");
_Static_assert(sizeof(struct iommu_ioas_unmap) == 24, "iommu_ioas_unmap size");
_Static_assert(sizeof(struct iommu_hwpt_alloc) == 40, "iommu_hwpt_alloc size");
_Static_assert(sizeof(struct iommu_hw_info) == 40, "iommu_hw_info size");
_Static_assert(sizeof(struct iommu_hwpt_set_dirty_tracking) == 16,
	       "iommu_hwpt_set_dirty_tracking size");
_Static_assert(sizeof(struct iommu_hwpt_get_dirty_bitmap) == 48,
	       "iommu_hwpt_get_dirty_bitmap size");

#endif /* !VFM_COMPAT_SYS_IOMMUFD */

/* What vfiomig relies on, whichever header supplied it. */
_Static_assert(IOMMUFD_TYPE == 0x3b, "iommufd ioctl type");
_Static_assert(IOMMU_DESTROY == _IO(0x3b, 0x80), "IOMMU_DESTROY");
_Static_assert(IOMMU_IOAS_ALLOC == _IO(0x3b, 0x81), "IOMMU_IOAS_ALLOC");
_Static_assert(IOMMU_IOAS_IOVA_RANGES == _IO(0x3b, 0x84), "IOMMU_IOAS_IOVA_RANGES");
_Static_assert(IOMMU_IOAS_MAP == _IO(0x3b, 0x85), "IOMMU_IOAS_MAP");
_Static_assert(IOMMU_IOAS_UNMAP == _IO(0x3b, 0x86), "IOMMU_IOAS_UNMAP");
_Static_assert(IOMMU_HWPT_ALLOC == _IO(0x3b, 0x89), "IOMMU_HWPT_ALLOC");
_Static_assert(IOMMU_GET_HW_INFO == _IO(0x3b, 0x8a), "IOMMU_GET_HW_INFO");
_Static_assert(IOMMU_HWPT_SET_DIRTY_TRACKING == _IO(0x3b, 0x8b),
	       "IOMMU_HWPT_SET_DIRTY_TRACKING");
_Static_assert(IOMMU_HWPT_GET_DIRTY_BITMAP == _IO(0x3b, 0x8c), "IOMMU_HWPT_GET_DIRTY_BITMAP");

_Static_assert(IOMMU_IOAS_MAP_FIXED_IOVA == 1 && IOMMU_IOAS_MAP_WRITEABLE == 2 &&
	       IOMMU_IOAS_MAP_READABLE == 4, "iommufd_ioas_map_flags");
_Static_assert(IOMMU_HWPT_ALLOC_DIRTY_TRACKING == 2, "IOMMU_HWPT_ALLOC_DIRTY_TRACKING");
_Static_assert(IOMMU_HW_CAP_DIRTY_TRACKING == 1, "IOMMU_HW_CAP_DIRTY_TRACKING");
_Static_assert(IOMMU_HWPT_DIRTY_TRACKING_ENABLE == 1, "IOMMU_HWPT_DIRTY_TRACKING_ENABLE");
_Static_assert(IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR == 1,
	       "IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR");
_Static_assert(IOMMU_HWPT_DATA_NONE == 0, "IOMMU_HWPT_DATA_NONE");

/* Field offsets never move; sizes may only grow. */
_Static_assert(offsetof(struct iommu_destroy, id) == 4, "iommu_destroy");
_Static_assert(offsetof(struct iommu_ioas_alloc, out_ioas_id) == 8, "iommu_ioas_alloc");
_Static_assert(offsetof(struct iommu_ioas_map, ioas_id) == 8 &&
	       offsetof(struct iommu_ioas_map, user_va) == 16 &&
	       offsetof(struct iommu_ioas_map, length) == 24 &&
	       offsetof(struct iommu_ioas_map, iova) == 32, "iommu_ioas_map");
_Static_assert(offsetof(struct iommu_ioas_unmap, iova) == 8 &&
	       offsetof(struct iommu_ioas_unmap, length) == 16, "iommu_ioas_unmap");
_Static_assert(offsetof(struct iommu_hwpt_alloc, dev_id) == 8 &&
	       offsetof(struct iommu_hwpt_alloc, pt_id) == 12 &&
	       offsetof(struct iommu_hwpt_alloc, out_hwpt_id) == 16 &&
	       offsetof(struct iommu_hwpt_alloc, data_type) == 24 &&
	       offsetof(struct iommu_hwpt_alloc, data_uptr) == 32 &&
	       sizeof(struct iommu_hwpt_alloc) >= 40, "iommu_hwpt_alloc");
_Static_assert(offsetof(struct iommu_hw_info, dev_id) == 8 &&
	       offsetof(struct iommu_hw_info, data_uptr) == 16 &&
	       offsetof(struct iommu_hw_info, out_data_type) == 24 &&
	       offsetof(struct iommu_hw_info, out_capabilities) == 32 &&
	       sizeof(struct iommu_hw_info) >= 40, "iommu_hw_info");
_Static_assert(offsetof(struct iommu_hwpt_set_dirty_tracking, hwpt_id) == 8 &&
	       sizeof(struct iommu_hwpt_set_dirty_tracking) >= 16,
	       "iommu_hwpt_set_dirty_tracking");
_Static_assert(offsetof(struct iommu_hwpt_get_dirty_bitmap, hwpt_id) == 4 &&
	       offsetof(struct iommu_hwpt_get_dirty_bitmap, flags) == 8 &&
	       offsetof(struct iommu_hwpt_get_dirty_bitmap, iova) == 16 &&
	       offsetof(struct iommu_hwpt_get_dirty_bitmap, length) == 24 &&
	       offsetof(struct iommu_hwpt_get_dirty_bitmap, page_size) == 32 &&
	       offsetof(struct iommu_hwpt_get_dirty_bitmap, data) == 40,
	       "iommu_hwpt_get_dirty_bitmap");

#endif
