/* Internal logging shorthands; the level check comes first so that disabled
 * trace points cost one load. */
#ifndef VFM_UTIL_LOGGING_H
#define VFM_UTIL_LOGGING_H

#include "vfiomig/log.h"

#define VFM_LOG_AT(lvl, prefix, ...)                          \
	do {                                                  \
		if (vfm_log_enabled(lvl))                     \
			vfm_log((lvl), (prefix), __VA_ARGS__); \
	} while (0)

#define vfm_err(prefix, ...)   VFM_LOG_AT(VFM_LOG_ERROR, prefix, __VA_ARGS__)
#define vfm_warn(prefix, ...)  VFM_LOG_AT(VFM_LOG_WARN, prefix, __VA_ARGS__)
#define vfm_info(prefix, ...)  VFM_LOG_AT(VFM_LOG_INFO, prefix, __VA_ARGS__)
#define vfm_debug(prefix, ...) VFM_LOG_AT(VFM_LOG_DEBUG, prefix, __VA_ARGS__)
#define vfm_trace(prefix, ...) VFM_LOG_AT(VFM_LOG_TRACE, prefix, __VA_ARGS__)

#endif
