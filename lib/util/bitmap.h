/*
 * Atomic bitmaps of u64 words, shared by writers that mark (vCPU threads,
 * device DMA trackers) and one reader that collects.
 *
 * Marking is an atomic OR and collecting an atomic exchange with 0, word by
 * word. A bit set after its word was exchanged stays set for the next
 * collection, so the race between them can delay a page by one round but
 * never loses it: that is all dirty tracking needs.
 */
#ifndef VFM_UTIL_BITMAP_H
#define VFM_UTIL_BITMAP_H

#include <stdint.h>
#include <stddef.h>

#define VFM_BITS_PER_WORD 64
#define VFM_BITMAP_WORDS(nbits) (((nbits) + VFM_BITS_PER_WORD - 1) / VFM_BITS_PER_WORD)

static inline void vfm_bitmap_set_atomic(uint64_t *map, uint64_t bit)
{
	__atomic_fetch_or(&map[bit / 64], 1ull << (bit % 64), __ATOMIC_RELAXED);
}

/* Sets bits [first, first + n). */
static inline void vfm_bitmap_set_range_atomic(uint64_t *map, uint64_t first, uint64_t n)
{
	while (n) {
		uint64_t w = first / 64, b = first % 64;
		uint64_t take = 64 - b < n ? 64 - b : n;
		uint64_t mask = take == 64 ? ~0ull : ((1ull << take) - 1) << b;

		__atomic_fetch_or(&map[w], mask, __ATOMIC_RELAXED);
		first += take;
		n -= take;
	}
}

static inline int vfm_bitmap_test(const uint64_t *map, uint64_t bit)
{
	return (int)((__atomic_load_n(&map[bit / 64], __ATOMIC_RELAXED) >> (bit % 64)) & 1);
}

/* Moves words into out (OR-ing) and clears them in map; returns bits moved. */
static inline uint64_t vfm_bitmap_collect(uint64_t *map, uint64_t *out, size_t words)
{
	uint64_t count = 0;

	for (size_t i = 0; i < words; i++) {
		/* Plain load first: most words are 0 and need no locked exchange. */
		if (!__atomic_load_n(&map[i], __ATOMIC_RELAXED))
			continue;
		uint64_t v = __atomic_exchange_n(&map[i], 0, __ATOMIC_ACQ_REL);
		out[i] |= v;
		count += (uint64_t)__builtin_popcountll(v);
	}
	return count;
}

static inline uint64_t vfm_bitmap_weight(const uint64_t *map, size_t words)
{
	uint64_t count = 0;

	for (size_t i = 0; i < words; i++)
		count += (uint64_t)__builtin_popcountll(__atomic_load_n(&map[i], __ATOMIC_RELAXED));
	return count;
}

#endif
