/*
 * The KVM guest: a real virtual machine over the VM's memfd guest memory,
 * vCPUs in 64-bit long mode running the freestanding program in guest/
 * (which drives `dma` devices through their BAR0: MMIO exits forwarded, and
 * writes their mapped BAR2 windows: memory slots), with
 * KVM's dirty log feeding the memory layer and the vCPU state as a savable
 * entry. Docs: docs/kvm-guest.md.
 */
#ifndef VFM_VMM_KVM_H
#define VFM_VMM_KVM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vfiomig/migration.h"
#include "guest.h"

#define VFM_KVM_MAX_VCPUS 32

/*
 * MMIO exits (guest accesses to addresses no memory region covers, such as
 * device BARs) go here, from the faulting vCPU's thread, so the handlers must
 * be thread-safe. len is 1, 2, 4 or 8. A read handler that fails leaves
 * all-ones in data. Without handlers reads return all-ones, writes are dropped.
 */
struct vfm_kvm_mmio_ops {
	int (*read)(void *opaque, uint64_t gpa, void *data, unsigned len);
	int (*write)(void *opaque, uint64_t gpa, const void *data, unsigned len);
};

struct vfm_kvm_opts {
	unsigned vcpus;             /* default 2, at most VFM_KVM_MAX_VCPUS */
	uint64_t dirty_rate;        /* bytes/s of page rewrites over all vCPUs; 0 = none */
	uint64_t working_set;       /* bytes the guest rewrites; default 4 MiB, clamped to RAM */
	bool fresh;                 /* false on the destination: RAM and vCPU state come
				     * from the stream; start fails until state loaded */
	bool no_guest_check;        /* verify: skip running the guest's own check */
	unsigned check_timeout_ms;  /* bound on the guest's own check; default 10000 */
	const struct vfm_kvm_mmio_ops *mmio;
	void *mmio_opaque;
	/* The guest's heartbeat (guest/abi.h KG_PORT_HEARTBEAT): a fresh guest
	 * beats every heartbeat_us (0: never; the period migrates with RAM);
	 * heartbeat, a UNIX socket path the VM connects to at creation, gets one
	 * byte per beat (NULL: beats are dropped). */
	uint32_t heartbeat_us;
	const char *heartbeat;
	/* The vCPU threads' scheduler slice request in microseconds (EEVDF's
	 * custom slice, docs/kvm-guest.md "Stop, dirty log, verification"):
	 * 0 = the kernel's default; the VM asks VM_VCPU_SLICE_US_DEFAULT. */
	unsigned vcpu_slice_us;
	/*
	 * `dma` sample devices the guest program drives through their BAR0
	 * (region 0), at most 16: device d's BAR0 appears at guest physical
	 * mmio_gpa + d * 64 KiB (docs/kvm-guest.md), vCPU d mod vcpus drives it.
	 * A BAR2 its client mapped whole (vfm_device_region_areas) becomes
	 * memory slots at BAR0 + KG_WIN_OFFSET that the guest writes directly.
	 * Borrowed: they stay open for the guest's lifetime with all guest
	 * memory mapped for DMA. A fresh guest programs their rings; on a
	 * destination the same devices (their state migrated) continue.
	 */
	struct vfm_device **dma_devs;
	unsigned ndma;
};

/* Where device d's BAR0 is for a VM over mem (the first GiB boundary at or
 * above 4 GiB and above all RAM). */
uint64_t vfm_kvm_bar_gpa(const struct vfm_guest_mem *mem, unsigned d);

/* Whether /dev/kvm opens and speaks the stable API; reason (optional) says why not. */
bool vfm_kvm_available(char *reason, size_t reason_len);

/*
 * Creates the VM over mem (region 0 must start at 0 and hold the layout in
 * guest/abi.h plus the working set; every region becomes a dirty-logged
 * memory slot), its vCPUs and, when fresh, boots them into the guest program
 * (they run on start).
 */
int vfm_guest_kvm_new(struct vfm_guest_mem *mem, const struct vfm_kvm_opts *opts,
		      struct vfm_guest **out, struct vfm_error *err);

/*
 * Moves KVM's dirty log (pages the vCPUs wrote since the last call) into the
 * memory layer's bitmaps (vfm_dirty_merge). Any thread, guest running or not;
 * also g->ops->sync_dirty. Returns the number of pages KVM reported, or a
 * negative errno.
 */
int vfm_guest_kvm_sync_dirty(struct vfm_guest *g);

/* Changes the guest's page rewrite rate (bytes/s over all vCPUs), any time. */
void vfm_guest_kvm_set_dirty_rate(struct vfm_guest *g, uint64_t bytes_per_s);

/*
 * The guest's own check: asks every vCPU to check its pages against the
 * generation table and waits for all answers (bounded by check_timeout_ms).
 * The guest must be running. Fills out (verified, pages, errors, detail).
 */
int vfm_guest_kvm_self_check(struct vfm_guest *g, struct vfm_guest_verify *out);

struct vfm_kvm_vcpu_info {
	uint64_t pages_written;     /* the guest's own counter, from its mailbox */
	uint64_t check_seq;
	bool booted;
	bool failed;                /* the vCPU stopped on an error (panic, shutdown) */
	uint64_t rip;               /* last known (updated when the vCPU parks) */
};
int vfm_guest_kvm_vcpu_info(struct vfm_guest *g, unsigned idx, struct vfm_kvm_vcpu_info *out);
unsigned vfm_guest_kvm_vcpus(struct vfm_guest *g);
/* How the vCPU threads were scheduled (query-vfiomig "guest"."kvm"). */
struct vfm_kvm_sched_info {
	uint64_t idle_waits;        /* idle exits (port 0xe0) the vCPUs slept in */
	uint64_t idle_early;        /* idle waits that timed out before their deadline: 0 */
	uint64_t pauses;            /* stops that parked running vCPUs (migration, verify) */
	uint64_t slice_ns;          /* vCPU 0's scheduler slice in force (0: unknown) */
	uint64_t tsc_advance_ns;    /* the last vCPU state load moved the guest's TSC on by
				     * this: the time since the source saved it */
	uint64_t throttle_ns;       /* time the vCPUs slept for auto-converge (all vCPUs) */
};
void vfm_guest_kvm_sched_info(struct vfm_guest *g, struct vfm_kvm_sched_info *out);
/* Last console output (up to len-1 bytes, oldest first, NUL-terminated). */
size_t vfm_guest_kvm_console(struct vfm_guest *g, char *buf, size_t len);

/*
 * vCPU state (registers, segments and control registers, FPU/XSAVE, XCRs,
 * the MSRs in use, pending events, debug registers) of a stopped guest as
 * one blob, and back: load needs the same vCPU count, and makes a non-fresh
 * guest startable. save allocates *buf (free() it).
 */
int vfm_guest_kvm_save_vcpus(struct vfm_guest *g, void **buf, size_t *len,
			     struct vfm_error *err);
int vfm_guest_kvm_load_vcpus(struct vfm_guest *g, const void *buf, size_t len,
			     struct vfm_error *err);

/*
 * The vCPU state as a savable entry: registers it with m under name ("kvm-cpus"
 * if NULL), version 1. The source writes one CONFIG record at save_state
 * (guest stopped); the destination loads it in load_state.
 */
#define VFM_KVM_SAVABLE_NAME "kvm-cpus"
#define VFM_KVM_SAVABLE_VERSION 1u
int vfm_guest_kvm_register(struct vfm_guest *g, struct vfm_migration *m, const char *name,
			   struct vfm_error *err);

#endif
