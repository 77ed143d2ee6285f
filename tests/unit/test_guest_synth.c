/*
 * The synthetic guest (vmm/) against real `dma` device servers: its vCPUs
 * write pages and drive the devices' rings, and its verification passes on
 * intact memory and catches each kind of loss: a stale data page, a DMA
 * write the device made that went missing, a lost completion, a superblock
 * that is not there.
 */
#include <fcntl.h>
#include <pthread.h>
#include <time.h>

#include "harness.h"
#include "migdma.h"
#include "../../devices/dma.h"
#include "vfiomig/vfio_user.h"
#include "vmm/synth.h"

#define MEM (8ull << 20)

struct rig {
	struct md_devsrv srv[2];
	struct vfm_guest_mem *mem;
	struct vfm_device *dev[2];
	unsigned ndev;
	struct vfm_guest *g;
};

static void rig_init(struct rig *r, unsigned ndev, bool by_messages, bool fresh)
{
	static unsigned generation;   /* a fresh socket name per server */
	struct md_opts o = { .ndev = ndev, .by_messages = by_messages };
	struct vfm_error err = { 0 };
	struct vfm_synthetic_opts so = { .vcpus = 2, .dirty_rate = 64ull << 20, .fresh = fresh,
					 .dma_devs = r->dev, .ndma = ndev };
	const struct vfm_mem_region *reg;

	memset(r->srv, 0, sizeof(r->srv));
	r->ndev = ndev;
	CHECK_EQ(vfm_guest_mem_new(4096, &r->mem, &err), 0);
	CHECK_EQ(vfm_guest_mem_add(r->mem, 0, MEM, "ram", &err), 0);
	reg = vfm_guest_mem_region(r->mem, 0);
	for (unsigned i = 0; i < ndev; i++) {
		char name[16];
		struct vfm_dma_map map = { .iova = 0, .size = MEM, .prot = VFM_DMA_READ | VFM_DMA_WRITE,
					   .fd = reg->fd, .vaddr = reg->host };

		snprintf(name, sizeof(name), "g%u-%u", generation++, i);
		md_devsrv_spawn(&r->srv[i], name, &o, 0, 77 + i);
		if (vfm_vfio_user_open(r->srv[i].path, NULL, &r->dev[i], &err))
			FAIL("open: %s", err.msg);
		if (vfm_device_dma_map(r->dev[i], &map, &err))
			FAIL("dma map: %s", err.msg);
	}
	if (vfm_guest_synthetic_new(r->mem, &so, &r->g, &err))
		FAIL("guest: %s", err.msg);
}

static void rig_free(struct rig *r)
{
	r->g->ops->destroy(r->g);
	for (unsigned i = 0; i < r->ndev; i++) {
		vfm_device_free(r->dev[i]);
		md_devsrv_kill(&r->srv[i]);
	}
	vfm_guest_mem_free(r->mem);
}

/* Runs the guest until it has done some copies through every device. */
static void run_some(struct rig *r)
{
	struct vfm_error err = { 0 };
	struct vfm_guest_stats st = { 0 };

	CHECK_EQ(r->g->ops->start(r->g, &err), 0);
	for (int i = 0; i < 1000; i++) {
		r->g->ops->stats(r->g, &st);
		if (st.dma_ops >= 40 * r->ndev && st.page_writes >= 2000)
			break;
		usleep(5000);
	}
	CHECK_EQ(r->g->ops->stop(r->g), 0);
	r->g->ops->stats(r->g, &st);
	CHECK(st.dma_ops >= 40 * r->ndev);
	CHECK_EQ(st.dma_errors, 0);
}

static struct synth *S(struct rig *r)
{
	return (struct synth *)r->g;
}

/* Both checks, the full one and the quick one the destination runs on load. */
static void expect_verified(struct rig *r)
{
	struct vfm_guest_verify v;

	for (int quick = 0; quick < 2; quick++) {
		CHECK_EQ((quick ? r->g->ops->quick_verify : r->g->ops->verify)(r->g, &v), 0);
		if (!v.verified)
			FAIL("not verified (%s check): %s", quick ? "quick" : "full", v.detail);
		CHECK_EQ(v.errors, 0);
		CHECK_EQ(v.pages_checked,
			 S(r)->npages - S(r)->data_start + r->ndev * SYNTH_DMA_TARGETS);
	}
}

static void expect_failure_of(struct rig *r, bool quick, const char *what)
{
	struct vfm_guest_verify v;

	CHECK_EQ((quick ? r->g->ops->quick_verify : r->g->ops->verify)(r->g, &v), 0);
	CHECK(!v.verified);
	CHECK(v.errors >= 1);
	if (!strstr(v.detail, what))
		FAIL("%s check: detail '%s' does not say '%s'", quick ? "quick" : "full", v.detail,
		     what);
}

/* Every loss below is one the quick check catches too. */
static void expect_failure(struct rig *r, const char *what)
{
	expect_failure_of(r, false, what);
	expect_failure_of(r, true, what);
}

/* A data page of r's guest with generation at least min (written). */
static uint64_t written_page(struct rig *r, uint64_t min)
{
	struct synth *s = S(r);
	uint64_t p;

	for (p = s->data_start; p < s->npages && atomic_load(&s->table[p]) < min; p++)
		;
	CHECK(p < s->npages);
	return p;
}

static void verifies_after_dma(bool by_messages)
{
	struct rig r;

	rig_init(&r, 2, by_messages, true);
	run_some(&r);
	expect_verified(&r);
	/* Every doorbell ran: the device's head is the guest's tail. */
	for (unsigned d = 0; d < 2; d++) {
		CHECK(S(&r)->sb->dev[d].ops >= 40);
		CHECK_EQ(md_reg(r.dev[d], DMADEV_REG_RING_HEAD), S(&r)->sb->dev[d].tail);
		CHECK_EQ(md_reg(r.dev[d], DMADEV_REG_ERRORS), 0);
	}
	/* Running again after a verify continues where it stopped. */
	run_some(&r);
	expect_verified(&r);
	rig_free(&r);
}

TEST(verifies_after_dma_through_fd)
{
	verifies_after_dma(false);
}

TEST(verifies_after_dma_through_messages)
{
	verifies_after_dma(true);
}

TEST(catches_a_stale_data_page)
{
	struct rig r;
	struct synth *s;
	uint64_t p;

	rig_init(&r, 1, false, true);
	run_some(&r);
	s = S(&r);
	for (p = s->data_start; p < s->npages && atomic_load(&s->table[p]) < 2; p++)
		;
	CHECK(p < s->npages);
	/* The previous generation: what a lost dirty page would leave behind. */
	atomic_store(&s->table[p], atomic_load(&s->table[p]) + 1);
	expect_failure(&r, "lost page write");
	rig_free(&r);
}

TEST(catches_a_lost_dma_write)
{
	struct rig r;
	struct synth *s;
	uint64_t t;

	rig_init(&r, 1, false, true);
	run_some(&r);
	s = S(&r);
	t = s->dma_base + 1;   /* device 0's first target: written by the first copy */
	CHECK(atomic_load(&s->table[t]) & SYNTH_TAG);
	((uint64_t *)(s->base + t * s->page_size))[100] ^= 1;
	expect_failure(&r, "lost DMA write");
	rig_free(&r);
}

TEST(catches_a_lost_completion)
{
	struct rig r;
	struct dmadev_desc *ring;

	rig_init(&r, 1, false, true);
	run_some(&r);
	ring = (struct dmadev_desc *)(S(&r)->base + S(&r)->sb->dev[0].ring_gpa);
	ring[3].status = 0;
	expect_failure(&r, "lost completion");
	rig_free(&r);
}

TEST(catches_a_ring_head_the_guest_did_not_ring)
{
	struct rig r;
	uint64_t tail;

	rig_init(&r, 1, false, true);
	run_some(&r);
	/* A doorbell the bookkeeping does not know of (a superblock update lost). */
	tail = S(&r)->sb->dev[0].tail;
	S(&r)->sb->dev[0].tail = tail - 2;
	expect_failure(&r, "ring head");
	rig_free(&r);
}

TEST(incoming_guest_checks_the_superblock)
{
	struct rig r;
	struct vfm_error err = { 0 };
	struct vfm_synthetic_opts so = { .vcpus = 3, .dirty_rate = 64ull << 20, .fresh = false,
					 .ndma = 1 };
	struct vfm_guest *g2;

	/* Memory without a guest in it: the incoming guest says so. */
	rig_init(&r, 1, false, false);
	expect_failure(&r, "no synthetic guest");
	rig_free(&r);

	/* Memory the first guest left: a second one (other vCPU count, as a
	 * destination may have) finds its state and goes on from there. */
	rig_init(&r, 1, false, true);
	run_some(&r);
	so.dma_devs = r.dev;
	if (vfm_guest_synthetic_new(r.mem, &so, &g2, &err))
		FAIL("second guest: %s", err.msg);
	r.g->ops->destroy(r.g);
	r.g = g2;
	expect_verified(&r);
	run_some(&r);
	expect_verified(&r);
	rig_free(&r);
}

TEST(quick_check_catches_a_written_page_that_is_a_hole)
{
	const struct vfm_mem_region *reg;
	struct rig r;
	uint64_t p;

	rig_init(&r, 1, false, true);
	run_some(&r);
	reg = vfm_guest_mem_region(r.mem, 0);
	/* The loader punches zero runs: a written page gone that way is lost. */
	p = written_page(&r, 1);
	CHECK_EQ(fallocate(reg->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			   (off_t)(p * S(&r)->page_size), (off_t)S(&r)->page_size), 0);
	expect_failure(&r, "lost page write");
	rig_free(&r);
}

TEST(quick_check_skips_holes_of_unwritten_pages_only)
{
	const struct vfm_mem_region *reg;
	struct synth *s;
	struct rig r;
	uint64_t p, q;

	rig_init(&r, 1, false, true);
	run_some(&r);
	s = S(&r);
	reg = vfm_guest_mem_region(r.mem, 0);
	for (p = s->data_start; p < s->npages && atomic_load(&s->table[p]); p++)
		;
	CHECK(p < s->npages);
	/* An unwritten page that is a hole reads as zeros: fine. */
	CHECK_EQ(fallocate(reg->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			   (off_t)(p * s->page_size), (off_t)s->page_size), 0);
	expect_verified(&r);
	/* A written page whose table entry went back to 0 (a lost table write). */
	q = written_page(&r, 1);
	atomic_store(&s->table[q], 0);
	expect_failure(&r, "lost page write");
	rig_free(&r);
}

TEST(a_torn_page_needs_the_full_check)
{
	struct rig r;
	uint64_t p;

	rig_init(&r, 1, false, true);
	run_some(&r);
	p = written_page(&r, 1);
	/* One word off the sampled ones (first, middle, last). */
	((uint64_t *)(S(&r)->base + p * S(&r)->page_size))[7] ^= 1;
	expect_failure_of(&r, false, "word 7");
	{
		struct vfm_guest_verify v;

		CHECK_EQ(r.g->ops->quick_verify(r.g, &v), 0);
		CHECK(v.verified);
	}
	rig_free(&r);
}

/* A kick (the engine's kick_ns: what a stop will take) comes back from every
 * vCPU and leaves them writing; a stopped guest has nothing to kick. */
TEST(kick_leaves_the_vcpus_running)
{
	struct vfm_guest_stats st = { 0 };
	struct vfm_error err = { 0 };
	struct rig r;

	rig_init(&r, 1, false, true);
	CHECK_EQ(r.g->ops->start(r.g, &err), 0);
	for (int round = 0; round < 10; round++) {
		uint64_t before;

		CHECK(r.g->ops->kick_ns(r.g) > 0);
		CHECK(r.g->running);
		r.g->ops->stats(r.g, &st);
		before = st.page_writes;
		for (int i = 0; i < 2000 && st.page_writes < before + 50; i++) {
			usleep(1000);
			r.g->ops->stats(r.g, &st);
		}
		CHECK(st.page_writes >= before + 50);
	}
	CHECK_EQ(r.g->ops->stop(r.g), 0);
	CHECK_EQ(r.g->ops->kick_ns(r.g), 0);
	expect_verified(&r);
	rig_free(&r);
}
