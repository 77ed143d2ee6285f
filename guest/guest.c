/*
 * The KVM guest program: freestanding, entered by every vCPU in 64-bit long
 * mode (set up by the VMM) with rdi = vCPU index, rsi = the mailbox. Each vCPU
 * rewrites its share of the working set at the rate in the mailbox, keeping
 * the synthetic guest's bookkeeping (per-page generation table, page content
 * a pure function of frame and generation), drives the `dma` devices it
 * owns through their BAR0 (MMIO exits the VMM forwards) and writes their
 * mapped BAR2 windows with plain stores (memory slots), and checks itself
 * on request. The direction flag is clear from boot (rflags = 2), as rep
 * string ops need.
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

/* Device registers: no memory slot backs them, so each access exits to the
 * VMM; a plain 8-byte mov is what KVM's emulator decodes. */
static inline uint64_t mmio_read(uint64_t gpa)
{
	return *(volatile uint64_t *)gpa;
}

static inline void mmio_write(uint64_t gpa, uint64_t v)
{
	*(volatile uint64_t *)gpa = v;
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

static void put_hex(struct line *l, uint64_t v)
{
	int shift = 60;

	put_str(l, "0x");
	while (shift > 0 && !(v >> shift))
		shift -= 4;
	for (; shift >= 0 && l->len < sizeof(l->buf) - 1; shift -= 4)
		l->buf[l->len++] = "0123456789abcdef"[(v >> shift) & 0xf];
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
	uint64_t since_dma;     /* rewrites since this vCPU last drove its devices */
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

	/* The generation before the page: a verifier that finds the page
	 * announced must find its generation too. Without this barrier gcc
	 * stored inflight_page first, and a vCPU stopped between the two
	 * stores announced page p with the previous page's generation: the
	 * host check then failed a page that was intact ("content is not
	 * generation N (page was being rewritten)", seen about once in 10-20
	 * KVM runs under load). */
	v->st->inflight_gen = gen;
	barrier();
	v->st->inflight_page = p;
	barrier();
	__asm__ volatile("rep stosq" : "+D"(dst), "+c"(n) : "a"(kg_page_word(p, gen)) : "memory");
	barrier();
	v->table[idx] = gen;
	barrier();
	v->st->inflight_page = KG_NONE;
	v->st->pages_written = ++v->written;
}

/* ---- The dma device driver (docs/devices/dma.md) ---- */

static struct kg_dev *dev_rec(const struct vcpu *v, uint64_t i)
{
	return (struct kg_dev *)(v->mb->dev_gpa + i * KG_DEV_PAGES * KG_PAGE_SIZE);
}

static void dev_line(struct line *l, const struct vcpu *v, uint64_t i)
{
	line_start(l, v->cpu);
	put_str(l, "dma device ");
	put_u64(l, i);
	put_str(l, ": ");
}

static void dev_fail(struct vcpu *v, uint64_t i, struct kg_dev *d, uint64_t why, uint64_t val)
{
	static const char *const what[] = {
		"?", "BAR0 is not a dma device", "the device does not answer",
		"a descriptor failed", "descriptors did not complete",
	};
	struct line l;

	d->failed_status = val;
	d->failed = why;
	dev_line(&l, v, i);
	put_str(&l, what[why < 5 ? why : 0]);
	put_str(&l, " (");
	put_hex(&l, val);
	put_str(&l, "); the guest stops driving it");
	line_send(&l);
}

/* Once per device, by its owner: the ring in guest RAM, the engine on. */
static void dev_setup(struct vcpu *v, uint64_t i, struct kg_dev *d)
{
	uint64_t id = mmio_read(d->bar_gpa + KG_DMA_REG_ID), mem;
	struct line l;

	if (id != KG_DMA_ID) {
		dev_fail(v, i, d, KG_DEVFAIL_ID, id);
		return;
	}
	mem = mmio_read(d->bar_gpa + KG_DMA_REG_MEM_SIZE);
	if (mem < KG_PAGE_SIZE || mem == KG_NONE) {
		dev_fail(v, i, d, KG_DEVFAIL_ID, mem);
		return;
	}
	d->mem_size = mem;
	/* A new ring starts empty (HEAD = TAIL = 0). */
	mmio_write(d->bar_gpa + KG_DMA_REG_RING_BASE, d->ring_gpa);
	mmio_write(d->bar_gpa + KG_DMA_REG_RING_SIZE, KG_RING_ENTRIES);
	mmio_write(d->bar_gpa + KG_DMA_REG_CTRL, KG_DMA_CTRL_ENABLE);
	d->tail = 0;
	barrier();
	d->ready = 1;
	dev_line(&l, v, i);
	put_str(&l, "BAR0 at ");
	put_hex(&l, d->bar_gpa);
	put_str(&l, ", ring at ");
	put_hex(&l, d->ring_gpa);
	put_str(&l, ", ");
	put_u64(&l, mem >> 10);
	put_str(&l, " KiB of device memory");
	if (d->win_gpa) {
		put_str(&l, ", window at ");
		put_hex(&l, d->win_gpa);
	}
	line_send(&l);
}

static void idle_us(uint32_t us)
{
	outl(KG_PORT_IDLE, us);
}

/*
 * One copy: one of this vCPU's own pages (only it writes them, so the page
 * holds generation gen throughout) into device memory, and back out into
 * the next target page, by one doorbell. The device runs descriptors before
 * it answers the doorbell write; a quiesced device (a migration is under
 * way) latches it and runs them when it runs again, maybe on the
 * destination: the guest waits. The announcement (busy, pending_*) tells a
 * verifier of a stopped guest what may be half done.
 */
static void dev_copy(struct vcpu *v, uint64_t i, struct kg_dev *d)
{
	uint64_t tail = d->tail, t = d->ops % KG_DEV_TARGETS;
	uint64_t src, gen, devoff, base = v->mb->ws_gpa / KG_PAGE_SIZE;
	volatile struct kg_desc *d0, *d1;
	uint32_t s0, s1;

	v->rng = v->rng * 6364136223846793005ull + 1442695040888963407ull;
	src = frame_of(v, (v->rng >> 17) % v->mine);
	gen = v->table[src - base];
	devoff = ((d->ops * 2654435761ull + i) % (d->mem_size / KG_PAGE_SIZE)) * KG_PAGE_SIZE;
	d0 = (volatile struct kg_desc *)d->ring_gpa + tail % KG_RING_ENTRIES;
	d1 = (volatile struct kg_desc *)d->ring_gpa + (tail + 1) % KG_RING_ENTRIES;
	d0->op = KG_DMA_OP_COPY_TO_DEV;
	d0->flags = 0;
	d0->guest = src * KG_PAGE_SIZE;
	d0->dev = devoff;
	d0->len = KG_PAGE_SIZE;
	d0->status = 0;
	d1->op = KG_DMA_OP_COPY_FROM_DEV;
	d1->flags = 0;
	d1->guest = d->target_gpa + t * KG_PAGE_SIZE;
	d1->dev = devoff;
	d1->len = KG_PAGE_SIZE;
	d1->status = 0;
	d->pending_tail = tail;
	d->pending_target = t;
	d->pending.src = src;
	d->pending.gen = gen;
	barrier();
	d->busy = 1;
	barrier();
	mmio_write(d->bar_gpa + KG_DMA_REG_RING_TAIL, tail + 2);
	d->tail = tail + 2;
	for (;;) {
		uint64_t st;

		s0 = d0->status;
		s1 = d1->status;
		if (s0 && s1)
			break;
		st = mmio_read(d->bar_gpa + KG_DMA_REG_STATUS);
		if (st == KG_NONE) {
			dev_fail(v, i, d, KG_DEVFAIL_GONE, st);
			return;
		}
		if (st & KG_DMA_STATUS_QUIESCED) {
			d->quiesced_waits++;
			idle_us(200);
			continue;
		}
		/* Running again: whatever was latched ran before this answer. */
		s0 = d0->status;
		s1 = d1->status;
		if (s0 && s1)
			break;
		dev_fail(v, i, d, KG_DEVFAIL_STUCK, st);
		return;
	}
	if (s0 != KG_DMA_DESC_OK || s1 != KG_DMA_DESC_OK) {
		dev_fail(v, i, d, KG_DEVFAIL_STATUS, s0 != KG_DMA_DESC_OK ? s0 : s1);
		return;
	}
	d->tag[t] = d->pending;
	barrier();
	d->busy = 0;
	d->ops++;
}

/*
 * The next generation into the mapped window: plain stores into a memory
 * slot over the device's own memory, no exit. Announced (win_busy) so that a
 * verifier of a stopped guest accepts a half-written window; word 0 last.
 */
static void win_update(uint64_t i, struct kg_dev *d)
{
	uint64_t gen = d->win_gen + 1;
	volatile uint64_t *w = (volatile uint64_t *)d->win_gpa;
	void *dst = (void *)(d->win_gpa + 8);
	uint64_t n = d->win_size / 8 - 1;

	d->win_busy = 1;
	barrier();
	__asm__ volatile("rep stosq" : "+D"(dst), "+c"(n) : "a"(kg_win_word(i, gen)) : "memory");
	barrier();
	w[0] = gen;
	barrier();
	d->win_gen = gen;
	barrier();
	d->win_busy = 0;
}

static void drive_devices(struct vcpu *v)
{
	for (uint64_t i = v->cpu; i < v->mb->ndev; i += v->ncpu) {
		struct kg_dev *d = dev_rec(v, i);

		if (d->ready && !d->failed) {
			if (d->win_gpa)
				win_update(i, d);
			dev_copy(v, i, d);
		}
	}
}

static bool page_is(uint64_t frame, uint64_t word)
{
	const void *p = (const void *)(frame * KG_PAGE_SIZE);
	uint64_t n = KG_PAGE_SIZE / 8;
	bool same;

	/* Stops at the first word that differs; ZF says whether one did. */
	__asm__ volatile("repe scasq" : "+D"(p), "+c"(n), "=@ccz"(same) : "a"(word) : "memory");
	return same;
}

static void dev_bad(struct kg_dev *d, uint64_t what, uint64_t val)
{
	if (!d->check_errors++) {
		d->check_what = what;
		d->check_bad = val;
	}
}

/*
 * A device's part of the self-check: every target holds the copy its tag
 * names (else a device write was lost), every used descriptor completed OK
 * (else a completion was lost), and the device ran every descriptor the
 * guest handed it. Returns the target pages looked at.
 */
static uint64_t dev_check(struct vcpu *v, uint64_t i, struct kg_dev *d, uint64_t seq)
{
	const volatile struct kg_desc *ring = (const volatile struct kg_desc *)d->ring_gpa;
	uint64_t used = d->tail < KG_RING_ENTRIES ? d->tail : KG_RING_ENTRIES;
	struct line l;

	d->check_errors = 0;
	d->check_what = KG_DEVBAD_NONE;
	d->check_bad = 0;
	if (d->failed)
		dev_bad(d, KG_DEVBAD_FAILED, d->failed);
	for (uint64_t t = 0; t < KG_DEV_TARGETS; t++) {
		uint64_t frame = d->target_gpa / KG_PAGE_SIZE + t;

		if (!page_is(frame, kg_page_word(d->tag[t].src, d->tag[t].gen)))
			dev_bad(d, KG_DEVBAD_TARGET, frame);
	}
	for (uint64_t s = 0; s < used; s++)
		if (ring[s].status != KG_DMA_DESC_OK)
			dev_bad(d, KG_DEVBAD_COMPLETION, d->ring_gpa / KG_PAGE_SIZE);
	if (d->ready && !d->failed) {
		uint64_t head = mmio_read(d->bar_gpa + KG_DMA_REG_RING_HEAD);

		if (head != d->tail)
			dev_bad(d, KG_DEVBAD_HEAD, head);
	}
	/* The window as this device holds it: on a destination, what its
	 * stream carried. Nothing here is half written (we are not in
	 * win_update), so it must be win_gen exactly. */
	if (d->win_gpa) {
		const volatile uint64_t *w = (const volatile uint64_t *)d->win_gpa;
		const void *p = (const void *)(d->win_gpa + 8);
		uint64_t n = d->win_size / 8 - 1;
		bool same;

		__asm__ volatile("repe scasq" : "+D"(p), "+c"(n), "=@ccz"(same)
			       : "a"(kg_win_word(i, d->win_gen)) : "memory");
		if (w[0] != d->win_gen || !same)
			dev_bad(d, KG_DEVBAD_WINDOW, w[0]);
	}
	dev_line(&l, v, i);
	put_str(&l, "self-check ");
	put_u64(&l, seq);
	put_str(&l, d->check_errors ? ": FAILED, " : ": ok, ");
	put_u64(&l, d->ops);
	put_str(&l, " copies, ");
	if (d->win_gpa) {
		put_str(&l, "window generation ");
		put_u64(&l, d->win_gen);
		put_str(&l, ", ");
	}
	put_u64(&l, d->check_errors);
	put_str(&l, " bad");
	line_send(&l);
	barrier();
	d->check_seq = seq;
	return KG_DEV_TARGETS;
}

/* Checks this vCPU's own pages; nobody else writes them, so no stop needed. */
static void self_check(struct vcpu *v, uint64_t seq)
{
	uint64_t errors = 0, first = KG_NONE, base = v->mb->ws_gpa / KG_PAGE_SIZE;
	struct line l;

	uint64_t pages = v->mine;

	for (uint64_t k = 0; k < v->mine; k++) {
		uint64_t p = frame_of(v, k);

		if (!page_is(p, kg_page_word(p, v->table[p - base]))) {
			if (first == KG_NONE)
				first = p;
			errors++;
		}
	}
	for (uint64_t i = v->cpu; i < v->mb->ndev; i += v->ncpu) {
		struct kg_dev *d = dev_rec(v, i);

		pages += dev_check(v, i, d, seq);
		if (d->check_errors && first == KG_NONE)
			first = d->check_what == KG_DEVBAD_TARGET ? d->check_bad
								  : d->target_gpa / KG_PAGE_SIZE;
		errors += d->check_errors;
	}
	v->st->check_pages = pages;
	v->st->check_errors = errors;
	v->st->check_first_bad = first;
	line_start(&l, v->cpu);
	put_str(&l, "self-check ");
	put_u64(&l, seq);
	put_str(&l, errors ? ": FAILED, " : ": ok, ");
	put_u64(&l, pages);
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

/*
 * vCPU 0's heartbeat (docs/kvm-guest.md): one byte on KG_PORT_HEARTBEAT every
 * heartbeat_us, a sequence number, so an observer outside the VMM sees every
 * moment the guest ran (the blackout of a migration is the longest silence).
 * Missed beats are not caught up (the gap is the measurement); a TSC that
 * moved back (another host) restarts the schedule. Returns microseconds to
 * the next beat (0: no heartbeat).
 */
struct heartbeat {
	uint64_t next, ticks;
	uint8_t seq;
};

static uint64_t heartbeat(struct heartbeat *hb, const struct kg_mailbox *mb, uint64_t now)
{
	uint64_t us = mb->heartbeat_us, khz = mb->tsc_khz;

	if (!us || !khz)
		return 0;
	hb->ticks = us * khz / 1000;
	if (!hb->ticks)
		hb->ticks = 1;
	if ((int64_t)(now - hb->next) >= 0) {
		outb(KG_PORT_HEARTBEAT, hb->seq++);
		hb->next += hb->ticks;
		if ((int64_t)(now - hb->next) >= 0)
			hb->next = now + hb->ticks;
	} else if (hb->next - now > hb->ticks) {
		hb->next = now;
	}
	return (hb->next - now) * 1000 / khz + 1;
}

/* An idle request, cut short so the heartbeat stays on time. */
static void idle_until(uint64_t us, uint64_t hb_us)
{
	if (hb_us && hb_us < us)
		us = hb_us;
	outl(KG_PORT_IDLE, (uint32_t)us);
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
	struct heartbeat hb = { .next = last };
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
	if (mb->ndev > KG_MAX_DEVS)
		panic(&v, 3, "bad device count in the mailbox");
	for (uint64_t i = cpu; i < mb->ndev; i += v.ncpu)
		if (!dev_rec(&v, i)->ready && !dev_rec(&v, i)->failed)
			dev_setup(&v, i, dev_rec(&v, i));

	for (;;) {
		uint64_t now, elapsed, hz, my_rate, total, req, hb_us = 0;

		/* Registers and RAM must agree after any stop, save and load. */
		if (v.written != v.st->pages_written)
			panic(&v, 2, "rewrite counter in RAM disagrees with the register copy");
		req = mb->check_req;
		if (req != seen_check) {
			self_check(&v, req);
			seen_check = req;
		}
		if (cpu == 0)
			hb_us = heartbeat(&hb, mb, rdtsc());
		total = mb->rate_pages;
		my_rate = total / v.ncpu + (cpu < total % v.ncpu);
		hz = mb->tsc_khz * 1000;
		if (!my_rate || !hz || !v.mine) {
			rate = 0;
			idle_until(10000, hb_us);
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
			if (++v.since_dma >= KG_DMA_EVERY) {
				v.since_dma = 0;
				drive_devices(&v);
			}
		} else {
			uint64_t wait = (hz - credit + rate - 1) / rate;   /* ticks */
			uint64_t us = wait * 1000 / mb->tsc_khz;

			idle_until(us < 20 ? 20 : us > 10000 ? 10000 : us, hb_us);
		}
	}
}
