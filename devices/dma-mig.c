/*
 * The dma device's migration stream: saving (every page once, then the pages
 * changed since they were sent, then BAR2's window, the registers and a
 * trailer with the state checksum) and loading (each record checked as it arrives, pages written in
 * place, the registers applied only when the whole stream proved valid).
 * Format: docs/devices/dma.md.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <xxhash.h>
/*
 * The page hashes run at the CPU's best (AVX2/AVX-512) where libxxhash has
 * run-time dispatch, as the stream's checksums do (lib/meson.build): the
 * destination hashes every page it loads right after copying it (in cache:
 * 25 GB/s dispatched against ~9 through the plain SSE2 entry points on this
 * machine's CPUs), the largest cost of the destination device, and a device
 * hashes all its memory at start (docs/performance.md, device-state hops).
 * Same values either way.
 */
#if defined(__x86_64__) && defined(__has_include)
#if __has_include(<xxh_x86dispatch.h>)
#include <xxh_x86dispatch.h>
#endif
#endif

#include "dma-priv.h"
#include "util/bitmap.h"
#include "util/logging.h"
#include "vfiomig/vfu_server.h"

void *dmadev_mem_alloc(uint64_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

void dmadev_mem_free(void *p, uint64_t size)
{
	if (p)
		munmap(p, size);
}

_Static_assert(sizeof(((struct dmadev_load *)0)->small) >= sizeof(struct dmadev_regs) &&
	       sizeof(((struct dmadev_load *)0)->small) >= sizeof(struct dmadev_rec_header) &&
	       sizeof(((struct dmadev_load *)0)->small) >= sizeof(struct dmadev_rec_end),
	       "every non-page payload fits the small buffer");

/*
 * Over a digest of the page hashes rather than the memory: the source
 * computes it at the end of stop-copy and the destination at RESUMING ->
 * STOP, both inside the downtime, where hashing 128 MiB of memory cost ~15 ms
 * each, and hashing the page hashes themselves grew with the state (256 KiB
 * for 128 MiB, 8 MiB for 4 GiB: ~1 ms a side). The digest is kept as pages
 * change (dmadev_page_hash_set), so this costs the same at any size.
 */
uint64_t dmadev_state_hash(const struct vfm_dmadev *dev, const uint8_t *win,
			   const struct dmadev_regs *regs)
{
	uint64_t h = XXH3_64bits_withSeed(&dev->mem_digest, sizeof(dev->mem_digest), dev->npages);

	h = XXH3_64bits_withSeed(win, DMADEV_WIN_SIZE, h);
	return XXH3_64bits_withSeed(regs, sizeof(*regs), h);
}

/*
 * Page p's part of the digest: its hash mixed with its index (splitmix64's
 * finaliser), so that a page's content at another index, or two pages
 * swapped, change the sum. A sum, not a hash over the array, so that one
 * page's change updates it in O(1); a corrupted page still changes it but
 * for a 2^-64 chance.
 */
static uint64_t dmadev_page_mix(uint64_t p, uint64_t h)
{
	uint64_t z = h + (p + 1) * 0x9e3779b97f4a7c15ull;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

void dmadev_page_hash_set(struct vfm_dmadev *dev, uint64_t p, uint64_t h)
{
	dev->mem_digest += dmadev_page_mix(p, h) - dmadev_page_mix(p, dev->page_hash[p]);
	dev->page_hash[p] = h;
}

void dmadev_hash_all(struct vfm_dmadev *dev)
{
	dev->mem_digest = 0;
	for (uint64_t p = 0; p < dev->npages; p++) {
		dev->page_hash[p] = XXH3_64bits(dev->mem + p * DMADEV_PAGE, DMADEV_PAGE);
		dev->mem_digest += dmadev_page_mix(p, dev->page_hash[p]);
	}
}

static void dmadev_mem_dirty_locked(struct vfm_dmadev *dev, uint64_t off, uint64_t len);

void dmadev_page_rehash(struct vfm_dmadev *dev, uint64_t p)
{
	dmadev_page_hash_set(dev, p, XXH3_64bits(dev->mem + p * DMADEV_PAGE, DMADEV_PAGE));
}

void dmadev_mem_written_locked(struct vfm_dmadev *dev, uint64_t off, uint64_t len)
{
	if (!len)
		return;
	for (uint64_t p = off / DMADEV_PAGE; p <= (off + len - 1) / DMADEV_PAGE; p++)
		dmadev_page_rehash(dev, p);
	dmadev_mem_dirty_locked(dev, off, len);
}

/*
 * A record's checksum, seeded with its header. A PAGE record's covers the
 * page's XXH3-64 (content), not the page again: the source has it already
 * (dev->page_hash) and the destination computes it once, to check the record
 * and to keep its own page hash: one hash per page on the wire, not three.
 */
static uint64_t rec_csum(const struct dmadev_rec *h, const void *payload, const uint64_t *content)
{
	uint64_t seed = XXH3_64bits(h, offsetof(struct dmadev_rec, csum));

	if (content)
		return XXH3_64bits_withSeed(content, sizeof(*content), seed);
	return XXH3_64bits_withSeed(payload, h->len, seed);
}

/* ------------------------------------------------------------------------ */
/* Saving                                                                    */

/*
 * Pages not sent yet go out with their latest contents anyway; only pages
 * already sent need to be sent again.
 */
static void dmadev_mem_dirty_locked(struct vfm_dmadev *dev, uint64_t off, uint64_t len)
{
	struct dmadev_save *s = &dev->save;
	uint64_t first, last;

	if (!s->active || !len)
		return;
	first = off / DMADEV_PAGE;
	last = (off + len - 1) / DMADEV_PAGE;
	if (last >= s->cursor)
		last = s->cursor ? s->cursor - 1 : 0;
	for (uint64_t p = first; p <= last && p < s->cursor; p++) {
		if (!vfm_bitmap_test(s->dirty, p)) {
			vfm_bitmap_set_atomic(s->dirty, p);
			s->ndirty++;
		}
	}
}

int dmadev_save_open_locked(struct vfm_dmadev *dev)
{
	struct dmadev_save *s = &dev->save;
	uint64_t *dirty = calloc(VFM_BITMAP_WORDS(dev->npages), sizeof(uint64_t));

	if (!dirty)
		return -ENOMEM;
	free(s->dirty);
	*s = (struct dmadev_save){ .active = true, .dirty = dirty };
	return 0;
}

void dmadev_save_close_locked(struct vfm_dmadev *dev)
{
	free(dev->save.dirty);
	dev->save = (struct dmadev_save){ 0 };
}

static void rec_build(struct dmadev_save *s, uint16_t type, uint64_t arg, const void *payload,
		      uint32_t len, const uint64_t *content, enum dmadev_rec_kind kind)
{
	struct dmadev_rec h = {
		.magic = DMADEV_REC_MAGIC, .type = type, .version = DMADEV_STREAM_VERSION,
		.len = len, .seq = s->seq++, .arg = arg,
	};

	uint8_t *out = s->direct ? s->direct : s->rec;

	h.csum = rec_csum(&h, payload, content);
	memcpy(out, &h, sizeof(h));
	memcpy(out + sizeof(h), payload, len);
	s->rec_len = sizeof(h) + len;
	/* Built in the reader's buffer: already read out. */
	s->rec_off = s->direct ? s->rec_len : 0;
	s->rec_kind = kind;
}

/* The next record in stream order; false when there is none for now. */
static bool next_record_locked(struct vfm_dmadev *dev)
{
	struct dmadev_save *s = &dev->save;

	if (!s->header_done) {
		struct dmadev_rec_header h = { .mem_size = dev->mem_size,
					       .page_size = DMADEV_PAGE, .source = dev->instance };

		rec_build(s, DMADEV_REC_HEADER, 0, &h, sizeof(h), NULL, KIND_INITIAL);
		s->header_done = true;
		return true;
	}
	if (s->cursor < dev->npages) {
		rec_build(s, DMADEV_REC_PAGE, s->cursor, dev->mem + s->cursor * DMADEV_PAGE,
			  DMADEV_PAGE, &dev->page_hash[s->cursor], KIND_INITIAL);
		s->cursor++;
		return true;
	}
	if (s->ndirty) {
		uint64_t p = s->scan;

		/* ndirty > 0 guarantees a set bit; scan round from where we were. */
		while (!vfm_bitmap_test(s->dirty, p))
			p = p + 1 == dev->npages ? 0 : p + 1;
		__atomic_fetch_and(&s->dirty[p / 64], ~(1ull << (p % 64)), __ATOMIC_RELAXED);
		s->ndirty--;
		s->scan = p + 1 == dev->npages ? 0 : p + 1;
		rec_build(s, DMADEV_REC_PAGE, p, dev->mem + p * DMADEV_PAGE, DMADEV_PAGE,
			  &dev->page_hash[p], KIND_DIRTY);
		return true;
	}
	if (!s->stop)
		return false;
	/* Small and changed without our knowing (clients map it): whole, once. */
	if (!s->win_done) {
		memcpy(s->win, dev->win, DMADEV_WIN_SIZE);
		rec_build(s, DMADEV_REC_WINDOW, 0, s->win, DMADEV_WIN_SIZE, NULL, KIND_FINAL);
		s->win_done = true;
		return true;
	}
	if (!s->regs_done) {
		rec_build(s, DMADEV_REC_REGS, 0, &dev->regs, sizeof(dev->regs), NULL, KIND_FINAL);
		s->regs_done = true;
		return true;
	}
	if (!s->end_done) {
		struct dmadev_rec_end e = {
			.records = s->seq,
			.checksum = dmadev_state_hash(dev, s->win, &dev->regs),
		};

		rec_build(s, DMADEV_REC_END, 0, &e, sizeof(e), NULL, KIND_FINAL);
		s->end_done = true;
		return true;
	}
	return false;
}

static void sleep_us(uint64_t us)
{
	struct timespec ts = { .tv_sec = (time_t)(us / 1000000), .tv_nsec = (long)(us % 1000000) * 1000 };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

/* Emulated firmware: save_latency_us per MiB read, paid as we go. */
static void save_delay(struct vfm_dmadev *dev, size_t n)
{
	uint64_t us;

	if (!dev->save_latency_us || !n)
		return;
	dev->save.latency_acc += (uint64_t)n * dev->save_latency_us;
	us = dev->save.latency_acc >> 20;
	dev->save.latency_acc &= (1u << 20) - 1;
	if (us)
		sleep_us(us);
}

ssize_t dmadev_read_data(struct vfm_vfu_ctx *ctx, void *buf, size_t len)
{
	struct vfm_dmadev *dev = vfm_vfu_priv(ctx);
	struct dmadev_save *s = &dev->save;
	size_t n = 0;
	uint64_t ms = 0, trickle_ms;
	bool active, trickle_gave;

	pthread_mutex_lock(&dev->lock);
	active = s->active;
	trickle_ms = s->trickle_ms;
	trickle_gave = s->trickle_gave;
	s->trickle_gave = false;
	pthread_mutex_unlock(&dev->lock);
	if (!active)
		return -EINVAL;
	/*
	 * Trickle: the server calls us until the request is full; one byte per
	 * request, then "nothing now" ends it (a short reply, not the end). Every
	 * request is answered in time, yet stop-copy lasts bytes x ms.
	 */
	if (trickle_gave)
		return -ENOMSG;
	if (dmadev_fault(dev, DMADEV_FAULT_READ, 0, 0, NULL))
		return -EIO;
	if (dmadev_fault(dev, DMADEV_FAULT_STALL, 0, 0, &ms))
		sleep_us(ms * 1000);
	if (trickle_ms) {
		sleep_us(trickle_ms * 1000);
		if (len > 1)
			len = 1;
	}
	pthread_mutex_lock(&dev->lock);
	if (!s->active) {
		pthread_mutex_unlock(&dev->lock);
		return -EINVAL;
	}
	while (n < len) {
		size_t take;

		if (s->rec_off == s->rec_len) {
			bool got;

			/*
			 * Room for the largest record: build it in place, one copy
			 * of each page less than through s->rec (docs/performance.md,
			 * device-state hops).
			 */
			s->direct = len - n >= sizeof(s->rec) ? (uint8_t *)buf + n : NULL;
			got = next_record_locked(dev);
			s->direct = NULL;
			if (!got)
				break;
			if (s->rec_off == s->rec_len) {
				n += s->rec_len;
				continue;
			}
		}
		take = s->rec_len - s->rec_off < len - n ? s->rec_len - s->rec_off : len - n;
		memcpy((uint8_t *)buf + n, s->rec + s->rec_off, take);
		s->rec_off += take;
		n += take;
	}
	if (trickle_ms && n)
		s->trickle_gave = true;
	pthread_mutex_unlock(&dev->lock);
	save_delay(dev, n);
	return (ssize_t)n;
}

static uint64_t rec_left(const struct dmadev_save *s, enum dmadev_rec_kind kind)
{
	return s->rec_kind == kind ? s->rec_len - s->rec_off : 0;
}

static uint64_t initial_left_locked(const struct vfm_dmadev *dev)
{
	const struct dmadev_save *s = &dev->save;

	return (s->header_done ? 0 : DMADEV_HEADER_REC) +
	       (dev->npages - s->cursor) * DMADEV_PAGE_REC + rec_left(s, KIND_INITIAL);
}

static uint64_t dirty_left_locked(const struct vfm_dmadev *dev)
{
	return dev->save.ndirty * DMADEV_PAGE_REC + rec_left(&dev->save, KIND_DIRTY);
}

int dmadev_precopy_info(struct vfm_vfu_ctx *ctx, uint64_t *initial, uint64_t *dirty)
{
	struct vfm_dmadev *dev = vfm_vfu_priv(ctx);

	pthread_mutex_lock(&dev->lock);
	*initial = initial_left_locked(dev);
	*dirty = dirty_left_locked(dev);
	pthread_mutex_unlock(&dev->lock);
	if (dmadev_fault(dev, DMADEV_FAULT_SIZE, 0, 0, NULL)) {
		*initial /= 16;
		*dirty /= 16;
	}
	return 0;
}

/* Exact: what STOP_COPY would read if the device stopped now. */
int dmadev_stop_copy_size(struct vfm_vfu_ctx *ctx, uint64_t *bytes)
{
	struct vfm_dmadev *dev = vfm_vfu_priv(ctx);
	const struct dmadev_save *s = &dev->save;

	pthread_mutex_lock(&dev->lock);
	if (s->active)
		*bytes = initial_left_locked(dev) + dirty_left_locked(dev) +
			 (s->win_done ? 0 : DMADEV_WIN_REC) + (s->regs_done ? 0 : DMADEV_REGS_REC) +
			 (s->end_done ? 0 : DMADEV_END_REC) +
			 rec_left(s, KIND_FINAL);
	else
		*bytes = DMADEV_HEADER_REC + dev->npages * DMADEV_PAGE_REC + DMADEV_WIN_REC +
			 DMADEV_REGS_REC + DMADEV_END_REC;
	pthread_mutex_unlock(&dev->lock);
	if (dmadev_fault(dev, DMADEV_FAULT_SIZE, 0, 0, NULL))
		*bytes /= 16;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Loading                                                                   */

/*
 * Pages load straight into device memory, as a real device's firmware state
 * would: a staging copy cost the destination a first touch of mem_size bytes
 * inside every migration (on these hosts ~3 s per GiB, most of the time of a
 * 1 GiB device-state migration). The device's old memory has no value once
 * it is RESUMING; a stream that proves bad leaves it partly overwritten (the
 * registers untouched) until a whole stream comes.
 */
int dmadev_load_open(struct vfm_dmadev *dev)
{
	struct dmadev_load *l = &dev->load;

	dmadev_load_close(dev);
	l->stage = dev->mem;
	l->active = true;
	return 0;
}

void dmadev_load_close(struct vfm_dmadev *dev)
{
	dev->load = (struct dmadev_load){ 0 };
}

/* Forgets what arrived so far; the stage is reused for a fresh stream. */
static void load_restart(struct vfm_dmadev *dev)
{
	uint8_t *stage = dev->load.stage;

	dev->load = (struct dmadev_load){ .active = true, .stage = stage };
}

static int load_fail(struct vfm_dmadev *dev, const char *fmt, ...) VFM_PRINTF(2, 3);

/* Records the first reason the stream is bad; returns VFM_ESTREAM. */
static int load_fail(struct vfm_dmadev *dev, const char *fmt, ...)
{
	struct dmadev_load *l = &dev->load;
	va_list ap;

	if (l->error)
		return l->error;
	l->error = VFM_ESTREAM;
	va_start(ap, fmt);
	vsnprintf(l->why, sizeof(l->why), fmt, ap);
	va_end(ap);
	vfm_warn(dev->id, "bad migration stream at byte %" PRIu64 ": %s", l->bytes, l->why);
	return l->error;
}

/* A record header is complete: check it and say where its payload goes. */
static int load_header(struct vfm_dmadev *dev)
{
	struct dmadev_load *l = &dev->load;
	const struct dmadev_rec *h = &l->hdr;
	static const uint32_t sizes[] = {
		[DMADEV_REC_HEADER] = sizeof(struct dmadev_rec_header),
		[DMADEV_REC_PAGE] = DMADEV_PAGE,
		[DMADEV_REC_REGS] = sizeof(struct dmadev_regs),
		[DMADEV_REC_END] = sizeof(struct dmadev_rec_end),
		[DMADEV_REC_WINDOW] = DMADEV_WIN_SIZE,
	};

	if (h->magic != DMADEV_REC_MAGIC || h->version != DMADEV_STREAM_VERSION)
		return load_fail(dev, "record %" PRIu32 ": magic %#" PRIx32 " version %u",
				 l->seq, h->magic, (unsigned)h->version);
	if (h->type < DMADEV_REC_HEADER || h->type > DMADEV_REC_MAX || h->len != sizes[h->type])
		return load_fail(dev, "record %" PRIu32 ": type %u with %" PRIu32 " bytes", l->seq,
				 (unsigned)h->type, h->len);
	if (h->seq != l->seq)
		return load_fail(dev, "record %" PRIu32 " arrived as number %" PRIu32, h->seq, l->seq);
	if (l->have_end)
		return load_fail(dev, "record %" PRIu32 " after the end", h->seq);
	if ((h->type == DMADEV_REC_HEADER) != (l->seq == 0))
		return load_fail(dev, "record %" PRIu32 ": the stream must start with one HEADER",
				 h->seq);
	if (h->type == DMADEV_REC_PAGE) {
		if (h->arg >= dev->npages)
			return load_fail(dev, "page %" PRIu64 " beyond %" PRIu64, h->arg, dev->npages);
		l->dst = l->stage + h->arg * DMADEV_PAGE;
	} else if (h->type == DMADEV_REC_WINDOW) {
		l->dst = l->win;
	} else {
		l->dst = l->small;
	}
	l->need = h->len;
	l->got = 0;
	return 0;
}

/* A payload is complete: check its checksum and apply it to the stage. */
static int load_record(struct vfm_dmadev *dev)
{
	struct dmadev_load *l = &dev->load;
	const struct dmadev_rec *h = &l->hdr;
	struct dmadev_rec_header sh;
	struct dmadev_rec_end e;
	uint64_t content = 0;

	if (h->type == DMADEV_REC_PAGE)
		content = XXH3_64bits(l->dst, DMADEV_PAGE);
	if (rec_csum(h, l->dst, h->type == DMADEV_REC_PAGE ? &content : NULL) != h->csum)
		return load_fail(dev, "record %" PRIu32 " (type %u): checksum mismatch", h->seq,
				 (unsigned)h->type);
	l->seq++;
	switch (h->type) {
	case DMADEV_REC_HEADER:
		memcpy(&sh, l->small, sizeof(sh));
		if (sh.mem_size != dev->mem_size || sh.page_size != DMADEV_PAGE)
			return load_fail(dev, "state of %" PRIu64 " bytes in %" PRIu32
					 "-byte pages, this device has %" PRIu64, sh.mem_size,
					 sh.page_size, dev->mem_size);
		l->have_header = true;
		break;
	case DMADEV_REC_PAGE:
		/* In place already (l->stage is the memory), checksum good. */
		dmadev_page_hash_set(dev, h->arg, content);
		break;
	case DMADEV_REC_WINDOW:
		/* Already in l->win, applied at commit. */
		l->have_win = true;
		break;
	case DMADEV_REC_REGS:
		memcpy(&l->regs, l->small, sizeof(l->regs));
		l->have_regs = true;
		break;
	case DMADEV_REC_END:
		memcpy(&e, l->small, sizeof(e));
		if (!l->have_regs || !l->have_win || e.records != h->seq)
			return load_fail(dev, "end after %" PRIu32 " records claims %" PRIu64
					 "%s%s", h->seq, e.records, l->have_regs ? "" : ", no registers",
					 l->have_win ? "" : ", no window");
		if (dmadev_state_hash(dev, l->win, &l->regs) != e.checksum)
			return load_fail(dev, "state checksum mismatch: pages missing or stale");
		l->have_end = true;
		break;
	}
	return 0;
}

/* Takes every byte (the protocol wants that); errors wait for RESUMING -> STOP. */
ssize_t dmadev_write_data(struct vfm_vfu_ctx *ctx, const void *buf, size_t len)
{
	struct vfm_dmadev *dev = vfm_vfu_priv(ctx);
	struct dmadev_load *l = &dev->load;
	const uint8_t *p = buf;
	size_t left = len;

	if (!l->active)
		return -EINVAL;
	if (dmadev_fault(dev, DMADEV_FAULT_WRITE, 0, 0, NULL))
		return -EIO;
	while (left && !l->error) {
		size_t take;

		if (l->hdr_got < sizeof(l->hdr)) {
			take = sizeof(l->hdr) - l->hdr_got < left ? sizeof(l->hdr) - l->hdr_got : left;
			memcpy((uint8_t *)&l->hdr + l->hdr_got, p, take);
			l->hdr_got += take;
			if (l->hdr_got == sizeof(l->hdr))
				load_header(dev);
		} else {
			take = l->need - l->got < left ? l->need - l->got : left;
			memcpy(l->dst + l->got, p, take);
			l->got += take;
			if (l->got == l->need) {
				load_record(dev);
				l->hdr_got = 0;
			}
		}
		p += take;
		left -= take;
		l->bytes += take;
	}
	return (ssize_t)len;
}

/*
 * RESUMING -> STOP: the loaded registers take effect only if the stream was
 * whole and valid; otherwise the arc fails and the device waits for a fresh
 * stream.
 */
int dmadev_load_commit(struct vfm_dmadev *dev)
{
	struct dmadev_load *l = &dev->load;

	if (!l->active)
		return 0;
	if (l->error || !l->have_end) {
		if (!l->error)
			vfm_warn(dev->id, "migration stream incomplete: %" PRIu32 " records, %" PRIu64
				 " bytes, no end", l->seq, l->bytes);
		load_restart(dev);
		return -EINVAL;
	}
	pthread_mutex_lock(&dev->lock);
	dev->regs = l->regs;
	dev->regs.status &= DMADEV_STATUS_HALTED;
	memcpy(dev->win, l->win, DMADEV_WIN_SIZE);
	pthread_mutex_unlock(&dev->lock);
	vfm_info(dev->id, "loaded %" PRIu32 " records (%" PRIu64 " bytes)", l->seq, l->bytes);
	dmadev_load_close(dev);
	return 0;
}
