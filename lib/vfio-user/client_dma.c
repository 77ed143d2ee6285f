/*
 * Guest memory as the vfio-user client shares it: the DMA_MAP table, the
 * server's DMA_READ/DMA_WRITE messages served from it, and the dirty log of
 * what DMA_WRITE touched (the spec leaves that tracking to the client).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "memory_access.h"
#include "util/bitmap.h"
#include "util/logging.h"
#include "vfio-user/client.h"

#define PAGE VFM_VFIO_USER_DIRTY_PAGE

/* The window holding all of [addr, addr + count), or NULL. Table stable (lock held). */
static struct cli_map *find_map(struct vfu_client *c, uint64_t addr, uint64_t count)
{
	size_t lo = 0, hi = c->nmaps;

	/* Last window starting at or below addr. */
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (c->maps[mid].iova <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == 0)
		return NULL;
	if (!vfu_range_ok(addr - c->maps[lo - 1].iova, count, c->maps[lo - 1].size))
		return NULL;
	return &c->maps[lo - 1];
}

static int reply_error(struct vfu_client *c, const struct vfu_msg *m, int errnum,
		       const struct vfm_error *why, struct vfm_error *err)
{
	struct vfu_hdr h;

	vfm_warn(c->id, "refusing server %s: %s", vfu_cmd_name(m->hdr.cmd),
		 why && why->msg[0] ? why->msg : vfm_strerror(errnum));
	if (!vfu_hdr_wants_reply(&m->hdr))
		return 0;
	vfu_hdr_error(&h, &m->hdr, errnum);
	return vfu_cli_send(c, &h, NULL, 0, NULL, 0, err);
}

/* Checks a DMA request against the limits and the map table. */
static int dma_target(struct vfu_client *c, const struct vfu_msg *m, const struct vfu_dma_rw *rw,
		      uint32_t need_prot, struct cli_map **out, struct vfm_error *e)
{
	struct cli_map *mp;
	int r;

	r = vfu_check_count(m, rw->count, c->local_max_xfer, e);
	if (r)
		return r;
	mp = find_map(c, rw->addr, rw->count);
	if (!mp)
		return vfm_error_set(e, -EFAULT, "%s of %" PRIu64 " bytes at %#" PRIx64
				     " is outside every DMA mapping", vfu_cmd_name(m->hdr.cmd),
				     rw->count, rw->addr);
	if (!(mp->prot & need_prot))
		return vfm_error_set(e, -EPERM, "%s at %#" PRIx64 ": mapping is %s",
				     vfu_cmd_name(m->hdr.cmd), rw->addr,
				     need_prot == VFM_DMA_READ ? "not readable" : "not writable");
	*out = mp;
	return 0;
}

static int serve_dma_read(struct vfu_client *c, const struct vfu_msg *m, struct vfm_error *err)
{
	struct vfm_error e = { 0 };
	struct vfu_dma_rw rw;
	struct cli_map *mp;
	struct iovec iov[2];
	struct vfu_hdr h;
	int r;

	r = vfu_check_payload_exact(m, sizeof(rw), &e);
	if (r)
		return reply_error(c, m, r, &e, err);
	memcpy(&rw, m->payload, sizeof(rw));
	r = dma_target(c, m, &rw, VFM_DMA_READ, &mp, &e);
	if (r)
		return reply_error(c, m, r, &e, err);
	vfm_trace(c->id, "server DMA_READ %#" PRIx64 "+%" PRIu64, rw.addr, rw.count);
	if (!vfu_hdr_wants_reply(&m->hdr))
		return 0;
	vfu_hdr_reply(&h, &m->hdr);
	iov[0] = (struct iovec){ &rw, sizeof(rw) };
	iov[1] = (struct iovec){ (char *)mp->vaddr + (rw.addr - mp->iova), (size_t)rw.count };
#ifdef __SANITIZE_THREAD__
	{
		/* sendmsg reads guest memory inside TSan's interceptor: copy it out
		 * first through the uninstrumented reader (memory_access.h). */
		void *copy = malloc(rw.count ? rw.count : 1);
		int r2;

		if (!copy)
			return reply_error(c, m, -ENOMEM, NULL, err);
		vfm__guest_read(copy, iov[1].iov_base, (size_t)rw.count);
		iov[1].iov_base = copy;
		r2 = vfu_cli_send(c, &h, iov, 2, NULL, 0, err);
		free(copy);
		return r2;
	}
#else
	return vfu_cli_send(c, &h, iov, 2, NULL, 0, err);
#endif
}

static int serve_dma_write(struct vfu_client *c, const struct vfu_msg *m, struct vfm_error *err)
{
	struct vfm_error e = { 0 };
	struct vfu_dma_rw rw;
	struct cli_map *mp;
	struct iovec iov;
	struct vfu_hdr h;
	int r;

	r = vfu_check_payload(m, sizeof(rw), &e);
	if (r)
		return reply_error(c, m, r, &e, err);
	memcpy(&rw, m->payload, sizeof(rw));
	if (rw.count != m->len - sizeof(rw)) {
		vfm_error_set(&e, -EINVAL, "DMA_WRITE count %" PRIu64 " with %zu data bytes",
			      rw.count, m->len - sizeof(rw));
		return reply_error(c, m, -EINVAL, &e, err);
	}
	r = dma_target(c, m, &rw, VFM_DMA_WRITE, &mp, &e);
	if (r)
		return reply_error(c, m, r, &e, err);
	if (rw.count) {
		uint64_t off = rw.addr - mp->iova;
		uint64_t first = off / PAGE, last = (off + rw.count - 1) / PAGE;

		/* Guest memory the guest may be writing too: see memory_access.h. */
		vfm__guest_write((char *)mp->vaddr + off, (const char *)m->payload + sizeof(rw),
				 rw.count);
		/* After the bytes: a collector that sees the bit sees the data. */
		vfm_bitmap_set_range_atomic(mp->dirty, first, last - first + 1);
		if (c->dma_dirty)
			c->dma_dirty(rw.addr, rw.count, c->dma_dirty_opaque);
	}
	vfm_trace(c->id, "server DMA_WRITE %#" PRIx64 "+%" PRIu64, rw.addr, rw.count);
	if (!vfu_hdr_wants_reply(&m->hdr))
		return 0;
	/* The spec's table shows a 4-byte count; libvfio-user sends and expects 8. */
	vfu_hdr_reply(&h, &m->hdr);
	iov = (struct iovec){ &rw, sizeof(rw) };
	return vfu_cli_send(c, &h, &iov, 1, NULL, 0, err);
}

int vfu_cli_serve(struct vfu_client *c, struct vfu_msg *m, struct vfm_error *err)
{
	struct vfm_error e = { 0 };

	switch (m->hdr.cmd) {
	case VFU_CMD_DMA_READ:
		return serve_dma_read(c, m, err);
	case VFU_CMD_DMA_WRITE:
		return serve_dma_write(c, m, err);
	default:
		vfm_error_set(&e, -ENOSYS, "command %u (%s) is not for a client",
			      (unsigned)m->hdr.cmd, vfu_cmd_name(m->hdr.cmd));
		return reply_error(c, m, -ENOSYS, &e, err);
	}
}

/* ---- The map table ---- */

static void map_free(struct cli_map *mp)
{
	if (mp->own_mmap && mp->vaddr)
		munmap(mp->vaddr, mp->size);
	free(mp->dirty);
}

void vfu_cli_dma_cleanup(struct vfu_client *c)
{
	for (size_t i = 0; i < c->nmaps; i++)
		map_free(&c->maps[i]);
	free(c->maps);
	c->maps = NULL;
	c->nmaps = c->maps_cap = 0;
}

/* Index where a window at iova goes, or -EEXIST if [iova, iova+size) overlaps one. */
static ssize_t insert_pos(const struct vfu_client *c, uint64_t iova, uint64_t size)
{
	size_t i = 0;

	while (i < c->nmaps && c->maps[i].iova + c->maps[i].size <= iova)
		i++;
	if (i < c->nmaps && c->maps[i].iova < iova + size)
		return -EEXIST;
	return (ssize_t)i;
}

static int reserve_slot(struct vfu_client *c)
{
	struct cli_map *n;
	size_t cap;

	if (c->nmaps < c->maps_cap)
		return 0;
	cap = c->maps_cap ? c->maps_cap * 2 : 8;
	pthread_mutex_lock(&c->map_lock);
	n = realloc(c->maps, cap * sizeof(*n));
	if (n) {
		c->maps = n;
		c->maps_cap = cap;
	}
	pthread_mutex_unlock(&c->map_lock);
	return n ? 0 : -ENOMEM;
}

int vfu_cli_dma_map(struct vfm_device *dev, const struct vfm_dma_map *map,
		    struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	struct cli_map nm = { .iova = map->iova, .size = map->size, .prot = map->prot,
			      .vaddr = map->vaddr };
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfu_dma_map req;
	struct iovec iov;
	bool use_fd;
	ssize_t pos;
	int r;

	if ((map->iova | map->size | map->fd_offset) & (PAGE - 1) || !map->size ||
	    map->iova + map->size < map->iova)
		return vfm_error_set(err, -EINVAL, "%s: DMA map %#" PRIx64 "+%#" PRIx64
				     " (fd offset %#" PRIx64 ") is not %u-byte aligned",
				     c->id, map->iova, map->size, map->fd_offset, PAGE);
	if (!map->prot || (map->prot & ~(VFM_DMA_READ | VFM_DMA_WRITE)))
		return vfm_error_set(err, -EINVAL, "%s: DMA map prot %#x", c->id, map->prot);
	if (map->fd < 0 && !map->vaddr)
		return vfm_error_set(err, -EINVAL, "%s: DMA map needs an fd or an address", c->id);
	nm.npages = map->size / PAGE;
	nm.dirty = calloc(VFM_BITMAP_WORDS(nm.npages), sizeof(uint64_t));
	if (!nm.dirty)
		return vfm_error_set(err, -ENOMEM, "%s: no memory for a DMA dirty log", c->id);
	if (!nm.vaddr) {
		/* DMA_READ/WRITE messages need our own view of the memory. */
		int prot = (map->prot & VFM_DMA_READ ? PROT_READ : 0) |
			   (map->prot & VFM_DMA_WRITE ? PROT_WRITE : 0);
		void *p = mmap(NULL, map->size, prot, MAP_SHARED, map->fd, (off_t)map->fd_offset);

		if (p == MAP_FAILED) {
			r = vfm_error_set(err, -errno, "%s: mmap of the DMA fd: %s", c->id,
					  strerror(errno));
			free(nm.dirty);
			return r;
		}
		nm.vaddr = p;
		nm.own_mmap = true;
	}

	r = vfu_cli_lock(c, err);
	if (r)
		goto err_free;
	pos = insert_pos(c, map->iova, map->size);
	if (pos < 0) {
		r = vfm_error_set(err, -EEXIST, "%s: DMA map %#" PRIx64 "+%#" PRIx64
				  " overlaps a mapping", c->id, map->iova, map->size);
		goto err_unlock;
	}
	if (c->nmaps >= c->neg.max_dma_maps) {
		r = vfm_error_set(err, -ENOSPC, "%s: server takes at most %" PRIu32 " DMA mappings",
				  c->id, c->neg.max_dma_maps);
		goto err_unlock;
	}
	r = reserve_slot(c);
	if (r) {
		vfm_error_set(err, r, "%s: no memory for the DMA map table", c->id);
		goto err_unlock;
	}
	/* A server that takes no fds gets none, and must use DMA_READ/WRITE. */
	use_fd = map->fd >= 0 && c->neg.peer_max_fds >= 1;
	nm.fd_backed = use_fd;
	req = (struct vfu_dma_map){
		.argsz = sizeof(req),
		.flags = (map->prot & VFM_DMA_READ ? VFU_DMA_F_READ : 0) |
			 (map->prot & VFM_DMA_WRITE ? VFU_DMA_F_WRITE : 0),
		.offset = use_fd ? map->fd_offset : 0,
		.addr = map->iova,
		.size = map->size,
	};
	iov = (struct iovec){ &req, sizeof(req) };
	r = vfu_cli_request(c, VFU_CMD_DMA_MAP, &iov, 1, use_fd ? &map->fd : NULL,
			    use_fd ? 1 : 0, &reply, err);
	vfu_msg_release(&reply);
	if (r) {
		vfm_error_set(err, r, "%s: DMA_MAP %#" PRIx64 "+%#" PRIx64, c->id, map->iova,
			      map->size);
		goto err_unlock;
	}
	pthread_mutex_lock(&c->map_lock);
	memmove(&c->maps[pos + 1], &c->maps[pos], (c->nmaps - (size_t)pos) * sizeof(nm));
	c->maps[pos] = nm;
	c->nmaps++;
	pthread_mutex_unlock(&c->map_lock);
	vfu_cli_unlock(c);
	vfm_debug(c->id, "DMA map %#" PRIx64 "+%#" PRIx64 " %s", map->iova, map->size,
		  use_fd ? "with fd" : "by messages");
	return 0;

err_unlock:
	vfu_cli_unlock(c);
err_free:
	map_free(&nm);
	return r;
}

/*
 * Moves the dirty bits of mp inside [iova, iova + length) into bitmap at
 * page_size (iova aligned to it). The words are shared with DMA serving:
 * fetch-and-clear only the bits in range, so neighbours are never lost.
 */
static uint64_t collect_map(struct cli_map *mp, uint64_t iova, uint64_t length,
			    uint64_t page_size, uint64_t *bitmap)
{
	uint64_t lo = mp->iova > iova ? mp->iova : iova;
	uint64_t mend = mp->iova + mp->size, rend = iova + length;
	uint64_t hi = mend < rend ? mend : rend;
	uint64_t first, last, count = 0;

	if (lo >= hi)
		return 0;
	first = (lo - mp->iova) / PAGE;
	last = (hi - 1 - mp->iova) / PAGE;
	for (uint64_t w = first / 64; w <= last / 64; w++) {
		uint64_t b0 = w == first / 64 ? first % 64 : 0;
		uint64_t b1 = w == last / 64 ? last % 64 : 63;
		uint64_t mask = (b1 - b0 == 63 ? ~0ull : ((1ull << (b1 - b0 + 1)) - 1)) << b0;
		uint64_t v;

		if (!(__atomic_load_n(&mp->dirty[w], __ATOMIC_RELAXED) & mask))
			continue;
		v = __atomic_fetch_and(&mp->dirty[w], ~mask, __ATOMIC_ACQ_REL) & mask;
		count += (uint64_t)__builtin_popcountll(v);
		while (v) {
			uint64_t b = (uint64_t)__builtin_ctzll(v);
			uint64_t page_iova = mp->iova + (w * 64 + b) * PAGE;
			uint64_t bit = (page_iova - iova) / page_size;

			bitmap[bit / 64] |= 1ull << (bit % 64);
			v &= v - 1;
		}
	}
	return count;
}

static int check_bitmap_args(const struct vfu_client *c, uint64_t iova, uint64_t length,
			     uint64_t page_size, const uint64_t *bitmap, struct vfm_error *err)
{
	if (page_size < PAGE || (page_size & (page_size - 1)) || (iova & (page_size - 1)) ||
	    !length || iova + length < iova || !bitmap)
		return vfm_error_set(err, -EINVAL, "%s: dirty bitmap for %#" PRIx64 "+%#" PRIx64
				     " at page size %#" PRIx64, c->id, iova, length, page_size);
	return 0;
}

int vfu_cli_dma_unmap(struct vfm_device *dev, uint64_t iova, uint64_t size,
		      uint64_t page_size, uint64_t *dirty_bitmap, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfu_dma_unmap req = { .argsz = sizeof(req), .addr = iova, .size = size };
	struct cli_map gone;
	size_t i;
	int r;

	if (dirty_bitmap) {
		r = check_bitmap_args(c, iova, size, page_size, dirty_bitmap, err);
		if (r)
			return r;
	}
	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	for (i = 0; i < c->nmaps; i++)
		if (c->maps[i].iova == iova && c->maps[i].size == size)
			break;
	if (i == c->nmaps) {
		vfu_cli_unlock(c);
		return vfm_error_set(err, -EINVAL, "%s: no DMA mapping is exactly %#" PRIx64
				     "+%#" PRIx64, c->id, iova, size);
	}
	r = vfu_cli_simple(c, VFU_CMD_DMA_UNMAP, &req, sizeof(req), &reply, err);
	vfu_msg_release(&reply);
	if (r) {
		vfu_cli_unlock(c);
		return vfm_error_set(err, r, "%s: DMA_UNMAP %#" PRIx64 "+%#" PRIx64, c->id,
				     iova, size);
	}
	pthread_mutex_lock(&c->map_lock);
	gone = c->maps[i];
	memmove(&c->maps[i], &c->maps[i + 1], (c->nmaps - i - 1) * sizeof(gone));
	c->nmaps--;
	pthread_mutex_unlock(&c->map_lock);
	vfu_cli_unlock(c);

	if (dirty_bitmap) {
		collect_map(&gone, iova, size, page_size, dirty_bitmap);
		/*
		 * The server wrote fd-backed memory directly and vfio-user's
		 * DMA_UNMAP returns no bitmap: without a DMA logging report
		 * first, any page may be dirty.
		 */
		if (gone.fd_backed && (gone.prot & VFM_DMA_WRITE)) {
			uint64_t bits = (size + page_size - 1) / page_size;

			vfm_bitmap_set_range_atomic(dirty_bitmap, 0, bits);
		}
	}
	map_free(&gone);
	vfm_debug(c->id, "DMA unmap %#" PRIx64 "+%#" PRIx64, iova, size);
	return 0;
}

int64_t vfm_vfio_user_dirty_collect(struct vfm_device *dev, uint64_t iova, uint64_t length,
				    uint64_t page_size, uint64_t *bitmap, struct vfm_error *err)
{
	struct vfu_client *c;
	uint64_t count = 0;
	int r;

	if (!vfm_device_is_vfio_user(dev))
		return vfm_error_set(err, -EINVAL, "not a vfio-user device");
	c = cli_of(dev);
	r = check_bitmap_args(c, iova, length, page_size, bitmap, err);
	if (r)
		return r;
	pthread_mutex_lock(&c->map_lock);
	for (size_t i = 0; i < c->nmaps; i++)
		count += collect_map(&c->maps[i], iova, length, page_size, bitmap);
	pthread_mutex_unlock(&c->map_lock);
	return (int64_t)count;
}
