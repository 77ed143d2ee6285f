/*
 * The RAM savable: sends dirty guest pages in batches of contiguous pages,
 * zero runs compactly, and loads them into the destination's guest memory.
 *
 * DATA payload: u64 gpa, u32 npages, u32 flags, then npages pages unless
 * flags has RAM_ZERO. The first DATA record (RAM_LAYOUT) lists the regions
 * so the destination can refuse a guest of another shape.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "memory_access.h"
#include "migration/engine.h"
#include "migration/multifd.h"
#include "util/bitmap.h"
#include "util/logging.h"
#include "util/thread.h"

#define RAM_ZERO   (1u << 0)
#define RAM_LAYOUT (1u << 1)
#define RAM_HDR 16
/* Pages per record: 1 MiB of 4 KiB pages, the size device data uses too. */
#define RAM_BATCH_PAGES 256

struct vfm_ram {
	struct vfm_migration *m;
	struct vfm_guest_mem *mem;
	uint64_t page_size;
	/* Migration thread only: pages to send, collected from the dirty bitmaps. */
	uint64_t *send[VFM_MEM_MAX_REGIONS];
	uint64_t send_pages;
	unsigned cur_region;
	uint64_t cur_page;
	/* Per region, since the last sync: pages [lo, hi) are all hole (never
	 * written: zero without reading them) or hold data (read to test). */
	struct ram_extent {
		uint64_t lo, hi;
		bool valid, hole;
	} ext[VFM_MEM_MAX_REGIONS];
	/* The pages of one record, copied out of guest memory first: the guest
	 * may write them while they are checksummed and sent. */
	unsigned char *bounce;
	bool guest_stopped;   /* in save_complete: pages cannot change, no bounce */
	uint64_t bounce_ns;   /* time spent copying to the bounce (precopy_only_ns) */
	_Atomic uint64_t transferred;
	_Atomic uint64_t mf_transferred;  /* part of transferred that used the channels */
	int chan_ret;                      /* migration thread: a channel write failed */
	struct vfm_error chan_err;
	/* Destination, per region: pages known to read zero, so a zero run over
	 * them needs no work (vfm__ram_dst_learn_holes). A channel thread only
	 * touches its own chunks' bits: a chunk is 4 whole words (check_chunk). */
	uint64_t *known_zero[VFM_MEM_MAX_REGIONS];
	_Atomic uint64_t zero_read;     /* bytes of zero runs read to test them */
	_Atomic uint64_t zero_known;    /* pages of zero runs known zero: no work */
};

int vfm__register_ram(struct vfm_migration *m, const struct vfm_savable_ops *ops, void *opaque,
		      struct vfm_error *err);

/* The guest may be writing the page: see memory_access.h. */
static bool page_is_zero(const void *p, uint64_t size)
{
	return vfm__guest_is_zero(p, (size_t)size);
}

void vfm__ram_sync(struct vfm_ram *ram)
{
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(ram->mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);
		uint64_t before = vfm_bitmap_weight(ram->send[i], VFM_BITMAP_WORDS(r->npages));

		vfm_dirty_collect(ram->mem, i, ram->send[i]);
		ram->send_pages += vfm_bitmap_weight(ram->send[i], VFM_BITMAP_WORDS(r->npages)) - before;
		/* What was a hole may hold data now: ask again this round. */
		ram->ext[i].valid = false;
	}
}

/*
 * Whether page p of region ri is a hole of its memfd (SEEK_DATA/SEEK_HOLE),
 * so zero without being read: reading a hole of a memfd allocates the page,
 * which on a fresh 256 MiB guest cost the source ~400 ms and 256 MiB. The
 * answer may go stale during a round, and that is safe: the extents are
 * learnt after the sync, so a write that made a hole into data either came
 * before (and is seen) or is marked dirty after it (and is sent next round).
 * Swapped-out pages count as data.
 */
static bool page_is_hole(struct vfm_ram *ram, unsigned ri, const struct vfm_mem_region *r,
			 uint64_t p)
{
	struct ram_extent *e = &ram->ext[ri];
	uint64_t ps = ram->page_size;
	off_t off, d, h;

	if (r->fd < 0)
		return false;
	if (e->valid && p >= e->lo && p < e->hi)
		return e->hole;
	off = (off_t)(r->fd_offset + p * ps);
	d = lseek(r->fd, off, SEEK_DATA);
	if (d < 0 && errno == ENXIO) {
		*e = (struct ram_extent){ p, r->npages, true, true };   /* hole to the end */
	} else if (d < 0) {
		e->valid = false;                                      /* no SEEK_DATA: read */
		return false;
	} else if (d >= off + (off_t)ps) {
		/* Whole pages before the one holding d are hole. */
		*e = (struct ram_extent){ p, ((uint64_t)d - r->fd_offset) / ps, true, true };
	} else {
		h = lseek(r->fd, off, SEEK_HOLE);
		if (h < 0) {
			e->valid = false;
			return false;
		}
		/* Every page that holds a byte of [off, h) is data. */
		*e = (struct ram_extent){ p, ((uint64_t)h - r->fd_offset + ps - 1) / ps, true, false };
		if (e->hi <= p)
			e->hi = p + 1;
	}
	if (e->hi > r->npages)
		e->hi = r->npages;
	return e->hole;
}

/* Zero test for the main channel's sender (the migration thread only). */
static bool page_zero(struct vfm_ram *ram, unsigned ri, const struct vfm_mem_region *r, uint64_t p)
{
	return page_is_hole(ram, ri, r, p) ||
	       page_is_zero((const char *)r->host + p * ram->page_size, ram->page_size);
}

uint64_t vfm__ram_transferred(struct vfm_ram *ram)
{
	return ram ? atomic_load(&ram->transferred) : 0;
}

uint64_t vfm__ram_mf_transferred(struct vfm_ram *ram)
{
	return ram ? atomic_load(&ram->mf_transferred) : 0;
}

static int ram_save_setup(void *opaque, struct vfm_stream *s, struct vfm_error *err)
{
	struct vfm_ram *ram = opaque;
	unsigned n = vfm_guest_mem_num_regions(ram->mem);
	unsigned char buf[RAM_HDR + 8 + VFM_MEM_MAX_REGIONS * 16];
	size_t len = RAM_HDR + 8;

	vfm_put_le64(buf, 0);
	vfm_put_le32(buf + 8, n);
	vfm_put_le32(buf + 12, RAM_LAYOUT);
	vfm_put_le64(buf + 16, ram->page_size);
	for (unsigned i = 0; i < n; i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);
		vfm_put_le64(buf + len, r->gpa);
		vfm_put_le64(buf + len + 8, r->size);
		len += 16;
	}
	/* This migration's figures (a cancelled one before may have sent RAM,
	 * over channels this one may not have). */
	atomic_store(&ram->transferred, 0);
	atomic_store(&ram->mf_transferred, 0);
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, buf, len);
	/*
	 * What the trackers collected before this migration is covered by the
	 * first pass: taken now (one dirty sync: the VM's log, the vfio-user
	 * clients' logs of DMA_WRITE messages, the device logs just started),
	 * into the bitmaps that are about to become the send set, so that the
	 * first sync after the pass holds only what was written during it.
	 * QEMU's ram_save_setup does the same (memory_global_dirty_log_start,
	 * then a migration_bitmap_sync, with the bitmap all set). Left in KVM,
	 * the log since the guest booted (its whole working set) came back at
	 * the first exact check and, with a limit it fitted, went in
	 * stop-copy: a 4 MiB working set rewritten at 4 MiB/s sent 3.6 MB
	 * twice, 1.2 ms of a 1.6 ms downtime (docs/performance.md section 8).
	 */
	if (ram->m)
		vfm__log_sync(ram->m, true);
	/* Every page is to send, from the first iteration on (QEMU sets the
	 * whole bitmap in ram_save_setup): the send set does not wait for a
	 * dirty sync, which may not come soon while a device is busy. */
	vfm_dirty_mark_all(ram->mem);
	vfm__ram_sync(ram);
	ram->cur_region = 0;
	ram->cur_page = 0;
	ram->chan_ret = 0;
	vfm_error_clear(&ram->chan_err);
	return vfm_stream_error(s, err);
}

/*
 * Puts one run on the wire: on main, or, when multifd channels exist, on the
 * channel its 1 MiB chunk maps to (chunk c of a region -> channel c mod n,
 * the stop-copy pass's mapping too). A page thus always travels on the same
 * channel, in order, and no version of it can overtake another: no per-round
 * flush is needed. Returns the bytes, 0 after a channel error (ram->chan_ret).
 */
static uint64_t put_run(struct vfm_ram *ram, struct vfm_stream *s, struct vfm_mf_src *mf,
			uint64_t chunk, const unsigned char *hdr, const void *pages, uint64_t plen)
{
	uint64_t rec = sizeof(struct vfm_rec_hdr) + RAM_HDR + plen;
	unsigned n = vfm__mf_src_nchannels(mf);

	if (n) {
		if ((ram->chan_ret = vfm__mf_src_put_ram(mf, (unsigned)(chunk % n), hdr, pages,
							 (size_t)plen, &ram->chan_err)))
			return 0;
		rec += VFM_MF_PKT_HDR;
		atomic_fetch_add(&ram->mf_transferred, rec);
	} else if (plen) {
		struct iovec iov[2] = { { (void *)hdr, RAM_HDR }, { (void *)pages, plen } };

		vfm_stream_put_recordv(s, VFM_REC_DATA, 0, 1, iov, 2);
	} else {
		vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, hdr, RAM_HDR);
	}
	atomic_fetch_add(&ram->transferred, rec);
	return rec;
}

/* Sends one run of up to RAM_BATCH_PAGES pages (never across a chunk) from
 * the send set; returns bytes put on the wire, 0 when the set is empty or a
 * channel failed. */
static uint64_t send_one_run(struct vfm_ram *ram, struct vfm_stream *s, struct vfm_mf_src *mf)
{
	unsigned n = vfm_guest_mem_num_regions(ram->mem);

	while (ram->send_pages && ram->cur_region < n) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, ram->cur_region);
		uint64_t *set = ram->send[ram->cur_region];
		uint64_t p = ram->cur_page, first, count = 0, end;
		unsigned char hdr[RAM_HDR];
		const char *host;
		bool zero;

		/* Find the next set bit from p. */
		while (p < r->npages && !(set[p / 64] >> (p % 64) & 1)) {
			if ((p % 64) == 0 && !set[p / 64])
				p += 64;
			else
				p++;
		}
		if (p >= r->npages) {
			ram->cur_region++;
			ram->cur_page = 0;
			if (ram->cur_region >= n)
				ram->cur_region = 0;  /* wrap: new bits may sit behind us */
			continue;
		}
		first = p;
		end = (first / RAM_BATCH_PAGES + 1) * RAM_BATCH_PAGES;
		if (end > r->npages)
			end = r->npages;
		host = (const char *)r->host + first * ram->page_size;
		zero = page_zero(ram, ram->cur_region, r, p);
		/* The first page is in the run whatever it holds by now: the guest may
		 * have written it since the test above, and asking again could end
		 * with an empty run (a 0-page record the destination refuses). A page
		 * written after its test is dirty again and goes next round. */
		set[p / 64] &= ~(1ull << (p % 64));
		count = 1;
		p++;
		/* Extend the run over set bits of the same kind (zero or data). */
		while (p < end && (set[p / 64] >> (p % 64) & 1) &&
		       page_zero(ram, ram->cur_region, r, p) == zero) {
			set[p / 64] &= ~(1ull << (p % 64));
			count++;
			p++;
		}
		ram->send_pages -= count;
		ram->cur_page = p;
		vfm_put_le64(hdr, r->gpa + first * ram->page_size);
		vfm_put_le32(hdr + 8, (uint32_t)count);
		vfm_put_le32(hdr + 12, zero ? RAM_ZERO : 0);
		if (zero)
			return put_run(ram, s, mf, first / RAM_BATCH_PAGES, hdr, NULL, 0);
		/* A page the guest writes after this copy is dirty again, and resent.
		 * Once the guest is stopped nothing writes: send from guest memory. */
		if (!ram->guest_stopped) {
			uint64_t t0 = vfm__now_ns();

			vfm__guest_read(ram->bounce, host, count * ram->page_size);
			ram->bounce_ns += vfm__now_ns() - t0;
		}
		return put_run(ram, s, mf, first / RAM_BATCH_PAGES, hdr,
			       ram->guest_stopped ? host : (const char *)ram->bounce,
			       count * ram->page_size);
	}
	return 0;
}

static int ram_save_iterate(void *opaque, struct vfm_stream *s, uint64_t budget,
			    struct vfm_error *err)
{
	struct vfm_ram *ram = opaque;
	struct vfm_mf_src *mf = vfm__mf_src_of(ram->m);
	uint64_t sent = 0, n;

	while (sent < budget && (n = send_one_run(ram, s, mf)) > 0) {
		sent += n;
		if (vfm_stream_error(s, NULL))
			break;
	}
	if (ram->chan_ret) {
		if (err)
			*err = ram->chan_err;
		return ram->chan_ret;
	}
	if (vfm_stream_error(s, err))
		return err ? err->code : -EIO;
	if (ram->send_pages)
		return 0;
	/* A pass is out: what sits in the channels' buffers goes now. */
	for (unsigned k = 0; k < vfm__mf_src_nchannels(mf); k++)
		if ((ram->chan_ret = vfm__mf_src_flush(mf, k, err)))
			return ram->chan_ret;
	return 1;
}

static bool ram_is_active(void *opaque)
{
	return true;
}

static uint64_t ram_pending_estimate(void *opaque)
{
	struct vfm_ram *ram = opaque;

	return (ram->send_pages + vfm_dirty_count(ram->mem)) * ram->page_size;
}

static int ram_pending_exact(void *opaque, uint64_t *pending, struct vfm_error *err)
{
	struct vfm_ram *ram = opaque;

	vfm__ram_sync(ram);
	*pending = ram->send_pages * ram->page_size;
	return 0;
}

/*
 * The stop-copy pass over the multifd channels: worker k sends the 1 MiB
 * chunks k, k + n, k + 2n, ... of every region on channel k. A chunk is
 * RAM_BATCH_PAGES pages, 4 bitmap words: no two workers touch one word.
 * The guest is stopped, so packets point into guest memory (no copy).
 */
struct ram_worker {
	struct vfm_ram *ram;
	struct vfm_mf_src *mf;
	unsigned k, n;
	pthread_t thread;
	bool started;
	uint64_t pages;
	int ret;
	struct vfm_error err;
};

static int send_chunk(struct ram_worker *w, const struct vfm_mem_region *r, uint64_t *set,
		      uint64_t p, uint64_t end)
{
	struct vfm_ram *ram = w->ram;

	while (p < end) {
		unsigned char hdr[RAM_HDR];
		const char *host;
		uint64_t first, count;
		bool zero;
		int ret;

		if (!(set[p / 64] >> (p % 64) & 1)) {
			p = (p % 64) == 0 && !set[p / 64] ? p + 64 : p + 1;
			continue;
		}
		first = p;
		host = (const char *)r->host + first * ram->page_size;
		zero = page_is_zero(host, ram->page_size);
		count = 0;
		while (p < end && (set[p / 64] >> (p % 64) & 1) &&
		       (count == 0 ||
			page_is_zero((const char *)r->host + p * ram->page_size, ram->page_size) == zero)) {
			set[p / 64] &= ~(1ull << (p % 64));
			count++;
			p++;
		}
		vfm_put_le64(hdr, r->gpa + first * ram->page_size);
		vfm_put_le32(hdr + 8, (uint32_t)count);
		vfm_put_le32(hdr + 12, zero ? RAM_ZERO : 0);
		ret = vfm__mf_src_put_ram(w->mf, w->k, hdr, zero ? NULL : host,
					  zero ? 0 : count * ram->page_size, &w->err);
		if (ret)
			return ret;
		w->pages += count;
		atomic_fetch_add(&ram->transferred, sizeof(struct vfm_rec_hdr) + VFM_MF_PKT_HDR +
				 RAM_HDR + (zero ? 0 : count * ram->page_size));
		atomic_fetch_add(&ram->mf_transferred, sizeof(struct vfm_rec_hdr) + VFM_MF_PKT_HDR +
				 RAM_HDR + (zero ? 0 : count * ram->page_size));
	}
	return 0;
}

static void *ram_worker_main(void *arg)
{
	struct ram_worker *w = arg;
	struct vfm_ram *ram = w->ram;

	for (unsigned i = 0; i < vfm_guest_mem_num_regions(ram->mem) && !w->ret; i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);

		for (uint64_t c = w->k; c * RAM_BATCH_PAGES < r->npages; c += w->n) {
			uint64_t p = c * RAM_BATCH_PAGES, end = p + RAM_BATCH_PAGES;

			if (vfm__mf_src_stopping(w->mf)) {
				w->ret = vfm_error_set(&w->err, VFM_ECANCELED, "stopped");
				break;
			}
			if ((w->ret = send_chunk(w, r, ram->send[i], p, end < r->npages ? end : r->npages)))
				break;
		}
	}
	if (!w->ret)
		w->ret = vfm__mf_src_flush(w->mf, w->k, &w->err);
	if (w->ret)
		vfm__mf_src_fail(w->mf);  /* the other senders stop too */
	return NULL;
}

/* The whole send set from this thread, the guest stopped (no bounce copy):
 * on main, or on the channels chunk by chunk (put_run). 0 or an error. */
static int send_all_stopped(struct vfm_ram *ram, struct vfm_stream *s, struct vfm_error *err)
{
	int ret;

	ram->cur_region = 0;
	ram->cur_page = 0;
	ram->guest_stopped = true;
	do {
		ret = ram_save_iterate(ram, s, UINT64_MAX, err);
	} while (ret == 0);
	ram->guest_stopped = false;
	return ret < 0 ? ret : 0;
}

static int complete_on_channels(struct vfm_ram *ram, struct vfm_mf_src *mf, struct vfm_stream *s,
				struct vfm_error *err)
{
	unsigned n = vfm__mf_src_nchannels(mf);
	struct ram_worker *w = calloc(n, sizeof(*w));
	unsigned char *end = malloc(4 + 4 * (size_t)n);
	uint64_t sent = 0;
	int ret = 0;

	if (!w || !end) {
		free(w);
		free(end);
		return vfm_error_set(err, -ENOMEM, "out of memory");
	}
	/* SWITCHOVER (buffered on main) must reach the destination: its readers
	 * apply channel RAM only after it. */
	vfm_stream_flush(s);
	if ((ret = vfm_stream_error(s, err)))
		goto out;
	/*
	 * At most a chunk a channel: this thread puts them on their channels,
	 * as pre-copy does (put_run), and flushes them. A worker would have one
	 * chunk to copy at most, less than its creation and join cost (what
	 * pre-copy leaves is usually a few pages).
	 */
	if (ram->send_pages <= (uint64_t)n * RAM_BATCH_PAGES) {
		if ((ret = send_all_stopped(ram, s, err)))
			goto out;
		goto sync_point;
	}
	for (unsigned k = 0; k < n; k++) {
		w[k] = (struct ram_worker){ .ram = ram, .mf = mf, .k = k, .n = n };
		if ((ret = vfm_thread_create(&w[k].thread, NULL, ram_worker_main, &w[k]))) {
			vfm__mf_src_fail(mf);
			ret = vfm_error_set(err, -ret, "starting a multifd RAM thread");
			break;
		}
		w[k].started = true;
	}
	for (unsigned k = 0; k < n; k++) {
		if (w[k].started)
			pthread_join(w[k].thread, NULL);
		sent += w[k].pages;
	}
	ram->send_pages -= sent < ram->send_pages ? sent : ram->send_pages;
	for (unsigned k = 0; k < n && !ret; k++)
		if (w[k].ret && w[k].ret != VFM_ECANCELED)
			ret = vfm_error_set(err, w[k].ret, "ram over multifd: %s", w[k].err.msg);
	for (unsigned k = 0; k < n && !ret; k++)
		if (w[k].ret)   /* only stopped: another thread's failure, or a cancel */
			ret = vfm_error_set(err, w[k].ret, "ram over multifd: %s", w[k].err.msg);
	if (ret)
		goto out;
sync_point:
	/* The sync point: the destination lets nothing run before every
	 * channel applied exactly this many RAM packets. */
	vfm_put_le32(end, n);
	for (unsigned k = 0; k < n; k++)
		vfm_put_le32(end + 4 + 4 * k, vfm__mf_src_ram_packets(mf, k));
	vfm_stream_put_record(s, VFM_REC_DATA, VFM_MF_RAM_END, VFM_MF_RAM_SECTION, end, 4 + 4 * (size_t)n);
	ret = vfm_stream_error(s, err);
out:
	free(w);
	free(end);
	return ret;
}

static int ram_save_complete(void *opaque, struct vfm_stream *s, struct vfm_error *err)
{
	struct vfm_ram *ram = opaque;
	struct vfm_mf_src *mf = vfm__mf_src_of(ram->m);

	vfm__ram_sync(ram);
	if (vfm__mf_src_nchannels(mf))
		return complete_on_channels(ram, mf, s, err);
	return send_all_stopped(ram, s, err);
}

static void ram_save_cleanup(void *opaque, bool succeeded)
{
	struct vfm_ram *ram = opaque;

	if (!succeeded) {
		/* What was collected but not sent must go next time: back to dirty. */
		vfm_dirty_mark_all(ram->mem);
	}
	for (unsigned i = 0; i < VFM_MEM_MAX_REGIONS && ram->send[i]; i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);
		memset(ram->send[i], 0, VFM_BITMAP_WORDS(r->npages) * sizeof(uint64_t));
	}
	ram->send_pages = 0;
}

static int ram_load_setup(void *opaque, uint32_t version, struct vfm_error *err)
{
	if (version != 1)
		return vfm_error_set(err, VFM_ESTREAM, "ram: unsupported version %u", version);
	return 0;
}

static int load_layout(struct vfm_ram *ram, const unsigned char *p, size_t len, uint32_t n,
		       struct vfm_error *err)
{
	if (len != RAM_HDR + 8 + (size_t)n * 16 || n > VFM_MEM_MAX_REGIONS)
		return vfm_error_set(err, VFM_ESTREAM, "ram: bad layout record");
	if (vfm_get_le64(p + RAM_HDR) != ram->page_size)
		return vfm_error_set(err, VFM_ESTREAM, "ram: page size %" PRIu64 " != ours %" PRIu64,
				     vfm_get_le64(p + RAM_HDR), ram->page_size);
	if (n != vfm_guest_mem_num_regions(ram->mem))
		return vfm_error_set(err, VFM_ESTREAM, "ram: source has %u memory regions, we have %u",
				     n, vfm_guest_mem_num_regions(ram->mem));
	for (uint32_t i = 0; i < n; i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);
		uint64_t gpa = vfm_get_le64(p + RAM_HDR + 8 + i * 16);
		uint64_t size = vfm_get_le64(p + RAM_HDR + 16 + i * 16);
		if (gpa != r->gpa || size != r->size)
			return vfm_error_set(err, VFM_ESTREAM, "ram: source region %u is 0x%" PRIx64
					     "+0x%" PRIx64 ", ours 0x%" PRIx64 "+0x%" PRIx64
					     " (start the destination with the same --mem)",
					     i, gpa, size, r->gpa, r->size);
	}
	return 0;
}

/*
 * Destination: learn which guest pages read zero before the incoming side
 * populates its memory (vfm_guest_mem_prealloc turns holes into zeroed
 * pages). A hole of the memfd (SEEK_HOLE/SEEK_DATA) reads zero; populated,
 * it is a fresh zeroed page. Until the load ends only the RAM load writes
 * guest memory: the vCPUs run after it, and a device in RESUMING is stopped
 * (include/uapi/linux/vfio.h, enum vfio_device_mig_state: no DMA outside
 * RUNNING and PRE_COPY). A data run clears the bits it writes, a zero run
 * sets them. So a zero run over a first pass's never-written pages costs
 * nothing, where it was read whole (256 MiB of zeros on both CPUs, 30-50 ms:
 * docs/performance.md, section 8). QEMU's multifd does the same with its
 * receivedmap (migration/multifd-zero-page.c, multifd_recv_zero_page_process:
 * a page not received yet is zero, only a received one is memset). Memory
 * without a memfd, or a file system without SEEK_HOLE: nothing is known and
 * zero runs are tested as before. Called again for each incoming attempt,
 * so memory a failed attempt wrote is data.
 */
void vfm__ram_dst_learn_holes(struct vfm_ram *ram)
{
	uint64_t ps;

	if (!ram)
		return;
	ps = ram->page_size;
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(ram->mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);
		off_t base = (off_t)r->fd_offset, end = base + (off_t)r->size, off = base;

		memset(ram->known_zero[i], 0, VFM_BITMAP_WORDS(r->npages) * sizeof(uint64_t));
		if (r->fd < 0)
			continue;
		while (off < end) {
			off_t h = lseek(r->fd, off, SEEK_HOLE), d;
			uint64_t p0, p1;

			if (h < 0 || h >= end)
				break;
			d = lseek(r->fd, h, SEEK_DATA);
			if (d < 0 && errno != ENXIO)
				break;
			if (d < 0 || d > end)
				d = end;          /* hole to the end of the file */
			/* Whole pages inside [h, d). */
			p0 = ((uint64_t)(h - base) + ps - 1) / ps;
			p1 = (uint64_t)(d - base) / ps;
			for (uint64_t p = p0; p < p1; p++)
				ram->known_zero[i][p / 64] |= 1ull << (p % 64);
			off = d;
		}
	}
}

/* Bytes of zero runs read to test them, and pages of zero runs known zero
 * (tests: a first pass over a fresh destination reads nothing). */
void vfm__ram_dst_zero_stats(struct vfm_ram *ram, uint64_t *read_bytes, uint64_t *known_pages)
{
	*read_bytes = ram ? atomic_load(&ram->zero_read) : 0;
	*known_pages = ram ? atomic_load(&ram->zero_known) : 0;
}

enum kz_op { KZ_TEST, KZ_SET, KZ_CLEAR };

/*
 * KZ_TEST: whether every page of [gpa, gpa + bytes) is known zero. KZ_SET
 * marks them after a zero run, KZ_CLEAR unmarks them after a data run.
 */
static bool known_zero(struct vfm_ram *ram, uint64_t gpa, uint64_t bytes, enum kz_op op)
{
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(ram->mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);
		uint64_t *bm = ram->known_zero[i], p, n;

		if (gpa < r->gpa || gpa - r->gpa >= r->size)
			continue;
		p = (gpa - r->gpa) / ram->page_size;
		n = bytes / ram->page_size;
		if (p + n > r->npages)
			return false;
		for (uint64_t q = p; q < p + n; q++) {
			uint64_t bit = 1ull << (q % 64);

			if (op == KZ_TEST && !(bm[q / 64] & bit))
				return false;
			if (op == KZ_SET)
				bm[q / 64] |= bit;
			else if (op == KZ_CLEAR)
				bm[q / 64] &= ~bit;
		}
		return op == KZ_TEST;
	}
	return false;
}

/* Whether every page of [p, p + bytes) is resident (mapped memory, no hole). */
static bool resident(void *p, uint64_t bytes)
{
	unsigned char vec[RAM_BATCH_PAGES];
	long pg = sysconf(_SC_PAGESIZE);
	uint64_t n = (bytes + (uint64_t)pg - 1) / (uint64_t)pg;

	if (pg <= 0 || (uintptr_t)p % (uintptr_t)pg || n > sizeof(vec) ||
	    mincore(p, (size_t)bytes, vec))
		return false;
	for (uint64_t i = 0; i < n; i++)
		if (!(vec[i] & 1))
			return false;
	return true;
}

/*
 * Zero runs on the destination. Pages known zero (holes before the
 * destination populated its memory, vfm__ram_dst_learn_holes) need nothing.
 * Other memory the destination preallocated is resident and
 * mostly still zero: check and leave it, as QEMU does, or memset it; never
 * free it, which costs a free now and a fault on the guest's first touch
 * (punching 256 MiB of populated memory kept the destination ~600 ms behind
 * the source). Memory that is not resident is punched out of the memfd: no
 * fault, no allocation (memset of 256 MiB of fresh memfd took ~400 ms), and
 * every mapping of the memfd, a device server's included, reads zeros.
 */
static void zero_pages(struct vfm_ram *ram, uint64_t gpa, void *dst, uint64_t bytes)
{
	if (known_zero(ram, gpa, bytes, KZ_TEST)) {
		atomic_fetch_add(&ram->zero_known, bytes / ram->page_size);
		return;
	}
	if (resident(dst, bytes)) {
		atomic_fetch_add(&ram->zero_read, bytes);
		if (!vfm__guest_is_zero(dst, (size_t)bytes))
			memset(dst, 0, bytes);
		known_zero(ram, gpa, bytes, KZ_SET);
		return;
	}
	known_zero(ram, gpa, bytes, KZ_SET);
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(ram->mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);

		if (r->fd >= 0 && gpa >= r->gpa && gpa - r->gpa + bytes <= r->size &&
		    fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			      (off_t)(r->fd_offset + gpa - r->gpa), (off_t)bytes) == 0)
			return;
	}
	memset(dst, 0, bytes);
}

static int ram_load_state(void *opaque, uint16_t type, uint16_t rflags, const void *buf,
			  size_t len, struct vfm_error *err)
{
	struct vfm_ram *ram = opaque;
	const unsigned char *p = buf;

	if (type != VFM_REC_DATA || (len < RAM_HDR && rflags != VFM_MF_RAM_END))
		return vfm_error_set(err, VFM_ESTREAM, "ram: bad record (type %u, %zu bytes)",
				     type, len);
	if (rflags == VFM_MF_RAM_END)
		return vfm__mf_dst_ram_end(ram->m->mf_dst, buf, len, err);
	if (rflags)
		return vfm_error_set(err, VFM_ESTREAM, "ram: unknown record flags 0x%x", rflags);
	if (vfm_get_le32(p + 12) & RAM_LAYOUT)
		return load_layout(ram, p, len, vfm_get_le32(p + 8), err);
	return vfm__ram_load_batch(ram, buf, len, -1, vfm__mf_dst_nchannels(ram->m->mf_dst), err);
}

/* A channel's batch: inside one chunk of one region, the chunk of this channel. */
static int check_chunk(struct vfm_ram *ram, uint64_t gpa, uint64_t npages, unsigned chan,
		       unsigned nchan, struct vfm_error *err)
{
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(ram->mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(ram->mem, i);
		uint64_t p;

		if (gpa < r->gpa || gpa - r->gpa >= r->size)
			continue;
		p = (gpa - r->gpa) / ram->page_size;
		if (p / RAM_BATCH_PAGES != (p + npages - 1) / RAM_BATCH_PAGES ||
		    (p / RAM_BATCH_PAGES) % nchan != chan)
			return vfm_error_set(err, VFM_ESTREAM, "ram: batch at 0x%" PRIx64 " (%" PRIu64
					     " pages) does not belong on channel %u of %u", gpa,
					     npages, chan, nchan);
		return 0;
	}
	return 0;   /* outside memory: the caller says so */
}

int vfm__ram_load_batch(struct vfm_ram *ram, const void *buf, size_t len, int chan,
			unsigned nchan, struct vfm_error *err)
{
	bool from_channel = chan >= 0;
	size_t wire = len + sizeof(struct vfm_rec_hdr) + (from_channel ? VFM_MF_PKT_HDR : 0);
	const unsigned char *p = buf;
	uint64_t gpa, bytes;
	uint32_t npages, flags;
	void *dst;

	if (len < RAM_HDR)
		return vfm_error_set(err, VFM_ESTREAM, "ram: short batch (%zu bytes)", len);
	gpa = vfm_get_le64(p);
	npages = vfm_get_le32(p + 8);
	flags = vfm_get_le32(p + 12);
	if (flags & ~RAM_ZERO || !npages || npages > RAM_BATCH_PAGES)
		return vfm_error_set(err, VFM_ESTREAM, "ram: bad batch (flags 0x%x, %u pages)",
				     flags, npages);
	bytes = (uint64_t)npages * ram->page_size;
	if (len != (flags & RAM_ZERO ? RAM_HDR : RAM_HDR + bytes) || gpa % ram->page_size)
		return vfm_error_set(err, VFM_ESTREAM, "ram: batch at 0x%" PRIx64 " has %zu bytes "
				     "for %u pages", gpa, len, npages);
	if (!from_channel && nchan)
		return vfm_error_set(err, VFM_ESTREAM, "ram: page batch at 0x%" PRIx64 " on the main "
				     "channel while %u multifd channels carry RAM", gpa, nchan);
	if (from_channel && check_chunk(ram, gpa, npages, (unsigned)chan, nchan, err))
		return VFM_ESTREAM;
	dst = vfm_guest_mem_ptr(ram->mem, gpa, bytes);
	if (!dst)
		return vfm_error_set(err, VFM_ESTREAM, "ram: pages 0x%" PRIx64 "+0x%" PRIx64
				     " outside guest memory", gpa, bytes);
	if (flags & RAM_ZERO) {
		zero_pages(ram, gpa, dst, bytes);
	} else {
		known_zero(ram, gpa, bytes, KZ_CLEAR);
		memcpy(dst, p + RAM_HDR, bytes);
	}
	atomic_fetch_add(&ram->transferred, wire);
	if (from_channel)
		atomic_fetch_add(&ram->mf_transferred, wire);
	return 0;
}

static uint64_t ram_precopy_only_ns(void *opaque)
{
	return ((struct vfm_ram *)opaque)->bounce_ns;
}

static const struct vfm_savable_ops ram_ops = {
	.save_setup = ram_save_setup,
	.is_active_iterate = ram_is_active,
	.save_iterate = ram_save_iterate,
	.pending_estimate = ram_pending_estimate,
	.pending_exact = ram_pending_exact,
	.save_complete = ram_save_complete,
	.save_cleanup = ram_save_cleanup,
	.precopy_only_ns = ram_precopy_only_ns,
	.load_setup = ram_load_setup,
	.load_state = ram_load_state,
};

int vfm__ram_create(struct vfm_migration *m, struct vfm_error *err)
{
	struct vfm_ram *ram = calloc(1, sizeof(*ram));
	int ret;

	if (!ram)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	ram->m = m;
	ram->mem = m->mem;
	ram->page_size = vfm_guest_mem_page_size(m->mem);
	if (ram->page_size * RAM_BATCH_PAGES + RAM_HDR > VFM_STREAM_MAX_RECORD) {
		uint64_t ps = ram->page_size;
		free(ram);
		return vfm_error_set(err, -EINVAL, "ram: page size %" PRIu64 " too large", ps);
	}
	ram->bounce = malloc(ram->page_size * RAM_BATCH_PAGES);
	if (!ram->bounce) {
		free(ram);
		return vfm_error_set(err, -ENOMEM, "out of memory");
	}
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(m->mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(m->mem, i);
		ram->send[i] = calloc(VFM_BITMAP_WORDS(r->npages), sizeof(uint64_t));
		ram->known_zero[i] = calloc(VFM_BITMAP_WORDS(r->npages), sizeof(uint64_t));
		if (!ram->send[i] || !ram->known_zero[i]) {
			vfm__ram_destroy(ram);
			return vfm_error_set(err, -ENOMEM, "out of memory for RAM send bitmaps");
		}
	}
	ret = vfm__register_ram(m, &ram_ops, ram, err);
	if (ret) {
		vfm__ram_destroy(ram);
		return ret;
	}
	m->ram = ram;
	return 0;
}

void vfm__ram_destroy(struct vfm_ram *ram)
{
	if (!ram)
		return;
	for (unsigned i = 0; i < VFM_MEM_MAX_REGIONS; i++) {
		free(ram->send[i]);
		free(ram->known_zero[i]);
	}
	free(ram->bounce);
	free(ram);
}
