/* The kernel VFIO backend's migration data fd against the fake kernel: made
 * O_NONBLOCK, read and written through EAGAIN in poll() slices that see a
 * cancel and end at the timeout, and still right with drivers that stall for
 * a while, ignore O_NONBLOCK, or always poll ready (mtty has no poll method). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "harness.h"
#include "fake_kvfio_rig.h"

#define STREAM_MAX (1u << 20)
#define FAKE_TIMEOUT_MS 2000   /* fake_kvfio_open()'s data fd timeout */

/* The whole STOP_COPY stream into buf; its length. */
static size_t save(struct vfm_device *dev, uint8_t *buf)
{
	struct vfm_error err = { 0 };
	size_t at = 0;

	set(dev, VFM_STATE_STOP_COPY);
	for (;;) {
		ssize_t n = vfm_device_read_data(dev, buf + at, 65536, &err);

		if (n == 0)
			return at;
		if (n < 0)
			FAIL("read: %s", err.msg);
		at += (size_t)n;
		CHECK(at + 65536 <= STREAM_MAX);
	}
}

/* Saves a (cfg) and loads the stream into b (same cfg, another seed): equal state. */
static void save_load(const struct fake_kvfio_cfg *cfg, struct fake_kvfio_stats *src_st,
		      struct fake_kvfio_stats *dst_st)
{
	struct fake_kvfio_cfg c2 = *cfg;
	struct vfm_error err = { 0 };
	uint8_t *buf = malloc(STREAM_MAX);
	struct rig a, b;
	size_t len;

	CHECK(buf);
	rig_open(&a, cfg);
	c2.seed = cfg->seed + 7;
	rig_open(&b, &c2);
	len = save(a.dev, buf);
	CHECK(len > cfg->state_size);
	fake_kvfio_stats(a.fk, src_st);
	set(b.dev, VFM_STATE_RESUMING);
	if (vfm_device_write_data(b.dev, buf, len, &err))
		FAIL("write: %s", err.msg);
	fake_kvfio_stats(b.fk, dst_st);
	set(b.dev, VFM_STATE_STOP);
	CHECK_EQ(fake_kvfio_state_hash(a.fk), fake_kvfio_state_hash(b.fk));
	set(a.dev, VFM_STATE_RUNNING);
	set(b.dev, VFM_STATE_RUNNING);
	free(buf);
	rig_close(&a);
	rig_close(&b);
}

TEST(data_fd_is_made_nonblocking)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats s, d;

	fake_kvfio_cfg_default(&cfg);
	save_load(&cfg, &s, &d);
	CHECK(s.data_nonblock);   /* the saving fd */
	CHECK(d.data_nonblock);   /* the resuming fd */
	CHECK_EQ(s.eagains, 0);
}

/* A driver that has nothing for 350 ms (3+ slices), then everything. */
TEST(stall_of_a_few_slices_is_waited_out)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats s, d;
	uint64_t t0 = now_ms();

	fake_kvfio_cfg_default(&cfg);
	cfg.stall_ms = 350;
	save_load(&cfg, &s, &d);
	CHECK(now_ms() - t0 >= 700);   /* both sides waited their stall */
	CHECK(s.eagains >= 1 && d.eagains >= 1);
	CHECK(s.polls >= 4);           /* slices of at most 100 ms */
	CHECK(d.polls >= 4);
	CHECK(s.data_nonblock && d.data_nonblock);
}

/* A driver that blocks in read()/write() whatever the flag: it works, slowly. */
TEST(driver_ignoring_nonblock_still_works)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats s, d;

	fake_kvfio_cfg_default(&cfg);
	cfg.stall_ms = 150;
	cfg.ignore_nonblock = true;
	save_load(&cfg, &s, &d);
	CHECK_EQ(s.eagains, 0);
	CHECK_EQ(d.eagains, 0);
	CHECK(s.data_nonblock);
}

/* mtty: no poll method, so poll() says ready while read() says EAGAIN: the
 * backend backs off instead of spinning through the 300 ms. */
TEST(always_ready_poll_is_not_spun_on)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats s, d;

	fake_kvfio_cfg_default(&cfg);
	cfg.stall_ms = 300;
	cfg.no_poll = true;
	save_load(&cfg, &s, &d);
	CHECK(s.eagains >= 2);
	/* 1, 2, 4, ... 64, 100, 100 ms: about a dozen tries, never thousands. */
	CHECK(s.eagains < 40);
	CHECK(d.eagains < 40);
}

/* ---- cancel ---- */

struct canceller {
	atomic_bool flag;
	unsigned after_ms;
	pthread_t th;
};

static bool is_cancelled(void *opaque)
{
	return atomic_load(&((struct canceller *)opaque)->flag);
}

static void *cancel_later(void *opaque)
{
	struct canceller *c = opaque;

	nap_ms(c->after_ms);
	atomic_store(&c->flag, true);
	return NULL;
}

static void cancel_start(struct canceller *c, struct vfm_device *dev, unsigned after_ms)
{
	atomic_init(&c->flag, false);
	c->after_ms = after_ms;
	vfm_vfio_set_cancel_check(dev, is_cancelled, c);
	CHECK_EQ(pthread_create(&c->th, NULL, cancel_later, c), 0);
}

/* A driver stuck for good in pre-copy: the read ends soon after the cancel. */
TEST(stuck_read_ends_on_cancel)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_error err = { 0 };
	struct canceller c;
	struct rig r;
	uint8_t buf[4096];
	uint64_t t0;
	ssize_t n;

	fake_kvfio_cfg_default(&cfg);
	cfg.stall_ms = UINT32_MAX;
	rig_open(&r, &cfg);
	set(r.dev, VFM_STATE_PRE_COPY);
	cancel_start(&c, r.dev, 200);
	t0 = now_ms();
	n = vfm_device_read_data(r.dev, buf, sizeof(buf), &err);
	CHECK_EQ(n, VFM_ECANCELED);
	CHECK(strstr(err.msg, "cancelled"));
	CHECK(now_ms() - t0 >= 200);
	/* One slice after the cancel, far from the 2 s timeout (load leaves slack). */
	CHECK(now_ms() - t0 < FAKE_TIMEOUT_MS - 500);
	pthread_join(c.th, NULL);
	vfm_vfio_set_cancel_check(r.dev, NULL, NULL);
	/* The device is not hurt: back to RUNNING, the session closed. */
	set(r.dev, VFM_STATE_RUNNING);
	CHECK(!vfm_device_has_session(r.dev));
	rig_close(&r);
}

/* The same for a write in RESUMING. */
TEST(stuck_write_ends_on_cancel)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_error err = { 0 };
	struct canceller c;
	struct rig r;
	uint8_t buf[4096] = { 0 };
	uint64_t t0;
	int ret;

	fake_kvfio_cfg_default(&cfg);
	cfg.stall_ms = UINT32_MAX;
	rig_open(&r, &cfg);
	set(r.dev, VFM_STATE_RESUMING);
	cancel_start(&c, r.dev, 200);
	t0 = now_ms();
	ret = vfm_device_write_data(r.dev, buf, sizeof(buf), &err);
	CHECK_EQ(ret, VFM_ECANCELED);
	CHECK(now_ms() - t0 < FAKE_TIMEOUT_MS - 500);
	pthread_join(c.th, NULL);
	vfm_vfio_set_cancel_check(r.dev, NULL, NULL);
	CHECK_EQ(vfm_device_reset(r.dev, &err), 0);
	CHECK_EQ(vfm_device_state(r.dev), VFM_STATE_RUNNING);
	rig_close(&r);
}

/* No cancel: a stuck driver is an error at the timeout, not a hang; a cancel
 * check that never fires changes nothing. */
static bool never(void *opaque)
{
	(void)opaque;
	return false;
}

TEST(stuck_read_times_out_without_cancel)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_error err = { 0 };
	struct rig r;
	uint8_t buf[4096];
	uint64_t t0, took;
	ssize_t n;

	fake_kvfio_cfg_default(&cfg);
	cfg.stall_ms = UINT32_MAX;
	rig_open(&r, &cfg);
	set(r.dev, VFM_STATE_STOP_COPY);
	vfm_vfio_set_cancel_check(r.dev, never, NULL);
	t0 = now_ms();
	n = vfm_device_read_data(r.dev, buf, sizeof(buf), &err);
	took = now_ms() - t0;
	CHECK_EQ(n, -ETIMEDOUT);
	CHECK(strstr(err.msg, "no migration data within 2000 ms"));
	CHECK(took >= FAKE_TIMEOUT_MS - 50 && took < FAKE_TIMEOUT_MS + 3000);
	set(r.dev, VFM_STATE_RUNNING);
	rig_close(&r);
}

/* A cancel already set before the read: a stalled fd is not waited on at all. */
TEST(cancel_set_before_the_wait)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_error err = { 0 };
	struct canceller c;
	struct fake_kvfio_stats st;
	struct rig r;
	uint8_t buf[64];

	fake_kvfio_cfg_default(&cfg);
	cfg.stall_ms = UINT32_MAX;
	rig_open(&r, &cfg);
	set(r.dev, VFM_STATE_PRE_COPY);
	atomic_init(&c.flag, true);
	vfm_vfio_set_cancel_check(r.dev, is_cancelled, &c);
	CHECK_EQ(vfm_device_read_data(r.dev, buf, sizeof(buf), &err), VFM_ECANCELED);
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.polls, 0);
	vfm_vfio_set_cancel_check(r.dev, NULL, NULL);
	set(r.dev, VFM_STATE_RUNNING);
	rig_close(&r);
}
