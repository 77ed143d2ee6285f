/*
 * The "dma" sample vfio-user device: a DMA engine with its own memory (the
 * migratable state), driven through BAR0 registers and a descriptor ring in
 * guest memory, plus a small RAM window (BAR2) clients may map. docs/devices/dma.md describes the hardware interface and the
 * migration stream; this header is that interface in C, plus the functions
 * that run an instance.
 */
#ifndef VFM_DEVICES_DMA_H
#define VFM_DEVICES_DMA_H

#include <stdint.h>

#include "vfiomig/common.h"

struct vfm_vfu_ctx;
struct vfm_dmadev;

/* ---- PCI identity ---- */
#define DMADEV_VENDOR_ID   0x1b36u   /* QEMU's ID for emulated devices */
#define DMADEV_DEVICE_ID   0x11f0u   /* unassigned there: this sample only */
#define DMADEV_CLASS       0x080100u /* system peripheral, DMA controller */

/* ---- BAR0: 4 KiB of 64-bit registers (4- and 8-byte accesses) ---- */
#define DMADEV_BAR0_SIZE     4096u
#define DMADEV_REG_ID        0x00  /* RO  DMADEV_ID */
#define DMADEV_REG_VERSION   0x08  /* RO  1 */
#define DMADEV_REG_MEM_SIZE  0x10  /* RO  bytes of device memory */
#define DMADEV_REG_CTRL      0x18  /* RW  DMADEV_CTRL_* */
#define DMADEV_REG_STATUS    0x20  /* RO  DMADEV_STATUS_*; write 1 to clear HALTED */
#define DMADEV_REG_RING_BASE 0x28  /* RW  IOVA of the ring, 64-byte aligned */
#define DMADEV_REG_RING_SIZE 0x30  /* RW  entries: a power of two <= 65536, 0 = none */
#define DMADEV_REG_RING_HEAD 0x38  /* RO  next descriptor the device runs (free-running) */
#define DMADEV_REG_RING_TAIL 0x40  /* RW  doorbell: descriptors [HEAD, TAIL) are ready */
#define DMADEV_REG_COMPLETED 0x48  /* RO  descriptors completed */
#define DMADEV_REG_ERRORS    0x50  /* RO  descriptors failed */
#define DMADEV_REG_CHECKSUM  0x58  /* RO  checksum of the state (memory + registers) */
#define DMADEV_REG_CHURN     0x60  /* RO  internal rewrites so far (not state) */
#define DMADEV_REG_SCRATCH   0x68  /* RW  free for drivers (state) */
#define DMADEV_REG_THROTTLE  0x70  /* RW  churn slowed by this percent, 0..99 (not state) */
#define DMADEV_REG_LOG_REPORTS 0x78 /* RO  DMA_LOGGING_REPORT requests answered (not state) */
#define DMADEV_REG_END       0x80

#define DMADEV_ID            0x31414d44564d4656ull  /* "VFMVDMA1" */
#define DMADEV_CTRL_ENABLE     (1ull << 0)  /* run descriptors */
#define DMADEV_CTRL_IRQ_ENABLE (1ull << 1)  /* interrupts on completion */
#define DMADEV_STATUS_HALTED   (1ull << 0)  /* a ring error stopped the engine */
#define DMADEV_STATUS_QUIESCED (1ull << 1)  /* migration state forbids DMA now */

/*
 * ---- BAR2: a 4 KiB RAM window, mmap-able (a memfd shared with the client,
 * one sparse area covering it), any access size; part of the state ----
 */
#define DMADEV_BAR2          2u
#define DMADEV_WIN_SIZE      4096u

/* ---- Descriptors: 64 bytes in guest memory, little-endian ---- */
enum dmadev_op {
	DMADEV_OP_COPY_TO_DEV = 1,    /* guest [guest, +len) -> device [dev, +len) */
	DMADEV_OP_COPY_FROM_DEV = 2,  /* device -> guest */
	DMADEV_OP_FILL = 3,           /* device [dev, +len) = pattern, repeated */
	DMADEV_OP_CHECKSUM = 4,       /* result = XXH3-64 of device [dev, +len) */
};
#define DMADEV_DESC_IRQ (1u << 0)

struct dmadev_desc {
	uint32_t op;
	uint32_t flags;               /* DMADEV_DESC_* */
	uint64_t guest;               /* IOVA */
	uint64_t dev;                 /* offset in device memory */
	uint64_t len;
	uint64_t pattern;
	uint64_t reserved;
	/* Completion, written back by the device (16 bytes at offset 48). */
	uint32_t status;              /* DMADEV_DESC_OK or DMADEV_DESC_ERR | errno */
	uint32_t reserved2;
	uint64_t result;
};
#define DMADEV_DESC_OK  1u
#define DMADEV_DESC_ERR 0x80000000u
_Static_assert(sizeof(struct dmadev_desc) == 64, "descriptor is 64 bytes");

/* MSI vector 0 (or INTx when the client set no MSI eventfd) on completion. */

/* ---- Migration stream: records, each a header then len payload bytes ---- */
#define DMADEV_REC_MAGIC   0x52414d44u  /* "DMAR" */
/* 2: the WINDOW record; 3: PAGE checksums over the page hash; 4: END's
 * checksum over a digest of the page hashes (dmadev_state_hash) */
#define DMADEV_STREAM_VERSION 4u
enum dmadev_rec_type {
	DMADEV_REC_HEADER = 1,        /* first: struct dmadev_rec_header */
	DMADEV_REC_PAGE = 2,          /* arg = page index, 4096 bytes */
	DMADEV_REC_REGS = 3,          /* struct dmadev_regs */
	DMADEV_REC_END = 4,           /* last: struct dmadev_rec_end */
	DMADEV_REC_WINDOW = 5,        /* BAR2's DMADEV_WIN_SIZE bytes, before REGS */
};
#define DMADEV_REC_MAX DMADEV_REC_WINDOW
#define DMADEV_PAGE 4096u

struct dmadev_rec {
	uint32_t magic;
	uint16_t type;
	uint16_t version;
	uint32_t len;                 /* payload bytes */
	uint32_t seq;                 /* 0, 1, 2, ... in stream order */
	uint64_t arg;
	uint64_t csum;                /* XXH3-64 of payload, seeded with XXH3-64 of the 24 bytes above */
};
_Static_assert(sizeof(struct dmadev_rec) == 32, "record header is 32 bytes");

struct dmadev_rec_header {
	uint64_t mem_size;
	uint32_t page_size;
	uint32_t flags;               /* 0 */
	uint64_t source;              /* the source instance's id, for logs */
};

/* The registers that are state (migrated, in the checksum). */
struct dmadev_regs {
	uint64_t ctrl, status, ring_base, ring_size, head, tail, completed, errors, scratch;
};

struct dmadev_rec_end {
	uint64_t records;             /* records before this one */
	uint64_t checksum;            /* the state checksum the stream must rebuild */
};

/* ---- Fault injection, for testing what migrates the device ---- */
enum vfm_dmadev_fault_kind {
	DMADEV_FAULT_ARC = 1,         /* the arc from -> to fails (-EIO), state stays from */
	DMADEV_FAULT_READ,            /* a migration data read fails (-EIO) */
	DMADEV_FAULT_WRITE,           /* a RESUMING data write fails (-EIO) */
	DMADEV_FAULT_SIZE,            /* stop-copy and pre-copy sizes reported 16x too small */
	DMADEV_FAULT_STALL,           /* a migration data read first sleeps ms */
	DMADEV_FAULT_TRICKLE,         /* a STOP_COPY session: reads sleep ms, give 1 byte */
};
#define DMADEV_FAULTS_MAX 16
struct vfm_dmadev_fault {
	enum vfm_dmadev_fault_kind kind;
	unsigned from, to;            /* ARC: enum vfm_state */
	uint64_t nth;                 /* the occurrence it hits, from 1; 0 = every one */
	uint64_t ms;                  /* STALL, TRICKLE */
};

/*
 * Appends the faults in spec to f[*n..max): a comma list of arc:FROM>TO[:N],
 * read[:N], write[:N], size, stall:MS[:N], trickle:MS[:N] (N: the occurrence, default 1, `*`
 * every one). docs/devices/dma.md has the details.
 */
int vfm_dmadev_parse_faults(const char *spec, struct vfm_dmadev_fault *f, unsigned *n,
			    unsigned max, struct vfm_error *err);

/* ---- Running an instance ---- */
struct vfm_dmadev_opts {
	const char *id;               /* log prefix; default "dma" */
	uint64_t state_size;          /* device memory, multiple of 4096; 0 = 64 MiB */
	uint64_t churn_rate;          /* bytes/s rewritten while running; 0 = none */
	uint64_t save_latency_us;     /* added per MiB of state read */
	uint64_t seed;                /* initial memory pattern; 0 = random */
	uint32_t max_data_xfer_size;  /* 0 = library default */
	/* Migration flags to offer, STOP_COPY required; 0 = STOP_COPY | P2P |
	 * PRE_COPY. E.g. STOP_COPY | PRE_COPY is what libvfio-user devices offer. */
	uint64_t mig_flags;
	const struct vfm_dmadev_fault *faults;  /* copied; nfaults <= DMADEV_FAULTS_MAX */
	unsigned nfaults;
	/* Do not offer the vfiomig_mig_shm window: migration data in message
	 * payloads, as a plain vfio-user server (tests, benchmarks). */
	bool no_mig_shm;
};

/* Creates the device and its vfio-user server on socket_path (NULL: no
 * socket, use vfm_vfu_attach_fd on the context). Starts the churn thread. */
int vfm_dmadev_create(const char *socket_path, const struct vfm_dmadev_opts *opts,
		      struct vfm_dmadev **out, struct vfm_error *err);
void vfm_dmadev_destroy(struct vfm_dmadev *dev);
struct vfm_vfu_ctx *vfm_dmadev_ctx(struct vfm_dmadev *dev);
/* DMADEV_REG_CHECKSUM, read in-process. */
uint64_t vfm_dmadev_checksum(struct vfm_dmadev *dev);
/* The device's own mapping of BAR2 (DMADEV_WIN_SIZE bytes), in-process. */
uint8_t *vfm_dmadev_window(struct vfm_dmadev *dev);

#endif
