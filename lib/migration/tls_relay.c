/*
 * The relay of one TLS connection: a thread between the engine's end of a
 * socketpair (plaintext) and the TCP socket (TLS records), so the stream,
 * the return path, cancel (shutdown) and poll work unchanged over TLS. Each
 * connection has its own thread: with multifd channels the cipher spreads
 * over cores. Kernel TLS would need CONFIG_TLS; where GnuTLS enables it on
 * the socket, the same calls go through the kernel and the log says so.
 */
#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/socket.h>

#include "migration/tls_int.h"
#include "util/logging.h"
#include "util/thread.h"

#define LOG "tls"
/* Plaintext read from the engine per turn, and decrypted bytes buffered for
 * it: 16 TLS records each way. */
#define RELAY_BUF (256u << 10)
#define TLS_RECORD 16384
/* As the channels' AF_UNIX sockets (channel.c): 4 MiB in flight. */
#define LOCAL_SOCK_BUF (4 << 20)
#define STALLED INT32_MIN
#define RELAY_GRACE_MS 2000

struct relay {
	/* Never change after start. */
	struct vfm_tls *t;           /* reference held for the session */
	gnutls_session_t s;
	int net, local;
	int timeout_ms;              /* no progress for this long with work pending: fail */
	char peer[128];
	/* The relay thread only. */
	unsigned char tx[RELAY_BUF]; /* engine -> peer, [tx_off, tx_len) not yet sent */
	size_t tx_off, tx_len;
	unsigned char rx[RELAY_BUF]; /* peer -> engine, [rx_off, rx_len) not yet written */
	size_t rx_off, rx_len;
	bool local_eof;              /* the engine closed or shut down its end */
	bool local_dead;             /* the engine takes no more data (SHUT_RD or closed) */
	bool local_hup, net_hup;     /* poll said so: stop polling that fd */
	bool net_eof, local_wr_shut;
	bool uncork_pending;         /* corked records not all sent yet */
};

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* One turn of moving bytes: 1 progress, 0 nothing to do now, <0 fatal (GnuTLS code). */
static int pump(struct relay *r)
{
	bool progress = false;
	ssize_t n;

	if (!r->local_eof && r->tx_len == 0 && !r->uncork_pending) {
		n = recv(r->local, r->tx, sizeof(r->tx), MSG_DONTWAIT);
		if (n > 0) {
			r->tx_off = 0;
			r->tx_len = (size_t)n;
			progress = true;
		} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
			r->local_eof = true;
			progress = true;
		}
	}
	if (r->uncork_pending) {
		/* The records of the last turn, still partly in GnuTLS's buffer. */
		n = gnutls_record_uncork(r->s, 0);
		if (n < 0 && n != GNUTLS_E_AGAIN && n != GNUTLS_E_INTERRUPTED)
			return (int)n;
		if (n >= 0) {
			r->uncork_pending = false;
			progress = true;
		}
	}
	if (!r->uncork_pending && r->tx_off < r->tx_len) {
		/*
		 * Corked: the turn's records (up to 16) leave in one send instead
		 * of one each. On the shared 2-core test machine the effect was
		 * inside the run-to-run noise (TLS RAM throughput 200-720 MB/s
		 * either way); it is fewer syscalls for certain.
		 */
		gnutls_record_cork(r->s);
		while (r->tx_off < r->tx_len) {
			size_t len = r->tx_len - r->tx_off;

			n = gnutls_record_send(r->s, r->tx + r->tx_off,
					       len < TLS_RECORD ? len : TLS_RECORD);
			if (n < 0)
				return (int)n;
			r->tx_off += (size_t)n;
		}
		r->tx_off = r->tx_len = 0;
		progress = true;
		n = gnutls_record_uncork(r->s, 0);
		if (n < 0 && n != GNUTLS_E_AGAIN && n != GNUTLS_E_INTERRUPTED)
			return (int)n;
		r->uncork_pending = n < 0;
	}
	while (!r->net_eof && r->rx_len < sizeof(r->rx) && !r->rx_off) {
		n = gnutls_record_recv(r->s, r->rx + r->rx_len, sizeof(r->rx) - r->rx_len);
		if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
			break;
		if (n == 0 || n == GNUTLS_E_PREMATURE_TERMINATION) {
			/* A peer that closed without close_notify mid-stream: the engine
			 * sees the end and its reader says the stream was cut. */
			r->net_eof = true;
		} else if (n < 0) {
			return (int)n;
		} else {
			r->rx_len += (size_t)n;
		}
		progress = true;
	}
	if (r->rx_off < r->rx_len && !r->local_dead) {
		n = send(r->local, r->rx + r->rx_off, r->rx_len - r->rx_off,
			 MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n > 0) {
			r->rx_off += (size_t)n;
			progress = true;
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			r->local_dead = true;   /* SHUT_RD or closed: drop what comes */
		}
	}
	if (r->local_dead || r->rx_off == r->rx_len)
		r->rx_off = r->rx_len = 0;
	if (r->net_eof && !r->rx_len && !r->local_wr_shut) {
		shutdown(r->local, SHUT_WR);   /* the engine reads the end of the stream */
		r->local_wr_shut = true;
		progress = true;
	}
	return progress;
}

static void relay_wait(struct relay *r, int timeout)
{
	struct pollfd p[2] = {
		{ .fd = r->local_hup ? -1 : r->local,
		  .events = (short)((!r->local_eof && !r->tx_len && !r->uncork_pending ? POLLIN : 0) |
				    (r->rx_len && !r->local_dead ? POLLOUT : 0)) },
		{ .fd = r->net_hup ? -1 : r->net,
		  .events = (short)((!r->net_eof && !r->rx_len ? POLLIN : 0) |
				    (r->uncork_pending ? POLLOUT : 0)) },
	};

	if (poll(p, 2, timeout) <= 0)
		return;
	/* Hang-ups are reported whether asked or not: note them, or poll spins. */
	if (p[0].revents & (POLLHUP | POLLERR) && !(p[0].events & POLLIN))
		r->local_hup = true;
	if (p[1].revents & (POLLHUP | POLLERR) && !(p[1].events & POLLIN))
		r->net_hup = true;
}

static void *relay_main(void *arg)
{
	struct relay *r = arg;
	uint64_t last = now_ms();
	int ret = 0;

	for (;;) {
		bool pending;

		ret = pump(r);
		if (ret < 0)
			break;
		if (r->local_eof && !r->tx_len && !r->uncork_pending) {
			/* The engine is done: everything it wrote went out. close_notify
			 * is best effort; the peer's reader has its own end checks. */
			gnutls_bye(r->s, GNUTLS_SHUT_WR);
			ret = 0;
			break;
		}
		if (ret > 0) {
			last = now_ms();
			continue;
		}
		pending = r->tx_len || r->uncork_pending || (r->rx_len && !r->local_dead);
		if (pending && now_ms() - last >= (uint64_t)r->timeout_ms) {
			vfm_err(LOG, "TLS relay for %s: no progress in %d ms", r->peer, r->timeout_ms);
			ret = STALLED;
			break;
		}
		relay_wait(r, pending ? r->timeout_ms : -1);
	}
	if (ret < 0 && ret != STALLED)
		vfm_err(LOG, "TLS connection with %s: %s%s%s", r->peer, gnutls_strerror(ret),
			ret == GNUTLS_E_FATAL_ALERT_RECEIVED ? ": " : "",
			ret == GNUTLS_E_FATAL_ALERT_RECEIVED ?
			gnutls_alert_get_name(gnutls_alert_get(r->s)) : "");
	vfm_debug(LOG, "TLS relay for %s ends", r->peer);
	/* The engine sees the end (or its write fails) on its side. */
	close(r->local);
	close(r->net);
	gnutls_deinit(r->s);
	vfm_tls_unref(r->t);
	free(r);
	return NULL;
}

int vfm__tls_relay_start(struct vfm_tls *t, gnutls_session_t s, int net, const char *peer,
			 int timeout_ms, int *out, struct vfm_error *err)
{
	int sv[2], size = LOCAL_SOCK_BUF, ret;
	struct relay *r = calloc(1, sizeof(*r));
	pthread_attr_t attr;
	pthread_t th;

	if (!r) {
		ret = vfm_error_set(err, -ENOMEM, "allocating a TLS relay");
		goto err_session;
	}
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		ret = vfm_error_set(err, -errno, "socketpair: %s", strerror(errno));
		goto err_free;
	}
	for (int i = 0; i < 2; i++) {
		setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
		setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	}
	atomic_fetch_add(&t->refs, 1);
	r->t = t;
	r->s = s;
	r->net = net;
	r->local = sv[1];
	/* Past the engine's own bound on the same wait, so that its message
	 * ("the peer stopped reading") is the one a stall produces. */
	r->timeout_ms = (timeout_ms > 0 ? timeout_ms : 10000) + RELAY_GRACE_MS;
	snprintf(r->peer, sizeof(r->peer), "%s", peer);
	vfm_debug(LOG, "%s: %s, kernel TLS %s", peer,
		  gnutls_cipher_get_name(gnutls_cipher_get(s)),
		  gnutls_transport_is_ktls_enabled(s) ? "on" : "off");
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	ret = vfm_thread_create(&th, &attr, relay_main, r);
	pthread_attr_destroy(&attr);
	if (ret) {
		vfm_tls_unref(t);
		close(sv[0]);
		close(sv[1]);
		ret = vfm_error_set(err, -ret, "starting a TLS relay: %s", strerror(ret));
		goto err_free;
	}
	*out = sv[0];
	return 0;

err_free:
	free(r);
err_session:
	gnutls_deinit(s);
	close(net);
	return ret;
}
