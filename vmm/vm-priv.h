/* Internals of the VM object shared by vm.c (lifecycle, engine glue) and
 * vm_cmd.c (commands and status objects). */
#ifndef VFM_VMM_VM_PRIV_H
#define VFM_VMM_VM_PRIV_H

#include <pthread.h>
#include <stdatomic.h>

#include "vfiomig/device.h"
#include "vmm/vm.h"

struct vm_dev {
	/* Never change after vm_create. */
	char id[64];
	char backend[16];
	struct vfm_device *dev;
	struct vfm_device_props props;
	bool is_dma;                  /* the `dma` sample device (PCI 1b36:11f0) */
	bool in_migration;            /* registered with the engine */
	char blocker[VFM_ERROR_MSG_MAX]; /* why not, when not */
	int irq_fd;                   /* eventfd for MSI 0 or INTx, or -1 */
	const char *irq_kind;         /* "msi", "intx" */

	atomic_uint_fast64_t interrupts;
	/* Main loop only. */
	bool poll_dead;               /* the connection broke: not watched any more */
	uint64_t poll_backoff_until;  /* ms: another thread holds the request lock */

	/* Guarded by vm->lock. */
	bool csum_valid;              /* captured at a point both sides agree on */
	uint64_t csum;
};

enum vm_role { VM_ROLE_SOURCE, VM_ROLE_INCOMING };

struct vm_check {
	bool valid;                   /* one ran */
	struct vfm_guest_verify v;
	double ms;                    /* how long it took */
};

struct vm {
	/* Never change after vm_create. */
	struct vfm_guest_mem *mem;
	struct vm_dev devs[VM_MAX_DEVICES];
	unsigned ndevs;
	struct vfm_guest *guest;
	char incoming_req[512];       /* --incoming as given, "" for none */

	/* Guarded by sink_lock (taken after lock, never before it). */
	pthread_mutex_t sink_lock;
	vm_event_fn event_fn;
	void *event_opaque;

	/*
	 * The engine object: only the main loop thread reads or replaces the
	 * pointer (replaced for an outgoing migration after an incoming one);
	 * the engine guards its own contents.
	 */
	struct vfm_migration *mig;

	/* The incoming thread (destination). */
	pthread_t incoming_thread;
	bool incoming_thread_live;    /* main loop only: not joined yet */

	pthread_mutex_t lock;
	pthread_cond_t cond;          /* incoming listener ready / incoming ended */
	/* Guarded by lock. */
	enum vm_state state;
	enum vm_role role;            /* of the current or last migration */
	enum vfm_mig_status mig_status; /* as clients see it: after the VM's side effects */
	bool was_running;             /* the guest ran when the engine stopped it */
	struct vfm_migration_params params;
	/* The last quick check (destination, in the downtime) and full one
	 * (guest-verify); last_full says which ran last. */
	struct vm_check quick, full;
	bool last_full;
	char incoming_uri[600];       /* bound URI (port 0 resolved) */
	bool incoming_ready, incoming_ended;
	int incoming_ret;
	char incoming_err[VFM_ERROR_MSG_MAX];
};

/* vm.c */
int vm__build_migration(struct vm *vm, struct vfm_migration **out, struct vfm_error *err);
void vm__event(struct vm *vm, const char *name, json_object *data);
/* Reads the CHECKSUM register of every dma device into csum (points of agreement). */
void vm__capture_checksums(struct vm *vm);
/* Guest start/stop under vm->lock, with STOP/RESUME events. */
int vm__guest_start_locked(struct vm *vm, struct vfm_error *err);
void vm__guest_stop_locked(struct vm *vm);
bool vm__mig_active(enum vfm_mig_status st);
uint64_t vm__mono_us(void);

#endif
