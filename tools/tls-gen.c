/* Throwaway TLS credentials made with the GnuTLS API (no certtool needed). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "tls-gen.h"

void tls_gen_opts_default(struct tls_gen_opts *o)
{
	o->server_name = "localhost";
	o->server_ip = "127.0.0.1";
	o->client_cn = "vfiomig-source";
	o->server_not_before_s = o->client_not_before_s = -3600;
	o->server_not_after_s = o->client_not_after_s = 86400;
}

static int write_file(const char *dir, const char *name, const void *data, size_t len,
		      int mode, struct vfm_error *err)
{
	char path[512];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0)
		return vfm_error_set(err, -errno, "%s: %s", path, strerror(errno));
	if (write(fd, data, len) != (ssize_t)len) {
		close(fd);
		return vfm_error_set(err, -EIO, "%s: short write", path);
	}
	close(fd);
	return 0;
}

static int write_crt(const char *dir, const char *name, gnutls_x509_crt_t crt,
		     struct vfm_error *err)
{
	gnutls_datum_t d = { 0 };
	int ret;

	if (gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, &d))
		return vfm_error_set(err, -EINVAL, "exporting %s", name);
	ret = write_file(dir, name, d.data, d.size, 0644, err);
	gnutls_free(d.data);
	return ret;
}

static int write_key(const char *dir, const char *name, gnutls_x509_privkey_t key,
		     struct vfm_error *err)
{
	gnutls_datum_t d = { 0 };
	int ret;

	if (gnutls_x509_privkey_export2(key, GNUTLS_X509_FMT_PEM, &d))
		return vfm_error_set(err, -EINVAL, "exporting %s", name);
	ret = write_file(dir, name, d.data, d.size, 0600, err);
	gnutls_free(d.data);
	return ret;
}

/* A certificate for key, signed by ca/ca_key (self-signed when ca is NULL). */
static int make_crt(gnutls_x509_crt_t *out, gnutls_x509_privkey_t key, const char *cn,
		    bool is_ca, bool server, const struct tls_gen_opts *o,
		    gnutls_x509_crt_t ca, gnutls_x509_privkey_t ca_key)
{
	static unsigned serial_ctr;
	unsigned char serial[8];
	time_t now = time(NULL);
	gnutls_x509_crt_t c;
	int r;

	if (gnutls_x509_crt_init(&c))
		return -1;
	serial_ctr++;
	getrandom(serial, sizeof(serial), 0);
	serial[0] = (unsigned char)((serial[0] & 0x7f) | 0x01);
	serial[7] = (unsigned char)serial_ctr;
	r = gnutls_x509_crt_set_version(c, 3);
	r = r ?: gnutls_x509_crt_set_serial(c, serial, sizeof(serial));
	r = r ?: gnutls_x509_crt_set_activation_time(c, is_ca ? now - 7200 :
		now + (server ? o->server_not_before_s : o->client_not_before_s));
	r = r ?: gnutls_x509_crt_set_expiration_time(c, is_ca ? now + 10 * 86400 :
		now + (server ? o->server_not_after_s : o->client_not_after_s));
	r = r ?: gnutls_x509_crt_set_key(c, key);
	r = r ?: gnutls_x509_crt_set_dn_by_oid(c, GNUTLS_OID_X520_ORGANIZATION_NAME, 0,
					       "vfiomig test", 12);
	r = r ?: gnutls_x509_crt_set_dn_by_oid(c, GNUTLS_OID_X520_COMMON_NAME, 0, cn,
					       (unsigned)strlen(cn));
	r = r ?: gnutls_x509_crt_set_basic_constraints(c, is_ca, -1);
	if (!r && is_ca) {
		r = gnutls_x509_crt_set_key_usage(c, GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN);
	} else if (!r) {
		r = gnutls_x509_crt_set_key_usage(c, GNUTLS_KEY_DIGITAL_SIGNATURE);
		r = r ?: gnutls_x509_crt_set_key_purpose_oid(c, server ? GNUTLS_KP_TLS_WWW_SERVER
								    : GNUTLS_KP_TLS_WWW_CLIENT, 0);
	}
	if (!r && server) {
		r = gnutls_x509_crt_set_subject_alt_name(c, GNUTLS_SAN_DNSNAME, o->server_name,
							 (unsigned)strlen(o->server_name),
							 GNUTLS_FSAN_APPEND);
		if (!r && o->server_ip) {
			unsigned char a[16];
			int fam = strchr(o->server_ip, ':') ? AF_INET6 : AF_INET;

			if (inet_pton(fam, o->server_ip, a) != 1)
				r = -1;
			else
				r = gnutls_x509_crt_set_subject_alt_name(
					c, GNUTLS_SAN_IPADDRESS, a, fam == AF_INET6 ? 16 : 4,
					GNUTLS_FSAN_APPEND);
		}
	}
	r = r ?: gnutls_x509_crt_sign2(c, ca ? ca : c, ca ? ca_key : key, GNUTLS_DIG_SHA256, 0);
	if (r) {
		gnutls_x509_crt_deinit(c);
		return -1;
	}
	*out = c;
	return 0;
}

int tls_gen_x509(const char *dir, const struct tls_gen_opts *o, struct vfm_error *err)
{
	gnutls_x509_privkey_t k[3] = { 0 };
	gnutls_x509_crt_t c[3] = { 0 };
	int ret = 0;

	for (int i = 0; i < 3 && !ret; i++)
		if (gnutls_x509_privkey_init(&k[i]) ||
		    gnutls_x509_privkey_generate(k[i], GNUTLS_PK_ECDSA,
						 GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0))
			ret = vfm_error_set(err, -EINVAL, "generating a key");
	unsigned char id[4];
	char ca_cn[64];

	/* CAs made apart must not share a name: a peer would take one for the
	 * other's issuer and fail on the signature instead of "unknown issuer". */
	getrandom(id, sizeof(id), 0);
	snprintf(ca_cn, sizeof(ca_cn), "vfiomig throwaway CA %02x%02x%02x%02x", id[0], id[1],
		 id[2], id[3]);
	if (!ret && (make_crt(&c[0], k[0], ca_cn, true, false, o, NULL, NULL) ||
		     make_crt(&c[1], k[1], o->server_name, false, true, o, c[0], k[0]) ||
		     make_crt(&c[2], k[2], o->client_cn, false, false, o, c[0], k[0])))
		ret = vfm_error_set(err, -EINVAL, "making the certificates");
	if (!ret)
		ret = write_crt(dir, "ca-cert.pem", c[0], err);
	if (!ret)
		ret = write_crt(dir, "server-cert.pem", c[1], err);
	if (!ret)
		ret = write_key(dir, "server-key.pem", k[1], err);
	if (!ret)
		ret = write_crt(dir, "client-cert.pem", c[2], err);
	if (!ret)
		ret = write_key(dir, "client-key.pem", k[2], err);
	for (int i = 0; i < 3; i++) {
		if (c[i])
			gnutls_x509_crt_deinit(c[i]);
		if (k[i])
			gnutls_x509_privkey_deinit(k[i]);
	}
	return ret;
}

int tls_gen_psk(const char *dir, const char *identity, struct vfm_error *err)
{
	unsigned char key[32];
	char line[256];
	int n;

	if (gnutls_rnd(GNUTLS_RND_KEY, key, sizeof(key)))
		return vfm_error_set(err, -EIO, "no random bytes for a key");
	n = snprintf(line, sizeof(line), "%.100s:", identity);
	for (size_t i = 0; i < sizeof(key); i++)
		n += snprintf(line + n, sizeof(line) - (size_t)n, "%02x", key[i]);
	line[n++] = '\n';
	explicit_bzero(key, sizeof(key));
	return write_file(dir, "keys.psk", line, (size_t)n, 0600, err);
}
