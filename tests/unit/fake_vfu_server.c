/*
 * The fake vfio-user server of the client tests (see fake_vfu_server.h).
 * It checks what the spec (and libvfio-user) check, so a client that sends
 * too much, too big or malformed gets an error the test sees.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fake_vfu_server.h"
#include "vfio-user/proto.h"
#include "vfiomig/vfu_server.h"

struct fmap {
	uint64_t addr, size;
	uint32_t flags;
	void *ptr;        /* server's mmap of the client's fd, or NULL */
};

struct fake {
	struct fake_cfg cfg;
	int fd;
	uint16_t next_id;
	uint8_t *mem;                 /* FAKE_R_MEM */
	int mmap_fd;                  /* FAKE_R_MMAP backing */
	uint8_t *mmap_ptr;
	int many_fd;                  /* FAKE_R_MANY backing */
	uint8_t *many_ptr;
	uint8_t config[256];
	struct fake_stats st;
	struct fmap maps[64];
	unsigned nmaps;
	enum vfm_state state;
	uint64_t src_off, precopy_total;
	bool log_on;
	uint8_t *shm;                 /* vfiomig_mig_shm window, or NULL */
	uint64_t shm_size;
};

/* The test side fails like the harness does (harness.h holds main()). */
#define FAIL(...)                                                             \
	do {                                                                  \
		fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);               \
		fprintf(stderr, __VA_ARGS__);                                 \
		fprintf(stderr, "\n");                                        \
		exit(1);                                                      \
	} while (0)

/* ---- Shared helpers ---- */

uint8_t fake_pattern(uint64_t i, uint64_t seed)
{
	return (uint8_t)(((i * 2654435761u) >> 7) ^ (seed * 131) ^ (i >> 9));
}

void fake_fill(void *buf, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i++)
		((uint8_t *)buf)[i] = fake_pattern(i, seed);
}

uint64_t fake_fnv(const void *buf, size_t len, uint64_t h)
{
	for (size_t i = 0; i < len; i++) {
		h ^= ((const uint8_t *)buf)[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

uint8_t fake_stream_byte(uint64_t off)
{
	return (uint8_t)((off ^ (off >> 8) ^ (off >> 16)) * 31 + 1);
}

/* ---- Sending ---- */

static void die(const char *what)
{
	fprintf(stderr, "fake server: %s\n", what);
	_exit(3);
}

static void reply(struct fake *f, const struct vfu_msg *m, const void *p, size_t len,
		  const int *fds, size_t nfds)
{
	if (vfu_send_reply(f->fd, &m->hdr, p, len, fds, nfds, NULL))
		_exit(0);  /* the client went away */
}

static void reply_err(struct fake *f, const struct vfu_msg *m, int errnum)
{
	if (vfu_send_error(f->fd, &m->hdr, errnum, NULL))
		_exit(0);
}

/* ---- DMA from the server ---- */

static struct fmap *find_map(struct fake *f, uint64_t addr, uint64_t len)
{
	for (unsigned i = 0; i < f->nmaps; i++)
		if (addr >= f->maps[i].addr && vfu_range_ok(addr - f->maps[i].addr, len, f->maps[i].size))
			return &f->maps[i];
	return NULL;
}

static void handle(struct fake *f, struct vfu_msg *m);

/* A reply to one of our DMA commands. */
static void dma_reply(struct fake *f, const struct vfu_msg *m)
{
	if (m->hdr.flags & VFU_F_ERROR) {
		f->st.dma_reply_errors++;
		f->st.last_dma_errno = m->hdr.error;
		return;
	}
	f->st.dma_replies++;
	if (m->hdr.cmd == VFU_CMD_DMA_READ && m->len >= sizeof(struct vfu_dma_rw)) {
		struct vfu_dma_rw rw;

		memcpy(&rw, m->payload, sizeof(rw));
		if (m->len - sizeof(rw) != rw.count)
			die("DMA_READ reply with the wrong amount of data");
		f->st.checksum = fake_fnv((char *)m->payload + sizeof(rw), rw.count, FAKE_FNV_INIT);
	}
	if (m->hdr.cmd == VFU_CMD_DMA_WRITE && m->len < VFU_DMA_WRITE_REPLY_MIN)
		die("short DMA_WRITE reply");
}

/* Sends one DMA command; with wait, serves client commands until its reply. */
static void dma_cmd(struct fake *f, uint16_t cmd, uint64_t addr, uint64_t count,
		    const void *data, size_t data_len, bool wait)
{
	struct vfu_dma_rw rw = { addr, count };
	size_t len = sizeof(rw) + data_len;
	uint8_t *buf = malloc(len);
	struct vfu_hdr h;
	uint16_t id = f->next_id++;

	if (!buf)
		die("malloc");
	memcpy(buf, &rw, sizeof(rw));
	if (data_len)
		memcpy(buf + sizeof(rw), data, data_len);
	vfu_hdr_command(&h, id, cmd, 0);
	if (vfu_send(f->fd, &h, buf, len, NULL, 0, NULL))
		_exit(0);
	free(buf);
	while (wait) {
		struct vfu_msg m = VFU_MSG_INIT;

		if (vfu_recv(f->fd, &m, VFU_MAX_MSG_SIZE, -1, NULL))
			_exit(0);
		if (vfu_hdr_is_reply(&m.hdr)) {
			if (m.hdr.msg_id == id && m.hdr.cmd == cmd)
				wait = false;
			dma_reply(f, &m);
		} else {
			handle(f, &m);   /* the spec lets commands arrive meanwhile */
		}
		vfu_msg_release(&m);
	}
}

static void dma_write_pattern(struct fake *f, uint64_t addr, uint64_t len, uint64_t seed,
			      bool wait)
{
	uint8_t *data = malloc(len ? len : 1);

	if (!data)
		die("malloc");
	fake_fill(data, len, seed);
	dma_cmd(f, VFU_CMD_DMA_WRITE, addr, len, data, len, wait);
	free(data);
}

/* ---- The doorbell ---- */

/* Returns true when the doorbell write was answered (or must not be). */
static bool doorbell(struct fake *f, const struct vfu_msg *m, const struct fake_cmd *c)
{
	struct vfu_hdr h;
	struct fmap *mp;

	switch (c->op) {
	case FAKE_OP_DMA_WRITE:
		dma_write_pattern(f, c->addr, c->len, c->seed, true);
		return false;
	case FAKE_OP_DMA_READ:
		dma_cmd(f, VFU_CMD_DMA_READ, c->addr, c->len, NULL, 0, true);
		return false;
	case FAKE_OP_DMA_WRITE_RAW: {
		uint8_t *data = calloc(1, c->arg + 1u);

		dma_cmd(f, VFU_CMD_DMA_WRITE, c->addr, c->len, data, c->arg, true);
		free(data);
		return false;
	}
	case FAKE_OP_CHECKSUM_MAP:
	case FAKE_OP_POKE_MAP:
		mp = find_map(f, c->addr, c->len);
		if (!mp || !mp->ptr) {
			reply_err(f, m, EFAULT);
			return true;
		}
		if (c->op == FAKE_OP_POKE_MAP)
			fake_fill((uint8_t *)mp->ptr + (c->addr - mp->addr), c->len, c->seed);
		else
			f->st.checksum = fake_fnv((uint8_t *)mp->ptr + (c->addr - mp->addr), c->len,
						  FAKE_FNV_INIT);
		return false;
	case FAKE_OP_DIE:
		kill(getpid(), SIGKILL);
		for (;;)
			pause();
	case FAKE_OP_HANG:
		for (;;)
			pause();
	case FAKE_OP_BAD_ID:
	case FAKE_OP_BAD_CMD: {
		struct vfu_region_rw rw = { 0, FAKE_R_DOORBELL, sizeof(*c) };

		vfu_hdr_reply(&h, &m->hdr);
		if (c->op == FAKE_OP_BAD_ID)
			h.msg_id++;
		else
			h.cmd = VFU_CMD_REGION_READ;
		if (vfu_send(f->fd, &h, &rw, sizeof(rw), NULL, 0, NULL))
			_exit(0);
		return true;
	}
	case FAKE_OP_BAD_SIZE:
		vfu_hdr_reply(&h, &m->hdr);
		h.msg_size = 1u << 30;
		if (write(f->fd, &h, sizeof(h)) != (ssize_t)sizeof(h))
			_exit(0);
		return true;
	case FAKE_OP_ERRNO: {
		vfu_hdr_reply(&h, &m->hdr);
		h.flags |= VFU_F_ERROR;
		h.error = c->arg;
		if (vfu_send(f->fd, &h, NULL, 0, NULL, 0, NULL))
			_exit(0);
		return true;
	}
	case FAKE_OP_ADD_PRECOPY:
		f->precopy_total += c->arg;
		return false;
	case FAKE_OP_SLOW:
		usleep(c->arg * 1000u);
		return false;
	default:
		return false;
	}
}

/* ---- Regions ---- */

static void region_info(struct fake *f, const struct vfu_msg *m)
{
	uint8_t buf[512];
	struct vfu_region_info req, info = { 0 };
	struct vfu_cap_sparse_mmap sp = { .hdr = { VFU_REGION_CAP_SPARSE_MMAP, 1, 0 } };
	size_t len = sizeof(info);
	int fd = -1;

	if (vfu_check_payload(m, sizeof(req), NULL))
		return reply_err(f, m, EINVAL);
	memcpy(&req, m->payload, sizeof(req));
	if (req.index >= FAKE_NUM_REGIONS || req.index == FAKE_R_ROM)
		return reply_err(f, m, req.index == FAKE_R_ROM ? ENOENT : EINVAL);
	info.index = req.index;
	switch (req.index) {
	case FAKE_R_MEM:
		info.flags = VFU_REGION_F_READ | VFU_REGION_F_WRITE;
		info.size = FAKE_MEM_SIZE;
		break;
	case FAKE_R_MMAP:
	case FAKE_R_MANY: {
		struct vfu_sparse_area areas[FAKE_MANY_AREAS];
		unsigned n = req.index == FAKE_R_MMAP ? 1 : FAKE_MANY_AREAS;

		info.flags = VFU_REGION_F_READ | VFU_REGION_F_WRITE | VFU_REGION_F_MMAP |
			     VFU_REGION_F_CAPS;
		info.size = req.index == FAKE_R_MMAP ? FAKE_MMAP_SIZE : 40 * 4096;
		info.cap_offset = sizeof(info);
		if (req.index == FAKE_R_MMAP)
			areas[0] = (struct vfu_sparse_area){ 0x1000, 0x2000 };
		for (unsigned i = 0; req.index == FAKE_R_MANY && i < n; i++)
			areas[i] = (struct vfu_sparse_area){ (uint64_t)i * 2 * 4096, 4096 };
		sp.nr_areas = n;
		memcpy(buf + len, &sp, sizeof(sp));
		memcpy(buf + len + sizeof(sp), areas, n * sizeof(areas[0]));
		len += sizeof(sp) + n * sizeof(areas[0]);
		if (req.argsz < len) {
			/* Too small: the size needed, no capabilities, no fd. */
			info.argsz = (uint32_t)len;
			info.flags &= ~VFU_REGION_F_CAPS;
			info.cap_offset = 0;
			len = sizeof(info);
		} else {
			fd = req.index == FAKE_R_MMAP ? f->mmap_fd : f->many_fd;
		}
		break;
	}
	case FAKE_R_STATS:
		info.flags = VFU_REGION_F_READ;
		info.size = 4096;
		break;
	case FAKE_R_DOORBELL:
		info.flags = VFU_REGION_F_WRITE;
		info.size = sizeof(struct fake_cmd);
		break;
	case FAKE_R_CONFIG:
		info.flags = VFU_REGION_F_READ | VFU_REGION_F_WRITE;
		info.size = sizeof(f->config);
		break;
	default:
		break;
	}
	if (!info.argsz)
		info.argsz = (uint32_t)len;
	memcpy(buf, &info, sizeof(info));
	reply(f, m, buf, len, fd >= 0 ? &fd : NULL, fd >= 0);
}

static uint8_t *region_ptr(struct fake *f, uint32_t region, uint64_t *size)
{
	switch (region) {
	case FAKE_R_MEM: *size = FAKE_MEM_SIZE; return f->mem;
	case FAKE_R_MMAP: *size = FAKE_MMAP_SIZE; return f->mmap_ptr;
	case FAKE_R_MANY: *size = 40 * 4096; return f->many_ptr;
	case FAKE_R_STATS: *size = sizeof(f->st); return (uint8_t *)&f->st;
	case FAKE_R_CONFIG: *size = sizeof(f->config); return f->config;
	default: *size = 0; return NULL;
	}
}

static void region_rw(struct fake *f, struct vfu_msg *m, bool write)
{
	struct vfu_region_rw rw;
	uint64_t size;
	uint8_t *p;

	if (vfu_check_payload(m, sizeof(rw), NULL))
		return reply_err(f, m, EINVAL);
	memcpy(&rw, m->payload, sizeof(rw));
	if (rw.count > f->cfg.max_xfer)
		return reply_err(f, m, E2BIG);
	if (write ? m->len != sizeof(rw) + rw.count : m->len != sizeof(rw))
		return reply_err(f, m, EINVAL);
	if (write)
		f->st.region_writes++;
	else
		f->st.region_reads++;
	if (rw.count > f->st.max_region_count)
		f->st.max_region_count = rw.count;
	if (write && rw.region == FAKE_R_DOORBELL) {
		struct fake_cmd c;

		if (rw.offset || rw.count != sizeof(c))
			return reply_err(f, m, EINVAL);
		memcpy(&c, (char *)m->payload + sizeof(rw), sizeof(c));
		if (doorbell(f, m, &c))
			return;
		reply(f, m, &rw, sizeof(rw), NULL, 0);
		if (c.op == FAKE_OP_DMA_WRITE_ASYNC)
			dma_write_pattern(f, c.addr, c.len, c.seed, false);
		return;
	}
	p = region_ptr(f, rw.region, &size);
	if (!p || !vfu_range_ok(rw.offset, rw.count, size) || (write && rw.region == FAKE_R_STATS))
		return reply_err(f, m, EINVAL);
	if (write) {
		memcpy(p + rw.offset, (char *)m->payload + sizeof(rw), rw.count);
		reply(f, m, &rw, sizeof(rw), NULL, 0);
	} else {
		uint8_t *out = malloc(sizeof(rw) + rw.count);

		if (!out)
			die("malloc");
		memcpy(out, &rw, sizeof(rw));
		memcpy(out + sizeof(rw), p + rw.offset, rw.count);
		reply(f, m, out, sizeof(rw) + rw.count, NULL, 0);
		free(out);
	}
}

/* ---- DMA maps, IRQs ---- */

static void dma_map(struct fake *f, struct vfu_msg *m)
{
	struct vfu_dma_map r;
	struct fmap *mp;

	if (vfu_check_payload_exact(m, sizeof(r), NULL))
		return reply_err(f, m, EINVAL);
	memcpy(&r, m->payload, sizeof(r));
	if (r.argsz != sizeof(r) || m->nfds > 1 || f->nmaps == 64)
		return reply_err(f, m, EINVAL);
	for (unsigned i = 0; i < f->nmaps; i++)
		if (r.addr < f->maps[i].addr + f->maps[i].size && f->maps[i].addr < r.addr + r.size)
			return reply_err(f, m, EEXIST);
	mp = &f->maps[f->nmaps];
	*mp = (struct fmap){ r.addr, r.size, r.flags, NULL };
	if (m->nfds) {
		int prot = (r.flags & VFU_DMA_F_READ ? PROT_READ : 0) |
			   (r.flags & VFU_DMA_F_WRITE ? PROT_WRITE : 0);
		void *p = mmap(NULL, r.size, prot, MAP_SHARED, m->fds[0], (off_t)r.offset);

		if (p == MAP_FAILED)
			return reply_err(f, m, errno);
		mp->ptr = p;
		f->st.dma_maps_with_fd++;
	}
	f->nmaps++;
	f->st.dma_maps++;
	reply(f, m, NULL, 0, NULL, 0);
}

static void dma_unmap(struct fake *f, struct vfu_msg *m)
{
	struct vfu_dma_unmap r;

	if (vfu_check_payload_exact(m, sizeof(r), NULL))
		return reply_err(f, m, EINVAL);
	memcpy(&r, m->payload, sizeof(r));
	for (unsigned i = 0; i < f->nmaps; i++) {
		if (f->maps[i].addr != r.addr || f->maps[i].size != r.size)
			continue;
		if (f->maps[i].ptr)
			munmap(f->maps[i].ptr, f->maps[i].size);
		f->maps[i] = f->maps[--f->nmaps];
		f->st.dma_unmaps++;
		return reply(f, m, &r, sizeof(r), NULL, 0);
	}
	reply_err(f, m, EINVAL);
}

static void set_irqs(struct fake *f, struct vfu_msg *m)
{
	struct vfu_irq_set s;
	uint64_t one = 1;

	if (vfu_check_irq_set(m, f->cfg.max_fds, &s, NULL) || s.index >= FAKE_NUM_IRQS)
		return reply_err(f, m, EINVAL);
	f->st.irq_msgs++;
	f->st.irq_fds += m->nfds;
	/* Trigger each eventfd once: the test sees which arrived. */
	for (size_t i = 0; i < m->nfds; i++)
		if (write(m->fds[i], &one, sizeof(one)) != (ssize_t)sizeof(one))
			die("eventfd write");
	reply(f, m, NULL, 0, NULL, 0);
}

static void irq_info(struct fake *f, struct vfu_msg *m)
{
	struct vfu_irq_info r;

	if (vfu_check_payload_exact(m, sizeof(r), NULL))
		return reply_err(f, m, EINVAL);
	memcpy(&r, m->payload, sizeof(r));
	if (r.index >= FAKE_NUM_IRQS)
		return reply_err(f, m, EINVAL);
	r.argsz = sizeof(r);
	r.flags = VFU_IRQ_INFO_F_EVENTFD;
	r.count = r.index == VFU_PCI_MSIX_IRQ_INDEX ? 32 : 1;
	reply(f, m, &r, sizeof(r), NULL, 0);
}

/* ---- Migration ---- */

static void set_state(struct fake *f, struct vfu_msg *m, const struct vfu_feature_mig_state *s)
{
	enum vfm_state path[VFM_STATE_COUNT];
	size_t len;

	if (vfm_fsm_path(f->cfg.mig_flags, f->state, (enum vfm_state)s->device_state, path, &len))
		return reply_err(f, m, EINVAL);
	f->st.path_len = len;
	for (size_t i = 0; i < len; i++) {
		f->st.path[i] = path[i];
		if (f->cfg.fail_state && path[i] == (enum vfm_state)f->cfg.fail_state)
			return reply_err(f, m, EIO);   /* left in the hop before */
		if (vfm_arc_opens_session(f->state, path[i]) && vfm_state_is_saving(path[i]))
			f->src_off = 0;
		f->state = path[i];
	}
	f->st.state = f->state;
	reply(f, m, m->payload, m->len, NULL, 0);
}

static void feature(struct fake *f, struct vfu_msg *m)
{
	struct vfu_device_feature h;
	uint32_t feat;
	uint8_t *data;

	if (vfu_check_payload(m, sizeof(h), NULL))
		return reply_err(f, m, EINVAL);
	memcpy(&h, m->payload, sizeof(h));
	if (vfu_check_feature_flags(h.flags, NULL))
		return reply_err(f, m, EINVAL);
	feat = h.flags & VFU_FEATURE_MASK;
	data = (uint8_t *)m->payload + sizeof(h);
	if (feat == VFM_VFU_FEATURE_MIG_SHM && f->cfg.mig_shm) {
		struct vfu_mig_shm_set ss;
		void *p;

		if (!(h.flags & VFU_FEATURE_SET) || m->len != sizeof(h) + sizeof(ss) || m->nfds != 1)
			return reply_err(f, m, EINVAL);
		memcpy(&ss, data, sizeof(ss));
		p = mmap(NULL, ss.size, PROT_READ | PROT_WRITE, MAP_SHARED, m->fds[0], 0);
		if (p == MAP_FAILED)
			return reply_err(f, m, EINVAL);
		f->shm = p;
		f->shm_size = ss.size;
		f->st.shm_sets++;
		f->st.shm_size = ss.size;
		return reply(f, m, m->payload, m->len, NULL, 0);
	}
	if (!vfu_feature_name(feat)[0] || !strcmp(vfu_feature_name(feat), "UNKNOWN")) {
		f->st.unknown_features++;
		if (f->cfg.unknown_feature_errno < 0)
			return;   /* a server that never answers it */
		return reply_err(f, m, f->cfg.unknown_feature_errno ? f->cfg.unknown_feature_errno
								 : ENOTTY);
	}
	if ((feat <= VFU_FEATURE_MIG_DEVICE_STATE && f->cfg.no_migration) ||
	    (feat >= VFU_FEATURE_DMA_LOGGING_START && f->cfg.no_logging))
		return reply_err(f, m, ENOTTY);
	if (h.flags & VFU_FEATURE_PROBE)
		return reply(f, m, &h, sizeof(h), NULL, 0);

	switch (feat) {
	case VFU_FEATURE_MIGRATION: {
		uint8_t out[16];

		if (!(h.flags & VFU_FEATURE_GET) || h.argsz < sizeof(out))
			return reply_err(f, m, EINVAL);
		h.argsz = sizeof(out);
		memcpy(out, &h, sizeof(h));
		memcpy(out + sizeof(h), &f->cfg.mig_flags, 8);
		return reply(f, m, out, sizeof(out), NULL, 0);
	}
	case VFU_FEATURE_MIG_DEVICE_STATE: {
		struct vfu_feature_mig_state s;
		uint8_t out[16];

		if (h.flags & VFU_FEATURE_SET) {
			if (m->len != sizeof(h) + sizeof(s))
				return reply_err(f, m, EINVAL);
			memcpy(&s, data, sizeof(s));
			return set_state(f, m, &s);
		}
		if (h.argsz < sizeof(out))
			return reply_err(f, m, EINVAL);
		s = (struct vfu_feature_mig_state){ f->state, -1 };
		h.argsz = sizeof(out);
		memcpy(out, &h, sizeof(h));
		memcpy(out + sizeof(h), &s, sizeof(s));
		return reply(f, m, out, sizeof(out), NULL, 0);
	}
	case VFU_FEATURE_DMA_LOGGING_START: {
		struct vfu_dma_logging_control c;

		if (!(h.flags & VFU_FEATURE_SET) || m->len < sizeof(h) + sizeof(c))
			return reply_err(f, m, EINVAL);
		memcpy(&c, data, sizeof(c));
		if (m->len != sizeof(h) + sizeof(c) + c.num_ranges * 16ull)
			return reply_err(f, m, EINVAL);
		if (f->cfg.log_page_size)
			c.page_size = f->cfg.log_page_size;
		memcpy(data, &c, sizeof(c));
		f->log_on = true;
		f->st.log_started++;
		f->st.log_page_size = c.page_size;
		f->st.log_ranges = c.num_ranges;
		return reply(f, m, m->payload, m->len, NULL, 0);
	}
	case VFU_FEATURE_DMA_LOGGING_STOP:
		f->log_on = false;
		return reply(f, m, m->payload, m->len, NULL, 0);
	case VFU_FEATURE_DMA_LOGGING_REPORT: {
		struct vfu_dma_logging_report r;
		uint64_t bytes, pages;
		uint8_t *out;

		if (!(h.flags & VFU_FEATURE_GET) || m->len != sizeof(h) + sizeof(r) || !f->log_on)
			return reply_err(f, m, EINVAL);
		memcpy(&r, data, sizeof(r));
		if (vfu_bitmap_size(r.length, r.page_size, &bytes, NULL) || bytes > f->cfg.max_xfer)
			return reply_err(f, m, E2BIG);
		if (h.argsz < sizeof(h) + sizeof(r) + bytes)
			return reply_err(f, m, EINVAL);
		out = calloc(1, sizeof(h) + sizeof(r) + bytes);
		if (!out)
			die("calloc");
		pages = (r.length + r.page_size - 1) / r.page_size;
		/* Dirty: every page whose global index is a multiple of 3. */
		for (uint64_t i = 0; i < pages; i++)
			if (((r.iova / r.page_size) + i) % 3 == 0)
				out[sizeof(h) + sizeof(r) + i / 8] |= (uint8_t)(1u << (i % 8));
		h.argsz = (uint32_t)(sizeof(h) + sizeof(r) + bytes);
		memcpy(out, &h, sizeof(h));
		memcpy(out + sizeof(h), &r, sizeof(r));
		f->st.log_reports++;
		if (bytes > f->st.max_report_bytes)
			f->st.max_report_bytes = bytes;
		reply(f, m, out, sizeof(h) + sizeof(r) + bytes, NULL, 0);
		free(out);
		return;
	}
	default:
		return reply_err(f, m, ENOTTY);
	}
}

static void mig_read(struct fake *f, struct vfu_msg *m)
{
	struct vfu_mig_data req;
	uint64_t avail, end, n;
	uint32_t asked;
	uint8_t *out;

	if (vfu_check_payload_exact(m, sizeof(req), NULL) || !vfm_state_is_saving(f->state))
		return reply_err(f, m, EINVAL);
	memcpy(&req, m->payload, sizeof(req));
	/* libvfio-user's checks. */
	if (req.size > f->cfg.max_xfer || (f->shm ? req.argsz < sizeof(struct vfu_mig_shm_data) ||
						   req.size > f->shm_size
						 : req.argsz < sizeof(req) + req.size))
		return reply_err(f, m, EINVAL);
	asked = req.size;
	f->st.mig_reads++;
	if (req.size > f->st.max_mig_read)
		f->st.max_mig_read = req.size;
	end = f->precopy_total + (f->state == VFM_STATE_STOP_COPY ? f->cfg.stopcopy_bytes : 0);
	avail = end > f->src_off ? end - f->src_off : 0;
	n = avail < req.size ? avail : req.size;
	if (f->cfg.read_cap && n > f->cfg.read_cap)
		n = f->cfg.read_cap;   /* a lax server: short without being at the end */
	if (f->shm) {
		struct vfu_mig_shm_data w = { sizeof(w), (uint32_t)n + f->cfg.shm_extra,
					      f->cfg.shm_read_offset };

		for (uint64_t i = 0; i < n && f->cfg.shm_read_offset + i < f->shm_size; i++)
			f->shm[f->cfg.shm_read_offset + i] = fake_stream_byte(f->src_off + i);
		f->src_off += n;
		f->st.shm_reads++;
		return reply(f, m, &w, sizeof(w), NULL, 0);
	}
	/* Like libvfio-user: the reply is as long as asked; size says what is data. */
	out = calloc(1, sizeof(req) + req.size);
	if (!out)
		die("calloc");
	for (uint64_t i = 0; i < n; i++)
		out[sizeof(req) + i] = fake_stream_byte(f->src_off + i);
	f->src_off += n;
	req.argsz = (uint32_t)(sizeof(req) + n);
	req.size = (uint32_t)n;
	memcpy(out, &req, sizeof(req));
	reply(f, m, out, sizeof(req) + asked, NULL, 0);
	free(out);
}

static void mig_write(struct fake *f, struct vfu_msg *m)
{
	struct vfu_mig_data req;

	if (vfu_check_payload(m, sizeof(req), NULL) || f->state != VFM_STATE_RESUMING)
		return reply_err(f, m, EINVAL);
	if (f->shm) {
		struct vfu_mig_shm_data w;

		if (m->len != sizeof(w))
			return reply_err(f, m, EINVAL);
		memcpy(&w, m->payload, sizeof(w));
		if (w.argsz != sizeof(w) || w.offset > f->shm_size || w.size > f->shm_size - w.offset)
			return reply_err(f, m, EINVAL);
		f->st.mig_writes++;
		f->st.shm_writes++;
		if (w.size > f->st.max_mig_write)
			f->st.max_mig_write = w.size;
		f->st.resume_checksum = fake_fnv(f->shm + w.offset, w.size, f->st.resume_checksum);
		f->st.resume_bytes += w.size;
		return reply(f, m, NULL, 0, NULL, 0);
	}
	memcpy(&req, m->payload, sizeof(req));
	if (req.size > f->cfg.max_xfer || req.argsz < sizeof(req) + req.size ||
	    m->len != sizeof(req) + req.size)
		return reply_err(f, m, EINVAL);
	f->st.mig_writes++;
	if (req.size > f->st.max_mig_write)
		f->st.max_mig_write = req.size;
	f->st.resume_checksum = fake_fnv((char *)m->payload + sizeof(req), req.size,
					 f->st.resume_checksum);
	f->st.resume_bytes += req.size;
	reply(f, m, NULL, 0, NULL, 0);
}

/* ---- VERSION and dispatch ---- */

static void version(struct fake *f, struct vfu_msg *m)
{
	struct vfu_version_info p;
	struct vfu_version v;
	char json[512];
	uint8_t out[600];
	size_t jlen;

	if (vfu_version_decode(m, &p, NULL))
		die("client sent a bad VERSION");
	f->st.version_major = p.major;
	f->st.version_minor = p.minor;
	f->st.version_max_xfer = p.caps.max_data_xfer_size;
	f->st.version_max_fds = p.caps.max_msg_fds;
	f->st.version_migration_pgsize = p.caps.migration_pgsize;
	if (f->cfg.version_silent)
		return;
	if (f->cfg.version_error)
		return reply_err(f, m, EPROTONOSUPPORT);
	v.major = f->cfg.set_version ? (uint16_t)f->cfg.reply_major : p.major;
	v.minor = f->cfg.set_version ? (uint16_t)f->cfg.reply_minor : p.minor;
	if (f->cfg.version_json)
		snprintf(json, sizeof(json), "%s", f->cfg.version_json);
	else
		snprintf(json, sizeof(json),
			 "{\"capabilities\":{\"max_msg_fds\":%u,\"max_data_xfer_size\":%u,"
			 "\"migration\":{\"pgsize\":4096,\"future\":true},\"no_such_cap\":[1,2]},"
			 "\"vendor\":{\"x\":\"y\"}}", f->cfg.max_fds, f->cfg.max_xfer);
	jlen = strlen(json) + 1;
	memcpy(out, &v, sizeof(v));
	memcpy(out + sizeof(v), json, jlen);
	reply(f, m, out, sizeof(v) + jlen, NULL, 0);
}

static void handle(struct fake *f, struct vfu_msg *m)
{
	switch (m->hdr.cmd) {
	case VFU_CMD_VERSION: return version(f, m);
	case VFU_CMD_DEVICE_GET_INFO: {
		struct vfu_device_info r = { sizeof(r), VFU_DEVICE_F_RESET | VFU_DEVICE_F_PCI,
					     FAKE_NUM_REGIONS, FAKE_NUM_IRQS };

		return reply(f, m, &r, sizeof(r), NULL, 0);
	}
	case VFU_CMD_DEVICE_GET_REGION_INFO: return region_info(f, m);
	case VFU_CMD_DEVICE_GET_IRQ_INFO: return irq_info(f, m);
	case VFU_CMD_DEVICE_SET_IRQS: return set_irqs(f, m);
	case VFU_CMD_REGION_READ: return region_rw(f, m, false);
	case VFU_CMD_REGION_WRITE: return region_rw(f, m, true);
	case VFU_CMD_DMA_MAP: return dma_map(f, m);
	case VFU_CMD_DMA_UNMAP: return dma_unmap(f, m);
	case VFU_CMD_DEVICE_RESET:
		f->state = VFM_STATE_RUNNING;
		f->st.resets++;
		return reply(f, m, NULL, 0, NULL, 0);
	case VFU_CMD_DEVICE_FEATURE: return feature(f, m);
	case VFU_CMD_MIG_DATA_READ: return mig_read(f, m);
	case VFU_CMD_MIG_DATA_WRITE: return mig_write(f, m);
	default: return reply_err(f, m, ENOSYS);
	}
}

static int backing(const char *name, size_t size, uint8_t **ptr)
{
	int fd = memfd_create(name, MFD_CLOEXEC);

	if (fd < 0 || ftruncate(fd, (off_t)size))
		die("memfd");
	*ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (*ptr == MAP_FAILED)
		die("mmap");
	return fd;
}

static void __attribute__((noreturn)) server_main(int fd, const struct fake_cfg *cfg)
{
	struct fake *f = calloc(1, sizeof(*f));

	if (!f)
		die("calloc");
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	alarm(60);   /* a backstop: tests kill us long before */
	f->cfg = *cfg;
	if (!f->cfg.max_xfer)
		f->cfg.max_xfer = 1u << 20;
	if (!f->cfg.max_fds)
		f->cfg.max_fds = 8;
	if (!f->cfg.mig_flags)
		f->cfg.mig_flags = VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY;
	f->fd = fd;
	f->next_id = 0x8000;
	f->state = VFM_STATE_RUNNING;
	f->precopy_total = cfg->precopy_bytes;
	f->st.state = f->state;
	f->st.resume_checksum = FAKE_FNV_INIT;
	f->mem = calloc(1, FAKE_MEM_SIZE);
	if (!f->mem)
		die("calloc");
	f->mmap_fd = backing("fake-mmap", FAKE_MMAP_SIZE, &f->mmap_ptr);
	f->many_fd = backing("fake-many", 40 * 4096, &f->many_ptr);
	for (;;) {
		struct vfu_msg m = VFU_MSG_INIT;

		if (vfu_recv(f->fd, &m, VFU_MSG_SIZE_FOR_XFER(f->cfg.max_xfer), -1, NULL))
			_exit(0);   /* the client left (or broke the framing) */
		if (vfu_hdr_is_reply(&m.hdr))
			dma_reply(f, &m);
		else
			handle(f, &m);
		vfu_msg_release(&m);
	}
}

void fake_start(struct fake_srv *s, const struct fake_cfg *cfg)
{
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		FAIL("socketpair: %s", strerror(errno));
	fflush(NULL);
	s->pid = fork();
	if (s->pid < 0)
		FAIL("fork: %s", strerror(errno));
	if (s->pid == 0) {
		close(sv[0]);
		server_main(sv[1], cfg);
	}
	close(sv[1]);
	s->fd = sv[0];
}

void fake_start_path(struct fake_srv *s, const struct fake_cfg *cfg, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (lfd < 0 || strlen(path) >= sizeof(sa.sun_path))
		FAIL("socket for %s", path);
	strcpy(sa.sun_path, path);
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 1))
		FAIL("bind/listen %s: %s", path, strerror(errno));
	fflush(NULL);
	s->pid = fork();
	if (s->pid < 0)
		FAIL("fork: %s", strerror(errno));
	if (s->pid == 0) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);

		if (fd < 0)
			die("accept");
		close(lfd);
		server_main(fd, cfg);
	}
	close(lfd);
	s->fd = -1;
}

void fake_stop(struct fake_srv *s)
{
	if (s->pid > 0) {
		kill(s->pid, SIGKILL);
		while (waitpid(s->pid, NULL, 0) < 0 && errno == EINTR)
			;
	}
	s->pid = -1;
}

struct vfm_device *fake_open(struct fake_srv *s, const struct vfm_vfio_user_opts *opts)
{
	struct vfm_error err = { 0 };
	struct vfm_device *dev = NULL;
	int r = vfm_vfio_user_open_fd(s->fd, "fake", opts, &dev, &err);

	s->fd = -1;
	if (r)
		FAIL("open: %d %s", r, err.msg);
	return dev;
}

int fake_cmd(struct vfm_device *dev, uint32_t op, uint32_t arg, uint64_t addr, uint64_t len,
	     uint64_t seed, struct vfm_error *err)
{
	struct fake_cmd c = { op, arg, addr, len, seed };

	return vfm_device_region_write(dev, FAKE_R_DOORBELL, 0, &c, sizeof(c), err);
}

void fake_stats(struct vfm_device *dev, struct fake_stats *st)
{
	struct vfm_error err = { 0 };

	if (vfm_device_region_read(dev, FAKE_R_STATS, 0, st, sizeof(*st), &err))
		FAIL("reading stats: %s", err.msg);
}
