/*
 * Internals of the vfio-user server library, shared by server*.c: the
 * context, the reply being built, and each file's handlers.
 */
#ifndef VFM_VFIO_USER_SERVER_H
#define VFM_VFIO_USER_SERVER_H

#include <pthread.h>

#include "vfiomig/vfu_server.h"
#include "vfio-user/proto.h"

#define VFU_SRV_DEFAULT_MAX_FDS     8u
#define VFU_SRV_DEFAULT_TIMEOUT_MS  5000
#define VFU_SRV_MAX_IRQS            2048u
/*
 * Commands a client may pipeline while we wait for its reply to one of our
 * DMA_READ/DMA_WRITE messages. QEMU sends one request at a time per vCPU, so
 * a handful is plenty; more means a client that does not read our messages.
 */
#define VFU_SRV_QUEUE_MAX           16u
/* DMA_LOGGING_START ranges: the kernel's limit (one 4 KiB page of them). */
#define VFU_SRV_LOG_MAX_RANGES      256u
#define VFU_SRV_PCI_CFG_SIZE        256u

struct vfu_srv_region {
	bool declared;
	uint64_t size;
	uint32_t flags;                   /* VFM_VFU_REGION_* */
	const struct vfm_vfu_region_ops *ops;
	int fd;                           /* ours (dup'ed), -1 */
	uint64_t fd_offset;
	struct vfm_vfu_mmap_area areas[VFM_VFU_MAX_MMAP_AREAS];
	uint32_t nr_areas;
};

struct vfu_srv_irq {
	uint32_t count;
	int *efd;                         /* count entries, -1 = none */
	uint8_t *masked;
	uint8_t *pending;                 /* triggered while masked */
};

/* One DMA_MAP window. */
struct vfu_srv_dma {
	uint64_t iova, size;
	uint32_t prot;                    /* VFU_DMA_F_* */
	int fd;                           /* -1: no fd, use messages */
	uint64_t fd_offset;
	uint8_t *vaddr;                   /* our mapping, NULL without fd */
	/* Dirty log while DMA logging is on (fd-backed windows only). */
	uint64_t *dirty;                  /* atomic bitmap, bit i = log_base + i * log pgsize */
	uint64_t log_base;                /* iova rounded down to the log page size */
	uint64_t log_bits;
};

/* The reply a handler builds: payload in ctx->rbuf, optional fds (not ours). */
struct vfu_srv_reply {
	uint8_t *buf;
	size_t cap;                       /* bytes available in buf */
	size_t len;
	int fds[VFU_MAX_FDS];
	size_t nfds;
};

struct vfm_vfu_ctx {
	/* Set at creation, never change. */
	char id[64];
	void *priv;
	uint32_t max_xfer;                /* what we accept */
	uint32_t max_dma_maps;
	uint32_t max_fds;
	int io_timeout_ms;
	char *sock_path;                  /* NULL: no listening socket */
	int listen_fd;
	int epfd;                         /* the poll fd */
	int wake_fd;                      /* eventfd: queued commands */

	/* Declarations: written before realize, read-only after. */
	bool realized;
	const struct vfm_vfu_device_ops *dev_ops;
	const struct vfm_vfu_migration_ops *mig_ops;
	struct vfu_srv_region regions[VFM_VFU_NUM_REGIONS];
	bool pci;                         /* library-kept config space */
	uint8_t cfg[VFU_SRV_PCI_CFG_SIZE];
	uint8_t cfg_wmask[VFU_SRV_PCI_CFG_SIZE];

	/* Loop thread only. */
	int conn_fd;                      /* -1: no client */
	bool attached;                    /* conn_fd valid (read by any thread) */
	bool negotiated;                  /* VERSION done */
	bool drop;                        /* disconnect after this message */
	struct vfu_negotiated neg;
	uint16_t next_msg_id;             /* our DMA_READ/WRITE commands */
	pthread_t loop_thread;
	bool loop_thread_set;
	struct vfu_msg queue[VFU_SRV_QUEUE_MAX];
	unsigned q_head, q_len;
	uint8_t *rbuf;                    /* reply payloads */
	size_t rbuf_size;

	/* Interrupts: irq_lock guards every irqs[].efd/masked/pending. */
	pthread_mutex_t irq_lock;
	struct vfu_srv_irq irqs[VFM_VFU_NUM_IRQS];

	/*
	 * DMA: dma_lock guards maps, nmaps, logging and log_pgsize. The loop
	 * thread changes them under the write lock; DMA helpers copy under the
	 * read lock, so an unmap waits for accesses in flight.
	 */
	pthread_rwlock_t dma_lock;
	struct vfu_srv_dma *maps;         /* sorted by iova, no overlaps */
	size_t nmaps, maps_cap;
	bool logging;
	uint64_t log_pgsize;
	uint64_t log_reports;              /* answered; atomic */

	/* Migration: the state the client sees; written by the loop thread. */
	int mig_state;                    /* enum vfm_state, atomic */
	bool mig_error;                   /* set by vfm_vfu_mig_set_error() */
	/* vfiomig_mig_shm: the client's data window (loop thread), NULL: none. */
	uint8_t *shm;
	uint64_t shm_size;
	uint64_t shm_bytes;               /* moved through it; atomic */
	bool no_mig_shm;                  /* opts: do not offer the extension */
	/*
	 * Read-ahead (server-mig-shm.c): after a full windowed MIG_DATA_READ
	 * reply of pf_size bytes at pf_base, the next block is read from the
	 * device into another part of the window while the client writes the
	 * last one out. Taken from the device, not yet given to the client:
	 * [pf_off, pf_off + pf_len), pf_initial of them pre-copy initial bytes;
	 * pf_err: the device failed the read-ahead (the next READ says so).
	 */
	bool pf_want;
	uint32_t pf_size;
	uint64_t pf_base;
	uint64_t pf_off;
	uint32_t pf_len;
	uint64_t pf_initial;
	int pf_err;
	uint64_t pf_reads;                /* read-aheads that took bytes; atomic */
};

/* server-mig-shm.c: the vfiomig_mig_shm window (proto.h struct vfu_mig_shm_data). */
void vfu_srv_mig_shm_release(struct vfm_vfu_ctx *ctx);
int vfu_srv_mig_shm_set(struct vfm_vfu_ctx *ctx, struct vfu_msg *m, const uint8_t *data,
			struct vfm_error *err);
int vfu_srv_mig_shm_write_range(struct vfm_vfu_ctx *ctx, const struct vfu_msg *m,
				const uint8_t **p, size_t *len, struct vfm_error *err);
/* A windowed MIG_DATA_READ of size bytes: the reply's bytes at *base, *n of them. */
int vfu_srv_mig_shm_read(struct vfm_vfu_ctx *ctx, uint32_t size, uint64_t *base, size_t *n,
			 struct vfm_error *err);
/* After the reply went out: the read-ahead it asked for, if any. */
void vfu_srv_mig_prefetch(struct vfm_vfu_ctx *ctx);
/* Drops read-ahead bytes (the data session ended, the window changed). */
void vfu_srv_mig_prefetch_drop(struct vfm_vfu_ctx *ctx);

typedef int (*vfu_srv_handler)(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			       struct vfu_srv_reply *r, struct vfm_error *err);

/* server-region.c */
int vfu_srv_get_region_info(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			    struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_get_region_io_fds(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			      struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_region_read(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_region_write(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			 struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_region_write_multi(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			       struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_get_irq_info(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			 struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_set_irqs(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
		     struct vfu_srv_reply *r, struct vfm_error *err);
void vfu_srv_irqs_release(struct vfm_vfu_ctx *ctx);  /* client left */
void vfu_srv_regions_free(struct vfm_vfu_ctx *ctx);
int vfu_srv_pci_realize(struct vfm_vfu_ctx *ctx, struct vfm_error *err);

/* server-dma.c */
int vfu_srv_dma_map(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
		    struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_dma_unmap(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
		      struct vfu_srv_reply *r, struct vfm_error *err);
void vfu_srv_dma_release(struct vfm_vfu_ctx *ctx);   /* client left: unmap all, stop logging */
int vfu_srv_log_start(struct vfm_vfu_ctx *ctx, const uint8_t *data, size_t len,
		      uint64_t *page_size, struct vfm_error *err);
void vfu_srv_log_stop(struct vfm_vfu_ctx *ctx);
/* Builds the bitmap of [iova, iova+length) into out (zeroed by the caller). */
int vfu_srv_log_report(struct vfm_vfu_ctx *ctx, uint64_t iova, uint64_t length,
		       uint64_t page_size, uint64_t *out, struct vfm_error *err);

/* server-mig.c */
int vfu_srv_device_feature(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			   struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_mig_data_read(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			  struct vfu_srv_reply *r, struct vfm_error *err);
int vfu_srv_mig_data_write(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			   struct vfu_srv_reply *r, struct vfm_error *err);
/* DEVICE_RESET and friends: migration state back to RUNNING. */
void vfu_srv_mig_reset(struct vfm_vfu_ctx *ctx);

/* server.c: a command from us to the client, waiting for its reply. */
int vfu_srv_call(struct vfm_vfu_ctx *ctx, uint16_t cmd, const void *payload, size_t len,
		 struct vfu_msg *reply, struct vfm_error *err);

static inline enum vfm_state vfu_srv_state(const struct vfm_vfu_ctx *ctx)
{
	return (enum vfm_state)__atomic_load_n(&ctx->mig_state, __ATOMIC_ACQUIRE);
}

static inline void vfu_srv_set_state(struct vfm_vfu_ctx *ctx, enum vfm_state s)
{
	__atomic_store_n(&ctx->mig_state, (int)s, __ATOMIC_RELEASE);
}

#endif
