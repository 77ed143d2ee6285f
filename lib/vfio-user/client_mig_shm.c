/*
 * The vfiomig_mig_shm extension on the client: migration data through a
 * shared-memory window instead of MIG_DATA_READ/WRITE payloads (proto.h
 * struct vfu_mig_shm_data; the server side is server-mig-shm.c). When both
 * sides stated it in VERSION, the first data request of the connection
 * creates a memfd of max_data_xfer_size and passes it with DEVICE_FEATURE
 * SET VFM_VFU_FEATURE_MIG_SHM. A server that did not state it
 * (libvfio-user), or one that refuses the SET, gets the standard messages.
 *
 * What it saves (docs/performance.md, device-state hops): on the source,
 * the server's sendmsg() and our recv() of each block, and with
 * vfm_vfio_user_read_data_view() our copy into the engine's buffer (the
 * engine writes the channel from the window); on the destination, our
 * sendmsg() and the server's recv() (one copy into the window instead).
 *
 * The server's offsets and sizes are untrusted: a range outside the window
 * is refused with VFM_EPROTOCOL and never read.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "util/logging.h"
#include "vfio-user/client.h"
#include "vfiomig/vfu_server.h"

void vfu_cli_shm_cleanup(struct vfu_client *c)
{
	if (c->shm)
		munmap(c->shm, c->shm_size);
	c->shm = NULL;
	c->shm_size = 0;
}

/* Sets the window up once per connection; false: standard messages. Lock held. */
bool vfu_cli_shm_ready(struct vfu_client *c)
{
	struct vfu_device_feature f;
	struct vfu_mig_shm_set set;
	uint8_t req[sizeof(f) + sizeof(set)];
	struct iovec iov = { req, sizeof(req) };
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfm_error e = { 0 };
	/* Two blocks: the server reads the next one ahead into the other half. */
	uint64_t size = 2 * (((uint64_t)c->neg.max_xfer + 4095) & ~4095ull);
	void *p;
	int fd, r;

	if (c->shm)
		return true;
	if (!c->neg.mig_shm || c->shm_tried)
		return false;
	c->shm_tried = true;
	if (size > VFU_MIG_SHM_MAX)
		size = VFU_MIG_SHM_MAX;
	fd = memfd_create("vfiomig-mig-data", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)size)) {
		vfm_warn(c->id, "migration data window: memfd: %s: standard messages",
			 strerror(errno));
		if (fd >= 0)
			close(fd);
		return false;
	}
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		vfm_warn(c->id, "migration data window: mmap: %s: standard messages",
			 strerror(errno));
		close(fd);
		return false;
	}
	f = (struct vfu_device_feature){ .argsz = sizeof(req),
					 .flags = VFM_VFU_FEATURE_MIG_SHM | VFU_FEATURE_SET };
	set.size = size;
	memcpy(req, &f, sizeof(f));
	memcpy(req + sizeof(f), &set, sizeof(set));
	r = vfu_cli_request(c, VFU_CMD_DEVICE_FEATURE, &iov, 1, &fd, 1, &reply, &e);
	vfu_msg_release(&reply);
	close(fd);   /* the server has its own mapping now */
	if (r) {
		munmap(p, size);
		vfm_warn(c->id, "migration data window refused (%s): standard messages", e.msg);
		return false;
	}
	c->shm = p;
	c->shm_size = size;
	vfm_debug(c->id, "migration data window of %" PRIu64 " bytes", size);
	return true;
}

/*
 * A windowed MIG_DATA_READ reply: exactly {argsz, size, offset}, size at
 * most what was asked, the range inside the window. *data: the bytes.
 */
int vfu_cli_shm_read_reply(struct vfu_client *c, const struct vfu_msg *reply, uint32_t chunk,
			   const uint8_t **data, uint32_t *size, struct vfm_error *err)
{
	struct vfu_mig_shm_data rep;

	if (reply->len != sizeof(rep))
		return vfm_error_set(err, VFM_EPROTOCOL, "%s: vfio-user server at %s: MIG_DATA_READ "
				     "(window) reply of %zu bytes, expected %zu", c->id, c->name,
				     reply->len, sizeof(rep));
	memcpy(&rep, reply->payload, sizeof(rep));
	if (rep.argsz != sizeof(rep) || rep.size > chunk ||
	    !vfu_range_ok(rep.offset, rep.size, c->shm_size))
		return vfm_error_set(err, VFM_EPROTOCOL, "%s: vfio-user server at %s: MIG_DATA_READ "
				     "(window) reply names %" PRIu32 " bytes at offset %" PRIu64
				     " (argsz %" PRIu32 "), outside the %zu-byte window or above "
				     "the %" PRIu32 " asked", c->id, c->name, rep.size, rep.offset,
				     rep.argsz, c->shm_size, chunk);
	*data = c->shm + rep.offset;
	*size = rep.size;
	__atomic_add_fetch(&c->shm_bytes, rep.size, __ATOMIC_RELAXED);
	return 0;
}

/* A windowed MIG_DATA_WRITE of len <= c->shm_size bytes. Lock held. */
int vfu_cli_shm_write(struct vfu_client *c, const void *buf, uint32_t len, struct vfm_error *err)
{
	struct vfu_mig_shm_data req = { .argsz = sizeof(req), .size = len, .offset = 0 };
	struct iovec iov = { &req, sizeof(req) };
	struct vfu_msg reply = VFU_MSG_INIT;
	int r;

	memcpy(c->shm, buf, len);
	r = vfu_cli_request(c, VFU_CMD_MIG_DATA_WRITE, &iov, 1, NULL, 0, &reply, err);
	vfu_msg_release(&reply);
	if (!r)
		__atomic_add_fetch(&c->shm_bytes, len, __ATOMIC_RELAXED);
	return r;
}

uint64_t vfm_vfio_user_mig_shm_bytes(struct vfm_device *dev)
{
	struct vfu_client *c = dev && vfm_device_is_vfio_user(dev) ? cli_of(dev) : NULL;

	return c ? __atomic_load_n(&c->shm_bytes, __ATOMIC_RELAXED) : 0;
}
