/*
 * The TLS handshake of one migration connection and its checks: TLS 1.3
 * only, x509 (CA, hostname, validity, CRL, client certificates required) or
 * PSK, then tls-authz on the server. Every refusal says why on both sides.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/x509.h>

#include "migration/stream.h"
#include "migration/tls_int.h"
#include "util/logging.h"

#define LOG "tls"
/* Cancel is checked this often while a handshake waits. */
#define HS_SLICE_MS 200
/* After the handshake the server sends one byte once tls-authz passed: in TLS
 * 1.3 a client finishes its handshake before the server has checked the
 * client's certificate, so without it a refused client would only learn so
 * from a failed write much later, with no reason. */
#define AUTHZ_OK 0x01

/*
 * TLS 1.3 only (as QEMU can be configured, and as every peer of ours is).
 * AES-128-GCM first (3.6-4.0 GB/s on one core of the test machine, by
 * `gnutls-cli --benchmark-ciphers`); GnuTLS's default order picks
 * AES-256-GCM, 14 AES rounds per block instead of 10.
 */
#define CIPHERS "-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305"
static const char PRIO_X509[] = "NORMAL:-VERS-ALL:+VERS-TLS1.3:" CIPHERS;
static const char PRIO_PSK[] = "NORMAL:-VERS-ALL:+VERS-TLS1.3:" CIPHERS ":+ECDHE-PSK:+DHE-PSK:+PSK";

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Waits until fd is ready for what GnuTLS wants next (or for `events`),
 * by the deadline, ending early on cancel. */
static int wait_io(int fd, short events, uint64_t deadline, const atomic_bool *cancel)
{
	for (;;) {
		uint64_t now = now_ms();
		struct pollfd p = { .fd = fd, .events = events };
		int n;

		if (cancel && atomic_load(cancel))
			return VFM_ECANCELED;
		if (now >= deadline)
			return -ETIMEDOUT;
		n = poll(&p, 1, deadline - now > HS_SLICE_MS ? HS_SLICE_MS : (int)(deadline - now));
		if (n > 0)
			return 0;
		if (n < 0 && errno != EINTR)
			return -errno;
	}
}

static short gnutls_events(gnutls_session_t s)
{
	return gnutls_record_get_direction(s) ? POLLOUT : POLLIN;
}

/* Why a handshake or record call failed, for a person. */
static void describe(gnutls_session_t s, const struct vfm_tls *t, int r, char *buf, size_t len)
{
	gnutls_datum_t out = { 0 };

	if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR &&
	    !gnutls_certificate_verification_status_print(gnutls_session_get_verify_cert_status(s),
							  GNUTLS_CRT_X509, &out, 0)) {
		snprintf(buf, len, "%s", out.data);
		gnutls_free(out.data);
	} else if (r == GNUTLS_E_FATAL_ALERT_RECEIVED) {
		snprintf(buf, len, "the peer refused: %s",
			 gnutls_alert_get_name(gnutls_alert_get(s)));
	} else {
		snprintf(buf, len, "%s", gnutls_strerror(r));
	}
	/* A plaintext destination answers a ClientHello with a plaintext error
	 * record, or hangs up. */
	if (t->role == VFM_TLS_CLIENT && (r == GNUTLS_E_PREMATURE_TERMINATION ||
					  r == GNUTLS_E_PULL_ERROR ||
					  r == GNUTLS_E_UNEXPECTED_PACKET ||
					  r == GNUTLS_E_UNEXPECTED_PACKET_LENGTH ||
					  r == GNUTLS_E_UNSUPPORTED_VERSION_PACKET))
		snprintf(buf + strlen(buf), len - strlen(buf), " (is the destination listening "
			 "with --tls-creds?)");
	if (t->kind == VFM_TLS_PSK && (r == GNUTLS_E_DECRYPTION_FAILED ||
				       r == GNUTLS_E_FATAL_ALERT_RECEIVED ||
				       r == GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER))
		snprintf(buf + strlen(buf), len - strlen(buf), " (do both sides have the "
			 "same key in keys.psk?)");
}

/* Reads and drops until the peer closes, for at most ms. */
static void drain(int fd, int ms)
{
	uint64_t deadline = now_ms() + (uint64_t)ms;
	char sink[4096];

	while (!wait_io(fd, POLLIN, deadline, NULL) &&
	       recv(fd, sink, sizeof(sink), MSG_DONTWAIT) > 0)
		;
}

/*
 * A plaintext peer on a TLS port: a vfiomig source without --tls-creds
 * starts with the stream magic. It gets a return-path error it will report
 * ("destination failed: ..."), so the refusal is loud on its side too.
 */
static int refuse_plaintext(int fd, const char *peer, int timeout_ms, struct vfm_error *err)
{
	static const char why[] = "this destination accepts TLS only (--tls-creds): give the "
				  "source --tls-creds too";
	unsigned char msg[4 + sizeof(why)];
	struct vfm_stream *s;

	if (!vfm_stream_open(fd, timeout_ms < 1000 ? timeout_ms : 1000, &s, NULL)) {
		vfm_put_le32(msg, (uint32_t)VFM_ETLS);
		memcpy(msg + 4, why, sizeof(why) - 1);
		vfm_stream_put_record(s, VFM_REC_RP_ERROR, 0, 0, msg, 4 + sizeof(why) - 1);
		vfm_stream_flush(s);
		vfm_stream_free(s);
		/* Closing with its stream unread would answer with a reset, which
		 * may overtake the error: let the source hang up first (1 s at most). */
		shutdown(fd, SHUT_WR);
		drain(fd, 1000);
	}
	return vfm_error_set(err, VFM_ETLS, "%s sent a plaintext migration stream to a TLS "
			     "port (its source has no --tls-creds)", peer);
}

/* Server: the peer speaks TLS at all? First byte 0x16 is a handshake record. */
static int check_not_plaintext(int fd, const char *peer, uint64_t deadline, int timeout_ms,
			       const atomic_bool *cancel, struct vfm_error *err)
{
	unsigned char b[8];
	ssize_t n;
	int ret = wait_io(fd, POLLIN, deadline, cancel);

	if (ret == -ETIMEDOUT)
		return vfm_error_set(err, VFM_ETLS, "%s: no TLS handshake within %d ms", peer,
				     timeout_ms);
	if (ret)
		return vfm_error_set(err, ret, "%s: %s", peer, vfm_strerror(ret));
	n = recv(fd, b, sizeof(b), MSG_PEEK | MSG_DONTWAIT);
	if (n <= 0)
		return vfm_error_set(err, VFM_ETLS, "%s closed the connection before any TLS", peer);
	if (b[0] == 0x16)
		return 0;
	if (!memcmp(b, VFM_STREAM_MAGIC, (size_t)n < 8 ? (size_t)n : 8))
		return refuse_plaintext(fd, peer, timeout_ms, err);
	return vfm_error_set(err, VFM_ETLS, "%s does not speak TLS (first byte 0x%02x)", peer, b[0]);
}

static int setup_session(struct vfm_tls *t, int fd, gnutls_session_t *out, struct vfm_error *err)
{
	bool server = t->role == VFM_TLS_SERVER;
	gnutls_session_t s;
	int r;

	/* No session tickets: nothing resumes, and none to read after the handshake. */
	r = gnutls_init(&s, server ? GNUTLS_SERVER | GNUTLS_NO_TICKETS | GNUTLS_NONBLOCK
				   : GNUTLS_CLIENT | GNUTLS_NONBLOCK);
	if (r)
		return vfm_error_set(err, -ENOMEM, "gnutls_init: %s", gnutls_strerror(r));
	gnutls_session_set_ptr(s, t);
	r = gnutls_priority_set_direct(s, t->kind == VFM_TLS_X509 ? PRIO_X509 : PRIO_PSK, NULL);
	if (!r && t->kind == VFM_TLS_X509)
		r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, t->x509);
	else if (!r)
		r = gnutls_credentials_set(s, GNUTLS_CRD_PSK, server ? (void *)t->psk_server
								     : (void *)t->psk_client);
	if (r) {
		gnutls_deinit(s);
		return vfm_error_set(err, -EINVAL, "gnutls: %s", gnutls_strerror(r));
	}
	if (t->kind == VFM_TLS_X509 && server) {
		/* Like QEMU's verify-peer=yes: a client without a certificate of our CA
		 * never gets in. */
		gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
		gnutls_session_set_verify_cert(s, NULL, 0);
	} else if (t->kind == VFM_TLS_X509) {
		/* CA, validity dates, CRL and the hostname (IP addresses against
		 * the certificate's IP SANs), checked inside the handshake. */
		gnutls_session_set_verify_cert(s, t->hostname, 0);
	}
	gnutls_transport_set_int(s, fd);
	*out = s;
	return 0;
}

/* The peer's identity: its certificate's DN (RFC 4514), or its PSK identity. */
static int peer_identity(gnutls_session_t s, const struct vfm_tls *t, char *id, size_t len)
{
	const gnutls_datum_t *certs;
	gnutls_x509_crt_t crt;
	gnutls_datum_t dn = { 0 };
	unsigned n = 0;
	int r;

	if (t->kind == VFM_TLS_PSK) {
		const char *u = gnutls_psk_server_get_username(s);

		snprintf(id, len, "%s", u ? u : "");
		return u ? 0 : -1;
	}
	certs = gnutls_certificate_get_peers(s, &n);
	if (!certs || !n || gnutls_x509_crt_init(&crt))
		return -1;
	r = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER);
	if (!r)
		r = gnutls_x509_crt_get_dn3(crt, &dn, 0);
	gnutls_x509_crt_deinit(crt);
	if (r)
		return -1;
	snprintf(id, len, "%s", dn.data);
	gnutls_free(dn.data);
	return 0;
}

/* One-byte record, server to client: tls-authz passed. */
static int authz_ok_send(gnutls_session_t s, int fd, uint64_t deadline, const atomic_bool *cancel)
{
	unsigned char b = AUTHZ_OK;

	for (;;) {
		ssize_t r = gnutls_record_send(s, &b, 1);
		int ret;

		if (r == 1)
			return 0;
		if (r != GNUTLS_E_AGAIN && r != GNUTLS_E_INTERRUPTED)
			return (int)r;
		if ((ret = wait_io(fd, POLLOUT, deadline, cancel)))
			return ret;
	}
}

static int authz_ok_recv(gnutls_session_t s, int fd, uint64_t deadline, const atomic_bool *cancel)
{
	unsigned char b = 0;

	for (;;) {
		ssize_t r = gnutls_record_recv(s, &b, 1);
		int ret;

		if (r == 1)
			return b == AUTHZ_OK ? 0 : GNUTLS_E_UNEXPECTED_PACKET;
		if (r == 0)
			return GNUTLS_E_PREMATURE_TERMINATION;
		if (r != GNUTLS_E_AGAIN && r != GNUTLS_E_INTERRUPTED)
			return (int)r;
		if ((ret = wait_io(fd, POLLIN, deadline, cancel)))
			return ret;
	}
}

int vfm_tls_wrap(struct vfm_tls *t, int fd, const char *peer, int timeout_ms,
		 const atomic_bool *cancel, int *out, struct vfm_error *err)
{
	uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 10000);
	bool server = t->role == VFM_TLS_SERVER;
	gnutls_session_t s = NULL;
	char why[200], id[512];
	int fl, r, ret;

	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		ret = vfm_error_set(err, -errno, "%s: fcntl: %s", peer, strerror(errno));
		goto err_close;
	}
	if (server && (ret = check_not_plaintext(fd, peer, deadline, timeout_ms, cancel, err)))
		goto err_close;
	if ((ret = setup_session(t, fd, &s, err)))
		goto err_close;
	for (;;) {
		r = gnutls_handshake(s);
		if (!r)
			break;
		if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal(r)) {
			ret = wait_io(fd, gnutls_events(s), deadline, cancel);
			if (ret == -ETIMEDOUT)
				ret = vfm_error_set(err, VFM_ETLS, "TLS handshake with %s: no answer "
						    "within %d ms", peer, timeout_ms);
			else if (ret)
				vfm_error_set(err, ret, "TLS handshake with %s: %s", peer,
					      vfm_strerror(ret));
			if (ret)
				goto err_deinit;
			continue;
		}
		describe(s, t, r, why, sizeof(why));
		ret = vfm_error_set(err, VFM_ETLS, "TLS handshake with %s failed: %s", peer, why);
		/* Tell the peer (bad certificate, unknown CA, ...): its refusal
		 * then says why too. Best effort, the socket is non-blocking. */
		gnutls_alert_send_appropriate(s, r);
		shutdown(fd, SHUT_WR);
		goto err_deinit;
	}
	if (server) {
		if (peer_identity(s, t, id, sizeof(id))) {
			ret = vfm_error_set(err, VFM_ETLS, "%s: no identity in its TLS session", peer);
			goto err_deinit;
		}
		if (!vfm__tls_authz_ok(t, id)) {
			gnutls_alert_send(s, GNUTLS_AL_FATAL, GNUTLS_A_ACCESS_DENIED);
			shutdown(fd, SHUT_WR);
			ret = vfm_error_set(err, VFM_ETLS, "%s: %s '%s' is not in tls-authz", peer,
					    t->kind == VFM_TLS_PSK ? "PSK identity" : "certificate DN",
					    id);
			goto err_deinit;
		}
		r = authz_ok_send(s, fd, deadline, cancel);
		vfm_info(LOG, "TLS session from %s (%s)", peer, id);
	} else {
		r = authz_ok_recv(s, fd, deadline, cancel);
	}
	if (r) {
		if (r == -ETIMEDOUT || r == VFM_ECANCELED)
			snprintf(why, sizeof(why), "%s", vfm_strerror(r));
		else
			describe(s, t, r, why, sizeof(why));
		ret = vfm_error_set(err, r == VFM_ECANCELED ? r : VFM_ETLS,
				    "TLS with %s: %s%s", peer,
				    r == GNUTLS_E_FATAL_ALERT_RECEIVED ? "" : "after the handshake: ",
				    why);
		goto err_deinit;
	}
	return vfm__tls_relay_start(t, s, fd, peer, timeout_ms, out, err);

err_deinit:
	gnutls_deinit(s);
err_close:
	close(fd);
	return ret;
}
