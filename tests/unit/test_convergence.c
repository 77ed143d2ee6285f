/*
 * Convergence with real `dma` device servers (separate processes, vfio-user)
 * and a guest on memfd (tests/unit/migdma.c): the matrix of issue 16 (device
 * count x state size x churn x save latency x pre-copy), each case either
 * converging and verified, or reported as not converging (query-migrate's
 * figures: converging, needed downtime, bottleneck) within 5 s and completed
 * once the downtime limit is raised live. RAM moves in every case. Also: a
 * quiet pre-copy longer than the destination's timeout survives (keepalive on
 * main), and max-bandwidth applies to the running migration.
 *
 * `make check` runs a reduced matrix; VFM_MATRIX=full (make check-slow) runs
 * all 48 cases.
 */
#include "../../devices/dma.h"
#include "harness.h"
#include "migdma.h"

/* What the arithmetic says of a case on this machine's unix socket. */
enum expect { CONVERGES, STALLS, EITHER };

struct conv_case {
	unsigned ndev;
	uint64_t state;          /* bytes per device */
	uint64_t churn;          /* bytes/s per device */
	uint64_t latency_us;     /* per MiB saved */
	bool precopy;
	uint64_t max_bw;         /* bytes/s, 0 = unlimited */
	enum expect expect;
};

static double t_ms(void)
{
	return (double)vfm__now_ns() / 1e6;
}

static void stats(struct md_side *s, struct vfm_migration_stats *st)
{
	vfm_migration_get_stats(s->m, st);
}

static bool final(const struct vfm_migration_stats *st)
{
	return st->status == VFM_MIG_COMPLETED || st->status == VFM_MIG_FAILED ||
	       st->status == VFM_MIG_CANCELLED;
}

static void verify(struct md_side *s, struct md_dest *d, unsigned ndev)
{
	uint64_t sums[MD_MAXDEV];
	struct md_result r;
	int status;

	for (unsigned i = 0; i < ndev; i++) {
		CHECK_EQ(md_dev_state(s->dev[i]), VFM_STATE_STOP);
		sums[i] = md_reg(s->dev[i], DMADEV_REG_CHECKSUM);
	}
	status = md_dest_wait(d, &r);
	if (status || r.status)
		FAIL("destination exit %d: %s", status, r.error);
	if (r.mem_hash != md_mem_hash(s->mem))
		FAIL("guest memory differs after migration");
	for (unsigned i = 0; i < ndev; i++) {
		CHECK_EQ(r.dev_state[i], VFM_STATE_RUNNING);
		if (r.dev_sum[i] != sums[i])
			FAIL("device %u checksum %#" PRIx64 " != source %#" PRIx64, i, r.dev_sum[i],
			     sums[i]);
	}
}

static void run_case(const struct conv_case *c)
{
	struct md_devsrv srv[MD_MAXDEV];
	struct md_opts o = { .ndev = c->ndev, .state_size = c->state, .churn = c->churn,
			     .save_latency_us = c->latency_us,
			     .props = c->precopy ? NULL : "allow-pre-copy=off", .timeout_ms = 5000,
			     /* Main only: convergence, not multifd (a 256M stop-copy
			      * over channels: multifd_2_devices_256m_stop_copy). */
			     .mf_channels = 1,
			     /* The case's own bound (below) ends a hang first. */
			     .dest_alarm_s = 300 };
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };
	struct md_dest d;
	struct md_side s;
	char uri[256];
	double t0, t_nc = 0, needed = 0, bw_nc = 0, bound, t_raise = 0;
	uint64_t pending_nc = 0;
	uint64_t ram_at_1s = 0, upper;
	bool raised = false;

	for (unsigned i = 0; i < c->ndev; i++) {
		char name[16];

		snprintf(name, sizeof(name), "src%u", i);
		md_devsrv_spawn(&srv[i], name, &o, c->churn, 7 + i);
	}
	md_make_uri("unix", uri, sizeof(uri));
	md_dest_start(&d, uri, &o);
	md_side_init(&s, srv, &o, true, 7);
	md_vm_ops.start(&s.g);
	md_params_for(&p, &o);
	p.max_bandwidth = c->max_bw;
	if (vfm_migration_start(s.m, d.uri, &p, &err))
		FAIL("start: %s", err.msg);
	t0 = t_ms();
	/* A hang bound, not a timing expectation. */
	bound = 25000 + (double)(c->ndev * c->state >> 20) * 20;
	for (;;) {
		stats(&s, &st);
		if (final(&st))
			break;
		if (!ram_at_1s && t_ms() - t0 >= 1000 && t_ms() - t0 < 1500)
			ram_at_1s = st.ram_transferred_bytes;
		if (st.status == VFM_MIG_ACTIVE && !st.converging && !t_nc) {
			t_nc = t_ms() - t0;
			needed = st.needed_downtime_ms;
			bw_nc = st.bandwidth_bps;
			pending_nc = st.pending_bytes;
			CHECK(st.blocker[0]);
			fprintf(stderr, "# not converging at %.0f ms: needs %.0f ms, %" PRIu64
				" pending, %.1f MB/s, bottleneck %s\n", t_nc, needed, st.pending_bytes,
				st.bandwidth_bps / 1e6, st.blocker);
		}
		if (t_nc && !raised) {
			/* Raised live (the user's answer): it must complete now. */
			p.downtime_limit_ms = (uint64_t)(needed * 1.5) + 50;
			p.max_bandwidth = c->max_bw;
			vfm_migration_set_live_params(s.m, &p);
			raised = true;
			t_raise = t_ms() - t0;
			/*
			 * From here the arithmetic: what is pending must move at
			 * the bandwidth measured, and before the switchover
			 * every device's initial data too (switchover-ack; it
			 * is part of pending). 4 x 256M with 32M/s churn and
			 * 2000 us/MiB on a loaded 2-core machine reads at
			 * ~15 MB/s (86 MB/s unloaded): 1 GiB of initial data
			 * takes ~70 s, past the fixed 45 s bound this case
			 * failed on. Twice the arithmetic, plus 10 s.
			 */
			if (bw_nc > 0) {
				double need = 2.0 * (double)pending_nc * 1000.0 / bw_nc + 10000;

				if (t_raise + need > bound)
					bound = t_raise + need;
			}
			fprintf(stderr, "# raised at %.0f ms: bound now %.0f ms\n", t_raise, bound);
		}
		if (t_ms() - t0 > bound)
			FAIL("no end after %.0f ms (status %s, %" PRIu64 " pending)", bound,
			     vfm_mig_status_name(st.status), st.pending_bytes);
		usleep(20000);
	}
	CHECK(vfm_migration_wait(s.m, 5000) == 0);
	stats(&s, &st);
	if (st.status != VFM_MIG_COMPLETED)
		FAIL("source status %s: %s", vfm_mig_status_name(st.status), st.error);
	verify(&s, &d, c->ndev);
	/* RAM moved from the start, whatever the devices did (8 MiB guest: the
	 * first iteration sends it; a page the writer has not reached yet goes
	 * as a zero page of a few bytes, so a migration that ended within 1 s
	 * may have sent less; verify() compared the memory anyway). */
	if (st.total_time_ms >= 1000)
		CHECK(st.ram_transferred_bytes >= MD_MEM / 2);
	/* ... and early: not after the devices' passes (at 1 s the first
	 * iteration has given RAM its turns whatever the devices have). */
	if (ram_at_1s && !c->max_bw)
		CHECK(ram_at_1s >= MD_MEM / 4);
	/* A device without pre-copy never read before stop-copy: the engine
	 * says its expected downtime assumed the link's pace for it; with
	 * pre-copy every device read, and none is named. */
	if (!c->precopy)
		CHECK(!strncmp(st.unpaced, "vfio:dev", 8));
	else
		CHECK_EQ(st.unpaced[0], '\0');
	if (c->expect == CONVERGES)
		CHECK(!t_nc);
	if (c->expect == STALLS && !t_nc && !c->precopy) {
		/*
		 * Switched over without a report. A device without pre-copy
		 * was never read, so its pace is unknown and the engine
		 * assumes the link's, as QEMU does (docs/performance.md
		 * section 4). On this unix socket the link probe measures
		 * 0.8-2 GB/s mostly, and now and then over 3.6 GB/s: past
		 * the line, where 1 GiB does fit 300 ms at the link's pace
		 * (one run in three of the full matrix, and once in CI).
		 * Then the engine's own arithmetic must have said so: the
		 * downtime it expected at the decision, which stands in the
		 * stats, was within the limit (which puts the link it assumed
		 * past the line).
		 */
		double line = (double)(c->ndev * c->state) * 1000.0 / (double)st.downtime_limit_ms;

		fprintf(stderr, "# switched over at once: expected %.1f ms at the link's %.0f MB/s"
			" (the line: %.0f MB/s)\n", st.expected_downtime_ms,
			st.bandwidth_bps / 1e6, line / 1e6);
		CHECK(st.expected_downtime_ms > 0);
		CHECK(st.expected_downtime_ms <= (double)st.downtime_limit_ms);
	} else if (c->expect == STALLS) {
		CHECK(t_nc > 0);
		CHECK(t_nc <= 5000);
	}
	if (t_nc) {
		/* What is pending is within 2x of the arithmetic: at most
		 * everything (each device's whole state and its records, the
		 * guest's memory), without pre-copy at least the devices' state.
		 * Not checked against the downtime measured after the raise: a
		 * device without pre-copy never read before stop-copy, so it
		 * has no pace and the engine assumes the link's, as QEMU does
		 * (1 x 256M without pre-copy said 356 ms and took over 712 on
		 * this loaded machine; at 2000 us/MiB, 415 and over 830). */
		upper = c->ndev * (c->state + (1u << 20)) + MD_MEM;
		CHECK(needed > 0);
		CHECK((double)pending_nc <= 2.0 * (double)upper);
		if (!c->precopy)
			CHECK((double)pending_nc >= (double)(c->ndev * c->state) / 2.0);
	}
	fprintf(stderr, "# %u x %" PRIu64 " MiB, churn %" PRIu64 " MiB/s, latency %" PRIu64
		" us/MiB, pre-copy %s, max-bw %" PRIu64 ": %s in %" PRIu64 " ms, %" PRIu64
		" iterations, RAM %" PRIu64 " KiB, downtime %.1f ms (expected %.1f, needed %.0f)\n", c->ndev,
		c->state >> 20, c->churn >> 20, c->latency_us, c->precopy ? "on" : "off", c->max_bw,
		t_nc ? "stalled, completed after the limit was raised" : "converged",
		st.total_time_ms, st.precopy_iterations, st.ram_transferred_bytes >> 10,
		st.downtime_ms, st.expected_downtime_ms, needed);
	md_side_free(&s);
	for (unsigned i = 0; i < c->ndev; i++)
		md_devsrv_kill(&srv[i]);
}

/* The arithmetic for the full matrix on an unlimited unix socket: with
 * pre-copy, every churn here is far below the link, so one or two small
 * devices converge (a loaded machine's measured bandwidth decides the rest);
 * without, the stop-copy data is the whole state, and 1 GiB cannot fit the
 * 300 ms limit below ~3.4 GB/s (a small state may or may not, depending on
 * the bandwidth the engine measures). Under TSan the links and the devices'
 * reads run 5-15x slower: 1 x 32M with 8M/s churn measured 28 MB/s and was
 * still reading its first pass at 4.6 s ("needs 444 ms"), so there the
 * small cases may go either way too. */
static enum expect arithmetic(unsigned ndev, uint64_t state, bool precopy)
{
	uint64_t total = ndev * state;

#if defined(__SANITIZE_THREAD__)
	if (precopy)
		return EITHER;
#endif
	if (precopy)
		return total <= (64ull << 20) ? CONVERGES : EITHER;
	return total >= (1ull << 30) ? STALLS : EITHER;
}

TEST_TIMEOUT(matrix, 1200)
{
	static const unsigned ndevs[] = { 1, 4 };
	static const uint64_t states[] = { 32ull << 20, 256ull << 20 };
	static const uint64_t churns[] = { 0, 8ull << 20, 32ull << 20 };
	static const uint64_t lats[] = { 0, 2000 };
	const char *full = getenv("VFM_MATRIX");
	unsigned ncase = 0;

	for (unsigned a = 0; a < 2; a++)
		for (unsigned b = 0; b < 2; b++)
			for (unsigned c = 0; c < 3; c++)
				for (unsigned l = 0; l < 2; l++)
					for (unsigned pc = 0; pc < 2; pc++) {
		struct conv_case k = { ndevs[a], states[b], churns[c], lats[l], pc == 0, 0,
				       arithmetic(ndevs[a], states[b], pc == 0) };

		/* Reduced: the 32M state, with and without latency, churn
		 * 8M/s (32M/s starves a loaded 2-core machine's device reads
		 * down to ~10 MB/s: that is the full matrix's), both device
		 * counts, pre-copy on; and 4 x 256M without pre-copy (the
		 * stall). */
		if (full && !strncmp(full, "case=", 5)) {
			/* One case: VFM_MATRIX=case=NDEV,STATE_MIB,CHURN_MIB,LAT_US,PRECOPY */
			unsigned nd, st, ch, lat, on;

			if (sscanf(full + 5, "%u,%u,%u,%u,%u", &nd, &st, &ch, &lat, &on) != 5)
				FAIL("VFM_MATRIX=case=NDEV,STATE_MIB,CHURN_MIB,LAT_US,PRECOPY");
			if (nd != k.ndev || (uint64_t)st << 20 != k.state ||
			    (uint64_t)ch << 20 != k.churn || lat != k.latency_us ||
			    !on != !k.precopy)
				continue;
		} else if (!full || strcmp(full, "full")) {
			bool small = b == 0 && c == 1 && pc == 0 && (l == 0 || a == 1);
			bool stall = a == 1 && b == 1 && c == 0 && l == 0 && pc == 1;

			if (!small && !stall)
				continue;
		}
		run_case(&k);
		ncase++;
	}
	fprintf(stderr, "# %u cases\n", ncase);
}

/* More churn than the link carries (max-bandwidth): cannot converge at
 * 300 ms; reported, then completed with the limit raised live. */
TEST_TIMEOUT(churn_above_bandwidth_reported_then_completed, 120)
{
	struct conv_case k = { 1, 8ull << 20, 32ull << 20, 0, true, 16ull << 20, STALLS };

	run_case(&k);
}

/*
 * Pending above the threshold with nothing to send, for 3x the destination's
 * timeout: main's keepalive keeps the destination waiting; then the limit is
 * raised live and it completes. With and without multifd channels (pre-copy
 * RAM then uses them, main carries nothing else).
 */
static void quiet_precopy(unsigned mf_channels)
{
	struct md_devsrv srv[1];
	struct md_opts o = { .ndev = 1, .state_size = 4ull << 20, .quiet = true, .timeout_ms = 1000,
			     .mf_channels = mf_channels };
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };
	struct md_dest d;
	struct md_side s;
	char uri[256];

	md_devsrv_spawn(&srv[0], "src0", &o, 0, 7);
	md_make_uri("unix", uri, sizeof(uri));
	md_dest_start(&d, uri, &o);
	/* No guest threads and no churn: once the first pass is out, nothing
	 * is dirty anywhere and main has nothing to carry. */
	md_side_init(&s, srv, &o, false, 7);
	md_params_for(&p, &o);
	/* A threshold of 1 KB: never met. */
	p.downtime_limit_ms = 1;
	p.avail_switchover_bandwidth = 1000000;
	if (vfm_migration_start(s.m, d.uri, &p, &err))
		FAIL("start: %s", err.msg);
	usleep(3000 * 1000);
	stats(&s, &st);
	if (st.status != VFM_MIG_ACTIVE)
		FAIL("status %s after 3 s: %s", vfm_mig_status_name(st.status), st.error);
	CHECK(!st.converging);
	CHECK(st.needed_downtime_ms > 1);
	CHECK(st.ram_transferred_bytes > 0);
	fprintf(stderr, "# after 3 s: %" PRIu64 " pending, needs %.0f ms, bottleneck %s, %" PRIu64
		" iterations\n", st.pending_bytes, st.needed_downtime_ms, st.blocker,
		st.precopy_iterations);
	p.downtime_limit_ms = 300;
	p.avail_switchover_bandwidth = 0;
	vfm_migration_set_live_params(s.m, &p);
	md_wait(&s, &st);
	if (st.status != VFM_MIG_COMPLETED)
		FAIL("source status %s: %s", vfm_mig_status_name(st.status), st.error);
	CHECK_EQ(st.downtime_limit_ms, 300);
	verify(&s, &d, 1);
	md_side_free(&s);
	md_devsrv_kill(&srv[0]);
}

TEST_TIMEOUT(quiet_precopy_outlives_the_destination_timeout, 60)
{
	quiet_precopy(1);
}

TEST_TIMEOUT(quiet_precopy_outlives_the_destination_timeout_multifd, 60)
{
	quiet_precopy(3);
}

/* max-bandwidth set on a running migration slows it at once; cleared, it
 * completes. */
TEST_TIMEOUT(max_bandwidth_applies_live, 60)
{
	struct md_devsrv srv[1];
	struct md_opts o = { .ndev = 1, .state_size = 32ull << 20, .quiet = true, .timeout_ms = 5000 };
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };
	struct md_dest d;
	struct md_side s;
	char uri[256];
	uint64_t b0, b1;

	md_devsrv_spawn(&srv[0], "src0", &o, 0, 7);
	md_make_uri("unix", uri, sizeof(uri));
	md_dest_start(&d, uri, &o);
	md_side_init(&s, srv, &o, true, 7);
	md_vm_ops.start(&s.g);
	md_params_for(&p, &o);
	/* Started at 8 MiB/s; 1 MiB/s set mid-migration takes over at once. */
	p.max_bandwidth = 8ull << 20;
	if (vfm_migration_start(s.m, d.uri, &p, &err))
		FAIL("start: %s", err.msg);
	usleep(500 * 1000);
	p.max_bandwidth = 1ull << 20;
	vfm_migration_set_live_params(s.m, &p);
	usleep(300 * 1000);
	stats(&s, &st);
	b0 = st.transferred_bytes;
	usleep(2000 * 1000);
	stats(&s, &st);
	b1 = st.transferred_bytes;
	CHECK_EQ(st.status, VFM_MIG_ACTIVE);
	fprintf(stderr, "# at 1 MiB/s: %" PRIu64 " bytes in 2 s\n", b1 - b0);
	/* About 2 MiB in 2 s (1 MiB device blocks make it lumpy), far below
	 * the 16 MiB the first rate would have moved. */
	CHECK(b1 - b0 <= (4ull << 20));
	CHECK(b1 - b0 >= (512ull << 10));
	p.max_bandwidth = 0;
	vfm_migration_set_live_params(s.m, &p);
	md_wait(&s, &st);
	if (st.status != VFM_MIG_COMPLETED)
		FAIL("source status %s: %s", vfm_mig_status_name(st.status), st.error);
	verify(&s, &d, 1);
	md_side_free(&s);
	md_devsrv_kill(&srv[0]);
}
