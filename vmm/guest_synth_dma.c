/*
 * The synthetic guest's driver for `dma` sample devices (docs/devices/dma.md):
 * each copy sends one of the vCPU's own data pages into device memory and
 * back out into a target page by DMA, and records in guest memory what the
 * target now holds. After a migration, a target page whose DMA write was not
 * tracked shows up as stale content against its tag, and a lost completion
 * as a descriptor without an OK status.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "../devices/dma.h"
#include "util/logging.h"
#include "vmm/synth.h"

static int reg_read(struct vfm_device *dev, uint64_t off, uint64_t *v, struct vfm_error *err)
{
	return vfm_device_region_read(dev, 0, off, v, sizeof(*v), err);
}

static int reg_write(struct vfm_device *dev, uint64_t off, uint64_t v, struct vfm_error *err)
{
	return vfm_device_region_write(dev, 0, off, &v, sizeof(v), err);
}

static uint64_t ring_gpa(const struct synth *s, unsigned d)
{
	return (s->dma_base + d * (1ull + SYNTH_DMA_TARGETS)) * s->page_size;
}

static uint64_t first_target(const struct synth *s, unsigned d)
{
	return s->dma_base + d * (1ull + SYNTH_DMA_TARGETS) + 1;
}

int synth_dma_setup(struct synth *s, struct vfm_error *err)
{
	struct synth_sb *sb = s->sb;
	int ret;

	memset(sb, 0, sizeof(*sb));
	sb->magic = SYNTH_SB_MAGIC;
	sb->page_size = s->page_size;
	sb->npages = s->npages;
	sb->ndma = s->ndma;
	sb->targets = SYNTH_DMA_TARGETS;
	sb->data_start = s->data_start;
	for (unsigned d = 0; d < s->ndma; d++) {
		struct vfm_device *dev = s->dma[d];
		uint64_t mem = 0, ring = ring_gpa(s, d);

		ret = reg_read(dev, DMADEV_REG_MEM_SIZE, &mem, err);
		if (!ret && mem < s->page_size)
			ret = vfm_error_set(err, -EINVAL, "%s has %" PRIu64 " bytes of memory: too "
					    "little for the guest's copies", vfm_device_id(dev), mem);
		/* A new ring starts empty (HEAD = TAIL = 0) and clears HALTED. */
		ret = ret ?: reg_write(dev, DMADEV_REG_RING_BASE, ring, err);
		ret = ret ?: reg_write(dev, DMADEV_REG_RING_SIZE, SYNTH_RING_ENTRIES, err);
		ret = ret ?: reg_write(dev, DMADEV_REG_CTRL,
				       DMADEV_CTRL_ENABLE | DMADEV_CTRL_IRQ_ENABLE, err);
		if (ret)
			return vfm_error_set(err, ret, "synthetic guest: setting up %s",
					     vfm_device_id(dev));
		memset(s->base + ring, 0, s->page_size);
		synth_mark(s, ring, s->page_size);
		sb->dev[d].ring_gpa = ring;
		sb->dev[d].mem_size = mem;
	}
	synth_mark(s, s->sb_page * s->page_size, sizeof(*sb));
	s->attached = s->sb_ok = true;
	return 0;
}

void synth_dma_attach(struct synth *s)
{
	const struct synth_sb *sb = s->sb;

	if (s->attached)
		return;
	s->attached = true;
	s->sb_ok = false;
	if (sb->magic != SYNTH_SB_MAGIC) {
		snprintf(s->sb_why, sizeof(s->sb_why), "guest memory holds no synthetic guest "
			 "(superblock magic 0x%" PRIx64 "): was the source's guest another kind?",
			 sb->magic);
		return;
	}
	if (sb->page_size != s->page_size || sb->npages != s->npages || sb->ndma != s->ndma ||
	    sb->targets != SYNTH_DMA_TARGETS || sb->data_start != s->data_start) {
		snprintf(s->sb_why, sizeof(s->sb_why), "the guest in memory has another shape "
			 "(%" PRIu64 " pages, %" PRIu64 " dma devices; here %" PRIu64 " and %u)",
			 sb->npages, sb->ndma, s->npages, s->ndma);
		return;
	}
	for (unsigned d = 0; d < s->ndma; d++) {
		uint64_t mem = 0;

		if (sb->dev[d].ring_gpa != ring_gpa(s, d) ||
		    reg_read(s->dma[d], DMADEV_REG_MEM_SIZE, &mem, NULL) || mem != sb->dev[d].mem_size) {
			snprintf(s->sb_why, sizeof(s->sb_why), "%s is not the device the guest set "
				 "up (memory %" PRIu64 " bytes, the guest knew %" PRIu64 ")",
				 vfm_device_id(s->dma[d]), mem, sb->dev[d].mem_size);
			return;
		}
	}
	s->sb_ok = true;
}

static void device_failed(struct synth *s, unsigned d, const char *fmt, ...) VFM_PRINTF(3, 4);

static void device_failed(struct synth *s, unsigned d, const char *fmt, ...)
{
	char msg[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	atomic_fetch_add(&s->dma_errors, 1);
	s->dma_dead[d] = true;
	vfm_warn("guest", "%s: %s; the guest stops driving it", vfm_device_id(s->dma[d]), msg);
}

/* One copy through device d: page src -> device memory -> a target page. */
static void copy_once(struct synth *s, struct synth_vcpu *v, unsigned d)
{
	struct synth_sb_dev *sd = &s->sb->dev[d];
	uint64_t ps = s->page_size, tail = sd->tail;
	uint64_t data_pages = s->npages - s->data_start;
	uint64_t mine = (data_pages + s->nvcpus - 1 - v->index) / s->nvcpus;
	uint64_t src, gen, t, devoff, slot0, slot1;
	struct dmadev_desc *d0, *d1;
	struct vfm_error err = { 0 };
	uint32_t st0, st1;
	int r;

	v->rng = v->rng * 6364136223846793005ull + 1442695040888963407ull;
	/* Only this vCPU writes its pages, so src holds generation gen throughout. */
	src = s->data_start + v->index + ((v->rng >> 17) % mine) * s->nvcpus;
	gen = atomic_load_explicit(&s->table[src], memory_order_relaxed);
	t = first_target(s, d) + sd->ops % SYNTH_DMA_TARGETS;
	devoff = ((sd->ops * 2654435761ull + d) % (sd->mem_size / ps)) * ps;
	slot0 = tail % SYNTH_RING_ENTRIES;
	slot1 = (tail + 1) % SYNTH_RING_ENTRIES;
	d0 = (struct dmadev_desc *)(s->base + sd->ring_gpa) + slot0;
	d1 = (struct dmadev_desc *)(s->base + sd->ring_gpa) + slot1;
	memset(d0, 0, sizeof(*d0));
	d0->op = DMADEV_OP_COPY_TO_DEV;
	d0->guest = src * ps;
	d0->dev = devoff;
	d0->len = ps;
	memset(d1, 0, sizeof(*d1));
	d1->op = DMADEV_OP_COPY_FROM_DEV;
	d1->flags = DMADEV_DESC_IRQ;
	d1->guest = t * ps;
	d1->dev = devoff;
	d1->len = ps;
	synth_mark(s, sd->ring_gpa + slot0 * sizeof(*d0), sizeof(*d0));
	synth_mark(s, sd->ring_gpa + slot1 * sizeof(*d1), sizeof(*d1));
	/* The descriptors before the doorbell. TSan rejects fences (-Wtsan) and
	 * cannot see the device process anyway; the doorbell is a sendmsg(),
	 * a full barrier, so there a compiler barrier is enough. */
#ifdef __SANITIZE_THREAD__
	atomic_signal_fence(memory_order_release);
#else
	atomic_thread_fence(memory_order_release);
#endif

	/* The device runs the descriptors before it answers the doorbell. */
	r = reg_write(s->dma[d], DMADEV_REG_RING_TAIL, tail + 2, &err);
	if (r == -ETIMEDOUT) {
		/*
		 * A doorbell whose answer came too late was still sent, and the
		 * server may run it after all (a device stalled past the
		 * vfio-user timeout: the fault matrix's stall cells). Read the
		 * head back, as a driver flushes a posted write: the server
		 * answers in order, so by then the doorbell ran or never will.
		 */
		uint64_t head = 0;
		struct vfm_error e2 = { 0 };

		vfm_warn("guest", "%s: doorbell timed out (%s); reading the ring head back",
			 vfm_device_id(s->dma[d]), err.msg);
		if (!reg_read(s->dma[d], DMADEV_REG_RING_HEAD, &head, &e2) && head == tail + 2)
			r = 0;
		else if (!e2.code)
			vfm_error_set(&e2, -EIO, "ring head %" PRIu64 ", not %" PRIu64, head, tail + 2);
		if (r)
			vfm_error_set(&err, r, "read back: %s", e2.msg);
	}
	if (r) {
		device_failed(s, d, "doorbell failed (%s)", err.msg);
		return;
	}
	st0 = __atomic_load_n(&d0->status, __ATOMIC_ACQUIRE);
	st1 = __atomic_load_n(&d1->status, __ATOMIC_ACQUIRE);
	sd->tail = tail + 2;
	synth_mark(s, s->sb_page * ps + offsetof(struct synth_sb, dev[d]), sizeof(*sd));
	if (st0 != DMADEV_DESC_OK || st1 != DMADEV_DESC_OK) {
		device_failed(s, d, "descriptors %" PRIu64 "/%" PRIu64 " completed with status "
			      "0x%x/0x%x", tail, tail + 1, st0, st1);
		return;
	}
	atomic_store_explicit(&s->table[t], SYNTH_TAG_MAKE(src, gen), memory_order_release);
	synth_mark(s, t * 8, 8);
	sd->ops++;
	atomic_fetch_add(&s->dma_ops, 1);
}

void synth_dma_step(struct synth *s, struct synth_vcpu *v)
{
	if (!s->sb_ok)
		return;
	for (unsigned d = v->index; d < s->ndma; d += s->nvcpus)
		if (!s->dma_dead[d])
			copy_once(s, v, d);
}

static void verify_error(struct vfm_guest_verify *out, const char *fmt, ...) VFM_PRINTF(2, 3);

static void verify_error(struct vfm_guest_verify *out, const char *fmt, ...)
{
	va_list ap;

	if (!out->errors++) {
		va_start(ap, fmt);
		vsnprintf(out->detail, sizeof(out->detail), fmt, ap);
		va_end(ap);
	}
}

static void verify_target(struct synth *s, unsigned d, uint64_t t, struct vfm_guest_verify *out)
{
	uint64_t tag = atomic_load(&s->table[t]);
	const uint64_t *w = (const uint64_t *)(s->base + t * s->page_size);
	uint64_t src = SYNTH_TAG_SRC(tag), gen = SYNTH_TAG_GEN(tag), bad;

	out->pages_checked++;
	if (tag && !(tag & SYNTH_TAG)) {
		verify_error(out, "DMA target page %" PRIu64 " has a data generation in the table", t);
		return;
	}
	if (tag && (src < s->data_start || src >= s->npages)) {
		verify_error(out, "DMA target page %" PRIu64 ": tag names page %" PRIu64, t, src);
		return;
	}
	if (!synth_page_matches(w, s->page_size / 8, src, tag ? gen : 0, &bad))
		verify_error(out, "DMA target page %" PRIu64 " of %s word %" PRIu64 ": not the "
			     "copy of page %" PRIu64 " generation %" PRIu64 " the device wrote "
			     "(a lost DMA write)", t, vfm_device_id(s->dma[d]), bad, src, gen);
}

void synth_dma_verify(struct synth *s, struct vfm_guest_verify *out)
{
	synth_dma_attach(s);
	if (!s->sb_ok) {
		verify_error(out, "%s", s->sb_why);
		return;
	}
	for (unsigned d = 0; d < s->ndma; d++) {
		const struct synth_sb_dev *sd = &s->sb->dev[d];
		const struct dmadev_desc *ring = (const void *)(s->base + sd->ring_gpa);
		uint64_t used = sd->tail < SYNTH_RING_ENTRIES ? sd->tail : SYNTH_RING_ENTRIES;
		uint64_t head;

		for (uint64_t t = 0; t < SYNTH_DMA_TARGETS; t++)
			verify_target(s, d, first_target(s, d) + t, out);
		for (uint64_t i = 0; i < used; i++) {
			uint32_t st = __atomic_load_n(&ring[i].status, __ATOMIC_ACQUIRE);

			if (st != DMADEV_DESC_OK)
				verify_error(out, "%s: descriptor slot %" PRIu64 " has completion status "
					     "0x%x (a lost completion write?)", vfm_device_id(s->dma[d]),
					     i, st);
		}
		/* Every doorbell the guest rang has run, here or before the migration. */
		if (!reg_read(s->dma[d], DMADEV_REG_RING_HEAD, &head, NULL) && head != sd->tail)
			verify_error(out, "%s: ring head %" PRIu64 " but the guest handed it %" PRIu64
				     " descriptors", vfm_device_id(s->dma[d]), head, sd->tail);
	}
	if (atomic_load(&s->dma_errors))
		verify_error(out, "%" PRIu64 " device operations of the guest failed (see the log)",
			     atomic_load(&s->dma_errors));
}
