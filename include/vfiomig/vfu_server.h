/*
 * The vfio-user server library: the device side of QEMU's vfio-user protocol
 * (docs/interop/vfio-user.rst). A device implements regions, interrupts and
 * single migration arcs; the library speaks the protocol, validates what the
 * client sends, maps client memory for DMA (with dirty logging), and steps
 * combined migration requests through the state machine arc by arc.
 *
 * Lifecycle:
 *   vfm_vfu_create(path)                  listening socket, mode 0600
 *   vfm_vfu_pci_init / setup_region / setup_irqs / setup_migration
 *   vfm_vfu_realize
 *   loop: poll(vfm_vfu_poll_fd) + vfm_vfu_run_once, or vfm_vfu_run(timeout)
 *         (a client is accepted when one connects; when it leaves, its DMA
 *          mappings and eventfds are dropped and the next one can connect)
 *   vfm_vfu_destroy
 *
 * The library does not own the event loop and starts no threads. The thread
 * that calls run/run_once/attach is "the loop thread": every callback below
 * runs on it, one at a time. Functions marked "any thread" may be called from
 * device threads as well.
 *
 * Errors: 0 (or a count) on success, a negative errno on failure, as in
 * vfiomig/common.h. Callbacks follow the same convention; the errno a callback
 * returns is what the client sees in the error reply.
 */
#ifndef VFIOMIG_VFU_SERVER_H
#define VFIOMIG_VFU_SERVER_H

#include <sys/types.h>

#include "vfiomig/common.h"
#include "vfiomig/fsm.h"

#ifdef __cplusplus
extern "C" {
#endif

struct vfm_vfu_ctx;

/* Region and IRQ indexes of a PCI device (linux/vfio.h). */
#define VFM_VFU_PCI_BAR0        0u
#define VFM_VFU_PCI_BAR5        5u
#define VFM_VFU_PCI_ROM         6u
#define VFM_VFU_PCI_CONFIG      7u   /* VFIO_PCI_CONFIG_REGION_INDEX */
#define VFM_VFU_PCI_VGA         8u
#define VFM_VFU_NUM_REGIONS     9u
#define VFM_VFU_IRQ_INTX        0u
#define VFM_VFU_IRQ_MSI         1u
#define VFM_VFU_IRQ_MSIX        2u
#define VFM_VFU_IRQ_ERR         3u
#define VFM_VFU_IRQ_REQ         4u
#define VFM_VFU_NUM_IRQS        5u

struct vfm_vfu_opts {
	const char *id;               /* log prefix; default "vfu" */
	/* Largest count we accept in one transfer; 0 = 1 MiB. [4 KiB, 16 MiB]. */
	uint32_t max_data_xfer_size;
	uint32_t max_dma_maps;        /* 0 = 65535 */
	uint32_t max_msg_fds;         /* fds we accept per message; 0 = 8, at most 16 */
	/*
	 * Bound on finishing a message whose first byte has arrived and on
	 * waiting for the client's reply to DMA_READ/DMA_WRITE; 0 = 5000 ms.
	 */
	int io_timeout_ms;
	/* Do not offer the vfiomig_mig_shm extension (migration data in
	 * MIG_DATA_READ/WRITE payloads, as a plain vfio-user server). */
	bool no_mig_shm;
};

/*
 * Creates a context listening on socket_path (mode 0600). An existing socket
 * nobody listens on is replaced; a live one is -EADDRINUSE; any other kind of
 * file is refused with -EEXIST and left alone. socket_path NULL: no listening
 * socket, clients come through vfm_vfu_attach_fd(). opts may be NULL.
 */
VFM_EXPORT int vfm_vfu_create(const char *socket_path, const struct vfm_vfu_opts *opts,
			      void *priv, struct vfm_vfu_ctx **out, struct vfm_error *err);
/* Detaches any client, closes and unlinks the socket. NULL is allowed. */
VFM_EXPORT void vfm_vfu_destroy(struct vfm_vfu_ctx *ctx);
/* Any thread. */
VFM_EXPORT void *vfm_vfu_priv(const struct vfm_vfu_ctx *ctx);
VFM_EXPORT const char *vfm_vfu_id(const struct vfm_vfu_ctx *ctx);

/* ------------------------------------------------------------------------ */
/* Declaring the device (before vfm_vfu_realize)                             */

#define VFM_VFU_DEVICE_OPS_VERSION 1

/* Whole-device callbacks; all optional. */
struct vfm_vfu_device_ops {
	unsigned version;             /* VFM_VFU_DEVICE_OPS_VERSION */
	/* A client finished VERSION negotiation. */
	void (*attach)(struct vfm_vfu_ctx *ctx);
	/*
	 * The client left; its mappings and eventfds are already gone. Return
	 * true to have the device reset (reset() below, migration state back to
	 * RUNNING) before the next client, false to keep its state as the spec
	 * suggests.
	 */
	bool (*detach)(struct vfm_vfu_ctx *ctx);
	/*
	 * DEVICE_RESET, leaving ERROR, or a detach that asked for it: back to
	 * defaults and RUNNING; an open migration data session is dropped.
	 */
	int (*reset)(struct vfm_vfu_ctx *ctx);
	/* Client memory came or goes (the library has already mapped it /
	 * still has it mapped). No DMA helper call for the range is in flight
	 * when dma_unmap runs, and none may start after it returns. */
	void (*dma_map)(struct vfm_vfu_ctx *ctx, uint64_t iova, uint64_t size, uint32_t prot);
	void (*dma_unmap)(struct vfm_vfu_ctx *ctx, uint64_t iova, uint64_t size);
};
VFM_EXPORT int vfm_vfu_set_device_ops(struct vfm_vfu_ctx *ctx,
				      const struct vfm_vfu_device_ops *ops,
				      struct vfm_error *err);

/*
 * A standard PCI config space (region 7, 256 bytes) kept by the library:
 * IDs, class, command register, BARs that size themselves from the declared
 * regions (write ~0, read back the size mask), interrupt pin for INTx.
 * BAR regions must then have power-of-two sizes >= 16.
 */
struct vfm_vfu_pci_ids {
	uint16_t vendor_id, device_id;
	uint16_t subsys_vendor_id, subsys_id;
	uint32_t class_code;          /* 24 bits: base, sub, prog-if */
	uint8_t revision;
};
VFM_EXPORT int vfm_vfu_pci_init(struct vfm_vfu_ctx *ctx, const struct vfm_vfu_pci_ids *ids,
				struct vfm_error *err);

#define VFM_VFU_REGION_OPS_VERSION 1

/*
 * Region access: return count (all of it) or a negative errno. offset and
 * count are already checked against the region size and max_data_xfer_size.
 */
struct vfm_vfu_region_ops {
	unsigned version;             /* VFM_VFU_REGION_OPS_VERSION */
	ssize_t (*read)(struct vfm_vfu_ctx *ctx, uint32_t index, uint64_t offset,
			void *buf, size_t count);
	ssize_t (*write)(struct vfm_vfu_ctx *ctx, uint32_t index, uint64_t offset,
			 const void *buf, size_t count);
};

#define VFM_VFU_REGION_READ  (1u << 0)
#define VFM_VFU_REGION_WRITE (1u << 1)

struct vfm_vfu_mmap_area {
	uint64_t offset;              /* within the region */
	uint64_t size;
};
#define VFM_VFU_MAX_MMAP_AREAS 16u

struct vfm_vfu_region {
	uint64_t size;
	uint32_t flags;               /* VFM_VFU_REGION_READ | _WRITE */
	const struct vfm_vfu_region_ops *ops; /* NULL: only fd-backed access */
	/*
	 * Optional: fd the client may mmap() (dup'ed; the caller keeps its own)
	 * at fd_offset (page-aligned). With no areas the whole region is
	 * mappable; with areas only those (page-aligned, inside the region),
	 * announced with a sparse-mmap capability. Accesses that come as
	 * messages go to ops, or to pread/pwrite on the fd when ops lacks them.
	 */
	int fd;                       /* -1: none */
	uint64_t fd_offset;
	const struct vfm_vfu_mmap_area *areas;
	uint32_t nr_areas;
};
/* index < VFM_VFU_NUM_REGIONS; 7 only without vfm_vfu_pci_init(). */
VFM_EXPORT int vfm_vfu_setup_region(struct vfm_vfu_ctx *ctx, uint32_t index,
				    const struct vfm_vfu_region *region,
				    struct vfm_error *err);

/* count interrupts of type index (< VFM_VFU_NUM_IRQS), count <= 2048. */
VFM_EXPORT int vfm_vfu_setup_irqs(struct vfm_vfu_ctx *ctx, uint32_t index, uint32_t count,
				  struct vfm_error *err);

#define VFM_VFU_MIGRATION_OPS_VERSION 1

/*
 * Migration, device side. The device implements single arcs; the library
 * walks a combined request arc by arc (the kernel's path rules) and refuses
 * forbidden or unsupported requests before calling transition().
 */
struct vfm_vfu_migration_ops {
	unsigned version;             /* VFM_VFU_MIGRATION_OPS_VERSION */
	uint64_t flags;               /* VFM_MIG_*: STOP_COPY required */
	/*
	 * One direct arc (vfm_arc_is_direct(flags, from, to) holds). 0, or a
	 * negative errno: the state stays `from`, unless the device called
	 * vfm_vfu_mig_set_error() because it could not stay there either.
	 */
	int (*transition)(struct vfm_vfu_ctx *ctx, enum vfm_state from, enum vfm_state to);
	/*
	 * Saving states: copy up to len bytes of the stream. > 0 bytes; 0 when
	 * there is nothing more for now (PRE_COPY*) or the stream ended
	 * (STOP_COPY); negative errno.
	 */
	ssize_t (*read_data)(struct vfm_vfu_ctx *ctx, void *buf, size_t len);
	/* RESUMING: take all of len bytes; returns len or a negative errno. */
	ssize_t (*write_data)(struct vfm_vfu_ctx *ctx, const void *buf, size_t len);
	/* PRE_COPY states: bytes of the initial and the dirty data left. Optional. */
	int (*precopy_info)(struct vfm_vfu_ctx *ctx, uint64_t *initial_bytes,
			    uint64_t *dirty_bytes);
	/* Bytes STOP_COPY would produce from now. Optional. */
	int (*stop_copy_size)(struct vfm_vfu_ctx *ctx, uint64_t *bytes);
};
VFM_EXPORT int vfm_vfu_setup_migration(struct vfm_vfu_ctx *ctx,
				       const struct vfm_vfu_migration_ops *ops,
				       struct vfm_error *err);

/* Freezes the declarations; after this the context can take clients. */
VFM_EXPORT int vfm_vfu_realize(struct vfm_vfu_ctx *ctx, struct vfm_error *err);

/* ------------------------------------------------------------------------ */
/* Running                                                                   */

/*
 * One fd for the caller's event loop (it never changes): readable when
 * vfm_vfu_run_once() has something to do (a client connecting, a message,
 * queued work).
 */
VFM_EXPORT int vfm_vfu_poll_fd(const struct vfm_vfu_ctx *ctx);

/*
 * Non-blocking step: accepts a waiting client, or handles one message of the
 * attached one (reading the rest of a message that has started, bounded by
 * io_timeout_ms). Returns 1 when it did something (call again), 0 when
 * nothing was ready, -ENOTCONN when the client left or was dropped for
 * breaking the protocol (already cleaned up: the next one may connect), or
 * another negative errno on a fatal error of the context.
 */
VFM_EXPORT int vfm_vfu_run_once(struct vfm_vfu_ctx *ctx, struct vfm_error *err);

/*
 * Blocking: steps until timeout_ms passes (returns 0; -1 = no limit), the
 * client leaves (-ENOTCONN), or a signal arrives (-EINTR).
 */
VFM_EXPORT int vfm_vfu_run(struct vfm_vfu_ctx *ctx, int timeout_ms, struct vfm_error *err);

/* Waits up to timeout_ms (-1: forever) for a client and accepts it. */
VFM_EXPORT int vfm_vfu_attach(struct vfm_vfu_ctx *ctx, int timeout_ms, struct vfm_error *err);
/* Takes a connected socket as the client (e.g. one end of a socketpair). */
VFM_EXPORT int vfm_vfu_attach_fd(struct vfm_vfu_ctx *ctx, int fd, struct vfm_error *err);
/* A client is connected. Any thread. */
VFM_EXPORT bool vfm_vfu_attached(const struct vfm_vfu_ctx *ctx);
/* Drops the current client as if it had left. */
VFM_EXPORT void vfm_vfu_detach(struct vfm_vfu_ctx *ctx);

/* ------------------------------------------------------------------------ */
/* Helpers for devices                                                       */

/*
 * Signals interrupt subindex of type index through the client's eventfd.
 * Masked: remembered and delivered on unmask. -ENOENT when the client set no
 * eventfd for it. Any thread.
 */
VFM_EXPORT int vfm_vfu_irq_trigger(struct vfm_vfu_ctx *ctx, uint32_t index, uint32_t subindex);

/*
 * DMA to and from client memory. Ranges mapped with an fd are accessed
 * directly (any thread); writes are then logged in the dirty bitmaps while
 * DMA logging is on. Ranges mapped without one go through DMA_READ/DMA_WRITE
 * messages (loop thread only, else -EWOULDBLOCK; the client tracks those
 * writes itself). A range may span adjacent mappings. -EFAULT: not mapped;
 * -EACCES: mapping lacks the permission.
 */
VFM_EXPORT int vfm_vfu_dma_read(struct vfm_vfu_ctx *ctx, uint64_t iova, void *buf, size_t len);
VFM_EXPORT int vfm_vfu_dma_write(struct vfm_vfu_ctx *ctx, uint64_t iova, const void *buf,
				 size_t len);

/* The migration state the client sees. Any thread. */
VFM_EXPORT enum vfm_state vfm_vfu_mig_state(const struct vfm_vfu_ctx *ctx);
/* DMA_LOGGING_REPORT requests answered so far (a device may expose it). Any thread. */
VFM_EXPORT uint64_t vfm_vfu_log_reports(const struct vfm_vfu_ctx *ctx);
/*
 * From a failing transition() only: the device could not return to the
 * arc's start state either, it is now ERROR (left only by a reset).
 */
VFM_EXPORT void vfm_vfu_mig_set_error(struct vfm_vfu_ctx *ctx);

/*
 * vfiomig extensions of DEVICE_FEATURE (the spec has no way to ask these; a
 * server without them answers ENOTTY and a client falls back to estimates):
 *   9      MIG_DATA_SIZE, the kernel's number: GET -> { u64 stop_copy_length }
 *   0xf001 PRECOPY_INFO: GET -> { u64 initial_bytes, u64 dirty_bytes },
 *          only in PRE_COPY states (like VFIO_MIG_GET_PRECOPY_INFO)
 *   0xf002 MIG_SHM: SET { u64 size } with one memfd: the migration data
 *          window of the vfiomig_mig_shm VERSION extension (only when both
 *          sides stated it; docs/vfio-user-server.md, "Extensions")
 */
#define VFM_VFU_FEATURE_MIG_DATA_SIZE 9u
#define VFM_VFU_FEATURE_PRECOPY_INFO  0xf001u
#define VFM_VFU_FEATURE_MIG_SHM       0xf002u

/* Migration data bytes moved through the vfiomig_mig_shm window so far
 * (read by the client and written by it). Any thread. */
VFM_EXPORT uint64_t vfm_vfu_mig_shm_bytes(const struct vfm_vfu_ctx *ctx);

#ifdef __cplusplus
}
#endif
#endif
