/*
 * The VM object's lifecycle and its glue to the migration engine: guest
 * memory, devices (opened, DMA-mapped, interrupts wired), the guest, the
 * engine's vm_ops and status callback, and the incoming thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "../devices/dma.h"
#include "util/logging.h"
#include "util/thread.h"
#include "vfiomig/fsm.h"
#include "vfiomig/vfio.h"
#include "vfiomig/vfio_user.h"
#include "vmm/vm-priv.h"
#ifdef VFM_HAVE_KVM
#include "vmm/kvm.h"
#endif

#define LOG "vm"
#define PCI_CONFIG_REGION 7
#define VFIO_PCI_INTX_IRQ_INDEX 0
#define VFIO_PCI_MSI_IRQ_INDEX 1
/* The incoming thread reports its listener at once; this only bounds a hang. */
#define INCOMING_READY_TIMEOUT_S 30

static const char *const state_names[] = {
	[VM_RUNNING] = "running", [VM_PAUSED] = "paused", [VM_INMIGRATE] = "inmigrate",
	[VM_POSTMIGRATE] = "postmigrate", [VM_SHUTDOWN] = "shutdown",
};

const char *vm_state_name(enum vm_state s)
{
	return (unsigned)s < sizeof(state_names) / sizeof(state_names[0]) ? state_names[s] : "?";
}

uint64_t vm__mono_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

bool vm__mig_active(enum vfm_mig_status st)
{
	return st == VFM_MIG_SETUP || st == VFM_MIG_ACTIVE || st == VFM_MIG_PRE_SWITCHOVER ||
	       st == VFM_MIG_DEVICE || st == VFM_MIG_CANCELLING;
}

void vm__event(struct vm *vm, const char *name, json_object *data)
{
	if (!data)
		data = json_object_new_object();
	pthread_mutex_lock(&vm->sink_lock);
	if (vm->event_fn)
		vm->event_fn(vm->event_opaque, name, data);
	else
		json_object_put(data);
	pthread_mutex_unlock(&vm->sink_lock);
}

void vm_set_event_sink(struct vm *vm, vm_event_fn fn, void *opaque)
{
	pthread_mutex_lock(&vm->sink_lock);
	vm->event_fn = fn;
	vm->event_opaque = opaque;
	pthread_mutex_unlock(&vm->sink_lock);
}

/* ---- Guest run state ---- */

int vm__guest_start_locked(struct vm *vm, struct vfm_error *err)
{
	int ret;

	if (vm->guest->running)
		return 0;
	/*
	 * Devices run with their guest, as QEMU's vmstate handler puts them in
	 * RUNNING when the VM runs. One found stopped at open (the kernel keeps
	 * an mdev's migration state across close: mtty opens in STOP after a
	 * migration left it there) would otherwise stay stopped, and pre-copy
	 * skips a stopped device.
	 */
	for (unsigned i = 0; i < vm->ndevs; i++) {
		struct vm_dev *vd = &vm->devs[i];
		enum vfm_state st = vfm_device_state(vd->dev);

		if (st != VFM_STATE_STOP && st != VFM_STATE_RUNNING_P2P)
			continue;
		vfm_info(vd->id, "found in %s: to RUNNING with the guest", vfm_state_name(st));
		if ((ret = vfm_device_set_state(vd->dev, VFM_STATE_RUNNING, VFM_STATE_ERROR, err)))
			return ret;
	}
	ret = vm->guest->ops->start(vm->guest, err);
	if (ret)
		return ret;
	vm->state = VM_RUNNING;
	vm__event(vm, "RESUME", NULL);
	return 0;
}

void vm__guest_stop_locked(struct vm *vm)
{
	if (!vm->guest->running)
		return;
	vm->guest->ops->stop(vm->guest);
	vm__event(vm, "STOP", NULL);
}

/* ---- The engine's view of the VM (migration or incoming thread) ---- */

static int ops_stop(void *opaque)
{
	struct vm *vm = opaque;

	pthread_mutex_lock(&vm->lock);
	vm->was_running = vm->guest->running;
	vm__guest_stop_locked(vm);
	vm->state = VM_PAUSED;
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

static int ops_start(void *opaque)
{
	struct vm *vm = opaque;
	struct vfm_error err = { 0 };
	int ret = 0;

	pthread_mutex_lock(&vm->lock);
	/* The destination always runs what arrived; a source that rolls back
	 * runs again only if it ran before the switchover (and is not exiting). */
	if (vm->state == VM_SHUTDOWN) {
		ret = 0;
	} else if (vm->role == VM_ROLE_INCOMING || vm->was_running) {
		ret = vm__guest_start_locked(vm, &err);
		if (ret)
			vfm_err(LOG, "starting the guest: %s", err.msg);
	} else {
		vm->state = VM_PAUSED;
	}
	pthread_mutex_unlock(&vm->lock);
	return ret;
}

void vm__capture_checksums(struct vm *vm)
{
	for (unsigned i = 0; i < vm->ndevs; i++) {
		struct vm_dev *vd = &vm->devs[i];
		struct vfm_error err = { 0 };
		uint64_t v;

		if (!vd->is_dma)
			continue;
		if (vfm_device_region_read(vd->dev, 0, DMADEV_REG_CHECKSUM, &v, sizeof(v), &err)) {
			vfm_warn(vd->id, "reading CHECKSUM: %s", err.msg);
			continue;
		}
		pthread_mutex_lock(&vm->lock);
		vd->csum = v;
		vd->csum_valid = true;
		pthread_mutex_unlock(&vm->lock);
		vfm_info(vd->id, "state checksum 0x%016" PRIx64, v);
	}
}

/*
 * Destination: all state in, devices in STOP, nothing runs yet. All of this
 * is migration downtime: the checksums are needed now (the devices change
 * once they run) and the guest gets its quick check only; the full one is
 * guest-verify's, once the guest runs.
 */
static void ops_loaded(void *opaque)
{
	struct vm *vm = opaque;
	struct vfm_guest_verify v;
	uint64_t t0, t1;
	double ms;

	t0 = vm__mono_us();
	vm__capture_checksums(vm);
	t1 = vm__mono_us();
	pthread_mutex_lock(&vm->lock);
	if (vm->guest->ops->quick_verify)
		vm->guest->ops->quick_verify(vm->guest, &v);
	else
		vm->guest->ops->verify(vm->guest, &v);
	ms = (double)(vm__mono_us() - t1) / 1000.0;
	vm->quick = (struct vm_check){ .valid = true, .v = v, .ms = ms };
	vm->last_full = false;
	pthread_mutex_unlock(&vm->lock);
	vfm_info(LOG, "loaded: device checksums read in %.3f ms, quick guest check in %.3f ms",
		 (double)(t1 - t0) / 1000.0, ms);
	if (v.verified)
		vfm_info(LOG, "guest quick check after load: ok, %" PRIu64 " pages", v.pages_checked);
	else
		vfm_err(LOG, "guest quick check after load FAILED: %" PRIu64 " errors, first: %s",
			v.errors, v.detail);
}

static void ops_log_sync(void *opaque)
{
	struct vm *vm = opaque;
	int r;

	/* KVM's dirty log into the memory layer before the engine collects. */
	if (!vm->guest->ops->sync_dirty)
		return;
	r = vm->guest->ops->sync_dirty(vm->guest);
	if (r < 0) {
		vfm_warn(LOG, "guest dirty log: %s: all memory dirty", strerror(-r));
		vfm_dirty_mark_all(vm->mem);
	}
}

/* auto-converge: the guest's vCPUs, and the dma devices' churn (THROTTLE). */
static void ops_throttle(void *opaque, unsigned vcpu_pct, unsigned device_pct)
{
	struct vm *vm = opaque;

	if (vm->guest->ops->set_throttle)
		vm->guest->ops->set_throttle(vm->guest, vcpu_pct);
	else if (vcpu_pct)
		vfm_warn(LOG, "auto-converge: the %s guest cannot be throttled",
			 vm->guest->ops->kind);
	for (unsigned i = 0; i < vm->ndevs; i++) {
		struct vm_dev *vd = &vm->devs[i];
		struct vfm_error err = { 0 };
		uint64_t v = device_pct;

		if (vd->is_dma && vfm_device_region_write(vd->dev, 0, DMADEV_REG_THROTTLE, &v,
							  sizeof(v), &err))
			vfm_warn(vd->id, "device throttle: %s", err.msg);
	}
}

/* What ops_stop will take, timed without stopping (the guest's kick). */
static uint64_t ops_kick_ns(void *opaque)
{
	struct vm *vm = opaque;
	uint64_t ns = 0;

	pthread_mutex_lock(&vm->lock);
	if (vm->guest->running && vm->guest->ops->kick_ns)
		ns = vm->guest->ops->kick_ns(vm->guest);
	pthread_mutex_unlock(&vm->lock);
	return ns;
}

static const struct vfm_vm_ops vm_ops = {
	.stop = ops_stop,
	.start = ops_start,
	.loaded = ops_loaded,
	.log_sync = ops_log_sync,
	.throttle = ops_throttle,
	.kick_ns = ops_kick_ns,
};

/* Any thread the engine runs on; the VM's side effects come before clients see st. */
static void on_mig_status(void *opaque, enum vfm_mig_status st)
{
	struct vm *vm = opaque;
	json_object *data;
	enum vm_role role;

	pthread_mutex_lock(&vm->lock);
	role = vm->role;
	pthread_mutex_unlock(&vm->lock);
	/* Devices are in STOP now and nothing changes them: the source's point. */
	if (role == VM_ROLE_SOURCE && st == VFM_MIG_COMPLETED)
		vm__capture_checksums(vm);
	pthread_mutex_lock(&vm->lock);
	if (role == VM_ROLE_SOURCE && st == VFM_MIG_COMPLETED)
		vm->state = VM_POSTMIGRATE;
	vm->mig_status = st;
	pthread_mutex_unlock(&vm->lock);
	data = json_object_new_object();
	json_object_object_add(data, "status", json_object_new_string(vfm_mig_status_name(st)));
	vm__event(vm, "MIGRATION", data);
}

int vm__build_migration(struct vm *vm, struct vfm_migration **out, struct vfm_error *err)
{
	struct vfm_migration *m;
	int ret;

	ret = vfm_migration_new(vm->mem, &vm_ops, vm, &m, err);
	if (ret)
		return ret;
#ifdef VFM_HAVE_KVM
	/* First, before the devices: the same order on both sides. */
	if (!strcmp(vm->guest->ops->kind, "kvm") &&
	    (ret = vfm_guest_kvm_register(vm->guest, m, NULL, err))) {
		vfm_migration_free(m);
		return ret;
	}
#endif
	for (unsigned i = 0; i < vm->ndevs; i++) {
		struct vm_dev *vd = &vm->devs[i];
		struct vfm_error e = { 0 };

		vd->in_migration = false;
		vd->blocker[0] = '\0';
		if (vd->props.enable_migration == VFM_OFF) {
			vfm_error_set(&e, -EPERM, "%s: enable-migration=off: this VM cannot migrate",
				      vd->id);
			memcpy(vd->blocker, e.msg, sizeof(vd->blocker));
			continue;
		}
		ret = vfm_migration_add_device(m, vd->dev, &vd->props, &e);
		if (ret && vd->props.enable_migration == VFM_ON) {
			vfm_migration_free(m);
			return vfm_error_set(err, ret, "%s (enable-migration=on)", e.msg);
		}
		if (ret) {
			/* auto: the VM runs, but cannot migrate (QEMU's migration blocker). */
			memcpy(vd->blocker, e.msg, sizeof(vd->blocker));
			vfm_warn(vd->id, "%s: this VM cannot migrate", e.msg);
			continue;
		}
		vd->in_migration = true;
	}
	vfm_migration_set_event_cb(m, on_mig_status, vm);
	*out = m;
	return 0;
}

/* ---- Devices ---- */

static void on_dma_write(uint64_t iova, uint64_t len, void *opaque)
{
	/* A DMA_WRITE message (a window without fd): mark it like a vCPU write. */
	vfm_dirty_mark(opaque, iova, len);
}

static void wire_irq(struct vm_dev *vd)
{
	static const struct { uint32_t index; const char *kind; } order[] = {
		{ VFIO_PCI_MSI_IRQ_INDEX, "msi" }, { VFIO_PCI_INTX_IRQ_INDEX, "intx" },
	};

	if (!vfm_device_is_vfio_user(vd->dev))
		return;   /* kernel VFIO interrupts: not wired yet (no KVM irqfd) */
	for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
		struct vfm_irq_info info;
		struct vfm_error err = { 0 };
		int fd;

		if (vfm_vfio_user_irq_info(vd->dev, order[i].index, &info, NULL) || !info.count ||
		    !(info.flags & VFM_IRQ_INFO_EVENTFD))
			continue;
		fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		if (fd < 0)
			return;
		if (vfm_vfio_user_set_irqs(vd->dev, order[i].index,
					   VFM_IRQ_SET_DATA_EVENTFD | VFM_IRQ_SET_ACTION_TRIGGER, 0, 1,
					   &fd, &err)) {
			vfm_warn(vd->id, "wiring %s: %s", order[i].kind, err.msg);
			close(fd);
			continue;
		}
		vd->irq_fd = fd;
		vd->irq_kind = order[i].kind;
		vfm_debug(vd->id, "interrupts: %s vector 0 on an eventfd", order[i].kind);
		return;
	}
}

static bool detect_dma(struct vm_dev *vd)
{
	uint32_t ids;

	if (vfm_device_region_read(vd->dev, PCI_CONFIG_REGION, 0, &ids, sizeof(ids), NULL))
		return false;
	return (ids & 0xffff) == DMADEV_VENDOR_ID && (ids >> 16) == DMADEV_DEVICE_ID;
}

static int open_device(struct vm *vm, const char *spec, unsigned idx, struct vfm_error *err)
{
	struct vm_dev *vd = &vm->devs[idx];
	char path[512];
	int ret;

	vd->irq_fd = -1;
	ret = vfm_device_spec_parse(spec, vd->backend, sizeof(vd->backend), path, sizeof(path),
				    &vd->props, err);
	if (ret)
		return ret;
	if (!vd->props.id[0])
		snprintf(vd->props.id, sizeof(vd->props.id), "dev%u", idx);
	_Static_assert(sizeof(vd->id) == sizeof(vd->props.id), "id sizes");
	memcpy(vd->id, vd->props.id, sizeof(vd->id));
	for (unsigned i = 0; i < idx; i++)
		if (!strcmp(vm->devs[i].id, vd->id))
			return vfm_error_set(err, -EEXIST, "two devices with id '%s'", vd->id);
	if (!strcmp(vd->backend, "vfio-user")) {
		struct vfm_vfio_user_opts o = {
			.version = VFM_VFIO_USER_OPTS_V1, .id = vd->id,
			.dma_dirty = on_dma_write, .dma_dirty_opaque = vm->mem,
		};
		ret = vfm_vfio_user_open(path, &o, &vd->dev, err);
	} else {
		struct vfm_vfio_opts o = { .version = VFM_VFIO_OPTS_V1, .id = vd->id };
		ret = vfm_vfio_open(path, &o, &vd->dev, err);
	}
	if (ret)
		return vfm_error_set(err, ret, "device %s (%s)", vd->id, spec);
	for (unsigned r = 0; r < vfm_guest_mem_num_regions(vm->mem); r++) {
		const struct vfm_mem_region *reg = vfm_guest_mem_region(vm->mem, r);
		struct vfm_dma_map map = {
			.iova = reg->gpa, .size = reg->size, .prot = VFM_DMA_READ | VFM_DMA_WRITE,
			.fd = reg->fd, .fd_offset = reg->fd_offset, .vaddr = reg->host,
		};

		ret = vfm_device_dma_map(vd->dev, &map, err);
		if (ret)
			return vfm_error_set(err, ret, "device %s: mapping guest memory for DMA", vd->id);
	}
	vd->is_dma = detect_dma(vd);
	wire_irq(vd);
	vfm_info(vd->id, "%s %s%s", vd->backend, path, vd->is_dma ? " (dma sample device)" : "");
	return 0;
}

/* ---- Lifecycle ---- */

static int make_kvm_guest(struct vm *vm, const struct vm_config *cfg, struct vfm_error *err)
{
#ifdef VFM_HAVE_KVM
	struct vfm_device *dma[VM_MAX_DEVICES];
	struct vfm_kvm_opts ko = {
		.vcpus = cfg->vcpus, .dirty_rate = cfg->dirty_rate,
		.working_set = cfg->working_set, .fresh = !cfg->incoming, .dma_devs = dma,
		.heartbeat = cfg->heartbeat, .heartbeat_us = cfg->heartbeat_us,
		.vcpu_slice_us = cfg->vcpu_slice_us,
	};
	char why[256];

	/* The guest program drives the dma devices through their BARs. */
	for (unsigned i = 0; i < vm->ndevs; i++)
		if (vm->devs[i].is_dma)
			dma[ko.ndma++] = vm->devs[i].dev;
	if (!vfm_kvm_available(why, sizeof(why)))
		return vfm_error_set(err, -ENODEV, "--guest kvm: %s", why);
	return vfm_guest_kvm_new(vm->mem, &ko, &vm->guest, err);
#else
	(void)vm;
	(void)cfg;
	return vfm_error_set(err, -ENOTSUP, "--guest kvm: this build has no KVM guest "
			     "(x86-64 Linux with linux/kvm.h only)");
#endif
}

static int make_guest(struct vm *vm, const struct vm_config *cfg, struct vfm_error *err)
{
	const char *kind = cfg->guest ? cfg->guest : "synthetic";
	struct vfm_device *dma[VM_MAX_DEVICES];
	struct vfm_synthetic_opts so = {
		.vcpus = cfg->vcpus, .dirty_rate = cfg->dirty_rate, .fresh = !cfg->incoming,
		.dma_devs = dma,
	};

#ifdef VFM_HAVE_KVM
	if (!strcmp(kind, "auto"))
		kind = vfm_kvm_available(NULL, 0) ? "kvm" : "synthetic";
#else
	if (!strcmp(kind, "auto"))
		kind = "synthetic";
#endif
	if (!strcmp(kind, "none"))
		return vfm_guest_none_new(vm->mem, &vm->guest, err);
	if (!strcmp(kind, "kvm"))
		return make_kvm_guest(vm, cfg, err);
	if (strcmp(kind, "synthetic"))
		return vfm_error_set(err, -EINVAL, "unknown guest '%s' (synthetic, kvm, auto, none)",
				     kind);
	for (unsigned i = 0; i < vm->ndevs; i++)
		if (vm->devs[i].is_dma)
			dma[so.ndma++] = vm->devs[i].dev;
	return vfm_guest_synthetic_new(vm->mem, &so, &vm->guest, err);
}

int vm_create(const struct vm_config *cfg, struct vm **out, struct vfm_error *err)
{
	struct vm *vm = calloc(1, sizeof(*vm));
	int ret;

	if (!vm)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	pthread_mutex_init(&vm->lock, NULL);
	pthread_mutex_init(&vm->sink_lock, NULL);
	pthread_cond_init(&vm->cond, NULL);
	vfm_migration_params_default(&vm->params);
	if (cfg->tls_creds)
		snprintf(vm->params.tls_creds, sizeof(vm->params.tls_creds), "%s", cfg->tls_creds);
	vm->params.insecure = cfg->insecure;
	snprintf(vm->params.tls_authz, sizeof(vm->params.tls_authz), "%s", cfg->tls_authz);
	vm->state = cfg->incoming ? VM_INMIGRATE : VM_PAUSED;
	vm->role = cfg->incoming ? VM_ROLE_INCOMING : VM_ROLE_SOURCE;
	if (cfg->incoming)
		snprintf(vm->incoming_req, sizeof(vm->incoming_req), "%s", cfg->incoming);
	for (unsigned i = 0; i < VM_MAX_DEVICES; i++)
		vm->devs[i].irq_fd = -1;
	*out = vm;

	if (cfg->ndevices > VM_MAX_DEVICES)
		return vfm_error_set(err, -E2BIG, "at most %d devices", VM_MAX_DEVICES);
	ret = vfm_guest_mem_new(4096, &vm->mem, err);
	if (!ret)
		ret = vfm_guest_mem_add(vm->mem, 0, cfg->mem_size, "ram", err);
	if (ret)
		return vfm_error_set(err, ret, "guest memory of %" PRIu64 " bytes", cfg->mem_size);
	for (unsigned i = 0; i < cfg->ndevices; i++) {
		ret = open_device(vm, cfg->devices[i], i, err);
		vm->ndevs = i + 1;    /* what was opened is closed by vm_destroy */
		if (ret)
			return ret;
	}
	ret = make_guest(vm, cfg, err);
	if (ret)
		return ret;
	return vm__build_migration(vm, &vm->mig, err);
}

static void on_incoming_ready(void *opaque, const char *uri)
{
	struct vm *vm = opaque;

	pthread_mutex_lock(&vm->lock);
	snprintf(vm->incoming_uri, sizeof(vm->incoming_uri), "%s", uri);
	vm->incoming_ready = true;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	vfm_info(LOG, "waiting for an incoming migration on %s", uri);
}

static void *incoming_main(void *arg)
{
	struct vm *vm = arg;
	struct vfm_migration_params p;
	struct vfm_error err = { 0 };
	char uri[sizeof(vm->incoming_uri)];
	bool retry;
	int ret;

	snprintf(uri, sizeof(uri), "%s", vm->incoming_req);
	/* A socket listener takes the next attempt after a failed one (the
	 * source rolled back and may try again); a file is read once. */
	retry = !strncmp(uri, "tcp:", 4) || !strncmp(uri, "unix:", 5);
	for (;;) {
		pthread_mutex_lock(&vm->lock);
		p = vm->params;
		pthread_mutex_unlock(&vm->lock);
		vfm_error_clear(&err);
		ret = vfm_migration_incoming(vm->mig, uri, &p, on_incoming_ready, vm, &err);
		pthread_mutex_lock(&vm->lock);
		if (vm->incoming_ready)
			snprintf(uri, sizeof(uri), "%s", vm->incoming_uri);   /* port 0 resolved */
		if (!ret || !vm->incoming_ready || !retry || vm->state == VM_SHUTDOWN ||
		    ret == VFM_ECANCELED)
			break;
		pthread_mutex_unlock(&vm->lock);
		vfm_err(LOG, "incoming migration failed: %s; waiting for another on %s", err.msg, uri);
	}
	vm->incoming_ended = true;
	vm->incoming_ret = ret;
	snprintf(vm->incoming_err, sizeof(vm->incoming_err), "%s", err.msg);
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	if (ret && vm->incoming_ready)
		vfm_err(LOG, "incoming migration failed: %s (the guest does not run)", err.msg);
	return NULL;
}

int vm_run(struct vm *vm, struct vfm_error *err)
{
	struct timespec deadline;
	int ret = 0;

	if (vm->role == VM_ROLE_SOURCE) {
		pthread_mutex_lock(&vm->lock);
		ret = vm__guest_start_locked(vm, err);
		pthread_mutex_unlock(&vm->lock);
		return ret;
	}
	ret = vfm_thread_create(&vm->incoming_thread, NULL, incoming_main, vm);
	if (ret)
		return vfm_error_set(err, -ret, "starting the incoming thread");
	vm->incoming_thread_live = true;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += INCOMING_READY_TIMEOUT_S;
	pthread_mutex_lock(&vm->lock);
	while (!vm->incoming_ready && !vm->incoming_ended && ret != ETIMEDOUT)
		ret = pthread_cond_timedwait(&vm->cond, &vm->lock, &deadline);
	if (!vm->incoming_ready)
		ret = vfm_error_set(err, vm->incoming_ended ? vm->incoming_ret : -ETIMEDOUT,
				    "--incoming %s: %s", vm->incoming_req,
				    vm->incoming_ended ? vm->incoming_err : "the listener did not start");
	else
		ret = 0;
	pthread_mutex_unlock(&vm->lock);
	return ret;
}

void vm_shutdown(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	vm__guest_stop_locked(vm);
	vm->state = VM_SHUTDOWN;
	pthread_mutex_unlock(&vm->lock);
}

void vm_destroy(struct vm *vm)
{
	bool ended;

	if (!vm)
		return;
	pthread_mutex_lock(&vm->lock);
	ended = vm->incoming_ended;
	pthread_mutex_unlock(&vm->lock);
	if (vm->incoming_thread_live && !ended) {
		/* Waiting for a source or loading: cut it short (devices are reset
		 * as after any failed load), then join. */
		vfm_debug(LOG, "cancelling the incoming migration");
		vfm_migration_incoming_cancel(vm->mig);
	}
	if (vm->incoming_thread_live)
		pthread_join(vm->incoming_thread, NULL);
	/* Cancels and joins an outgoing migration; devices are still ours. */
	vfm_migration_free(vm->mig);
	if (vm->guest)
		vm->guest->ops->destroy(vm->guest);
	for (unsigned i = 0; i < vm->ndevs; i++) {
		vfm_device_free(vm->devs[i].dev);
		if (vm->devs[i].irq_fd >= 0)
			close(vm->devs[i].irq_fd);
	}
	vfm_guest_mem_free(vm->mem);
	pthread_cond_destroy(&vm->cond);
	pthread_mutex_destroy(&vm->sink_lock);
	pthread_mutex_destroy(&vm->lock);
	free(vm);
}

/* ---- Main loop share ---- */

static uint64_t mono_ms(void)
{
	return vm__mono_us() / 1000;
}

unsigned vm_poll_fds(struct vm *vm, struct pollfd *pfd, unsigned max)
{
	uint64_t now = mono_ms();
	unsigned n = 0;

	for (unsigned i = 0; i < vm->ndevs && n + 2 <= max; i++) {
		struct vm_dev *vd = &vm->devs[i];

		if (vfm_device_is_vfio_user(vd->dev) && !vd->poll_dead && now >= vd->poll_backoff_until)
			pfd[n++] = (struct pollfd){ .fd = vfm_vfio_user_poll_fd(vd->dev), .events = POLLIN };
		if (vd->irq_fd >= 0)
			pfd[n++] = (struct pollfd){ .fd = vd->irq_fd, .events = POLLIN };
	}
	return n;
}

void vm_poll_handle(struct vm *vm, const struct pollfd *pfd, unsigned n)
{
	for (unsigned k = 0; k < n; k++) {
		if (!pfd[k].revents)
			continue;
		for (unsigned i = 0; i < vm->ndevs; i++) {
			struct vm_dev *vd = &vm->devs[i];
			struct vfm_error err = { 0 };
			uint64_t count;
			int r;

			if (pfd[k].fd == vd->irq_fd) {
				if (read(vd->irq_fd, &count, sizeof(count)) == sizeof(count))
					atomic_fetch_add(&vd->interrupts, count);
				break;
			}
			if (!vfm_device_is_vfio_user(vd->dev) || vd->poll_dead ||
			    pfd[k].fd != vfm_vfio_user_poll_fd(vd->dev))
				continue;
			r = vfm_vfio_user_poll(vd->dev, &err);
			if (r < 0) {
				vfm_err(vd->id, "device connection lost: %s", err.msg);
				vd->poll_dead = true;
			} else if (r == 0) {
				/* Another thread's request is in flight and serves what
				 * arrived: look again shortly rather than spin. */
				vd->poll_backoff_until = mono_ms() + 2;
			}
			break;
		}
	}
}
