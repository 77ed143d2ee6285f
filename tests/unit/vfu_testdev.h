/*
 * A device for testing the vfio-user server library: BAR0 is memory plus a
 * few control registers that make the device DMA or raise interrupts, BAR1
 * is a memfd with sparse mmap areas and no callbacks, BAR2 is read-only.
 * Migration (flags chosen per test) records every arc it is asked for and
 * serves a fixed stream; faults can be injected on one arc. The server runs
 * in its own thread, as a device process would.
 */
#ifndef VFM_TESTS_VFU_TESTDEV_H
#define VFM_TESTS_VFU_TESTDEV_H

#include <pthread.h>

#include "vfiomig/vfu_server.h"
#include "vfu_rawclient.h"

/* BAR0 */
#define TD_BAR0_SIZE 4096u
#define TD_DMA_IOVA  0x100   /* u64 */
#define TD_DMA_LEN   0x108   /* u64 */
#define TD_DMA_BYTE  0x110   /* u64: the byte the device writes */
#define TD_DMA_GO    0x118   /* write 1: write LEN bytes of BYTE at IOVA; 2: read LEN bytes at IOVA into TD_READBUF */
#define TD_DMA_RES   0x120   /* s64 result of the last GO */
#define TD_IRQ_GO    0x128   /* write index << 16 | subindex: trigger it */
#define TD_IRQ_RES   0x130   /* s64 result of the last IRQ_GO */
#define TD_READBUF   0x800   /* up to 0x800 bytes */
/* BAR1: memfd, mappable in two sparse areas */
#define TD_BAR1_SIZE 16384u
/* BAR2: read-only, byte i reads as i & 0xff */
#define TD_BAR2_SIZE 8192u

/* The stream: PRE_COPY yields its first TD_PRECOPY bytes, STOP_COPY the rest. */
#define TD_STREAM  10000u
#define TD_PRECOPY 3000u
#define TD_SINK_MAX (1u << 20)

struct td_arc {
	enum vfm_state from, to;
};

struct tdev {
	pthread_mutex_t lock;         /* guards everything below */
	uint8_t bar0[TD_BAR0_SIZE];
	uint64_t flags;               /* migration flags */
	struct vfm_vfu_migration_ops mig;
	struct td_arc arcs[256];
	unsigned narcs;
	unsigned not_direct;          /* arcs the device should never see */
	/* Fault injection: the arc fail_from -> fail_to returns fail_err. */
	enum vfm_state fail_from, fail_to;
	int fail_err;
	bool fail_to_error;           /* ... and reports ERROR */
	size_t pos;                   /* stream read position */
	uint8_t *sink;                /* RESUMING data */
	size_t sink_len;
	unsigned attaches, detaches, resets, maps, unmaps;
	int memfd;
};

struct srv {
	struct vfm_vfu_ctx *ctx;
	struct tdev td;
	pthread_t thread;
	int stop;                     /* atomic */
	int gone;                     /* atomic: clients that left */
	char *dir, *path;             /* real-socket servers */
};

/* Direct arcs as the kernel's uAPI lists them (independent of lib/fsm.c). */
bool td_arc_direct(uint64_t flags, enum vfm_state from, enum vfm_state to);

/* Starts a server (mig_flags 0: no migration) on a socketpair; c is the client end. */
void srv_start_pair(struct srv *s, uint64_t mig_flags, const struct vfm_vfu_opts *o,
		    struct rc *c);
/* Starts a server on a socket in a fresh temp dir (s->path). */
void srv_start_path(struct srv *s, uint64_t mig_flags, const struct vfm_vfu_opts *o);
void srv_stop(struct srv *s);
/* Waits until n clients in total have left (bounded); false on timeout. */
bool srv_wait_gone(struct srv *s, int n, int timeout_ms);

/* Arcs seen since the last call (copied out under the lock). */
unsigned td_take_arcs(struct tdev *td, struct td_arc *out, unsigned max);
void td_fail_arc(struct tdev *td, enum vfm_state from, enum vfm_state to, int err,
		 bool to_error);

#endif
