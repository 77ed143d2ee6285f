/* vfiomig ctl: the command-line client of a VM's control socket. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commands.h"
#include "ctl-client.h"
#include "vfiomig/parse.h"

#define POLL_MS 100

static void ctl_usage(FILE *out)
{
	fprintf(out,
		"usage: vfiomig ctl PATH COMMAND [ARGS...]\n\n"
		"Talks to the control socket PATH of a 'vfiomig vm'.\n\n"
		"  migrate URI [--wait]  migrate to URI (tcp:HOST:PORT, unix:PATH, file:PATH, fd:N);\n"
		"                        --wait: until it ends (a progress line on a terminal),\n"
		"                        exit 0 when completed, 1 when failed or cancelled\n"
		"  status [--json]       the VM, its migration, devices and guest\n"
		"  cancel                cancel the outgoing migration (the source keeps running)\n"
		"  set KEY=VALUE...      migration parameters for the next migration (the\n"
		"                        first three also for the running one):\n"
		"                          downtime-limit=300ms  max-bandwidth=100M/s\n"
		"                          avail-switchover-bandwidth=1G/s (0: measured)\n"
		"                          multifd-channels=2 (0: none)  switchover-ack=on|off\n"
		"                          pre-copy-dirty-page-tracking=on|off\n"
		"                          multifd-transfer=on|off|auto\n"
		"                          auto-converge=on|off  cpu-throttle-initial=20\n"
		"                          cpu-throttle-increment=10  device-throttle=on|off\n"
		"                          tls-hostname=NAME (source: the destination's certificate)\n"
		"                          tls-authz=DN|IDENTITY (destination; repeat to allow\n"
		"                          several, tls-authz= for any)\n"
		"  stop | cont           pause or resume the guest\n"
		"  verify                check the guest's memory against its bookkeeping\n"
		"  quit                  the VM process exits\n\n"
		"Exit status: 0 success, 1 failure, 2 usage error.\n");
}

static int usage_error(const char *fmt, ...) VFM_PRINTF(1, 2);

static int usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "vfiomig ctl: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	ctl_usage(stderr);
	return VFM_EXIT_USAGE;
}

static int fail(const struct vfm_error *err)
{
	fprintf(stderr, "vfiomig ctl: %s\n", err->msg[0] ? err->msg : vfm_strerror(err->code));
	return VFM_EXIT_FAIL;
}

static int64_t get_i64(json_object *o, const char *key)
{
	json_object *v;

	return json_object_object_get_ex(o, key, &v) ? json_object_get_int64(v) : 0;
}

static double get_double(json_object *o, const char *key)
{
	json_object *v;

	return json_object_object_get_ex(o, key, &v) ? json_object_get_double(v) : 0;
}

static const char *get_str(json_object *o, const char *key)
{
	json_object *v;

	return json_object_object_get_ex(o, key, &v) && json_object_is_type(v, json_type_string)
		       ? json_object_get_string(v) : "";
}

/* Absent: true (an older VM says nothing about convergence). */
static bool get_bool(json_object *o, const char *key)
{
	json_object *v;

	return !json_object_object_get_ex(o, key, &v) || json_object_get_boolean(v);
}

static const char *size_str(int64_t n, char *buf, size_t len)
{
	return vfm_format_size(n < 0 ? 0 : (uint64_t)n, buf, len);
}

static void print_migration(json_object *mig, FILE *out)
{
	const char *st = get_str(mig, "status");
	char b1[32], b2[32], b3[32];

	fprintf(out, "migration: %s", st);
	if (strcmp(st, "none")) {
		fprintf(out, ", %s sent (RAM %s, devices %s) in %" PRId64 " ms",
			size_str(get_i64(mig, "transferred_bytes"), b1, sizeof(b1)),
			size_str(get_i64(mig, "ram_transferred_bytes"), b2, sizeof(b2)),
			size_str(get_i64(mig, "device_transferred_bytes"), b3, sizeof(b3)),
			get_i64(mig, "total_time_ms"));
		if (!strcmp(st, "completed") && get_double(mig, "downtime_ms") > 0)
			fprintf(out, ", downtime %.1f ms (expected %.1f, limit %" PRId64 ")",
				get_double(mig, "downtime_ms"), get_double(mig, "expected_downtime_ms"),
				get_i64(mig, "downtime_limit_ms"));
		if (get_i64(mig, "precopy_iterations"))
			fprintf(out, ", %" PRId64 " iterations", get_i64(mig, "precopy_iterations"));
	}
	fprintf(out, "\n");
	if (!strcmp(st, "active") && !get_bool(mig, "converging"))
		fprintf(out, "  not converging: it would need a downtime of about %.0f ms "
			"(limit %" PRId64 "); most pending: %s\n", get_double(mig, "needed_downtime_ms"),
			get_i64(mig, "downtime_limit_ms"), get_str(mig, "bottleneck"));
	if (get_str(mig, "unpaced")[0])
		fprintf(out, "  the expected downtime assumes the link's pace for %s: it has no "
			"pre-copy, so its own is unknown\n", get_str(mig, "unpaced"));
	if (get_str(mig, "error")[0])
		fprintf(out, "  error: %s\n", get_str(mig, "error"));
}

static void print_status(json_object *st, FILE *out)
{
	json_object *vm = NULL, *mig = NULL, *devs = NULL, *guest = NULL, *v;
	char b1[32];

	json_object_object_get_ex(st, "vm", &vm);
	json_object_object_get_ex(st, "migration", &mig);
	json_object_object_get_ex(st, "devices", &devs);
	json_object_object_get_ex(st, "guest", &guest);
	fprintf(out, "vm: %s", get_str(vm, "state"));
	if (get_str(vm, "incoming_uri")[0])
		fprintf(out, " (incoming %s)", get_str(vm, "incoming_uri"));
	fprintf(out, "\n");
	if (mig)
		print_migration(mig, out);
	for (size_t i = 0; devs && i < json_object_array_length(devs); i++) {
		json_object *d = json_object_array_get_idx(devs, i), *flags = NULL;

		fprintf(out, "device %s (%s): %s, flags ", get_str(d, "id"), get_str(d, "backend"),
			get_str(d, "state"));
		json_object_object_get_ex(d, "flags", &flags);
		if (!flags || !json_object_array_length(flags))
			fprintf(out, "none (no migration)");
		for (size_t k = 0; flags && k < json_object_array_length(flags); k++)
			fprintf(out, "%s%s", k ? "|" : "",
				json_object_get_string(json_object_array_get_idx(flags, k)));
		fprintf(out, ", %s transferred", size_str(get_i64(d, "transferred_bytes"), b1, sizeof(b1)));
		if (get_str(d, "stop_copy_size_source")[0])
			fprintf(out, ", stop-copy size %s (%s)",
				size_str(get_i64(d, "stop_copy_size"), b1, sizeof(b1)),
				get_str(d, "stop_copy_size_source"));
		if (get_str(d, "state_checksum")[0])
			fprintf(out, ", checksum %s", get_str(d, "state_checksum"));
		fprintf(out, "\n");
	}
	if (guest) {
		fprintf(out, "guest: %s", get_str(guest, "kind"));
		if (json_object_object_get_ex(guest, "verified", &v) && v)
			fprintf(out, ", verified %s (%" PRId64 " pages checked, %" PRId64 " errors)",
				json_object_get_boolean(v) ? "yes" : "NO", get_i64(guest, "pages_checked"),
				get_i64(guest, "errors"));
		else
			fprintf(out, ", not verified yet");
		if (get_str(guest, "detail")[0])
			fprintf(out, ": %s", get_str(guest, "detail"));
		fprintf(out, "\n");
	}
}

/* KEY=VALUE into the typed argument migrate-set-parameters takes. */
static int parse_param(const char *kv, json_object *args, struct vfm_error *err)
{
	const char *eq = strchr(kv, '=');
	char key[64];
	const char *val;
	uint64_t n;
	enum vfm_onoff sw;
	int r;

	if (!eq || eq == kv || (size_t)(eq - kv) >= sizeof(key))
		return vfm_error_set(err, -EINVAL, "'%s': expected KEY=VALUE", kv);
	memcpy(key, kv, (size_t)(eq - kv));
	key[eq - kv] = '\0';
	val = eq + 1;
	if (!strcmp(key, "downtime-limit")) {
		if ((r = vfm_parse_duration_ns(val, &n, err)))
			return vfm_error_set(err, r, "%s", key);
		json_object_object_add(args, key, json_object_new_int64((int64_t)(n / 1000000)));
	} else if (!strcmp(key, "max-bandwidth") || !strcmp(key, "avail-switchover-bandwidth")) {
		if ((r = vfm_parse_rate(val, &n, err)))
			return vfm_error_set(err, r, "%s", key);
		json_object_object_add(args, key, json_object_new_int64((int64_t)n));
	} else if (!strcmp(key, "multifd-channels")) {
		if ((r = vfm_parse_uint(val, 0, 255, &n, err)))
			return vfm_error_set(err, r, "%s", key);
		json_object_object_add(args, key, json_object_new_int64((int64_t)n));
	} else if (!strcmp(key, "cpu-throttle-initial") || !strcmp(key, "cpu-throttle-increment")) {
		if ((r = vfm_parse_uint(val, 1, 99, &n, err)))
			return vfm_error_set(err, r, "%s", key);
		json_object_object_add(args, key, json_object_new_int64((int64_t)n));
	} else if (!strcmp(key, "switchover-ack") || !strcmp(key, "pre-copy-dirty-page-tracking") ||
		   !strcmp(key, "auto-converge") || !strcmp(key, "device-throttle")) {
		if ((r = vfm_parse_onoff(val, false, &sw, err)))
			return vfm_error_set(err, r, "%s", key);
		json_object_object_add(args, key, json_object_new_boolean(sw == VFM_ON));
	} else if (!strcmp(key, "tls-hostname")) {
		json_object_object_add(args, key, json_object_new_string(val));
	} else if (!strcmp(key, "tls-authz")) {
		/* Repeated: each adds an identity (a DN holds commas); empty: any. */
		json_object *a;

		if (!json_object_object_get_ex(args, key, &a)) {
			a = json_object_new_array();
			json_object_object_add(args, key, a);
		}
		if (*val)
			json_object_array_add(a, json_object_new_string(val));
	} else if (!strcmp(key, "multifd-transfer")) {
		if ((r = vfm_parse_onoff(val, true, &sw, err)))
			return vfm_error_set(err, r, "%s", key);
		json_object_object_add(args, key, json_object_new_string(
			sw == VFM_ON ? "on" : sw == VFM_OFF ? "off" : "auto"));
	} else {
		return vfm_error_set(err, -EINVAL, "unknown parameter '%s' (downtime-limit, "
				     "max-bandwidth, avail-switchover-bandwidth, multifd-channels, switchover-ack, "
				     "pre-copy-dirty-page-tracking, multifd-transfer, tls-hostname, tls-authz, "
				     "auto-converge, cpu-throttle-initial, cpu-throttle-increment, "
				     "device-throttle)", key);
	}
	return 0;
}

static bool is_final(const char *st)
{
	return !strcmp(st, "completed") || !strcmp(st, "failed") || !strcmp(st, "cancelled");
}

/* Polls query-migrate until the migration ends. */
static int wait_migration(struct ctl_client *c)
{
	struct vfm_error err = { 0 };
	bool tty = isatty(STDOUT_FILENO);
	bool progress_shown = false;
	json_object *mig = NULL;

	for (;;) {
		const char *st;

		json_object_put(mig);
		mig = NULL;
		vfm_error_clear(&err);
		if (ctl_execute(c, "query-migrate", NULL, CTL_DEFAULT_TIMEOUT_MS, &mig, &err)) {
			if (progress_shown)
				printf("\n");
			return fail(&err);
		}
		st = get_str(mig, "status");
		if (is_final(st))
			break;
		if (tty) {
			char b1[32], b2[32], b3[32];

			printf("\r\033[K%-15s %s sent, %s pending, %s/s", st,
			       size_str(get_i64(mig, "transferred_bytes"), b1, sizeof(b1)),
			       size_str(get_i64(mig, "pending_bytes"), b2, sizeof(b2)),
			       size_str((int64_t)get_double(mig, "bandwidth_bps"), b3, sizeof(b3)));
			if (!get_bool(mig, "converging"))
				printf(", NOT converging (needs ~%.0f ms downtime, %s)",
				       get_double(mig, "needed_downtime_ms"),
				       get_str(mig, "bottleneck"));
			fflush(stdout);
			progress_shown = true;
		}
		struct timespec ts = { 0, POLL_MS * 1000000L };
		nanosleep(&ts, NULL);
	}
	if (progress_shown)
		printf("\r\033[K");
	print_migration(mig, stdout);
	if (strcmp(get_str(mig, "status"), "completed")) {
		fprintf(stderr, "vfiomig ctl: migration %s: %s\n", get_str(mig, "status"),
			get_str(mig, "error")[0] ? get_str(mig, "error") : "no reason given");
		json_object_put(mig);
		return VFM_EXIT_FAIL;
	}
	json_object_put(mig);
	return VFM_EXIT_OK;
}

static int simple(struct ctl_client *c, const char *command, json_object *args)
{
	struct vfm_error err = { 0 };

	if (ctl_execute(c, command, args, CTL_DEFAULT_TIMEOUT_MS, NULL, &err))
		return fail(&err);
	return VFM_EXIT_OK;
}

static int run(struct ctl_client *c, int argc, char **argv)
{
	const char *cmd = argv[0];
	struct vfm_error err = { 0 };
	json_object *ret = NULL;
	int status;

	if (!strcmp(cmd, "migrate")) {
		json_object *args = json_object_new_object();
		int r;

		json_object_object_add(args, "uri", json_object_new_string(argv[1]));
		r = simple(c, "migrate", args);
		if (r || argc < 3)
			return r;
		return wait_migration(c);
	}
	if (!strcmp(cmd, "status")) {
		if (ctl_execute(c, "query-vfiomig", NULL, CTL_DEFAULT_TIMEOUT_MS, &ret, &err))
			return fail(&err);
		if (argc > 1)
			printf("%s\n", json_object_to_json_string_ext(ret, JSON_C_TO_STRING_PLAIN));
		else
			print_status(ret, stdout);
		json_object_put(ret);
		return VFM_EXIT_OK;
	}
	if (!strcmp(cmd, "verify")) {
		json_object *v = NULL;

		if (ctl_execute(c, "guest-verify", NULL, CTL_DEFAULT_TIMEOUT_MS, &ret, &err))
			return fail(&err);
		json_object_object_get_ex(ret, "verified", &v);
		status = v && json_object_get_boolean(v) ? VFM_EXIT_OK : VFM_EXIT_FAIL;
		printf("guest: %s, verified %s (%" PRId64 " pages checked, %" PRId64 " errors)%s%s\n",
		       get_str(ret, "kind"), status ? "NO" : "yes", get_i64(ret, "pages_checked"),
		       get_i64(ret, "errors"), get_str(ret, "detail")[0] ? ": " : "",
		       get_str(ret, "detail"));
		json_object_put(ret);
		return status;
	}
	if (!strcmp(cmd, "set")) {
		json_object *args = json_object_new_object();

		for (int i = 1; i < argc; i++) {
			if (parse_param(argv[i], args, &err)) {
				json_object_put(args);
				return usage_error("set: %s", err.msg);
			}
		}
		return simple(c, "migrate-set-parameters", args);
	}
	if (!strcmp(cmd, "cancel"))
		return simple(c, "migrate_cancel", NULL);
	if (!strcmp(cmd, "stop") || !strcmp(cmd, "cont"))
		return simple(c, cmd, NULL);
	/* quit: wait for the VM to hang up, so "ctl quit" returns once it is gone. */
	status = simple(c, "quit", NULL);
	if (!status && ctl_wait_closed(c, CTL_DEFAULT_TIMEOUT_MS))
		fprintf(stderr, "vfiomig ctl: the VM accepted quit but has not closed the socket\n");
	return status;
}

/* Checks the command's arguments before anything is sent. */
static int check_args(int argc, char **argv)
{
	const char *cmd = argv[0];

	if (!strcmp(cmd, "migrate")) {
		if (argc < 2 || argv[1][0] == '-')
			return usage_error("%s", "migrate: which URI?");
		if (argc > 3 || (argc == 3 && strcmp(argv[2], "--wait")))
			return usage_error("migrate: unexpected '%s'", argv[argc - 1]);
		return 0;
	}
	if (!strcmp(cmd, "status")) {
		if (argc > 2 || (argc == 2 && strcmp(argv[1], "--json")))
			return usage_error("status: unexpected '%s'", argv[argc - 1]);
		return 0;
	}
	if (!strcmp(cmd, "set")) {
		struct vfm_error err = { 0 };
		json_object *scratch;
		int r = 0;

		if (argc < 2)
			return usage_error("%s", "set: which KEY=VALUE?");
		scratch = json_object_new_object();
		for (int i = 1; i < argc && !r; i++)
			if (parse_param(argv[i], scratch, &err))
				r = usage_error("set: %s", err.msg);
		json_object_put(scratch);
		return r;
	}
	if (!strcmp(cmd, "cancel") || !strcmp(cmd, "stop") || !strcmp(cmd, "cont") ||
	    !strcmp(cmd, "quit") || !strcmp(cmd, "verify")) {
		if (argc > 1)
			return usage_error("%s: unexpected '%s'", cmd, argv[1]);
		return 0;
	}
	return usage_error("unknown command '%s'", cmd);
}

int cmd_ctl(int argc, char **argv)
{
	struct vfm_error err = { 0 };
	struct ctl_client *c;
	int r;

	for (int i = 1; i < argc && i < 3; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			ctl_usage(stdout);
			return VFM_EXIT_OK;
		}
	}
	if (argc < 2)
		return usage_error("%s", "which control socket?");
	if (argc < 3)
		return usage_error("%s", "which command?");
	if ((r = check_args(argc - 2, argv + 2)))
		return r;
	if (ctl_connect(argv[1], CTL_DEFAULT_TIMEOUT_MS, &c, &err))
		return fail(&err);
	r = run(c, argc - 2, argv + 2);
	ctl_close(c);
	return r;
}
