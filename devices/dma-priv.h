/* Internals of the dma sample device shared by dma.c and dma-mig.c. */
#ifndef VFM_DEVICES_DMA_PRIV_H
#define VFM_DEVICES_DMA_PRIV_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/types.h>

#include "dma.h"
#include "vfiomig/vfu_server.h"

#define DMADEV_PAGE_REC   (sizeof(struct dmadev_rec) + DMADEV_PAGE)
#define DMADEV_HEADER_REC (sizeof(struct dmadev_rec) + sizeof(struct dmadev_rec_header))
#define DMADEV_REGS_REC   (sizeof(struct dmadev_rec) + sizeof(struct dmadev_regs))
#define DMADEV_END_REC    (sizeof(struct dmadev_rec) + sizeof(struct dmadev_rec_end))
#define DMADEV_WIN_REC    (sizeof(struct dmadev_rec) + DMADEV_WIN_SIZE)
_Static_assert(DMADEV_WIN_SIZE <= DMADEV_PAGE, "a WINDOW record fits the record buffer");

enum dmadev_rec_kind { KIND_NONE, KIND_INITIAL, KIND_DIRTY, KIND_FINAL };

/* A save session (PRE_COPY*, STOP_COPY). */
struct dmadev_save {
	bool active;
	bool stop;                    /* STOP_COPY: finish with REGS and END */
	bool header_done, win_done, regs_done, end_done;
	uint64_t cursor;              /* next page of the initial pass */
	uint64_t *dirty;              /* pages sent, then changed */
	uint64_t ndirty;
	uint64_t scan;                /* next dirty page to look at */
	uint32_t seq;
	uint8_t rec[sizeof(struct dmadev_rec) + DMADEV_PAGE]; /* record being read out */
	uint8_t *direct;              /* non-NULL: build the next record here, whole */
	/* BAR2 as the WINDOW record sent it: END's checksum covers this copy,
	 * whatever a client that maps the window wrote since. */
	uint8_t win[DMADEV_WIN_SIZE];
	size_t rec_len, rec_off;
	enum dmadev_rec_kind rec_kind;
	uint64_t latency_acc;         /* bytes * us not yet slept, in 1/MiB units */
	uint64_t trickle_ms;          /* trickle fault: each STOP_COPY read sleeps, gives 1 byte */
	bool trickle_gave;            /* the byte of this request is out: end the request */
};

/* A load session (RESUMING): pages in place, registers committed only when valid. */
struct dmadev_load {
	bool active;
	uint8_t *stage;               /* where pages load: the device memory */
	struct dmadev_regs regs;
	uint8_t win[DMADEV_WIN_SIZE]; /* BAR2, applied with the registers */
	struct dmadev_rec hdr;
	size_t hdr_got;
	uint8_t *dst;                 /* where the current payload goes */
	size_t need, got;
	uint8_t small[128];           /* payloads other than pages */
	uint32_t seq;
	bool have_header, have_win, have_regs, have_end;
	int error;                    /* sticky: the stream is bad */
	char why[192];
	uint64_t bytes;
};

struct vfm_dmadev {
	/* Never change after creation. */
	char id[64];
	struct vfm_vfu_ctx *ctx;
	uint64_t mem_size, npages;
	/* XXH3-64 of each page of mem, kept current by every writer (a page's
	 * change costs one page of hashing), so the state checksum never hashes
	 * mem itself. */
	uint64_t *page_hash;
	/* The sum (mod 2^64) over pages of dmadev_page_mix(p, page_hash[p]),
	 * kept with page_hash: the state checksum's memory part at O(1), not a
	 * hash of npages x 8 bytes inside the downtime on both sides (8 MiB for
	 * a 4 GiB device). Same discipline as page_hash. */
	uint64_t mem_digest;
	uint64_t churn_rate;
	_Atomic unsigned churn_throttle;   /* percent of churn_rate withheld (migration) */
	uint64_t save_latency_us;
	uint64_t instance;
	struct vfm_vfu_migration_ops mig_ops;  /* the flags this instance offers */

	/*
	 * lock guards mem contents, regs, churn_count, running, dma_ok, ring_busy and
	 * save (the churn thread marks pages dirty in it). load belongs to
	 * the loop thread alone.
	 */
	pthread_mutex_t lock;
	pthread_cond_t cond;          /* wakes the churn thread */
	uint8_t *mem;
	uint8_t *win;                 /* BAR2: our MAP_SHARED view of win_fd (clients map
				       * it too: they change it without the lock) */
	int win_fd;
	struct dmadev_regs regs;
	uint64_t churn_count;
	bool running;                 /* internal activity (churn) allowed */
	bool dma_ok;                  /* may initiate DMA: RUNNING, PRE_COPY */
	bool ring_busy;               /* a doorbell's descriptors are running: no churn */
	bool stopping;
	uint64_t rng;
	struct dmadev_save save;
	struct dmadev_load load;

	pthread_t churn_thread;
	bool churn_started;

	/* Injected faults; fault_seen counts matching events (loop thread only). */
	struct vfm_dmadev_fault faults[DMADEV_FAULTS_MAX];
	uint64_t fault_seen[DMADEV_FAULTS_MAX];
	unsigned nfaults;
};

/* dma.c: true when an injected fault of kind (and arc from -> to) hits now;
 * *ms gets a STALL's delay. Logs the hit. */
bool dmadev_fault(struct vfm_dmadev *dev, enum vfm_dmadev_fault_kind kind, unsigned from,
		  unsigned to, uint64_t *ms);

/* dma-mig.c. Functions named _locked want dev->lock held. */
/* The state checksum from the per-page hashes, the window and the registers. */
uint64_t dmadev_state_hash(const struct vfm_dmadev *dev, const uint8_t *win,
			   const struct dmadev_regs *regs);
/* Device memory [off, off + len) was written: rehash its pages, mark them
 * dirty for a saving session. Every write to dev->mem goes through here. */
void dmadev_mem_written_locked(struct vfm_dmadev *dev, uint64_t off, uint64_t len);
/* Page p of device memory changed: its hash (and the digest) only. */
void dmadev_page_rehash(struct vfm_dmadev *dev, uint64_t p);
/* Page p's hash is now h (a loaded page): page_hash and the digest. */
void dmadev_page_hash_set(struct vfm_dmadev *dev, uint64_t p, uint64_t h);
/* Every page's hash and the digest, from scratch (creation). */
void dmadev_hash_all(struct vfm_dmadev *dev);
int dmadev_save_open_locked(struct vfm_dmadev *dev);
void dmadev_save_close_locked(struct vfm_dmadev *dev);
int dmadev_load_open(struct vfm_dmadev *dev);
int dmadev_load_commit(struct vfm_dmadev *dev);
void dmadev_load_close(struct vfm_dmadev *dev);
ssize_t dmadev_read_data(struct vfm_vfu_ctx *ctx, void *buf, size_t len);
ssize_t dmadev_write_data(struct vfm_vfu_ctx *ctx, const void *buf, size_t len);
int dmadev_precopy_info(struct vfm_vfu_ctx *ctx, uint64_t *initial, uint64_t *dirty);
int dmadev_stop_copy_size(struct vfm_vfu_ctx *ctx, uint64_t *bytes);
void *dmadev_mem_alloc(uint64_t size);
void dmadev_mem_free(void *p, uint64_t size);

#endif
