/*
 * Engine tests with real `dma` device servers: each device is a separate
 * process running the server library with devices/dma.c on a UNIX socket;
 * guest memory is memfd, DMA_MAPped to the devices; a guest (a writer thread
 * plus a driver thread running each device's descriptor ring) runs on the
 * source. Shared by test_migration_dma.c and test_migration_fail.c.
 */
#ifndef VFM_TESTS_MIGDMA_H
#define VFM_TESTS_MIGDMA_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "migration/engine.h"
#include "vfiomig/migration.h"

#define MD_PG        4096ull
#define MD_MEM       (8ull << 20)
#define MD_DEV_STATE (1ull << 20)
#define MD_MAXDEV    4
#define MD_RING_N    16u
/* Layout of guest memory: device i's ring in page i, the device's DMA
 * target buffers in [1M, 2M) (half each), the writer dirties [2M, 8M). */
#define MD_BUF_GPA   (1ull << 20)
#define MD_BUF_SIZE  (1ull << 20)
#define MD_WRITER_GPA (2ull << 20)

struct md_devsrv {
	pid_t pid;
	char path[160];
};

struct md_opts {
	unsigned ndev;
	const char *props;        /* device properties ("k=v,k=v") or NULL */
	bool by_messages;         /* DMA_MAP without fd: DMA_READ/WRITE messages */
	uint64_t mig_flags;       /* 0: the device's default (STOP_COPY|P2P|PRE_COPY) */
	uint64_t churn;           /* source device churn, bytes/s */
	uint64_t state_size;      /* device state bytes, 0: MD_DEV_STATE */
	bool quiet;               /* the guest dirties little: no writer thread */
	unsigned mf_channels;     /* multifd-channels + 1 (0: the default) */
	int mf_delay_chan;        /* destination: delay device packets of this channel + 1 (0: none) */
	int mf_ram_delay_chan;    /* destination: hold the first RAM packet of this channel + 1 */
	uint64_t save_latency_us; /* devices: firmware latency per MiB saved */
	unsigned timeout_ms;      /* both sides' migration timeout (0: 5000) */
	uint64_t max_queued;      /* destination: max-queued-buffers-size (0: the default) */
	uint64_t downtime_limit_ms; /* source: downtime-limit (0: the default) */
	unsigned dest_alarm_s;    /* the destination process's life bound (0: 60 s) */
	bool no_mig_shm;          /* device servers without the vfiomig_mig_shm window */
};

struct md_side;

struct md_guest {
	struct md_side *side;
	pthread_t writer, driver;
	atomic_bool run;
	bool started;             /* vm ops only (migration thread or test thread) */
	atomic_uint_fast64_t writes, completed, errors, starts;
	unsigned seed;
	bool workload;            /* false: start/stop only count (destination) */
	bool quiet;               /* md_opts.quiet */
	uint64_t tail[MD_MAXDEV];
	/* kick_ns (vm ops) takes this long while the guest runs: a guest whose
	 * vCPUs are slow to come out (0: at once). */
	uint64_t kick_delay_ns;
};

struct md_side {
	struct vfm_guest_mem *mem;
	struct vfm_device *dev[MD_MAXDEV];
	unsigned ndev;
	struct vfm_migration *m;
	struct md_guest g;
};

struct md_result {
	int32_t status;
	uint32_t guest_starts;
	uint64_t mem_hash;
	uint64_t dev_sum[MD_MAXDEV];
	uint64_t mf_out_of_order;   /* multifd buffers that came before their turn */
	uint64_t mf_queue_waits;    /* times a multifd reader waited for queue room */
	uint64_t mf_ram_bytes;      /* RAM bytes that came over the multifd channels */
	int32_t dev_state[MD_MAXDEV];
	uint64_t dev_shm[MD_MAXDEV];  /* bytes through the migration data window */
	char error[VFM_ERROR_MSG_MAX];
};

extern const struct vfm_vm_ops md_vm_ops;

/* Temp dir for sockets and files (created once per test process). */
const char *md_dir(void);
/* Removes md_dir() once a case passed (harness.h calls it). */
void vfm_test_passed(void);
/* Forks a device server process (before any thread); waits for its socket. */
void md_devsrv_spawn(struct md_devsrv *d, const char *name, const struct md_opts *o,
		     uint64_t churn, uint64_t seed);
void md_devsrv_kill(struct md_devsrv *d);

/* Guest memory, devices opened and mapped, migration object, devices added.
 * workload: this side runs the guest threads when started. */
void md_side_init(struct md_side *s, const struct md_devsrv *srv, const struct md_opts *o,
		  bool workload, unsigned seed);
void md_side_free(struct md_side *s);

uint64_t md_mem_hash(struct vfm_guest_mem *mem);
uint64_t md_reg(struct vfm_device *dev, uint64_t off);
/* Real state over the wire. */
enum vfm_state md_dev_state(struct vfm_device *dev);
/* One COPY_FROM_DEV descriptor run now on device i (guest stopped); true if OK. */
bool md_dma_works(struct md_side *s, unsigned i);
/* One COPY_FROM_DEV descriptor of len bytes of device i's memory to gpa (guest
 * stopped or not started); true if OK. */
bool md_dma_fill(struct md_side *s, unsigned i, uint64_t gpa, uint64_t len);

/*
 * Forks a destination process: its own device servers, guest memory and
 * migration object; listens on uri_kind ("unix", "tcp", "file") and loads.
 * *uri receives the URI to migrate to (for tcp the chosen port). For file,
 * call md_dest_start after the source wrote the file. Result via md_dest_wait.
 */
struct md_dest {
	pid_t pid;
	int result_fd;
	char uri[256];
};
void md_make_uri(const char *kind, char *uri, size_t len);
void md_dest_start(struct md_dest *d, const char *uri, const struct md_opts *o);
/* Waits (bounded) for the destination; returns its exit status (0 ok). */
int md_dest_wait(struct md_dest *d, struct md_result *r);

/* Source flow: params defaults with a short timeout. */
void md_params(struct vfm_migration_params *p);
/* md_params plus what o asks (multifd channels). */
void md_params_for(struct vfm_migration_params *p, const struct md_opts *o);
/* Waits for the source migration to end; returns the final stats. */
void md_wait(struct md_side *s, struct vfm_migration_stats *st);

#endif
