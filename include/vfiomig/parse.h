/* Parsing of the sizes, rates, durations and switches the CLI accepts. */
#ifndef VFIOMIG_PARSE_H
#define VFIOMIG_PARSE_H

#include "vfiomig/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* "4096", "64K", "64M", "1G", "2T" (binary multiples; optional "B"/"iB"). */
VFM_EXPORT int vfm_parse_size(const char *s, uint64_t *bytes, struct vfm_error *err);
/* "8M/s", "8M" (per second implied), "0" = unlimited where callers say so. */
VFM_EXPORT int vfm_parse_rate(const char *s, uint64_t *bytes_per_sec, struct vfm_error *err);
/* "300" (ms), "300ms", "2s", "500us", "10ns". */
VFM_EXPORT int vfm_parse_duration_ns(const char *s, uint64_t *ns, struct vfm_error *err);
/* Decimal unsigned integer in [min, max]. */
VFM_EXPORT int vfm_parse_uint(const char *s, uint64_t min, uint64_t max,
			      uint64_t *out, struct vfm_error *err);

enum vfm_onoff { VFM_OFF = 0, VFM_ON = 1, VFM_AUTO = 2 };
/* on|off|true|false|yes|no|1|0, and auto when allow_auto. */
VFM_EXPORT int vfm_parse_onoff(const char *s, bool allow_auto, enum vfm_onoff *out,
			       struct vfm_error *err);

/* Human form of a byte count ("64.0 MiB"), into buf; returns buf. */
VFM_EXPORT const char *vfm_format_size(uint64_t bytes, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
