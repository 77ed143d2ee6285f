/*
 * Guest memory for a kernel VFIO device: DMA map/unmap through the iommufd
 * IOAS or the type1 container, the dirty bits of a range being unmapped (the
 * vIOMMU case), and IOMMU dirty tracking (iommufd HWPT or type1 dirty pages).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "util/logging.h"
#include "vfio/priv.h"

static uint64_t bitmap_bytes(uint64_t length, uint64_t page_size)
{
	return (length / page_size + 63) / 64 * 8;
}

static void set_all(uint64_t *bitmap, uint64_t length, uint64_t page_size)
{
	uint64_t pages = length / page_size;

	for (uint64_t i = 0; i < pages; i++)
		bitmap[i / 64] |= 1ull << (i % 64);
}

static void or_into(uint64_t *dst, const uint64_t *src, uint64_t bytes)
{
	for (uint64_t i = 0; i < bytes / 8; i++)
		dst[i] |= src[i];
}

static bool range_ok(uint64_t iova, uint64_t length, uint64_t page_size)
{
	return page_size >= 4096 && !(page_size & (page_size - 1)) && length &&
	       !((iova | length) & (page_size - 1)) && iova + length > iova;
}

/* ---- Map tables: the address space's (counted) and each device's own ---- */

static int grow(void **arr, size_t *cap, size_t n, size_t elem)
{
	size_t c;
	void *p;

	if (n < *cap)
		return 0;
	c = *cap ? 2 * *cap : 16;
	p = realloc(*arr, c * elem);
	if (!p)
		return -ENOMEM;
	*arr = p;
	*cap = c;
	return 0;
}

/* The entry for exactly [iova, iova + size), or NULL. */
static struct kv_map *table_find(struct kv_as *as, uint64_t iova, uint64_t size)
{
	for (size_t i = 0; i < as->nmaps; i++)
		if (as->maps[i].iova == iova && as->maps[i].size == size)
			return &as->maps[i];
	return NULL;
}

static int table_add(struct kv_dev *k, uint64_t iova, uint64_t size, void *mapped)
{
	struct kv_as *as = k->as;

	if (grow((void **)&as->maps, &as->maps_cap, as->nmaps, sizeof(*as->maps)))
		return -ENOMEM;
	as->maps[as->nmaps++] = (struct kv_map){ iova, size, mapped, 1 };
	return 0;
}

/* Drops table entries inside [iova, iova + size), unmapping our mmap()s. */
static void table_remove(struct kv_dev *k, uint64_t iova, uint64_t size)
{
	size_t out = 0;

	for (size_t i = 0; i < k->as->nmaps; i++) {
		struct kv_map *m = &k->as->maps[i];

		if (m->iova >= iova && m->iova + m->size <= iova + size) {
			if (m->mapped)
				k->sys->munmap(k->sys->opaque, m->mapped, m->size);
			continue;
		}
		k->as->maps[out++] = *m;
	}
	k->as->nmaps = out;
}

/* 1: every entry inside the range is also another device's; 0: none is; -1: some are. */
static int table_shared(const struct kv_as *as, uint64_t iova, uint64_t size)
{
	bool some = false, all = true;

	for (size_t i = 0; i < as->nmaps; i++) {
		const struct kv_map *m = &as->maps[i];

		if (m->iova >= iova && m->iova + m->size <= iova + size) {
			some |= m->refs > 1;
			all &= m->refs > 1;
		}
	}
	return some ? (all ? 1 : -1) : 0;
}

static void table_release(struct kv_as *as, uint64_t iova, uint64_t size)
{
	for (size_t i = 0; i < as->nmaps; i++)
		if (as->maps[i].iova >= iova && as->maps[i].iova + as->maps[i].size <= iova + size)
			as->maps[i].refs--;
}

static int mine_add(struct kv_dev *k, uint64_t iova, uint64_t size)
{
	if (grow((void **)&k->mine, &k->mine_cap, k->nmine, sizeof(*k->mine)))
		return -ENOMEM;
	k->mine[k->nmine++] = (struct vfm_iova_range){ iova, size };
	return 0;
}

static void mine_remove(struct kv_dev *k, uint64_t iova, uint64_t size)
{
	size_t out = 0;

	for (size_t i = 0; i < k->nmine; i++)
		if (!(k->mine[i].iova >= iova && k->mine[i].iova + k->mine[i].length <= iova + size))
			k->mine[out++] = k->mine[i];
	k->nmine = out;
}

static void kernel_unmap(struct kv_dev *k, uint64_t iova, uint64_t size)
{
	if (k->iommu == KV_IOMMUFD) {
		struct iommu_ioas_unmap u = { .size = sizeof(u), .ioas_id = k->ioas_id,
					      .iova = iova, .length = size };
		kv_ioctl(k, k->iommufd, IOMMU_IOAS_UNMAP, &u);
	} else {
		struct vfio_iommu_type1_dma_unmap u = { .argsz = sizeof(u), .iova = iova,
							.size = size };
		kv_ioctl(k, k->container, VFIO_IOMMU_UNMAP_DMA, &u);
	}
}

/*
 * Whether [iova, iova + size) lies in one range the IOMMU can map. Guest RAM
 * laid out as one range from 0 crosses x86's MSI window (0xfee00000, reserved
 * by the IOMMU) once it reaches 4 GiB: refused here, with the ranges named,
 * rather than by an opaque EINVAL/ENOSPC from the kernel.
 */
static int iova_check(const struct kv_dev *k, uint64_t iova, uint64_t size, struct vfm_error *err)
{
	uint64_t last = iova + size - 1;
	char holes[160] = "";
	size_t at = 0;

	if (!k->as->niova_ok || !size)
		return 0;
	for (uint32_t i = 0; i < k->as->niova_ok; i++) {
		uint64_t s = k->as->iova_ok[i].iova, l = s + k->as->iova_ok[i].length - 1;

		if (iova >= s && last <= l)
			return 0;
		if (i + 1 < k->as->niova_ok && at < sizeof(holes) - 40)
			at += (size_t)snprintf(holes + at, sizeof(holes) - at, "%s0x%" PRIx64 "-0x%"
					       PRIx64, at ? ", " : "", l + 1,
					       k->as->iova_ok[i + 1].iova - 1);
	}
	return vfm_error_set(err, -ERANGE, "%s: DMA map 0x%" PRIx64 "+0x%" PRIx64 " is not in "
			     "an IOVA range the IOMMU can map (reserved: %s; on x86 the MSI "
			     "window 0xfee00000): lay guest memory out around it", k->id, iova,
			     size, at ? holes : "outside its ranges");
}

static int type1_bitmap(struct kv_dev *k, uint64_t iova, uint64_t length, uint64_t page_size,
			uint64_t *bitmap, struct vfm_error *err);

/* ---- Map / unmap ---- */

static int map_locked(struct kv_dev *k, const struct vfm_dma_map *map, void *va,
		      struct vfm_error *err)
{
	int r;

	if (k->iommu == KV_IOMMUFD) {
		struct iommu_ioas_map m = {
			.size = sizeof(m), .flags = IOMMU_IOAS_MAP_FIXED_IOVA, .ioas_id = k->ioas_id,
			.user_va = (uintptr_t)va, .length = map->size, .iova = map->iova,
		};

		if (map->prot & VFM_DMA_READ)
			m.flags |= IOMMU_IOAS_MAP_READABLE;
		if (map->prot & VFM_DMA_WRITE)
			m.flags |= IOMMU_IOAS_MAP_WRITEABLE;
		r = kv_ioctl(k, k->iommufd, IOMMU_IOAS_MAP, &m);
		if (r)
			return vfm_error_set(err, r, "%s: IOMMU_IOAS_MAP 0x%" PRIx64 "+0x%" PRIx64
					     ": %s", k->id, map->iova, map->size, strerror(-r));
	} else {
		struct vfio_iommu_type1_dma_map m = {
			.argsz = sizeof(m), .vaddr = (uintptr_t)va, .iova = map->iova,
			.size = map->size,
		};

		if (map->prot & VFM_DMA_READ)
			m.flags |= VFIO_DMA_MAP_FLAG_READ;
		if (map->prot & VFM_DMA_WRITE)
			m.flags |= VFIO_DMA_MAP_FLAG_WRITE;
		r = kv_ioctl(k, k->container, VFIO_IOMMU_MAP_DMA, &m);
		if (r)
			return vfm_error_set(err, r, "%s: VFIO_IOMMU_MAP_DMA 0x%" PRIx64 "+0x%" PRIx64
					     ": %s", k->id, map->iova, map->size, strerror(-r));
	}
	return 0;
}

int kv_dma_map(struct vfm_device *dev, const struct vfm_dma_map *map, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	void *va = map->vaddr, *mapped = NULL;
	struct kv_map *m;
	int r;

	if (!va) {
		int merr = -EINVAL;

		if (map->fd < 0)
			return vfm_error_set(err, -EINVAL, "%s: DMA map without address or fd", k->id);
		/* The IOMMU pins pages of our address space: map the fd here. */
		mapped = k->sys->mmap(k->sys->opaque, NULL, map->size, PROT_READ | PROT_WRITE,
				      MAP_SHARED, map->fd, (off_t)map->fd_offset, &merr);
		if (mapped == MAP_FAILED)
			return vfm_error_set(err, merr, "%s: mmap of the DMA fd: %s", k->id,
					     strerror(-merr));
		va = mapped;
	}
	r = iova_check(k, map->iova, map->size, err);
	if (r) {
		if (mapped)
			k->sys->munmap(k->sys->opaque, mapped, map->size);
		return r;
	}
	pthread_mutex_lock(&k->as->lock);
	if ((m = table_find(k->as, map->iova, map->size))) {
		/* Another device of this address space mapped it: count, once in the kernel. */
		if (mine_add(k, map->iova, map->size)) {
			r = vfm_error_set(err, -ENOMEM, "%s: no memory for the DMA map table", k->id);
		} else {
			m->refs++;
			r = 0;
		}
		pthread_mutex_unlock(&k->as->lock);
		if (mapped)
			k->sys->munmap(k->sys->opaque, mapped, map->size);
		return r;
	}
	r = map_locked(k, map, va, err);
	if (!r && (table_add(k, map->iova, map->size, mapped) ||
		   mine_add(k, map->iova, map->size))) {
		r = vfm_error_set(err, -ENOMEM, "%s: no memory for the DMA map table", k->id);
		/* Keep the kernel and the tables in step. */
		kernel_unmap(k, map->iova, map->size);
		if ((m = table_find(k->as, map->iova, map->size)))
			*m = k->as->maps[--k->as->nmaps];
	}
	pthread_mutex_unlock(&k->as->lock);
	if (r && mapped)
		k->sys->munmap(k->sys->opaque, mapped, map->size);
	return r;
}

static int hwpt_bitmap(struct kv_dev *k, uint64_t iova, uint64_t length, uint64_t page_size,
		       uint32_t flags, uint64_t *bitmap, struct vfm_error *err)
{
	uint64_t bytes = bitmap_bytes(length, page_size);
	uint64_t *tmp = calloc(1, bytes);
	struct iommu_hwpt_get_dirty_bitmap g = {
		.size = sizeof(g), .hwpt_id = k->hwpt_id, .flags = flags, .iova = iova,
		.length = length, .page_size = page_size, .data = (uintptr_t)tmp,
	};
	int r;

	if (!tmp)
		return vfm_error_set(err, -ENOMEM, "%s: no memory for a dirty bitmap", k->id);
	r = kv_ioctl(k, k->iommufd, IOMMU_HWPT_GET_DIRTY_BITMAP, &g);
	if (r)
		vfm_error_set(err, r, "%s: IOMMU_HWPT_GET_DIRTY_BITMAP: %s", k->id, strerror(-r));
	else
		or_into(bitmap, tmp, bytes);
	free(tmp);
	return r;
}

/*
 * The dirty bits of a range about to be unmapped (iommufd: read before the
 * unmap; type1 does both in one ioctl, below). The IOMMU's log when it is on,
 * else the device's own DMA log, else everything: a lost bit would lose data.
 */
static void unmap_dirty_before(struct kv_dev *k, struct vfm_device *dev, uint64_t iova,
			       uint64_t size, uint64_t page_size, uint64_t *bitmap)
{
	struct vfm_error e = { 0 };

	if (k->iommu_dirty_on && k->iommu == KV_IOMMUFD) {
		if (hwpt_bitmap(k, iova, size, page_size, IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
				bitmap, &e) == 0)
			return;
	} else if (!k->iommu_dirty_on && k->dev_log_on) {
		if (kv_log_ops.report(dev, iova, size, page_size, bitmap, &e) == 0)
			return;
	} else if (k->iommu_dirty_on) {
		return;   /* type1: the unmap itself reports */
	}
	if (e.msg[0])
		vfm_warn(k->id, "dirty bits of 0x%" PRIx64 "+0x%" PRIx64 " lost (%s): all dirty",
			 iova, size, e.msg);
	set_all(bitmap, size, page_size);
}

static int unmap_type1(struct kv_dev *k, uint64_t iova, uint64_t size, uint64_t page_size,
		       uint64_t *bitmap, struct vfm_error *err)
{
	/* The unmap header with its flexible data[] holding a vfio_bitmap (a
	 * struct with a flexible member cannot be followed by another field in
	 * ISO C: bytes, the bitmap copied in after the header). */
	union {
		struct vfio_iommu_type1_dma_unmap u;
		unsigned char raw[sizeof(struct vfio_iommu_type1_dma_unmap) + sizeof(struct vfio_bitmap)];
	} req = { .u = { .argsz = sizeof(req.u), .iova = iova, .size = size } };
	uint64_t bytes = 0, *tmp = NULL;
	int r;

	if (bitmap && k->iommu_dirty_on) {
		bytes = bitmap_bytes(size, page_size);
		tmp = calloc(1, bytes);
		if (tmp) {
			struct vfio_bitmap b = { page_size, bytes, (__u64 *)tmp };

			req.u.argsz = sizeof(req.raw);
			req.u.flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
			memcpy(req.raw + sizeof(req.u), &b, sizeof(b));
		}
	}
	r = kv_ioctl(k, k->container, VFIO_IOMMU_UNMAP_DMA, &req);
	if (r && req.u.flags) {
		vfm_warn(k->id, "unmap with dirty bitmap failed (%s): plain unmap, all dirty",
			 strerror(-r));
		req.u = (struct vfio_iommu_type1_dma_unmap){ .argsz = sizeof(req.u), .iova = iova,
							     .size = size };
		r = kv_ioctl(k, k->container, VFIO_IOMMU_UNMAP_DMA, &req);
		free(tmp);
		tmp = NULL;
	}
	if (!r && bitmap) {
		if (tmp)
			or_into(bitmap, tmp, bytes);
		else
			set_all(bitmap, size, page_size);
	}
	free(tmp);
	if (r)
		return vfm_error_set(err, r, "%s: VFIO_IOMMU_UNMAP_DMA 0x%" PRIx64 "+0x%" PRIx64
				     ": %s", k->id, iova, size, strerror(-r));
	return 0;
}

int kv_dma_unmap(struct vfm_device *dev, uint64_t iova, uint64_t size, uint64_t page_size,
		 uint64_t *dirty_bitmap, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	int r;

	if (dirty_bitmap && !range_ok(iova, size, page_size))
		return vfm_error_set(err, -EINVAL, "%s: unaligned DMA unmap with a dirty bitmap",
				     k->id);
	pthread_mutex_lock(&k->as->lock);
	r = table_shared(k->as, iova, size);
	if (r) {
		/* Still another device's: only this device's hold goes. Its dirty
		 * bits are read without the unmap that would otherwise report them. */
		if (r < 0) {
			pthread_mutex_unlock(&k->as->lock);
			return vfm_error_set(err, -EBUSY, "%s: DMA unmap 0x%" PRIx64 "+0x%" PRIx64
					     " covers ranges other devices mapped differently",
					     k->id, iova, size);
		}
		if (dirty_bitmap && !(k->iommu == KV_TYPE1 && k->iommu_dirty_on &&
				      type1_bitmap(k, iova, size, page_size, dirty_bitmap, NULL) == 0))
			unmap_dirty_before(k, dev, iova, size, page_size, dirty_bitmap);
		table_release(k->as, iova, size);
		mine_remove(k, iova, size);
		pthread_mutex_unlock(&k->as->lock);
		return 0;
	}
	if (k->iommu == KV_IOMMUFD) {
		struct iommu_ioas_unmap u = { .size = sizeof(u), .ioas_id = k->ioas_id,
					      .iova = iova, .length = size };

		if (dirty_bitmap)
			unmap_dirty_before(k, dev, iova, size, page_size, dirty_bitmap);
		r = kv_ioctl(k, k->iommufd, IOMMU_IOAS_UNMAP, &u);
		if (r)
			vfm_error_set(err, r, "%s: IOMMU_IOAS_UNMAP 0x%" PRIx64 "+0x%" PRIx64 ": %s",
				      k->id, iova, size, strerror(-r));
	} else {
		bool in_unmap = dirty_bitmap && k->iommu_dirty_on;

		if (dirty_bitmap && !in_unmap)
			unmap_dirty_before(k, dev, iova, size, page_size, dirty_bitmap);
		r = unmap_type1(k, iova, size, page_size, in_unmap ? dirty_bitmap : NULL, err);
	}
	if (!r) {
		table_remove(k, iova, size);
		mine_remove(k, iova, size);
	}
	pthread_mutex_unlock(&k->as->lock);
	return r;
}

void kv_dma_cleanup(struct kv_dev *k)
{
	/* What only this device held is unmapped now (the address space may live
	 * on); the rest loses one holder. Closing the IOAS or container with the
	 * last device drops whatever is left (kv_as_put). */
	pthread_mutex_lock(&k->as->lock);
	for (size_t i = 0; i < k->nmine; i++) {
		struct kv_map *m = table_find(k->as, k->mine[i].iova, k->mine[i].length);

		if (m && m->refs > 1) {
			m->refs--;
		} else if (m) {
			kernel_unmap(k, m->iova, m->size);
			table_remove(k, m->iova, m->size);
		}
	}
	k->nmine = 0;
	if (k->iommu_dirty_on && k->iommu == KV_TYPE1 && k->as->dirty_users &&
	    !--k->as->dirty_users) {
		struct vfio_iommu_type1_dirty_bitmap d = {
			.argsz = sizeof(d), .flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP };

		kv_ioctl(k, k->container, VFIO_IOMMU_DIRTY_PAGES, &d);
	}
	k->iommu_dirty_on = false;
	pthread_mutex_unlock(&k->as->lock);
}

/* ---- IOMMU dirty tracking ---- */

/* Keeps the valid IOVA ranges: n of them, each [start, last]. */
static void set_ranges(struct kv_dev *k, const void *src, size_t stride, uint32_t n)
{
	free(k->as->iova_ok);
	k->as->iova_ok = NULL;
	k->as->niova_ok = 0;
	if (!n || !(k->as->iova_ok = calloc(n, sizeof(*k->as->iova_ok))))
		return;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t se[2];

		memcpy(se, (const char *)src + i * stride, sizeof(se));
		k->as->iova_ok[i] = (struct vfm_iova_range){ se[0], se[1] - se[0] + 1 };
	}
	k->as->niova_ok = n;
}

/*
 * VFIO_IOMMU_GET_INFO answers with the argsz it needs when ours is short
 * (drivers/vfio/vfio_iommu_type1.c vfio_iommu_type1_get_info): ask, then ask
 * again with that much room, and walk the whole cap chain.
 */
void kv_type1_probe(struct kv_dev *k)
{
	struct vfio_iommu_type1_info first = { .argsz = sizeof(first) }, *info;
	uint32_t off, size;

	if (kv_ioctl(k, k->container, VFIO_IOMMU_GET_INFO, &first))
		return;
	size = first.argsz > sizeof(first) ? first.argsz : sizeof(first);
	if (size > (1u << 20) || !(info = calloc(1, size)))
		return;
	info->argsz = size;
	if (kv_ioctl(k, k->container, VFIO_IOMMU_GET_INFO, info) ||
	    !(info->flags & VFIO_IOMMU_INFO_CAPS)) {
		free(info);
		return;
	}
	pthread_mutex_lock(&k->as->lock);   /* the address space's, other devices read it */
	k->as->type1_dirty = false;
	for (off = info->cap_offset;
	     off >= sizeof(*info) && off + sizeof(struct vfio_info_cap_header) <= size;) {
		struct vfio_info_cap_header h;

		memcpy(&h, (char *)info + off, sizeof(h));
		if (h.id == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION &&
		    off + sizeof(struct vfio_iommu_type1_info_cap_migration) <= size) {
			struct vfio_iommu_type1_info_cap_migration m;

			memcpy(&m, (char *)info + off, sizeof(m));
			k->as->type1_dirty = true;
			/* Bitmaps are asked in the smallest page size the IOMMU tracks. */
			k->as->dirty_pgsize = m.pgsize_bitmap ? m.pgsize_bitmap & -m.pgsize_bitmap : 0;
		} else if (h.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE &&
			   off + sizeof(struct vfio_iommu_type1_info_cap_iova_range) <= size) {
			struct vfio_iommu_type1_info_cap_iova_range r;
			size_t room = size - off - sizeof(r);

			memcpy(&r, (char *)info + off, sizeof(r));
			if (r.nr_iovas <= room / sizeof(struct vfio_iova_range))
				set_ranges(k, (char *)info + off + sizeof(r),
					   sizeof(struct vfio_iova_range), r.nr_iovas);
		}
		if (h.next <= off)
			break;
		off = h.next;
	}
	pthread_mutex_unlock(&k->as->lock);
	free(info);
}

void kv_iommufd_probe_ranges(struct kv_dev *k)
{
	struct iommu_ioas_iova_ranges q = { .size = sizeof(q), .ioas_id = k->ioas_id };
	struct iommu_iova_range *r;

	/* -EMSGSIZE with num_iovas set: how many there are. */
	if (kv_ioctl(k, k->iommufd, IOMMU_IOAS_IOVA_RANGES, &q) != -EMSGSIZE || !q.num_iovas ||
	    q.num_iovas > 4096 || !(r = calloc(q.num_iovas, sizeof(*r))))
		return;
	q.allowed_iovas = (uintptr_t)r;
	pthread_mutex_lock(&k->as->lock);
	if (kv_ioctl(k, k->iommufd, IOMMU_IOAS_IOVA_RANGES, &q) == 0)
		set_ranges(k, r, sizeof(*r), q.num_iovas);
	pthread_mutex_unlock(&k->as->lock);
	free(r);
}

bool vfm_vfio_iommu_dirty_supported(const struct vfm_device *dev)
{
	const struct kv_dev *k;

	if (!vfm_device_is_vfio(dev))
		return false;
	k = vfm_device_priv(dev);
	return k->iommu == KV_IOMMUFD ? k->hwpt_dirty : k->as->type1_dirty;
}

/*
 * type1 knows only the pages mdevs pin: once a device of an IOMMU-backed
 * group is in the container, every report marks every mapped page dirty
 * (vfio_iommu_type1.c update_user_bitmap(), num_non_pinned_groups).
 */
bool vfm_vfio_iommu_dirty_exact(const struct vfm_device *dev)
{
	struct kv_dev *k;
	bool exact;

	if (!vfm_vfio_iommu_dirty_supported(dev))
		return false;
	k = vfm_device_priv(dev);
	if (k->iommu == KV_IOMMUFD)
		return true;
	pthread_mutex_lock(&k->as->lock);
	exact = k->as->iommu_backed == 0;
	pthread_mutex_unlock(&k->as->lock);
	return exact;
}

/*
 * iommufd: this device's own HWPT. type1: the shared container's tracking,
 * counted: started by the first device that asks, stopped with the last.
 */
static int dirty_switch(struct vfm_device *dev, bool on, struct vfm_error *err)
{
	struct kv_dev *k;
	int r = 0;

	if (!vfm_vfio_iommu_dirty_supported(dev))
		return vfm_error_set(err, -ENOTSUP, "%s: the IOMMU cannot track dirty pages",
				     vfm_device_id(dev));
	k = kv_of(dev);
	pthread_mutex_lock(&k->as->lock);
	if (k->iommu == KV_IOMMUFD) {
		struct iommu_hwpt_set_dirty_tracking s = {
			.size = sizeof(s), .flags = on ? IOMMU_HWPT_DIRTY_TRACKING_ENABLE : 0,
			.hwpt_id = k->hwpt_id,
		};
		r = kv_ioctl(k, k->iommufd, IOMMU_HWPT_SET_DIRTY_TRACKING, &s);
	} else if (on != k->iommu_dirty_on &&
		   (on ? k->as->dirty_users == 0 : k->as->dirty_users == 1)) {
		struct vfio_iommu_type1_dirty_bitmap d = {
			.argsz = sizeof(d),
			.flags = on ? VFIO_IOMMU_DIRTY_PAGES_FLAG_START : VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
		};
		r = kv_ioctl(k, k->container, VFIO_IOMMU_DIRTY_PAGES, &d);
	}
	if (!r && k->iommu == KV_TYPE1 && on != k->iommu_dirty_on)
		k->as->dirty_users += on ? 1 : -1;
	if (!r)
		k->iommu_dirty_on = on;
	pthread_mutex_unlock(&k->as->lock);
	if (r)
		return vfm_error_set(err, r, "%s: IOMMU dirty tracking %s: %s", k->id,
				     on ? "start" : "stop", strerror(-r));
	vfm_debug(k->id, "IOMMU dirty tracking %s", on ? "on" : "off");
	return 0;
}

int vfm_vfio_iommu_dirty_start(struct vfm_device *dev, struct vfm_error *err)
{
	return dirty_switch(dev, true, err);
}

int vfm_vfio_iommu_dirty_stop(struct vfm_device *dev, struct vfm_error *err)
{
	return dirty_switch(dev, false, err);
}

/*
 * type1 takes only its smallest tracked page size (vfio_iommu_type1.c
 * vfio_iommu_type1_dirty_pages: "pgsize != 1 << __ffs(iommu->pgsize_bitmap)"
 * is EINVAL). When that is larger than the caller's pages, the bitmap is
 * asked in the IOMMU's pages and each dirty one marks all the caller's pages
 * it holds.
 */
static int type1_bitmap(struct kv_dev *k, uint64_t iova, uint64_t length, uint64_t page_size,
			uint64_t *bitmap, struct vfm_error *err)
{
	uint64_t pg = k->as->dirty_pgsize > page_size ? k->as->dirty_pgsize : page_size;
	uint64_t bytes, *tmp;
	/* The header with its flexible data[] holding the GET range (bytes,
	 * as in unmap_type1). */
	union {
		struct vfio_iommu_type1_dirty_bitmap d;
		unsigned char raw[sizeof(struct vfio_iommu_type1_dirty_bitmap) +
				  sizeof(struct vfio_iommu_type1_dirty_bitmap_get)];
	} req;
	struct vfio_iommu_type1_dirty_bitmap_get g;
	int r;

	if ((iova | length) & (pg - 1))
		return vfm_error_set(err, -EINVAL, "%s: dirty range 0x%" PRIx64 "+0x%" PRIx64
				     " not aligned to the IOMMU's 0x%" PRIx64 "-byte pages", k->id,
				     iova, length, pg);
	bytes = bitmap_bytes(length, pg);
	tmp = calloc(1, bytes);
	if (!tmp)
		return vfm_error_set(err, -ENOMEM, "%s: no memory for a dirty bitmap", k->id);
	req.d = (struct vfio_iommu_type1_dirty_bitmap){
		.argsz = sizeof(req.raw), .flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP };
	g = (struct vfio_iommu_type1_dirty_bitmap_get){
		.iova = iova, .size = length, .bitmap = { pg, bytes, (__u64 *)tmp } };
	memcpy(req.raw + sizeof(req.d), &g, sizeof(g));
	r = kv_ioctl(k, k->container, VFIO_IOMMU_DIRTY_PAGES, &req);
	if (r) {
		vfm_error_set(err, r, "%s: VFIO_IOMMU_DIRTY_PAGES GET_BITMAP: %s", k->id,
			      strerror(-r));
	} else if (pg == page_size) {
		or_into(bitmap, tmp, bytes);
	} else {
		uint64_t per = pg / page_size;

		for (uint64_t i = 0; i < length / pg; i++)
			if (tmp[i / 64] >> (i % 64) & 1)
				for (uint64_t j = i * per; j < (i + 1) * per; j++)
					bitmap[j / 64] |= 1ull << (j % 64);
	}
	free(tmp);
	return r;
}

int vfm_vfio_iommu_dirty_report(struct vfm_device *dev, uint64_t iova, uint64_t length,
				uint64_t page_size, uint64_t *bitmap, struct vfm_error *err)
{
	struct kv_dev *k;
	int r;

	if (!vfm_device_is_vfio(dev))
		return vfm_error_set(err, -EINVAL, "not a kernel VFIO device");
	k = kv_of(dev);
	if (!bitmap || !range_ok(iova, length, page_size))
		return vfm_error_set(err, -EINVAL, "%s: bad dirty report range", k->id);
	pthread_mutex_lock(&k->as->lock);
	if (!k->iommu_dirty_on)
		r = vfm_error_set(err, -EINVAL, "%s: IOMMU dirty tracking is off", k->id);
	else if (k->iommu == KV_IOMMUFD)
		r = hwpt_bitmap(k, iova, length, page_size, 0, bitmap, err);
	else
		r = type1_bitmap(k, iova, length, page_size, bitmap, err);
	pthread_mutex_unlock(&k->as->lock);
	return r;
}
