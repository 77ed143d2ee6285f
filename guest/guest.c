/*
 * The KVM guest program: freestanding, entered by every vCPU in 64-bit long
 * mode (set up by the VMM) with rdi = vCPU index, rsi = the mailbox. Each vCPU
 * rewrites its share of the working set at the rate in the mailbox, keeping
 * the synthetic guest's bookkeeping (per-page generation table, page content
 * a pure function of frame and generation), and checks itself on request.
 * The direction flag is clear from boot (rflags = 2), as rep string ops need.
 */
#include <stdbool.h>

#include "abi.h"

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return lo | (uint64_t)hi << 32;
}

/* The compiler may emit calls to these even when freestanding. */
void *memset(void *d, int c, unsigned long n);
void *memset(void *d, int c, unsigned long n)
{
	unsigned char *p = d;

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

/* ---- Console: a line at a time, so the VMM logs whole lines ---- */
struct line {
	char buf[160];
	unsigned len;
};

static void put_str(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = *s++;
}

static void put_u64(struct line *l, uint64_t v)
{
	char tmp[21];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = tmp[--n];
}

static void line_send(struct line *l)
{
	for (unsigned i = 0; i < l->len; i++)
		outb(KG_PORT_CONSOLE, (uint8_t)l->buf[i]);
	outb(KG_PORT_CONSOLE, '\n');
	l->len = 0;
}

static void line_start(struct line *l, uint64_t cpu)
{
	l->len = 0;
	put_str(l, "cpu ");
	put_u64(l, cpu);
	put_str(l, ": ");
}

/* ---- The workload ---- */
struct vcpu {
	uint64_t cpu, ncpu;
	struct kg_mailbox *mb;
	struct kg_vcpu_stats *st;
	volatile uint64_t *table;
	uint64_t mine;          /* working-set pages this vCPU owns */
	uint64_t rng;
	uint64_t written;       /* shadow of st->pages_written, kept in this frame */
};

static uint64_t frame_of(const struct vcpu *v, uint64_t k)
{
	return v->mb->ws_gpa / KG_PAGE_SIZE + v->cpu + k * v->ncpu;
}

/*
 * One rewrite: announce it, content first, then the table entry. A vCPU
 * stopped half way leaves the page with a prefix of the new generation; the
 * announcement tells a verifier looking at a stopped guest which page that is.
 */
static void write_page(struct vcpu *v, uint64_t k)
{
	uint64_t p = frame_of(v, k);
	uint64_t idx = p - v->mb->ws_gpa / KG_PAGE_SIZE;
	uint64_t gen = v->table[idx] + 1;
	void *dst = (void *)(p * KG_PAGE_SIZE);
	uint64_t n = KG_PAGE_SIZE / 8;

	v->st->inflight_gen = gen;
	v->st->inflight_page = p;
	barrier();
	__asm__ volatile("rep stosq" : "+D"(dst), "+c"(n) : "a"(kg_page_word(p, gen)) : "memory");
	barrier();
	v->table[idx] = gen;
	barrier();
	v->st->inflight_page = KG_NONE;
	v->st->pages_written = ++v->written;
}

/* Checks this vCPU's own pages; nobody else writes them, so no stop needed. */
static void self_check(struct vcpu *v, uint64_t seq)
{
	uint64_t errors = 0, first = KG_NONE, base = v->mb->ws_gpa / KG_PAGE_SIZE;
	struct line l;

	for (uint64_t k = 0; k < v->mine; k++) {
		uint64_t p = frame_of(v, k);
		uint64_t gen = v->table[p - base];
		const void *src = (const void *)(p * KG_PAGE_SIZE);
		uint64_t n = KG_PAGE_SIZE / 8;
		bool same;

		/* Stops at the first word that differs; ZF says whether one did. */
		__asm__ volatile("repe scasq" : "+D"(src), "+c"(n), "=@ccz"(same)
				 : "a"(kg_page_word(p, gen)) : "memory");
		if (!same) {
			if (first == KG_NONE)
				first = p;
			errors++;
		}
	}
	v->st->check_pages = v->mine;
	v->st->check_errors = errors;
	v->st->check_first_bad = first;
	line_start(&l, v->cpu);
	put_str(&l, "self-check ");
	put_u64(&l, seq);
	put_str(&l, errors ? ": FAILED, " : ": ok, ");
	put_u64(&l, v->mine);
	put_str(&l, " pages, ");
	put_u64(&l, errors);
	put_str(&l, " bad, ");
	put_u64(&l, v->written);
	put_str(&l, " rewrites so far");
	line_send(&l);
	/* The answer last: the VMM may stop us as soon as it sees it. */
	barrier();
	v->st->check_seq = seq;
}

static __attribute__((noreturn)) void panic(struct vcpu *v, uint32_t code, const char *why)
{
	struct line l;

	line_start(&l, v->cpu);
	put_str(&l, "PANIC: ");
	put_str(&l, why);
	line_send(&l);
	for (;;)
		outl(KG_PORT_PANIC, code);
}

__attribute__((noreturn, section(".text.entry"))) void kg_entry(uint64_t cpu,
								  struct kg_mailbox *mb);

__attribute__((noreturn, section(".text.entry"))) void kg_entry(uint64_t cpu,
								  struct kg_mailbox *mb)
{
	struct vcpu v = {
		.cpu = cpu, .mb = mb, .ncpu = mb->nvcpus, .st = &mb->vcpu[cpu],
		.table = (volatile uint64_t *)mb->table_gpa,
		.rng = kg_mix(cpu + 1),
	};
	uint64_t rate = 0, last = rdtsc(), credit = 0, seen_check = 0;
	struct line l;

	if (mb->magic != KG_MAGIC || mb->version != KG_ABI_VERSION || cpu >= mb->nvcpus)
		panic(&v, 1, "bad mailbox");
	v.mine = (mb->ws_pages + v.ncpu - 1 - cpu) / v.ncpu;
	v.written = v.st->pages_written;
	seen_check = v.st->check_seq;
	v.st->inflight_page = KG_NONE;
	v.st->booted = 1;
	line_start(&l, cpu);
	put_str(&l, "long mode, ");
	put_u64(&l, v.mine);
	put_str(&l, " of ");
	put_u64(&l, mb->ws_pages);
	put_str(&l, " working-set pages are mine");
	line_send(&l);

	for (;;) {
		uint64_t now, elapsed, hz, my_rate, total, req;

		/* Registers and RAM must agree after any stop, save and load. */
		if (v.written != v.st->pages_written)
			panic(&v, 2, "rewrite counter in RAM disagrees with the register copy");
		req = mb->check_req;
		if (req != seen_check) {
			self_check(&v, req);
			seen_check = req;
		}
		total = mb->rate_pages;
		my_rate = total / v.ncpu + (cpu < total % v.ncpu);
		hz = mb->tsc_khz * 1000;
		if (!my_rate || !hz || !v.mine) {
			rate = 0;
			outl(KG_PORT_IDLE, 10000);
			continue;
		}
		now = rdtsc();
		if (my_rate != rate) {
			rate = my_rate;
			last = now;
			credit = 0;
		}
		/* Token bucket in units of page * tsc tick: at most 10 ms of
		 * backlog, so a stopped or slow vCPU does not burst afterwards. */
		elapsed = now - last;
		last = now;
		if (elapsed > hz)
			elapsed = hz;
		credit += elapsed * rate;
		if (credit > hz * (rate / 100 + 1))
			credit = hz * (rate / 100 + 1);
		if (credit >= hz) {
			v.rng = v.rng * 6364136223846793005ull + 1442695040888963407ull;
			write_page(&v, (v.rng >> 17) % v.mine);
			credit -= hz;
		} else {
			uint64_t wait = (hz - credit + rate - 1) / rate;   /* ticks */
			uint64_t us = wait * 1000 / mb->tsc_khz;

			outl(KG_PORT_IDLE, (uint32_t)(us < 20 ? 20 : us > 10000 ? 10000 : us));
		}
	}
}
