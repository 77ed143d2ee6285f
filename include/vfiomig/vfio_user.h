/*
 * The vfio-user client backend: a struct vfm_device whose ops travel over a
 * UNIX socket to a vfio-user server (QEMU docs/interop/vfio-user.rst), such as
 * `vfiomig device dma` or any libvfio-user device.
 *
 * Threads: one request is in flight at a time (a mutex serialises them); the
 * thread that holds it also serves whatever the server sends meanwhile
 * (DMA_READ/DMA_WRITE). Between requests, server messages wait on the socket
 * until someone calls vfm_vfio_user_poll(): the VM's main loop watches
 * vfm_vfio_user_poll_fd() for POLLIN and calls it.
 *
 * Failure: every request is bounded by the timeout; a server that closes the
 * socket, stops answering, or breaks the framing takes the connection down
 * and every later call fails at once with -ENOTCONN.
 */
#ifndef VFIOMIG_VFIO_USER_H
#define VFIOMIG_VFIO_USER_H

#include "vfiomig/common.h"
#include "vfiomig/device.h"

#ifdef __cplusplus
extern "C" {
#endif

#define VFM_VFIO_USER_OPTS_V1 1u
#define VFM_VFIO_USER_DEFAULT_TIMEOUT_MS 5000u
/* What we accept per data message unless told otherwise (the spec's default). */
#define VFM_VFIO_USER_DEFAULT_MAX_XFER (1u << 20)
/* Granularity of the client's own DMA_WRITE dirty tracking. */
#define VFM_VFIO_USER_DIRTY_PAGE 4096u

/*
 * Server DMA_WRITE hook: [iova, iova + len) was written through a DMA_WRITE
 * message. Called after the bytes are in memory, from whichever thread serves
 * the message (a requester or the vfm_vfio_user_poll() caller), with the
 * device's request lock held: it must not call back into this device.
 */
typedef void (*vfm_vfio_user_dirty_fn)(uint64_t iova, uint64_t len, void *opaque);

/*
 * Options; NULL means all defaults. Zero fields take their defaults too.
 * Set version to VFM_VFIO_USER_OPTS_V1; later versions only append fields.
 */
struct vfm_vfio_user_opts {
	uint32_t version;
	const char *id;               /* device id in logs; default "vfio-user" */
	uint32_t timeout_ms;          /* per request; default 5000 */
	uint32_t max_data_xfer_size;  /* largest count we accept; default 1 MiB,
					 4 KiB .. 16 MiB */
	vfm_vfio_user_dirty_fn dma_dirty;
	void *dma_dirty_opaque;
};

/*
 * Connects to the server at socket_path, negotiates VERSION, reads the
 * device and region info (mapping mmap-able areas) and probes DMA logging.
 * On success *out is a device with the "vfio-user" backend; free it with
 * vfm_device_free(), which closes the connection.
 */
VFM_EXPORT int vfm_vfio_user_open(const char *socket_path, const struct vfm_vfio_user_opts *opts,
				  struct vfm_device **out, struct vfm_error *err);

/*
 * The same over an already connected stream socket, which the device owns
 * from then on (closed on failure too). name stands in for the path in
 * messages; may be NULL.
 */
VFM_EXPORT int vfm_vfio_user_open_fd(int fd, const char *name,
				     const struct vfm_vfio_user_opts *opts,
				     struct vfm_device **out, struct vfm_error *err);

/*
 * vfiomig_mig_shm (docs/vfio-user-client.md, "Extensions"): reads up to len
 * bytes of migration data like vfm_device_read_data(), with one request at
 * most. When the server took our migration data window, *data points at the
 * bytes in it (valid until the next data request on dev) and buf is not
 * used; otherwise they are read into buf and *data = buf.
 */
VFM_EXPORT ssize_t vfm_vfio_user_read_data_view(struct vfm_device *dev, void *buf, size_t len,
						const void **data, struct vfm_error *err);
/* Migration data bytes moved through that window so far (0: standard
 * messages only, or not a vfio-user device). Any thread. */
VFM_EXPORT uint64_t vfm_vfio_user_mig_shm_bytes(struct vfm_device *dev);

/* Whether dev was made by vfm_vfio_user_open*(). */
VFM_EXPORT bool vfm_device_is_vfio_user(const struct vfm_device *dev);

/* The socket to watch for POLLIN; -EINVAL for other backends. */
VFM_EXPORT int vfm_vfio_user_poll_fd(struct vfm_device *dev);

/*
 * Serves the server messages that have arrived (DMA_READ/DMA_WRITE), without
 * waiting for new ones; a message already arriving is completed within the
 * timeout. Returns the number served, 0 when none or when a request is in
 * flight in another thread (that thread serves them; POLLIN may show until it
 * does), or a negative error when the connection broke.
 */
VFM_EXPORT int vfm_vfio_user_poll(struct vfm_device *dev, struct vfm_error *err);

/*
 * The client's own dirty log of guest memory the server wrote with
 * DMA_WRITE messages (writes through an mmap()ed fd are not seen here: use
 * DMA logging for those). Pages of [iova, iova + length) at page_size (a
 * power of two >= 4096) are OR-ed into bitmap (u64 words, bit i = page
 * iova + i * page_size) and cleared; unmapped pages read as clean.
 * Returns the number of VFM_VFIO_USER_DIRTY_PAGE pages collected. Safe from
 * any thread.
 */
VFM_EXPORT int64_t vfm_vfio_user_dirty_collect(struct vfm_device *dev, uint64_t iova,
					       uint64_t length, uint64_t page_size,
					       uint64_t *bitmap, struct vfm_error *err);

/* ---- Interrupts (the VFIO_IRQ_* values) ---- */

#define VFM_IRQ_INFO_EVENTFD    (1u << 0)
#define VFM_IRQ_INFO_MASKABLE   (1u << 1)
#define VFM_IRQ_INFO_AUTOMASKED (1u << 2)
#define VFM_IRQ_INFO_NORESIZE   (1u << 3)

struct vfm_irq_info {
	uint32_t index;
	uint32_t flags;   /* VFM_IRQ_INFO_* */
	uint32_t count;
};

VFM_EXPORT int vfm_vfio_user_irq_info(struct vfm_device *dev, uint32_t index,
				      struct vfm_irq_info *info, struct vfm_error *err);

#define VFM_IRQ_SET_DATA_NONE      (1u << 0)
#define VFM_IRQ_SET_DATA_BOOL      (1u << 1)
#define VFM_IRQ_SET_DATA_EVENTFD   (1u << 2)
#define VFM_IRQ_SET_ACTION_MASK    (1u << 3)
#define VFM_IRQ_SET_ACTION_UNMASK  (1u << 4)
#define VFM_IRQ_SET_ACTION_TRIGGER (1u << 5)

/*
 * DEVICE_SET_IRQS: flags is one DATA and one ACTION flag. data is
 *   DATA_NONE:    ignored (count = start = 0 disables every IRQ of index);
 *   DATA_BOOL:    count bytes (uint8_t, 0 or 1);
 *   DATA_EVENTFD: count eventfds (int), or NULL to de-assign the range.
 * Eventfds are sent in as many messages as the server's max_msg_fds needs.
 */
VFM_EXPORT int vfm_vfio_user_set_irqs(struct vfm_device *dev, uint32_t index, uint32_t flags,
				      uint32_t start, uint32_t count, const void *data,
				      struct vfm_error *err);

#ifdef __cplusplus
}
#endif
#endif
