/* The error convention: negative errno or VFM_E* codes plus a message. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "vfiomig/common.h"

const char *vfm_strerror(int code)
{
	switch (code) {
#define VFM_ERRNO_CASE(name, val, msg) case name: return msg;
	VFM_ERRNO_MAP(VFM_ERRNO_CASE)
#undef VFM_ERRNO_CASE
	case 0:
		return "success";
	default:
		break;
	}
	if (code < 0 && code > -4096)
		return strerror(-code);
	return "unknown error";
}

int vfm_error_setv(struct vfm_error *err, int code, const char *fmt, va_list ap)
{
	char now[VFM_ERROR_MSG_MAX];
	char both[2 * VFM_ERROR_MSG_MAX + 2];

	if (!err)
		return code;
	vsnprintf(now, sizeof(now), fmt, ap);
	if (err->msg[0] && err->code) {
		/* Keep the deeper cause: "outer: inner", truncated to fit. */
		snprintf(both, sizeof(both), "%s: %s", now, err->msg);
		memcpy(err->msg, both, sizeof(err->msg) - 1);
		err->msg[sizeof(err->msg) - 1] = '\0';
	} else {
		snprintf(err->msg, sizeof(err->msg), "%s", now);
	}
	err->code = code;
	return code;
}

int vfm_error_set(struct vfm_error *err, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfm_error_setv(err, code, fmt, ap);
	va_end(ap);
	return code;
}

void vfm_error_clear(struct vfm_error *err)
{
	if (err) {
		err->code = 0;
		err->msg[0] = '\0';
	}
}
