/*
 * What the control socket asks of the VM: migrate, cancel, stop, cont,
 * parameters, verification, and the status objects of
 * docs/control-protocol.md. All on the main loop thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../devices/dma.h"
#include "util/logging.h"
#include "vfiomig/fsm.h"
#include "vmm/vm-priv.h"
#ifdef VFM_HAVE_KVM
#include "vmm/kvm.h"
#endif

#define LOG "vm"
#define DOWNTIME_LIMIT_MAX_MS 2000000   /* QEMU's bound: 2000 s */

static json_object *jdouble(double v)
{
	char buf[64];

	/* Three decimals, printed as such (json-c would print every digit). */
	if (!isfinite(v) || v > 1e15 || v < -1e15)
		v = 0;
	v = (double)(int64_t)(v * 1000 + (v < 0 ? -0.5 : 0.5)) / 1000;
	snprintf(buf, sizeof(buf), "%.3f", v);
	return json_object_new_double_s(v, buf);
}

static json_object *ju64(uint64_t v)
{
	return json_object_new_int64(v > INT64_MAX ? INT64_MAX : (int64_t)v);
}

/* ---- Migration ---- */

int vm_migrate(struct vm *vm, const char *uri, bool postcopy, struct vfm_error *err)
{
	struct vfm_migration_params p;
	enum vm_state state;
	enum vfm_mig_status mst;
	enum vm_role role;
	int ret;

	pthread_mutex_lock(&vm->lock);
	state = vm->state;
	mst = vm->mig_status;
	role = vm->role;
	p = vm->params;
	pthread_mutex_unlock(&vm->lock);
	if (vm__mig_active(mst))
		return vfm_error_set(err, -EBUSY, "a migration is already in progress");
	if (state == VM_INMIGRATE)
		return vfm_error_set(err, -EBUSY, "this VM is waiting for an incoming migration "
				     "(--incoming): it has no guest to migrate yet");
	if (state == VM_POSTMIGRATE)
		return vfm_error_set(err, -EALREADY, "this VM has migrated out already: its guest "
				     "runs on the destination");
	if (state == VM_SHUTDOWN)
		return vfm_error_set(err, -ESHUTDOWN, "the VM is shutting down");
	for (unsigned i = 0; i < vm->ndevs; i++)
		if (vm->devs[i].blocker[0])
			return vfm_error_set(err, VFM_ENOMIGRATION, "%s", vm->devs[i].blocker);
	if (role == VM_ROLE_INCOMING) {
		struct vfm_migration *m;

		/* The guest arrived here and now leaves: a fresh engine object
		 * (QEMU too starts an outgoing migration from scratch). */
		if (vm->incoming_thread_live) {
			pthread_join(vm->incoming_thread, NULL);
			vm->incoming_thread_live = false;
		}
		ret = vm__build_migration(vm, &m, err);
		if (ret)
			return ret;
		vfm_migration_free(vm->mig);
		vm->mig = m;
	} else {
		/* The last one ended: its thread has only its exit left, join it. */
		vfm_migration_wait(vm->mig, 5000);
	}
	pthread_mutex_lock(&vm->lock);
	vm->role = VM_ROLE_SOURCE;
	for (unsigned i = 0; i < vm->ndevs; i++)
		vm->devs[i].csum_valid = false;
	pthread_mutex_unlock(&vm->lock);
	p.postcopy = postcopy;
	ret = vfm_migration_start(vm->mig, uri, &p, err);
	if (ret == -EBUSY) {
		vfm_error_clear(err);
		return vfm_error_set(err, -EBUSY, "a migration is already in progress");
	}
	if (!ret)
		vfm_info(LOG, "migrating to %s", uri);
	return ret;
}

void vm_migrate_cancel(struct vm *vm)
{
	enum vm_role role;

	pthread_mutex_lock(&vm->lock);
	role = vm->role;
	pthread_mutex_unlock(&vm->lock);
	/* Only the source cancels; a destination waits for whatever comes. */
	if (role == VM_ROLE_SOURCE)
		vfm_migration_cancel(vm->mig);
}

/* ---- Run state ---- */

int vm_stop(struct vm *vm, struct vfm_error *err)
{
	int ret = 0;

	pthread_mutex_lock(&vm->lock);
	if (vm->state == VM_INMIGRATE)
		ret = vfm_error_set(err, -EBUSY, "the guest has not arrived yet (incoming migration)");
	else if (vm->state == VM_RUNNING) {
		vm__guest_stop_locked(vm);
		vm->state = VM_PAUSED;
	}
	pthread_mutex_unlock(&vm->lock);
	return ret;
}

int vm_cont(struct vm *vm, struct vfm_error *err)
{
	int ret = 0;

	pthread_mutex_lock(&vm->lock);
	if (vm->state == VM_INMIGRATE)
		ret = vfm_error_set(err, -EBUSY, "the guest has not arrived yet (incoming migration)");
	else if (vm->state == VM_POSTMIGRATE)
		ret = vfm_error_set(err, -EBUSY, "the guest has migrated out (postmigrate): it runs "
				    "on the destination");
	else if (vm->role == VM_ROLE_SOURCE && vm__mig_active(vm->mig_status))
		ret = vfm_error_set(err, -EBUSY, "a migration is in progress: cont waits until it "
				    "ends");
	else if (vm->state == VM_PAUSED)
		ret = vm__guest_start_locked(vm, err);
	pthread_mutex_unlock(&vm->lock);
	return ret;
}

/* ---- Parameters ---- */

static int int_arg(const char *key, json_object *v, int64_t min, int64_t max, uint64_t *out,
		   struct vfm_error *err)
{
	int64_t n;

	if (!json_object_is_type(v, json_type_int))
		return vfm_error_set(err, -EINVAL, "'%s' must be an integer", key);
	n = json_object_get_int64(v);
	if (n < min || n > max)
		return vfm_error_set(err, -ERANGE, "'%s' must be in %" PRId64 "..%" PRId64, key,
				     min, max);
	*out = (uint64_t)n;
	return 0;
}

static int bool_arg(const char *key, json_object *v, bool *out, struct vfm_error *err)
{
	if (!json_object_is_type(v, json_type_boolean))
		return vfm_error_set(err, -EINVAL, "'%s' must be true or false", key);
	*out = json_object_get_boolean(v);
	return 0;
}

/* tls-authz: a list of identities (or one string; [] or "" = any). */
static int authz_arg(const char *key, json_object *v, char *out, size_t len,
		     struct vfm_error *err)
{
	size_t n = 0, cnt;
	bool one = json_object_is_type(v, json_type_string);

	if (!one && !json_object_is_type(v, json_type_array))
		return vfm_error_set(err, -EINVAL, "'%s' must be a list of strings", key);
	cnt = one ? 1 : json_object_array_length(v);
	out[0] = '\0';
	for (size_t i = 0; i < cnt; i++) {
		json_object *e = one ? v : json_object_array_get_idx(v, i);
		const char *id = json_object_is_type(e, json_type_string) ?
				 json_object_get_string(e) : NULL;
		size_t l = id ? strlen(id) : 0;

		if (!id || strchr(id, '\n'))
			return vfm_error_set(err, -EINVAL, "'%s': entry %zu is not a one-line string",
					     key, i);
		if (!l)
			continue;
		if (n + l + 2 > len)
			return vfm_error_set(err, -EINVAL, "'%s': longer than %zu bytes", key, len - 1);
		if (n)
			out[n++] = '\n';
		memcpy(out + n, id, l + 1);
		n += l;
	}
	return 0;
}

int vm_set_params(struct vm *vm, json_object *args, struct vfm_error *err)
{
	struct vfm_migration_params p;
	uint64_t n;
	int ret = 0;

	pthread_mutex_lock(&vm->lock);
	p = vm->params;
	pthread_mutex_unlock(&vm->lock);
	json_object_object_foreach(args, key, v) {
		if (!strcmp(key, "downtime-limit")) {
			ret = int_arg(key, v, 0, DOWNTIME_LIMIT_MAX_MS, &p.downtime_limit_ms, err);
		} else if (!strcmp(key, "max-bandwidth")) {
			ret = int_arg(key, v, 0, INT64_MAX, &p.max_bandwidth, err);
		} else if (!strcmp(key, "avail-switchover-bandwidth")) {
			ret = int_arg(key, v, 0, INT64_MAX, &p.avail_switchover_bandwidth, err);
		} else if (!strcmp(key, "multifd-channels")) {
			/* 0: everything on the main channel. */
			ret = int_arg(key, v, 0, 255, &n, err);
			p.multifd_channels = (unsigned)n;
		} else if (!strcmp(key, "switchover-ack")) {
			ret = bool_arg(key, v, &p.switchover_ack, err);
		} else if (!strcmp(key, "auto-converge")) {
			ret = bool_arg(key, v, &p.auto_converge, err);
		} else if (!strcmp(key, "device-throttle")) {
			ret = bool_arg(key, v, &p.device_throttle, err);
		} else if (!strcmp(key, "cpu-throttle-initial") ||
			   !strcmp(key, "cpu-throttle-increment")) {
			ret = int_arg(key, v, 1, 99, &n, err);
			if (!ret && !strcmp(key, "cpu-throttle-initial"))
				p.cpu_throttle_initial = (unsigned)n;
			else if (!ret)
				p.cpu_throttle_increment = (unsigned)n;
		} else if (!strcmp(key, "pre-copy-dirty-page-tracking")) {
			ret = bool_arg(key, v, &p.pre_copy_dirty_page_tracking, err);
		} else if (!strcmp(key, "tls-hostname")) {
			const char *h = json_object_is_type(v, json_type_string) ?
					json_object_get_string(v) : NULL;

			if (!h || strlen(h) >= sizeof(p.tls_hostname) || strpbrk(h, " \n/"))
				ret = vfm_error_set(err, -EINVAL, "'%s' must be a host name or address "
						    "(\"\" = the URI's host)", key);
			else
				snprintf(p.tls_hostname, sizeof(p.tls_hostname), "%s", h);
		} else if (!strcmp(key, "tls-authz")) {
			ret = authz_arg(key, v, p.tls_authz, sizeof(p.tls_authz), err);
		} else if (!strcmp(key, "multifd-transfer")) {
			const char *s = json_object_is_type(v, json_type_string) ?
					json_object_get_string(v) : "";

			if (!strcmp(s, "on"))
				p.multifd_transfer = VFM_ON;
			else if (!strcmp(s, "off"))
				p.multifd_transfer = VFM_OFF;
			else if (!strcmp(s, "auto"))
				p.multifd_transfer = VFM_AUTO;
			else
				ret = vfm_error_set(err, -EINVAL, "'%s' must be \"on\", \"off\" or "
						    "\"auto\"", key);
		} else {
			ret = vfm_error_set(err, -EINVAL, "unknown parameter '%s'", key);
		}
		if (ret)
			return ret;
	}
	pthread_mutex_lock(&vm->lock);
	vm->params = p;
	pthread_mutex_unlock(&vm->lock);
	/* downtime-limit, max-bandwidth and avail-switchover-bandwidth apply to
	 * a running migration too, as in QEMU; the others wait for the next. */
	vfm_migration_set_live_params(vm->mig, &p);
	return 0;
}

json_object *vm_query_params(struct vm *vm)
{
	json_object *o = json_object_new_object();
	struct vfm_migration_params p;

	pthread_mutex_lock(&vm->lock);
	p = vm->params;
	pthread_mutex_unlock(&vm->lock);
	json_object_object_add(o, "downtime-limit", ju64(p.downtime_limit_ms));
	json_object_object_add(o, "max-bandwidth", ju64(p.max_bandwidth));
	json_object_object_add(o, "avail-switchover-bandwidth", ju64(p.avail_switchover_bandwidth));
	json_object_object_add(o, "multifd-channels", ju64(p.multifd_channels));
	json_object_object_add(o, "switchover-ack", json_object_new_boolean(p.switchover_ack));
	json_object_object_add(o, "pre-copy-dirty-page-tracking",
			       json_object_new_boolean(p.pre_copy_dirty_page_tracking));
	json_object_object_add(o, "auto-converge", json_object_new_boolean(p.auto_converge));
	json_object_object_add(o, "cpu-throttle-initial", ju64(p.cpu_throttle_initial));
	json_object_object_add(o, "cpu-throttle-increment", ju64(p.cpu_throttle_increment));
	json_object_object_add(o, "device-throttle", json_object_new_boolean(p.device_throttle));
	json_object_object_add(o, "tls-creds", json_object_new_string(p.tls_creds));
	json_object_object_add(o, "tls-hostname", json_object_new_string(p.tls_hostname));
	{
		json_object *a = json_object_new_array();

		for (const char *q = p.tls_authz; *q;) {
			const char *nl = strchr(q, '\n');
			size_t n = nl ? (size_t)(nl - q) : strlen(q);

			json_object_array_add(a, json_object_new_string_len(q, (int)n));
			q += n + (nl ? 1 : 0);
		}
		json_object_object_add(o, "tls-authz", a);
	}
	json_object_object_add(o, "multifd-transfer", json_object_new_string(
		p.multifd_transfer == VFM_ON ? "on" : p.multifd_transfer == VFM_OFF ? "off" : "auto"));
	return o;
}

/* ---- Status objects ---- */

json_object *vm_query_migrate(struct vm *vm)
{
	struct vfm_migration_stats st;
	json_object *o = json_object_new_object();
	enum vfm_mig_status status;
	uint64_t limit;

	vfm_migration_get_stats(vm->mig, &st);
	pthread_mutex_lock(&vm->lock);
	/* The VM's copy: it changes only once the VM has acted on the change. */
	status = vm->mig_status;
	limit = status == VFM_MIG_NONE ? vm->params.downtime_limit_ms : st.downtime_limit_ms;
	pthread_mutex_unlock(&vm->lock);
	json_object_object_add(o, "status", json_object_new_string(vfm_mig_status_name(status)));
	json_object_object_add(o, "error", json_object_new_string(st.error));
	json_object_object_add(o, "downtime_ms", jdouble(st.downtime_ms));
	json_object_object_add(o, "expected_downtime_ms", jdouble(st.expected_downtime_ms));
	json_object_object_add(o, "downtime_limit_ms", ju64(limit));
	json_object_object_add(o, "downtime_same_clock",
			       json_object_new_boolean(st.downtime_from_same_clock));
	/* The switchover step by step (docs/control-protocol.md); sums to downtime_ms. */
	if (st.have_switchover) {
		json_object *tl = json_object_new_object(), *ex = json_object_new_object();

		for (unsigned i = 0; i < VFM_SWITCHOVER_STEPS; i++) {
			json_object_object_add(tl, vfm_switchover_step_name(i),
					       jdouble(st.switchover_ms[i]));
			json_object_object_add(ex, vfm_switchover_step_name(i),
					       jdouble(st.expected_switchover_ms[i]));
		}
		json_object_object_add(o, "switchover_ms", tl);
		/* What the engine expected of each step when it decided. */
		json_object_object_add(o, "expected_switchover_ms", ex);
	}
	json_object_object_add(o, "total_time_ms", ju64(st.total_time_ms));
	json_object_object_add(o, "setup_time_ms", ju64(st.setup_time_ms));
	json_object_object_add(o, "precopy_iterations", ju64(st.precopy_iterations));
	json_object_object_add(o, "transferred_bytes", ju64(st.transferred_bytes));
	json_object_object_add(o, "ram_transferred_bytes", ju64(st.ram_transferred_bytes));
	json_object_object_add(o, "device_transferred_bytes", ju64(st.device_transferred_bytes));
	json_object_object_add(o, "pending_bytes", ju64(st.pending_bytes));
	json_object_object_add(o, "bandwidth_bps", ju64((uint64_t)st.bandwidth_bps));
	json_object_object_add(o, "throughput_mbps", jdouble(st.throughput_mbps));
	json_object_object_add(o, "multifd_channels", ju64(st.multifd_channels));
	json_object_object_add(o, "multifd_ram_bytes", ju64(st.multifd_ram_bytes));
	json_object_object_add(o, "multifd_device_bytes", ju64(st.multifd_device_bytes));
	/* The convergence report (docs/architecture.md). */
	json_object_object_add(o, "converging", json_object_new_boolean(st.converging ||
									status != VFM_MIG_ACTIVE));
	json_object_object_add(o, "needed_downtime_ms", jdouble(st.needed_downtime_ms));
	json_object_object_add(o, "bottleneck", json_object_new_string(st.blocker));
	json_object_object_add(o, "unpaced", json_object_new_string(st.unpaced));
	json_object_object_add(o, "cpu_throttle_percentage", ju64(st.cpu_throttle_percentage));
	json_object_object_add(o, "device_throttle_percentage", ju64(st.device_throttle_percentage));
	{
		json_object *devs = json_object_new_array();

		for (unsigned i = 0; i < vm->ndevs; i++) {
			json_object *d = json_object_new_object();
			uint64_t pending;
			double rate;

			vfm_migration_device_pending(vm->mig, vm->devs[i].dev, &pending, &rate);
			json_object_object_add(d, "id", json_object_new_string(vm->devs[i].id));
			json_object_object_add(d, "pending_bytes", ju64(pending));
			json_object_object_add(d, "dirty_rate_bps", ju64((uint64_t)rate));
			json_object_array_add(devs, d);
		}
		json_object_object_add(o, "devices", devs);
	}
	return o;
}

json_object *vm_query_status(struct vm *vm)
{
	json_object *o = json_object_new_object();

	pthread_mutex_lock(&vm->lock);
	json_object_object_add(o, "status", json_object_new_string(vm_state_name(vm->state)));
	json_object_object_add(o, "running", json_object_new_boolean(vm->guest->running));
	pthread_mutex_unlock(&vm->lock);
	return o;
}

static json_object *flags_array(uint64_t flags)
{
	static const struct { uint64_t bit; const char *name; } names[] = {
		{ VFM_MIG_STOP_COPY, "STOP_COPY" }, { VFM_MIG_P2P, "P2P" },
		{ VFM_MIG_PRE_COPY, "PRE_COPY" },
	};
	json_object *a = json_object_new_array();

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (flags & names[i].bit)
			json_object_array_add(a, json_object_new_string(names[i].name));
	return a;
}

static json_object *device_object(struct vm *vm, struct vm_dev *vd)
{
	json_object *o = json_object_new_object();
	const char *src;
	bool valid;
	uint64_t csum, sc;

	json_object_object_add(o, "id", json_object_new_string(vd->id));
	json_object_object_add(o, "backend", json_object_new_string(vfm_device_backend(vd->dev)));
	json_object_object_add(o, "state",
			       json_object_new_string(vfm_state_name(vfm_device_state(vd->dev))));
	json_object_object_add(o, "flags", flags_array(vfm_device_mig_flags(vd->dev)));
	json_object_object_add(o, "transferred_bytes",
			       ju64(vfm_migration_device_transferred(vm->mig, vd->dev)));
	{
		uint64_t pending;
		double rate;

		vfm_migration_device_pending(vm->mig, vd->dev, &pending, &rate);
		json_object_object_add(o, "pending_bytes", ju64(pending));
		json_object_object_add(o, "dirty_rate_bps", ju64((uint64_t)rate));
	}
	/* The stop-copy size in use and where it comes from ("estimate": the
	 * device cannot say; docs/interop.md). */
	src = vfm_migration_device_stop_copy_size(vm->mig, vd->dev, &sc);
	if (src) {
		json_object_object_add(o, "stop_copy_size", ju64(sc));
		json_object_object_add(o, "stop_copy_size_source", json_object_new_string(src));
	}
	pthread_mutex_lock(&vm->lock);
	valid = vd->csum_valid;
	csum = vd->csum;
	pthread_mutex_unlock(&vm->lock);
	/* Before a point of agreement: the register as it is now. */
	if (vd->is_dma && (valid || !vfm_device_region_read(vd->dev, 0, DMADEV_REG_CHECKSUM, &csum,
							     sizeof(csum), NULL))) {
		char buf[24];

		snprintf(buf, sizeof(buf), "0x%016" PRIx64, csum);
		json_object_object_add(o, "state_checksum", json_object_new_string(buf));
	}
	json_object_object_add(o, "interrupts", ju64(atomic_load(&vd->interrupts)));
	if (vd->blocker[0])
		json_object_object_add(o, "migration_blocker", json_object_new_string(vd->blocker));
	return o;
}

static json_object *check_object(const struct vm_check *c)
{
	json_object *o;

	if (!c->valid)
		return NULL;
	o = json_object_new_object();
	json_object_object_add(o, "verified", json_object_new_boolean(c->v.verified));
	json_object_object_add(o, "errors", ju64(c->v.errors));
	json_object_object_add(o, "pages_checked", ju64(c->v.pages_checked));
	json_object_object_add(o, "detail", json_object_new_string(c->v.detail));
	json_object_object_add(o, "verify_ms", jdouble(c->ms));
	return o;
}

static json_object *guest_object(struct vm *vm)
{
	json_object *o = json_object_new_object();
	struct vfm_guest_stats gs = { 0 };
	const struct vm_check *last;

	if (vm->guest->ops->stats)
		vm->guest->ops->stats(vm->guest, &gs);
	pthread_mutex_lock(&vm->lock);
	last = vm->last_full ? &vm->full : &vm->quick;
	json_object_object_add(o, "kind", json_object_new_string(vm->guest->ops->kind));
	/* The top-level keys: the last check, whichever kind it was. */
	json_object_object_add(o, "verified", last->valid ?
			       json_object_new_boolean(last->v.verified) : NULL);
	json_object_object_add(o, "check", last->valid ?
			       json_object_new_string(vm->last_full ? "full" : "quick") : NULL);
	json_object_object_add(o, "errors", ju64(last->v.errors));
	json_object_object_add(o, "pages_checked", ju64(last->v.pages_checked));
	json_object_object_add(o, "detail", json_object_new_string(last->v.detail));
	json_object_object_add(o, "verify_ms", jdouble(last->ms));
	json_object_object_add(o, "quick", check_object(&vm->quick));
	json_object_object_add(o, "full", check_object(&vm->full));
	json_object_object_add(o, "running", json_object_new_boolean(vm->guest->running));
	pthread_mutex_unlock(&vm->lock);
	json_object_object_add(o, "page_writes", ju64(gs.page_writes));
	json_object_object_add(o, "dma_ops", ju64(gs.dma_ops));
	json_object_object_add(o, "dma_errors", ju64(gs.dma_errors));
#ifdef VFM_HAVE_KVM
	if (!strcmp(vm->guest->ops->kind, "kvm")) {
		/* How the vCPU threads ran (docs/kvm-guest.md): a guest-visible
		 * silence has a cause here when these move. */
		json_object *k = json_object_new_object();
		struct vfm_kvm_sched_info si;

		vfm_guest_kvm_sched_info(vm->guest, &si);
		json_object_object_add(k, "idle_waits", ju64(si.idle_waits));
		json_object_object_add(k, "idle_early", ju64(si.idle_early));
		json_object_object_add(k, "pauses", ju64(si.pauses));
		json_object_object_add(k, "vcpu_slice_us", jdouble((double)si.slice_ns / 1000.0));
		json_object_object_add(k, "tsc_advance_ms", jdouble((double)si.tsc_advance_ns / 1e6));
		json_object_object_add(k, "throttle_ms", jdouble((double)si.throttle_ns / 1e6));
		json_object_object_add(o, "kvm", k);
	}
#endif
	return o;
}

json_object *vm_query_vfiomig(struct vm *vm)
{
	json_object *o = json_object_new_object(), *v = json_object_new_object();
	json_object *devs = json_object_new_array();

	pthread_mutex_lock(&vm->lock);
	json_object_object_add(v, "state", json_object_new_string(vm_state_name(vm->state)));
	if (vm->incoming_req[0])
		json_object_object_add(v, "incoming_uri", json_object_new_string(
			vm->incoming_uri[0] ? vm->incoming_uri : vm->incoming_req));
	pthread_mutex_unlock(&vm->lock);
	json_object_object_add(o, "vm", v);
	json_object_object_add(o, "migration", vm_query_migrate(vm));
	for (unsigned i = 0; i < vm->ndevs; i++)
		json_object_array_add(devs, device_object(vm, &vm->devs[i]));
	json_object_object_add(o, "devices", devs);
	json_object_object_add(o, "guest", guest_object(vm));
	return o;
}

int vm_guest_verify(struct vm *vm, json_object **out, struct vfm_error *err)
{
	struct vfm_guest_verify v;
	uint64_t t0;
	bool was;
	int ret = 0;

	pthread_mutex_lock(&vm->lock);
	if (vm->state == VM_INMIGRATE) {
		pthread_mutex_unlock(&vm->lock);
		return vfm_error_set(err, -EBUSY, "the guest has not arrived yet (incoming migration)");
	}
	/* Parked vCPUs are between writes: memory and bookkeeping agree. */
	was = vm->guest->running;
	if (was)
		vm->guest->ops->stop(vm->guest);
	t0 = vm__mono_us();
	vm->guest->ops->verify(vm->guest, &v);
	vm->full = (struct vm_check){ .valid = true, .v = v,
				      .ms = (double)(vm__mono_us() - t0) / 1000.0 };
	vm->last_full = true;
	if (was)
		ret = vm->guest->ops->start(vm->guest, err);
	pthread_mutex_unlock(&vm->lock);
	if (ret)
		return ret;
	vfm_info(LOG, "guest verify: %s, %" PRIu64 " pages, %" PRIu64 " errors%s%s",
		 v.verified ? "ok" : "FAILED", v.pages_checked, v.errors, v.detail[0] ? ": " : "",
		 v.detail);
	*out = guest_object(vm);
	return 0;
}
