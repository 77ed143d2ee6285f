/*
 * TLS 1.3 (GnuTLS) under the migration channels: credentials laid out as
 * QEMU's (x509 and PSK directories), the handshake with every check (CA,
 * hostname, validity, tls-authz), and a relay per connection that hands the
 * engine a plain socket while it encrypts (docs/security.md).
 */
#ifndef VFM_MIGRATION_TLS_H
#define VFM_MIGRATION_TLS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "vfiomig/common.h"

enum vfm_tls_role { VFM_TLS_CLIENT, VFM_TLS_SERVER };

/*
 * Credentials and policy of one endpoint, shared by its connections (each
 * relay holds a reference, so it may outlive whoever created it).
 *   spec      "x509:DIR" or "psk:DIR"
 *   hostname  client: the name the server's certificate must carry
 *   authz     server: allowed client certificate DNs or PSK identities, one
 *             per line; NULL or "" = any the CA or key file accepts
 */
struct vfm_tls;
int vfm_tls_new(const char *spec, enum vfm_tls_role role, const char *hostname,
		const char *authz, struct vfm_tls **out, struct vfm_error *err);
void vfm_tls_unref(struct vfm_tls *t);

/*
 * Runs the handshake on the connected socket fd and the checks, then starts
 * the relay. fd is consumed (closed on failure too). On success *out is a
 * connected AF_UNIX stream socket (blocking, close-on-exec) carrying the
 * plaintext; closing or shutting it down ends the TLS session. The handshake
 * is bounded by timeout_ms and ends early when *cancel becomes true. peer
 * names the other end in messages.
 */
int vfm_tls_wrap(struct vfm_tls *t, int fd, const char *peer, int timeout_ms,
		 const atomic_bool *cancel, int *out, struct vfm_error *err);

/*
 * keys.psk as QEMU (and GnuTLS's psktool) write it: "identity:hexkey" lines.
 * Finds `identity` (NULL: the first entry) and writes its name and key.
 * Every line is validated, so a damaged file is an error wherever it is.
 */
#define VFM_TLS_PSK_MAX_KEY 64
#define VFM_TLS_PSK_MAX_ID 128
int vfm_tls_psk_parse(const char *text, size_t len, const char *identity,
		      char id_out[VFM_TLS_PSK_MAX_ID + 1],
		      unsigned char key[VFM_TLS_PSK_MAX_KEY], size_t *key_len,
		      struct vfm_error *err);

#endif
