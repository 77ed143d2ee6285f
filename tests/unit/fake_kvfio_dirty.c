/*
 * The fake kernel's trackers: device DMA logging (ranges with real bitmaps)
 * and the IOMMU side's mappings with their dirty bits (iommufd HWPT, type1).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "fake_kvfio_priv.h"

/* ---- DMA logging and IOMMU dirty bits ---- */

static bool pow2_pg(uint64_t pg)
{
	return pg >= PG && !(pg & (pg - 1));
}

void fkv_log_free(struct fake_kvfio *fk)
{
	for (uint32_t i = 0; i < fk->nlr; i++)
		free(fk->lr[i].bits);
	fk->nlr = 0;
	fk->logging = false;
}

int fkv_log_start(struct fake_kvfio *fk, struct vfio_device_feature_dma_logging_control *c)
{
	const struct vfio_device_feature_dma_logging_range *r =
		(const void *)(uintptr_t)c->ranges;

	if (fk->logging)
		return -EBUSY;
	if (!c->num_ranges)
		return -EINVAL;
	if (c->num_ranges > VFM_VFIO_LOG_MAX_RANGES)
		return -E2BIG;
	if (!pow2_pg(c->page_size))
		return -EINVAL;
	for (uint32_t i = 0; i < c->num_ranges; i++) {
		if (!r[i].length || (r[i].iova | r[i].length) & (c->page_size - 1))
			return -EINVAL;
		for (uint32_t j = 0; j < i; j++)
			if (r[i].iova < r[j].iova + r[j].length && r[j].iova < r[i].iova + r[i].length)
				return -EINVAL;
	}
	fk->log_pg = c->page_size;
	for (uint32_t i = 0; i < c->num_ranges; i++) {
		uint64_t pages = r[i].length / c->page_size;

		fk->lr[i] = (struct lrange){ r[i].iova, r[i].length,
					     calloc((pages + 63) / 64, 8) };
		fk->nlr = i + 1;
		if (!fk->lr[i].bits) {
			fkv_log_free(fk);
			return -ENOMEM;
		}
	}
	fk->logging = true;
	fk->st.log_ranges = c->num_ranges;
	fk->st.log_page_size = c->page_size;
	return 0;
}

static void set_bits(uint64_t *bm, uint64_t base, uint64_t pg, uint64_t lo, uint64_t hi)
{
	for (uint64_t b = (lo - base) / pg; b <= (hi - 1 - base) / pg; b++)
		bm[b / 64] |= 1ull << (b % 64);
}

int fkv_log_report(struct fake_kvfio *fk, struct vfio_device_feature_dma_logging_report *q)
{
	uint64_t end = q->iova + q->length;
	uint64_t *out = (uint64_t *)(uintptr_t)q->bitmap;

	/* log_report_when_off: samples/vfio-mdev/mtty.c mtty_log_read_and_clear()
	 * returns 0 and leaves the bitmap as the caller passed it. */
	if (!fk->logging)
		return fk->cfg.log_report_when_off ? 0 : -EINVAL;
	if (!pow2_pg(q->page_size) || !q->length)
		return -EINVAL;
	if (end < q->iova)
		return -EOVERFLOW;
	for (uint32_t i = 0; i < fk->nlr; i++) {
		struct lrange *l = &fk->lr[i];

		for (uint64_t b = 0; b < l->len / fk->log_pg; b++) {
			uint64_t ps = l->iova + b * fk->log_pg, pe = ps + fk->log_pg;

			if (!(l->bits[b / 64] & (1ull << (b % 64))) || pe <= q->iova || ps >= end)
				continue;
			/* Only set bits, never clear (the kernel's iova_bitmap). */
			set_bits(out, q->iova, q->page_size, ps > q->iova ? ps : q->iova,
				 pe < end ? pe : end);
			if (ps >= q->iova && pe <= end)
				l->bits[b / 64] &= ~(1ull << (b % 64));
		}
	}
	return 0;
}

static struct fmap *map_at(struct fake_kvfio *fk, uint64_t iova, uint64_t len)
{
	for (unsigned i = 0; i < fk->nmaps; i++)
		if (iova >= fk->maps[i].iova && iova + len <= fk->maps[i].iova + fk->maps[i].size)
			return &fk->maps[i];
	return NULL;
}

int fake_kvfio_dma_write(struct fake_kvfio *fk, uint64_t iova, const void *data, uint64_t len)
{
	struct fmap *m = map_at(fk, iova, len);

	if (!m || !len)
		return -EFAULT;
	memcpy(m->va + (iova - m->iova), data, len);
	if (fk->iommu_dirty)
		set_bits(m->dirty, m->iova, PG, iova, iova + len);
	for (uint32_t i = 0; fk->logging && i < fk->nlr; i++) {
		struct lrange *l = &fk->lr[i];
		uint64_t lo = iova > l->iova ? iova : l->iova;
		uint64_t hi = iova + len < l->iova + l->len ? iova + len : l->iova + l->len;

		if (lo < hi)
			set_bits(l->bits, l->iova, fk->log_pg, lo, hi);
	}
	return 0;
}

int fkv_map_add(struct fake_kvfio *fk, uint64_t iova, uint64_t size, uint64_t va)
{
	if (!size || !va || (iova | size) & (PG - 1) || iova + size < iova)
		return -EINVAL;
	if (fk->nmaps == MAX_MAPS)
		return -ENOSPC;
	for (unsigned i = 0; i < fk->nmaps; i++)
		if (iova < fk->maps[i].iova + fk->maps[i].size && fk->maps[i].iova < iova + size)
			return -EEXIST;
	fk->maps[fk->nmaps] = (struct fmap){ iova, size, (uint8_t *)(uintptr_t)va,
					     calloc((size / PG + 63) / 64, 8) };
	if (!fk->maps[fk->nmaps].dirty)
		return -ENOMEM;
	fk->nmaps++;
	return 0;
}

/* Bits of the mappings inside [iova, iova+len) at page pg; clear unless keep. */
int fkv_dirty_collect(struct fake_kvfio *fk, uint64_t iova, uint64_t len, uint64_t pg,
			 uint64_t *out, bool keep)
{
	if (!pow2_pg(pg) || !len || (iova | len) & (pg - 1))
		return -EINVAL;
	for (unsigned i = 0; i < fk->nmaps; i++) {
		struct fmap *m = &fk->maps[i];

		for (uint64_t p = 0; p < m->size / PG; p++) {
			uint64_t a = m->iova + p * PG;

			if (a < iova || a >= iova + len || !(m->dirty[p / 64] & (1ull << (p % 64))))
				continue;
			set_bits(out, iova, pg, a, a + PG);
			if (!keep)
				m->dirty[p / 64] &= ~(1ull << (p % 64));
		}
	}
	return 0;
}

/* Removes the mappings inside the range; one cut in half is refused. */
int fkv_map_remove(struct fake_kvfio *fk, uint64_t iova, uint64_t len, uint64_t *done)
{
	unsigned out = 0;

	*done = 0;
	for (unsigned i = 0; i < fk->nmaps; i++) {
		struct fmap *m = &fk->maps[i];
		bool overlap = m->iova < iova + len && iova < m->iova + m->size;

		if (overlap && (m->iova < iova || m->iova + m->size > iova + len))
			return -EINVAL;
	}
	for (unsigned i = 0; i < fk->nmaps; i++) {
		struct fmap *m = &fk->maps[i];

		if (m->iova >= iova && m->iova + m->size <= iova + len) {
			*done += m->size;
			free(m->dirty);
			continue;
		}
		fk->maps[out++] = *m;
	}
	fk->nmaps = out;
	return *done ? 0 : -ENOENT;
}

void fkv_maps_clear(struct fake_kvfio *fk)
{
	for (unsigned i = 0; i < fk->nmaps; i++)
		free(fk->maps[i].dirty);
	fk->nmaps = 0;
	fk->iommu_dirty = false;
}


