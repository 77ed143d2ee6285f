/*
 * The contract between the KVM guest program (guest/guest.c, freestanding)
 * and the VMM that boots it (vmm/kvm*.c): the guest physical layout, the I/O
 * ports, the mailbox page and the page pattern. Fixed-width types only.
 */
#ifndef VFM_GUEST_ABI_H
#define VFM_GUEST_ABI_H

#include <stdint.h>

/*
 * Guest physical layout (region 0 at 0): the first 2 MiB hold what the VMM
 * sets up; the generation table and the working set come after. The guest
 * never touches RAM outside the mailbox, its stack, the table and the
 * working set, so RAM size and the guest's work are independent.
 */
#define KG_MAILBOX_GPA   UINT64_C(0x1000)    /* struct kg_mailbox, 1 page */
#define KG_GDT_GPA       UINT64_C(0x2000)    /* null, code64, data, TSS (16 bytes) */
#define KG_TSS_GPA       UINT64_C(0x2800)    /* 104-byte 64-bit TSS (unused, VMX wants one) */
#define KG_PML4_GPA      UINT64_C(0x3000)
#define KG_PDPT_GPA      UINT64_C(0x4000)
#define KG_PD_GPA        UINT64_C(0x5000)    /* one page directory per GiB, 2 MiB pages */
#define KG_PD_MAX        64           /* identity map up to 64 GiB */
#define KG_STACK_GPA     UINT64_C(0x60000)   /* vCPU i's stack: [base + i*size, +size) */
#define KG_STACK_SIZE    UINT64_C(0x4000)
#define KG_MAX_VCPUS     32
#define KG_IMAGE_GPA     UINT64_C(0x100000)  /* the flat image; its first byte is the entry */
#define KG_IMAGE_MAX     UINT64_C(0x100000)
#define KG_TABLE_GPA     UINT64_C(0x200000)  /* u64 generation per working-set page */
#define KG_PAGE_SIZE     UINT64_C(4096)

/* I/O ports (port I/O exits to the VMM). */
#define KG_PORT_CONSOLE  0xe9         /* out8: one console byte (QEMU's debugcon port) */
#define KG_PORT_IDLE     0xe0         /* out32: microseconds with nothing to do */
#define KG_PORT_PANIC    0xe4         /* out32: the guest found itself broken; code */

#define KG_MAGIC         UINT64_C(0x314753454d4b4656)  /* "VFKMESG1" little-endian */
#define KG_ABI_VERSION   1u

/* Written by the guest only, one cache line per vCPU. */
struct kg_vcpu_stats {
	uint64_t pages_written;   /* monotonic: page rewrites since boot */
	uint64_t inflight_page;   /* guest frame being rewritten, or KG_NONE */
	uint64_t inflight_gen;    /* the generation it is being rewritten to */
	uint64_t check_seq;       /* last self-check request served */
	uint64_t check_pages;     /* pages that check looked at */
	uint64_t check_errors;    /* pages whose content disagreed */
	uint64_t check_first_bad; /* first bad frame, or KG_NONE */
	uint64_t booted;          /* 1 once this vCPU ran its first instruction */
};
#define KG_NONE (~UINT64_C(0))

struct kg_mailbox {
	/* Set by the VMM at boot, read-only for the guest. */
	uint64_t magic;
	uint32_t version;
	uint32_t nvcpus;
	uint64_t table_gpa;       /* u64 per working-set page */
	uint64_t ws_gpa;          /* first working-set page */
	uint64_t ws_pages;
	/* Written by the VMM at any time (it marks the page dirty itself: its
	 * writes do not go through the guest's dirty log). */
	volatile uint64_t tsc_khz;        /* for pacing by RDTSC */
	volatile uint64_t rate_pages;     /* page rewrites per second over all vCPUs */
	volatile uint64_t check_req;      /* each vCPU runs its self-check when this changes */
	uint64_t reserved[8];
	struct kg_vcpu_stats vcpu[KG_MAX_VCPUS];
};

/*
 * Page content, the synthetic guest's scheme: a pure function of (frame,
 * generation), generation 0 a zero page. Here every word of a page holds the
 * same value (the synthetic guest's word 0), so the guest fills a page with
 * one `rep stosq` and checks it with one `repe scasq`: guest code runs about
 * 15x faster that way than computing a value per word on this machine's
 * (slow, nested) KVM. A lost, stale, torn or misplaced page still shows:
 * the value names frame and generation. Frame numbers are gpa / 4096.
 */
#define KG_PATTERN_SEED UINT64_C(0x9e3779b97f4a7c15)

static inline uint64_t kg_mix(uint64_t x)
{
	x ^= x >> 33;
	x *= UINT64_C(0xff51afd7ed558ccd);
	x ^= x >> 33;
	x *= UINT64_C(0xc4ceb9fe1a85ec53);
	x ^= x >> 33;
	return x;
}

static inline uint64_t kg_page_word(uint64_t p, uint64_t gen)
{
	return gen ? kg_mix((p << 20) ^ (gen << 40) ^ KG_PATTERN_SEED) | 1 : 0;
}

#endif
