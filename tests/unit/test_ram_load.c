/*
 * The RAM section's load path on a destination whose memory is not fresh:
 * zero runs must clear what was there (they are punched out of the memfd, not
 * written), data runs must overwrite it. Saved to and loaded from a file:
 * URI in one process.
 */
#include <sys/mman.h>
#include <sys/stat.h>

#include "harness.h"
#include "vfiomig/migration.h"

#define PG 4096ull
#define MEM (8ull << 20)

static int nop(void *opaque)
{
	return 0;
}

static const struct vfm_vm_ops ops = { .stop = nop, .start = nop };

static struct vfm_guest_mem *new_mem(void)
{
	struct vfm_guest_mem *mem;
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_guest_mem_new(PG, &mem, &err), 0);
	/* Two regions, the second not at offset 0 of its memfd's GPA space. */
	CHECK_EQ(vfm_guest_mem_add(mem, 0, MEM / 2, "lo", &err), 0);
	CHECK_EQ(vfm_guest_mem_add(mem, 1ull << 32, MEM / 2, "hi", &err), 0);
	return mem;
}

static unsigned char *page(struct vfm_guest_mem *mem, uint64_t i)
{
	uint64_t gpa = i < MEM / 2 / PG ? i * PG : (1ull << 32) + (i - MEM / 2 / PG) * PG;
	return vfm_guest_mem_ptr(mem, gpa, PG);
}

TEST(zero_and_data_runs_overwrite_a_used_destination)
{
	struct vfm_guest_mem *src = new_mem(), *dst = new_mem();
	struct vfm_migration *ms, *md;
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };
	char dir[] = "/tmp/vfm-ramload-XXXXXX", uri[96];
	uint64_t npages = MEM / PG;

	CHECK(mkdtemp(dir));
	snprintf(uri, sizeof(uri), "file:%s/vm.state", dir);
	/* Source: every third page data, the rest zero. Destination: all 0xee. */
	for (uint64_t i = 0; i < npages; i++) {
		if (i % 3 == 0)
			memset(page(src, i), (int)(i % 251) + 1, PG);
		memset(page(dst, i), 0xee, PG);
	}
	CHECK_EQ(vfm_migration_new(src, &ops, NULL, &ms, &err), 0);
	CHECK_EQ(vfm_migration_new(dst, &ops, NULL, &md, &err), 0);
	vfm_migration_params_default(&p);
	p.timeout_ms = 5000;
	if (vfm_migration_start(ms, uri, &p, &err))
		FAIL("start: %s", err.msg);
	CHECK_EQ(vfm_migration_wait(ms, 20000), 0);
	vfm_migration_get_stats(ms, &st);
	if (st.status != VFM_MIG_COMPLETED)
		FAIL("save: %s", st.error);
	if (vfm_migration_incoming(md, uri, &p, NULL, NULL, &err))
		FAIL("load: %s", err.msg);
	for (uint64_t i = 0; i < npages; i++)
		if (memcmp(page(src, i), page(dst, i), PG))
			FAIL("page %" PRIu64 " differs after load (first byte %02x, want %02x)", i,
			     page(dst, i)[0], page(src, i)[0]);
	vfm_migration_free(ms);
	vfm_migration_free(md);
	vfm_guest_mem_free(src);
	vfm_guest_mem_free(dst);
	snprintf(uri, sizeof(uri), "rm -rf %s", dir);
	CHECK_EQ(system(uri), 0);
}

TEST(prealloc_keeps_content_and_makes_pages_resident)
{
	struct vfm_guest_mem *mem = new_mem();
	struct vfm_error err = { 0 };
	const struct vfm_mem_region *r = vfm_guest_mem_region(mem, 1);
	unsigned char vec[MEM / 2 / PG];
	unsigned resident = 0;

	memset(page(mem, 5), 0x42, PG);
	CHECK_EQ(mincore(r->host, r->size, vec), 0);
	for (size_t i = 0; i < sizeof(vec); i++)
		resident += vec[i] & 1;
	CHECK_EQ(resident, 0);     /* region 1 was never touched */
	if (vfm_guest_mem_prealloc(mem, &err))
		FAIL("prealloc: %s", err.msg);
	CHECK_EQ(page(mem, 5)[0], 0x42);
	CHECK_EQ(page(mem, 5)[PG - 1], 0x42);
	CHECK_EQ(mincore(r->host, r->size, vec), 0);
	resident = 0;
	for (size_t i = 0; i < sizeof(vec); i++)
		resident += vec[i] & 1;
	CHECK_EQ(resident, sizeof(vec));
	vfm_guest_mem_free(mem);
}
