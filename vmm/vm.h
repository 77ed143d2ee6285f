/*
 * The VM process's VM object: guest memory, devices, the guest, the
 * migration engine, and the commands the control socket runs on them.
 * docs/vm.md describes threads and locking.
 */
#ifndef VFM_VMM_VM_H
#define VFM_VMM_VM_H

#include <poll.h>
#include <stdbool.h>
#include <stdint.h>

#include <json-c/json.h>

#include "vfiomig/common.h"
#include "vfiomig/migration.h"
#include "vmm/guest.h"

#define VM_MAX_DEVICES 16

struct vm;

/* The vCPU threads' slice request unless --vcpu-slice-us says otherwise
 * (docs/kvm-guest.md): the kernel's minimum, 0.1 ms. */
#define VM_VCPU_SLICE_US 100

struct vm_config {
	uint64_t mem_size;
	const char *devices[VM_MAX_DEVICES];   /* --device specs */
	unsigned ndevices;
	const char *guest;                     /* "synthetic" (default), "none", "kvm" */
	unsigned vcpus;                        /* 0: the guest's default */
	uint64_t dirty_rate;                   /* bytes/s */
	uint64_t working_set;                  /* kvm: bytes the guest rewrites; 0: default */
	const char *heartbeat;                 /* kvm: heartbeat port to this UNIX socket */
	uint32_t heartbeat_us;                 /* kvm, fresh guest: heartbeat period; 0: none */
	unsigned vcpu_slice_us;                /* kvm: vCPU threads' scheduler slice; 0: the
						* kernel's (the CLI's default: VM_VCPU_SLICE_US) */
	const char *incoming;                  /* URI, or NULL for a source */
	const char *tls_creds;                 /* "x509:DIR" / "psk:DIR", or NULL */
	bool insecure;                         /* plaintext tcp beyond loopback allowed */
	char tls_authz[1024];                  /* --tls-authz values, one per line */
};

enum vm_state { VM_RUNNING, VM_PAUSED, VM_INMIGRATE, VM_POSTMIGRATE, VM_SHUTDOWN };
const char *vm_state_name(enum vm_state s);

/*
 * Builds everything: memory, devices (opened, DMA-mapped, IRQs wired), the
 * guest and the migration engine. Nothing runs yet.
 */
int vm_create(const struct vm_config *cfg, struct vm **out, struct vfm_error *err);
/*
 * Source: starts the guest. Destination: starts the incoming thread and
 * returns once it listens (a bad URI or a busy address fails here).
 */
int vm_run(struct vm *vm, struct vfm_error *err);
/* Stops every thread (cancels a migration) and frees everything. */
void vm_destroy(struct vm *vm);

/*
 * Events (MIGRATION, STOP, RESUME) go to this sink, from whichever thread
 * causes them; data is handed over (the sink puts it). NULL: dropped.
 * The sink runs with VM locks held: it must only queue.
 */
typedef void (*vm_event_fn)(void *opaque, const char *name, json_object *data);
void vm_set_event_sink(struct vm *vm, vm_event_fn fn, void *opaque);

/* The main loop's share: device sockets and IRQ eventfds. */
unsigned vm_poll_fds(struct vm *vm, struct pollfd *pfd, unsigned max);
void vm_poll_handle(struct vm *vm, const struct pollfd *pfd, unsigned n);

/* ---- Commands (control socket, main loop thread) ---- */
int vm_migrate(struct vm *vm, const char *uri, bool postcopy, struct vfm_error *err);
void vm_migrate_cancel(struct vm *vm);
int vm_stop(struct vm *vm, struct vfm_error *err);
int vm_cont(struct vm *vm, struct vfm_error *err);
/* Parameters: validates all of args first; nothing changes on error. */
int vm_set_params(struct vm *vm, json_object *args, struct vfm_error *err);
json_object *vm_query_params(struct vm *vm);
json_object *vm_query_migrate(struct vm *vm);
json_object *vm_query_status(struct vm *vm);
json_object *vm_query_vfiomig(struct vm *vm);
/* Pauses the guest if it runs, verifies, resumes it; the guest object. */
int vm_guest_verify(struct vm *vm, json_object **out, struct vfm_error *err);
/* Before exit: state shutdown. */
void vm_shutdown(struct vm *vm);

#endif
