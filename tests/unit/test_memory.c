/* Guest memory on memfd and its dirty bitmaps: marking, merging device
 * reports, collecting, and no lost page under concurrent writers. */
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "harness.h"
#include "util/bitmap.h"
#include "vfiomig/memory.h"

#define PG 4096ull

static struct vfm_guest_mem *mem_2regions(void)
{
	struct vfm_guest_mem *mem;
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_guest_mem_new(PG, &mem, &err), 0);
	CHECK_EQ(vfm_guest_mem_add(mem, 0, 64 * PG, "low", &err), 0);
	CHECK_EQ(vfm_guest_mem_add(mem, 1ull << 32, 130 * PG, "high", &err), 0);
	return mem;
}

static uint64_t drain(struct vfm_guest_mem *mem)
{
	uint64_t n = 0, buf[64];

	for (unsigned i = 0; i < vfm_guest_mem_num_regions(mem); i++) {
		memset(buf, 0, sizeof(buf));
		n += vfm_dirty_collect(mem, i, buf);
	}
	return n;
}

TEST(regions_and_translation)
{
	struct vfm_guest_mem *mem = mem_2regions();
	struct vfm_error err = { 0 };
	const struct vfm_mem_region *r;

	CHECK_EQ(vfm_guest_mem_num_regions(mem), 2);
	CHECK_EQ(vfm_guest_mem_total(mem), 194 * PG);
	r = vfm_guest_mem_region(mem, 1);
	CHECK(r && r->gpa == 1ull << 32 && r->npages == 130 && r->fd >= 0);
	CHECK(vfm_guest_mem_region(mem, 2) == NULL);
	CHECK(vfm_guest_mem_ptr(mem, 10, 100) == (char *)vfm_guest_mem_region(mem, 0)->host + 10);
	CHECK(vfm_guest_mem_ptr(mem, 64 * PG - 8, 16) == NULL);  /* crosses the end */
	CHECK(vfm_guest_mem_ptr(mem, 64 * PG, 1) == NULL);        /* hole */
	/* Overlap, misalignment and empty regions are refused. */
	CHECK_EQ(vfm_guest_mem_add(mem, 32 * PG, PG, "x", &err), -EEXIST);
	CHECK_EQ(vfm_guest_mem_add(mem, 100, PG, "x", &err), -EINVAL);
	CHECK_EQ(vfm_guest_mem_add(mem, 1ull << 40, 0, "x", &err), -EINVAL);
	CHECK_EQ(vfm_guest_mem_add(mem, UINT64_MAX - PG + 1, 2 * PG, "x", &err), -EINVAL);
	struct vfm_guest_mem *bad = NULL;
	CHECK_EQ(vfm_guest_mem_new(1000, &bad, &err), -EINVAL);
	CHECK(bad == NULL);
	vfm_guest_mem_free(mem);
}

TEST(memfd_is_shared)
{
	struct vfm_guest_mem *mem = mem_2regions();
	const struct vfm_mem_region *r = vfm_guest_mem_region(mem, 1);
	/* A second mapping of the memfd (what a device server does) sees writes. */
	char *other = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);

	CHECK(other != MAP_FAILED);
	strcpy(vfm_guest_mem_ptr(mem, (1ull << 32) + 5 * PG, 6), "guest");
	CHECK_STR(other + 5 * PG, "guest");
	strcpy(other + 7 * PG, "device");
	CHECK_STR((char *)vfm_guest_mem_ptr(mem, (1ull << 32) + 7 * PG, 7), "device");
	munmap(other, r->size);
	vfm_guest_mem_free(mem);
}

TEST(mark_collect)
{
	struct vfm_guest_mem *mem = mem_2regions();
	uint64_t bits[4] = { 0 };

	/* Everything starts dirty: nothing has been sent yet. */
	CHECK_EQ(vfm_dirty_count(mem), 194);
	CHECK_EQ(drain(mem), 194);
	CHECK_EQ(vfm_dirty_count(mem), 0);

	CHECK_EQ(vfm_dirty_mark(mem, 3 * PG + 5, 1), 0);             /* page 3 */
	CHECK_EQ(vfm_dirty_mark(mem, 10 * PG - 1, 2), 0);            /* pages 9, 10 */
	CHECK_EQ(vfm_dirty_mark(mem, 63 * PG, 2 * PG), -ERANGE);     /* 63 + a hole */
	CHECK_EQ(vfm_dirty_mark(mem, (1ull << 32) + 129 * PG, PG), 0);
	CHECK_EQ(vfm_dirty_mark(mem, 1ull << 50, PG), -ERANGE);
	CHECK_EQ(vfm_dirty_mark(mem, 0, 0), 0);
	CHECK_EQ(vfm_dirty_count(mem), 5);

	CHECK_EQ(vfm_dirty_collect(mem, 0, bits), 4);
	CHECK_EQ(bits[0], (1ull << 3) | (1ull << 9) | (1ull << 10) | (1ull << 63));
	memset(bits, 0, sizeof(bits));
	CHECK_EQ(vfm_dirty_collect(mem, 1, bits), 1);
	CHECK_EQ(bits[2], 1ull << 1);  /* page 129 = word 2, bit 1 */
	CHECK_EQ(vfm_dirty_count(mem), 0);

	vfm_dirty_mark_all(mem);
	CHECK_EQ(vfm_dirty_count(mem), 194);
	vfm_guest_mem_free(mem);
}

TEST(merge_report)
{
	struct vfm_guest_mem *mem = mem_2regions();
	struct vfm_error err = { 0 };
	uint64_t rep[2] = { 0 };

	drain(mem);
	/* A device report at 4 KiB over region 0 from page 8: bits 0, 5, 63, 64. */
	rep[0] = 1ull | (1ull << 5) | (1ull << 63);
	rep[1] = 1ull;
	/* length covers 60 pages only: bits 60+ of the report are outside it. */
	CHECK_EQ(vfm_dirty_merge(mem, 8 * PG, 56 * PG, PG, rep, &err), 0);
	CHECK_EQ(vfm_dirty_count(mem), 2);  /* pages 8 and 13 */
	drain(mem);
	/* A coarser report (16 KiB pages) marks all 4 memory pages of each bit. */
	rep[0] = 1ull << 1;
	rep[1] = 0;
	CHECK_EQ(vfm_dirty_merge(mem, 0, 64 * PG, 4 * PG, rep, &err), 0);
	CHECK_EQ(vfm_dirty_count(mem), 4);
	drain(mem);
	CHECK_EQ(vfm_dirty_merge(mem, 0, 64 * PG, 3000, rep, &err), -EINVAL);
	vfm_guest_mem_free(mem);
}

struct writer {
	struct vfm_guest_mem *mem;
	unsigned seed;
	uint64_t *written;  /* pages this writer touched (plain bitmap, private) */
	atomic_int *stop;   /* shared with the test thread */
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;

	while (!atomic_load(w->stop)) {
		uint64_t page = rand_r(&w->seed) % 64;
		uint64_t *p = vfm_guest_mem_ptr(w->mem, page * PG, 8);
		/* Both writers may hit one page: guest memory is shared, as vCPUs' is. */
		__atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
		vfm_dirty_mark(w->mem, page * PG, 8);
		w->written[page / 64] |= 1ull << (page % 64);
	}
	return NULL;
}

/* Collect while two threads write: every page written is collected at least
 * once after its last write (snapshot, then final drain after they stop). */
TEST(concurrent_no_lost_page)
{
	struct vfm_guest_mem *mem;
	atomic_int stop = 0;
	uint64_t w1[1] = { 0 }, w2[1] = { 0 }, seen[1] = { 0 };
	struct writer a = { .seed = 1, .written = w1, .stop = &stop };
	struct writer b = { .seed = 2, .written = w2, .stop = &stop };
	pthread_t ta, tb;

	CHECK_EQ(vfm_guest_mem_new(PG, &mem, NULL), 0);
	CHECK_EQ(vfm_guest_mem_add(mem, 0, 64 * PG, "ram", NULL), 0);
	a.mem = b.mem = mem;
	drain(mem);
	pthread_create(&ta, NULL, writer_main, &a);
	pthread_create(&tb, NULL, writer_main, &b);
	for (int i = 0; i < 2000; i++)
		vfm_dirty_collect(mem, 0, seen);
	atomic_store(&stop, 1);
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	vfm_dirty_collect(mem, 0, seen);
	CHECK_EQ(seen[0] & (w1[0] | w2[0]), w1[0] | w2[0]);
	vfm_guest_mem_free(mem);
}

TEST(bitmap_ranges)
{
	uint64_t map[4] = { 0 }, out[4] = { 0 };

	vfm_bitmap_set_range_atomic(map, 60, 70);  /* 60..129 */
	CHECK_EQ(vfm_bitmap_weight(map, 4), 70);
	CHECK(vfm_bitmap_test(map, 60) && vfm_bitmap_test(map, 129) && !vfm_bitmap_test(map, 130));
	CHECK_EQ(map[1], ~0ull);
	vfm_bitmap_set_range_atomic(map, 192, 64);
	CHECK_EQ(map[3], ~0ull);
	CHECK_EQ(vfm_bitmap_collect(map, out, 4), 134);
	CHECK_EQ(vfm_bitmap_weight(map, 4), 0);
	CHECK_EQ(vfm_bitmap_weight(out, 4), 134);
}
