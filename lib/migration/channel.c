/*
 * Migration channels: QEMU-style URIs parsed into a struct, and the sockets,
 * files and fds behind them, created close-on-exec and bounded by timeouts.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>

#include "migration/channel.h"
#include "migration/tls_int.h"
#include "util/logging.h"

#define LOG "channel"

/*
 * Socket buffers. Over AF_UNIX the send buffer caps the bytes in flight
 * (default net.core.wmem_default, 208 KiB); asking for 4 MiB took a raw 1 MiB
 * write/read loop over a socketpair from 2.3 to 6.2 GB/s and the stream from
 * 2.2 to 4.9 GB/s (medians of 9 runs of 1 GiB, 2-vCPU VM). The kernel clamps
 * the request to net.core.{w,r}mem_max (4 MiB there; 208 KiB on a stock
 * kernel, where it is harmless).
 *
 * TCP is left to the kernel: fixing SO_SNDBUF/SO_RCVBUF switches off buffer
 * auto-tuning (up to tcp_wmem/tcp_rmem max, 4/32 MiB by default), which a
 * long fat link needs, and on loopback a fixed 4 MiB measured no better
 * (2.7 vs 2.4 GB/s raw, 2.65 vs 2.6 GB/s stream: within the noise).
 */
#define UNIX_SOCK_BUF (4 << 20)
#define LISTEN_BACKLOG 16
/* A TLS accept checks cancel this often. */
#define ACCEPT_TLS_SLICE_MS 200

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Milliseconds left before deadline (timeout_ms -1: no deadline, -1). */
static int remaining_ms(int timeout_ms, uint64_t deadline)
{
	uint64_t now;

	if (timeout_ms < 0)
		return -1;
	now = now_ms();
	return now >= deadline ? 0 : (int)(deadline - now);
}

/* 0 when fd is ready, -ETIMEDOUT, or a negative errno; EINTR retried. */
static int wait_fd(int fd, short events, int timeout_ms, uint64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int n = poll(&p, 1, remaining_ms(timeout_ms, deadline));

		if (n > 0)
			return 0;
		if (n == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
	}
}

/* ------------------------------------------------------------------------ */
/* URIs                                                                      */

/* Decimal digits only, no sign, no spaces; 0 or VFM_EPARSE. */
static int parse_decimal(const char *s, unsigned long max, unsigned long *out)
{
	unsigned long v = 0;

	if (!*s)
		return VFM_EPARSE;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return VFM_EPARSE;
		v = v * 10 + (unsigned long)(*s - '0');
		if (v > max)
			return VFM_EPARSE;
	}
	*out = v;
	return 0;
}

static bool host_char_ok(char c)
{
	return c > ' ' && c < 0x7f && !strchr("[]/@", c);
}

static int parse_tcp(const char *text, const char *rest, struct vfm_uri *uri,
		     struct vfm_error *err)
{
	const char *host = rest, *host_end, *port;
	unsigned long v;

	if (*rest == '[') {
		host = rest + 1;
		host_end = strchr(host, ']');
		if (!host_end)
			return vfm_error_set(err, VFM_EPARSE, "'%s': missing ']' after the IPv6 "
					     "address", text);
		if (host_end[1] != ':')
			return vfm_error_set(err, VFM_EPARSE, "'%s': expected ':PORT' after ']' "
					     "(tcp:[ADDRESS]:PORT)", text);
		port = host_end + 2;
	} else {
		host_end = strrchr(rest, ':');
		if (!host_end)
			return vfm_error_set(err, VFM_EPARSE, "'%s': no port (tcp:HOST:PORT)", text);
		if (memchr(rest, ':', (size_t)(host_end - rest)))
			return vfm_error_set(err, VFM_EPARSE, "'%s': write an IPv6 address in "
					     "brackets, as in tcp:[::1]:4444", text);
		port = host_end + 1;
	}
	if (host_end == host)
		return vfm_error_set(err, VFM_EPARSE, "'%s': empty host (to listen on every "
				     "address, say tcp:0.0.0.0:PORT or tcp:[::]:PORT)", text);
	if ((size_t)(host_end - host) >= sizeof(uri->host))
		return vfm_error_set(err, VFM_EPARSE, "'%s': host name longer than %zu bytes",
				     text, sizeof(uri->host) - 1);
	for (const char *c = host; c < host_end; c++)
		if (!host_char_ok(*c) || (*c == ':' && *rest != '['))
			return vfm_error_set(err, VFM_EPARSE, "'%s': invalid character in host",
					     text);
	if (!*port)
		return vfm_error_set(err, VFM_EPARSE, "'%s': empty port", text);
	if (parse_decimal(port, 65535, &v))
		return vfm_error_set(err, VFM_EPARSE, "'%s': port '%.20s' is not a number from 0 "
				     "to 65535", text, port);
	uri->kind = VFM_URI_TCP;
	memcpy(uri->host, host, (size_t)(host_end - host));
	uri->host[host_end - host] = '\0';
	uri->port = (unsigned)v;
	return 0;
}

static int parse_path(const char *text, const char *rest, enum vfm_uri_kind kind,
		      struct vfm_uri *uri, struct vfm_error *err)
{
	size_t len = strlen(rest);

	if (!len)
		return vfm_error_set(err, VFM_EPARSE, "'%s': empty path", text);
	/* sizeof(sun_path) == sizeof(uri->path) == 108, NUL included. */
	if (len >= sizeof(uri->path))
		return vfm_error_set(err, VFM_EPARSE, "'%s': path of %zu bytes is too long "
				     "(at most %zu%s)", text, len, sizeof(uri->path) - 1,
				     kind == VFM_URI_UNIX ? ", the limit of a unix socket address" : "");
	uri->kind = kind;
	memcpy(uri->path, rest, len + 1);
	return 0;
}

/* The URI as quoted in messages: long ones clipped so the reason still fits. */
static const char *clip(const char *text, char *buf, size_t len)
{
	if (strlen(text) < len)
		return text;
	snprintf(buf, len, "%.*s...", (int)len - 4, text);
	return buf;
}

int vfm_uri_parse(const char *full, struct vfm_uri *uri, struct vfm_error *err)
{
	char shown[72];
	const char *colon, *text;
	struct vfm_uri u;
	unsigned long v;
	int ret;

	_Static_assert(sizeof(((struct sockaddr_un *)0)->sun_path) == sizeof(u.path),
		       "uri->path holds exactly a sun_path");
	if (!full || !*full)
		return vfm_error_set(err, VFM_EPARSE, "empty migration URI");
	memset(&u, 0, sizeof(u));
	u.fd = -1;
	/* Parsers read the full text after the scheme; messages quote `text`. */
	text = clip(full, shown, sizeof(shown));
	colon = strchr(full, ':');
	if (!colon)
		return vfm_error_set(err, VFM_EPARSE, "'%s': not a migration URI (expected "
				     "tcp:HOST:PORT, unix:PATH, file:PATH or fd:N)", text);
	if (!strncmp(full, "tcp:", 4)) {
		ret = parse_tcp(text, full + 4, &u, err);
	} else if (!strncmp(full, "unix:", 5)) {
		ret = parse_path(text, full + 5, VFM_URI_UNIX, &u, err);
	} else if (!strncmp(full, "file:", 5)) {
		ret = parse_path(text, full + 5, VFM_URI_FILE, &u, err);
	} else if (!strncmp(full, "fd:", 3)) {
		ret = parse_decimal(full + 3, 0x7fffffff, &v);
		if (ret)
			return vfm_error_set(err, VFM_EPARSE, "'%s': expected fd:N with N a file "
					     "descriptor number", text);
		u.kind = VFM_URI_FD;
		u.fd = (int)v;
	} else {
		return vfm_error_set(err, VFM_EPARSE, "'%s': unknown URI scheme '%.*s' (expected "
				     "tcp:, unix:, file: or fd:)", text,
				     (int)(colon - full < 32 ? colon - full : 32), full);
	}
	if (ret)
		return ret;
	*uri = u;
	return 0;
}

const char *vfm_uri_str(const struct vfm_uri *uri, char *buf, size_t len)
{
	switch (uri->kind) {
	case VFM_URI_TCP:
		snprintf(buf, len, strchr(uri->host, ':') ? "tcp:[%s]:%u" : "tcp:%s:%u",
			 uri->host, uri->port);
		break;
	case VFM_URI_UNIX:
		snprintf(buf, len, "unix:%s", uri->path);
		break;
	case VFM_URI_FILE:
		snprintf(buf, len, "file:%s", uri->path);
		break;
	case VFM_URI_FD:
		snprintf(buf, len, "fd:%d", uri->fd);
		break;
	default:
		snprintf(buf, len, "(invalid uri)");
	}
	return buf;
}

bool vfm_uri_has_return_path(const struct vfm_uri *uri)
{
	return uri->kind == VFM_URI_TCP || uri->kind == VFM_URI_UNIX;
}

/* ------------------------------------------------------------------------ */
/* Sockets                                                                   */

static void tune_socket(int fd, int family)
{
	int one = 1, size = UNIX_SOCK_BUF;

	if (family == AF_UNIX) {
		/* Best effort: a smaller buffer is slower, not wrong. */
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	} else {
		/* Records are flushed whole: never hold the tail back for Nagle. */
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	}
}

static int set_blocking(int fd, bool blocking)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		return -errno;
	fl = blocking ? fl & ~O_NONBLOCK : fl | O_NONBLOCK;
	return fcntl(fd, F_SETFL, fl) < 0 ? -errno : 0;
}

static int make_unix_addr(const char *path, struct sockaddr_un *sa)
{
	size_t len = strlen(path);

	if (!len || len >= sizeof(sa->sun_path))
		return -ENAMETOOLONG;
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	memcpy(sa->sun_path, path, len + 1);
	return 0;
}

static int resolve(const struct vfm_uri *uri, bool passive, struct addrinfo **res,
		   struct vfm_error *err)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0),
	};
	char port[8];
	int ret;

	snprintf(port, sizeof(port), "%u", uri->port);
	ret = getaddrinfo(uri->host, port, &hints, res);
	if (ret == EAI_SYSTEM)
		return vfm_error_set(err, -errno, "resolving '%s': %s", uri->host, strerror(errno));
	if (ret)
		return vfm_error_set(err, ret == EAI_MEMORY ? -ENOMEM : -EHOSTUNREACH,
				     "resolving '%s': %s", uri->host, gai_strerror(ret));
	return 0;
}

/*
 * Connects fd (non-blocking) to addr by the deadline: 0 or a negative errno.
 * A unix listener with a full backlog answers EAGAIN and gives nothing to poll
 * for, so that case is retried every few milliseconds.
 */
static int connect_by(int fd, const struct sockaddr *addr, socklen_t alen, int timeout_ms,
		      uint64_t deadline)
{
	int ret, soerr = 0;
	socklen_t sl = sizeof(soerr);

	for (;;) {
		if (!connect(fd, addr, alen))
			return 0;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN && addr->sa_family == AF_UNIX) {
			if (!remaining_ms(timeout_ms, deadline))
				return -ETIMEDOUT;
			nanosleep(&(struct timespec){ 0, 5000000 }, NULL);
			continue;
		}
		if (errno != EINPROGRESS)
			return -errno;
		break;
	}
	ret = wait_fd(fd, POLLOUT, timeout_ms, deadline);
	if (ret)
		return ret;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
		return -errno;
	return -soerr;
}

/* ------------------------------------------------------------------------ */
/* Destination: listen, accept                                               */

struct vfm_listener {
	/* Never change after vfm_listen(). */
	enum vfm_uri_kind kind;
	char name[400];          /* the URI, for messages */
	char path[108];          /* unix: the socket file we created */
	dev_t dev;               /* ... identified so that close removes only it */
	ino_t ino;
	/* The accepting thread only. */
	int fd;                  /* listening socket; file: the open file; fd: -1 */
	int user_fd;             /* fd: the number given */
	bool handed_out;         /* file/fd: accept() returned it already */
	/* TLS (vfm_listen_mig): set before the first accept. */
	struct vfm_tls_acceptor *acc;
	const atomic_bool *cancel;
};

static int listen_tcp(struct vfm_listener *l, struct vfm_uri *uri, struct vfm_error *err)
{
	struct addrinfo *res, *ai;
	int ret, fd = -1, one = 1;

	ret = resolve(uri, true, &res, err);
	if (ret)
		return ret;
	ret = -EADDRNOTAVAIL;
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
			    ai->ai_protocol);
		if (fd < 0) {
			ret = -errno;
			continue;
		}
		/* A restarted destination must not wait out TIME_WAIT of the last run. */
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		tune_socket(fd, ai->ai_family);
		if (!bind(fd, ai->ai_addr, ai->ai_addrlen) && !listen(fd, LISTEN_BACKLOG))
			break;
		ret = -errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		return vfm_error_set(err, ret, "cannot listen on %s: %s", l->name, strerror(-ret));
	if (!uri->port) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);

		if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
			ret = -errno;
			close(fd);
			return vfm_error_set(err, ret, "%s: getsockname: %s", l->name, strerror(-ret));
		}
		uri->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
						    : ((struct sockaddr_in *)&ss)->sin_port);
		vfm_uri_str(uri, l->name, sizeof(l->name));
	}
	l->fd = fd;
	return 0;
}

/*
 * A socket file left by a process that died is replaced; one a live process
 * listens on is not (that would steal its clients), and nothing that is not a
 * socket is ever removed. lstat: a symlink is refused, never followed. The
 * probe is a connect: a live listener sees one connection that closes at once.
 */
static int clear_stale_socket(const char *path, const char *name, struct vfm_error *err)
{
	struct sockaddr_un sa;
	struct stat st;
	int fd, ret;

	if (lstat(path, &st) < 0) {
		if (errno == ENOENT)
			return 0;
		return vfm_error_set(err, -errno, "cannot listen on %s: %s", name, strerror(errno));
	}
	if (!S_ISSOCK(st.st_mode))
		return vfm_error_set(err, -EEXIST, "cannot listen on %s: the path exists and is %s, "
				     "not a socket; refusing to replace it", name,
				     S_ISLNK(st.st_mode) ? "a symbolic link" :
				     S_ISDIR(st.st_mode) ? "a directory" :
				     S_ISREG(st.st_mode) ? "a regular file" : "a special file");
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
	make_unix_addr(path, &sa);
	ret = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) ? -errno : 0;
	close(fd);
	if (ret == 0 || ret == -EAGAIN)
		return vfm_error_set(err, -EADDRINUSE, "cannot listen on %s: another process is "
				     "listening there", name);
	if (ret != -ECONNREFUSED)
		return vfm_error_set(err, ret, "cannot listen on %s: probing the existing socket: "
				     "%s", name, strerror(-ret));
	vfm_debug(LOG, "removing stale socket %s", path);
	if (unlink(path) < 0 && errno != ENOENT)
		return vfm_error_set(err, -errno, "removing stale socket %s: %s", path,
				     strerror(errno));
	return 0;
}

static int listen_unix(struct vfm_listener *l, const struct vfm_uri *uri, struct vfm_error *err)
{
	struct sockaddr_un sa;
	struct stat st;
	int fd, ret;

	if (make_unix_addr(uri->path, &sa))
		return vfm_error_set(err, -ENAMETOOLONG, "%s: bad socket path", l->name);
	ret = clear_stale_socket(uri->path, l->name, err);
	if (ret)
		return ret;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
	tune_socket(fd, AF_UNIX);
	/*
	 * Linux creates the socket file with the socket inode's mode minus the
	 * umask, so fchmod before bind gives 0600 with no window in which the
	 * file is more open, and without touching the process-wide umask (or
	 * a chmod by path, which a swapped-in symlink could redirect).
	 */
	if (fchmod(fd, 0600) < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		ret = -errno;
		goto err_close;
	}
	if (lstat(uri->path, &st) < 0) {
		ret = -errno;
		goto err_unlink;
	}
	l->dev = st.st_dev;
	l->ino = st.st_ino;
	memcpy(l->path, uri->path, sizeof(l->path));
	if (st.st_mode & 077) {
		/* Not Linux's behaviour: better no listener than an open one. */
		ret = -EPERM;
		goto err_unlink;
	}
	if (listen(fd, LISTEN_BACKLOG) < 0) {
		ret = -errno;
		goto err_unlink;
	}
	l->fd = fd;
	return 0;

err_unlink:
	unlink(uri->path);
	l->path[0] = '\0';
err_close:
	close(fd);
	return vfm_error_set(err, ret, "cannot listen on %s: %s", l->name, strerror(-ret));
}

int vfm_listen(struct vfm_uri *uri, struct vfm_listener **out, struct vfm_error *err)
{
	struct vfm_listener *l = calloc(1, sizeof(*l));
	int ret = 0;

	if (!l)
		return vfm_error_set(err, -ENOMEM, "allocating a listener");
	l->kind = uri->kind;
	l->fd = -1;
	l->user_fd = -1;
	vfm_uri_str(uri, l->name, sizeof(l->name));
	switch (uri->kind) {
	case VFM_URI_TCP:
		ret = listen_tcp(l, uri, err);
		break;
	case VFM_URI_UNIX:
		ret = listen_unix(l, uri, err);
		break;
	case VFM_URI_FILE:
		l->fd = open(uri->path, O_RDONLY | O_CLOEXEC);
		if (l->fd < 0)
			ret = vfm_error_set(err, -errno, "cannot open migration file %s: %s",
					    uri->path, strerror(errno));
		break;
	case VFM_URI_FD:
		if (fcntl(uri->fd, F_GETFD) < 0)
			ret = vfm_error_set(err, -EBADF, "%s: %d is not an open file descriptor",
					    l->name, uri->fd);
		l->user_fd = uri->fd;
		break;
	default:
		ret = vfm_error_set(err, -EINVAL, "listen: invalid URI kind %d", (int)uri->kind);
	}
	if (ret) {
		free(l);
		return ret;
	}
	*out = l;
	return 0;
}

int vfm_listener_fd(const struct vfm_listener *l)
{
	return l->kind == VFM_URI_TCP || l->kind == VFM_URI_UNIX ? l->fd : -1;
}

/*
 * file: hands over the file it opened; fd: a duplicate (close-on-exec), so
 * the number given stays with whoever passed it, as on the source side.
 */
static int accept_once(struct vfm_listener *l, int *fd, struct vfm_error *err)
{
	int nfd;

	if (l->handed_out)
		return vfm_error_set(err, -EINVAL, "%s carries one stream, already taken", l->name);
	if (l->kind == VFM_URI_FILE) {
		nfd = l->fd;
		l->fd = -1;
	} else {
		nfd = fcntl(l->user_fd, F_DUPFD_CLOEXEC, 0);
		if (nfd < 0)
			return vfm_error_set(err, -errno, "%s: %s", l->name, strerror(errno));
	}
	l->handed_out = true;
	*fd = nfd;
	return 0;
}

/* "ADDRESS:PORT" of a tcp peer, the listener's name for a unix one. */
static const char *peer_name(int fd, const struct vfm_listener *l, char *buf, size_t len)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char a[INET6_ADDRSTRLEN];

	if (l->kind != VFM_URI_TCP || getpeername(fd, (struct sockaddr *)&ss, &sl) < 0) {
		snprintf(buf, len, "a peer on %.60s", l->name);
	} else if (ss.ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;

		inet_ntop(AF_INET6, &s6->sin6_addr, a, sizeof(a));
		snprintf(buf, len, "[%s]:%u", a, ntohs(s6->sin6_port));
	} else {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)&ss;

		inet_ntop(AF_INET, &s4->sin_addr, a, sizeof(a));
		snprintf(buf, len, "%s:%u", a, ntohs(s4->sin_port));
	}
	return buf;
}

/*
 * TLS: every connection that comes is handed to its own handshake thread
 * (tls_accept.c); the first that passes every check is returned. A peer
 * that stalls or is refused holds back nobody. Waits in slices to see cancel.
 */
static int accept_tls(struct vfm_listener *l, int timeout_ms, uint64_t deadline, int *fd,
		      struct vfm_error *err)
{
	for (;;) {
		struct pollfd p[2] = { { .fd = l->fd, .events = POLLIN },
				       { .fd = vfm__tls_acceptor_fd(l->acc), .events = POLLIN } };
		char peer[80];
		int cfd, wait;

		if (l->cancel && atomic_load(l->cancel)) {
			vfm__tls_acceptor_cancel(l->acc);
			return vfm_error_set(err, VFM_ECANCELED, "incoming migration cancelled");
		}
		if (vfm__tls_acceptor_take(l->acc, fd))
			return 0;
		while ((cfd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC)) >= 0) {
			tune_socket(cfd, l->kind == VFM_URI_TCP ? AF_INET : AF_UNIX);
			vfm__tls_acceptor_add(l->acc, cfd, peer_name(cfd, l, peer, sizeof(peer)));
		}
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
		    errno != ECONNABORTED && errno != EPROTO)
			return vfm_error_set(err, -errno, "accepting on %s: %s", l->name,
					     strerror(errno));
		wait = remaining_ms(timeout_ms, deadline);
		if (!wait)
			return vfm_error_set(err, -ETIMEDOUT, "no accepted migration on %s within "
					     "%d ms", l->name, timeout_ms);
		if (wait < 0 || wait > ACCEPT_TLS_SLICE_MS)
			wait = ACCEPT_TLS_SLICE_MS;
		if (poll(p, 2, wait) < 0 && errno != EINTR)
			return vfm_error_set(err, -errno, "waiting on %s: %s", l->name,
					     strerror(errno));
	}
}

int vfm_accept(struct vfm_listener *l, int timeout_ms, int *fd, struct vfm_error *err)
{
	uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
	int cfd, ret;

	if (l->kind == VFM_URI_FILE || l->kind == VFM_URI_FD)
		return accept_once(l, fd, err);
	if (l->acc)
		return accept_tls(l, timeout_ms, deadline, fd, err);
	for (;;) {
		/* The listener is non-blocking: a client that gave up between poll
		 * and accept costs a loop, not a hang. */
		cfd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
		if (cfd >= 0)
			break;
		if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return vfm_error_set(err, -errno, "accepting on %s: %s", l->name,
					     strerror(errno));
		ret = wait_fd(l->fd, POLLIN, timeout_ms, deadline);
		if (ret == -ETIMEDOUT)
			return vfm_error_set(err, ret, "no incoming migration on %s within %d ms",
					     l->name, timeout_ms);
		if (ret)
			return vfm_error_set(err, ret, "waiting on %s: %s", l->name, strerror(-ret));
	}
	/* Unix sockets do not inherit the listener's buffer sizes: set them again. */
	tune_socket(cfd, l->kind == VFM_URI_TCP ? AF_INET : AF_UNIX);
	*fd = cfd;
	return 0;
}

void vfm_listener_close(struct vfm_listener *l)
{
	struct stat st;

	if (!l)
		return;
	vfm__tls_acceptor_free(l->acc);
	if (l->fd >= 0)
		close(l->fd);
	/* Only the file we made: another listener may have taken the path since. */
	if (l->path[0] && !lstat(l->path, &st) && S_ISSOCK(st.st_mode) &&
	    st.st_dev == l->dev && st.st_ino == l->ino)
		unlink(l->path);
	free(l);
}

/* ------------------------------------------------------------------------ */
/* Source: connect                                                           */

static int connect_tcp(const struct vfm_uri *uri, int timeout_ms, uint64_t deadline,
		       const char *name, int *out, struct vfm_error *err)
{
	struct addrinfo *res, *ai;
	int ret, fd = -1;

	if (!uri->port)
		return vfm_error_set(err, -EINVAL, "cannot connect to %s: port 0 is only for "
				     "listening", name);
	ret = resolve(uri, false, &res, err);
	if (ret)
		return ret;
	ret = -EADDRNOTAVAIL;
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
			    ai->ai_protocol);
		if (fd < 0) {
			ret = -errno;
			continue;
		}
		tune_socket(fd, ai->ai_family);
		ret = connect_by(fd, ai->ai_addr, ai->ai_addrlen, timeout_ms, deadline);
		if (!ret)
			break;
		close(fd);
		fd = -1;
		if (ret == -ETIMEDOUT)
			break;
	}
	freeaddrinfo(res);
	if (fd < 0) {
		if (ret == -ETIMEDOUT)
			return vfm_error_set(err, ret, "cannot connect to %s: no answer within %d ms",
					     name, timeout_ms);
		return vfm_error_set(err, ret, "cannot connect to %s: %s%s", name, strerror(-ret),
				     ret == -ECONNREFUSED ? " (is the destination listening?)" : "");
	}
	*out = fd;
	return 0;
}

static int connect_unix(const struct vfm_uri *uri, int timeout_ms, uint64_t deadline,
			const char *name, int *out, struct vfm_error *err)
{
	struct sockaddr_un sa;
	int fd, ret;

	if (make_unix_addr(uri->path, &sa))
		return vfm_error_set(err, -ENAMETOOLONG, "%s: bad socket path", name);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
	tune_socket(fd, AF_UNIX);
	ret = connect_by(fd, (struct sockaddr *)&sa, sizeof(sa), timeout_ms, deadline);
	if (ret) {
		close(fd);
		if (ret == -ETIMEDOUT)
			return vfm_error_set(err, ret, "cannot connect to %s: the destination did "
					     "not accept within %d ms", name, timeout_ms);
		return vfm_error_set(err, ret, "cannot connect to %s: %s%s", name, strerror(-ret),
				     ret == -ECONNREFUSED || ret == -ENOENT
				     ? " (is the destination listening?)" : "");
	}
	*out = fd;
	return 0;
}

int vfm_connect(const struct vfm_uri *uri, int timeout_ms, int *fd, struct vfm_error *err)
{
	uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
	char name[400];
	int nfd = -1, ret;

	vfm_uri_str(uri, name, sizeof(name));
	switch (uri->kind) {
	case VFM_URI_TCP:
		ret = connect_tcp(uri, timeout_ms, deadline, name, &nfd, err);
		break;
	case VFM_URI_UNIX:
		ret = connect_unix(uri, timeout_ms, deadline, name, &nfd, err);
		break;
	case VFM_URI_FILE:
		nfd = open(uri->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (nfd < 0)
			return vfm_error_set(err, -errno, "cannot create migration file %s: %s",
					     uri->path, strerror(errno));
		*fd = nfd;
		return 0;
	case VFM_URI_FD:
		nfd = fcntl(uri->fd, F_DUPFD_CLOEXEC, 0);
		if (nfd < 0)
			return vfm_error_set(err, -EBADF, "%s: %d is not an open file descriptor",
					     name, uri->fd);
		*fd = nfd;
		return 0;
	default:
		return vfm_error_set(err, -EINVAL, "connect: invalid URI kind %d", (int)uri->kind);
	}
	if (ret)
		return ret;
	/* Blocking again for whoever uses the fd next; the stream needs no flag. */
	ret = set_blocking(nfd, true);
	if (ret) {
		close(nfd);
		return vfm_error_set(err, ret, "%s: fcntl: %s", name, strerror(-ret));
	}
	*fd = nfd;
	return 0;
}

int vfm__listener_set_tls(struct vfm_listener *l, struct vfm_tls *t, int hs_timeout_ms,
			  const atomic_bool *cancel, struct vfm_error *err)
{
	int ret = vfm__tls_acceptor_new(t, hs_timeout_ms, l->name, &l->acc, err);

	if (ret) {
		vfm_tls_unref(t);
		return ret;
	}
	l->cancel = cancel;
	return 0;
}

unsigned vfm_listener_refused(const struct vfm_listener *l)
{
	return l->acc ? vfm__tls_acceptor_refused(l->acc) : 0;
}
