/*
 * The compat headers against the kernel's uAPI numbers, written out here as
 * literals (from include/uapi/linux/vfio.h and iommufd.h), not taken from them.
 */
#include <linux/version.h>

#include "harness.h"
#include "compat/iommufd_compat.h"
#include "compat/vfio_compat.h"
#include "vfiomig/fsm.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

struct ioctl_case {
	const char *name;
	unsigned long value;
	unsigned nr;
};

/* ioctl(2) numbers are _IO(';', nr): no direction, no size, type 0x3b. */
static void check_ioctls(const struct ioctl_case *c, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (c[i].value != (unsigned long)_IO(0x3b, c[i].nr))
			FAIL("%s = %#lx, want _IO(0x3b, %u)", c[i].name, c[i].value, c[i].nr);
		if (_IOC_TYPE(c[i].value) != 0x3b || _IOC_NR(c[i].value) != c[i].nr ||
		    _IOC_SIZE(c[i].value) != 0 || _IOC_DIR(c[i].value) != _IOC_NONE)
			FAIL("%s = %#lx decodes wrongly", c[i].name, c[i].value);
#if defined(__x86_64__) || defined(__i386__) || defined(__aarch64__) || defined(__riscv)
		/* asm-generic encoding, where _IOC_NONE is 0: the raw number */
		if (c[i].value != (0x3b00ul | c[i].nr))
			FAIL("%s = %#lx, want %#lx", c[i].name, c[i].value, 0x3b00ul | c[i].nr);
#endif
	}
}

#define IOCTL(name, nr) { #name, (unsigned long)(name), nr }

TEST(vfio_ioctl_numbers)
{
	static const struct ioctl_case cases[] = {
		IOCTL(VFIO_DEVICE_GET_INFO, 107),
		IOCTL(VFIO_DEVICE_GET_REGION_INFO, 108),
		IOCTL(VFIO_DEVICE_RESET, 111),
		IOCTL(VFIO_IOMMU_MAP_DMA, 113),
		IOCTL(VFIO_IOMMU_UNMAP_DMA, 114),
		IOCTL(VFIO_DEVICE_FEATURE, 117),
		IOCTL(VFIO_IOMMU_DIRTY_PAGES, 117),
		IOCTL(VFIO_DEVICE_BIND_IOMMUFD, 118),
		IOCTL(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 119),
		IOCTL(VFIO_DEVICE_DETACH_IOMMUFD_PT, 120),
		IOCTL(VFIO_MIG_GET_PRECOPY_INFO, 121),
	};
	check_ioctls(cases, N_ELEMS(cases));
}

TEST(iommufd_ioctl_numbers)
{
	static const struct ioctl_case cases[] = {
		IOCTL(IOMMU_DESTROY, 0x80),
		IOCTL(IOMMU_IOAS_ALLOC, 0x81),
		IOCTL(IOMMU_IOAS_MAP, 0x85),
		IOCTL(IOMMU_IOAS_UNMAP, 0x86),
		IOCTL(IOMMU_HWPT_ALLOC, 0x89),
		IOCTL(IOMMU_GET_HW_INFO, 0x8a),
		IOCTL(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x8b),
		IOCTL(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x8c),
	};
	check_ioctls(cases, N_ELEMS(cases));
}

TEST(feature_ids_and_flags)
{
	CHECK_EQ(VFIO_DEVICE_FEATURE_MASK, 0xffff);
	CHECK_EQ(VFIO_DEVICE_FEATURE_GET, 0x10000);
	CHECK_EQ(VFIO_DEVICE_FEATURE_SET, 0x20000);
	CHECK_EQ(VFIO_DEVICE_FEATURE_PROBE, 0x40000);
	CHECK_EQ(VFIO_DEVICE_FEATURE_MIGRATION, 1);
	CHECK_EQ(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 2);
	CHECK_EQ(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, 6);
	CHECK_EQ(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, 7);
	CHECK_EQ(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, 8);
	CHECK_EQ(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 9);

	CHECK_EQ(VFIO_MIGRATION_STOP_COPY, 1);
	CHECK_EQ(VFIO_MIGRATION_P2P, 2);
	CHECK_EQ(VFIO_MIGRATION_PRE_COPY, 4);

	CHECK_EQ(VFIO_IOMMU_DIRTY_PAGES_FLAG_START, 1);
	CHECK_EQ(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, 2);
	CHECK_EQ(VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, 4);
	CHECK_EQ(VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 1);

	CHECK_EQ(IOMMU_IOAS_MAP_FIXED_IOVA, 1);
	CHECK_EQ(IOMMU_IOAS_MAP_WRITEABLE, 2);
	CHECK_EQ(IOMMU_IOAS_MAP_READABLE, 4);
	CHECK_EQ(IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 2);
	CHECK_EQ(IOMMU_HWPT_DATA_NONE, 0);
	CHECK_EQ(IOMMU_HW_CAP_DIRTY_TRACKING, 1);
	CHECK_EQ(IOMMU_HWPT_DIRTY_TRACKING_ENABLE, 1);
	CHECK_EQ(IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR, 1);
}

TEST(device_states)
{
	CHECK_EQ(VFIO_DEVICE_STATE_ERROR, 0);
	CHECK_EQ(VFIO_DEVICE_STATE_STOP, 1);
	CHECK_EQ(VFIO_DEVICE_STATE_RUNNING, 2);
	CHECK_EQ(VFIO_DEVICE_STATE_STOP_COPY, 3);
	CHECK_EQ(VFIO_DEVICE_STATE_RESUMING, 4);
	CHECK_EQ(VFIO_DEVICE_STATE_RUNNING_P2P, 5);
	CHECK_EQ(VFIO_DEVICE_STATE_PRE_COPY, 6);
	CHECK_EQ(VFIO_DEVICE_STATE_PRE_COPY_P2P, 7);
}

/* vfiomig's own enum and flags are used on the wire as they are. */
TEST(fsm_matches_uapi)
{
	static const struct { int vfm, vfio; } states[] = {
		{ VFM_STATE_ERROR, VFIO_DEVICE_STATE_ERROR },
		{ VFM_STATE_STOP, VFIO_DEVICE_STATE_STOP },
		{ VFM_STATE_RUNNING, VFIO_DEVICE_STATE_RUNNING },
		{ VFM_STATE_STOP_COPY, VFIO_DEVICE_STATE_STOP_COPY },
		{ VFM_STATE_RESUMING, VFIO_DEVICE_STATE_RESUMING },
		{ VFM_STATE_RUNNING_P2P, VFIO_DEVICE_STATE_RUNNING_P2P },
		{ VFM_STATE_PRE_COPY, VFIO_DEVICE_STATE_PRE_COPY },
		{ VFM_STATE_PRE_COPY_P2P, VFIO_DEVICE_STATE_PRE_COPY_P2P },
	};
	CHECK_EQ(N_ELEMS(states), VFM_STATE_COUNT);
	for (size_t i = 0; i < N_ELEMS(states); i++) {
		CHECK_EQ(states[i].vfm, i);
		CHECK_EQ(states[i].vfio, i);
	}
	CHECK_EQ(VFM_MIG_STOP_COPY, VFIO_MIGRATION_STOP_COPY);
	CHECK_EQ(VFM_MIG_P2P, VFIO_MIGRATION_P2P);
	CHECK_EQ(VFM_MIG_PRE_COPY, VFIO_MIGRATION_PRE_COPY);
	CHECK_EQ(VFM_MIG_ALL, 7);
}

#define CHECK_OFF(type, field, off) CHECK_EQ(offsetof(struct type, field), off)

/* Structs whose size a newer kernel may grow: exact only where we define them. */
#define CHECK_SIZE_GROWS(type, size, own)                                   \
	do {                                                                \
		if (own)                                                    \
			CHECK_EQ(sizeof(struct type), size);                \
		else                                                        \
			CHECK(sizeof(struct type) >= (size));               \
	} while (0)

#ifdef VFM_COMPAT_OWN_BIND_IOMMUFD
#define OWN_BIND 1
#else
#define OWN_BIND 0
#endif
#ifdef VFM_COMPAT_OWN_ATTACH_IOMMUFD_PT
#define OWN_ATTACH 1
#else
#define OWN_ATTACH 0
#endif
#ifdef VFM_COMPAT_OWN_DETACH_IOMMUFD_PT
#define OWN_DETACH 1
#else
#define OWN_DETACH 0
#endif
#ifdef VFM_COMPAT_OWN_IOMMUFD
#define OWN_IOMMUFD 1
#else
#define OWN_IOMMUFD 0
#endif

TEST(vfio_struct_layouts)
{
	CHECK_EQ(sizeof(struct vfio_device_feature), 8);
	CHECK_OFF(vfio_device_feature, flags, 4);
	CHECK_OFF(vfio_device_feature, data, 8);

	CHECK_EQ(sizeof(struct vfio_device_feature_migration), 8);
	CHECK_EQ(sizeof(struct vfio_device_feature_mig_state), 8);
	CHECK_OFF(vfio_device_feature_mig_state, data_fd, 4);

	CHECK_EQ(sizeof(struct vfio_device_feature_dma_logging_control), 24);
	CHECK_OFF(vfio_device_feature_dma_logging_control, num_ranges, 8);
	CHECK_OFF(vfio_device_feature_dma_logging_control, ranges, 16);
	CHECK_EQ(sizeof(struct vfio_device_feature_dma_logging_range), 16);
	CHECK_OFF(vfio_device_feature_dma_logging_range, length, 8);
	CHECK_EQ(sizeof(struct vfio_device_feature_dma_logging_report), 32);
	CHECK_OFF(vfio_device_feature_dma_logging_report, length, 8);
	CHECK_OFF(vfio_device_feature_dma_logging_report, page_size, 16);
	CHECK_OFF(vfio_device_feature_dma_logging_report, bitmap, 24);

	CHECK_EQ(sizeof(struct vfio_device_feature_mig_data_size), 8);
	CHECK_OFF(vfio_device_feature_mig_data_size, stop_copy_length, 0);

	CHECK_EQ(sizeof(struct vfio_precopy_info), 24);
	CHECK_OFF(vfio_precopy_info, flags, 4);
	CHECK_OFF(vfio_precopy_info, initial_bytes, 8);
	CHECK_OFF(vfio_precopy_info, dirty_bytes, 16);

	CHECK_SIZE_GROWS(vfio_device_bind_iommufd, 16, OWN_BIND);
	CHECK_OFF(vfio_device_bind_iommufd, flags, 4);
	CHECK_OFF(vfio_device_bind_iommufd, iommufd, 8);
	CHECK_OFF(vfio_device_bind_iommufd, out_devid, 12);

	CHECK_SIZE_GROWS(vfio_device_attach_iommufd_pt, 12, OWN_ATTACH);
	CHECK_OFF(vfio_device_attach_iommufd_pt, flags, 4);
	CHECK_OFF(vfio_device_attach_iommufd_pt, pt_id, 8);

	CHECK_SIZE_GROWS(vfio_device_detach_iommufd_pt, 8, OWN_DETACH);
	CHECK_OFF(vfio_device_detach_iommufd_pt, flags, 4);

	/* iommufd is a signed fd: -1 must survive the round trip */
	struct vfio_device_bind_iommufd bind = { .iommufd = -1 };
	CHECK_EQ(bind.iommufd, -1);
}

TEST(iommufd_struct_layouts)
{
	CHECK_EQ(sizeof(struct iommu_destroy), 8);
	CHECK_OFF(iommu_destroy, id, 4);

	CHECK_EQ(sizeof(struct iommu_ioas_alloc), 12);
	CHECK_OFF(iommu_ioas_alloc, flags, 4);
	CHECK_OFF(iommu_ioas_alloc, out_ioas_id, 8);

	CHECK_EQ(sizeof(struct iommu_ioas_map), 40);
	CHECK_OFF(iommu_ioas_map, flags, 4);
	CHECK_OFF(iommu_ioas_map, ioas_id, 8);
	CHECK_OFF(iommu_ioas_map, __reserved, 12);
	CHECK_OFF(iommu_ioas_map, user_va, 16);
	CHECK_OFF(iommu_ioas_map, length, 24);
	CHECK_OFF(iommu_ioas_map, iova, 32);

	CHECK_EQ(sizeof(struct iommu_ioas_unmap), 24);
	CHECK_OFF(iommu_ioas_unmap, ioas_id, 4);
	CHECK_OFF(iommu_ioas_unmap, iova, 8);
	CHECK_OFF(iommu_ioas_unmap, length, 16);

	/* 24 bytes in 6.6, 40 from 6.7 (data_type/len/uptr), 48 later (fault_id) */
	CHECK_SIZE_GROWS(iommu_hwpt_alloc, 40, OWN_IOMMUFD);
	CHECK_OFF(iommu_hwpt_alloc, flags, 4);
	CHECK_OFF(iommu_hwpt_alloc, dev_id, 8);
	CHECK_OFF(iommu_hwpt_alloc, pt_id, 12);
	CHECK_OFF(iommu_hwpt_alloc, out_hwpt_id, 16);
	CHECK_OFF(iommu_hwpt_alloc, __reserved, 20);
	CHECK_OFF(iommu_hwpt_alloc, data_type, 24);
	CHECK_OFF(iommu_hwpt_alloc, data_len, 28);
	CHECK_OFF(iommu_hwpt_alloc, data_uptr, 32);

	CHECK_SIZE_GROWS(iommu_hw_info, 40, OWN_IOMMUFD);
	CHECK_OFF(iommu_hw_info, flags, 4);
	CHECK_OFF(iommu_hw_info, dev_id, 8);
	CHECK_OFF(iommu_hw_info, data_len, 12);
	CHECK_OFF(iommu_hw_info, data_uptr, 16);
	CHECK_OFF(iommu_hw_info, out_data_type, 24);
	CHECK_OFF(iommu_hw_info, out_capabilities, 32);

	CHECK_EQ(sizeof(struct iommu_hwpt_set_dirty_tracking), 16);
	CHECK_OFF(iommu_hwpt_set_dirty_tracking, flags, 4);
	CHECK_OFF(iommu_hwpt_set_dirty_tracking, hwpt_id, 8);
	CHECK_OFF(iommu_hwpt_set_dirty_tracking, __reserved, 12);

	CHECK_EQ(sizeof(struct iommu_hwpt_get_dirty_bitmap), 48);
	CHECK_OFF(iommu_hwpt_get_dirty_bitmap, hwpt_id, 4);
	CHECK_OFF(iommu_hwpt_get_dirty_bitmap, flags, 8);
	CHECK_OFF(iommu_hwpt_get_dirty_bitmap, __reserved, 12);
	CHECK_OFF(iommu_hwpt_get_dirty_bitmap, iova, 16);
	CHECK_OFF(iommu_hwpt_get_dirty_bitmap, length, 24);
	CHECK_OFF(iommu_hwpt_get_dirty_bitmap, page_size, 32);
	CHECK_OFF(iommu_hwpt_get_dirty_bitmap, data, 40);
}

/* The guards must fill in exactly what the installed headers lack. */
TEST(guards_follow_system_headers)
{
	int own_pre_copy = 0, own_precopy_info = 0, own_data_size = 0;
#ifdef VFM_COMPAT_OWN_PRE_COPY
	own_pre_copy = 1;
#endif
#ifdef VFM_COMPAT_OWN_PRECOPY_INFO
	own_precopy_info = 1;
#endif
#ifdef VFM_COMPAT_OWN_MIG_DATA_SIZE
	own_data_size = 1;
#endif
	/* PRE_COPY and MIG_DATA_SIZE are 6.2, the cdev ioctls 6.6, the iommufd
	 * subset (with dirty tracking) 6.7. */
	int before_6_2 = LINUX_VERSION_CODE < KERNEL_VERSION(6, 2, 0);
	int before_6_6 = LINUX_VERSION_CODE < KERNEL_VERSION(6, 6, 0);
	int before_6_7 = LINUX_VERSION_CODE < KERNEL_VERSION(6, 7, 0);

	CHECK_EQ(own_pre_copy, before_6_2);
	CHECK_EQ(own_precopy_info, before_6_2);
	CHECK_EQ(own_data_size, before_6_2);
	CHECK_EQ(OWN_BIND, before_6_6);
	CHECK_EQ(OWN_ATTACH, before_6_6);
	CHECK_EQ(OWN_DETACH, before_6_6);
	CHECK_EQ(OWN_IOMMUFD, before_6_7);
}
