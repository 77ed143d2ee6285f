/*
 * The device layer: one struct vfm_device per VFIO device, whatever backend
 * (kernel VFIO, vfio-user, a test double) implements it. Backends fill the ops
 * tables below; users call the vfm_device_* functions, which add the state
 * machine policy, tracing and locking on top.
 */
#ifndef VFIOMIG_DEVICE_H
#define VFIOMIG_DEVICE_H

#include <sys/types.h>

#include "vfiomig/common.h"
#include "vfiomig/fsm.h"

#ifdef __cplusplus
extern "C" {
#endif

struct vfm_device;

struct vfm_device_info {
	uint32_t flags;        /* VFIO_DEVICE_FLAGS_* (PCI = 1 << 1, RESET = 1 << 0) */
	uint32_t num_regions;
	uint32_t num_irqs;
};

#define VFM_REGION_READ  (1u << 0)
#define VFM_REGION_WRITE (1u << 1)
#define VFM_REGION_MMAP  (1u << 2)

struct vfm_region_info {
	uint32_t index;
	uint32_t flags;        /* VFM_REGION_* */
	uint64_t size;
};

/*
 * A part of a region mapped into this process (VFM_REGION_MMAP regions):
 * loads and stores at ptr are accesses to the region at offset, with no
 * message or syscall. Valid until the device is freed.
 */
struct vfm_region_area {
	uint64_t offset;       /* in the region */
	uint64_t size;
	void *ptr;
};

/* A range of guest memory given to a device for DMA. IOVA = guest physical. */
#define VFM_DMA_READ  (1u << 0)  /* device may read guest memory */
#define VFM_DMA_WRITE (1u << 1)  /* device may write guest memory */
struct vfm_dma_map {
	uint64_t iova;
	uint64_t size;
	uint32_t prot;          /* VFM_DMA_* */
	int fd;                 /* memfd backing the range, or -1 */
	uint64_t fd_offset;     /* offset of iova in fd */
	void *vaddr;            /* the range in this process (for backends that copy) */
};

struct vfm_iova_range {
	uint64_t iova;
	uint64_t length;
};

/*
 * Migration ops (optional as a whole: absent = no migration support).
 * Called with the device lock held unless said otherwise.
 */
struct vfm_migration_ops {
	/* VFM_MIG_* flags. Required. */
	int (*get_flags)(struct vfm_device *dev, uint64_t *flags, struct vfm_error *err);
	/* Current state as the device reports it. Required. */
	int (*get_state)(struct vfm_device *dev, enum vfm_state *state, struct vfm_error *err);
	/*
	 * Move to new_state; the backend (like the kernel) steps through the
	 * intermediate arcs itself. *session_opened = true when the final arc
	 * handed out a new data session. On failure the device may be in any
	 * intermediate state. Required.
	 */
	int (*set_state)(struct vfm_device *dev, enum vfm_state new_state,
			 bool *session_opened, struct vfm_error *err);
	/* The session ended (device left PRE_COPY*, STOP_COPY, RESUMING). Optional. */
	void (*end_session)(struct vfm_device *dev);
	/*
	 * Read migration data: > 0 bytes read; 0 end of data (STOP_COPY: end of
	 * stream); -ENOMSG no data for now (PRE_COPY*); -EAGAIN try again.
	 * Called without the device lock (one reader at a time). Required.
	 */
	ssize_t (*read_data)(struct vfm_device *dev, void *buf, size_t len, struct vfm_error *err);
	/* Write up to len bytes in RESUMING; returns bytes taken (> 0). Required. */
	ssize_t (*write_data)(struct vfm_device *dev, const void *buf, size_t len,
			      struct vfm_error *err);
	/* Pre-copy sizes; only in PRE_COPY states. Optional (needed for PRE_COPY). */
	int (*precopy_info)(struct vfm_device *dev, uint64_t *initial_bytes,
			    uint64_t *dirty_bytes, struct vfm_error *err);
	/* Estimated size of the STOP_COPY data. Optional. */
	int (*stop_copy_size)(struct vfm_device *dev, uint64_t *bytes, struct vfm_error *err);
};

/* Device DMA logging (dirty tracking of the device's own DMA writes). Optional. */
struct vfm_dma_logging_ops {
	/* page_size is a hint in, the used value out. 1..256 aligned ranges. */
	int (*start)(struct vfm_device *dev, const struct vfm_iova_range *ranges,
		     uint32_t num_ranges, uint64_t *page_size, struct vfm_error *err);
	int (*stop)(struct vfm_device *dev, struct vfm_error *err);
	/*
	 * Dirty bits of [iova, iova+length) at page_size granularity, OR-ed into
	 * bitmap (u64 words, bit i = page iova + i*page_size); reading clears.
	 */
	int (*report)(struct vfm_device *dev, uint64_t iova, uint64_t length,
		      uint64_t page_size, uint64_t *bitmap, struct vfm_error *err);
};

struct vfm_device_ops {
	const char *backend;   /* "vfio-user", "vfio", "test" */
	int (*get_info)(struct vfm_device *dev, struct vfm_device_info *info,
			struct vfm_error *err);
	int (*region_info)(struct vfm_device *dev, uint32_t index,
			   struct vfm_region_info *info, struct vfm_error *err);
	/* Returns bytes transferred (all of len) or a negative error. */
	ssize_t (*region_read)(struct vfm_device *dev, uint32_t index, uint64_t offset,
			       void *buf, size_t len, struct vfm_error *err);
	ssize_t (*region_write)(struct vfm_device *dev, uint32_t index, uint64_t offset,
				const void *buf, size_t len, struct vfm_error *err);
	/* Optional: devices that do no DMA leave these NULL. */
	int (*dma_map)(struct vfm_device *dev, const struct vfm_dma_map *map,
		       struct vfm_error *err);
	/* dirty_bitmap (optional, may be NULL): dirty bits of the range (vIOMMU case). */
	int (*dma_unmap)(struct vfm_device *dev, uint64_t iova, uint64_t size,
			 uint64_t page_size, uint64_t *dirty_bitmap, struct vfm_error *err);
	/* Reset: the device returns to RUNNING; an open data session dies. */
	int (*reset)(struct vfm_device *dev, struct vfm_error *err);
	/* Free backend resources. Required. */
	void (*close)(struct vfm_device *dev);

	const struct vfm_migration_ops *mig;      /* NULL: no migration */
	const struct vfm_dma_logging_ops *log;    /* NULL: no DMA logging */
	/*
	 * Optional (NULL: the backend maps no region): the mapped areas of
	 * region index, the first max of them into areas, their number in
	 * *count. A region with none gives 0 and *count = 0.
	 */
	int (*region_areas)(struct vfm_device *dev, uint32_t index, struct vfm_region_area *areas,
			    unsigned max, unsigned *count, struct vfm_error *err);
};

/* ---- For backends ---- */

/* Create a device object around a backend. id names it in logs ("dev0"). */
VFM_EXPORT struct vfm_device *vfm_device_new(const char *id,
					     const struct vfm_device_ops *ops,
					     void *priv);
VFM_EXPORT void *vfm_device_priv(const struct vfm_device *dev);

/* ---- For users ---- */

/* Closes the backend and frees the device. NULL is allowed. */
VFM_EXPORT void vfm_device_free(struct vfm_device *dev);
VFM_EXPORT const char *vfm_device_id(const struct vfm_device *dev);
VFM_EXPORT const char *vfm_device_backend(const struct vfm_device *dev);
VFM_EXPORT const struct vfm_device_ops *vfm_device_ops(const struct vfm_device *dev);

/*
 * Probe migration: reads flags and the current state. -VFM_ENOMIGRATION
 * (i.e. VFM_ENOMIGRATION) when the backend has no migration support or the
 * flags lack STOP_COPY. Called once before other migration calls.
 */
VFM_EXPORT int vfm_device_probe_migration(struct vfm_device *dev, struct vfm_error *err);
VFM_EXPORT uint64_t vfm_device_mig_flags(const struct vfm_device *dev);
/* The last known state (cached; vfm_device_query_state asks the device). */
VFM_EXPORT enum vfm_state vfm_device_state(struct vfm_device *dev);
VFM_EXPORT int vfm_device_query_state(struct vfm_device *dev, enum vfm_state *state,
				      struct vfm_error *err);
VFM_EXPORT bool vfm_device_has_session(struct vfm_device *dev);

/*
 * Move the device to new_state with QEMU's policy: a request the state
 * machine forbids (or an unsupported state) fails with VFM_EFORBIDDEN before
 * the device is touched. If the device fails the transition, its real state
 * is read back and recover is tried; if recover fails too, or recover is
 * VFM_STATE_ERROR, the device is reset (back to RUNNING). The first error is
 * returned in every failure case; a failed reset leaves the state ERROR.
 */
VFM_EXPORT int vfm_device_set_state(struct vfm_device *dev, enum vfm_state new_state,
				    enum vfm_state recover, struct vfm_error *err);

/* Reset: the device returns to RUNNING, any session is dropped. */
VFM_EXPORT int vfm_device_reset(struct vfm_device *dev, struct vfm_error *err);

/* Data session I/O: semantics of vfm_migration_ops.read_data / write_data. */
VFM_EXPORT ssize_t vfm_device_read_data(struct vfm_device *dev, void *buf, size_t len,
					struct vfm_error *err);
/* Writes all of len (looping over short writes); 0 or a negative error. */
VFM_EXPORT int vfm_device_write_data(struct vfm_device *dev, const void *buf, size_t len,
				     struct vfm_error *err);
/* -ENOTSUP when the backend has no such op; -EINVAL outside PRE_COPY states. */
VFM_EXPORT int vfm_device_precopy_info(struct vfm_device *dev, uint64_t *initial_bytes,
				       uint64_t *dirty_bytes, struct vfm_error *err);
VFM_EXPORT int vfm_device_stop_copy_size(struct vfm_device *dev, uint64_t *bytes,
					 struct vfm_error *err);

/* Regions and DMA: pass-throughs with argument checks and tracing. */
VFM_EXPORT int vfm_device_get_info(struct vfm_device *dev, struct vfm_device_info *info,
				   struct vfm_error *err);
VFM_EXPORT int vfm_device_region_info(struct vfm_device *dev, uint32_t index,
				      struct vfm_region_info *info, struct vfm_error *err);
VFM_EXPORT int vfm_device_region_read(struct vfm_device *dev, uint32_t index,
				      uint64_t offset, void *buf, size_t len,
				      struct vfm_error *err);
VFM_EXPORT int vfm_device_region_write(struct vfm_device *dev, uint32_t index,
				       uint64_t offset, const void *buf, size_t len,
				       struct vfm_error *err);
/*
 * The areas of region index mapped into this process (offset in the region,
 * size, host pointer; valid until the device is freed), sorted by offset:
 * the first max into areas (may be NULL with max 0), the total in *count.
 * A region nothing of which is mapped gives 0 with *count = 0; -ENOTSUP when
 * the backend maps no region at all; -EINVAL for a bad index.
 */
VFM_EXPORT int vfm_device_region_areas(struct vfm_device *dev, uint32_t index,
				       struct vfm_region_area *areas, unsigned max,
				       unsigned *count, struct vfm_error *err);
VFM_EXPORT int vfm_device_dma_map(struct vfm_device *dev, const struct vfm_dma_map *map,
				  struct vfm_error *err);
VFM_EXPORT int vfm_device_dma_unmap(struct vfm_device *dev, uint64_t iova, uint64_t size,
				    uint64_t page_size, uint64_t *dirty_bitmap,
				    struct vfm_error *err);

/* DMA logging: -ENOTSUP without a logging ops table. */
VFM_EXPORT bool vfm_device_has_dma_logging(const struct vfm_device *dev);
VFM_EXPORT int vfm_device_log_start(struct vfm_device *dev,
				    const struct vfm_iova_range *ranges,
				    uint32_t num_ranges, uint64_t *page_size,
				    struct vfm_error *err);
VFM_EXPORT int vfm_device_log_stop(struct vfm_device *dev, struct vfm_error *err);
VFM_EXPORT int vfm_device_log_report(struct vfm_device *dev, uint64_t iova,
				     uint64_t length, uint64_t page_size,
				     uint64_t *bitmap, struct vfm_error *err);

#ifdef __cplusplus
}
#endif
#endif
