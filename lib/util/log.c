/* Levelled logging to stderr (or a sink), one line per call, thread-safe. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "vfiomig/log.h"

static const char *const level_names[] = {
	[VFM_LOG_ERROR] = "error", [VFM_LOG_WARN] = "warn", [VFM_LOG_INFO] = "info",
	[VFM_LOG_DEBUG] = "debug", [VFM_LOG_TRACE] = "trace",
};

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static _Atomic int cur_level = VFM_LOG_WARN;
static pthread_mutex_t sink_lock = PTHREAD_MUTEX_INITIALIZER;
static vfm_log_sink_fn sink_fn;   /* guarded by sink_lock */
static void *sink_opaque;         /* guarded by sink_lock */

int vfm_log_level_from_name(const char *name, enum vfm_log_level *out)
{
	for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
		if (name && strcasecmp(name, level_names[i]) == 0) {
			*out = (enum vfm_log_level)i;
			return 0;
		}
	}
	return -22; /* -EINVAL */
}

static void init_from_env(void)
{
	const char *s = getenv("VFIOMIG_LOG");
	enum vfm_log_level lvl;

	if (s && vfm_log_level_from_name(s, &lvl) == 0)
		cur_level = lvl;
	s = getenv("VFIOMIG_TRACE");
	if (s && *s && strcmp(s, "0") != 0)
		cur_level = VFM_LOG_TRACE;
}

void vfm_log_set_level(enum vfm_log_level level)
{
	pthread_once(&init_once, init_from_env);
	if (level > VFM_LOG_TRACE)
		level = VFM_LOG_TRACE;
	cur_level = level;
}

enum vfm_log_level vfm_log_get_level(void)
{
	pthread_once(&init_once, init_from_env);
	return (enum vfm_log_level)cur_level;
}

void vfm_log_set_sink(vfm_log_sink_fn fn, void *opaque)
{
	pthread_mutex_lock(&sink_lock);
	sink_fn = fn;
	sink_opaque = opaque;
	pthread_mutex_unlock(&sink_lock);
}

void vfm_log(enum vfm_log_level level, const char *prefix, const char *fmt, ...)
{
	char line[1024];
	struct timespec ts;
	va_list ap;
	int n;

	if (!vfm_log_enabled(level))
		return;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	n = snprintf(line, sizeof(line), "%ld.%06ld %s: %s%s%s", (long)ts.tv_sec,
		     ts.tv_nsec / 1000, level_names[level], prefix ? "[" : "",
		     prefix ? prefix : "", prefix ? "] " : "");
	if (n < 0 || (size_t)n >= sizeof(line))
		n = 0;
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
	va_end(ap);

	pthread_mutex_lock(&sink_lock);
	if (sink_fn)
		sink_fn(level, line, sink_opaque);
	else
		fprintf(stderr, "%s\n", line);
	pthread_mutex_unlock(&sink_lock);
}
