/*
 * The vfio-user client backend: connecting, VERSION negotiation, device
 * info, and the device-layer ops tables. The rest lives in client_*.c.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "util/logging.h"
#include "vfio-user/client.h"

/* How often a connect() to a full listen backlog is retried. */
#define CONNECT_RETRY_NS (10 * 1000 * 1000)

static void cli_close(struct vfm_device *dev);

static const struct vfm_device_ops ops_with_logging = {
	.backend = "vfio-user",
	.get_info = vfu_cli_get_info,
	.region_info = vfu_cli_region_info,
	.region_read = vfu_cli_region_read,
	.region_write = vfu_cli_region_write,
	.region_areas = vfu_cli_region_areas,
	.dma_map = vfu_cli_dma_map,
	.dma_unmap = vfu_cli_dma_unmap,
	.reset = vfu_cli_reset,
	.close = cli_close,
	.mig = &vfu_cli_mig_ops,
	.log = &vfu_cli_log_ops,
};

/* Servers that do not answer a DMA_LOGGING_START probe. */
static const struct vfm_device_ops ops_without_logging = {
	.backend = "vfio-user",
	.get_info = vfu_cli_get_info,
	.region_info = vfu_cli_region_info,
	.region_read = vfu_cli_region_read,
	.region_write = vfu_cli_region_write,
	.region_areas = vfu_cli_region_areas,
	.dma_map = vfu_cli_dma_map,
	.dma_unmap = vfu_cli_dma_unmap,
	.reset = vfu_cli_reset,
	.close = cli_close,
	.mig = &vfu_cli_mig_ops,
	.log = NULL,
};

bool vfm_device_is_vfio_user(const struct vfm_device *dev)
{
	const struct vfm_device_ops *ops = dev ? vfm_device_ops(dev) : NULL;

	return ops == &ops_with_logging || ops == &ops_without_logging;
}

static void cli_destroy(struct vfu_client *c)
{
	vfu_cli_io_cleanup(c);
	vfu_cli_dma_cleanup(c);
	vfu_cli_region_cleanup(c);
	vfu_cli_shm_cleanup(c);
	if (c->fd >= 0)
		close(c->fd);
	pthread_mutex_destroy(&c->map_lock);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

static void cli_close(struct vfm_device *dev)
{
	struct vfu_client *c = cli_of(dev);

	vfm_debug(c->id, "closing the connection to %s", c->name);
	cli_destroy(c);
}

/* ---- Connecting ---- */

static int connect_path(const char *path, int timeout_ms, int *out, struct vfm_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timespec start, now, pause = { 0, CONNECT_RETRY_NS };
	int fd, r;

	if (!path || !*path || strlen(path) >= sizeof(sa.sun_path))
		return vfm_error_set(err, -EINVAL, "vfio-user socket path '%s' is empty or too long",
				     path ? path : "");
	memcpy(sa.sun_path, path, strlen(path) + 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		int64_t waited;

		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			break;
		r = -errno;
		if (r == -EINTR)
			continue;
		/* A full backlog: the server is alive but busy. Wait a little. */
		clock_gettime(CLOCK_MONOTONIC, &now);
		waited = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
		if (r == -EAGAIN && waited < timeout_ms) {
			nanosleep(&pause, NULL);
			continue;
		}
		close(fd);
		return vfm_error_set(err, r, "cannot connect to vfio-user server at %s: %s", path,
				     strerror(-r));
	}
	*out = fd;
	return 0;
}

/* ---- Handshake ---- */

static int negotiate(struct vfu_client *c, struct vfm_error *err)
{
	struct vfu_version_info prop = { .major = VFU_VERSION_MAJOR, .minor = VFU_VERSION_MINOR };
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfu_version_info got;
	struct vfm_error e = { 0 };
	void *payload;
	size_t len;
	int r;

	vfu_caps_init(&prop.caps);
	/*
	 * What we accept, plus the v1 "migration" key real servers expect.
	 * We never propose twin_socket or write_multiple: server commands come
	 * on the main socket and we send single writes. vfiomig_whole_messages:
	 * we read messages whole, and a server that says the same gets requests
	 * up to max_xfer (client.h cli_send_max()); others ignore the key.
	 */
	prop.caps.present = VFU_CAP_MAX_MSG_FDS | VFU_CAP_MAX_DATA_XFER_SIZE | VFU_CAP_PGSIZES |
			    VFU_CAP_MIGRATION | VFU_CAP_WHOLE_MESSAGES | VFU_CAP_MIG_SHM;
	prop.caps.whole_messages = true;
	/* Migration data through a window we pass (client_mig_shm.c). */
	prop.caps.mig_shm = true;
	prop.caps.max_msg_fds = VFU_MAX_FDS;
	prop.caps.max_data_xfer_size = c->local_max_xfer;
	prop.caps.pgsizes = VFM_VFIO_USER_DIRTY_PAGE;
	prop.caps.migration_pgsize = VFM_VFIO_USER_DIRTY_PAGE;
	r = vfu_version_encode(prop.major, prop.minor, &prop.caps, &payload, &len, err);
	if (r)
		return r;
	r = vfu_cli_simple(c, VFU_CMD_VERSION, payload, len, &reply, err);
	free(payload);
	if (r)
		return vfm_error_set(err, r, "%s: VERSION %u.%u refused", c->id,
				     (unsigned)prop.major, (unsigned)prop.minor);
	r = vfu_version_decode(&reply, &got, &e);
	if (!r)
		r = vfu_version_negotiate(&prop, &got, reply.nfds, true, &c->neg, &e);
	vfu_msg_release(&reply);   /* any fd with it is unasked for: closed */
	if (r)
		return vfu_cli_fail(c, VFM_EPROTOCOL, err,
				    "vfio-user server at %s: unacceptable VERSION reply: %s", c->name,
				    e.msg);
	vfm_debug(c->id, "vfio-user %u.%u with %s: max_data_xfer_size %" PRIu32 " (ours %" PRIu32
		  "), max_msg_fds %" PRIu32 ", max_dma_maps %" PRIu32 "%s%s", (unsigned)c->neg.major,
		  (unsigned)c->neg.minor, c->name, c->neg.peer_max_xfer, c->neg.local_max_xfer,
		  c->neg.peer_max_fds, c->neg.max_dma_maps,
		  c->neg.whole_messages ? ", whole messages" : "",
		  c->neg.mig_shm ? ", migration data window" : "");
	return 0;
}

static int get_device_info(struct vfu_client *c, struct vfm_error *err)
{
	struct vfu_device_info req = { .argsz = sizeof(req) }, rep;
	struct vfu_msg reply = VFU_MSG_INIT;
	int r;

	r = vfu_cli_simple(c, VFU_CMD_DEVICE_GET_INFO, &req, sizeof(req), &reply, err);
	if (r)
		return vfm_error_set(err, r, "%s: DEVICE_GET_INFO", c->id);
	if (reply.len < sizeof(rep)) {
		r = vfm_error_set(err, VFM_EPROTOCOL, "%s: vfio-user server at %s: DEVICE_GET_INFO reply of %zu bytes",
				  c->id, c->name, reply.len);
		goto out;
	}
	memcpy(&rep, reply.payload, sizeof(rep));
	if (rep.num_regions > CLI_MAX_REGIONS || rep.num_irqs > CLI_MAX_IRQS) {
		r = vfm_error_set(err, VFM_EPROTOCOL, "%s: vfio-user server at %s announces %" PRIu32
				  " regions and %" PRIu32 " IRQ types (at most %u and %u)", c->id,
				  c->name, rep.num_regions, rep.num_irqs, CLI_MAX_REGIONS, CLI_MAX_IRQS);
		goto out;
	}
	c->info = (struct vfm_device_info){ rep.flags, rep.num_regions, rep.num_irqs };
	vfm_debug(c->id, "device flags %#" PRIx32 ", %" PRIu32 " regions, %" PRIu32 " IRQ types",
		  rep.flags, rep.num_regions, rep.num_irqs);
out:
	vfu_msg_release(&reply);
	return r;
}

static int check_opts(const struct vfm_vfio_user_opts *opts, struct vfm_error *err)
{
	if (!opts)
		return 0;
	if (opts->version != VFM_VFIO_USER_OPTS_V1)
		return vfm_error_set(err, -EINVAL, "vfio-user options version %" PRIu32 " (want %u)",
				     opts->version, VFM_VFIO_USER_OPTS_V1);
	if (opts->max_data_xfer_size && (opts->max_data_xfer_size < VFU_MIN_DATA_XFER_SIZE ||
					 opts->max_data_xfer_size > VFU_MAX_DATA_XFER_SIZE))
		return vfm_error_set(err, -EINVAL, "vfio-user max_data_xfer_size %" PRIu32
				     " outside [%u, %u]", opts->max_data_xfer_size,
				     VFU_MIN_DATA_XFER_SIZE, VFU_MAX_DATA_XFER_SIZE);
	if (opts->timeout_ms > INT32_MAX / 2)
		return vfm_error_set(err, -EINVAL, "vfio-user timeout %" PRIu32 " ms is too long",
				     opts->timeout_ms);
	return 0;
}

int vfm_vfio_user_open_fd(int fd, const char *name, const struct vfm_vfio_user_opts *opts,
			  struct vfm_device **out, struct vfm_error *err)
{
	struct vfu_client *c;
	struct vfm_device *dev;
	int r;

	*out = NULL;
	r = check_opts(opts, err);
	if (r) {
		close(fd);
		return r;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return vfm_error_set(err, -ENOMEM, "no memory for a vfio-user client");
	}
	snprintf(c->id, sizeof(c->id), "%s", opts && opts->id && *opts->id ? opts->id : "vfio-user");
	snprintf(c->name, sizeof(c->name), "%s", name && *name ? name : "(socket)");
	c->fd = fd;
	c->timeout_ms = (int)(opts && opts->timeout_ms ? opts->timeout_ms
						     : VFM_VFIO_USER_DEFAULT_TIMEOUT_MS);
	c->local_max_xfer = opts && opts->max_data_xfer_size ? opts->max_data_xfer_size
							    : VFM_VFIO_USER_DEFAULT_MAX_XFER;
	c->max_msg_size = VFU_MSG_SIZE_FOR_XFER(c->local_max_xfer);
	c->dma_dirty = opts ? opts->dma_dirty : NULL;
	c->dma_dirty_opaque = opts ? opts->dma_dirty_opaque : NULL;
	c->state = VFM_STATE_RUNNING;
	pthread_mutex_init(&c->lock, NULL);
	pthread_mutex_init(&c->map_lock, NULL);

	/* Nobody else can see c yet; the lock is for form's sake. */
	pthread_mutex_lock(&c->lock);
	r = negotiate(c, err);
	if (!r)
		r = get_device_info(c, err);
	if (!r)
		r = vfu_cli_load_regions(c, err);
	if (!r)
		c->has_logging = vfu_cli_probe_logging(c);
	if (!r && c->dead)
		r = vfm_error_set(err, -ENOTCONN, "%s: %s", c->id, c->dead_msg);
	pthread_mutex_unlock(&c->lock);
	if (r)
		goto err_destroy;

	dev = vfm_device_new(c->id, c->has_logging ? &ops_with_logging : &ops_without_logging, c);
	if (!dev) {
		r = vfm_error_set(err, -ENOMEM, "no memory for a device");
		goto err_destroy;
	}
	vfm_info(c->id, "vfio-user device at %s: %" PRIu32 " regions, %" PRIu32 " IRQ types%s",
		 c->name, c->info.num_regions, c->info.num_irqs,
		 c->has_logging ? ", DMA logging" : "");
	*out = dev;
	return 0;

err_destroy:
	cli_destroy(c);
	return r;
}

int vfm_vfio_user_open(const char *socket_path, const struct vfm_vfio_user_opts *opts,
		       struct vfm_device **out, struct vfm_error *err)
{
	uint32_t timeout = opts && opts->timeout_ms ? opts->timeout_ms
						    : VFM_VFIO_USER_DEFAULT_TIMEOUT_MS;
	int fd = -1, r;

	*out = NULL;
	r = check_opts(opts, err);
	if (r)
		return r;
	r = connect_path(socket_path, (int)timeout, &fd, err);
	if (r)
		return r;
	return vfm_vfio_user_open_fd(fd, socket_path, opts, out, err);
}
