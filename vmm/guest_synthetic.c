/*
 * The synthetic guest: vCPU threads that rewrite whole guest pages at a
 * chosen rate and keep, in guest RAM itself, a table of each page's
 * generation. A page's content is a pure function of (page, generation), so
 * after a migration every page can be checked against the table that
 * travelled with it: a lost dirty page shows up as a stale page or a stale
 * table entry.
 *
 * Layout: guest page 0.. hold the table (u64 generation per page); the
 * pages after it are data pages. vCPU i writes data pages i, i+n, i+2n, ...
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/logging.h"
#include "vmm/guest.h"

#define MAX_VCPUS 64
#define PATTERN_SEED 0x9e3779b97f4a7c15ull

struct synth;

struct vcpu {
	struct synth *s;
	unsigned index;
	pthread_t thread;
	bool thread_live;
	uint64_t rng;
};

struct synth {
	struct vfm_guest g;
	uint64_t page_size;
	uint64_t npages;        /* all guest pages of region 0 */
	uint64_t table_pages;   /* pages holding the generation table */
	unsigned nvcpus;
	uint64_t dirty_rate;
	char *base;             /* region 0 host mapping */
	_Atomic uint64_t *table;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* Guarded by lock. */
	bool run;               /* vCPUs may write */
	bool quit;
	unsigned parked;        /* vCPUs waiting for run */
	struct vcpu vcpu[MAX_VCPUS];
};

static inline uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

/* Word w of page p at generation gen; generation 0 is a zero page. */
static inline uint64_t pattern(uint64_t p, uint64_t gen, uint64_t w)
{
	return gen ? mix((p << 20) ^ (gen << 40) ^ w ^ PATTERN_SEED) | 1 : 0;
}

static void fill_page(struct synth *s, uint64_t p, uint64_t gen)
{
	uint64_t *w = (uint64_t *)(s->base + p * s->page_size);

	for (uint64_t i = 0; i < s->page_size / 8; i++)
		w[i] = pattern(p, gen, i);
}

/* One write: page content first, then the table; both marked after. */
static void write_page(struct synth *s, uint64_t p)
{
	uint64_t gen = atomic_load_explicit(&s->table[p], memory_order_relaxed) + 1;

	fill_page(s, p, gen);
	atomic_store_explicit(&s->table[p], gen, memory_order_release);
	vfm_dirty_mark(s->g.mem, p * s->page_size, s->page_size);
	vfm_dirty_mark(s->g.mem, p * 8, 8);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *vcpu_main(void *arg)
{
	struct vcpu *v = arg;
	struct synth *s = v->s;
	uint64_t data_pages = s->npages - s->table_pages;
	/* Each vCPU's share of the rate, in pages per second. */
	double rate = (double)s->dirty_rate / (double)s->page_size / s->nvcpus;
	uint64_t t0 = 0, done = 0;

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
		pthread_mutex_unlock(&s->lock);

		if (!t0) {
			t0 = now_ns();
			done = 0;
		}
		/* Pace to the rate: write the pages due by now (64 at most before
		 * looking at the run flag again), then nap. */
		double due = rate * (double)(now_ns() - t0) / 1e9;
		unsigned batch = 0;

		while ((double)done < due && batch++ < 64) {
			uint64_t k, mine = (data_pages + s->nvcpus - 1 - v->index) / s->nvcpus;

			v->rng = v->rng * 6364136223846793005ull + 1442695040888963407ull;
			k = (v->rng >> 17) % mine;
			write_page(s, s->table_pages + v->index + k * s->nvcpus);
			done++;
		}
		if ((double)done >= due) {
			struct timespec ts = { 0, 1000000 };
			nanosleep(&ts, NULL);
		}
	}
}

static int synth_start(struct vfm_guest *g, struct vfm_error *err)
{
	struct synth *s = (struct synth *)g;

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
	for (unsigned i = 0; i < s->nvcpus; i++)
		live += s->vcpu[i].thread_live;
	/* Parked vCPUs are between two page writes: memory is consistent. */
	while (s->parked < live)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	g->running = false;
	return 0;
}

static int synth_verify(struct vfm_guest *g, struct vfm_guest_verify *out)
{
	struct synth *s = (struct synth *)g;

	memset(out, 0, sizeof(*out));
	for (uint64_t p = s->table_pages; p < s->npages; p++) {
		uint64_t gen = atomic_load(&s->table[p]);
		const uint64_t *w = (const uint64_t *)(s->base + p * s->page_size);

		out->pages_checked++;
		for (uint64_t i = 0; i < s->page_size / 8; i++) {
			if (w[i] != pattern(p, gen, i)) {
				if (!out->errors)
					snprintf(out->detail, sizeof(out->detail),
						 "page %" PRIu64 " word %" PRIu64 ": content is not "
						 "generation %" PRIu64, p, i, gen);
				out->errors++;
				break;
			}
		}
	}
	out->verified = out->errors == 0;
	return 0;
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
	.verify = synth_verify,
	.destroy = synth_destroy,
};

int vfm_guest_synthetic_new(struct vfm_guest_mem *mem, const struct vfm_synthetic_opts *o,
			    struct vfm_guest **out, struct vfm_error *err)
{
	const struct vfm_mem_region *r = vfm_guest_mem_region(mem, 0);
	struct synth *s;
	int ret;

	if (!r || r->gpa != 0)
		return vfm_error_set(err, -EINVAL, "synthetic guest needs memory at address 0");
	s = calloc(1, sizeof(*s));
	if (!s)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	s->g.ops = &synth_ops;
	s->g.mem = mem;
	s->page_size = vfm_guest_mem_page_size(mem);
	s->npages = r->size / s->page_size;
	s->table_pages = (s->npages * 8 + s->page_size - 1) / s->page_size;
	s->nvcpus = o && o->vcpus ? o->vcpus : 2;
	s->dirty_rate = o ? o->dirty_rate : 0;
	s->base = r->host;
	s->table = (_Atomic uint64_t *)r->host;
	if (s->nvcpus > MAX_VCPUS || s->npages < s->table_pages + s->nvcpus) {
		free(s);
		return vfm_error_set(err, -EINVAL, "synthetic guest: %u vCPUs in %" PRIu64
				     " pages is not possible (max %d vCPUs)", o ? o->vcpus : 2,
				     s->npages, MAX_VCPUS);
	}
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	if (!o || o->fresh) {
		/* A little history so that the first pass has content to send. */
		for (uint64_t p = s->table_pages; p < s->npages; p += 7)
			write_page(s, p);
	}
	for (unsigned i = 0; i < s->nvcpus; i++) {
		struct vcpu *v = &s->vcpu[i];
		v->s = s;
		v->index = i;
		v->rng = mix(i + 1);
		ret = pthread_create(&v->thread, NULL, vcpu_main, v);
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
