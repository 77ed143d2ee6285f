/*
 * The vfio-user server library: context lifecycle, the listening socket,
 * the non-blocking step and its dispatcher, VERSION / DEVICE_GET_INFO /
 * DEVICE_RESET, and commands we send to the client (DMA_READ/DMA_WRITE).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "util/logging.h"
#include "vfio-user/server.h"

VFU_ARGSZ_FIRST(struct vfu_device_info);

/* ------------------------------------------------------------------------ */
/* Creation                                                                  */

/*
 * Binds a listening socket at path. A leftover socket file nobody listens on
 * (a crashed server) is replaced; anything else is left alone. The socket is
 * bound at a temporary name beside path, made 0600 and listening, and only
 * then renamed to path: whoever sees path can connect (a client that waits
 * for the file never meets ECONNREFUSED) and never with looser permissions.
 * A path too long for a temporary name is bound directly, as before.
 */
static int listen_on(const char *path, struct vfm_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char tmp[sizeof(sa.sun_path) + 32];
	struct stat st;
	int fd, r, n;

	if (strlen(path) >= sizeof(sa.sun_path))
		return vfm_error_set(err, -ENAMETOOLONG, "socket path %s is longer than %zu bytes",
				     path, sizeof(sa.sun_path) - 1);
	memcpy(sa.sun_path, path, strlen(path) + 1);
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return vfm_error_set(err, -EEXIST, "%s exists and is not a socket: refusing to replace it",
					     path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
		r = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) ? errno : 0;
		close(fd);
		if (r != ECONNREFUSED)
			return vfm_error_set(err, -EADDRINUSE, "%s: a server is already listening there",
					     path);
		if (unlink(path) && errno != ENOENT)
			return vfm_error_set(err, -errno, "unlink stale socket %s: %s", path,
					     strerror(errno));
	} else if (errno != ENOENT) {
		return vfm_error_set(err, -errno, "%s: %s", path, strerror(errno));
	}
	n = snprintf(tmp, sizeof(tmp), "%s.%ld~", path, (long)getpid());
	if (n > 0 && (size_t)n < sizeof(sa.sun_path)) {
		memcpy(sa.sun_path, tmp, (size_t)n + 1);
		unlink(tmp);   /* our own leftover from a crash with the same pid */
	} else {
		snprintf(tmp, sizeof(tmp), "%s", path);
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		r = vfm_error_set(err, -errno, "bind %s: %s", tmp, strerror(errno));
		goto err_close;
	}
	if (chmod(tmp, 0600)) {
		r = vfm_error_set(err, -errno, "chmod %s: %s", tmp, strerror(errno));
		goto err_unlink;
	}
	if (listen(fd, 8)) {
		r = vfm_error_set(err, -errno, "listen %s: %s", tmp, strerror(errno));
		goto err_unlink;
	}
	/* A file system without RENAME_NOREPLACE (EINVAL) gets a plain rename. */
	if (strcmp(tmp, path) && renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE) &&
	    (errno != EINVAL || rename(tmp, path))) {
		r = errno == EEXIST ? vfm_error_set(err, -EADDRINUSE, "%s appeared while we set up: "
						    "another server?", path)
				    : vfm_error_set(err, -errno, "rename %s to %s: %s", tmp, path,
						    strerror(errno));
		goto err_unlink;
	}
	return fd;

err_unlink:
	unlink(tmp);
err_close:
	close(fd);
	return r;
}

static int ep_ctl(struct vfm_vfu_ctx *ctx, int op, int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

	return epoll_ctl(ctx->epfd, op, fd, &ev) ? -errno : 0;
}

int vfm_vfu_create(const char *socket_path, const struct vfm_vfu_opts *opts, void *priv,
		   struct vfm_vfu_ctx **out, struct vfm_error *err)
{
	struct vfm_vfu_opts o = opts ? *opts : (struct vfm_vfu_opts){ 0 };
	struct vfm_vfu_ctx *ctx;
	int r;

	if (!out)
		return vfm_error_set(err, -EINVAL, "vfm_vfu_create: no output");
	if (o.max_data_xfer_size == 0)
		o.max_data_xfer_size = VFU_DEFAULT_MAX_DATA_XFER_SIZE;
	if (o.max_data_xfer_size < VFU_MIN_DATA_XFER_SIZE ||
	    o.max_data_xfer_size > VFU_MAX_DATA_XFER_SIZE)
		return vfm_error_set(err, -EINVAL, "max_data_xfer_size %" PRIu32 " outside [%u, %u]",
				     o.max_data_xfer_size, VFU_MIN_DATA_XFER_SIZE,
				     VFU_MAX_DATA_XFER_SIZE);
	if (o.max_msg_fds > VFU_MAX_FDS)
		return vfm_error_set(err, -EINVAL, "max_msg_fds %" PRIu32 " above %u",
				     o.max_msg_fds, VFU_MAX_FDS);

	ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return vfm_error_set(err, -ENOMEM, "no memory for a vfio-user context");
	snprintf(ctx->id, sizeof(ctx->id), "%s", o.id && *o.id ? o.id : "vfu");
	ctx->priv = priv;
	ctx->max_xfer = o.max_data_xfer_size;
	ctx->max_dma_maps = o.max_dma_maps ? o.max_dma_maps : VFU_DEFAULT_MAX_DMA_MAPS;
	ctx->max_fds = o.max_msg_fds ? o.max_msg_fds : VFU_SRV_DEFAULT_MAX_FDS;
	ctx->io_timeout_ms = o.io_timeout_ms > 0 ? o.io_timeout_ms : VFU_SRV_DEFAULT_TIMEOUT_MS;
	ctx->no_mig_shm = o.no_mig_shm;
	ctx->listen_fd = ctx->conn_fd = ctx->epfd = ctx->wake_fd = -1;
	ctx->mig_state = VFM_STATE_RUNNING;
	for (unsigned i = 0; i < VFM_VFU_NUM_REGIONS; i++)
		ctx->regions[i].fd = -1;
	pthread_mutex_init(&ctx->irq_lock, NULL);
	pthread_rwlock_init(&ctx->dma_lock, NULL);

	ctx->epfd = epoll_create1(EPOLL_CLOEXEC);
	ctx->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (ctx->epfd < 0 || ctx->wake_fd < 0 || ep_ctl(ctx, EPOLL_CTL_ADD, ctx->wake_fd)) {
		r = vfm_error_set(err, -errno, "epoll/eventfd: %s", strerror(errno));
		goto err_free;
	}
	if (socket_path) {
		ctx->sock_path = strdup(socket_path);
		if (!ctx->sock_path) {
			r = vfm_error_set(err, -ENOMEM, "no memory");
			goto err_free;
		}
		r = listen_on(socket_path, err);
		if (r < 0) {
			free(ctx->sock_path);
			ctx->sock_path = NULL;
			goto err_free;
		}
		ctx->listen_fd = r;
		r = ep_ctl(ctx, EPOLL_CTL_ADD, ctx->listen_fd);
		if (r) {
			vfm_error_set(err, r, "epoll: %s", strerror(-r));
			goto err_free;
		}
	}
	vfm_debug(ctx->id, "created%s%s", socket_path ? " on " : "", socket_path ? socket_path : "");
	*out = ctx;
	return 0;

err_free:
	vfm_vfu_destroy(ctx);
	return r;
}

void vfm_vfu_destroy(struct vfm_vfu_ctx *ctx)
{
	if (!ctx)
		return;
	if (ctx->conn_fd >= 0)
		vfm_vfu_detach(ctx);
	if (ctx->listen_fd >= 0) {
		close(ctx->listen_fd);
		if (ctx->sock_path)
			unlink(ctx->sock_path);
	}
	if (ctx->epfd >= 0)
		close(ctx->epfd);
	if (ctx->wake_fd >= 0)
		close(ctx->wake_fd);
	vfu_srv_regions_free(ctx);
	free(ctx->maps);
	free(ctx->rbuf);
	free(ctx->sock_path);
	pthread_mutex_destroy(&ctx->irq_lock);
	pthread_rwlock_destroy(&ctx->dma_lock);
	free(ctx);
}

void *vfm_vfu_priv(const struct vfm_vfu_ctx *ctx)
{
	return ctx->priv;
}

const char *vfm_vfu_id(const struct vfm_vfu_ctx *ctx)
{
	return ctx->id;
}

int vfm_vfu_poll_fd(const struct vfm_vfu_ctx *ctx)
{
	return ctx->epfd;
}

bool vfm_vfu_attached(const struct vfm_vfu_ctx *ctx)
{
	return __atomic_load_n(&ctx->attached, __ATOMIC_ACQUIRE);
}

int vfm_vfu_set_device_ops(struct vfm_vfu_ctx *ctx, const struct vfm_vfu_device_ops *ops,
			   struct vfm_error *err)
{
	if (ctx->realized)
		return vfm_error_set(err, -EBUSY, "%s: device ops after realize", ctx->id);
	if (ops && ops->version != VFM_VFU_DEVICE_OPS_VERSION)
		return vfm_error_set(err, -EINVAL, "%s: device ops version %u, expected %u",
				     ctx->id, ops->version, VFM_VFU_DEVICE_OPS_VERSION);
	ctx->dev_ops = ops;
	return 0;
}

int vfm_vfu_realize(struct vfm_vfu_ctx *ctx, struct vfm_error *err)
{
	int r;

	if (ctx->realized)
		return vfm_error_set(err, -EBUSY, "%s: already realized", ctx->id);
	if (ctx->pci) {
		r = vfu_srv_pci_realize(ctx, err);
		if (r)
			return r;
	}
	/* Every reply fits: data up to max_xfer plus the fixed part. */
	ctx->rbuf_size = VFU_MSG_SIZE_FOR_XFER(ctx->max_xfer);
	ctx->rbuf = malloc(ctx->rbuf_size);
	if (!ctx->rbuf)
		return vfm_error_set(err, -ENOMEM, "%s: no memory for the reply buffer", ctx->id);
	ctx->realized = true;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Clients coming and going                                                  */

static int take_client(struct vfm_vfu_ctx *ctx, int fd, struct vfm_error *err)
{
	int r;

	if (ctx->listen_fd >= 0)
		epoll_ctl(ctx->epfd, EPOLL_CTL_DEL, ctx->listen_fd, NULL);
	r = ep_ctl(ctx, EPOLL_CTL_ADD, fd);
	if (r) {
		close(fd);
		if (ctx->listen_fd >= 0)
			ep_ctl(ctx, EPOLL_CTL_ADD, ctx->listen_fd);
		return vfm_error_set(err, r, "%s: epoll: %s", ctx->id, strerror(-r));
	}
	ctx->conn_fd = fd;
	ctx->negotiated = false;
	ctx->drop = false;
	ctx->next_msg_id = 0;
	__atomic_store_n(&ctx->attached, true, __ATOMIC_RELEASE);
	vfm_info(ctx->id, "client connected");
	return 0;
}

int vfm_vfu_attach_fd(struct vfm_vfu_ctx *ctx, int fd, struct vfm_error *err)
{
	if (!ctx->realized)
		return vfm_error_set(err, -EINVAL, "%s: attach before realize", ctx->id);
	if (ctx->conn_fd >= 0)
		return vfm_error_set(err, -EBUSY, "%s: a client is already attached", ctx->id);
	if (fd < 0)
		return vfm_error_set(err, -EBADF, "%s: attach of fd %d", ctx->id, fd);
	return take_client(ctx, fd, err);
}

/* -EAGAIN when nobody is waiting. */
static int accept_client(struct vfm_vfu_ctx *ctx, struct vfm_error *err)
{
	int fd = accept4(ctx->listen_fd, NULL, NULL, SOCK_CLOEXEC);

	if (fd < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
		    errno == ECONNABORTED)
			return -EAGAIN;
		return vfm_error_set(err, -errno, "%s: accept: %s", ctx->id, strerror(errno));
	}
	return take_client(ctx, fd, err);
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int vfm_vfu_attach(struct vfm_vfu_ctx *ctx, int timeout_ms, struct vfm_error *err)
{
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;

	if (!ctx->realized)
		return vfm_error_set(err, -EINVAL, "%s: attach before realize", ctx->id);
	if (ctx->conn_fd >= 0)
		return vfm_error_set(err, -EBUSY, "%s: a client is already attached", ctx->id);
	if (ctx->listen_fd < 0)
		return vfm_error_set(err, -EINVAL, "%s: no listening socket", ctx->id);
	for (;;) {
		struct pollfd p = { .fd = ctx->listen_fd, .events = POLLIN };
		int wait = -1, r;

		r = accept_client(ctx, err);
		if (r != -EAGAIN)
			return r;
		if (deadline >= 0) {
			int64_t left = deadline - now_ms();

			if (left <= 0)
				return vfm_error_set(err, -ETIMEDOUT, "%s: no client within %d ms",
						     ctx->id, timeout_ms);
			wait = (int)left;
		}
		if (poll(&p, 1, wait) < 0 && errno == EINTR)
			return vfm_error_set(err, -EINTR, "%s: interrupted", ctx->id);
	}
}

static void queue_clear(struct vfm_vfu_ctx *ctx)
{
	uint64_t v;

	while (ctx->q_len) {
		vfu_msg_release(&ctx->queue[ctx->q_head]);
		ctx->q_head = (ctx->q_head + 1) % VFU_SRV_QUEUE_MAX;
		ctx->q_len--;
	}
	if (read(ctx->wake_fd, &v, sizeof(v)) < 0) {
		/* EAGAIN: it was not signalled. */
	}
}

static int device_reset(struct vfm_vfu_ctx *ctx)
{
	int r = 0;

	if (ctx->dev_ops && ctx->dev_ops->reset)
		r = ctx->dev_ops->reset(ctx);
	if (r == 0)
		vfu_srv_mig_reset(ctx);
	return r;
}

/*
 * The spec's rule for a client that leaves: its memory and eventfds are
 * released, the device state is otherwise kept (the device may ask for a
 * reset instead).
 */
void vfm_vfu_detach(struct vfm_vfu_ctx *ctx)
{
	bool was_negotiated = ctx->negotiated;

	if (ctx->conn_fd < 0)
		return;
	epoll_ctl(ctx->epfd, EPOLL_CTL_DEL, ctx->conn_fd, NULL);
	close(ctx->conn_fd);
	ctx->conn_fd = -1;
	__atomic_store_n(&ctx->attached, false, __ATOMIC_RELEASE);
	ctx->negotiated = false;
	ctx->drop = false;
	queue_clear(ctx);
	vfu_srv_dma_release(ctx);
	vfu_srv_irqs_release(ctx);
	vfu_srv_mig_shm_release(ctx);
	if (was_negotiated && ctx->dev_ops && ctx->dev_ops->detach && ctx->dev_ops->detach(ctx)) {
		int r = device_reset(ctx);

		if (r)
			vfm_warn(ctx->id, "reset after the client left failed: %s", vfm_strerror(r));
	}
	if (ctx->listen_fd >= 0)
		ep_ctl(ctx, EPOLL_CTL_ADD, ctx->listen_fd);
	vfm_info(ctx->id, "client gone");
}

/* ------------------------------------------------------------------------ */
/* Handlers kept here                                                        */

static int handle_version(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			  struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_version_info proposed, ours = { .major = VFU_VERSION_MAJOR,
						   .minor = VFU_VERSION_MINOR };
	struct vfu_version_info reply;
	void *payload;
	size_t len;
	int ret;

	if (ctx->negotiated)
		return vfm_error_set(err, -EINVAL, "VERSION again after negotiation");
	/* A client we cannot talk to is closed after the error reply (spec). */
	ctx->drop = true;
	ret = vfu_version_decode(m, &proposed, err);
	if (ret)
		return ret;
	vfu_caps_init(&ours.caps);
	ours.caps.present = VFU_CAP_MAX_MSG_FDS | VFU_CAP_MAX_DATA_XFER_SIZE |
			    VFU_CAP_MAX_DMA_MAPS | VFU_CAP_PGSIZES | VFU_CAP_WRITE_MULTIPLE |
			    VFU_CAP_MIGRATION | VFU_CAP_WHOLE_MESSAGES | VFU_CAP_MIG_SHM;
	ours.caps.max_msg_fds = ctx->max_fds;
	ours.caps.max_data_xfer_size = ctx->max_xfer;
	ours.caps.max_dma_maps = ctx->max_dma_maps;
	ours.caps.pgsizes = 4096;
	ours.caps.write_multiple = true;
	/* vfu_recv() reads a body whole (proto.c rx_read()): the extension holds. */
	ours.caps.whole_messages = true;
	/* Migration data through a window the client passes (server-mig.c). */
	ours.caps.mig_shm = !ctx->no_mig_shm;
	ours.caps.migration_pgsize = 4096;
	ret = vfu_version_make_reply(&proposed, &ours, &reply, err);
	if (ret)
		return ret;
	/*
	 * Our receive limits are stated even when the client did not propose
	 * them, as libvfio-user does: they describe us, not a feature the
	 * client must support, and a client that assumed the defaults would
	 * underuse fds or overrun a smaller max_data_xfer_size.
	 */
	reply.caps.present |= VFU_CAP_MAX_MSG_FDS | VFU_CAP_MAX_DATA_XFER_SIZE;
	ret = vfu_version_negotiate(&proposed, &reply, 0, false, &ctx->neg, err);
	if (ret)
		return ret;
	ret = vfu_version_encode(reply.major, reply.minor, &reply.caps, &payload, &len, err);
	if (ret)
		return ret;
	if (len > r->cap) {
		free(payload);
		return vfm_error_set(err, -EMSGSIZE, "VERSION reply of %zu bytes", len);
	}
	memcpy(r->buf, payload, len);
	r->len = len;
	free(payload);
	ctx->drop = false;
	ctx->negotiated = true;
	vfm_info(ctx->id, "client speaks %u.%u: max_xfer %" PRIu32 " (ours %" PRIu32 "), fds %" PRIu32
		 ", dma maps %" PRIu32 "%s%s%s", (unsigned)reply.major, (unsigned)reply.minor,
		 ctx->neg.peer_max_xfer, ctx->neg.local_max_xfer, ctx->neg.peer_max_fds,
		 ctx->neg.max_dma_maps, ctx->neg.write_multiple ? ", write_multiple" : "",
		 ctx->neg.whole_messages ? ", whole messages" : "",
		 ctx->neg.mig_shm ? ", migration data window" : "");
	if (ctx->dev_ops && ctx->dev_ops->attach)
		ctx->dev_ops->attach(ctx);
	return 0;
}

static int handle_get_info(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			   struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_device_info req, rep = {
		.argsz = sizeof(rep),
		.flags = VFU_DEVICE_F_RESET | VFU_DEVICE_F_PCI,
		.num_regions = VFM_VFU_NUM_REGIONS,
		.num_irqs = VFM_VFU_NUM_IRQS,
	};
	int ret;

	ret = vfu_take_request(m, &req, sizeof(req), sizeof(rep), UINT32_MAX, err);
	if (ret)
		return ret;
	memcpy(r->buf, &rep, sizeof(rep));
	r->len = sizeof(rep);
	return 0;
}

static int handle_reset(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			struct vfu_srv_reply *r, struct vfm_error *err)
{
	int ret = device_reset(ctx);

	if (ret)
		return vfm_error_set(err, ret, "device reset failed: %s", vfm_strerror(ret));
	vfm_info(ctx->id, "device reset");
	return 0;
}

static const vfu_srv_handler handlers[VFU_CMD_MAX + 1] = {
	[VFU_CMD_VERSION] = handle_version,
	[VFU_CMD_DMA_MAP] = vfu_srv_dma_map,
	[VFU_CMD_DMA_UNMAP] = vfu_srv_dma_unmap,
	[VFU_CMD_DEVICE_GET_INFO] = handle_get_info,
	[VFU_CMD_DEVICE_GET_REGION_INFO] = vfu_srv_get_region_info,
	[VFU_CMD_DEVICE_GET_REGION_IO_FDS] = vfu_srv_get_region_io_fds,
	[VFU_CMD_DEVICE_GET_IRQ_INFO] = vfu_srv_get_irq_info,
	[VFU_CMD_DEVICE_SET_IRQS] = vfu_srv_set_irqs,
	[VFU_CMD_REGION_READ] = vfu_srv_region_read,
	[VFU_CMD_REGION_WRITE] = vfu_srv_region_write,
	[VFU_CMD_DEVICE_RESET] = handle_reset,
	[VFU_CMD_REGION_WRITE_MULTI] = vfu_srv_region_write_multi,
	[VFU_CMD_DEVICE_FEATURE] = vfu_srv_device_feature,
	[VFU_CMD_MIG_DATA_READ] = vfu_srv_mig_data_read,
	[VFU_CMD_MIG_DATA_WRITE] = vfu_srv_mig_data_write,
};

/* ------------------------------------------------------------------------ */
/* Dispatch                                                                  */

static void dispatch(struct vfm_vfu_ctx *ctx, struct vfu_msg *m)
{
	struct vfu_srv_reply r = { .buf = ctx->rbuf, .cap = ctx->rbuf_size };
	struct vfm_error e = { 0 };
	uint16_t cmd = m->hdr.cmd;
	const char *name = vfu_cmd_name(cmd);
	struct vfu_hdr h;
	int ret;

	if (vfu_check_hdr(&m->hdr, &e)) {
		vfm_warn(ctx->id, "dropping the client: %s", e.msg);
		ctx->drop = true;
		return;
	}
	if (vfu_hdr_is_reply(&m->hdr)) {
		/* We have no command outstanding here: nothing to answer. */
		vfm_warn(ctx->id, "ignoring a stray reply %u (%s)", (unsigned)m->hdr.msg_id, name);
		return;
	}
	if (!ctx->negotiated && cmd != VFU_CMD_VERSION) {
		ret = vfm_error_set(&e, -EINVAL, "%s before VERSION", name);
		ctx->drop = true;
	} else if (cmd > VFU_CMD_MAX || !handlers[cmd]) {
		ret = vfm_error_set(&e, -ENOSYS, "unknown command %u", (unsigned)cmd);
	} else {
		ret = handlers[cmd](ctx, m, &r, &e);
	}
	if (ret)
		vfm_info(ctx->id, "refused %s (id %u): %s", name, (unsigned)m->hdr.msg_id,
			 e.msg[0] ? e.msg : vfm_strerror(ret));
	if (!vfu_hdr_wants_reply(&m->hdr))
		return;
	if (ret)
		vfu_hdr_error(&h, &m->hdr, ret);
	else
		vfu_hdr_reply(&h, &m->hdr);
	vfm_error_clear(&e);
	if (vfu_send_timeout(ctx->conn_fd, &h, ret ? NULL : r.buf, ret ? 0 : r.len,
			     ret ? NULL : r.fds, ret ? 0 : r.nfds, ctx->io_timeout_ms, &e)) {
		vfm_info(ctx->id, "reply to %s failed: %s", name, e.msg);
		ctx->drop = true;
		return;
	}
	/* The reply is on its way: read the next block ahead meanwhile. */
	if (cmd == VFU_CMD_MIG_DATA_READ && !ret)
		vfu_srv_mig_prefetch(ctx);
}

static void queue_push(struct vfm_vfu_ctx *ctx, struct vfu_msg *m)
{
	uint64_t one = 1;

	ctx->queue[(ctx->q_head + ctx->q_len) % VFU_SRV_QUEUE_MAX] = *m;
	ctx->q_len++;
	*m = (struct vfu_msg)VFU_MSG_INIT;
	if (write(ctx->wake_fd, &one, sizeof(one)) < 0) {
		/* Only fails when the counter would overflow: it is signalled. */
	}
}

static void queue_pop(struct vfm_vfu_ctx *ctx, struct vfu_msg *m)
{
	*m = ctx->queue[ctx->q_head];
	ctx->q_head = (ctx->q_head + 1) % VFU_SRV_QUEUE_MAX;
	if (--ctx->q_len == 0)
		queue_clear(ctx);
}

static size_t recv_limit(const struct vfm_vfu_ctx *ctx)
{
	return VFU_MSG_SIZE_FOR_XFER(ctx->max_xfer);
}

/* A vfu_recv() failure: the stream is out of step, so the client goes. */
static int recv_failed(struct vfm_vfu_ctx *ctx, struct vfu_msg *m, int r,
		       struct vfm_error *e)
{
	if (r == -ECONNRESET) {
		vfm_debug(ctx->id, "%s", e->msg);
	} else {
		vfm_warn(ctx->id, "dropping the client: %s", e->msg);
		/* The header did arrive: say why before hanging up. */
		if (r == -EMSGSIZE && vfu_hdr_wants_reply(&m->hdr))
			vfu_send_error(ctx->conn_fd, &m->hdr, E2BIG, NULL);
	}
	ctx->drop = true;
	return -ENOTCONN;
}

int vfm_vfu_run_once(struct vfm_vfu_ctx *ctx, struct vfm_error *err)
{
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfm_error e = { 0 };
	struct pollfd p;
	int r;

	if (!ctx->realized)
		return vfm_error_set(err, -EINVAL, "%s: run before realize", ctx->id);
	ctx->loop_thread = pthread_self();
	ctx->loop_thread_set = true;
	if (ctx->conn_fd < 0) {
		if (ctx->listen_fd < 0)
			return 0;
		r = accept_client(ctx, err);
		return r == -EAGAIN ? 0 : r < 0 ? r : 1;
	}
	if (ctx->q_len) {
		queue_pop(ctx, &m);
	} else {
		p = (struct pollfd){ .fd = ctx->conn_fd, .events = POLLIN };
		if (poll(&p, 1, 0) <= 0)
			return 0;
		r = vfu_recv(ctx->conn_fd, &m, recv_limit(ctx), ctx->io_timeout_ms, &e);
		if (r == -EAGAIN || r == -ETIMEDOUT)
			return 0;
		if (r)
			recv_failed(ctx, &m, r, &e);
	}
	if (!ctx->drop)
		dispatch(ctx, &m);
	vfu_msg_release(&m);
	if (ctx->drop) {
		vfm_vfu_detach(ctx);
		return -ENOTCONN;
	}
	return 1;
}

int vfm_vfu_run(struct vfm_vfu_ctx *ctx, int timeout_ms, struct vfm_error *err)
{
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;

	for (;;) {
		struct epoll_event ev[4];
		int wait = -1, r;

		r = vfm_vfu_run_once(ctx, err);
		if (r < 0)
			return r;
		if (deadline >= 0) {
			int64_t left = deadline - now_ms();

			if (left <= 0)
				return 0;
			wait = (int)left;
		}
		if (r > 0)
			continue;
		r = epoll_wait(ctx->epfd, ev, 4, wait);
		if (r < 0 && errno == EINTR)
			return -EINTR;
		if (r < 0)
			return vfm_error_set(err, -errno, "%s: epoll_wait: %s", ctx->id,
					     strerror(errno));
	}
}

/* ------------------------------------------------------------------------ */
/* Commands to the client                                                    */

/*
 * Sends cmd and waits for its reply. Commands the client pipelines meanwhile
 * are queued for run_once (the spec lets messages of the two directions
 * interleave). Loop thread only. On a broken connection the client is
 * dropped when the current message is done.
 */
int vfu_srv_call(struct vfm_vfu_ctx *ctx, uint16_t cmd, const void *payload, size_t len,
		 struct vfu_msg *reply, struct vfm_error *err)
{
	struct vfu_hdr h;
	int r;

	if (ctx->conn_fd < 0 || !ctx->negotiated || ctx->drop)
		return vfm_error_set(err, -ENOTCONN, "%s: no client for %s", ctx->id,
				     vfu_cmd_name(cmd));
	vfu_hdr_command(&h, ctx->next_msg_id++, cmd, 0);
	r = vfu_send_timeout(ctx->conn_fd, &h, payload, len, NULL, 0, ctx->io_timeout_ms, err);
	if (r) {
		ctx->drop = true;
		return r;
	}
	for (;;) {
		struct vfu_msg m = VFU_MSG_INIT;

		r = vfu_recv(ctx->conn_fd, &m, recv_limit(ctx), ctx->io_timeout_ms, err);
		if (r) {
			ctx->drop = true;
			return vfm_error_set(err, r, "waiting for the reply to %s",
					     vfu_cmd_name(cmd));
		}
		if (!vfu_hdr_is_reply(&m.hdr)) {
			if (ctx->q_len == VFU_SRV_QUEUE_MAX) {
				vfu_msg_release(&m);
				ctx->drop = true;
				return vfm_error_set(err, VFM_EPROTOCOL,
						     "client sent %u commands without answering %s",
						     VFU_SRV_QUEUE_MAX, vfu_cmd_name(cmd));
			}
			queue_push(ctx, &m);
			continue;
		}
		r = vfu_reply_status(&h, &m, err);
		if (r == VFM_EPROTOCOL) {
			vfu_msg_release(&m);
			ctx->drop = true;
			return r;
		}
		if (r) {
			vfu_msg_release(&m);
			return r;
		}
		*reply = m;
		return 0;
	}
}
