/*
 * A scriptable vfio-user server for client tests, written from the spec
 * with the codec: it runs in a forked child over a socketpair (or a listening
 * socket), models a small PCI device with a migration state machine and DMA
 * logging, and acts on commands the test writes to a "doorbell" region
 * (server-initiated DMA, dying, hanging, garbage replies). What it saw is
 * readable from a "stats" region.
 */
#ifndef VFM_TESTS_FAKE_VFU_SERVER_H
#define VFM_TESTS_FAKE_VFU_SERVER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "vfiomig/device.h"
#include "vfiomig/vfio_user.h"

/* Regions (9, as a PCI device has). */
#define FAKE_R_MEM      0u   /* 2 MiB of RAM, messages only */
#define FAKE_R_MMAP     1u   /* 16 KiB memfd; sparse mmap area [0x1000, 0x3000) */
#define FAKE_R_STATS    2u   /* struct fake_stats, read-only */
#define FAKE_R_DOORBELL 3u   /* write a struct fake_cmd: the server acts on it */
#define FAKE_R_MANY     4u   /* 40 pages, 20 sparse areas: info needs a bigger argsz */
#define FAKE_R_ROM      6u   /* GET_REGION_INFO fails with ENOENT */
#define FAKE_R_CONFIG   7u   /* 256 bytes */
#define FAKE_NUM_REGIONS 9u
#define FAKE_NUM_IRQS    5u
#define FAKE_MEM_SIZE   (2u << 20)
#define FAKE_MMAP_SIZE  0x4000u
#define FAKE_MANY_AREAS 20u

struct fake_cfg {
	uint32_t max_xfer;          /* advertised max_data_xfer_size; 0: 1 MiB */
	uint32_t max_fds;           /* advertised max_msg_fds; 0: 8 */
	const char *version_json;   /* VERSION reply JSON; NULL: built, with unknown keys */
	int reply_major;            /* -1 (default via 0 flag below): as proposed */
	int reply_minor;
	bool set_version;           /* use reply_major/reply_minor */
	bool version_error;         /* answer VERSION with EPROTONOSUPPORT */
	bool version_silent;        /* never answer VERSION */
	uint64_t mig_flags;         /* 0: STOP_COPY | PRE_COPY (libvfio-user's) */
	bool no_migration;          /* MIGRATION feature -> ENOTTY */
	bool no_logging;            /* DMA logging -> ENOTTY */
	uint64_t log_page_size;     /* page size the server picks; 0: as asked */
	uint32_t precopy_bytes;     /* initial pre-copy data */
	uint32_t stopcopy_bytes;    /* data only STOP_COPY gives */
	int fail_state;             /* stepping into this state fails (EIO); 0: never */
	uint32_t read_cap;          /* MIG_DATA_READ gives at most this much; 0: no cap */
	int unknown_feature_errno;  /* an unknown DEVICE_FEATURE gets this (0: ENOTTY;
				     * libvfio-user: EINVAL); -1: no reply at all */
	/* vfiomig_mig_shm: take the window (SET 0xf002) and move migration
	 * data through it (version_json must state the key too). */
	bool mig_shm;
	/* ... and name this offset in MIG_DATA_READ replies (a hostile server
	 * names one outside the window), and add shm_extra to the size. */
	uint64_t shm_read_offset;
	uint32_t shm_extra;
};

/* What the doorbell can be asked to do. */
enum fake_op {
	FAKE_OP_DMA_WRITE = 1,   /* DMA_WRITE message(s) of len bytes, waiting for the reply */
	FAKE_OP_DMA_WRITE_ASYNC, /* the same after replying to the doorbell write */
	FAKE_OP_DMA_READ,        /* DMA_READ of len bytes; checksum -> stats.checksum */
	FAKE_OP_CHECKSUM_MAP,    /* checksum of [addr, addr+len) through the server's mmap */
	FAKE_OP_POKE_MAP,        /* pattern into [addr, addr+len) through the server's mmap */
	FAKE_OP_DIE,             /* SIGKILL itself without replying */
	FAKE_OP_HANG,            /* never answer again */
	FAKE_OP_BAD_ID,          /* reply with another msg_id */
	FAKE_OP_BAD_CMD,         /* reply with another cmd */
	FAKE_OP_BAD_SIZE,        /* reply header claiming 1 GiB */
	FAKE_OP_ERRNO,           /* error reply with errno arg (0 allowed) */
	FAKE_OP_ADD_PRECOPY,     /* arg more pre-copy bytes */
	FAKE_OP_DMA_WRITE_RAW,   /* DMA_WRITE with count = len but arg data bytes */
	FAKE_OP_SLOW,            /* answer normally, but after arg ms */
};

struct fake_cmd {
	uint32_t op;
	uint32_t arg;
	uint64_t addr;
	uint64_t len;
	uint64_t seed;
};

struct fake_stats {
	uint64_t region_reads, region_writes, max_region_count;
	uint64_t version_major, version_minor, version_max_xfer, version_max_fds;
	uint64_t version_migration_pgsize;
	uint64_t dma_maps, dma_maps_with_fd, dma_unmaps;
	uint64_t checksum;
	uint64_t dma_replies, dma_reply_errors, last_dma_errno;
	uint64_t mig_reads, max_mig_read, mig_writes, max_mig_write;
	uint64_t resume_bytes, resume_checksum;
	uint64_t state, path_len, path[8];
	uint64_t log_started, log_page_size, log_ranges, log_reports, max_report_bytes;
	uint64_t irq_msgs, irq_fds;
	uint64_t resets;
	uint64_t unknown_features;   /* DEVICE_FEATURE requests for an unknown feature */
	uint64_t shm_sets, shm_size, shm_reads, shm_writes;   /* vfiomig_mig_shm */
};

struct fake_srv {
	pid_t pid;
	int fd;      /* the client's end (socketpair); -1 with a path */
};

/* Forks the server on a socketpair; the client end is s->fd. */
void fake_start(struct fake_srv *s, const struct fake_cfg *cfg);
/* Forks the server listening on path; returns once it listens. */
void fake_start_path(struct fake_srv *s, const struct fake_cfg *cfg, const char *path);
/* SIGKILL (if still running) and reap. */
void fake_stop(struct fake_srv *s);
/* Opens a device over s->fd (which the device takes); fails the test on error. */
struct vfm_device *fake_open(struct fake_srv *s, const struct vfm_vfio_user_opts *opts);

/* Doorbell and stats through the device's region ops. */
int fake_cmd(struct vfm_device *dev, uint32_t op, uint32_t arg, uint64_t addr, uint64_t len,
	     uint64_t seed, struct vfm_error *err);
void fake_stats(struct vfm_device *dev, struct fake_stats *st);

/* Shared helpers: the byte pattern both sides use, and FNV-1a. */
uint8_t fake_pattern(uint64_t i, uint64_t seed);
void fake_fill(void *buf, size_t len, uint64_t seed);
uint64_t fake_fnv(const void *buf, size_t len, uint64_t h);
#define FAKE_FNV_INIT 0xcbf29ce484222325ull
/* Byte off of a migration data stream. */
uint8_t fake_stream_byte(uint64_t off);

#endif
