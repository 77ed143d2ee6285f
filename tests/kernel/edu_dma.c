/*
 * kvfio-edu-dma: real DMA by QEMU's `edu` device through a mapping made by
 * the kernel VFIO backend, in the pci guest of make check-kernel
 * (tests/kernel/pci.sh). Opens vfio:BDF (type1), maps 2 MiB of a memfd at
 * IOVA 1 MiB, turns on bus mastering (config space), starts the container's
 * dirty tracking, then has edu copy 2 KiB of guest memory into its buffer
 * and back out to another page (BAR0 registers, docs/specs/edu.rst in QEMU:
 * 0x80 source, 0x88 destination, 0x90 count, 0x98 command: bit 0 start,
 * bit 1 edu -> RAM; its buffer is at 0x40000) and checks the bytes landed,
 * then reports the dirty bitmap. Prints one "key: value" line per fact;
 * exit 0 only if the DMA moved the bytes and the written page reads dirty.
 * usage: kvfio-edu-dma vfio:0000:01:01.0
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "vfiomig/vfio.h"

#define IOVA 0x100000ull
#define SIZE (2ull << 20)
#define PG 4096ull
#define NPAGES (SIZE / PG)
#define SRC_PAGE 3
#define DST_PAGE 77
#define EDU_BUF 0x40000ull
/* Half of edu's 4 KiB buffer: QEMU 7.2's edu_check_range() refuses a whole
 * page (its end compared with <, fixed later) and hw_error() ends QEMU. */
#define XFER 2048u

static int reg_write(struct vfm_device *dev, uint64_t off, uint64_t v, struct vfm_error *err)
{
	return vfm_device_region_write(dev, 0, off, &v, 8, err);
}

/* One edu DMA of XFER bytes; waits (5 s at most) for its start bit to clear. */
static int edu_dma(struct vfm_device *dev, uint64_t src, uint64_t dst, bool to_ram,
		   struct vfm_error *err)
{
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	uint64_t cmd = 1 | (to_ram ? 2 : 0);

	if (reg_write(dev, 0x80, src, err) || reg_write(dev, 0x88, dst, err) ||
	    reg_write(dev, 0x90, XFER, err) || reg_write(dev, 0x98, cmd, err))
		return -1;
	for (int i = 0; i < 500; i++) {
		if (vfm_device_region_read(dev, 0, 0x98, &cmd, 8, err))
			return -1;
		if (!(cmd & 1))
			return 0;
		nanosleep(&ts, NULL);
	}
	snprintf(err->msg, sizeof(err->msg), "edu DMA did not finish in 5 s");
	return -1;
}

static unsigned count_bits(const uint64_t *b, unsigned n)
{
	unsigned c = 0;

	for (unsigned i = 0; i < n; i++)
		c += (b[i / 64] >> (i % 64)) & 1;
	return c;
}

int main(int argc, char **argv)
{
	struct vfm_vfio_opts o = { .version = VFM_VFIO_OPTS_V1, .id = "edu",
				   .iommu = VFM_VFIO_IOMMU_LEGACY };
	struct vfm_error err = { 0 };
	uint64_t bits[NPAGES / 64], id = 0;
	struct vfm_dma_map map = { .iova = IOVA, .size = SIZE,
				   .prot = VFM_DMA_READ | VFM_DMA_WRITE, .fd = -1 };
	struct vfm_device *dev;
	bool moved, dst_dirty;
	uint16_t cmdreg;
	uint8_t *mem;
	int fd, rc = 1;

	if (argc != 2 || strncmp(argv[1], "vfio:", 5)) {
		fprintf(stderr, "usage: kvfio-edu-dma vfio:BDF\n");
		return 2;
	}
	fd = memfd_create("edu-ram", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)SIZE) ||
	    (mem = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
		perror("memfd");
		return 1;
	}
	if (vfm_vfio_open(argv[1] + 5, &o, &dev, &err)) {
		fprintf(stderr, "open: %s\n", err.msg);
		return 1;
	}
	map.fd = fd;
	map.vaddr = mem;
	if (vfm_device_dma_map(dev, &map, &err) ||
	    vfm_device_region_read(dev, 0, 0, &id, 4, &err) ||
	    vfm_device_region_read(dev, VFM_PCI_CONFIG_REGION, 4, &cmdreg, 2, &err)) {
		fprintf(stderr, "setup: %s\n", err.msg);
		goto out;
	}
	printf("edu id: 0x%08" PRIx64 "\n", id);
	cmdreg |= 0x6;   /* memory decoding, bus mastering */
	if (vfm_device_region_write(dev, VFM_PCI_CONFIG_REGION, 4, &cmdreg, 2, &err) ||
	    vfm_vfio_iommu_dirty_start(dev, &err)) {
		fprintf(stderr, "bus master / dirty start: %s\n", err.msg);
		goto out;
	}
	memset(bits, 0, sizeof(bits));
	if (vfm_vfio_iommu_dirty_report(dev, IOVA, SIZE, PG, bits, &err)) {
		fprintf(stderr, "first report: %s\n", err.msg);
		goto out;
	}
	printf("dirty before DMA: %u/%llu pages\n", count_bits(bits, NPAGES), NPAGES);
	for (unsigned i = 0; i < PG; i++)
		mem[SRC_PAGE * PG + i] = (uint8_t)(i * 7 + 1);
	memset(mem + DST_PAGE * PG, 0, PG);
	if (edu_dma(dev, IOVA + SRC_PAGE * PG, EDU_BUF, false, &err) ||
	    edu_dma(dev, EDU_BUF, IOVA + DST_PAGE * PG, true, &err)) {
		fprintf(stderr, "DMA: %s\n", err.msg);
		goto out;
	}
	moved = !memcmp(mem + SRC_PAGE * PG, mem + DST_PAGE * PG, XFER);

	printf("DMA moved the page: %s\n", moved ? "yes" : "no");
	memset(bits, 0, sizeof(bits));
	if (vfm_vfio_iommu_dirty_report(dev, IOVA, SIZE, PG, bits, &err)) {
		fprintf(stderr, "report: %s\n", err.msg);
		goto out;
	}
	dst_dirty = (bits[DST_PAGE / 64] >> (DST_PAGE % 64)) & 1;

	printf("dirty after DMA: %u/%llu pages, the written page %s\n", count_bits(bits, NPAGES),
	       NPAGES, dst_dirty ? "dirty" : "clean");
	rc = moved && dst_dirty ? 0 : 1;
	vfm_vfio_iommu_dirty_stop(dev, NULL);
out:
	vfm_device_free(dev);
	return rc;
}
