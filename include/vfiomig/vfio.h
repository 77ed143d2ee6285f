/*
 * The kernel VFIO backend: a struct vfm_device over a /dev/vfio device
 * (cdev + iommufd, or the legacy group + type1v2 container), plus the IOMMU
 * dirty tracking and PCI config space helpers that go with it.
 *
 * Every system call the backend makes goes through a struct vfm_vfio_sys
 * (the default is libc), so tests can run it against a fake kernel.
 */
#ifndef VFIOMIG_VFIO_H
#define VFIOMIG_VFIO_H

#include <poll.h>
#include <sys/types.h>

#include "vfiomig/common.h"
#include "vfiomig/device.h"
#include "vfiomig/vfio_user.h"   /* struct vfm_irq_info, VFM_IRQ_INFO_* */

#ifdef __cplusplus
extern "C" {
#endif

/*
 * The system call seam. Each returns what libc would, except that failures
 * are a negative errno instead of -1 + errno (mmap: MAP_FAILED and *err_out).
 * opaque is passed back untouched.
 * V2 adds fcntl (F_GETFL/F_SETFL: the data fd is made O_NONBLOCK); a V1
 * table is still accepted and its data fds stay as the kernel made them.
 */
#define VFM_VFIO_SYS_V1 1u
#define VFM_VFIO_SYS_V2 2u
struct vfm_vfio_sys {
	uint32_t version;      /* VFM_VFIO_SYS_V2 (or V1: no fcntl member) */
	void *opaque;
	int (*open)(void *opaque, const char *path, int flags);
	int (*close)(void *opaque, int fd);
	int (*ioctl)(void *opaque, int fd, unsigned long request, void *arg);
	ssize_t (*read)(void *opaque, int fd, void *buf, size_t len);
	ssize_t (*write)(void *opaque, int fd, const void *buf, size_t len);
	ssize_t (*pread)(void *opaque, int fd, void *buf, size_t len, off_t off);
	ssize_t (*pwrite)(void *opaque, int fd, const void *buf, size_t len, off_t off);
	void *(*mmap)(void *opaque, void *addr, size_t len, int prot, int flags, int fd,
		      off_t off, int *err_out);
	int (*munmap)(void *opaque, void *addr, size_t len);
	int (*poll)(void *opaque, struct pollfd *fds, nfds_t nfds, int timeout_ms);
	int (*fcntl)(void *opaque, int fd, int cmd, int arg);   /* V2 */
};

/* The libc implementation (what NULL means). */
VFM_EXPORT const struct vfm_vfio_sys *vfm_vfio_sys_libc(void);

/*
 * Replaces what NULL means for later opens (NULL restores libc). For test
 * programs that cannot pass options (the test build of the vfiomig tool);
 * not thread-safe against concurrent opens.
 */
VFM_EXPORT void vfm_vfio_set_default_sys(const struct vfm_vfio_sys *sys);

enum vfm_vfio_iommu {
	VFM_VFIO_IOMMU_AUTO = 0,   /* cdev + iommufd, else group + type1v2 */
	VFM_VFIO_IOMMU_IOMMUFD,    /* cdev + iommufd only */
	VFM_VFIO_IOMMU_LEGACY,     /* group + type1v2 container only */
};

#define VFM_VFIO_OPTS_V1 1u
#define VFM_VFIO_DEFAULT_TIMEOUT_MS 5000u

/* Options; NULL means all defaults, and so do zero fields. */
struct vfm_vfio_opts {
	uint32_t version;              /* VFM_VFIO_OPTS_V1 */
	const char *id;                /* device id in logs; default "vfio" */
	enum vfm_vfio_iommu iommu;
	bool no_dirty_hwpt;            /* iommufd: attach the IOAS even when the
					  IOMMU could track dirty pages */
	const char *sysfs_root;        /* default "/sys" (tests point it elsewhere) */
	uint32_t timeout_ms;           /* how long one data read/write waits for the
					  data fd; default 5000 */
	const struct vfm_vfio_sys *sys;/* default: vfm_vfio_set_default_sys() or libc */
};

/*
 * Opens a kernel VFIO device. name is a cdev path (/dev/vfio/devices/vfioN)
 * or a PCI address (0000:BB:DD.F, or BB:DD.F for domain 0) resolved through
 * sysfs. The device is bound to a fresh iommufd IOAS (a dirty-tracking HWPT
 * when the IOMMU offers one) or, failing that, put in a type1v2 container.
 * Migration support and DMA logging are probed here.
 */
VFM_EXPORT int vfm_vfio_open(const char *name, const struct vfm_vfio_opts *opts,
			     struct vfm_device **out, struct vfm_error *err);

/* Whether dev was made by vfm_vfio_open(). */
VFM_EXPORT bool vfm_device_is_vfio(const struct vfm_device *dev);

/* "iommufd", "iommufd+dirty-hwpt" or "type1v2"; NULL for other backends. */
VFM_EXPORT const char *vfm_vfio_iommu_name(const struct vfm_device *dev);

/*
 * Cancel for the data fd's waits. The migration data fd is made O_NONBLOCK
 * and a read or write that finds it not ready waits in poll() slices of
 * VFM_VFIO_CANCEL_SLICE_MS, calling cancelled(opaque) between them: once it
 * returns true the read or write fails with VFM_ECANCELED (otherwise with
 * -ETIMEDOUT after the timeout). NULL clears it. Set it while no read or
 * write is in progress; cancelled may be called from the reading thread.
 */
#define VFM_VFIO_CANCEL_SLICE_MS 100
VFM_EXPORT void vfm_vfio_set_cancel_check(struct vfm_device *dev, bool (*cancelled)(void *opaque),
					  void *opaque);

VFM_EXPORT int vfm_vfio_irq_info(struct vfm_device *dev, uint32_t index,
				 struct vfm_irq_info *info, struct vfm_error *err);

/* ---- IOMMU dirty tracking (iommufd HWPT or type1 dirty pages) ---- */

/* Whether the IOMMU side can track dirty pages for this device. */
VFM_EXPORT bool vfm_vfio_iommu_dirty_supported(const struct vfm_device *dev);
/*
 * Whether those reports are page-exact. type1 only knows the pages mdevs pin:
 * with a device of an IOMMU-backed group (a PCI device under vfio-pci) in the
 * container, every report has every mapped page dirty. false then (and
 * without tracking); true for an iommufd HWPT and a container of mdevs.
 */
VFM_EXPORT bool vfm_vfio_iommu_dirty_exact(const struct vfm_device *dev);
VFM_EXPORT int vfm_vfio_iommu_dirty_start(struct vfm_device *dev, struct vfm_error *err);
VFM_EXPORT int vfm_vfio_iommu_dirty_stop(struct vfm_device *dev, struct vfm_error *err);
/*
 * Dirty bits of [iova, iova + length) OR-ed into bitmap (bit i = page
 * iova + i * page_size) and cleared. With type1 the range must cover whole
 * DMA mappings. Any error means the caller must treat the range as dirty.
 */
VFM_EXPORT int vfm_vfio_iommu_dirty_report(struct vfm_device *dev, uint64_t iova,
					   uint64_t length, uint64_t page_size,
					   uint64_t *bitmap, struct vfm_error *err);

/* ---- DMA logging ranges ---- */

/* What VFIO_DEVICE_FEATURE_DMA_LOGGING_START takes at most. */
#define VFM_VFIO_LOG_MAX_RANGES 256u

/*
 * Makes ranges fit DMA logging: each is widened to page_size alignment, the
 * list is sorted, overlapping and touching ranges are joined, and while more
 * than max remain the two neighbours with the smallest gap between them are
 * joined (logging a hole costs nothing; QEMU does the same). In place;
 * returns the new count (<= max), or -EINVAL for a bad page size or max 0.
 */
VFM_EXPORT int vfm_iova_ranges_fit(struct vfm_iova_range *ranges, uint32_t n,
				   uint64_t page_size, uint32_t max);

/* ---- PCI config space (any backend with a config region) ---- */

#define VFM_PCI_CONFIG_REGION 7u
#define VFM_PCI_CONFIG_MAX 4096u

struct vfm_pci_config {
	uint32_t len;                          /* bytes read: 256 or 4096 */
	uint8_t bytes[VFM_PCI_CONFIG_MAX];
};

/* Identity fields of a saved config space. */
struct vfm_pci_ident {
	uint16_t vendor, device, subsys_vendor, subsys_device;
	uint32_t class_code;                   /* 24 bits */
	uint8_t revision;
};
VFM_EXPORT void vfm_pci_config_ident(const struct vfm_pci_config *cfg,
				     struct vfm_pci_ident *id);

/* Reads the whole config region (up to VFM_PCI_CONFIG_MAX bytes). -ENOENT: none. */
VFM_EXPORT int vfm_pci_config_save(struct vfm_device *dev, struct vfm_pci_config *cfg,
				   struct vfm_error *err);

/*
 * Writes back what QEMU restores after loading device state: the BARs and
 * ROM BAR, the MSI capability (address, data, mask; enable last) and the
 * MSI-X control word, then the command register (so memory decoding and bus
 * mastering come back only once the BARs are in place). Wiring interrupts to
 * eventfds (VFIO_DEVICE_SET_IRQS) stays the owner's job: *msi_out (optional)
 * says which of 0 none, 1 MSI, 2 MSI-X the saved config had enabled.
 */
VFM_EXPORT int vfm_pci_config_restore(struct vfm_device *dev, const struct vfm_pci_config *cfg,
				      int *msi_out, struct vfm_error *err);

#ifdef __cplusplus
}
#endif
#endif
