/*
 * The migration stream codec: a buffered writer with a sticky error and a
 * buffered reader that validates every header before it reads a payload.
 * Format: docs/stream-format.md. A stream is used by one thread at a time.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>
#ifdef VFM_HAVE_XXH_DISPATCH
/* Same values, picked at run time for the CPU: XXH3-64 of 1 MiB ran at 9 GB/s
 * through the plain (SSE2) entry points and 28 GB/s dispatched (AVX-512 host). */
#include <xxh_x86dispatch.h>
#endif

#include "migration/stream.h"
#include "util/logging.h"

#define LOG "stream"
#define REC_HDR_SIZE ((size_t)sizeof(struct vfm_rec_hdr))

/*
 * Both buffers are 256 KiB: small records (SECTION, RAM zero-page batches,
 * PINGs) cost one syscall per buffer, and two streams per connection stay
 * cheap. 4 KiB records went through a unix socket at 3.9 GB/s this way, against
 * 2.2 GB/s for raw 4 KiB writes. Payloads of 64 KiB and more skip the write
 * buffer: one writev sends the buffered bytes, the record header and the
 * payload pieces straight from the caller's memory. The threshold is not
 * critical: 32 KiB records (copied) and 64 KiB ones (direct) both ran at
 * 4.9 GB/s; 1 MiB records at 4.4-5.6 GB/s, 0.75-0.8 of a raw write/read loop
 * (docs/stream-format.md, "Throughput").
 */
#define WBUF_SIZE VFM_STREAM_WBUF_SIZE
#define RBUF_SIZE (256u << 10)
#define DIRECT_MIN (64u << 10)

enum transport {
	T_SOCKET,  /* recv/send with MSG_DONTWAIT + poll; MSG_NOSIGNAL */
	T_PIPE,    /* pipes, FIFOs, character devices: O_NONBLOCK + poll */
	T_FILE,    /* regular files and block devices: never poll */
	T_MEM,     /* read-only bytes in memory */
};

struct vfm_stream {
	/* Never change after open. */
	int fd;
	enum transport kind;
	int timeout_ms;                /* per wait for progress; -1: none */
	bool restore_blocking;         /* we set O_NONBLOCK; clear it on free */
	const unsigned char *mem;      /* T_MEM */
	size_t mem_len;

	size_t mem_pos;
	struct vfm_error error;        /* sticky: the first failure */
	uint64_t bytes;                /* stream bytes put or consumed */
	uint64_t blocked_ns;           /* writer: time waiting for the socket to take more */

	/* Writer. */
	unsigned char *wbuf;           /* WBUF_SIZE, allocated on first write */
	size_t wlen;
	XXH3_state_t *xxh;             /* for multi-piece checksums */

	/* Reader. */
	bool started;                  /* read the stream header or a record */
	unsigned char *rbuf;           /* RBUF_SIZE, allocated on first read */
	size_t rpos, rlen;             /* unread bytes are rbuf[rpos, rlen) */
	unsigned char *pbuf;           /* payloads larger than rbuf */
	size_t pcap;
};

static const char *const type_names[] = {
	[VFM_REC_SECTION] = "SECTION",
	[VFM_REC_DATA] = "DATA",
	[VFM_REC_CONFIG] = "CONFIG",
	[VFM_REC_SECTION_END] = "SECTION_END",
	[VFM_REC_INIT_DATA_SENT] = "INIT_DATA_SENT",
	[VFM_REC_SWITCHOVER] = "SWITCHOVER",
	[VFM_REC_EOS] = "EOS",
	[VFM_REC_SYNC] = "SYNC",
	[VFM_REC_GO] = "GO",
	[VFM_REC_PAD] = "PAD",
	[VFM_REC_MF_CHANNELS] = "MF_CHANNELS",
	[VFM_REC_MF_HELLO] = "MF_HELLO",
	[VFM_REC_MF_DEV_STATE] = "MF_DEV_STATE",
	[VFM_REC_MF_RAM] = "MF_RAM",
	[VFM_REC_RP_ACK] = "RP_ACK",
	[VFM_REC_RP_RESUMED] = "RP_RESUMED",
	[VFM_REC_RP_ERROR] = "RP_ERROR",
	[VFM_REC_RP_PONG] = "RP_PONG",
	[VFM_REC_PING] = "PING",
	[VFM_REC_RP_LOADED] = "RP_LOADED",
};

bool vfm_rec_type_known(uint16_t type)
{
	return type < sizeof(type_names) / sizeof(type_names[0]) && type_names[type];
}

const char *vfm_rec_type_name(uint16_t type)
{
	return vfm_rec_type_known(type) ? type_names[type] : "unknown";
}

uint64_t vfm_rec_checksum(const void *hdr16, const void *payload, size_t len)
{
	return XXH3_64bits_withSeed(payload, len, XXH3_64bits(hdr16, 16));
}

/* ------------------------------------------------------------------------ */
/* Errors, time                                                              */

/* Records the first failure; later ones are consequences and are dropped. */
static void VFM_PRINTF(3, 4) fail(struct vfm_stream *s, int code, const char *fmt, ...)
{
	va_list ap;

	if (s->error.code)
		return;
	va_start(ap, fmt);
	vfm_error_setv(&s->error, code, fmt, ap);
	va_end(ap);
	vfm_debug(LOG, "fd %d: %s", s->fd, s->error.msg);
}

int vfm_stream_error(const struct vfm_stream *s, struct vfm_error *err)
{
	if (!s->error.code)
		return 0;
	return vfm_error_set(err, s->error.code, "%s", s->error.msg);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/*
 * Waits until fd is ready for events, at most timeout_ms (-1: forever),
 * through EINTR. 0 when ready (or hung up / in error: the next I/O call says
 * which), -ETIMEDOUT, or a negative errno.
 */
static int wait_fd(int fd, short events, int timeout_ms)
{
	uint64_t deadline = timeout_ms >= 0 ? now_ms() + (uint64_t)timeout_ms : 0;
	struct pollfd p = { .fd = fd, .events = events };
	int wait = timeout_ms;

	for (;;) {
		int n = poll(&p, 1, wait);

		if (n > 0)
			return 0;
		if (n == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
		if (timeout_ms >= 0) {
			uint64_t now = now_ms();
			wait = now >= deadline ? 0 : (int)(deadline - now);
		}
	}
}

/* ------------------------------------------------------------------------ */
/* Open, free                                                                */

static struct vfm_stream *alloc_stream(struct vfm_error *err)
{
	struct vfm_stream *s = calloc(1, sizeof(*s));

	if (!s)
		vfm_error_set(err, -ENOMEM, "allocating a migration stream");
	return s;
}

int vfm_stream_open(int fd, int timeout_ms, struct vfm_stream **out, struct vfm_error *err)
{
	struct vfm_stream *s;
	struct stat st;
	int ret;

	if (fstat(fd, &st) < 0)
		return vfm_error_set(err, -errno, "migration stream fd %d: %s", fd, strerror(errno));
	s = alloc_stream(err);
	if (!s)
		return -ENOMEM;
	s->fd = fd;
	s->timeout_ms = timeout_ms < 0 ? -1 : timeout_ms;
	if (S_ISSOCK(st.st_mode)) {
		s->kind = T_SOCKET;
	} else if (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)) {
		s->kind = T_FILE;
		s->timeout_ms = -1;
	} else {
		int fl = fcntl(fd, F_GETFL);

		s->kind = T_PIPE;
		/*
		 * A blocking write to a pipe waits until all of it fits, however
		 * long that takes: the only way to bound it is O_NONBLOCK. Sockets
		 * get the same per call (MSG_DONTWAIT), leaving the fd alone.
		 */
		if (fl >= 0 && !(fl & O_NONBLOCK) && s->timeout_ms >= 0) {
			if (fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
				ret = vfm_error_set(err, -errno, "migration stream fd %d: %s", fd,
						    strerror(errno));
				free(s);
				return ret;
			}
			s->restore_blocking = true;
		}
	}
	*out = s;
	return 0;
}

int vfm_stream_open_mem(const void *data, size_t len, struct vfm_stream **out,
			struct vfm_error *err)
{
	struct vfm_stream *s;

	if (!data && len)
		return vfm_error_set(err, -EINVAL, "in-memory stream: no data");
	s = alloc_stream(err);
	if (!s)
		return -ENOMEM;
	s->fd = -1;
	s->kind = T_MEM;
	s->timeout_ms = -1;
	s->mem = data;
	s->mem_len = len;
	*out = s;
	return 0;
}

/* Bytes still in the write buffer are dropped: flush first to keep them. */
void vfm_stream_free(struct vfm_stream *s)
{
	if (!s)
		return;
	if (s->restore_blocking) {
		int fl = fcntl(s->fd, F_GETFL);
		if (fl >= 0)
			fcntl(s->fd, F_SETFL, fl & ~O_NONBLOCK);
	}
	XXH3_freeState(s->xxh);
	free(s->wbuf);
	free(s->rbuf);
	free(s->pbuf);
	free(s);
}

int vfm_stream_fd(const struct vfm_stream *s)
{
	return s->fd;
}

uint64_t vfm_stream_bytes(const struct vfm_stream *s)
{
	return s ? s->bytes : 0;
}

uint64_t vfm_stream_blocked_ns(const struct vfm_stream *s)
{
	return s ? s->blocked_ns : 0;
}

/* ------------------------------------------------------------------------ */
/* Raw I/O                                                                   */

/*
 * A write to a pipe whose reader has gone raises SIGPIPE, which kills a
 * process that did not ignore it. Sockets avoid it with MSG_NOSIGNAL; for
 * pipes we block the signal around the write and swallow the one we caused.
 */
struct sigpipe_guard {
	bool active;
	bool was_pending;
	sigset_t old;
};

static void sigpipe_block(struct sigpipe_guard *g)
{
	sigset_t set, pending;

	sigemptyset(&set);
	sigaddset(&set, SIGPIPE);
	sigemptyset(&pending);
	sigpending(&pending);
	g->was_pending = sigismember(&pending, SIGPIPE) == 1;
	g->active = pthread_sigmask(SIG_BLOCK, &set, &g->old) == 0;
}

static void sigpipe_restore(struct sigpipe_guard *g, bool got_epipe)
{
	const struct timespec zero = { 0, 0 };
	sigset_t set;

	if (!g->active)
		return;
	sigemptyset(&set);
	sigaddset(&set, SIGPIPE);
	if (got_epipe && !g->was_pending)
		while (sigtimedwait(&set, NULL, &zero) < 0 && errno == EINTR)
			;
	pthread_sigmask(SIG_SETMASK, &g->old, NULL);
}

/* One read: > 0 bytes, 0 at end of stream, or a negative errno. */
static ssize_t raw_read(struct vfm_stream *s, void *buf, size_t len)
{
	if (s->kind == T_MEM) {
		size_t n = s->mem_len - s->mem_pos;

		if (n > len)
			n = len;
		if (n)  /* mem may be NULL when empty */
			memcpy(buf, s->mem + s->mem_pos, n);
		s->mem_pos += n;
		return (ssize_t)n;
	}
	for (;;) {
		ssize_t n;
		int ret;

		if (s->kind == T_SOCKET)
			n = recv(s->fd, buf, len, s->timeout_ms >= 0 ? MSG_DONTWAIT : 0);
		else
			n = read(s->fd, buf, len);
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if ((errno != EAGAIN && errno != EWOULDBLOCK) || s->kind == T_FILE)
			return -errno;
		ret = wait_fd(s->fd, POLLIN, s->timeout_ms);
		if (ret)
			return ret;
	}
}

/* Writes every byte of iov[0..cnt) (modifying the array): 0 or a negative errno. */
static int raw_writev(struct vfm_stream *s, struct iovec *iov, int cnt)
{
	struct sigpipe_guard guard = { 0 };
	int ret = 0;

	if (s->kind == T_PIPE)
		sigpipe_block(&guard);
	while (cnt > 0) {
		int n_iov = cnt < IOV_MAX ? cnt : IOV_MAX;
		ssize_t n;

		if (!iov->iov_len) {
			iov++;
			cnt--;
			continue;
		}
		if (s->kind == T_SOCKET) {
			struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n_iov };
			n = sendmsg(s->fd, &mh,
				    MSG_NOSIGNAL | (s->timeout_ms >= 0 ? MSG_DONTWAIT : 0));
		} else {
			n = writev(s->fd, iov, n_iov);
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if ((errno == EAGAIN || errno == EWOULDBLOCK) && s->kind != T_FILE) {
				struct timespec t0, t1;

				clock_gettime(CLOCK_MONOTONIC, &t0);
				ret = wait_fd(s->fd, POLLOUT, s->timeout_ms);
				clock_gettime(CLOCK_MONOTONIC, &t1);
				s->blocked_ns += (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000000ll +
							    (t1.tv_nsec - t0.tv_nsec));
				if (ret)
					break;
				continue;
			}
			ret = -errno;
			break;
		}
		if (n == 0) {  /* a full disk can look like this */
			ret = -EIO;
			break;
		}
		for (size_t done = (size_t)n; done;) {
			size_t step = done < iov->iov_len ? done : iov->iov_len;

			iov->iov_base = (char *)iov->iov_base + step;
			iov->iov_len -= step;
			done -= step;
			if (!iov->iov_len) {
				iov++;
				cnt--;
			}
		}
	}
	sigpipe_restore(&guard, ret == -EPIPE);
	return ret;
}

/* ------------------------------------------------------------------------ */
/* Writing                                                                   */

static void write_failed(struct vfm_stream *s, int ret)
{
	if (ret == -ETIMEDOUT)
		fail(s, ret, "writing the migration stream: no progress in %d ms "
		     "(the peer stopped reading)", s->timeout_ms);
	else if (ret == -EPIPE || ret == -ECONNRESET)
		fail(s, ret, "writing the migration stream: the peer closed the connection (%s)",
		     strerror(-ret));
	else
		fail(s, ret, "writing the migration stream: %s", strerror(-ret));
}

static bool writer_ready(struct vfm_stream *s)
{
	if (s->error.code)
		return false;
	if (s->kind == T_MEM) {
		fail(s, -EBADF, "an in-memory migration stream is read-only");
		return false;
	}
	if (!s->wbuf && !(s->wbuf = malloc(WBUF_SIZE))) {
		fail(s, -ENOMEM, "allocating the migration stream write buffer");
		return false;
	}
	return true;
}

void vfm_stream_flush(struct vfm_stream *s)
{
	struct iovec iov;
	int ret;

	if (s->error.code || !s->wlen)
		return;
	iov = (struct iovec){ s->wbuf, s->wlen };
	s->wlen = 0;
	ret = raw_writev(s, &iov, 1);
	if (ret)
		write_failed(s, ret);
}

/* Appends to the buffer (the caller checked that it fits). */
static void buffer_put(struct vfm_stream *s, const void *p, size_t len)
{
	if (len)
		memcpy(s->wbuf + s->wlen, p, len);
	s->wlen += len;
}

/* Sends a record header and its payload pieces (total bytes in all). */
static void emit(struct vfm_stream *s, const unsigned char *hdr, const struct iovec *iov,
		 int iovcnt, size_t total)
{
	size_t need = REC_HDR_SIZE + total;

	if (total >= DIRECT_MIN) {
		struct iovec small[8], *v = small;
		int n = 0, ret;

		if (iovcnt + 2 > (int)(sizeof(small) / sizeof(small[0]))) {
			v = malloc(sizeof(*v) * (size_t)(iovcnt + 2));
			if (!v) {
				fail(s, -ENOMEM, "writing record %s: out of memory",
				     vfm_rec_type_name((uint16_t)vfm_get_le32(hdr)));
				return;
			}
		}
		v[n++] = (struct iovec){ s->wbuf, s->wlen };
		v[n++] = (struct iovec){ (void *)hdr, REC_HDR_SIZE };
		for (int i = 0; i < iovcnt; i++)
			v[n++] = iov[i];
		s->wlen = 0;
		ret = raw_writev(s, v, n);
		if (v != small)
			free(v);
		if (ret) {
			write_failed(s, ret);
			return;
		}
	} else {
		if (need > WBUF_SIZE - s->wlen) {
			vfm_stream_flush(s);
			if (s->error.code)
				return;
		}
		buffer_put(s, hdr, REC_HDR_SIZE);
		for (int i = 0; i < iovcnt; i++)
			buffer_put(s, iov[i].iov_base, iov[i].iov_len);
	}
	s->bytes += need;
}

static void encode_hdr(unsigned char *h, uint16_t type, uint16_t flags, uint32_t section,
		       uint32_t len)
{
	vfm_put_le32(h, (uint32_t)type | (uint32_t)flags << 16);
	vfm_put_le32(h + 4, section);
	vfm_put_le32(h + 8, len);
	vfm_put_le32(h + 12, 0);
}

static bool record_ok(struct vfm_stream *s, uint16_t type, uint32_t section, size_t len)
{
	if (!vfm_rec_type_known(type)) {
		fail(s, -EINVAL, "writing record of unknown type %u (section %u)", type, section);
		return false;
	}
	if (len > VFM_STREAM_MAX_RECORD) {
		fail(s, VFM_ESTREAM, "writing record %s (section %u): payload of %zu bytes exceeds "
		     "the %u-byte limit", vfm_rec_type_name(type), section, len,
		     VFM_STREAM_MAX_RECORD);
		return false;
	}
	return true;
}

void vfm_stream_write_header(struct vfm_stream *s)
{
	unsigned char h[VFM_STREAM_HDR_SIZE];

	if (!writer_ready(s))
		return;
	memcpy(h, VFM_STREAM_MAGIC, 8);
	vfm_put_le32(h + 8, VFM_STREAM_VERSION);
	vfm_put_le32(h + 12, 0);
	if (sizeof(h) > WBUF_SIZE - s->wlen)
		vfm_stream_flush(s);
	if (s->error.code)
		return;
	buffer_put(s, h, sizeof(h));
	s->bytes += sizeof(h);
}

void vfm_stream_put_record(struct vfm_stream *s, uint16_t type, uint16_t flags,
			   uint32_t section, const void *payload, size_t len)
{
	unsigned char h[REC_HDR_SIZE];
	struct iovec iov = { (void *)payload, len };

	if (!writer_ready(s) || !record_ok(s, type, section, len))
		return;
	if (len && !payload) {
		fail(s, -EINVAL, "writing record %s: %zu bytes but no payload",
		     vfm_rec_type_name(type), len);
		return;
	}
	encode_hdr(h, type, flags, section, (uint32_t)len);
	vfm_put_le64(h + 16, vfm_rec_checksum(h, payload, len));
	emit(s, h, &iov, len ? 1 : 0, len);
}

void vfm_stream_put_recordv(struct vfm_stream *s, uint16_t type, uint16_t flags,
			    uint32_t section, const struct iovec *iov, int iovcnt)
{
	unsigned char h[REC_HDR_SIZE];
	size_t total = 0;

	if (!writer_ready(s))
		return;
	if (iovcnt < 0 || iovcnt > INT_MAX - 2 || (iovcnt && !iov)) {
		fail(s, -EINVAL, "writing record %s: bad iovec (%d pieces)",
		     vfm_rec_type_name(type), iovcnt);
		return;
	}
	for (int i = 0; i < iovcnt; i++) {
		if (iov[i].iov_len && !iov[i].iov_base) {
			fail(s, -EINVAL, "writing record %s: piece %d has no data",
			     vfm_rec_type_name(type), i);
			return;
		}
		/* Stop summing once past the limit so the sum cannot wrap. */
		total += iov[i].iov_len;
		if (iov[i].iov_len > VFM_STREAM_MAX_RECORD || total > VFM_STREAM_MAX_RECORD) {
			total = (size_t)VFM_STREAM_MAX_RECORD + 1;
			break;
		}
	}
	if (!record_ok(s, type, section, total))
		return;
	encode_hdr(h, type, flags, section, (uint32_t)total);
	if (iovcnt <= 1) {
		vfm_put_le64(h + 16, vfm_rec_checksum(h, iovcnt ? iov[0].iov_base : NULL, total));
	} else {
		/* Streaming XXH3 gives the same value as one call over the joined bytes. */
		if (!s->xxh && !(s->xxh = XXH3_createState())) {
			fail(s, -ENOMEM, "allocating checksum state");
			return;
		}
		XXH3_64bits_reset_withSeed(s->xxh, XXH3_64bits(h, 16));
		for (int i = 0; i < iovcnt; i++)
			XXH3_64bits_update(s->xxh, iov[i].iov_base, iov[i].iov_len);
		vfm_put_le64(h + 16, XXH3_64bits_digest(s->xxh));
	}
	emit(s, h, iov, iovcnt, total);
}

/* ------------------------------------------------------------------------ */
/* Reading                                                                   */

static const char *eof_what(const struct vfm_stream *s)
{
	return s->kind == T_FILE ? " (end of file)" : s->kind == T_MEM ? " (end of data)" : "";
}

/*
 * Makes `need` (<= RBUF_SIZE) unread bytes available at rbuf + rpos. 0, 1 at
 * end of stream with fewer available, or a negative errno (nothing consumed).
 */
static int fill(struct vfm_stream *s, size_t need)
{
	if (!s->rbuf && !(s->rbuf = malloc(RBUF_SIZE)))
		return -ENOMEM;
	if (s->rlen - s->rpos >= need)
		return 0;
	if (s->rpos) {
		memmove(s->rbuf, s->rbuf + s->rpos, s->rlen - s->rpos);
		s->rlen -= s->rpos;
		s->rpos = 0;
	}
	while (s->rlen < need) {
		ssize_t n = raw_read(s, s->rbuf + s->rlen, RBUF_SIZE - s->rlen);

		if (n < 0)
			return (int)n;
		if (n == 0)
			return 1;
		s->rlen += (size_t)n;
	}
	return 0;
}

/*
 * A failed fill before anything of a record was consumed. A timeout there
 * leaves the stream in step (the bytes already read stay buffered), so it is
 * not sticky: the caller may try again. Anything else is.
 */
static int fill_failed(struct vfm_stream *s, int ret, const char *what, struct vfm_error *err)
{
	if (ret == -ETIMEDOUT)
		return vfm_error_set(err, ret, "no %s from the peer in %d ms", what, s->timeout_ms);
	if (ret == -ENOMEM)
		fail(s, ret, "allocating the migration stream read buffer");
	else if (ret == -ECONNRESET)
		fail(s, ret, "migration stream closed by peer (connection reset)");
	else
		fail(s, ret, "reading the migration stream: %s", strerror(-ret));
	return vfm_stream_error(s, err);
}

int vfm_stream_read_header(struct vfm_stream *s, struct vfm_error *err)
{
	const unsigned char *h;
	uint32_t version, flags;
	int ret;

	if (s->error.code)
		return vfm_stream_error(s, err);
	if (s->started)
		return vfm_error_set(err, -EINVAL, "the migration stream header comes first, "
				     "and only once");
	ret = fill(s, VFM_STREAM_HDR_SIZE);
	if (ret < 0)
		return fill_failed(s, ret, "stream header", err);
	if (ret > 0) {
		size_t got = s->rlen - s->rpos;

		if (!got && (s->kind == T_SOCKET || s->kind == T_PIPE))
			fail(s, -ECONNRESET, "migration stream closed by peer before the stream header");
		else if (!got)
			fail(s, VFM_ESTREAM, "empty migration stream: no stream header%s", eof_what(s));
		else
			fail(s, VFM_ESTREAM, "truncated stream header: %zu of %d bytes", got,
			     VFM_STREAM_HDR_SIZE);
		return vfm_stream_error(s, err);
	}
	h = s->rbuf + s->rpos;
	version = vfm_get_le32(h + 8);
	flags = vfm_get_le32(h + 12);
	if (memcmp(h, VFM_STREAM_MAGIC, 8)) {
		char shown[8 * 4 + 1], *o = shown;

		for (int i = 0; i < 8; i++)
			o += sprintf(o, h[i] >= 0x20 && h[i] < 0x7f && h[i] != '\\' ? "%c" : "\\x%02x",
				     h[i]);
		fail(s, VFM_ESTREAM, "not a vfiomig migration stream: magic is \"%s\", expected "
		     "\"VFMIGv1\\n\"%s", shown,
		     !memcmp(h, "QEVM", 4) ? " (this is a QEMU migration stream)" : "");
	} else if (version != VFM_STREAM_VERSION) {
		fail(s, VFM_ESTREAM, "unsupported migration stream version %u (this build reads "
		     "version %u)", version, VFM_STREAM_VERSION);
	} else if (flags) {
		fail(s, VFM_ESTREAM, "unsupported migration stream flags 0x%x (version %u defines "
		     "none)", flags, VFM_STREAM_VERSION);
	}
	if (s->error.code)
		return vfm_stream_error(s, err);
	s->rpos += VFM_STREAM_HDR_SIZE;
	s->bytes += VFM_STREAM_HDR_SIZE;
	s->started = true;
	return 0;
}

/* Reads a validated payload of len bytes; *p points at it until the next read. */
static int read_payload(struct vfm_stream *s, const struct vfm_rec_hdr *hdr, const void **p)
{
	size_t len = hdr->length, have = s->rlen - s->rpos;
	int ret;

	if (len <= RBUF_SIZE) {
		/* Small: read it into the buffer (with what follows) and point there. */
		ret = fill(s, len);
		have = s->rlen - s->rpos;
		if (!ret) {
			*p = s->rbuf + s->rpos;
			s->rpos += len;
			return 0;
		}
	} else {
		/* Large: grow the payload buffer to this (validated) size only. */
		if (s->pcap < len) {
			free(s->pbuf);
			s->pcap = 0;
			if (!(s->pbuf = malloc(len))) {
				fail(s, -ENOMEM, "record %s (section %u): no memory for %zu bytes",
				     vfm_rec_type_name(hdr->type), hdr->section, len);
				return s->error.code;
			}
			s->pcap = len;
		}
		memcpy(s->pbuf, s->rbuf + s->rpos, have);
		s->rpos = s->rlen = 0;
		ret = 0;
		while (have < len) {
			ssize_t n = raw_read(s, s->pbuf + have, len - have);

			if (n <= 0) {
				ret = n < 0 ? (int)n : 1;
				break;
			}
			have += (size_t)n;
		}
		if (!ret) {
			*p = s->pbuf;
			return 0;
		}
	}
	if (ret > 0)
		fail(s, VFM_ESTREAM, "truncated record: %s (section %u) ends after %zu of %zu "
		     "payload bytes%s", vfm_rec_type_name(hdr->type), hdr->section, have, len,
		     eof_what(s));
	else if (ret == -ETIMEDOUT)
		fail(s, ret, "record %s (section %u): no progress in %d ms after %zu of %zu "
		     "payload bytes", vfm_rec_type_name(hdr->type), hdr->section,
		     s->timeout_ms, have, len);
	else
		fail(s, ret, "reading record %s (section %u): %s", vfm_rec_type_name(hdr->type),
		     hdr->section, strerror(-ret));
	return s->error.code;
}

int vfm_stream_get_record(struct vfm_stream *s, struct vfm_rec_hdr *hdr,
			  const void **payload, size_t max_len, struct vfm_error *err)
{
	unsigned char raw[REC_HDR_SIZE];
	struct vfm_rec_hdr h;
	const char *name;
	const void *p = NULL;
	uint64_t sum;
	int ret;

	/* No stream header is required first: the return path has none. */
	if (s->error.code)
		return vfm_stream_error(s, err);
	ret = fill(s, REC_HDR_SIZE);
	if (ret < 0)
		return fill_failed(s, ret, "record", err);
	if (ret > 0) {
		size_t got = s->rlen - s->rpos;

		if (!got)
			fail(s, -ECONNRESET, "migration stream closed by peer%s", eof_what(s));
		else
			fail(s, VFM_ESTREAM, "truncated record: the stream ends %zu bytes into a "
			     "%zu-byte record header", got, REC_HDR_SIZE);
		return vfm_stream_error(s, err);
	}
	/* Decoded from a copy: reading the payload may move the buffer. */
	memcpy(raw, s->rbuf + s->rpos, sizeof(raw));
	h.type = (uint16_t)vfm_get_le32(raw);
	h.flags = (uint16_t)(vfm_get_le32(raw) >> 16);
	h.section = vfm_get_le32(raw + 4);
	h.length = vfm_get_le32(raw + 8);
	h.reserved = vfm_get_le32(raw + 12);
	h.checksum = vfm_get_le64(raw + 16);
	name = vfm_rec_type_name(h.type);

	if (!vfm_rec_type_known(h.type))
		fail(s, VFM_ESTREAM, "unknown record type %u (section %u, %u payload bytes)",
		     h.type, h.section, h.length);
	else if (h.reserved)
		fail(s, VFM_ESTREAM, "record %s (section %u): reserved header field is 0x%x, "
		     "must be 0", name, h.section, h.reserved);
	else if (h.length > VFM_STREAM_MAX_RECORD)
		fail(s, VFM_ESTREAM, "record %s (section %u): length %u exceeds the stream's "
		     "%u-byte limit", name, h.section, h.length, VFM_STREAM_MAX_RECORD);
	else if (h.length > max_len)
		fail(s, VFM_ESTREAM, "record %s (section %u): length %u exceeds %zu, the most "
		     "accepted here", name, h.section, h.length, max_len);
	if (s->error.code)
		return vfm_stream_error(s, err);
	s->rpos += REC_HDR_SIZE;

	if (read_payload(s, &h, &p))
		return vfm_stream_error(s, err);
	sum = vfm_rec_checksum(raw, p, h.length);
	if (sum != h.checksum) {
		fail(s, VFM_ECHECKSUM, "record %s (section %u, %u bytes): checksum mismatch "
		     "(header says %016llx, payload hashes to %016llx)", name, h.section,
		     h.length, (unsigned long long)h.checksum, (unsigned long long)sum);
		return vfm_stream_error(s, err);
	}
	s->bytes += REC_HDR_SIZE + h.length;
	s->started = true;
	*hdr = h;
	*payload = p;
	return 0;
}

bool vfm_stream_readable(struct vfm_stream *s, int timeout_ms)
{
	/* An error or an EOF is "ready" too: the next read reports it at once. */
	if (s->error.code || s->rlen > s->rpos || s->kind == T_FILE || s->kind == T_MEM)
		return true;
	return wait_fd(s->fd, POLLIN, timeout_ms) == 0;
}

int vfm_stream_parse_buffer(const void *data, size_t len, struct vfm_error *err)
{
	struct vfm_error local = { 0 };
	struct vfm_stream *s;
	struct vfm_rec_hdr h;
	const void *p;
	bool eos = false;
	int ret;

	ret = vfm_stream_open_mem(data, len, &s, err);
	if (ret)
		return ret;
	ret = vfm_stream_read_header(s, &local);
	while (!ret) {
		ret = vfm_stream_get_record(s, &h, &p, VFM_STREAM_MAX_RECORD, &local);
		if (!ret && h.type == VFM_REC_EOS)
			eos = true;
	}
	if (ret == -ECONNRESET && eos)
		ret = 0;
	else if (ret == -ECONNRESET)
		ret = vfm_error_set(&local, VFM_ESTREAM, "no end-of-stream record");
	if (ret)
		vfm_error_set(err, ret, "%s", local.msg);
	vfm_stream_free(s);
	return ret;
}
