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
};

/* One VFIO device in the migration (the "vfio" savable's opaque). */
struct vfm_mig_device {
	struct vfm_migration *m;
	struct vfm_device *dev;
	struct vfm_device_props props;
	uint64_t flags;              /* migration flags, probed */
	/* Migration thread only. */
	bool use_precopy;            /* device went to PRE_COPY */
	bool dma_logging;            /* DMA logging started */
	bool init_data_sent;         /* INIT_DATA_SENT written */
	bool precopy_info_ok;        /* backend reports precopy sizes */
	uint64_t precopy_init, precopy_dirty;  /* cached from precopy info */
	uint64_t last_iter_bytes;    /* read in the last iteration (no precopy info) */
	uint64_t stop_copy_size;
	uint64_t data_buf_size;
	unsigned char *buf;
	_Atomic uint64_t transferred;
};

struct vfm_ram;

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
	pthread_t thread;
	char uri[512];
	void (*event_cb)(void *opaque, enum vfm_mig_status st);
	void *event_opaque;

	atomic_bool cancel;
	bool committed;             /* guarded by lock: GO sent, no rollback */
	atomic_int sock_fd;         /* main channel, shut down to unblock on cancel */

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

/* VFIO device savable (vfio.c). */
extern const struct vfm_savable_ops vfm__vfio_savable_ops;
/*
 * log_sync: merge every device's dirty pages into guest memory (DMA logging
 * reports; all-dirty for devices that cannot track), then the RAM set.
 * in_precopy: devices that opted out of pre-copy tracking are skipped.
 */
void vfm__log_sync(struct vfm_migration *m, bool in_precopy);
int vfm__dirty_tracking_start(struct vfm_migration *m, struct vfm_error *err);
void vfm__dirty_tracking_stop(struct vfm_migration *m);

/* Source thread body (source.c) and destination (dest.c). */
void *vfm__source_thread(void *arg);

#endif
