/*
 * TLS credentials from directories laid out as QEMU's (so users can reuse
 * theirs): x509 (ca-cert.pem, server-cert.pem, server-key.pem,
 * client-cert.pem, client-key.pem, optional ca-crl.pem; QEMU's
 * crypto/tlscredsx509.c) and PSK (keys.psk, "identity:hexkey" lines; QEMU's
 * crypto/tlscredspsk.c), and the tls-authz list.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "migration/tls_int.h"
#include "util/logging.h"

#define LOG "tls"
#define PSK_FILE_MAX (64u << 10)

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int vfm_tls_psk_parse(const char *text, size_t len, const char *identity,
		      char id_out[VFM_TLS_PSK_MAX_ID + 1],
		      unsigned char key[VFM_TLS_PSK_MAX_KEY], size_t *key_len,
		      struct vfm_error *err)
{
	bool found = false;
	unsigned line = 0;
	size_t pos = 0;

	while (pos < len) {
		const char *l = text + pos, *nl = memchr(l, '\n', len - pos);
		size_t ll = nl ? (size_t)(nl - l) : len - pos;
		const char *colon;
		size_t idl, hexl;

		pos += ll + (nl ? 1 : 0);
		line++;
		if (ll && l[ll - 1] == '\r')
			ll--;
		if (!ll)
			continue;
		colon = memchr(l, ':', ll);
		if (!colon || colon == l)
			return vfm_error_set(err, VFM_EPARSE, "keys.psk line %u: expected "
					     "IDENTITY:HEXKEY", line);
		idl = (size_t)(colon - l);
		hexl = ll - idl - 1;
		if (idl > VFM_TLS_PSK_MAX_ID)
			return vfm_error_set(err, VFM_EPARSE, "keys.psk line %u: identity longer "
					     "than %d bytes", line, VFM_TLS_PSK_MAX_ID);
		for (size_t i = 0; i < idl; i++)
			if ((unsigned char)l[i] < 0x20 || l[i] == 0x7f)
				return vfm_error_set(err, VFM_EPARSE, "keys.psk line %u: control "
						     "character in the identity", line);
		if (!hexl || hexl % 2 || hexl / 2 > VFM_TLS_PSK_MAX_KEY)
			return vfm_error_set(err, VFM_EPARSE, "keys.psk line %u: the key must be "
					     "an even number of hex digits, 2 to %d", line,
					     2 * VFM_TLS_PSK_MAX_KEY);
		for (size_t i = 0; i < hexl; i++)
			if (hexval(colon[1 + i]) < 0)
				return vfm_error_set(err, VFM_EPARSE, "keys.psk line %u: '%c' is not "
						     "a hex digit", line, colon[1 + i]);
		if (found || (identity && (strlen(identity) != idl || memcmp(identity, l, idl))))
			continue;
		found = true;
		memcpy(id_out, l, idl);
		id_out[idl] = '\0';
		for (size_t i = 0; i < hexl / 2; i++)
			key[i] = (unsigned char)(hexval(colon[1 + 2 * i]) << 4 |
						 hexval(colon[2 + 2 * i]));
		*key_len = hexl / 2;
	}
	if (!found)
		return identity ? vfm_error_set(err, -ENOENT, "keys.psk has no key for identity "
						"'%.64s'", identity)
				: vfm_error_set(err, VFM_EPARSE, "keys.psk has no entry");
	return 0;
}

/* Reads a small file whole (NUL-terminated); 0 or a negative errno. */
static int read_small(const char *path, char **out, size_t *len)
{
	struct stat st;
	char *buf;
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC), ret = 0;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0)
		ret = -errno;
	else if (!S_ISREG(st.st_mode))
		ret = -EINVAL;
	else if (st.st_size > PSK_FILE_MAX)
		ret = -EFBIG;
	if (ret) {
		close(fd);
		return ret;
	}
	buf = malloc((size_t)st.st_size + 1);
	if (!buf) {
		close(fd);
		return -ENOMEM;
	}
	n = read(fd, buf, (size_t)st.st_size);
	if (n < 0)
		ret = -errno;
	close(fd);
	if (ret) {
		free(buf);
		return ret;
	}
	buf[n] = '\0';
	*out = buf;
	*len = (size_t)n;
	return 0;
}

static int load_psk(struct vfm_tls *t, struct vfm_error *err)
{
	unsigned char key[VFM_TLS_PSK_MAX_KEY];
	char path[300], id[VFM_TLS_PSK_MAX_ID + 1];
	size_t klen;
	int ret;

	snprintf(path, sizeof(path), "%s/keys.psk", t->dir);
	ret = read_small(path, &t->psk_file, &t->psk_file_len);
	if (ret)
		return vfm_error_set(err, ret, "psk:%s: keys.psk: %s", t->dir, strerror(-ret));
	/* Validates every line now, so a damaged file fails at start, not mid-way. */
	ret = vfm_tls_psk_parse(t->psk_file, t->psk_file_len, NULL, id, key, &klen, err);
	if (ret)
		return vfm_error_set(err, ret, "psk:%s: %s", t->dir, err ? err->msg : "");
	if (t->role == VFM_TLS_SERVER)
		return 0;
	/* The client presents the first identity (QEMU's default file has one). */
	if (gnutls_psk_allocate_client_credentials(&t->psk_client))
		return vfm_error_set(err, -ENOMEM, "gnutls: allocating PSK credentials");
	ret = gnutls_psk_set_client_credentials(t->psk_client, id,
						&(gnutls_datum_t){ key, (unsigned)klen },
						GNUTLS_PSK_KEY_RAW);
	explicit_bzero(key, sizeof(key));
	if (ret)
		return vfm_error_set(err, -EINVAL, "psk:%s: %s", t->dir, gnutls_strerror(ret));
	return 0;
}

/* GnuTLS asks for the key of the identity a client named. */
static int psk_server_key(gnutls_session_t s, const char *username, gnutls_datum_t *key)
{
	struct vfm_tls *t = gnutls_session_get_ptr(s);
	unsigned char k[VFM_TLS_PSK_MAX_KEY];
	char id[VFM_TLS_PSK_MAX_ID + 1];
	size_t klen;

	if (vfm_tls_psk_parse(t->psk_file, t->psk_file_len, username, id, k, &klen, NULL))
		return -1;   /* unknown identity: the handshake fails */
	key->data = gnutls_malloc(klen);
	if (!key->data)
		return -1;
	memcpy(key->data, k, klen);
	key->size = (unsigned)klen;
	explicit_bzero(k, sizeof(k));
	return 0;
}

static int need_file(const struct vfm_tls *t, const char *name, char *path, size_t len,
		     struct vfm_error *err)
{
	snprintf(path, len, "%s/%s", t->dir, name);
	if (access(path, R_OK) < 0)
		return vfm_error_set(err, -errno, "x509:%s: %s: %s", t->dir, name, strerror(errno));
	return 0;
}

static int load_x509(struct vfm_tls *t, struct vfm_error *err)
{
	const char *who = t->role == VFM_TLS_SERVER ? "server" : "client";
	char ca[300], cert[300], key[300], crl[300], n1[32], n2[32];
	int ret;

	snprintf(n1, sizeof(n1), "%s-cert.pem", who);
	snprintf(n2, sizeof(n2), "%s-key.pem", who);
	if ((ret = need_file(t, "ca-cert.pem", ca, sizeof(ca), err)) ||
	    (ret = need_file(t, n1, cert, sizeof(cert), err)) ||
	    (ret = need_file(t, n2, key, sizeof(key), err)))
		return ret;
	if (gnutls_certificate_allocate_credentials(&t->x509))
		return vfm_error_set(err, -ENOMEM, "gnutls: allocating credentials");
	ret = gnutls_certificate_set_x509_trust_file(t->x509, ca, GNUTLS_X509_FMT_PEM);
	if (ret <= 0)
		return vfm_error_set(err, -EINVAL, "x509:%s: ca-cert.pem: %s", t->dir,
				     ret ? gnutls_strerror(ret) : "no certificate in it");
	ret = gnutls_certificate_set_x509_key_file(t->x509, cert, key, GNUTLS_X509_FMT_PEM);
	if (ret < 0)
		return vfm_error_set(err, -EINVAL, "x509:%s: %s/%s: %s", t->dir, n1, n2,
				     gnutls_strerror(ret));
	snprintf(crl, sizeof(crl), "%s/ca-crl.pem", t->dir);
	if (!access(crl, F_OK)) {
		ret = gnutls_certificate_set_x509_crl_file(t->x509, crl, GNUTLS_X509_FMT_PEM);
		if (ret < 0)
			return vfm_error_set(err, -EINVAL, "x509:%s: ca-crl.pem: %s", t->dir,
					     gnutls_strerror(ret));
	}
	return 0;
}

int vfm_tls_new(const char *spec, enum vfm_tls_role role, const char *hostname,
		const char *authz, struct vfm_tls **out, struct vfm_error *err)
{
	struct vfm_tls *t;
	const char *dir;
	int ret;

	if (!spec || (strncmp(spec, "x509:", 5) && strncmp(spec, "psk:", 4)))
		return vfm_error_set(err, VFM_EPARSE, "TLS credentials '%.64s': expected x509:DIR "
				     "or psk:DIR", spec ? spec : "");
	dir = strchr(spec, ':') + 1;
	if (!*dir || strlen(dir) >= sizeof(t->dir))
		return vfm_error_set(err, VFM_EPARSE, "TLS credentials '%.64s': %s directory",
				     spec, *dir ? "too long a" : "no");
	t = calloc(1, sizeof(*t));
	if (!t)
		return vfm_error_set(err, -ENOMEM, "allocating TLS credentials");
	atomic_init(&t->refs, 1);
	t->role = role;
	t->kind = spec[0] == 'x' ? VFM_TLS_X509 : VFM_TLS_PSK;
	snprintf(t->dir, sizeof(t->dir), "%s", dir);
	snprintf(t->hostname, sizeof(t->hostname), "%s", hostname ? hostname : "");
	if (role == VFM_TLS_SERVER && authz && *authz && !(t->authz = strdup(authz))) {
		ret = vfm_error_set(err, -ENOMEM, "allocating tls-authz");
		goto err_free;
	}
	ret = t->kind == VFM_TLS_X509 ? load_x509(t, err) : load_psk(t, err);
	if (ret)
		goto err_free;
	if (t->kind == VFM_TLS_PSK && role == VFM_TLS_SERVER) {
		if (gnutls_psk_allocate_server_credentials(&t->psk_server)) {
			ret = vfm_error_set(err, -ENOMEM, "gnutls: allocating PSK credentials");
			goto err_free;
		}
		gnutls_psk_set_server_credentials_function(t->psk_server, psk_server_key);
	}
	*out = t;
	return 0;

err_free:
	vfm_tls_unref(t);
	return ret;
}

void vfm_tls_unref(struct vfm_tls *t)
{
	if (!t || atomic_fetch_sub(&t->refs, 1) != 1)
		return;
	if (t->x509)
		gnutls_certificate_free_credentials(t->x509);
	if (t->psk_client)
		gnutls_psk_free_client_credentials(t->psk_client);
	if (t->psk_server)
		gnutls_psk_free_server_credentials(t->psk_server);
	if (t->psk_file) {
		explicit_bzero(t->psk_file, t->psk_file_len);
		free(t->psk_file);
	}
	free(t->authz);
	free(t);
}

bool vfm__tls_authz_ok(const struct vfm_tls *t, const char *id)
{
	size_t idl = strlen(id);

	if (!t->authz)
		return true;
	for (const char *p = t->authz; *p;) {
		const char *nl = strchr(p, '\n');
		size_t n = nl ? (size_t)(nl - p) : strlen(p);

		if (n == idl && !memcmp(p, id, n))
			return true;
		p += n + (nl ? 1 : 0);
	}
	return false;
}
