/* Internals shared by the migration engine's files. */
#ifndef VFM_MIGRATION_ENGINE_H
#define VFM_MIGRATION_ENGINE_H

#include <pthread.h>
#include <stdatomic.h>

#include "migration/stream.h"
#include "vfiomig/migration.h"

#define VFM_MAX_SAVABLES 32
#define VFM_MAX_DEVICES 16
/* Section ids: RAM is 1, devices from 16, the VM's own from 64 (stable per
 * registration order, which both sides share by construction). */

struct vfm_savable {
	/* Never change after registration. */
	char name[VFM_SAVABLE_NAME_MAX];
	uint32_t section;
	uint32_t version;
	const struct vfm_savable_ops *ops;
	void *opaque;
	/* Migration thread only. */
	bool ack_needed;       /* switchover-ack expected from the destination */
	atomic_bool acked;     /* set by the return-path reader */
	bool loaded_setup;     /* destination: load_setup done */
	/* Source, migration thread only: the iteration (source.c). */
	bool pass_done;        /* its pass of this iteration is out */
	uint64_t sent_iter;    /* bytes its turns put out since the last exact check */
	uint64_t exact_prev;   /* its pending at the last exact check */
	double pace, pace_prev; /* best bytes/s of a turn (>= 1 MiB) since the last
				 * exact check, and in the span before it */
	uint64_t run_bytes, run_ns; /* turns since the last sustained sample */
	double sustained;       /* bytes/s over the last >= 32 MiB of its turns */
	uint64_t exact_min_ns;  /* its quickest exact query (RAM: the sync of its
				 * send set, which its stop-copy does again) */
	/* Reported (query-migrate), guarded by the migration's lock. */
	uint64_t rpt_pending;  /* pending at the last exact check */
	double rpt_dirty_rate; /* bytes/s it produced anew between the last two checks */
};

/* One VFIO device in the migration (the "vfio" savable's opaque). */
struct vfm_mig_device {
	struct vfm_migration *m;
	struct vfm_device *dev;
	struct vfm_device_props props;
	uint64_t flags;              /* migration flags, probed */
	/* Migration thread only. */
	bool use_precopy;            /* device went to PRE_COPY */
	bool dma_logging;            /* DMA logging started (and a report worked) */
	bool iommu_dirty;            /* kernel VFIO: IOMMU dirty tracking started instead */
	bool init_data_sent;         /* INIT_DATA_SENT written */
	bool precopy_info_ok;        /* backend reports precopy sizes */
	uint64_t precopy_init, precopy_dirty;  /* from precopy info, decremented as read */
	bool info_asked;             /* PRECOPY_INFO asked in this iteration */
	uint64_t precopy_info_calls; /* PRECOPY_INFO queries this migration (tests) */
	uint64_t pass_left;          /* bytes of this iteration's pass still to read */
	bool pass_one_turn;          /* no figure for the pass: one turn is the pass */
	uint64_t arc_ns;             /* one state change (or query) timed at setup */
	/* The destination's device round trips its PONGs said (the last
	 * VFM__DST_RT of them; none from an older destination). */
#define VFM__DST_RT 8
	uint32_t dst_rt_ns[VFM__DST_RT];
	unsigned ndst_rt;
	/* The second query of each (a destination that times two): what each
	 * next request of its load end costs. */
	uint32_t dst_rt2_ns[VFM__DST_RT];
	unsigned ndst_rt2;
	bool has_config;             /* a PCI config region: 2 writes at the destination's load */
	uint64_t short_read_fixed_ns;  /* the least time beyond its bytes of a pre-copy
				      * read that did not fill a block (stop-copy ends
				      * with two such; vfio_save_iterate) */
	double full_read_ns_per_byte; /* the quickest full-block pre-copy read's */
	bool stop_copy_exact;        /* an exact check read stop_copy_size: the estimate uses it */
	uint64_t read_since_exact;   /* pre-copy bytes read since that check */
	uint64_t last_iter_bytes;    /* read in the last iteration (no precopy info) */
	uint64_t stop_copy_size;
	bool stop_copy_known;        /* stop_copy_size holds a figure (device, property, 100 GiB) */
	bool sc_warned;              /* the size policy was logged for this migration */
	/* What query-migrate shows (vfm_migration_device_stop_copy_size): the
	 * figure in use and its source (enum vfm__sc_source). */
	_Atomic uint64_t sc_bytes;
	_Atomic int sc_source;
	uint64_t data_buf_size;
	unsigned char *buf;
	/* PCI config space read before the STOP_COPY arc (vfm__vfio_snapshot_config):
	 * what save_state and the multifd saver send. cfg_len 0: none. */
	unsigned char cfg[4096];
	size_t cfg_len;
	_Atomic uint64_t transferred;
	/* Multifd (multifd.c). Source: stop-copy state goes over the extra
	 * channels; destination: packets for it are accepted. */
	bool mf_use;
	bool mf_forced;                        /* multifd-transfer=on: never main (mf_at_switchover) */
	_Atomic uint64_t mf_sent;              /* source: bytes of it sent over the channels */
	struct vfm_mf_devq *mfq;               /* destination queue */
	_Atomic uint64_t mf_out_of_order;      /* destination: packets ahead of their turn */
	_Atomic uint64_t mf_queue_waits;       /* destination: a reader waited for room */
};

/* Where a device's stop-copy size comes from (docs/interop.md). */
enum vfm__sc_source {
	VFM__SC_NONE = 0,
	VFM__SC_DEVICE,       /* the device reported it */
	VFM__SC_PROPERTY,     /* stop-copy-size= */
	VFM__SC_ESTIMATE,     /* the last pre-copy round's bytes */
	VFM__SC_UNKNOWN,      /* the device failed to say: 100 GiB */
};

/* DATA record flag of a device section: multifd end marker, u32 packets. */
#define VFM__DEV_MF_END 3

struct vfm_ram;

/*
 * Points of the source thread's flow where a test hook runs (see
 * vfm__migration_set_phase_hook). Each fires once per migration.
 */
enum vfm__mig_phase {
	VFM__PH_SETUP,        /* connected, every savable set up (devices in PRE_COPY) */
	VFM__PH_PRECOPY,      /* first pre-copy iteration done */
	VFM__PH_ACK_WAIT,     /* pending fits the limit, waiting for switchover-acks */
	VFM__PH_STOP_COPY,    /* guest stopped, devices in STOP_COPY, before the last data */
	VFM__PH_CONFIG,       /* all data sent, before the first config state */
	VFM__PH_LOADED_WAIT,  /* end of stream sent, waiting for the destination's LOADED */
	VFM__PH_GO,           /* LOADED received, GO about to be sent (still no commit) */
	VFM__PH_COMMITTED,    /* GO sent: no way back */
	VFM__PH_COUNT
};
typedef void (*vfm__mig_phase_fn)(void *opaque, struct vfm_migration *m,
				  enum vfm__mig_phase phase);

struct vfm_migration {
	/* Never change after creation. */
	struct vfm_guest_mem *mem;
	const struct vfm_vm_ops *vm;
	void *vm_opaque;

	/* Registration (before a migration starts; read-only while one runs). */
	struct vfm_savable sv[VFM_MAX_SAVABLES];
	unsigned nsv;
	struct vfm_mig_device *devs[VFM_MAX_DEVICES];
	unsigned ndevs;
	struct vfm_ram *ram;

	pthread_mutex_t lock;
	/* Guarded by lock. */
	struct vfm_migration_stats stats;
	struct vfm_migration_params params;
	bool thread_running;
	bool params_changed;        /* live parameters set since the source read them */
	pthread_t thread;
	char uri[512];
	void (*event_cb)(void *opaque, enum vfm_mig_status st);
	void *event_opaque;

	atomic_bool cancel;
	bool committed;             /* guarded by lock: GO sent, no rollback */
	atomic_int sock_fd;         /* main channel, shut down to unblock on cancel
	                             * (destination: set and cleared under lock) */
	atomic_bool in_cancel;      /* destination: sticky, the VM is going away */

	struct vfm_mf_src *mf_src;  /* guarded by lock (cancel shuts its channels down) */
	struct vfm_mf_dst *mf_dst;  /* incoming thread */
	/* Test hooks (destination): this channel's device packets are delayed;
	 * this channel's first RAM packet after SWITCHOVER is held. */
	int mf_delay_chan;
	unsigned mf_delay_ms;
	int mf_ram_delay_chan;
	unsigned mf_ram_delay_ms;
	/* For tests: times the destination's wait for the channels' RAM woke
	 * (multifd_dst.c, guarded by its lock; read once the migration ended). */
	unsigned mf_ram_wakeups;

	/* Test hook: set before a migration starts, read by the source thread. */
	vfm__mig_phase_fn phase_hook;
	void *phase_opaque;

	/* Migration thread only (source). */
	struct vfm_stream *out;
	struct vfm_stream *rp;      /* return path reader (same socket) */
	uint64_t rp_token;
	bool return_path;
};

/* Status changes (locks, records, fires the event). */
void vfm__mig_set_status(struct vfm_migration *m, enum vfm_mig_status st);
enum vfm_mig_status vfm__mig_status(struct vfm_migration *m);
void vfm__mig_set_error(struct vfm_migration *m, const struct vfm_error *err);
uint64_t vfm__now_ns(void);
/* This machine's boot id (36 chars + NUL), "" if unknown. */
void vfm__boot_id(char out[37]);
/* Whether id (36 chars, not NUL-terminated) is this machine's boot id. */
bool vfm__same_boot(const char *id);

/* RAM savable (ram.c). */
int vfm__ram_create(struct vfm_migration *m, struct vfm_error *err);
void vfm__ram_destroy(struct vfm_ram *ram);
/* Moves the memory's dirty bits into the RAM saver's send set. */
void vfm__ram_sync(struct vfm_ram *ram);
uint64_t vfm__ram_transferred(struct vfm_ram *ram);
/* Destination: note the memfd holes before the memory is populated. */
void vfm__ram_dst_learn_holes(struct vfm_ram *ram);
void vfm__ram_dst_zero_stats(struct vfm_ram *ram, uint64_t *read_bytes, uint64_t *known_pages);

/* VFIO device savable (vfio.c). */
void vfm__vfio_load_recover(struct vfm_mig_device *md);  /* after a refused load */
uint64_t vfm__vfio_round_trip_ns(struct vfm_mig_device *md);  /* one state query, timed */
extern const struct vfm_savable_ops vfm__vfio_savable_ops;
/*
 * log_sync: merge every device's dirty pages into guest memory (DMA logging
 * reports; all-dirty for devices that cannot track), then the RAM set.
 * in_precopy: devices that opted out of pre-copy tracking are skipped.
 */
void vfm__log_sync(struct vfm_migration *m, bool in_precopy);
int vfm__dirty_tracking_start(struct vfm_migration *m, struct vfm_error *err);
void vfm__dirty_tracking_stop(struct vfm_migration *m);

/* multifd.c: cancel (under m->lock) unblocks every channel write. */
struct vfm_mf_src;
void vfm__mf_src_shutdown(struct vfm_mf_src *mf);
/* Tests: the fd of the source's multifd channel idx, -1 if none. */
int vfm__mf_src_channel_fd(struct vfm_migration *m, unsigned idx);
/* Tests (destination): delay each device packet of channel chan by ms. */
void vfm__multifd_set_test_delay(struct vfm_migration *m, int chan, unsigned ms);
/* Tests (destination): hold channel chan's first RAM packet after SWITCHOVER for ms. */
void vfm__multifd_set_test_ram_delay(struct vfm_migration *m, int chan, unsigned ms);

/* Source thread body (source.c) and destination (dest.c). */
void *vfm__source_thread(void *arg);

/*
 * Tests only: fn runs on the source thread at each enum vfm__mig_phase point
 * of the real flow (to cancel, cut the channel or pause there). Set it while
 * no migration runs; NULL removes it.
 */
void vfm__migration_set_phase_hook(struct vfm_migration *m, vfm__mig_phase_fn fn, void *opaque);

/*
 * The max-bandwidth limiter's arithmetic: having sent `sent` bytes in
 * `elapsed_ns` of the current window, how long to pause (ns) to stay at or
 * under `limit` bytes/s. 0 when within the limit or limit is 0 (unlimited).
 */
uint64_t vfm__rate_limit_delay_ns(uint64_t sent, uint64_t elapsed_ns, uint64_t limit);
/* Bytes one savable may send per loop turn under `limit` (0 = unlimited). */
uint64_t vfm__iter_budget(uint64_t limit);

#endif
