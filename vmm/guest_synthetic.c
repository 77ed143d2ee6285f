/*
 * The synthetic guest: vCPU threads that rewrite whole guest pages at a
 * chosen rate and keep, in guest RAM itself, a table of each page's
 * generation. A page's content is a pure function of (page, generation), so
 * after a migration every page can be checked against the table that
 * travelled with it: a lost dirty page shows up as a stale page or a stale
 * table entry. The vCPUs also drive `dma` devices (guest_synth_dma.c), whose
 * DMA writes are checked the same way. Layout: vmm/synth.h.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "util/logging.h"
#include "util/thread.h"
#include "vmm/synth.h"

#define PATTERN_SEED 0x9e3779b97f4a7c15ull
/* One copy through each owned device per this many page writes. */
#define DMA_EVERY 16

static inline uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

/*
 * Word w of page p at generation gen is synth_page_base(p, gen) ^ (w *
 * SYNTH_WORD_MUL): one hash per page, then a cheap function of the word
 * index, so a stale page differs in every word, a torn one where it tore,
 * and the check runs at memory speed (it is part of the destination's
 * downtime). Generation 0 is a zero page.
 */
uint64_t synth_page_base(uint64_t p, uint64_t gen)
{
	return gen ? mix((p << 20) ^ (gen << 40) ^ PATTERN_SEED) | 1 : 0;
}

bool synth_page_matches(const uint64_t *w, uint64_t words, uint64_t p, uint64_t gen,
			uint64_t *bad_word)
{
	uint64_t base = synth_page_base(p, gen), k = 0;

	for (uint64_t i = 0; i < words; i++, k += SYNTH_WORD_MUL) {
		if (w[i] != (gen ? base ^ k : 0)) {
			*bad_word = i;
			return false;
		}
	}
	return true;
}

void synth_mark(struct synth *s, uint64_t gpa, uint64_t len)
{
	vfm_dirty_mark(s->g.mem, gpa, len);
}

static void fill_page(struct synth *s, uint64_t p, uint64_t gen)
{
	uint64_t *w = (uint64_t *)(s->base + p * s->page_size);
	uint64_t base = synth_page_base(p, gen), k = 0;

	for (uint64_t i = 0; i < s->page_size / 8; i++, k += SYNTH_WORD_MUL)
		w[i] = base ^ k;
}

/* One write: page content first, then the table; both marked after. */
static void write_page(struct synth *s, uint64_t p)
{
	uint64_t gen = atomic_load_explicit(&s->table[p], memory_order_relaxed) + 1;

	fill_page(s, p, gen);
	atomic_store_explicit(&s->table[p], gen, memory_order_release);
	synth_mark(s, p * s->page_size, s->page_size);
	synth_mark(s, p * 8, 8);
	atomic_fetch_add_explicit(&s->page_writes, 1, memory_order_relaxed);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *vcpu_main(void *arg)
{
	struct synth_vcpu *v = arg;
	struct synth *s = v->s;
	uint64_t data_pages = s->npages - s->data_start;
	uint64_t mine = (data_pages + s->nvcpus - 1 - v->index) / s->nvcpus;
	/* Each vCPU's share of the rate, in pages per second. */
	double rate = (double)s->dirty_rate / (double)s->page_size / s->nvcpus;
	uint64_t t0 = 0, done = 0;
	double due = 0;

	for (;;) {
		pthread_mutex_lock(&s->lock);
		if (!s->run && !s->quit) {
			s->parked++;
			pthread_cond_broadcast(&s->cond);
			while (!s->run && !s->quit)
				pthread_cond_wait(&s->cond, &s->lock);
			s->parked--;
			t0 = 0;
		}
		if (s->quit) {
			pthread_mutex_unlock(&s->lock);
			return NULL;
		}
		if (v->kick_seen != s->kick) {   /* synth_kick_ns */
			v->kick_seen = s->kick;
			pthread_cond_broadcast(&s->cond);
		}
		pthread_mutex_unlock(&s->lock);

		if (!t0) {
			t0 = now_ns();
			done = 0;
			due = 0;
		}
		/* Pace to the rate: write the pages due by now (64 at most before
		 * looking at the run flag again), then nap. A device copy counts
		 * as a page: it rewrites one. A throttled vCPU (auto-converge)
		 * runs only (100 - pct) percent of the time: it earns its pages
		 * that much slower, as QEMU's cpu_throttle sleeps a vCPU. */
		uint64_t t = now_ns();
		due += rate * (double)(t - t0) / 1e9 * (100 - atomic_load(&s->throttle)) / 100.0;
		t0 = t;
		unsigned batch = 0;

		while ((double)done < due && batch++ < 64) {
			uint64_t k;

			if (s->ndma && ++v->since_dma >= DMA_EVERY) {
				v->since_dma = 0;
				synth_dma_step(s, v);
			}
			v->rng = v->rng * 6364136223846793005ull + 1442695040888963407ull;
			k = (v->rng >> 17) % mine;
			write_page(s, s->data_start + v->index + k * s->nvcpus);
			done++;
		}
		if ((double)done >= due) {
			/* A 1 ms nap on the condition, not in nanosleep: a stop
			 * (broadcast) cuts it short, as a kick takes a vCPU out of
			 * KVM_RUN. Asleep in nanosleep the stop waited out the
			 * rest of the nap: up to 1 ms of the downtime's guest_stop
			 * (0.1-0.5 ms measured in make bench's rows with 8-32
			 * MB/s of dirtying). */
			uint64_t until = now_ns() + 1000000;
			struct timespec ts = { (time_t)(until / 1000000000ull),
					       (long)(until % 1000000000ull) };

			pthread_mutex_lock(&s->lock);
			if (s->run && !s->quit && v->kick_seen == s->kick)
				pthread_cond_timedwait(&s->cond, &s->lock, &ts);
			pthread_mutex_unlock(&s->lock);
		}
	}
}

static void synth_set_throttle(struct vfm_guest *g, unsigned pct)
{
	atomic_store(&((struct synth *)g)->throttle, pct > 99 ? 99 : pct);
}

static int synth_start(struct vfm_guest *g, struct vfm_error *err)
{
	struct synth *s = (struct synth *)g;

	/* Every vCPU is parked here: the superblock cannot change under us. */
	synth_dma_attach(s);
	pthread_mutex_lock(&s->lock);
	s->run = s->dirty_rate > 0;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	g->running = true;
	return 0;
}

static int synth_stop(struct vfm_guest *g)
{
	struct synth *s = (struct synth *)g;
	unsigned live = 0;

	pthread_mutex_lock(&s->lock);
	s->run = false;
	pthread_cond_broadcast(&s->cond);   /* the napping vCPUs */
	for (unsigned i = 0; i < s->nvcpus; i++)
		live += s->vcpu[i].thread_live;
	/* Parked vCPUs are between two page writes: memory is consistent. */
	while (s->parked < live)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	g->running = false;
	return 0;
}

/* Under s->lock: some running vCPU has not seen the last kick. */
static bool kick_pending(const struct synth *s)
{
	for (unsigned i = 0; i < s->nvcpus; i++)
		if (s->vcpu[i].thread_live && s->vcpu[i].kick_seen != s->kick)
			return true;
	return false;
}

/* As synth_stop, up to where the vCPUs would park: each comes back to its
 * run check (after its batch, or woken from its nap) and carries on. */
static uint64_t synth_kick_ns(struct vfm_guest *g)
{
	struct synth *s = (struct synth *)g;
	uint64_t t0 = now_ns(), took = 0;

	pthread_mutex_lock(&s->lock);
	if (s->run && !s->quit) {
		s->kick++;
		pthread_cond_broadcast(&s->cond);
		while (s->run && !s->quit && kick_pending(s))
			pthread_cond_wait(&s->cond, &s->lock);
		took = now_ns() - t0;
	}
	pthread_mutex_unlock(&s->lock);
	return took;
}

static int synth_verify(struct vfm_guest *g, struct vfm_guest_verify *out)
{
	struct synth *s = (struct synth *)g;

	memset(out, 0, sizeof(*out));
	for (uint64_t p = s->data_start; p < s->npages; p++) {
		uint64_t gen = atomic_load(&s->table[p]);
		const uint64_t *w = (const uint64_t *)(s->base + p * s->page_size);

		uint64_t bad;

		out->pages_checked++;
		if (gen & SYNTH_TAG) {
			if (!out->errors)
				snprintf(out->detail, sizeof(out->detail), "data page %" PRIu64
					 " has a DMA tag in the table", p);
			out->errors++;
		} else if (!synth_page_matches(w, s->page_size / 8, p, gen, &bad)) {
			if (!out->errors)
				snprintf(out->detail, sizeof(out->detail),
					 "page %" PRIu64 " word %" PRIu64 ": content is not "
					 "generation %" PRIu64 " (a lost page write)", p, bad, gen);
			out->errors++;
		}
	}
	synth_dma_verify(s, out);
	out->verified = out->errors == 0;
	return 0;
}

/* Pages mincore() is asked about at once (one byte each in the vector). */
#define QUICK_CHUNK 16384u

/*
 * The destination's check inside the downtime: the table (no data page
 * carries a DMA tag) and three words of every data page (first, middle,
 * last). A page of another generation differs in every word, so a lost page
 * write shows here; a torn page needs the full verify. The DMA part is
 * bounded by the devices' target pages and is checked in full.
 *
 * Reading a page the memfd does not hold (the loader punched zero runs out)
 * would allocate it: ~2 us a page, most of a fresh guest. mincore() says
 * which pages the memfd holds; one it does not reads as zeros, which is
 * generation 0, so only those the table says were written are read (and a
 * hole there is a lost page). A page swapped out counts as not held: its
 * table entry 0 is then trusted (the full verify reads it).
 */
static int synth_quick_verify(struct vfm_guest *g, struct vfm_guest_verify *out)
{
	struct synth *s = (struct synth *)g;
	const struct vfm_mem_region *r = vfm_guest_mem_region(g->mem, 0);
	const uint64_t words = s->page_size / 8;
	const uint64_t idx[3] = { 0, words / 2, words - 1 };
	unsigned char vec[QUICK_CHUNK];
	uint64_t chunk_end = 0, chunk_start = 0;
	bool have_vec = false;

	memset(out, 0, sizeof(*out));
	for (uint64_t p = s->data_start; p < s->npages; p++) {
		uint64_t gen = atomic_load_explicit(&s->table[p], memory_order_relaxed);
		const uint64_t *w = (const uint64_t *)(s->base + p * s->page_size);
		uint64_t base = synth_page_base(p, gen);
		unsigned bad = 3;

		if (p >= chunk_end) {
			chunk_start = p;
			chunk_end = p + QUICK_CHUNK < s->npages ? p + QUICK_CHUNK : s->npages;
			have_vec = r->fd >= 0 &&
				   !mincore(s->base + p * s->page_size,
					    (chunk_end - p) * s->page_size, vec);
		}
		if (gen & SYNTH_TAG) {
			if (!out->errors)
				snprintf(out->detail, sizeof(out->detail), "data page %" PRIu64
					 " has a DMA tag in the table", p);
			out->errors++;
			continue;
		}
		if (!gen && have_vec && !(vec[p - chunk_start] & 1))
			continue;   /* a hole: zeros, as generation 0 is */
		for (unsigned k = 0; k < 3 && bad == 3; k++)
			if (w[idx[k]] != (gen ? base ^ (idx[k] * SYNTH_WORD_MUL) : 0))
				bad = k;
		if (bad != 3) {
			if (!out->errors)
				snprintf(out->detail, sizeof(out->detail),
					 "page %" PRIu64 " word %" PRIu64 ": content is not "
					 "generation %" PRIu64 " (a lost page write)", p, idx[bad], gen);
			out->errors++;
		}
	}
	out->pages_checked = s->npages - s->data_start;
	synth_dma_verify(s, out);
	out->verified = out->errors == 0;
	return 0;
}

static void synth_stats(struct vfm_guest *g, struct vfm_guest_stats *st)
{
	struct synth *s = (struct synth *)g;

	st->page_writes = atomic_load(&s->page_writes);
	st->dma_ops = atomic_load(&s->dma_ops);
	st->dma_errors = atomic_load(&s->dma_errors);
}

static void synth_destroy(struct vfm_guest *g)
{
	struct synth *s = (struct synth *)g;

	pthread_mutex_lock(&s->lock);
	s->quit = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	for (unsigned i = 0; i < s->nvcpus; i++)
		if (s->vcpu[i].thread_live)
			pthread_join(s->vcpu[i].thread, NULL);
	pthread_cond_destroy(&s->cond);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

static const struct vfm_guest_ops synth_ops = {
	.kind = "synthetic",
	.start = synth_start,
	.stop = synth_stop,
	.kick_ns = synth_kick_ns,
	.set_throttle = synth_set_throttle,
	.verify = synth_verify,
	.quick_verify = synth_quick_verify,
	.stats = synth_stats,
	.destroy = synth_destroy,
};

int vfm_guest_synthetic_new(struct vfm_guest_mem *mem, const struct vfm_synthetic_opts *o,
			    struct vfm_guest **out, struct vfm_error *err)
{
	const struct vfm_mem_region *r = vfm_guest_mem_region(mem, 0);
	unsigned ndma = o ? o->ndma : 0;
	struct synth *s;
	int ret;

	if (!r || r->gpa != 0)
		return vfm_error_set(err, -EINVAL, "synthetic guest needs memory at address 0");
	if (ndma > SYNTH_MAX_DMA)
		return vfm_error_set(err, -EINVAL, "synthetic guest: at most %d dma devices",
				     SYNTH_MAX_DMA);
	s = calloc(1, sizeof(*s));
	if (!s)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	s->g.ops = &synth_ops;
	s->g.mem = mem;
	s->page_size = vfm_guest_mem_page_size(mem);
	s->npages = r->size / s->page_size;
	s->table_pages = (s->npages * 8 + s->page_size - 1) / s->page_size;
	s->sb_page = s->table_pages;
	s->dma_base = s->sb_page + 1;
	s->data_start = s->dma_base + ndma * (1ull + SYNTH_DMA_TARGETS);
	s->nvcpus = o && o->vcpus ? o->vcpus : 2;
	s->dirty_rate = o ? o->dirty_rate : 0;
	s->base = r->host;
	s->table = (_Atomic uint64_t *)r->host;
	s->sb = (struct synth_sb *)(s->base + s->sb_page * s->page_size);
	s->ndma = ndma;
	for (unsigned d = 0; d < ndma; d++)
		s->dma[d] = o->dma_devs[d];
	if (s->nvcpus > SYNTH_MAX_VCPUS || s->npages < s->data_start + s->nvcpus) {
		free(s);
		return vfm_error_set(err, -EINVAL, "synthetic guest: %u vCPUs and %u dma devices in %"
				     PRIu64 " pages is not possible (max %d vCPUs)",
				     o && o->vcpus ? o->vcpus : 2, ndma, r->size / vfm_guest_mem_page_size(mem),
				     SYNTH_MAX_VCPUS);
	}
	pthread_mutex_init(&s->lock, NULL);
	{
		pthread_condattr_t ca;

		/* The vCPUs' naps are timed on CLOCK_MONOTONIC (now_ns). */
		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&s->cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	if (!o || o->fresh) {
		ret = synth_dma_setup(s, err);
		if (ret) {
			pthread_cond_destroy(&s->cond);
			pthread_mutex_destroy(&s->lock);
			free(s);
			return ret;
		}
		/* A little history so that the first pass has content to send. */
		for (uint64_t p = s->data_start; p < s->npages; p += 7)
			write_page(s, p);
	}
	for (unsigned i = 0; i < s->nvcpus; i++) {
		struct synth_vcpu *v = &s->vcpu[i];
		v->s = s;
		v->index = i;
		v->rng = mix(i + 1);
		ret = vfm_thread_create(&v->thread, NULL, vcpu_main, v);
		if (ret) {
			synth_destroy(&s->g);
			return vfm_error_set(err, -ret, "starting vCPU %u", i);
		}
		v->thread_live = true;
	}
	*out = &s->g;
	return 0;
}

/* The "none" guest: memory and devices, no workload, nothing to verify. */
static int none_start(struct vfm_guest *g, struct vfm_error *err)
{
	g->running = true;
	return 0;
}

static int none_stop(struct vfm_guest *g)
{
	g->running = false;
	return 0;
}

static int none_verify(struct vfm_guest *g, struct vfm_guest_verify *out)
{
	memset(out, 0, sizeof(*out));
	out->verified = true;
	snprintf(out->detail, sizeof(out->detail), "no guest workload to verify");
	return 0;
}

static void none_destroy(struct vfm_guest *g)
{
	free(g);
}

static const struct vfm_guest_ops none_ops = {
	.kind = "none",
	.start = none_start,
	.stop = none_stop,
	.verify = none_verify,
	.destroy = none_destroy,
};

int vfm_guest_none_new(struct vfm_guest_mem *mem, struct vfm_guest **out, struct vfm_error *err)
{
	struct vfm_guest *g = calloc(1, sizeof(*g));

	if (!g)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	g->ops = &none_ops;
	g->mem = mem;
	*out = g;
	return 0;
}
