/* Guest memory and dirty tracking of the kernel VFIO backend against the fake
 * kernel: DMA map/unmap (iommufd and type1), IOMMU dirty bitmaps, unmap with
 * dirty bits (vIOMMU), device DMA logging, and fitting ranges to 256. */
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "compat/vfio_compat.h"
#include "compat/iommufd_compat.h"
#include "fake_kvfio.h"
#include "harness.h"

#define MEM (1u << 20)
#define PG 4096u

struct rig {
	struct fake_kvfio *fk;
	struct vfm_device *dev;
	uint8_t *mem;
	int memfd;
	char root[64];
};

static void rig_open(struct rig *r, bool legacy, bool by_fd)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_dma_map m = { .iova = 0x100000, .size = MEM, .prot = VFM_DMA_READ | VFM_DMA_WRITE,
				 .fd = -1 };
	struct vfm_error err = { 0 };

	fake_kvfio_cfg_default(&cfg);
	cfg.no_iommufd = legacy;
	snprintf(r->root, sizeof(r->root), "/tmp/vfm-kvfio-dma-XXXXXX");
	CHECK(mkdtemp(r->root));
	CHECK_EQ(fake_kvfio_make_sysfs(&cfg, r->root), 0);
	r->fk = fake_kvfio_new(&cfg);
	CHECK(r->fk);
	if (fake_kvfio_open(r->fk, "0000:01:00.0", VFM_VFIO_IOMMU_AUTO, r->root, &r->dev, &err))
		FAIL("open: %s", err.msg);
	r->memfd = memfd_create("guest", MFD_CLOEXEC);
	CHECK(r->memfd >= 0);
	CHECK_EQ(ftruncate(r->memfd, MEM), 0);
	r->mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_SHARED, r->memfd, 0);
	CHECK(r->mem != MAP_FAILED);
	if (by_fd)
		m.fd = r->memfd;   /* the backend maps the fd itself */
	else
		m.vaddr = r->mem;
	if (vfm_device_dma_map(r->dev, &m, &err))
		FAIL("map: %s", err.msg);
}

static void rig_close(struct rig *r)
{
	struct fake_kvfio_stats st;
	char cmd[128];

	vfm_device_free(r->dev);
	fake_kvfio_stats(r->fk, &st);
	CHECK_EQ(st.open_objects, 0);
	fake_kvfio_free(r->fk);
	munmap(r->mem, MEM);
	close(r->memfd);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", r->root);
	CHECK_EQ(system(cmd), 0);
}

static bool bit(const uint64_t *bm, unsigned i)
{
	return bm[i / 64] >> (i % 64) & 1;
}

static unsigned popcount(const uint64_t *bm, size_t words)
{
	unsigned n = 0;

	for (size_t i = 0; i < words; i++)
		n += (unsigned)__builtin_popcountll(bm[i]);
	return n;
}

static void map_and_dirty(bool legacy, bool by_fd)
{
	struct rig r;
	struct fake_kvfio_stats st;
	uint64_t bm[MEM / PG / 64] = { 0 };
	struct vfm_error err = { 0 };

	rig_open(&r, legacy, by_fd);
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.maps, 1);
	/* A PCI device (not an mdev) in a type1 container: the real type1 reports
	 * every mapped page (this fake's type1 keeps page-exact bits); a HWPT is exact. */
	CHECK_EQ(vfm_vfio_iommu_dirty_exact(r.dev), !legacy);
	/* The device's DMA reaches our memory through the mapping. */
	CHECK_EQ(fake_kvfio_dma_write(r.fk, 0x100000 + 5 * PG + 8, "hello", 5), 0);
	CHECK(!memcmp(r.mem + 5 * PG + 8, "hello", 5));
	CHECK_EQ(fake_kvfio_dma_write(r.fk, 0x300000, "x", 1), -EFAULT);
	/* Dirty bits only while tracking is on. */
	if (vfm_vfio_iommu_dirty_start(r.dev, &err))
		FAIL("dirty start: %s", err.msg);
	CHECK_EQ(fake_kvfio_dma_write(r.fk, 0x100000 + 7 * PG, "a", 1), 0);
	CHECK_EQ(fake_kvfio_dma_write(r.fk, 0x100000 + 9 * PG - 1, "bc", 2), 0);  /* two pages */
	bm[0] = 1ull << 63;   /* OR-ed into: existing bits stay */
	if (vfm_vfio_iommu_dirty_report(r.dev, 0x100000, MEM, PG, bm, &err))
		FAIL("report: %s", err.msg);
	CHECK(bit(bm, 7) && bit(bm, 8) && bit(bm, 9) && bit(bm, 63));
	CHECK(!bit(bm, 5));
	CHECK_EQ(popcount(bm, MEM / PG / 64), 4);
	/* Reading cleared them. */
	memset(bm, 0, sizeof(bm));
	CHECK_EQ(vfm_vfio_iommu_dirty_report(r.dev, 0x100000, MEM, PG, bm, NULL), 0);
	CHECK_EQ(popcount(bm, MEM / PG / 64), 0);
	/* Unaligned or without tracking: refused, the caller counts all as dirty. */
	CHECK_EQ(vfm_vfio_iommu_dirty_report(r.dev, 0x100001, MEM, PG, bm, NULL), -EINVAL);
	CHECK_EQ(vfm_vfio_iommu_dirty_stop(r.dev, NULL), 0);
	fake_kvfio_stats(r.fk, &st);
	CHECK(!st.iommu_dirty);
	CHECK_EQ(vfm_vfio_iommu_dirty_report(r.dev, 0x100000, MEM, PG, bm, NULL), -EINVAL);
	CHECK_EQ(vfm_device_dma_unmap(r.dev, 0x100000, MEM, 0, NULL, &err), 0);
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.maps, 0);
	rig_close(&r);
}

TEST(iommufd_map_and_hwpt_dirty)
{
	map_and_dirty(false, false);
	map_and_dirty(false, true);
}

TEST(type1_map_and_dirty_pages)
{
	map_and_dirty(true, false);
	map_and_dirty(true, true);
}

/* vIOMMU: the dirty bits of a range that is being unmapped. */
static void unmap_with_bitmap(bool legacy, int tracker)
{
	struct rig r;
	uint64_t bm[MEM / PG / 64] = { 0 };
	struct vfm_iova_range range = { 0x100000, MEM };
	uint64_t pg = PG;
	struct vfm_error err = { 0 };

	rig_open(&r, legacy, false);
	if (tracker == 1)
		CHECK_EQ(vfm_vfio_iommu_dirty_start(r.dev, NULL), 0);
	if (tracker == 2)
		CHECK_EQ(vfm_device_log_start(r.dev, &range, 1, &pg, NULL), 0);
	CHECK_EQ(fake_kvfio_dma_write(r.fk, 0x100000 + 3 * PG, "z", 1), 0);
	if (vfm_device_dma_unmap(r.dev, 0x100000, MEM, PG, bm, &err))
		FAIL("unmap: %s", err.msg);
	if (tracker) {
		CHECK(bit(bm, 3));
		CHECK_EQ(popcount(bm, MEM / PG / 64), 1);
	} else {
		/* Nothing tracks: every page counts as dirty. */
		CHECK_EQ(popcount(bm, MEM / PG / 64), MEM / PG);
	}
	rig_close(&r);
}

TEST(unmap_collects_dirty_bits)
{
	for (int legacy = 0; legacy < 2; legacy++)
		for (int tracker = 0; tracker < 3; tracker++)
			unmap_with_bitmap(legacy, tracker);
}

TEST(unmap_bitmap_error_means_all_dirty)
{
	struct rig r;
	uint64_t bm[MEM / PG / 64] = { 0 };

	rig_open(&r, false, false);
	CHECK_EQ(vfm_vfio_iommu_dirty_start(r.dev, NULL), 0);
	fake_kvfio_inject(r.fk, IOMMU_HWPT_GET_DIRTY_BITMAP, 0, 0, -EIO);
	CHECK_EQ(vfm_device_dma_unmap(r.dev, 0x100000, MEM, PG, bm, NULL), 0);
	CHECK_EQ(popcount(bm, MEM / PG / 64), MEM / PG);
	rig_close(&r);
}

TEST(dma_logging_real_bitmap)
{
	struct rig r;
	struct fake_kvfio_stats st;
	struct vfm_iova_range ranges[2] = { { 0x100000, MEM / 2 }, { 0x100000 + MEM / 2, MEM / 2 } };
	uint64_t bm[MEM / PG / 64] = { 0 };
	uint64_t pg = PG;
	struct vfm_error err = { 0 };

	rig_open(&r, false, false);
	if (vfm_device_log_start(r.dev, ranges, 2, &pg, &err))
		FAIL("log start: %s", err.msg);
	fake_kvfio_stats(r.fk, &st);
	CHECK(st.logging);
	CHECK_EQ(st.log_ranges, 1);   /* touching ranges are joined */
	CHECK_EQ(pg, PG);
	CHECK_EQ(fake_kvfio_dma_write(r.fk, 0x100000 + 10 * PG, "q", 1), 0);
	CHECK_EQ(fake_kvfio_dma_write(r.fk, 0x100000 + 200 * PG, "q", 1), 0);
	if (vfm_device_log_report(r.dev, 0x100000, MEM, PG, bm, &err))
		FAIL("report: %s", err.msg);
	CHECK(bit(bm, 10) && bit(bm, 200));
	CHECK_EQ(popcount(bm, MEM / PG / 64), 2);
	/* A coarser report page: page 10 and 200 of 4 KiB are 64 KiB pages 0 and 12. */
	CHECK_EQ(fake_kvfio_dma_write(r.fk, 0x100000 + 200 * PG, "q", 1), 0);
	memset(bm, 0, sizeof(bm));
	CHECK_EQ(vfm_device_log_report(r.dev, 0x100000, MEM, 16 * PG, bm, NULL), 0);
	CHECK_EQ(bm[0], 1ull << 12);
	/* A report error is an error: the caller counts everything dirty. */
	fake_kvfio_inject(r.fk, VFIO_DEVICE_FEATURE, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, 0,
			  -EIO);
	CHECK_EQ(vfm_device_log_report(r.dev, 0x100000, MEM, PG, bm, NULL), -EIO);
	/* Starting twice: the kernel says busy. */
	CHECK_EQ(vfm_device_log_start(r.dev, ranges, 1, &pg, NULL), -EBUSY);
	CHECK_EQ(vfm_device_log_stop(r.dev, NULL), 0);
	fake_kvfio_stats(r.fk, &st);
	CHECK(!st.logging);
	CHECK_EQ(vfm_device_log_report(r.dev, 0x100000, MEM, PG, bm, NULL), -EINVAL);
	rig_close(&r);
}

TEST(ranges_fit)
{
	struct vfm_iova_range r[600];
	int n;

	/* Unaligned, unsorted, overlapping: widened, sorted, joined. */
	r[0] = (struct vfm_iova_range){ 0x5000, 0x10 };
	r[1] = (struct vfm_iova_range){ 0x1800, 0x1000 };
	r[2] = (struct vfm_iova_range){ 0x2000, 0x2000 };
	n = vfm_iova_ranges_fit(r, 3, PG, 256);
	CHECK_EQ(n, 2);
	CHECK_EQ(r[0].iova, 0x1000);
	CHECK_EQ(r[0].length, 0x3000);
	CHECK_EQ(r[1].iova, 0x5000);
	CHECK_EQ(r[1].length, 0x1000);
	/* 600 ranges with growing gaps: the smallest gaps go first. */
	for (int i = 0; i < 600; i++)
		r[i] = (struct vfm_iova_range){ (uint64_t)i * (i + 2) * PG, PG };
	n = vfm_iova_ranges_fit(r, 600, PG, 256);
	CHECK_EQ(n, 256);
	for (int i = 1; i < n; i++)
		CHECK(r[i].iova >= r[i - 1].iova + r[i - 1].length);
	CHECK_EQ(r[0].iova, 0);
	CHECK_EQ(r[n - 1].iova + r[n - 1].length, (uint64_t)599 * 601 * PG + PG);
	/* The widest gaps (at the end) survive. */
	CHECK_EQ(r[n - 1].iova, (uint64_t)599 * 601 * PG);
	CHECK_EQ(vfm_iova_ranges_fit(r, 3, 1000, 256), -EINVAL);
	CHECK_EQ(vfm_iova_ranges_fit(r, 3, PG, 0), -EINVAL);
	r[0] = (struct vfm_iova_range){ 0x1000, 0 };
	CHECK_EQ(vfm_iova_ranges_fit(r, 1, PG, 256), -EINVAL);
}

TEST(logging_more_than_256_ranges_through_the_backend)
{
	struct rig r;
	struct fake_kvfio_stats st;
	struct vfm_iova_range ranges[256];
	uint64_t pg = PG;

	rig_open(&r, false, false);
	/* 256 separate ranges: the most the kernel takes, passed as they are. */
	for (int i = 0; i < 256; i++)
		ranges[i] = (struct vfm_iova_range){ 0x100000 + (uint64_t)i * 2 * PG, PG };
	CHECK_EQ(vfm_device_log_start(r.dev, ranges, 256, &pg, NULL), 0);
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.log_ranges, 256);
	rig_close(&r);
}

/*
 * Guest RAM from 0 past 4 GiB crosses x86's MSI window, which the IOMMU
 * reserves: the map is refused before the kernel sees it, naming the hole;
 * maps on either side of it go through (type1's IOVA_RANGE cap, asked again
 * with the argsz the kernel returned; iommufd's IOMMU_IOAS_IOVA_RANGES).
 */
TEST(maps_across_the_msi_window_refused)
{
	for (int legacy = 0; legacy < 2; legacy++) {
		struct fake_kvfio_cfg cfg;
		struct fake_kvfio_stats st;
		struct vfm_error err = { 0 };
		struct vfm_device *dev;
		struct fake_kvfio *fk;
		char root[64], cmd[128];
		void *mem = mmap(NULL, 2 * MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				 -1, 0);
		struct vfm_dma_map m = { .vaddr = mem, .iova = 0xfee00000ull - MEM, .size = 2 * MEM,
					 .prot = VFM_DMA_READ | VFM_DMA_WRITE, .fd = -1 };

		CHECK(mem != MAP_FAILED);
		fake_kvfio_cfg_default(&cfg);
		cfg.no_iommufd = legacy;
		cfg.msi_hole = true;
		snprintf(root, sizeof(root), "/tmp/vfm-kvfio-msi-XXXXXX");
		CHECK(mkdtemp(root));
		CHECK_EQ(fake_kvfio_make_sysfs(&cfg, root), 0);
		fk = fake_kvfio_new(&cfg);
		if (fake_kvfio_open(fk, "0000:01:00.0", VFM_VFIO_IOMMU_AUTO, root, &dev, &err))
			FAIL("open: %s", err.msg);
		CHECK_EQ(vfm_device_dma_map(dev, &m, &err), -ERANGE);
		CHECK(strstr(err.msg, "0xfee00000-0xfeefffff") && strstr(err.msg, "MSI"));
		fake_kvfio_stats(fk, &st);
		CHECK_EQ(st.maps, 0);
		m.size = MEM;                  /* just below it */
		CHECK_EQ(vfm_device_dma_map(dev, &m, &err), 0);
		m.iova = 0xfef00000ull;        /* just above it */
		CHECK_EQ(vfm_device_dma_map(dev, &m, &err), 0);
		/* type1: the migration cap after the IOVA one is found too. */
		CHECK(vfm_vfio_iommu_dirty_supported(dev));
		vfm_device_free(dev);
		fake_kvfio_free(fk);
		munmap(mem, 2 * MEM);
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
		CHECK_EQ(system(cmd), 0);
	}
}
