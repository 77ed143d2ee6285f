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

/*
 * Devices: `dma` sample devices (docs/devices/dma.md). Device i's BAR0 is at
 * mmio_gpa + i * KG_MMIO_STRIDE, a window outside RAM (no memory slot, so
 * every access exits to the VMM, which forwards it to the device); the
 * identity map covers it. Each device has a block of KG_DEV_PAGES pages in
 * RAM after the working set: its record (struct kg_dev), its descriptor
 * ring (one page, KG_RING_ENTRIES descriptors), then KG_DEV_TARGETS target
 * pages the device writes by DMA.
 */
#define KG_MMIO_MIN_GPA  UINT64_C(0x100000000)  /* 4 GiB, or the first GiB above RAM */
#define KG_MMIO_STRIDE   UINT64_C(0x10000)      /* per device: BAR0, then the window */
#define KG_MAX_DEVS      16
#define KG_RING_ENTRIES  64
#define KG_DEV_TARGETS   8
#define KG_DEV_PAGES     (2 + KG_DEV_TARGETS)
#define KG_DMA_EVERY     8            /* page rewrites between two copies per device */

/*
 * A device's mapped window (the dma device's BAR2, docs/devices/dma.md): when
 * the client mapped all of it, the VMM installs its areas as KVM memory
 * slots (no dirty log: the device migrates the window whole) at
 * bar_gpa + KG_WIN_OFFSET, and the guest reads and writes it with plain
 * loads and stores, no exit. Its content: word 0 the generation, every other
 * word kg_win_word(device, generation); generation 0 is all zeros (a fresh
 * window).
 */
#define KG_WIN_OFFSET    UINT64_C(0x8000)       /* in the device's MMIO stride */
#define KG_WIN_MAX       (KG_MMIO_STRIDE - KG_WIN_OFFSET)
#define KG_WIN_SEED      UINT64_C(0x57494e444f57)  /* "WINDOW" */

/* The dma device's BAR0 registers and descriptors, as docs/devices/dma.md. */
#define KG_DMA_REG_ID        0x00
#define KG_DMA_REG_MEM_SIZE  0x10
#define KG_DMA_REG_CTRL      0x18
#define KG_DMA_REG_STATUS    0x20
#define KG_DMA_REG_RING_BASE 0x28
#define KG_DMA_REG_RING_SIZE 0x30
#define KG_DMA_REG_RING_HEAD 0x38
#define KG_DMA_REG_RING_TAIL 0x40
#define KG_DMA_ID            UINT64_C(0x31414d44564d4656)
#define KG_DMA_CTRL_ENABLE   1u
#define KG_DMA_STATUS_HALTED 1u
#define KG_DMA_STATUS_QUIESCED 2u
#define KG_DMA_OP_COPY_TO_DEV 1u
#define KG_DMA_OP_COPY_FROM_DEV 2u
#define KG_DMA_DESC_OK       1u

struct kg_desc {
	uint32_t op, flags;
	uint64_t guest, dev, len, pattern, reserved;
	uint32_t status, reserved2;   /* written back by the device */
	uint64_t result;
};

/* I/O ports (port I/O exits to the VMM). */
#define KG_PORT_CONSOLE  0xe9         /* out8: one console byte (QEMU's debugcon port) */
#define KG_PORT_IDLE     0xe0         /* out32: microseconds with nothing to do */
#define KG_PORT_PANIC    0xe4         /* out32: the guest found itself broken; code */
#define KG_PORT_HEARTBEAT 0xe8        /* out8: vCPU 0's heartbeat, every heartbeat_us; the
				       * byte is a sequence number mod 256 (QEMU: an
				       * isa-debugcon at iobase 0xe8 on a socket chardev) */

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

/* What a target page holds: a copy of working-set frame src at generation
 * gen ({0, 0}: nothing yet, a zero page). */
struct kg_tag {
	uint64_t src, gen;
};

/* Why a device check failed (kg_dev.check_what). */
enum {
	KG_DEVBAD_NONE = 0,
	KG_DEVBAD_TARGET = 1,     /* a target is not the copy the device wrote */
	KG_DEVBAD_COMPLETION = 2, /* a used descriptor without an OK status */
	KG_DEVBAD_HEAD = 3,       /* RING_HEAD is not the guest's tail */
	KG_DEVBAD_FAILED = 4,     /* the guest gave up on the device (failed) */
	KG_DEVBAD_WINDOW = 5,     /* the mapped window is not the generation written */
};

/* Why the guest stopped driving a device (kg_dev.failed). */
enum {
	KG_DEVFAIL_ID = 1,        /* BAR0's ID register is not a dma device's */
	KG_DEVFAIL_GONE = 2,      /* STATUS read all-ones: the VMM could not reach it */
	KG_DEVFAIL_STATUS = 3,    /* a descriptor completed with an error */
	KG_DEVFAIL_STUCK = 4,     /* not completed, and the device is not quiesced */
};

/* Device i's record, the first page of its block. */
struct kg_dev {
	/* Set by the VMM at boot. */
	uint64_t bar_gpa;
	uint64_t ring_gpa;
	uint64_t target_gpa;      /* KG_DEV_TARGETS pages */
	uint64_t owner;           /* the vCPU that drives it (i mod vCPUs) */
	/* Written by the owner only. */
	uint64_t ready;           /* 1 once the guest programmed the ring */
	uint64_t mem_size;        /* the device's memory, read from MEM_SIZE */
	uint64_t tail;            /* descriptors handed to the device (free-running) */
	uint64_t ops;             /* copies completed */
	uint64_t busy;            /* a copy is in flight: the pending_* fields say which */
	uint64_t pending_tail;    /* its first descriptor */
	uint64_t pending_target;  /* the target it writes ... */
	struct kg_tag pending;    /* ... and what the target will hold */
	uint64_t failed;          /* nonzero: why the guest stopped driving it */
	uint64_t failed_status;   /* the descriptor status or register read then */
	uint64_t quiesced_waits;  /* polls that found the device quiesced */
	uint64_t check_seq;       /* last self-check of this device */
	uint64_t check_errors;
	uint64_t check_what;      /* KG_DEVBAD_* of the first error */
	uint64_t check_bad;       /* its frame (target, ring), register or window word 0 */
	struct kg_tag tag[KG_DEV_TARGETS];
	/* Set by the VMM at boot; 0: no mapped window (the layout of guests
	 * before windows: these words were zero then). */
	uint64_t win_gpa;         /* bar_gpa + KG_WIN_OFFSET */
	uint64_t win_size;        /* bytes, a multiple of 4096, at most KG_WIN_MAX */
	/* Written by the owner only. */
	uint64_t win_gen;         /* the generation the window holds */
	uint64_t win_busy;        /* being rewritten to win_gen + 1 */
};

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
	/* Set by the VMM at boot (zero: no devices, as in version-1 guests
	 * without them; the multiboot image has none). */
	uint64_t ndev;            /* dma devices, at most KG_MAX_DEVS */
	uint64_t dev_gpa;         /* device i's block: dev_gpa + i * KG_DEV_PAGES pages */
	uint64_t mmio_gpa;        /* device i's BAR0: mmio_gpa + i * KG_MMIO_STRIDE */
	/* Set at boot (zero: no heartbeat, as in guests before it): vCPU 0
	 * writes KG_PORT_HEARTBEAT every this many microseconds of TSC time. */
	uint64_t heartbeat_us;
	uint64_t reserved[4];
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

/* Word 1.. of device dev's window at generation gen (word 0 is gen). */
static inline uint64_t kg_win_word(uint64_t dev, uint64_t gen)
{
	return gen ? kg_mix((dev << 56) ^ gen ^ KG_WIN_SEED) | 1 : 0;
}

#endif
