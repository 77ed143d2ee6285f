/* The migration stream codec: round trips over every transport, the exact wire
 * layout, and every kind of damage the reader must reject. */
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <xxhash.h>

#include "harness.h"
#include "migration/stream.h"

#define MAXREC VFM_STREAM_MAX_RECORD

static void pattern(void *p, size_t n, uint64_t seed)
{
	unsigned char *b = p;
	uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;

	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		b[i] = (unsigned char)x;
	}
}

static struct vfm_stream *open_stream(int fd, int timeout_ms)
{
	struct vfm_stream *s = NULL;
	struct vfm_error err = { 0 };

	if (vfm_stream_open(fd, timeout_ms, &s, &err))
		FAIL("open fd %d: %s", fd, err.msg);
	return s;
}

static void check_ok(struct vfm_stream *s)
{
	struct vfm_error err = { 0 };

	if (vfm_stream_error(s, &err))
		FAIL("stream error %d: %s", err.code, err.msg);
}

static bool contains(const char *hay, const char *needle)
{
	return strstr(hay, needle) != NULL;
}

/* Everything a writer callback produced, captured through a memfd. */
static unsigned char *capture(void (*fn)(struct vfm_stream *, void *), void *arg, size_t *len)
{
	int fd = memfd_create("stream", MFD_CLOEXEC);
	struct vfm_stream *s;
	unsigned char *buf;
	struct stat st;

	CHECK(fd >= 0);
	s = open_stream(fd, -1);
	fn(s, arg);
	vfm_stream_flush(s);
	check_ok(s);
	CHECK(fstat(fd, &st) == 0);
	CHECK_EQ(vfm_stream_bytes(s), st.st_size);
	buf = malloc((size_t)st.st_size + 1);
	CHECK(buf);
	CHECK_EQ(pread(fd, buf, (size_t)st.st_size, 0), st.st_size);
	vfm_stream_free(s);
	close(fd);
	*len = (size_t)st.st_size;
	return buf;
}

/* ------------------------------------------------------------------------ */
/* A record sequence both ends can regenerate                                */

static const size_t sizes[] = {
	0, 1, 7, 23, 24, 100, 4095, 4096, (64u << 10) - 1, 64u << 10, (256u << 10) - 24,
	256u << 10, (256u << 10) + 1, 1u << 20, 3u << 20, MAXREC,
};
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))
static const uint16_t types[] = { VFM_REC_DATA, VFM_REC_CONFIG, VFM_REC_SECTION, VFM_REC_SYNC };

struct seq {
	int fd;
	int nrec;
	int timeout_ms;
	bool close_after;
};

static size_t seq_len(int i)
{
	return sizes[(size_t)i % NSIZES];
}

static void write_seq(struct vfm_stream *s, int nrec, unsigned char *buf)
{
	vfm_stream_write_header(s);
	for (int i = 0; i < nrec; i++) {
		size_t len = seq_len(i);
		uint16_t type = types[i % 4];

		pattern(buf, len, (uint64_t)i);
		if (i % 2 == 0) {
			vfm_stream_put_record(s, type, (uint16_t)i, (uint32_t)i * 3, buf, len);
		} else {
			/* Same bytes in three uneven pieces, one possibly empty. */
			struct iovec iov[3] = {
				{ buf, len / 3 },
				{ buf + len / 3, len / 7 },
				{ buf + len / 3 + len / 7, len - len / 3 - len / 7 },
			};
			vfm_stream_put_recordv(s, type, (uint16_t)i, (uint32_t)i * 3, iov, 3);
		}
	}
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
	vfm_stream_flush(s);
}

static void *writer_thread(void *arg)
{
	struct seq *q = arg;
	struct vfm_stream *s = open_stream(q->fd, q->timeout_ms);
	unsigned char *buf = malloc(MAXREC);

	CHECK(buf);
	write_seq(s, q->nrec, buf);
	check_ok(s);
	vfm_stream_free(s);
	if (q->close_after)
		close(q->fd);
	free(buf);
	return NULL;
}

static void read_seq(int fd, int nrec, int timeout_ms, bool expect_reset)
{
	struct vfm_stream *s = open_stream(fd, timeout_ms);
	unsigned char *want = malloc(MAXREC);
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;
	uint64_t bytes = VFM_STREAM_HDR_SIZE;

	CHECK(want);
	if (vfm_stream_read_header(s, &err))
		FAIL("header: %s", err.msg);
	for (int i = 0; i < nrec; i++) {
		size_t len = seq_len(i);

		if (vfm_stream_get_record(s, &h, &p, MAXREC, &err))
			FAIL("record %d: %s", i, err.msg);
		CHECK_EQ(h.type, types[i % 4]);
		CHECK_EQ(h.flags, (uint16_t)i);
		CHECK_EQ(h.section, (uint32_t)i * 3);
		CHECK_EQ(h.length, len);
		CHECK_EQ(h.reserved, 0);
		CHECK(p != NULL);
		pattern(want, len, (uint64_t)i);
		if (memcmp(p, want, len))
			FAIL("record %d: payload differs", i);
		bytes += 24 + len;
		CHECK_EQ(vfm_stream_bytes(s), bytes);
	}
	CHECK_EQ(vfm_stream_get_record(s, &h, &p, 0, &err), 0);
	CHECK_EQ(h.type, VFM_REC_EOS);
	CHECK_EQ(h.length, 0);
	if (expect_reset) {
		CHECK_EQ(vfm_stream_get_record(s, &h, &p, MAXREC, &err), -ECONNRESET);
		CHECK(contains(err.msg, "migration stream closed by peer"));
	}
	vfm_stream_free(s);
	free(want);
}

static void roundtrip_pair(int rfd, int wfd, int nrec, int timeout_ms)
{
	struct seq q = { .fd = wfd, .nrec = nrec, .timeout_ms = timeout_ms, .close_after = true };
	pthread_t t;

	CHECK(pthread_create(&t, NULL, writer_thread, &q) == 0);
	read_seq(rfd, nrec, timeout_ms, true);
	CHECK(pthread_join(t, NULL) == 0);
	close(rfd);
}

TEST(roundtrip_socketpair)
{
	int sv[2];

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	roundtrip_pair(sv[0], sv[1], 3 * (int)NSIZES, 10000);
}

TEST(roundtrip_socketpair_no_timeout)
{
	int sv[2];

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	roundtrip_pair(sv[0], sv[1], 2 * (int)NSIZES, -1);
}

TEST(roundtrip_pipe)
{
	int p[2];

	CHECK(pipe2(p, O_CLOEXEC) == 0);
	roundtrip_pair(p[0], p[1], 2 * (int)NSIZES, 10000);
	/* The stream made the pipe non-blocking to bound its waits; it must undo that. */
}

TEST(pipe_blocking_mode_restored)
{
	int p[2];
	struct vfm_stream *s;

	CHECK(pipe2(p, O_CLOEXEC) == 0);
	s = open_stream(p[1], 1000);
	CHECK(fcntl(p[1], F_GETFL) & O_NONBLOCK);
	vfm_stream_free(s);
	CHECK(!(fcntl(p[1], F_GETFL) & O_NONBLOCK));
	/* A caller's non-blocking pipe stays non-blocking. */
	CHECK(fcntl(p[0], F_SETFL, O_NONBLOCK) == 0);
	s = open_stream(p[0], 1000);
	vfm_stream_free(s);
	CHECK(fcntl(p[0], F_GETFL) & O_NONBLOCK);
}

TEST(roundtrip_file)
{
	char path[] = "/tmp/vfm-stream-XXXXXX";
	int fd = mkstemp(path);
	struct seq q;

	CHECK(fd >= 0);
	unlink(path);
	q = (struct seq){ .fd = fd, .nrec = 2 * (int)NSIZES, .timeout_ms = 5 };
	writer_thread(&q);
	CHECK(lseek(fd, 0, SEEK_SET) == 0);
	read_seq(fd, q.nrec, 5, false);
	/* At the end of a file, the reset message says so. */
	{
		struct vfm_stream *s;
		struct vfm_error err = { 0 };
		struct vfm_rec_hdr h;
		const void *p;
		int n = 0;

		CHECK(lseek(fd, 0, SEEK_SET) == 0);
		s = open_stream(fd, -1);
		CHECK_EQ(vfm_stream_read_header(s, &err), 0);
		while (!vfm_stream_get_record(s, &h, &p, MAXREC, &err))
			n++;
		CHECK_EQ(n, q.nrec + 1);
		CHECK_EQ(err.code, -ECONNRESET);
		CHECK_STR(err.msg, "migration stream closed by peer (end of file)");
		vfm_stream_free(s);
	}
	close(fd);
}

/* ------------------------------------------------------------------------ */
/* Wire layout and the checksum                                              */

static void write_small(struct vfm_stream *s, void *arg)
{
	(void)arg;
	vfm_stream_write_header(s);
	vfm_stream_put_record(s, VFM_REC_DATA, 0x0102, 0x03040506, "hello", 5);
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
}

TEST(wire_layout)
{
	static const unsigned char want_hdr[] = {
		'V', 'F', 'M', 'I', 'G', 'v', '1', '\n', 1, 0, 0, 0, 0, 0, 0, 0,
		/* type 2, flags 0x0102, section 0x03040506, length 5, reserved 0 */
		2, 0, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 5, 0, 0, 0, 0, 0, 0, 0,
	};
	size_t len;
	unsigned char *b = capture(write_small, NULL, &len);
	uint64_t sum;

	CHECK_EQ(len, 16 + 24 + 5 + 24);
	CHECK(!memcmp(b, want_hdr, sizeof(want_hdr)));
	/* Checksum, computed independently: XXH3-64 of the payload seeded with
	 * XXH3-64 of the first 16 header bytes; stored little-endian. */
	sum = XXH3_64bits_withSeed("hello", 5, XXH3_64bits(b + 16, 16));
	for (int i = 0; i < 8; i++)
		CHECK_EQ(b[16 + 16 + i], (unsigned char)(sum >> (8 * i)));
	CHECK(!memcmp(b + 40, "hello", 5));
	CHECK_EQ(vfm_get_le64(b + 45 + 16), XXH3_64bits_withSeed(NULL, 0, XXH3_64bits(b + 45, 16)));
	CHECK_EQ(vfm_rec_checksum(b + 16, "hello", 5), sum);
	CHECK_EQ(vfm_stream_parse_buffer(b, len, NULL), 0);
	free(b);
}

TEST(type_names)
{
	CHECK_STR(vfm_rec_type_name(VFM_REC_DATA), "DATA");
	CHECK_STR(vfm_rec_type_name(VFM_REC_RP_LOADED), "RP_LOADED");
	CHECK_STR(vfm_rec_type_name(0), "unknown");
	CHECK_STR(vfm_rec_type_name(10), "PAD");
	CHECK_STR(vfm_rec_type_name(15), "unknown");
	CHECK_STR(vfm_rec_type_name(63), "unknown");
	CHECK_STR(vfm_rec_type_name(70), "unknown");
	CHECK_STR(vfm_rec_type_name(0xffff), "unknown");
	for (unsigned t = 1; t <= 14; t++)
		CHECK(vfm_rec_type_known((uint16_t)t));
	for (unsigned t = 64; t <= 69; t++)
		CHECK(vfm_rec_type_known((uint16_t)t));
}

/* recordv must put exactly the bytes put_record does, however it is split. */
struct split {
	const unsigned char *data;
	size_t len;
	size_t piece;      /* 0: one put_record */
	bool empties;      /* interleave zero-length pieces */
};

static void write_split(struct vfm_stream *s, void *arg)
{
	struct split *sp = arg;
	struct iovec *iov;
	int n = 0;

	vfm_stream_write_header(s);
	/* Something already buffered, so the direct path must send it first. */
	vfm_stream_put_record(s, VFM_REC_SECTION, 0, 7, "x", 1);
	if (!sp->piece) {
		vfm_stream_put_record(s, VFM_REC_DATA, 9, 7, sp->data, sp->len);
		return;
	}
	iov = calloc(2 * (sp->len / sp->piece + 2), sizeof(*iov));
	CHECK(iov);
	for (size_t off = 0; off < sp->len; off += sp->piece) {
		size_t k = sp->len - off < sp->piece ? sp->len - off : sp->piece;
		iov[n++] = (struct iovec){ (void *)(sp->data + off), k };
		if (sp->empties)
			iov[n++] = (struct iovec){ NULL, 0 };
	}
	vfm_stream_put_recordv(s, VFM_REC_DATA, 9, 7, iov, n);
	free(iov);
}

TEST(recordv_equals_contiguous)
{
	static const size_t lens[] = { 0, 1, 1000, 64u << 10, (1u << 20) + 3, MAXREC };
	static const size_t pieces[] = { 1, 7, 512, 4096, 100000 };
	unsigned char *data = malloc(MAXREC);

	CHECK(data);
	pattern(data, MAXREC, 42);
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		struct split one = { data, lens[i], 0, false };
		size_t n1, n2;
		unsigned char *a = capture(write_split, &one, &n1);

		for (size_t j = 0; j < sizeof(pieces) / sizeof(pieces[0]); j++) {
			/* 1-byte pieces of 8 MiB would be 8M iovecs: enough at 1 MiB. */
			if (pieces[j] == 1 && lens[i] > (1u << 20))
				continue;
			for (int e = 0; e < 2; e++) {
				struct split sp = { data, lens[i], pieces[j], e };
				unsigned char *b = capture(write_split, &sp, &n2);

				if (n1 != n2 || memcmp(a, b, n1))
					FAIL("len %zu piece %zu empties %d differs", lens[i],
					     pieces[j], e);
				free(b);
			}
		}
		CHECK_EQ(vfm_stream_parse_buffer(a, n1, NULL), VFM_ESTREAM); /* no EOS */
		free(a);
	}
	free(data);
}

/* ------------------------------------------------------------------------ */
/* Writer checks                                                             */

TEST(writer_rejects_bad_records)
{
	int fd = memfd_create("w", MFD_CLOEXEC);
	struct vfm_error err = { 0 };
	struct vfm_stream *s;
	unsigned char *big = calloc(1, MAXREC + 1);
	struct iovec iov[2] = { { big, MAXREC }, { big, 1 } };

	CHECK(fd >= 0 && big);
	s = open_stream(fd, -1);
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, big, MAXREC);  /* the limit is fine */
	check_ok(s);
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, big, MAXREC + 1);
	CHECK_EQ(vfm_stream_error(s, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "DATA") && contains(err.msg, "exceeds"));
	vfm_stream_free(s);

	s = open_stream(fd, -1);
	vfm_stream_put_recordv(s, VFM_REC_DATA, 0, 1, iov, 2);
	CHECK_EQ(vfm_stream_error(s, NULL), VFM_ESTREAM);
	vfm_stream_free(s);

	/* A piece length that would wrap the sum. */
	s = open_stream(fd, -1);
	iov[0].iov_len = SIZE_MAX;
	iov[1].iov_len = 2;
	vfm_stream_put_recordv(s, VFM_REC_DATA, 0, 1, iov, 2);
	CHECK_EQ(vfm_stream_error(s, NULL), VFM_ESTREAM);
	vfm_stream_free(s);

	s = open_stream(fd, -1);
	vfm_stream_put_record(s, 15, 0, 1, NULL, 0);
	CHECK_EQ(vfm_stream_error(s, NULL), -EINVAL);
	vfm_stream_free(s);

	s = open_stream(fd, -1);
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, NULL, 5);
	CHECK_EQ(vfm_stream_error(s, NULL), -EINVAL);
	/* Sticky: the first error stays, later calls do nothing. */
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, "ok", 2);
	vfm_stream_flush(s);
	CHECK_EQ(vfm_stream_error(s, NULL), -EINVAL);
	vfm_stream_free(s);
	free(big);
	close(fd);
}

TEST(error_copies_into_context)
{
	struct vfm_error err = { 0 };
	struct vfm_stream *s;

	CHECK_EQ(vfm_stream_open(-1, 0, &s, &err), -EBADF);
	CHECK(err.msg[0]);
	CHECK_EQ(vfm_stream_open_mem("x", 1, &s, NULL), 0);
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);  /* memory is read-only */
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_error(s, &err), -EBADF);
	CHECK(contains(err.msg, "read-only"));
	vfm_stream_free(s);
	vfm_stream_free(NULL);
}

TEST(sticky_writer_error_after_peer_closes)
{
	int sv[2];
	struct vfm_error err = { 0 };
	struct vfm_stream *s;
	unsigned char *buf = calloc(1, 1u << 20);

	CHECK(buf);
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	s = open_stream(sv[0], 1000);
	vfm_stream_write_header(s);
	vfm_stream_flush(s);
	check_ok(s);
	close(sv[1]);
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, buf, 1u << 20);  /* direct path */
	CHECK_EQ(vfm_stream_error(s, &err), -EPIPE);
	CHECK(contains(err.msg, "closed"));
	/* Every later call is a no-op that keeps the first error. */
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, "x", 1);
	vfm_stream_flush(s);
	vfm_stream_write_header(s);
	CHECK_EQ(vfm_stream_error(s, NULL), -EPIPE);
	vfm_stream_free(s);
	close(sv[0]);
	free(buf);
}

TEST(pipe_reader_gone_no_sigpipe)
{
	int p[2];
	struct vfm_stream *s;
	sigset_t pending;

	/* Default action: a stray SIGPIPE would kill this test. */
	signal(SIGPIPE, SIG_DFL);
	CHECK(pipe2(p, O_CLOEXEC) == 0);
	close(p[0]);
	s = open_stream(p[1], 1000);
	vfm_stream_write_header(s);
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
	vfm_stream_flush(s);
	CHECK_EQ(vfm_stream_error(s, NULL), -EPIPE);
	vfm_stream_free(s);
	sigemptyset(&pending);
	CHECK(sigpending(&pending) == 0);
	CHECK(!sigismember(&pending, SIGPIPE));
	/* Same with no timeout (blocking pipe). */
	s = open_stream(p[1], -1);
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
	vfm_stream_flush(s);
	CHECK_EQ(vfm_stream_error(s, NULL), -EPIPE);
	vfm_stream_free(s);
	close(p[1]);
}

TEST(write_timeout)
{
	int sv[2], p[2];
	unsigned char *buf = calloc(1, 1u << 20);
	uint64_t t0;

	CHECK(buf);
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	CHECK(pipe2(p, O_CLOEXEC) == 0);
	int fds[2] = { sv[0], p[1] };
	for (int i = 0; i < 2; i++) {
		struct vfm_stream *s = open_stream(fds[i], 200);
		struct vfm_error err = { 0 };
		uint64_t el;

		t0 = now_ms();
		/* Nobody reads: the socket/pipe buffer fills, then no progress. */
		for (int k = 0; k < 64 && !vfm_stream_error(s, NULL); k++)
			vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, buf, 1u << 20);
		el = now_ms() - t0;
		CHECK_EQ(vfm_stream_error(s, &err), -ETIMEDOUT);
		CHECK(contains(err.msg, "200 ms"));
		if (el < 190 || el > 2000)
			FAIL("timed out after %llu ms", (unsigned long long)el);
		vfm_stream_free(s);
	}
	free(buf);
}

/* ------------------------------------------------------------------------ */
/* Reader: timeouts, readiness, EINTR                                        */

TEST(read_timeout_then_retry)
{
	int sv[2];
	struct vfm_stream *r, *w;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;
	uint64_t t0, el;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	r = open_stream(sv[0], 200);
	w = open_stream(sv[1], 200);
	t0 = now_ms();
	CHECK_EQ(vfm_stream_read_header(r, &err), -ETIMEDOUT);
	el = now_ms() - t0;
	if (el < 190 || el > 1500)
		FAIL("header timeout after %llu ms", (unsigned long long)el);
	CHECK(contains(err.msg, "200 ms"));

	/* Half a record header, then silence: still a retryable timeout. */
	vfm_stream_write_header(w);
	vfm_stream_flush(w);
	CHECK(write(sv[1], "\x02\x00\x00", 3) == 3);
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_read_header(r, &err), 0);
	t0 = now_ms();
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, MAXREC, &err), -ETIMEDOUT);
	el = now_ms() - t0;
	if (el < 190 || el > 1500)
		FAIL("record timeout after %llu ms", (unsigned long long)el);
	/* The rest arrives: the record reads whole, the stream was in step. */
	{
		unsigned char hdr[24];
		vfm_put_le32(hdr, VFM_REC_DATA);
		vfm_put_le32(hdr + 4, 5);
		vfm_put_le32(hdr + 8, 2);
		vfm_put_le32(hdr + 12, 0);
		vfm_put_le64(hdr + 16, vfm_rec_checksum(hdr, "hi", 2));
		CHECK(write(sv[1], hdr + 3, 21) == 21);
		CHECK(write(sv[1], "hi", 2) == 2);
	}
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, MAXREC, &err), 0);
	CHECK_EQ(h.section, 5);
	CHECK(!memcmp(p, "hi", 2));

	vfm_stream_free(r);
	vfm_stream_free(w);
	close(sv[0]);
	close(sv[1]);
}

/* A stall inside a payload is fatal: the header is consumed, so it is sticky. */
TEST(payload_stall_is_sticky)
{
	int sv[2];
	struct vfm_stream *r;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;
	unsigned char hdr[24];
	uint64_t t0, el;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	CHECK(write(sv[1], VFM_STREAM_MAGIC "\1\0\0\0\0\0\0\0", 16) == 16);
	vfm_put_le32(hdr, VFM_REC_CONFIG);
	vfm_put_le32(hdr + 4, 3);
	vfm_put_le32(hdr + 8, 1000);
	vfm_put_le32(hdr + 12, 0);
	vfm_put_le64(hdr + 16, 0);
	CHECK(write(sv[1], hdr, 24) == 24);
	CHECK(write(sv[1], "0123456789", 10) == 10);
	r = open_stream(sv[0], 200);
	CHECK_EQ(vfm_stream_read_header(r, &err), 0);
	t0 = now_ms();
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, MAXREC, &err), -ETIMEDOUT);
	el = now_ms() - t0;
	if (el < 190 || el > 1500)
		FAIL("payload timeout after %llu ms", (unsigned long long)el);
	CHECK(contains(err.msg, "CONFIG") && contains(err.msg, "10 of 1000"));
	/* Now the stream is out of step: the same error, at once. */
	t0 = now_ms();
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, MAXREC, &err), -ETIMEDOUT);
	CHECK(now_ms() - t0 < 100);
	CHECK(contains(err.msg, "CONFIG"));
	vfm_stream_free(r);
	close(sv[0]);
	close(sv[1]);
}

TEST(readable)
{
	int sv[2];
	struct vfm_stream *r, *w;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	r = open_stream(sv[0], 1000);
	w = open_stream(sv[1], 1000);
	CHECK(!vfm_stream_readable(r, 0));
	CHECK(!vfm_stream_readable(r, 50));
	vfm_stream_write_header(w);
	vfm_stream_put_record(w, VFM_REC_PING, 0, 0, "12345678", 8);
	vfm_stream_put_record(w, VFM_REC_PING, 0, 0, "abcdefgh", 8);
	vfm_stream_flush(w);
	CHECK(vfm_stream_readable(r, 0));
	CHECK_EQ(vfm_stream_read_header(r, &err), 0);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, 8, &err), 0);
	CHECK(!memcmp(p, "12345678", 8));
	/* The second one sits in the read buffer: ready without touching the fd. */
	CHECK(vfm_stream_readable(r, 0));
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, 8, &err), 0);
	CHECK(!memcmp(p, "abcdefgh", 8));
	CHECK(!vfm_stream_readable(r, 0));
	/* End of stream counts as ready: the read reports it without waiting. */
	close(sv[1]);
	CHECK(vfm_stream_readable(r, 0));
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, 8, &err), -ECONNRESET);
	CHECK_STR(err.msg, "migration stream closed by peer");
	vfm_stream_free(w);
	vfm_stream_free(r);
	close(sv[0]);
}

static void on_usr1(int sig)
{
	(void)sig;
}

struct pester {
	pthread_t target;
	int fd;
	atomic_int stop;      /* set by the test thread, read by the pester */
};

/* Signals the reader every 5 ms; writes one record after 300 ms. */
static void *pester_thread(void *arg)
{
	struct pester *ps = arg;
	struct vfm_stream *w = open_stream(ps->fd, 1000);
	uint64_t t0 = now_ms();

	while (now_ms() - t0 < 300) {
		pthread_kill(ps->target, SIGUSR1);
		nanosleep(&(struct timespec){ 0, 5000000 }, NULL);
	}
	vfm_stream_write_header(w);
	vfm_stream_put_record(w, VFM_REC_GO, 0, 0, NULL, 0);
	vfm_stream_flush(w);
	check_ok(w);
	while (!atomic_load(&ps->stop)) {
		pthread_kill(ps->target, SIGUSR1);
		nanosleep(&(struct timespec){ 0, 5000000 }, NULL);
	}
	vfm_stream_free(w);
	return NULL;
}

TEST(eintr_is_retried)
{
	struct sigaction sa = { .sa_handler = on_usr1 };  /* no SA_RESTART */
	struct pester ps;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;
	struct vfm_stream *r;
	pthread_t t;
	int sv[2];

	sigemptyset(&sa.sa_mask);
	CHECK(sigaction(SIGUSR1, &sa, NULL) == 0);
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	ps = (struct pester){ .target = pthread_self(), .fd = sv[1] };
	for (int timeout = -1; timeout <= 2000; timeout += 2001) {
		r = open_stream(sv[0], timeout);
		atomic_store(&ps.stop, 0);
		CHECK(pthread_create(&t, NULL, pester_thread, &ps) == 0);
		if (vfm_stream_read_header(r, &err))
			FAIL("timeout %d: %s", timeout, err.msg);
		if (vfm_stream_get_record(r, &h, &p, 0, &err))
			FAIL("timeout %d: %s", timeout, err.msg);
		CHECK_EQ(h.type, VFM_REC_GO);
		atomic_store(&ps.stop, 1);
		CHECK(pthread_join(t, NULL) == 0);
		vfm_stream_free(r);
	}
	close(sv[0]);
	close(sv[1]);
}

/* ------------------------------------------------------------------------ */
/* Rejection of damaged streams                                              */

/* header, SECTION "ram", DATA (1000 bytes), DATA (big), EOS */
static void write_valid(struct vfm_stream *s, void *arg)
{
	size_t big = arg ? *(size_t *)arg : 0;
	unsigned char sec[11], data[1000];

	vfm_put_le32(sec, 1);
	vfm_put_le32(sec + 4, 1);
	memcpy(sec + 8, "ram", 3);
	pattern(data, sizeof(data), 5);
	vfm_stream_write_header(s);
	vfm_stream_put_record(s, VFM_REC_SECTION, 0, 1, sec, sizeof(sec));
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, data, sizeof(data));
	if (big) {
		unsigned char *b = malloc(big);
		CHECK(b);
		pattern(b, big, 6);
		vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, b, big);
		free(b);
	}
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
}

/* Offsets in the valid stream. */
#define OFF_SEC 16                      /* SECTION record header */
#define OFF_DATA (OFF_SEC + 24 + 11)    /* DATA record header */
#define OFF_DATA_PL (OFF_DATA + 24)

static int parse(const unsigned char *b, size_t len, struct vfm_error *err)
{
	vfm_error_clear(err);
	return vfm_stream_parse_buffer(b, len, err);
}

static void reseal(unsigned char *b, size_t rec)
{
	uint32_t len = vfm_get_le32(b + rec + 8);
	vfm_put_le64(b + rec + 16, vfm_rec_checksum(b + rec, b + rec + 24, len));
}

TEST(reject_bad_stream_header)
{
	struct vfm_error err;
	size_t len;
	unsigned char *v = capture(write_valid, NULL, &len), *b = malloc(len);

	CHECK(b);
	CHECK_EQ(parse(v, len, &err), 0);

	memcpy(b, v, len);
	b[0] = 'X';
	CHECK_EQ(parse(b, len, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "not a vfiomig migration stream") && contains(err.msg, "XFMIGv1\\x0a"));
	memcpy(b, "QEVM\0\0\0\3", 8);
	CHECK_EQ(parse(b, len, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "QEMU"));

	memcpy(b, v, len);
	vfm_put_le32(b + 8, 2);
	CHECK_EQ(parse(b, len, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "version 2"));
	vfm_put_le32(b + 8, 0);
	CHECK_EQ(parse(b, len, &err), VFM_ESTREAM);

	memcpy(b, v, len);
	vfm_put_le32(b + 12, 0x80);
	CHECK_EQ(parse(b, len, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "flags 0x80"));

	CHECK_EQ(parse(v, 0, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "empty"));
	CHECK_EQ(parse(v, 10, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "truncated stream header: 10 of 16"));
	free(b);
	free(v);
}

TEST(reject_bad_record_header)
{
	struct vfm_error err;
	size_t len;
	unsigned char *v = capture(write_valid, NULL, &len), *b = malloc(len);

	CHECK(b);
	/* Unknown type, even with a checksum that matches. */
	static const uint16_t bad_types[] = { 0, 15, 63, 70, 0xffff };
	for (size_t i = 0; i < sizeof(bad_types) / sizeof(bad_types[0]); i++) {
		memcpy(b, v, len);
		b[OFF_DATA] = (unsigned char)bad_types[i];
		b[OFF_DATA + 1] = (unsigned char)(bad_types[i] >> 8);
		reseal(b, OFF_DATA);
		CHECK_EQ(parse(b, len, &err), VFM_ESTREAM);
		CHECK(contains(err.msg, "unknown record type"));
		CHECK(contains(err.msg, "section 1"));
	}
	/* Reserved not zero. */
	memcpy(b, v, len);
	vfm_put_le32(b + OFF_DATA + 12, 1);
	reseal(b, OFF_DATA);
	CHECK_EQ(parse(b, len, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "record DATA (section 1): reserved"));
	free(b);
	free(v);
}

TEST(reject_oversized_length_before_reading)
{
	static const uint32_t lens[] = { 0xffffffffu, MAXREC + 1 };
	struct vfm_error err;
	unsigned char b[16 + 24];
	struct mallinfo2 m0, m1;

	for (size_t i = 0; i < 2; i++) {
		memcpy(b, VFM_STREAM_MAGIC "\1\0\0\0\0\0\0\0", 16);
		vfm_put_le32(b + 16, VFM_REC_DATA);
		vfm_put_le32(b + 20, 4);
		vfm_put_le32(b + 24, lens[i]);
		vfm_put_le32(b + 28, 0);
		vfm_put_le64(b + 32, 0);
		/* No payload follows: a reader that tried to read it would say
		 * "truncated"; one that tried to allocate 4 GiB would show it. */
		m0 = mallinfo2();
		CHECK_EQ(parse(b, sizeof(b), &err), VFM_ESTREAM);
		m1 = mallinfo2();
		CHECK(contains(err.msg, "record DATA (section 4): length"));
		CHECK(contains(err.msg, "exceeds the stream's 8388608-byte limit"));
		CHECK(m1.hblkhd - m0.hblkhd < (1u << 20) && m1.arena - m0.arena < (1u << 20));
	}

	/* Over a pipe, with the writer still there: rejected at once, not after
	 * waiting for 4 GiB that will never come. */
	{
		int p[2];
		struct vfm_stream *r;
		struct vfm_rec_hdr h;
		const void *pl;
		uint64_t t0;

		CHECK(pipe2(p, O_CLOEXEC) == 0);
		CHECK(write(p[1], b, sizeof(b)) == (ssize_t)sizeof(b));
		r = open_stream(p[0], 5000);
		CHECK_EQ(vfm_stream_read_header(r, &err), 0);
		t0 = now_ms();
		CHECK_EQ(vfm_stream_get_record(r, &h, &pl, MAXREC, &err), VFM_ESTREAM);
		CHECK(now_ms() - t0 < 1000);
		vfm_stream_free(r);
		close(p[0]);
		close(p[1]);
	}
}

TEST(reject_length_over_callers_max)
{
	int sv[2];
	struct vfm_stream *r, *w;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	r = open_stream(sv[0], 1000);
	w = open_stream(sv[1], 1000);
	vfm_stream_write_header(w);
	vfm_stream_put_record(w, VFM_REC_GO, 0, 0, NULL, 0);
	vfm_stream_put_record(w, VFM_REC_RP_ERROR, 0, 0, "0123456789", 10);
	vfm_stream_flush(w);
	CHECK_EQ(vfm_stream_read_header(r, &err), 0);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, 0, &err), 0);   /* GO: empty is fine */
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, 9, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "record RP_ERROR (section 0): length 10 exceeds 9"));
	vfm_stream_free(w);
	vfm_stream_free(r);
	close(sv[0]);
	close(sv[1]);
}

TEST(reject_checksum_mismatch)
{
	struct vfm_error err;
	size_t len, big = 1u << 20;
	unsigned char *v = capture(write_valid, &big, &len), *b = malloc(len);
	size_t off_big = OFF_DATA_PL + 1000;

	CHECK(b);
	CHECK_EQ(parse(v, len, &err), 0);
	/* A payload bit, a header bit (flags, section: covered by the seed), the
	 * checksum itself; in the small record and in the 1 MiB one. */
	size_t flips[] = {
		OFF_DATA_PL * 8 + 3, (OFF_DATA_PL + 999) * 8 + 7, (OFF_DATA + 2) * 8,
		(OFF_DATA + 4) * 8 + 1, (OFF_DATA + 16) * 8 + 5, (off_big + 24 + 512 * 1024) * 8,
		(off_big + 24 + big - 1) * 8 + 6,
	};
	for (size_t i = 0; i < sizeof(flips) / sizeof(flips[0]); i++) {
		memcpy(b, v, len);
		b[flips[i] / 8] ^= (unsigned char)(1u << (flips[i] % 8));
		CHECK_EQ(parse(b, len, &err), VFM_ECHECKSUM);
		/* The section is named as read (one case flips it to 3). */
		CHECK(contains(err.msg, "record DATA (section "));
		CHECK(contains(err.msg, "checksum mismatch"));
	}
	free(b);
	free(v);
}

TEST(reject_truncation)
{
	struct vfm_error err;
	size_t len, big = 1u << 20;
	unsigned char *v = capture(write_valid, &big, &len);
	size_t off_big = OFF_DATA_PL + 1000;

	/* Inside a record header. */
	CHECK_EQ(parse(v, OFF_DATA + 5, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "truncated record"));
	/* Inside a small payload. */
	CHECK_EQ(parse(v, OFF_DATA_PL + 500, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "truncated record: DATA (section 1) ends after 500 of 1000"));
	/* Inside a payload larger than the read buffer. */
	CHECK_EQ(parse(v, off_big + 24 + 700000, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "truncated record: DATA (section 1) ends after 700000 of 1048576"));
	/* Between records, before EOS. */
	CHECK_EQ(parse(v, off_big, &err), VFM_ESTREAM);
	CHECK(contains(err.msg, "no end-of-stream record"));
	CHECK(contains(err.msg, "migration stream closed by peer"));
	/* Every prefix fails; only the whole stream passes. */
	for (size_t n = 0; n < len; n += n < OFF_DATA_PL + 1100 ? 1 : 4099)
		if (parse(v, n, &err) == 0)
			FAIL("prefix of %zu bytes accepted", n);
	CHECK_EQ(parse(v, len, &err), 0);
	free(v);
}

TEST(eof_between_records_is_reset)
{
	int sv[2];
	struct vfm_stream *r, *w;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	w = open_stream(sv[1], 1000);
	vfm_stream_write_header(w);
	vfm_stream_put_record(w, VFM_REC_SYNC, 0, 0, "\1\0\0\0\0\0\0\0", 8);
	vfm_stream_flush(w);
	vfm_stream_free(w);
	close(sv[1]);
	r = open_stream(sv[0], 1000);
	CHECK_EQ(vfm_stream_read_header(r, &err), 0);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, MAXREC, &err), 0);
	CHECK_EQ(vfm_get_le64(p), 1);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, MAXREC, &err), -ECONNRESET);
	CHECK_STR(err.msg, "migration stream closed by peer");
	/* Sticky. */
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, MAXREC, &err), -ECONNRESET);
	CHECK_STR(err.msg, "migration stream closed by peer");
	vfm_stream_free(r);
	close(sv[0]);

	/* A peer that goes before the stream header. */
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	close(sv[1]);
	r = open_stream(sv[0], 1000);
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_read_header(r, &err), -ECONNRESET);
	CHECK(contains(err.msg, "closed by peer"));
	vfm_stream_free(r);
	close(sv[0]);
}

TEST(reader_error_is_sticky)
{
	struct vfm_error err = { 0 };
	size_t len;
	unsigned char *v = capture(write_valid, NULL, &len);
	struct vfm_stream *s;
	struct vfm_rec_hdr h;
	const void *p;

	v[OFF_DATA_PL] ^= 1;
	CHECK_EQ(vfm_stream_open_mem(v, len, &s, &err), 0);
	CHECK_EQ(vfm_stream_read_header(s, &err), 0);
	CHECK_EQ(vfm_stream_read_header(s, &err), -EINVAL);  /* only once */
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_get_record(s, &h, &p, MAXREC, &err), 0);
	CHECK_EQ(h.type, VFM_REC_SECTION);
	CHECK_EQ(vfm_stream_get_record(s, &h, &p, MAXREC, &err), VFM_ECHECKSUM);
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_get_record(s, &h, &p, MAXREC, &err), VFM_ECHECKSUM);
	CHECK(contains(err.msg, "checksum mismatch"));
	CHECK_EQ(vfm_stream_error(s, NULL), VFM_ECHECKSUM);
	CHECK(vfm_stream_readable(s, 0));
	CHECK_EQ(vfm_stream_fd(s), -1);
	vfm_stream_free(s);
	free(v);
}

/* Every single-bit flip anywhere in a small stream is caught. */
TEST(every_bit_flip_rejected)
{
	struct vfm_error err;
	size_t len;
	unsigned char *v = capture(write_valid, NULL, &len);

	for (size_t bit = 0; bit < len * 8; bit++) {
		v[bit / 8] ^= (unsigned char)(1u << (bit % 8));
		if (parse(v, len, &err) == 0)
			FAIL("flip of bit %zu (byte %zu) accepted", bit % 8, bit / 8);
		v[bit / 8] ^= (unsigned char)(1u << (bit % 8));
	}
	CHECK_EQ(parse(v, len, &err), 0);
	free(v);
}

static void write_eos_then(struct vfm_stream *s, void *arg)
{
	vfm_stream_write_header(s);
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
	if (arg)
		vfm_stream_put_record(s, VFM_REC_GO, 0, 0, NULL, 0);
}

TEST(parse_buffer_after_eos)
{
	struct vfm_error err;
	size_t len;
	unsigned char *v = capture(write_eos_then, (void *)1, &len);
	unsigned char *w = malloc(len + 3);

	CHECK(w);
	CHECK_EQ(parse(v, len, &err), 0);          /* EOS, GO */
	CHECK_EQ(err.code, 0);
	CHECK_EQ(parse(v, len - 24, &err), 0);     /* EOS alone */
	CHECK_EQ(parse(v, len - 1, &err), VFM_ESTREAM);  /* a torn GO */
	memcpy(w, v, len);
	memcpy(w + len, "abc", 3);                 /* garbage after */
	CHECK_EQ(parse(w, len + 3, &err), VFM_ESTREAM);
	CHECK_EQ(vfm_stream_parse_buffer(NULL, 0, NULL), VFM_ESTREAM);
	free(w);
	free(v);
}

/* Big payloads arrive through a concurrent reader; the write side uses the
 * direct writev path and the reader the payload buffer. */
TEST(many_max_records_concurrent)
{
	int sv[2];
	struct seq q;
	pthread_t t;
	int one_max = (int)NSIZES;   /* a run with several MAXREC records */

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	q = (struct seq){ .fd = sv[1], .nrec = 4 * one_max, .timeout_ms = 10000,
			  .close_after = true };
	CHECK(pthread_create(&t, NULL, writer_thread, &q) == 0);
	read_seq(sv[0], q.nrec, 10000, true);
	CHECK(pthread_join(t, NULL) == 0);
	close(sv[0]);
}

/* The return path, as the engine uses it: records with no stream header. */
TEST(headerless_return_path)
{
	int sv[2];
	struct vfm_stream *r, *w;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	r = open_stream(sv[0], 1000);
	w = open_stream(sv[1], 1000);
	vfm_stream_put_record(w, VFM_REC_RP_ACK, 0, 16, NULL, 0);
	vfm_stream_put_record(w, VFM_REC_RP_LOADED, 0, 0, NULL, 0);
	vfm_stream_flush(w);
	CHECK_EQ(vfm_stream_bytes(w), 48);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, 4096, &err), 0);
	CHECK_EQ(h.type, VFM_REC_RP_ACK);
	CHECK_EQ(h.section, 16);
	CHECK_EQ(vfm_stream_read_header(r, &err), -EINVAL);  /* too late for one */
	vfm_error_clear(&err);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, 4096, &err), 0);
	CHECK_EQ(h.type, VFM_REC_RP_LOADED);
	CHECK_EQ(vfm_stream_bytes(r), 48);
	vfm_stream_free(w);
	vfm_stream_free(r);
	close(sv[0]);
	close(sv[1]);
}
