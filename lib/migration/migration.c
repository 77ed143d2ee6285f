/* The migration object: registry of savable state, devices, status and stats. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "migration/engine.h"
#include "util/logging.h"
#include "vfiomig/vfio.h"

static const char *const status_names[] = {
	[VFM_MIG_NONE] = "none", [VFM_MIG_SETUP] = "setup", [VFM_MIG_ACTIVE] = "active",
	[VFM_MIG_PRE_SWITCHOVER] = "pre-switchover", [VFM_MIG_DEVICE] = "device",
	[VFM_MIG_COMPLETED] = "completed", [VFM_MIG_FAILED] = "failed",
	[VFM_MIG_CANCELLING] = "cancelling", [VFM_MIG_CANCELLED] = "cancelled",
};

const char *vfm_mig_status_name(enum vfm_mig_status s)
{
	return (unsigned)s < sizeof(status_names) / sizeof(status_names[0]) ? status_names[s]
									      : "unknown";
}

uint64_t vfm__now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void vfm__boot_id(char out[37])
{
	FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");

	out[0] = '\0';
	if (!f)
		return;
	if (!fgets(out, 37, f) || strlen(out) != 36)
		out[0] = '\0';
	fclose(f);
}

bool vfm__same_boot(const char *id)
{
	char mine[37];

	vfm__boot_id(mine);
	return mine[0] && memcmp(mine, id, 36) == 0;
}

void vfm_device_props_default(struct vfm_device_props *p)
{
	memset(p, 0, sizeof(*p));
	p->enable_migration = VFM_AUTO;
	p->allow_pre_copy = true;
	p->pre_copy_dirty_page_tracking = true;
	p->device_dirty_page_tracking = true;
	p->multifd_transfer = VFM_AUTO;
}

void vfm_migration_params_default(struct vfm_migration_params *p)
{
	memset(p, 0, sizeof(*p));
	p->downtime_limit_ms = 300;
	p->switchover_ack = true;
	p->pre_copy_dirty_page_tracking = true;
	p->multifd_channels = 2;
	p->multifd_transfer = VFM_AUTO;
	p->timeout_ms = 10000;
	p->max_queued_buffers_size = 64ull << 20;
	p->cpu_throttle_initial = 20;
	p->cpu_throttle_increment = 10;
}

static int prop_bool(const char *key, const char *val, bool *out, struct vfm_error *err)
{
	enum vfm_onoff v;
	int ret = vfm_parse_onoff(val, false, &v, err);

	if (ret)
		return vfm_error_set(err, ret, "device property %s", key);
	*out = v == VFM_ON;
	return 0;
}

int vfm_device_spec_parse(const char *spec, char *backend, size_t backend_len, char *path,
			  size_t path_len, struct vfm_device_props *props, struct vfm_error *err)
{
	char buf[1024];
	char *save = NULL, *tok, *colon;
	int ret = 0;

	vfm_device_props_default(props);
	if (!spec || strlen(spec) >= sizeof(buf))
		return vfm_error_set(err, -EINVAL, "device spec missing or too long");
	snprintf(buf, sizeof(buf), "%s", spec);
	tok = strtok_r(buf, ",", &save);
	colon = tok ? strchr(tok, ':') : NULL;
	if (!colon || colon == tok || !colon[1])
		return vfm_error_set(err, -EINVAL,
				     "device '%s': expected vfio-user:PATH or vfio:DEVICE", spec);
	*colon = '\0';
	if (strcmp(tok, "vfio-user") && strcmp(tok, "vfio"))
		return vfm_error_set(err, -EINVAL, "device '%s': unknown backend '%s' "
				     "(vfio-user or vfio)", spec, tok);
	if (strlen(tok) >= backend_len || strlen(colon + 1) >= path_len)
		return vfm_error_set(err, -ENAMETOOLONG, "device '%s': name too long", spec);
	strcpy(backend, tok);
	strcpy(path, colon + 1);

	while (!ret && (tok = strtok_r(NULL, ",", &save))) {
		char *eq = strchr(tok, '=');
		const char *val;

		if (!eq)
			return vfm_error_set(err, -EINVAL, "device property '%s' needs =VALUE", tok);
		*eq = '\0';
		val = eq + 1;
		if (!strcmp(tok, "id")) {
			if (!*val || strlen(val) >= sizeof(props->id))
				return vfm_error_set(err, -EINVAL, "device id '%s' empty or too long", val);
			strcpy(props->id, val);
		} else if (!strcmp(tok, "enable-migration")) {
			ret = vfm_parse_onoff(val, true, &props->enable_migration, err);
		} else if (!strcmp(tok, "allow-pre-copy")) {
			ret = prop_bool(tok, val, &props->allow_pre_copy, err);
		} else if (!strcmp(tok, "pre-copy-dirty-page-tracking")) {
			ret = prop_bool(tok, val, &props->pre_copy_dirty_page_tracking, err);
		} else if (!strcmp(tok, "device-dirty-page-tracking")) {
			ret = prop_bool(tok, val, &props->device_dirty_page_tracking, err);
		} else if (!strcmp(tok, "migration-multifd-transfer")) {
			ret = vfm_parse_onoff(val, true, &props->multifd_transfer, err);
		} else if (!strcmp(tok, "stop-copy-size")) {
			struct vfm_error e = { 0 };

			ret = vfm_parse_size(val, &props->stop_copy_size, &e);
			if (ret)
				return vfm_error_set(err, ret, "device property stop-copy-size: %s", e.msg);
			props->stop_copy_size_set = true;
		} else {
			return vfm_error_set(err, -EINVAL, "unknown device property '%s' (id, "
					     "enable-migration, allow-pre-copy, "
					     "pre-copy-dirty-page-tracking, "
					     "device-dirty-page-tracking, migration-multifd-transfer, "
					     "stop-copy-size)", tok);
		}
	}
	return ret;
}

int vfm_migration_new(struct vfm_guest_mem *mem, const struct vfm_vm_ops *vm, void *vm_opaque,
		      struct vfm_migration **out, struct vfm_error *err)
{
	struct vfm_migration *m = calloc(1, sizeof(*m));
	int ret;

	if (!m)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	m->mem = mem;
	m->vm = vm;
	m->vm_opaque = vm_opaque;
	pthread_mutex_init(&m->lock, NULL);
	vfm_migration_params_default(&m->params);
	m->stats.downtime_limit_ms = m->params.downtime_limit_ms;
	atomic_init(&m->cancel, false);
	atomic_init(&m->sock_fd, -1);
	if (mem) {
		ret = vfm__ram_create(m, err);
		if (ret) {
			free(m);
			return ret;
		}
	}
	*out = m;
	return 0;
}

void vfm_migration_free(struct vfm_migration *m)
{
	if (!m)
		return;
	vfm_migration_cancel(m);
	vfm_migration_wait(m, -1);
	for (unsigned i = 0; i < m->ndevs; i++) {
		vfm_vfio_set_cancel_check(m->devs[i]->dev, NULL, NULL);
		free(m->devs[i]->buf);
		free(m->devs[i]);
	}
	vfm__ram_destroy(m->ram);
	pthread_mutex_destroy(&m->lock);
	free(m);
}

static struct vfm_savable *add_savable(struct vfm_migration *m, const char *name,
				       uint32_t section, uint32_t version,
				       const struct vfm_savable_ops *ops, void *opaque,
				       struct vfm_error *err)
{
	struct vfm_savable *sv;

	if (m->nsv >= VFM_MAX_SAVABLES) {
		vfm_error_set(err, -ENOSPC, "too many savable entries");
		return NULL;
	}
	if (!name || !*name || strlen(name) >= VFM_SAVABLE_NAME_MAX) {
		vfm_error_set(err, -EINVAL, "savable name empty or too long");
		return NULL;
	}
	for (unsigned i = 0; i < m->nsv; i++) {
		if (!strcmp(m->sv[i].name, name)) {
			vfm_error_set(err, -EEXIST, "savable '%s' registered twice", name);
			return NULL;
		}
	}
	sv = &m->sv[m->nsv++];
	memset(sv, 0, sizeof(*sv));
	snprintf(sv->name, sizeof(sv->name), "%s", name);
	sv->section = section;
	sv->version = version;
	sv->ops = ops;
	sv->opaque = opaque;
	atomic_init(&sv->acked, false);
	return sv;
}

/* Internal: RAM registers itself with section 1. */
int vfm__register_ram(struct vfm_migration *m, const struct vfm_savable_ops *ops, void *opaque,
		      struct vfm_error *err);
int vfm__register_ram(struct vfm_migration *m, const struct vfm_savable_ops *ops, void *opaque,
		      struct vfm_error *err)
{
	return add_savable(m, "ram", 1, 1, ops, opaque, err) ? 0 : err ? err->code : -EINVAL;
}

int vfm_migration_register(struct vfm_migration *m, const char *name, uint32_t version,
			   const struct vfm_savable_ops *ops, void *opaque, struct vfm_error *err)
{
	uint32_t next = 64;

	for (unsigned i = 0; i < m->nsv; i++)
		if (m->sv[i].section >= next)
			next = m->sv[i].section + 1;
	if (!ops)
		return vfm_error_set(err, -EINVAL, "savable '%s' without ops", name ? name : "");
	return add_savable(m, name, next, version, ops, opaque, err) ? 0 : err ? err->code : -EINVAL;
}

/* A kernel device's data fd waits end on this (lib/vfio/mig.c). */
static bool mig_cancelled(void *opaque)
{
	struct vfm_migration *m = opaque;

	return atomic_load(&m->cancel) || atomic_load(&m->in_cancel);
}

int vfm_migration_add_device(struct vfm_migration *m, struct vfm_device *dev,
			     const struct vfm_device_props *props, struct vfm_error *err)
{
	struct vfm_device_props defaults;
	struct vfm_mig_device *md;
	char name[VFM_SAVABLE_NAME_MAX];
	int ret;

	if (!props) {
		vfm_device_props_default(&defaults);
		props = &defaults;
	}
	if (props->enable_migration == VFM_OFF)
		return vfm_error_set(err, -EPERM, "%s: enable-migration=off: this VM cannot migrate",
				     vfm_device_id(dev));
	if (m->ndevs >= VFM_MAX_DEVICES)
		return vfm_error_set(err, -ENOSPC, "too many devices (max %d)", VFM_MAX_DEVICES);
	ret = vfm_device_probe_migration(dev, err);
	if (ret)
		return vfm_error_set(err, ret, "%s: cannot migrate", vfm_device_id(dev));
	md = calloc(1, sizeof(*md));
	if (!md)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	md->m = m;
	md->dev = dev;
	md->props = *props;
	md->flags = vfm_device_mig_flags(dev);
	if (snprintf(name, sizeof(name), "vfio:%s", props->id[0] ? props->id : vfm_device_id(dev)) >=
	    (int)sizeof(name)) {
		free(md);
		return vfm_error_set(err, -ENAMETOOLONG, "%s: device id too long (max %d)",
				     vfm_device_id(dev), VFM_SAVABLE_NAME_MAX - 6);
	}
	if (!add_savable(m, name, 16 + m->ndevs, 1, &vfm__vfio_savable_ops, md, err)) {
		free(md);
		return err ? err->code : -EINVAL;
	}
	m->devs[m->ndevs++] = md;
	vfm_vfio_set_cancel_check(dev, mig_cancelled, m);
	return 0;
}

void vfm_migration_set_event_cb(struct vfm_migration *m,
				void (*cb)(void *opaque, enum vfm_mig_status st), void *opaque)
{
	pthread_mutex_lock(&m->lock);
	m->event_cb = cb;
	m->event_opaque = opaque;
	pthread_mutex_unlock(&m->lock);
}

void vfm__mig_set_status(struct vfm_migration *m, enum vfm_mig_status st)
{
	void (*cb)(void *, enum vfm_mig_status);
	void *opaque;

	pthread_mutex_lock(&m->lock);
	/* Once cancelling, only the end (cancelled, or failed/completed) shows. */
	if (m->stats.status == VFM_MIG_CANCELLING && st != VFM_MIG_CANCELLED &&
	    st != VFM_MIG_FAILED && st != VFM_MIG_COMPLETED) {
		pthread_mutex_unlock(&m->lock);
		return;
	}
	m->stats.status = st;
	cb = m->event_cb;
	opaque = m->event_opaque;
	pthread_mutex_unlock(&m->lock);
	vfm_info("migration", "status %s", vfm_mig_status_name(st));
	if (cb)
		cb(opaque, st);
}

enum vfm_mig_status vfm__mig_status(struct vfm_migration *m)
{
	enum vfm_mig_status st;

	pthread_mutex_lock(&m->lock);
	st = m->stats.status;
	pthread_mutex_unlock(&m->lock);
	return st;
}

void vfm__mig_set_error(struct vfm_migration *m, const struct vfm_error *err)
{
	pthread_mutex_lock(&m->lock);
	if (!m->stats.error[0])
		snprintf(m->stats.error, sizeof(m->stats.error), "%s",
			 err && err->msg[0] ? err->msg : err ? vfm_strerror(err->code) : "failed");
	pthread_mutex_unlock(&m->lock);
}

void vfm_migration_get_stats(struct vfm_migration *m, struct vfm_migration_stats *st)
{
	pthread_mutex_lock(&m->lock);
	*st = m->stats;
	pthread_mutex_unlock(&m->lock);
}

const char *vfm_migration_device_stop_copy_size(struct vfm_migration *m,
						const struct vfm_device *dev, uint64_t *bytes)
{
	static const char *const names[] = { NULL, "device", "property", "estimate", "unknown" };

	for (unsigned i = 0; i < m->ndevs; i++) {
		if (m->devs[i]->dev == dev) {
			int src = atomic_load(&m->devs[i]->sc_source);

			*bytes = atomic_load(&m->devs[i]->sc_bytes);
			return src > 0 && src < 5 ? names[src] : NULL;
		}
	}
	*bytes = 0;
	return NULL;
}

uint64_t vfm_migration_device_transferred(struct vfm_migration *m, const struct vfm_device *dev)
{
	/* The device list is fixed once migrations run; the count is atomic. */
	for (unsigned i = 0; i < m->ndevs; i++)
		if (m->devs[i]->dev == dev)
			return atomic_load(&m->devs[i]->transferred);
	return 0;
}

void vfm_migration_device_pending(struct vfm_migration *m, const struct vfm_device *dev,
				  uint64_t *pending, double *dirty_rate_bps)
{
	*pending = 0;
	*dirty_rate_bps = 0;
	for (unsigned i = 0; i < m->nsv; i++) {
		const struct vfm_savable *sv = &m->sv[i];

		if (sv->ops != &vfm__vfio_savable_ops ||
		    ((const struct vfm_mig_device *)sv->opaque)->dev != dev)
			continue;
		pthread_mutex_lock(&m->lock);
		*pending = sv->rpt_pending;
		*dirty_rate_bps = sv->rpt_dirty_rate;
		pthread_mutex_unlock(&m->lock);
		return;
	}
}

void vfm_migration_set_live_params(struct vfm_migration *m, const struct vfm_migration_params *p)
{
	pthread_mutex_lock(&m->lock);
	if (m->thread_running) {
		m->params.downtime_limit_ms = p->downtime_limit_ms;
		m->params.max_bandwidth = p->max_bandwidth;
		m->params.avail_switchover_bandwidth = p->avail_switchover_bandwidth;
		m->stats.downtime_limit_ms = p->downtime_limit_ms;
		m->params_changed = true;
	}
	pthread_mutex_unlock(&m->lock);
}
