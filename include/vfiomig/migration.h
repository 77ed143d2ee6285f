/*
 * The migration engine: a registry of savable state (RAM, VFIO devices, the
 * VM's own), a source engine that runs in its own thread (setup, iterative
 * pre-copy, switchover, stop-and-copy) and a destination engine that loads
 * a stream and resumes the guest. Design: QEMU's VFIO migration.
 */
#ifndef VFIOMIG_MIGRATION_H
#define VFIOMIG_MIGRATION_H

#include "vfiomig/common.h"
#include "vfiomig/device.h"
#include "vfiomig/memory.h"
#include "vfiomig/parse.h"

#ifdef __cplusplus
extern "C" {
#endif

struct vfm_migration;
struct vfm_stream;

/* Per-device properties, named after QEMU's. */
struct vfm_device_props {
	char id[64];
	enum vfm_onoff enable_migration;      /* auto: migrate if the device can */
	bool allow_pre_copy;                  /* false: never use PRE_COPY */
	bool pre_copy_dirty_page_tracking;    /* false: no dirty sync in pre-copy */
	bool device_dirty_page_tracking;      /* false: do not use DMA logging */
	enum vfm_onoff multifd_transfer;
	/* stop-copy-size=SIZE: what STOP_COPY will produce, for a device that
	 * cannot say itself (docs/interop.md); 0 with !stop_copy_size_set. */
	uint64_t stop_copy_size;
	bool stop_copy_size_set;
};
VFM_EXPORT void vfm_device_props_default(struct vfm_device_props *p);

/*
 * "vfio-user:PATH,id=x,allow-pre-copy=off,..." → backend ("vfio-user" or
 * "vfio"), path (into path_buf) and props. Unknown keys are errors.
 */
VFM_EXPORT int vfm_device_spec_parse(const char *spec, char *backend, size_t backend_len,
				     char *path, size_t path_len, struct vfm_device_props *props,
				     struct vfm_error *err);

enum vfm_mig_status {
	VFM_MIG_NONE, VFM_MIG_SETUP, VFM_MIG_ACTIVE, VFM_MIG_PRE_SWITCHOVER,
	VFM_MIG_DEVICE, VFM_MIG_COMPLETED, VFM_MIG_FAILED, VFM_MIG_CANCELLING,
	VFM_MIG_CANCELLED,
};
/* "none", "setup", "active", "pre-switchover", "device", "completed", ... */
VFM_EXPORT const char *vfm_mig_status_name(enum vfm_mig_status s);

struct vfm_migration_params {
	uint64_t downtime_limit_ms;     /* default 300 */
	uint64_t max_bandwidth;         /* bytes/s, 0 = unlimited */
	bool switchover_ack;            /* default on (needs a return path) */
	bool pre_copy_dirty_page_tracking; /* default on; per device too */
	unsigned multifd_channels;      /* default 2 */
	enum vfm_onoff multifd_transfer;/* default auto */
	bool postcopy;                  /* always refused with VFIO devices */
	uint64_t timeout_ms;            /* stall bound for any network wait, default 10000 */
	/* bytes/s the switchover decision assumes (QEMU 8.2's
	 * avail-switchover-bandwidth); 0 = the measured bandwidth */
	uint64_t avail_switchover_bandwidth;
	/* destination: bytes of multifd device buffers queued per device before
	 * the load is failed (0 = the default, 64 MiB) */
	uint64_t max_queued_buffers_size;
	/* QEMU's auto-converge: when iterations keep finding more new dirty
	 * data than half of what they sent, throttle the guest's vCPUs, first
	 * by cpu_throttle_initial percent, then cpu_throttle_increment more
	 * each time (at most 99). Default off, 20, 10. */
	bool auto_converge;
	unsigned cpu_throttle_initial;
	unsigned cpu_throttle_increment;
	/* The same for devices that can slow their own dirtying (the dma
	 * device's churn), through vfm_vm_ops.throttle. Default off. */
	bool device_throttle;
	/* TLS (docs/security.md): "x509:DIR" or "psk:DIR" (QEMU's layouts), ""
	 * for none. tcp: and unix: only; every connection of a migration. */
	char tls_creds[256];
	/* source: the name the destination's certificate must carry ("" = the
	 * URI's host) */
	char tls_hostname[256];
	/* destination: allowed client certificate DNs or PSK identities, one per
	 * line ("" = any the CA or keys.psk accepts) */
	char tls_authz[1024];
	/* destination: listen in plaintext on an address other than loopback
	 * (refused by default: whoever reaches the port writes guest memory) */
	bool insecure;
};
VFM_EXPORT void vfm_migration_params_default(struct vfm_migration_params *p);

#define VFM_SAVABLE_NAME_MAX 64

struct vfm_migration_stats {
	enum vfm_mig_status status;
	char error[VFM_ERROR_MSG_MAX];
	uint64_t total_time_ms, setup_time_ms;
	double downtime_ms, expected_downtime_ms;
	uint64_t downtime_limit_ms;
	uint64_t precopy_iterations;
	uint64_t transferred_bytes, ram_transferred_bytes, device_transferred_bytes;
	uint64_t pending_bytes;
	double bandwidth_bps;           /* measured, bytes per second */
	double throughput_mbps;         /* transferred over total time, Mbit/s */
	unsigned multifd_channels;
	bool downtime_from_same_clock;  /* false: corrected by RTT (other host) */
	uint64_t multifd_ram_bytes;     /* part of ram_transferred_bytes on the multifd channels */
	/* The convergence report: false once several iterations in a row did
	 * not bring the pending data down while it stays above the threshold. */
	bool converging;
	/* The downtime the least pending seen would need at the bandwidth the
	 * switchover assumes (0 until a first exact check). */
	double needed_downtime_ms;
	/* The savable with the most pending data at the last exact check
	 * ("ram", "vfio:ID", ...): what keeps the migration from converging. */
	char blocker[VFM_SAVABLE_NAME_MAX];
	/* auto-converge: the throttles applied now (percent; 0 = none). */
	unsigned cpu_throttle_percentage;
	unsigned device_throttle_percentage;
	/* The source's switchover, step by step (ms, in this order; names from
	 * vfm_switchover_step_name): guest stop (the vCPUs kicked and parked),
	 * device arcs to STOP_COPY, final dirty sync, last bytes (stop-copy
	 * data, config, end of stream flushed), destination load (until its
	 * LOADED), GO sent, destination resume (devices RUNNING and guest
	 * started, by the destination's clock when on the same host). Their sum
	 * is the downtime; have_switchover once a switchover ended. */
	bool have_switchover;
	double switchover_ms[7];
	/* The same steps as the engine expected them when it decided to switch
	 * over (their sum is expected_downtime_ms; all 0 before the decision). */
	double expected_switchover_ms[7];
	/* A device ("vfio:ID") whose part of expected_downtime_ms assumes the
	 * link's pace, "" when none: it never read before stop-copy (no
	 * pre-copy), so its own pace is unknown and the downtime may be longer
	 * than expected (docs/architecture.md, "Limits"). */
	char unpaced[VFM_SAVABLE_NAME_MAX];
	/* Source: the part of device_transferred_bytes that went over the
	 * multifd channels (stop-copy data of the devices that used them). */
	uint64_t multifd_device_bytes;
};
#define VFM_SWITCHOVER_STEPS 7
VFM_EXPORT const char *vfm_switchover_step_name(unsigned step);

/*
 * What the engine needs from the VM: stop and start its guest (vCPUs). Called
 * from the migration thread. Initialise it with designated initialisers (the
 * rest zero): optional members are added at the end, and before 1.0 the
 * library makes no binary-compatibility promise (rebuild against the header
 * of the library you run; the same for struct vfm_savable_ops).
 */
struct vfm_vm_ops {
	int (*stop)(void *opaque);
	int (*start)(void *opaque);
	/*
	 * Destination, optional: every section loaded and every device in STOP
	 * with its state accepted, before any device goes to RUNNING_P2P or
	 * RUNNING and before the guest runs (the point where the VM can check
	 * what arrived). Called from the incoming thread.
	 */
	void (*loaded)(void *opaque);
	/*
	 * Source, optional: at the start of every dirty sync (pre-copy passes
	 * and once after the guest stopped), the VM moves dirty pages its
	 * hardware tracked (KVM's dirty log) into the memory layer's bitmaps.
	 * Called from the migration thread.
	 */
	void (*log_sync)(void *opaque);
	/*
	 * Source, optional: auto-converge. Slow the guest's vCPUs by vcpu_pct
	 * percent of their time and the devices that can slow their own
	 * dirtying by device_pct percent (0, 0: full speed again, always
	 * called when a throttled migration ends). Migration thread.
	 */
	void (*throttle)(void *opaque, unsigned vcpu_pct, unsigned device_pct);
	/*
	 * Source, optional: a round to every running vCPU that leaves it
	 * running (as QEMU's run_on_cpu of nothing): each vCPU is kicked out
	 * of what it runs and acknowledges, as a stop would make it park.
	 * Returns the ns that took (0: no vCPU runs). The engine cannot time
	 * a stop before it stops the guest; it times this at setup and at each
	 * exact check instead, and expects the switchover's guest_stop to take
	 * as long (the median of the last few). Migration thread.
	 */
	uint64_t (*kick_ns)(void *opaque);
};

/*
 * Handlers of one piece of savable state, like QEMU's SaveVMHandlers. Source
 * callbacks run in the migration thread; destination callbacks in the
 * incoming thread. Every callback is optional except where noted.
 */
struct vfm_savable_ops {
	/* Source. */
	int (*save_setup)(void *opaque, struct vfm_stream *s, struct vfm_error *err);
	bool (*is_active_iterate)(void *opaque);
	/* Send up to about budget bytes; returns 0, or 1 when nothing is left now. */
	int (*save_iterate)(void *opaque, struct vfm_stream *s, uint64_t budget,
			    struct vfm_error *err);
	/* Cheap: cached figures. */
	uint64_t (*pending_estimate)(void *opaque);
	/* Expensive: asks the device (may sync). */
	int (*pending_exact)(void *opaque, uint64_t *pending, struct vfm_error *err);
	/* Whether the destination must ack this section before switchover. */
	bool (*switchover_ack_needed)(void *opaque);
	/* Guest stopped: send everything that remains. */
	int (*save_complete)(void *opaque, struct vfm_stream *s, struct vfm_error *err);
	/* Config state, after all data. */
	int (*save_state)(void *opaque, struct vfm_stream *s, struct vfm_error *err);
	/* succeeded: the destination took over; else roll back (device RUNNING). */
	void (*save_cleanup)(void *opaque, bool succeeded);
	/* Cumulative ns of save_iterate's work that save_complete does not do
	 * (RAM: copying pages to a bounce buffer while the guest runs). The
	 * engine leaves it out of the savable's pace when it expects the
	 * switchover's last bytes. */
	uint64_t (*precopy_only_ns)(void *opaque);

	/* Destination. */
	int (*load_setup)(void *opaque, uint32_t version, struct vfm_error *err);
	/* type: VFM_REC_DATA or VFM_REC_CONFIG; flags: the record's flags. */
	int (*load_state)(void *opaque, uint16_t type, uint16_t flags, const void *buf,
			  size_t len, struct vfm_error *err);
	/* All data in: validate and get ready to run (devices to STOP / P2P). */
	int (*load_finish)(void *opaque, struct vfm_error *err);
	void (*load_cleanup)(void *opaque, bool succeeded);
};


VFM_EXPORT int vfm_migration_new(struct vfm_guest_mem *mem, const struct vfm_vm_ops *vm,
				 void *vm_opaque, struct vfm_migration **out,
				 struct vfm_error *err);
/* Stops a running migration (cancel + join) and frees. Devices stay the caller's. */
VFM_EXPORT void vfm_migration_free(struct vfm_migration *m);

/* The VM's own state: name must be unique; version is checked on load. */
VFM_EXPORT int vfm_migration_register(struct vfm_migration *m, const char *name,
				      uint32_t version, const struct vfm_savable_ops *ops,
				      void *opaque, struct vfm_error *err);
/* A VFIO device (probed here); its guest memory mappings are the caller's. */
VFM_EXPORT int vfm_migration_add_device(struct vfm_migration *m, struct vfm_device *dev,
					const struct vfm_device_props *props,
					struct vfm_error *err);

/* Source: start migrating to uri in a new thread. -EBUSY if one runs. */
VFM_EXPORT int vfm_migration_start(struct vfm_migration *m, const char *uri,
				   const struct vfm_migration_params *params,
				   struct vfm_error *err);
VFM_EXPORT void vfm_migration_cancel(struct vfm_migration *m);
/* Waits until the migration thread ends (timeout_ms -1 = forever);
 * -ETIMEDOUT if still running. */
VFM_EXPORT int vfm_migration_wait(struct vfm_migration *m, int timeout_ms);
VFM_EXPORT void vfm_migration_get_stats(struct vfm_migration *m,
					struct vfm_migration_stats *st);
/* Bytes of dev's state sent (source) or loaded (destination) by the current
 * or last migration; 0 when dev is not part of m. */
VFM_EXPORT uint64_t vfm_migration_device_transferred(struct vfm_migration *m,
						     const struct vfm_device *dev);
/* dev's pending bytes at the last exact check of the running (or last)
 * migration, and the rate (bytes/s) at which it produced new data between
 * the last two checks; both 0 when dev is not part of m. */
VFM_EXPORT void vfm_migration_device_pending(struct vfm_migration *m, const struct vfm_device *dev,
					     uint64_t *pending, double *dirty_rate_bps);
/*
 * Applies the live parameters of p (downtime_limit_ms, max_bandwidth,
 * avail_switchover_bandwidth) to the running migration, as QEMU's
 * migrate-set-parameters does; the source thread uses them from its next
 * loop turn. Without a running migration: nothing (the next one takes its
 * parameters from vfm_migration_start).
 */
VFM_EXPORT void vfm_migration_set_live_params(struct vfm_migration *m,
					      const struct vfm_migration_params *p);
/*
 * Source: the stop-copy size the current or last migration uses for dev
 * (*bytes), and where it comes from: "device" (it reported it), "property"
 * (stop-copy-size=), "estimate" (the last pre-copy round's bytes: the device
 * cannot say), "unknown" (the device failed to say: 100 GiB, as QEMU), or
 * NULL before any migration or when dev is not part of m.
 */
VFM_EXPORT const char *vfm_migration_device_stop_copy_size(struct vfm_migration *m,
							   const struct vfm_device *dev,
							   uint64_t *bytes);

/*
 * Destination: listen on uri, load one incoming migration, resume the guest
 * (vm->start). Blocking; returns 0 once the guest runs. ready (optional) is
 * called once the listener is up (e.g. to tell a parent which port).
 */
VFM_EXPORT int vfm_migration_incoming(struct vfm_migration *m, const char *uri,
				      const struct vfm_migration_params *params,
				      void (*ready)(void *opaque, const char *uri),
				      void *ready_opaque, struct vfm_error *err);
/*
 * Destination, from any thread, for teardown: the running (or next)
 * vfm_migration_incoming fails with VFM_ECANCELED within about 200 ms: a wait
 * for a connection ends, a load in progress is cut (devices are reset as on
 * any failed load). Sticky: later calls of vfm_migration_incoming fail too.
 */
VFM_EXPORT void vfm_migration_incoming_cancel(struct vfm_migration *m);

/* Event callback for status changes (the control socket's MIGRATION event). */
VFM_EXPORT void vfm_migration_set_event_cb(struct vfm_migration *m,
					   void (*cb)(void *opaque, enum vfm_mig_status st),
					   void *opaque);

#ifdef __cplusplus
}
#endif
#endif
