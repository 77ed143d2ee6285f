/*
 * vfiomig demo: the main job. Starts dma device servers and two VMs as child
 * processes in a private temp dir, migrates the source live, and verifies.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <unistd.h>

#include "commands.h"
#include "ctl-client.h"
#include "demo.h"
#include "tls-gen.h"
#include "vfiomig/log.h"
#include "vfiomig/parse.h"
#ifdef VFM_HAVE_KVM
#include "vmm/kvm.h"
#endif

#define DEMO_MAX_DEVICES 16
/* Bounds of the waits: generous, they only turn a hang into an error. */
#define DEMO_SOCKET_WAIT_MS 10000
#define DEMO_CMD_TIMEOUT_MS 5000
#define DEMO_STOP_GRACE_MS 2000
#define DEMO_POLL_MS 20

struct demo_opts {
	bool json;
	const char *guest;      /* synthetic or kvm (auto is resolved at start) */
	char guest_why[160];    /* --guest auto: why this kind */
	uint64_t mem, device_state, dirty_rate, downtime_limit_ms, save_latency_us;
	unsigned devices;
	int channels;           /* -1: leave the VM's default */
	const char *uri;        /* NULL: TCP loopback, a free port */
	const char *tls;        /* "x509" or "psk": throwaway credentials; NULL: plain */
};

struct demo {
	struct demo_opts o;
	char dir[128];
	struct demo_child devs[2 * DEMO_MAX_DEVICES];   /* sources, then destinations */
	struct demo_child vms[2];                        /* source, destination */
	bool devs_alive[2 * DEMO_MAX_DEVICES], vms_alive[2];  /* when cleanup began */
	struct ctl_client *ctl[2];
	char uri[256];          /* the migration URI, port resolved */
	char tls_creds[200];    /* --tls: KIND:DIR of the credentials made, "" for none */
	bool file_mode;         /* file:: save a stopped VM, then load it */
	bool migrating;         /* migrate was sent: the report has figures */
	bool progress_tty, progress_log;
	double t0;
	double t_stop, t_resumed;   /* file:: the demo measures the downtime */
	json_object *res;
	char why[512];          /* the first failure */
};

enum { SRC = 0, DST = 1 };
static const char *const side_name[2] = { "source", "destination" };

static volatile sig_atomic_t demo_signal;

static void on_signal(int sig)
{
	demo_signal = sig;
}

static void demo_usage(FILE *out)
{
	fprintf(out,
		"usage: vfiomig demo [--json] [--guest synthetic|kvm|auto] [--mem SIZE] [--devices N]\n"
		"                    [--device-state SIZE] [--dirty-rate RATE] [--downtime-limit MS]\n"
		"                    [--channels N] [--uri URI] [--save-latency US] [--tls x509|psk]\n\n"
		"Starts 'dma' vfio-user device servers and two VMs (a source running a guest\n"
		"and an incoming destination) in a private temp dir, migrates the source live,\n"
		"and verifies that no guest write and no device byte was lost.\n\n"
		"  --json               print one JSON object instead of the report\n"
		"  --guest KIND         synthetic (default), kvm (a KVM VM whose guest program\n"
		"                       drives the devices; needs /dev/kvm), or auto (kvm when\n"
		"                       /dev/kvm works, else synthetic)\n"
		"  --mem SIZE           guest memory (default 256M)\n"
		"  --devices N          dma devices, 1..%d (default 1)\n"
		"  --device-state SIZE  state of each device (default 64M)\n"
		"  --dirty-rate RATE    guest writes per second (default 32M/s); the devices\n"
		"                       rewrite their state at a quarter of it\n"
		"  --downtime-limit MS  the switchover's downtime bound (default 300)\n"
		"  --channels N         multifd channels (default: the VM's)\n"
		"  --uri URI            tcp:HOST:PORT (default tcp:127.0.0.1, a free port),\n"
		"                       unix:PATH, file:PATH (the VM is stopped, saved, loaded);\n"
		"                       'unix:' or 'file:' alone use the demo's temp dir\n"
		"  --save-latency US    device firmware latency per MiB saved\n"
		"  --tls x509|psk       TLS 1.3 on every migration connection, with throwaway\n"
		"                       credentials (a CA and certificates, or keys.psk) made in\n"
		"                       the demo's temporary directory (docs/security.md)\n"
		"Exit status: 0 verified, 1 not verified or failed, 2 usage error.\n",
		DEMO_MAX_DEVICES);
}

static int usage_error(const char *fmt, ...) VFM_PRINTF(1, 2);

static int usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "vfiomig demo: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n(vfiomig demo --help lists the options)\n");
	return VFM_EXIT_USAGE;
}

static int parse_opts(int argc, char **argv, struct demo_opts *o)
{
	struct vfm_error err = { 0 };
	uint64_t x, ns;
	const char *v;

	*o = (struct demo_opts){
		.guest = "synthetic", .mem = 256ull << 20, .device_state = 64ull << 20,
		.dirty_rate = 32ull << 20, .downtime_limit_ms = 300, .devices = 1,
		.channels = -1,
	};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		vfm_error_clear(&err);
		if (!strcmp(a, "--json")) {
			o->json = true;
		} else if ((v = tool_opt_value(argc, argv, &i, "--guest"))) {
			if (strcmp(v, "synthetic") && strcmp(v, "kvm") && strcmp(v, "auto"))
				return usage_error("--guest: '%s': expected synthetic, kvm or auto", v);
			o->guest = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--mem"))) {
			if (vfm_parse_size(v, &o->mem, &err))
				return usage_error("--mem: %s", err.msg);
			/* What the VM accepts: refusing here makes it a usage error. */
			if (o->mem < (1u << 20) || o->mem % 4096)
				return usage_error("--mem: at least 1M, a multiple of 4K");
		} else if ((v = tool_opt_value(argc, argv, &i, "--devices"))) {
			if (vfm_parse_uint(v, 1, DEMO_MAX_DEVICES, &x, &err))
				return usage_error("--devices: %s", err.msg);
			o->devices = (unsigned)x;
		} else if ((v = tool_opt_value(argc, argv, &i, "--device-state"))) {
			if (vfm_parse_size(v, &o->device_state, &err) || !o->device_state)
				return usage_error("--device-state: %s",
						   err.msg[0] ? err.msg : "must not be 0");
			if (o->device_state % 4096)
				return usage_error("--device-state: must be a multiple of 4K");
		} else if ((v = tool_opt_value(argc, argv, &i, "--dirty-rate"))) {
			if (vfm_parse_rate(v, &o->dirty_rate, &err))
				return usage_error("--dirty-rate: %s", err.msg);
		} else if ((v = tool_opt_value(argc, argv, &i, "--downtime-limit"))) {
			if (vfm_parse_duration_ns(v, &ns, &err))
				return usage_error("--downtime-limit: %s", err.msg);
			o->downtime_limit_ms = ns / 1000000;
			if (!o->downtime_limit_ms)
				return usage_error("--downtime-limit: must be at least 1 ms");
		} else if ((v = tool_opt_value(argc, argv, &i, "--channels"))) {
			if (vfm_parse_uint(v, 0, 64, &x, &err))
				return usage_error("--channels: %s", err.msg);
			o->channels = (int)x;
		} else if ((v = tool_opt_value(argc, argv, &i, "--uri"))) {
			if (!*v)
				return usage_error("--uri: empty");
			o->uri = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--tls"))) {
			if (strcmp(v, "x509") && strcmp(v, "psk"))
				return usage_error("--tls: '%s': expected x509 or psk", v);
			o->tls = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--save-latency"))) {
			if (vfm_parse_uint(v, 0, 10000000, &o->save_latency_us, &err))
				return usage_error("--save-latency: %s", err.msg);
		} else {
			return usage_error("unknown or incomplete option '%s'", a);
		}
	}
	return 0;
}

/* Records the first failure; later ones are usually its consequences. */
static int demo_fail(struct demo *d, const char *fmt, ...) VFM_PRINTF(2, 3);

static int demo_fail(struct demo *d, const char *fmt, ...)
{
	va_list ap;

	if (!d->why[0]) {
		char what[sizeof(d->why)];

		va_start(ap, fmt);
		vsnprintf(what, sizeof(what), fmt, ap);
		va_end(ap);
		/* A signal cuts the current wait short (no SA_RESTART): whichever
		 * step saw it fail first, the signal is the reason. */
		if (demo_signal && !strstr(what, "interrupted by signal"))
			snprintf(d->why, sizeof(d->why), "interrupted by signal %d (%s): %.400s",
				 (int)demo_signal, strsignal(demo_signal), what);
		else
			snprintf(d->why, sizeof(d->why), "%s", what);
	}
	return -1;
}

static double since_start(struct demo *d)
{
	return demo_now_ms() - d->t0;
}

static void event(struct demo *d, const char *phase, const char *fmt, ...) VFM_PRINTF(3, 4);

static void event(struct demo *d, const char *phase, const char *fmt, ...)
{
	char detail[256] = "";
	va_list ap;

	if (fmt) {
		va_start(ap, fmt);
		vsnprintf(detail, sizeof(detail), fmt, ap);
		va_end(ap);
	}
	demo_result_event(d->res, since_start(d), phase, detail);
	vfm_log(VFM_LOG_INFO, "demo", "%s%s%s", phase, *detail ? " " : "", detail);
}

/* ---- URIs ---- */

/*
 * Which URI the destination listens on and the source sends to. 'unix:' and
 * 'file:' without a path get one in the temp dir; tcp:HOST:0 becomes the
 * port the destination bound (known only once it runs).
 */
static int choose_uri(struct demo *d)
{
	const char *u = d->o.uri;

	if (!u) {
		snprintf(d->uri, sizeof(d->uri), "tcp:127.0.0.1:0");
	} else if (!strcmp(u, "unix:")) {
		snprintf(d->uri, sizeof(d->uri), "unix:%s/migrate.sock", d->dir);
	} else if (!strcmp(u, "file:")) {
		snprintf(d->uri, sizeof(d->uri), "file:%s/vm.state", d->dir);
	} else if (!strncmp(u, "tcp:", 4) || !strncmp(u, "unix:", 5) || !strncmp(u, "file:", 5)) {
		if ((size_t)snprintf(d->uri, sizeof(d->uri), "%s", u) >= sizeof(d->uri))
			return demo_fail(d, "--uri: '%s' is too long", u);
	} else if (!strncmp(u, "fd:", 3)) {
		return demo_fail(d, "--uri: '%s': the demo cannot hand one fd to two VMs "
				 "(use tcp:, unix: or file:)", u);
	} else {
		return demo_fail(d, "--uri: '%s': unknown transport (expected tcp:HOST:PORT, "
				 "unix:PATH or file:PATH)", u);
	}
	d->file_mode = !strncmp(d->uri, "file:", 5);
	return 0;
}

/* ---- child processes ---- */

/*
 * A failure caused by child c: its output says why, in its last line that
 * starts with "vfiomig " (a usage error is followed by the usage text), or
 * else in its last line.
 */
static int fail_child(struct demo *d, struct demo_child *c, const char *msg)
{
	char tail[4096], *line, *save = NULL, *why = NULL;

	demo_tail(c->log_path, 40, tail, sizeof(tail));
	for (line = strtok_r(tail, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
		if (!why || !strncmp(line, "vfiomig ", 8) || strncmp(why, "vfiomig ", 8))
			why = line;
	if (why)
		return demo_fail(d, "%s: %s", msg, why);
	return demo_fail(d, "%s", msg);
}

static int spawn(struct demo *d, struct demo_child *c, const char *name, char **argv)
{
	char log[256];
	struct vfm_error err = { 0 };

	snprintf(log, sizeof(log), "%s/%s.log", d->dir, name);
	if (vfm_log_enabled(VFM_LOG_DEBUG)) {
		char line[1024] = "";

		for (char **a = argv; *a; a++)
			snprintf(line + strlen(line), sizeof(line) - strlen(line), " %s", *a);
		vfm_log(VFM_LOG_DEBUG, "demo", "start %s:%s", name, line);
	}
	if (demo_child_spawn(c, name, log, argv, &err))
		return demo_fail(d, "%s", err.msg);
	return 0;
}

static int start_devices(struct demo *d)
{
	char state[32], churn[40], lat[32], sock[200], name[32];
	struct vfm_error err = { 0 };
	unsigned n = d->o.devices;

	snprintf(state, sizeof(state), "%" PRIu64, d->o.device_state);
	snprintf(churn, sizeof(churn), "%" PRIu64, d->o.dirty_rate / 4);
	snprintf(lat, sizeof(lat), "%" PRIu64, d->o.save_latency_us);
	for (unsigned i = 0; i < 2 * n; i++) {
		const char *side = i < n ? "src" : "dst";
		char *argv[] = { "/proc/self/exe", "device", "dma", "--socket", sock,
				 "--state-size", state, "--churn", churn, "--save-latency", lat,
				 NULL };

		snprintf(name, sizeof(name), "dev%u-%s", i % n, side);
		snprintf(sock, sizeof(sock), "%s/%s.sock", d->dir, name);
		if (spawn(d, &d->devs[i], name, argv))
			return -1;
	}
	for (unsigned i = 0; i < 2 * n; i++) {
		snprintf(sock, sizeof(sock), "%s/%s.sock", d->dir, d->devs[i].name);
		if (demo_wait_socket(sock, &d->devs[i], DEMO_SOCKET_WAIT_MS, &demo_signal, &err))
			return fail_child(d, &d->devs[i], err.msg);
	}
	return 0;
}

/* Starts one VM; the destination with --incoming. */
static int start_vm(struct demo *d, int side)
{
	char mem[32], rate[32], ctl[200], name[16];
	char devspec[DEMO_MAX_DEVICES][256];
	char *argv[16 + 2 * DEMO_MAX_DEVICES];
	unsigned n = d->o.devices;
	int a = 0;

	snprintf(name, sizeof(name), "vm-%s", side == SRC ? "src" : "dst");
	snprintf(mem, sizeof(mem), "%" PRIu64, d->o.mem);
	snprintf(rate, sizeof(rate), "%" PRIu64, d->o.dirty_rate);
	snprintf(ctl, sizeof(ctl), "%s/%s.ctl", d->dir, side == SRC ? "src" : "dst");
	argv[a++] = "/proc/self/exe";
	argv[a++] = "vm";
	argv[a++] = "--mem";
	argv[a++] = mem;
	for (unsigned i = 0; i < n; i++) {
		snprintf(devspec[i], sizeof(devspec[i]), "vfio-user:%s/dev%u-%s.sock,id=dev%u",
			 d->dir, i, side == SRC ? "src" : "dst", i);
		argv[a++] = "--device";
		argv[a++] = devspec[i];
	}
	argv[a++] = "--guest";
	argv[a++] = (char *)d->o.guest;
	argv[a++] = "--dirty-rate";
	argv[a++] = rate;
	if (side == DST) {
		argv[a++] = "--incoming";
		argv[a++] = d->uri;
	}
	if (d->tls_creds[0]) {
		argv[a++] = "--tls-creds";
		argv[a++] = d->tls_creds;
	}
	argv[a++] = "--control";
	argv[a++] = ctl;
	argv[a] = NULL;
	return spawn(d, &d->vms[side], name, argv);
}

static struct demo_child *dead_child(struct demo *d)
{
	for (size_t i = 0; i < 2; i++)
		if (d->vms[i].pid && demo_child_exited(&d->vms[i]))
			return &d->vms[i];
	for (size_t i = 0; i < 2 * d->o.devices; i++)
		if (d->devs[i].pid && demo_child_exited(&d->devs[i]))
			return &d->devs[i];
	return NULL;
}

/* Fails when a signal came or a child died. */
static int check_alive(struct demo *d)
{
	struct demo_child *c;
	char how[96], msg[768];

	if (demo_signal)
		return demo_fail(d, "interrupted by signal %d (%s)", (int)demo_signal,
				 strsignal(demo_signal));
	c = dead_child(d);
	if (c) {
		snprintf(msg, sizeof(msg), "%s %s unexpectedly", c->name,
			 demo_child_describe(c, how, sizeof(how)));
		return fail_child(d, c, msg);
	}
	return 0;
}

/* Sleeps ms while watching the children and the signal flag. */
static int watch(struct demo *d, int ms)
{
	double end = demo_now_ms() + ms;

	while (demo_now_ms() < end) {
		if (check_alive(d))
			return -1;
		usleep(DEMO_POLL_MS * 1000);
	}
	return check_alive(d);
}

/* ---- control sockets ---- */

static int connect_vm(struct demo *d, int side)
{
	char ctl[200];
	struct vfm_error err = { 0 };

	snprintf(ctl, sizeof(ctl), "%s/%s.ctl", d->dir, side == SRC ? "src" : "dst");
	if (demo_wait_socket(ctl, &d->vms[side], DEMO_SOCKET_WAIT_MS, &demo_signal, &err))
		return fail_child(d, &d->vms[side], err.msg);
	if (ctl_connect(ctl, DEMO_CMD_TIMEOUT_MS, &d->ctl[side], &err))
		return demo_fail(d, "%s VM control socket: %s", side_name[side], err.msg);
	return 0;
}

/*
 * Runs one command on a VM; *ret (optional) gets the return value, which the
 * caller puts. On failure the message names the side and the command.
 */
static int vm_exec(struct demo *d, int side, const char *cmd, json_object *args,
		   json_object **ret)
{
	struct vfm_error err = { 0 };
	json_object *r = NULL;

	if (ctl_execute(d->ctl[side], cmd, args, DEMO_CMD_TIMEOUT_MS, &r, &err))
		return demo_fail(d, "%s VM: %s: %s", side_name[side], cmd, err.msg);
	if (ret)
		*ret = r;
	else
		json_object_put(r);
	return 0;
}

static json_object *jget(json_object *o, const char *key)
{
	json_object *v = NULL;

	return o && json_object_object_get_ex(o, key, &v) ? v : NULL;
}

static const char *jstr(json_object *o, const char *key)
{
	json_object *v = jget(o, key);
	const char *s = v && json_object_is_type(v, json_type_string) ? json_object_get_string(v)
								       : NULL;

	return s ? s : "";
}

static double jnum(json_object *o, const char *key)
{
	json_object *v = jget(o, key);

	return v ? json_object_get_double(v) : 0;
}

/* tcp:HOST:0 → the port the destination bound, from vm.incoming_uri. */
static int resolve_incoming_uri(struct demo *d)
{
	json_object *st = NULL;
	const char *u;

	if (vm_exec(d, DST, "query-vfiomig", NULL, &st))
		return -1;
	u = jstr(jget(st, "vm"), "incoming_uri");
	if (*u)
		snprintf(d->uri, sizeof(d->uri), "%s", u);
	json_object_put(st);
	if (!strncmp(d->uri, "tcp:", 4) && strlen(d->uri) > 2 &&
	    !strcmp(d->uri + strlen(d->uri) - 2, ":0"))
		return demo_fail(d, "the destination VM did not report the port it listens on");
	return 0;
}

static int set_parameters(struct demo *d)
{
	json_object *args = json_object_new_object();
	int r;

	json_object_object_add(args, "downtime-limit",
			       json_object_new_int64((int64_t)d->o.downtime_limit_ms));
	if (d->o.channels >= 0)
		json_object_object_add(args, "multifd-channels",
				       json_object_new_int(d->o.channels));
	r = vm_exec(d, SRC, "migrate-set-parameters", json_object_get(args), NULL);
	/* The destination needs the channel count to accept as many connections. */
	if (!r && d->o.channels >= 0 && !d->file_mode)
		r = vm_exec(d, DST, "migrate-set-parameters", json_object_get(args), NULL);
	json_object_put(args);
	return r;
}

/* ---- migration ---- */

static void progress(struct demo *d, json_object *mig, bool final)
{
	char line[256];

	if (!d->progress_tty && !d->progress_log)
		return;
	demo_progress_line(mig, line, sizeof(line));
	if (d->progress_tty)
		fprintf(stderr, "\r\033[K%7.0f ms  %s%s", since_start(d), line, final ? "\n" : "");
	else
		fprintf(stderr, "%7.0f ms  %s\n", since_start(d), line);
}

static bool is_final(const char *st)
{
	return !strcmp(st, "completed") || !strcmp(st, "failed") || !strcmp(st, "cancelled");
}

/*
 * Polls side's query-migrate until it reaches a final status, recording
 * each status change in the timeline. bound_ms turns a hang into a failure.
 */
static int wait_migration(struct demo *d, int side, double bound_ms, const char *prefix)
{
	double deadline = demo_now_ms() + bound_ms, last_log = 0;
	char last[32] = "";

	for (;;) {
		json_object *mig = NULL;
		const char *st;

		if (check_alive(d) || vm_exec(d, side, "query-migrate", NULL, &mig))
			return -1;
		st = jstr(mig, "status");
		if (strcmp(st, last)) {
			char phase[48];

			/* Never NULL; gcc -O2 with the sanitizers cannot tell (-Wformat-truncation). */
			snprintf(phase, sizeof(phase), "%s%s", prefix ? prefix : "", st ? st : "");
			event(d, phase, "%s", !strcmp(st, "failed") ? jstr(mig, "error") :
			      side == DST ? "" :
			      !strcmp(st, "active") ? (d->file_mode ? "saving" : "pre-copy") :
			      !strcmp(st, "device") ? (d->file_mode ? "device state" :
							"guest stopped, stop-and-copy") : "");
			snprintf(last, sizeof(last), "%s", st);
		}
		if (side == SRC && (d->progress_tty || demo_now_ms() - last_log >= 500 ||
				    is_final(st))) {
			progress(d, mig, is_final(st));
			last_log = demo_now_ms();
		}
		if (is_final(st)) {
			int r = 0;

			if (side == DST && !strcmp(st, "completed"))
				d->t_resumed = demo_now_ms();
			if (strcmp(st, "completed"))
				r = demo_fail(d, "the %s migration %s%s%s", side == SRC ? "outgoing" :
					      "incoming", st, *jstr(mig, "error") ? ": " : "",
					      jstr(mig, "error"));
			json_object_put(mig);
			return r;
		}
		if (demo_now_ms() >= deadline) {
			json_object *c = NULL;
			int r;

			/* Not converging: say what downtime would have worked. */
			if (json_object_object_get_ex(mig, "converging", &c) &&
			    !json_object_get_boolean(c))
				r = demo_fail(d, "the %s migration did not converge within %.0f s: it "
					      "would need a downtime of about %.0f ms (--downtime-limit); "
					      "most pending: %s", side == SRC ? "outgoing" : "incoming",
					      bound_ms / 1000, jnum(mig, "needed_downtime_ms"),
					      jstr(mig, "bottleneck"));
			else
				r = demo_fail(d, "the %s migration did not finish within %.0f s "
					      "(still %s)", side == SRC ? "outgoing" : "incoming",
					      bound_ms / 1000, last);
			json_object_put(mig);
			return r;
		}
		json_object_put(mig);
		usleep(DEMO_POLL_MS * 1000);
	}
}

/* A hang bound, never a timing expectation: 30 s plus 1 s per 32 MiB moved. */
static double migration_bound_ms(struct demo *d)
{
	uint64_t bytes = d->o.mem + d->o.devices * d->o.device_state;

	return 30000.0 + (double)(bytes >> 25) * 1000.0;
}

static int migrate(struct demo *d)
{
	json_object *args = json_object_new_object();
	int r;

	if (d->file_mode) {
		if (vm_exec(d, SRC, "stop", NULL, NULL)) {
			json_object_put(args);
			return -1;
		}
		d->t_stop = demo_now_ms();
		event(d, "stop", "source guest paused (file: migration is not live)");
	}
	json_object_object_add(args, "uri", json_object_new_string(d->uri));
	event(d, "migrate", "to %s", d->uri);
	d->migrating = true;
	r = vm_exec(d, SRC, "migrate", args, NULL);
	if (r)
		return -1;
	return wait_migration(d, SRC, migration_bound_ms(d), "");
}

/* The destination of a file: migration starts once the file is complete. */
static int start_file_destination(struct demo *d)
{
	if (start_vm(d, DST) || connect_vm(d, DST))
		return -1;
	event(d, "load", "destination VM started with --incoming %s", d->uri);
	return 0;
}

/* ---- verification ---- */

static int verify(struct demo *d)
{
	json_object *src = NULL, *dst = NULL, *guest, *v;
	int r = -1;

	if (vm_exec(d, SRC, "query-vfiomig", NULL, &src) ||
	    vm_exec(d, DST, "query-vfiomig", NULL, &dst))
		goto out;
	/*
	 * The destination ran its quick check on load, inside the downtime;
	 * now that its guest runs, the full one (every word of every page).
	 * The guest object it returns holds both, and both must pass.
	 */
	{
		json_object *g = NULL;
		double t0 = demo_now_ms();

		if (vm_exec(d, DST, "guest-verify", NULL, &g))
			goto out;
		json_object_object_add(dst, "guest", g);
		guest = jget(g, "full");
		v = jget(guest, "verified");
		event(d, "verify", "full check of the destination guest: %s in %.0f ms (guest paused meanwhile)",
		      v && json_object_get_boolean(v) ? "ok" : "FAILED", demo_now_ms() - t0);
	}
	if (demo_result_compare(d->res, src, dst, d->why, sizeof(d->why)))
		r = 0;
	/*
	 * A file has no return path: the source only knows when it finished
	 * writing. The guest was down from the stop until the destination ran.
	 */
	if (d->file_mode && d->t_resumed > d->t_stop)
		demo_result_set_downtime(d->res, d->t_resumed - d->t_stop, "demo");
	if (!r) {
		event(d, "verified", "guest memory and %u device state%s match", d->o.devices,
		      d->o.devices == 1 ? "" : "s");
	} else {
		event(d, "mismatch", "%s", d->why);
	}
out:
	json_object_put(src);
	json_object_put(dst);
	return r;
}

/* ---- the whole run ---- */

/* --guest auto: kvm when this build has it and /dev/kvm works, else synthetic. */
static void resolve_guest(struct demo_opts *o)
{
	char why[128] = "this build has no KVM guest";

	if (strcmp(o->guest, "auto"))
		return;
#ifdef VFM_HAVE_KVM
	if (vfm_kvm_available(why, sizeof(why))) {
		o->guest = "kvm";
		snprintf(o->guest_why, sizeof(o->guest_why), "--guest auto: kvm (/dev/kvm works)");
		return;
	}
#endif
	o->guest = "synthetic";
	snprintf(o->guest_why, sizeof(o->guest_why), "--guest auto: synthetic (%s)", why);
}

/* --tls: credentials in QEMU's layout, thrown away with the directory. */
static int make_tls_creds(struct demo *d)
{
	struct vfm_error err = { 0 };
	struct tls_gen_opts g;
	char dir[160];

	if (!d->o.tls)
		return 0;
	if (d->file_mode)
		return demo_fail(d, "--tls: a file: URI is not a connection; TLS needs tcp: or unix:");
	snprintf(dir, sizeof(dir), "%s/tls", d->dir);
	tls_gen_opts_default(&g);
	if (mkdir(dir, 0700) < 0)
		return demo_fail(d, "%s: %s", dir, strerror(errno));
	if (!strcmp(d->o.tls, "psk") ? tls_gen_psk(dir, "qemu", &err) : tls_gen_x509(dir, &g, &err))
		return demo_fail(d, "--tls: %s", err.msg);
	snprintf(d->tls_creds, sizeof(d->tls_creds), "%s:%s", d->o.tls, dir);
	event(d, "start", "TLS 1.3 (%s) on every migration connection, credentials in %s",
	      d->o.tls, dir);
	json_object_object_add(d->res, "tls", json_object_new_string(d->o.tls));
	return 0;
}

static int run(struct demo *d)
{
	char mem[32], state[32], rate[32];
	struct vfm_error err = { 0 };

	if (demo_tmpdir_create(d->dir, sizeof(d->dir), &err))
		return demo_fail(d, "%s", err.msg);
	if (choose_uri(d) || make_tls_creds(d))
		return -1;
	if (d->o.guest_why[0])
		event(d, "start", "%s", d->o.guest_why);
	event(d, "start", "%u dma device%s (%s state each), 2 VMs with %s (%s guest)",
	      d->o.devices, d->o.devices == 1 ? "" : "s",
	      vfm_format_size(d->o.device_state, state, sizeof(state)),
	      vfm_format_size(d->o.mem, mem, sizeof(mem)), d->o.guest);
	if (start_devices(d) || start_vm(d, SRC) ||
	    (!d->file_mode && start_vm(d, DST)) || connect_vm(d, SRC) ||
	    (!d->file_mode && connect_vm(d, DST)) || (!d->file_mode && resolve_incoming_uri(d)))
		return -1;
	json_object_object_add(d->res, "uri", json_object_new_string(d->uri));
	event(d, "running", "guest writes %s/s, devices rewrite %s/s",
	      vfm_format_size(d->o.dirty_rate, mem, sizeof(mem)),
	      vfm_format_size(d->o.dirty_rate / 4, rate, sizeof(rate)));
	/* Let the workload dirty memory and device state before migrating. */
	if (watch(d, 1000) || set_parameters(d) || migrate(d))
		return -1;
	if (d->file_mode && start_file_destination(d))
		return -1;
	if (wait_migration(d, DST, migration_bound_ms(d), "incoming "))
		return -1;
	return verify(d);
}

/* What went wrong, on stderr, with the last lines of every child that said something. */
static void report_failure(struct demo *d)
{
	struct demo_child *all[2 + 2 * DEMO_MAX_DEVICES];
	size_t n = 0;
	char tail[2048], how[96];

	fprintf(stderr, "vfiomig demo: %s\n", d->why[0] ? d->why : "failed");
	all[n++] = &d->vms[SRC];
	all[n++] = &d->vms[DST];
	for (size_t i = 0; i < 2 * d->o.devices; i++)
		all[n++] = &d->devs[i];
	for (size_t i = 0; i < n; i++) {
		if (!all[i]->pid)
			continue;
		demo_child_exited(all[i]);  /* describe it as it is now */
		demo_tail(all[i]->log_path, 6, tail, sizeof(tail));
		if (!tail[0])
			continue;
		fprintf(stderr, "--- %s (%s), last lines of its output:\n%s\n", all[i]->name,
			demo_child_describe(all[i], how, sizeof(how)), tail);
	}
}

/*
 * A child that was running when the demo stopped it should end on the
 * SIGTERM (or exit 0): anything else (a crash on the way out, a sanitizer
 * report, a hang until SIGKILL) is worth a warning even after a verified run.
 */
static void warn_unclean_stop(struct demo_child *c, bool was_running)
{
	char how[96], tail[1024];

	if (!was_running || (WIFSIGNALED(c->status) && WTERMSIG(c->status) == SIGTERM) ||
	    (WIFEXITED(c->status) && WEXITSTATUS(c->status) == 0))
		return;
	demo_tail(c->log_path, 4, tail, sizeof(tail));
	fprintf(stderr, "vfiomig demo: warning: %s %s when stopped%s%s\n", c->name,
		WIFSIGNALED(c->status) && WTERMSIG(c->status) == SIGKILL ?
		"did not end on SIGTERM and was killed" : demo_child_describe(c, how, sizeof(how)),
		tail[0] ? ":\n" : "", tail);
}

static void cleanup(struct demo *d)
{
	for (int s = 0; s < 2; s++) {
		if (d->ctl[s]) {
			ctl_close(d->ctl[s]);
			d->ctl[s] = NULL;
		}
	}
	for (size_t i = 0; i < 2; i++)
		d->vms_alive[i] = !demo_child_exited(&d->vms[i]);
	for (size_t i = 0; i < 2 * d->o.devices; i++)
		d->devs_alive[i] = !demo_child_exited(&d->devs[i]);
	/* VMs first, so that devices see their client leave rather than die. */
	demo_children_stop(d->vms, 2, DEMO_STOP_GRACE_MS);
	demo_children_stop(d->devs, 2 * d->o.devices, DEMO_STOP_GRACE_MS);
	for (size_t i = 0; i < 2; i++)
		warn_unclean_stop(&d->vms[i], d->vms_alive[i]);
	for (size_t i = 0; i < 2 * d->o.devices; i++)
		warn_unclean_stop(&d->devs[i], d->devs_alive[i]);
	demo_tmpdir_remove(d->dir);
	d->dir[0] = '\0';
}

int cmd_demo(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_signal }, ign = { .sa_handler = SIG_IGN };
	struct demo d = { 0 };
	bool ok;
	int r;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			demo_usage(stdout);
			return VFM_EXIT_OK;
		}
	}
	r = parse_opts(argc, argv, &d.o);
	if (r)
		return r;
	/* No SA_RESTART: a signal must cut the current wait short. */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	sigemptyset(&ign.sa_mask);
	sigaction(SIGPIPE, &ign, NULL);
	d.t0 = demo_now_ms();
	d.progress_tty = isatty(STDERR_FILENO);
	d.progress_log = !d.progress_tty && vfm_log_enabled(VFM_LOG_INFO);
	resolve_guest(&d.o);
	d.res = demo_result_new(d.o.guest, d.o.uri, d.o.downtime_limit_ms);
	ok = run(&d) == 0;
	json_object_object_add(d.res, "live", json_object_new_boolean(!d.file_mode));
	if (!ok) {
		json_object_object_add(d.res, "verified", json_object_new_boolean(0));
		json_object_object_add(d.res, "error", json_object_new_string(d.why));
		report_failure(&d);
	}
	cleanup(&d);
	if (d.o.json)
		printf("%s\n", json_object_to_json_string_ext(d.res, JSON_C_TO_STRING_PRETTY |
							       JSON_C_TO_STRING_NOSLASHESCAPE));
	else if (ok || d.migrating)  /* before that, the message on stderr is all there is */
		demo_report_human(d.res, stdout);
	json_object_put(d.res);
	return ok ? VFM_EXIT_OK : VFM_EXIT_FAIL;
}
