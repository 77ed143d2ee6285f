/*
 * Guests of the VM process behind one interface: the synthetic guest (vCPU
 * threads in this process), later a KVM guest. A guest writes guest memory
 * (marking what it dirties, or leaving that to the KVM dirty log), may drive
 * devices, and can prove after a migration that no write was lost.
 */
#ifndef VFM_VMM_GUEST_H
#define VFM_VMM_GUEST_H

#include <stdbool.h>
#include <stdint.h>

#include "vfiomig/common.h"
#include "vfiomig/device.h"
#include "vfiomig/memory.h"

struct vfm_guest;

struct vfm_guest_verify {
	bool verified;          /* every check passed */
	uint64_t pages_checked;
	uint64_t errors;        /* pages whose content disagrees with the bookkeeping */
	char detail[160];       /* first error, human readable */
};

/* Counters of the workload since the guest was created (this process only). */
struct vfm_guest_stats {
	uint64_t page_writes;   /* pages rewritten by vCPUs */
	uint64_t dma_ops;       /* copies completed through devices */
	uint64_t dma_errors;    /* device operations that failed */
};

struct vfm_guest_ops {
	const char *kind;       /* "synthetic", "kvm", "none" */
	/* Runs the vCPUs (again). */
	int (*start)(struct vfm_guest *g, struct vfm_error *err);
	/* Parks every vCPU at a consistent point; returns when all are parked. */
	int (*stop)(struct vfm_guest *g);
	/* Checks guest memory against the guest's own bookkeeping (stopped guest). */
	int (*verify)(struct vfm_guest *g, struct vfm_guest_verify *out);
	/*
	 * Optional: a check cheap enough for the migration downtime (the
	 * destination runs it before the vCPUs do): the bookkeeping's
	 * consistency and a sample of every page, enough to catch a lost page
	 * (a stale page differs in every word) but not a torn one. NULL: the
	 * full verify is cheap already.
	 */
	int (*quick_verify)(struct vfm_guest *g, struct vfm_guest_verify *out);
	/* Optional. */
	void (*stats)(struct vfm_guest *g, struct vfm_guest_stats *st);
	void (*destroy)(struct vfm_guest *g);
	/*
	 * Optional: moves dirty pages the guest's hardware tracked (KVM's dirty
	 * log) into the memory layer's bitmaps; the migration's dirty sync calls
	 * it before collecting. Guests that mark as they write leave it NULL.
	 * Any thread; returns pages reported or a negative errno.
	 */
	int (*sync_dirty)(struct vfm_guest *g);
	/*
	 * Optional: auto-converge. The vCPUs run only (100 - pct) percent of
	 * the time (0: full speed). Any thread.
	 */
	void (*set_throttle)(struct vfm_guest *g, unsigned pct);
	/*
	 * Optional: kicks every running vCPU out of what it runs, as stop
	 * does, and waits until each has acknowledged, but leaves them
	 * running. Returns the ns that took (0: not running). The migration
	 * engine's kick_ns: how long a stop will take.
	 */
	uint64_t (*kick_ns)(struct vfm_guest *g);
};

struct vfm_guest {
	const struct vfm_guest_ops *ops;
	struct vfm_guest_mem *mem;
	bool running;           /* guarded by the VM's lock */
};

struct vfm_synthetic_opts {
	unsigned vcpus;         /* default 2 */
	uint64_t dirty_rate;    /* bytes/s of page writes over all vCPUs; 0 = none */
	bool fresh;             /* false on the destination: memory comes from the stream */
	/*
	 * `dma` sample devices for the vCPUs to drive (vCPU i drives devices
	 * i, i + vcpus, ...); they must stay open for the guest's lifetime and
	 * have all guest memory mapped for DMA. A fresh guest programs their
	 * rings; an incoming one finds their state in memory.
	 */
	struct vfm_device **dma_devs;
	unsigned ndma;
};

int vfm_guest_synthetic_new(struct vfm_guest_mem *mem, const struct vfm_synthetic_opts *o,
			    struct vfm_guest **out, struct vfm_error *err);
int vfm_guest_none_new(struct vfm_guest_mem *mem, struct vfm_guest **out,
		       struct vfm_error *err);

#endif
