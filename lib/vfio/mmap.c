/*
 * Regions mapped into this process (vfm_device_region_areas). A region the
 * kernel offers for mmap (VFIO_REGION_INFO_FLAG_MMAP) is mapped whole, or
 * only the areas of its sparse-mmap capability when it has one (vfio-pci
 * leaves a BAR's MSI-X table out of them: vfio_pci_ioctl_get_region_info()
 * in drivers/vfio/pci/vfio_pci_core.c), MAP_SHARED at the region's offset in
 * the device fd, on the first request; unmapped at close.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "util/logging.h"
#include "vfio/priv.h"

#define KV_MAX_AREAS 16u
#define KV_REGION_INFO_MAX 4096u   /* region info with its capability chain */

static pthread_mutex_t map_lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * The sparse-mmap capability of region index: 1 with its areas (up to max,
 * *n of them, possibly 0: nothing may be mapped), 0 without one (the whole
 * region), or an error. The region info is asked again with room for its
 * capability chain (the first ask at open passed none).
 */
static int sparse_areas(struct kv_dev *k, uint32_t index, struct vfm_region_area *out,
			unsigned max, unsigned *n, struct vfm_error *err)
{
	union {
		struct vfio_region_info ri;
		uint64_t align[KV_REGION_INFO_MAX / 8];
	} buf;
	uint32_t off, hops = 0;
	int r;

	memset(&buf, 0, sizeof(buf));
	buf.ri.argsz = sizeof(buf);
	buf.ri.index = index;
	r = kv_ioctl(k, k->devfd, VFIO_DEVICE_GET_REGION_INFO, &buf.ri);
	if (r)
		return vfm_error_set(err, r, "%s: region %" PRIu32 " info: %s", k->id, index,
				     strerror(-r));
	if (!(buf.ri.flags & VFIO_REGION_INFO_FLAG_CAPS) || !buf.ri.cap_offset)
		return 0;
	if (buf.ri.argsz > sizeof(buf))
		return vfm_error_set(err, -E2BIG, "%s: region %" PRIu32 " capabilities need %"
				     PRIu32 " bytes (at most %u)", k->id, index, buf.ri.argsz,
				     KV_REGION_INFO_MAX);
	for (off = buf.ri.cap_offset; off; hops++) {
		const struct vfio_info_cap_header *h;
		const struct vfio_region_info_cap_sparse_mmap *sm;

		if (hops > 64 || off < sizeof(buf.ri) || off > sizeof(buf) - sizeof(*h) || off % 4)
			return vfm_error_set(err, VFM_EPROTOCOL, "%s: region %" PRIu32
					     " capability chain broken at %" PRIu32, k->id, index, off);
		h = (const void *)((const char *)&buf + off);
		if (h->id != VFIO_REGION_INFO_CAP_SPARSE_MMAP) {
			off = h->next;
			continue;
		}
		sm = (const void *)h;
		if (off + sizeof(*sm) > sizeof(buf) ||
		    sm->nr_areas > (sizeof(buf) - off - sizeof(*sm)) / sizeof(sm->areas[0]))
			return vfm_error_set(err, VFM_EPROTOCOL, "%s: region %" PRIu32 " sparse "
					     "mmap capability overruns", k->id, index);
		*n = 0;
		for (uint32_t i = 0; i < sm->nr_areas && *n < max; i++) {
			if (!sm->areas[i].size)
				continue;
			out[*n].offset = sm->areas[i].offset;
			out[*n].size = sm->areas[i].size;
			out[*n].ptr = NULL;
			(*n)++;
		}
		return 1;
	}
	return 0;
}

static int by_offset(const void *a, const void *b)
{
	const struct vfm_region_area *x = a, *y = b;

	return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static void unmap_areas(struct kv_dev *k, struct kv_region *reg)
{
	for (unsigned i = 0; i < reg->nareas; i++)
		if (reg->areas[i].ptr)
			k->sys->munmap(k->sys->opaque, reg->areas[i].ptr, reg->areas[i].size);
	free(reg->areas);
	reg->areas = NULL;
	reg->nareas = 0;
	reg->mapped = false;
}

static int map_region(struct kv_dev *k, struct kv_region *reg, struct vfm_error *err)
{
	struct vfm_region_area a[KV_MAX_AREAS];
	uint32_t index = reg->info.index;
	int prot = (reg->info.flags & VFM_REGION_READ ? PROT_READ : 0) |
		   (reg->info.flags & VFM_REGION_WRITE ? PROT_WRITE : 0);
	unsigned n = 0;
	int r;

	if (reg->info.flags & VFM_REGION_MMAP) {
		r = sparse_areas(k, index, a, KV_MAX_AREAS, &n, err);
		if (r < 0)
			return r;
		if (r == 0) {
			a[0] = (struct vfm_region_area){ 0, reg->info.size, NULL };
			n = 1;
		}
	}
	qsort(a, n, sizeof(a[0]), by_offset);
	reg->areas = calloc(n ? n : 1, sizeof(*reg->areas));
	if (!reg->areas)
		return vfm_error_set(err, -ENOMEM, "%s: no memory for region areas", k->id);
	for (unsigned i = 0; i < n; i++) {
		int e = 0;
		void *p;

		if (a[i].offset > reg->info.size || a[i].size > reg->info.size - a[i].offset ||
		    a[i].offset % 4096 || a[i].size % 4096) {
			unmap_areas(k, reg);
			return vfm_error_set(err, VFM_EPROTOCOL, "%s: region %" PRIu32 " mmap area "
					     "0x%" PRIx64 "+0x%" PRIx64 " is not page-aligned inside "
					     "its 0x%" PRIx64 " bytes", k->id, index, a[i].offset,
					     a[i].size, reg->info.size);
		}
		p = k->sys->mmap(k->sys->opaque, NULL, a[i].size, prot, MAP_SHARED, k->devfd,
				 (off_t)(reg->offset + a[i].offset), &e);
		if (p == MAP_FAILED) {
			unmap_areas(k, reg);
			return vfm_error_set(err, e ? e : -EIO, "%s: mmap of region %" PRIu32
					     " 0x%" PRIx64 "+0x%" PRIx64 ": %s", k->id, index,
					     a[i].offset, a[i].size, strerror(e ? -e : EIO));
		}
		reg->areas[i] = (struct vfm_region_area){ a[i].offset, a[i].size, p };
		reg->nareas = i + 1;
	}
	reg->mapped = true;
	vfm_debug(k->id, "region %" PRIu32 ": %u area(s) mapped", index, n);
	return 0;
}

int kv_region_areas(struct vfm_device *dev, uint32_t index, struct vfm_region_area *areas,
		    unsigned max, unsigned *count, struct vfm_error *err)
{
	struct kv_dev *k = kv_of(dev);
	struct kv_region *reg;
	int r = 0;

	if (index >= k->nregions || !k->regions[index].info.size)
		return vfm_error_set(err, -EINVAL, "%s: no region %" PRIu32, k->id, index);
	reg = &k->regions[index];
	pthread_mutex_lock(&map_lock);
	if (!reg->mapped)
		r = map_region(k, reg, err);
	if (!r) {
		*count = reg->nareas;
		for (unsigned i = 0; i < reg->nareas && i < max; i++)
			areas[i] = reg->areas[i];
	}
	pthread_mutex_unlock(&map_lock);
	return r;
}

void kv_unmap_regions(struct kv_dev *k)
{
	pthread_mutex_lock(&map_lock);
	for (uint32_t i = 0; k->regions && i < k->nregions; i++)
		if (k->regions[i].mapped)
			unmap_areas(k, &k->regions[i]);
	pthread_mutex_unlock(&map_lock);
}
