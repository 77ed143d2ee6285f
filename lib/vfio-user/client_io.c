/*
 * The vfio-user client's side of the socket: one request at a time, server
 * commands served whenever they arrive (also while we wait for a reply or are
 * still sending), a timeout on every wait, and a connection that, once
 * broken, stays down so that every later call fails at once. A request
 * whose reply does not start within the timeout fails alone: the stream is
 * still in step, and its reply is dropped when it comes.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "util/logging.h"
#include "vfio-user/client.h"

/* Header + at most this many payload pieces per message. */
#define CLI_MAX_IOV 4
/* vfm_vfio_user_poll() serves at most this many messages per call. */
#define CLI_POLL_BUDGET 64

union cli_fd_ctl {
	char buf[CMSG_SPACE(sizeof(int) * VFU_MAX_FDS)];
	struct cmsghdr align;
};

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int vfu_cli_lock(struct vfu_client *c, struct vfm_error *err)
{
	pthread_mutex_lock(&c->lock);
	if (!c->dead)
		return 0;
	pthread_mutex_unlock(&c->lock);
	return vfm_error_set(err, -ENOTCONN, "%s: vfio-user server at %s: connection is down (%s)",
			     c->id, c->name, c->dead_msg);
}

void vfu_cli_unlock(struct vfu_client *c)
{
	pthread_mutex_unlock(&c->lock);
}

int vfu_cli_fail(struct vfu_client *c, int code, struct vfm_error *err, const char *fmt, ...)
{
	char msg[VFM_ERROR_MSG_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (!c->dead) {
		c->dead = code;
		snprintf(c->dead_msg, sizeof(c->dead_msg), "%s", msg);
		/* Nothing more goes either way; the fd stays valid for pollers. */
		shutdown(c->fd, SHUT_RDWR);
		vfm_err(c->id, "%s", msg);
	}
	return vfm_error_set(err, code, "%s: %s", c->id, msg);
}

/* A failed vfu_recv(): every case leaves the stream out of step. */
static int recv_failed(struct vfu_client *c, int r, const char *waiting_for,
		       const struct vfm_error *e, struct vfm_error *err)
{
	switch (r) {
	case -ECONNRESET:
		return vfu_cli_fail(c, -ECONNRESET, err,
				    "vfio-user server at %s closed the connection (%s)",
				    c->name, waiting_for);
	case -ETIMEDOUT:
		return vfu_cli_fail(c, -ETIMEDOUT, err,
				    "vfio-user server at %s sent nothing for %d ms (%s)",
				    c->name, c->timeout_ms, waiting_for);
	case -EMSGSIZE:
	case VFM_EPROTOCOL:
		return vfu_cli_fail(c, VFM_EPROTOCOL, err,
				    "vfio-user server at %s violated the protocol: %s",
				    c->name, e->msg);
	default:
		return vfu_cli_fail(c, r, err, "vfio-user server at %s: receiving: %s",
				    c->name, e->msg[0] ? e->msg : vfm_strerror(r));
	}
}

/* Whether id is a timed-out request's (and forgets it: its reply is here). */
static bool take_abandoned(struct vfu_client *c, uint16_t id)
{
	for (unsigned i = 0; i < c->n_abandoned; i++) {
		if (c->abandoned[i] == id) {
			c->abandoned[i] = c->abandoned[--c->n_abandoned];
			return true;
		}
	}
	return false;
}

/* recv_one(): no byte came in time, the stream is intact (not an errno). */
#define TIMED_OUT_IN_STEP 1

/* Receives one whole message and checks its framing: 0, TIMED_OUT_IN_STEP,
 * or a negative error with the connection down. */
static int recv_one(struct vfu_client *c, struct vfu_msg *m, int timeout_ms,
		    const char *waiting_for, struct vfm_error *err)
{
	struct vfm_error e = { 0 };
	int r = vfu_recv(c->fd, m, c->max_msg_size, timeout_ms, &e);

	if (r == -ETIMEDOUT && c->n_abandoned < CLI_ABANDONED_MAX)
		return TIMED_OUT_IN_STEP;   /* nothing consumed: the caller decides */
	if (r)
		return recv_failed(c, r, waiting_for, &e, err);
	r = vfu_check_hdr(&m->hdr, &e);
	if (r) {
		vfu_msg_release(m);
		return vfu_cli_fail(c, VFM_EPROTOCOL, err,
				    "vfio-user server at %s violated the protocol: %s", c->name, e.msg);
	}
	return 0;
}

static void queue_push(struct vfu_client *c, struct vfu_msg *m)
{
	c->queue[(c->q_head + c->q_len) % CLI_QUEUE_MAX] = *m;
	c->q_len++;
	*m = (struct vfu_msg)VFU_MSG_INIT;
}

static void queue_pop(struct vfu_client *c, struct vfu_msg *m)
{
	*m = c->queue[c->q_head];
	c->queue[c->q_head] = (struct vfu_msg)VFU_MSG_INIT;
	c->q_head = (c->q_head + 1) % CLI_QUEUE_MAX;
	c->q_len--;
}

void vfu_cli_io_cleanup(struct vfu_client *c)
{
	struct vfu_msg m;

	while (c->q_len) {
		queue_pop(c, &m);
		vfu_msg_release(&m);
	}
}

/*
 * The socket is full while we send. Wait for room, and read what the server
 * sends meanwhile: a server blocked sending us a large DMA_WRITE reads
 * nothing until we take it, and would otherwise deadlock with us.
 */
static int wait_writable(struct vfu_client *c, int64_t deadline, const char *what,
			 struct vfm_error *err)
{
	for (;;) {
		bool can_queue = c->q_len < CLI_QUEUE_MAX;
		struct pollfd p = { .fd = c->fd, .events = POLLOUT | (can_queue ? POLLIN : 0) };
		int64_t left = deadline - now_ms();
		struct vfu_msg m = VFU_MSG_INIT;
		int n, r;

		if (left <= 0)
			return vfu_cli_fail(c, -ETIMEDOUT, err,
					    "vfio-user server at %s took nothing of %s for %d ms",
					    c->name, what, c->timeout_ms);
		n = poll(&p, 1, (int)(left > 60000 ? 60000 : left));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return vfu_cli_fail(c, -errno, err, "vfio-user server at %s: poll: %s",
					    c->name, strerror(errno));
		if (n == 0)
			continue;
		if (p.revents & (POLLOUT | POLLERR | POLLHUP | POLLNVAL))
			return 0;  /* room, or sendmsg() will say what went wrong */
		if (!(p.revents & POLLIN))
			continue;
		r = recv_one(c, &m, c->timeout_ms, "while sending", err);
		if (r == TIMED_OUT_IN_STEP)   /* half a request is out: no way back in step */
			return vfu_cli_fail(c, -ETIMEDOUT, err, "vfio-user server at %s sent nothing "
					    "for %d ms (while sending)", c->name, c->timeout_ms);
		if (r)
			return r;
		queue_push(c, &m);
	}
}

/* Drops the first k bytes of v[*first..n). */
static void iov_advance(struct iovec *v, int n, int *first, size_t k)
{
	while (k && *first < n) {
		struct iovec *cur = &v[*first];

		if (k >= cur->iov_len) {
			k -= cur->iov_len;
			(*first)++;
			continue;
		}
		cur->iov_base = (char *)cur->iov_base + k;
		cur->iov_len -= k;
		k = 0;
	}
	while (*first < n && v[*first].iov_len == 0)
		(*first)++;
}

int vfu_cli_send(struct vfu_client *c, const struct vfu_hdr *hdr, const struct iovec *iov,
		 int iovcnt, const int *fds, size_t nfds, struct vfm_error *err)
{
	const char *what = vfu_cmd_name(hdr->cmd);
	struct iovec v[CLI_MAX_IOV + 1];
	struct vfu_hdr h = *hdr;
	size_t total = sizeof(h), sent = 0;
	int64_t deadline;
	int n = 1, first = 0;

	if (c->dead)
		return vfm_error_set(err, -ENOTCONN, "%s: vfio-user server at %s: connection is down (%s)",
				     c->id, c->name, c->dead_msg);
	if (iovcnt > CLI_MAX_IOV || nfds > VFU_MAX_FDS)
		return vfm_error_set(err, -EINVAL, "%s: %s: too many pieces or fds", c->id, what);
	v[0] = (struct iovec){ &h, sizeof(h) };
	for (int i = 0; i < iovcnt; i++) {
		if (!iov[i].iov_len)
			continue;
		v[n++] = iov[i];
		total += iov[i].iov_len;
	}
	if (total > VFU_MAX_MSG_SIZE)
		return vfm_error_set(err, -EMSGSIZE, "%s: %s of %zu bytes is too large", c->id,
				     what, total);
	h.msg_size = (uint32_t)total;
	deadline = now_ms() + c->timeout_ms;

	while (first < n) {
		struct msghdr mh = { .msg_iov = &v[first], .msg_iovlen = (size_t)(n - first) };
		union cli_fd_ctl ctl;
		ssize_t k;

		/* The fds ride on the first byte, as the codec sends them. */
		if (sent == 0 && nfds) {
			struct cmsghdr *cm;

			memset(&ctl, 0, sizeof(ctl));
			mh.msg_control = ctl.buf;
			mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
			cm = CMSG_FIRSTHDR(&mh);
			cm->cmsg_level = SOL_SOCKET;
			cm->cmsg_type = SCM_RIGHTS;
			cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
			memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
		}
		k = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (k > 0) {
			sent += (size_t)k;
			iov_advance(v, n, &first, (size_t)k);
			deadline = now_ms() + c->timeout_ms;  /* progress */
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			int r = wait_writable(c, deadline, what, err);

			if (r)
				return r;
			continue;
		}
		if (k < 0 && (errno == EPIPE || errno == ECONNRESET))
			return vfu_cli_fail(c, -errno, err,
					    "vfio-user server at %s closed the connection (sending %s)",
					    c->name, what);
		/* Nothing sent yet and our arguments at fault (a bad fd): the stream is fine. */
		if (k < 0 && sent == 0 && (errno == EBADF || errno == EINVAL))
			return vfm_error_set(err, -errno, "%s: sending %s: %s", c->id, what,
					     strerror(errno));
		return vfu_cli_fail(c, k < 0 ? -errno : -EIO, err,
				    "vfio-user server at %s: sending %s: %s", c->name, what,
				    k < 0 ? strerror(errno) : "sendmsg wrote nothing");
	}
	vfm_trace(c->id, "sent %s id %u flags %#x size %zu fds %zu", what,
		  (unsigned)h.msg_id, (unsigned)h.flags, total, nfds);
	return 0;
}

/* Serves one server command; fatal only if the connection broke. */
static int serve_one(struct vfu_client *c, struct vfu_msg *m, struct vfm_error *err)
{
	int r = vfu_cli_serve(c, m, err);

	vfu_msg_release(m);
	return r;
}

int vfu_cli_request(struct vfu_client *c, uint16_t cmd, const struct iovec *iov, int iovcnt,
		    const int *fds, size_t nfds, struct vfu_msg *reply, struct vfm_error *err)
{
	const char *name = vfu_cmd_name(cmd);
	char waiting[64];
	struct vfu_hdr req;
	int r;

	*reply = (struct vfu_msg)VFU_MSG_INIT;
	vfu_hdr_command(&req, c->next_id++, cmd, 0);
	r = vfu_cli_send(c, &req, iov, iovcnt, fds, nfds, err);
	if (r)
		return r;
	snprintf(waiting, sizeof(waiting), "waiting for the reply to %s", name);

	for (;;) {
		struct vfu_msg m = VFU_MSG_INIT;
		struct vfm_error e = { 0 };

		if (c->q_len) {
			queue_pop(c, &m);
		} else {
			/* The clock restarts with each server message: a server
			 * doing DMA for our request is alive and working on it. */
			r = recv_one(c, &m, c->timeout_ms, waiting, err);
			if (r == TIMED_OUT_IN_STEP) {
				/* A slow server (firmware) is not a dead one: keep the
				 * connection, drop this reply when it comes late. */
				c->abandoned[c->n_abandoned++] = req.msg_id;
				vfm_warn(c->id, "vfio-user server at %s sent nothing for %d ms (%s): "
					 "giving up on it", c->name, c->timeout_ms, waiting);
				return vfm_error_set(err, -ETIMEDOUT, "%s: vfio-user server at %s sent "
						     "nothing for %d ms (%s)", c->id, c->name,
						     c->timeout_ms, waiting);
			}
			if (r)
				return r;
		}
		if (vfu_hdr_is_reply(&m.hdr) && m.hdr.msg_id != req.msg_id &&
		    take_abandoned(c, m.hdr.msg_id)) {
			vfm_debug(c->id, "dropping the late reply %u (%s)", (unsigned)m.hdr.msg_id,
				  vfu_cmd_name(m.hdr.cmd));
			vfu_msg_release(&m);
			continue;
		}
		if (!vfu_hdr_is_reply(&m.hdr)) {
			r = serve_one(c, &m, err);
			if (r)
				return r;
			continue;
		}
		r = vfu_reply_status(&req, &m, &e);
		if (r == VFM_EPROTOCOL) {
			vfu_msg_release(&m);
			return vfu_cli_fail(c, VFM_EPROTOCOL, err,
					    "vfio-user server at %s violated the protocol: %s",
					    c->name, e.msg);
		}
		if (r) {
			vfu_msg_release(&m);
			return vfm_error_set(err, r, "%s", e.msg);
		}
		*reply = m;
		return 0;
	}
}

int vfu_cli_simple(struct vfu_client *c, uint16_t cmd, const void *payload, size_t len,
		   struct vfu_msg *reply, struct vfm_error *err)
{
	struct iovec v = { (void *)payload, len };

	return vfu_cli_request(c, cmd, &v, len ? 1 : 0, NULL, 0, reply, err);
}

int vfu_cli_poll_locked(struct vfu_client *c, struct vfm_error *err)
{
	int served = 0, r;

	while (served < CLI_POLL_BUDGET) {
		struct vfu_msg m = VFU_MSG_INIT;

		if (c->dead)
			return vfm_error_set(err, -ENOTCONN, "%s: vfio-user server at %s: connection is down (%s)",
					     c->id, c->name, c->dead_msg);
		if (c->q_len) {
			queue_pop(c, &m);
		} else {
			struct pollfd p = { .fd = c->fd, .events = POLLIN };
			int n = poll(&p, 1, 0);

			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			/* Something arrived (or the peer hung up): take the
			 * whole message, however it is split, within the timeout. */
			r = recv_one(c, &m, c->timeout_ms, "idle", err);
			if (r == TIMED_OUT_IN_STEP)
				break;   /* readable but nothing came: a hang-up race */
			if (r)
				return r;
		}
		if (vfu_hdr_is_reply(&m.hdr) && take_abandoned(c, m.hdr.msg_id)) {
			vfm_debug(c->id, "dropping the late reply %u (%s)", (unsigned)m.hdr.msg_id,
				  vfu_cmd_name(m.hdr.cmd));
			vfu_msg_release(&m);
			continue;
		}
		if (vfu_hdr_is_reply(&m.hdr)) {
			uint16_t id = m.hdr.msg_id, cmd = m.hdr.cmd;

			vfu_msg_release(&m);
			return vfu_cli_fail(c, VFM_EPROTOCOL, err,
					    "vfio-user server at %s violated the protocol: reply %u (%s) with no request in flight",
					    c->name, (unsigned)id, vfu_cmd_name(cmd));
		}
		r = serve_one(c, &m, err);
		if (r)
			return r;
		served++;
	}
	return served;
}

int vfm_vfio_user_poll(struct vfm_device *dev, struct vfm_error *err)
{
	struct vfu_client *c;
	int r;

	if (!vfm_device_is_vfio_user(dev))
		return vfm_error_set(err, -EINVAL, "not a vfio-user device");
	c = cli_of(dev);
	/* A request in flight serves server messages itself: never wait for it. */
	if (pthread_mutex_trylock(&c->lock))
		return 0;
	if (c->dead)
		r = vfm_error_set(err, -ENOTCONN, "%s: vfio-user server at %s: connection is down (%s)",
				  c->id, c->name, c->dead_msg);
	else
		r = vfu_cli_poll_locked(c, err);
	pthread_mutex_unlock(&c->lock);
	return r;
}

int vfm_vfio_user_poll_fd(struct vfm_device *dev)
{
	if (!vfm_device_is_vfio_user(dev))
		return -EINVAL;
	return cli_of(dev)->fd;
}
