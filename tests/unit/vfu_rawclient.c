/* The tests' hand-built vfio-user client (see vfu_rawclient.h). */
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "vfu_rawclient.h"

#define RC_FAIL(...)                                                          \
	do {                                                                  \
		fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);               \
		fprintf(stderr, __VA_ARGS__);                                 \
		fprintf(stderr, "\n");                                        \
		exit(1);                                                      \
	} while (0)

void rc_init(struct rc *c, int fd)
{
	*c = (struct rc){ .fd = fd, .next_id = 1, .timeout_ms = 10000 };
}

void rc_close(struct rc *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
}

int rc_connect_path(const char *path, int timeout_ms)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timespec ts = { 0, 10 * 1000 * 1000 };

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	for (int waited = 0;; waited += 10) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

		if (fd < 0)
			RC_FAIL("socket: %s", strerror(errno));
		if (!connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
			return fd;
		close(fd);
		if (waited >= timeout_ms)
			return -errno;
		nanosleep(&ts, NULL);
	}
}

uint16_t rc_send(struct rc *c, uint16_t cmd, uint32_t flags, const void *payload, size_t len,
		 const int *fds, size_t nfds)
{
	struct vfm_error e = { 0 };
	struct vfu_hdr h;
	uint16_t id = c->next_id++;

	vfu_hdr_command(&h, id, cmd, flags);
	if (vfu_send_timeout(c->fd, &h, payload, len, fds, nfds, c->timeout_ms, &e))
		RC_FAIL("send %s: %s", vfu_cmd_name(cmd), e.msg);
	return id;
}

/* A DMA_READ or DMA_WRITE from the server, served from c->mem. */
static void serve_dma(struct rc *c, struct vfu_msg *m)
{
	struct vfu_dma_rw req;
	struct vfm_error e = { 0 };
	uint8_t *out;
	int err = 0;

	if (c->on_server_cmd)
		c->on_server_cmd(c, m);
	if (m->len < sizeof(req))
		RC_FAIL("server %s of %zu bytes", vfu_cmd_name(m->hdr.cmd), m->len);
	memcpy(&req, m->payload, sizeof(req));
	if (!c->mem || req.addr < c->mem_iova ||
	    !vfu_range_ok(req.addr - c->mem_iova, req.count, c->mem_size))
		err = EFAULT;
	else if (m->hdr.cmd == VFU_CMD_DMA_WRITE && m->len != sizeof(req) + req.count)
		err = EINVAL;
	c->dma_msgs++;
	if (err) {
		if (vfu_send_error(c->fd, &m->hdr, err, &e))
			RC_FAIL("%s", e.msg);
		return;
	}
	if (m->hdr.cmd == VFU_CMD_DMA_WRITE) {
		memcpy(c->mem + (req.addr - c->mem_iova), (uint8_t *)m->payload + sizeof(req),
		       req.count);
		if (vfu_send_reply(c->fd, &m->hdr, &req, sizeof(req), NULL, 0, &e))
			RC_FAIL("%s", e.msg);
		return;
	}
	out = malloc(sizeof(req) + req.count);
	if (!out)
		RC_FAIL("no memory");
	memcpy(out, &req, sizeof(req));
	memcpy(out + sizeof(req), c->mem + (req.addr - c->mem_iova), req.count);
	if (vfu_send_reply(c->fd, &m->hdr, out, sizeof(req) + req.count, NULL, 0, &e))
		RC_FAIL("%s", e.msg);
	free(out);
}

int rc_wait(struct rc *c, uint16_t id, uint16_t cmd, struct vfu_msg *reply)
{
	for (;;) {
		struct vfu_msg m = VFU_MSG_INIT;
		struct vfm_error e = { 0 };
		int r = vfu_recv(c->fd, &m, VFU_MAX_MSG_SIZE, c->timeout_ms, &e);

		if (r)
			RC_FAIL("waiting for the reply to %s: %s", vfu_cmd_name(cmd), e.msg);
		if (!vfu_hdr_is_reply(&m.hdr)) {
			if (m.hdr.cmd != VFU_CMD_DMA_READ && m.hdr.cmd != VFU_CMD_DMA_WRITE)
				RC_FAIL("server sent command %u", m.hdr.cmd);
			serve_dma(c, &m);
			vfu_msg_release(&m);
			continue;
		}
		if (m.hdr.msg_id != id || m.hdr.cmd != cmd)
			RC_FAIL("reply %u/%s while waiting for %u/%s", m.hdr.msg_id,
				vfu_cmd_name(m.hdr.cmd), id, vfu_cmd_name(cmd));
		if (m.hdr.flags & VFU_F_ERROR) {
			if (m.len)
				RC_FAIL("error reply to %s carries %zu payload bytes", vfu_cmd_name(cmd),
					m.len);
			r = -(int)m.hdr.error;
			vfu_msg_release(&m);
			return r ? r : -EIO;
		}
		if (reply)
			*reply = m;
		else
			vfu_msg_release(&m);
		return 0;
	}
}

int rc_call(struct rc *c, uint16_t cmd, const void *payload, size_t len, const int *fds,
	    size_t nfds, struct vfu_msg *reply)
{
	return rc_wait(c, rc_send(c, cmd, 0, payload, len, fds, nfds), cmd, reply);
}

bool rc_closed_within(struct rc *c, int timeout_ms)
{
	struct pollfd p = { .fd = c->fd, .events = POLLIN };
	char buf[4096];

	for (;;) {
		ssize_t n;

		if (poll(&p, 1, timeout_ms) <= 0)
			return false;
		n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno == ECONNRESET))
			return true;
		if (n < 0 && errno != EAGAIN)
			return false;
		/* Whatever came first (an error reply) is skipped. */
	}
}

int rc_version(struct rc *c, const char *json, struct vfu_version_info *out)
{
	size_t jlen = json ? strlen(json) + 1 : 0;
	uint8_t *buf = malloc(4 + jlen);
	struct vfu_version v = { .major = VFU_VERSION_MAJOR, .minor = VFU_VERSION_MINOR };
	struct vfu_msg m = VFU_MSG_INIT;
	int r;

	if (!buf)
		RC_FAIL("no memory");
	memcpy(buf, &v, 4);
	if (jlen)
		memcpy(buf + 4, json, jlen);
	r = rc_call(c, VFU_CMD_VERSION, buf, 4 + jlen, NULL, 0, &m);
	free(buf);
	if (!r && out && vfu_version_decode(&m, out, NULL))
		RC_FAIL("undecodable VERSION reply");
	vfu_msg_release(&m);
	return r;
}

void rc_hello(struct rc *c)
{
	if (rc_version(c, "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576,"
		       "\"pgsizes\":4096,\"write_multiple\":true,\"migration\":{\"pgsize\":4096}}}",
		       NULL))
		RC_FAIL("VERSION refused");
}

int rc_region_read(struct rc *c, uint32_t region, uint64_t off, void *buf, uint32_t count)
{
	struct vfu_region_rw req = { .offset = off, .region = region, .count = count };
	struct vfu_msg m = VFU_MSG_INIT;
	int r = rc_call(c, VFU_CMD_REGION_READ, &req, sizeof(req), NULL, 0, &m);

	if (r)
		return r;
	if (m.len != sizeof(req) + count)
		RC_FAIL("REGION_READ reply of %zu bytes for %u", m.len, count);
	memcpy(buf, (uint8_t *)m.payload + sizeof(req), count);
	vfu_msg_release(&m);
	return 0;
}

int rc_region_write(struct rc *c, uint32_t region, uint64_t off, const void *buf, uint32_t count)
{
	struct vfu_region_rw req = { .offset = off, .region = region, .count = count };
	uint8_t *p = malloc(sizeof(req) + count);
	struct vfu_msg m = VFU_MSG_INIT;
	int r;

	if (!p)
		RC_FAIL("no memory");
	memcpy(p, &req, sizeof(req));
	memcpy(p + sizeof(req), buf, count);
	r = rc_call(c, VFU_CMD_REGION_WRITE, p, sizeof(req) + count, NULL, 0, &m);
	free(p);
	if (!r && m.len != sizeof(req))
		RC_FAIL("REGION_WRITE reply of %zu bytes", m.len);
	vfu_msg_release(&m);
	return r;
}

uint64_t rc_read64(struct rc *c, uint32_t region, uint64_t off)
{
	uint64_t v;

	if (rc_region_read(c, region, off, &v, 8))
		RC_FAIL("read64 of region %u at %#llx failed", region, (unsigned long long)off);
	return v;
}

void rc_write64(struct rc *c, uint32_t region, uint64_t off, uint64_t v)
{
	if (rc_region_write(c, region, off, &v, 8))
		RC_FAIL("write64 of region %u at %#llx failed", region, (unsigned long long)off);
}

int rc_dma_map(struct rc *c, int fd, uint64_t offset, uint64_t iova, uint64_t size, uint32_t flags)
{
	struct vfu_dma_map req = { .argsz = sizeof(req), .flags = flags, .offset = offset,
				   .addr = iova, .size = size };

	return rc_call(c, VFU_CMD_DMA_MAP, &req, sizeof(req), fd >= 0 ? &fd : NULL, fd >= 0, NULL);
}

int rc_dma_unmap(struct rc *c, uint64_t iova, uint64_t size, uint32_t flags)
{
	struct vfu_dma_unmap req = { .argsz = sizeof(req), .flags = flags, .addr = iova,
				     .size = size };
	struct vfu_msg m = VFU_MSG_INIT;
	int r = rc_call(c, VFU_CMD_DMA_UNMAP, &req, sizeof(req), NULL, 0, &m);

	if (!r && (m.len != sizeof(req) || memcmp(m.payload, &req, sizeof(req))))
		RC_FAIL("DMA_UNMAP reply does not echo the request");
	vfu_msg_release(&m);
	return r;
}

int rc_feature(struct rc *c, uint32_t flags, uint32_t argsz, const void *data, size_t len,
	       void *out, size_t out_len)
{
	struct vfu_device_feature f = { .argsz = argsz, .flags = flags };
	uint8_t *p = malloc(sizeof(f) + len);
	struct vfu_msg m = VFU_MSG_INIT;
	int r;

	if (!p)
		RC_FAIL("no memory");
	memcpy(p, &f, sizeof(f));
	if (len)
		memcpy(p + sizeof(f), data, len);
	r = rc_call(c, VFU_CMD_DEVICE_FEATURE, p, sizeof(f) + len, NULL, 0, &m);
	free(p);
	if (!r && out_len) {
		if (m.len < sizeof(f) + out_len)
			RC_FAIL("DEVICE_FEATURE reply of %zu bytes, want %zu", m.len, sizeof(f) + out_len);
		memcpy(out, (uint8_t *)m.payload + sizeof(f), out_len);
	}
	vfu_msg_release(&m);
	return r;
}

int rc_set_state(struct rc *c, uint32_t state)
{
	struct vfu_feature_mig_state s = { .device_state = state, .data_fd = -1 };
	struct vfu_feature_mig_state echo;
	int r = rc_feature(c, VFU_FEATURE_MIG_DEVICE_STATE | VFU_FEATURE_SET, 16, &s, sizeof(s),
			   &echo, sizeof(echo));

	if (!r && echo.device_state != state)
		RC_FAIL("SET state reply echoes %u, not %u", echo.device_state, state);
	return r;
}

int rc_get_state(struct rc *c, uint32_t *state)
{
	struct vfu_feature_mig_state s;
	int r = rc_feature(c, VFU_FEATURE_MIG_DEVICE_STATE | VFU_FEATURE_GET, 16, NULL, 0, &s,
			   sizeof(s));

	if (!r)
		*state = s.device_state;
	return r;
}

long rc_mig_read(struct rc *c, void *buf, uint32_t size)
{
	struct vfu_mig_data req = { .argsz = (uint32_t)sizeof(req) + size, .size = size }, rep;
	struct vfu_msg m = VFU_MSG_INIT;
	int r = rc_call(c, VFU_CMD_MIG_DATA_READ, &req, sizeof(req), NULL, 0, &m);

	if (r)
		return r;
	if (m.len < sizeof(rep))
		RC_FAIL("MIG_DATA_READ reply of %zu bytes", m.len);
	memcpy(&rep, m.payload, sizeof(rep));
	/* Padded to what was asked (libvfio-user's convention); size says how much is data. */
	if (rep.size > size || m.len != sizeof(rep) + size || rep.argsz != m.len)
		RC_FAIL("MIG_DATA_READ reply argsz %u size %u in %zu bytes", rep.argsz, rep.size, m.len);
	for (size_t i = sizeof(rep) + rep.size; i < m.len; i++)
		if (((const uint8_t *)m.payload)[i])
			RC_FAIL("MIG_DATA_READ padding byte %zu is not 0", i);
	memcpy(buf, (uint8_t *)m.payload + sizeof(rep), rep.size);
	vfu_msg_release(&m);
	return rep.size;
}

int rc_mig_write(struct rc *c, const void *buf, uint32_t size)
{
	struct vfu_mig_data req = { .argsz = (uint32_t)sizeof(req) + size, .size = size };
	uint8_t *p = malloc(sizeof(req) + size);
	int r;

	if (!p)
		RC_FAIL("no memory");
	memcpy(p, &req, sizeof(req));
	memcpy(p + sizeof(req), buf, size);
	r = rc_call(c, VFU_CMD_MIG_DATA_WRITE, p, sizeof(req) + size, NULL, 0, NULL);
	free(p);
	return r;
}

int rc_precopy_info(struct rc *c, uint64_t *initial, uint64_t *dirty)
{
	uint64_t v[2];
	int r = rc_feature(c, 0xf001u | VFU_FEATURE_GET, 24, NULL, 0, v, sizeof(v));

	if (!r) {
		*initial = v[0];
		*dirty = v[1];
	}
	return r;
}

int rc_stop_copy_size(struct rc *c, uint64_t *bytes)
{
	return rc_feature(c, 9u | VFU_FEATURE_GET, 16, NULL, 0, bytes, sizeof(*bytes));
}

int rc_log_start(struct rc *c, uint64_t page_size, const struct vfu_dma_logging_range *ranges,
		 uint32_t n, uint64_t *used_page_size)
{
	struct vfu_dma_logging_control ctl = { .page_size = page_size, .num_ranges = n };
	size_t len = sizeof(ctl) + n * sizeof(*ranges);
	uint8_t *p = malloc(len), *out = malloc(len);
	int r;

	if (!p || !out)
		RC_FAIL("no memory");
	memcpy(p, &ctl, sizeof(ctl));
	if (n)
		memcpy(p + sizeof(ctl), ranges, n * sizeof(*ranges));
	r = rc_feature(c, VFU_FEATURE_DMA_LOGGING_START | VFU_FEATURE_SET, (uint32_t)(8 + len), p,
		       len, out, len);
	if (!r) {
		if (memcmp(p + 8, out + 8, len - 8))
			RC_FAIL("DMA_LOGGING_START reply does not echo the ranges");
		memcpy(&ctl, out, sizeof(ctl));
		if (used_page_size)
			*used_page_size = ctl.page_size;
	}
	free(p);
	free(out);
	return r;
}

int rc_log_stop(struct rc *c)
{
	return rc_feature(c, VFU_FEATURE_DMA_LOGGING_STOP | VFU_FEATURE_SET, 8, NULL, 0, NULL, 0);
}

int rc_log_report(struct rc *c, uint64_t iova, uint64_t length, uint64_t page_size,
		  uint64_t *bits, size_t bits_bytes)
{
	struct vfu_dma_logging_report req = { .iova = iova, .length = length,
					      .page_size = page_size };
	size_t want = sizeof(req) + bits_bytes;
	uint8_t *out = malloc(want);
	int r;

	if (!out)
		RC_FAIL("no memory");
	r = rc_feature(c, VFU_FEATURE_DMA_LOGGING_REPORT | VFU_FEATURE_GET,
		       (uint32_t)(8 + want), &req, sizeof(req), out, want);
	if (!r) {
		if (memcmp(out, &req, sizeof(req)))
			RC_FAIL("DMA_LOGGING_REPORT reply does not repeat the request");
		memcpy(bits, out + sizeof(req), bits_bytes);
	}
	free(out);
	return r;
}

int test_memfd(const char *name, size_t size, void **map)
{
	int fd = memfd_create(name, MFD_CLOEXEC);

	if (fd < 0 || ftruncate(fd, (off_t)size))
		RC_FAIL("memfd: %s", strerror(errno));
	if (map) {
		*map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (*map == MAP_FAILED)
			RC_FAIL("mmap: %s", strerror(errno));
	}
	return fd;
}

int count_open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (!d)
		RC_FAIL("opendir /proc/self/fd");
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n - 1;
}

char *test_tmpdir(void)
{
	const char *base = getenv("TMPDIR");
	char *dir = malloc(4096);

	if (!dir)
		RC_FAIL("no memory");
	snprintf(dir, 4096, "%s/vfm-test-XXXXXX", base && *base ? base : "/tmp");
	if (!mkdtemp(dir))
		RC_FAIL("mkdtemp %s: %s", dir, strerror(errno));
	return dir;
}

void test_rmdir(char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	char path[4200];

	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		unlink(path);
	}
	if (d)
		closedir(d);
	rmdir(dir);
	free(dir);
}
