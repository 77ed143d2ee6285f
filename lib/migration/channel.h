/*
 * Migration channels from QEMU-style URIs: tcp:HOST:PORT, unix:PATH,
 * file:PATH, fd:N. A listener is created by the destination before the
 * source connects; sockets are bidirectional (the return path rides on the
 * main channel), files and fds have no return path.
 */
#ifndef VFM_MIGRATION_CHANNEL_H
#define VFM_MIGRATION_CHANNEL_H

#include <stdatomic.h>
#include <stdbool.h>

#include "vfiomig/common.h"

enum vfm_uri_kind { VFM_URI_TCP, VFM_URI_UNIX, VFM_URI_FILE, VFM_URI_FD };

struct vfm_uri {
	enum vfm_uri_kind kind;
	char host[256];   /* tcp: host name or address ("[::1]" given as ::1) */
	unsigned port;    /* tcp: 1..65535 (0 allowed for a listener: any port) */
	char path[108];   /* unix (sun_path limit) / file */
	int fd;           /* fd: */
};

/* Parses a URI; clear errors for unknown schemes, bad ports, long paths. */
int vfm_uri_parse(const char *text, struct vfm_uri *uri, struct vfm_error *err);
/* Canonical text form into buf. */
const char *vfm_uri_str(const struct vfm_uri *uri, char *buf, size_t len);
/* tcp and unix have a return path; file and fd do not. */
bool vfm_uri_has_return_path(const struct vfm_uri *uri);

/*
 * Destination side: listen (tcp/unix: socket bound and listening, unix socket
 * file mode 0600, a stale socket file replaced only if it is a socket; file:
 * opened for reading; fd: used as is). For tcp with port 0 the chosen port is
 * written back into uri->port.
 */
struct vfm_listener;
int vfm_listen(struct vfm_uri *uri, struct vfm_listener **out, struct vfm_error *err);
/* Accept one connection (file/fd: returns the fd once). timeout_ms -1 = forever. */
int vfm_accept(struct vfm_listener *l, int timeout_ms, int *fd, struct vfm_error *err);
/* A fd to poll for an incoming connection, or -1 for file/fd. */
int vfm_listener_fd(const struct vfm_listener *l);
void vfm_listener_close(struct vfm_listener *l);   /* removes the unix socket file */

/* Source side: connect (tcp/unix, bounded by timeout_ms), or create/truncate the
 * file (mode 0600), or dup the fd. Sets TCP_NODELAY on tcp. */
int vfm_connect(const struct vfm_uri *uri, int timeout_ms, int *fd, struct vfm_error *err);

/*
 * The migration's own forms of the above (channel_mig.c): TLS when p->tls_creds names
 * credentials (the fd is then the plaintext end of a relay, tls.h), and the
 * rule that a plaintext tcp listener binds loopback only unless p->insecure.
 * A listener with TLS accepts on: a peer refused by the handshake or by
 * tls-authz is logged and closed, and the wait goes on. cancel (optional)
 * cuts a handshake short.
 */
struct vfm_migration_params;
int vfm_connect_mig(const struct vfm_uri *uri, const struct vfm_migration_params *p,
		    const atomic_bool *cancel, int *fd, struct vfm_error *err);
int vfm_listen_mig(struct vfm_uri *uri, const struct vfm_migration_params *p,
		   const atomic_bool *cancel, struct vfm_listener **out, struct vfm_error *err);
/*
 * Closes a migration connection. Under TLS the fd is a relay's plaintext
 * end: what was written may still sit in the relay, and a process that
 * exits next would lose it (a kernel socket would still send it). So the
 * write side is shut first and the relay's own close awaited (bounded by
 * p->timeout_ms), like a lingering close.
 */
void vfm_channel_close(int fd, const struct vfm_migration_params *p);
/* channel_mig.c: attaches TLS (taking the reference t, even on failure). */
struct vfm_tls;
int vfm__listener_set_tls(struct vfm_listener *l, struct vfm_tls *t, int hs_timeout_ms,
			  const atomic_bool *cancel, struct vfm_error *err);
/* Connections refused so far by a TLS listener. */
unsigned vfm_listener_refused(const struct vfm_listener *l);
/* Whether every address host resolves to is a loopback one. */
bool vfm_uri_is_loopback(const struct vfm_uri *uri);

#endif
