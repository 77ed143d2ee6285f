/*
 * The vfio-user server library's client memory: DMA windows, device DMA
 * through the mapped memfd and through DMA_READ/DMA_WRITE messages (with a
 * client pipelining meanwhile), and DMA logging of the device's writes.
 */
#include <sys/mman.h>

#include "harness.h"
#include "vfu_rawclient.h"
#include "vfu_testdev.h"

/* ------------------------------------------------------------------------ */
/* DMA                                                                       */

#define GUEST_IOVA 0x100000ull
#define GUEST_SIZE (1u << 20)

static int64_t dev_dma(struct rc *c, int op, uint64_t iova, uint64_t len, uint8_t byte)
{
	rc_write64(c, 0, TD_DMA_IOVA, iova);
	rc_write64(c, 0, TD_DMA_LEN, len);
	rc_write64(c, 0, TD_DMA_BYTE, byte);
	rc_write64(c, 0, TD_DMA_GO, (uint64_t)op);
	return (int64_t)rc_read64(c, 0, TD_DMA_RES);
}

TEST(dma_map_and_device_dma)
{
	const uint32_t RW = VFU_DMA_F_READ | VFU_DMA_F_WRITE;
	uint8_t *guest, buf[64];
	int fd = test_memfd("guest", GUEST_SIZE, (void **)&guest), small;
	struct srv s;
	struct rc c;

	srv_start_pair(&s, 0, &(struct vfm_vfu_opts){ .max_dma_maps = 6 }, &c);
	rc_hello(&c);
	CHECK_EQ(rc_dma_map(&c, fd, 0, GUEST_IOVA, GUEST_SIZE, RW), 0);
	CHECK_EQ(s.td.maps, 1);
	/* The device's writes land in the client's memfd; its reads see it. */
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + 4096 + 3, 100, 0xab), 0);
	CHECK_EQ(guest[4096 + 3], 0xab);
	CHECK_EQ(guest[4096 + 102], 0xab);
	CHECK_EQ(guest[4096 + 103], 0);
	memcpy(guest + 8192, "from the guest", 14);
	CHECK_EQ(dev_dma(&c, 2, GUEST_IOVA + 8192, 14, 0), 0);
	CHECK_EQ(rc_region_read(&c, 0, TD_READBUF, buf, 14), 0);
	CHECK(!memcmp(buf, "from the guest", 14));
	/* Outside every window, and straddling the end. */
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA - 1, 2, 0), -EFAULT);
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + GUEST_SIZE - 1, 2, 0), -EFAULT);

	/* Overlaps are EEXIST, bad shapes EINVAL, files too small EINVAL. */
	CHECK_EQ(rc_dma_map(&c, -1, 0, GUEST_IOVA + GUEST_SIZE - 4096, 8192, RW), -EEXIST);
	CHECK_EQ(rc_dma_map(&c, -1, 0, GUEST_IOVA - 4096, 8192, RW), -EEXIST);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 0x10000001, 4096, RW), -EINVAL);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 0x10000000, 0, RW), -EINVAL);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 0x10000000, 4096, 0), -EINVAL);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 0x10000000, 4096, 4 | RW), -EINVAL);
	CHECK_EQ(rc_dma_map(&c, -1, 0, UINT64_MAX - 4095, 8192, RW), -EINVAL);
	small = test_memfd("small", 4096, NULL);
	CHECK_EQ(rc_dma_map(&c, small, 0, 0x10000000, 8192, RW), -EINVAL);
	CHECK_EQ(rc_dma_map(&c, small, 4096, 0x10000000, 4096, RW), -EINVAL);
	/* A read-only window: the device may read it, not write it. */
	CHECK_EQ(rc_dma_map(&c, small, 0, 0x10000000, 4096, VFU_DMA_F_READ), 0);
	CHECK_EQ(dev_dma(&c, 1, 0x10000000, 8, 0), -EACCES);
	CHECK_EQ(dev_dma(&c, 2, 0x10000000, 8, 0), 0);
	close(small);

	/* Unmap: exact windows only; the reply echoes; afterwards no DMA. */
	CHECK_EQ(rc_dma_unmap(&c, GUEST_IOVA, 4096, 0), -ENOENT);
	CHECK_EQ(rc_dma_unmap(&c, GUEST_IOVA + 4096, GUEST_SIZE - 4096, 0), -ENOENT);
	CHECK_EQ(rc_dma_unmap(&c, GUEST_IOVA, GUEST_SIZE, 1), -EINVAL);
	CHECK_EQ(rc_dma_unmap(&c, GUEST_IOVA, GUEST_SIZE, 0), 0);
	CHECK_EQ(s.td.unmaps, 1);
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA, 8, 0), -EFAULT);

	/* max_dma_maps (6, we said so in VERSION); unmap-all. */
	for (int i = 0; i < 5; i++)
		CHECK_EQ(rc_dma_map(&c, -1, 0, 0x20000000 + i * 0x10000, 4096, RW), 0);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 0x30000000, 4096, RW), -ENOSPC);
	CHECK_EQ(rc_dma_unmap(&c, 4096, 0, VFU_DMA_UNMAP_F_ALL), -EINVAL);
	CHECK_EQ(rc_dma_unmap(&c, 0, 0, VFU_DMA_UNMAP_F_ALL), 0);
	CHECK_EQ(s.td.unmaps, 7);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 0x30000000, 4096, RW), 0);
	/* A sparse memfd of 2 TiB maps fine by size, but the total is capped
	 * (its dirty log would be 64 MiB of bitmap). */
	int huge = test_memfd("huge", 4096, NULL);
	CHECK_EQ(ftruncate(huge, 2ll << 40), 0);
	CHECK_EQ(rc_dma_map(&c, huge, 0, 1ull << 44, 2ull << 40, RW), -ENOSPC);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 1ull << 44, (1ull << 40) - 4096, RW), 0);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 1ull << 45, 8192, RW), -ENOSPC);
	close(huge);
	/* Truncated request, two fds. */
	struct vfu_dma_map req = { .argsz = 32, .flags = RW, .addr = 0x40000000, .size = 4096 };
	int two[2] = { fd, fd };
	CHECK_EQ(rc_call(&c, VFU_CMD_DMA_MAP, &req, 24, NULL, 0, NULL), -EINVAL);
	CHECK_EQ(rc_call(&c, VFU_CMD_DMA_MAP, &req, 32, two, 2, NULL), -EINVAL);
	req.argsz = 40;
	CHECK_EQ(rc_call(&c, VFU_CMD_DMA_MAP, &req, 32, NULL, 0, NULL), -EINVAL);
	rc_close(&c);
	srv_stop(&s);
	munmap(guest, GUEST_SIZE);
	close(fd);
}

/* While our DMA_WRITE waits, the client pipelines a command first. */
static void pipeline_one(struct rc *c, const struct vfu_msg *m)
{
	static bool sent;

	if (sent)
		return;
	sent = true;
	rc_send(c, VFU_CMD_DEVICE_GET_INFO, 0, &(struct vfu_device_info){ .argsz = 16 }, 16,
		NULL, 0);
}

TEST(dma_through_messages)
{
	const uint32_t RW = VFU_DMA_F_READ | VFU_DMA_F_WRITE;
	uint8_t *mem = calloc(1, 3 * 4096), buf[32];
	struct vfm_vfu_opts o = { .max_data_xfer_size = 4096 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct srv s;
	struct rc c;
	uint16_t id;

	srv_start_pair(&s, 0, &o, &c);
	/* A small max_data_xfer_size from the client: the server must split. */
	CHECK_EQ(rc_version(&c, "{\"capabilities\":{\"max_data_xfer_size\":4096}}", NULL), 0);
	c.mem = mem;
	c.mem_iova = 0x80000000ull;
	c.mem_size = 3 * 4096;
	CHECK_EQ(rc_dma_map(&c, -1, 0, 0x80000000ull, 3 * 4096, RW), 0);
	CHECK_EQ(dev_dma(&c, 1, 0x80000000ull + 100, 2000, 0x5a), 0);
	CHECK_EQ(mem[100], 0x5a);
	CHECK_EQ(mem[2099], 0x5a);
	CHECK_EQ(mem[2100], 0);
	CHECK_EQ(c.dma_msgs, 1);
	/* 9000 bytes need 3 messages of at most 4096. */
	memset(mem, 0x33, 3 * 4096);
	CHECK_EQ(dev_dma(&c, 2, 0x80000000ull + 10, 32, 0), 0);
	CHECK_EQ(rc_region_read(&c, 0, TD_READBUF, buf, 32), 0);
	CHECK_EQ(buf[0], 0x33);
	c.dma_msgs = 0;
	CHECK_EQ(dev_dma(&c, 1, 0x80000000ull, 9000, 0x44), 0);
	CHECK_EQ(c.dma_msgs, 3);
	CHECK_EQ(mem[8999], 0x44);
	CHECK_EQ(mem[9000], 0x33);
	/* Beyond the client's memory: the client's error comes back to the device. */
	CHECK_EQ(rc_dma_unmap(&c, 0x80000000ull, 3 * 4096, 0), 0);
	CHECK_EQ(rc_dma_map(&c, -1, 0, 0x80000000ull, 4 * 4096, RW), 0);
	CHECK_EQ(dev_dma(&c, 1, 0x80000000ull + 3 * 4096, 16, 0), -EFAULT);

	/* Pipelining: the doorbell's reply comes first, the queued command after. */
	c.on_server_cmd = pipeline_one;
	rc_write64(&c, 0, TD_DMA_IOVA, 0x80000000ull);
	rc_write64(&c, 0, TD_DMA_LEN, 16);
	rc_write64(&c, 0, TD_DMA_BYTE, 0x66);
	{
		uint8_t go[24];
		struct vfu_region_rw w = { .offset = TD_DMA_GO, .region = 0, .count = 8 };
		uint64_t one = 1;

		memcpy(go, &w, 16);
		memcpy(go + 16, &one, 8);
		id = rc_send(&c, VFU_CMD_REGION_WRITE, 0, go, sizeof(go), NULL, 0);
	}
	CHECK_EQ(rc_wait(&c, id, VFU_CMD_REGION_WRITE, NULL), 0);
	CHECK_EQ(rc_wait(&c, (uint16_t)(id + 1), VFU_CMD_DEVICE_GET_INFO, &m), 0);
	CHECK_EQ(m.len, 16);
	vfu_msg_release(&m);
	CHECK_EQ(mem[0], 0x66);
	rc_close(&c);
	srv_stop(&s);
	free(mem);
}

/* ------------------------------------------------------------------------ */
/* DMA logging                                                               */

static bool bit(const uint64_t *b, unsigned i)
{
	return (b[i / 64] >> (i % 64)) & 1;
}

static unsigned popcount(const uint64_t *b, size_t words)
{
	unsigned n = 0;

	for (size_t i = 0; i < words; i++)
		n += (unsigned)__builtin_popcountll(b[i]);
	return n;
}

TEST(dma_logging)
{
	const uint32_t RW = VFU_DMA_F_READ | VFU_DMA_F_WRITE;
	struct vfu_dma_logging_range range = { GUEST_IOVA, GUEST_SIZE };
	uint64_t bits[GUEST_SIZE / 4096 / 64 * 2], pg;
	uint8_t *guest;
	int fd = test_memfd("guest", GUEST_SIZE, (void **)&guest);
	struct srv s;
	struct rc c;

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	rc_hello(&c);
	CHECK_EQ(rc_dma_map(&c, fd, 0, GUEST_IOVA, GUEST_SIZE, RW), 0);
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 4096, bits, 32), -EINVAL);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_DMA_LOGGING_START | VFU_FEATURE_SET |
			    VFU_FEATURE_PROBE, 8, NULL, 0, NULL, 0), 0);
	/* The hint 0 is not a page size: we choose 4 KiB and say so. */
	CHECK_EQ(rc_log_start(&c, 0, &range, 1, &pg), 0);
	CHECK_EQ(pg, 4096);
	CHECK_EQ(rc_log_start(&c, 4096, &range, 1, &pg), -EBUSY);

	/* Writes: 1 byte in page 1, 3 pages worth straddling 5..8, one at the end. */
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + 4096 + 7, 1, 1), 0);
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + 5 * 4096 + 100, 3 * 4096, 2), 0);
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + GUEST_SIZE - 1, 1, 3), 0);
	/* Reads are not logged. */
	CHECK_EQ(dev_dma(&c, 2, GUEST_IOVA + 20 * 4096, 2048, 0), 0);
	memset(bits, 0xff, sizeof(bits));
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 4096, bits, 32), 0);
	CHECK_EQ(popcount(bits, 4), 6);
	CHECK(bit(bits, 1) && bit(bits, 5) && bit(bits, 6) && bit(bits, 7) && bit(bits, 8));
	CHECK(bit(bits, 255));
	/* Reading cleared them. */
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 4096, bits, 32), 0);
	CHECK_EQ(popcount(bits, 4), 0);

	/* Coarser report pages merge bits; the range can start anywhere. */
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + 2 * 4096, 1, 4), 0);
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + 3 * 4096, 1, 4), 0);
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + 9 * 4096, 1, 4), 0);
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 16384, bits, 8), 0);
	CHECK_EQ(bits[0], (1ull << 0) | (1ull << 2));
	/* A report over part of a page keeps that page for later. */
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + 30 * 4096 + 4000, 1, 5), 0);
	/* The log knows pages, not halves: each half reports it, neither clears it. */
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA + 30 * 4096, 2048, 4096, bits, 8), 0);
	CHECK_EQ(bits[0], 1);
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA + 30 * 4096 + 2048, 2048, 4096, bits, 8), 0);
	CHECK_EQ(bits[0], 1);
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 4096, bits, 32), 0);
	CHECK_EQ(popcount(bits, 4), 1);   /* still there: the partial report kept it */
	CHECK(bit(bits, 30));
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 4096, bits, 32), 0);
	CHECK_EQ(popcount(bits, 4), 0);
	/* Beyond the window: zeros, not an error. */
	CHECK_EQ(rc_log_report(&c, 0, 2 * GUEST_SIZE, 8192, bits, 32), 0);
	CHECK_EQ(popcount(bits, 4), 0);

	/* Bad reports. */
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 2048, bits, 64), -EINVAL);
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 3 * 4096, bits, 16), -EINVAL);
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, 0, 4096, bits, 8), -EINVAL);
	CHECK_EQ(rc_log_report(&c, UINT64_MAX - 4095, 8192, 4096, bits, 8), -EINVAL);
	/* argsz too small for the bitmap. */
	struct vfu_dma_logging_report rq = { GUEST_IOVA, GUEST_SIZE, 4096 };
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_DMA_LOGGING_REPORT | VFU_FEATURE_GET, 8 + 24 + 16, &rq,
			    sizeof(rq), NULL, 0), -EINVAL);
	/* 1 TiB at 4 KiB is a 32 MiB bitmap: beyond max_data_xfer_size. */
	rq.length = 1ull << 40;
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_DMA_LOGGING_REPORT | VFU_FEATURE_GET, UINT32_MAX, &rq,
			    sizeof(rq), NULL, 0), -E2BIG);
	/* Bad starts: overlapping or empty ranges, too many. */
	CHECK_EQ(rc_log_stop(&c), 0);
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 4096, bits, 32), -EINVAL);
	struct vfu_dma_logging_range two[2] = { { 0, 8192 }, { 4096, 4096 } };
	CHECK_EQ(rc_log_start(&c, 4096, two, 2, NULL), -EINVAL);
	two[1] = (struct vfu_dma_logging_range){ 8192, 0 };
	CHECK_EQ(rc_log_start(&c, 4096, two, 2, NULL), -EINVAL);
	struct vfu_dma_logging_range *many = calloc(257, sizeof(*many));
	for (int i = 0; i < 257; i++)
		many[i] = (struct vfu_dma_logging_range){ (uint64_t)i * 8192, 4096 };
	CHECK_EQ(rc_log_start(&c, 4096, many, 257, NULL), -EINVAL);
	CHECK_EQ(rc_log_start(&c, 8192, many, 256, &pg), 0);
	CHECK_EQ(pg, 8192);
	free(many);
	/* A window mapped while logging is logged too; no-fd windows are the client's. */
	CHECK_EQ(rc_dma_unmap(&c, GUEST_IOVA, GUEST_SIZE, 0), 0);
	CHECK_EQ(rc_dma_map(&c, fd, 0, GUEST_IOVA, GUEST_SIZE, RW), 0);
	CHECK_EQ(dev_dma(&c, 1, GUEST_IOVA + 8192 * 3, 1, 9), 0);
	CHECK_EQ(rc_log_report(&c, GUEST_IOVA, GUEST_SIZE, 8192, bits, 16), 0);
	CHECK_EQ(bits[0], 1ull << 3);
	rc_close(&c);
	srv_stop(&s);
	munmap(guest, GUEST_SIZE);
	close(fd);
}
