/*
 * The dma sample device, driven like a guest driver would over vfio-user:
 * its descriptor ring, DMA logging of its writes, P2P quiescing, exact
 * pre-copy and stop-copy sizes, save -> load between two instances with
 * equal state checksums, corrupted streams rejected with the destination
 * untouched, BAR2's window (mapped by the client or by messages) as state,
 * and the 'vfiomig device dma' command as a process.
 */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>

#include <xxhash.h>

#include "../../devices/dma.h"
#include "harness.h"
#include "vfiomig/vfio_user.h"
#include "vfiomig/vfu_server.h"
#include "vfu_rawclient.h"

#define G_IOVA  0x10000000ull
#define G_SIZE  (4u << 20)
#define RING_N  64u
#define DATA    (1u << 20)      /* guest offset of data buffers */

/* ------------------------------------------------------------------------ */
/* An in-process device on a socketpair, served by its own thread            */

struct dsrv {
	struct vfm_dmadev *dev;
	pthread_t thread;
	int stop;
};

static void *dsrv_main(void *arg)
{
	struct dsrv *d = arg;

	while (!__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE)) {
		int r = vfm_vfu_run(vfm_dmadev_ctx(d->dev), 20, NULL);

		if (r && r != -ENOTCONN && r != -EINTR)
			FAIL("dma server loop: %s", vfm_strerror(r));
	}
	return NULL;
}

static void dsrv_start(struct dsrv *d, const struct vfm_dmadev_opts *o, struct rc *c)
{
	struct vfm_error e = { 0 };
	int sv[2];

	memset(d, 0, sizeof(*d));
	if (vfm_dmadev_create(NULL, o, &d->dev, &e))
		FAIL("dma device: %s", e.msg);
	CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	if (vfm_vfu_attach_fd(vfm_dmadev_ctx(d->dev), sv[0], &e))
		FAIL("attach: %s", e.msg);
	CHECK_EQ(pthread_create(&d->thread, NULL, dsrv_main, d), 0);
	rc_init(c, sv[1]);
	rc_hello(c);
}

static void dsrv_stop(struct dsrv *d, struct rc *c)
{
	rc_close(c);
	__atomic_store_n(&d->stop, 1, __ATOMIC_RELEASE);
	pthread_join(d->thread, NULL);
	vfm_dmadev_destroy(d->dev);
}

/* ------------------------------------------------------------------------ */
/* A guest driver                                                            */

struct drv {
	struct rc *c;
	uint8_t *guest;
	int memfd;
	uint64_t tail;
};

static void drv_init(struct drv *g, struct rc *c)
{
	memset(g, 0, sizeof(*g));
	g->c = c;
	g->memfd = test_memfd("guest", G_SIZE, (void **)&g->guest);
	CHECK_EQ(rc_dma_map(c, g->memfd, 0, G_IOVA, G_SIZE, VFU_DMA_F_READ | VFU_DMA_F_WRITE), 0);
	rc_write64(c, 0, DMADEV_REG_RING_BASE, G_IOVA);
	rc_write64(c, 0, DMADEV_REG_RING_SIZE, RING_N);
	rc_write64(c, 0, DMADEV_REG_CTRL, DMADEV_CTRL_ENABLE | DMADEV_CTRL_IRQ_ENABLE);
	g->tail = 0;
}

static void drv_free(struct drv *g)
{
	munmap(g->guest, G_SIZE);
	close(g->memfd);
}

static struct dmadev_desc *slot(struct drv *g, uint64_t idx)
{
	return (struct dmadev_desc *)(void *)(g->guest + (idx % RING_N) * sizeof(struct dmadev_desc));
}

/* Queues a descriptor; returns its index. ring = ring the doorbell now. */
static uint64_t queue(struct drv *g, uint32_t op, uint64_t guest_off, uint64_t dev, uint64_t len,
		      uint64_t pattern, bool ring)
{
	struct dmadev_desc d = { .op = op, .flags = DMADEV_DESC_IRQ, .guest = G_IOVA + guest_off,
				 .dev = dev, .len = len, .pattern = pattern };
	uint64_t idx = g->tail++;

	*slot(g, idx) = d;
	if (ring)
		rc_write64(g->c, 0, DMADEV_REG_RING_TAIL, g->tail);
	return idx;
}

static uint32_t status_of(struct drv *g, uint64_t idx)
{
	return __atomic_load_n(&slot(g, idx)->status, __ATOMIC_ACQUIRE);
}

static uint64_t reg(struct rc *c, uint64_t off)
{
	return rc_read64(c, 0, off);
}

/* ------------------------------------------------------------------------ */
/* The engine                                                                */

/*
 * The firmware's churn never lands between the two halves of a copy rung
 * behind one doorbell: the target is always the source, word for word, while
 * churn rewrites the whole device memory many times a second.
 */
TEST_TIMEOUT(copy_pairs_see_no_churn_between_their_halves, 60)
{
	const uint64_t pg = 4096, dev_pages = 16;
	struct dsrv d;
	struct drv g;
	struct rc c;
	uint64_t *src, *dst;

	dsrv_start(&d, &(struct vfm_dmadev_opts){ .state_size = dev_pages * pg,
						 .churn_rate = 1ull << 30 }, &c);
	drv_init(&g, &c);
	src = (uint64_t *)(void *)(g.guest + DATA);
	dst = (uint64_t *)(void *)(g.guest + DATA + pg);
	for (uint64_t n = 0; n < (vfm_test_under_valgrind() ? 50u : 10000u); n++) {
		uint64_t i0, i1, dev = (n % dev_pages) * pg;

		for (unsigned w = 0; w < pg / 8; w++)
			src[w] = (n << 20) ^ w;
		i0 = queue(&g, DMADEV_OP_COPY_TO_DEV, DATA, dev, pg, 0, false);
		i1 = queue(&g, DMADEV_OP_COPY_FROM_DEV, DATA + pg, dev, pg, 0, true);
		CHECK_EQ(status_of(&g, i0), DMADEV_DESC_OK);
		CHECK_EQ(status_of(&g, i1), DMADEV_DESC_OK);
		if (memcmp(src, dst, pg))
			FAIL("copy %" PRIu64 ": the target is not the source (churn between the halves)", n);
	}
	CHECK(reg(&c, DMADEV_REG_CHURN) > 0);
	drv_free(&g);
	dsrv_stop(&d, &c);
}

TEST(identity_and_config)
{
	struct dsrv d;
	struct rc c;
	uint32_t v;

	dsrv_start(&d, &(struct vfm_dmadev_opts){ .state_size = 1 << 20 }, &c);
	CHECK(reg(&c, DMADEV_REG_ID) == DMADEV_ID);
	CHECK_EQ(reg(&c, DMADEV_REG_VERSION), 1);
	CHECK_EQ(reg(&c, DMADEV_REG_MEM_SIZE), 1 << 20);
	CHECK_EQ(rc_region_read(&c, 7, 0, &v, 4), 0);
	CHECK_EQ(v, DMADEV_DEVICE_ID << 16 | DMADEV_VENDOR_ID);
	CHECK_EQ(rc_region_read(&c, 7, 8, &v, 4), 0);
	CHECK_EQ(v >> 8, DMADEV_CLASS);
	/* 4-byte halves of a register; odd sizes refused. */
	rc_write64(&c, 0, DMADEV_REG_SCRATCH, 0x1122334455667788ull);
	CHECK_EQ(rc_region_read(&c, 0, DMADEV_REG_SCRATCH + 4, &v, 4), 0);
	CHECK_EQ(v, 0x11223344u);
	v = 0xaabbccdd;
	CHECK_EQ(rc_region_write(&c, 0, DMADEV_REG_SCRATCH, &v, 4), 0);
	CHECK(reg(&c, DMADEV_REG_SCRATCH) == 0x11223344aabbccddull);
	CHECK_EQ(rc_region_write(&c, 0, DMADEV_REG_SCRATCH, &v, 2), -EINVAL);
	CHECK_EQ(rc_region_write(&c, 0, DMADEV_REG_SCRATCH + 2, &v, 4), -EINVAL);
	/* The checksum covers the registers that are state. */
	uint64_t sum = reg(&c, DMADEV_REG_CHECKSUM);
	CHECK(sum == vfm_dmadev_checksum(d.dev));
	rc_write64(&c, 0, DMADEV_REG_SCRATCH, 1);
	CHECK(reg(&c, DMADEV_REG_CHECKSUM) != sum);
	dsrv_stop(&d, &c);
}

TEST(ring_commands)
{
	uint8_t data[5000];
	struct dsrv d;
	struct drv g;
	struct rc c;
	uint64_t i0, i1, i2, i3, bad;
	int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	uint64_t ev = 0;

	dsrv_start(&d, &(struct vfm_dmadev_opts){ .state_size = 1 << 20 }, &c);
	drv_init(&g, &c);
	{
		uint8_t buf[20];
		struct vfu_irq_set s = { .argsz = 20, .index = VFM_VFU_IRQ_MSI, .count = 1,
			.flags = VFU_IRQ_SET_DATA_EVENTFD | VFU_IRQ_SET_ACTION_TRIGGER };

		memcpy(buf, &s, 20);
		CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_SET_IRQS, buf, 20, &efd, 1, NULL), 0);
	}
	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = (uint8_t)(i * 13 + 1);
	memcpy(g.guest + DATA + 65536, data, sizeof(data));
	/* A batch behind one doorbell. */
	i0 = queue(&g, DMADEV_OP_FILL, 0, 0, 8192, 0x0807060504030201ull, false);
	i1 = queue(&g, DMADEV_OP_COPY_FROM_DEV, DATA, 0, 8192, 0, false);
	i2 = queue(&g, DMADEV_OP_COPY_TO_DEV, DATA + 65536, 65536, sizeof(data), 0, false);
	i3 = queue(&g, DMADEV_OP_CHECKSUM, 0, 65536, sizeof(data), 0, true);
	CHECK_EQ(status_of(&g, i0), DMADEV_DESC_OK);
	CHECK_EQ(status_of(&g, i1), DMADEV_DESC_OK);
	CHECK_EQ(status_of(&g, i2), DMADEV_DESC_OK);
	CHECK_EQ(status_of(&g, i3), DMADEV_DESC_OK);
	for (unsigned i = 0; i < 8192; i++)
		if (g.guest[DATA + i] != (uint8_t)(i % 8 + 1))
			FAIL("guest byte %u is %#x", i, g.guest[DATA + i]);
	CHECK(slot(&g, i3)->result == XXH3_64bits(data, sizeof(data)));
	CHECK_EQ(reg(&c, DMADEV_REG_RING_HEAD), 4);
	CHECK_EQ(reg(&c, DMADEV_REG_COMPLETED), 4);
	CHECK(read(efd, &ev, 8) == 8);
	CHECK(ev >= 1);

	/* Failing descriptors complete with an error and the ring goes on. */
	bad = queue(&g, DMADEV_OP_FILL, 0, (1 << 20) - 10, 11, 0, true);
	CHECK_EQ(status_of(&g, bad), DMADEV_DESC_ERR | EINVAL);
	bad = queue(&g, 99, 0, 0, 1, 0, true);
	CHECK_EQ(status_of(&g, bad), DMADEV_DESC_ERR | EINVAL);
	bad = queue(&g, DMADEV_OP_COPY_FROM_DEV, G_SIZE, 0, 16, 0, true);
	CHECK_EQ(status_of(&g, bad), DMADEV_DESC_ERR | EFAULT);
	CHECK_EQ(reg(&c, DMADEV_REG_ERRORS), 3);
	CHECK_EQ(reg(&c, DMADEV_REG_RING_HEAD), 7);
	/* A tail more than a ring ahead halts the engine until cleared. */
	rc_write64(&c, 0, DMADEV_REG_RING_TAIL, 7 + RING_N + 1);
	CHECK(reg(&c, DMADEV_REG_STATUS) & DMADEV_STATUS_HALTED);
	CHECK_EQ(reg(&c, DMADEV_REG_RING_HEAD), 7);
	rc_write64(&c, 0, DMADEV_REG_RING_TAIL, 7);
	rc_write64(&c, 0, DMADEV_REG_STATUS, DMADEV_STATUS_HALTED);
	CHECK_EQ(reg(&c, DMADEV_REG_STATUS), 0);
	g.tail = 7;
	i0 = queue(&g, DMADEV_OP_FILL, 0, 0, 16, 0, true);
	CHECK_EQ(status_of(&g, i0), DMADEV_DESC_OK);
	drv_free(&g);
	dsrv_stop(&d, &c);
	close(efd);
}

TEST(p2p_states_hold_dma)
{
	struct dsrv d;
	struct drv g;
	struct rc c;
	uint64_t i;

	dsrv_start(&d, &(struct vfm_dmadev_opts){ .state_size = 1 << 20 }, &c);
	drv_init(&g, &c);
	CHECK_EQ(rc_set_state(&c, VFM_STATE_RUNNING_P2P), 0);
	CHECK(reg(&c, DMADEV_REG_STATUS) & DMADEV_STATUS_QUIESCED);
	queue(&g, DMADEV_OP_FILL, 0, 0, 4096, 0x4242424242424242ull, false);
	i = queue(&g, DMADEV_OP_COPY_FROM_DEV, DATA, 0, 4096, 0, true);
	CHECK_EQ(reg(&c, DMADEV_REG_RING_HEAD), 0);
	CHECK_EQ(reg(&c, DMADEV_REG_RING_TAIL), 2);
	CHECK_EQ(status_of(&g, i), 0);
	CHECK_EQ(g.guest[DATA], 0);
	/* Still held in STOP and PRE_COPY_P2P; released by RUNNING. */
	CHECK_EQ(rc_set_state(&c, VFM_STATE_STOP), 0);
	CHECK_EQ(rc_set_state(&c, VFM_STATE_PRE_COPY_P2P), 0);
	CHECK_EQ(reg(&c, DMADEV_REG_RING_HEAD), 0);
	CHECK_EQ(rc_set_state(&c, VFM_STATE_PRE_COPY), 0);
	CHECK_EQ(reg(&c, DMADEV_REG_RING_HEAD), 2);
	CHECK_EQ(status_of(&g, i), DMADEV_DESC_OK);
	CHECK_EQ(g.guest[DATA + 4095], 0x42);
	CHECK(!(reg(&c, DMADEV_REG_STATUS) & DMADEV_STATUS_QUIESCED));
	CHECK_EQ(rc_set_state(&c, VFM_STATE_RUNNING), 0);
	drv_free(&g);
	dsrv_stop(&d, &c);
}

TEST(dma_logging_of_device_writes)
{
	struct vfu_dma_logging_range r = { G_IOVA, G_SIZE };
	uint64_t bits[G_SIZE / 4096 / 64];
	unsigned n = 0;
	struct dsrv d;
	struct drv g;
	struct rc c;

	dsrv_start(&d, &(struct vfm_dmadev_opts){ .state_size = 1 << 20 }, &c);
	drv_init(&g, &c);
	CHECK_EQ(rc_log_start(&c, 4096, &r, 1, NULL), 0);
	/* Reading guest memory dirties nothing but the completion in the ring page. */
	queue(&g, DMADEV_OP_COPY_TO_DEV, DATA, 0, 3 * 4096, 0, true);
	/* 3 pages from +100 touch 4 pages of the guest. */
	queue(&g, DMADEV_OP_COPY_FROM_DEV, DATA + 10 * 4096 + 100, 0, 3 * 4096, 0, true);
	CHECK_EQ(rc_log_report(&c, G_IOVA, G_SIZE, 4096, bits, sizeof(bits)), 0);
	for (unsigned i = 0; i < G_SIZE / 4096; i++) {
		bool want = i == 0 || (i >= DATA / 4096 + 10 && i <= DATA / 4096 + 13);
		bool got = (bits[i / 64] >> (i % 64)) & 1;

		if (want != got)
			FAIL("page %u: logged %d, expected %d", i, got, want);
		n += got;
	}
	CHECK_EQ(n, 5);
	CHECK_EQ(rc_log_stop(&c), 0);
	drv_free(&g);
	dsrv_stop(&d, &c);
}

/* ------------------------------------------------------------------------ */
/* Migration                                                                 */

struct buf {
	uint8_t *p;
	size_t len, cap;
};

static void buf_read(struct rc *c, struct buf *b, uint32_t chunk, long *got)
{
	if (b->len + chunk > b->cap) {
		b->cap = (b->len + chunk) * 2;
		b->p = realloc(b->p, b->cap);
		CHECK(b->p != NULL);
	}
	*got = rc_mig_read(c, b->p + b->len, chunk);
	CHECK(*got >= 0);
	b->len += (size_t)*got;
}

/* Reads STOP_COPY to the end; checks the size announced before. */
static void read_rest(struct rc *c, struct buf *b)
{
	uint64_t sz;
	size_t start = b->len;
	long got;

	CHECK_EQ(rc_stop_copy_size(c, &sz), 0);
	do
		buf_read(c, b, 1 << 20, &got);
	while (got == 1 << 20);
	CHECK_EQ(b->len - start, sz);
	buf_read(c, b, 4096, &got);
	CHECK_EQ(got, 0);
}

static void load(struct rc *c, const uint8_t *p, size_t len, size_t chunk)
{
	for (size_t off = 0; off < len; off += chunk)
		CHECK_EQ(rc_mig_write(c, p + off, (uint32_t)(len - off < chunk ? len - off : chunk)), 0);
}

#define REC 32u
#define HDR_REC (REC + 24u)
#define PAGE_REC (REC + 4096u)
#define TAIL_RECS (REC + DMADEV_WIN_SIZE + REC + sizeof(struct dmadev_regs) + REC + 16u)

TEST_TIMEOUT(exact_sizes, 60)
{
	const uint64_t mem = 1 << 20, pages = mem / 4096;
	uint64_t ini, dirty, sz, total;
	struct buf b = { 0 };
	struct dsrv d;
	struct drv g;
	struct rc c;
	long got;

	dsrv_start(&d, &(struct vfm_dmadev_opts){ .state_size = mem }, &c);
	drv_init(&g, &c);
	CHECK_EQ(rc_stop_copy_size(&c, &sz), 0);
	CHECK_EQ(sz, HDR_REC + pages * PAGE_REC + TAIL_RECS);
	CHECK_EQ(rc_set_state(&c, VFM_STATE_PRE_COPY), 0);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), 0);
	CHECK_EQ(ini, HDR_REC + pages * PAGE_REC);
	CHECK_EQ(dirty, 0);
	buf_read(&c, &b, 1000, &got);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), 0);
	CHECK_EQ(ini, HDR_REC + pages * PAGE_REC - 1000);
	buf_read(&c, &b, (uint32_t)(HDR_REC + 3 * PAGE_REC - 1000), &got);
	/* Pages 0..2 went out; the device changes 0, 1 and 200 (not sent yet). */
	queue(&g, DMADEV_OP_FILL, 0, 0, 2 * 4096, 7, false);
	queue(&g, DMADEV_OP_FILL, 0, 200 * 4096, 10, 7, true);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), 0);
	CHECK_EQ(ini, (pages - 3) * PAGE_REC);
	CHECK_EQ(dirty, 2 * PAGE_REC);
	CHECK_EQ(rc_stop_copy_size(&c, &sz), 0);
	CHECK_EQ(sz, ini + dirty + TAIL_RECS);
	/* Everything there is, then "nothing for now". */
	total = ini + dirty;
	do
		buf_read(&c, &b, 1 << 20, &got);
	while (got == 1 << 20);
	CHECK_EQ(b.len, HDR_REC + 3 * PAGE_REC + total);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), 0);
	CHECK_EQ(ini + dirty, 0);
	CHECK_EQ(rc_set_state(&c, VFM_STATE_STOP_COPY), 0);
	read_rest(&c, &b);
	CHECK_EQ(b.len, HDR_REC + (pages + 2) * PAGE_REC + TAIL_RECS);
	free(b.p);
	drv_free(&g);
	dsrv_stop(&d, &c);
}

TEST_TIMEOUT(save_load_roundtrip_with_churn, 120)
{
	const uint64_t mem = 8 << 20;
	struct dsrv src, dst;
	struct rc cs, cd;
	struct drv g;
	struct buf b = { 0 };
	uint64_t ini, dirty, ini_before, sum_src, rounds = 0;
	bool saw_dirty = false;
	uint32_t st;
	long got;

	dsrv_start(&src, &(struct vfm_dmadev_opts){ .state_size = mem, .churn_rate = 4 << 20,
						    .id = "src" }, &cs);
	dsrv_start(&dst, &(struct vfm_dmadev_opts){ .state_size = mem, .id = "dst" }, &cd);
	CHECK(reg(&cs, DMADEV_REG_CHECKSUM) != reg(&cd, DMADEV_REG_CHECKSUM));
	drv_init(&g, &cs);
	queue(&g, DMADEV_OP_FILL, 0, 4096, 3 * 4096, 0x5555, true);
	rc_write64(&cs, 0, DMADEV_REG_SCRATCH, 0xfeedface);
	rc_write64(&cs, DMADEV_BAR2, 0, 0x77696e646f77ull);
	CHECK_EQ(rc_set_state(&cs, VFM_STATE_PRE_COPY), 0);
	/* Pre-copy: initial_bytes falls by exactly what was read. */
	for (;;) {
		CHECK_EQ(rc_precopy_info(&cs, &ini_before, &dirty), 0);
		buf_read(&cs, &b, 1 << 20, &got);
		CHECK_EQ(rc_precopy_info(&cs, &ini, &dirty), 0);
		if ((uint64_t)got <= ini_before)
			CHECK_EQ(ini, ini_before - (uint64_t)got);
		saw_dirty |= dirty > 0;
		if (!ini && ++rounds > 5 && saw_dirty)
			break;
		if (!ini) {
			/* Let the firmware churn between iterations, as pre-copy would. */
			struct timespec ts = { 0, 20 * 1000 * 1000 };

			nanosleep(&ts, NULL);
		}
		CHECK(rounds < 500);
	}
	CHECK(reg(&cs, DMADEV_REG_CHURN) > 0);
	/* Pages went out more than once. */
	CHECK(b.len > HDR_REC + (mem / 4096) * PAGE_REC);
	CHECK_EQ(rc_set_state(&cs, VFM_STATE_PRE_COPY_P2P), 0);
	CHECK_EQ(rc_set_state(&cs, VFM_STATE_STOP_COPY), 0);
	/* Written while saving (a client's mapping may do that): the final part
	 * carries the window as it is at stop-copy. */
	rc_write64(&cs, DMADEV_BAR2, DMADEV_WIN_SIZE - 8, 0x5a5a);
	read_rest(&cs, &b);
	sum_src = reg(&cs, DMADEV_REG_CHECKSUM);
	/* STOP_COPY is stopped: the churn is still. */
	CHECK(reg(&cs, DMADEV_REG_CHECKSUM) == sum_src);

	CHECK_EQ(rc_set_state(&cd, VFM_STATE_RESUMING), 0);
	load(&cd, b.p, b.len, 333333);
	CHECK_EQ(rc_set_state(&cd, VFM_STATE_RUNNING), 0);
	CHECK_EQ(rc_get_state(&cd, &st), 0);
	CHECK_EQ(st, VFM_STATE_RUNNING);
	CHECK(reg(&cd, DMADEV_REG_CHECKSUM) == sum_src);
	CHECK(reg(&cd, DMADEV_REG_SCRATCH) == 0xfeedface);
	CHECK(reg(&cd, DMADEV_REG_RING_BASE) == G_IOVA);
	CHECK_EQ(reg(&cd, DMADEV_REG_COMPLETED), 1);
	CHECK_EQ(rc_read64(&cd, DMADEV_BAR2, 0), 0x77696e646f77ull);
	CHECK_EQ(rc_read64(&cd, DMADEV_BAR2, DMADEV_WIN_SIZE - 8), 0x5a5a);
	CHECK(memcmp(vfm_dmadev_window(dst.dev), vfm_dmadev_window(src.dev), DMADEV_WIN_SIZE) == 0);
	fprintf(stderr, "# %zu bytes of stream for %llu bytes of state (%llu churn writes)\n",
		b.len, (unsigned long long)mem, (unsigned long long)reg(&cs, DMADEV_REG_CHURN));
	free(b.p);
	drv_free(&g);
	dsrv_stop(&src, &cs);
	dsrv_stop(&dst, &cd);
}

/* Rejected: the arc fails, the device stays RESUMING and its registers keep
 * their values (pages load in place: memory may hold what arrived). */
static void expect_rejected(struct rc *cd, uint64_t scratch0, const uint8_t *p, size_t len,
			    const char *what)
{
	uint32_t st;
	int r;

	if (len)
		load(cd, p, len, 65536 + 7);
	r = rc_set_state(cd, VFM_STATE_STOP);
	if (r != -EINVAL)
		FAIL("%s: RESUMING -> STOP gave %d", what, r);
	CHECK_EQ(rc_get_state(cd, &st), 0);
	CHECK_EQ(st, VFM_STATE_RESUMING);
	if (reg(cd, DMADEV_REG_SCRATCH) != scratch0)
		FAIL("%s: the destination's registers changed", what);
	if (rc_read64(cd, DMADEV_BAR2, 64) != scratch0)
		FAIL("%s: the destination's window changed", what);
}

TEST_TIMEOUT(corrupted_streams_rejected, 120)
{
	const uint64_t mem = 1 << 20, pages = mem / 4096;
	struct dsrv src, dst, other;
	struct rc cs, cd, co;
	struct buf b = { 0 }, ob = { 0 };
	uint8_t *bad;
	const uint64_t scratch0 = 5;
	size_t at;

	dsrv_start(&src, &(struct vfm_dmadev_opts){ .state_size = mem }, &cs);
	dsrv_start(&dst, &(struct vfm_dmadev_opts){ .state_size = mem }, &cd);
	rc_write64(&cs, 0, DMADEV_REG_SCRATCH, 77);
	rc_write64(&cs, DMADEV_BAR2, 64, 78);
	CHECK_EQ(rc_set_state(&cs, VFM_STATE_STOP_COPY), 0);
	read_rest(&cs, &b);
	CHECK_EQ(b.len, HDR_REC + pages * PAGE_REC + TAIL_RECS);
	bad = malloc(b.len + PAGE_REC);
	rc_write64(&cd, 0, DMADEV_REG_SCRATCH, scratch0);
	rc_write64(&cd, DMADEV_BAR2, 64, scratch0);
	CHECK_EQ(rc_set_state(&cd, VFM_STATE_RESUMING), 0);

	/* Nothing at all. */
	expect_rejected(&cd, scratch0, NULL, 0, "empty stream");
	/* One bit in a page's data. */
	memcpy(bad, b.p, b.len);
	bad[HDR_REC + 100 * PAGE_REC + REC + 1234] ^= 0x10;
	expect_rejected(&cd, scratch0, bad, b.len, "flipped data bit");
	/* The first magic. */
	memcpy(bad, b.p, b.len);
	bad[0] ^= 1;
	expect_rejected(&cd, scratch0, bad, b.len, "bad magic");
	/* A page record's index (its checksum covers the header). */
	memcpy(bad, b.p, b.len);
	bad[HDR_REC + 5 * PAGE_REC + 16] ^= 1;
	expect_rejected(&cd, scratch0, bad, b.len, "page index");
	/* Truncated: no end. */
	expect_rejected(&cd, scratch0, b.p, b.len - 10, "truncated");
	/* A page missing (the sequence numbers notice). */
	at = HDR_REC + 7 * PAGE_REC;
	memcpy(bad, b.p, at);
	memcpy(bad + at, b.p + at + PAGE_REC, b.len - at - PAGE_REC);
	expect_rejected(&cd, scratch0, bad, b.len - PAGE_REC, "missing page");
	/* A page twice. */
	memcpy(bad, b.p, at + PAGE_REC);
	memcpy(bad + at + PAGE_REC, b.p + at, b.len - at);
	expect_rejected(&cd, scratch0, bad, b.len + PAGE_REC, "duplicated page");
	/* One bit of the window (the record after the pages). */
	memcpy(bad, b.p, b.len);
	bad[HDR_REC + pages * PAGE_REC + REC + 64] ^= 4;
	expect_rejected(&cd, scratch0, bad, b.len, "flipped window bit");
	/* The window record missing (the sequence numbers notice). */
	{
		size_t wat = HDR_REC + pages * PAGE_REC, n = b.len - DMADEV_WIN_SIZE - REC;

		memcpy(bad, b.p, wat);
		memcpy(bad + wat, b.p + wat + REC + DMADEV_WIN_SIZE, b.len - wat - REC - DMADEV_WIN_SIZE);
		expect_rejected(&cd, scratch0, bad, n, "missing window");
	}
	/* Two pages' contents swapped, each record's checksum made good again
	 * (seeded with its header, over its page's hash): every record passes,
	 * and only END's state checksum notices, through the page index mixed
	 * into its digest of the page hashes (a plain sum would not). */
	memcpy(bad, b.p, b.len);
	for (unsigned k = 3; k <= 4; k++) {
		uint8_t *r = bad + HDR_REC + k * PAGE_REC;
		uint64_t content, csum;

		memcpy(r + REC, b.p + HDR_REC + (7 - k) * PAGE_REC + REC, 4096);
		content = XXH3_64bits(r + REC, 4096);
		csum = XXH3_64bits_withSeed(&content, 8, XXH3_64bits(r, 24));
		memcpy(r + 24, &csum, 8);
	}
	expect_rejected(&cd, scratch0, bad, b.len, "pages swapped");
	/* The trailer's checksum. */
	memcpy(bad, b.p, b.len);
	bad[b.len - 1] ^= 0x80;
	expect_rejected(&cd, scratch0, bad, b.len, "end checksum");
	/* Data after the end. */
	memcpy(bad, b.p, b.len);
	memcpy(bad + b.len, b.p, 100);
	expect_rejected(&cd, scratch0, bad, b.len + 100, "trailing data");
	/* A stream from a device with a different state size. */
	dsrv_start(&other, &(struct vfm_dmadev_opts){ .state_size = 2 * mem }, &co);
	CHECK_EQ(rc_set_state(&co, VFM_STATE_STOP_COPY), 0);
	read_rest(&co, &ob);
	dsrv_stop(&other, &co);
	expect_rejected(&cd, scratch0, ob.p, ob.len, "other state size");

	/* After all that, the real stream still loads. */
	load(&cd, b.p, b.len, 1 << 20);
	CHECK_EQ(rc_set_state(&cd, VFM_STATE_RUNNING), 0);
	CHECK(reg(&cd, DMADEV_REG_CHECKSUM) == reg(&cs, DMADEV_REG_CHECKSUM));
	CHECK_EQ(reg(&cd, DMADEV_REG_SCRATCH), 77);
	CHECK_EQ(rc_read64(&cd, DMADEV_BAR2, 64), 78);
	free(bad);
	free(b.p);
	free(ob.p);
	dsrv_stop(&src, &cs);
	dsrv_stop(&dst, &cd);
}

/* BAR2 by messages: any size and alignment, the device's memfd, state. */
TEST(window_by_messages_is_state)
{
	uint8_t in[13] = "hello window", out[13];
	uint64_t sum;
	struct dsrv d;
	struct rc c;

	dsrv_start(&d, &(struct vfm_dmadev_opts){ .state_size = 1 << 20 }, &c);
	CHECK_EQ(rc_read64(&c, DMADEV_BAR2, 0), 0);   /* starts zeroed */
	sum = reg(&c, DMADEV_REG_CHECKSUM);
	CHECK_EQ(rc_region_write(&c, DMADEV_BAR2, 4001, in, sizeof(in)), 0);
	CHECK(memcmp(vfm_dmadev_window(d.dev) + 4001, in, sizeof(in)) == 0);
	CHECK_EQ(rc_region_read(&c, DMADEV_BAR2, 4001, out, sizeof(out)), 0);
	CHECK(memcmp(out, in, sizeof(in)) == 0);
	CHECK(reg(&c, DMADEV_REG_CHECKSUM) != sum);
	CHECK_EQ(reg(&c, DMADEV_REG_CHECKSUM), vfm_dmadev_checksum(d.dev));
	/* Beyond the window: refused. */
	CHECK_EQ(rc_region_write(&c, DMADEV_BAR2, DMADEV_WIN_SIZE - 4, in, 8), -EINVAL);
	/* Reset clears it with the registers. */
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_RESET, NULL, 0, NULL, 0, NULL), 0);
	CHECK_EQ(rc_region_read(&c, DMADEV_BAR2, 4001, out, sizeof(out)), 0);
	CHECK(memcmp(out, (uint8_t[13]){ 0 }, sizeof(out)) == 0);
	dsrv_stop(&d, &c);
}

/* BAR2 through the client library: one mapped area, plain stores reach the
 * device (its checksum moves), and BAR0 is not mapped. */
TEST(window_mapped_by_the_client)
{
	struct vfm_vfio_user_opts o = { .version = VFM_VFIO_USER_OPTS_V1, .id = "map",
					.timeout_ms = 5000 };
	struct vfm_error err = { 0 };
	struct vfm_region_area a[4];
	struct vfm_region_info ri;
	struct vfm_device *dev;
	uint64_t sum, sum2;
	unsigned n = 99;
	struct dsrv d;
	int sv[2];

	memset(&d, 0, sizeof(d));
	if (vfm_dmadev_create(NULL, &(struct vfm_dmadev_opts){ .state_size = 1 << 20 }, &d.dev,
			      &err))
		FAIL("dma device: %s", err.msg);
	CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	if (vfm_vfu_attach_fd(vfm_dmadev_ctx(d.dev), sv[0], &err))
		FAIL("attach: %s", err.msg);
	CHECK_EQ(pthread_create(&d.thread, NULL, dsrv_main, &d), 0);
	if (vfm_vfio_user_open_fd(sv[1], "socketpair", &o, &dev, &err))
		FAIL("open: %s", err.msg);
	CHECK_EQ(vfm_device_region_info(dev, DMADEV_BAR2, &ri, &err), 0);
	CHECK_EQ(ri.size, DMADEV_WIN_SIZE);
	CHECK_EQ(ri.flags, VFM_REGION_READ | VFM_REGION_WRITE | VFM_REGION_MMAP);
	CHECK_EQ(vfm_device_region_areas(dev, DMADEV_BAR2, a, 4, &n, &err), 0);
	CHECK_EQ(n, 1);
	CHECK_EQ(a[0].offset, 0);
	CHECK_EQ(a[0].size, DMADEV_WIN_SIZE);
	CHECK(a[0].ptr != NULL);
	CHECK_EQ(vfm_device_region_areas(dev, 0, a + 1, 3, &n, &err), 0);
	CHECK_EQ(n, 0);

	if (vfm_device_region_read(dev, 0, DMADEV_REG_CHECKSUM, &sum, 8, &err))
		FAIL("checksum: %s", err.msg);
	((volatile uint64_t *)a[0].ptr)[7] = 0x1122334455667788ull;
	CHECK_EQ(memcmp(vfm_dmadev_window(d.dev) + 56, &(uint64_t){ 0x1122334455667788ull }, 8), 0);
	CHECK_EQ(vfm_device_region_read(dev, 0, DMADEV_REG_CHECKSUM, &sum2, 8, &err), 0);
	CHECK(sum2 != sum);
	CHECK_EQ(sum2, vfm_dmadev_checksum(d.dev));
	/* The device's side of the same bytes shows in the mapping. */
	vfm_dmadev_window(d.dev)[100] = 0xab;
	CHECK_EQ(((volatile uint8_t *)a[0].ptr)[100], 0xab);

	vfm_device_free(dev);
	__atomic_store_n(&d.stop, 1, __ATOMIC_RELEASE);
	pthread_join(d.thread, NULL);
	vfm_dmadev_destroy(d.dev);
}

/* A lower bound only: the emulated firmware sleeps at least this long. */
TEST(save_latency_is_paid)
{
	struct buf b = { 0 };
	struct dsrv d;
	struct rc c;
	int64_t t0;

	dsrv_start(&d, &(struct vfm_dmadev_opts){ .state_size = 4 << 20, .save_latency_us = 10000 },
		   &c);
	CHECK_EQ(rc_set_state(&c, VFM_STATE_STOP_COPY), 0);
	t0 = (int64_t)now_ms();
	read_rest(&c, &b);
	CHECK((int64_t)now_ms() - t0 >= 40);
	free(b.p);
	dsrv_stop(&d, &c);
}

/* ------------------------------------------------------------------------ */
/* The command as a process                                                  */

static const char *bin(void)
{
	const char *b = getenv("VFIOMIG_BIN");

	if (!b || !*b)
		SKIP("VFIOMIG_BIN not set");
	return b;
}

static pid_t spawn(char *const argv[])
{
	pid_t pid = fork();

	CHECK(pid >= 0);
	if (pid == 0) {
		int null = open("/dev/null", O_WRONLY);

		if (!getenv("VFM_TEST_VERBOSE")) {
			dup2(null, 1);
			dup2(null, 2);
		}
		execv(argv[0], argv);
		_exit(127);
	}
	return pid;
}

/* Exit status within timeout_ms, or -1 (the child is then killed). */
static int reap(pid_t pid, int timeout_ms)
{
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	int status;

	for (int waited = 0; waited <= timeout_ms; waited += 10) {
		pid_t r = waitpid(pid, &status, WNOHANG);

		if (r == pid)
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		nanosleep(&ts, NULL);
	}
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	return -1;
}

TEST_TIMEOUT(cli_device_process, 120)
{
	const char *b = bin();
	char *dir = test_tmpdir(), sock[4200], file[4200];
	struct stat st;
	struct rc c;
	pid_t pid;

	snprintf(sock, sizeof(sock), "%s/dma.sock", dir);
	snprintf(file, sizeof(file), "%s/file", dir);
	/* Usage errors are 2, failures 1, --help 0. */
	CHECK_EQ(reap(spawn((char *[]){ (char *)b, "device", NULL }), 20000), 2);
	CHECK_EQ(reap(spawn((char *[]){ (char *)b, "device", "dma", NULL }), 20000), 2);
	CHECK_EQ(reap(spawn((char *[]){ (char *)b, "device", "nic", "--socket", sock, NULL }), 20000), 2);
	CHECK_EQ(reap(spawn((char *[]){ (char *)b, "device", "dma", "--socket", sock, "--churn",
					"fast", NULL }), 20000), 2);
	CHECK_EQ(reap(spawn((char *[]){ (char *)b, "device", "dma", "--socket", sock,
					"--state-size", "1000", NULL }), 20000), 2);
	CHECK_EQ(reap(spawn((char *[]){ (char *)b, "device", "dma", "--bogus", NULL }), 20000), 2);
	CHECK_EQ(reap(spawn((char *[]){ (char *)b, "device", "dma", "--help", NULL }), 20000), 0);
	close(open(file, O_CREAT | O_WRONLY, 0600));
	CHECK_EQ(reap(spawn((char *[]){ (char *)b, "device", "dma", "--socket", file, NULL }), 20000), 1);

	/* --once: one client, then exit 0, socket gone. */
	pid = spawn((char *[]){ (char *)b, "device", "dma", "--socket", sock, "--state-size", "1M",
				"--churn", "1M/s", "--once", "-v", NULL });
	rc_init(&c, rc_connect_path(sock, 20000));
	CHECK(c.fd >= 0);
	CHECK_EQ(stat(sock, &st), 0);
	CHECK_EQ(st.st_mode & 0777, 0600);
	rc_hello(&c);
	CHECK(reg(&c, DMADEV_REG_ID) == DMADEV_ID);
	CHECK_EQ(reg(&c, DMADEV_REG_MEM_SIZE), 1 << 20);
	rc_close(&c);
	CHECK_EQ(reap(pid, 20000), 0);
	CHECK(stat(sock, &st) != 0);

	/* Without --once: client after client, until SIGTERM. */
	pid = spawn((char *[]){ (char *)b, "device", "dma", "--socket", sock, "--state-size", "1M",
				NULL });
	for (int i = 0; i < 3; i++) {
		rc_init(&c, rc_connect_path(sock, 20000));
		CHECK(c.fd >= 0);
		rc_hello(&c);
		CHECK_EQ(rc_set_state(&c, VFM_STATE_STOP), 0);
		rc_close(&c);
	}
	kill(pid, SIGTERM);
	CHECK_EQ(reap(pid, 20000), 0);
	CHECK(stat(sock, &st) != 0);
	test_rmdir(dir);
}

/*
 * `vfiomig device dma` processes driven only through the raw client (built
 * from the spec): guest memory by fd, the ring, DMA logging, then a save from
 * one process loaded into the other, equal checksums.
 */
TEST_TIMEOUT(cli_device_driven_by_raw_client, 120)
{
	const char *b = bin();
	char *dir = test_tmpdir(), s1[4200], s2[4200];
	struct vfu_dma_logging_range r = { G_IOVA, G_SIZE };
	uint64_t bits[G_SIZE / 4096 / 64], sum, init, dirty;
	struct buf save = { 0 };
	struct rc src, dst;
	struct drv g;
	pid_t p1, p2;
	uint64_t i1, i2;
	long got;

	snprintf(s1, sizeof(s1), "%s/src.sock", dir);
	snprintf(s2, sizeof(s2), "%s/dst.sock", dir);
	p1 = spawn((char *[]){ (char *)b, "device", "dma", "--socket", s1, "--state-size", "1M",
			       "--churn", "1M/s", "--once", NULL });
	p2 = spawn((char *[]){ (char *)b, "device", "dma", "--socket", s2, "--state-size", "1M",
			       "--once", NULL });
	rc_init(&src, rc_connect_path(s1, 20000));
	rc_init(&dst, rc_connect_path(s2, 20000));
	CHECK(src.fd >= 0 && dst.fd >= 0);
	rc_hello(&src);
	rc_hello(&dst);

	drv_init(&g, &src);
	CHECK_EQ(rc_log_start(&src, 4096, &r, 1, NULL), 0);
	i1 = queue(&g, DMADEV_OP_FILL, 0, 8192, 2 * 4096, 0xa5a5a5a5deadbeefull, true);
	i2 = queue(&g, DMADEV_OP_COPY_FROM_DEV, DATA, 8192, 2 * 4096, 0, true);
	CHECK_EQ(status_of(&g, i1), DMADEV_DESC_OK);
	CHECK_EQ(status_of(&g, i2), DMADEV_DESC_OK);
	CHECK_EQ(g.guest[DATA], 0xef);
	CHECK_EQ(g.guest[DATA + 2 * 4096 - 1], 0xa5);
	memset(bits, 0, sizeof(bits));
	CHECK_EQ(rc_log_report(&src, G_IOVA, G_SIZE, 4096, bits, sizeof(bits)), 0);
	CHECK_EQ(bits[0], 1ull);   /* the ring page (completions) */
	CHECK_EQ(bits[DATA / 4096 / 64], 3ull << (DATA / 4096 % 64));
	CHECK_EQ(rc_log_stop(&src), 0);
	rc_write64(&src, 0, DMADEV_REG_SCRATCH, 0x5eed);

	/* Save: pre-copy while it churns, then stop-copy. */
	CHECK_EQ(rc_set_state(&src, VFM_STATE_PRE_COPY), 0);
	do
		buf_read(&src, &save, 1 << 20, &got);
	while (got == 1 << 20);
	CHECK_EQ(rc_precopy_info(&src, &init, &dirty), 0);
	CHECK_EQ(init, 0);
	CHECK_EQ(rc_set_state(&src, VFM_STATE_STOP_COPY), 0);
	read_rest(&src, &save);
	sum = reg(&src, DMADEV_REG_CHECKSUM);

	CHECK_EQ(rc_set_state(&dst, VFM_STATE_RESUMING), 0);
	load(&dst, save.p, save.len, 1 << 20);
	CHECK_EQ(rc_set_state(&dst, VFM_STATE_STOP), 0);
	CHECK_EQ(rc_set_state(&dst, VFM_STATE_RUNNING), 0);
	CHECK_EQ(reg(&dst, DMADEV_REG_CHECKSUM), sum);
	CHECK_EQ(reg(&dst, DMADEV_REG_SCRATCH), 0x5eed);
	CHECK_EQ(reg(&dst, DMADEV_REG_COMPLETED), 2);

	free(save.p);
	drv_free(&g);
	rc_close(&src);
	rc_close(&dst);
	CHECK_EQ(reap(p1, 20000), 0);
	CHECK_EQ(reap(p2, 20000), 0);
	test_rmdir(dir);
}

/*
 * MIG_DATA_READ of a whole STOP_COPY stream in 1 MiB requests from a device
 * in another process, over its UNIX socket: the device's STOP_COPY size is
 * the stream docs/devices/dma.md describes for a device that never ran (one
 * record per page, then the WINDOW, REGS and END records) and exactly that
 * many bytes arrive. The throughput is printed, not checked (bench/).
 */
TEST_TIMEOUT(mig_read_throughput, 240)
{
	const char *b = bin();
	const char *env = getenv("VFM_BENCH_STATE");
	char *dir = test_tmpdir(), sock[4200];
	uint8_t *buf = malloc(1 << 20);
	uint64_t total = 0, sz, state;
	int64_t t0, t1;
	struct rc c;
	pid_t pid;
	long got;
	char *unit;

	/* VFM_BENCH_STATE: "64M" style, K/M/G binary. */
	state = strtoull(env ? env : "64M", &unit, 10);
	state <<= *unit == 'G' ? 30 : *unit == 'M' ? 20 : *unit == 'K' ? 10 : 0;

	snprintf(sock, sizeof(sock), "%s/dma.sock", dir);
	pid = spawn((char *[]){ (char *)b, "device", "dma", "--socket", sock, "--state-size",
				(char *)(env ? env : "64M"), "--once", NULL });
	rc_init(&c, rc_connect_path(sock, 20000));
	CHECK(c.fd >= 0);
	c.timeout_ms = 60000;
	rc_hello(&c);
	CHECK_EQ(rc_set_state(&c, VFM_STATE_STOP_COPY), 0);
	CHECK_EQ(rc_stop_copy_size(&c, &sz), 0);
	t0 = (int64_t)now_ms();
	do {
		got = rc_mig_read(&c, buf, 1 << 20);
		CHECK(got >= 0);
		total += (uint64_t)got;
	} while (got == 1 << 20);
	t1 = (int64_t)now_ms();
	CHECK_EQ(total, sz);
	/* docs/devices/dma.md: 56 + (S/4096 + D) x 4128 + 4128 + 104 + 48, D = 0. */
	CHECK_EQ(sz, 56 + state / 4096 * 4128 + 4128 + 104 + 48);
	fprintf(stderr, "# MIG_DATA_READ, 1 MiB requests: %.1f MiB in %lld ms = %.0f MiB/s\n",
		(double)total / (1 << 20), (long long)(t1 - t0),
		(double)total / (1 << 20) / ((double)(t1 - t0 ? t1 - t0 : 1) / 1000.0));
	rc_close(&c);
	CHECK_EQ(reap(pid, 60000), 0);
	free(buf);
	test_rmdir(dir);
}
