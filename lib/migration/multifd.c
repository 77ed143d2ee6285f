/*
 * Multifd device state, source and destination: extra channels with a
 * handshake, a save thread per device feeding indexed packets to the least
 * busy channel, reader threads per channel and an in-order load thread per
 * device on the destination. Format and rules: docs/multifd.md.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "migration/multifd.h"
#include "util/logging.h"
#include "util/thread.h"

#define LOG "multifd"
#define MF_BUF (1u << 20)            /* device data per packet (QEMU: 1 MiB) */
#define MF_MAX_IDX (1u << 24)        /* 16 TiB of state at 1 MiB: beyond is bogus */
#define MF_KEEPALIVE_S 1             /* a PAD on main while the save threads run */

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* ======================================================================== */
/* Source                                                                    */

struct mf_chan {
	pthread_mutex_t lock;        /* one packet at a time on the stream */
	int fd;
	struct vfm_stream *s;
	uint32_t ram_seq;            /* guarded by lock: MF_RAM packets sent */
};

struct mf_saver {
	struct vfm_mf_src *mf;
	struct vfm_mig_device *md;
	pthread_t thread;
	bool started;
	bool release;                /* under mf->lock: end unused, main sends the device's data */
	uint32_t packets;            /* written once the thread ended */
	int ret;
	struct vfm_error err;
};

struct vfm_mf_src {
	struct vfm_migration *m;
	unsigned n;
	struct mf_chan *ch;
	struct mf_saver sv[VFM_MAX_DEVICES];
	unsigned nsv;
	uint64_t timeout_ms;
	atomic_uint rr;
	_Atomic uint64_t bytes;      /* written on the channels, headers included */
	atomic_bool stop;
	pthread_mutex_t lock;        /* guards stop_now, stopped, go */
	pthread_cond_t cond;
	bool stop_now;               /* the switchover: savers stop their devices */
	unsigned stopped;            /* savers done with STOP_COPY (ok or not) */
	unsigned released;           /* savers released unused (vfm__mf_src_release) */
	unsigned ended;              /* savers whose thread function returned */
	bool go;
};

static void *saver_main(void *arg);

/*
 * One save thread per device on the channels, started with the channels and
 * parked until the switchover: created there, a thread cost the downtime its
 * creation and first run (0.2-0.25 ms of a 0.4-0.5 ms device stop, traced
 * on this 2-CPU host), where waking a parked one costs a wakeup.
 */
static int start_savers(struct vfm_mf_src *mf, struct vfm_error *err)
{
	struct vfm_migration *m = mf->m;
	int ret;

	for (unsigned i = 0; i < m->ndevs; i++) {
		struct mf_saver *w;

		if (!m->devs[i]->mf_use)
			continue;
		w = &mf->sv[mf->nsv++];
		w->mf = mf;
		w->md = m->devs[i];
		if ((ret = vfm_thread_create(&w->thread, NULL, saver_main, w))) {
			mf->nsv--;
			return vfm_error_set(err, -ret, "starting a multifd save thread");
		}
		w->started = true;
	}
	return 0;
}

static bool dev_wants_multifd(struct vfm_mig_device *md, enum vfm_onoff mig,
			      bool have_channels, struct vfm_error *err, int *ret)
{
	enum vfm_onoff v = md->props.multifd_transfer != VFM_AUTO ? md->props.multifd_transfer : mig;

	*ret = 0;
	md->mf_forced = v == VFM_ON;
	if (v == VFM_ON && !have_channels)
		*ret = vfm_error_set(err, -EINVAL, "%s: multifd-transfer=on needs multifd channels "
				     "(a tcp: or unix: URI and multifd-channels > 0)",
				     vfm_device_id(md->dev));
	return v != VFM_OFF && have_channels;
}

int vfm__mf_src_open(struct vfm_migration *m, const struct vfm_uri *uri,
		     const struct vfm_migration_params *p, struct vfm_stream *main,
		     struct vfm_mf_src **out, struct vfm_error *err)
{
	/* file: and fd: carry one stream: channels fall back to 0 (docs/multifd.md). */
	unsigned n = vfm_uri_has_return_path(uri) ? p->multifd_channels : 0;
	struct vfm_mf_src *mf;
	unsigned char buf[16];
	uint64_t id = 0;
	unsigned users = 0;
	int ret;

	*out = NULL;
	if (n > VFM_MF_MAX_CHANNELS)
		return vfm_error_set(err, -EINVAL, "multifd-channels %u: at most %u", n,
				     VFM_MF_MAX_CHANNELS);
	for (unsigned i = 0; i < m->ndevs; i++) {
		m->devs[i]->mf_use = dev_wants_multifd(m->devs[i], p->multifd_transfer, n > 0, err, &ret);
		if (ret)
			return ret;
		users += m->devs[i]->mf_use;
	}
	/* With no device on them the channels still carry the stop-copy RAM
	 * pass: n > 0 on a socket URI is enough. */
	if (!n)
		return 0;
	mf = calloc(1, sizeof(*mf));
	if (!mf || !(mf->ch = calloc(n, sizeof(*mf->ch)))) {
		free(mf);
		return vfm_error_set(err, -ENOMEM, "out of memory");
	}
	mf->m = m;
	mf->timeout_ms = p->timeout_ms;
	pthread_mutex_init(&mf->lock, NULL);
	pthread_cond_init(&mf->cond, NULL);
	for (unsigned i = 0; i < n; i++) {
		pthread_mutex_init(&mf->ch[i].lock, NULL);
		mf->ch[i].fd = -1;
	}
	mf->n = n;
	pthread_mutex_lock(&m->lock);
	m->mf_src = mf;
	pthread_mutex_unlock(&m->lock);
	*out = mf;
	if (getrandom(&id, sizeof(id), 0) != sizeof(id))
		id = vfm__now_ns() ^ (uint64_t)getpid() << 32;
	vfm_put_le64(buf, id);
	vfm_put_le32(buf + 8, n);
	vfm_stream_put_record(main, VFM_REC_MF_CHANNELS, 0, 0, buf, 12);
	vfm_stream_flush(main);
	if ((ret = vfm_stream_error(main, err)))
		return ret;
	for (unsigned i = 0; i < n; i++) {
		struct mf_chan *c = &mf->ch[i];
		int fd;

		ret = vfm_connect_mig(uri, p, &m->cancel, &fd, err);
		if (ret)
			return vfm_error_set(err, ret, "multifd channel %u", i);
		pthread_mutex_lock(&m->lock);
		c->fd = fd;
		pthread_mutex_unlock(&m->lock);
		if ((ret = vfm_stream_open(fd, (int)p->timeout_ms, &c->s, err)))
			return ret;
		vfm_stream_write_header(c->s);
		vfm_put_le64(buf, id);
		vfm_put_le32(buf + 8, i);
		vfm_put_le32(buf + 12, n);
		vfm_stream_put_record(c->s, VFM_REC_MF_HELLO, 0, 0, buf, 16);
		vfm_stream_flush(c->s);
		if ((ret = vfm_stream_error(c->s, err)))
			return vfm_error_set(err, ret, "multifd channel %u", i);
	}
	pthread_mutex_lock(&m->lock);
	m->stats.multifd_channels = n;
	pthread_mutex_unlock(&m->lock);
	if ((ret = start_savers(mf, err)))
		return ret;
	vfm_info(LOG, "%u channels: stop-copy RAM and %u device(s) send over them", n, users);
	return 0;
}

/* Least busy channel: the first one free, else the next in turn (waiting). */
static struct mf_chan *take_channel(struct vfm_mf_src *mf)
{
	unsigned start = atomic_fetch_add(&mf->rr, 1) % mf->n;

	for (unsigned k = 0; k < mf->n; k++) {
		struct mf_chan *c = &mf->ch[(start + k) % mf->n];

		if (!pthread_mutex_trylock(&c->lock))
			return c;
	}
	pthread_mutex_lock(&mf->ch[start].lock);
	return &mf->ch[start];
}

static int send_packet(struct mf_saver *w, uint32_t idx, uint32_t flags, const void *data,
		       size_t len)
{
	unsigned char hdr[VFM_MF_PKT_HDR];
	struct iovec iov[2] = { { hdr, sizeof(hdr) }, { (void *)data, len } };
	struct mf_chan *c = take_channel(w->mf);
	int ret;

	vfm_put_le32(hdr, VFM_MF_VERSION);
	vfm_put_le32(hdr + 4, idx);
	vfm_put_le32(hdr + 8, flags);
	vfm_stream_put_recordv(c->s, VFM_REC_MF_DEV_STATE, 0, vfm__vfio_section(w->md), iov,
			       len ? 2 : 1);
	vfm_stream_flush(c->s);
	ret = vfm_stream_error(c->s, &w->err);
	pthread_mutex_unlock(&c->lock);
	if (!ret) {
		uint64_t wire = len + VFM_MF_PKT_HDR + sizeof(struct vfm_rec_hdr);

		atomic_fetch_add(&w->md->transferred, wire);
		atomic_fetch_add(&w->md->mf_sent, wire);
		atomic_fetch_add(&w->mf->bytes, wire);
	}
	return ret;
}

static int save_data(struct mf_saver *w)
{
	struct vfm_mig_device *md = w->md;
	uint64_t deadline = vfm__now_ns() + w->mf->timeout_ms * 1000000ull;
	unsigned char *buf = malloc(MF_BUF);
	uint32_t idx = 0;
	ssize_t n;
	int ret = 0;

	if (!buf)
		return vfm_error_set(&w->err, -ENOMEM, "out of memory");
	for (;;) {
		if (atomic_load(&w->mf->stop) || atomic_load(&w->mf->m->cancel)) {
			ret = vfm_error_set(&w->err, VFM_ECANCELED, "migration cancelled");
			break;
		}
		n = vfm_device_read_data(md->dev, buf, MF_BUF, &w->err);
		if (n > 0) {
			if ((ret = send_packet(w, idx++, 0, buf, (size_t)n)))
				break;
			deadline = vfm__now_ns() + w->mf->timeout_ms * 1000000ull;
			continue;
		}
		if (n == 0)
			break;
		if ((n == -EAGAIN || n == -ENOMSG) && vfm__now_ns() < deadline) {
			sleep_ms(1);
			continue;
		}
		ret = vfm_error_set(&w->err, (int)n, "reading stop-copy data");
		break;
	}
	/* Config space as read before STOP_COPY (saver_main). */
	if (!ret && md->cfg_len)
		ret = send_packet(w, idx++, VFM_MF_FLAG_CONFIG, md->cfg, md->cfg_len);
	free(buf);
	w->packets = idx;
	return ret;
}

static void *saver_main(void *arg)
{
	struct mf_saver *w = arg;
	struct vfm_mf_src *mf = w->mf;
	enum vfm_state st;
	bool go, now, release;

	pthread_mutex_lock(&mf->lock);
	while (!mf->stop_now && !atomic_load(&mf->stop) && !w->release)
		pthread_cond_wait(&mf->cond, &mf->lock);
	now = mf->stop_now && !atomic_load(&mf->stop);
	release = w->release;
	pthread_mutex_unlock(&mf->lock);
	if (!now || release) {
		/* The migration ended before its switchover, or main sends
		 * this device's data (vfm__mf_src_release, before the guest
		 * stops: this thread ends outside the downtime, and the
		 * device stop does not wait for it). */
		if (!release)
			w->ret = vfm_error_set(&w->err, VFM_ECANCELED, "stopped before the switchover");
		pthread_mutex_lock(&mf->lock);
		mf->stopped += !release;
		mf->ended++;
		pthread_cond_broadcast(&mf->cond);
		pthread_mutex_unlock(&mf->lock);
		return NULL;
	}
	st = vfm_device_state(w->md->dev);
	/* Config space before the arc: STOP_COPY may refuse region access. */
	w->ret = vfm__vfio_snapshot_config(w->md, &w->err);
	if (!w->ret) {
		w->ret = vfm_device_set_state(w->md->dev, VFM_STATE_STOP_COPY, st, &w->err);
		if (w->ret)
			vfm_error_set(&w->err, w->ret, "to STOP_COPY");
	}
	pthread_mutex_lock(&mf->lock);
	mf->stopped++;
	pthread_cond_broadcast(&mf->cond);
	while (!mf->go && !atomic_load(&mf->stop))
		pthread_cond_wait(&mf->cond, &mf->lock);
	go = mf->go && !atomic_load(&mf->stop);
	pthread_mutex_unlock(&mf->lock);
	if (!w->ret && go)
		w->ret = save_data(w);
	else if (!w->ret)
		w->ret = vfm_error_set(&w->err, VFM_ECANCELED, "stopped before sending");
	if (w->ret)
		atomic_store(&mf->stop, true);  /* the others stop at their next packet */
	pthread_mutex_lock(&mf->lock);
	mf->ended++;
	pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
	return NULL;
}

int vfm__mf_src_stop_devices(struct vfm_mf_src *mf, struct vfm_error *err)
{
	pthread_mutex_lock(&mf->lock);
	mf->stop_now = true;
	pthread_cond_broadcast(&mf->cond);
	while (mf->stopped < mf->nsv - mf->released)
		pthread_cond_wait(&mf->cond, &mf->lock);
	pthread_mutex_unlock(&mf->lock);
	for (unsigned i = 0; i < mf->nsv; i++)
		if (mf->sv[i].ret)
			return vfm_error_set(err, mf->sv[i].ret, "%s: %s",
					     vfm_device_id(mf->sv[i].md->dev), mf->sv[i].err.msg);
	return 0;
}

void vfm__mf_src_release(struct vfm_mf_src *mf, struct vfm_mig_device *md)
{
	pthread_mutex_lock(&mf->lock);
	for (unsigned i = 0; i < mf->nsv; i++)
		if (mf->sv[i].md == md && !mf->sv[i].release) {
			mf->sv[i].release = true;
			mf->released++;
		}
	pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
	md->mf_use = false;
}

void vfm__mf_src_go(struct vfm_mf_src *mf)
{
	pthread_mutex_lock(&mf->lock);
	mf->go = true;
	pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
}

static void join_savers(struct vfm_mf_src *mf)
{
	for (unsigned i = 0; i < mf->nsv; i++) {
		if (mf->sv[i].started)
			pthread_join(mf->sv[i].thread, NULL);
		mf->sv[i].started = false;
	}
}

/*
 * Waits for the save threads. Main carries nothing meanwhile, and the
 * destination gives up on a main channel silent for its timeout even while
 * the channels make progress: a PAD record every second keeps main alive
 * through a long stop-copy (a slow device, seconds of state).
 */
static void wait_savers(struct vfm_mf_src *mf, struct vfm_stream *main)
{
	unsigned started = 0;
	unsigned char none = 0;

	for (unsigned i = 0; i < mf->nsv; i++)
		started += mf->sv[i].started;
	pthread_mutex_lock(&mf->lock);
	while (mf->ended < started) {
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += MF_KEEPALIVE_S;
		if (pthread_cond_timedwait(&mf->cond, &mf->lock, &ts) != ETIMEDOUT)
			continue;
		pthread_mutex_unlock(&mf->lock);
		vfm_stream_put_record(main, VFM_REC_PAD, 0, 0, &none, 0);
		vfm_stream_flush(main);
		pthread_mutex_lock(&mf->lock);
	}
	pthread_mutex_unlock(&mf->lock);
	join_savers(mf);
}

int vfm__mf_src_finish(struct vfm_mf_src *mf, struct vfm_stream *main, struct vfm_error *err)
{
	unsigned char pl[4];
	int ret;

	wait_savers(mf, main);
	for (unsigned i = 0; i < mf->nsv; i++)
		if (mf->sv[i].ret)
			return vfm_error_set(err, mf->sv[i].ret, "%s: multifd: %s",
					     vfm_device_id(mf->sv[i].md->dev), mf->sv[i].err.msg);
	/* Every channel must be whole: a dead one may hold nothing of ours yet. */
	for (unsigned i = 0; i < mf->n; i++)
		if ((ret = vfm_stream_error(mf->ch[i].s, err)))
			return vfm_error_set(err, ret, "multifd channel %u", i);
	for (unsigned i = 0; i < mf->nsv; i++) {
		if (mf->sv[i].release)
			continue;   /* its data went on main: no end marker */
		vfm_put_le32(pl, mf->sv[i].packets);
		vfm_stream_put_record(main, VFM_REC_DATA, VFM__DEV_MF_END,
				      vfm__vfio_section(mf->sv[i].md), pl, sizeof(pl));
	}
	return vfm_stream_error(main, err);
}

/* Under m->lock (cancel): unblock every channel write. */
void vfm__mf_src_shutdown(struct vfm_mf_src *mf)
{
	atomic_store(&mf->stop, true);
	for (unsigned i = 0; i < mf->n; i++)
		if (mf->ch[i].fd >= 0)
			shutdown(mf->ch[i].fd, SHUT_RDWR);
}

void vfm__mf_src_close(struct vfm_mf_src *mf)
{
	struct vfm_migration *m;

	if (!mf)
		return;
	m = mf->m;
	pthread_mutex_lock(&mf->lock);
	if (!mf->go)
		atomic_store(&mf->stop, true);
	pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
	join_savers(mf);
	pthread_mutex_lock(&m->lock);
	m->mf_src = NULL;
	pthread_mutex_unlock(&m->lock);
	for (unsigned i = 0; i < mf->n; i++) {
		vfm_stream_free(mf->ch[i].s);
		if (mf->ch[i].fd >= 0)
			close(mf->ch[i].fd);
		pthread_mutex_destroy(&mf->ch[i].lock);
	}
	pthread_cond_destroy(&mf->cond);
	pthread_mutex_destroy(&mf->lock);
	free(mf->ch);
	free(mf);
}

uint64_t vfm__mf_src_bytes(struct vfm_mf_src *mf)
{
	return mf ? atomic_load(&mf->bytes) : 0;
}

struct vfm_mf_src *vfm__mf_src_of(struct vfm_migration *m)
{
	struct vfm_mf_src *mf;

	pthread_mutex_lock(&m->lock);
	mf = m->mf_src;
	pthread_mutex_unlock(&m->lock);
	return mf;
}

unsigned vfm__mf_src_savers(struct vfm_mf_src *mf)
{
	unsigned n;

	if (!mf)
		return 0;
	pthread_mutex_lock(&mf->lock);
	n = mf->nsv - mf->ended;   /* every saver counted in nsv was started */
	pthread_mutex_unlock(&mf->lock);
	return n;
}

unsigned vfm__mf_src_nchannels(const struct vfm_mf_src *mf)
{
	return mf ? mf->n : 0;
}

int vfm__mf_src_put_ram(struct vfm_mf_src *mf, unsigned chan, const void *batch,
			const void *pages, size_t plen, struct vfm_error *err)
{
	struct mf_chan *c = &mf->ch[chan];
	unsigned char hdr[VFM_MF_PKT_HDR];
	struct iovec iov[3] = { { hdr, sizeof(hdr) }, { (void *)batch, VFM_MF_RAM_BATCH },
				{ (void *)pages, plen } };
	size_t bytes = sizeof(struct vfm_rec_hdr) + VFM_MF_PKT_HDR + VFM_MF_RAM_BATCH + plen;
	int ret;

	pthread_mutex_lock(&c->lock);
	vfm_put_le32(hdr, VFM_MF_VERSION);
	vfm_put_le32(hdr + 4, c->ram_seq);
	vfm_put_le32(hdr + 8, 0);
	/* No flush per packet: the stream sends once its buffer is full, or a
	 * device packet on this channel flushes it, or the pass ends. */
	vfm_stream_put_recordv(c->s, VFM_REC_MF_RAM, 0, VFM_MF_RAM_SECTION, iov, plen ? 3 : 2);
	ret = vfm_stream_error(c->s, err);
	if (!ret)
		c->ram_seq++;
	pthread_mutex_unlock(&c->lock);
	if (ret)
		return vfm_error_set(err, ret, "multifd channel %u", chan);
	atomic_fetch_add(&mf->bytes, bytes);
	return 0;
}

int vfm__mf_src_flush(struct vfm_mf_src *mf, unsigned chan, struct vfm_error *err)
{
	struct mf_chan *c = &mf->ch[chan];
	int ret;

	pthread_mutex_lock(&c->lock);
	vfm_stream_flush(c->s);
	ret = vfm_stream_error(c->s, err);
	pthread_mutex_unlock(&c->lock);
	return ret ? vfm_error_set(err, ret, "multifd channel %u", chan) : 0;
}

uint32_t vfm__mf_src_ram_packets(struct vfm_mf_src *mf, unsigned chan)
{
	uint32_t n;

	pthread_mutex_lock(&mf->ch[chan].lock);
	n = mf->ch[chan].ram_seq;
	pthread_mutex_unlock(&mf->ch[chan].lock);
	return n;
}

bool vfm__mf_src_stopping(struct vfm_mf_src *mf)
{
	return atomic_load(&mf->stop) || atomic_load(&mf->m->cancel);
}

void vfm__mf_src_fail(struct vfm_mf_src *mf)
{
	atomic_store(&mf->stop, true);
}

int vfm__mf_src_channel_fd(struct vfm_migration *m, unsigned idx)
{
	int fd = -1;

	pthread_mutex_lock(&m->lock);
	if (m->mf_src && idx < m->mf_src->n)
		fd = m->mf_src->ch[idx].fd;
	pthread_mutex_unlock(&m->lock);
	return fd;
}

void vfm__multifd_set_test_delay(struct vfm_migration *m, int chan, unsigned ms)
{
	m->mf_delay_chan = chan;
	m->mf_delay_ms = ms;
}

void vfm__multifd_set_test_ram_delay(struct vfm_migration *m, int chan, unsigned ms)
{
	m->mf_ram_delay_chan = chan;
	m->mf_ram_delay_ms = ms;
}
