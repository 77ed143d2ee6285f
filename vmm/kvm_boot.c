/*
 * The KVM guest's fresh machine: the guest physical layout of guest/abi.h
 * (identity page tables with 2 MiB pages, GDT and TSS, the program image,
 * the mailbox) and each vCPU's CPUID and 64-bit long mode entry state.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "kvm_int.h"
#include "util/logging.h"

#define GIB (1ull << 30)
#define PTE_P 0x1ull
#define PTE_RW 0x2ull
#define PTE_PS 0x80ull

#define CR0_PE 0x1ull
#define CR0_MP 0x2ull
#define CR0_ET 0x10ull
#define CR0_NE 0x20ull
#define CR0_WP 0x10000ull
#define CR0_AM 0x40000ull
#define CR0_PG 0x80000000ull
#define CR4_PAE 0x20ull
#define CR4_OSFXSR 0x200ull
#define CR4_OSXMMEXCPT 0x400ull
#define EFER_LME 0x100ull
#define EFER_LMA 0x400ull

#define SEL_CODE 0x08
#define SEL_DATA 0x10
#define SEL_TSS 0x18
#define GDT_ENTRIES 5           /* null, code, data, TSS (two slots) */
#define TSS_LIMIT 0x67

static void *gpa_ptr(struct kvm_guest *k, uint64_t gpa, uint64_t len)
{
	return vfm_guest_mem_ptr(k->g.mem, gpa, len);
}

/* Highest guest physical address of any region, for the identity map. */
static uint64_t mem_top(struct kvm_guest *k)
{
	uint64_t top = 0;

	for (unsigned i = 0; i < vfm_guest_mem_num_regions(k->g.mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(k->g.mem, i);
		if (r->gpa + r->size > top)
			top = r->gpa + r->size;
	}
	return top;
}

static void write_page_tables(struct kvm_guest *k)
{
	/* At least 4 GiB so that BARs in a 32-bit hole are reachable too, and
	 * the devices' MMIO window above RAM. */
	uint64_t top = k->ndev ? k->mmio_gpa + KG_MAX_DEVS * KG_MMIO_STRIDE : mem_top(k);
	uint64_t ngb = (top + GIB - 1) / GIB;
	uint64_t *pml4 = gpa_ptr(k, KG_PML4_GPA, KG_PAGE_SIZE);
	uint64_t *pdpt = gpa_ptr(k, KG_PDPT_GPA, KG_PAGE_SIZE);

	if (ngb < 4)
		ngb = 4;
	if (ngb > KG_PD_MAX) {
		vfm_warn("kvm", "identity map covers the first %d GiB only", KG_PD_MAX);
		ngb = KG_PD_MAX;
	}
	memset(pml4, 0, KG_PAGE_SIZE);
	memset(pdpt, 0, KG_PAGE_SIZE);
	pml4[0] = KG_PDPT_GPA | PTE_P | PTE_RW;
	for (uint64_t g = 0; g < ngb; g++) {
		uint64_t *pd = gpa_ptr(k, KG_PD_GPA + g * KG_PAGE_SIZE, KG_PAGE_SIZE);

		pdpt[g] = (KG_PD_GPA + g * KG_PAGE_SIZE) | PTE_P | PTE_RW;
		for (uint64_t j = 0; j < 512; j++)
			pd[j] = (g * GIB + (j << 21)) | PTE_P | PTE_RW | PTE_PS;
	}
	vfm__kvm_mark(k, pml4, KG_PD_GPA + ngb * KG_PAGE_SIZE - KG_PML4_GPA);
}

static uint64_t tss_desc_lo(uint64_t base)
{
	return TSS_LIMIT | (base & 0xffffff) << 16 | 0xbull << 40 | 1ull << 47 |
	       ((base >> 24) & 0xff) << 56;
}

static void write_gdt(struct kvm_guest *k)
{
	uint64_t *gdt = gpa_ptr(k, KG_GDT_GPA, KG_PAGE_SIZE);

	memset(gdt, 0, KG_PAGE_SIZE);
	gdt[0] = 0;
	gdt[1] = 0x00af9b000000ffffull;     /* 64-bit code, DPL 0 */
	gdt[2] = 0x00cf93000000ffffull;     /* data, 4 GiB flat */
	gdt[3] = tss_desc_lo(KG_TSS_GPA);   /* busy 64-bit TSS */
	gdt[4] = KG_TSS_GPA >> 32;
	/* The TSS lies in the same page; zero is a valid (unused) TSS. */
	vfm__kvm_mark(k, gdt, KG_PAGE_SIZE);
}

int vfm__kvm_layout(struct kvm_guest *k, struct vfm_error *err)
{
	const struct vfm_mem_region *r0 = vfm_guest_mem_region(k->g.mem, 0);
	uint64_t want, room, ws_pages, table_bytes;
	struct kg_mailbox *mb;

	if (!r0 || r0->gpa != 0)
		return vfm_error_set(err, -EINVAL, "kvm guest needs memory at address 0");
	if (vfm__kvm_guest_image_size > KG_IMAGE_MAX)
		return vfm_error_set(err, -E2BIG, "guest image of %zu bytes is too big",
				     vfm__kvm_guest_image_size);
	k->ram0 = r0->host;
	k->ram0_size = r0->size;
	k->mb = (struct kg_mailbox *)(k->ram0 + KG_MAILBOX_GPA);
	if (r0->size < KG_TABLE_GPA + KG_PAGE_SIZE * (k->nvcpus + 1))
		return vfm_error_set(err, -EINVAL, "kvm guest needs more than %" PRIu64
				     " bytes of memory at address 0 for %u vCPUs",
				     r0->size, k->nvcpus);
	if (!k->opts.fresh)
		return 0;       /* the layout arrives with the migrated RAM */

	/* Working set: as asked, clamped to what fits after the table (and
	 * the device blocks after it). */
	want = k->opts.working_set ? k->opts.working_set : 4ull << 20;
	if (r0->size < KG_TABLE_GPA + vfm__kvm_dev_bytes(k) + KG_PAGE_SIZE * (k->nvcpus + 1))
		return vfm_error_set(err, -EINVAL, "kvm guest: no room for %u dma devices' rings "
				     "and buffers in %" PRIu64 " bytes", k->ndev, r0->size);
	room = r0->size - KG_TABLE_GPA - vfm__kvm_dev_bytes(k);
	ws_pages = (want < room ? want : room) / KG_PAGE_SIZE;
	if (ws_pages < k->nvcpus)
		ws_pages = k->nvcpus;
	for (;;) {
		table_bytes = (ws_pages * 8 + KG_PAGE_SIZE - 1) & ~(KG_PAGE_SIZE - 1);
		if (table_bytes + ws_pages * KG_PAGE_SIZE <= room)
			break;
		ws_pages = (room - table_bytes) / KG_PAGE_SIZE;
		if (ws_pages < k->nvcpus)
			return vfm_error_set(err, -EINVAL, "no room for a working set");
	}
	if (ws_pages * KG_PAGE_SIZE < want)
		vfm_info("kvm", "working set clamped to %" PRIu64 " KiB", ws_pages * 4);

	write_page_tables(k);
	write_gdt(k);
	memcpy(k->ram0 + KG_IMAGE_GPA, vfm__kvm_guest_image, vfm__kvm_guest_image_size);
	memset(k->ram0 + KG_IMAGE_GPA + vfm__kvm_guest_image_size, 0,
	       KG_IMAGE_MAX - vfm__kvm_guest_image_size);
	vfm__kvm_mark(k, k->ram0 + KG_IMAGE_GPA, KG_IMAGE_MAX);
	/* The table and the pages start at generation 0: all zero, as a
	 * fresh memfd is; clearing them keeps a reused memory honest. */
	memset(k->ram0 + KG_TABLE_GPA, 0, table_bytes + ws_pages * KG_PAGE_SIZE);
	vfm__kvm_mark(k, k->ram0 + KG_TABLE_GPA, table_bytes + ws_pages * KG_PAGE_SIZE);

	mb = k->mb;
	memset(mb, 0, KG_PAGE_SIZE);
	mb->magic = KG_MAGIC;
	mb->version = KG_ABI_VERSION;
	mb->nvcpus = k->nvcpus;
	mb->table_gpa = KG_TABLE_GPA;
	mb->ws_gpa = KG_TABLE_GPA + table_bytes;
	mb->ws_pages = ws_pages;
	mb->tsc_khz = k->tsc_khz;
	mb->rate_pages = k->opts.dirty_rate / KG_PAGE_SIZE;
	mb->heartbeat_us = k->opts.heartbeat_us;
	for (unsigned i = 0; i < KG_MAX_VCPUS; i++) {
		mb->vcpu[i].inflight_page = KG_NONE;
		mb->vcpu[i].check_first_bad = KG_NONE;
	}
	vfm__kvm_mark(k, mb, KG_PAGE_SIZE);
	vfm__kvm_dev_layout(k, mb->ws_gpa + ws_pages * KG_PAGE_SIZE);
	vfm_debug("kvm", "layout: %u vCPUs, working set %" PRIu64 " pages at 0x%" PRIx64
		  ", image %zu bytes", k->nvcpus, ws_pages, mb->ws_gpa,
		  vfm__kvm_guest_image_size);
	return 0;
}

static struct kvm_cpuid2 *supported_cpuid(int kvm_fd, struct vfm_error *err)
{
	for (unsigned n = 64; n <= 4096; n *= 2) {
		struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + n * sizeof(c->entries[0]));

		if (!c) {
			vfm_error_set(err, -ENOMEM, "out of memory");
			return NULL;
		}
		c->nent = n;
		if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0)
			return c;
		free(c);
		if (errno != E2BIG) {
			vfm_error_set(err, -errno, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
			return NULL;
		}
	}
	vfm_error_set(err, -E2BIG, "KVM_GET_SUPPORTED_CPUID: too many entries");
	return NULL;
}

/* CPUID (what KVM supports, with this vCPU's APIC id), identical on both
 * sides of a migration on one host. */
int vfm__kvm_setup_vcpu(struct kvm_guest *k, struct kvm_vcpu *v, struct vfm_error *err)
{
	struct kvm_cpuid2 *c = supported_cpuid(k->kvm_fd, err);
	int ret = 0;

	if (!c)
		return err ? err->code : -EIO;
	for (unsigned i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];

		if (e->function == 1)
			e->ebx = (e->ebx & 0x00ffffffu) | v->idx << 24;
		if (e->function == 0xb || e->function == 0x1f)
			e->edx = v->idx;
	}
	if (ioctl(v->fd, KVM_SET_CPUID2, c) < 0)
		ret = vfm_error_set(err, -errno, "vCPU %u: KVM_SET_CPUID2: %s", v->idx,
				    strerror(errno));
	free(c);
	return ret;
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, bool code)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->g = 1;
	s->l = code;
	s->db = !code;
}

/* Long mode at the image's entry: rdi = vCPU index, rsi = the mailbox. */
void vfm__kvm_boot_vcpu_regs(struct kvm_guest *k, unsigned idx, struct kvm_regs *regs,
			     struct kvm_sregs *sregs)
{
	seg(&sregs->cs, SEL_CODE, 0xb, true);
	seg(&sregs->ds, SEL_DATA, 0x3, false);
	sregs->es = sregs->fs = sregs->gs = sregs->ss = sregs->ds;
	memset(&sregs->tr, 0, sizeof(sregs->tr));
	sregs->tr.base = KG_TSS_GPA;
	sregs->tr.limit = TSS_LIMIT;
	sregs->tr.selector = SEL_TSS;
	sregs->tr.type = 0xb;
	sregs->tr.present = 1;
	sregs->gdt.base = KG_GDT_GPA;
	sregs->gdt.limit = GDT_ENTRIES * 8 - 1;
	sregs->idt.base = 0;
	sregs->idt.limit = 0;
	sregs->cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
	sregs->cr3 = KG_PML4_GPA;
	sregs->cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
	sregs->efer = EFER_LME | EFER_LMA;

	memset(regs, 0, sizeof(*regs));
	regs->rflags = 0x2;
	regs->rip = KG_IMAGE_GPA;
	/* As if called: rsp + 8 is 16-byte aligned at the entry. */
	regs->rsp = KG_STACK_GPA + (uint64_t)(idx + 1) * KG_STACK_SIZE - 8;
	regs->rdi = idx;
	regs->rsi = KG_MAILBOX_GPA;
}

/* MSRs a vCPU's state includes when the host has them: the TSC (so the
 * guest's clock continues where it stopped) and the system-call and
 * per-CPU-base MSRs a guest may use. EFER travels in the sregs. */
static const uint32_t wanted_msrs[] = {
	0x10,           /* IA32_TSC */
	0x174, 0x175, 0x176,    /* SYSENTER_CS/ESP/EIP */
	0x277,          /* PAT */
	0x1a0,          /* MISC_ENABLE */
	0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084,  /* STAR, LSTAR, CSTAR, SFMASK */
	0xc0000102,     /* KERNEL_GS_BASE */
	0xc0000103,     /* TSC_AUX */
};

int vfm__kvm_probe_state(struct kvm_guest *k, struct vfm_error *err)
{
	struct kvm_msr_list *list;
	unsigned n = 256;
	int x;

	x = ioctl(k->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE);
	if (x > 0) {
		int x2 = ioctl(k->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
		k->xsave_size = x2 > (int)sizeof(struct kvm_xsave) ? (unsigned)x2
								   : sizeof(struct kvm_xsave);
	}
	k->have_xcrs = ioctl(k->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XCRS) > 0;
	k->have_events = ioctl(k->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_VCPU_EVENTS) > 0;
	k->have_debugregs = ioctl(k->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DEBUGREGS) > 0;

	for (;;) {
		list = calloc(1, sizeof(*list) + n * sizeof(uint32_t));
		if (!list)
			return vfm_error_set(err, -ENOMEM, "out of memory");
		list->nmsrs = n;
		if (ioctl(k->kvm_fd, KVM_GET_MSR_INDEX_LIST, list) == 0)
			break;
		free(list);
		if (errno != E2BIG || n >= 65536)
			return vfm_error_set(err, -errno, "KVM_GET_MSR_INDEX_LIST: %s",
					     strerror(errno));
		n *= 4;
	}
	k->nmsrs = 0;
	for (size_t w = 0; w < sizeof(wanted_msrs) / sizeof(wanted_msrs[0]); w++)
		for (unsigned i = 0; i < list->nmsrs; i++)
			if (list->indices[i] == wanted_msrs[w]) {
				k->msr_index[k->nmsrs++] = wanted_msrs[w];
				break;
			}
	free(list);
	return 0;
}
