/*
 * The "dma" sample vfio-user device: BAR0 registers, a descriptor ring in
 * guest memory run on the doorbell, BAR2 a RAM window clients may map, device memory rewritten at a set rate
 * while running (emulated firmware), and single migration arcs. The stream
 * itself lives in dma-mig.c; docs/devices/dma.md has the interface.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <xxhash.h>

#include "dma-priv.h"
#include "util/logging.h"
#include "util/thread.h"
#include "vfiomig/vfu_server.h"

/* Churn granularity: small enough to dirty scattered pages, as firmware
 * tables do, large enough that the loop costs little. */
#define CHURN_BLOCK 256u
#define CHURN_TICK_NS 10000000ll     /* 10 ms */

static uint64_t next_rand(uint64_t *s)
{
	/* xorshift64*: plenty for patterns and positions. */
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545f4914f6cdd1dull;
}

static bool state_running(enum vfm_state s)
{
	return s == VFM_STATE_RUNNING || s == VFM_STATE_RUNNING_P2P ||
	       s == VFM_STATE_PRE_COPY || s == VFM_STATE_PRE_COPY_P2P;
}

/* P2P and stopped states forbid initiating DMA. */
static bool state_dma_ok(enum vfm_state s)
{
	return s == VFM_STATE_RUNNING || s == VFM_STATE_PRE_COPY;
}

/* ------------------------------------------------------------------------ */
/* The engine                                                                */

static void fill_pattern(uint8_t *p, uint64_t len, uint64_t pattern)
{
	for (uint64_t i = 0; i < len; i++)
		p[i] = (uint8_t)(pattern >> (8 * (i % 8)));
}

/* Runs one descriptor; returns 0 or a positive errno for the status. */
static uint32_t execute(struct vfm_dmadev *dev, const struct dmadev_desc *d, uint64_t *result)
{
	int r = 0;

	if (d->len > dev->mem_size || d->dev > dev->mem_size - d->len)
		return EINVAL;
	pthread_mutex_lock(&dev->lock);
	switch (d->op) {
	case DMADEV_OP_COPY_TO_DEV:
		r = vfm_vfu_dma_read(dev->ctx, d->guest, dev->mem + d->dev, d->len);
		dmadev_mem_written_locked(dev, d->dev, d->len);
		break;
	case DMADEV_OP_COPY_FROM_DEV:
		r = vfm_vfu_dma_write(dev->ctx, d->guest, dev->mem + d->dev, d->len);
		break;
	case DMADEV_OP_FILL:
		fill_pattern(dev->mem + d->dev, d->len, d->pattern);
		dmadev_mem_written_locked(dev, d->dev, d->len);
		break;
	case DMADEV_OP_CHECKSUM:
		*result = XXH3_64bits(dev->mem + d->dev, d->len);
		break;
	default:
		r = -EINVAL;
	}
	pthread_mutex_unlock(&dev->lock);
	return (uint32_t)-r;
}

static void halt_locked(struct vfm_dmadev *dev, const char *why, uint64_t at)
{
	dev->regs.status |= DMADEV_STATUS_HALTED;
	dev->regs.errors++;
	vfm_info(dev->id, "ring halted at descriptor %" PRIu64 ": %s", at, why);
}

/*
 * Runs ready descriptors [head, tail) on the loop thread, while the state
 * allows DMA; in P2P or stopped states the doorbell stays latched in TAIL
 * and the ring resumes when the device runs again (here or after migration).
 */
static void run_descriptors(struct vfm_dmadev *dev);

/*
 * The churn (firmware rewriting its memory) waits while a doorbell's
 * descriptors run, so the two halves of a copy (COPY_TO_DEV then
 * COPY_FROM_DEV through the same device page) see the same bytes: firmware
 * does not rewrite a buffer in the middle of a transfer. Without this a
 * loaded host let churn land between them, and the guest's target page was
 * not the copy its tag named (a "lost DMA write" that was no migration's).
 */
static void run_ring(struct vfm_dmadev *dev)
{
	pthread_mutex_lock(&dev->lock);
	dev->ring_busy = true;
	pthread_mutex_unlock(&dev->lock);
	run_descriptors(dev);
	pthread_mutex_lock(&dev->lock);
	dev->ring_busy = false;
	pthread_mutex_unlock(&dev->lock);
}

/* Runs the ready descriptors; takes dev->lock itself, per step. */
static void run_descriptors(struct vfm_dmadev *dev)
{
	for (uint64_t budget = 65536; budget; budget--) {
		struct dmadev_desc d;
		uint64_t at, iova, result = 0;
		uint32_t err;
		bool irq;
		struct { uint32_t status, pad; uint64_t result; } done;

		pthread_mutex_lock(&dev->lock);
		if (!dev->dma_ok || !(dev->regs.ctrl & DMADEV_CTRL_ENABLE) ||
		    (dev->regs.status & DMADEV_STATUS_HALTED) || !dev->regs.ring_size ||
		    dev->regs.head == dev->regs.tail) {
			pthread_mutex_unlock(&dev->lock);
			return;
		}
		at = dev->regs.head;
		if (dev->regs.tail - at > dev->regs.ring_size) {
			halt_locked(dev, "tail more than a ring ahead of head", at);
			pthread_mutex_unlock(&dev->lock);
			return;
		}
		iova = dev->regs.ring_base + (at & (dev->regs.ring_size - 1)) * sizeof(d);
		pthread_mutex_unlock(&dev->lock);

		if (vfm_vfu_dma_read(dev->ctx, iova, &d, sizeof(d))) {
			pthread_mutex_lock(&dev->lock);
			halt_locked(dev, "descriptor not readable", at);
			pthread_mutex_unlock(&dev->lock);
			return;
		}
		err = execute(dev, &d, &result);
		done.status = err ? DMADEV_DESC_ERR | err : DMADEV_DESC_OK;
		done.pad = 0;
		done.result = result;
		if (vfm_vfu_dma_write(dev->ctx, iova + offsetof(struct dmadev_desc, status), &done,
				      sizeof(done))) {
			pthread_mutex_lock(&dev->lock);
			halt_locked(dev, "completion not writable", at);
			pthread_mutex_unlock(&dev->lock);
			return;
		}
		pthread_mutex_lock(&dev->lock);
		dev->regs.head = at + 1;
		if (err)
			dev->regs.errors++;
		else
			dev->regs.completed++;
		irq = (d.flags & DMADEV_DESC_IRQ) && (dev->regs.ctrl & DMADEV_CTRL_IRQ_ENABLE);
		pthread_mutex_unlock(&dev->lock);
		if (irq && vfm_vfu_irq_trigger(dev->ctx, VFM_VFU_IRQ_MSI, 0) == -ENOENT)
			vfm_vfu_irq_trigger(dev->ctx, VFM_VFU_IRQ_INTX, 0);
	}
}

/* ------------------------------------------------------------------------ */
/* BAR0                                                                      */

static uint64_t reg_read_locked(struct vfm_dmadev *dev, uint64_t off)
{
	const struct dmadev_regs *r = &dev->regs;

	switch (off) {
	case DMADEV_REG_ID: return DMADEV_ID;
	case DMADEV_REG_VERSION: return 1;
	case DMADEV_REG_MEM_SIZE: return dev->mem_size;
	case DMADEV_REG_CTRL: return r->ctrl;
	case DMADEV_REG_STATUS: return r->status | (dev->dma_ok ? 0 : DMADEV_STATUS_QUIESCED);
	case DMADEV_REG_RING_BASE: return r->ring_base;
	case DMADEV_REG_RING_SIZE: return r->ring_size;
	case DMADEV_REG_RING_HEAD: return r->head;
	case DMADEV_REG_RING_TAIL: return r->tail;
	case DMADEV_REG_COMPLETED: return r->completed;
	case DMADEV_REG_ERRORS: return r->errors;
	case DMADEV_REG_CHECKSUM: return dmadev_state_hash(dev, dev->win, r);
	case DMADEV_REG_CHURN: return dev->churn_count;
	case DMADEV_REG_SCRATCH: return r->scratch;
	case DMADEV_REG_THROTTLE: return atomic_load(&dev->churn_throttle);
	case DMADEV_REG_LOG_REPORTS: return dev->ctx ? vfm_vfu_log_reports(dev->ctx) : 0;
	default: return 0;
	}
}

/* Whole registers, 4- or 8-byte aligned pieces of them. */
static ssize_t bar0_read(struct vfm_vfu_ctx *ctx, uint32_t index, uint64_t offset, void *buf,
			 size_t count)
{
	struct vfm_dmadev *dev = vfm_vfu_priv(ctx);

	if ((offset | count) & 3)
		return -EINVAL;
	pthread_mutex_lock(&dev->lock);
	for (size_t done = 0; done < count; done += 4) {
		uint64_t off = offset + done;
		uint64_t v = reg_read_locked(dev, off & ~7ull);
		uint32_t half = (uint32_t)(v >> (off & 4 ? 32 : 0));

		/* CHECKSUM is costly: compute it once per 8-byte read. */
		if ((off & ~7ull) == DMADEV_REG_CHECKSUM && !(off & 4) && done + 8 <= count) {
			memcpy((uint8_t *)buf + done, &v, 8);
			done += 4;
			continue;
		}
		memcpy((uint8_t *)buf + done, &half, 4);
	}
	pthread_mutex_unlock(&dev->lock);
	return (ssize_t)count;
}

static void reg_write_locked(struct vfm_dmadev *dev, uint64_t off, uint64_t v, bool *kick)
{
	struct dmadev_regs *r = &dev->regs;

	switch (off) {
	case DMADEV_REG_CTRL:
		r->ctrl = v & (DMADEV_CTRL_ENABLE | DMADEV_CTRL_IRQ_ENABLE);
		*kick = true;
		break;
	case DMADEV_REG_STATUS:
		r->status &= ~(v & DMADEV_STATUS_HALTED);
		*kick = true;
		break;
	case DMADEV_REG_RING_BASE:
	case DMADEV_REG_RING_SIZE:
		if (off == DMADEV_REG_RING_BASE)
			r->ring_base = v & ~63ull;
		else
			r->ring_size = (v && v <= 65536 && !(v & (v - 1))) ? v : 0;
		/* A new ring starts empty. */
		r->head = r->tail = 0;
		r->status &= ~DMADEV_STATUS_HALTED;
		break;
	case DMADEV_REG_RING_TAIL:
		r->tail = v;
		*kick = true;
		break;
	case DMADEV_REG_SCRATCH:
		r->scratch = v;
		break;
	case DMADEV_REG_THROTTLE:
		/* The migration's device-side auto-converge: less churn. */
		atomic_store(&dev->churn_throttle, (unsigned)(v > 99 ? 99 : v));
		break;
	default:
		break;   /* read-only or unused: ignored, as hardware does */
	}
}

static ssize_t bar0_write(struct vfm_vfu_ctx *ctx, uint32_t index, uint64_t offset,
			  const void *buf, size_t count)
{
	struct vfm_dmadev *dev = vfm_vfu_priv(ctx);
	bool kick = false;
	uint64_t v;

	if ((count != 4 && count != 8) || (offset & (count - 1)))
		return -EINVAL;
	pthread_mutex_lock(&dev->lock);
	if (count == 8) {
		memcpy(&v, buf, 8);
	} else {
		uint32_t half;
		uint64_t old = reg_read_locked(dev, offset & ~7ull);
		int shift = offset & 4 ? 32 : 0;

		memcpy(&half, buf, 4);
		v = (old & ~(0xffffffffull << shift)) | ((uint64_t)half << shift);
	}
	reg_write_locked(dev, offset & ~7ull, v, &kick);
	pthread_mutex_unlock(&dev->lock);
	if (kick)
		run_ring(dev);
	return (ssize_t)count;
}

static const struct vfm_vfu_region_ops bar0_ops = {
	.version = VFM_VFU_REGION_OPS_VERSION,
	.read = bar0_read,
	.write = bar0_write,
};

/* ------------------------------------------------------------------------ */
/* Firmware churn                                                            */

static int64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void churn_locked(struct vfm_dmadev *dev, uint64_t bytes)
{
	uint64_t slots = dev->mem_size / CHURN_BLOCK;

	for (; bytes >= CHURN_BLOCK; bytes -= CHURN_BLOCK) {
		uint64_t off = (next_rand(&dev->rng) % slots) * CHURN_BLOCK;

		for (unsigned i = 0; i < CHURN_BLOCK; i += 8) {
			uint64_t w = next_rand(&dev->rng);

			memcpy(dev->mem + off + i, &w, 8);
		}
		dmadev_mem_written_locked(dev, off, CHURN_BLOCK);
		dev->churn_count++;
	}
}

static void *churn_main(void *arg)
{
	struct vfm_dmadev *dev = arg;
	int64_t last = mono_ns();
	uint64_t budget = 0;

	pthread_mutex_lock(&dev->lock);
	while (!dev->stopping) {
		int64_t now = mono_ns() + CHURN_TICK_NS;
		struct timespec until = { (time_t)(now / 1000000000), (long)(now % 1000000000) };
		uint64_t add;

		pthread_cond_timedwait(&dev->cond, &dev->lock, &until);
		now = mono_ns();
		add = (uint64_t)(now - last) * dev->churn_rate / 1000000000ull *
		      (100 - atomic_load(&dev->churn_throttle)) / 100;
		last = now;
		if (!dev->running) {
			budget = 0;
			continue;
		}
		if (dev->ring_busy)
			continue;   /* the budget waits for the next tick */
		/* Never catch up more than 100 ms after a stall. */
		budget += add;
		if (budget > dev->churn_rate / 10 + CHURN_BLOCK)
			budget = dev->churn_rate / 10 + CHURN_BLOCK;
		churn_locked(dev, budget);
		budget %= CHURN_BLOCK;
	}
	pthread_mutex_unlock(&dev->lock);
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* Fault injection                                                           */

static const char *const fault_names[] = {
	[DMADEV_FAULT_ARC] = "arc", [DMADEV_FAULT_READ] = "read", [DMADEV_FAULT_WRITE] = "write",
	[DMADEV_FAULT_SIZE] = "size", [DMADEV_FAULT_STALL] = "stall",
	[DMADEV_FAULT_TRICKLE] = "trickle",
};

/* "N" (from 1) or "*" (0: every one); NULL or "" is the first. */
static int parse_nth(const char *s, uint64_t *nth, struct vfm_error *err)
{
	char *end;

	if (!s || !*s) {
		*nth = 1;
		return 0;
	}
	if (!strcmp(s, "*")) {
		*nth = 0;
		return 0;
	}
	errno = 0;
	*nth = strtoull(s, &end, 10);
	if (errno || *end || !*nth || *s == '-' || *s == '+')
		return vfm_error_set(err, -EINVAL, "fault occurrence '%s': a number from 1, or *", s);
	return 0;
}

/* One fault, in item (modified: split at ':' and '>'). */
static int parse_fault(char *item, struct vfm_dmadev_fault *f, struct vfm_error *err)
{
	char *arg = strchr(item, ':'), *more = NULL, *gt, *end;
	enum vfm_state from, to;

	if (arg)
		*arg++ = '\0';
	*f = (struct vfm_dmadev_fault){ 0 };
	if (!strcmp(item, "arc")) {
		if (!arg || !(gt = strchr(arg, '>')))
			return vfm_error_set(err, -EINVAL, "fault arc wants arc:FROM>TO[:N]");
		*gt++ = '\0';
		if ((more = strchr(gt, ':')))
			*more++ = '\0';
		if (vfm_state_from_name(arg, &from) || vfm_state_from_name(gt, &to))
			return vfm_error_set(err, -EINVAL, "fault arc %s>%s: unknown state", arg, gt);
		f->kind = DMADEV_FAULT_ARC;
		f->from = (unsigned)from;
		f->to = (unsigned)to;
		return parse_nth(more, &f->nth, err);
	}
	if (!strcmp(item, "read") || !strcmp(item, "write")) {
		f->kind = item[0] == 'r' ? DMADEV_FAULT_READ : DMADEV_FAULT_WRITE;
		return parse_nth(arg, &f->nth, err);
	}
	if (!strcmp(item, "size")) {
		if (arg)
			return vfm_error_set(err, -EINVAL, "fault size takes no argument");
		f->kind = DMADEV_FAULT_SIZE;
		return 0;
	}
	if (!strcmp(item, "stall") || !strcmp(item, "trickle")) {
		/* A trickle's sleeps must each end inside the client's request timeout. */
		uint64_t max = item[0] == 's' ? 3600000 : 1000;

		if (!arg || !*arg)
			return vfm_error_set(err, -EINVAL, "fault %s wants %s:MS[:N]", item, item);
		if ((more = strchr(arg, ':')))
			*more++ = '\0';
		errno = 0;
		f->ms = strtoull(arg, &end, 10);
		if (errno || *end || *arg == '-' || *arg == '+' || f->ms > max ||
		    (item[0] == 't' && !f->ms))
			return vfm_error_set(err, -EINVAL, "fault %s '%s': milliseconds up to %" PRIu64,
					     item, arg, max);
		f->kind = item[0] == 's' ? DMADEV_FAULT_STALL : DMADEV_FAULT_TRICKLE;
		return parse_nth(more, &f->nth, err);
	}
	return vfm_error_set(err, -EINVAL, "unknown fault '%s' (arc, read, write, size, stall, "
			     "trickle)", item);
}

int vfm_dmadev_parse_faults(const char *spec, struct vfm_dmadev_fault *f, unsigned *n,
			    unsigned max, struct vfm_error *err)
{
	char buf[512], *item, *save = NULL;
	int r;

	if (!spec || !*spec || strlen(spec) >= sizeof(buf))
		return vfm_error_set(err, -EINVAL, "fault spec empty or longer than %zu bytes",
				     sizeof(buf) - 1);
	snprintf(buf, sizeof(buf), "%s", spec);
	for (item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
		if (*n >= max)
			return vfm_error_set(err, -E2BIG, "more than %u faults", max);
		if ((r = parse_fault(item, &f[*n], err)))
			return r;
		++*n;
	}
	return 0;
}

bool dmadev_fault(struct vfm_dmadev *dev, enum vfm_dmadev_fault_kind kind, unsigned from,
		  unsigned to, uint64_t *ms)
{
	for (unsigned i = 0; i < dev->nfaults; i++) {
		const struct vfm_dmadev_fault *f = &dev->faults[i];
		uint64_t seen;

		if (f->kind != kind || (kind == DMADEV_FAULT_ARC && (f->from != from || f->to != to)))
			continue;
		seen = ++dev->fault_seen[i];
		if (f->nth && seen != f->nth)
			continue;
		if (ms)
			*ms = f->ms;
		/* A size fault hits every query: say so once. */
		if (kind != DMADEV_FAULT_SIZE || seen == 1) {
			if (kind == DMADEV_FAULT_ARC)
				vfm_warn(dev->id, "fault injected: arc %s -> %s fails",
					 vfm_state_name((enum vfm_state)from),
					 vfm_state_name((enum vfm_state)to));
			else
				vfm_warn(dev->id, "fault injected: %s (occurrence %" PRIu64 ")",
					 fault_names[kind], seen);
		}
		return true;
	}
	return false;
}

/* ------------------------------------------------------------------------ */
/* Migration arcs and device callbacks                                       */

static int dma_transition(struct vfm_vfu_ctx *ctx, enum vfm_state from, enum vfm_state to)
{
	struct vfm_dmadev *dev = vfm_vfu_priv(ctx);
	uint64_t trickle_ms = 0;
	int r = 0;

	if (dmadev_fault(dev, DMADEV_FAULT_ARC, (unsigned)from, (unsigned)to, NULL))
		return -EIO;
	/* Counted per entry into STOP_COPY: the session it slows down. */
	if (to == VFM_STATE_STOP_COPY)
		dmadev_fault(dev, DMADEV_FAULT_TRICKLE, 0, 0, &trickle_ms);

	if (from == VFM_STATE_STOP && to == VFM_STATE_RESUMING)
		r = dmadev_load_open(dev);
	else if (from == VFM_STATE_RESUMING && to == VFM_STATE_STOP)
		r = dmadev_load_commit(dev);
	if (r)
		return r;
	pthread_mutex_lock(&dev->lock);
	if (vfm_arc_opens_session(from, to) && vfm_state_is_saving(to))
		r = dmadev_save_open_locked(dev);
	else if (vfm_state_is_saving(from) && !vfm_state_is_saving(to))
		dmadev_save_close_locked(dev);
	if (!r) {
		if (to == VFM_STATE_STOP_COPY) {
			dev->save.stop = true;
			dev->save.trickle_ms = trickle_ms;
		}
		dev->running = state_running(to);
		dev->dma_ok = state_dma_ok(to);
	}
	pthread_mutex_unlock(&dev->lock);
	pthread_cond_signal(&dev->cond);
	if (r)
		return r;
	vfm_debug(dev->id, "%s -> %s", vfm_state_name(from), vfm_state_name(to));
	run_ring(dev);
	return 0;
}

/* Registers to defaults and RUNNING; memory (the firmware's state) stays. */
static int dma_reset(struct vfm_vfu_ctx *ctx)
{
	struct vfm_dmadev *dev = vfm_vfu_priv(ctx);

	dmadev_load_close(dev);
	pthread_mutex_lock(&dev->lock);
	dmadev_save_close_locked(dev);
	dev->regs = (struct dmadev_regs){ 0 };
	memset(dev->win, 0, DMADEV_WIN_SIZE);
	atomic_store(&dev->churn_throttle, 0);
	dev->running = dev->dma_ok = true;
	pthread_mutex_unlock(&dev->lock);
	pthread_cond_signal(&dev->cond);
	return 0;
}

/* A client that left mid-migration leaves no half session behind. */
static bool dma_detach(struct vfm_vfu_ctx *ctx)
{
	return vfm_vfu_mig_state(ctx) != VFM_STATE_RUNNING;
}

static const struct vfm_vfu_device_ops dma_dev_ops = {
	.version = VFM_VFU_DEVICE_OPS_VERSION,
	.detach = dma_detach,
	.reset = dma_reset,
};

static const struct vfm_vfu_migration_ops dma_mig_ops = {
	.version = VFM_VFU_MIGRATION_OPS_VERSION,
	.flags = VFM_MIG_STOP_COPY | VFM_MIG_P2P | VFM_MIG_PRE_COPY,
	.transition = dma_transition,
	.read_data = dmadev_read_data,
	.write_data = dmadev_write_data,
	.precopy_info = dmadev_precopy_info,
	.stop_copy_size = dmadev_stop_copy_size,
};

/* ------------------------------------------------------------------------ */
/* Lifecycle                                                                 */

static int setup_server(struct vfm_dmadev *dev, const char *path,
			const struct vfm_dmadev_opts *o, struct vfm_error *err)
{
	const struct vfm_vfu_pci_ids ids = {
		.vendor_id = DMADEV_VENDOR_ID, .device_id = DMADEV_DEVICE_ID,
		.subsys_vendor_id = DMADEV_VENDOR_ID, .subsys_id = DMADEV_DEVICE_ID,
		.class_code = DMADEV_CLASS, .revision = 1,
	};
	const struct vfm_vfu_region bar0 = {
		.size = DMADEV_BAR0_SIZE, .flags = VFM_VFU_REGION_READ | VFM_VFU_REGION_WRITE,
		.ops = &bar0_ops, .fd = -1,
	};
	/* No ops: REGION_READ/WRITE go to the memfd, the same bytes clients map. */
	static const struct vfm_vfu_mmap_area win_area = { 0, DMADEV_WIN_SIZE };
	const struct vfm_vfu_region bar2 = {
		.size = DMADEV_WIN_SIZE, .flags = VFM_VFU_REGION_READ | VFM_VFU_REGION_WRITE,
		.fd = dev->win_fd, .areas = &win_area, .nr_areas = 1,
	};
	struct vfm_vfu_opts vo = { .id = dev->id, .max_data_xfer_size = o->max_data_xfer_size,
				   .no_mig_shm = o->no_mig_shm };
	int r;

	r = vfm_vfu_create(path, &vo, dev, &dev->ctx, err);
	r = r ?: vfm_vfu_set_device_ops(dev->ctx, &dma_dev_ops, err);
	r = r ?: vfm_vfu_pci_init(dev->ctx, &ids, err);
	r = r ?: vfm_vfu_setup_region(dev->ctx, VFM_VFU_PCI_BAR0, &bar0, err);
	r = r ?: vfm_vfu_setup_region(dev->ctx, DMADEV_BAR2, &bar2, err);
	r = r ?: vfm_vfu_setup_irqs(dev->ctx, VFM_VFU_IRQ_INTX, 1, err);
	r = r ?: vfm_vfu_setup_irqs(dev->ctx, VFM_VFU_IRQ_MSI, 1, err);
	dev->mig_ops = dma_mig_ops;
	if (o->mig_flags)
		dev->mig_ops.flags = o->mig_flags;
	r = r ?: vfm_vfu_setup_migration(dev->ctx, &dev->mig_ops, err);
	r = r ?: vfm_vfu_realize(dev->ctx, err);
	return r;
}

int vfm_dmadev_create(const char *socket_path, const struct vfm_dmadev_opts *opts,
		      struct vfm_dmadev **out, struct vfm_error *err)
{
	struct vfm_dmadev_opts o = opts ? *opts : (struct vfm_dmadev_opts){ 0 };
	pthread_condattr_t ca;
	struct vfm_dmadev *dev;
	uint64_t seed;
	int r;

	if (!o.state_size)
		o.state_size = 64ull << 20;
	if (o.state_size % DMADEV_PAGE || o.state_size > (1ull << 40))
		return vfm_error_set(err, -EINVAL, "state size %" PRIu64
				     " must be a multiple of 4096 up to 1 TiB", o.state_size);
	dev = calloc(1, sizeof(*dev));
	if (!dev)
		return vfm_error_set(err, -ENOMEM, "no memory");
	snprintf(dev->id, sizeof(dev->id), "%s", o.id && *o.id ? o.id : "dma");
	dev->mem_size = o.state_size;
	dev->npages = o.state_size / DMADEV_PAGE;
	dev->churn_rate = o.churn_rate;
	dev->save_latency_us = o.save_latency_us;
	dev->running = dev->dma_ok = true;
	dev->win_fd = -1;
	if (o.nfaults > DMADEV_FAULTS_MAX || (o.nfaults && !o.faults)) {
		free(dev);
		return vfm_error_set(err, -EINVAL, "at most %u faults", DMADEV_FAULTS_MAX);
	}
	for (unsigned i = 0; i < o.nfaults; i++)
		dev->faults[i] = o.faults[i];
	dev->nfaults = o.nfaults;
	if (getrandom(&dev->instance, sizeof(dev->instance), 0) != sizeof(dev->instance))
		dev->instance = (uint64_t)mono_ns();
	pthread_mutex_init(&dev->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&dev->cond, &ca);
	pthread_condattr_destroy(&ca);

	dev->mem = dmadev_mem_alloc(dev->mem_size);
	if (!dev->mem) {
		r = vfm_error_set(err, -ENOMEM, "no memory for %" PRIu64 " bytes of device state",
				  dev->mem_size);
		goto err_free;
	}
	/* Distinct contents per instance unless a seed is given. */
	seed = o.seed ? o.seed : dev->instance | 1;
	for (uint64_t i = 0; i < dev->mem_size; i += 8) {
		uint64_t w = next_rand(&seed);

		memcpy(dev->mem + i, &w, 8);
	}
	dev->rng = seed;
	dev->page_hash = malloc(dev->npages * sizeof(uint64_t));
	if (!dev->page_hash) {
		r = vfm_error_set(err, -ENOMEM, "no memory for the page hashes");
		goto err_free;
	}
	dmadev_hash_all(dev);
	/* BAR2 starts zeroed, as a fresh memfd is. */
	dev->win_fd = memfd_create("dma-bar2", MFD_CLOEXEC);
	if (dev->win_fd < 0 || ftruncate(dev->win_fd, DMADEV_WIN_SIZE)) {
		r = vfm_error_set(err, -errno, "BAR2 memfd: %s", strerror(errno));
		goto err_free;
	}
	dev->win = mmap(NULL, DMADEV_WIN_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, dev->win_fd, 0);
	if (dev->win == MAP_FAILED) {
		dev->win = NULL;
		r = vfm_error_set(err, -errno, "mapping BAR2: %s", strerror(errno));
		goto err_free;
	}
	r = setup_server(dev, socket_path, &o, err);
	if (r)
		goto err_free;
	if (dev->churn_rate) {
		r = -vfm_thread_create(&dev->churn_thread, NULL, churn_main, dev);
		if (r) {
			vfm_error_set(err, r, "churn thread: %s", strerror(-r));
			goto err_free;
		}
		dev->churn_started = true;
	}
	vfm_info(dev->id, "%" PRIu64 " bytes of state, churn %" PRIu64 " B/s, save latency %" PRIu64
		 " us/MiB", dev->mem_size, dev->churn_rate, dev->save_latency_us);
	*out = dev;
	return 0;

err_free:
	vfm_dmadev_destroy(dev);
	return r;
}

void vfm_dmadev_destroy(struct vfm_dmadev *dev)
{
	if (!dev)
		return;
	if (dev->churn_started) {
		pthread_mutex_lock(&dev->lock);
		dev->stopping = true;
		pthread_mutex_unlock(&dev->lock);
		pthread_cond_signal(&dev->cond);
		pthread_join(dev->churn_thread, NULL);
	}
	/* The context first: its detach callbacks still use the device. */
	vfm_vfu_destroy(dev->ctx);
	dmadev_load_close(dev);
	dmadev_save_close_locked(dev);
	dmadev_mem_free(dev->mem, dev->mem_size);
	free(dev->page_hash);
	if (dev->win)
		munmap(dev->win, DMADEV_WIN_SIZE);
	if (dev->win_fd >= 0)
		close(dev->win_fd);
	pthread_cond_destroy(&dev->cond);
	pthread_mutex_destroy(&dev->lock);
	free(dev);
}

struct vfm_vfu_ctx *vfm_dmadev_ctx(struct vfm_dmadev *dev)
{
	return dev->ctx;
}

uint64_t vfm_dmadev_checksum(struct vfm_dmadev *dev)
{
	uint64_t v;

	pthread_mutex_lock(&dev->lock);
	v = dmadev_state_hash(dev, dev->win, &dev->regs);
	pthread_mutex_unlock(&dev->lock);
	return v;
}

uint8_t *vfm_dmadev_window(struct vfm_dmadev *dev)
{
	return dev->win;
}
