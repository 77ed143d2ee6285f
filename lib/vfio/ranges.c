/*
 * Fitting IOVA ranges to what DMA logging accepts: page-aligned, sorted,
 * non-overlapping, at most 256 (one 4 KiB page of range structs).
 */
#include <errno.h>
#include <stdlib.h>

#include "vfiomig/vfio.h"

static int cmp_iova(const void *a, const void *b)
{
	const struct vfm_iova_range *x = a, *y = b;

	return x->iova < y->iova ? -1 : x->iova > y->iova;
}

int vfm_iova_ranges_fit(struct vfm_iova_range *r, uint32_t n, uint64_t page_size, uint32_t max)
{
	uint64_t mask = page_size - 1;
	uint32_t out = 0;

	if (page_size < 4096 || (page_size & mask) || max == 0)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t lo = r[i].iova & ~mask, end = r[i].iova + r[i].length;

		if (!r[i].length || end < r[i].iova)
			return -EINVAL;
		/* Round the end up; a range reaching the top of the space stays there. */
		end = end & mask ? ((end | mask) == UINT64_MAX ? UINT64_MAX : (end | mask) + 1) : end;
		r[i].iova = lo;
		r[i].length = end - lo;
	}
	qsort(r, n, sizeof(*r), cmp_iova);
	for (uint32_t i = 0; i < n; i++) {
		if (out && r[i].iova <= r[out - 1].iova + r[out - 1].length) {
			uint64_t end = r[i].iova + r[i].length;
			uint64_t cur = r[out - 1].iova + r[out - 1].length;

			if (end > cur)
				r[out - 1].length = end - r[out - 1].iova;
			continue;
		}
		r[out++] = r[i];
	}
	/* Join the closest neighbours until it fits: O(n^2) for a few hundred is fine. */
	while (out > max) {
		uint32_t best = 0;
		uint64_t gap = UINT64_MAX;

		for (uint32_t i = 0; i + 1 < out; i++) {
			uint64_t g = r[i + 1].iova - (r[i].iova + r[i].length);

			if (g < gap) {
				gap = g;
				best = i;
			}
		}
		r[best].length = r[best + 1].iova + r[best + 1].length - r[best].iova;
		for (uint32_t i = best + 1; i + 1 < out; i++)
			r[i] = r[i + 1];
		out--;
	}
	return (int)out;
}
