/*
 * A client of the VM control socket (docs/control-protocol.md): connect,
 * negotiate, run commands with timeouts while skipping events. Used by
 * `vfiomig ctl` and `vfiomig demo`.
 */
#ifndef VFM_TOOLS_CTL_CLIENT_H
#define VFM_TOOLS_CTL_CLIENT_H

#include <json-c/json.h>

#include "vfiomig/common.h"

struct ctl_client;

/* How long ctl waits by default for a connection, a greeting or a reply. */
#define CTL_DEFAULT_TIMEOUT_MS 10000

/*
 * Connects to the UNIX socket at path, reads the greeting and sends
 * qmp_capabilities; everything within timeout_ms. Clear messages for a
 * missing socket, nobody listening, and a VM busy with another client (the
 * greeting does not come).
 */
int ctl_connect(const char *path, int timeout_ms, struct ctl_client **out,
		struct vfm_error *err);

/*
 * Runs one command. args (may be NULL) is consumed, even on failure. Events
 * that arrive meanwhile are queued (the oldest are dropped beyond 64).
 * Returns 0 and *ret (a new reference: json_object_put it; may be NULL when
 * ret is NULL) for {"return": ...}; -EREMOTEIO for {"error": ...}, with the
 * desc in err->msg and the class in ctl_last_error_class(); -ETIMEDOUT,
 * -ECONNRESET (the VM closed the connection) or VFM_EPROTOCOL otherwise.
 */
int ctl_execute(struct ctl_client *c, const char *command, json_object *args,
		int timeout_ms, json_object **ret, struct vfm_error *err);

/* Class of the last error reply ("GenericError", ...), "" if none. */
const char *ctl_last_error_class(const struct ctl_client *c);

/*
 * The next event ({"event": NAME, "data": ..., "timestamp": ...}), queued or
 * arriving within timeout_ms (0: only what is queued or already readable).
 * 0 and *ev (a new reference), -ETIMEDOUT, or an error as ctl_execute.
 */
int ctl_next_event(struct ctl_client *c, int timeout_ms, json_object **ev,
		   struct vfm_error *err);

/* After quit: waits up to timeout_ms for the VM to close the connection. */
int ctl_wait_closed(struct ctl_client *c, int timeout_ms);

void ctl_close(struct ctl_client *c);

#endif
