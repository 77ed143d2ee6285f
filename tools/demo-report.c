/* vfiomig demo: the result object (the JSON contract's demo keys, built from
 * both VMs' status) and its short human report. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "demo.h"
#include "vfiomig/parse.h"

/* The keys copied from the source's migration object, with their JSON type. */
static const struct {
	const char *key;
	bool is_double;
} mig_keys[] = {
	{ "downtime_ms", true },
	{ "expected_downtime_ms", true },
	{ "downtime_limit_ms", false },
	{ "total_time_ms", false },
	{ "setup_time_ms", false },
	{ "precopy_iterations", false },
	{ "transferred_bytes", false },
	{ "ram_transferred_bytes", false },
	{ "device_transferred_bytes", false },
	{ "throughput_mbps", true },
	{ "multifd_channels", false },
	{ "multifd_ram_bytes", false },
};

static json_object *get(json_object *o, const char *key)
{
	json_object *v = NULL;

	if (!o || !json_object_object_get_ex(o, key, &v))
		return NULL;
	return v;
}

static const char *get_str(json_object *o, const char *key, const char *dflt)
{
	json_object *v = get(o, key);

	return v && json_object_is_type(v, json_type_string) ? json_object_get_string(v) : dflt;
}

static double get_num(json_object *o, const char *key)
{
	json_object *v = get(o, key);

	return v ? json_object_get_double(v) : 0;
}

static uint64_t get_u64(json_object *o, const char *key)
{
	json_object *v = get(o, key);
	int64_t x = v ? json_object_get_int64(v) : 0;

	return x > 0 ? (uint64_t)x : 0;
}

/* Three decimals are plenty for ms and Mbit/s; json-c would print 17 digits. */
static json_object *new_double(double v)
{
	char text[64];

	snprintf(text, sizeof(text), "%.3f", v);
	return json_object_new_double_s(v, text);
}

json_object *demo_result_new(const char *guest_kind, const char *uri,
			     uint64_t downtime_limit_ms)
{
	json_object *res = json_object_new_object(), *guest = json_object_new_object();

	json_object_object_add(res, "verified", json_object_new_boolean(0));
	json_object_object_add(res, "error", json_object_new_string(""));
	json_object_object_add(guest, "kind", json_object_new_string(guest_kind));
	json_object_object_add(guest, "verified", NULL);
	json_object_object_add(res, "guest", guest);
	json_object_object_add(res, "devices", json_object_new_array());
	json_object_object_add(res, "uri", json_object_new_string(uri ? uri : ""));
	json_object_object_add(res, "live", json_object_new_boolean(1));
	for (size_t i = 0; i < sizeof(mig_keys) / sizeof(mig_keys[0]); i++)
		json_object_object_add(res, mig_keys[i].key, mig_keys[i].is_double ?
				       new_double(0) : json_object_new_int64(0));
	json_object_object_add(res, "downtime_limit_ms",
			       json_object_new_int64((int64_t)downtime_limit_ms));
	json_object_object_add(res, "downtime_from", json_object_new_string("source"));
	json_object_object_add(res, "timeline", json_object_new_array());
	return res;
}

void demo_result_set_downtime(json_object *res, double ms, const char *measured_by)
{
	json_object_object_add(res, "downtime_ms", new_double(ms));
	json_object_object_add(res, "downtime_from", json_object_new_string(measured_by));
}

void demo_result_event(json_object *res, double t_ms, const char *phase, const char *detail)
{
	json_object *ev = json_object_new_object(), *tl = get(res, "timeline");

	json_object_object_add(ev, "t_ms", json_object_new_int64((int64_t)(t_ms + 0.5)));
	json_object_object_add(ev, "phase", json_object_new_string(phase));
	json_object_object_add(ev, "detail", json_object_new_string(detail ? detail : ""));
	if (tl)
		json_object_array_add(tl, ev);
	else
		json_object_put(ev);
}

/* The first failure wins: it is usually the cause of the others. */
static bool fail(char *why, size_t len, bool *ok, const char *fmt, ...) VFM_PRINTF(4, 5);

static bool fail(char *why, size_t len, bool *ok, const char *fmt, ...)
{
	va_list ap;

	if (*ok && why && len) {
		va_start(ap, fmt);
		vsnprintf(why, len, fmt, ap);
		va_end(ap);
	}
	*ok = false;
	return false;
}

static json_object *find_device(json_object *devs, const char *id)
{
	size_t n = devs && json_object_is_type(devs, json_type_array) ?
		   json_object_array_length(devs) : 0;

	for (size_t i = 0; i < n; i++) {
		json_object *d = json_object_array_get_idx(devs, i);

		if (!strcmp(get_str(d, "id", ""), id))
			return d;
	}
	return NULL;
}

static void compare_devices(json_object *res, json_object *src_devs, json_object *dst_devs,
			    char *why, size_t why_len, bool *ok)
{
	json_object *out = json_object_new_array();
	size_t n = src_devs && json_object_is_type(src_devs, json_type_array) ?
		   json_object_array_length(src_devs) : 0;
	size_t n_dst = dst_devs && json_object_is_type(dst_devs, json_type_array) ?
		       json_object_array_length(dst_devs) : 0;

	if (!n)
		fail(why, why_len, ok, "the source reported no devices");
	if (n != n_dst)
		fail(why, why_len, ok, "the source has %zu devices, the destination %zu", n, n_dst);
	for (size_t i = 0; i < n; i++) {
		json_object *s = json_object_array_get_idx(src_devs, i);
		const char *id = get_str(s, "id", "?");
		json_object *d = find_device(dst_devs, id), *o = json_object_new_object();
		const char *sc = get_str(s, "state_checksum", NULL);
		const char *dc = d ? get_str(d, "state_checksum", NULL) : NULL;
		bool same = sc && dc && !strcmp(sc, dc);

		if (!d)
			fail(why, why_len, ok, "%s: not on the destination", id);
		else if (!sc || !dc)
			fail(why, why_len, ok, "%s: no state checksum reported (not a dma device?)", id);
		else if (!same)
			fail(why, why_len, ok, "%s: device state differs: source %s, destination %s",
			     id, sc, dc);
		json_object_object_add(o, "id", json_object_new_string(id));
		json_object_object_add(o, "source_checksum", sc ? json_object_new_string(sc) : NULL);
		json_object_object_add(o, "destination_checksum",
				       dc ? json_object_new_string(dc) : NULL);
		json_object_object_add(o, "transferred_bytes",
				       json_object_new_int64((int64_t)get_u64(s, "transferred_bytes")));
		json_object_object_add(o, "verified", json_object_new_boolean(same));
		json_object_array_add(out, o);
	}
	json_object_object_add(res, "devices", out);
}

/* One of the destination's checks (quick: on load; full: after it ran) into res. */
static json_object *guest_check(json_object *chk, const char *what, char *why, size_t why_len,
				bool *ok)
{
	json_object *o, *v = get(chk, "verified");
	const char *detail = get_str(chk, "detail", "");

	if (!chk || json_object_is_type(chk, json_type_null) || !v ||
	    !json_object_is_type(v, json_type_boolean)) {
		fail(why, why_len, ok, "the destination guest was never verified (%s check)", what);
		return NULL;
	}
	if (!json_object_get_boolean(v))
		fail(why, why_len, ok, "guest memory check failed on the destination (%s check): %"
		     PRIu64 " errors%s%s", what, get_u64(chk, "errors"), *detail ? ": " : "", detail);
	o = json_object_new_object();
	json_object_object_add(o, "verified", json_object_new_boolean(json_object_get_boolean(v)));
	json_object_object_add(o, "errors", json_object_new_int64((int64_t)get_u64(chk, "errors")));
	json_object_object_add(o, "pages_checked",
			       json_object_new_int64((int64_t)get_u64(chk, "pages_checked")));
	json_object_object_add(o, "detail", json_object_new_string(detail));
	json_object_object_add(o, "verify_ms", new_double(get_num(chk, "verify_ms")));
	return o;
}

/*
 * The guest is verified when both of the destination's checks passed: the
 * quick one on load (inside the downtime) and the full one after it ran.
 * The top-level errors, pages_checked and detail are the full check's (the
 * quick one's when it failed).
 */
static void compare_guest(json_object *res, json_object *dst_guest, char *why, size_t why_len,
			  bool *ok)
{
	json_object *g = json_object_new_object(), *q = NULL, *f = NULL, *top;
	const char *kind = get_str(dst_guest, "kind", get_str(get(res, "guest"), "kind", "?"));
	/* The first reason wins: the guest's only if nothing failed before. */
	char *gwhy = *ok ? why : NULL;
	bool verified = true;

	if (!dst_guest) {
		fail(gwhy, why_len, &verified, "the destination reported no guest");
	} else {
		q = guest_check(get(dst_guest, "quick"), "quick", gwhy, why_len, &verified);
		f = guest_check(get(dst_guest, "full"), "full", gwhy, why_len, &verified);
	}
	*ok = *ok && verified;
	top = q && !json_object_get_boolean(get(q, "verified")) ? q : f;
	json_object_object_add(g, "kind", json_object_new_string(kind));
	json_object_object_add(g, "verified", q || f ? json_object_new_boolean(verified) : NULL);
	json_object_object_add(g, "errors", json_object_new_int64((int64_t)get_u64(top, "errors")));
	json_object_object_add(g, "pages_checked",
			       json_object_new_int64((int64_t)get_u64(top, "pages_checked")));
	json_object_object_add(g, "detail", json_object_new_string(get_str(top, "detail", "")));
	json_object_object_add(g, "quick", q);
	json_object_object_add(g, "full", f);
	json_object_object_add(res, "guest", g);
}

bool demo_result_compare(json_object *res, json_object *src_status, json_object *dst_status,
			 char *why, size_t why_len)
{
	json_object *smig = get(src_status, "migration"), *dmig = get(dst_status, "migration");
	const char *sst = get_str(smig, "status", "none"), *dst = get_str(dmig, "status", "none");
	bool ok = true;

	if (why && why_len)
		why[0] = '\0';
	for (size_t i = 0; i < sizeof(mig_keys) / sizeof(mig_keys[0]); i++) {
		json_object *v = get(smig, mig_keys[i].key);

		if (!v)
			continue;
		json_object_object_add(res, mig_keys[i].key, mig_keys[i].is_double ?
				       new_double(json_object_get_double(v)) :
				       json_object_new_int64(json_object_get_int64(v)));
	}
	if (strcmp(sst, "completed"))
		fail(why, why_len, &ok, "the source migration ended %s%s%s", sst,
		     *get_str(smig, "error", "") ? ": " : "", get_str(smig, "error", ""));
	if (strcmp(dst, "completed"))
		fail(why, why_len, &ok, "the incoming migration ended %s%s%s", dst,
		     *get_str(dmig, "error", "") ? ": " : "", get_str(dmig, "error", ""));
	compare_devices(res, get(src_status, "devices"), get(dst_status, "devices"), why, why_len,
			&ok);
	compare_guest(res, get(dst_status, "guest"), why, why_len, &ok);
	json_object_object_add(res, "verified", json_object_new_boolean(ok));
	json_object_object_add(res, "error", json_object_new_string(ok || !why ? "" : why));
	return ok;
}

static const char *size_str(uint64_t bytes, char *buf, size_t len)
{
	return vfm_format_size(bytes, buf, len);
}

static void report_timeline(json_object *res, FILE *out)
{
	json_object *tl = get(res, "timeline");
	size_t n = tl && json_object_is_type(tl, json_type_array) ? json_object_array_length(tl) : 0;

	if (!n)
		return;
	fprintf(out, "timeline\n");
	for (size_t i = 0; i < n; i++) {
		json_object *ev = json_object_array_get_idx(tl, i);
		const char *detail = get_str(ev, "detail", "");

		if (*detail)
			fprintf(out, "  %7" PRIu64 " ms  %-18s %s\n", get_u64(ev, "t_ms"),
				get_str(ev, "phase", "?"), detail);
		else
			fprintf(out, "  %7" PRIu64 " ms  %s\n", get_u64(ev, "t_ms"),
				get_str(ev, "phase", "?"));
	}
}

static void report_migration(json_object *res, FILE *out)
{
	char all[32], ram[32], dev[32];

	fprintf(out, "migration\n");
	fprintf(out, "  transferred  %s (RAM %s, device state %s) in %" PRIu64 " ms, %.1f Mbit/s\n",
		size_str(get_u64(res, "transferred_bytes"), all, sizeof(all)),
		size_str(get_u64(res, "ram_transferred_bytes"), ram, sizeof(ram)),
		size_str(get_u64(res, "device_transferred_bytes"), dev, sizeof(dev)),
		get_u64(res, "total_time_ms"), get_num(res, "throughput_mbps"));
	fprintf(out, "  phases       setup %" PRIu64 " ms, %" PRIu64 " pre-copy iterations, "
		"%" PRIu64 " multifd channels\n", get_u64(res, "setup_time_ms"),
		get_u64(res, "precopy_iterations"), get_u64(res, "multifd_channels"));
	fprintf(out, "  downtime     %.1f ms measured%s, %.1f ms expected, limit %" PRIu64 " ms%s\n",
		get_num(res, "downtime_ms"),
		!strcmp(get_str(res, "downtime_from", "source"), "demo") ?
		" (stop to destination running, by the demo)" : "",
		get_num(res, "expected_downtime_ms"), get_u64(res, "downtime_limit_ms"),
		get_num(res, "downtime_ms") > (double)get_u64(res, "downtime_limit_ms") ?
		" (over the limit)" : "");
}

static void report_verification(json_object *res, FILE *out)
{
	json_object *g = get(res, "guest"), *devs = get(res, "devices"), *gv = get(g, "verified");
	size_t n = devs && json_object_is_type(devs, json_type_array) ?
		   json_object_array_length(devs) : 0;
	const char *detail = get_str(g, "detail", "");

	fprintf(out, "verification\n");
	if (!gv || json_object_is_type(gv, json_type_null))
		fprintf(out, "  guest        %s: not verified\n", get_str(g, "kind", "?"));
	else
		fprintf(out, "  guest        %s: %s, %" PRIu64 " pages checked, %" PRIu64
			" errors%s%s\n", get_str(g, "kind", "?"),
			json_object_get_boolean(gv) ? "ok" : "FAILED", get_u64(g, "pages_checked"),
			get_u64(g, "errors"), *detail ? ": " : "", detail);
	bool kvm = !strcmp(get_str(g, "kind", ""), "kvm");

	for (int k = 0; k < 2; k++) {
		json_object *c = get(g, k ? "full" : "quick");
		const char *how = k ? (kvm ? "every word, then the guest's own check, after it ran" :
				       "every word, after the guest ran") :
			(kvm ? "the host's check of the working set, on load: in the downtime" :
			 "table and 3 words a page, on load: in the downtime");

		if (!c || json_object_is_type(c, json_type_null)) {
			fprintf(out, "    %-10s did not run\n", k ? "full" : "quick");
			continue;
		}
		fprintf(out, "    %-10s %s, %" PRIu64 " pages in %.1f ms (%s)\n",
			k ? "full" : "quick", json_object_get_boolean(get(c, "verified")) ? "ok" :
			"FAILED", get_u64(c, "pages_checked"), get_num(c, "verify_ms"), how);
	}
	for (size_t i = 0; i < n; i++) {
		json_object *d = json_object_array_get_idx(devs, i);
		bool same = json_object_get_boolean(get(d, "verified"));

		fprintf(out, "  %-12s state checksum %s %s %s: %s\n", get_str(d, "id", "?"),
			get_str(d, "source_checksum", "(none)"), same ? "==" : "!=",
			get_str(d, "destination_checksum", "(none)"), same ? "ok" : "FAILED");
	}
}

void demo_report_human(json_object *res, FILE *out)
{
	bool verified = json_object_get_boolean(get(res, "verified"));
	const char *error = get_str(res, "error", "");
	json_object *live = get(res, "live");

	report_timeline(res, out);
	/* Nothing moved: the failure came first, the zeros would only distract. */
	if (verified || get_u64(res, "transferred_bytes"))
		report_migration(res, out);
	report_verification(res, out);
	if (verified)
		fprintf(out, "result: VERIFIED (%s migration over %s: no guest write and no device "
			"byte lost)\n", !live || json_object_get_boolean(live) ? "live" : "non-live",
			get_str(res, "uri", "?"));
	else
		fprintf(out, "result: NOT VERIFIED: %s\n", *error ? error : "unknown reason");
}

void demo_progress_line(json_object *mig, char *buf, size_t len)
{
	char sent[32], pend[32], rate[32];

	snprintf(buf, len, "%-14s %s sent, %s pending, %s/s", get_str(mig, "status", "?"),
		 size_str(get_u64(mig, "transferred_bytes"), sent, sizeof(sent)),
		 size_str(get_u64(mig, "pending_bytes"), pend, sizeof(pend)),
		 size_str((uint64_t)get_num(mig, "bandwidth_bps"), rate, sizeof(rate)));
	/* The convergence report: what downtime would work, and who holds it. */
	json_object *c = get(mig, "converging");
	size_t n = strlen(buf);

	if (c && !json_object_get_boolean(c) && n < len)
		snprintf(buf + n, len - n, ", NOT converging: needs ~%.0f ms downtime (%s)",
			 get_num(mig, "needed_downtime_ms"), get_str(mig, "bottleneck", "?"));
}
