/*
 * The KVM guest's `dma` devices: their BAR0 in an MMIO window outside RAM
 * (exits forwarded to the device's region 0), their mapped BAR2 windows as
 * memory slots beside it, their blocks in guest RAM (record, ring, target
 * pages), and the host's check of that bookkeeping.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "../devices/dma.h"
#include "kvm_int.h"
#include "util/logging.h"

#define GIB (1ull << 30)

/* The guest's copy of the device interface must be the device's. */
_Static_assert(KG_DMA_REG_ID == DMADEV_REG_ID && KG_DMA_REG_MEM_SIZE == DMADEV_REG_MEM_SIZE &&
	       KG_DMA_REG_CTRL == DMADEV_REG_CTRL && KG_DMA_REG_STATUS == DMADEV_REG_STATUS &&
	       KG_DMA_REG_RING_BASE == DMADEV_REG_RING_BASE &&
	       KG_DMA_REG_RING_SIZE == DMADEV_REG_RING_SIZE &&
	       KG_DMA_REG_RING_HEAD == DMADEV_REG_RING_HEAD &&
	       KG_DMA_REG_RING_TAIL == DMADEV_REG_RING_TAIL, "dma registers");
_Static_assert(KG_DMA_ID == DMADEV_ID && KG_DMA_CTRL_ENABLE == DMADEV_CTRL_ENABLE &&
	       KG_DMA_STATUS_QUIESCED == DMADEV_STATUS_QUIESCED &&
	       KG_DMA_OP_COPY_TO_DEV == DMADEV_OP_COPY_TO_DEV &&
	       KG_DMA_OP_COPY_FROM_DEV == DMADEV_OP_COPY_FROM_DEV &&
	       KG_DMA_DESC_OK == DMADEV_DESC_OK, "dma constants");
_Static_assert(sizeof(struct kg_desc) == sizeof(struct dmadev_desc) &&
	       offsetof(struct kg_desc, status) == offsetof(struct dmadev_desc, status),
	       "dma descriptor");
_Static_assert(sizeof(struct kg_dev) <= KG_PAGE_SIZE, "device record fits its page");
_Static_assert(KG_RING_ENTRIES * sizeof(struct kg_desc) == KG_PAGE_SIZE, "ring is one page");
_Static_assert(KG_MAX_DEVS <= KG_MMIO_STRIDE / 4096, "window < 1 GiB");
_Static_assert(DMADEV_BAR0_SIZE <= KG_WIN_OFFSET && DMADEV_WIN_SIZE <= KG_WIN_MAX,
	       "BAR0 and BAR2 fit their places in the stride");

static uint64_t win_gpa(const struct kvm_guest *k, unsigned i)
{
	return k->mmio_gpa + (uint64_t)i * KG_MMIO_STRIDE + KG_WIN_OFFSET;
}

/*
 * Device i's BAR2 becomes the guest's window only when its client mapped all
 * of it in page-aligned areas (KVM slots are pages of this process); else the
 * guest does without (win_size 0), and says nothing of it.
 */
static void probe_window(struct kvm_guest *k, unsigned i)
{
	struct vfm_region_area a[KG_WIN_MAX_AREAS];
	struct vfm_device *dev = k->dev[i];
	struct vfm_device_info di;
	struct vfm_region_info ri;
	uint64_t covered = 0;
	unsigned n = 0;

	k->win_size[i] = 0;
	if (vfm_device_get_info(dev, &di, NULL) || di.num_regions <= DMADEV_BAR2 ||
	    vfm_device_region_info(dev, DMADEV_BAR2, &ri, NULL) || !(ri.flags & VFM_REGION_MMAP) ||
	    (ri.flags & (VFM_REGION_READ | VFM_REGION_WRITE)) !=
		    (VFM_REGION_READ | VFM_REGION_WRITE) ||
	    !ri.size || ri.size > KG_WIN_MAX || ri.size % KG_PAGE_SIZE ||
	    vfm_device_region_areas(dev, DMADEV_BAR2, a, KG_WIN_MAX_AREAS, &n, NULL) ||
	    n > KG_WIN_MAX_AREAS) {
		vfm_debug("kvm", "%s: no mappable BAR2 window of at most %" PRIu64 " KiB",
			  vfm_device_id(dev), KG_WIN_MAX >> 10);
		return;
	}
	for (unsigned j = 0; j < n; j++) {
		if (a[j].offset != covered || a[j].size % KG_PAGE_SIZE ||
		    (uintptr_t)a[j].ptr % KG_PAGE_SIZE) {
			vfm_debug("kvm", "%s: BAR2 area %u (0x%" PRIx64 "+0x%" PRIx64 ") leaves a gap "
				  "or is not page-aligned: no window", vfm_device_id(dev), j,
				  a[j].offset, a[j].size);
			return;
		}
		covered += a[j].size;
	}
	if (covered != ri.size) {
		vfm_debug("kvm", "%s: %" PRIu64 " of BAR2's %" PRIu64 " bytes mapped: no window",
			  vfm_device_id(dev), covered, ri.size);
		return;
	}
	memcpy(k->win_area[i], a, n * sizeof(a[0]));
	k->win_nareas[i] = n;
	k->win_size[i] = ri.size;
}

int vfm__kvm_dev_slots(struct kvm_guest *k, struct vfm_error *err)
{
	int max = ioctl(k->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS);

	for (unsigned i = 0; i < k->ndev; i++) {
		for (unsigned j = 0; j < k->win_nareas[i] && k->win_size[i]; j++) {
			const struct vfm_region_area *a = &k->win_area[i][j];
			/* No dirty log: the device's stream carries the window whole. */
			struct kvm_userspace_memory_region mr = {
				.slot = KG_WIN_SLOT_BASE + i * KG_WIN_MAX_AREAS + j,
				.guest_phys_addr = win_gpa(k, i) + a->offset,
				.memory_size = a->size,
				.userspace_addr = (uint64_t)(uintptr_t)a->ptr,
			};

			if (max > 0 && mr.slot >= (unsigned)max)
				return vfm_error_set(err, -ENOSPC, "kvm guest: %s: window slot %u, "
						     "KVM offers %d memory slots", vfm_device_id(k->dev[i]),
						     mr.slot, max);
			if (ioctl(k->vm_fd, KVM_SET_USER_MEMORY_REGION, &mr) < 0)
				return vfm_error_set(err, -errno, "kvm guest: %s: BAR2 window slot at "
						     "0x%llx+0x%llx: KVM_SET_USER_MEMORY_REGION: %s",
						     vfm_device_id(k->dev[i]), mr.guest_phys_addr,
						     mr.memory_size, strerror(errno));
			k->nwin_slots++;
		}
		if (k->win_size[i])
			vfm_debug("kvm", "%s: BAR2 window (%" PRIu64 " bytes, %u slot%s) at 0x%" PRIx64,
				  vfm_device_id(k->dev[i]), k->win_size[i], k->win_nareas[i],
				  k->win_nareas[i] == 1 ? "" : "s", win_gpa(k, i));
	}
	return 0;
}

uint64_t vfm_kvm_bar_gpa(const struct vfm_guest_mem *mem, unsigned d)
{
	uint64_t top = 0, base;

	for (unsigned i = 0; i < vfm_guest_mem_num_regions(mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(mem, i);

		if (r->gpa + r->size > top)
			top = r->gpa + r->size;
	}
	base = (top + GIB - 1) / GIB * GIB;
	if (base < KG_MMIO_MIN_GPA)
		base = KG_MMIO_MIN_GPA;
	return base + (uint64_t)d * KG_MMIO_STRIDE;
}

int vfm__kvm_dev_init(struct kvm_guest *k, struct vfm_error *err)
{
	k->mmio_gpa = vfm_kvm_bar_gpa(k->g.mem, 0);
	if (k->opts.ndma > KG_MAX_DEVS)
		return vfm_error_set(err, -E2BIG, "kvm guest: %u dma devices (max %d)",
				     k->opts.ndma, KG_MAX_DEVS);
	if (k->opts.ndma && k->mmio_gpa + GIB > (uint64_t)KG_PD_MAX * GIB)
		return vfm_error_set(err, -E2BIG, "kvm guest: with devices, RAM must end below "
				     "%d GiB (their BARs go above it, in the identity map)",
				     KG_PD_MAX - 1);
	for (unsigned i = 0; i < k->opts.ndma; i++) {
		struct vfm_device *dev = k->opts.dma_devs[i];
		struct vfm_region_info ri;
		int ret = vfm_device_region_info(dev, 0, &ri, err);

		if (ret)
			return vfm_error_set(err, ret, "kvm guest: %s: BAR0", vfm_device_id(dev));
		/* The first half of the device's stride; the window is the second. */
		if (!ri.size || ri.size > KG_WIN_OFFSET ||
		    (ri.flags & (VFM_REGION_READ | VFM_REGION_WRITE)) !=
			    (VFM_REGION_READ | VFM_REGION_WRITE))
			return vfm_error_set(err, -EINVAL, "kvm guest: %s: BAR0 of %" PRIu64
					     " bytes (flags 0x%x) does not fit a %" PRIu64
					     " KiB read-write slot", vfm_device_id(dev), ri.size,
					     ri.flags, KG_WIN_OFFSET >> 10);
		/* BAR0 (registers) is never a slot: every access exits. */
		k->dev[i] = dev;
		k->bar_size[i] = ri.size;
		k->ndev = i + 1;
		probe_window(k, i);
	}
	return 0;
}

uint64_t vfm__kvm_dev_bytes(const struct kvm_guest *k)
{
	return (uint64_t)k->ndev * KG_DEV_PAGES * KG_PAGE_SIZE;
}

static struct kg_dev *rec(const struct kvm_guest *k, unsigned i)
{
	return (struct kg_dev *)(k->ram0 + k->mb->dev_gpa +
				 (uint64_t)i * KG_DEV_PAGES * KG_PAGE_SIZE);
}

void vfm__kvm_dev_layout(struct kvm_guest *k, uint64_t dev_gpa)
{
	struct kg_mailbox *mb = k->mb;

	mb->ndev = k->ndev;
	mb->dev_gpa = k->ndev ? dev_gpa : 0;
	mb->mmio_gpa = k->ndev ? k->mmio_gpa : 0;
	vfm__kvm_mark(k, mb, KG_PAGE_SIZE);
	if (!k->ndev)
		return;
	memset(k->ram0 + dev_gpa, 0, vfm__kvm_dev_bytes(k));
	for (unsigned i = 0; i < k->ndev; i++) {
		uint64_t block = dev_gpa + (uint64_t)i * KG_DEV_PAGES * KG_PAGE_SIZE;
		struct kg_dev *d = rec(k, i);

		d->bar_gpa = k->mmio_gpa + (uint64_t)i * KG_MMIO_STRIDE;
		d->ring_gpa = block + KG_PAGE_SIZE;
		d->target_gpa = block + 2 * KG_PAGE_SIZE;
		d->owner = i % k->nvcpus;
		if (k->win_size[i]) {
			/* Generation 0 is a zeroed window, whatever a last user left. */
			for (unsigned j = 0; j < k->win_nareas[i]; j++)
				memset(k->win_area[i][j].ptr, 0, k->win_area[i][j].size);
			d->win_gpa = win_gpa(k, i);
			d->win_size = k->win_size[i];
		}
		vfm_debug("kvm", "%s: BAR0 at 0x%" PRIx64 ", ring at 0x%" PRIx64 ", driven by vCPU %"
			  PRIu64, vfm_device_id(k->dev[i]), d->bar_gpa, d->ring_gpa, d->owner);
	}
	vfm__kvm_mark(k, k->ram0 + dev_gpa, vfm__kvm_dev_bytes(k));
}

bool vfm__kvm_dev_mmio(struct kvm_guest *k, uint64_t gpa, void *data, unsigned len,
		       bool is_write)
{
	uint64_t i, off;
	struct vfm_error err = { 0 };
	int ret;

	if (gpa < k->mmio_gpa || gpa - k->mmio_gpa >= (uint64_t)k->ndev * KG_MMIO_STRIDE)
		return false;
	i = (gpa - k->mmio_gpa) / KG_MMIO_STRIDE;
	off = (gpa - k->mmio_gpa) % KG_MMIO_STRIDE;
	if (off + len > k->bar_size[i]) {
		ret = -EINVAL;
		vfm_error_set(&err, ret, "beyond BAR0's %" PRIu64 " bytes", k->bar_size[i]);
	} else if (is_write) {
		ret = vfm_device_region_write(k->dev[i], 0, off, data, len, &err);
	} else {
		ret = vfm_device_region_read(k->dev[i], 0, off, data, len, &err);
	}
	if (ret) {
		/* The guest sees all-ones (reads) or nothing (writes), as on a bus. */
		if (!is_write)
			memset(data, 0xff, len);
		if (atomic_fetch_add(&k->mmio_errors, 1) < 10)
			vfm_warn("kvm", "%s: guest %s of %u bytes at BAR0+0x%" PRIx64 ": %s",
				 vfm_device_id(k->dev[i]), is_write ? "write" : "read", len, off,
				 err.msg);
	}
	return true;
}

int vfm__kvm_dev_bad_layout(const struct kvm_guest *k, char *detail, size_t len)
{
	const struct kg_mailbox *mb = k->mb;
	uint64_t end = mb->dev_gpa + mb->ndev * KG_DEV_PAGES * KG_PAGE_SIZE;

	if (mb->ndev != k->ndev) {
		if (detail)
			snprintf(detail, len, "the guest drives %" PRIu64 " dma devices, this VM has %u",
			 mb->ndev, k->ndev);
		return -EINVAL;
	}
	if (!k->ndev)
		return 0;
	if (mb->mmio_gpa != k->mmio_gpa || mb->dev_gpa % KG_PAGE_SIZE ||
	    mb->dev_gpa < KG_TABLE_GPA || end > k->ram0_size || end < mb->dev_gpa) {
		if (detail)
			snprintf(detail, len, "the guest's device layout (BARs at 0x%" PRIx64 ", blocks at "
			 "0x%" PRIx64 ") does not fit this VM (BARs at 0x%" PRIx64 ")",
			 mb->mmio_gpa, mb->dev_gpa, k->mmio_gpa);
		return -EINVAL;
	}
	return 0;
}

static void bad(struct vfm_guest_verify *out, const char *fmt, ...) VFM_PRINTF(2, 3);

static void bad(struct vfm_guest_verify *out, const char *fmt, ...)
{
	va_list ap;

	if (!out->errors++) {
		va_start(ap, fmt);
		vsnprintf(out->detail, sizeof(out->detail), fmt, ap);
		va_end(ap);
	}
}

static const char *fail_reason(uint64_t why)
{
	switch (why) {
	case KG_DEVFAIL_ID: return "its BAR0 is not a dma device's";
	case KG_DEVFAIL_GONE: return "the device did not answer";
	case KG_DEVFAIL_STATUS: return "a descriptor failed";
	case KG_DEVFAIL_STUCK: return "descriptors did not complete";
	default: return "unknown reason";
	}
}

/* Whether every word of the page is one of the two values. */
static bool page_holds(const struct kvm_guest *k, uint64_t frame, uint64_t a, uint64_t b,
		       uint64_t *bad_word)
{
	const uint64_t *w = (const uint64_t *)(k->ram0 + frame * KG_PAGE_SIZE);

	for (uint64_t i = 0; i < KG_PAGE_SIZE / 8; i++)
		if (w[i] != a && w[i] != b) {
			*bad_word = i;
			return false;
		}
	return true;
}

static bool tag_ok(const struct kg_mailbox *mb, const struct kg_tag *t)
{
	uint64_t base = mb->ws_gpa / KG_PAGE_SIZE;

	return (!t->src && !t->gen) || (t->src >= base && t->src < base + mb->ws_pages);
}

/*
 * The window as the device holds it (read through the device, whether the
 * client maps it or not): generation win_gen, or on its way to the next one
 * when the owner stopped inside win_update (word 0 is written last).
 */
static void check_window(struct kvm_guest *k, unsigned i, const struct kg_dev *d,
			 struct vfm_guest_verify *out)
{
	const char *id = vfm_device_id(k->dev[i]);
	uint64_t gen = d->win_gen, next = d->win_busy ? gen + 1 : gen;
	uint64_t a = kg_win_word(i, gen), b = kg_win_word(i, next);
	struct vfm_error err = { 0 };
	uint64_t *w = malloc(d->win_size);

	out->pages_checked += d->win_size / KG_PAGE_SIZE;
	if (!w) {
		bad(out, "%s: no memory to check the window", id);
		return;
	}
	if (vfm_device_region_read(k->dev[i], DMADEV_BAR2, 0, w, d->win_size, &err)) {
		bad(out, "%s: reading the BAR2 window: %s", id, err.msg);
	} else if (w[0] != gen && w[0] != next) {
		bad(out, "%s: BAR2 window word 0 is 0x%" PRIx64 ", not generation %" PRIu64
		    " (a lost or stale window)", id, w[0], gen);
	} else {
		for (uint64_t j = 1; j < d->win_size / 8; j++)
			if (w[j] != a && w[j] != b) {
				bad(out, "%s: BAR2 window word %" PRIu64 " is 0x%" PRIx64 ", not generation %"
				    PRIu64 "'s (a lost or stale window)", id, j, w[j], gen);
				break;
			}
	}
	free(w);
}

/*
 * Stopped guest. A vCPU may have stopped in the middle of a copy (busy): its
 * target then holds the old or the new copy, its two descriptors may not
 * have completed yet, and the device's head is before or after them.
 */
static void check_one(struct kvm_guest *k, unsigned i, struct vfm_guest_verify *out)
{
	const struct kg_dev *d = rec(k, i);
	uint64_t block = k->mb->dev_gpa + (uint64_t)i * KG_DEV_PAGES * KG_PAGE_SIZE;
	const char *id = vfm_device_id(k->dev[i]);
	const struct dmadev_desc *ring;
	uint64_t used, head;
	struct vfm_error err = { 0 };

	if (d->bar_gpa != k->mmio_gpa + (uint64_t)i * KG_MMIO_STRIDE ||
	    d->ring_gpa != block + KG_PAGE_SIZE || d->target_gpa != block + 2 * KG_PAGE_SIZE ||
	    d->owner != i % k->nvcpus) {
		bad(out, "dma device %u's record in guest RAM does not describe it", i);
		return;
	}
	if (d->win_gpa && (d->win_gpa != win_gpa(k, i) || d->win_size != k->win_size[i])) {
		bad(out, "%s: the guest uses a %" PRIu64 "-byte window at 0x%" PRIx64 ", this VM maps "
		    "%" PRIu64 " bytes of the device's BAR2 there", id, d->win_size, d->win_gpa,
		    k->win_size[i]);
		return;
	}
	if (d->win_gpa)
		check_window(k, i, d, out);
	if (d->failed)
		bad(out, "%s: the guest stopped driving it: %s (0x%" PRIx64 ")", id,
		    fail_reason(d->failed), d->failed_status);
	for (unsigned t = 0; t < KG_DEV_TARGETS; t++) {
		const struct kg_tag *tag = &d->tag[t];
		const struct kg_tag *alt = d->busy && d->pending_target == t ? &d->pending : tag;
		uint64_t frame = d->target_gpa / KG_PAGE_SIZE + t, w;

		out->pages_checked++;
		if (!tag_ok(k->mb, tag) || !tag_ok(k->mb, alt)) {
			bad(out, "%s: target page 0x%" PRIx64 " has a tag outside the working set", id,
			    frame * KG_PAGE_SIZE);
			continue;
		}
		if (!page_holds(k, frame, kg_page_word(tag->src, tag->gen),
				kg_page_word(alt->src, alt->gen), &w))
			bad(out, "%s: target page 0x%" PRIx64 " word %" PRIu64 ": not the copy of page "
			    "0x%" PRIx64 " generation %" PRIu64 " the device wrote (a lost DMA write)",
			    id, frame * KG_PAGE_SIZE, w, tag->src * KG_PAGE_SIZE, tag->gen);
	}
	if (!d->ready)
		return;
	ring = (const struct dmadev_desc *)(k->ram0 + d->ring_gpa);
	used = d->tail < KG_RING_ENTRIES ? d->tail : KG_RING_ENTRIES;
	for (uint64_t s = 0; s < used; s++) {
		bool inflight = d->busy && !d->failed &&
				(s == d->pending_tail % KG_RING_ENTRIES ||
				 s == (d->pending_tail + 1) % KG_RING_ENTRIES);
		uint32_t st = __atomic_load_n(&ring[s].status, __ATOMIC_ACQUIRE);

		if (!inflight && st != DMADEV_DESC_OK)
			bad(out, "%s: descriptor slot %" PRIu64 " has completion status 0x%x (a lost "
			    "completion write?)", id, s, st);
	}
	if (vfm_device_region_read(k->dev[i], 0, DMADEV_REG_RING_HEAD, &head, sizeof(head), &err)) {
		bad(out, "%s: reading RING_HEAD: %s", id, err.msg);
		return;
	}
	if (d->busy && !d->failed ? head != d->pending_tail && head != d->pending_tail + 2
				  : head != d->tail && !d->failed)
		bad(out, "%s: ring head %" PRIu64 " but the guest handed it %" PRIu64 " descriptors",
		    id, head, d->tail);
}

void vfm__kvm_dev_check(struct kvm_guest *k, struct vfm_guest_verify *out)
{
	for (unsigned i = 0; i < k->ndev; i++)
		check_one(k, i, out);
}

bool vfm__kvm_dev_check_detail(struct kvm_guest *k, uint64_t seq, char *detail, size_t len)
{
	for (unsigned i = 0; i < k->ndev; i++) {
		const volatile struct kg_dev *d = rec(k, i);
		const char *id = vfm_device_id(k->dev[i]);

		if (d->check_seq != seq || !d->check_errors)
			continue;
		switch (d->check_what) {
		case KG_DEVBAD_TARGET:
			snprintf(detail, len, "guest check: %s: target page 0x%" PRIx64 " is not the "
				 "copy the device wrote (a lost DMA write)", id,
				 d->check_bad * KG_PAGE_SIZE);
			break;
		case KG_DEVBAD_COMPLETION:
			snprintf(detail, len, "guest check: %s: a used descriptor without an OK "
				 "completion (a lost completion write)", id);
			break;
		case KG_DEVBAD_HEAD:
			snprintf(detail, len, "guest check: %s: ring head %" PRIu64 " but the guest "
				 "handed it %" PRIu64 " descriptors", id, d->check_bad, d->tail);
			break;
		case KG_DEVBAD_WINDOW:
			snprintf(detail, len, "guest check: %s: the BAR2 window (word 0: 0x%" PRIx64
				 ") is not generation %" PRIu64 " (a lost or stale window)", id,
				 d->check_bad, d->win_gen);
			break;
		default:
			snprintf(detail, len, "guest check: %s: the guest stopped driving it: %s", id,
				 fail_reason(d->failed));
			break;
		}
		return true;
	}
	return false;
}

uint64_t vfm__kvm_dev_ops(struct kvm_guest *k)
{
	uint64_t n = 0;

	if (k->mb->magic != KG_MAGIC || vfm__kvm_dev_bad_layout(k, NULL, 0))
		return 0;
	for (unsigned i = 0; i < k->ndev; i++)
		n += ((const volatile struct kg_dev *)rec(k, i))->ops;
	return n;
}

uint64_t vfm__kvm_dev_failed(struct kvm_guest *k)
{
	uint64_t n = atomic_load(&k->mmio_errors);

	if (k->mb->magic != KG_MAGIC || vfm__kvm_dev_bad_layout(k, NULL, 0))
		return n;
	for (unsigned i = 0; i < k->ndev; i++)
		n += ((const volatile struct kg_dev *)rec(k, i))->failed != 0;
	return n;
}
