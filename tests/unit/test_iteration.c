/*
 * The source engine's iteration semantics with in-process test devices
 * (tests/unit/testdev.c: real state machine, pre-copy session, call counts):
 * the VFIO savable driven turn by turn (PRECOPY_INFO at most once per
 * iteration, switchover-ack data marker when the initial bytes are out even
 * if every turn fills its budget, the exact pending figure), and whole
 * migrations to a file for the state flow (PRE_COPY only from RUNNING, every
 * P2P device in RUNNING_P2P before any goes RUNNING on a cancel).
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>

#include "harness.h"
#include "migration/engine.h"
#include "testdev.h"
#include "vfiomig/migration.h"

#define PG 4096ull
#define MEM_SIZE (4ull << 20)
#define STATE (8u << 20)
/* The VFIO savable reads 1 MiB blocks: a turn of this budget is one block. */
#define BUDGET (1u << 20)

struct rig {
	struct vfm_guest_mem *mem;
	struct vfm_migration *m;
	struct testdev *td[2];
	unsigned ndev;
	char dir[64];
	char uri[128];
};

static void rig_init(struct rig *r, unsigned ndev, uint64_t flags)
{
	struct vfm_error err = { 0 };

	memset(r, 0, sizeof(*r));
	CHECK_EQ(vfm_guest_mem_new(PG, &r->mem, &err), 0);
	CHECK_EQ(vfm_guest_mem_add(r->mem, 0, MEM_SIZE, "ram", &err), 0);
	CHECK_EQ(vfm_migration_new(r->mem, NULL, NULL, &r->m, &err), 0);
	r->ndev = ndev;
	for (unsigned i = 0; i < ndev; i++) {
		char id[16];
		struct vfm_device_props props;

		snprintf(id, sizeof(id), "dev%u", i);
		r->td[i] = testdev_new(id, flags, STATE, 11 + i, 0);
		vfm_device_props_default(&props);
		snprintf(props.id, sizeof(props.id), "%s", id);
		if (vfm_migration_add_device(r->m, testdev_device(r->td[i]), &props, &err))
			FAIL("add_device: %s", err.msg);
	}
	snprintf(r->dir, sizeof(r->dir), "/tmp/vfm-iter-XXXXXX");
	CHECK(mkdtemp(r->dir));
	snprintf(r->uri, sizeof(r->uri), "file:%s/vm.state", r->dir);
}

static void rig_free(struct rig *r)
{
	char path[160];

	vfm_migration_free(r->m);
	for (unsigned i = 0; i < r->ndev; i++)
		testdev_free(r->td[i]);
	vfm_guest_mem_free(r->mem);
	snprintf(path, sizeof(path), "%s/vm.state", r->dir);
	unlink(path);
	rmdir(r->dir);
}

/* The device's savable, set up for pre-copy, writing to /dev/null. */
static struct vfm_savable *setup_device_savable(struct rig *r, struct vfm_stream **s)
{
	struct vfm_error err = { 0 };
	struct vfm_savable *sv = NULL;
	int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);

	CHECK(fd >= 0);
	CHECK_EQ(vfm_stream_open(fd, 1000, s, &err), 0);
	for (unsigned i = 0; i < r->m->nsv; i++)
		if (r->m->sv[i].ops == &vfm__vfio_savable_ops)
			sv = &r->m->sv[i];
	CHECK(sv != NULL);
	if (sv->ops->save_setup(sv->opaque, *s, &err))
		FAIL("save_setup: %s", err.msg);
	CHECK_EQ(testdev_state(r->td[0]), VFM_STATE_PRE_COPY);
	return sv;
}

TEST(precopy_info_at_most_once_per_iteration)
{
	struct vfm_error err = { 0 };
	struct vfm_stream *s;
	struct vfm_savable *sv;
	struct vfm_mig_device *md;
	struct rig r;
	unsigned calls0, turns;
	uint64_t pending;

	rig_init(&r, 1, VFM_MIG_ALL);
	sv = setup_device_savable(&r, &s);
	md = sv->opaque;
	calls0 = testdev_calls(r.td[0], TESTDEV_OP_PRECOPY_INFO);
	CHECK_EQ(calls0, 1);   /* setup asks once */
	/* The initial pass: many turns, the device busy all along. */
	for (turns = 0; turns < 64 && sv->ops->save_iterate(sv->opaque, s, BUDGET, &err) == 0; turns++)
		CHECK_EQ(testdev_dirty(r.td[0], (turns * 4096) % (STATE - 4096), 4096), 0);
	turns++;
	CHECK(turns >= STATE / BUDGET - 1);
	/* Local decrement: the estimate fell with the data read, no query. */
	CHECK(sv->ops->pending_estimate(sv->opaque) < STATE / 2);
	/* End of data reached (or the pass is out): at most one query so far. */
	for (unsigned i = 0; i < 8; i++)
		CHECK(sv->ops->save_iterate(sv->opaque, s, BUDGET, &err) >= 0);
	CHECK(testdev_calls(r.td[0], TESTDEV_OP_PRECOPY_INFO) <= calls0 + 1);
	CHECK_EQ(md->precopy_info_calls, testdev_calls(r.td[0], TESTDEV_OP_PRECOPY_INFO));
	/* The exact check ends the iteration: fresh figures, a new pass. */
	CHECK_EQ(sv->ops->pending_exact(sv->opaque, &pending, &err), 0);
	calls0 = testdev_calls(r.td[0], TESTDEV_OP_PRECOPY_INFO);
	CHECK_EQ(testdev_dirty(r.td[0], 0, 3 * BUDGET), 0);
	for (unsigned i = 0; i < 16; i++)
		CHECK(sv->ops->save_iterate(sv->opaque, s, BUDGET, &err) >= 0);
	CHECK(testdev_calls(r.td[0], TESTDEV_OP_PRECOPY_INFO) <= calls0 + 1);
	fprintf(stderr, "# %u turns in the first pass, %u PRECOPY_INFO calls in all\n", turns,
		testdev_calls(r.td[0], TESTDEV_OP_PRECOPY_INFO));
	sv->ops->save_cleanup(sv->opaque, false);
	vfm_stream_free(s);
	rig_free(&r);
}

TEST(init_data_sent_although_every_turn_fills_its_budget)
{
	struct vfm_error err = { 0 };
	struct vfm_stream *s;
	struct vfm_savable *sv;
	struct vfm_mig_device *md;
	struct rig r;
	unsigned turn;
	int ret;

	rig_init(&r, 1, VFM_MIG_ALL);
	sv = setup_device_savable(&r, &s);
	md = sv->opaque;
	/* The device dirties more than a budget between turns: never a short
	 * turn, so the old "sent < budget" rule never sent the marker. */
	for (turn = 0; turn < 200 && !md->init_data_sent; turn++) {
		uint64_t b0 = vfm_stream_bytes(s);

		CHECK_EQ(testdev_dirty(r.td[0], (turn * 7919u) % (STATE - 2 * BUDGET), 2 * BUDGET), 0);
		ret = sv->ops->save_iterate(sv->opaque, s, BUDGET, &err);
		CHECK(ret >= 0);
		/* A full turn, or the end of the pass: never "nothing now". */
		CHECK(vfm_stream_bytes(s) - b0 >= BUDGET || (ret == 1 && md->pass_left == 0));
		if (md->pass_left == 0 && !md->init_data_sent) {
			uint64_t pending;

			CHECK_EQ(sv->ops->pending_exact(sv->opaque, &pending, &err), 0);
		}
	}
	CHECK(md->init_data_sent);
	CHECK_EQ(md->precopy_init, 0);
	/* About the initial data's worth of turns, not an unbounded number. */
	CHECK(turn <= 2 * STATE / BUDGET + 4);
	fprintf(stderr, "# INIT_DATA_SENT after %u full turns\n", turn);
	sv->ops->save_cleanup(sv->opaque, false);
	vfm_stream_free(s);
	rig_free(&r);
}

/*
 * MIG_DATA_SIZE is the data "required to complete stop copy" (vfio.h): it
 * holds the pre-copy bytes not read yet, so the exact figure is the larger
 * of the two, not their sum (the sum QEMU makes counts them twice). The
 * test device reports as the uAPI says: its stop-copy size covers init +
 * dirty. Mutation caught: the sum (pending == sc + init + dirty).
 */
TEST(pending_exact_counts_the_precopy_bytes_once)
{
	struct vfm_error err = { 0 };
	struct vfm_stream *s;
	struct vfm_savable *sv;
	struct rig r;
	uint64_t pending, sc, init, dirty;

	rig_init(&r, 1, VFM_MIG_ALL);
	sv = setup_device_savable(&r, &s);
	for (unsigned i = 0; i < 4; i++)
		CHECK(sv->ops->save_iterate(sv->opaque, s, BUDGET, &err) >= 0);
	CHECK_EQ(testdev_dirty(r.td[0], 4096, 3 * 4096), 0);
	CHECK_EQ(sv->ops->pending_exact(sv->opaque, &pending, &err), 0);
	/* The device is idle: its figures now are the ones the check used. */
	CHECK_EQ(vfm_device_stop_copy_size(testdev_device(r.td[0]), &sc, &err), 0);
	CHECK_EQ(vfm_device_precopy_info(testdev_device(r.td[0]), &init, &dirty, &err), 0);
	CHECK(init > 0 && dirty > 0 && sc > 0);
	CHECK(sc >= init + dirty);
	CHECK_EQ(pending, sc);
	/* The estimate starts from the same figure and falls with the data
	 * read: one block less after a turn. */
	CHECK_EQ(sv->ops->pending_estimate(sv->opaque), sc);
	CHECK(sv->ops->save_iterate(sv->opaque, s, BUDGET, &err) >= 0);
	CHECK(sv->ops->pending_estimate(sv->opaque) <= sc - BUDGET / 2);
	/* A failed stop-copy size query is never 0 bytes (QEMU's 100 GiB). */
	testdev_fail_op(r.td[0], TESTDEV_OP_STOP_COPY_SIZE, -EIO, 1);
	CHECK_EQ(sv->ops->pending_exact(sv->opaque, &pending, &err), 0);
	CHECK(pending >= (100ull << 30));
	sv->ops->save_cleanup(sv->opaque, false);
	vfm_stream_free(s);
	rig_free(&r);
}

TEST(stopped_device_goes_straight_to_stop_copy)
{
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };
	struct rig r;
	char arcs[256];

	rig_init(&r, 1, VFM_MIG_ALL);
	/* A paused VM's device: stopped through the device layer. */
	CHECK_EQ(vfm_device_set_state(testdev_device(r.td[0]), VFM_STATE_STOP, VFM_STATE_ERROR, &err), 0);
	testdev_clear_arcs(r.td[0]);
	vfm_migration_params_default(&p);
	p.timeout_ms = 5000;
	if (vfm_migration_start(r.m, r.uri, &p, &err))
		FAIL("start: %s", err.msg);
	CHECK_EQ(vfm_migration_wait(r.m, 20000), 0);
	vfm_migration_get_stats(r.m, &st);
	if (st.status != VFM_MIG_COMPLETED)
		FAIL("status %s: %s", vfm_mig_status_name(st.status), st.error);
	testdev_arcs(r.td[0], arcs, sizeof(arcs));
	fprintf(stderr, "# arcs %s\n", arcs);
	/* Never PRE_COPY, never woken to RUNNING_P2P: STOP -> STOP_COPY -> STOP. */
	CHECK_STR(arcs, "S>SC,SC>S");
	CHECK(st.device_transferred_bytes >= STATE);
	rig_free(&r);
}

/*
 * A device that always has a few fresh bytes (firmware touching a counter):
 * every iteration moves a little, never sitting idle. Such a window is paced
 * by the device, not the link: it must not become the link's speed. It did
 * (one run: 393 B/s), and with a few KiB pending the engine waited forever.
 * Here 64 bytes every 4 ms (~16 KB/s) against a file the kernel takes at
 * hundreds of MB/s, capped at 32 MB/s (so the 12 MiB of RAM and state take
 * real, link-bound windows, ~400 ms, and no probe is needed; the dribble's
 * windows stay far under the cap, so the limiter never holds them). The
 * device cannot say its stop-copy size until the bulk is out and 1 s and 5
 * iterations more have passed (100 GiB pending, as QEMU assumes): that holds
 * the migration in pre-copy, dribbling (an iteration is ~11 ms, ~100 ms under
 * ASan; under TSan the bulk alone took over 1.5 s, so a hold of 1.5 s from
 * the start saw 3 iterations); then the few bytes pending fit and it ends. The
 * estimate must still be the capped windows' (the dribble's windows
 * measured 12-15 KB/s before the fix).
 */
struct dribble {
	struct testdev *td;
	atomic_bool stop;
};

static void *dribble_main(void *arg)
{
	struct dribble *d = arg;

	for (unsigned i = 0; !atomic_load(&d->stop); i++) {
		testdev_dirty(d->td, (size_t)(i % 64) * 4096, 64);
		nap_ms(4);
	}
	return NULL;
}

TEST_TIMEOUT(device_paced_windows_do_not_lower_the_link_estimate, 60)
{
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };
	struct dribble d = { 0 };
	uint64_t t0;
	pthread_t t;
	struct rig r;

	rig_init(&r, 1, VFM_MIG_ALL);
	d.td = r.td[0];
	CHECK_EQ(pthread_create(&t, NULL, dribble_main, &d), 0);
	vfm_migration_params_default(&p);
	p.timeout_ms = 5000;
	p.max_bandwidth = 32000000;
	testdev_fail_op(r.td[0], TESTDEV_OP_STOP_COPY_SIZE, -EIO, -1);
	t0 = now_ms();
	if (vfm_migration_start(r.m, r.uri, &p, &err))
		FAIL("start: %s", err.msg);
	/* Held until the bulk is out, then for 1 s and 5 iterations of the
	 * dribble's windows (bounded: 30 s). */
	uint64_t t_bulk = 0, it_bulk = 0;

	for (int i = 0; i < 3000; i++) {
		vfm_migration_get_stats(r.m, &st);
		if (st.status >= VFM_MIG_COMPLETED)
			break;
		if (!t_bulk && st.device_transferred_bytes >= STATE) {
			t_bulk = now_ms();
			it_bulk = st.precopy_iterations;
		}
		if (t_bulk && now_ms() - t_bulk >= 1000 && st.precopy_iterations >= it_bulk + 5)
			break;
		nap_ms(10);
	}
	fprintf(stderr, "# bulk out after %" PRIu64 " ms, iteration %" PRIu64 "\n",
		t_bulk ? t_bulk - t0 : 0, it_bulk);
	testdev_fail_op(r.td[0], TESTDEV_OP_STOP_COPY_SIZE, 0, 0);
	if (vfm_migration_wait(r.m, 15000)) {
		vfm_migration_get_stats(r.m, &st);
		fprintf(stderr, "# after 15 s: %s, %" PRIu64 " iterations, %" PRIu64
			" pending, %.0f B/s\n", vfm_mig_status_name(st.status),
			st.precopy_iterations, st.pending_bytes, st.bandwidth_bps);
		vfm_migration_cancel(r.m);
		CHECK_EQ(vfm_migration_wait(r.m, 10000), 0);
		atomic_store(&d.stop, true);
		pthread_join(t, NULL);
		FAIL("did not complete in 15 s");
	}
	atomic_store(&d.stop, true);
	pthread_join(t, NULL);
	vfm_migration_get_stats(r.m, &st);
	if (st.status != VFM_MIG_COMPLETED)
		FAIL("status %s: %s", vfm_mig_status_name(st.status), st.error);
	fprintf(stderr, "# %" PRIu64 " iterations in %" PRIu64 " ms, %.0f B/s, downtime %.1f ms\n",
		st.precopy_iterations, now_ms() - t0, st.bandwidth_bps, st.downtime_ms);
	/* The dribble's windows happened... */
	CHECK(st.precopy_iterations >= 5);
	/* ...and the estimate is still the capped windows' ~32 MB/s. */
	CHECK(st.bandwidth_bps >= 8e6);
	rig_free(&r);
}

/* Every arc of every device, in the order taken, once recording is on. */
struct arclog {
	pthread_mutex_t lock;
	atomic_bool on;
	enum vfm__mig_phase at;   /* where to cancel */
	unsigned n;
	struct { const struct testdev *td; enum vfm_state from, to; } a[64];
};

static void on_arc(void *opaque, const struct testdev *td, enum vfm_state from, enum vfm_state to,
		   bool failed)
{
	struct arclog *l = opaque;

	if (!atomic_load(&l->on) || failed)
		return;
	pthread_mutex_lock(&l->lock);
	if (l->n < 64)
		l->a[l->n++] = (typeof(l->a[0])){ td, from, to };
	pthread_mutex_unlock(&l->lock);
}

static void cancel_here(void *opaque, struct vfm_migration *m, enum vfm__mig_phase ph)
{
	struct arclog *l = opaque;

	if (ph != l->at)
		return;
	atomic_store(&l->on, true);
	vfm_migration_cancel(m);
}

static void p2p_rollback(enum vfm__mig_phase at)
{
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };
	struct arclog l = { .lock = PTHREAD_MUTEX_INITIALIZER, .at = at };
	struct rig r;
	int first_running = -1, last_p2p = -1;
	unsigned p2p_seen = 0;

	rig_init(&r, 2, VFM_MIG_ALL);
	for (unsigned i = 0; i < 2; i++)
		testdev_set_arc_hook(r.td[i], on_arc, &l);
	vfm__migration_set_phase_hook(r.m, cancel_here, &l);
	vfm_migration_params_default(&p);
	p.timeout_ms = 5000;
	if (at == VFM__PH_PRECOPY) {
		/* Never converges: the cancel comes in pre-copy. */
		p.downtime_limit_ms = 1;
		p.avail_switchover_bandwidth = 1000;
	}
	if (vfm_migration_start(r.m, r.uri, &p, &err))
		FAIL("start: %s", err.msg);
	CHECK_EQ(vfm_migration_wait(r.m, 20000), 0);
	vfm_migration_get_stats(r.m, &st);
	CHECK_EQ(st.status, VFM_MIG_CANCELLED);
	for (unsigned i = 0; i < l.n; i++) {
		fprintf(stderr, "# %s: %s > %s\n", l.a[i].td == r.td[0] ? "dev0" : "dev1",
			vfm_state_name(l.a[i].from), vfm_state_name(l.a[i].to));
		if (l.a[i].to == VFM_STATE_RUNNING && first_running < 0)
			first_running = (int)i;
		if (l.a[i].to == VFM_STATE_RUNNING_P2P) {
			last_p2p = (int)i;
			p2p_seen |= l.a[i].td == r.td[0] ? 1u : 2u;
		}
	}
	if (at == VFM__PH_PRECOPY) {
		/* PRE_COPY is a running state: each goes straight back, no P2P. */
		CHECK_EQ(l.n, 2);
		CHECK_EQ(p2p_seen, 0);
		for (unsigned i = 0; i < l.n; i++)
			CHECK(l.a[i].from == VFM_STATE_PRE_COPY && l.a[i].to == VFM_STATE_RUNNING);
	} else {
		/* Stopped devices: both through RUNNING_P2P before either runs. */
		CHECK_EQ(p2p_seen, 3u);
		CHECK(first_running > last_p2p);
	}
	for (unsigned i = 0; i < 2; i++)
		CHECK_EQ(testdev_state(r.td[i]), VFM_STATE_RUNNING);
	rig_free(&r);
}

TEST(cancel_in_stop_copy_p2p_devices_all_running_p2p_before_any_running)
{
	p2p_rollback(VFM__PH_STOP_COPY);
}

TEST(cancel_in_precopy_devices_go_straight_back_to_running)
{
	p2p_rollback(VFM__PH_PRECOPY);
}

/*
 * RAM's precopy_only_ns: the time its pre-copy turns spent copying pages to
 * the bounce buffer (the guest may write them meanwhile), which its
 * stop-copy does not do (the guest is stopped: pages go out from guest
 * memory). The engine takes it out of RAM's pace when it expects the
 * switchover's last bytes (a 512 MiB/s guest's were expected 15-25 % above
 * what they took). It grows with pre-copy turns of data pages, not with
 * zero pages, and not in save_complete.
 */
TEST(ram_precopy_only_ns_counts_the_bounce_copies_of_pre_copy_only)
{
	struct vfm_error err = { 0 };
	struct vfm_savable *sv = NULL;
	struct vfm_stream *s;
	struct rig r;
	uint64_t x0, x1, b0;
	int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);

	CHECK(fd >= 0);
	rig_init(&r, 0, 0);
	for (unsigned i = 0; i < r.m->nsv; i++)
		if (!strcmp(r.m->sv[i].name, "ram"))
			sv = &r.m->sv[i];
	CHECK(sv != NULL && sv->ops->precopy_only_ns);
	CHECK_EQ(vfm_stream_open(fd, 1000, &s, &err), 0);
	/* Half the pages hold data, the rest are zero. */
	memset(vfm_guest_mem_ptr(r.mem, 0, MEM_SIZE / 2), 0x5a, MEM_SIZE / 2);
	if (sv->ops->save_setup(sv->opaque, s, &err))
		FAIL("save_setup: %s", err.msg);
	x0 = sv->ops->precopy_only_ns(sv->opaque);
	CHECK_EQ(x0, 0);
	while (sv->ops->save_iterate(sv->opaque, s, BUDGET, &err) == 0)
		;
	x1 = sv->ops->precopy_only_ns(sv->opaque);
	CHECK(x1 > 0);   /* 2 MiB of data pages copied to the bounce */
	/* Stop-copy of the same pages, dirty again: no bounce. */
	CHECK_EQ(vfm_dirty_mark(r.mem, 0, MEM_SIZE / 2), 0);
	b0 = vfm_stream_bytes(s);
	if (sv->ops->save_complete(sv->opaque, s, &err))
		FAIL("save_complete: %s", err.msg);
	CHECK(vfm_stream_bytes(s) - b0 >= MEM_SIZE / 2);   /* the pages went again */
	CHECK_EQ(sv->ops->precopy_only_ns(sv->opaque), x1);
	fprintf(stderr, "# bounce copies of 2 MiB in pre-copy: %.3f ms\n", (double)x1 / 1e6);
	sv->ops->save_cleanup(sv->opaque, true);
	vfm_stream_free(s);
	rig_free(&r);
}
