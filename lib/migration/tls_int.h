/* Internals shared by tls_creds.c, tls.c and tls_relay.c. */
#ifndef VFM_MIGRATION_TLS_INT_H
#define VFM_MIGRATION_TLS_INT_H

#include <gnutls/gnutls.h>

#include "migration/tls.h"

enum vfm_tls_kind { VFM_TLS_X509, VFM_TLS_PSK };

struct vfm_tls {
	/* Never change after vfm_tls_new(); read by every connection's thread. */
	enum vfm_tls_role role;
	enum vfm_tls_kind kind;
	char dir[256];
	char hostname[256];          /* client: checked against the server certificate */
	char *authz;                 /* server: allowed identities, one per line; NULL = any */
	gnutls_certificate_credentials_t x509;
	gnutls_psk_client_credentials_t psk_client;
	gnutls_psk_server_credentials_t psk_server;
	char *psk_file;              /* server: keys.psk contents, looked up per handshake */
	size_t psk_file_len;
	atomic_int refs;
};

/* Whether id is allowed by t->authz (any when there is no list). */
bool vfm__tls_authz_ok(const struct vfm_tls *t, const char *id);
/* Starts the relay thread over an established session; owns s and net. */
int vfm__tls_relay_start(struct vfm_tls *t, gnutls_session_t s, int net, const char *peer,
			 int timeout_ms, int *out, struct vfm_error *err);

/*
 * tls_accept.c: a listener's handshakes in parallel. The acceptor owns t.
 * add() consumes fd and starts its handshake; take() hands out a wrapped fd
 * once one is ready (fd() turns readable then); refused() counts the
 * connections turned away; cancel() makes the ones in flight give up; free()
 * too, and closes what nobody took (threads still running hold it alive).
 */
struct vfm_tls_acceptor;
int vfm__tls_acceptor_new(struct vfm_tls *t, int timeout_ms, const char *name,
			  struct vfm_tls_acceptor **out, struct vfm_error *err);
void vfm__tls_acceptor_add(struct vfm_tls_acceptor *a, int fd, const char *peer);
int vfm__tls_acceptor_fd(const struct vfm_tls_acceptor *a);
bool vfm__tls_acceptor_take(struct vfm_tls_acceptor *a, int *fd);
void vfm__tls_acceptor_cancel(struct vfm_tls_acceptor *a);
unsigned vfm__tls_acceptor_refused(const struct vfm_tls_acceptor *a);
void vfm__tls_acceptor_free(struct vfm_tls_acceptor *a);

#endif
