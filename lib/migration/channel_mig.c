/*
 * The migration's channels over those of channel.c: TLS when the migration's
 * parameters name credentials (tls.h), the rule that a plaintext tcp listener
 * binds loopback only unless asked, and the lingering close a relay needs.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migration/channel.h"
#include "migration/tls.h"
#include "vfiomig/migration.h"

bool vfm_uri_is_loopback(const struct vfm_uri *uri)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
	struct addrinfo *res, *ai;
	bool loop = true;

	if (uri->kind != VFM_URI_TCP)
		return uri->kind == VFM_URI_UNIX;
	/* Host names too: "localhost" is loopback when it resolves only there. */
	if (getaddrinfo(uri->host, "0", &hints, &res))
		return false;
	for (ai = res; ai; ai = ai->ai_next) {
		if (ai->ai_family == AF_INET) {
			const struct sockaddr_in *s4 = (const struct sockaddr_in *)ai->ai_addr;

			loop &= (ntohl(s4->sin_addr.s_addr) >> 24) == 127;
		} else if (ai->ai_family == AF_INET6) {
			const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ai->ai_addr;

			loop &= IN6_IS_ADDR_LOOPBACK(&s6->sin6_addr) != 0;
		} else {
			loop = false;
		}
	}
	freeaddrinfo(res);
	return loop;
}

static int tls_uri_ok(const struct vfm_uri *uri, const char *name, struct vfm_error *err)
{
	if (uri->kind == VFM_URI_TCP || uri->kind == VFM_URI_UNIX)
		return 0;
	return vfm_error_set(err, -EINVAL, "%s: TLS needs a connection (tcp: or unix:), not a "
			     "file or fd", name);
}

int vfm_connect_mig(const struct vfm_uri *uri, const struct vfm_migration_params *p,
		    const atomic_bool *cancel, int *fd, struct vfm_error *err)
{
	struct vfm_tls *t;
	char name[400];
	int nfd, ret;

	vfm_uri_str(uri, name, sizeof(name));
	if (!p->tls_creds[0])
		return vfm_connect(uri, (int)p->timeout_ms, fd, err);
	if ((ret = tls_uri_ok(uri, name, err)))
		return ret;
	/* Loaded per connection: a few small files, and rotated ones are picked up. */
	ret = vfm_tls_new(p->tls_creds, VFM_TLS_CLIENT, p->tls_hostname[0] ? p->tls_hostname
				  : uri->kind == VFM_URI_TCP ? uri->host : "localhost",
			  NULL, &t, err);
	if (ret)
		return ret;
	ret = vfm_connect(uri, (int)p->timeout_ms, &nfd, err);
	if (!ret)
		ret = vfm_tls_wrap(t, nfd, name, (int)p->timeout_ms, cancel, fd, err);
	vfm_tls_unref(t);
	return ret;
}

int vfm_listen_mig(struct vfm_uri *uri, const struct vfm_migration_params *p,
		   const atomic_bool *cancel, struct vfm_listener **out, struct vfm_error *err)
{
	struct vfm_tls *t = NULL;
	char name[400];
	int ret;

	vfm_uri_str(uri, name, sizeof(name));
	if (p->tls_creds[0]) {
		if ((ret = tls_uri_ok(uri, name, err)))
			return ret;
		ret = vfm_tls_new(p->tls_creds, VFM_TLS_SERVER, NULL, p->tls_authz, &t, err);
		if (ret)
			return ret;
	} else if (uri->kind == VFM_URI_TCP && !p->insecure && !vfm_uri_is_loopback(uri)) {
		return vfm_error_set(err, -EPERM, "refusing to listen on %s in plaintext: whoever "
				     "reaches it writes the guest's memory and devices. Give "
				     "--tls-creds x509:DIR|psk:DIR, or --insecure on a network you "
				     "trust", name);
	}
	ret = vfm_listen(uri, out, err);
	if (ret) {
		vfm_tls_unref(t);
		return ret;
	}
	if (!t)
		return 0;
	ret = vfm__listener_set_tls(*out, t, (int)p->timeout_ms, cancel, err);
	if (ret) {
		vfm_listener_close(*out);
		*out = NULL;
	}
	return ret;
}

void vfm_channel_close(int fd, const struct vfm_migration_params *p)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	char sink[4096];

	if (fd < 0)
		return;
	if (p->tls_creds[0] && !shutdown(fd, SHUT_WR)) {
		/* Whatever still comes in is dropped: the relay ends with EOF. A
		 * relay sends its last bytes within its stall bound, so each wait
		 * is bounded by the same timeout. */
		while (poll(&pfd, 1, (int)p->timeout_ms) > 0) {
			ssize_t n = recv(fd, sink, sizeof(sink), MSG_DONTWAIT);

			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				break;
		}
	}
	close(fd);
}
