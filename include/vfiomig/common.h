/* Export macro and the error convention shared by every vfiomig header. */
#ifndef VFIOMIG_COMMON_H
#define VFIOMIG_COMMON_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(VFM_BUILDING_LIB)
#define VFM_EXPORT __attribute__((visibility("default")))
#else
#define VFM_EXPORT
#endif

#define VFM_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Every function that can fail returns 0 (or a non-negative count) on success
 * and a negative errno, or one of the VFM_E* codes below, on failure. Callers
 * that want a human message pass a struct vfm_error; NULL is always allowed.
 */
#define VFM_ERROR_MSG_MAX 256

struct vfm_error {
	int code;                     /* negative errno or VFM_E*; 0 = no error */
	char msg[VFM_ERROR_MSG_MAX];  /* NUL-terminated, may be empty */
};

/* Project error codes beyond errno: name, value, message. */
#define VFM_ERRNO_MAP(X)                                                  \
	X(VFM_EFORBIDDEN, -10001, "forbidden device state transition")    \
	X(VFM_ESTREAM, -10002, "invalid migration stream")                \
	X(VFM_ECHECKSUM, -10003, "checksum mismatch")                     \
	X(VFM_EPROTOCOL, -10004, "peer violated the protocol")            \
	X(VFM_ENOMIGRATION, -10005, "device does not support migration")  \
	X(VFM_ESESSION, -10006, "device data session out of sync")        \
	X(VFM_ECANCELED, -10007, "migration cancelled")                   \
	X(VFM_EPARSE, -10008, "invalid value")                          \
	X(VFM_ETLS, -10009, "TLS handshake or authentication refused")

enum vfm_errno {
#define VFM_ERRNO_ENUM(name, val, msg) name = val,
	VFM_ERRNO_MAP(VFM_ERRNO_ENUM)
#undef VFM_ERRNO_ENUM
};

/* Text for a negative errno or VFM_E* code; never NULL. */
VFM_EXPORT const char *vfm_strerror(int code);

/*
 * Record an error: sets err->code and formats err->msg (if err is not NULL)
 * and returns code, so that `return vfm_error_set(err, -EINVAL, "...")` works.
 * A message already present is kept as context: the new one is prefixed.
 */
VFM_EXPORT int vfm_error_set(struct vfm_error *err, int code,
			     const char *fmt, ...) VFM_PRINTF(3, 4);
VFM_EXPORT int vfm_error_setv(struct vfm_error *err, int code,
			      const char *fmt, va_list ap) VFM_PRINTF(3, 0);
VFM_EXPORT void vfm_error_clear(struct vfm_error *err);

#ifdef __cplusplus
}
#endif
#endif
