/* The kernel VFIO backend's migration against the fake kernel: every arc, data
 * sessions, pre-copy (ENOMSG, 0, PRECOPY_INFO-driven data, EAGAIN + poll),
 * failure recovery, corrupted streams, MIG_DATA_SIZE. */
#include <stdlib.h>

#include "compat/vfio_compat.h"
#include "harness.h"
#include "fake_kvfio_rig.h"

#define STREAM_MAX (1u << 20)

/* Reads the session until the end (STOP_COPY) or "nothing now" (pre-copy). */
static size_t drain(struct vfm_device *dev, uint8_t *buf, size_t at, size_t cap)
{
	struct vfm_error err = { 0 };

	for (;;) {
		ssize_t n = vfm_device_read_data(dev, buf + at, cap - at < 65536 ? cap - at : 65536,
						 &err);

		if (n == 0 || n == -ENOMSG)
			return at;
		if (n < 0)
			FAIL("read: %s", err.msg);
		at += (size_t)n;
		CHECK(at < cap);
	}
}

static size_t save_stop_copy(struct vfm_device *dev, uint8_t *buf)
{
	size_t len;

	set(dev, VFM_STATE_STOP_COPY);
	len = drain(dev, buf, 0, STREAM_MAX);
	/* End of stream stays the end. */
	CHECK_EQ(vfm_device_read_data(dev, buf + len, 16, NULL), 0);
	return len;
}

static void load(struct vfm_device *dev, const uint8_t *buf, size_t len)
{
	struct vfm_error err = { 0 };

	set(dev, VFM_STATE_RESUMING);
	CHECK(vfm_device_has_session(dev));
	if (vfm_device_write_data(dev, buf, len, &err))
		FAIL("write: %s", err.msg);
	set(dev, VFM_STATE_STOP);
}

/* Enters s; RESUMING gets a whole stream at once so it can be left again. */
static void enter(struct rig *r, enum vfm_state s, const uint8_t *stream, size_t len)
{
	set(r->dev, s);
	if (s == VFM_STATE_RESUMING)
		CHECK_EQ(vfm_device_write_data(r->dev, stream, len, NULL), 0);
}

TEST(every_arc_of_every_flag_set)
{
	static const uint64_t sets[] = {
		VFM_MIG_STOP_COPY, VFM_MIG_STOP_COPY | VFM_MIG_P2P,
		VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY, VFM_MIG_ALL,
	};
	uint8_t *stream = malloc(STREAM_MAX);

	CHECK(stream);
	for (size_t f = 0; f < sizeof(sets) / sizeof(sets[0]); f++) {
		struct fake_kvfio_cfg cfg;
		struct rig r;
		size_t len;

		fake_kvfio_cfg_default(&cfg);
		cfg.mig_flags = sets[f];
		rig_open(&r, &cfg);
		CHECK_EQ(vfm_device_mig_flags(r.dev), sets[f]);
		len = save_stop_copy(r.dev, stream);
		set(r.dev, VFM_STATE_RUNNING);
		for (int from = 1; from < VFM_STATE_COUNT; from++) {
			for (int to = 1; to < VFM_STATE_COUNT; to++) {
				struct fake_kvfio_stats a, b;
				struct vfm_error err = { 0 };
				int ret;

				if (from == to || !vfm_state_supported(sets[f], from) ||
				    !vfm_state_supported(sets[f], to))
					continue;
				enter(&r, from, stream, len);
				fake_kvfio_stats(r.fk, &a);
				ret = vfm_device_set_state(r.dev, to, VFM_STATE_ERROR, &err);
				fake_kvfio_stats(r.fk, &b);
				if (from == VFM_STATE_STOP_COPY &&
				    (to == VFM_STATE_PRE_COPY || to == VFM_STATE_PRE_COPY_P2P)) {
					CHECK_EQ(ret, VFM_EFORBIDDEN);
					CHECK_EQ(b.sets, a.sets);   /* refused before any ioctl */
					CHECK_EQ(fake_kvfio_state(r.fk), VFM_STATE_STOP_COPY);
				} else {
					if (ret)
						FAIL("%s -> %s: %s", vfm_state_name(from),
						     vfm_state_name(to), err.msg);
					CHECK_EQ(b.sets, a.sets + 1);   /* the kernel walks the path */
					CHECK_EQ(fake_kvfio_state(r.fk), to);
					CHECK_EQ(vfm_device_has_session(r.dev),
						 vfm_state_has_session(to));
					if (to == VFM_STATE_RESUMING)
						CHECK_EQ(vfm_device_write_data(r.dev, stream, len,
									       NULL), 0);
				}
				set(r.dev, VFM_STATE_RUNNING);
				CHECK_EQ(fake_kvfio_state(r.fk), VFM_STATE_RUNNING);
			}
		}
		rig_close(&r);
	}
	free(stream);
}

TEST(stop_copy_save_loads_into_another_device)
{
	struct fake_kvfio_cfg cfg;
	struct rig a, b;
	uint8_t *buf = malloc(STREAM_MAX);
	struct fake_kvfio_stats st;
	size_t len;

	fake_kvfio_cfg_default(&cfg);
	cfg.read_chunk = 1000;   /* chunk boundaries need not match records */
	rig_open(&a, &cfg);
	cfg.seed = 99;
	rig_open(&b, &cfg);
	CHECK(fake_kvfio_state_hash(a.fk) != fake_kvfio_state_hash(b.fk));
	len = save_stop_copy(a.dev, buf);
	CHECK(len > cfg.state_size);
	fake_kvfio_stats(a.fk, &st);
	CHECK_EQ(st.open_objects, 3);   /* device, iommufd, data fd */
	set(a.dev, VFM_STATE_STOP);
	fake_kvfio_stats(a.fk, &st);
	CHECK_EQ(st.open_objects, 2);   /* the session's fd is closed with it */
	load(b.dev, buf, len);
	set(b.dev, VFM_STATE_RUNNING);
	CHECK_EQ(fake_kvfio_state_hash(a.fk), fake_kvfio_state_hash(b.fk));
	free(buf);
	rig_close(&a);
	rig_close(&b);
}

TEST(corrupted_stream_is_refused_and_recovered)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_error err = { 0 };
	struct rig a, b;
	uint8_t *buf = malloc(STREAM_MAX);
	uint64_t before;
	size_t len;

	fake_kvfio_cfg_default(&cfg);
	rig_open(&a, &cfg);
	cfg.seed = 5;
	rig_open(&b, &cfg);
	len = save_stop_copy(a.dev, buf);
	buf[len / 2] ^= 1;
	before = fake_kvfio_state_hash(b.fk);
	set(b.dev, VFM_STATE_RESUMING);
	CHECK_EQ(vfm_device_write_data(b.dev, buf, len, &err), 0);
	/* The driver refuses at RESUMING -> STOP; recovery to RUNNING fails too
	 * (the fake stays RESUMING), so the device layer resets. */
	CHECK_EQ(vfm_device_set_state(b.dev, VFM_STATE_STOP, VFM_STATE_RUNNING, &err), -EINVAL);
	CHECK_EQ(vfm_device_state(b.dev), VFM_STATE_RUNNING);
	CHECK_EQ(fake_kvfio_state(b.fk), VFM_STATE_RUNNING);
	CHECK_EQ(fake_kvfio_state_hash(b.fk), before);
	free(buf);
	rig_close(&a);
	rig_close(&b);
}

/* Pre-copy: initial bytes fall to 0, ENOMSG at the temporary end, dirty data
 * after the device changes state, then STOP_COPY in the same session. */
static void precopy_round(struct fake_kvfio_cfg *cfg)
{
	struct rig a, b;
	uint8_t *buf = malloc(STREAM_MAX);
	uint64_t init, dirty, last_init = UINT64_MAX;
	struct vfm_error err = { 0 };
	struct fake_kvfio_stats st;
	size_t len = 0;

	rig_open(&a, cfg);
	cfg->seed += 10;
	rig_open(&b, cfg);
	set(a.dev, VFM_STATE_PRE_COPY);
	CHECK(vfm_device_has_session(a.dev));
	CHECK_EQ(vfm_device_precopy_info(a.dev, &init, &dirty, &err), 0);
	CHECK(init > cfg->state_size);
	CHECK_EQ(dirty, 0);
	for (;;) {
		ssize_t n = vfm_device_read_data(a.dev, buf + len, 8192, &err);

		if (n == -ENOMSG)
			break;
		CHECK(n > 0);
		len += (size_t)n;
		CHECK_EQ(vfm_device_precopy_info(a.dev, &init, &dirty, &err), 0);
		CHECK(init < last_init);   /* falls as read */
		last_init = init;
	}
	CHECK_EQ(init, 0);
	/* The device changes two pages it already sent. */
	fake_kvfio_touch_state(a.fk, 4096, 10);
	fake_kvfio_touch_state(a.fk, 3 * 4096, 10);
	len = drain(a.dev, buf, len, STREAM_MAX);
	fake_kvfio_touch_state(a.fk, 0, 1);
	set(a.dev, cfg->mig_flags & VFM_MIG_P2P ? VFM_STATE_PRE_COPY_P2P : VFM_STATE_STOP_COPY);
	set(a.dev, VFM_STATE_STOP_COPY);
	CHECK(vfm_device_has_session(a.dev));
	len = drain(a.dev, buf, len, STREAM_MAX);
	fake_kvfio_stats(a.fk, &st);
	CHECK(st.precopy_info > 0);
	load(b.dev, buf, len);
	CHECK_EQ(fake_kvfio_state_hash(a.fk), fake_kvfio_state_hash(b.fk));
	set(a.dev, VFM_STATE_RUNNING);
	set(b.dev, VFM_STATE_RUNNING);
	free(buf);
	rig_close(&a);
	rig_close(&b);
}

TEST(precopy_enomsg)
{
	struct fake_kvfio_cfg cfg;

	fake_kvfio_cfg_default(&cfg);
	precopy_round(&cfg);
}

TEST(precopy_without_p2p_goes_straight_to_stop_copy)
{
	struct fake_kvfio_cfg cfg;

	fake_kvfio_cfg_default(&cfg);
	cfg.mig_flags = VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY;   /* hisi_acc */
	precopy_round(&cfg);
}

TEST(precopy_read_returning_zero_means_nothing_now)
{
	struct fake_kvfio_cfg cfg;

	fake_kvfio_cfg_default(&cfg);
	cfg.zero_at_precopy_end = true;   /* mtty */
	precopy_round(&cfg);
}

TEST(precopy_info_in_the_read_loop_produces_data)
{
	struct fake_kvfio_cfg cfg;
	struct rig r;
	uint8_t *buf = malloc(STREAM_MAX);
	struct fake_kvfio_stats a, b;
	size_t len;

	fake_kvfio_cfg_default(&cfg);
	cfg.info_produces_dirty = true;   /* mlx5, virtio */
	rig_open(&r, &cfg);
	set(r.dev, VFM_STATE_PRE_COPY);
	len = drain(r.dev, buf, 0, STREAM_MAX);
	fake_kvfio_touch_state(r.fk, 0, 100);
	fake_kvfio_stats(r.fk, &a);
	/* Without asking PRECOPY_INFO the driver has nothing: the backend asks. */
	CHECK(drain(r.dev, buf, len, STREAM_MAX) > len);
	fake_kvfio_stats(r.fk, &b);
	CHECK(b.precopy_info > a.precopy_info);
	set(r.dev, VFM_STATE_RUNNING);
	free(buf);
	rig_close(&r);
	fake_kvfio_cfg_default(&cfg);
	cfg.info_produces_dirty = true;
	precopy_round(&cfg);
}

TEST(nonblocking_data_fd_waits_in_poll)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats st;
	struct rig a;
	uint8_t *buf = malloc(STREAM_MAX);

	fake_kvfio_cfg_default(&cfg);
	cfg.nonblocking = true;
	rig_open(&a, &cfg);
	CHECK(save_stop_copy(a.dev, buf) > cfg.state_size);
	fake_kvfio_stats(a.fk, &st);
	CHECK(st.eagains > 0);
	CHECK(st.polls >= st.eagains);
	set(a.dev, VFM_STATE_RUNNING);
	free(buf);
	rig_close(&a);
	fake_kvfio_cfg_default(&cfg);
	cfg.nonblocking = true;
	precopy_round(&cfg);
}

TEST(failed_arc_recovers_then_resets)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats st;
	struct vfm_error err = { 0 };
	struct rig r;

	fake_kvfio_cfg_default(&cfg);
	rig_open(&r, &cfg);
	/* The walk fails at STOP -> STOP_COPY, the kernel sits in STOP: recover. */
	fake_kvfio_fail_arc(r.fk, VFM_STATE_STOP, VFM_STATE_STOP_COPY, -EIO, VFM_STATE_STOP);
	CHECK_EQ(vfm_device_set_state(r.dev, VFM_STATE_STOP_COPY, VFM_STATE_RUNNING, &err), -EIO);
	CHECK_EQ(vfm_device_state(r.dev), VFM_STATE_RUNNING);
	CHECK_EQ(fake_kvfio_state(r.fk), VFM_STATE_RUNNING);
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.resets, 0);
	/* The driver lands in ERROR: only a reset leaves it. */
	fake_kvfio_fail_arc(r.fk, VFM_STATE_RUNNING, VFM_STATE_PRE_COPY, -EIO, VFM_STATE_ERROR);
	vfm_error_clear(&err);
	CHECK_EQ(vfm_device_set_state(r.dev, VFM_STATE_PRE_COPY, VFM_STATE_RUNNING, &err), -EIO);
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.resets, 1);
	CHECK_EQ(fake_kvfio_state(r.fk), VFM_STATE_RUNNING);
	CHECK_EQ(vfm_device_state(r.dev), VFM_STATE_RUNNING);
	/* An ioctl that fails outright (the kernel copies the request back). */
	fake_kvfio_inject(r.fk, VFIO_DEVICE_FEATURE, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 0, -EIO);
	CHECK_EQ(vfm_device_set_state(r.dev, VFM_STATE_STOP, VFM_STATE_RUNNING, NULL), -EIO);
	CHECK_EQ(vfm_device_state(r.dev), VFM_STATE_RUNNING);
	/* A fresh session works after all that. */
	set(r.dev, VFM_STATE_PRE_COPY);
	CHECK(vfm_device_has_session(r.dev));
	set(r.dev, VFM_STATE_RUNNING);
	rig_close(&r);
}

TEST(reset_kills_the_session)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats st;
	struct rig r;

	fake_kvfio_cfg_default(&cfg);
	rig_open(&r, &cfg);
	set(r.dev, VFM_STATE_PRE_COPY);
	CHECK_EQ(vfm_device_reset(r.dev, NULL), 0);
	CHECK(!vfm_device_has_session(r.dev));
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.open_objects, 2);   /* the dead data fd was closed */
	CHECK_EQ(vfm_device_read_data(r.dev, &st, 8, NULL), -EINVAL);
	rig_close(&r);

	cfg.no_reset = true;
	rig_open(&r, &cfg);
	CHECK_EQ(vfm_device_reset(r.dev, NULL), -ENOTSUP);
	rig_close(&r);
}

/*
 * mtty: no VFIO_DEVICE_FLAGS_RESET in its info, yet the reset works. A
 * refused load (the fake validates at RESUMING -> STOP) is reset anyway and
 * the device ends RUNNING; a device closed in RESUMING is reset at close.
 */
TEST(unadvertised_reset_is_issued)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats st;
	struct vfm_error err = { 0 };
	uint8_t junk[64];
	struct rig r;

	fake_kvfio_cfg_default(&cfg);
	cfg.reset_hidden = true;
	rig_open(&r, &cfg);
	memset(junk, 0x5a, sizeof(junk));
	set(r.dev, VFM_STATE_RESUMING);
	CHECK_EQ(vfm_device_write_data(r.dev, junk, sizeof(junk), NULL), 0);
	CHECK(vfm_device_set_state(r.dev, VFM_STATE_STOP, VFM_STATE_ERROR, &err) < 0);
	CHECK_EQ(vfm_device_state(r.dev), VFM_STATE_RUNNING);
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.resets, 1);
	/* Closed in RESUMING: reset on the way out. */
	set(r.dev, VFM_STATE_RESUMING);
	vfm_device_free(r.dev);
	r.dev = NULL;
	fake_kvfio_stats(r.fk, &st);
	CHECK_EQ(st.resets, 2);
	rig_close(&r);
}

TEST(stop_copy_size)
{
	struct fake_kvfio_cfg cfg;
	struct rig r;
	uint64_t sz = 0;

	fake_kvfio_cfg_default(&cfg);
	rig_open(&r, &cfg);
	CHECK_EQ(vfm_device_stop_copy_size(r.dev, &sz, NULL), 0);
	CHECK(sz > cfg.state_size);
	rig_close(&r);
	/* A 6.1 kernel has no MIG_DATA_SIZE: a real error, not -ENOTSUP, so the
	 * engine assumes the worst (100 GiB) as QEMU does. */
	cfg.no_mig_data_size = true;
	rig_open(&r, &cfg);
	CHECK_EQ(vfm_device_stop_copy_size(r.dev, &sz, NULL), -ENOTTY);
	rig_close(&r);
}

TEST(no_migration_device)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio *fk;
	struct vfm_device *dev;
	struct vfm_error err = { 0 };

	fake_kvfio_cfg_default(&cfg);
	cfg.mig_flags = 0;    /* the kernel answers ENOTTY */
	fk = fake_kvfio_new(&cfg);
	CHECK_EQ(fake_kvfio_open(fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_AUTO, NULL, &dev,
				 &err), 0);
	CHECK_EQ(vfm_device_probe_migration(dev, &err), VFM_ENOMIGRATION);
	vfm_device_free(dev);
	fake_kvfio_free(fk);
}
