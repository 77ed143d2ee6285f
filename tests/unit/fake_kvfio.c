/*
 * The fake kernel VFIO uAPI behind struct vfm_vfio_sys (see fake_kvfio.h);
 * ioctls are in fake_kvfio_ioctl.c:
 * objects and fds, the syscall entry points, the device (regions, config,
 * FSM, data sessions) and the IOMMU side (iommufd, type1, dirty bitmaps).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "fake_kvfio_priv.h"

/* ---- Config ---- */

void fake_kvfio_cfg_default(struct fake_kvfio_cfg *c)
{
	memset(c, 0, sizeof(*c));
	c->mig_flags = VFM_MIG_ALL;
	c->state_size = 64 * 1024;
	c->seed = 1;
	c->vendor = 0x1af4;
	c->device = 0x1041;
	c->bdf = "0000:01:00.0";
	c->cdev = 0;
	c->group = 7;
	c->hw_dirty = true;
	c->type1_dirty = true;
	c->dma_logging = true;
}

int fake_kvfio_cfg_parse(const char *s, struct fake_kvfio_cfg *c)
{
	char buf[512], *save = NULL, *tok;

	if (strlen(s) >= sizeof(buf))
		return -EINVAL;
	strcpy(buf, s);
	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '='), *end;
		unsigned long long v;

		if (!eq)
			return -EINVAL;
		*eq = '\0';
		v = strtoull(eq + 1, &end, 0);
		if (*end == 'K')
			v <<= 10, end++;
		else if (*end == 'M')
			v <<= 20, end++;
		if (*end)
			return -EINVAL;
#define KEY(name, field) else if (!strcmp(tok, name)) c->field = v
		if (0) {
		}
		KEY("flags", mig_flags);
		KEY("state", state_size);
		KEY("seed", seed);
		KEY("vendor", vendor);
		KEY("device", device);
		KEY("logging", dma_logging);
		KEY("hw_dirty", hw_dirty);
		KEY("msi_hole", msi_hole);
		KEY("log_report_unsupported", log_report_unsupported);
		KEY("log_report_when_off", log_report_when_off);
		KEY("no_cdev", no_cdev);
		KEY("no_iommufd", no_iommufd);
		KEY("zero_end", zero_at_precopy_end);
		KEY("info_produces", info_produces_dirty);
		KEY("nonblocking", nonblocking);
		KEY("stall_ms", stall_ms);
		KEY("ignore_nonblock", ignore_nonblock);
		KEY("no_poll", no_poll);
		KEY("sparse_bar0", sparse_bar0);
		KEY("chunk", read_chunk);
		KEY("no_data_size", no_mig_data_size);
		else
			return -EINVAL;
#undef KEY
	}
	return 0;
}

/* ---- Objects ---- */

struct obj *fkv_obj_of(struct fake_kvfio *fk, int fd)
{
	for (unsigned i = 0; i < fk->nobjs; i++)
		if (fk->objs[i].fd == fd)
			return &fk->objs[i];
	return NULL;
}

int fkv_obj_new(struct fake_kvfio *fk, enum obj_kind kind)
{
	int fd;

	if (fk->nobjs == MAX_OBJS)
		return -EMFILE;
	fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (fd < 0)
		return -errno;
	fk->objs[fk->nobjs++] = (struct obj){ .fd = fd, .kind = kind, .session = fk->session };
	return fd;
}

/* ---- Device state and the save stream ---- */

static void state_fill(struct fake_kvfio *fk)
{
	uint64_t x = fk->cfg.seed * 0x9e3779b97f4a7c15ull + 1;

	for (uint64_t i = 0; i < fk->cfg.state_size; i += 8) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		memcpy(fk->mem + i, &x, 8);
	}
}

uint64_t fake_kvfio_state_hash(const struct fake_kvfio *fk)
{
	return XXH3_64bits(fk->mem, fk->cfg.state_size);
}

void fkv_end_session(struct fake_kvfio *fk)
{
	/* The fd stays the user's; it is simply dead from now on (ENODEV). */
	fk->session = 0;
	fk->saving = fk->loading = fk->ready = false;
	fk->stall_from_ms = 0;
	free(fk->dirty);
	free(fk->produced);
	free(fk->lbuf);
	fk->dirty = fk->produced = fk->lbuf = NULL;
	fk->llen = fk->lcap = fk->rec_len = fk->rec_off = 0;
}

static int new_session(struct fake_kvfio *fk, bool saving)
{
	static unsigned counter;
	int fd;

	fkv_end_session(fk);
	fk->session = ++counter;
	fd = fkv_obj_new(fk, O_DATA);
	if (fd < 0)
		return fd;
	fk->saving = saving;
	fk->loading = !saving;
	fk->hdr_sent = fk->end_sent = false;
	fk->next_page = 0;
	if (saving) {
		fk->dirty = calloc(fk->npages + 1, 1);
		fk->produced = calloc(fk->npages + 1, 1);
	}
	return fd;
}

static void make_rec(struct fake_kvfio *fk, uint32_t type, uint64_t arg, const void *p,
		     uint64_t len, bool initial)
{
	struct rec r = { REC_MAGIC, type, arg, len };

	memcpy(fk->recbuf, &r, sizeof(r));
	memcpy(fk->recbuf + sizeof(r), p, len);
	fk->rec_len = sizeof(r) + len;
	fk->rec_off = 0;
	fk->rec_initial = initial;
}

static uint64_t dirty_pending(const struct fake_kvfio *fk, const uint8_t *set)
{
	uint64_t n = 0;

	for (uint64_t i = 0; set && i < fk->npages; i++)
		n += set[i];
	return n;
}

/* Next record into recbuf; false when there is nothing now. */
static bool next_record(struct fake_kvfio *fk)
{
	bool stop_copy = fk->state == VFM_STATE_STOP_COPY;

	if (!fk->hdr_sent) {
		uint32_t id[2] = { fk->cfg.vendor | (uint32_t)fk->cfg.device << 16, 0 };

		fk->hdr_sent = true;
		make_rec(fk, REC_HDR, fk->cfg.state_size, id, 8, true);
		return true;
	}
	if (fk->next_page < fk->npages) {
		uint64_t p = fk->next_page++;

		make_rec(fk, REC_DATA, p, fk->mem + p * PG, PG, true);
		return true;
	}
	for (uint64_t p = 0; p < fk->npages; p++) {
		/* mlx5 flavour: dirty data exists only once PRECOPY_INFO produced it. */
		bool avail = fk->produced[p] ||
			     (fk->dirty[p] && (stop_copy || !fk->cfg.info_produces_dirty));

		if (avail) {
			fk->produced[p] = fk->dirty[p] = 0;
			make_rec(fk, REC_DATA, p, fk->mem + p * PG, PG, false);
			return true;
		}
	}
	if (stop_copy && !fk->end_sent) {
		uint64_t h = fake_kvfio_state_hash(fk);

		fk->end_sent = true;
		make_rec(fk, REC_END, 0, &h, 8, false);
		return true;
	}
	return false;
}

static uint64_t rec_size(void)
{
	return sizeof(struct rec) + PG;
}

void fkv_precopy_sizes(const struct fake_kvfio *fk, uint64_t *init, uint64_t *dirty)
{
	uint64_t left = fk->rec_len - fk->rec_off;

	*init = (fk->hdr_sent ? 0 : sizeof(struct rec) + 8) +
		(fk->npages - fk->next_page) * rec_size() + (fk->rec_initial ? left : 0);
	*dirty = dirty_pending(fk, fk->produced) * rec_size() + (fk->rec_initial ? 0 : left);
	if (!fk->cfg.info_produces_dirty)
		*dirty += dirty_pending(fk, fk->dirty) * rec_size();
}

void fake_kvfio_touch_state(struct fake_kvfio *fk, uint64_t off, uint64_t len)
{
	for (uint64_t i = off; i < off + len && i < fk->cfg.state_size; i++) {
		fk->mem[i] ^= 0x5a;
		/* A page already sent must go again; one not sent yet goes once. */
		if (fk->saving && i / PG < fk->next_page)
			fk->dirty[i / PG] = 1;
	}
}

/* RESUMING -> STOP: the driver validates what it was given. */
static int load_validate(struct fake_kvfio *fk)
{
	uint8_t *stage = malloc(fk->cfg.state_size);
	size_t off = 0;
	bool hdr = false, end = false;
	int r = -EINVAL;

	if (!stage)
		return -ENOMEM;
	memcpy(stage, fk->mem, fk->cfg.state_size);
	while (off < fk->llen) {
		struct rec h;

		if (end || fk->llen - off < sizeof(h))
			goto out;
		memcpy(&h, fk->lbuf + off, sizeof(h));
		off += sizeof(h);
		if (h.magic != REC_MAGIC || h.len > fk->llen - off)
			goto out;
		if (h.type == REC_HDR) {
			uint32_t id;

			memcpy(&id, fk->lbuf + off, 4);
			if (hdr || h.len != 8 || h.arg != fk->cfg.state_size ||
			    id != (fk->cfg.vendor | (uint32_t)fk->cfg.device << 16))
				goto out;
			hdr = true;
		} else if (h.type == REC_DATA) {
			if (!hdr || h.len != PG || h.arg >= fk->npages)
				goto out;
			memcpy(stage + h.arg * PG, fk->lbuf + off, PG);
		} else if (h.type == REC_END) {
			uint64_t want;

			memcpy(&want, fk->lbuf + off, 8);
			if (!hdr || h.len != 8 || want != XXH3_64bits(stage, fk->cfg.state_size))
				goto out;
			end = true;
		} else {
			goto out;
		}
		off += h.len;
	}
	if (end) {
		memcpy(fk->mem, stage, fk->cfg.state_size);
		r = 0;
	}
out:
	free(stage);
	return r;
}

/* ---- The FSM ---- */

static bool arc_opens(enum vfm_state from, enum vfm_state to)
{
	return vfm_arc_opens_session(from, to);
}

/* One single arc with its effects; the kernel driver's step function. */
static int step(struct fake_kvfio *fk, enum vfm_state to, int *fd_out)
{
	enum vfm_state from = fk->state;
	int r;

	if (fk->arcfail.on && fk->arcfail.from == from && fk->arcfail.to == to) {
		fk->arcfail.on = false;
		fk->state = fk->arcfail.lands;
		if (!vfm_state_has_session(fk->state))
			fkv_end_session(fk);
		return fk->arcfail.err;
	}
	if (from == VFM_STATE_RESUMING && to == VFM_STATE_STOP) {
		r = load_validate(fk);
		if (r)
			return r;   /* stays RESUMING, like the dma sample device */
	}
	fk->st.arcs++;
	fk->state = to;
	if (arc_opens(from, to)) {
		r = new_session(fk, to != VFM_STATE_RESUMING);
		if (r < 0)
			return r;
		*fd_out = r;
	} else if (!vfm_state_has_session(to)) {
		fkv_end_session(fk);
	}
	return 0;
}

int fkv_set_state(struct fake_kvfio *fk, struct vfio_device_feature_mig_state *s)
{
	uint64_t flags = fk->cfg.mig_flags;
	enum vfm_state target = (enum vfm_state)s->device_state;
	int fd = -1;

	fk->st.sets++;
	s->data_fd = -1;
	if (!vfm_state_supported(flags, target) || fk->state == VFM_STATE_ERROR)
		return -EINVAL;
	while (fk->state != target) {
		enum vfm_state next;
		int r;

		/* The kernel's walk loops forever here (fixed in 2026): count it. */
		if (fk->state == VFM_STATE_STOP_COPY &&
		    (target == VFM_STATE_PRE_COPY || target == VFM_STATE_PRE_COPY_P2P)) {
			fk->st.hang_requests++;
			return -EDEADLK;
		}
		if (vfm_fsm_next(flags, fk->state, target, &next))
			return -EINVAL;
		fd = -1;
		r = step(fk, next, &fd);
		if (r)
			return r;
	}
	s->data_fd = fd;
	return 0;
}

/* ---- Syscall entry points ---- */

static int f_open(void *o, const char *path, int flags)
{
	struct fake_kvfio *fk = o;
	char want[64];

	if (!strcmp(path, "/dev/iommu"))
		return fk->cfg.no_iommufd ? -ENOENT : fkv_obj_new(fk, O_IOMMUFD);
	if (!strcmp(path, "/dev/vfio/vfio"))
		return fkv_obj_new(fk, O_CONTAINER);
	snprintf(want, sizeof(want), "/dev/vfio/devices/vfio%d", fk->cfg.cdev);
	if (!strcmp(path, want))
		return fk->cfg.no_cdev ? -ENOENT : fkv_obj_new(fk, O_DEV);
	snprintf(want, sizeof(want), "/dev/vfio/%d", fk->cfg.group);
	if (!strcmp(path, want))
		return fkv_obj_new(fk, O_GROUP);
	return -ENOENT;
}

static int f_close(void *o, int fd)
{
	struct fake_kvfio *fk = o;
	struct obj *ob = fkv_obj_of(fk, fd);
	enum obj_kind kind;

	if (!ob)
		return -EBADF;
	kind = ob->kind;
	close(ob->fd);
	*ob = fk->objs[--fk->nobjs];
	if (kind == O_DEV) {
		/* The driver's close_device: migration back to RUNNING, trackers off. */
		fk->state = VFM_STATE_RUNNING;
		fkv_end_session(fk);
		fkv_log_free(fk);
		fk->attached = fk->attached_hwpt = false;
	} else if (kind == O_IOMMUFD || kind == O_CONTAINER) {
		fkv_maps_clear(fk);
		fk->ioas = fk->hwpt = 0;
		fk->hwpt_dirty = fk->group_set = fk->iommu_set = false;
	}
	return 0;
}

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Milliseconds the session's data fd stays without data or room (0: ready). */
static uint64_t stall_left(struct fake_kvfio *fk)
{
	uint64_t now = mono_ms();

	if (!fk->cfg.stall_ms)
		return 0;
	if (fk->cfg.stall_ms == UINT32_MAX)
		return UINT64_MAX;
	if (!fk->stall_from_ms)
		fk->stall_from_ms = now;
	return now - fk->stall_from_ms >= fk->cfg.stall_ms ? 0
	       : fk->cfg.stall_ms - (now - fk->stall_from_ms);
}

/* A data read or write finds the fd stalled: EAGAIN (O_NONBLOCK honoured), or
 * the caller sleeps in the "driver" until the stall ends. 0: go on. */
static int stall_io(struct fake_kvfio *fk, const struct obj *ob)
{
	uint64_t left = stall_left(fk);

	if (!left)
		return 0;
	if (ob->nonblock && !fk->cfg.ignore_nonblock) {
		fk->st.eagains++;
		return -EAGAIN;
	}
	if (left == UINT64_MAX)
		return -EDEADLK;   /* a test bug: a blocking read of a stuck driver hangs */
	poll(NULL, 0, (int)left);
	fk->stall_from_ms = 1;   /* long ago: over */
	return 0;
}

static ssize_t f_read(void *o, int fd, void *buf, size_t len)
{
	struct fake_kvfio *fk = o;
	struct obj *ob = fkv_obj_of(fk, fd);
	size_t chunk = fk->cfg.read_chunk ? fk->cfg.read_chunk : 64 * 1024, got = 0;
	uint64_t v;
	int r;

	if (!ob || ob->kind != O_DATA)
		return -EBADF;
	if (ob->session != fk->session || !fk->session)
		return -ENODEV;
	if (!fk->saving)
		return -EINVAL;
	fk->st.reads++;
	r = stall_io(fk, ob);
	if (r)
		return r;
	if (fk->cfg.nonblocking && !fk->ready) {
		/* A blocking fd (or a driver that ignores the flag) waits for it. */
		if (!ob->nonblock || fk->cfg.ignore_nonblock) {
			fk->ready = true;
		} else {
			fk->st.eagains++;
			return -EAGAIN;
		}
	}
	if (len > chunk)
		len = chunk;
	while (got < len) {
		size_t n;

		if (fk->rec_off == fk->rec_len && !next_record(fk))
			break;
		n = fk->rec_len - fk->rec_off < len - got ? fk->rec_len - fk->rec_off : len - got;
		memcpy((char *)buf + got, fk->recbuf + fk->rec_off, n);
		fk->rec_off += n;
		got += n;
	}
	if (fk->cfg.nonblocking) {
		fk->ready = false;
		if (read(ob->fd, &v, sizeof(v)) < 0)
			v = 0;   /* not signalled: nothing to drain */
	}
	if (got)
		return (ssize_t)got;
	if (fk->state == VFM_STATE_STOP_COPY)
		return 0;
	return fk->cfg.zero_at_precopy_end ? 0 : -ENOMSG;
}

static ssize_t f_write(void *o, int fd, const void *buf, size_t len)
{
	struct fake_kvfio *fk = o;
	struct obj *ob = fkv_obj_of(fk, fd);
	size_t chunk = fk->cfg.read_chunk ? fk->cfg.read_chunk : 64 * 1024;
	int r;

	if (!ob || ob->kind != O_DATA)
		return -EBADF;
	if (ob->session != fk->session || !fk->session)
		return -ENODEV;
	if (!fk->loading)
		return -EINVAL;
	fk->st.writes++;
	r = stall_io(fk, ob);
	if (r)
		return r;
	if (len > chunk)
		len = chunk;
	if (fk->llen + len > fk->lcap) {
		size_t cap = (fk->llen + len) * 2;
		uint8_t *p = realloc(fk->lbuf, cap);

		if (!p)
			return -ENOMEM;
		fk->lbuf = p;
		fk->lcap = cap;
	}
	memcpy(fk->lbuf + fk->llen, buf, len);
	fk->llen += len;
	return (ssize_t)len;
}

static ssize_t region_rw(struct fake_kvfio *fk, int fd, void *buf, size_t len, off_t off,
			 bool write)
{
	struct obj *ob = fkv_obj_of(fk, fd);
	uint64_t idx = (uint64_t)off >> REGION_SHIFT, at = (uint64_t)off & ((1ull << REGION_SHIFT) - 1);
	uint64_t size = idx == 0 ? PG : idx == VFIO_PCI_CONFIG_REGION_INDEX ? 256 : 0;

	if (!ob || ob->kind != O_DEV)
		return -EBADF;
	if (!ob->granted)
		return -EINVAL;
	if (at >= size)
		return -EINVAL;
	if (len > size - at)
		len = size - at;
	if (idx == 0) {
		if (write)
			memcpy(fk->bar0 + at, buf, len);
		else
			memcpy(buf, fk->bar0 + at, len);
	} else if (write) {
		for (size_t i = 0; i < len; i++) {
			uint8_t m = fk->cfgmask[at + i];

			fk->cfgsp[at + i] = (uint8_t)((fk->cfgsp[at + i] & ~m) |
						      (((const uint8_t *)buf)[i] & m));
		}
	} else {
		memcpy(buf, fk->cfgsp + at, len);
	}
	return (ssize_t)len;
}

static ssize_t f_pread(void *o, int fd, void *buf, size_t len, off_t off)
{
	return region_rw(o, fd, buf, len, off, false);
}

static ssize_t f_pwrite(void *o, int fd, const void *buf, size_t len, off_t off)
{
	return region_rw(o, fd, (void *)buf, len, off, true);
}

static void *f_mmap(void *o, void *addr, size_t len, int prot, int flags, int fd, off_t off,
		    int *err_out)
{
	struct fake_kvfio *fk = o;
	struct obj *ob = fkv_obj_of(fk, fd);
	void *p;

	if (ob) {
		/* vfio-pci: only a BAR offered for mmap, inside it, shared. */
		uint64_t at = (uint64_t)off & ((1ull << REGION_SHIFT) - 1);

		if (ob->kind != O_DEV || !ob->granted || (uint64_t)off >> REGION_SHIFT != 0 ||
		    at + len > PG || !(flags & MAP_SHARED)) {
			if (err_out)
				*err_out = -EINVAL;
			return MAP_FAILED;
		}
		fd = fk->bar0_fd;
		off = (off_t)at;
		fk->st.bar_mmaps++;
	}
	p = mmap(addr, len, prot, flags, fd, off);

	if (p == MAP_FAILED && err_out)
		*err_out = -errno;
	return p;
}

static int f_munmap(void *o, void *addr, size_t len)
{
	return munmap(addr, len) ? -errno : 0;
}

static int f_fcntl(void *o, int fd, int cmd, int arg)
{
	struct fake_kvfio *fk = o;
	struct obj *ob = fkv_obj_of(fk, fd);

	if (!ob)
		return -EBADF;
	if (ob->kind != O_DATA)
		return -EINVAL;   /* the backend only asks about data fds */
	if (cmd == F_GETFL)
		return (fk->saving ? O_RDONLY : O_WRONLY) | (ob->nonblock ? O_NONBLOCK : 0);
	if (cmd != F_SETFL)
		return -EINVAL;
	ob->nonblock = arg & O_NONBLOCK;
	fk->st.data_nonblock = ob->nonblock;
	return 0;
}

static int f_poll(void *o, struct pollfd *fds, nfds_t n, int timeout_ms)
{
	struct fake_kvfio *fk = o;
	uint64_t one = 1;
	int r;

	fk->st.polls++;
	for (nfds_t i = 0; i < n; i++) {
		struct obj *ob = fkv_obj_of(fk, fds[i].fd);
		uint64_t left;

		if (!ob || ob->kind != O_DATA || ob->session != fk->session)
			continue;
		/* mtty: vfs_poll() without a poll method is DEFAULT_POLLMASK. */
		if (fk->cfg.no_poll && n == 1) {
			fds[0].revents = fds[0].events & (POLLIN | POLLOUT);
			return 1;
		}
		left = stall_left(fk);
		if (left && n == 1) {
			/* Stalled: nothing until the stall ends or the timeout. */
			int t;

			fds[0].revents = 0;
			if (timeout_ms >= 0 && (uint64_t)timeout_ms <= left)
				t = timeout_ms;
			else if (left <= INT32_MAX)
				t = (int)left;
			else
				return -EDEADLK;   /* a test bug: it would wait forever */
			poll(NULL, 0, t);
			if (stall_left(fk))
				return 0;
			fds[0].revents = fds[0].events & (POLLIN | POLLOUT);
			return 1;
		}

		/* Data "arrives" while the caller waits: the eventfd becomes readable. */
		if (ob && ob->kind == O_DATA && fk->cfg.nonblocking && ob->session == fk->session &&
		    !fk->ready) {
			fk->ready = true;
			if (write(ob->fd, &one, sizeof(one)) < 0)
				return -errno;
		}
	}
	r = poll(fds, n, timeout_ms);
	return r < 0 ? -errno : r;
}

/* ---- Lifecycle ---- */

static void config_init(struct fake_kvfio *fk)
{
	uint8_t *c = fk->cfgsp, *m = fk->cfgmask;

	memset(c, 0, sizeof(fk->cfgsp));
	memset(m, 0, sizeof(fk->cfgmask));
	c[0x00] = (uint8_t)fk->cfg.vendor, c[0x01] = (uint8_t)(fk->cfg.vendor >> 8);
	c[0x02] = (uint8_t)fk->cfg.device, c[0x03] = (uint8_t)(fk->cfg.device >> 8);
	c[0x06] = 0x10;                        /* capability list */
	c[0x08] = 1, c[0x0b] = 0x02;           /* revision 1, class 0x020000 */
	c[0x2c] = 0xf4, c[0x2d] = 0x1a, c[0x2e] = 0x01;
	c[0x34] = MSI_CAP;
	c[MSI_CAP] = 0x05, c[MSI_CAP + 2] = 0x80, c[MSI_CAP + 3] = 0x01;  /* 64-bit, masking */
	m[0x04] = 0x47, m[0x05] = 0x05;        /* command */
	m[0x11] = 0xf0, m[0x12] = 0xff, m[0x13] = 0xff;  /* BAR0: 4 KiB memory */
	m[0x3c] = 0xff;
	m[MSI_CAP + 2] = 0x71;                 /* enable + multiple message enable */
	memset(m + MSI_CAP + 4, 0xff, 8), m[MSI_CAP + 4] = 0xfc;  /* address */
	m[MSI_CAP + 0xc] = 0xff, m[MSI_CAP + 0xd] = 0xff;          /* data */
	m[MSI_CAP + 0x10] = 0x01;              /* mask bit of the one vector */
}

struct fake_kvfio *fake_kvfio_new(const struct fake_kvfio_cfg *cfg)
{
	struct fake_kvfio *fk = calloc(1, sizeof(*fk));

	if (!fk)
		return NULL;
	fk->cfg = *cfg;
	fk->npages = cfg->state_size / PG;
	fk->mem = malloc(cfg->state_size ? cfg->state_size : 1);
	fk->bar0_fd = memfd_create("fake-kvfio-bar0", MFD_CLOEXEC);
	fk->bar0 = MAP_FAILED;
	if (fk->bar0_fd >= 0 && ftruncate(fk->bar0_fd, PG) == 0)
		fk->bar0 = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, fk->bar0_fd, 0);
	if (!fk->mem || cfg->state_size % PG || fk->bar0 == MAP_FAILED) {
		if (fk->bar0 != MAP_FAILED)
			munmap(fk->bar0, PG);
		if (fk->bar0_fd >= 0)
			close(fk->bar0_fd);
		free(fk->mem);
		free(fk);
		return NULL;
	}
	state_fill(fk);
	config_init(fk);
	fk->state = VFM_STATE_RUNNING;
	fk->next_id = 1;
	fk->sys = (struct vfm_vfio_sys){
		.version = VFM_VFIO_SYS_V2, .opaque = fk, .open = f_open, .close = f_close,
		.ioctl = fkv_ioctl, .read = f_read, .write = f_write, .pread = f_pread,
		.pwrite = f_pwrite, .mmap = f_mmap, .munmap = f_munmap, .poll = f_poll,
		.fcntl = f_fcntl,
	};
	return fk;
}

void fake_kvfio_free(struct fake_kvfio *fk)
{
	if (!fk)
		return;
	while (fk->nobjs)
		f_close(fk, fk->objs[0].fd);
	fkv_end_session(fk);
	fkv_log_free(fk);
	fkv_maps_clear(fk);
	munmap(fk->bar0, PG);
	close(fk->bar0_fd);
	free(fk->mem);
	free(fk);
}

const struct vfm_vfio_sys *fake_kvfio_sys(struct fake_kvfio *fk)
{
	return &fk->sys;
}

void fake_kvfio_inject(struct fake_kvfio *fk, unsigned long req, uint32_t feature, unsigned skip,
		       int err)
{
	fk->inj.req = req;
	fk->inj.feature = feature;
	fk->inj.skip = skip;
	fk->inj.err = err;
	fk->inj.on = true;
}

void fake_kvfio_fail_arc(struct fake_kvfio *fk, enum vfm_state from, enum vfm_state to, int err,
			 enum vfm_state lands)
{
	fk->arcfail.from = from;
	fk->arcfail.to = to;
	fk->arcfail.err = err;
	fk->arcfail.lands = lands;
	fk->arcfail.on = true;
}

enum vfm_state fake_kvfio_state(const struct fake_kvfio *fk)
{
	return fk->state;
}

const uint8_t *fake_kvfio_config(const struct fake_kvfio *fk)
{
	return fk->cfgsp;
}

void fake_kvfio_stats(const struct fake_kvfio *fk, struct fake_kvfio_stats *st)
{
	*st = fk->st;
	st->open_objects = fk->nobjs;
	st->maps = fk->nmaps;
	st->logging = fk->logging;
	st->iommu_dirty = fk->iommu_dirty;
	st->attached_hwpt = fk->attached_hwpt;
	st->legacy = fk->legacy;
	st->bound = false;
	for (unsigned i = 0; i < fk->nobjs; i++)
		st->bound |= fk->objs[i].kind == O_DEV && fk->objs[i].granted;
}

static int mkdirs(const char *path)
{
	char buf[4096];

	snprintf(buf, sizeof(buf), "%s", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0755) && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	return mkdir(buf, 0755) && errno != EEXIST ? -errno : 0;
}

int fake_kvfio_make_sysfs(const struct fake_kvfio_cfg *cfg, const char *root)
{
	char dev[2048], p[4096], t[4096];
	int r;

	snprintf(dev, sizeof(dev), "%s/devices/pci0000:00/%s", root, cfg->bdf);
	if ((r = mkdirs(dev)))
		return r;
	if (!cfg->no_cdev) {
		snprintf(p, sizeof(p), "%s/vfio-dev/vfio%d", dev, cfg->cdev);
		if ((r = mkdirs(p)))
			return r;
	}
	snprintf(p, sizeof(p), "%s/kernel/iommu_groups/%d", root, cfg->group);
	if ((r = mkdirs(p)))
		return r;
	snprintf(p, sizeof(p), "%s/iommu_group", dev);
	snprintf(t, sizeof(t), "../../../kernel/iommu_groups/%d", cfg->group);
	if (symlink(t, p))
		return -errno;
	snprintf(p, sizeof(p), "%s/bus/pci/devices", root);
	if ((r = mkdirs(p)))
		return r;
	snprintf(p, sizeof(p), "%s/bus/pci/devices/%s", root, cfg->bdf);
	snprintf(t, sizeof(t), "../../../devices/pci0000:00/%s", cfg->bdf);
	if (symlink(t, p))
		return -errno;
	snprintf(p, sizeof(p), "%s/class/vfio-dev/vfio%d", root, cfg->cdev);
	if ((r = mkdirs(p)))
		return r;
	snprintf(p, sizeof(p), "%s/class/vfio-dev/vfio%d/device", root, cfg->cdev);
	snprintf(t, sizeof(t), "../../../devices/pci0000:00/%s", cfg->bdf);
	return symlink(t, p) ? -errno : 0;
}

int fake_kvfio_open(struct fake_kvfio *fk, const char *name, enum vfm_vfio_iommu mode,
		    const char *sysfs_root, struct vfm_device **out, struct vfm_error *err)
{
	struct vfm_vfio_opts o = {
		.version = VFM_VFIO_OPTS_V1, .id = "kv", .iommu = mode,
		.sysfs_root = sysfs_root ? sysfs_root : "/nonexistent/fake-sysfs",
		.timeout_ms = 2000, .sys = fake_kvfio_sys(fk),
	};

	return vfm_vfio_open(name, &o, out, err);
}
