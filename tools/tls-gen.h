/*
 * Throwaway TLS credentials in QEMU's layouts (vfiomig demo --tls, the
 * tests): a CA with server and client certificates, or a keys.psk.
 */
#ifndef VFM_TOOLS_TLS_GEN_H
#define VFM_TOOLS_TLS_GEN_H

#include "vfiomig/common.h"

struct tls_gen_opts {
	const char *server_name;   /* DNS name (and CN) of the server certificate */
	const char *server_ip;     /* its IP address SAN, or NULL */
	const char *client_cn;     /* CN of the client certificate */
	/* The leaf certificates' validity, seconds from now. */
	long server_not_before_s, server_not_after_s;
	long client_not_before_s, client_not_after_s;
};
/* Defaults: localhost, 127.0.0.1, CN=vfiomig-source, valid from an hour ago for a day. */
void tls_gen_opts_default(struct tls_gen_opts *o);
/* Writes ca-cert.pem, server-{cert,key}.pem, client-{cert,key}.pem into dir
 * (which exists), keys mode 0600. The CA's key is never written. */
int tls_gen_x509(const char *dir, const struct tls_gen_opts *o, struct vfm_error *err);
/* Writes dir/keys.psk: "identity:<32 random bytes in hex>". */
int tls_gen_psk(const char *dir, const char *identity, struct vfm_error *err);

#endif
