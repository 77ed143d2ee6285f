/*
 * The vfio-user codec: framed messages over an AF_UNIX stream socket (with
 * SCM_RIGHTS fds), reply and error headers, the payload checks both sides
 * run, and the VERSION capabilities JSON with its negotiation rules.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <json.h>

#include "util/logging.h"
#include "vfio-user/proto.h"

#define LOG_PREFIX "vfio-user"
#define PEER_CLOSED "vfio-user peer closed the connection"

/* Control buffer for VFU_MAX_FDS descriptors, aligned for struct cmsghdr. */
union fd_ctl {
	char buf[CMSG_SPACE(sizeof(int) * VFU_MAX_FDS)];
	struct cmsghdr align;
};

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Waits until fd is ready for events or the deadline (-1: none) passes.
 * 0 when ready (or hung up / in error: the next call says which), -ETIMEDOUT.
 */
static int wait_fd(int fd, short events, int64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int wait = -1, n;

		if (deadline >= 0) {
			int64_t left = deadline - now_ms();

			if (left <= 0)
				return -ETIMEDOUT;
			wait = left > 60000 ? 60000 : (int)left;
		}
		n = poll(&p, 1, wait);
		if (n > 0)
			return 0;
		if (n < 0 && errno != EINTR)
			return -errno;
	}
}

/* ------------------------------------------------------------------------ */
/* Sending                                                                   */

int vfu_send_timeout(int fd, const struct vfu_hdr *hdr, const void *payload, size_t len,
		     const int *fds, size_t nfds, int timeout_ms, struct vfm_error *err)
{
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	const char *name;
	union fd_ctl ctl;
	struct vfu_hdr h;
	size_t total, sent = 0;

	if (!hdr || (len && !payload) || (nfds && !fds))
		return vfm_error_set(err, -EINVAL, "vfu_send: missing header, payload or fds");
	name = vfu_cmd_name(hdr->cmd);
	if (nfds > VFU_MAX_FDS)
		return vfm_error_set(err, -EINVAL, "%s: %zu fds, at most %u per message",
				     name, nfds, VFU_MAX_FDS);
	if (len > VFU_MAX_MSG_SIZE - sizeof(h))
		return vfm_error_set(err, -EMSGSIZE, "%s: payload of %zu bytes exceeds the %zu-byte message limit",
				     name, len, (size_t)VFU_MAX_MSG_SIZE);
	total = sizeof(h) + len;
	h = *hdr;
	if (h.msg_size && h.msg_size != total)
		return vfm_error_set(err, -EINVAL, "%s: msg_size %" PRIu32 " but %zu bytes to send",
				     name, h.msg_size, total);
	h.msg_size = (uint32_t)total;

	while (sent < total) {
		struct iovec iov[2];
		struct msghdr mh = { .msg_iov = iov };
		ssize_t n;

		if (sent < sizeof(h)) {
			iov[0] = (struct iovec){ (char *)&h + sent, sizeof(h) - sent };
			iov[1] = (struct iovec){ (void *)payload, len };
			mh.msg_iovlen = len ? 2 : 1;
		} else {
			iov[0] = (struct iovec){ (char *)payload + (sent - sizeof(h)),
						 total - sent };
			mh.msg_iovlen = 1;
		}
		/* The fds ride on the first byte; a partial write has sent them. */
		if (sent == 0 && nfds) {
			struct cmsghdr *c;

			memset(&ctl, 0, sizeof(ctl));
			mh.msg_control = ctl.buf;
			mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
			c = CMSG_FIRSTHDR(&mh);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
			memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
		}
		n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n > 0) {
			sent += (size_t)n;
			continue;
		}
		if (n == 0)
			return vfm_error_set(err, -EIO, "%s: sendmsg wrote nothing", name);
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			int r = wait_fd(fd, POLLOUT, deadline);

			if (r == -ETIMEDOUT)
				return vfm_error_set(err, r, "%s: timed out after sending %zu of %zu bytes%s",
						     name, sent, total,
						     sent ? " (stream broken)" : "");
			if (r)
				return vfm_error_set(err, r, "%s: poll: %s", name, strerror(-r));
			continue;
		}
		if (errno == EPIPE || errno == ECONNRESET)
			return vfm_error_set(err, -errno, PEER_CLOSED " (sending %s)", name);
		return vfm_error_set(err, -errno, "%s: sendmsg: %s", name, strerror(errno));
	}
	vfm_trace(LOG_PREFIX, "sent %s id %u flags %#x size %zu fds %zu", name,
		  (unsigned)h.msg_id, (unsigned)h.flags, total, nfds);
	return 0;
}

int vfu_send(int fd, const struct vfu_hdr *hdr, const void *payload, size_t len,
	     const int *fds, size_t nfds, struct vfm_error *err)
{
	return vfu_send_timeout(fd, hdr, payload, len, fds, nfds, -1, err);
}

/* ------------------------------------------------------------------------ */
/* Receiving                                                                 */

void vfu_msg_release(struct vfu_msg *m)
{
	if (!m)
		return;
	for (size_t i = 0; i < m->nfds && i < VFU_MAX_FDS; i++)
		if (m->fds[i] >= 0)
			close(m->fds[i]);
	free(m->payload);
	m->payload = NULL;
	m->len = 0;
	m->nfds = 0;
}

int vfu_msg_take_fd(struct vfu_msg *m, size_t i)
{
	int fd;

	if (!m || i >= m->nfds)
		return -1;
	fd = m->fds[i];
	m->fds[i] = -1;
	return fd;
}

/* One receive in progress: the deadline covers all of it. */
struct rx {
	int fd;
	struct vfu_msg *m;
	int timeout_ms;
	int64_t deadline;    /* -1: none */
	size_t consumed;     /* bytes of this message read so far */
	size_t expect;       /* 16 until the header is in, then msg_size */
};

static int rx_closed(const struct rx *rx, struct vfm_error *err)
{
	if (!rx->consumed)
		return vfm_error_set(err, -ECONNRESET, PEER_CLOSED);
	return vfm_error_set(err, -ECONNRESET, PEER_CLOSED " in the middle of a message (%zu of %zu bytes)",
			     rx->consumed, rx->expect);
}

/* Nothing more is ready: wait within the deadline or say why not. */
static int rx_wait(const struct rx *rx, struct vfm_error *err)
{
	int r = rx->timeout_ms == 0 ? -ETIMEDOUT : wait_fd(rx->fd, POLLIN, rx->deadline);

	if (r == 0)
		return 0;
	if (r != -ETIMEDOUT)
		return vfm_error_set(err, r, "poll: %s", strerror(-r));
	if (rx->consumed)
		return vfm_error_set(err, VFM_EPROTOCOL,
				     "incomplete vfio-user message: %zu of %zu bytes after %d ms",
				     rx->consumed, rx->expect, rx->timeout_ms);
	if (rx->timeout_ms == 0)
		return vfm_error_set(err, -EAGAIN, "no vfio-user message ready");
	return vfm_error_set(err, -ETIMEDOUT, "no vfio-user message within %d ms",
			     rx->timeout_ms);
}

/* Moves SCM_RIGHTS fds into the message; too many closes them all (by release). */
static int rx_take_fds(struct rx *rx, struct msghdr *mh, struct vfm_error *err)
{
	struct vfu_msg *m = rx->m;
	bool overflow = (mh->msg_flags & MSG_CTRUNC) != 0;

	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		size_t n;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < n; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(fd));
			if (m->nfds < VFU_MAX_FDS) {
				m->fds[m->nfds++] = fd;
			} else {
				close(fd);
				overflow = true;
			}
		}
	}
	if (overflow)
		return vfm_error_set(err, VFM_EPROTOCOL,
				     "vfio-user peer sent more than %u fds with one message",
				     VFU_MAX_FDS);
	return 0;
}

static int rx_read(struct rx *rx, void *buf, size_t want, struct vfm_error *err)
{
	size_t done = 0;

	while (done < want) {
		union fd_ctl ctl;
		struct iovec iov = { (char *)buf + done, want - done };
		struct msghdr mh = {
			.msg_iov = &iov, .msg_iovlen = 1,
			.msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf),
		};
		ssize_t n = recvmsg(rx->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
		int r;

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				r = rx_wait(rx, err);
				if (r)
					return r;
				continue;
			}
			if (errno == ECONNRESET)
				return rx_closed(rx, err);
			return vfm_error_set(err, -errno, "recvmsg: %s", strerror(errno));
		}
		r = rx_take_fds(rx, &mh, err);
		if (r)
			return r;
		if (n == 0)
			return rx_closed(rx, err);
		done += (size_t)n;
		rx->consumed += (size_t)n;
	}
	return 0;
}

int vfu_recv(int fd, struct vfu_msg *m, size_t max_size, int timeout_ms,
	     struct vfm_error *err)
{
	size_t limit = max_size < VFU_MAX_MSG_SIZE ? max_size : VFU_MAX_MSG_SIZE;
	struct rx rx = {
		.fd = fd, .m = m, .timeout_ms = timeout_ms,
		.deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms,
		.expect = sizeof(struct vfu_hdr),
	};
	uint32_t size;
	int r;

	if (!m)
		return vfm_error_set(err, -EINVAL, "vfu_recv: no message");
	memset(&m->hdr, 0, sizeof(m->hdr));
	m->payload = NULL;
	m->len = 0;
	m->nfds = 0;

	r = rx_read(&rx, &m->hdr, sizeof(m->hdr), err);
	if (r)
		goto fail;
	size = m->hdr.msg_size;
	if (size < sizeof(struct vfu_hdr)) {
		r = vfm_error_set(err, VFM_EPROTOCOL, "vfio-user message %u (%s) has msg_size %" PRIu32
				  ", less than its header", (unsigned)m->hdr.msg_id,
				  vfu_cmd_name(m->hdr.cmd), size);
		goto fail;
	}
	/* Checked before anything is allocated: the peer chooses size. */
	if (size > limit) {
		r = vfm_error_set(err, -EMSGSIZE, "vfio-user message %u (%s) of %" PRIu32
				  " bytes exceeds the %zu-byte limit", (unsigned)m->hdr.msg_id,
				  vfu_cmd_name(m->hdr.cmd), size, limit);
		goto fail;
	}
	rx.expect = size;
	m->len = size - sizeof(struct vfu_hdr);
	if (m->len) {
		m->payload = malloc(m->len);
		if (!m->payload) {
			r = vfm_error_set(err, -ENOMEM, "no memory for a %zu-byte message", m->len);
			goto fail;
		}
		r = rx_read(&rx, m->payload, m->len, err);
		if (r)
			goto fail;
	}
	vfm_trace(LOG_PREFIX, "received %s id %u flags %#x size %" PRIu32 " fds %zu",
		  vfu_cmd_name(m->hdr.cmd), (unsigned)m->hdr.msg_id,
		  (unsigned)m->hdr.flags, size, m->nfds);
	return 0;

fail:
	vfu_msg_release(m);
	return r;
}

/* ------------------------------------------------------------------------ */
/* Headers, replies, errors                                                  */

void vfu_hdr_command(struct vfu_hdr *out, uint16_t msg_id, uint16_t cmd, uint32_t flags)
{
	*out = (struct vfu_hdr){
		.msg_id = msg_id, .cmd = cmd,
		.flags = (flags & VFU_F_NO_REPLY) | VFU_F_TYPE_COMMAND,
	};
}

void vfu_hdr_reply(struct vfu_hdr *out, const struct vfu_hdr *req)
{
	*out = (struct vfu_hdr){ .msg_id = req->msg_id, .cmd = req->cmd,
				 .flags = VFU_F_TYPE_REPLY };
}

uint32_t vfu_wire_errno(int errnum)
{
	if (errnum == VFM_ENOMIGRATION)
		return ENOTTY;
	if (errnum < 0)
		errnum = -errnum;
	if (errnum == 0 || errnum >= 4096)
		return EINVAL;
	return (uint32_t)errnum;
}

void vfu_hdr_error(struct vfu_hdr *out, const struct vfu_hdr *req, int errnum)
{
	vfu_hdr_reply(out, req);
	out->flags |= VFU_F_ERROR;
	out->error = vfu_wire_errno(errnum);
}

int vfu_send_reply(int fd, const struct vfu_hdr *req, const void *payload, size_t len,
		   const int *fds, size_t nfds, struct vfm_error *err)
{
	struct vfu_hdr h;

	vfu_hdr_reply(&h, req);
	return vfu_send(fd, &h, payload, len, fds, nfds, err);
}

int vfu_send_error(int fd, const struct vfu_hdr *req, int errnum, struct vfm_error *err)
{
	struct vfu_hdr h;

	vfu_hdr_error(&h, req, errnum);
	return vfu_send(fd, &h, NULL, 0, NULL, 0, err);
}

int vfu_check_hdr(const struct vfu_hdr *h, struct vfm_error *err)
{
	uint32_t type = h->flags & VFU_F_TYPE_MASK;

	if (type != VFU_F_TYPE_COMMAND && type != VFU_F_TYPE_REPLY)
		return vfm_error_set(err, VFM_EPROTOCOL, "vfio-user message %u (%s) has type %" PRIu32,
				     (unsigned)h->msg_id, vfu_cmd_name(h->cmd), type);
	return 0;
}

int vfu_reply_status(const struct vfu_hdr *req, const struct vfu_msg *reply,
		     struct vfm_error *err)
{
	const struct vfu_hdr *h = &reply->hdr;
	const char *name = vfu_cmd_name(req->cmd);
	int e;

	if (!vfu_hdr_is_reply(h))
		return vfm_error_set(err, VFM_EPROTOCOL, "expected the reply to %s, got a %s command",
				     name, vfu_cmd_name(h->cmd));
	if (h->msg_id != req->msg_id || h->cmd != req->cmd)
		return vfm_error_set(err, VFM_EPROTOCOL,
				     "reply %u (%s) does not answer command %u (%s)",
				     (unsigned)h->msg_id, vfu_cmd_name(h->cmd),
				     (unsigned)req->msg_id, name);
	if (!(h->flags & VFU_F_ERROR))
		return 0;
	e = h->error > 0 && h->error < 4096 ? -(int)h->error : -EIO;
	return vfm_error_set(err, e, "vfio-user %s failed: peer returned error %" PRIu32 " (%s)",
			     name, h->error, h->error ? vfm_strerror(e) : "unspecified");
}

/* ------------------------------------------------------------------------ */
/* Validation helpers                                                        */

int vfu_check_payload(const struct vfu_msg *m, size_t min_len, struct vfm_error *err)
{
	if (m->len < min_len)
		return vfm_error_set(err, -EINVAL, "%s: payload of %zu bytes, need at least %zu",
				     vfu_cmd_name(m->hdr.cmd), m->len, min_len);
	return 0;
}

int vfu_check_payload_exact(const struct vfu_msg *m, size_t len, struct vfm_error *err)
{
	if (m->len != len)
		return vfm_error_set(err, -EINVAL, "%s: payload of %zu bytes, expected %zu",
				     vfu_cmd_name(m->hdr.cmd), m->len, len);
	return 0;
}

int vfu_check_argsz(const struct vfu_msg *m, uint32_t argsz, size_t min_argsz,
		    size_t max_argsz, struct vfm_error *err)
{
	if (argsz < min_argsz)
		return vfm_error_set(err, -EINVAL, "%s: argsz %" PRIu32 " below %zu",
				     vfu_cmd_name(m->hdr.cmd), argsz, min_argsz);
	if (argsz > max_argsz)
		return vfm_error_set(err, -EINVAL, "%s: argsz %" PRIu32 " above %zu",
				     vfu_cmd_name(m->hdr.cmd), argsz, max_argsz);
	return 0;
}

int vfu_take_request(const struct vfu_msg *m, void *req, size_t req_size, size_t min_argsz,
		     size_t max_argsz, struct vfm_error *err)
{
	uint32_t argsz;
	int ret = vfu_check_payload(m, req_size, err);

	if (ret)
		return ret;
	memcpy(req, m->payload, req_size);
	memcpy(&argsz, req, sizeof(argsz));
	return vfu_check_argsz(m, argsz, min_argsz, max_argsz, err);
}

int vfu_check_count(const struct vfu_msg *m, uint64_t count, uint64_t max_xfer,
		    struct vfm_error *err)
{
	if (count > max_xfer)
		return vfm_error_set(err, -E2BIG, "%s: count %" PRIu64
				     " exceeds max_data_xfer_size %" PRIu64,
				     vfu_cmd_name(m->hdr.cmd), count, max_xfer);
	return 0;
}

int vfu_check_range(const struct vfu_msg *m, uint64_t offset, uint64_t count,
		    uint64_t size, const char *what, struct vfm_error *err)
{
	if (!vfu_range_ok(offset, count, size))
		return vfm_error_set(err, -EINVAL, "%s: %" PRIu64 " bytes at %#" PRIx64
				     " are outside %s (%#" PRIx64 " bytes)",
				     vfu_cmd_name(m->hdr.cmd), count, offset,
				     what ? what : "the range", size);
	return 0;
}

int vfu_check_nfds(const struct vfu_msg *m, size_t min_fds, size_t max_fds,
		   struct vfm_error *err)
{
	if (m->nfds < min_fds || m->nfds > max_fds)
		return vfm_error_set(err, -EINVAL, "%s: came with %zu fds, expected %zu to %zu",
				     vfu_cmd_name(m->hdr.cmd), m->nfds, min_fds, max_fds);
	return 0;
}

static bool one_bit(uint32_t v)
{
	return v && !(v & (v - 1));
}

int vfu_check_irq_set(const struct vfu_msg *m, size_t max_fds, struct vfu_irq_set *out,
		      struct vfm_error *err)
{
	const uint32_t known = VFU_IRQ_SET_DATA_TYPE_MASK | VFU_IRQ_SET_ACTION_TYPE_MASK;
	struct vfu_irq_set s;
	uint32_t data_type;
	size_t data_len;
	int r;

	r = vfu_check_payload(m, sizeof(s), err);
	if (r)
		return r;
	memcpy(&s, m->payload, sizeof(s));
	r = vfu_check_argsz(m, s.argsz, m->len, m->len, err);
	if (r)
		return r;
	data_type = s.flags & VFU_IRQ_SET_DATA_TYPE_MASK;
	if ((s.flags & ~known) || !one_bit(data_type) ||
	    !one_bit(s.flags & VFU_IRQ_SET_ACTION_TYPE_MASK))
		return vfm_error_set(err, -EINVAL, "SET_IRQS: flags %#" PRIx32
				     " need exactly one DATA and one ACTION bit", s.flags);
	if ((uint64_t)s.start + s.count > UINT32_MAX)
		return vfm_error_set(err, -EINVAL, "SET_IRQS: start %" PRIu32 " + count %" PRIu32
				     " overflows", s.start, s.count);
	if (s.count == 0 && data_type != VFU_IRQ_SET_DATA_NONE)
		return vfm_error_set(err, -EINVAL, "SET_IRQS: count 0 needs DATA_NONE");
	data_len = m->len - sizeof(s);
	if (data_len != (data_type == VFU_IRQ_SET_DATA_BOOL ? s.count : 0))
		return vfm_error_set(err, -EINVAL, "SET_IRQS: %zu data bytes for count %" PRIu32
				     " and flags %#" PRIx32, data_len, s.count, s.flags);
	if (data_type == VFU_IRQ_SET_DATA_EVENTFD) {
		if ((m->nfds && m->nfds != s.count) || m->nfds > max_fds)
			return vfm_error_set(err, -EINVAL, "SET_IRQS: %zu eventfds for count %" PRIu32
					     " (0 or count, at most %zu)", m->nfds, s.count, max_fds);
	} else if (m->nfds) {
		return vfm_error_set(err, -EINVAL, "SET_IRQS: %zu fds without DATA_EVENTFD", m->nfds);
	}
	if (out)
		*out = s;
	return 0;
}

int vfu_check_feature_flags(uint32_t flags, struct vfm_error *err)
{
	const uint32_t ops = VFU_FEATURE_GET | VFU_FEATURE_SET | VFU_FEATURE_PROBE;

	if (flags & ~(VFU_FEATURE_MASK | ops))
		return vfm_error_set(err, -EINVAL, "DEVICE_FEATURE: unknown flags %#" PRIx32,
				     flags & ~(VFU_FEATURE_MASK | ops));
	if (!(flags & ops))
		return vfm_error_set(err, -EINVAL, "DEVICE_FEATURE: none of GET, SET, PROBE");
	if ((flags & VFU_FEATURE_GET) && (flags & VFU_FEATURE_SET) && !(flags & VFU_FEATURE_PROBE))
		return vfm_error_set(err, -EINVAL, "DEVICE_FEATURE: GET and SET without PROBE");
	return 0;
}

int vfu_bitmap_size(uint64_t length, uint64_t page_size, uint64_t *bytes,
		    struct vfm_error *err)
{
	uint64_t pages;

	if (page_size < 4096 || (page_size & (page_size - 1)))
		return vfm_error_set(err, -EINVAL, "bitmap page size %#" PRIx64
				     " is not a power of two >= 4096", page_size);
	if (!length)
		return vfm_error_set(err, -EINVAL, "bitmap for an empty range");
	pages = length / page_size + (length % page_size != 0);
	*bytes = (pages + 63) / 64 * sizeof(uint64_t);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* VERSION capabilities                                                      */

void vfu_caps_init(struct vfu_caps *c)
{
	*c = (struct vfu_caps){
		.max_msg_fds = VFU_DEFAULT_MAX_MSG_FDS,
		.max_data_xfer_size = VFU_DEFAULT_MAX_DATA_XFER_SIZE,
		.max_dma_maps = VFU_DEFAULT_MAX_DMA_MAPS,
		.pgsizes = VFU_DEFAULT_PGSIZES,
		.twin_socket_fd_index = -1,
	};
}

/* The range rules shared by parsing and encoding; min_xfer: the smallest
 * max_data_xfer_size allowed (ours, or a peer's). */
static int caps_check(const struct vfu_caps *c, uint32_t min_xfer, int code, struct vfm_error *err)
{
	if (c->max_msg_fds > VFU_MAX_FDS)
		return vfm_error_set(err, code, "max_msg_fds %" PRIu32 " above our limit of %u",
				     c->max_msg_fds, VFU_MAX_FDS);
	if (c->max_data_xfer_size < min_xfer ||
	    c->max_data_xfer_size > VFU_MAX_DATA_XFER_SIZE)
		return vfm_error_set(err, code, "max_data_xfer_size %" PRIu32 " outside [%u, %u]",
				     c->max_data_xfer_size, min_xfer, VFU_MAX_DATA_XFER_SIZE);
	if (!c->pgsizes || (c->pgsizes & 4095))
		return vfm_error_set(err, code, "pgsizes %#" PRIx64 " has no page size or one below 4096",
				     c->pgsizes);
	if (c->twin_socket_fd_index < -1 || c->twin_socket_fd_index >= (int32_t)VFU_MAX_FDS)
		return vfm_error_set(err, code, "twin_socket.fd_index %" PRId32 " out of range",
				     c->twin_socket_fd_index);
	if ((c->present & VFU_CAP_MIGRATION) &&
	    (!c->migration_pgsize || (c->migration_pgsize & 4095)))
		return vfm_error_set(err, code, "migration.pgsize %" PRIu64
				     " is not a multiple of 4096", c->migration_pgsize);
	return 0;
}

static int json_put(struct json_object *obj, const char *key, struct json_object *val)
{
	if (!val)
		return -ENOMEM;
	if (json_object_object_add(obj, key, val) < 0) {
		json_object_put(val);
		return -ENOMEM;
	}
	return 0;
}

static int caps_fill(const struct vfu_caps *c, struct json_object *caps)
{
	struct json_object *sub;
	int r = 0;

	if (c->present & VFU_CAP_MAX_MSG_FDS)
		r = r ?: json_put(caps, "max_msg_fds", json_object_new_uint64(c->max_msg_fds));
	if (c->present & VFU_CAP_MAX_DATA_XFER_SIZE)
		r = r ?: json_put(caps, "max_data_xfer_size",
				  json_object_new_uint64(c->max_data_xfer_size));
	if (c->present & VFU_CAP_MAX_DMA_MAPS)
		r = r ?: json_put(caps, "max_dma_maps", json_object_new_uint64(c->max_dma_maps));
	if (c->present & VFU_CAP_PGSIZES)
		r = r ?: json_put(caps, "pgsizes", json_object_new_uint64(c->pgsizes));
	if (c->present & VFU_CAP_WRITE_MULTIPLE)
		r = r ?: json_put(caps, "write_multiple", json_object_new_boolean(c->write_multiple));
	if (c->present & VFU_CAP_WHOLE_MESSAGES)
		r = r ?: json_put(caps, "vfiomig_whole_messages",
				  json_object_new_boolean(c->whole_messages));
	if (c->present & VFU_CAP_MIG_SHM)
		r = r ?: json_put(caps, "vfiomig_mig_shm", json_object_new_boolean(c->mig_shm));
	if (!r && (c->present & VFU_CAP_TWIN_SOCKET)) {
		sub = json_object_new_object();
		r = json_put(caps, "twin_socket", sub);
		r = r ?: json_put(sub, "supported", json_object_new_boolean(c->twin_socket));
		if (c->twin_socket_fd_index >= 0)
			r = r ?: json_put(sub, "fd_index",
					  json_object_new_uint64((uint64_t)c->twin_socket_fd_index));
	}
	if (!r && (c->present & VFU_CAP_MIGRATION)) {
		sub = json_object_new_object();
		r = json_put(caps, "migration", sub);
		r = r ?: json_put(sub, "pgsize", json_object_new_uint64(c->migration_pgsize));
	}
	return r;
}

int vfu_caps_to_json(const struct vfu_caps *c, char **json, size_t *len,
		     struct vfm_error *err)
{
	struct json_object *top, *caps;
	const char *text;
	int r;

	r = caps_check(c, VFU_MIN_DATA_XFER_SIZE, -EINVAL, err);
	if (r)
		return r;
	top = json_object_new_object();
	caps = json_object_new_object();
	if (!top || !caps) {
		json_object_put(top);
		json_object_put(caps);
		return vfm_error_set(err, -ENOMEM, "no memory for capabilities JSON");
	}
	r = json_put(top, "capabilities", caps);
	r = r ?: caps_fill(c, caps);
	text = r ? NULL : json_object_to_json_string_ext(top, JSON_C_TO_STRING_PLAIN);
	*json = text ? strdup(text) : NULL;
	json_object_put(top);
	if (!*json)
		return vfm_error_set(err, -ENOMEM, "no memory for capabilities JSON");
	*len = strlen(*json) + 1;
	return 0;
}

/* A non-negative integer no larger than max (a JSON number with no fraction). */
static int cap_uint(struct json_object *o, const char *key, uint64_t max, uint64_t *out,
		     struct vfm_error *err)
{
	uint64_t v;

	if (!json_object_is_type(o, json_type_int) || json_object_get_int64(o) < 0)
		return vfm_error_set(err, VFM_EPROTOCOL,
				     "capability %s must be a non-negative integer", key);
	v = json_object_get_uint64(o);
	if (v > max)
		return vfm_error_set(err, VFM_EPROTOCOL, "capability %s %" PRIu64 " above %" PRIu64,
				     key, v, max);
	*out = v;
	return 0;
}

static int cap_bool(struct json_object *o, const char *key, bool *out, struct vfm_error *err)
{
	if (!json_object_is_type(o, json_type_boolean))
		return vfm_error_set(err, VFM_EPROTOCOL, "capability %s must be a boolean", key);
	*out = json_object_get_boolean(o);
	return 0;
}

static int cap_obj(struct json_object *o, const char *key, struct vfm_error *err)
{
	if (!json_object_is_type(o, json_type_object))
		return vfm_error_set(err, VFM_EPROTOCOL, "capability %s must be an object", key);
	return 0;
}

static int caps_read(struct json_object *caps, struct vfu_caps *c, struct vfm_error *err)
{
	struct json_object *o, *sub;
	uint64_t v;
	int r;

	if (json_object_object_get_ex(caps, "max_msg_fds", &o)) {
		if ((r = cap_uint(o, "max_msg_fds", UINT32_MAX, &v, err)))
			return r;
		c->max_msg_fds = (uint32_t)v;
		c->present |= VFU_CAP_MAX_MSG_FDS;
	}
	if (json_object_object_get_ex(caps, "max_data_xfer_size", &o)) {
		if ((r = cap_uint(o, "max_data_xfer_size", UINT32_MAX, &v, err)))
			return r;
		c->max_data_xfer_size = (uint32_t)v;
		c->present |= VFU_CAP_MAX_DATA_XFER_SIZE;
	}
	if (json_object_object_get_ex(caps, "max_dma_maps", &o)) {
		if ((r = cap_uint(o, "max_dma_maps", UINT32_MAX, &v, err)))
			return r;
		c->max_dma_maps = (uint32_t)v;
		c->present |= VFU_CAP_MAX_DMA_MAPS;
	}
	if (json_object_object_get_ex(caps, "pgsizes", &o)) {
		if ((r = cap_uint(o, "pgsizes", UINT64_MAX, &c->pgsizes, err)))
			return r;
		c->present |= VFU_CAP_PGSIZES;
	}
	if (json_object_object_get_ex(caps, "write_multiple", &o)) {
		if ((r = cap_bool(o, "write_multiple", &c->write_multiple, err)))
			return r;
		c->present |= VFU_CAP_WRITE_MULTIPLE;
	}
	if (json_object_object_get_ex(caps, "vfiomig_whole_messages", &o)) {
		if ((r = cap_bool(o, "vfiomig_whole_messages", &c->whole_messages, err)))
			return r;
		c->present |= VFU_CAP_WHOLE_MESSAGES;
	}
	if (json_object_object_get_ex(caps, "vfiomig_mig_shm", &o)) {
		if ((r = cap_bool(o, "vfiomig_mig_shm", &c->mig_shm, err)))
			return r;
		c->present |= VFU_CAP_MIG_SHM;
	}
	if (json_object_object_get_ex(caps, "twin_socket", &o)) {
		if ((r = cap_obj(o, "twin_socket", err)))
			return r;
		if (json_object_object_get_ex(o, "supported", &sub) &&
		    (r = cap_bool(sub, "twin_socket.supported", &c->twin_socket, err)))
			return r;
		if (json_object_object_get_ex(o, "fd_index", &sub)) {
			if ((r = cap_uint(sub, "twin_socket.fd_index", VFU_MAX_FDS - 1, &v, err)))
				return r;
			c->twin_socket_fd_index = (int32_t)v;
		}
		c->present |= VFU_CAP_TWIN_SOCKET;
	}
	if (json_object_object_get_ex(caps, "migration", &o)) {
		if ((r = cap_obj(o, "migration", err)))
			return r;
		if (json_object_object_get_ex(o, "pgsize", &sub)) {
			if ((r = cap_uint(sub, "migration.pgsize", UINT64_MAX, &c->migration_pgsize, err)))
				return r;
			c->present |= VFU_CAP_MIGRATION;
		}
	}
	/*
	 * Each side states what it can receive (spec, VERSION): more than we
	 * ever send is as good as our limit, so it is clamped, never refused
	 * (libvfio-user's client proposes max_msg_fds 32). A small
	 * max_data_xfer_size (its client: 1024) is honoured by every reply
	 * that carries data; only a value too small to carry any is refused.
	 */
	if (c->max_msg_fds > VFU_MAX_FDS)
		c->max_msg_fds = VFU_MAX_FDS;
	if (c->max_data_xfer_size > VFU_MAX_DATA_XFER_SIZE)
		c->max_data_xfer_size = VFU_MAX_DATA_XFER_SIZE;
	return caps_check(c, VFU_MIN_PEER_XFER_SIZE, VFM_EPROTOCOL, err);
}

int vfu_caps_parse(const char *data, size_t len, struct vfu_caps *out,
		   struct vfm_error *err)
{
	struct json_object *top = NULL, *caps;
	struct json_tokener *tok;
	enum json_tokener_error jerr;
	struct vfu_caps c;
	size_t text_len, end;
	int r;

	vfu_caps_init(&c);
	if (len == 0) {
		*out = c;
		return 0;
	}
	if (data[len - 1] != '\0')
		return vfm_error_set(err, VFM_EPROTOCOL, "version data is not NUL-terminated");
	text_len = strlen(data);
	if (text_len != len - 1)
		return vfm_error_set(err, VFM_EPROTOCOL,
				     "version data has a NUL at %zu of %zu bytes", text_len, len);
	if (text_len > INT32_MAX)
		return vfm_error_set(err, VFM_EPROTOCOL, "version data too long");

	tok = json_tokener_new();
	if (!tok)
		return vfm_error_set(err, -ENOMEM, "no memory for a JSON parser");
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
	top = json_tokener_parse_ex(tok, data, (int)text_len);
	jerr = json_tokener_get_error(tok);
	if (jerr != json_tokener_success) {
		r = vfm_error_set(err, VFM_EPROTOCOL, "version data is not valid JSON: %s",
				  jerr == json_tokener_continue ? "truncated"
								 : json_tokener_error_desc(jerr));
		goto out;
	}
	end = json_tokener_get_parse_end(tok);
	while (end < text_len && strchr(" \t\r\n", data[end]))
		end++;
	if (end != text_len) {
		r = vfm_error_set(err, VFM_EPROTOCOL, "version data has bytes after the JSON (at %zu)",
				  end);
		goto out;
	}
	/* json-c represents a JSON null as NULL. */
	if (!top || !json_object_is_type(top, json_type_object)) {
		r = vfm_error_set(err, VFM_EPROTOCOL, "version data is not a JSON object");
		goto out;
	}
	r = 0;
	if (json_object_object_get_ex(top, "capabilities", &caps)) {
		r = cap_obj(caps, "capabilities", err);
		r = r ?: caps_read(caps, &c, err);
	}
	if (!r)
		*out = c;
out:
	json_object_put(top);
	json_tokener_free(tok);
	return r;
}

int vfu_version_encode(uint16_t major, uint16_t minor, const struct vfu_caps *c,
		       void **payload, size_t *len, struct vfm_error *err)
{
	struct vfu_version v = { .major = major, .minor = minor };
	char *json = NULL;
	size_t json_len = 0;
	char *buf;
	int r;

	if (c) {
		r = vfu_caps_to_json(c, &json, &json_len, err);
		if (r)
			return r;
	}
	buf = malloc(sizeof(v) + json_len);
	if (!buf) {
		free(json);
		return vfm_error_set(err, -ENOMEM, "no memory for VERSION");
	}
	memcpy(buf, &v, sizeof(v));
	if (json_len)
		memcpy(buf + sizeof(v), json, json_len);
	free(json);
	*payload = buf;
	*len = sizeof(v) + json_len;
	return 0;
}

int vfu_version_decode(const struct vfu_msg *m, struct vfu_version_info *out,
		       struct vfm_error *err)
{
	struct vfu_version v;
	int r;

	r = vfu_check_payload(m, sizeof(v), err);
	if (r)
		return r;
	memcpy(&v, m->payload, sizeof(v));
	out->major = v.major;
	out->minor = v.minor;
	r = vfu_caps_parse((const char *)m->payload + sizeof(v), m->len - sizeof(v),
			   &out->caps, err);
	if (r)
		return vfm_error_set(err, r, "VERSION %u.%u", (unsigned)v.major, (unsigned)v.minor);
	return 0;
}

int vfu_version_make_reply(const struct vfu_version_info *proposed,
			   const struct vfu_version_info *ours,
			   struct vfu_version_info *reply, struct vfm_error *err)
{
	const struct vfu_caps *p = &proposed->caps, *o = &ours->caps;
	struct vfu_caps *c = &reply->caps;

	if (proposed->major != ours->major)
		return vfm_error_set(err, -EPROTONOSUPPORT, "client proposed version %u.%u, we speak %u.x",
				     (unsigned)proposed->major, (unsigned)proposed->minor,
				     (unsigned)ours->major);
	if (!(o->pgsizes & p->pgsizes))
		return vfm_error_set(err, -EPROTONOSUPPORT, "no common DMA page size (client %#" PRIx64
				     ", server %#" PRIx64 ")", p->pgsizes, o->pgsizes);
	reply->major = ours->major;
	reply->minor = proposed->minor < ours->minor ? proposed->minor : ours->minor;
	vfu_caps_init(c);
	/* Our own limits, stated where the client asked. */
	c->present = p->present & (VFU_CAP_MAX_MSG_FDS | VFU_CAP_MAX_DATA_XFER_SIZE);
	c->max_msg_fds = o->max_msg_fds;
	c->max_data_xfer_size = o->max_data_xfer_size;
	/* Lower-only values: stated when asked, or when the default would lie. */
	c->max_dma_maps = o->max_dma_maps < p->max_dma_maps ? o->max_dma_maps : p->max_dma_maps;
	if ((p->present & VFU_CAP_MAX_DMA_MAPS) || c->max_dma_maps < VFU_DEFAULT_MAX_DMA_MAPS)
		c->present |= VFU_CAP_MAX_DMA_MAPS;
	c->pgsizes = o->pgsizes & p->pgsizes;
	if ((p->present & VFU_CAP_PGSIZES) || c->pgsizes != VFU_DEFAULT_PGSIZES)
		c->present |= VFU_CAP_PGSIZES;
	/* Features: on only when both want them; stated only when asked. */
	c->write_multiple = p->write_multiple && o->write_multiple;
	c->present |= p->present & VFU_CAP_WRITE_MULTIPLE;
	c->whole_messages = p->whole_messages && o->whole_messages;
	c->present |= p->present & VFU_CAP_WHOLE_MESSAGES;
	c->mig_shm = p->mig_shm && o->mig_shm;
	c->present |= p->present & VFU_CAP_MIG_SHM;
	c->twin_socket = p->twin_socket && o->twin_socket;
	c->present |= p->present & VFU_CAP_TWIN_SOCKET;
	if ((p->present & VFU_CAP_MIGRATION) && (o->present & VFU_CAP_MIGRATION)) {
		c->migration_pgsize = o->migration_pgsize;
		c->present |= VFU_CAP_MIGRATION;
	}
	return 0;
}

int vfu_version_negotiate(const struct vfu_version_info *proposed,
			  const struct vfu_version_info *reply, size_t reply_nfds,
			  bool local_is_client, struct vfu_negotiated *out,
			  struct vfm_error *err)
{
	const struct vfu_caps *p = &proposed->caps, *r = &reply->caps;
	const struct vfu_caps *local = local_is_client ? p : r;
	const struct vfu_caps *peer = local_is_client ? r : p;

	if (reply->major != proposed->major || reply->minor > proposed->minor)
		return vfm_error_set(err, VFM_EPROTOCOL, "VERSION reply %u.%u to a proposal of %u.%u",
				     (unsigned)reply->major, (unsigned)reply->minor,
				     (unsigned)proposed->major, (unsigned)proposed->minor);
	if ((r->present & VFU_CAP_PGSIZES) && (r->pgsizes & ~p->pgsizes))
		return vfm_error_set(err, VFM_EPROTOCOL, "VERSION reply pgsizes %#" PRIx64
				     " not a subset of %#" PRIx64, r->pgsizes, p->pgsizes);
	if ((r->present & VFU_CAP_MAX_DMA_MAPS) && r->max_dma_maps > p->max_dma_maps)
		return vfm_error_set(err, VFM_EPROTOCOL, "VERSION reply max_dma_maps %" PRIu32
				     " above the proposed %" PRIu32, r->max_dma_maps, p->max_dma_maps);
	if (r->write_multiple && !p->write_multiple)
		return vfm_error_set(err, VFM_EPROTOCOL, "VERSION reply enables write_multiple unasked");
	if (r->twin_socket && !p->twin_socket)
		return vfm_error_set(err, VFM_EPROTOCOL, "VERSION reply enables twin_socket unasked");
	if (r->whole_messages && !p->whole_messages)
		return vfm_error_set(err, VFM_EPROTOCOL,
				     "VERSION reply enables vfiomig_whole_messages unasked");
	if (r->mig_shm && !p->mig_shm)
		return vfm_error_set(err, VFM_EPROTOCOL, "VERSION reply enables vfiomig_mig_shm unasked");
	if (r->twin_socket && (r->twin_socket_fd_index < 0 ||
			       (size_t)r->twin_socket_fd_index >= reply_nfds))
		return vfm_error_set(err, VFM_EPROTOCOL, "VERSION reply enables twin_socket with fd_index %"
				     PRId32 " but %zu fds", r->twin_socket_fd_index, reply_nfds);

	*out = (struct vfu_negotiated){
		.major = reply->major,
		.minor = reply->minor,
		.local_max_fds = local->max_msg_fds,
		.peer_max_fds = peer->max_msg_fds,
		.local_max_xfer = local->max_data_xfer_size,
		.peer_max_xfer = peer->max_data_xfer_size,
		.max_dma_maps = r->max_dma_maps < p->max_dma_maps ? r->max_dma_maps : p->max_dma_maps,
		.pgsizes = r->pgsizes,
		.write_multiple = r->write_multiple,
		.whole_messages = r->whole_messages,
		.mig_shm = r->mig_shm,
		.twin_socket = r->twin_socket,
		.twin_socket_fd_index = r->twin_socket ? r->twin_socket_fd_index : -1,
		.max_msg_size = VFU_MSG_SIZE_FOR_XFER(local->max_data_xfer_size),
	};
	out->max_xfer = out->local_max_xfer < out->peer_max_xfer ? out->local_max_xfer
								 : out->peer_max_xfer;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Names                                                                     */

const char *vfu_cmd_name(uint16_t cmd)
{
	static const char *const names[] = {
		[VFU_CMD_VERSION] = "VERSION",
		[VFU_CMD_DMA_MAP] = "DMA_MAP",
		[VFU_CMD_DMA_UNMAP] = "DMA_UNMAP",
		[VFU_CMD_DEVICE_GET_INFO] = "DEVICE_GET_INFO",
		[VFU_CMD_DEVICE_GET_REGION_INFO] = "DEVICE_GET_REGION_INFO",
		[VFU_CMD_DEVICE_GET_REGION_IO_FDS] = "DEVICE_GET_REGION_IO_FDS",
		[VFU_CMD_DEVICE_GET_IRQ_INFO] = "DEVICE_GET_IRQ_INFO",
		[VFU_CMD_DEVICE_SET_IRQS] = "DEVICE_SET_IRQS",
		[VFU_CMD_REGION_READ] = "REGION_READ",
		[VFU_CMD_REGION_WRITE] = "REGION_WRITE",
		[VFU_CMD_DMA_READ] = "DMA_READ",
		[VFU_CMD_DMA_WRITE] = "DMA_WRITE",
		[VFU_CMD_DEVICE_RESET] = "DEVICE_RESET",
		[VFU_CMD_REGION_WRITE_MULTI] = "REGION_WRITE_MULTI",
		[VFU_CMD_DEVICE_FEATURE] = "DEVICE_FEATURE",
		[VFU_CMD_MIG_DATA_READ] = "MIG_DATA_READ",
		[VFU_CMD_MIG_DATA_WRITE] = "MIG_DATA_WRITE",
	};

	if (cmd < sizeof(names) / sizeof(names[0]) && names[cmd])
		return names[cmd];
	return "UNKNOWN";
}

const char *vfu_feature_name(uint32_t feature)
{
	switch (feature & VFU_FEATURE_MASK) {
	case VFU_FEATURE_MIGRATION: return "MIGRATION";
	case VFU_FEATURE_MIG_DEVICE_STATE: return "MIG_DEVICE_STATE";
	case VFU_FEATURE_DMA_LOGGING_START: return "DMA_LOGGING_START";
	case VFU_FEATURE_DMA_LOGGING_STOP: return "DMA_LOGGING_STOP";
	case VFU_FEATURE_DMA_LOGGING_REPORT: return "DMA_LOGGING_REPORT";
	default: return "UNKNOWN";
	}
}
