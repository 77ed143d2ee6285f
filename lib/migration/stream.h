/*
 * The migration stream: a versioned header, then length-prefixed, checksummed
 * records. The writer keeps a sticky error (write many fields, check once);
 * the reader trusts nothing: every record is validated before its payload is
 * allocated or handed on. Format: docs/stream-format.md.
 */
#ifndef VFM_MIGRATION_STREAM_H
#define VFM_MIGRATION_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vfiomig/common.h"

#define VFM_STREAM_MAGIC "VFMIGv1\n"     /* 8 bytes at offset 0 */
#define VFM_STREAM_VERSION 1u
/* Largest record payload accepted (device data blocks are 1 MiB; RAM batches
 * up to 4 MiB). Anything claiming more is an error before allocation. */
#define VFM_STREAM_MAX_RECORD (8u << 20)
/* What a stream holds before it writes: small records (RAM's scattered
 * pages, config) reach the peer when this fills or at a flush. */
#define VFM_STREAM_WBUF_SIZE (256u << 10)

/* Record types, main channel, source -> destination. */
enum vfm_rec_type {
	VFM_REC_SECTION = 1,         /* announce: u32 section, u32 version, name */
	VFM_REC_DATA = 2,            /* section data (pre-copy or stop-copy) */
	VFM_REC_CONFIG = 3,          /* section config state (after its data) */
	VFM_REC_SECTION_END = 4,     /* section finished its complete phase */
	VFM_REC_INIT_DATA_SENT = 5,  /* section's initial pre-copy bytes all sent */
	VFM_REC_SWITCHOVER = 6,      /* source guest stopped: complete phase begins */
	VFM_REC_EOS = 7,             /* end of stream */
	VFM_REC_SYNC = 8,            /* multifd sync point (payload: u64 seq) */
	VFM_REC_GO = 9,              /* commit: destination may run the guest */
	VFM_REC_PAD = 10,            /* padding (bandwidth probe, keepalive): payload ignored */
	VFM_REC_MF_CHANNELS = 11,    /* main: u64 migration id, u32 extra channels */
	VFM_REC_MF_HELLO = 12,       /* extra channel: u64 migration id, u32 index, u32 count */
	VFM_REC_MF_DEV_STATE = 13,   /* extra channel: u32 version, u32 idx, u32 flags, data */
	VFM_REC_MF_RAM = 14,         /* extra channel: u32 version, u32 seq, u32 flags, RAM batch */
	/* Return path, destination -> source. */
	VFM_REC_RP_ACK = 64,         /* switchover-ack for a section */
	VFM_REC_RP_RESUMED = 65,     /* destination guest running (timing payload) */
	VFM_REC_RP_ERROR = 66,       /* destination failed: i32 code + message */
	VFM_REC_RP_PONG = 67,        /* answer to a PING (RTT measurement) */
	VFM_REC_PING = 68,           /* source -> destination, u64 token */
	VFM_REC_RP_LOADED = 69,      /* destination loaded everything, waits for GO */
};

/*
 * PING flags: the destination times two state queries per device, one
 * after the other, and its PONG (with the same flag) carries u32 section,
 * u32 ns of the first, u32 ns of the second per device (docs/stream-format.md).
 */
#define VFM_PING_TWO_QUERIES 1u

/* On the wire, little-endian, 24 bytes, followed by `length` payload bytes. */
struct vfm_rec_hdr {
	uint16_t type;
	uint16_t flags;
	uint32_t section;
	uint32_t length;
	uint32_t reserved;    /* 0 */
	uint64_t checksum;    /* XXH3-64 of payload, seeded with the first 16 header bytes */
} __attribute__((packed));
_Static_assert(sizeof(struct vfm_rec_hdr) == 24, "record header is 24 bytes");

/* Stream header: magic, then u32 version, u32 flags (0). 16 bytes. */
#define VFM_STREAM_HDR_SIZE 16

/*
 * Byte transport under a stream: a connected socket, a file, or a pipe. The
 * stream buffers writes (flush on demand and at record boundaries when the
 * buffer is full) and reads through a buffer.
 */
struct vfm_stream;

/* fd is borrowed (the caller closes it). timeout_ms bounds each blocking
 * read or write (-1: none; used for files). */
int vfm_stream_open(int fd, int timeout_ms, struct vfm_stream **out, struct vfm_error *err);
void vfm_stream_free(struct vfm_stream *s);
int vfm_stream_fd(const struct vfm_stream *s);

/* ---- Writing (sticky error: after a failure every call is a no-op) ---- */
void vfm_stream_write_header(struct vfm_stream *s);
/* One complete record with payload. */
void vfm_stream_put_record(struct vfm_stream *s, uint16_t type, uint16_t flags,
			   uint32_t section, const void *payload, size_t len);
/* A record whose payload is several pieces (e.g. a RAM batch header + pages),
 * checksummed as if contiguous. */
void vfm_stream_put_recordv(struct vfm_stream *s, uint16_t type, uint16_t flags,
			    uint32_t section, const struct iovec *iov, int iovcnt);
void vfm_stream_flush(struct vfm_stream *s);
/* 0 or the first error, with its message copied into err. */
int vfm_stream_error(const struct vfm_stream *s, struct vfm_error *err);
/* Bytes written or read so far, headers included. */
uint64_t vfm_stream_bytes(const struct vfm_stream *s);
/* Writer: the time spent waiting for the socket to take more (the link, or
 * the peer, was the limit then). */
uint64_t vfm_stream_blocked_ns(const struct vfm_stream *s);

/* ---- Reading ---- */
int vfm_stream_read_header(struct vfm_stream *s, struct vfm_error *err);
/*
 * Next record: validates type (known), reserved (0), length (<= max_len and
 * <= VFM_STREAM_MAX_RECORD) and checksum. The payload stays valid until the
 * next call. 0, or a negative error: -ECONNRESET on a clean EOF between
 * records, VFM_ESTREAM / VFM_ECHECKSUM on bad data, -ETIMEDOUT.
 */
int vfm_stream_get_record(struct vfm_stream *s, struct vfm_rec_hdr *hdr,
			  const void **payload, size_t max_len, struct vfm_error *err);
/* Whether a record is ready without blocking (poll on fd, or buffered bytes). */
bool vfm_stream_readable(struct vfm_stream *s, int timeout_ms);

/* ---- Additions: in-memory streams, names, the checksum ---- */
/* A read-only stream over bytes in memory (not copied: they must outlive the
 * stream). Runs the same validation as a fd stream; vfm_stream_fd() is -1. */
int vfm_stream_open_mem(const void *data, size_t len, struct vfm_stream **out,
			struct vfm_error *err);
/*
 * Reads a whole in-memory stream: the stream header, then records until the
 * data ends. 0 if every record is valid and an EOS came before the end (records
 * after EOS, such as GO, are checked too); otherwise the reader's error. The
 * entry point for fuzzing the reader.
 */
int vfm_stream_parse_buffer(const void *data, size_t len, struct vfm_error *err);
/* "DATA", "RP_ACK", ...; "unknown" for a type the format does not define. */
const char *vfm_rec_type_name(uint16_t type);
bool vfm_rec_type_known(uint16_t type);
/* The record checksum: XXH3-64 of the payload, seeded with XXH3-64 of the
 * first 16 header bytes as they are on the wire (type .. reserved). */
uint64_t vfm_rec_checksum(const void *hdr16, const void *payload, size_t len);

/* Little-endian field helpers for building and parsing payloads. */
static inline void vfm_put_le32(void *p, uint32_t v)
{
	unsigned char *b = p;
	b[0] = (unsigned char)v; b[1] = (unsigned char)(v >> 8);
	b[2] = (unsigned char)(v >> 16); b[3] = (unsigned char)(v >> 24);
}
static inline void vfm_put_le64(void *p, uint64_t v)
{
	vfm_put_le32(p, (uint32_t)v);
	vfm_put_le32((unsigned char *)p + 4, (uint32_t)(v >> 32));
}
static inline uint32_t vfm_get_le32(const void *p)
{
	const unsigned char *b = p;
	return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}
static inline uint64_t vfm_get_le64(const void *p)
{
	return vfm_get_le32(p) | (uint64_t)vfm_get_le32((const unsigned char *)p + 4) << 32;
}

#endif
