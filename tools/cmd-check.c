/*
 * vfiomig check DEVICE: a conformance test of a device's migration for device
 * and driver authors: every supported arc, forbidden arcs, data session and
 * pre-copy semantics, save -> load, DMA logging, and (opt-in: they can corrupt
 * a driver that does not validate) corrupted streams. One line per check; the
 * device ends RUNNING with its original state loaded back.
 */
#include <errno.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "commands.h"
#include "devtool.h"

/*
 * WARN: the device departs from the uAPI where no migration depends on it
 * (the engine never asks that question); --strict counts it as a FAIL.
 */
enum { PASS, FAIL, SKIP, WARN };

struct ck {
	struct vfm_device *dev;
	uint64_t flags;
	bool json, dead;
	bool corrupt;         /* --unsafe-load-corrupt-streams */
	bool strict;          /* --strict: warnings fail */
	char dead_msg[VFM_ERROR_MSG_MAX];
	json_object *arr;
	unsigned n[4];
	uint64_t max_state;
	uint8_t *s0;          /* the device's state at the start (STOP_COPY stream) */
	size_t s0_len;
};

struct membuf {
	uint8_t *p;
	size_t len, cap, max;
};

static void check_usage(FILE *out)
{
	fprintf(out,
		"usage: vfiomig check DEVICE [--json] [--max-state SIZE] [--strict]\n"
		"                     [--unsafe-load-corrupt-streams] [-v]\n\n"
		"Walks a device through its migration uAPI and reports one line per check:\n"
		"every supported (from, to) state pair, forbidden arcs refused (without sending\n"
		"those that hang kernels), data session semantics, pre-copy info invariants,\n"
		"save -> load into the same device and DMA logging start/report/stop. The\n"
		"device is left RUNNING with its original state loaded back. Exit 0 when no\n"
		"check failed. A 'warn' line is a departure from the uAPI that no migration\n"
		"depends on (the kernel's mtty sample answers a DMA logging report after\n"
		"logging stopped); it fails only with --strict.\n\n"
		"  --max-state SIZE  largest device state held in memory (default 1G)\n"
		"  --strict          warnings fail too (exit 1)\n"
		"  --unsafe-load-corrupt-streams\n"
		"                    also load a corrupted and a truncated stream into the\n"
		"                    device and expect them refused. A driver that does not\n"
		"                    validate its stream loads the bad bytes as device state:\n"
		"                    the kernel's mtty sample takes a ring index from it and\n"
		"                    corrupts kernel memory. Never on a production device.\n\n"
		"DEVICE: vfio-user:SOCKET, vfio:/dev/vfio/devices/vfioN, vfio:0000:BB:DD.F, or an mdev:\n"
		"        vfio:UUID or vfio:/sys/bus/mdev/devices/UUID\n");
}

static void report(struct ck *c, int res, const char *name, const char *fmt, ...)
	VFM_PRINTF(4, 5);

static void report(struct ck *c, int res, const char *name, const char *fmt, ...)
{
	static const char *const words[] = { "pass", "FAIL", "skip", "warn" };
	static const char *const json_words[] = { "pass", "fail", "skip", "warn" };
	char detail[512] = "";
	va_list ap;

	if (fmt) {
		va_start(ap, fmt);
		vsnprintf(detail, sizeof(detail), fmt, ap);
		va_end(ap);
	}
	if (res == WARN && c->strict)
		res = FAIL;
	c->n[res]++;
	if (!c->json) {
		printf("%-4s  %s%s%s\n", words[res], name, detail[0] ? ": " : "", detail);
		fflush(stdout);
		return;
	}
	json_object *o = json_object_new_object();

	json_object_object_add(o, "name", json_object_new_string(name));
	json_object_object_add(o, "result", json_object_new_string(json_words[res]));
	json_object_object_add(o, "detail", json_object_new_string(detail));
	json_object_array_add(c->arr, o);
}

/* A connection that broke takes every later check with it, at once. */
static bool note_error(struct ck *c, int r, const struct vfm_error *e)
{
	if (r == -ENOTCONN || r == -EPIPE || r == -ECONNRESET || r == -ENODEV) {
		if (!c->dead)
			snprintf(c->dead_msg, sizeof(c->dead_msg), "%s", e && e->msg[0] ? e->msg :
				 vfm_strerror(r));
		c->dead = true;
	}
	return c->dead;
}

static bool skip_if_dead(struct ck *c, const char *name)
{
	if (c->dead)
		report(c, FAIL, name, "not run: the device is gone (%s)", c->dead_msg);
	return c->dead;
}

static int to_mem(void *opaque, const void *buf, size_t len, struct vfm_error *err)
{
	struct membuf *m = opaque;

	if (m->len + len > m->max)
		return vfm_error_set(err, -EFBIG, "device state beyond --max-state (%zu bytes)",
				     m->max);
	if (m->len + len > m->cap) {
		size_t cap = m->cap ? m->cap : 1u << 20;
		uint8_t *p;

		while (cap < m->len + len)
			cap *= 2;
		p = realloc(m->p, cap);
		if (!p)
			return vfm_error_set(err, -ENOMEM, "no memory for the device state");
		m->p = p;
		m->cap = cap;
	}
	memcpy(m->p + m->len, buf, len);
	m->len += len;
	return 0;
}

/* Back to RUNNING after a check, resetting if need be; false if it cannot. */
static bool rewind_running(struct ck *c)
{
	struct vfm_error e = { 0 };
	int r;

	if (vfm_device_state(c->dev) == VFM_STATE_RUNNING)
		return true;
	r = vfm_device_set_state(c->dev, VFM_STATE_RUNNING, VFM_STATE_ERROR, &e);
	if (r)
		note_error(c, r, &e);
	return vfm_device_state(c->dev) == VFM_STATE_RUNNING;
}

/* RESUMING with stream written, then STOP: 0, or where it failed. */
static int load_stream(struct ck *c, const uint8_t *p, size_t len, struct vfm_error *e)
{
	int r = vfm_device_set_state(c->dev, VFM_STATE_RESUMING, VFM_STATE_RUNNING, e);

	if (!r && len)
		r = vfm_device_write_data(c->dev, p, len, e);
	if (!r)
		r = vfm_device_set_state(c->dev, VFM_STATE_STOP, VFM_STATE_ERROR, e);
	note_error(c, r, e);
	return r;
}

static void check_save(struct ck *c)
{
	struct membuf m = { .max = c->max_state };
	struct vfm_error e = { 0 };
	uint64_t est = 0, total = 0;
	uint8_t extra[16];
	bool have_est;
	int r;

	if (skip_if_dead(c, "save: STOP_COPY stream to the end"))
		return;
	have_est = vfm_device_stop_copy_size(c->dev, &est, NULL) == 0;
	r = vfm_device_set_state(c->dev, VFM_STATE_STOP_COPY, VFM_STATE_RUNNING, &e);
	if (!r)
		r = devtool_read_stream(c->dev, to_mem, &m, &total, &e);
	if (r) {
		note_error(c, r, &e);
		report(c, FAIL, "save: STOP_COPY stream to the end", "%s", e.msg);
		free(m.p);
		rewind_running(c);
		return;
	}
	c->s0 = m.p;
	c->s0_len = m.len;
	if (have_est)
		report(c, PASS, "save: STOP_COPY stream to the end", "%zu bytes (estimate was %" PRIu64 ")",
		       m.len, est);
	else
		report(c, PASS, "save: STOP_COPY stream to the end", "%zu bytes (no size estimate)",
		       m.len);
	r = (int)vfm_device_read_data(c->dev, extra, sizeof(extra), &e);
	report(c, r == 0 ? PASS : FAIL, "save: end of stream stays the end",
	       r ? "a read after the end returned %d" : NULL, r);
	r = vfm_device_set_state(c->dev, VFM_STATE_STOP, VFM_STATE_RUNNING, &e);
	note_error(c, r, &e);
	rewind_running(c);
}

/* Enters s from RUNNING; RESUMING gets the saved stream at once. */
static int enter(struct ck *c, enum vfm_state s, struct vfm_error *e)
{
	int r = vfm_device_set_state(c->dev, s, VFM_STATE_RUNNING, e);

	if (!r && s == VFM_STATE_RESUMING)
		r = vfm_device_write_data(c->dev, c->s0, c->s0_len, e);
	return r;
}

static void check_arc(struct ck *c, enum vfm_state from, enum vfm_state to)
{
	struct vfm_error e = { 0 };
	enum vfm_state now = VFM_STATE_ERROR;
	char name[64];
	int r;

	snprintf(name, sizeof(name), "arc %s -> %s", vfm_state_name(from), vfm_state_name(to));
	if (skip_if_dead(c, name))
		return;
	if (from == VFM_STATE_RESUMING || to == VFM_STATE_RESUMING) {
		if (!c->s0) {
			report(c, SKIP, name, "no saved state to resume");
			return;
		}
	}
	r = enter(c, from, &e);
	if (r) {
		note_error(c, r, &e);
		report(c, FAIL, name, "getting to %s: %s", vfm_state_name(from), e.msg);
		rewind_running(c);
		return;
	}
	r = vfm_device_set_state(c->dev, to, VFM_STATE_RUNNING, &e);
	if (!r)
		r = vfm_device_query_state(c->dev, &now, &e);
	if (r) {
		note_error(c, r, &e);
		report(c, FAIL, name, "%s", e.msg);
	} else if (now != to) {
		report(c, FAIL, name, "the device reports %s", vfm_state_name(now));
	} else if (vfm_device_has_session(c->dev) != vfm_state_has_session(to)) {
		report(c, FAIL, name, "data session %s", vfm_state_has_session(to) ? "missing"
										  : "still open");
	} else if (to == VFM_STATE_RESUMING &&
		   (r = vfm_device_write_data(c->dev, c->s0, c->s0_len, &e))) {
		note_error(c, r, &e);
		report(c, FAIL, name, "writing the saved state: %s", e.msg);
	} else {
		report(c, PASS, name, NULL);
	}
	if (!rewind_running(c) && !c->dead)
		report(c, FAIL, "back to RUNNING", "after %s", name);
}

static void check_forbidden(struct ck *c)
{
	static const enum vfm_state targets[] = { VFM_STATE_PRE_COPY, VFM_STATE_PRE_COPY_P2P };
	struct vfm_error e = { 0 };

	for (size_t i = 0; i < 2; i++) {
		enum vfm_state now = VFM_STATE_ERROR;
		char name[64];
		int r;

		if (!vfm_state_supported(c->flags, targets[i]))
			continue;
		snprintf(name, sizeof(name), "forbidden: STOP_COPY -> %s refused",
			 vfm_state_name(targets[i]));
		if (skip_if_dead(c, name))
			return;
		r = vfm_device_set_state(c->dev, VFM_STATE_STOP_COPY, VFM_STATE_RUNNING, &e);
		if (r) {
			note_error(c, r, &e);
			report(c, FAIL, name, "getting to STOP_COPY: %s", e.msg);
			rewind_running(c);
			continue;
		}
		/* Refused here: some kernels loop forever when asked. */
		r = vfm_device_set_state(c->dev, targets[i], VFM_STATE_RUNNING, NULL);
		if (r == VFM_EFORBIDDEN && vfm_device_query_state(c->dev, &now, &e) == 0 &&
		    now == VFM_STATE_STOP_COPY)
			report(c, PASS, name, "never sent to the device");
		else
			report(c, FAIL, name, "got %d, device in %s", r, vfm_state_name(now));
		rewind_running(c);
	}
	if (!skip_if_dead(c, "forbidden: -> ERROR refused")) {
		int r = vfm_device_set_state(c->dev, VFM_STATE_ERROR, VFM_STATE_RUNNING, NULL);

		report(c, r == VFM_EFORBIDDEN ? PASS : FAIL, "forbidden: -> ERROR refused",
		       r == VFM_EFORBIDDEN ? NULL : "got %d", r);
	}
}


/* Pre-copy: initial bytes fall to 0, "nothing now" is reached, STOP_COPY
 * continues the same session to the end, and the whole stream loads. */
static void check_precopy(struct ck *c)
{
	struct membuf m = { .max = c->max_state };
	struct vfm_error e = { 0 };
	uint64_t init = 0, dirty = 0, last = UINT64_MAX, total;
	uint64_t bound = (uint64_t)c->s0_len * 4 + (64u << 20);
	bool info, falling = true, nothing_now = false;
	static uint8_t buf[1u << 20];
	int r;

	if (!(c->flags & VFM_MIG_PRE_COPY)) {
		report(c, SKIP, "pre-copy", "the device does not offer PRE_COPY");
		return;
	}
	if (skip_if_dead(c, "pre-copy: session opens"))
		return;
	r = vfm_device_set_state(c->dev, VFM_STATE_PRE_COPY, VFM_STATE_RUNNING, &e);
	if (r || !vfm_device_has_session(c->dev)) {
		note_error(c, r, &e);
		report(c, FAIL, "pre-copy: session opens", "%s", r ? e.msg : "no data session");
		rewind_running(c);
		return;
	}
	report(c, PASS, "pre-copy: session opens", NULL);
	r = vfm_device_precopy_info(c->dev, &init, &dirty, NULL);
	info = r == 0;
	if (!info)
		report(c, SKIP, "pre-copy info: initial bytes > 0, dirty bytes 0 at the start",
		       "no PRECOPY_INFO (%s)", vfm_strerror(r));
	else
		report(c, init > 0 && dirty == 0 ? PASS : FAIL,
		       "pre-copy info: initial bytes > 0, dirty bytes 0 at the start",
		       "initial %" PRIu64 ", dirty %" PRIu64, init, dirty);
	/* Read until "nothing now", bounded for devices that never run dry. */
	while (m.len < bound) {
		ssize_t n = vfm_device_read_data(c->dev, buf, sizeof(buf), &e);

		if (n == -ENOMSG || n == 0) {
			nothing_now = true;
			break;
		}
		if (n == -EAGAIN)
			continue;
		if (n < 0) {
			note_error(c, (int)n, &e);
			break;
		}
		if (to_mem(&m, buf, (size_t)n, &e))
			break;
		if (info && vfm_device_precopy_info(c->dev, &init, &dirty, NULL) == 0) {
			falling &= init <= last;
			last = init;
		}
	}
	if (nothing_now)
		report(c, PASS, "pre-copy: reads reach 'no data now' (ENOMSG)", "%zu bytes", m.len);
	else
		report(c, FAIL, "pre-copy: reads reach 'no data now' (ENOMSG)", "%s",
		       e.msg[0] ? e.msg : "never ran dry");
	if (info)
		report(c, falling && init == 0 ? PASS : FAIL,
		       "pre-copy info: initial bytes fall to 0 as read",
		       "initial %" PRIu64 " at the end%s", init, falling ? "" : ", it grew on the way");
	if (c->dead) {
		free(m.p);
		return;
	}
	r = vfm_device_set_state(c->dev, VFM_STATE_STOP_COPY, VFM_STATE_RUNNING, &e);
	if (!r && !vfm_device_has_session(c->dev))
		r = vfm_error_set(&e, VFM_ESESSION, "the session was lost");
	if (!r)
		r = devtool_read_stream(c->dev, to_mem, &m, &total, &e);
	note_error(c, r, &e);
	if (r)
		report(c, FAIL, "pre-copy: STOP_COPY continues the session to the end", "%s", e.msg);
	else
		report(c, PASS, "pre-copy: STOP_COPY continues the session to the end",
		       "%zu bytes in all", m.len);
	if (!r) {
		r = load_stream(c, m.p, m.len, &e);
		report(c, r ? FAIL : PASS, "pre-copy: the whole stream loads back", r ? "%s" : NULL,
		       e.msg);
	}
	free(m.p);
	rewind_running(c);
}

/* A stream the device must refuse: at the write or at RESUMING -> STOP. */
static void check_refused(struct ck *c, const char *name, const uint8_t *p, size_t len)
{
	struct vfm_error e = { 0 };
	int r;

	if (skip_if_dead(c, name))
		return;
	if (!c->s0) {
		report(c, SKIP, name, "no saved state");
		return;
	}
	r = load_stream(c, p, len, &e);
	if (c->dead)
		report(c, FAIL, name, "%s", e.msg);
	else if (r == 0)
		report(c, FAIL, name, "the device accepted it");
	else
		report(c, PASS, name, "%s", vfm_strerror(r));
	rewind_running(c);
}

static void check_streams(struct ck *c)
{
	uint8_t *bad;

	if (!c->corrupt) {
		report(c, SKIP, "corrupted and truncated streams refused",
		       "they load bad bytes into the device: --unsafe-load-corrupt-streams");
		return;
	}
	bad = c->s0 ? malloc(c->s0_len) : NULL;
	if (bad) {
		memcpy(bad, c->s0, c->s0_len);
		bad[c->s0_len / 2] ^= 0xff;
		check_refused(c, "corrupted stream refused", bad, c->s0_len);
		free(bad);
	} else {
		check_refused(c, "corrupted stream refused", NULL, 0);
	}
	check_refused(c, "truncated stream refused", c->s0, c->s0_len / 2);
}

/*
 * A 1 MiB memfd window DMA-mapped at IOVA 0 for the logging checks: a device
 * may require a report to cover mapped memory (libvfio-user answers ENOENT
 * otherwise, lib/dma.c dma_controller_dirty_page_get() at efd091b), and
 * logging what is not mapped tests nothing. Returns false (and reports why)
 * when the window cannot be had.
 */
#define LOG_WINDOW (1u << 20)

static bool map_window(struct ck *c, void **mem, struct vfm_error *e)
{
	struct vfm_dma_map map = { .iova = 0, .size = LOG_WINDOW,
				   .prot = VFM_DMA_READ | VFM_DMA_WRITE, .fd = -1 };
	int fd = memfd_create("vfiomig-check", MFD_CLOEXEC), r;

	*mem = MAP_FAILED;
	if (fd < 0 || ftruncate(fd, LOG_WINDOW)) {
		report(c, FAIL, "DMA logging: map a 1 MiB window", "memfd: %s", strerror(errno));
		goto fail;
	}
	*mem = mmap(NULL, LOG_WINDOW, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (*mem == MAP_FAILED) {
		report(c, FAIL, "DMA logging: map a 1 MiB window", "mmap: %s", strerror(errno));
		goto fail;
	}
	map.fd = fd;
	map.vaddr = *mem;
	r = vfm_device_dma_map(c->dev, &map, e);
	note_error(c, r, e);
	if (r) {
		report(c, FAIL, "DMA logging: map a 1 MiB window", "%s", e->msg);
		munmap(*mem, LOG_WINDOW);
		*mem = MAP_FAILED;
		goto fail;
	}
	close(fd);
	report(c, PASS, "DMA logging: map a 1 MiB window", "IOVA 0");
	return true;
fail:
	if (fd >= 0)
		close(fd);
	return false;
}

static void check_logging(struct ck *c)
{
	struct vfm_iova_range range = { 0, LOG_WINDOW };
	uint64_t bits[LOG_WINDOW / 4096 / 64] = { 0 }, pg = 4096;
	struct vfm_error e = { 0 };
	unsigned dirty = 0;
	void *mem;
	int r;

	if (!vfm_device_has_dma_logging(c->dev)) {
		report(c, SKIP, "DMA logging", "the device does not offer DMA logging");
		return;
	}
	if (skip_if_dead(c, "DMA logging: start") || !map_window(c, &mem, &e))
		return;
	r = vfm_device_log_start(c->dev, &range, 1, &pg, &e);
	note_error(c, r, &e);
	if (r)
		report(c, FAIL, "DMA logging: start", "%s", e.msg);
	else
		report(c, PASS, "DMA logging: start", "page size %" PRIu64, pg);
	if (r)
		goto unmap;
	r = vfm_device_log_report(c->dev, 0, LOG_WINDOW, 4096, bits, &e);
	for (size_t i = 0; i < sizeof(bits) / sizeof(bits[0]); i++)
		dirty += (unsigned)__builtin_popcountll(bits[i]);
	note_error(c, r, &e);
	if (r == -EOPNOTSUPP)
		/* The kernel's, not the driver's: vfio core without iova_bitmap
		 * (no CONFIG_IOMMUFD_DRIVER, Debian's 6.12) fails every REPORT. */
		report(c, SKIP, "DMA logging: report", "not available here (%s): migrations "
		       "track with the IOMMU or count all memory dirty", e.msg);
	else if (r)
		report(c, FAIL, "DMA logging: report", "%s", e.msg);
	else
		report(c, PASS, "DMA logging: report", "%u dirty pages", dirty);
	r = vfm_device_log_stop(c->dev, &e);
	note_error(c, r, &e);
	report(c, r ? FAIL : PASS, "DMA logging: stop", r ? "%s" : NULL, e.msg);
	if (!r && !c->dead) {
		/* Refused for the right reason: logging is off, not a broken link. */
		e = (struct vfm_error){ 0 };
		r = vfm_device_log_report(c->dev, 0, LOG_WINDOW, 4096, bits, &e);
		note_error(c, r, &e);
		/* vfio.h: "If DMA logging is not enabled, an error will be
		 * returned." mtty's stub (mtty_log_read_and_clear: return 0)
		 * answers anyway; the engine never reports after it stopped
		 * logging, so no migration depends on it: a warning. */
		if (!r)
			report(c, WARN, "DMA logging: report after stop refused", "it succeeded "
			       "(vfio.h: an error with logging off; no migration asks it)");
		else
			report(c, c->dead ? FAIL : PASS, "DMA logging: report after stop refused",
			       c->dead ? "%s" : NULL, e.msg);
	}
unmap:
	if (!c->dead) {
		e = (struct vfm_error){ 0 };
		r = vfm_device_dma_unmap(c->dev, 0, LOG_WINDOW, 0, NULL, &e);
		note_error(c, r, &e);
		if (r)
			report(c, FAIL, "DMA logging: unmap the window", "%s", e.msg);
	}
	munmap(mem, LOG_WINDOW);
}

static void check_all(struct ck *c)
{
	struct vfm_error e = { 0 };
	enum vfm_state st;
	char fb[64];
	int r = vfm_device_probe_migration(c->dev, &e);

	if (r) {
		note_error(c, r, &e);
		report(c, FAIL, "migration supported", "%s", e.msg);
		return;
	}
	c->flags = vfm_device_mig_flags(c->dev);
	report(c, PASS, "migration supported", "%s", vfm_mig_flags_str(c->flags, fb, sizeof(fb)));
	st = vfm_device_state(c->dev);
	report(c, st == VFM_STATE_RUNNING ? PASS : FAIL, "device RUNNING at the start", "%s",
	       vfm_state_name(st));
	if (!rewind_running(c))
		return;
	check_save(c);
	for (int from = 1; from < VFM_STATE_COUNT; from++)
		for (int to = 1; to < VFM_STATE_COUNT; to++)
			if (from != to && vfm_state_supported(c->flags, from) &&
			    vfm_state_supported(c->flags, to) &&
			    !(from == VFM_STATE_STOP_COPY && (to == VFM_STATE_PRE_COPY ||
							      to == VFM_STATE_PRE_COPY_P2P)))
				check_arc(c, from, to);
	check_forbidden(c);
	check_precopy(c);
	check_streams(c);
	check_logging(c);
	/* Last: the original state goes back in, which is the round trip check. */
	if (!skip_if_dead(c, "save -> load round trip into the same device")) {
		if (!c->s0) {
			report(c, SKIP, "save -> load round trip into the same device", "no saved state");
		} else {
			r = load_stream(c, c->s0, c->s0_len, &e);
			if (r)
				report(c, FAIL, "save -> load round trip into the same device", "%s",
				       e.msg);
			else
				report(c, PASS, "save -> load round trip into the same device",
				       "%zu bytes", c->s0_len);
		}
	}
	if (!skip_if_dead(c, "device RUNNING at the end")) {
		rewind_running(c);
		r = vfm_device_query_state(c->dev, &st, &e);
		report(c, !r && st == VFM_STATE_RUNNING ? PASS : FAIL, "device RUNNING at the end",
		       "%s", r ? e.msg : vfm_state_name(st));
	}
}

static int check_run(const char *spec, bool json, bool corrupt, bool strict, uint64_t max_state)
{
	struct ck c = { .json = json, .corrupt = corrupt, .strict = strict, .max_state = max_state };
	struct vfm_device_props props;
	struct vfm_error e = { 0 };
	int r;

	r = devtool_open(spec, &c.dev, &props, &e);
	if (r) {
		fprintf(stderr, "vfiomig check: %s\n", e.msg);
		return VFM_EXIT_FAIL;
	}
	c.arr = json_object_new_array();
	check_all(&c);
	if (json) {
		json_object *root = json_object_new_object();

		json_object_object_add(root, "device", json_object_new_string(spec));
		json_object_object_add(root, "checks", c.arr);
		json_object_object_add(root, "passed", json_object_new_int((int)c.n[PASS]));
		json_object_object_add(root, "failed", json_object_new_int((int)c.n[FAIL]));
		json_object_object_add(root, "skipped", json_object_new_int((int)c.n[SKIP]));
		json_object_object_add(root, "warned", json_object_new_int((int)c.n[WARN]));
		json_object_object_add(root, "ok", json_object_new_boolean(c.n[FAIL] == 0));
		printf("%s\n", json_object_to_json_string_ext(root, JSON_C_TO_STRING_PLAIN));
		json_object_put(root);
	} else {
		json_object_put(c.arr);
		printf("%u checks: %u passed, %u failed, %u skipped, %u warned%s\n",
		       c.n[PASS] + c.n[FAIL] + c.n[SKIP] + c.n[WARN], c.n[PASS], c.n[FAIL],
		       c.n[SKIP], c.n[WARN],
		       c.dead ? " (the device went away)" : "");
	}
	free(c.s0);
	vfm_device_free(c.dev);
	return c.n[FAIL] ? VFM_EXIT_FAIL : VFM_EXIT_OK;
}

int cmd_check(int argc, char **argv)
{
	const char *spec = NULL;
	uint64_t max_state = 1ull << 30;
	struct vfm_error e = { 0 };
	bool json = false, corrupt = false, strict = false;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			check_usage(stdout);
			return VFM_EXIT_OK;
		} else if (!strcmp(argv[i], "--json")) {
			json = true;
		} else if (!strcmp(argv[i], "--unsafe-load-corrupt-streams")) {
			corrupt = true;
		} else if (!strcmp(argv[i], "--strict")) {
			strict = true;
		} else if (!strcmp(argv[i], "--max-state") && i + 1 < argc) {
			if (vfm_parse_size(argv[++i], &max_state, &e) || !max_state) {
				fprintf(stderr, "vfiomig check: --max-state: %s\n",
					e.msg[0] ? e.msg : "must not be 0");
				return VFM_EXIT_USAGE;
			}
		} else if (argv[i][0] == '-' || spec) {
			fprintf(stderr, "vfiomig check: unexpected argument '%s'\n", argv[i]);
			check_usage(stderr);
			return VFM_EXIT_USAGE;
		} else {
			spec = argv[i];
		}
	}
	if (!spec) {
		fprintf(stderr, "vfiomig check: which DEVICE?\n");
		check_usage(stderr);
		return VFM_EXIT_USAGE;
	}
	if (!devtool_spec_ok("check", spec))
		return VFM_EXIT_USAGE;
	return check_run(spec, json, corrupt, strict, max_state);
}
