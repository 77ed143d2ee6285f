/*
 * The VM's control socket server (docs/control-protocol.md): a UNIX socket,
 * one client at a time, QMP-style JSON lines, events from any thread.
 * Everything but control_event runs on the main loop thread.
 */
#ifndef VFM_VMM_CONTROL_H
#define VFM_VMM_CONTROL_H

#include <poll.h>
#include <stdbool.h>

#include <json-c/json.h>

#include "vfiomig/common.h"
#include "vmm/vm.h"

struct control;

/*
 * Listens on path (mode 0600). Refuses a symlink or any other non-socket at
 * path, a socket another process still serves, and a parent directory that
 * others may write without the sticky bit; replaces a stale socket.
 */
int control_open(const char *path, struct vm *vm, struct control **out, struct vfm_error *err);
/* Closes the client and the listener and removes the socket file. */
void control_close(struct control *c);

unsigned control_poll_fds(struct control *c, struct pollfd *pfd, unsigned max);
void control_poll_handle(struct control *c, const struct pollfd *pfd, unsigned n);
/* A client ran quit (its reply is queued). */
bool control_quit_requested(const struct control *c);

/* From any thread: an event for the negotiated client, if any; data is consumed. */
void control_event(struct control *c, const char *name, json_object *data);
/* Writes what is queued (events included), waiting up to timeout_ms. */
void control_flush(struct control *c, int timeout_ms);

/*
 * Tests and fuzzing: a control with no sockets (control_close frees it).
 * control_handle_line runs one request line (no '\n') as a client's, and
 * returns the replies it produced, each ending in '\n' ("" for none;
 * malloc'd, NULL without memory).
 */
int control_open_detached(struct vm *vm, struct control **out);
char *control_handle_line(struct control *c, const char *line);

/* A vm_event_fn that forwards to control_event (opaque = the control). */
void control_vm_event(void *opaque, const char *name, json_object *data);

#endif
