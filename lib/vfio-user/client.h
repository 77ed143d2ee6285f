/*
 * Internals of the vfio-user client backend, shared by its files:
 * client.c (open/close, VERSION, ops tables), client_io.c (requests and
 * serving server messages), client_region.c (regions, mmap, IRQs),
 * client_dma.c (DMA map table, DMA_READ/WRITE, dirty log), client_mig.c
 * (migration and DMA logging over DEVICE_FEATURE / MIG_DATA_*).
 */
#ifndef VFM_VFIO_USER_CLIENT_H
#define VFM_VFIO_USER_CLIENT_H

#include <pthread.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "vfiomig/device.h"
#include "vfiomig/vfio_user.h"
#include "vfio-user/proto.h"

/*
 * Server commands that arrive while we are still sending a message cannot be
 * answered until ours is complete (bytes must not interleave): they wait
 * here. A server sends at most a few (each DMA_READ/WRITE waits for its
 * reply), so a small bound is plenty; beyond it we stop reading until our
 * send completes.
 */
#define CLI_QUEUE_MAX 8
#define CLI_ABANDONED_MAX 8   /* more timed-out requests in flight: give up */
/* Hostile-peer bounds on what DEVICE_GET_INFO may announce. */
#define CLI_MAX_REGIONS 64u
#define CLI_MAX_IRQS 64u
/*
 * Data we put in one request (MIG_DATA_WRITE, REGION_WRITE), whatever
 * max_data_xfer_size allows: libvfio-user reads a request body with one
 * recv() without MSG_WAITALL (lib/tran_sock.c tran_sock_recv_body(), efd091b)
 * and takes a short read as a broken message, losing step with the stream.
 * A message arrives whole only if one sendmsg() puts it in one skb:
 * unix_stream_sendmsg() (net/unix/af_unix.c) cuts skbs at
 * SKB_MAX_HEAD(0) + UNIX_SKB_FRAGS_SZ (32 KiB of page frags), ~35 KiB, and
 * the receiver may wake between two. 32 KiB of data and the headers fit.
 * docs/interop.md. A server that states the vfiomig_whole_messages extension
 * in VERSION (ours) reads messages whole: it gets up to max_xfer per request.
 */
#define CLI_MAX_SEND_DATA (32u * 1024)
/* First REGION_INFO argsz: the info and room for a few sparse areas. */
#define CLI_REGION_INFO_ARGSZ 256u

/* Whether the server has a vfiomig DEVICE_FEATURE extension. */
enum cli_ext {
	CLI_EXT_UNPROBED = 0,
	CLI_EXT_PRESENT,
	CLI_EXT_ABSENT,
};

/* One mmap()ed part of a region (the whole region, or a sparse area). */
struct cli_area {
	uint64_t offset;   /* in the region */
	uint64_t size;
	void *ptr;
};

struct cli_region {
	struct vfm_region_info info;
	uint32_t wire_flags;     /* VFU_REGION_F_* as the server sent them */
	uint64_t mmap_offset;    /* info.offset: base for mmap() of areas */
	struct cli_area *areas;  /* mapped areas only */
	unsigned nareas;
};

/* One DMA_MAP window. */
struct cli_map {
	uint64_t iova;
	uint64_t size;
	uint32_t prot;        /* VFM_DMA_* */
	bool fd_backed;       /* the server got an fd and may write without telling */
	void *vaddr;          /* for DMA_READ/WRITE messages */
	bool own_mmap;        /* vaddr is our mmap() of the fd: munmap it */
	uint64_t *dirty;      /* atomic, one bit per VFM_VFIO_USER_DIRTY_PAGE */
	uint64_t npages;
};

struct vfu_client {
	/* Set at open, never change after. */
	char id[64];
	char name[128];           /* the socket path, for messages */
	int fd;
	int timeout_ms;
	uint32_t local_max_xfer;  /* what we advertised */
	size_t max_msg_size;      /* largest message we receive */
	struct vfu_negotiated neg;
	vfm_vfio_user_dirty_fn dma_dirty;
	void *dma_dirty_opaque;
	struct vfm_device_info info;
	struct cli_region *regions;   /* info.num_regions entries */
	bool has_logging;

	/*
	 * lock: one request in flight. Whoever holds it owns the socket (both
	 * directions) and serves server commands. Guards every field below
	 * except the map table's layout, which also needs map_lock.
	 */
	pthread_mutex_t lock;
	uint16_t next_id;
	int dead;                 /* 0, or the error that took the connection down */
	/* Requests whose reply did not come in time: the stream is still in
	 * step (nothing of the reply had arrived), so a late reply is dropped
	 * when it comes instead of taking the connection down. */
	uint16_t abandoned[CLI_ABANDONED_MAX];
	unsigned n_abandoned;
	char dead_msg[VFM_ERROR_MSG_MAX];
	struct vfu_msg queue[CLI_QUEUE_MAX];  /* server commands not yet served */
	unsigned q_head, q_len;
	uint64_t mig_flags;
	bool mig_flags_known;
	enum vfm_state state;     /* last state the server confirmed */
	bool state_known;
	bool data_drained;        /* a short MIG_DATA_READ: nothing more for now */
	/* vfiomig DEVICE_FEATURE extensions (PRECOPY_INFO, MIG_DATA_SIZE): one
	 * PROBE decides (client_mig.c ext_get()), and an absent one is never
	 * asked for again (a plain vfio-user server, libvfio-user). */
	enum cli_ext ext_precopy_info, ext_data_size;
	/* vfiomig_mig_shm (client_mig_shm.c): the migration data window, set
	 * up at the first data request; NULL: standard messages. */
	uint8_t *shm;
	size_t shm_size;
	bool shm_tried;
	uint64_t shm_bytes;       /* moved through it; atomic, any thread reads */
	/* vfm_vfio_user_read_data_view() (the one reading thread): one request,
	 * and the bytes left in the window at view_got instead of copied. */
	bool view_want;
	const uint8_t *view_got;

	/*
	 * map_lock guards maps/nmaps against vfm_vfio_user_dirty_collect()
	 * from other threads. Map and unmap change them holding both locks
	 * (lock first), so DMA serving (lock only) sees a stable table.
	 * Dirty bits themselves are atomic.
	 */
	pthread_mutex_t map_lock;
	struct cli_map *maps;     /* sorted by iova, non-overlapping */
	size_t nmaps, maps_cap;
};

static inline struct vfu_client *cli_of(struct vfm_device *dev)
{
	return vfm_device_priv(dev);
}

/* Most data one request we originate may carry (see CLI_MAX_SEND_DATA). */
static inline uint32_t cli_send_max(const struct vfu_client *c)
{
	if (c->neg.whole_messages || c->neg.max_xfer < CLI_MAX_SEND_DATA)
		return c->neg.max_xfer;
	return CLI_MAX_SEND_DATA;
}

/* ---- client_io.c ---- */

/*
 * Takes the request lock; fails with -ENOTCONN (and the reason) when the
 * connection is down. Every vfu_cli_request() happens between the two.
 */
int vfu_cli_lock(struct vfu_client *c, struct vfm_error *err);
void vfu_cli_unlock(struct vfu_client *c);

/*
 * Sends command cmd with payload iov[0..iovcnt) (and fds) and waits for its
 * reply, serving server commands meanwhile. 0 with *reply (release it), -errno
 * from an error reply (connection intact), or an error that took the
 * connection down. Lock held.
 */
int vfu_cli_request(struct vfu_client *c, uint16_t cmd, const struct iovec *iov, int iovcnt,
		    const int *fds, size_t nfds, struct vfu_msg *reply, struct vfm_error *err);

/* vfu_cli_request() with one flat payload and no fds. */
int vfu_cli_simple(struct vfu_client *c, uint16_t cmd, const void *payload, size_t len,
		   struct vfu_msg *reply, struct vfm_error *err);

/* Sends a whole message (a reply), reading server commands meanwhile. Lock held. */
int vfu_cli_send(struct vfu_client *c, const struct vfu_hdr *hdr, const struct iovec *iov,
		 int iovcnt, const int *fds, size_t nfds, struct vfm_error *err);

/* Takes the connection down with code and message; returns code. Lock held. */
int vfu_cli_fail(struct vfu_client *c, int code, struct vfm_error *err, const char *fmt, ...)
	VFM_PRINTF(4, 5);

/* Serves whatever has arrived (see vfm_vfio_user_poll). Lock held. */
int vfu_cli_poll_locked(struct vfu_client *c, struct vfm_error *err);

/* Frees queued messages. */
void vfu_cli_io_cleanup(struct vfu_client *c);

/* ---- client_mig_shm.c ---- */

bool vfu_cli_shm_ready(struct vfu_client *c);
int vfu_cli_shm_read_reply(struct vfu_client *c, const struct vfu_msg *reply, uint32_t chunk,
			   const uint8_t **data, uint32_t *size, struct vfm_error *err);
int vfu_cli_shm_write(struct vfu_client *c, const void *buf, uint32_t len, struct vfm_error *err);
void vfu_cli_shm_cleanup(struct vfu_client *c);

/* ---- client_dma.c ---- */

/* Serves one server command (DMA_READ/WRITE; others get ENOSYS). Lock held. */
int vfu_cli_serve(struct vfu_client *c, struct vfu_msg *m, struct vfm_error *err);
int vfu_cli_dma_map(struct vfm_device *dev, const struct vfm_dma_map *map,
		    struct vfm_error *err);
int vfu_cli_dma_unmap(struct vfm_device *dev, uint64_t iova, uint64_t size,
		      uint64_t page_size, uint64_t *dirty_bitmap, struct vfm_error *err);
void vfu_cli_dma_cleanup(struct vfu_client *c);

/* ---- client_region.c ---- */

int vfu_cli_load_regions(struct vfu_client *c, struct vfm_error *err);
void vfu_cli_region_cleanup(struct vfu_client *c);
int vfu_cli_get_info(struct vfm_device *dev, struct vfm_device_info *info,
		     struct vfm_error *err);
int vfu_cli_region_info(struct vfm_device *dev, uint32_t index,
			struct vfm_region_info *info, struct vfm_error *err);
int vfu_cli_region_areas(struct vfm_device *dev, uint32_t index, struct vfm_region_area *areas,
			 unsigned max, unsigned *count, struct vfm_error *err);
ssize_t vfu_cli_region_read(struct vfm_device *dev, uint32_t index, uint64_t offset,
			    void *buf, size_t len, struct vfm_error *err);
ssize_t vfu_cli_region_write(struct vfm_device *dev, uint32_t index, uint64_t offset,
			     const void *buf, size_t len, struct vfm_error *err);

/* ---- client_mig.c ---- */

extern const struct vfm_migration_ops vfu_cli_mig_ops;
extern const struct vfm_dma_logging_ops vfu_cli_log_ops;
/* Whether the server supports DMA logging (DEVICE_FEATURE PROBE). Lock held. */
bool vfu_cli_probe_logging(struct vfu_client *c);
int vfu_cli_reset(struct vfm_device *dev, struct vfm_error *err);

#endif
