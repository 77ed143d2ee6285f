/*
 * Client memory: DMA_MAP/DMA_UNMAP windows (mmap()ed when the client sends
 * an fd), the devices' DMA helpers (direct copies, or DMA_READ/DMA_WRITE
 * messages for windows without an fd), and DMA logging: per-window dirty
 * bitmaps fed by the helpers and drained by DMA_LOGGING_REPORT.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/bitmap.h"
#include "util/logging.h"
#include "vfio-user/server.h"

VFU_ARGSZ_FIRST(struct vfu_dma_map);
VFU_ARGSZ_FIRST(struct vfu_dma_unmap);

#define PAGE 4096u

/* Index of the first window that ends after iova (maps is sorted). */
static size_t first_ending_after(const struct vfm_vfu_ctx *ctx, uint64_t iova)
{
	size_t lo = 0, hi = ctx->nmaps;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		const struct vfu_srv_dma *d = &ctx->maps[mid];

		if (d->iova + d->size <= iova)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static struct vfu_srv_dma *find_window(struct vfm_vfu_ctx *ctx, uint64_t iova)
{
	size_t i = first_ending_after(ctx, iova);

	return i < ctx->nmaps && ctx->maps[i].iova <= iova ? &ctx->maps[i] : NULL;
}

/* Caller holds dma_lock for writing. */
static int log_alloc(struct vfu_srv_dma *d, uint64_t pg)
{
	d->log_base = d->iova & ~(pg - 1);
	d->log_bits = (d->iova + d->size - d->log_base + pg - 1) / pg;
	d->dirty = calloc(VFM_BITMAP_WORDS(d->log_bits), sizeof(uint64_t));
	return d->dirty ? 0 : -ENOMEM;
}

static void window_free(struct vfu_srv_dma *d)
{
	if (d->vaddr)
		munmap(d->vaddr, d->size);
	free(d->dirty);
	d->vaddr = NULL;
	d->dirty = NULL;
}

/* ------------------------------------------------------------------------ */
/* DMA_MAP / DMA_UNMAP                                                       */

/* mmap()s the client's fd; only regular files (memfd, tmpfs, hugetlbfs)
 * whose size covers the window, so a later access cannot fault. */
static int map_fd(struct vfm_vfu_ctx *ctx, int fd, const struct vfu_dma_map *req,
		  uint8_t **out, struct vfm_error *err)
{
	int prot = ((req->flags & VFU_DMA_F_READ) ? PROT_READ : 0) |
		   ((req->flags & VFU_DMA_F_WRITE) ? PROT_WRITE : 0);
	struct stat st;
	void *p;

	if (fstat(fd, &st))
		return vfm_error_set(err, -errno, "DMA_MAP: fstat: %s", strerror(errno));
	if (!S_ISREG(st.st_mode))
		return vfm_error_set(err, -EINVAL, "DMA_MAP: fd is not a regular file or memfd");
	if (!vfu_range_ok(req->offset, req->size, (uint64_t)st.st_size))
		return vfm_error_set(err, -EINVAL, "DMA_MAP: %#" PRIx64 " bytes at offset %#" PRIx64
				     " exceed the file's %#" PRIx64, req->size, req->offset,
				     (uint64_t)st.st_size);
	p = mmap(NULL, req->size, prot, MAP_SHARED, fd, (off_t)req->offset);
	if (p == MAP_FAILED)
		return vfm_error_set(err, -errno, "DMA_MAP: mmap of %#" PRIx64 " bytes: %s",
				     req->size, strerror(errno));
	*out = p;
	return 0;
}

int vfu_srv_dma_map(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
		    struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_srv_dma d = { .fd = -1 };
	struct vfu_dma_map req;
	size_t at;
	int ret, fd;

	ret = vfu_take_request(m, &req, sizeof(req), sizeof(req), m->len, err);
	ret = ret ?: vfu_check_nfds(m, 0, 1, err);
	if (ret)
		return ret;
	if (!(req.flags & (VFU_DMA_F_READ | VFU_DMA_F_WRITE)) ||
	    (req.flags & ~(VFU_DMA_F_READ | VFU_DMA_F_WRITE)))
		return vfm_error_set(err, -EINVAL, "DMA_MAP: flags %#" PRIx32, req.flags);
	if (!req.size || req.addr + req.size < req.addr || (req.addr | req.size) & (PAGE - 1) ||
	    (m->nfds && (req.offset & (PAGE - 1))))
		return vfm_error_set(err, -EINVAL, "DMA_MAP: %#" PRIx64 " bytes at %#" PRIx64
				     " (offset %#" PRIx64 ") are not whole 4 KiB pages",
				     req.size, req.addr, req.offset);
	if (ctx->nmaps >= ctx->neg.max_dma_maps)
		return vfm_error_set(err, -ENOSPC, "DMA_MAP: already %zu windows (max_dma_maps %" PRIu32 ")",
				     ctx->nmaps, ctx->neg.max_dma_maps);
	/*
	 * The dirty log of a window is sized by the window, and a sparse memfd
	 * can be as large as the client likes: cap the total mapped, so a DMA
	 * logging bitmap never passes VFU_MAX_DMA_TOTAL / 4 KiB / 8 bytes.
	 */
	uint64_t total = req.size;
	for (size_t i = 0; i < ctx->nmaps; i++)
		total += ctx->maps[i].size;
	if (total > VFU_MAX_DMA_TOTAL || total < req.size)
		return vfm_error_set(err, -ENOSPC, "DMA_MAP: %#" PRIx64 " more bytes would map more "
				     "than %llu GiB in all", req.size, VFU_MAX_DMA_TOTAL >> 30);
	/* Only the loop thread changes maps: reading it unlocked here is safe. */
	at = first_ending_after(ctx, req.addr);
	if (at < ctx->nmaps && ctx->maps[at].iova < req.addr + req.size)
		return vfm_error_set(err, -EEXIST, "DMA_MAP: [%#" PRIx64 ", +%#" PRIx64
				     ") overlaps [%#" PRIx64 ", +%#" PRIx64 ")", req.addr, req.size,
				     ctx->maps[at].iova, ctx->maps[at].size);
	if (ctx->nmaps == ctx->maps_cap) {
		/* Not realloc(): device threads may be reading the old array. */
		size_t cap = ctx->maps_cap ? ctx->maps_cap * 2 : 16;
		struct vfu_srv_dma *p = calloc(cap, sizeof(*p)), *old;

		if (!p)
			return vfm_error_set(err, -ENOMEM, "DMA_MAP: no memory");
		pthread_rwlock_wrlock(&ctx->dma_lock);
		if (ctx->nmaps)
			memcpy(p, ctx->maps, ctx->nmaps * sizeof(*p));
		old = ctx->maps;
		ctx->maps = p;
		ctx->maps_cap = cap;
		pthread_rwlock_unlock(&ctx->dma_lock);
		free(old);
	}
	d.iova = req.addr;
	d.size = req.size;
	d.prot = req.flags;
	d.fd_offset = req.offset;
	if (m->nfds) {
		fd = vfu_msg_take_fd(m, 0);
		ret = map_fd(ctx, fd, &req, &d.vaddr, err);
		/* The mapping keeps the memory: the fd is not needed any more. */
		close(fd);
		if (ret)
			return ret;
	}
	pthread_rwlock_wrlock(&ctx->dma_lock);
	if (ctx->logging && d.vaddr && log_alloc(&d, ctx->log_pgsize)) {
		pthread_rwlock_unlock(&ctx->dma_lock);
		window_free(&d);
		return vfm_error_set(err, -ENOMEM, "DMA_MAP: no memory for the dirty log");
	}
	memmove(&ctx->maps[at + 1], &ctx->maps[at], (ctx->nmaps - at) * sizeof(d));
	ctx->maps[at] = d;
	ctx->nmaps++;
	pthread_rwlock_unlock(&ctx->dma_lock);
	vfm_debug(ctx->id, "DMA_MAP [%#" PRIx64 ", +%#" PRIx64 ") %s%s%s", d.iova, d.size,
		  d.prot & VFU_DMA_F_READ ? "r" : "", d.prot & VFU_DMA_F_WRITE ? "w" : "",
		  d.vaddr ? " mmap" : " messages");
	if (ctx->dev_ops && ctx->dev_ops->dma_map)
		ctx->dev_ops->dma_map(ctx, d.iova, d.size, d.prot);
	return 0;
}

/* Removes window i: the device lets go first, then in-flight copies drain. */
static void unmap_window(struct vfm_vfu_ctx *ctx, size_t i)
{
	struct vfu_srv_dma d = ctx->maps[i];

	if (ctx->dev_ops && ctx->dev_ops->dma_unmap)
		ctx->dev_ops->dma_unmap(ctx, d.iova, d.size);
	pthread_rwlock_wrlock(&ctx->dma_lock);
	memmove(&ctx->maps[i], &ctx->maps[i + 1], (ctx->nmaps - i - 1) * sizeof(d));
	ctx->nmaps--;
	pthread_rwlock_unlock(&ctx->dma_lock);
	window_free(&d);
}

int vfu_srv_dma_unmap(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
		      struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_dma_unmap req;
	size_t i;
	int ret;

	ret = vfu_take_request(m, &req, sizeof(req), sizeof(req), UINT32_MAX, err);
	if (ret)
		return ret;
	if (req.flags & ~VFU_DMA_UNMAP_F_ALL)
		return vfm_error_set(err, -EINVAL, "DMA_UNMAP: flags %#" PRIx32, req.flags);
	if (req.flags & VFU_DMA_UNMAP_F_ALL) {
		if (req.addr || req.size)
			return vfm_error_set(err, -EINVAL, "DMA_UNMAP: unmap-all with addr/size set");
		while (ctx->nmaps)
			unmap_window(ctx, ctx->nmaps - 1);
	} else {
		i = first_ending_after(ctx, req.addr);
		if (i >= ctx->nmaps || ctx->maps[i].iova != req.addr || ctx->maps[i].size != req.size)
			return vfm_error_set(err, -ENOENT, "DMA_UNMAP: no window [%#" PRIx64
					     ", +%#" PRIx64 ")", req.addr, req.size);
		unmap_window(ctx, i);
	}
	/* The reply echoes the request. */
	req.argsz = sizeof(req);
	memcpy(r->buf, &req, sizeof(req));
	r->len = sizeof(req);
	return 0;
}

void vfu_srv_dma_release(struct vfm_vfu_ctx *ctx)
{
	while (ctx->nmaps)
		unmap_window(ctx, ctx->nmaps - 1);
	vfu_srv_log_stop(ctx);
}

/* ------------------------------------------------------------------------ */
/* The devices' DMA                                                          */

static bool on_loop_thread(const struct vfm_vfu_ctx *ctx)
{
	return ctx->loop_thread_set && pthread_equal(ctx->loop_thread, pthread_self());
}

/* DMA_READ / DMA_WRITE messages, in pieces the client accepts. */
static int dma_by_message(struct vfm_vfu_ctx *ctx, uint64_t iova, uint8_t *buf, size_t len,
			  bool write)
{
	size_t chunk = ctx->neg.peer_max_xfer;
	struct vfm_error e = { 0 };
	uint8_t *out = NULL;
	int r = 0;

	if (!on_loop_thread(ctx))
		return -EWOULDBLOCK;
	if (!chunk)
		return -ENOTCONN;
	if (write) {
		out = malloc(sizeof(struct vfu_dma_rw) + (len < chunk ? len : chunk));
		if (!out)
			return -ENOMEM;
	}
	while (len && !r) {
		struct vfu_dma_rw req = { .addr = iova, .count = len < chunk ? len : chunk };
		struct vfu_msg rep = VFU_MSG_INIT;
		struct vfu_dma_rw got;

		if (write) {
			memcpy(out, &req, sizeof(req));
			memcpy(out + sizeof(req), buf, req.count);
			r = vfu_srv_call(ctx, VFU_CMD_DMA_WRITE, out, sizeof(req) + req.count,
					 &rep, &e);
		} else {
			r = vfu_srv_call(ctx, VFU_CMD_DMA_READ, &req, sizeof(req), &rep, &e);
		}
		if (!r && rep.len < (write ? VFU_DMA_WRITE_REPLY_MIN : sizeof(got) + req.count))
			r = vfm_error_set(&e, -EIO, "%s reply of %zu bytes", write ? "DMA_WRITE" : "DMA_READ",
					  rep.len);
		if (!r) {
			memcpy(&got, rep.payload, write ? VFU_DMA_WRITE_REPLY_MIN : sizeof(got));
			if (got.addr != req.addr)
				r = vfm_error_set(&e, -EIO, "DMA reply for address %#" PRIx64, got.addr);
			else if (!write)
				memcpy(buf, (uint8_t *)rep.payload + sizeof(got), req.count);
		}
		vfu_msg_release(&rep);
		iova += req.count;
		buf += req.count;
		len -= req.count;
	}
	if (r)
		vfm_info(ctx->id, "DMA through messages failed: %s", e.msg);
	free(out);
	return r;
}

/*
 * Marks after the copy: a report that collects the bit then also sees the
 * data, and a copy still in flight marks its pages for the next report.
 */
static void log_mark(struct vfm_vfu_ctx *ctx, const struct vfu_srv_dma *d, uint64_t iova,
		     size_t n)
{
	uint64_t pg = ctx->log_pgsize;
	uint64_t first = (iova - d->log_base) / pg;
	uint64_t last = (iova + n - 1 - d->log_base) / pg;

	vfm_bitmap_set_range_atomic(d->dirty, first, last - first + 1);
}

static int dma_access(struct vfm_vfu_ctx *ctx, uint64_t iova, uint8_t *buf, size_t len,
		      bool write)
{
	uint32_t need = write ? VFU_DMA_F_WRITE : VFU_DMA_F_READ;
	int r = 0;

	if (!len)
		return 0;
	if (iova + len < iova)
		return -EFAULT;
	pthread_rwlock_rdlock(&ctx->dma_lock);
	while (len) {
		struct vfu_srv_dma *d = find_window(ctx, iova);
		uint64_t off;
		size_t n;

		if (!d) {
			r = -EFAULT;
			break;
		}
		if (!(d->prot & need)) {
			r = -EACCES;
			break;
		}
		off = iova - d->iova;
		n = d->size - off < len ? (size_t)(d->size - off) : len;
		if (d->vaddr) {
			if (write) {
				memcpy(d->vaddr + off, buf, n);
				if (d->dirty)
					log_mark(ctx, d, iova, n);
			} else {
				memcpy(buf, d->vaddr + off, n);
			}
		} else {
			/*
			 * Waiting for the client unlocked: only the loop thread
			 * gets here, and it is the one that would change maps.
			 */
			pthread_rwlock_unlock(&ctx->dma_lock);
			r = dma_by_message(ctx, iova, buf, n, write);
			pthread_rwlock_rdlock(&ctx->dma_lock);
			if (r)
				break;
		}
		iova += n;
		buf += n;
		len -= n;
	}
	pthread_rwlock_unlock(&ctx->dma_lock);
	return r;
}

int vfm_vfu_dma_read(struct vfm_vfu_ctx *ctx, uint64_t iova, void *buf, size_t len)
{
	return dma_access(ctx, iova, buf, len, false);
}

int vfm_vfu_dma_write(struct vfm_vfu_ctx *ctx, uint64_t iova, const void *buf, size_t len)
{
	return dma_access(ctx, iova, (uint8_t *)buf, len, true);
}

/* ------------------------------------------------------------------------ */
/* DMA logging                                                               */

int vfu_srv_log_start(struct vfm_vfu_ctx *ctx, const uint8_t *data, size_t len,
		      uint64_t *page_size, struct vfm_error *err)
{
	struct vfu_dma_logging_control ctl;
	struct vfu_dma_logging_range a, b;
	uint64_t pg;
	int r = 0;

	if (len < sizeof(ctl))
		return vfm_error_set(err, -EINVAL, "DMA_LOGGING_START: %zu data bytes", len);
	memcpy(&ctl, data, sizeof(ctl));
	if (ctl.num_ranges > VFU_SRV_LOG_MAX_RANGES ||
	    len != sizeof(ctl) + (size_t)ctl.num_ranges * sizeof(a))
		return vfm_error_set(err, -EINVAL, "DMA_LOGGING_START: %" PRIu32 " ranges (at most %u) in %zu bytes",
				     ctl.num_ranges, VFU_SRV_LOG_MAX_RANGES, len);
	for (uint32_t i = 0; i < ctl.num_ranges; i++) {
		memcpy(&a, data + sizeof(ctl) + i * sizeof(a), sizeof(a));
		if (!a.length || a.iova + a.length < a.iova)
			return vfm_error_set(err, -EINVAL, "DMA_LOGGING_START: range %" PRIu32 " is empty or wraps", i);
		for (uint32_t j = 0; j < i; j++) {
			memcpy(&b, data + sizeof(ctl) + j * sizeof(b), sizeof(b));
			if (a.iova < b.iova + b.length && b.iova < a.iova + a.length)
				return vfm_error_set(err, -EINVAL, "DMA_LOGGING_START: ranges %" PRIu32
						     " and %" PRIu32 " overlap", j, i);
		}
	}
	/* The page size is a hint: take it when usable, else 4 KiB. */
	pg = ctl.page_size;
	if (pg < PAGE || (pg & (pg - 1)) || pg > (1ull << 30))
		pg = PAGE;
	pthread_rwlock_wrlock(&ctx->dma_lock);
	if (ctx->logging) {
		pthread_rwlock_unlock(&ctx->dma_lock);
		return vfm_error_set(err, -EBUSY, "DMA_LOGGING_START: logging is already on");
	}
	/*
	 * Every fd-backed window is logged; the ranges are checked, not used
	 * to filter: pages outside them are never asked about, and logging
	 * them costs one bit each.
	 */
	for (size_t i = 0; i < ctx->nmaps && !r; i++)
		if (ctx->maps[i].vaddr)
			r = log_alloc(&ctx->maps[i], pg);
	if (r) {
		for (size_t i = 0; i < ctx->nmaps; i++) {
			free(ctx->maps[i].dirty);
			ctx->maps[i].dirty = NULL;
		}
	} else {
		ctx->logging = true;
		ctx->log_pgsize = pg;
	}
	pthread_rwlock_unlock(&ctx->dma_lock);
	if (r)
		return vfm_error_set(err, r, "DMA_LOGGING_START: no memory for dirty bitmaps");
	*page_size = pg;
	vfm_debug(ctx->id, "DMA logging on, %" PRIu64 "-byte pages, %" PRIu32 " ranges", pg,
		  ctl.num_ranges);
	return 0;
}

void vfu_srv_log_stop(struct vfm_vfu_ctx *ctx)
{
	pthread_rwlock_wrlock(&ctx->dma_lock);
	for (size_t i = 0; i < ctx->nmaps; i++) {
		free(ctx->maps[i].dirty);
		ctx->maps[i].dirty = NULL;
	}
	if (ctx->logging)
		vfm_debug(ctx->id, "DMA logging off");
	ctx->logging = false;
	pthread_rwlock_unlock(&ctx->dma_lock);
}

/* Sets the report bits of [lo, hi) (inside the request). */
static void report_set(uint64_t *out, uint64_t iova, uint64_t rpg, uint64_t lo, uint64_t hi)
{
	uint64_t first = (lo - iova) / rpg, last = (hi - 1 - iova) / rpg;

	for (uint64_t k = first; k <= last; k++)
		out[k / 64] |= 1ull << (k % 64);
}

/* Whether log page b of d reaches outside [iova, end) within the window. */
static bool straddles(const struct vfu_srv_dma *d, uint64_t b, uint64_t pg, uint64_t iova,
		      uint64_t end)
{
	uint64_t ps = d->log_base + b * pg, pe = ps + pg;
	uint64_t ms = ps > d->iova ? ps : d->iova;
	uint64_t me = pe < d->iova + d->size ? pe : d->iova + d->size;

	return ms < iova || me > end;
}

/*
 * Collects window d's dirty pages that meet [iova, end). A log page lying
 * wholly inside the request is cleared; one that straddles its edge (only
 * the first and last can) is reported but kept, so the part outside is not
 * lost.
 *
 * Read-and-clear is an atomic fetch-and per word while writers OR bits in:
 * a bit set just after our fetch-and belongs to a write that marks after
 * copying, so it shows up in the next report; none is lost and at worst a
 * page is reported twice, which costs one extra copy and no correctness.
 */
static void report_window(struct vfm_vfu_ctx *ctx, struct vfu_srv_dma *d, uint64_t iova,
			  uint64_t end, uint64_t rpg, uint64_t *out)
{
	uint64_t pg = ctx->log_pgsize;
	uint64_t lo = d->iova > iova ? d->iova : iova;
	uint64_t hi = d->iova + d->size < end ? d->iova + d->size : end;
	uint64_t b0 = (lo - d->log_base) / pg, b1 = (hi - 1 - d->log_base) / pg;

	for (uint64_t w = b0 / 64; w <= b1 / 64; w++) {
		uint64_t mask = ~0ull, keep = 0, got;

		if (w == b0 / 64)
			mask &= ~0ull << (b0 % 64);
		if (w == b1 / 64 && b1 % 64 != 63)
			mask &= (1ull << (b1 % 64 + 1)) - 1;
		if (!(__atomic_load_n(&d->dirty[w], __ATOMIC_RELAXED) & mask))
			continue;
		if (w == b0 / 64 && straddles(d, b0, pg, iova, end))
			keep |= 1ull << (b0 % 64);
		if (w == b1 / 64 && straddles(d, b1, pg, iova, end))
			keep |= 1ull << (b1 % 64);
		got = __atomic_fetch_and(&d->dirty[w], ~(mask & ~keep), __ATOMIC_ACQ_REL) & mask;
		while (got) {
			uint64_t b = w * 64 + (uint64_t)__builtin_ctzll(got);
			uint64_t ps = d->log_base + b * pg, pe = ps + pg;

			got &= got - 1;
			report_set(out, iova, rpg, ps > lo ? ps : lo, pe < hi ? pe : hi);
		}
	}
}

int vfu_srv_log_report(struct vfm_vfu_ctx *ctx, uint64_t iova, uint64_t length,
		       uint64_t page_size, uint64_t *out, struct vfm_error *err)
{
	uint64_t end = iova + length;
	int r = 0;

	pthread_rwlock_rdlock(&ctx->dma_lock);
	if (!ctx->logging) {
		r = vfm_error_set(err, -EINVAL, "DMA_LOGGING_REPORT: logging is not on");
	} else {
		for (size_t i = first_ending_after(ctx, iova); i < ctx->nmaps; i++) {
			struct vfu_srv_dma *d = &ctx->maps[i];

			if (d->iova >= end)
				break;
			if (d->dirty)
				report_window(ctx, d, iova, end, page_size, out);
		}
	}
	pthread_rwlock_unlock(&ctx->dma_lock);
	if (!r)
		__atomic_add_fetch(&ctx->log_reports, 1, __ATOMIC_RELAXED);
	return r;
}
