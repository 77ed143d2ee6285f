/*
 * The source engine: one thread per migration. Setup, iterative pre-copy
 * until the pending data fits in the downtime limit at the measured
 * bandwidth (and every switchover-ack has come), then switchover: stop the
 * guest, quiesce devices (P2P first), STOP_COPY, final dirty sync, send the
 * rest, commit with the destination. Any failure before the commit puts every
 * device back to RUNNING and restarts the guest.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "migration/channel.h"
#include "migration/engine.h"
#include "migration/multifd.h"
#include "util/logging.h"
#include "util/thread.h"

#define LOG "migration"
/* Bytes one savable may send before the loop looks at acks, cancel, rate. */
#define ITER_BUDGET (8ull << 20)
#define ITER_BUDGET_MIN (64ull << 10)
#define BW_WINDOW_NS 100000000ull   /* bandwidth recomputed every 100 ms */
/* A window that moved less than this says little about the link. */
#define BW_REAL_MIN (1ull << 20)
/* Times the source lets the destination drain its backlog before a switchover. */
#define DRAIN_MAX 3
/* Round trips timed at setup, before any data: the least is the link's own
 * (one, the first the destination answered, was 2-4x it on loopback), which
 * the expected downtime counts in dest_load and dest_resume. */
#define RTT_PROBES 5
/* The link probe when no window measured it: PAD records, timed to the flush. */
#define PROBE_MAX 4
#define PROBE_BYTES (8ull << 20)
#define PROBE_RECORD (1u << 20)
/* Main carries a record at least this often (capped at a quarter of the
 * timeout): the destination fails a peer silent for timeout_ms, and a
 * pre-copy may legitimately have nothing to send for long. */
#define KEEPALIVE_NS 1000000000ull
/* An iteration that moved nothing naps this long before the next one. */
#define IDLE_NAP_NS 10000000ull
/* Exact checks in a row without progress (pending not under 90 % of the
 * least seen) before the migration is reported as not converging. */
#define STALL_ITERS 3
#define STALL_SPACING_NS 500000000ull
/* An iteration lasts at most this long: a pass that takes longer (a slow or
 * contended device, a low max-bandwidth) is cut into exact checks, so the
 * dirty log is synced, new dirty data is seen and the convergence report
 * stays current within seconds. */
#define ITER_MAX_NS 500000000ull
/* auto-converge: new dirty data above this percent of what an iteration sent
 * counts as high (QEMU's throttle-trigger-threshold default), and this many
 * high iterations in a row throttle (QEMU's dirty_rate_high_cnt >= 2). */
#define THROTTLE_TRIGGER_PCT 50
#define THROTTLE_TRIGGER_ITERS 2
#define THROTTLE_MAX_PCT 99

struct source {
	struct vfm_migration *m;
	struct vfm_migration_params p;
	struct vfm_uri uri;
	int fd;
	struct vfm_stream *out;
	struct vfm_stream *rp;
	struct vfm_mf_src *mf;       /* NULL: no multifd channels */
	uint64_t mf_bytes;           /* the channels' bytes once they are closed */
	bool guest_stopped;
	bool committed;              /* GO sent (or file written): no way back */
	uint64_t t_start, t_stop, rtt_ns;
	uint64_t rtt_min_ns;         /* the least round trip seen: the link's own */
	uint64_t flush_min_ns;       /* the quickest PING put and flushed (GO's cost) */
	uint32_t kick_ns[VFM__DST_RT];  /* the last rounds to the vCPUs (time_kick) */
	unsigned nkick;
	uint64_t step_end[VFM_SWITCHOVER_STEPS];  /* switchover timeline (publish_steps) */
	/* Bandwidth window. */
	uint64_t win_start, win_bytes0;
	bool win_busy;
	bool win_napped;             /* an iteration of the window idled */
	bool win_limited;            /* rate_limit() held the sender in the window */
	uint64_t win_blocked0;       /* vfm_stream_blocked_ns(out) at the window's start */
	uint64_t win_rq0;            /* runqueue_wait_ns() at the window's start */
	/* The last window that never idled and moved real volume, its bytes
	 * over its time less this thread's wait for a CPU: the sustained
	 * throughput of the whole pipe (source, link, destination's load). */
	double bw_sat;
	double bw;                   /* bytes per second */
	bool bw_real;                /* measured on a busy window or by the probe */
	bool probed;
	bool pass_done;              /* a pre-copy pass went over everything dirty */
	/* The figure in bw came from probes (not from pre-copy traffic): a
	 * migration that still cannot converge probes again, up to PROBE_MAX
	 * times a second apart, and keeps the best (a loaded machine can
	 * stall one probe; the link is at least as fast as its best). */
	bool bw_from_probe;
	unsigned nprobes;
	uint64_t probe_ns;
	bool have_expected;          /* the estimate at the switchover decision */
	double expected_ms;
	double exp_ms;               /* expected downtime at the last exact check */
	double exp_steps[VFM_SWITCHOVER_STEPS];  /* its parts (expect_switchover) */
	bool exp_known;              /* every savable with data has a pace */
	double best_exp_ms;          /* least expected downtime seen at a check */
	uint64_t ping_token;
	bool phase_done[VFM__PH_COUNT];
	/* Keepalive on main (migration thread). */
	uint64_t ka_ns, ka_bytes;
	/* Convergence: the exact checks that end the iterations. */
	bool have_exact;
	uint64_t exact_ns;           /* time of the last one */
	uint64_t best_pending;       /* least pending seen at one */
	unsigned stalled;            /* in a row without progress */
	uint64_t stall_ns;           /* when the last one counted (or progress was seen) */
	bool converging;
	char blocker[VFM_SAVABLE_NAME_MAX];
	/* A device whose part of exp_ms assumes the link's pace (unpaced()). */
	char unpaced[VFM_SAVABLE_NAME_MAX];
	uint64_t sync_ns;            /* the last pre-copy dirty sync took */
	/* auto-converge (QEMU's migration_trigger_throttle). */
	unsigned dirty_high;         /* checks in a row that found much new dirty data */
	unsigned throttle_pct;       /* applied now */
};

static double switchover_bw(const struct source *src);
static void time_kick(struct source *src);
static uint64_t runqueue_wait_ns(void);
static double expect_switchover(const struct source *src, double steps[VFM_SWITCHOVER_STEPS]);
static void unpaced(struct source *src);

/* Bytes sent so far, on main and the channels (pre-copy RAM uses them). */
static uint64_t out_bytes(struct source *src)
{
	return vfm_stream_bytes(src->out) + (src->mf ? vfm__mf_src_bytes(src->mf) : 0);
}

static void update_stats(struct source *src, uint64_t pending)
{
	struct vfm_migration *m = src->m;
	uint64_t dev = 0, dev_mf = 0, now = vfm__now_ns();
	struct vfm_migration_stats *st = &m->stats;

	for (unsigned i = 0; i < m->ndevs; i++) {
		dev += atomic_load(&m->devs[i]->transferred);
		dev_mf += atomic_load(&m->devs[i]->mf_sent);
	}
	pthread_mutex_lock(&m->lock);
	st->transferred_bytes = out_bytes(src) + (src->mf ? 0 : src->mf_bytes);
	st->ram_transferred_bytes = vfm__ram_transferred(m->ram);
	st->multifd_ram_bytes = vfm__ram_mf_transferred(m->ram);
	st->device_transferred_bytes = dev;
	st->multifd_device_bytes = dev_mf;
	st->pending_bytes = pending;
	st->bandwidth_bps = src->bw;
	/* From the switchover decision on, the estimate made then stands. */
	if (src->have_expected)
		st->expected_downtime_ms = src->expected_ms;
	else if (src->have_exact && src->exp_known)
		st->expected_downtime_ms = src->exp_ms;
	else
		st->expected_downtime_ms = src->bw > 0 ? (double)pending * 1000.0 / src->bw : 0;
	st->converging = src->converging;
	st->needed_downtime_ms = !src->have_exact ? 0 : src->best_exp_ms > 0 ? src->best_exp_ms
									     : src->exp_ms;
	snprintf(st->blocker, sizeof(st->blocker), "%s", src->blocker);
	snprintf(st->unpaced, sizeof(st->unpaced), "%s", src->unpaced);
	st->total_time_ms = (now - src->t_start) / 1000000ull;
	if (st->total_time_ms)
		st->throughput_mbps = (double)st->transferred_bytes * 8.0 / 1000.0 /
				      (double)st->total_time_ms;
	pthread_mutex_unlock(&m->lock);
}

static int read_rp_record(struct source *src, struct vfm_rec_hdr *h, const void **pl,
			  struct vfm_error *err)
{
	int ret = vfm_stream_get_record(src->rp, h, pl, 4096, err);

	if (ret)
		return vfm_error_set(err, ret, "return path");
	if (h->type == VFM_REC_RP_ERROR) {
		char msg[VFM_ERROR_MSG_MAX];
		size_t n = h->length > 4 ? h->length - 4 : 0;
		if (n >= sizeof(msg))
			n = sizeof(msg) - 1;
		memcpy(msg, (const char *)*pl + (h->length >= 4 ? 4 : 0), n);
		msg[n] = '\0';
		return vfm_error_set(err, VFM_ESTREAM, "destination failed: %s", msg);
	}
	return 0;
}

/* Handles return-path records that are ready now (acks). */
static int poll_return_path(struct source *src, struct vfm_error *err)
{
	struct vfm_rec_hdr h;
	const void *pl;
	int ret;

	while (src->rp && vfm_stream_readable(src->rp, 0)) {
		ret = read_rp_record(src, &h, &pl, err);
		if (ret)
			return ret;
		if (h.type == VFM_REC_RP_ACK) {
			for (unsigned i = 0; i < src->m->nsv; i++)
				if (src->m->sv[i].section == h.section)
					atomic_store(&src->m->sv[i].acked, true);
			vfm_debug(LOG, "switchover-ack for section %u", h.section);
		} else if (h.type != VFM_REC_RP_PONG) {
			return vfm_error_set(err, VFM_EPROTOCOL, "unexpected return-path record %u",
					     h.type);
		}
	}
	return 0;
}

/* Waits (bounded) for one return-path record of the given type. */
static int wait_rp(struct source *src, uint16_t type, struct vfm_rec_hdr *h, const void **pl,
		   struct vfm_error *err)
{
	uint64_t deadline = vfm__now_ns() + src->p.timeout_ms * 1000000ull;
	int ret;

	for (;;) {
		if (atomic_load(&src->m->cancel) && !src->committed)
			return vfm_error_set(err, VFM_ECANCELED, "migration cancelled");
		if (vfm__now_ns() > deadline)
			return vfm_error_set(err, -ETIMEDOUT, "no answer from the destination in %" PRIu64
					     " ms", src->p.timeout_ms);
		if (!vfm_stream_readable(src->rp, 50))
			continue;
		ret = read_rp_record(src, h, pl, err);
		if (ret)
			return ret;
		if (h->type == type)
			return 0;
		if (h->type == VFM_REC_RP_ACK)
			continue;  /* late ack: harmless */
		return vfm_error_set(err, VFM_EPROTOCOL, "expected return-path record %u, got %u",
				     type, h->type);
	}
}

/*
 * A PING and its PONG: the round trip, and (drain) the destination caught
 * up, as it answers only once everything before the PING is loaded. With
 * multifd channels carrying RAM, the drain PING also names how many RAM
 * packets went on each channel (flushed first), and the destination waits
 * for those too (docs/stream-format.md).
 */
static int measure_rtt(struct source *src, bool drain, struct vfm_error *err)
{
	unsigned char tok[8 + 4 + 4 * VFM_MF_MAX_CHANNELS];
	unsigned nch = drain && src->mf ? vfm__mf_src_nchannels(src->mf) : 0;
	size_t len = 8;
	struct vfm_rec_hdr h;
	const void *pl;
	uint64_t t0 = vfm__now_ns();
	int ret;

	vfm_put_le64(tok, ++src->ping_token);
	if (nch && nch <= VFM_MF_MAX_CHANNELS) {
		vfm_put_le32(tok + 8, nch);
		for (unsigned k = 0; k < nch; k++) {
			if ((ret = vfm__mf_src_flush(src->mf, k, err)))
				return ret;
			vfm_put_le32(tok + 12 + 4 * k, vfm__mf_src_ram_packets(src->mf, k));
		}
		len = 12 + 4 * (size_t)nch;
	}
	vfm_stream_put_record(src->out, VFM_REC_PING, VFM_PING_TWO_QUERIES, 0, tok, len);
	vfm_stream_flush(src->out);
	if (vfm_stream_error(src->out, err))
		return err ? err->code : -EIO;
	if (!src->flush_min_ns || vfm__now_ns() - t0 < src->flush_min_ns)
		src->flush_min_ns = vfm__now_ns() - t0;
	ret = wait_rp(src, VFM_REC_RP_PONG, &h, &pl, err);
	if (ret)
		return ret;
	src->rtt_ns = vfm__now_ns() - t0;
	/* u64 token, u64 clock, then the destination's device round trips
	 * (u32 section, u32 ns each, and u32 ns of a second query when the
	 * PONG has the flag; none from an older destination). */
	size_t ent = h.flags & VFM_PING_TWO_QUERIES ? 12 : 8;

	for (size_t off = 16; off + ent <= h.length; off += ent) {
		uint32_t sec = vfm_get_le32((const unsigned char *)pl + off);

		for (unsigned i = 0; i < src->m->nsv; i++) {
			struct vfm_mig_device *md = src->m->sv[i].opaque;

			if (src->m->sv[i].section != sec || src->m->sv[i].ops != &vfm__vfio_savable_ops)
				continue;
			/* The destination's first figure for this device: the
			 * expectations before it stood in this side's figure, so
			 * the least of them is no downtime the migration could
			 * have had (a 25 ms destination device "needed" 1.6 ms). */
			if (!md->ndst_rt)
				src->best_exp_ms = 0;
			md->dst_rt_ns[md->ndst_rt++ % VFM__DST_RT] =
				vfm_get_le32((const unsigned char *)pl + off + 4);
			if (ent == 12)
				md->dst_rt2_ns[md->ndst_rt2++ % VFM__DST_RT] =
					vfm_get_le32((const unsigned char *)pl + off + 8);
		}
	}
	/* A drain's round trip also waits for the destination's backlog. */
	if (!src->rtt_min_ns || src->rtt_ns < src->rtt_min_ns)
		src->rtt_min_ns = src->rtt_ns;
	vfm_debug(LOG, "round trip %.3f ms", (double)src->rtt_ns / 1e6);
	return 0;
}

static void bandwidth_tick(struct source *src)
{
	uint64_t now = vfm__now_ns(), el = now - src->win_start;
	uint64_t bytes = out_bytes(src) - src->win_bytes0;

	if (el < BW_WINDOW_NS)
		return;
	/*
	 * An idle window (nothing left to send) says nothing about the link;
	 * one that moved little only stands in until something better.
	 */
	/* After a probe, only a window that moved real volume replaces it: a
	 * "busy" window of zero-page headers measures the sender, not the link. */
	/*
	 * A busy window that moved little measures the link only when the link
	 * held the sender: the rate limit paused it, or the socket made it wait
	 * for a tenth of the window. Otherwise something before the link set
	 * its pace (a device with a few fresh bytes every turn: one such run
	 * measured 393 B/s and, with 4 KiB pending, never switched over): it is
	 * a floor under the link's speed, which may raise the figure, never
	 * lower it.
	 */
	double rate = (double)bytes * 1e9 / (double)el;
	bool link_held = src->win_limited ||
			 (vfm_stream_blocked_ns(src->out) - src->win_blocked0) * 10 >= el;

	if (src->bw_from_probe && bytes < BW_REAL_MIN) {
		/* keep the probe's figure */
	} else if (bytes && (bytes >= BW_REAL_MIN || (src->win_busy && link_held))) {
		src->bw = rate;
		src->bw_real = true;
		src->bw_from_probe = false;
	} else if (bytes && src->win_busy && rate > src->bw) {
		src->bw = rate;
		src->bw_real = true;
	} else if (bytes && !src->bw_real) {
		src->bw = rate;
	}
	if (!src->win_napped && bytes >= BW_REAL_MIN) {
		uint64_t w = runqueue_wait_ns() - src->win_rq0;

		src->bw_sat = (double)bytes * 1e9 / (double)(el - (w < el / 2 ? w : el / 2));
	}
	src->win_start = now;
	src->win_bytes0 = out_bytes(src);
	src->win_busy = false;
	src->win_napped = false;
	src->win_limited = false;
	src->win_blocked0 = vfm_stream_blocked_ns(src->out);
	src->win_rq0 = runqueue_wait_ns();
}

uint64_t vfm__rate_limit_delay_ns(uint64_t sent, uint64_t elapsed_ns, uint64_t limit)
{
	double allowed_ns;

	if (!limit)
		return 0;
	/* The time `sent` bytes take at `limit`; pause for what is not yet spent. */
	allowed_ns = (double)sent * 1e9 / (double)limit;
	if (allowed_ns <= (double)elapsed_ns)
		return 0;
	return (uint64_t)(allowed_ns - (double)elapsed_ns);
}

uint64_t vfm__iter_budget(uint64_t limit)
{
	/* Under a limit, about one bandwidth window's worth per turn (as QEMU's
	 * per-100 ms quota), so a pause stays short and cancel stays prompt. */
	uint64_t b = limit / (1000000000ull / BW_WINDOW_NS);

	if (!limit)
		return ITER_BUDGET;
	if (b < ITER_BUDGET_MIN)
		b = ITER_BUDGET_MIN;
	return b < ITER_BUDGET ? b : ITER_BUDGET;
}

static void rate_limit(struct source *src)
{
	uint64_t now = vfm__now_ns();
	uint64_t wait = vfm__rate_limit_delay_ns(out_bytes(src) - src->win_bytes0,
						 now - src->win_start, src->p.max_bandwidth);

	if (wait)
		src->win_limited = true;
	while (wait && !atomic_load(&src->m->cancel)) {
		/* In slices, so a cancel is seen within 10 ms. */
		uint64_t slice = wait < 10000000ull ? wait : 10000000ull;
		struct timespec ts = { 0, (long)slice };

		nanosleep(&ts, NULL);
		wait -= slice;
	}
}

/*
 * No window measured the link (the data that remains can only move at
 * stop-copy and the guest dirties little): time a few MiB of PAD records to
 * their flush, once, so the threshold is not bandwidth-of-an-idle-link x limit.
 */
static int probe_bandwidth(struct source *src, struct vfm_error *err)
{
	unsigned char *pad = calloc(1, PROBE_RECORD);
	uint64_t t0, b0 = out_bytes(src), el;

	if (!pad)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	vfm_stream_flush(src->out);
	t0 = vfm__now_ns();
	for (uint64_t sent = 0; sent < PROBE_BYTES; sent += PROBE_RECORD)
		vfm_stream_put_record(src->out, VFM_REC_PAD, 0, 0, pad, PROBE_RECORD);
	vfm_stream_flush(src->out);
	el = vfm__now_ns() - t0;
	free(pad);
	if (vfm_stream_error(src->out, err))
		return err ? err->code : -EIO;
	double bw = (double)(out_bytes(src) - b0) * 1e9 / (double)(el ? el : 1);

	src->bw = src->bw_from_probe && src->bw > bw ? src->bw : bw;
	src->probed = src->bw_real = src->bw_from_probe = true;
	src->nprobes++;
	src->probe_ns = vfm__now_ns();
	vfm_debug(LOG, "link probe %u: %.1f MB/s (using %.1f MB/s)", src->nprobes, bw / 1e6,
		  src->bw / 1e6);
	/* The probe's bytes are not pre-copy progress: restart the window. */
	src->win_start = vfm__now_ns();
	src->win_bytes0 = out_bytes(src);
	src->win_limited = false;
	src->win_blocked0 = vfm_stream_blocked_ns(src->out);
	src->win_napped = true;
	return 0;
}

/* Bytes per second the switchover decision assumes. */
static double switchover_bw(const struct source *src)
{
	return src->p.avail_switchover_bandwidth ? (double)src->p.avail_switchover_bandwidth
						 : src->bw;
}

static void phase(struct source *src, enum vfm__mig_phase ph)
{
	struct vfm_migration *m = src->m;

	if (m->phase_hook && !src->phase_done[ph]) {
		src->phase_done[ph] = true;
		m->phase_hook(m->phase_opaque, m, ph);
	}
}

static uint64_t pending_estimate(struct vfm_migration *m)
{
	uint64_t sum = 0;

	for (unsigned i = 0; i < m->nsv; i++)
		if (m->sv[i].ops->pending_estimate)
			sum += m->sv[i].ops->pending_estimate(m->sv[i].opaque);
	return sum;
}

static void set_throttle(struct source *src, unsigned pct)
{
	struct vfm_migration *m = src->m;
	unsigned vcpu = src->p.auto_converge ? pct : 0, dev = src->p.device_throttle ? pct : 0;

	src->throttle_pct = pct;
	if (m->vm && m->vm->throttle)
		m->vm->throttle(m->vm_opaque, vcpu, dev);
	pthread_mutex_lock(&m->lock);
	m->stats.cpu_throttle_percentage = vcpu;
	m->stats.device_throttle_percentage = dev;
	pthread_mutex_unlock(&m->lock);
}

/*
 * auto-converge, as QEMU's migration_trigger_throttle (migration/ram.c):
 * an iteration whose new dirty data is more than half of what it sent is
 * "high"; two in a row throttle the guest (cpu-throttle-initial percent, then
 * cpu-throttle-increment more each time, at most 99), and the devices that
 * can slow their own dirtying with device_throttle.
 */
static void auto_converge(struct source *src, uint64_t dirtied, uint64_t sent)
{
	unsigned pct;

	if (!src->p.auto_converge && !src->p.device_throttle)
		return;
	if (dirtied * 100 <= sent * THROTTLE_TRIGGER_PCT) {
		src->dirty_high = 0;
		return;
	}
	if (++src->dirty_high < THROTTLE_TRIGGER_ITERS)
		return;
	src->dirty_high = 0;
	pct = src->throttle_pct ? src->throttle_pct + src->p.cpu_throttle_increment
				: src->p.cpu_throttle_initial;
	if (pct > THROTTLE_MAX_PCT)
		pct = THROTTLE_MAX_PCT;
	if (pct == src->throttle_pct)
		return;
	vfm_info(LOG, "auto-converge: %" PRIu64 " bytes newly dirty against %" PRIu64
		 " sent: throttling %s%s%s by %u%%", dirtied, sent,
		 src->p.auto_converge ? "the vCPUs" : "",
		 src->p.auto_converge && src->p.device_throttle ? " and " : "",
		 src->p.device_throttle ? "the devices" : "", pct);
	set_throttle(src, pct);
}

/*
 * The end of an iteration (after a dirty sync): every savable's exact figure,
 * which also starts its next pass; the rate at which each produced new data
 * since the last check (pending now - pending then + what it sent, over the
 * time); and the convergence report: the least pending seen, how many checks
 * in a row made no progress against it, and the savable with the most.
 */
/* The switchover decision: the downtime expected at the last exact check
 * fits the limit (and every savable with data has a pace to expect it by). */
static bool expect_fits(const struct source *src)
{
	return src->have_exact && src->exp_known && src->exp_ms <= (double)src->p.downtime_limit_ms;
}

static int exact_check(struct source *src, bool pass_end, uint64_t *out, struct vfm_error *err)
{
	struct vfm_migration *m = src->m;
	uint64_t sum = 0, v, now = vfm__now_ns(), dirtied = 0, sent = 0;
	double most = -1;
	double dt = src->have_exact ? (double)(now - src->exact_ns) / 1e9 : 0;
	int ret, top = -1;

	for (unsigned i = 0; i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];
		double rate = 0;

		if (sv->ops->pending_exact) {
			uint64_t t0 = vfm__now_ns(), took;

			ret = sv->ops->pending_exact(sv->opaque, &v, err);
			if (ret)
				return ret;
			took = vfm__now_ns() - t0;
			if (!sv->exact_min_ns || took < sv->exact_min_ns)
				sv->exact_min_ns = took;
		} else {
			v = sv->ops->pending_estimate ? sv->ops->pending_estimate(sv->opaque) : 0;
		}
		if (dt > 0 && (double)v + (double)sv->sent_iter > (double)sv->exact_prev) {
			rate = ((double)v + (double)sv->sent_iter - (double)sv->exact_prev) / dt;
			dirtied += v + sv->sent_iter - sv->exact_prev;
		}
		sent += sv->sent_iter;
		pthread_mutex_lock(&m->lock);
		sv->rpt_pending = v;
		if (dt > 0)
			sv->rpt_dirty_rate = rate;
		pthread_mutex_unlock(&m->lock);
		sv->exact_prev = v;
		sv->sent_iter = 0;
		/* A new span for the pace; the last one's best still counts. */
		if (sv->pace > 0) {
			sv->pace_prev = sv->pace;
			sv->pace = 0;
		}
		sv->pass_done = false;
		/* The bottleneck: the most pending plus what it makes anew in a
		 * second, at most as much again (a device churning above the
		 * link holds the migration even when RAM has a few more bytes
		 * pending at one check; a small guest rewritten fast does not
		 * outweigh a large device state). */
		if ((double)v + (rate < (double)v ? rate : (double)v) > most) {
			most = (double)v + (rate < (double)v ? rate : (double)v);
			top = (int)i;
		}
		sum += v;
	}
	if (src->have_exact)
		auto_converge(src, dirtied, sent);
	time_kick(src);
	/* struct source is this thread's alone: other threads see these
	 * figures only as update_stats copies them into m->stats, under
	 * m->lock. */
	src->exp_ms = expect_switchover(src, src->exp_steps);
	src->exp_known = src->exp_ms >= 0;
	unpaced(src);
	if (!src->exp_known)
		src->exp_ms = switchover_bw(src) > 0 ? (double)sum * 1000.0 / switchover_bw(src) : 0;
	/* A stall is a whole iteration (every pass out) without progress, or,
	 * when checks come mid-pass because the estimate fits the threshold and
	 * the exact figure does not (they restart the passes, so a pass may
	 * never end), one such check per STALL_SPACING_NS. */
	if (!src->have_exact || (double)sum < 0.9 * (double)src->best_pending) {
		src->stalled = 0;
		src->stall_ns = now;
	} else if (!expect_fits(src)) {
		if (pass_end || now - src->stall_ns >= STALL_SPACING_NS) {
			src->stalled++;
			src->stall_ns = now;
		}
	} else {
		src->stalled = 0;
		src->stall_ns = now;
	}
	if (!src->have_exact || sum < src->best_pending)
		src->best_pending = sum;
	if (src->exp_ms > 0 && (!src->best_exp_ms || src->exp_ms < src->best_exp_ms))
		src->best_exp_ms = src->exp_ms;
	src->have_exact = true;
	src->exact_ns = now;
	if (src->converging && src->stalled >= STALL_ITERS)
		vfm_warn(LOG, "not converging: %" PRIu64 " bytes pending (most from %s) stay "
			 "above what a downtime of %" PRIu64 " ms moves; it would need a downtime "
			 "of %.0f ms", sum, top >= 0 ? m->sv[top].name : "?",
			 src->p.downtime_limit_ms, src->best_exp_ms);
	src->converging = src->stalled < STALL_ITERS;
	snprintf(src->blocker, sizeof(src->blocker), "%s", top >= 0 ? m->sv[top].name : "");
	*out = sum;
	return 0;
}

static bool all_acked(struct vfm_migration *m)
{
	for (unsigned i = 0; i < m->nsv; i++)
		if (m->sv[i].ack_needed && !atomic_load(&m->sv[i].acked))
			return false;
	return true;
}

static int do_setup(struct source *src, struct vfm_error *err)
{
	struct vfm_migration *m = src->m;
	int ret;

	ret = vfm_connect_mig(&src->uri, &src->p, &m->cancel, &src->fd, err);
	if (ret)
		return ret;
	atomic_store(&m->sock_fd, src->fd);
	ret = vfm_stream_open(src->fd, (int)src->p.timeout_ms, &src->out, err);
	if (!ret && vfm_uri_has_return_path(&src->uri))
		ret = vfm_stream_open(src->fd, (int)src->p.timeout_ms, &src->rp, err);
	if (ret)
		return ret;
	vfm_stream_write_header(src->out);
	for (unsigned i = 0; i < m->nsv; i++) {
		const struct vfm_savable *sv = &m->sv[i];
		unsigned char buf[8 + VFM_SAVABLE_NAME_MAX];
		size_t nl = strlen(sv->name);

		vfm_put_le32(buf, sv->section);
		vfm_put_le32(buf + 4, sv->version);
		memcpy(buf + 8, sv->name, nl);
		vfm_stream_put_record(src->out, VFM_REC_SECTION, 0, sv->section, buf, 8 + nl);
	}
	for (unsigned i = 0; src->rp && i < RTT_PROBES; i++)
		if ((ret = measure_rtt(src, false, err)))
			return ret;
	for (unsigned i = 0; i < RTT_PROBES; i++)
		time_kick(src);
	if ((ret = vfm__mf_src_open(m, &src->uri, &src->p, src->out, &src->mf, err)))
		return ret;
	if ((ret = vfm__dirty_tracking_start(m, err)))
		return ret;
	for (unsigned i = 0; i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];

		atomic_store(&sv->acked, false);
		if (sv->ops->save_setup && (ret = sv->ops->save_setup(sv->opaque, src->out, err)))
			return vfm_error_set(err, ret, "setup of %s", sv->name);
		sv->ack_needed = src->rp && src->p.switchover_ack && sv->ops->switchover_ack_needed &&
				 sv->ops->switchover_ack_needed(sv->opaque);
	}
	vfm_stream_flush(src->out);
	if ((ret = vfm_stream_error(src->out, err)))
		return ret;
	phase(src, VFM__PH_SETUP);
	return 0;
}

/*
 * Main carries something at least every KEEPALIVE_NS: a PAD record when
 * nothing else went on it (RAM may use the multifd channels, a device may
 * have nothing to give, pending may sit above the threshold for long), and a
 * flush either way, so a destination waiting on main never times out while
 * the source is alive and the user can still change the parameters.
 */
static void keepalive(struct source *src)
{
	uint64_t now = vfm__now_ns(), every = KEEPALIVE_NS;
	uint64_t b = vfm_stream_bytes(src->out);

	if (src->p.timeout_ms && src->p.timeout_ms * 1000000ull / 4 < every)
		every = src->p.timeout_ms * 1000000ull / 4;
	if (now - src->ka_ns < every)
		return;
	if (b == src->ka_bytes) {
		unsigned char none = 0;

		vfm_stream_put_record(src->out, VFM_REC_PAD, 0, 0, &none, 0);
	}
	vfm_stream_flush(src->out);
	src->ka_ns = now;
	src->ka_bytes = vfm_stream_bytes(src->out);
}

/* migrate-set-parameters during the migration: the live ones apply now. */
static void read_live_params(struct source *src, uint64_t *budget)
{
	struct vfm_migration *m = src->m;
	bool changed;

	pthread_mutex_lock(&m->lock);
	changed = m->params_changed;
	if (changed) {
		src->p.downtime_limit_ms = m->params.downtime_limit_ms;
		src->p.max_bandwidth = m->params.max_bandwidth;
		src->p.avail_switchover_bandwidth = m->params.avail_switchover_bandwidth;
		m->params_changed = false;
	}
	pthread_mutex_unlock(&m->lock);
	if (!changed)
		return;
	*budget = vfm__iter_budget(src->p.max_bandwidth);
	/* A new rate: the limiter's window starts again. */
	src->win_start = vfm__now_ns();
	src->win_bytes0 = out_bytes(src);
	src->win_limited = false;
	src->win_blocked0 = vfm_stream_blocked_ns(src->out);
	src->win_busy = false;
	src->win_napped = true;
	vfm_info(LOG, "live parameters: downtime-limit %" PRIu64 " ms, max-bandwidth %" PRIu64
		 " B/s, avail-switchover-bandwidth %" PRIu64 " B/s", src->p.downtime_limit_ms,
		 src->p.max_bandwidth, src->p.avail_switchover_bandwidth);
}

static void timed_log_sync(struct source *src)
{
	uint64_t t0 = vfm__now_ns();

	vfm__log_sync(src->m, true);
	src->sync_ns = vfm__now_ns() - t0;
}

/* A turn must have sent this much for its pace to count. */
#define PACE_MIN_TURN (1ull << 20)
/* Turns adding up to this much give the sustained pace (beyond buffering). */
#define PACE_SUSTAINED (32ull << 20)

/*
 * Bytes per second a savable moves its data at, as in stop-copy: the best
 * turn (>= 1 MiB) of the last two spans between exact checks, its bytes over
 * its time (RAM: scanning, zero pages, writing; a device: its MIG_DATA_READ
 * round trips and firmware latency, then the writes), at most max-bandwidth
 * (QEMU's decision assumes the rate limit too). The best turn, not the
 * average: in pre-copy the guest and the devices' own work share this
 * machine's cores with the sender, and a stop-copy runs with the guest
 * stopped (the average made expected 2x measured at 512 MiB/s dirtying).
 * Not the migration's bandwidth window either, which is the producers' pace
 * averaged with their idle time (a guest dirtying 128 MiB/s measured 70 MB/s
 * over a 4 GB/s link: expected 8x measured). 0: not known yet.
 */
static double savable_pace(const struct source *src, const struct vfm_savable *sv)
{
	double pace = sv->pace > sv->pace_prev ? sv->pace : sv->pace_prev;

	/* Bulk data goes at the sustained pace: a single turn may fit in the
	 * socket buffers (several MiB on loopback) and not wait for the
	 * destination at all. */
	if (sv->sustained > 0 && sv->exact_prev >= PACE_SUSTAINED && sv->sustained < pace)
		pace = sv->sustained;

	if (src->p.max_bandwidth && pace > (double)src->p.max_bandwidth)
		pace = (double)src->p.max_bandwidth;
	return pace;
}

/*
 * Nanoseconds this thread has waited runnable for a CPU
 * (/proc/thread-self/schedstat, second field: run-queue wait), 0 where the
 * kernel does not say. A turn's time less that wait is what it would take
 * with a CPU to itself, as in stop-copy where the guest no longer competes.
 */
static uint64_t runqueue_wait_ns(void)
{
	char buf[96];
	unsigned long long run, wait;
	ssize_t n;
	int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	if (sscanf(buf, "%llu %llu", &run, &wait) != 2)
		return 0;
	return (uint64_t)wait;
}

/* A savable's part of last_bytes (expect_switchover), ms; < 0: no pace yet. */
static double savable_ms(const struct source *src, const struct vfm_savable *sv)
{
	double pace = savable_pace(src, sv), fixed;

	if (sv->ops == &vfm__vfio_savable_ops) {
		const struct vfm_mig_device *md = sv->opaque;

		/* Two closing reads, each a round trip at least (arc_ns). */
		fixed = 2.0 * (double)(md->short_read_fixed_ns > md->arc_ns ? md->short_read_fixed_ns
									  : md->arc_ns) / 1e6;
	} else {
		fixed = (double)sv->exact_min_ns / 1e6;
		/*
		 * RAM with multifd channels: its last pages go on the channels
		 * their chunks map to, and each channel is flushed (ram.c
		 * complete_on_channels): a write per channel, each about as long
		 * as the quickest flush of main. Expected without them, RAM's
		 * stop-copy of 36-221 KiB on 2 channels took 0.05-0.09 ms more
		 * than its bytes at its pace (make bench rows at 2 channels:
		 * last_bytes 0.17-0.28 ms low at 32-128 MiB/s).
		 */
		if (sv->exact_prev && src->mf && sv->opaque == src->m->ram)
			fixed += (double)vfm__mf_src_nchannels(src->mf) *
				 (double)src->flush_min_ns / 1e6;
	}
	if (!sv->exact_prev)
		return fixed;
	if (pace <= 0)
		pace = src->bw;
	if (pace <= 0)
		return -1.0;
	return fixed + (double)sv->exact_prev * 1000.0 / pace;
}

/*
 * Whether a device's stop-copy goes over the channels. multifd-transfer=on:
 * always; auto: only when it has more pending than one read moves
 * (data_buf_size, 1 MiB at most). Less goes as one packet, with nothing of
 * the device's to overlap, and the channel path's fixed costs (waking its
 * save thread, a channel flush, the destination's reader and load threads)
 * are more than main's: 1 device with 4 KiB left after pre-copy switched
 * over in 0.83 ms on main and 1.74 ms on 2 channels (docs/performance.md
 * section 6).
 */
static bool mf_at_switchover(const struct vfm_savable *sv)
{
	const struct vfm_mig_device *md = sv->opaque;

	return md->mf_use && (md->mf_forced || sv->exact_prev > md->data_buf_size);
}

static bool on_channels(const struct source *src, const struct vfm_savable *sv)
{
	if (!src->mf)
		return false;
	if (sv->ops != &vfm__vfio_savable_ops)
		return true;   /* RAM: its stop-copy pass runs on every channel */
	return mf_at_switchover(sv);
}

/* Devices whose stop-copy goes on main after all (mf_at_switchover). */
static void release_small(struct source *src)
{
	struct vfm_migration *m = src->m;

	for (unsigned i = 0; src->mf && i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];
		struct vfm_mig_device *md = sv->opaque;

		if (sv->ops != &vfm__vfio_savable_ops || !md->mf_use || mf_at_switchover(sv))
			continue;
		vfm__mf_src_release(src->mf, md);
		vfm_debug(LOG, "%s: %" PRIu64 " bytes pending fit one read: on main", sv->name,
			  sv->exact_prev);
	}
}

/*
 * The destination's load, after the source's last write, of what the stream
 * held back (expect_switchover's dest_load): each savable other than a device
 * (whose data goes in blocks of its own) sends its last bytes as small
 * records, and up to VFM_STREAM_WBUF_SIZE of them arrive in the end's flush
 * of each stream that carries them (main, or every multifd channel, loaded in
 * parallel at the destination); it loads them at about the pace the source
 * sent them.
 */
static double tail_ms(const struct source *src, const struct vfm_savable *sv)
{
	uint64_t held = VFM_STREAM_WBUF_SIZE;
	double pace;

	if (sv->ops == &vfm__vfio_savable_ops || !sv->exact_prev)
		return 0;
	if (on_channels(src, sv))
		held *= vfm__mf_src_nchannels(src->mf);
	pace = savable_pace(src, sv);
	if (pace <= 0)
		pace = src->bw;   /* as savable_ms */
	if (pace <= 0)
		return 0;
	return (double)(sv->exact_prev < held ? sv->exact_prev : held) * 1000.0 / pace;
}

/* The median of the last min(count, VFM__DST_RT) figures of a ring, ms. */
static double median_ms(const uint32_t *ring, unsigned count)
{
	uint32_t v[VFM__DST_RT];
	unsigned n = count < VFM__DST_RT ? count : VFM__DST_RT;

	if (!n)
		return 0;
	memcpy(v, ring, n * sizeof(v[0]));
	for (unsigned i = 1; i < n; i++)   /* insertion sort: n <= 8 */
		for (unsigned j = i; j > 0 && v[j - 1] > v[j]; j--) {
			uint32_t t = v[j];

			v[j] = v[j - 1];
			v[j - 1] = t;
		}
	return (double)v[n / 2] / 1e6;
}

/*
 * The destination's device round trip, ms: the median of what its PONGs said
 * (one query timed at each: five at setup, one per drain; a single figure
 * taken while the destination loaded a backlog was 1.2-1.5 ms where its load
 * end's requests took 0.05). None said (an older destination): this side's.
 */
static double dst_round_trip_ms(const struct vfm_mig_device *md)
{
	return md->ndst_rt ? median_ms(md->dst_rt_ns, md->ndst_rt) : (double)md->arc_ns / 1e6;
}

/*
 * A round to the guest's vCPUs that leaves them running (the VM's kick_ns),
 * timed: what a stop will take, which the engine cannot time before it stops
 * the guest (expected as 0, it was 0.05-0.2 ms in make bench's rows with a
 * writer, 10-20 % of a sub-ms downtime). The last VFM__DST_RT are kept.
 */
static void time_kick(struct source *src)
{
	const struct vfm_migration *m = src->m;
	uint64_t ns;

	if (!m->vm || !m->vm->kick_ns)
		return;
	ns = m->vm->kick_ns(m->vm_opaque);
	src->kick_ns[src->nkick++ % VFM__DST_RT] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

/*
 * The downtime as it would go if the switchover started now, step by step
 * (the steps of vfm_switchover_step_name, as publish_steps measures them),
 * from what this migration learned: each savable's pending bytes at the last
 * exact check over its own pace; each device's round trip (a state query
 * (its least query: arc_ns) for its arcs and its config read; the last dirty
 * sync; the return path's least round trip. Returns the sum, or a
 * negative value when a savable with data has no pace yet.
 * - guest_stop: as long as a round to the vCPUs took (time_kick, the median
 *   of the last few; 0 for a VM without kick_ns).
 * - device_stop: per device PRE_COPY(_P2P) arcs: to P2P (if it has P2P), a
 *   config read, to STOP_COPY (stop_devices).
 * - final_sync: as long as the last pre-copy sync.
 * - last_bytes: main carries its savables one after another (sum): each
 *   its pending bytes over its pace, RAM after a sync of its send set (as
 *   long as its quickest exact query), a device ending with two reads that
 *   do not fill a block (each what such a read cost in pre-copy beyond its
 *   bytes, the least seen, at least a round trip: the first pass's 128 KiB
 *   tail whole made 16 MiB rows' last_bytes 0.1-0.2 ms high); with
 *   multifd channels each device on the
 *   channels moves in parallel with main (the longest lane), and RAM stays
 *   in main's lane: the migration thread sends it (on the channels, plus a
 *   flush of each) before main's devices. Counted as a lane of its own,
 *   it made 2-channel rows' last_bytes 0.13-0.28 ms low (RAM and a device
 *   on main, one after the other, expected as the longer of the two);
 *   avail-switchover-bandwidth, when set, states the pace of the whole
 *   (as QEMU: all pending over it).
 * - dest_load: the stream's end is flushed at once, so the destination's
 *   device requests for it come after it: per device, the last data block's
 *   write (if it had data), load_config's two config writes (if it has a
 *   config region), RESUMING -> STOP and, if P2P, -> RUNNING_P2P: the
 *   first a round trip to the destination's device as the destination
 *   timed it (dst_round_trip_ms, from its PONGs: a device process woken
 *   from idle), each next one as the second of the two queries it timed
 *   (the device may sleep between requests: traces of 16 MiB rows had
 *   40-55 us from a request's send to the device's receive where the first
 *   query took 0.08-0.1 ms, ~10 us where it took 0.02; with the rest at
 *   this side's figure (arc_ns, 5 us) those rows' dest_load was 0.1-0.2 ms
 *   low, and at the first query's, 0.05-0.15 ms high in others); the end
 *   of stream's way there and LOADED's way back, one more first-query
 *   round trip (the least PING without a device). Before those, the
 *   destination loads what reached it in the last write of main: RAM's
 *   last pages are small records the stream holds until its buffer fills
 *   or the end's flush (tail_ms); a trace had the destination's load of the
 *   tail 0.06 ms without RAM pages, 0.08-0.1 with 16-60 KiB and 0.15-0.2
 *   with 170-250 KiB, as long as the source took to send them.
 * - go: sending GO, nothing to wait for: as long as the quickest PING took
 *   to put and flush (0 was expected where 0.02 ms was measured).
 * - dest_resume: RUNNING per device (awake from its load end: this side's
 *   figure; the destination's woken figure made it 0.1 ms where 0.045 was
 *   measured) and GO's way over (half a round trip).
 */
static double expect_switchover(const struct source *src, double steps[VFM_SWITCHOVER_STEPS])
{
	const struct vfm_migration *m = src->m;
	double rtt = (double)src->rtt_min_ns / 1e6, lane_main = 0, lane_max = 0, total = 0;
	double hop = -1.0;
	uint64_t all = 0;
	bool known = true;

	memset(steps, 0, sizeof(double) * VFM_SWITCHOVER_STEPS);
	for (unsigned i = 0; i < m->nsv; i++) {
		const struct vfm_mig_device *md = m->sv[i].opaque;
		double a, da, dn;
		bool p2p;

		if (m->sv[i].ops != &vfm__vfio_savable_ops)
			continue;
		a = (double)md->arc_ns / 1e6;
		da = dst_round_trip_ms(md);
		/* Each next request: as the destination's second query (an older
		 * destination: as its first). */
		dn = md->ndst_rt2 ? median_ms(md->dst_rt2_ns, md->ndst_rt2) : da;
		p2p = md->flags & VFM_MIG_P2P;
		steps[1] += a * (p2p ? 3 : 2);
		steps[4] += da + dn * (p2p + 2 * md->has_config + (m->sv[i].exact_prev > 0));
		if (md->ndst_rt && da > hop)   /* the destination's own figure */
			hop = da;
		steps[6] += a;
	}
	steps[2] = (double)src->sync_ns / 1e6;
	for (unsigned i = 0; i < m->nsv; i++) {
		const struct vfm_savable *sv = &m->sv[i];
		double t = savable_ms(src, sv);

		all += sv->exact_prev;
		steps[4] += tail_ms(src, sv);
		if (t < 0) {
			known = false;
			continue;
		}
		/* A device's save thread on the channels runs beside the
		 * migration thread; RAM's stop-copy, on the channels or not, is
		 * the migration thread's (ram.c complete_on_channels puts the
		 * last pages itself or joins its workers) before it reads the
		 * devices on main. */
		if (on_channels(src, sv) && sv->ops == &vfm__vfio_savable_ops)
			lane_max = t > lane_max ? t : lane_max;
		else
			lane_main += t;
	}
	steps[3] = lane_main > lane_max ? lane_main : lane_max;
	/* Bulk (beyond what socket buffers absorb) no faster than the pipe
	 * sustained while it never idled: four
	 * devices' stop-copy in a row wait for the destination's loads, which
	 * pre-copy's interleaving hid from each turn (4 x 32 MiB at 2 ms/MiB:
	 * 268 ms expected from the paces, 556 ms measured). */
	if (src->bw_sat > 0 && all >= PACE_SUSTAINED && (double)all * 1000.0 / src->bw_sat > steps[3])
		steps[3] = (double)all * 1000.0 / src->bw_sat;
	if (src->p.avail_switchover_bandwidth) {
		steps[3] = (double)all * 1000.0 / (double)src->p.avail_switchover_bandwidth;
		known = true;
	}
	steps[0] = median_ms(src->kick_ns, src->nkick);
	/* The end of stream's way there and LOADED's way back: a round trip
	 * between processes woken from idle, as the destination's requests to
	 * its device are now (without a device, or from a destination that
	 * sends no device figures: the least PING). */
	steps[4] += hop >= 0 ? hop : rtt;
	steps[5] = (double)src->flush_min_ns / 1e6;
	steps[6] += rtt / 2;
	for (unsigned i = 0; i < VFM_SWITCHOVER_STEPS; i++)
		total += steps[i];
	return known ? total : -1.0;
}

/*
 * The first device with pending data that has no pace because it never read in
 * pre-copy (pre-copy off, or no PRE_COPY), so its part of the expected
 * downtime assumes the link's pace (savable_ms), as QEMU's pending over
 * bandwidth does; its firmware may take far longer (1 GiB at 2000 us/MiB
 * expected 279 ms at a 3.9 GB/s link and took 2560 ms). Nothing can time a
 * device's stop-copy before it stops, so the engine says so instead: in the
 * stats (unpaced), and in a warning when it switches over on that figure.
 * Not when avail-switchover-bandwidth states the pace of the whole.
 */
static void unpaced(struct source *src)
{
	const struct vfm_migration *m = src->m;

	src->unpaced[0] = '\0';
	if (src->p.avail_switchover_bandwidth)
		return;
	for (unsigned i = 0; i < m->nsv; i++) {
		const struct vfm_savable *sv = &m->sv[i];

		if (sv->ops == &vfm__vfio_savable_ops && sv->exact_prev &&
		    savable_pace(src, sv) <= 0 &&
		    !atomic_load(&((struct vfm_mig_device *)sv->opaque)->transferred)) {
			snprintf(src->unpaced, sizeof(src->unpaced), "%s", sv->name);
			return;
		}
	}
}

/* Whether every savable that iterates has its pass of this iteration out. */
static bool all_passed(struct vfm_migration *m)
{
	for (unsigned i = 0; i < m->nsv; i++) {
		const struct vfm_savable *sv = &m->sv[i];

		if (!sv->ops->save_iterate ||
		    (sv->ops->is_active_iterate && !sv->ops->is_active_iterate(sv->opaque)))
			continue;
		if (!sv->pass_done)
			return false;
	}
	return true;
}

/* One bounded turn for every savable whose pass is not out yet; the bytes. */
static int iterate_turns(struct source *src, uint64_t budget, uint64_t *moved,
			 struct vfm_error *err)
{
	struct vfm_migration *m = src->m;
	int ret;

	*moved = 0;
	for (unsigned i = 0; i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];
		uint64_t b0 = out_bytes(src), n;

		if (!sv->ops->save_iterate || sv->pass_done ||
		    (sv->ops->is_active_iterate && !sv->ops->is_active_iterate(sv->opaque)))
			continue;
		uint64_t t0 = vfm__now_ns(), w0 = runqueue_wait_ns();
		uint64_t x0 = sv->ops->precopy_only_ns ? sv->ops->precopy_only_ns(sv->opaque) : 0;

		ret = sv->ops->save_iterate(sv->opaque, src->out, budget, err);
		if (ret < 0)
			return vfm_error_set(err, ret, "pre-copy of %s", sv->name);
		n = out_bytes(src) - b0;
		if (n) {
			/* Its pace (savable_pace), without the time the turn
			 * waited for a CPU (at most half of it taken off) and
			 * the work stop-copy does not do (RAM's bounce copy: a
			 * 512 MiB/s guest's last bytes were expected 15-25 %
			 * above what they took). */
			uint64_t dt = vfm__now_ns() - t0, w = runqueue_wait_ns() - w0;
			uint64_t x = sv->ops->precopy_only_ns ?
				     sv->ops->precopy_only_ns(sv->opaque) - x0 : 0;

			dt -= w < dt / 2 ? w : dt / 2;
			dt -= x < dt / 2 ? x : dt / 2;
			if (n >= PACE_MIN_TURN && (double)n * 1e9 / (double)(dt + 1) > sv->pace)
				sv->pace = (double)n * 1e9 / (double)(dt + 1);
			sv->run_bytes += n;
			sv->run_ns += dt;
			if (sv->run_bytes >= PACE_SUSTAINED) {
				sv->sustained = (double)sv->run_bytes * 1e9 / (double)(sv->run_ns + 1);
				sv->run_bytes = sv->run_ns = 0;
			}
		}
		sv->sent_iter += n;
		*moved += n;
		if (ret == 1)
			sv->pass_done = true;
	}
	return 0;
}

/*
 * Pre-copy until the rest fits the downtime limit. An iteration gives every
 * savable bounded turns until its pass is out (RAM: its send set, filled at
 * setup and by each sync, is empty; a device: it read what it had pending at
 * the last exact check, or it has nothing now); then, or as soon as the
 * cheap estimate fits the threshold (QEMU's migration_iteration_run), a dirty
 * sync and the exact figures decide, and the next iteration starts. No
 * savable waits on another's pass: RAM moves from the first iteration
 * whatever the devices do.
 */
static int do_iterate(struct source *src, struct vfm_error *err)
{
	struct vfm_migration *m = src->m;
	uint64_t pending = 0, iterations = 0, budget = vfm__iter_budget(src->p.max_bandwidth);
	uint64_t moved_iter = 0, moved, iter_start = vfm__now_ns();
	unsigned drains = 0;
	int ret;

	src->win_start = vfm__now_ns();
	src->win_bytes0 = out_bytes(src);
	src->win_limited = false;
	src->win_blocked0 = vfm_stream_blocked_ns(src->out);
	src->win_rq0 = runqueue_wait_ns();
	src->ka_ns = vfm__now_ns();
	src->ka_bytes = vfm_stream_bytes(src->out);
	src->converging = true;
	for (unsigned i = 0; i < m->nsv; i++) {
		m->sv[i].pass_done = false;
		m->sv[i].sent_iter = m->sv[i].exact_prev = 0;
		m->sv[i].pace = m->sv[i].pace_prev = m->sv[i].sustained = 0;
		m->sv[i].run_bytes = m->sv[i].run_ns = 0;
		m->sv[i].exact_min_ns = 0;
	}
	for (;;) {
		double threshold, bw;
		bool passed;

		if (atomic_load(&m->cancel))
			return vfm_error_set(err, VFM_ECANCELED, "migration cancelled");
		if ((ret = poll_return_path(src, err)))
			return ret;
		read_live_params(src, &budget);
		bandwidth_tick(src);
		/* No real window yet: probe once the first window measured something
		 * or, sooner, once a whole pass is out (an idle guest need not wait
		 * the 100 ms window to learn the link). */
		if (!src->bw_real && !src->probed && (src->bw > 0 || src->pass_done) &&
		    !src->p.avail_switchover_bandwidth &&
		    (ret = probe_bandwidth(src, err)))
			return ret;
		bw = switchover_bw(src);
		threshold = bw * (double)src->p.downtime_limit_ms / 1000.0;
		pending = pending_estimate(m);
		if (src->bw_from_probe && (double)pending > threshold && src->nprobes < PROBE_MAX &&
		    vfm__now_ns() - src->probe_ns >= 1000000000ull) {
			if ((ret = probe_bandwidth(src, err)))
				return ret;
			bw = switchover_bw(src);
			threshold = bw * (double)src->p.downtime_limit_ms / 1000.0;
		}
		passed = all_passed(m);
		if ((bw > 0 && (double)pending <= threshold) || passed ||
		    vfm__now_ns() - iter_start >= ITER_MAX_NS) {
			/* The end of an iteration: sync, exact figures, decide. */
			vfm_stream_flush(src->out);
			timed_log_sync(src);
			iterations++;
			if (passed)
				src->pass_done = true;
			if ((ret = exact_check(src, passed, &pending, err)))
				return ret;
			pthread_mutex_lock(&m->lock);
			m->stats.precopy_iterations = iterations;
			pthread_mutex_unlock(&m->lock);
			update_stats(src, pending);
			vfm_debug(LOG, "iteration %" PRIu64 ": %" PRIu64 " bytes moved, %" PRIu64
				  " pending, expected downtime %.1f ms%s, %.1f MB/s%s", iterations,
				  moved_iter, pending, src->exp_ms, src->exp_known ? "" : " (no pace)",
				  bw / 1e6, src->converging ? "" : ", not converging");
			if (expect_fits(src)) {
				if (all_acked(m) && src->rp && drains < DRAIN_MAX) {
					/*
					 * Let the destination catch up before the guest
					 * stops: what sits in socket buffers (MiBs) would
					 * otherwise load inside the downtime. A PING is
					 * answered once everything before it is loaded;
					 * then decide again on fresh figures.
					 */
					drains++;
					if ((ret = measure_rtt(src, true, err)))
						return ret;
					timed_log_sync(src);
					if ((ret = exact_check(src, false, &pending, err)))
						return ret;
					if (!expect_fits(src))
						continue;
				}
				if (all_acked(m)) {
					for (unsigned i = 0; i < m->nsv; i++)
						vfm_debug(LOG, "switchover expected: %s %" PRIu64
							  " bytes at %.1f MB/s: %.3f ms",
							  m->sv[i].name, m->sv[i].exact_prev,
							  savable_pace(src, &m->sv[i]) / 1e6,
							  savable_ms(src, &m->sv[i]));
					src->expected_ms = src->exp_ms;
					src->have_expected = true;
					if (src->unpaced[0])
						vfm_warn(LOG, "switching over on an expected downtime of "
							 "%.1f ms that assumes the link's %.0f MB/s for "
							 "%s: it has no pre-copy, so its stop-copy pace "
							 "is unknown until it reads, and the downtime "
							 "may exceed the limit", src->exp_ms,
							 switchover_bw(src) / 1e6, src->unpaced);
					pthread_mutex_lock(&m->lock);
					memcpy(m->stats.expected_switchover_ms, src->exp_steps,
					       sizeof(src->exp_steps));
					pthread_mutex_unlock(&m->lock);
					break;
				}
				phase(src, VFM__PH_ACK_WAIT);
			}
			if (!moved_iter) {
				/* Idle: wait for the guest, a device or acks rather than spin. */
				struct timespec ts = { 0, (long)IDLE_NAP_NS };

				src->win_napped = true;
				nanosleep(&ts, NULL);
			}
			moved_iter = 0;
			iter_start = vfm__now_ns();
		}
		if ((ret = iterate_turns(src, budget, &moved, err)))
			return ret;
		moved_iter += moved;
		if (moved)
			src->win_busy = true;
		update_stats(src, pending_estimate(m));
		keepalive(src);
		rate_limit(src);
		if (vfm_stream_error(src->out, err))
			return err ? err->code : -EIO;
		phase(src, VFM__PH_PRECOPY);
	}
	pthread_mutex_lock(&m->lock);
	m->stats.precopy_iterations = iterations;
	pthread_mutex_unlock(&m->lock);
	update_stats(src, pending);
	return 0;
}

/* Quiesce then stop every device: all to P2P states first, then STOP_COPY. */
static int stop_devices(struct vfm_migration *m, struct vfm_error *err)
{
	int ret;

	for (unsigned i = 0; i < m->ndevs; i++) {
		struct vfm_mig_device *md = m->devs[i];
		enum vfm_state st = vfm_device_state(md->dev), to;

		/* A device that never ran in this migration (stopped at setup)
		 * stays stopped: quiescing applies to running ones only. */
		if (!(md->flags & VFM_MIG_P2P) ||
		    (st != VFM_STATE_PRE_COPY && st != VFM_STATE_RUNNING))
			continue;
		to = st == VFM_STATE_PRE_COPY ? VFM_STATE_PRE_COPY_P2P : VFM_STATE_RUNNING_P2P;
		ret = vfm_device_set_state(md->dev, to, st, err);
		if (ret)
			return vfm_error_set(err, ret, "%s: quiescing (P2P)", vfm_device_id(md->dev));
	}
	for (unsigned i = 0; i < m->ndevs; i++) {
		struct vfm_mig_device *md = m->devs[i];
		enum vfm_state st = vfm_device_state(md->dev);

		if (md->mf_use)
			continue;  /* its save thread does it */
		if ((ret = vfm__vfio_snapshot_config(md, err)))
			return ret;
		ret = vfm_device_set_state(md->dev, VFM_STATE_STOP_COPY, st, err);
		if (ret)
			return vfm_error_set(err, ret, "%s: to STOP_COPY", vfm_device_id(md->dev));
	}
	return 0;
}

const char *vfm_switchover_step_name(unsigned step)
{
	static const char *const names[VFM_SWITCHOVER_STEPS] = {
		"guest_stop", "device_stop", "final_sync", "last_bytes", "dest_load", "go",
		"dest_resume",
	};

	return step < VFM_SWITCHOVER_STEPS ? names[step] : "?";
}

/* The switchover timeline: step i ended at t (CLOCK_MONOTONIC ns). */
static void step_done(struct source *src, unsigned i, uint64_t t)
{
	src->step_end[i] = t;
}

/*
 * Each step from the end of the one before; the last end is the downtime's
 * (the destination's resume), and no step ends after it: the destination may
 * read GO and resume before the source's own clock read after sending it.
 */
static void publish_steps(struct source *src)
{
	struct vfm_migration *m = src->m;
	uint64_t prev = src->t_stop, end = src->t_stop;

	for (unsigned i = 0; i < VFM_SWITCHOVER_STEPS; i++)
		if (src->step_end[i] > end)
			end = src->step_end[i];
	/* Only the last end counts (it may come before an earlier step's). */
	if (src->step_end[VFM_SWITCHOVER_STEPS - 1] > src->t_stop)
		end = src->step_end[VFM_SWITCHOVER_STEPS - 1];
	pthread_mutex_lock(&m->lock);
	for (unsigned i = 0; i < VFM_SWITCHOVER_STEPS; i++) {
		uint64_t t = src->step_end[i] > prev ? src->step_end[i] : prev;

		if (t > end)
			t = end;
		m->stats.switchover_ms[i] = src->step_end[i] ? (double)(t - prev) / 1e6 : 0;
		if (src->step_end[i])
			prev = t;
	}
	m->stats.have_switchover = true;
	pthread_mutex_unlock(&m->lock);
	vfm_debug(LOG, "switchover: guest stop %.3f, devices %.3f, sync %.3f, last bytes %.3f, "
		  "destination load %.3f, go %.3f, destination resume %.3f ms",
		  m->stats.switchover_ms[0], m->stats.switchover_ms[1], m->stats.switchover_ms[2],
		  m->stats.switchover_ms[3], m->stats.switchover_ms[4], m->stats.switchover_ms[5],
		  m->stats.switchover_ms[6]);
}

/* Milliseconds since the guest was told to stop. */
static double since_stop_ms(const struct source *src)
{
	return (double)(vfm__now_ns() - src->t_stop) / 1e6;
}

static int do_switchover(struct source *src, struct vfm_error *err)
{
	struct vfm_migration *m = src->m;
	struct vfm_rec_hdr h;
	const void *pl;
	uint64_t t_resumed_rx;
	int ret;

	release_small(src);   /* outside the downtime */
	vfm__mig_set_status(m, VFM_MIG_DEVICE);
	src->t_stop = vfm__now_ns();
	if (m->vm && m->vm->stop && (ret = m->vm->stop(m->vm_opaque)))
		return vfm_error_set(err, ret, "stopping the guest");
	src->guest_stopped = true;
	memset(src->step_end, 0, sizeof(src->step_end));
	step_done(src, 0, vfm__now_ns());
	vfm_debug(LOG, "switchover: guest stopped in %.3f ms", since_stop_ms(src));
	if ((ret = stop_devices(m, err)))
		return ret;
	if (src->mf && (ret = vfm__mf_src_stop_devices(src->mf, err)))
		return ret;
	step_done(src, 1, vfm__now_ns());
	vfm_debug(LOG, "switchover: devices stopped at %.3f ms", since_stop_ms(src));
	{
		unsigned char ts[8];
		vfm_put_le64(ts, src->t_stop);
		vfm_stream_put_record(src->out, VFM_REC_SWITCHOVER, 0, 0, ts, sizeof(ts));
	}
	vfm__log_sync(m, false);
	step_done(src, 2, vfm__now_ns());
	vfm_debug(LOG, "switchover: final dirty sync done at %.3f ms", since_stop_ms(src));
	phase(src, VFM__PH_STOP_COPY);
	/* Every device is quiet and synced: the save threads may read. */
	if (src->mf) {
		/*
		 * SWITCHOVER must reach the destination now: its load threads
		 * (and RAM packets) wait for it. Left in main's write buffer it
		 * came only with the end of stream, so every device's state
		 * loaded after all of it was sent: save then load, in series
		 * (why 4 channels gave 0.53 of the downtime, not ~0.25).
		 */
		vfm_stream_flush(src->out);
		vfm__mf_src_go(src->mf);
	}
	/* All data first, then every config state (QEMU: iterable sections
	 * complete before the non-iterable ones), so the destination loads
	 * config only once every device has its data. */
	for (unsigned i = 0; i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];

		if (sv->ops->save_complete && (ret = sv->ops->save_complete(sv->opaque, src->out, err)))
			return vfm_error_set(err, ret, "stop-copy of %s", sv->name);
		vfm_debug(LOG, "switchover: %s complete at %.3f ms", sv->name, since_stop_ms(src));
	}
	if (src->mf && (ret = vfm__mf_src_finish(src->mf, src->out, err)))
		return ret;
	vfm_stream_flush(src->out);
	if (vfm_stream_error(src->out, err))
		return err ? err->code : -EIO;
	phase(src, VFM__PH_CONFIG);
	for (unsigned i = 0; i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];

		if (sv->ops->save_state && (ret = sv->ops->save_state(sv->opaque, src->out, err)))
			return vfm_error_set(err, ret, "config of %s", sv->name);
		vfm_stream_put_record(src->out, VFM_REC_SECTION_END, 0, sv->section, NULL, 0);
	}
	vfm_stream_put_record(src->out, VFM_REC_EOS, 0, 0, NULL, 0);
	vfm_stream_flush(src->out);
	if (vfm_stream_error(src->out, err))
		return err ? err->code : -EIO;
	step_done(src, 3, vfm__now_ns());
	vfm_debug(LOG, "switchover: end of stream sent at %.3f ms", since_stop_ms(src));

	if (!src->rp) {
		/* file: / fd: the stream is the whole result. */
		src->committed = true;
		pthread_mutex_lock(&m->lock);
		m->stats.downtime_ms = since_stop_ms(src);
		m->stats.downtime_from_same_clock = true;
		pthread_mutex_unlock(&m->lock);
		publish_steps(src);
		return 0;
	}
	phase(src, VFM__PH_LOADED_WAIT);
	if ((ret = wait_rp(src, VFM_REC_RP_LOADED, &h, &pl, err)))
		return ret;
	step_done(src, 4, vfm__now_ns());
	/* Commit point: once GO is on the wire the destination may run. A
	 * cancel that got here first wins; one that comes later is too late. */
	pthread_mutex_lock(&m->lock);
	if (atomic_load(&m->cancel)) {
		pthread_mutex_unlock(&m->lock);
		return vfm_error_set(err, VFM_ECANCELED, "migration cancelled");
	}
	m->committed = src->committed = true;
	pthread_mutex_unlock(&m->lock);
	phase(src, VFM__PH_GO);
	vfm_stream_put_record(src->out, VFM_REC_GO, 0, 0, NULL, 0);
	vfm_stream_flush(src->out);
	if (vfm_stream_error(src->out, err)) {
		/*
		 * Everything before GO was flushed, so a failed flush means GO
		 * did not get out whole, and the destination runs nothing
		 * without a whole, checksummed GO: rolling back is safe.
		 */
		pthread_mutex_lock(&m->lock);
		m->committed = src->committed = false;
		pthread_mutex_unlock(&m->lock);
		return vfm_error_set(err, err->code, "sending GO");
	}
	step_done(src, 5, vfm__now_ns());
	phase(src, VFM__PH_COMMITTED);
	ret = wait_rp(src, VFM_REC_RP_RESUMED, &h, &pl, err);
	t_resumed_rx = vfm__now_ns();
	if (ret)
		return ret;
	pthread_mutex_lock(&m->lock);
	if (h.length >= 8 + 36 && vfm__same_boot((const char *)pl + 8)) {
		/* Same host: both timestamps are CLOCK_MONOTONIC of one machine. */
		src->step_end[6] = vfm_get_le64(pl);
		m->stats.downtime_ms = (double)(vfm_get_le64(pl) - src->t_stop) / 1e6;
		m->stats.downtime_from_same_clock = true;
	} else {
		/* Another host: the resume happened about half a round trip ago. */
		src->step_end[6] = t_resumed_rx - src->rtt_ns / 2;
		m->stats.downtime_ms = (double)(t_resumed_rx - src->t_stop - src->rtt_ns / 2) / 1e6;
		m->stats.downtime_from_same_clock = false;
	}
	pthread_mutex_unlock(&m->lock);
	publish_steps(src);
	return 0;
}

/*
 * Rollback, before any device goes back to RUNNING: every stopped P2P device
 * first to RUNNING_P2P, so none runs (and starts DMA to a peer) while another is still
 * stopped or saving; each save_cleanup then takes its device on to RUNNING.
 * QEMU does the same through its VM state change "prepare" notifier
 * (vfio_vmstate_change_prepare in hw/vfio/migration.c) before the
 * RUNNING one.
 */
static void p2p_quiesce_all(struct vfm_migration *m)
{
	for (unsigned i = 0; i < m->ndevs; i++) {
		struct vfm_mig_device *md = m->devs[i];
		enum vfm_state st = vfm_device_state(md->dev);
		struct vfm_error e = { 0 };

		/* PRE_COPY runs (the device does DMA): it goes straight back,
		 * as QEMU's failure notifier takes it (PRE_COPY -> RUNNING). */
		if (!(md->flags & VFM_MIG_P2P) || st == VFM_STATE_RUNNING ||
		    st == VFM_STATE_RUNNING_P2P || st == VFM_STATE_PRE_COPY || st == VFM_STATE_ERROR)
			continue;
		if (vfm_device_set_state(md->dev, VFM_STATE_RUNNING_P2P, VFM_STATE_ERROR, &e))
			vfm_err(vfm_device_id(md->dev), "to RUNNING_P2P on rollback: %s", e.msg);
	}
}

static void finish(struct source *src, int ret, const struct vfm_error *err)
{
	struct vfm_migration *m = src->m;
	bool ok = ret == 0;
	bool rollback = !ok && !src->committed;
	bool cancelled = rollback && atomic_load(&m->cancel);
	struct vfm_error why = { 0 };

	/* A cancel shuts the socket down and stops the save threads, so it often
	 * surfaces as a write or read error or as a thread that stopped early
	 * (code VFM_ECANCELED, another message): report it as what it is. */
	if (cancelled && strncmp(err->msg, "migration cancelled", 19) != 0) {
		vfm_error_set(&why, VFM_ECANCELED, "migration cancelled (%s)", err->msg);
		err = &why;
	}

	/* auto-converge ends with the migration: full speed again (the
	 * guest resumes unthrottled after a rollback). */
	if (src->throttle_pct)
		set_throttle(src, 0);
	/* Save threads first: nothing may touch a device while it rolls back. */
	src->mf_bytes = vfm__mf_src_bytes(src->mf);
	vfm__mf_src_close(src->mf);
	src->mf = NULL;
	if (rollback)
		p2p_quiesce_all(m);
	for (unsigned i = 0; i < m->nsv; i++)
		if (m->sv[i].ops->save_cleanup)
			m->sv[i].ops->save_cleanup(m->sv[i].opaque, !rollback);
	vfm__dirty_tracking_stop(m);
	if (rollback && src->guest_stopped && m->vm && m->vm->start) {
		if (m->vm->start(m->vm_opaque))
			vfm_err(LOG, "could not restart the guest after a failed migration");
		else
			vfm_info(LOG, "guest resumed on the source");
	}
	if (!ok) {
		vfm__mig_set_error(m, err);
		if (src->committed)
			vfm_err(LOG, "failed after the commit point: the destination may be running, "
				"so the source stays stopped");
		vfm_err(LOG, "migration failed: %s", err->msg);
	}
	update_stats(src, ok ? 0 : m->stats.pending_bytes);
	atomic_store(&m->sock_fd, -1);
	vfm_stream_free(src->rp);
	vfm_stream_free(src->out);
	src->rp = src->out = NULL;
	if (src->fd >= 0)
		close(src->fd);
	if (ok)
		vfm__mig_set_status(m, VFM_MIG_COMPLETED);
	else if (cancelled)
		vfm__mig_set_status(m, VFM_MIG_CANCELLED);
	else
		vfm__mig_set_status(m, VFM_MIG_FAILED);
}

void *vfm__source_thread(void *arg)
{
	struct source *src = arg;
	struct vfm_migration *m = src->m;
	struct vfm_error err = { 0 };
	int ret;

	src->t_start = vfm__now_ns();
	ret = do_setup(src, &err);
	pthread_mutex_lock(&m->lock);
	m->stats.setup_time_ms = (vfm__now_ns() - src->t_start) / 1000000ull;
	pthread_mutex_unlock(&m->lock);
	if (!ret) {
		vfm__mig_set_status(m, VFM_MIG_ACTIVE);
		ret = do_iterate(src, &err);
	}
	if (!ret)
		ret = do_switchover(src, &err);
	if (ret && !err.code)
		vfm_error_set(&err, ret, "%s", vfm_strerror(ret));
	finish(src, ret, &err);
	free(src);
	return NULL;
}

int vfm_migration_start(struct vfm_migration *m, const char *uri,
			const struct vfm_migration_params *params, struct vfm_error *err)
{
	struct source *src;
	unsigned p2p = 0;
	int ret;

	if (params && params->postcopy)
		return vfm_error_set(err, -ENOTSUP, "postcopy is not supported with VFIO devices: "
				     "their DMA cannot fault on missing pages");
	for (unsigned i = 0; i < m->ndevs; i++)
		p2p += !!(m->devs[i]->flags & VFM_MIG_P2P);
	if (m->ndevs > 1 && p2p != m->ndevs)
		return vfm_error_set(err, -EOPNOTSUPP, "%u devices but only %u support P2P: several "
				     "devices can migrate only if all support P2P", m->ndevs, p2p);
	src = calloc(1, sizeof(*src));
	if (!src)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	src->m = m;
	src->fd = -1;
	if (params)
		src->p = *params;
	else
		vfm_migration_params_default(&src->p);
	ret = vfm_uri_parse(uri, &src->uri, err);
	if (ret) {
		free(src);
		return ret;
	}
	pthread_mutex_lock(&m->lock);
	if (m->thread_running || (m->stats.status != VFM_MIG_NONE &&
				  m->stats.status != VFM_MIG_FAILED &&
				  m->stats.status != VFM_MIG_CANCELLED)) {
		pthread_mutex_unlock(&m->lock);
		free(src);
		return vfm_error_set(err, -EBUSY, "a migration is already %s",
				     vfm_mig_status_name(m->stats.status));
	}
	m->params = src->p;
	memset(&m->stats, 0, sizeof(m->stats));
	m->stats.downtime_limit_ms = src->p.downtime_limit_ms;
	m->stats.converging = true;   /* until iterations say otherwise */
	m->stats.multifd_channels = 0;
	snprintf(m->uri, sizeof(m->uri), "%s", uri);
	atomic_store(&m->cancel, false);
	m->committed = false;
	m->thread_running = true;
	pthread_mutex_unlock(&m->lock);
	vfm__mig_set_status(m, VFM_MIG_SETUP);
	ret = vfm_thread_create(&m->thread, NULL, vfm__source_thread, src);
	if (ret) {
		pthread_mutex_lock(&m->lock);
		m->thread_running = false;
		pthread_mutex_unlock(&m->lock);
		free(src);
		vfm__mig_set_status(m, VFM_MIG_FAILED);
		return vfm_error_set(err, -ret, "starting the migration thread");
	}
	return 0;
}

void vfm_migration_cancel(struct vfm_migration *m)
{
	void (*cb)(void *, enum vfm_mig_status) = NULL;
	void *opaque = NULL;
	enum vfm_mig_status st;
	int fd;

	pthread_mutex_lock(&m->lock);
	st = m->stats.status;
	if (!m->committed && m->thread_running && st != VFM_MIG_COMPLETED &&
	    st != VFM_MIG_FAILED && st != VFM_MIG_CANCELLED) {
		atomic_store(&m->cancel, true);
		/* Unblock a write stuck on a full socket; the thread then rolls back. */
		fd = atomic_load(&m->sock_fd);
		if (fd >= 0)
			shutdown(fd, SHUT_RDWR);
		if (m->mf_src)
			vfm__mf_src_shutdown(m->mf_src);
		/* Under the lock: the thread's final status can only come after. */
		m->stats.status = VFM_MIG_CANCELLING;
		cb = m->event_cb;
		opaque = m->event_opaque;
	}
	pthread_mutex_unlock(&m->lock);
	if (cb)
		cb(opaque, VFM_MIG_CANCELLING);
}

void vfm__migration_set_phase_hook(struct vfm_migration *m, vfm__mig_phase_fn fn, void *opaque)
{
	m->phase_hook = fn;
	m->phase_opaque = opaque;
}

int vfm_migration_wait(struct vfm_migration *m, int timeout_ms)
{
	uint64_t deadline = vfm__now_ns() + (uint64_t)(timeout_ms < 0 ? 0 : timeout_ms) * 1000000ull;
	bool running;
	enum vfm_mig_status st;

	for (;;) {
		pthread_mutex_lock(&m->lock);
		running = m->thread_running;
		st = m->stats.status;
		pthread_mutex_unlock(&m->lock);
		if (!running)
			return 0;
		if (st == VFM_MIG_COMPLETED || st == VFM_MIG_FAILED || st == VFM_MIG_CANCELLED) {
			bool joiner;

			/* One caller joins; the thread has only its return left to do. */
			pthread_mutex_lock(&m->lock);
			joiner = m->thread_running;
			m->thread_running = false;
			pthread_mutex_unlock(&m->lock);
			if (joiner)
				pthread_join(m->thread, NULL);
			return 0;
		}
		if (timeout_ms >= 0 && vfm__now_ns() > deadline)
			return -ETIMEDOUT;
		struct timespec ts = { 0, 2000000 };
		nanosleep(&ts, NULL);
	}
}
