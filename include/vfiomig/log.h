/* Logging with levels and a per-object prefix; tracing of device events. */
#ifndef VFIOMIG_LOG_H
#define VFIOMIG_LOG_H

#include "vfiomig/common.h"

#ifdef __cplusplus
extern "C" {
#endif

enum vfm_log_level {
	VFM_LOG_ERROR = 0,
	VFM_LOG_WARN,
	VFM_LOG_INFO,
	VFM_LOG_DEBUG,
	VFM_LOG_TRACE,   /* every device state change and data block */
};

/*
 * The level starts from $VFIOMIG_LOG (error|warn|info|debug|trace, default
 * warn); $VFIOMIG_TRACE=1 forces trace. Tools raise it with -v.
 */
VFM_EXPORT void vfm_log_set_level(enum vfm_log_level level);
VFM_EXPORT enum vfm_log_level vfm_log_get_level(void);
VFM_EXPORT int vfm_log_level_from_name(const char *name, enum vfm_log_level *out);

/* Where lines go: default stderr. The sink is called with a full line. */
typedef void (*vfm_log_sink_fn)(enum vfm_log_level level, const char *line,
				void *opaque);
VFM_EXPORT void vfm_log_set_sink(vfm_log_sink_fn fn, void *opaque);

/* prefix names the object ("dev0", "migration"); may be NULL. */
VFM_EXPORT void vfm_log(enum vfm_log_level level, const char *prefix,
			const char *fmt, ...) VFM_PRINTF(3, 4);

static inline bool vfm_log_enabled(enum vfm_log_level level)
{
	return level <= vfm_log_get_level();
}

#ifdef __cplusplus
}
#endif
#endif
