/*
 * Internals of `vfiomig demo`: child processes in a private temp dir
 * (demo-procs.c) and the result object with its human report (demo-report.c).
 */
#ifndef VFM_TOOLS_DEMO_H
#define VFM_TOOLS_DEMO_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include <json-c/json.h>

#include "vfiomig/common.h"

/* ---- child processes (demo-procs.c) ---- */

struct demo_child {
	char name[32];          /* "dev0-src", "vm-src": names it in messages */
	char log_path[256];     /* its stdout and stderr */
	pid_t pid;              /* 0: never started */
	bool reaped;
	int status;             /* waitpid status once reaped */
};

/*
 * Starts argv (argv[0] is the program) with stdin from /dev/null and stdout and
 * stderr appended to log_path, in its own process group (a Ctrl-C reaches only
 * the demo, which then stops its children in order) and with a parent-death
 * signal (SIGTERM) so it does not outlive a demo that was killed.
 */
int demo_child_spawn(struct demo_child *c, const char *name, const char *log_path,
		     char *const argv[], struct vfm_error *err);
/* Reaps c if it exited; true when it is not running (any more). */
bool demo_child_exited(struct demo_child *c);
/* "exited with status 1", "killed by signal 9", "running". */
const char *demo_child_describe(const struct demo_child *c, char *buf, size_t len);
/*
 * SIGTERM to every started child, up to grace_ms for them to exit, then
 * SIGKILL to the rest; reaps all. Safe to call twice.
 */
void demo_children_stop(struct demo_child *cs, size_t n, int grace_ms);

/*
 * Waits until path is a UNIX socket that accepts a connection (the connection
 * is closed at once). Fails early when owner exits or *stop becomes non-zero
 * (-EINTR), and after timeout_ms (-ETIMEDOUT); the message names owner.
 */
int demo_wait_socket(const char *path, struct demo_child *owner, int timeout_ms,
		     volatile sig_atomic_t *stop, struct vfm_error *err);

/* The last max_lines lines of the file at path into buf ("" if none). */
void demo_tail(const char *path, int max_lines, char *buf, size_t len);

/* mkdtemp under $TMPDIR (or /tmp), mode 0700, into dir. */
int demo_tmpdir_create(char *dir, size_t len, struct vfm_error *err);
/* Removes the files in dir (it holds no subdirectories) and dir itself. */
void demo_tmpdir_remove(const char *dir);

/* Milliseconds on CLOCK_MONOTONIC. */
double demo_now_ms(void);

/* ---- result and report (demo-report.c) ---- */

/*
 * Compares what the source reported after it completed with what the
 * destination reported after load (both query-vfiomig status objects) and
 * fills res: the contract's timing and byte keys from the source's migration
 * object, "devices" (per device id: both checksums and whether they match),
 * "guest" (the destination's verification) and "verified". Returns whether
 * everything matched; *why (if not) gets the first reason.
 */
bool demo_result_compare(json_object *res, json_object *src_status,
			 json_object *dst_status, char *why, size_t why_len);

/*
 * A result object with every contract key present (zeros, verified false),
 * so a failed run still prints well-formed JSON.
 */
json_object *demo_result_new(const char *guest_kind, const char *uri,
			     uint64_t downtime_limit_ms);

/*
 * Overrides downtime_ms with a figure measured elsewhere; downtime_from
 * ("source" by default) says who measured it.
 */
void demo_result_set_downtime(json_object *res, double ms, const char *measured_by);

/* Appends {"t_ms": t, "phase": phase, "detail": detail} to res's timeline. */
void demo_result_event(json_object *res, double t_ms, const char *phase, const char *detail);

/* The short human report of a result object. */
void demo_report_human(json_object *res, FILE *out);

/* One progress line ("active  512.0 MiB sent, 128.0 MiB pending, 950.1 MiB/s"). */
void demo_progress_line(json_object *migration, char *buf, size_t len);

#endif
