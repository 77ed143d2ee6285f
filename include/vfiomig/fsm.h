/* The VFIO migration v2 device state machine (values are the kernel's uAPI). */
#ifndef VFIOMIG_FSM_H
#define VFIOMIG_FSM_H

#include "vfiomig/common.h"

#ifdef __cplusplus
extern "C" {
#endif

enum vfm_state {
	VFM_STATE_ERROR = 0,
	VFM_STATE_STOP = 1,
	VFM_STATE_RUNNING = 2,
	VFM_STATE_STOP_COPY = 3,
	VFM_STATE_RESUMING = 4,
	VFM_STATE_RUNNING_P2P = 5,
	VFM_STATE_PRE_COPY = 6,
	VFM_STATE_PRE_COPY_P2P = 7,
};
#define VFM_STATE_COUNT 8

/* Migration flags (VFIO_DEVICE_FEATURE_MIGRATION). */
#define VFM_MIG_STOP_COPY (1ull << 0)
#define VFM_MIG_P2P       (1ull << 1)
#define VFM_MIG_PRE_COPY  (1ull << 2)
#define VFM_MIG_ALL (VFM_MIG_STOP_COPY | VFM_MIG_P2P | VFM_MIG_PRE_COPY)

/* "RUNNING", "PRE_COPY_P2P", ...; "INVALID" for out-of-range values. */
VFM_EXPORT const char *vfm_state_name(enum vfm_state s);
/* Accepts the names above (case-insensitive); -EINVAL otherwise. */
VFM_EXPORT int vfm_state_from_name(const char *name, enum vfm_state *out);

/* Whether a device with these migration flags supports state s. ERROR: never. */
VFM_EXPORT bool vfm_state_supported(uint64_t flags, enum vfm_state s);
/* PRE_COPY, PRE_COPY_P2P and STOP_COPY: the device produces data. */
VFM_EXPORT bool vfm_state_is_saving(enum vfm_state s);
/* A data session exists in this state (saving states and RESUMING). */
VFM_EXPORT bool vfm_state_has_session(enum vfm_state s);
/* Whether the single arc from -> to opens a new data session. */
VFM_EXPORT bool vfm_arc_opens_session(enum vfm_state from, enum vfm_state to);
/* Whether from -> to is a single arc a device implements (for the flags). */
VFM_EXPORT bool vfm_arc_is_direct(uint64_t flags, enum vfm_state from, enum vfm_state to);

/*
 * Next hop from cur towards target with the kernel's semantics. Returns 0 and
 * *next, or -EINVAL when a state is unsupported by flags, target is ERROR,
 * or the request is forbidden (STOP_COPY -> PRE_COPY/PRE_COPY_P2P).
 * cur == target gives *next = target.
 */
VFM_EXPORT int vfm_fsm_next(uint64_t flags, enum vfm_state cur,
			    enum vfm_state target, enum vfm_state *next);

/*
 * Full path: path[0..*len-1] are the states entered in order, ending with
 * target (empty when cur == target). path must hold VFM_STATE_COUNT entries.
 */
VFM_EXPORT int vfm_fsm_path(uint64_t flags, enum vfm_state cur,
			    enum vfm_state target, enum vfm_state *path,
			    size_t *len);

/* "STOP_COPY|P2P|PRE_COPY" into buf; returns buf. */
VFM_EXPORT const char *vfm_mig_flags_str(uint64_t flags, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
