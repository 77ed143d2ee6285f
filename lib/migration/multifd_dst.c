/*
 * Multifd, destination: accept the extra channels and check their handshake,
 * a reader thread per channel that validates and queues packets per device,
 * and a load thread per device that writes them in index order.
 */
#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "migration/multifd.h"
#include "util/logging.h"
#include "util/thread.h"

#define LOG "multifd"
#define MF_MAX_IDX (1u << 24)

struct pkt {
	struct pkt *next;            /* sorted by idx */
	uint32_t idx, flags;
	size_t len;
	unsigned char data[];
};

/* Per device (md->mfq). Guarded by dst->lock. */
struct vfm_mf_devq {
	struct vfm_mf_dst *mf;
	struct vfm_mig_device *md;
	pthread_t thread;
	bool started;
	struct pkt *head;
	uint32_t next;               /* the index to load next */
	uint64_t queued;             /* bytes waiting */
	bool loading;                /* the load thread writes a packet (unlocked) */
	bool got_any, total_known, done;
	uint32_t seen_max;           /* highest index arrived so far */
	uint32_t total;
};

struct dchan {
	struct vfm_mf_dst *mf;
	unsigned idx;
	int fd;
	struct vfm_stream *s;
	pthread_t thread;
	bool started;
	/* Guarded by mf->lock: MF_RAM packets applied, and the end marker's count. */
	uint32_t ram_next, ram_total;
	bool ram_total_known;
	bool ram_delayed;            /* test hook: the first RAM packet waited */
};

struct vfm_mf_dst {
	struct vfm_migration *m;
	unsigned n;
	int main_fd;
	uint64_t max_queued, timeout_ms;
	struct dchan *ch;
	struct vfm_mf_devq q[VFM_MAX_DEVICES];
	pthread_mutex_t lock;
	pthread_cond_t cond;         /* any progress, or the end */
	bool stop;                   /* guarded by lock */
	bool switched;               /* guarded by lock: main passed SWITCHOVER */
	bool ram_end;                /* guarded by lock: RAM's end marker came */
	unsigned blocked;            /* guarded by lock: readers waiting for room */
	uint64_t loaded;             /* guarded by lock: device packets loaded */
	/* Guarded by lock: the per-channel counts wait_ram_applied() waits for
	 * (u32 n, n x u32), NULL when nobody waits. A channel wakes the waiter
	 * when it reaches its count, not at every packet: per-packet wakeups
	 * made the waiting thread and the channel thread ping-pong on one CPU
	 * every 2-3 us for the whole drain, and for 0.5 ms of the switchover
	 * (docs/performance.md section 8). */
	const unsigned char *ram_want;
	int fail_code;               /* guarded by lock: the first failure */
	struct vfm_error fail;
};

static void VFM_PRINTF(3, 4) fail_locked(struct vfm_mf_dst *mf, int code, const char *fmt, ...)
{
	va_list ap;

	if (!mf->fail_code) {
		va_start(ap, fmt);
		vfm_error_setv(&mf->fail, code, fmt, ap);
		va_end(ap);
		mf->fail_code = code ? code : -EIO;
		vfm_err(LOG, "%s", mf->fail.msg);
		/* The incoming thread reads main: make it see the end now. */
		if (mf->main_fd >= 0)
			shutdown(mf->main_fd, SHUT_RD);
	}
	pthread_cond_broadcast(&mf->cond);
}

static struct vfm_mf_devq *devq_of(struct vfm_mf_dst *mf, uint32_t section)
{
	for (unsigned i = 0; i < mf->m->ndevs; i++)
		if (vfm__vfio_section(mf->m->devs[i]) == section)
			return &mf->q[i];
	return NULL;
}

/* Under lock: a load thread can write a packet now (or is writing one). */
static bool a_loader_can_run(const struct vfm_mf_dst *mf)
{
	for (unsigned i = 0; i < mf->m->ndevs; i++) {
		const struct vfm_mf_devq *q = &mf->q[i];

		if (q->loading || (q->head && q->head->idx == q->next))
			return true;
	}
	return false;
}

/*
 * Under lock: backpressure. A reader holding packet p of queue q waits while
 * q's waiting bytes would pass max-queued-buffers-size, and does not read its
 * channel meanwhile (the source's writes then block on the full socket: the
 * save thread waits, no buffer grows). QEMU fails the migration there
 * (vfio_load_state_buffer_insert(): "queuing state buffer ... would exceed
 * the max queued buffers size"); a device whose load is slower than the
 * link, or a main channel that reaches SWITCHOVER late, is no error. It never
 * waits:
 * - for the packet the load thread needs next (p->idx == q->next): it is
 *   loaded at once, so an in-order stream always moves;
 * - on an empty queue (one packet bigger than the limit);
 * - when every other reader waits too and no load thread can run after the
 *   switchover: each holds a packet another device's gap needs behind it on
 *   its channel (device X's next packet behind a Y packet on channel B, Y's
 *   behind an X packet on channel A). Then this one goes over the limit by
 *   its one packet and the others keep waiting: one packet per such knot.
 * Before SWITCHOVER no load thread runs; main reaches SWITCHOVER without the
 * channels (the source flushes it before the first device packet). Returns
 * false if the migration stops or failed meanwhile.
 */
static bool wait_for_room(struct vfm_mf_dst *mf, struct vfm_mf_devq *q, const struct pkt *p)
{
	bool waited = false;

	for (;;) {
		if (mf->stop || mf->fail_code)
			return false;
		if (q->queued + p->len <= mf->max_queued || !q->queued || p->idx == q->next)
			break;
		if (mf->switched && mf->blocked + 1 >= mf->n && !a_loader_can_run(mf)) {
			vfm_debug(LOG, "%s: packet %u over max-queued-buffers-size: every channel "
				  "waits on a gap", vfm_device_id(q->md->dev), p->idx);
			break;
		}
		if (!waited)
			atomic_fetch_add(&q->md->mf_queue_waits, 1);
		waited = true;
		mf->blocked++;
		pthread_cond_wait(&mf->cond, &mf->lock);
		mf->blocked--;
	}
	return true;
}

/* Under lock: validate and queue one packet (takes p or frees it). */
static int enqueue(struct vfm_mf_dst *mf, struct vfm_mf_devq *q, struct pkt *p, unsigned ch)
{
	struct pkt **at = &q->head;
	const char *id = vfm_device_id(q->md->dev);

	if (p->idx >= MF_MAX_IDX || (q->total_known && p->idx >= q->total) || p->idx < q->next) {
		fail_locked(mf, VFM_ESTREAM, "%s: multifd packet index %u %s (channel %u)", id,
			    p->idx, p->idx < q->next ? "already loaded (duplicate)" : "out of range",
			    ch);
		free(p);
		return -1;
	}
	while (*at && (*at)->idx < p->idx)
		at = &(*at)->next;
	if (*at && (*at)->idx == p->idx) {
		fail_locked(mf, VFM_ESTREAM, "%s: duplicate multifd packet index %u (channel %u)", id,
			    p->idx, ch);
		free(p);
		return -1;
	}
	/* Late: a higher index came first (over another channel). */
	if (q->got_any && p->idx < q->seen_max)
		atomic_fetch_add(&q->md->mf_out_of_order, 1);
	if (!q->got_any || p->idx > q->seen_max)
		q->seen_max = p->idx;
	p->next = *at;
	*at = p;
	q->queued += p->len;
	q->got_any = true;
	pthread_cond_broadcast(&mf->cond);
	return 0;
}

/*
 * One MF_RAM packet, pre-copy or stop-copy: applied straight into guest
 * memory as it comes, in channel order (seq must be the next one). A page
 * only ever travels on the channel of its chunk and main carries no page
 * while channels exist (vfm__ram_load_batch checks both), so its versions
 * land in the order they were sent.
 */
static int ram_packet(struct dchan *c, const struct vfm_rec_hdr *h, const unsigned char *pl)
{
	struct vfm_mf_dst *mf = c->mf;
	struct vfm_migration *m = mf->m;
	struct vfm_error err = { 0 };
	uint32_t seq;
	bool hold;
	int ret;

	pthread_mutex_lock(&mf->lock);
	if (h->length < VFM_MF_PKT_HDR + VFM_MF_RAM_BATCH) {
		fail_locked(mf, VFM_ESTREAM, "multifd channel %u: short RAM packet (%u bytes)",
			    c->idx, h->length);
		goto bad;
	}
	if (vfm_get_le32(pl) != VFM_MF_VERSION) {
		fail_locked(mf, VFM_ESTREAM, "multifd channel %u: RAM packet version %u unknown "
			    "(this build reads %u)", c->idx, vfm_get_le32(pl), VFM_MF_VERSION);
		goto bad;
	}
	if (h->section != VFM_MF_RAM_SECTION || vfm_get_le32(pl + 8)) {
		fail_locked(mf, VFM_ESTREAM, "multifd channel %u: RAM packet with section %u, "
			    "flags 0x%x", c->idx, h->section, vfm_get_le32(pl + 8));
		goto bad;
	}
	seq = vfm_get_le32(pl + 4);
	if (mf->stop || mf->fail_code)
		goto bad;
	if (c->ram_total_known && seq >= c->ram_total) {
		fail_locked(mf, VFM_ESTREAM, "multifd channel %u: RAM packet %u beyond the end "
			    "marker (%u packets)", c->idx, seq, c->ram_total);
		goto bad;
	}
	if (seq != c->ram_next) {
		fail_locked(mf, VFM_ESTREAM, "multifd channel %u: RAM packet %u where %u was due (%s)",
			    c->idx, seq, c->ram_next, seq < c->ram_next ? "duplicate"
			    : "one is missing or out of order");
		goto bad;
	}
	hold = (int)c->idx == m->mf_ram_delay_chan && m->mf_ram_delay_ms && !c->ram_delayed &&
	       mf->switched;
	pthread_mutex_unlock(&mf->lock);
	if (hold) {
		/* Test hook: the channel's first stop-copy RAM packet is late, so
		 * the end marker on main must wait for it. */
		struct timespec ts = { m->mf_ram_delay_ms / 1000,
				       (long)(m->mf_ram_delay_ms % 1000) * 1000000L };
		c->ram_delayed = true;
		nanosleep(&ts, NULL);
		/* A migration that ended meanwhile (a sync that did not wait) must
		 * not have its memory changed behind its back. */
		pthread_mutex_lock(&mf->lock);
		if (mf->stop || mf->fail_code)
			goto bad;
		pthread_mutex_unlock(&mf->lock);
	}
	ret = vfm__ram_load_batch(m->ram, pl + VFM_MF_PKT_HDR, h->length - VFM_MF_PKT_HDR,
				  (int)c->idx, mf->n,
				  &err);
	pthread_mutex_lock(&mf->lock);
	if (ret) {
		fail_locked(mf, ret, "multifd channel %u: %s", c->idx, err.msg);
		goto bad;
	}
	c->ram_next++;
	if (mf->ram_want && c->ram_next == vfm_get_le32(mf->ram_want + 4 + 4 * c->idx))
		pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
	return 0;
bad:
	pthread_mutex_unlock(&mf->lock);
	return -1;
}

static void *reader_main(void *arg)
{
	struct dchan *c = arg;
	struct vfm_mf_dst *mf = c->mf;
	struct vfm_migration *m = mf->m;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *pl;

	for (;;) {
		bool stop;

		pthread_mutex_lock(&mf->lock);
		stop = mf->stop || mf->fail_code;
		pthread_mutex_unlock(&mf->lock);
		if (stop)
			break;
		/* Idle through pre-copy, which may last longer than any timeout. */
		if (!vfm_stream_readable(c->s, 100))
			continue;
		if (vfm_stream_get_record(c->s, &h, &pl, VFM_STREAM_MAX_RECORD, &err)) {
			pthread_mutex_lock(&mf->lock);
			if (!mf->stop)
				fail_locked(mf, err.code, "multifd channel %u: %s", c->idx, err.msg);
			pthread_mutex_unlock(&mf->lock);
			break;
		}
		if (h.type == VFM_REC_MF_RAM) {
			if (ram_packet(c, &h, pl))
				break;
			continue;
		}
		if (h.type != VFM_REC_MF_DEV_STATE || h.length < VFM_MF_PKT_HDR ||
		    vfm_get_le32(pl) != VFM_MF_VERSION) {
			pthread_mutex_lock(&mf->lock);
			if (h.type != VFM_REC_MF_DEV_STATE)
				fail_locked(mf, VFM_ESTREAM, "multifd channel %u: unexpected record %s",
					    c->idx, vfm_rec_type_name(h.type));
			else if (h.length < VFM_MF_PKT_HDR)
				fail_locked(mf, VFM_ESTREAM, "multifd channel %u: short packet (%u bytes)",
					    c->idx, h.length);
			else
				fail_locked(mf, VFM_ESTREAM, "multifd channel %u: packet version %u "
					    "unknown (this build reads %u)", c->idx, vfm_get_le32(pl),
					    VFM_MF_VERSION);
			pthread_mutex_unlock(&mf->lock);
			break;
		}
		if ((int)c->idx == m->mf_delay_chan && m->mf_delay_ms) {
			/* Test hook: this channel is the slow one. */
			struct timespec ts = { 0, (long)m->mf_delay_ms * 1000000L };
			nanosleep(&ts, NULL);
		}
		struct vfm_mf_devq *q = devq_of(mf, h.section);
		struct pkt *p = q ? malloc(sizeof(*p) + h.length - VFM_MF_PKT_HDR) : NULL;
		int ret;

		pthread_mutex_lock(&mf->lock);
		if (!q || !q->md->mf_use || !p) {
			fail_locked(mf, !q || !q->md->mf_use ? VFM_ESTREAM : -ENOMEM,
				    "multifd channel %u: packet for section %u, %s", c->idx, h.section,
				    p ? "not a device loading over multifd" : "out of memory");
			pthread_mutex_unlock(&mf->lock);
			free(p);
			break;
		}
		p->idx = vfm_get_le32((const unsigned char *)pl + 4);
		p->flags = vfm_get_le32((const unsigned char *)pl + 8);
		p->len = h.length - VFM_MF_PKT_HDR;
		memcpy(p->data, (const unsigned char *)pl + VFM_MF_PKT_HDR, p->len);
		if (!wait_for_room(mf, q, p)) {
			pthread_mutex_unlock(&mf->lock);
			free(p);
			break;
		}
		ret = enqueue(mf, q, p, c->idx);
		pthread_mutex_unlock(&mf->lock);
		if (ret)
			break;
	}
	return NULL;
}

static void *loader_main(void *arg)
{
	struct vfm_mf_devq *q = arg;
	struct vfm_mig_device *md = q->md;
	struct vfm_mf_dst *mf = q->mf;
	struct vfm_error err = { 0 };

	pthread_mutex_lock(&mf->lock);
	for (;;) {
		struct pkt *p;
		int ret;

		if (mf->stop || mf->fail_code)
			break;
		if (q->total_known && q->next == q->total) {
			q->done = true;
			pthread_cond_broadcast(&mf->cond);
			break;
		}
		if (!mf->switched || !q->head || q->head->idx != q->next) {
			/* Pre-copy data on main goes in first; or a gap: the packet
			 * is still on another channel. */
			pthread_cond_wait(&mf->cond, &mf->lock);
			continue;
		}
		p = q->head;
		q->head = p->next;
		q->queued -= p->len;
		q->loading = true;
		/* Room: a reader may be waiting for it. */
		pthread_cond_broadcast(&mf->cond);
		pthread_mutex_unlock(&mf->lock);
		/* Config is the last packet: one after it is beyond the end marker's
		 * total and fails there (or as out of range). */
		ret = vfm__vfio_load_buffer(md, p->flags & VFM_MF_FLAG_CONFIG, p->data, p->len, &err);
		free(p);
		pthread_mutex_lock(&mf->lock);
		q->loading = false;
		if (ret) {
			fail_locked(mf, ret, "%s", err.msg);
			break;
		}
		q->next++;
		mf->loaded++;
		pthread_cond_broadcast(&mf->cond);
	}
	pthread_mutex_unlock(&mf->lock);
	return NULL;
}

static int accept_channel(struct vfm_mf_dst *mf, struct vfm_listener *l, uint64_t id,
			  struct vfm_error *err)
{
	struct vfm_rec_hdr h;
	const void *pl;
	struct vfm_stream *s = NULL;
	uint32_t idx, cnt;
	int fd, ret;

	ret = vfm_accept(l, (int)mf->timeout_ms, &fd, err);
	if (ret)
		return vfm_error_set(err, ret, "multifd: waiting for the source's channels");
	ret = vfm_stream_open(fd, (int)mf->timeout_ms, &s, err);
	if (!ret)
		ret = vfm_stream_read_header(s, err);
	if (!ret)
		ret = vfm_stream_get_record(s, &h, &pl, 64, err);
	if (!ret && (h.type != VFM_REC_MF_HELLO || h.length != 16))
		ret = vfm_error_set(err, VFM_ESTREAM, "multifd: a connection that is no multifd "
				    "channel (record %s)", vfm_rec_type_name(h.type));
	if (!ret) {
		idx = vfm_get_le32((const unsigned char *)pl + 8);
		cnt = vfm_get_le32((const unsigned char *)pl + 12);
		if (vfm_get_le64(pl) != id)
			ret = vfm_error_set(err, VFM_ESTREAM, "multifd: a channel of another migration");
		else if (cnt != mf->n || idx >= mf->n || mf->ch[idx].s)
			ret = vfm_error_set(err, VFM_ESTREAM, "multifd: bad or duplicate channel "
					    "index %u of %u", idx, cnt);
	}
	if (ret) {
		vfm_stream_free(s);
		close(fd);
		return ret;
	}
	mf->ch[idx].fd = fd;
	mf->ch[idx].s = s;
	return 0;
}

int vfm__mf_dst_open(struct vfm_migration *m, struct vfm_listener *l, int main_fd,
		     const struct vfm_migration_params *p, const void *pl, size_t len,
		     struct vfm_mf_dst **out, struct vfm_error *err)
{
	struct vfm_mf_dst *mf;
	uint64_t id;
	unsigned n;
	int ret;

	if (*out)
		return vfm_error_set(err, VFM_ESTREAM, "multifd channels announced twice");
	if (len != 12)
		return vfm_error_set(err, VFM_ESTREAM, "bad MF_CHANNELS record (%zu bytes)", len);
	id = vfm_get_le64(pl);
	n = vfm_get_le32((const unsigned char *)pl + 8);
	if (!n || n > VFM_MF_MAX_CHANNELS || !l || vfm_listener_fd(l) < 0)
		return vfm_error_set(err, VFM_ESTREAM, "multifd: %u channels %s", n,
				     n && n <= VFM_MF_MAX_CHANNELS ? "on a URI without connections"
								   : "is out of range");
	mf = calloc(1, sizeof(*mf));
	if (!mf || !(mf->ch = calloc(n, sizeof(*mf->ch)))) {
		free(mf);
		return vfm_error_set(err, -ENOMEM, "out of memory");
	}
	mf->m = m;
	mf->n = n;
	mf->main_fd = main_fd;
	mf->timeout_ms = p->timeout_ms;
	mf->max_queued = p->max_queued_buffers_size ? p->max_queued_buffers_size : 64ull << 20;
	pthread_mutex_init(&mf->lock, NULL);
	pthread_cond_init(&mf->cond, NULL);
	m->mf_dst = mf;
	*out = mf;
	for (unsigned i = 0; i < n; i++) {
		mf->ch[i].mf = mf;
		mf->ch[i].idx = i;
		mf->ch[i].fd = -1;
	}
	for (unsigned i = 0; i < n; i++)
		if ((ret = accept_channel(mf, l, id, err)))
			return ret;
	for (unsigned i = 0; i < m->ndevs; i++) {
		struct vfm_mf_devq *q = &mf->q[i];

		q->mf = mf;
		q->md = m->devs[i];
		q->md->mfq = q;
		q->md->mf_use = true;    /* may load over multifd; the source decides */
		atomic_store(&q->md->mf_out_of_order, 0);
		atomic_store(&q->md->mf_queue_waits, 0);
		if ((ret = vfm_thread_create(&q->thread, NULL, loader_main, q)))
			return vfm_error_set(err, -ret, "starting a multifd load thread");
		q->started = true;
	}
	for (unsigned i = 0; i < n; i++) {
		if ((ret = vfm_thread_create(&mf->ch[i].thread, NULL, reader_main, &mf->ch[i])))
			return vfm_error_set(err, -ret, "starting a multifd reader thread");
		mf->ch[i].started = true;
	}
	pthread_mutex_lock(&m->lock);
	m->stats.multifd_channels = n;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

int vfm__mf_dst_dev_end(struct vfm_mig_device *md, uint32_t total, struct vfm_error *err)
{
	struct vfm_mf_dst *mf = md->m->mf_dst;
	struct vfm_mf_devq *q = md->mfq;
	struct timespec ts;
	int ret = 0;

	if (!mf || !q)
		return vfm_error_set(err, VFM_ESTREAM, "%s: multifd end marker without multifd "
				     "channels", vfm_device_id(md->dev));
	pthread_mutex_lock(&mf->lock);
	if (q->total_known || total > MF_MAX_IDX || total < q->next) {
		pthread_mutex_unlock(&mf->lock);
		return vfm_error_set(err, VFM_ESTREAM, "%s: bad multifd end marker (%u packets)",
				     vfm_device_id(md->dev), total);
	}
	q->total = total;
	q->total_known = true;
	pthread_cond_broadcast(&mf->cond);
	for (uint32_t last = q->next;;) {
		if (mf->fail_code) {
			ret = vfm_error_set(err, mf->fail_code, "%s", mf->fail.msg);
			break;
		}
		if (q->done)
			break;
		if (q->head && q->head->idx >= total) {
			ret = vfm_error_set(err, VFM_ESTREAM, "%s: multifd packet %u beyond the end (%u)",
					    vfm_device_id(md->dev), q->head->idx, total);
			break;
		}
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += (time_t)(mf->timeout_ms / 1000) + 1;
		if (pthread_cond_timedwait(&mf->cond, &mf->lock, &ts) == ETIMEDOUT) {
			if (q->next == last) {
				ret = vfm_error_set(err, -ETIMEDOUT, "%s: multifd buffer %u did not come "
						    "within %" PRIu64 " ms", vfm_device_id(md->dev),
						    q->next, mf->timeout_ms);
				break;
			}
			last = q->next;
		}
	}
	pthread_mutex_unlock(&mf->lock);
	return ret;
}

/*
 * With mf->lock held: waits until every channel k applied the RAM packets
 * that counts (u32 n, then n x u32, little endian) gives it, as long as
 * packets keep coming. 0: all in; -ETIMEDOUT: none applied for idle_ms;
 * 1: a channel failed (mf->fail_code), or with at_stop the channels stop.
 * Channels wake it when they reach their count (mf->ram_want); progress
 * short of that is seen when idle_ms runs out.
 */
static int wait_ram_counts(struct vfm_mf_dst *mf, const unsigned char *counts,
			   uint64_t idle_ms, bool at_stop);

static int wait_ram_applied(struct vfm_mf_dst *mf, const unsigned char *counts,
			    uint64_t idle_ms, bool at_stop)
{
	int ret;

	mf->ram_want = counts;
	ret = wait_ram_counts(mf, counts, idle_ms, at_stop);
	mf->ram_want = NULL;
	return ret;
}

static int wait_ram_counts(struct vfm_mf_dst *mf, const unsigned char *counts,
			   uint64_t idle_ms, bool at_stop)
{
	uint64_t last = UINT64_MAX;
	bool timed_out = false;
	struct timespec ts;

	for (;;) {
		/* Device packets loaded count as progress: a channel whose
		 * reader waits for room (wait_for_room) carries its RAM packets
		 * once the load threads made it. */
		uint64_t applied = mf->loaded;
		bool all = true;

		if (mf->fail_code || (at_stop && mf->stop))
			return 1;
		for (unsigned k = 0; k < mf->n; k++) {
			applied += mf->ch[k].ram_next;
			all = all && mf->ch[k].ram_next >= vfm_get_le32(counts + 4 + 4 * k);
		}
		if (all)
			return 0;
		if (timed_out && applied == last)
			return -ETIMEDOUT;
		if (applied != last) {
			last = applied;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += (time_t)(idle_ms / 1000);
			ts.tv_nsec += (long)(idle_ms % 1000) * 1000000L;
			if (ts.tv_nsec >= 1000000000L) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000L;
			}
		}
		timed_out = pthread_cond_timedwait(&mf->cond, &mf->lock, &ts) == ETIMEDOUT;
		mf->m->mf_ram_wakeups++;
	}
}

int vfm__mf_dst_ram_end(struct vfm_mf_dst *mf, const void *pl, size_t len, struct vfm_error *err)
{
	const unsigned char *b = pl;
	uint32_t n;
	int ret = 0;

	if (!mf)
		return vfm_error_set(err, VFM_ESTREAM, "ram: multifd end marker without multifd "
				     "channels");
	n = len >= 4 ? vfm_get_le32(b) : 0;
	if (len < 4 || n != mf->n || len != 4 + 4 * (size_t)n)
		return vfm_error_set(err, VFM_ESTREAM, "ram: bad multifd end marker (%zu bytes, "
				     "%u channels; %u here)", len, n, mf->n);
	pthread_mutex_lock(&mf->lock);
	if (mf->ram_end) {
		pthread_mutex_unlock(&mf->lock);
		return vfm_error_set(err, VFM_ESTREAM, "ram: a second multifd end marker");
	}
	for (unsigned k = 0; k < n; k++) {
		struct dchan *c = &mf->ch[k];

		c->ram_total = vfm_get_le32(b + 4 + 4 * k);
		c->ram_total_known = true;
		if (c->ram_next > c->ram_total) {
			ret = vfm_error_set(err, VFM_ESTREAM, "ram: channel %u applied %u RAM packets, "
					    "the end marker says %u", k, c->ram_next, c->ram_total);
			break;
		}
	}
	mf->ram_end = true;
	pthread_cond_broadcast(&mf->cond);
	/* The sync: nothing goes on (EOS, LOADED, the guest) before every page
	 * sent on a channel is in guest memory. */
	if (!ret) {
		ret = wait_ram_applied(mf, b, (mf->timeout_ms / 1000 + 1) * 1000, false);
		if (ret == -ETIMEDOUT) {
			for (unsigned k = 0; k < n; k++)
				if (mf->ch[k].ram_next != mf->ch[k].ram_total) {
					vfm_error_set(err, -ETIMEDOUT, "ram: channel %u applied %u of %u "
						      "RAM packets, no progress in %" PRIu64 " ms",
						      k, mf->ch[k].ram_next, mf->ch[k].ram_total,
						      mf->timeout_ms);
					break;
				}
		} else if (ret) {
			ret = vfm_error_set(err, mf->fail_code, "%s", mf->fail.msg);
		}
	}
	pthread_mutex_unlock(&mf->lock);
	return ret;
}

void vfm__mf_dst_wait_ram(struct vfm_mf_dst *mf, const unsigned char *counts, size_t len)
{
	uint32_t n;

	if (!mf || len < 4 || (n = vfm_get_le32(counts)) != mf->n || len != 4 + 4 * (size_t)n)
		return;
	pthread_mutex_lock(&mf->lock);
	/* Shorter than the source's own wait for the PONG (timeout_ms). */
	(void)wait_ram_applied(mf, counts, mf->timeout_ms / 4 ? mf->timeout_ms / 4 : 1, true);
	pthread_mutex_unlock(&mf->lock);
}

void vfm__mf_dst_switchover(struct vfm_mf_dst *mf)
{
	if (!mf)
		return;
	pthread_mutex_lock(&mf->lock);
	mf->switched = true;
	pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
}

int vfm__mf_dst_error(struct vfm_mf_dst *mf, struct vfm_error *err)
{
	int ret = 0;

	if (!mf)
		return 0;
	pthread_mutex_lock(&mf->lock);
	if (mf->fail_code)
		ret = vfm_error_set(err, mf->fail_code, "%s", mf->fail.msg);
	pthread_mutex_unlock(&mf->lock);
	return ret;
}

int vfm__mf_dst_check(struct vfm_mf_dst *mf, struct vfm_error *err)
{
	int ret = vfm__mf_dst_error(mf, err);

	if (ret || !mf)
		return ret;
	pthread_mutex_lock(&mf->lock);
	for (unsigned i = 0; i < mf->m->ndevs && !ret; i++)
		if (mf->q[i].got_any && !mf->q[i].done)
			ret = vfm_error_set(err, VFM_ESTREAM, "%s: multifd buffers but no end marker",
					    vfm_device_id(mf->q[i].md->dev));
	/* A source with channels always ends its RAM pass with the marker, even
	 * when no page went over them: without it, packets may be missing. */
	if (!ret && !mf->ram_end)
		ret = vfm_error_set(err, VFM_ESTREAM, "ram: multifd channels but no RAM end marker "
				    "(%u packets on channel 0)", mf->ch[0].ram_next);
	pthread_mutex_unlock(&mf->lock);
	return ret;
}

unsigned vfm__mf_dst_nchannels(const struct vfm_mf_dst *mf)
{
	return mf ? mf->n : 0;
}

void vfm__mf_dst_stop(struct vfm_mf_dst *mf)
{
	if (!mf)
		return;
	pthread_mutex_lock(&mf->lock);
	mf->stop = true;
	pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
}

void vfm__mf_dst_close(struct vfm_mf_dst *mf)
{
	if (!mf)
		return;
	vfm__mf_dst_stop(mf);
	for (unsigned i = 0; i < mf->n; i++) {
		if (mf->ch[i].fd >= 0)
			shutdown(mf->ch[i].fd, SHUT_RDWR);
		if (mf->ch[i].started)
			pthread_join(mf->ch[i].thread, NULL);
		vfm_stream_free(mf->ch[i].s);
		if (mf->ch[i].fd >= 0)
			close(mf->ch[i].fd);
	}
	for (unsigned i = 0; i < mf->m->ndevs; i++) {
		struct vfm_mf_devq *q = &mf->q[i];

		if (q->started)
			pthread_join(q->thread, NULL);
		while (q->head) {
			struct pkt *p = q->head;
			q->head = p->next;
			free(p);
		}
		if (q->md) {
			q->md->mfq = NULL;
			q->md->mf_use = false;
		}
	}
	mf->m->mf_dst = NULL;
	pthread_cond_destroy(&mf->cond);
	pthread_mutex_destroy(&mf->lock);
	free(mf->ch);
	free(mf);
}
