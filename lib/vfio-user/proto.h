/*
 * The vfio-user wire protocol (QEMU docs/interop/vfio-user.rst): message
 * layouts, limits, framed message I/O on a UNIX stream socket, the checks both
 * sides run on what they receive, and VERSION capability negotiation. Shared by
 * the client backend and the server library; nothing here knows about devices.
 *
 * Byte order: the spec says "the endianness of the host system" (both peers
 * share a host over AF_UNIX); on every host we build for that is little-endian.
 * Nothing is byte-swapped.
 *
 * The structs are packed and describe payloads only (the bytes after the
 * 16-byte header). Copy fields out (or memcpy the struct) rather than taking
 * the address of a member: members of packed structs may be misaligned.
 */
#ifndef VFM_VFIO_USER_PROTO_H
#define VFM_VFIO_USER_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vfiomig/common.h"
#include "vfiomig/fsm.h"

#define VFU_PACKED __attribute__((packed))

/* ------------------------------------------------------------------------ */
/* Versions, commands, header                                                */

/*
 * The spec numbers no version; 0.1 is what libvfio-user speaks (QEMU's client
 * proposes 0.0). A server answers with min(proposed minor, ours).
 */
#define VFU_VERSION_MAJOR 0
#define VFU_VERSION_MINOR 1

enum vfu_cmd {
	VFU_CMD_VERSION = 1,
	VFU_CMD_DMA_MAP = 2,
	VFU_CMD_DMA_UNMAP = 3,
	VFU_CMD_DEVICE_GET_INFO = 4,
	VFU_CMD_DEVICE_GET_REGION_INFO = 5,
	VFU_CMD_DEVICE_GET_REGION_IO_FDS = 6,
	VFU_CMD_DEVICE_GET_IRQ_INFO = 7,
	VFU_CMD_DEVICE_SET_IRQS = 8,
	VFU_CMD_REGION_READ = 9,
	VFU_CMD_REGION_WRITE = 10,
	VFU_CMD_DMA_READ = 11,          /* server -> client */
	VFU_CMD_DMA_WRITE = 12,         /* server -> client */
	VFU_CMD_DEVICE_RESET = 13,
	/* 14 was the v1 DIRTY_PAGES command: removed, never send it. */
	VFU_CMD_REGION_WRITE_MULTI = 15,
	VFU_CMD_DEVICE_FEATURE = 16,
	VFU_CMD_MIG_DATA_READ = 17,
	VFU_CMD_MIG_DATA_WRITE = 18,
};
#define VFU_CMD_MAX 18

/* Header flags. Bits 6-31 are undefined: never set, ignored on receipt. */
#define VFU_F_TYPE_MASK     0xfu
#define VFU_F_TYPE_COMMAND  0x0u
#define VFU_F_TYPE_REPLY    0x1u
#define VFU_F_NO_REPLY      0x10u   /* command: the sender wants no reply */
#define VFU_F_ERROR         0x20u   /* reply: the command failed, see error */

/* Precedes every message, command or reply. */
struct vfu_hdr {
	uint16_t msg_id;     /* chosen by the sender of a command, echoed in the reply */
	uint16_t cmd;        /* enum vfu_cmd, echoed in the reply */
	uint32_t msg_size;   /* whole message including this header */
	uint32_t flags;      /* VFU_F_* */
	uint32_t error;      /* reply with VFU_F_ERROR: positive errno (may be 0) */
} VFU_PACKED;

/* ------------------------------------------------------------------------ */
/* Limits                                                                    */

/* Capability defaults when a peer does not state them (spec, VERSION). */
#define VFU_DEFAULT_MAX_MSG_FDS        1u
#define VFU_DEFAULT_MAX_DATA_XFER_SIZE (1u << 20)
#define VFU_DEFAULT_MAX_DMA_MAPS       65535u
#define VFU_DEFAULT_PGSIZES            4096ull

/*
 * Our own hard caps. Every count in REGION_READ/WRITE, DMA_READ/WRITE and
 * MIG_DATA_READ/WRITE is bounded by a max_data_xfer_size; a message is that
 * data plus a fixed part of at most 32 bytes including the header. The other
 * messages (VERSION JSON, region info with capabilities, IO_FDS, WRITE_MULTI
 * of 200 writes = 4808 bytes, DMA logging with ranges) fit in the slack for
 * any max_data_xfer_size >= 4096, so one bound covers every message:
 * VFU_MSG_SIZE_FOR_XFER(our advertised max_data_xfer_size).
 * max_data_xfer_size itself must lie in [4096, 16 MiB]: QEMU and libvfio-user
 * use 1 MiB; 16 MiB keeps a hostile peer from making us buffer more.
 */
#define VFU_MIN_DATA_XFER_SIZE  4096u
#define VFU_MAX_DATA_XFER_SIZE  (16u << 20)
/* The smallest max_data_xfer_size a peer may state (the spec sets none;
 * libvfio-user's sample client states 1024). */
#define VFU_MIN_PEER_XFER_SIZE  64u
#define VFU_MSG_SLACK           4096u
#define VFU_MSG_SIZE_FOR_XFER(x) ((size_t)(x) + VFU_MSG_SLACK)
/* Absolute bound: no message larger than this is ever accepted or sent. */
#define VFU_MAX_MSG_SIZE        VFU_MSG_SIZE_FOR_XFER(VFU_MAX_DATA_XFER_SIZE)
/* File descriptors in one message, both directions (QEMU's limit too). */
#define VFU_MAX_FDS             16u
/* Most guest memory a server maps in all: 1 TiB, whose DMA logging bitmaps
 * take 32 MiB at 4 KiB pages (the DMA_MAP windows are client-sized). */
#define VFU_MAX_DMA_TOTAL       (1ull << 40)
/* REGION_WRITE_MULTI: QEMU batches at most 200; the spec sets no limit. */
#define VFU_WRITE_MULTI_MAX     200u
/* Region info: keep the capability walk bounded. */
#define VFU_MAX_REGION_CAPS     32u

/* ------------------------------------------------------------------------ */
/* Payloads. "argsz" in a request is the largest reply payload the sender    */
/* accepts, except DMA_MAP and SET_IRQS where it is the request's own size.  */

/* VERSION (request and reply): JSON text follows, NUL-terminated, optional. */
struct vfu_version {
	uint16_t major;
	uint16_t minor;
	char data[];
} VFU_PACKED;

/* DMA_MAP request; the reply has no payload. An fd comes along when the
 * region can be mmap()ed at offset; without one, use DMA_READ/DMA_WRITE. */
struct vfu_dma_map {
	uint32_t argsz;      /* sizeof(struct vfu_dma_map) */
	uint32_t flags;      /* VFU_DMA_F_* */
	uint64_t offset;     /* file offset within the fd, 0 without one */
	uint64_t addr;       /* DMA (IOVA) base */
	uint64_t size;
} VFU_PACKED;
#define VFU_DMA_F_READ  (1u << 0)
#define VFU_DMA_F_WRITE (1u << 1)

/* DMA_UNMAP request; the reply echoes it. addr and size must match a map. */
struct vfu_dma_unmap {
	uint32_t argsz;      /* max reply payload: >= sizeof(struct vfu_dma_unmap) */
	uint32_t flags;      /* spec: unused (0) */
	uint64_t addr;
	uint64_t size;
} VFU_PACKED;
/* libvfio-user extension, not in the spec: unmap everything (addr = size = 0). */
#define VFU_DMA_UNMAP_F_ALL (1u << 1)

/* DEVICE_GET_INFO request (all but argsz zero) and reply. */
struct vfu_device_info {
	uint32_t argsz;      /* reply: 16 */
	uint32_t flags;      /* VFU_DEVICE_F_* */
	uint32_t num_regions;
	uint32_t num_irqs;
} VFU_PACKED;
#define VFU_DEVICE_F_RESET (1u << 0)
#define VFU_DEVICE_F_PCI   (1u << 1)

/* Standard PCI indexes (linux/vfio.h). */
#define VFU_PCI_BAR0_REGION_INDEX   0u
#define VFU_PCI_ROM_REGION_INDEX    6u
#define VFU_PCI_CONFIG_REGION_INDEX 7u
#define VFU_PCI_VGA_REGION_INDEX    8u
#define VFU_PCI_NUM_REGIONS         9u
#define VFU_PCI_INTX_IRQ_INDEX      0u
#define VFU_PCI_MSI_IRQ_INDEX       1u
#define VFU_PCI_MSIX_IRQ_INDEX      2u
#define VFU_PCI_ERR_IRQ_INDEX       3u
#define VFU_PCI_REQ_IRQ_INDEX       4u
#define VFU_PCI_NUM_IRQS            5u

/*
 * DEVICE_GET_REGION_INFO request (index only) and reply. The reply's argsz is
 * the size needed for the info plus its capabilities; when that exceeds the
 * request's argsz, the capabilities are left out and the client asks again.
 * With VFU_REGION_F_MMAP the reply carries one fd to mmap() at offset.
 */
struct vfu_region_info {
	uint32_t argsz;
	uint32_t flags;      /* VFU_REGION_F_* */
	uint32_t index;
	uint32_t cap_offset; /* from the start of this struct; 0 = no caps */
	uint64_t size;
	uint64_t offset;     /* mmap() offset, base of sparse areas */
} VFU_PACKED;
#define VFU_REGION_F_READ  (1u << 0)
#define VFU_REGION_F_WRITE (1u << 1)
#define VFU_REGION_F_MMAP  (1u << 2)
#define VFU_REGION_F_CAPS  (1u << 3)

/* A region capability list entry; next is from the start of the region info. */
struct vfu_cap_hdr {
	uint16_t id;         /* VFU_REGION_CAP_* */
	uint16_t version;
	uint32_t next;       /* 0 ends the list */
} VFU_PACKED;
#define VFU_REGION_CAP_SPARSE_MMAP 1u   /* version 1 */
#define VFU_REGION_CAP_TYPE        2u   /* version 1, device-specific regions */

struct vfu_sparse_area {
	uint64_t offset;     /* added to vfu_region_info.offset for mmap() */
	uint64_t size;
} VFU_PACKED;

struct vfu_cap_sparse_mmap {
	struct vfu_cap_hdr hdr;
	uint32_t nr_areas;
	uint32_t reserved;
	struct vfu_sparse_area areas[];
} VFU_PACKED;

struct vfu_cap_type {
	struct vfu_cap_hdr hdr;
	uint32_t type;
	uint32_t subtype;
} VFU_PACKED;

/*
 * DEVICE_GET_REGION_IO_FDS request (flags = count = 0) and reply (followed by
 * count sub-regions, 40 bytes each today; the reply carries >= 1 fd).
 */
struct vfu_region_io_fds {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t count;
} VFU_PACKED;
/* The spec names the types but gives no values: these are libvfio-user's. */
#define VFU_IO_FD_TYPE_IOEVENTFD  0u
#define VFU_IO_FD_TYPE_IOREGIONFD 1u
/* KVM_IOEVENTFD_FLAG_* (linux/kvm.h) for ioeventfd sub-regions. */
#define VFU_IOEVENTFD_F_DATAMATCH         (1u << 0)
#define VFU_IOEVENTFD_F_PIO               (1u << 1)
#define VFU_IOEVENTFD_F_VIRTIO_CCW_NOTIFY (1u << 3)

struct vfu_sub_region_ioeventfd {
	uint64_t offset;
	uint64_t size;
	uint32_t fd_index;   /* into the reply's fds, may be shared */
	uint32_t type;       /* VFU_IO_FD_TYPE_IOEVENTFD */
	uint32_t flags;      /* VFU_IOEVENTFD_F_* */
	uint32_t padding;
	uint64_t datamatch;
} VFU_PACKED;

struct vfu_sub_region_ioregionfd {
	uint64_t offset;
	uint64_t size;
	uint32_t fd_index;
	uint32_t type;       /* VFU_IO_FD_TYPE_IOREGIONFD */
	uint32_t flags;
	uint32_t padding;
	uint64_t user_data;
} VFU_PACKED;

/* DEVICE_GET_IRQ_INFO request (index only) and reply. */
struct vfu_irq_info {
	uint32_t argsz;      /* 16 */
	uint32_t flags;      /* VFU_IRQ_INFO_F_* */
	uint32_t index;
	uint32_t count;
} VFU_PACKED;
#define VFU_IRQ_INFO_F_EVENTFD    (1u << 0)
#define VFU_IRQ_INFO_F_MASKABLE   (1u << 1)
#define VFU_IRQ_INFO_F_AUTOMASKED (1u << 2)
#define VFU_IRQ_INFO_F_NORESIZE   (1u << 3)

/*
 * DEVICE_SET_IRQS request; the reply has no payload. DATA_BOOL: count bytes
 * follow. DATA_EVENTFD: count eventfds come as fds, or none to de-assign.
 * count = start = 0 with DATA_NONE disables every interrupt of the index.
 */
struct vfu_irq_set {
	uint32_t argsz;      /* this payload's size, data included */
	uint32_t flags;      /* one VFU_IRQ_SET_DATA_* | one VFU_IRQ_SET_ACTION_* */
	uint32_t index;
	uint32_t start;
	uint32_t count;
	uint8_t data[];
} VFU_PACKED;
#define VFU_IRQ_SET_DATA_NONE      (1u << 0)
#define VFU_IRQ_SET_DATA_BOOL      (1u << 1)
#define VFU_IRQ_SET_DATA_EVENTFD   (1u << 2)
#define VFU_IRQ_SET_ACTION_MASK    (1u << 3)
#define VFU_IRQ_SET_ACTION_UNMASK  (1u << 4)
#define VFU_IRQ_SET_ACTION_TRIGGER (1u << 5)
#define VFU_IRQ_SET_DATA_TYPE_MASK \
	(VFU_IRQ_SET_DATA_NONE | VFU_IRQ_SET_DATA_BOOL | VFU_IRQ_SET_DATA_EVENTFD)
#define VFU_IRQ_SET_ACTION_TYPE_MASK \
	(VFU_IRQ_SET_ACTION_MASK | VFU_IRQ_SET_ACTION_UNMASK | VFU_IRQ_SET_ACTION_TRIGGER)

/*
 * REGION_READ request (no data) / reply (count bytes of data);
 * REGION_WRITE request (count bytes of data) / reply (no data).
 */
struct vfu_region_rw {
	uint64_t offset;
	uint32_t region;
	uint32_t count;      /* <= the receiver's max_data_xfer_size */
	uint8_t data[];
} VFU_PACKED;

/*
 * DMA_READ request (no data) / reply (count bytes); DMA_WRITE request (count
 * bytes) / reply (no data). Server to client. The spec's DMA_WRITE reply table
 * gives count 4 bytes (a 12-byte payload); libvfio-user sends and expects the
 * full 16 bytes. Send 16 (the low 4 bytes of a little-endian u64 are the u32),
 * accept >= VFU_DMA_WRITE_REPLY_MIN.
 */
struct vfu_dma_rw {
	uint64_t addr;
	uint64_t count;      /* <= the receiver's max_data_xfer_size */
	uint8_t data[];
} VFU_PACKED;
#define VFU_DMA_WRITE_REPLY_MIN 12u

/* REGION_WRITE_MULTI request (wr_cnt entries, count <= 8 each) and reply. */
struct vfu_write_one {
	uint64_t offset;
	uint32_t region;
	uint32_t count;      /* 1..8 */
	uint8_t data[8];
} VFU_PACKED;

struct vfu_write_multi {
	uint64_t wr_cnt;     /* reply: number of writes completed */
	struct vfu_write_one wrs[];
} VFU_PACKED;

/*
 * DEVICE_FEATURE request and reply. A SET or PROBE reply echoes the request;
 * a GET reply appends the feature data and sets argsz to the full size.
 */
struct vfu_device_feature {
	uint32_t argsz;      /* request: max reply payload */
	uint32_t flags;      /* feature index | VFU_FEATURE_GET/SET/PROBE */
	uint8_t data[];
} VFU_PACKED;
#define VFU_FEATURE_MASK  0xffffu
#define VFU_FEATURE_GET   (1u << 16)
#define VFU_FEATURE_SET   (1u << 17)
#define VFU_FEATURE_PROBE (1u << 18)

enum vfu_feature {
	VFU_FEATURE_MIGRATION = 1,
	VFU_FEATURE_MIG_DEVICE_STATE = 2,
	VFU_FEATURE_DMA_LOGGING_START = 6,
	VFU_FEATURE_DMA_LOGGING_STOP = 7,
	VFU_FEATURE_DMA_LOGGING_REPORT = 8,
};

/* MIGRATION (GET): VFM_MIG_STOP_COPY | VFM_MIG_P2P | VFM_MIG_PRE_COPY. */
struct vfu_feature_migration {
	uint64_t flags;
} VFU_PACKED;

/* MIG_DEVICE_STATE (GET reply, SET request and reply). */
struct vfu_feature_mig_state {
	uint32_t device_state; /* enum vfm_state */
	int32_t data_fd;       /* unused in vfio-user: send -1, ignore */
} VFU_PACKED;

/* DMA_LOGGING_START (SET): num_ranges ranges follow; 0 = log every write. */
struct vfu_dma_logging_range {
	uint64_t iova;
	uint64_t length;
} VFU_PACKED;

struct vfu_dma_logging_control {
	uint64_t page_size;  /* a hint; the reply carries the one chosen */
	uint32_t num_ranges;
	uint32_t reserved;
	struct vfu_dma_logging_range ranges[];
} VFU_PACKED;

/*
 * DMA_LOGGING_REPORT (GET): the reply appends the bitmap at offset 24, u64
 * words, bit n = page (iova + n * page_size); reading clears it. Size it with
 * vfu_bitmap_size(); split ranges so it stays <= max_data_xfer_size.
 */
struct vfu_dma_logging_report {
	uint64_t iova;
	uint64_t length;
	uint64_t page_size;  /* power of two */
	uint64_t bitmap[];
} VFU_PACKED;

/*
 * MIG_DATA_READ request {argsz = 8 + size, size} / reply {argsz = 8 + n,
 * size = n, n bytes}: n < size means no more data for now. MIG_DATA_WRITE
 * request {argsz, size, size bytes} / reply (no payload).
 */
struct vfu_mig_data {
	uint32_t argsz;
	uint32_t size;       /* <= the receiver's max_data_xfer_size */
	uint8_t data[];
} VFU_PACKED;

/*
 * vfiomig_mig_shm (extension, negotiated in VERSION): once the client has
 * passed a window (DEVICE_FEATURE SET VFM_VFU_FEATURE_MIG_SHM, struct
 * vfu_mig_shm_set, one memfd), every MIG_DATA_READ reply and MIG_DATA_WRITE
 * request of the connection is this struct alone: the data bytes are in the
 * window at [offset, offset + size), not in the message. A READ request is
 * the standard struct vfu_mig_data with argsz = sizeof(struct
 * vfu_mig_shm_data) (the reply it takes). The receiver checks the range
 * against the window (the peer's figures are untrusted input).
 */
struct vfu_mig_shm_data {
	uint32_t argsz;      /* sizeof(struct vfu_mig_shm_data) */
	uint32_t size;       /* data bytes, <= max_data_xfer_size */
	uint64_t offset;     /* where they are in the window */
} VFU_PACKED;

/* The SET's data: the window's size (the memfd holds at least that). */
struct vfu_mig_shm_set {
	uint64_t size;       /* multiple of 4096, [4096, VFU_MIG_SHM_MAX] */
} VFU_PACKED;

#define VFU_MIG_SHM_MAX (64u << 20)

/* ------------------------------------------------------------------------ */
/* Layout checks                                                             */

#define VFU_ASSERT_LAYOUT(type, size) \
	_Static_assert(sizeof(struct type) == (size), #type " must be " #size " bytes")
#define VFU_ASSERT_AT(type, field, off) \
	_Static_assert(offsetof(struct type, field) == (off), #type "." #field " must be at " #off)

VFU_ASSERT_LAYOUT(vfu_hdr, 16);
VFU_ASSERT_AT(vfu_hdr, cmd, 2);
VFU_ASSERT_AT(vfu_hdr, msg_size, 4);
VFU_ASSERT_AT(vfu_hdr, flags, 8);
VFU_ASSERT_AT(vfu_hdr, error, 12);
VFU_ASSERT_LAYOUT(vfu_version, 4);
VFU_ASSERT_AT(vfu_version, data, 4);
VFU_ASSERT_LAYOUT(vfu_dma_map, 32);
VFU_ASSERT_AT(vfu_dma_map, offset, 8);
VFU_ASSERT_AT(vfu_dma_map, addr, 16);
VFU_ASSERT_AT(vfu_dma_map, size, 24);
VFU_ASSERT_LAYOUT(vfu_dma_unmap, 24);
VFU_ASSERT_AT(vfu_dma_unmap, addr, 8);
VFU_ASSERT_AT(vfu_dma_unmap, size, 16);
VFU_ASSERT_LAYOUT(vfu_device_info, 16);
VFU_ASSERT_AT(vfu_device_info, num_irqs, 12);
VFU_ASSERT_LAYOUT(vfu_region_info, 32);
VFU_ASSERT_AT(vfu_region_info, cap_offset, 12);
VFU_ASSERT_AT(vfu_region_info, size, 16);
VFU_ASSERT_AT(vfu_region_info, offset, 24);
VFU_ASSERT_LAYOUT(vfu_cap_hdr, 8);
VFU_ASSERT_AT(vfu_cap_hdr, next, 4);
VFU_ASSERT_LAYOUT(vfu_sparse_area, 16);
VFU_ASSERT_LAYOUT(vfu_cap_sparse_mmap, 16);
VFU_ASSERT_AT(vfu_cap_sparse_mmap, nr_areas, 8);
VFU_ASSERT_AT(vfu_cap_sparse_mmap, areas, 16);
VFU_ASSERT_LAYOUT(vfu_cap_type, 16);
VFU_ASSERT_LAYOUT(vfu_region_io_fds, 16);
VFU_ASSERT_AT(vfu_region_io_fds, count, 12);
VFU_ASSERT_LAYOUT(vfu_sub_region_ioeventfd, 40);
VFU_ASSERT_AT(vfu_sub_region_ioeventfd, fd_index, 16);
VFU_ASSERT_AT(vfu_sub_region_ioeventfd, type, 20);
VFU_ASSERT_AT(vfu_sub_region_ioeventfd, datamatch, 32);
VFU_ASSERT_LAYOUT(vfu_sub_region_ioregionfd, 40);
VFU_ASSERT_AT(vfu_sub_region_ioregionfd, user_data, 32);
VFU_ASSERT_LAYOUT(vfu_irq_info, 16);
VFU_ASSERT_LAYOUT(vfu_irq_set, 20);
VFU_ASSERT_AT(vfu_irq_set, start, 12);
VFU_ASSERT_AT(vfu_irq_set, count, 16);
VFU_ASSERT_AT(vfu_irq_set, data, 20);
VFU_ASSERT_LAYOUT(vfu_region_rw, 16);
VFU_ASSERT_AT(vfu_region_rw, region, 8);
VFU_ASSERT_AT(vfu_region_rw, count, 12);
VFU_ASSERT_AT(vfu_region_rw, data, 16);
VFU_ASSERT_LAYOUT(vfu_dma_rw, 16);
VFU_ASSERT_AT(vfu_dma_rw, count, 8);
VFU_ASSERT_AT(vfu_dma_rw, data, 16);
VFU_ASSERT_LAYOUT(vfu_write_one, 24);
VFU_ASSERT_AT(vfu_write_one, data, 16);
VFU_ASSERT_LAYOUT(vfu_write_multi, 8);
VFU_ASSERT_AT(vfu_write_multi, wrs, 8);
VFU_ASSERT_LAYOUT(vfu_device_feature, 8);
VFU_ASSERT_AT(vfu_device_feature, data, 8);
VFU_ASSERT_LAYOUT(vfu_feature_migration, 8);
VFU_ASSERT_LAYOUT(vfu_feature_mig_state, 8);
VFU_ASSERT_AT(vfu_feature_mig_state, data_fd, 4);
VFU_ASSERT_LAYOUT(vfu_dma_logging_range, 16);
VFU_ASSERT_LAYOUT(vfu_dma_logging_control, 16);
VFU_ASSERT_AT(vfu_dma_logging_control, num_ranges, 8);
VFU_ASSERT_AT(vfu_dma_logging_control, ranges, 16);
VFU_ASSERT_LAYOUT(vfu_dma_logging_report, 24);
VFU_ASSERT_AT(vfu_dma_logging_report, page_size, 16);
VFU_ASSERT_AT(vfu_dma_logging_report, bitmap, 24);
VFU_ASSERT_LAYOUT(vfu_mig_data, 8);
VFU_ASSERT_AT(vfu_mig_data, data, 8);
_Static_assert(VFU_WRITE_MULTI_MAX * sizeof(struct vfu_write_one) + 8 <= VFU_MSG_SLACK + VFU_MIN_DATA_XFER_SIZE,
	       "a full WRITE_MULTI must fit the smallest message bound");
_Static_assert(VFU_MAX_MSG_SIZE <= UINT32_MAX, "msg_size is 32 bits");

/* ------------------------------------------------------------------------ */
/* Message I/O. Nothing here locks: one sender and one receiver per socket   */
/* at a time (a message's bytes must not interleave with another's).         */

/* A received message. Owns payload and fds until vfu_msg_release(). */
struct vfu_msg {
	struct vfu_hdr hdr;
	void *payload;       /* hdr.msg_size - 16 bytes (malloc'd), NULL when 0 */
	size_t len;          /* payload length */
	int fds[VFU_MAX_FDS];/* close-on-exec; -1 once taken */
	size_t nfds;
};

/* A struct vfu_msg holding nothing; safe to release. */
#define VFU_MSG_INIT { .payload = NULL, .len = 0, .nfds = 0 }

/* Frees the payload and closes every fd still owned; leaves *m empty. */
void vfu_msg_release(struct vfu_msg *m);

/* Takes fd i out of m (the caller now owns it); -1 when i is out of range. */
int vfu_msg_take_fd(struct vfu_msg *m, size_t i);

/*
 * Sends header + payload in one sendmsg() (more calls only for what a partial
 * write leaves), with fds as SCM_RIGHTS on the first byte, MSG_NOSIGNAL.
 * hdr->msg_size is computed from len; a non-zero value that disagrees is
 * -EINVAL. nfds <= VFU_MAX_FDS (else -EINVAL), 16 + len <= VFU_MAX_MSG_SIZE
 * (else -EMSGSIZE). Works on blocking and non-blocking sockets. timeout_ms
 * bounds waiting for socket space (-1: forever); -ETIMEDOUT after part of a
 * message was written leaves the stream broken. A closed peer gives -EPIPE or
 * -ECONNRESET ("vfio-user peer closed the connection").
 */
int vfu_send_timeout(int fd, const struct vfu_hdr *hdr, const void *payload, size_t len,
		     const int *fds, size_t nfds, int timeout_ms, struct vfm_error *err);
/* vfu_send_timeout() with no time limit. */
int vfu_send(int fd, const struct vfu_hdr *hdr, const void *payload, size_t len,
	     const int *fds, size_t nfds, struct vfm_error *err);

/*
 * Receives one message into *m (which must hold nothing: VFU_MSG_INIT or
 * released). The header is read first; msg_size is checked (>= 16, else
 * VFM_EPROTOCOL; <= min(max_size, VFU_MAX_MSG_SIZE), else -EMSGSIZE) before
 * anything is allocated; then the body. fds are accepted with any part of the
 * message (MSG_CMSG_CLOEXEC); more than VFU_MAX_FDS, or a truncated control
 * message, closes them all and fails with VFM_EPROTOCOL.
 *
 * timeout_ms bounds the whole receive: -1 waits forever, 0 takes only what is
 * ready now. Return codes:
 *   0             a message; the caller releases it
 *   -EAGAIN       timeout_ms == 0 and nothing was ready   } nothing consumed:
 *   -ETIMEDOUT    no byte arrived within timeout_ms       } the stream is intact
 *   -ECONNRESET   the peer closed ("vfio-user peer closed the connection"),
 *                 also in the middle of a message
 *   VFM_EPROTOCOL the message started but did not complete in time, bad
 *                 msg_size, bad fds
 *   -EMSGSIZE, -ENOMEM, other -errno from recvmsg()/poll()
 * After any error but -EAGAIN/-ETIMEDOUT the stream is out of step: close it.
 * The header is not otherwise judged: see vfu_check_hdr().
 */
int vfu_recv(int fd, struct vfu_msg *m, size_t max_size, int timeout_ms,
	     struct vfm_error *err);

/* ------------------------------------------------------------------------ */
/* Headers, replies, errors                                                  */

static inline bool vfu_hdr_is_reply(const struct vfu_hdr *h)
{
	return (h->flags & VFU_F_TYPE_MASK) == VFU_F_TYPE_REPLY;
}

static inline bool vfu_hdr_wants_reply(const struct vfu_hdr *h)
{
	return !vfu_hdr_is_reply(h) && !(h->flags & VFU_F_NO_REPLY);
}

/* A command header (msg_size left 0 for vfu_send to fill); flags may add NO_REPLY. */
void vfu_hdr_command(struct vfu_hdr *out, uint16_t msg_id, uint16_t cmd, uint32_t flags);

/* The reply header for req: same msg_id and cmd, type REPLY, no error. */
void vfu_hdr_reply(struct vfu_hdr *out, const struct vfu_hdr *req);

/*
 * The error reply header for req: REPLY | ERROR and error = the positive errno.
 * errnum may be a negative errno, a positive one or a VFM_E* code (sent as
 * EINVAL, ENOTTY for VFM_ENOMIGRATION); 0 becomes EINVAL.
 */
void vfu_hdr_error(struct vfu_hdr *out, const struct vfu_hdr *req, int errnum);

/* The positive errno vfu_hdr_error() puts on the wire for errnum. */
uint32_t vfu_wire_errno(int errnum);

/* Sends the reply to req (payload and fds optional). */
int vfu_send_reply(int fd, const struct vfu_hdr *req, const void *payload, size_t len,
		   const int *fds, size_t nfds, struct vfm_error *err);

/* Sends an error reply to req: the header only, as the spec requires. */
int vfu_send_error(int fd, const struct vfu_hdr *req, int errnum, struct vfm_error *err);

/*
 * Frames every received message: type must be COMMAND or REPLY (else
 * VFM_EPROTOCOL). Undefined flag bits are ignored, as is the error field of a
 * command. The command number is the dispatcher's business (ENOSYS).
 */
int vfu_check_hdr(const struct vfu_hdr *h, struct vfm_error *err);

/*
 * Judges reply as the answer to the command req: it must be a REPLY with the
 * same msg_id and cmd (else VFM_EPROTOCOL). With VFU_F_ERROR returns -error
 * (-EIO when the peer sent 0) and says which command failed; any payload of an
 * error reply is ignored. Otherwise 0.
 */
int vfu_reply_status(const struct vfu_hdr *req, const struct vfu_msg *reply,
		     struct vfm_error *err);

/* ------------------------------------------------------------------------ */
/* Validation helpers: each returns 0 or a negative errno with a message     */
/* naming the command (from m->hdr.cmd) and the numbers involved.            */

/* m->len >= min_len, else -EINVAL. */
int vfu_check_payload(const struct vfu_msg *m, size_t min_len, struct vfm_error *err);
/* m->len == len exactly, else -EINVAL. */
int vfu_check_payload_exact(const struct vfu_msg *m, size_t len, struct vfm_error *err);

/*
 * min_argsz <= argsz <= max_argsz, else -EINVAL. For a request whose argsz is
 * its own size (DMA_MAP, SET_IRQS) pass max_argsz = m->len; for one whose
 * argsz bounds the reply pass the largest reply you would build.
 */
int vfu_check_argsz(const struct vfu_msg *m, uint32_t argsz, size_t min_argsz,
		    size_t max_argsz, struct vfm_error *err);
/*
 * The preamble of a request that starts with its u32 argsz: the payload holds
 * at least req_size bytes, they are copied to req, and argsz is checked as
 * vfu_check_argsz does. 0 or -EINVAL with the reason in err.
 */
int vfu_take_request(const struct vfu_msg *m, void *req, size_t req_size, size_t min_argsz,
		     size_t max_argsz, struct vfm_error *err);
/* Every request vfu_take_request serves has argsz first. */
#define VFU_ARGSZ_FIRST(type) _Static_assert(offsetof(type, argsz) == 0, #type ": argsz first")

/* A data count within max_xfer (the receiver's max_data_xfer_size), else -E2BIG. */
int vfu_check_count(const struct vfu_msg *m, uint64_t count, uint64_t max_xfer,
		    struct vfm_error *err);

/* offset + count stays within size, without overflow. count 0 at offset == size is ok. */
static inline bool vfu_range_ok(uint64_t offset, uint64_t count, uint64_t size)
{
	return offset <= size && count <= size - offset;
}

/* vfu_range_ok() or -EINVAL with a message naming what (e.g. "region 2"). */
int vfu_check_range(const struct vfu_msg *m, uint64_t offset, uint64_t count,
		    uint64_t size, const char *what, struct vfm_error *err);

/* min_fds <= m->nfds <= max_fds, else -EINVAL. */
int vfu_check_nfds(const struct vfu_msg *m, size_t min_fds, size_t max_fds,
		   struct vfm_error *err);

/*
 * A whole SET_IRQS request: payload >= 20, argsz == payload length, exactly
 * one DATA and one ACTION flag and nothing else, DATA_BOOL with count bytes of
 * data, otherwise no data; DATA_EVENTFD with 0 or count fds (max_fds at most),
 * otherwise none; count 0 only with DATA_NONE. On success *out is a copy of
 * the fixed part (data stays at m->payload + 20).
 */
int vfu_check_irq_set(const struct vfu_msg *m, size_t max_fds, struct vfu_irq_set *out,
		      struct vfm_error *err);

/*
 * DEVICE_FEATURE flags: no bits beyond the index and GET/SET/PROBE, GET and
 * SET together only with PROBE, at least one of the three. -EINVAL otherwise.
 */
int vfu_check_feature_flags(uint32_t flags, struct vfm_error *err);

/*
 * Bytes of the DMA logging bitmap for length bytes at page_size granularity,
 * whole u64 words. page_size must be a power of two >= 4096 and length > 0,
 * else -EINVAL.
 */
int vfu_bitmap_size(uint64_t length, uint64_t page_size, uint64_t *bytes,
		    struct vfm_error *err);

/* ------------------------------------------------------------------------ */
/* VERSION and capabilities                                                  */

/* Which capability keys are present (parsed) or to be emitted (to_json). */
#define VFU_CAP_MAX_MSG_FDS        (1u << 0)
#define VFU_CAP_MAX_DATA_XFER_SIZE (1u << 1)
#define VFU_CAP_MAX_DMA_MAPS       (1u << 2)
#define VFU_CAP_PGSIZES            (1u << 3)
#define VFU_CAP_TWIN_SOCKET        (1u << 4)
#define VFU_CAP_WRITE_MULTIPLE     (1u << 5)
#define VFU_CAP_MIGRATION          (1u << 6)  /* v1 leftover {"pgsize": N} */
/*
 * vfiomig extension "vfiomig_whole_messages": true: this side reads every
 * message it receives whole, however many reads that takes, so a peer may
 * send requests carrying up to max_data_xfer_size of data. Not in the spec;
 * libvfio-user ignores keys it does not know (lib/tran.c
 * tran_parse_version_json(), efd091b) and reads a body with one recv(), so a
 * peer that does not state it gets requests of at most 32 KiB of data
 * (client.h CLI_MAX_SEND_DATA). docs/vfio-user-client.md, "Extensions".
 */
#define VFU_CAP_WHOLE_MESSAGES     (1u << 7)
/*
 * vfiomig extension "vfiomig_mig_shm": true: this side moves migration data
 * through a shared-memory window the client passes (DEVICE_FEATURE SET of
 * VFM_VFU_FEATURE_MIG_SHM with a memfd) instead of MIG_DATA_READ/WRITE
 * payloads. On only when both sides state it; a peer that does not
 * (libvfio-user ignores the key) gets the standard messages.
 * docs/vfio-user-server.md, "Extensions".
 */
#define VFU_CAP_MIG_SHM            (1u << 8)

/*
 * The "capabilities" object. Every field holds its effective value (the spec
 * default when the key is absent); present says which keys were/are written.
 * max_msg_fds and max_data_xfer_size describe what the *sender* accepts.
 */
struct vfu_caps {
	uint32_t present;             /* VFU_CAP_* */
	uint32_t max_msg_fds;         /* <= VFU_MAX_FDS */
	uint32_t max_data_xfer_size;  /* [VFU_MIN_DATA_XFER_SIZE, VFU_MAX_DATA_XFER_SIZE] */
	uint32_t max_dma_maps;
	uint64_t pgsizes;             /* OR of page sizes, each >= 4096 */
	bool twin_socket;             /* twin_socket.supported */
	int32_t twin_socket_fd_index; /* twin_socket.fd_index (replies only), -1 = absent */
	bool write_multiple;
	uint64_t migration_pgsize;    /* "migration":{"pgsize"}, 0 = absent */
	bool whole_messages;          /* "vfiomig_whole_messages" (extension) */
	bool mig_shm;                 /* "vfiomig_mig_shm" (extension) */
};

/* A decoded VERSION payload. */
struct vfu_version_info {
	uint16_t major;
	uint16_t minor;
	struct vfu_caps caps;
};

/* Spec defaults, present = 0, twin_socket_fd_index = -1. */
void vfu_caps_init(struct vfu_caps *c);

/*
 * The JSON text {"capabilities":{...}} with the keys in c->present, malloc'd,
 * NUL-terminated; *len counts the NUL (the bytes to put on the wire).
 * Values out of range are -EINVAL (we never send what we would refuse).
 */
int vfu_caps_to_json(const struct vfu_caps *c, char **json, size_t *len,
		     struct vfm_error *err);

/*
 * Parses version data: the bytes after major/minor, len counting the NUL.
 * len 0 (no JSON) gives the defaults. Otherwise the text must end with its
 * only NUL at data[len - 1], be one JSON object and nothing more; a
 * "capabilities" member, if any, must be an object. Known keys must have their
 * type (numbers: non-negative integers; booleans; objects) and range, else
 * VFM_EPROTOCOL; unknown keys at any level are ignored.
 */
int vfu_caps_parse(const char *data, size_t len, struct vfu_caps *out,
		   struct vfm_error *err);

/* A whole VERSION payload (malloc'd) from major, minor and caps. */
int vfu_version_encode(uint16_t major, uint16_t minor, const struct vfu_caps *c,
		       void **payload, size_t *len, struct vfm_error *err);

/* Decodes a received VERSION message (command or reply). */
int vfu_version_decode(const struct vfu_msg *m, struct vfu_version_info *out,
		       struct vfm_error *err);

/*
 * What a server answers: major as proposed, minor = min(proposed, ours), and
 * only capabilities the proposal allows: server limits for max_msg_fds,
 * max_data_xfer_size and migration, max_dma_maps <= proposed, pgsizes &
 * proposed, write_multiple and twin_socket only if proposed and ours (the
 * twin_socket fd index is left -1: the server fills it in when it sends the
 * fd). -EPROTONOSUPPORT when the proposed major is not ours.
 */
int vfu_version_make_reply(const struct vfu_version_info *proposed,
			   const struct vfu_version_info *ours,
			   struct vfu_version_info *reply, struct vfm_error *err);

/* The outcome of a VERSION exchange, from one side's point of view. */
struct vfu_negotiated {
	uint16_t major, minor;
	uint32_t local_max_fds;     /* fds the peer may send us per message */
	uint32_t peer_max_fds;      /* fds we may send the peer per message */
	uint32_t local_max_xfer;    /* largest count we accept */
	uint32_t peer_max_xfer;     /* largest count the peer accepts */
	uint32_t max_xfer;          /* min of the two: use for what we originate */
	uint32_t max_dma_maps;      /* the server's */
	uint64_t pgsizes;           /* the server's, a subset of the client's */
	bool write_multiple;
	bool whole_messages;        /* both sides read messages whole (extension) */
	bool mig_shm;               /* both sides take migration data by window (extension) */
	bool twin_socket;           /* twin-socket mode is on */
	int32_t twin_socket_fd_index; /* index into the VERSION reply's fds, or -1 */
	size_t max_msg_size;        /* VFU_MSG_SIZE_FOR_XFER(local_max_xfer): for vfu_recv */
};

/*
 * Checks reply against proposed per the spec and computes the session.
 * local_is_client picks the point of view. reply_nfds is the number of fds
 * that came with the reply. VFM_EPROTOCOL when: the major differs, the minor
 * is higher, pgsizes is not a subset, max_dma_maps is higher, write_multiple
 * or twin_socket is on without being proposed, or twin_socket is on without
 * an fd_index below reply_nfds. Keys that state the sender's own limits
 * (max_msg_fds, max_data_xfer_size) and unknown keys may appear unproposed:
 * libvfio-user servers always send them.
 */
int vfu_version_negotiate(const struct vfu_version_info *proposed,
			  const struct vfu_version_info *reply, size_t reply_nfds,
			  bool local_is_client, struct vfu_negotiated *out,
			  struct vfm_error *err);

/* ------------------------------------------------------------------------ */
/* Names for logs                                                            */

/* "VERSION", "DMA_MAP", ..., "UNKNOWN" (14 included: removed). */
const char *vfu_cmd_name(uint16_t cmd);
/* "MIGRATION", "MIG_DEVICE_STATE", "DMA_LOGGING_START", ..., "UNKNOWN". */
const char *vfu_feature_name(uint32_t feature);

#endif
