/*
 * A fake of the kernel's VFIO, iommufd and type1 uAPI, in process, behind
 * struct vfm_vfio_sys: one PCI device with the kernel's migration FSM (arcs
 * walked one by one, data_fd only from opening arcs), data fd sessions with
 * real fds (eventfds, so poll() works), PRECOPY_INFO, ENOMSG, DMA logging
 * and IOMMU dirty tracking with real bitmaps, and injected errors.
 * Single-threaded: one test drives it.
 */
#ifndef VFM_TESTS_FAKE_KVFIO_H
#define VFM_TESTS_FAKE_KVFIO_H

#include "vfiomig/vfio.h"

struct fake_kvfio;

struct fake_kvfio_cfg {
	uint64_t mig_flags;        /* VFM_MIG_*; 0: no migration (ENOTTY) */
	uint64_t state_size;       /* device state bytes, a multiple of 4096 */
	uint64_t seed;             /* state contents */
	uint16_t vendor, device;   /* PCI identity */
	const char *bdf;           /* "0000:01:00.0" */
	int cdev;                  /* N of /dev/vfio/devices/vfioN */
	int group;                 /* IOMMU group number */
	bool no_cdev;              /* the cdev open fails (ENOENT) */
	bool no_iommufd;           /* /dev/iommu open fails (ENOENT) */
	bool hw_dirty;             /* the IOMMU can track dirty pages (HWPT) */
	bool type1_dirty;          /* the type1 container has the migration cap */
	bool dma_logging;          /* device DMA logging */
	bool no_mig_data_size;     /* MIG_DATA_SIZE unknown (kernel < 6.2) */
	bool zero_at_precopy_end;  /* mtty: read() returns 0, not ENOMSG */
	bool info_produces_dirty;  /* mlx5: dirty data appears only after PRECOPY_INFO */
	bool nonblocking;          /* mlx5: an O_NONBLOCK data fd reads EAGAIN until
				      poll() (a blocking one waits for the data) */
	uint32_t stall_ms;         /* the data fd has nothing (read) or no room (write)
				      for this long from a session's first read or
				      write; UINT32_MAX: never. O_NONBLOCK: EAGAIN and
				      poll() waits; blocking: read()/write() sleep */
	bool ignore_nonblock;      /* a driver that blocks even with O_NONBLOCK */
	bool no_poll;              /* mtty: no poll method, the fd always polls ready */
	bool no_reset;             /* device lacks VFIO_DEVICE_FLAGS_RESET */
	bool reset_hidden;         /* mtty: no FLAGS_RESET, yet VFIO_DEVICE_RESET works */
	bool log_report_unsupported; /* DMA_LOGGING_REPORT is EOPNOTSUPP (Debian's 6.12) */
	bool log_report_when_off;  /* mtty's stub: a REPORT with logging off succeeds,
				      all clean (vfio.h: "an error will be returned") */
	bool msi_hole;             /* x86: IOVAs 0xfee00000-0xfeefffff reserved (type1
				      IOVA_RANGE cap, IOMMU_IOAS_IOVA_RANGES) */
	uint32_t read_chunk;       /* most bytes one read() returns; 0: 64 KiB */
	bool sparse_bar0;          /* BAR0's info carries a sparse-mmap capability
				      (one area: its first page) */
};

/* Defaults: all three migration flags, 64 KiB of state, logging, hw_dirty. */
void fake_kvfio_cfg_default(struct fake_kvfio_cfg *c);
/* "flags=7,state=64K,seed=3,vendor=0x1af4,logging=0,..." over the defaults. */
int fake_kvfio_cfg_parse(const char *s, struct fake_kvfio_cfg *c);

struct fake_kvfio *fake_kvfio_new(const struct fake_kvfio_cfg *cfg);
void fake_kvfio_free(struct fake_kvfio *fk);
const struct vfm_vfio_sys *fake_kvfio_sys(struct fake_kvfio *fk);

/* ---- Test-side controls ---- */

/* The next `skip`+1-th ioctl req (and feature id when req is
 * VFIO_DEVICE_FEATURE, 0 = any) fails with err (negative). One at a time. */
void fake_kvfio_inject(struct fake_kvfio *fk, unsigned long req, uint32_t feature,
		       unsigned skip, int err);
/* SET walking the arc from -> to fails with err and lands in `lands`. */
void fake_kvfio_fail_arc(struct fake_kvfio *fk, enum vfm_state from, enum vfm_state to,
			 int err, enum vfm_state lands);
/* The device changes its own state bytes [off, off + len) (firmware). */
void fake_kvfio_touch_state(struct fake_kvfio *fk, uint64_t off, uint64_t len);
/* The device writes guest memory by DMA: bytes land in the mapped memory and
 * are logged (DMA log and IOMMU dirty bits). -EFAULT when not mapped. */
int fake_kvfio_dma_write(struct fake_kvfio *fk, uint64_t iova, const void *data, uint64_t len);

enum vfm_state fake_kvfio_state(const struct fake_kvfio *fk);
/* Checksum of the device state (equal after a good save -> load). */
uint64_t fake_kvfio_state_hash(const struct fake_kvfio *fk);
/* Bytes of config space as the device holds them. */
const uint8_t *fake_kvfio_config(const struct fake_kvfio *fk);

struct fake_kvfio_stats {
	unsigned open_objects;     /* fds the backend holds */
	unsigned sets, gets;       /* MIG_DEVICE_STATE */
	unsigned arcs;             /* single arcs walked */
	unsigned hang_requests;    /* STOP_COPY -> PRE_COPY* asked (hangs kernels) */
	unsigned precopy_info;
	unsigned polls;
	unsigned reads, writes, eagains;
	bool data_nonblock;        /* the last data fd handed out has O_NONBLOCK */
	unsigned resets;
	unsigned maps;             /* live DMA mappings */
	unsigned bar_mmaps;        /* BAR0 mmap()s made of the device fd */
	bool logging, iommu_dirty; /* trackers on */
	uint32_t log_ranges;       /* ranges DMA logging was started with */
	uint64_t log_page_size;
	bool bound, attached_hwpt, legacy;
};
void fake_kvfio_stats(const struct fake_kvfio *fk, struct fake_kvfio_stats *st);

/*
 * vfm_vfio_open() of name against the fake: mode as given, sysfs_root (NULL:
 * a directory that does not exist, so the machine's /sys never leaks in),
 * a 2 s poll timeout.
 */
int fake_kvfio_open(struct fake_kvfio *fk, const char *name, enum vfm_vfio_iommu mode,
		    const char *sysfs_root, struct vfm_device **out, struct vfm_error *err);

/*
 * A sysfs tree under root (a temp dir) for the device: bus/pci/devices/BDF
 * with vfio-dev/vfioN (unless no_cdev), iommu_group -> kernel/iommu_groups/G,
 * and class/vfio-dev/vfioN/device -> the PCI device. 0 or -errno.
 */
int fake_kvfio_make_sysfs(const struct fake_kvfio_cfg *cfg, const char *root);

#endif
