/*
 * The vfio-user codec: framing over socketpairs (sizes, fds, timeouts, peers
 * that close or stall), reply/error helpers, payload checks, and the VERSION
 * capability JSON with its negotiation rules.
 */
#include <dirent.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#include "harness.h"
#include "vfio-user/proto.h"

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

static void pair(int sv[2])
{
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		FAIL("socketpair: %s", strerror(errno));
}

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	CHECK(d != NULL);
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n - 1; /* the directory's own fd */
}

static void write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n <= 0)
			FAIL("write: %s", strerror(errno));
		p += n;
		len -= (size_t)n;
	}
}

/* One raw sendmsg with any number of fds, bypassing vfu_send's checks. */
static void send_raw_fds(int fd, const void *buf, size_t len, const int *fds, size_t nfds)
{
	char ctl[CMSG_SPACE(sizeof(int) * 64)] __attribute__((aligned(8)));
	struct iovec iov = { (void *)buf, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

	CHECK(nfds <= 64);
	if (nfds) {
		struct cmsghdr *c;

		memset(ctl, 0, sizeof(ctl));
		mh.msg_control = ctl;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	if (sendmsg(fd, &mh, 0) != (ssize_t)len)
		FAIL("sendmsg: %s", strerror(errno));
}

static struct vfu_hdr raw_hdr(uint16_t id, uint16_t cmd, uint32_t size, uint32_t flags)
{
	return (struct vfu_hdr){ .msg_id = id, .cmd = cmd, .msg_size = size, .flags = flags };
}

/* A message as vfu_recv would hand it over, payload copied to the heap. */
static struct vfu_msg mk_msg(uint16_t cmd, const void *payload, size_t len, size_t nfds)
{
	struct vfu_msg m = VFU_MSG_INIT;

	m.hdr = raw_hdr(1, cmd, (uint32_t)(sizeof(struct vfu_hdr) + len), 0);
	if (len) {
		m.payload = malloc(len);
		CHECK(m.payload != NULL);
		memcpy(m.payload, payload, len);
	}
	m.len = len;
	CHECK(nfds <= VFU_MAX_FDS);
	m.nfds = nfds;
	for (size_t i = 0; i < nfds; i++)
		m.fds[i] = -1; /* counted, nothing to close */
	return m;
}

static void fill_pattern(uint8_t *p, size_t len, uint32_t seed)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)((i * 2654435761u + seed) >> 13);
}

static void wait_child(pid_t pid)
{
	int st;

	CHECK(waitpid(pid, &st, 0) == pid);
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		FAIL("helper process failed (status %#x)", st);
}

/* ------------------------------------------------------------------------ */
/* Framing                                                                   */

TEST(roundtrip_payload)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h;
	uint8_t data[100];
	int sv[2];

	pair(sv);
	fill_pattern(data, sizeof(data), 1);
	vfu_hdr_command(&h, 7, VFU_CMD_REGION_WRITE, VFU_F_NO_REPLY);
	CHECK_EQ(vfu_send(sv[0], &h, data, sizeof(data), NULL, 0, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.hdr.msg_id, 7);
	CHECK_EQ(m.hdr.cmd, VFU_CMD_REGION_WRITE);
	CHECK_EQ(m.hdr.msg_size, 16 + sizeof(data));
	CHECK_EQ(m.hdr.flags, VFU_F_NO_REPLY);
	CHECK_EQ(m.hdr.error, 0);
	CHECK_EQ(m.len, sizeof(data));
	CHECK_EQ(m.nfds, 0);
	CHECK(!memcmp(m.payload, data, sizeof(data)));
	CHECK_EQ(vfu_check_hdr(&m.hdr, &err), 0);
	CHECK(vfu_hdr_wants_reply(&m.hdr) == false);
	vfu_msg_release(&m);
	CHECK(m.payload == NULL);
	CHECK_EQ(m.len, 0);

	/* A header-only message: no payload buffer at all. */
	vfu_hdr_command(&h, 8, VFU_CMD_DEVICE_RESET, 0);
	CHECK_EQ(vfu_send(sv[0], &h, NULL, 0, NULL, 0, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.hdr.msg_size, 16);
	CHECK(m.payload == NULL);
	CHECK_EQ(m.len, 0);
	CHECK(vfu_hdr_wants_reply(&m.hdr));
	vfu_msg_release(&m);

	/* Two messages queued back to back come apart at the right byte. */
	vfu_hdr_command(&h, 9, VFU_CMD_REGION_WRITE, 0);
	CHECK_EQ(vfu_send(sv[0], &h, data, 10, NULL, 0, &err), 0);
	CHECK_EQ(vfu_send(sv[0], &h, data + 10, 20, NULL, 0, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.len, 10);
	vfu_msg_release(&m);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.len, 20);
	CHECK(!memcmp(m.payload, data + 10, 20));
	vfu_msg_release(&m);
	close(sv[0]);
	close(sv[1]);
}

TEST(roundtrip_fds)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	static const char text[] = "guest memory";
	struct vfu_dma_map map = { .argsz = sizeof(map), .flags = VFU_DMA_F_READ | VFU_DMA_F_WRITE,
				   .addr = 0x100000, .size = 4096 };
	int before = count_fds(), sv[2], fds[2];
	uint64_t v = 5;
	char buf[sizeof(text)];
	struct vfu_hdr h;

	pair(sv);
	fds[0] = memfd_create("vfu-test", 0);
	fds[1] = eventfd(0, 0);
	CHECK(fds[0] >= 0 && fds[1] >= 0);
	write_all(fds[0], text, sizeof(text));
	vfu_hdr_command(&h, 1, VFU_CMD_DMA_MAP, 0);
	CHECK_EQ(vfu_send(sv[0], &h, &map, sizeof(map), fds, 2, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.nfds, 2);
	CHECK_EQ(vfu_check_nfds(&m, 1, 2, &err), 0);
	for (size_t i = 0; i < 2; i++) {
		CHECK(m.fds[i] != fds[0] && m.fds[i] != fds[1]);
		CHECK(fcntl(m.fds[i], F_GETFD) & FD_CLOEXEC);
	}
	/* The memfd carries the data; the eventfd signals the sender's copy. */
	CHECK_EQ(pread(m.fds[0], buf, sizeof(buf), 0), sizeof(buf));
	CHECK(!memcmp(buf, text, sizeof(text)));
	CHECK_EQ(write(m.fds[1], &v, sizeof(v)), sizeof(v));
	v = 0;
	CHECK_EQ(read(fds[1], &v, sizeof(v)), sizeof(v));
	CHECK_EQ(v, 5);
	CHECK(!memcmp(m.payload, &map, sizeof(map)));

	/* A taken fd survives release; the rest are closed. */
	int kept = vfu_msg_take_fd(&m, 1);
	CHECK(kept >= 0);
	CHECK_EQ(vfu_msg_take_fd(&m, 1), -1);
	CHECK_EQ(vfu_msg_take_fd(&m, 2), -1);
	vfu_msg_release(&m);
	CHECK(fcntl(kept, F_GETFD) >= 0);
	close(kept);

	/* fds with a header-only message. */
	vfu_hdr_command(&h, 2, VFU_CMD_DEVICE_SET_IRQS, 0);
	CHECK_EQ(vfu_send(sv[0], &h, NULL, 0, &fds[1], 1, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.nfds, 1);
	CHECK_EQ(m.len, 0);
	vfu_msg_release(&m);

	close(fds[0]);
	close(fds[1]);
	close(sv[0]);
	close(sv[1]);
	CHECK_EQ(count_fds(), before);
}

/* A peer may attach fds to a later part of the message: still collected. */
TEST(fds_with_body)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h = raw_hdr(3, VFU_CMD_DEVICE_SET_IRQS, 16 + 8, 0);
	uint8_t body[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
	int sv[2], efd = eventfd(0, 0);

	pair(sv);
	send_raw_fds(sv[0], &h, sizeof(h), NULL, 0);
	send_raw_fds(sv[0], body, sizeof(body), &efd, 1);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.nfds, 1);
	CHECK(!memcmp(m.payload, body, sizeof(body)));
	vfu_msg_release(&m);
	close(efd);
	close(sv[0]);
	close(sv[1]);
}

/* 1 MiB of data plus a region header and an fd: needs a concurrent reader. */
TEST(large_payload)
{
	const size_t len = sizeof(struct vfu_region_rw) + VFU_DEFAULT_MAX_DATA_XFER_SIZE;
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	uint8_t *want = malloc(len);
	int sv[2];
	pid_t pid;

	CHECK(want != NULL);
	fill_pattern(want, len, 77);
	pair(sv);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		struct vfu_hdr h;
		int efd = eventfd(3, 0);

		close(sv[1]);
		vfu_hdr_command(&h, 0xffff, VFU_CMD_REGION_READ, 0);
		h.flags = VFU_F_TYPE_REPLY;
		_exit(vfu_send(sv[0], &h, want, len, &efd, 1, NULL) ? 1 : 0);
	}
	close(sv[0]);
	CHECK_EQ(vfu_recv(sv[1], &m, VFU_MSG_SIZE_FOR_XFER(VFU_DEFAULT_MAX_DATA_XFER_SIZE),
			  20000, &err), 0);
	CHECK_EQ(m.len, len);
	CHECK_EQ(m.hdr.msg_id, 0xffff);
	CHECK(vfu_hdr_is_reply(&m.hdr));
	CHECK_EQ(m.nfds, 1);
	CHECK(!memcmp(m.payload, want, len));
	vfu_msg_release(&m);
	wait_child(pid);
	close(sv[1]);
	free(want);
}

/* Exactly at the absolute bound is accepted (16 MiB + 4 KiB). */
TEST(at_size_limit)
{
	const size_t len = VFU_MAX_MSG_SIZE - sizeof(struct vfu_hdr);
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h;
	int sv[2];
	pid_t pid;

	pair(sv);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		uint8_t *p = malloc(len);

		close(sv[1]);
		if (!p)
			_exit(1);
		fill_pattern(p, len, 3);
		vfu_hdr_command(&h, 1, VFU_CMD_MIG_DATA_WRITE, 0);
		_exit(vfu_send(sv[0], &h, p, len, NULL, 0, NULL) ? 1 : 0);
	}
	close(sv[0]);
	CHECK_EQ(vfu_recv(sv[1], &m, SIZE_MAX, 30000, &err), 0);
	CHECK_EQ(m.hdr.msg_size, VFU_MAX_MSG_SIZE);
	CHECK_EQ(m.len, len);
	uint8_t *p = m.payload;
	CHECK_EQ(p[len - 1], (uint8_t)(((len - 1) * 2654435761u + 3) >> 13));
	vfu_msg_release(&m);
	wait_child(pid);
	close(sv[1]);

	/* And one byte more cannot even be sent. */
	uint8_t one;
	vfu_hdr_command(&h, 1, VFU_CMD_MIG_DATA_WRITE, 0);
	CHECK_EQ(vfu_send(-1, &h, &one, len + 1, NULL, 0, &err), -EMSGSIZE);
}

/* The caller's max_size: at the limit is fine, one byte over is refused
 * without reading (so without buffering) the body. */
TEST(over_size_limit)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	uint8_t body[4096 - 16] = { 0 };
	struct vfu_hdr h;
	char mark[4];
	int sv[2];

	pair(sv);
	vfu_hdr_command(&h, 1, VFU_CMD_REGION_WRITE, 0);
	CHECK_EQ(vfu_send(sv[0], &h, body, sizeof(body), NULL, 0, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.hdr.msg_size, 4096);
	vfu_msg_release(&m);

	static const uint32_t over[] = { 4097, VFU_MAX_MSG_SIZE + 1, UINT32_MAX };
	for (size_t i = 0; i < sizeof(over) / sizeof(over[0]); i++) {
		h = raw_hdr(2, VFU_CMD_REGION_WRITE, over[i], 0);
		write_all(sv[0], &h, sizeof(h));
		write_all(sv[0], "MARK", 4);
		vfm_error_clear(&err);
		CHECK_EQ(vfu_recv(sv[1], &m, i == 0 ? 4096 : SIZE_MAX, 1000, &err), -EMSGSIZE);
		CHECK(strstr(err.msg, "exceeds") != NULL);
		CHECK(m.payload == NULL);
		/* The bytes after the header are still in the socket. */
		CHECK_EQ(recv(sv[1], mark, 4, MSG_DONTWAIT), 4);
		CHECK(!memcmp(mark, "MARK", 4));
	}
	close(sv[0]);
	close(sv[1]);
}

/*
 * With a data limit that makes a 16 MiB allocation fail, a claim of 4 GiB is
 * still -EMSGSIZE: nothing was allocated for it. (Skipped where the
 * allocator ignores RLIMIT_DATA: sanitizers, valgrind.)
 */
TEST(oversize_claim_not_allocated)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h = raw_hdr(1, VFU_CMD_REGION_WRITE, UINT32_MAX, 0);
	const char *pre = getenv("LD_PRELOAD");
	unsigned long vmdata_kb = 0;
	struct rlimit rl;
	char line[256];
	FILE *f;
	int sv[2];
	void *probe;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
	SKIP("sanitizer allocator");
#endif
	if (pre && strstr(pre, "vgpreload"))
		SKIP("valgrind allocator");
	f = fopen("/proc/self/status", "r");
	CHECK(f != NULL);
	while (fgets(line, sizeof(line), f))
		sscanf(line, "VmData: %lu kB", &vmdata_kb);
	fclose(f);
	CHECK(vmdata_kb > 0);
	pair(sv);
	rl.rlim_cur = rl.rlim_max = (vmdata_kb + 4096) * 1024;
	CHECK_EQ(setrlimit(RLIMIT_DATA, &rl), 0);
	probe = malloc(VFU_MAX_MSG_SIZE);
	if (probe) {
		free(probe);
		SKIP("RLIMIT_DATA does not bound malloc here");
	}
	write_all(sv[0], &h, sizeof(h));
	CHECK_EQ(vfu_recv(sv[1], &m, SIZE_MAX, 1000, &err), -EMSGSIZE);
	h.msg_size = VFU_MAX_MSG_SIZE + 1;
	write_all(sv[0], &h, sizeof(h));
	CHECK_EQ(vfu_recv(sv[1], &m, SIZE_MAX, 1000, &err), -EMSGSIZE);
	close(sv[0]);
	close(sv[1]);
}

TEST(msg_size_below_header)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	static const uint32_t sizes[] = { 0, 1, 15 };
	int sv[2];

	pair(sv);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		struct vfu_hdr h = raw_hdr(4, VFU_CMD_DEVICE_RESET, sizes[i], 0);

		write_all(sv[0], &h, sizeof(h));
		vfm_error_clear(&err);
		CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), VFM_EPROTOCOL);
		CHECK(strstr(err.msg, "msg_size") != NULL);
	}
	close(sv[0]);
	close(sv[1]);
}

TEST(peer_closes)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h = raw_hdr(5, VFU_CMD_REGION_READ, 16 + 100, VFU_F_TYPE_REPLY);
	uint8_t part[50] = { 0 };
	int sv[2];
	int64_t t0;

	/* Before any byte. */
	pair(sv);
	close(sv[0]);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, -1, &err), -ECONNRESET);
	CHECK_STR(err.msg, "vfio-user peer closed the connection");
	close(sv[1]);

	/* Inside the header. */
	pair(sv);
	write_all(sv[0], &h, 10);
	close(sv[0]);
	vfm_error_clear(&err);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, -1, &err), -ECONNRESET);
	CHECK(strstr(err.msg, "vfio-user peer closed the connection") == err.msg);
	close(sv[1]);

	/* Inside the body, with no time limit: an error, not a hang. */
	pair(sv);
	write_all(sv[0], &h, sizeof(h));
	write_all(sv[0], part, sizeof(part));
	close(sv[0]);
	vfm_error_clear(&err);
	t0 = (int64_t)now_ms();
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, -1, &err), -ECONNRESET);
	CHECK((int64_t)now_ms() - t0 < 2000);
	CHECK(strstr(err.msg, "66 of 116 bytes") != NULL);
	CHECK(m.payload == NULL);
	close(sv[1]);
}

TEST(timeouts)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h;
	int64_t t0, dt;
	int sv[2];

	pair(sv);
	t0 = (int64_t)now_ms();
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 200, &err), -ETIMEDOUT);
	dt = (int64_t)now_ms() - t0;
	CHECK(dt >= 195);
	CHECK(dt < 3000);

	vfm_error_clear(&err);
	t0 = (int64_t)now_ms();
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 0, &err), -EAGAIN);
	CHECK((int64_t)now_ms() - t0 < 100);

	/* Nothing was consumed: the next message arrives intact. */
	vfu_hdr_command(&h, 11, VFU_CMD_DEVICE_GET_INFO, 0);
	CHECK_EQ(vfu_send(sv[0], &h, "abcd", 4, NULL, 0, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 0, &err), 0);
	CHECK_EQ(m.hdr.msg_id, 11);
	CHECK_EQ(m.len, 4);
	vfu_msg_release(&m);
	close(sv[0]);
	close(sv[1]);
}

/* A peer that stops in the middle of a message fails the receive in time. */
TEST(stall_mid_message)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h = raw_hdr(6, VFU_CMD_REGION_WRITE, 16 + 100, 0);
	int64_t t0;
	int sv[2];

	pair(sv);
	write_all(sv[0], &h, sizeof(h));
	write_all(sv[0], "0123456789", 10);
	t0 = (int64_t)now_ms();
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 200, &err), VFM_EPROTOCOL);
	CHECK((int64_t)now_ms() - t0 < 3000);
	CHECK(strstr(err.msg, "26 of 116") != NULL);

	/* With no waiting at all, half a header is the same failure. */
	close(sv[0]);
	close(sv[1]);
	pair(sv);
	write_all(sv[0], &h, 8);
	vfm_error_clear(&err);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 0, &err), VFM_EPROTOCOL);
	close(sv[0]);
	close(sv[1]);
}

static void too_many_fds_case(size_t nfds)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h = raw_hdr(1, VFU_CMD_DEVICE_SET_IRQS, 16, 0);
	int before = count_fds(), fds[64], sv[2];

	pair(sv);
	for (size_t i = 0; i < nfds; i++) {
		fds[i] = eventfd(0, 0);
		CHECK(fds[i] >= 0);
	}
	send_raw_fds(sv[0], &h, sizeof(h), fds, nfds);
	for (size_t i = 0; i < nfds; i++)
		close(fds[i]);
	if (nfds <= VFU_MAX_FDS) {
		CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
		CHECK_EQ(m.nfds, nfds);
		vfu_msg_release(&m);
	} else {
		CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), VFM_EPROTOCOL);
		CHECK(strstr(err.msg, "fds") != NULL);
		CHECK_EQ(m.nfds, 0);
	}
	close(sv[0]);
	close(sv[1]);
	if (count_fds() != before)
		FAIL("%zu fds sent: %d fds open before, %d after", nfds, before, count_fds());
}

TEST(too_many_fds)
{
	too_many_fds_case(VFU_MAX_FDS);     /* the most allowed */
	too_many_fds_case(VFU_MAX_FDS + 1); /* one over: all received, all closed */
	too_many_fds_case(64);              /* truncated control message */
}

/* fds spread over two parts of one header: 20 in total, the extra 4 closed. */
TEST(too_many_fds_accumulated)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr h = raw_hdr(1, VFU_CMD_DEVICE_SET_IRQS, 16, 0);
	int before = count_fds(), fds[10], sv[2];

	pair(sv);
	for (size_t i = 0; i < 10; i++)
		CHECK((fds[i] = eventfd(0, 0)) >= 0);
	send_raw_fds(sv[0], &h, 8, fds, 10);
	send_raw_fds(sv[0], (char *)&h + 8, 8, fds, 10);
	for (size_t i = 0; i < 10; i++)
		close(fds[i]);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), VFM_EPROTOCOL);
	close(sv[0]);
	close(sv[1]);
	if (count_fds() != before)
		FAIL("%d fds open before, %d after", before, count_fds());
}

TEST(send_errors)
{
	struct vfm_error err = { 0 };
	int fds[VFU_MAX_FDS + 1] = { 0 };
	struct vfu_hdr h;
	uint8_t big[64] = { 0 };
	int sv[2];

	pair(sv);
	vfu_hdr_command(&h, 1, VFU_CMD_DEVICE_SET_IRQS, 0);
	CHECK_EQ(vfu_send(sv[0], &h, NULL, 0, fds, VFU_MAX_FDS + 1, &err), -EINVAL);
	CHECK_EQ(vfu_send(sv[0], &h, NULL, 4, NULL, 0, &err), -EINVAL);
	h.msg_size = 17;
	CHECK_EQ(vfu_send(sv[0], &h, big, 2, NULL, 0, &err), -EINVAL);
	h.msg_size = 18;
	CHECK_EQ(vfu_send(sv[0], &h, big, 2, NULL, 0, &err), 0);

	/* A closed peer is an error, not SIGPIPE. */
	signal(SIGPIPE, SIG_DFL);
	close(sv[1]);
	vfm_error_clear(&err);
	int r = vfu_send(sv[0], &h, big, 2, NULL, 0, &err);
	CHECK(r == -EPIPE || r == -ECONNRESET);
	CHECK(strstr(err.msg, "vfio-user peer closed the connection") == err.msg);
	close(sv[0]);
}

/* A peer that never reads: a bounded send gives up in time. */
TEST(send_timeout)
{
	const size_t len = 4u << 20;
	struct vfm_error err = { 0 };
	uint8_t *p = calloc(1, len);
	struct vfu_hdr h;
	int64_t t0;
	int sv[2];

	CHECK(p != NULL);
	pair(sv);
	vfu_hdr_command(&h, 1, VFU_CMD_MIG_DATA_WRITE, 0);
	t0 = (int64_t)now_ms();
	CHECK_EQ(vfu_send_timeout(sv[0], &h, p, len, NULL, 0, 200, &err), -ETIMEDOUT);
	CHECK((int64_t)now_ms() - t0 < 3000);
	CHECK(strstr(err.msg, "timed out") != NULL);
	close(sv[0]);
	close(sv[1]);
	free(p);
}

/* ------------------------------------------------------------------------ */
/* Replies and errors                                                        */

TEST(replies)
{
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_hdr req, h;
	int sv[2];

	pair(sv);
	vfu_hdr_command(&req, 42, VFU_CMD_DEVICE_FEATURE, VFU_F_ERROR | VFU_F_NO_REPLY);
	CHECK_EQ(req.flags, VFU_F_NO_REPLY); /* only NO_REPLY belongs in a command */

	CHECK_EQ(vfu_send_error(sv[0], &req, -ENOTTY, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	CHECK_EQ(m.hdr.msg_size, 16);
	CHECK_EQ(m.len, 0);
	CHECK_EQ(m.hdr.msg_id, 42);
	CHECK_EQ(m.hdr.cmd, VFU_CMD_DEVICE_FEATURE);
	CHECK_EQ(m.hdr.flags, VFU_F_TYPE_REPLY | VFU_F_ERROR);
	CHECK_EQ(m.hdr.error, ENOTTY);
	CHECK_EQ(vfu_reply_status(&req, &m, &err), -ENOTTY);
	CHECK(strstr(err.msg, "DEVICE_FEATURE") != NULL);
	vfu_msg_release(&m);

	struct vfu_feature_mig_state st = { .device_state = VFM_STATE_STOP, .data_fd = -1 };
	CHECK_EQ(vfu_send_reply(sv[0], &req, &st, sizeof(st), NULL, 0, &err), 0);
	CHECK_EQ(vfu_recv(sv[1], &m, 4096, 1000, &err), 0);
	vfm_error_clear(&err);
	CHECK_EQ(vfu_reply_status(&req, &m, &err), 0);
	CHECK_EQ(m.hdr.flags, VFU_F_TYPE_REPLY);
	CHECK(!memcmp(m.payload, &st, sizeof(st)));
	vfu_msg_release(&m);

	/* Hand-made replies: an unspecified error, the wrong id, a command. */
	m = mk_msg(VFU_CMD_DEVICE_FEATURE, NULL, 0, 0);
	m.hdr.msg_id = 42;
	m.hdr.flags = VFU_F_TYPE_REPLY | VFU_F_ERROR;
	CHECK_EQ(vfu_reply_status(&req, &m, NULL), -EIO);
	m.hdr.error = 100000;
	CHECK_EQ(vfu_reply_status(&req, &m, NULL), -EIO);
	m.hdr.flags = VFU_F_TYPE_REPLY;
	m.hdr.msg_id = 43;
	CHECK_EQ(vfu_reply_status(&req, &m, NULL), VFM_EPROTOCOL);
	m.hdr.msg_id = 42;
	m.hdr.cmd = VFU_CMD_DMA_MAP;
	CHECK_EQ(vfu_reply_status(&req, &m, NULL), VFM_EPROTOCOL);
	m.hdr.cmd = VFU_CMD_DEVICE_FEATURE;
	m.hdr.flags = VFU_F_TYPE_COMMAND;
	CHECK_EQ(vfu_reply_status(&req, &m, NULL), VFM_EPROTOCOL);

	/* Framing: only COMMAND and REPLY types; unknown high bits are ignored. */
	h = raw_hdr(1, 99, 16, 2);
	CHECK_EQ(vfu_check_hdr(&h, NULL), VFM_EPROTOCOL);
	h.flags = VFU_F_TYPE_REPLY | 0x80000000u;
	CHECK_EQ(vfu_check_hdr(&h, NULL), 0);

	CHECK_EQ(vfu_wire_errno(-EIO), EIO);
	CHECK_EQ(vfu_wire_errno(EEXIST), EEXIST);
	CHECK_EQ(vfu_wire_errno(0), EINVAL);
	CHECK_EQ(vfu_wire_errno(VFM_EFORBIDDEN), EINVAL);
	CHECK_EQ(vfu_wire_errno(VFM_ENOMIGRATION), ENOTTY);
	close(sv[0]);
	close(sv[1]);
}

/* ------------------------------------------------------------------------ */
/* Validation helpers                                                        */

TEST(range_ok)
{
	static const struct { uint64_t off, count, size; bool ok; } cases[] = {
		{ 0, 0, 0, true }, { 0, 1, 0, false }, { 10, 0, 10, true },
		{ 10, 1, 10, false }, { 11, 0, 10, false }, { 5, 5, 10, true },
		{ 6, 5, 10, false }, { UINT64_MAX, 1, UINT64_MAX, false },
		{ 1, UINT64_MAX, UINT64_MAX, false }, { UINT64_MAX - 1, 1, UINT64_MAX, true },
		{ 0x1000, UINT64_MAX - 0xfff, UINT64_MAX, false },
	};
	struct vfu_msg m = mk_msg(VFU_CMD_REGION_READ, NULL, 0, 0);

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		if (vfu_range_ok(cases[i].off, cases[i].count, cases[i].size) != cases[i].ok)
			FAIL("case %zu", i);
		CHECK_EQ(vfu_check_range(&m, cases[i].off, cases[i].count, cases[i].size,
					 "region 0", NULL), cases[i].ok ? 0 : -EINVAL);
	}
}

TEST(payload_checks)
{
	struct vfm_error err = { 0 };
	struct vfu_region_rw rw = { .offset = 8, .region = 7, .count = 4 };
	struct vfu_msg m = mk_msg(VFU_CMD_REGION_READ, &rw, sizeof(rw), 1);

	CHECK_EQ(vfu_check_payload(&m, sizeof(rw), &err), 0);
	CHECK_EQ(vfu_check_payload(&m, sizeof(rw) + 1, &err), -EINVAL);
	CHECK(strstr(err.msg, "REGION_READ") != NULL);
	CHECK_EQ(vfu_check_payload_exact(&m, sizeof(rw), NULL), 0);
	CHECK_EQ(vfu_check_payload_exact(&m, sizeof(rw) - 1, NULL), -EINVAL);
	CHECK_EQ(vfu_check_argsz(&m, 32, 32, 32, NULL), 0);
	CHECK_EQ(vfu_check_argsz(&m, 31, 32, 64, NULL), -EINVAL);
	CHECK_EQ(vfu_check_argsz(&m, 65, 32, 64, NULL), -EINVAL);
	CHECK_EQ(vfu_check_count(&m, 1u << 20, 1u << 20, NULL), 0);
	CHECK_EQ(vfu_check_count(&m, (1u << 20) + 1, 1u << 20, NULL), -E2BIG);
	CHECK_EQ(vfu_check_nfds(&m, 0, 1, NULL), 0);
	CHECK_EQ(vfu_check_nfds(&m, 0, 0, NULL), -EINVAL);
	CHECK_EQ(vfu_check_nfds(&m, 2, 3, NULL), -EINVAL);
	vfu_msg_release(&m);
}

static int irq_set_case_max(uint32_t flags, uint32_t count, size_t data_len, int argsz_delta,
			    size_t nfds, size_t max_fds)
{
	uint8_t buf[sizeof(struct vfu_irq_set) + 16] = { 0 };
	struct vfu_irq_set s = { .argsz = (uint32_t)((int)(sizeof(s) + data_len) + argsz_delta),
				 .flags = flags, .index = VFU_PCI_MSIX_IRQ_INDEX, .count = count };
	struct vfu_irq_set out;
	struct vfu_msg m;
	int r;

	memcpy(buf, &s, sizeof(s));
	m = mk_msg(VFU_CMD_DEVICE_SET_IRQS, buf, sizeof(s) + data_len, nfds);
	r = vfu_check_irq_set(&m, max_fds, &out, NULL);
	if (!r)
		CHECK_EQ(out.count, count);
	vfu_msg_release(&m);
	return r;
}

static int irq_set_case(uint32_t flags, uint32_t count, size_t data_len, int argsz_delta,
			size_t nfds)
{
	return irq_set_case_max(flags, count, data_len, argsz_delta, nfds, VFU_MAX_FDS);
}

TEST(irq_set_checks)
{
	const uint32_t ev_trig = VFU_IRQ_SET_DATA_EVENTFD | VFU_IRQ_SET_ACTION_TRIGGER;
	const uint32_t none_trig = VFU_IRQ_SET_DATA_NONE | VFU_IRQ_SET_ACTION_TRIGGER;
	const uint32_t bool_mask = VFU_IRQ_SET_DATA_BOOL | VFU_IRQ_SET_ACTION_MASK;

	CHECK_EQ(irq_set_case(ev_trig, 4, 0, 0, 4), 0);
	CHECK_EQ(irq_set_case(ev_trig, 4, 0, 0, 0), 0);        /* de-assign */
	CHECK_EQ(irq_set_case(ev_trig, 4, 0, 0, 3), -EINVAL);
	CHECK_EQ(irq_set_case(ev_trig, 0, 0, 0, 0), -EINVAL);
	CHECK_EQ(irq_set_case(none_trig, 0, 0, 0, 0), 0);      /* disable the index */
	CHECK_EQ(irq_set_case(none_trig, 2, 0, 0, 1), -EINVAL);
	CHECK_EQ(irq_set_case(none_trig, 2, 2, 0, 0), -EINVAL);
	CHECK_EQ(irq_set_case(bool_mask, 3, 3, 0, 0), 0);
	CHECK_EQ(irq_set_case(bool_mask, 3, 2, 0, 0), -EINVAL);
	CHECK_EQ(irq_set_case(bool_mask, 3, 3, -1, 0), -EINVAL);
	CHECK_EQ(irq_set_case(bool_mask, 3, 3, 1, 0), -EINVAL);
	CHECK_EQ(irq_set_case(none_trig | VFU_IRQ_SET_DATA_BOOL, 1, 0, 0, 0), -EINVAL);
	CHECK_EQ(irq_set_case(none_trig | VFU_IRQ_SET_ACTION_MASK, 1, 0, 0, 0), -EINVAL);
	CHECK_EQ(irq_set_case(VFU_IRQ_SET_DATA_NONE, 1, 0, 0, 0), -EINVAL);
	CHECK_EQ(irq_set_case(none_trig | (1u << 6), 1, 0, 0, 0), -EINVAL);
	CHECK_EQ(irq_set_case_max(ev_trig, 3, 0, 0, 3, 3), 0);
	CHECK_EQ(irq_set_case_max(ev_trig, 3, 0, 0, 3, 2), -EINVAL); /* more than max_fds */

	struct vfu_msg m = mk_msg(VFU_CMD_DEVICE_SET_IRQS, "abc", 3, 0);
	CHECK_EQ(vfu_check_irq_set(&m, 1, NULL, NULL), -EINVAL);
	vfu_msg_release(&m);
}

TEST(feature_flags)
{
	CHECK_EQ(vfu_check_feature_flags(VFU_FEATURE_GET | VFU_FEATURE_MIGRATION, NULL), 0);
	CHECK_EQ(vfu_check_feature_flags(VFU_FEATURE_SET | VFU_FEATURE_MIG_DEVICE_STATE, NULL), 0);
	CHECK_EQ(vfu_check_feature_flags(VFU_FEATURE_PROBE | VFU_FEATURE_GET | VFU_FEATURE_SET |
					 VFU_FEATURE_DMA_LOGGING_START, NULL), 0);
	CHECK_EQ(vfu_check_feature_flags(VFU_FEATURE_PROBE | 0xffff, NULL), 0);
	CHECK_EQ(vfu_check_feature_flags(VFU_FEATURE_MIGRATION, NULL), -EINVAL);
	CHECK_EQ(vfu_check_feature_flags(VFU_FEATURE_GET | VFU_FEATURE_SET | 2, NULL), -EINVAL);
	CHECK_EQ(vfu_check_feature_flags(VFU_FEATURE_GET | (1u << 19) | 1, NULL), -EINVAL);
	CHECK_STR(vfu_feature_name(VFU_FEATURE_GET | VFU_FEATURE_DMA_LOGGING_REPORT),
		  "DMA_LOGGING_REPORT");
	CHECK_STR(vfu_feature_name(3), "UNKNOWN");
}

TEST(bitmap_size)
{
	uint64_t b = 0;

	CHECK_EQ(vfu_bitmap_size(4096 * 64, 4096, &b, NULL), 0);
	CHECK_EQ(b, 8);
	CHECK_EQ(vfu_bitmap_size(1, 4096, &b, NULL), 0);
	CHECK_EQ(b, 8);
	CHECK_EQ(vfu_bitmap_size(4096 * 64 + 1, 4096, &b, NULL), 0);
	CHECK_EQ(b, 16);
	CHECK_EQ(vfu_bitmap_size(1ull << 30, 4096, &b, NULL), 0);
	CHECK_EQ(b, 32768);
	CHECK_EQ(vfu_bitmap_size(UINT64_MAX, 4096, &b, NULL), 0);
	CHECK_EQ(b, (1ull << 52) / 8);
	CHECK_EQ(vfu_bitmap_size(4096, 2048, &b, NULL), -EINVAL);
	CHECK_EQ(vfu_bitmap_size(4096, 6144, &b, NULL), -EINVAL);
	CHECK_EQ(vfu_bitmap_size(4096, 0, &b, NULL), -EINVAL);
	CHECK_EQ(vfu_bitmap_size(0, 4096, &b, NULL), -EINVAL);
}

TEST(cmd_names)
{
	for (unsigned a = 1; a <= VFU_CMD_MAX; a++) {
		const char *na = vfu_cmd_name((uint16_t)a);

		if ((a == 14) != !strcmp(na, "UNKNOWN"))
			FAIL("command %u named %s", a, na);
		for (unsigned b = a + 1; b <= VFU_CMD_MAX; b++)
			if (a != 14 && !strcmp(na, vfu_cmd_name((uint16_t)b)))
				FAIL("%u and %u both %s", a, b, na);
	}
	CHECK_STR(vfu_cmd_name(VFU_CMD_MIG_DATA_READ), "MIG_DATA_READ");
	CHECK_STR(vfu_cmd_name(0), "UNKNOWN");
	CHECK_STR(vfu_cmd_name(19), "UNKNOWN");
	CHECK_STR(vfu_cmd_name(0xffff), "UNKNOWN");
}

/* ------------------------------------------------------------------------ */
/* VERSION capabilities                                                      */

/* Parses a C string as version data, NUL included. */
static int parse(const char *json, struct vfu_caps *c, struct vfm_error *err)
{
	return vfu_caps_parse(json, strlen(json) + 1, c, err);
}

/* Field by field: the structs have padding. */
static bool caps_equal(const struct vfu_caps *a, const struct vfu_caps *b)
{
	return a->present == b->present && a->max_msg_fds == b->max_msg_fds &&
	       a->max_data_xfer_size == b->max_data_xfer_size &&
	       a->max_dma_maps == b->max_dma_maps && a->pgsizes == b->pgsizes &&
	       a->twin_socket == b->twin_socket &&
	       a->twin_socket_fd_index == b->twin_socket_fd_index &&
	       a->write_multiple == b->write_multiple &&
	       a->migration_pgsize == b->migration_pgsize;
}

static void check_defaults(const struct vfu_caps *c)
{
	CHECK_EQ(c->present, 0);
	CHECK_EQ(c->max_msg_fds, 1);
	CHECK_EQ(c->max_data_xfer_size, 1048576);
	CHECK_EQ(c->max_dma_maps, 65535);
	CHECK_EQ(c->pgsizes, 4096);
	CHECK(!c->twin_socket && !c->write_multiple);
	CHECK_EQ(c->twin_socket_fd_index, -1);
	CHECK_EQ(c->migration_pgsize, 0);
}

TEST(caps_defaults)
{
	struct vfu_caps c;
	struct vfu_version_info vi;
	struct vfu_version v = { .major = 0, .minor = 1 };

	CHECK_EQ(vfu_caps_parse(NULL, 0, &c, NULL), 0);
	check_defaults(&c);
	CHECK_EQ(parse("{}", &c, NULL), 0);
	check_defaults(&c);
	CHECK_EQ(parse("{\"capabilities\":{}}", &c, NULL), 0);
	check_defaults(&c);
	CHECK_EQ(parse(" {\"capabilities\" : { } }\n", &c, NULL), 0);
	check_defaults(&c);

	/* A VERSION with no version data at all. */
	struct vfu_msg m = mk_msg(VFU_CMD_VERSION, &v, sizeof(v), 0);
	CHECK_EQ(vfu_version_decode(&m, &vi, NULL), 0);
	CHECK_EQ(vi.major, 0);
	CHECK_EQ(vi.minor, 1);
	check_defaults(&vi.caps);
	vfu_msg_release(&m);
	m = mk_msg(VFU_CMD_VERSION, &v, 3, 0);
	CHECK_EQ(vfu_version_decode(&m, &vi, NULL), -EINVAL);
	vfu_msg_release(&m);
}

TEST(caps_all_keys)
{
	struct vfu_caps c;
	struct vfm_error err = { 0 };

	CHECK_EQ(parse("{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":65536,"
		       "\"max_dma_maps\":1024,\"pgsizes\":2101248,"
		       "\"twin_socket\":{\"supported\":true,\"fd_index\":0},"
		       "\"write_multiple\":true,\"migration\":{\"pgsize\":4096}}}", &c, &err), 0);
	CHECK_EQ(c.present, VFU_CAP_MAX_MSG_FDS | VFU_CAP_MAX_DATA_XFER_SIZE |
		 VFU_CAP_MAX_DMA_MAPS | VFU_CAP_PGSIZES | VFU_CAP_TWIN_SOCKET |
		 VFU_CAP_WRITE_MULTIPLE | VFU_CAP_MIGRATION);
	CHECK_EQ(c.max_msg_fds, 16);
	CHECK_EQ(c.max_data_xfer_size, 65536);
	CHECK_EQ(c.max_dma_maps, 1024);
	CHECK_EQ(c.pgsizes, 4096 | (2 << 20));
	CHECK(c.twin_socket);
	CHECK_EQ(c.twin_socket_fd_index, 0);
	CHECK(c.write_multiple);
	CHECK_EQ(c.migration_pgsize, 4096);
}

/* What real peers send: libvfio-user's reply and QEMU's proposal. */
TEST(caps_real_peers)
{
	struct vfu_caps c;
	struct vfm_error err = { 0 };

	CHECK_EQ(parse("{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576,"
		       "\"migration\":{\"pgsize\":4096}}}", &c, &err), 0);
	CHECK_EQ(c.max_msg_fds, 8);
	CHECK_EQ(c.max_data_xfer_size, 1048576);
	CHECK_EQ(c.migration_pgsize, 4096);
	CHECK_EQ(c.pgsizes, 4096);
	CHECK_EQ(parse("{\"capabilities\":{\"migration\":{\"pgsize\":4096,"
		       "\"max_bitmap_size\":268435456},\"max_msg_fds\":16,"
		       "\"max_data_xfer_size\":1048576,\"pgsizes\":4096,\"max_dma_maps\":65535,"
		       "\"write_multiple\":true}}", &c, &err), 0);
	CHECK(c.write_multiple);
	CHECK_EQ(c.max_msg_fds, 16);
}

TEST(caps_unknown_keys)
{
	struct vfu_caps c;
	struct vfm_error err = { 0 };

	CHECK_EQ(parse("{\"capabilities\":{\"future\":{\"x\":[1,2,\"y\"]},\"max_msg_fds\":2,"
		       "\"other\":null},\"top\":\"level\",\"n\":1.5}", &c, &err), 0);
	CHECK_EQ(c.max_msg_fds, 2);
	CHECK_EQ(c.present, VFU_CAP_MAX_MSG_FDS);
	CHECK_EQ(parse("{\"capabilities\":{\"twin_socket\":{\"supported\":true,\"new\":[]},"
		       "\"migration\":{\"other\":1}}}", &c, &err), 0);
	CHECK(c.twin_socket);
	CHECK_EQ(c.twin_socket_fd_index, -1);
	CHECK(!(c.present & VFU_CAP_MIGRATION));
}

TEST(caps_wrong_types)
{
	static const char *const bad[] = {
		"{\"capabilities\":{\"max_msg_fds\":\"8\"}}",
		"{\"capabilities\":{\"max_msg_fds\":8.0}}",
		"{\"capabilities\":{\"max_msg_fds\":true}}",
		"{\"capabilities\":{\"max_msg_fds\":null}}",
		"{\"capabilities\":{\"max_msg_fds\":-1}}",
		"{\"capabilities\":{\"max_msg_fds\":[8]}}",
		"{\"capabilities\":{\"max_data_xfer_size\":\"1048576\"}}",
		"{\"capabilities\":{\"max_data_xfer_size\":1e6}}",
		"{\"capabilities\":{\"max_dma_maps\":{}}}",
		"{\"capabilities\":{\"pgsizes\":4096.5}}",
		"{\"capabilities\":{\"write_multiple\":1}}",
		"{\"capabilities\":{\"write_multiple\":\"true\"}}",
		"{\"capabilities\":{\"write_multiple\":null}}",
		"{\"capabilities\":{\"twin_socket\":true}}",
		"{\"capabilities\":{\"twin_socket\":{\"supported\":1}}}",
		"{\"capabilities\":{\"twin_socket\":{\"supported\":true,\"fd_index\":\"0\"}}}",
		"{\"capabilities\":{\"twin_socket\":{\"fd_index\":-1}}}",
		"{\"capabilities\":{\"migration\":4096}}",
		"{\"capabilities\":{\"migration\":{\"pgsize\":\"4096\"}}}",
		"{\"capabilities\":[]}",
		"{\"capabilities\":\"all\"}",
		"{\"capabilities\":null}",
		"[]", "\"capabilities\"", "5", "null",
	};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct vfu_caps c = { .max_msg_fds = 12345 };
		struct vfm_error err = { 0 };

		if (parse(bad[i], &c, &err) != VFM_EPROTOCOL)
			FAIL("accepted %s", bad[i]);
		CHECK(err.msg[0] != '\0');
		CHECK_EQ(c.max_msg_fds, 12345); /* output untouched */
	}
}

TEST(caps_ranges)
{
	static const struct { const char *json; bool ok; } cases[] = {
		{ "{\"capabilities\":{\"max_data_xfer_size\":4096}}", true },
		/* A peer's small limit is honoured, a large one clamped (docs/interop.md). */
		{ "{\"capabilities\":{\"max_data_xfer_size\":4095}}", true },
		{ "{\"capabilities\":{\"max_data_xfer_size\":1024}}", true },
		{ "{\"capabilities\":{\"max_data_xfer_size\":64}}", true },
		{ "{\"capabilities\":{\"max_data_xfer_size\":63}}", false },
		{ "{\"capabilities\":{\"max_data_xfer_size\":0}}", false },
		{ "{\"capabilities\":{\"max_data_xfer_size\":16777216}}", true },
		{ "{\"capabilities\":{\"max_data_xfer_size\":16777217}}", true },
		{ "{\"capabilities\":{\"max_data_xfer_size\":67108864}}", true },
		{ "{\"capabilities\":{\"max_data_xfer_size\":4294967296}}", false },
		{ "{\"capabilities\":{\"max_msg_fds\":0}}", true },
		{ "{\"capabilities\":{\"max_msg_fds\":16}}", true },
		{ "{\"capabilities\":{\"max_msg_fds\":17}}", true },
		{ "{\"capabilities\":{\"max_msg_fds\":32}}", true },
		{ "{\"capabilities\":{\"max_msg_fds\":4294967297}}", false },
		{ "{\"capabilities\":{\"max_dma_maps\":4294967295}}", true },
		{ "{\"capabilities\":{\"max_dma_maps\":4294967296}}", false },
		{ "{\"capabilities\":{\"pgsizes\":0}}", false },
		{ "{\"capabilities\":{\"pgsizes\":512}}", false },
		{ "{\"capabilities\":{\"pgsizes\":4097}}", false },
		{ "{\"capabilities\":{\"pgsizes\":18446744073709547520}}", true },
		{ "{\"capabilities\":{\"pgsizes\":18446744073709551616}}", false },
		{ "{\"capabilities\":{\"twin_socket\":{\"fd_index\":15}}}", true },
		{ "{\"capabilities\":{\"twin_socket\":{\"fd_index\":16}}}", false },
		{ "{\"capabilities\":{\"migration\":{\"pgsize\":0}}}", false },
		{ "{\"capabilities\":{\"migration\":{\"pgsize\":100}}}", false },
		{ "{\"capabilities\":{\"migration\":{\"pgsize\":65536}}}", true },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct vfu_caps c;
		int r = parse(cases[i].json, &c, NULL);

		if (cases[i].ok ? r != 0 : r != VFM_EPROTOCOL)
			FAIL("%s: got %d", cases[i].json, r);
		if (!r && (c.max_msg_fds > VFU_MAX_FDS || c.max_data_xfer_size > VFU_MAX_DATA_XFER_SIZE))
			FAIL("%s: not clamped: fds %u xfer %u", cases[i].json, c.max_msg_fds,
			     c.max_data_xfer_size);
	}
}

TEST(caps_nul_rules)
{
	struct vfu_caps c;
	static const char junk[] = "{}\0junk";
	static const char trunc[] = "{\"capabilities\":{}";

	CHECK_EQ(vfu_caps_parse("{}", 2, &c, NULL), VFM_EPROTOCOL);   /* no NUL */
	CHECK_EQ(vfu_caps_parse(junk, sizeof(junk), &c, NULL), VFM_EPROTOCOL);
	CHECK_EQ(vfu_caps_parse("", 1, &c, NULL), VFM_EPROTOCOL);     /* empty text */
	CHECK_EQ(vfu_caps_parse(trunc, sizeof(trunc), &c, NULL), VFM_EPROTOCOL);
	CHECK_EQ(parse("{}x", &c, NULL), VFM_EPROTOCOL);
	CHECK_EQ(parse("{}{}", &c, NULL), VFM_EPROTOCOL);
	CHECK_EQ(parse("{} \t\r\n", &c, NULL), 0);
}

TEST(caps_to_json)
{
	struct vfu_caps c, back;
	struct vfm_error err = { 0 };
	char *json;
	size_t len;

	vfu_caps_init(&c);
	CHECK_EQ(vfu_caps_to_json(&c, &json, &len, &err), 0);
	CHECK_STR(json, "{\"capabilities\":{}}");
	CHECK_EQ(len, strlen(json) + 1);
	free(json);

	c.present = VFU_CAP_MAX_MSG_FDS | VFU_CAP_MAX_DATA_XFER_SIZE | VFU_CAP_MAX_DMA_MAPS |
		    VFU_CAP_PGSIZES | VFU_CAP_TWIN_SOCKET | VFU_CAP_WRITE_MULTIPLE |
		    VFU_CAP_MIGRATION;
	c.max_msg_fds = 16;
	c.max_data_xfer_size = 1 << 20;
	c.max_dma_maps = 4096;
	c.pgsizes = 4096 | (2 << 20);
	c.twin_socket = true;
	c.write_multiple = true;
	c.migration_pgsize = 4096;
	CHECK_EQ(vfu_caps_to_json(&c, &json, &len, &err), 0);
	CHECK(strstr(json, "fd_index") == NULL); /* only a reply names the fd */
	CHECK_EQ(vfu_caps_parse(json, len, &back, &err), 0);
	free(json);
	CHECK(caps_equal(&c, &back));

	c.twin_socket_fd_index = 0;
	CHECK_EQ(vfu_caps_to_json(&c, &json, &len, &err), 0);
	CHECK(strstr(json, "\"twin_socket\":{\"supported\":true,\"fd_index\":0}") != NULL);
	free(json);

	/* Never send what we would refuse. */
	c.max_data_xfer_size = 100;
	json = NULL;
	CHECK_EQ(vfu_caps_to_json(&c, &json, &len, NULL), -EINVAL);
	CHECK(json == NULL);
}

TEST(version_encode_decode)
{
	struct vfu_version_info vi;
	struct vfm_error err = { 0 };
	struct vfu_caps c;
	void *payload;
	size_t len;

	vfu_caps_init(&c);
	c.present = VFU_CAP_MAX_MSG_FDS;
	c.max_msg_fds = 4;
	CHECK_EQ(vfu_version_encode(VFU_VERSION_MAJOR, VFU_VERSION_MINOR, &c, &payload, &len,
				    &err), 0);
	CHECK_EQ(((char *)payload)[len - 1], '\0');
	struct vfu_msg m = mk_msg(VFU_CMD_VERSION, payload, len, 0);
	free(payload);
	CHECK_EQ(vfu_version_decode(&m, &vi, &err), 0);
	CHECK_EQ(vi.major, VFU_VERSION_MAJOR);
	CHECK_EQ(vi.minor, VFU_VERSION_MINOR);
	CHECK_EQ(vi.caps.max_msg_fds, 4);
	vfu_msg_release(&m);

	CHECK_EQ(vfu_version_encode(0, 0, NULL, &payload, &len, &err), 0);
	CHECK_EQ(len, 4);
	free(payload);
}

/* A client's proposal with every capability. */
static struct vfu_version_info client_proposal(void)
{
	struct vfu_version_info p = { .major = 0, .minor = 1 };

	vfu_caps_init(&p.caps);
	p.caps.present = VFU_CAP_MAX_MSG_FDS | VFU_CAP_MAX_DATA_XFER_SIZE |
			 VFU_CAP_MAX_DMA_MAPS | VFU_CAP_PGSIZES | VFU_CAP_TWIN_SOCKET |
			 VFU_CAP_WRITE_MULTIPLE;
	p.caps.max_msg_fds = 16;
	p.caps.pgsizes = 4096 | (2 << 20);
	p.caps.twin_socket = true;
	p.caps.write_multiple = true;
	return p;
}

TEST(negotiate_libvfio_user_reply)
{
	struct vfu_version_info p = client_proposal(), r = { .major = 0, .minor = 1 };
	struct vfm_error err = { 0 };
	struct vfu_negotiated n;

	CHECK_EQ(parse("{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":65536,"
		       "\"migration\":{\"pgsize\":4096}}}", &r.caps, &err), 0);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, &err), 0);
	CHECK_EQ(n.major, 0);
	CHECK_EQ(n.minor, 1);
	CHECK_EQ(n.local_max_fds, 16);
	CHECK_EQ(n.peer_max_fds, 8);
	CHECK_EQ(n.local_max_xfer, 1 << 20);
	CHECK_EQ(n.peer_max_xfer, 65536);
	CHECK_EQ(n.max_xfer, 65536);
	CHECK_EQ(n.max_msg_size, (1 << 20) + VFU_MSG_SLACK);
	CHECK_EQ(n.pgsizes, 4096);
	CHECK_EQ(n.max_dma_maps, 65535);
	CHECK(!n.write_multiple && !n.twin_socket);
	CHECK_EQ(n.twin_socket_fd_index, -1);

	/* The server's side of the same exchange. */
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, false, &n, &err), 0);
	CHECK_EQ(n.local_max_fds, 8);
	CHECK_EQ(n.peer_max_fds, 16);
	CHECK_EQ(n.local_max_xfer, 65536);
	CHECK_EQ(n.max_msg_size, 65536 + VFU_MSG_SLACK);
}

TEST(negotiate_rules)
{
	struct vfu_version_info p = client_proposal(), r;
	struct vfu_negotiated n;

#define REPLY(maj, min, json)                                        \
	do {                                                         \
		r.major = (maj);                                     \
		r.minor = (min);                                     \
		CHECK_EQ(parse(json, &r.caps, NULL), 0);             \
	} while (0)

	REPLY(1, 0, "{}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), VFM_EPROTOCOL);
	REPLY(0, 2, "{}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), VFM_EPROTOCOL);
	REPLY(0, 0, "{}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), 0);
	CHECK_EQ(n.minor, 0);

	REPLY(0, 1, "{\"capabilities\":{\"pgsizes\":1077940224}}"); /* 4K | 1G */
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), VFM_EPROTOCOL);
	REPLY(0, 1, "{\"capabilities\":{\"pgsizes\":2097152}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), 0);
	CHECK_EQ(n.pgsizes, 2 << 20);

	REPLY(0, 1, "{\"capabilities\":{\"max_dma_maps\":70000}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), VFM_EPROTOCOL);
	REPLY(0, 1, "{\"capabilities\":{\"max_dma_maps\":100}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), 0);
	CHECK_EQ(n.max_dma_maps, 100);

	REPLY(0, 1, "{\"capabilities\":{\"write_multiple\":true}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), 0);
	CHECK(n.write_multiple);
	p.caps.write_multiple = false;
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), VFM_EPROTOCOL);
	REPLY(0, 1, "{\"capabilities\":{\"write_multiple\":false}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), 0);

	/* Twin socket: only when asked, and only with a valid fd index. */
	REPLY(0, 1, "{\"capabilities\":{\"twin_socket\":{\"supported\":true,\"fd_index\":0}}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 1, true, &n, NULL), 0);
	CHECK(n.twin_socket);
	CHECK_EQ(n.twin_socket_fd_index, 0);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), VFM_EPROTOCOL);
	REPLY(0, 1, "{\"capabilities\":{\"twin_socket\":{\"supported\":true,\"fd_index\":1}}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 1, true, &n, NULL), VFM_EPROTOCOL);
	REPLY(0, 1, "{\"capabilities\":{\"twin_socket\":{\"supported\":true}}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 1, true, &n, NULL), VFM_EPROTOCOL);
	REPLY(0, 1, "{\"capabilities\":{\"twin_socket\":{\"supported\":false}}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), 0);
	CHECK(!n.twin_socket);
	p.caps.twin_socket = false;
	REPLY(0, 1, "{\"capabilities\":{\"twin_socket\":{\"supported\":true,\"fd_index\":0}}}");
	CHECK_EQ(vfu_version_negotiate(&p, &r, 1, true, &n, NULL), VFM_EPROTOCOL);
#undef REPLY
}

/* The vfiomig_whole_messages extension (proto.h): stated by a server only
 * when proposed, on only when both say so, refused when enabled unasked. */
TEST(negotiate_whole_messages)
{
	struct vfu_version_info p = client_proposal(), ours = { .major = 0, .minor = 1 }, r;
	struct vfm_error err = { 0 };
	struct vfu_negotiated n;
	char *json;
	size_t len;

	vfu_caps_init(&ours.caps);
	ours.caps.present = VFU_CAP_WHOLE_MESSAGES;
	ours.caps.whole_messages = true;
	/* A proposal without it (libvfio-user's, QEMU's): not in the reply. */
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK(!(r.caps.present & VFU_CAP_WHOLE_MESSAGES) && !r.caps.whole_messages);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, &err), 0);
	CHECK(!n.whole_messages);
	/* Proposed: stated, on, and it survives JSON both ways. */
	p.caps.present |= VFU_CAP_WHOLE_MESSAGES;
	p.caps.whole_messages = true;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK(r.caps.whole_messages);
	CHECK_EQ(vfu_caps_to_json(&r.caps, &json, &len, &err), 0);
	CHECK(strstr(json, "\"vfiomig_whole_messages\":true") != NULL);
	CHECK_EQ(parse(json, &r.caps, &err), 0);
	free(json);
	CHECK(r.caps.whole_messages);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, &err), 0);
	CHECK(n.whole_messages);
	/* A server that does not have it: off. */
	ours.caps.whole_messages = false;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, &err), 0);
	CHECK(!n.whole_messages);
	/* Enabled in a reply to a proposal without it: refused. */
	CHECK_EQ(parse("{\"capabilities\":{\"vfiomig_whole_messages\":true}}", &r.caps, &err), 0);
	p.caps.whole_messages = false;
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), VFM_EPROTOCOL);
	/* Not a boolean: refused at parse. */
	CHECK_EQ(parse("{\"capabilities\":{\"vfiomig_whole_messages\":1}}", &r.caps, NULL),
		 VFM_EPROTOCOL);
}

/* The vfiomig_mig_shm extension (proto.h): the same rules as
 * vfiomig_whole_messages, and independent of it. */
TEST(negotiate_mig_shm)
{
	struct vfu_version_info p = client_proposal(), ours = { .major = 0, .minor = 1 }, r;
	struct vfm_error err = { 0 };
	struct vfu_negotiated n;
	char *json;
	size_t len;

	vfu_caps_init(&ours.caps);
	ours.caps.present = VFU_CAP_MIG_SHM | VFU_CAP_WHOLE_MESSAGES;
	ours.caps.mig_shm = ours.caps.whole_messages = true;
	/* Not proposed (libvfio-user's client, QEMU's): not in the reply, off. */
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK(!(r.caps.present & VFU_CAP_MIG_SHM) && !r.caps.mig_shm);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, &err), 0);
	CHECK(!n.mig_shm);
	/* Proposed alone: on, whole messages stay off; JSON both ways. */
	p.caps.present |= VFU_CAP_MIG_SHM;
	p.caps.mig_shm = true;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK(r.caps.mig_shm && !r.caps.whole_messages);
	CHECK_EQ(vfu_caps_to_json(&r.caps, &json, &len, &err), 0);
	CHECK(strstr(json, "\"vfiomig_mig_shm\":true") != NULL);
	CHECK_EQ(parse(json, &r.caps, &err), 0);
	free(json);
	CHECK(r.caps.mig_shm);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, &err), 0);
	CHECK(n.mig_shm && !n.whole_messages);
	/* A server without it: off. */
	ours.caps.mig_shm = false;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, &err), 0);
	CHECK(!n.mig_shm);
	/* Enabled in a reply to a proposal without it: refused. */
	CHECK_EQ(parse("{\"capabilities\":{\"vfiomig_mig_shm\":true}}", &r.caps, &err), 0);
	p.caps.mig_shm = false;
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, NULL), VFM_EPROTOCOL);
	/* Not a boolean: refused at parse. */
	CHECK_EQ(parse("{\"capabilities\":{\"vfiomig_mig_shm\":\"yes\"}}", &r.caps, NULL),
		 VFM_EPROTOCOL);
}

TEST(make_reply)
{
	struct vfu_version_info p = { .major = 0, .minor = 0 }, ours = { .major = 0, .minor = 1 };
	struct vfu_version_info r, back = { 0 };
	struct vfm_error err = { 0 };
	struct vfu_negotiated n;
	void *payload;
	size_t len;

	/* QEMU's proposal. */
	CHECK_EQ(parse("{\"capabilities\":{\"migration\":{\"pgsize\":4096,"
		       "\"max_bitmap_size\":268435456},\"max_msg_fds\":16,"
		       "\"max_data_xfer_size\":1048576,\"pgsizes\":4096,\"max_dma_maps\":65535,"
		       "\"write_multiple\":true}}", &p.caps, &err), 0);
	vfu_caps_init(&ours.caps);
	ours.caps.present = VFU_CAP_MIGRATION;
	ours.caps.max_msg_fds = 8;
	ours.caps.max_data_xfer_size = 1 << 20;
	ours.caps.max_dma_maps = 1024;
	ours.caps.pgsizes = 4096 | (2 << 20);
	ours.caps.twin_socket = true;
	ours.caps.migration_pgsize = 4096;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK_EQ(r.major, 0);
	CHECK_EQ(r.minor, 0);
	CHECK_EQ(r.caps.present, VFU_CAP_MAX_MSG_FDS | VFU_CAP_MAX_DATA_XFER_SIZE |
		 VFU_CAP_MAX_DMA_MAPS | VFU_CAP_PGSIZES | VFU_CAP_WRITE_MULTIPLE |
		 VFU_CAP_MIGRATION);
	CHECK_EQ(r.caps.max_msg_fds, 8);
	CHECK_EQ(r.caps.max_dma_maps, 1024);
	CHECK_EQ(r.caps.pgsizes, 4096);
	CHECK(!r.caps.write_multiple);
	CHECK(!r.caps.twin_socket);

	/* Over the wire and back, then the client's judgement. */
	CHECK_EQ(vfu_version_encode(r.major, r.minor, &r.caps, &payload, &len, &err), 0);
	struct vfu_msg m = mk_msg(VFU_CMD_VERSION, payload, len, 0);
	free(payload);
	CHECK_EQ(vfu_version_decode(&m, &back, &err), 0);
	vfu_msg_release(&m);
	CHECK(back.major == r.major && back.minor == r.minor);
	CHECK(caps_equal(&back.caps, &r.caps));
	CHECK_EQ(vfu_version_negotiate(&p, &back, 0, true, &n, &err), 0);
	CHECK_EQ(n.peer_max_fds, 8);
	CHECK_EQ(n.max_dma_maps, 1024);

	/* A bare proposal: only what the defaults would get wrong is stated. */
	vfu_caps_init(&p.caps);
	p.minor = 5;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK_EQ(r.minor, 1);
	CHECK_EQ(r.caps.present, VFU_CAP_MAX_DMA_MAPS);
	CHECK_EQ(vfu_version_negotiate(&p, &r, 0, true, &n, &err), 0);

	/* Twin socket when both want it; the server adds the fd index. */
	p.caps.present = VFU_CAP_TWIN_SOCKET;
	p.caps.twin_socket = true;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, &err), 0);
	CHECK(r.caps.twin_socket);
	CHECK_EQ(r.caps.twin_socket_fd_index, -1);
	r.caps.twin_socket_fd_index = 0;
	CHECK_EQ(vfu_version_negotiate(&p, &r, 1, false, &n, &err), 0);
	CHECK(n.twin_socket);

	p.major = 1;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, NULL), -EPROTONOSUPPORT);
	p.major = 0;
	p.caps.pgsizes = 1ull << 30;
	CHECK_EQ(vfu_version_make_reply(&p, &ours, &r, NULL), -EPROTONOSUPPORT);
}

/* The whole handshake between two processes, ending in twin-socket mode. */
TEST(version_exchange)
{
	struct vfu_version_info prop = client_proposal(), reply;
	struct vfm_error err = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	struct vfu_negotiated n;
	struct vfu_hdr h;
	void *payload;
	size_t len;
	int sv[2], twin;
	pid_t pid;

	pair(sv);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		struct vfu_version_info cv, ours = { .major = 0, .minor = 1 }, rv;
		struct vfu_dma_rw rd = { .addr = 0x1000, .count = 4 };
		int tw[2];

		close(sv[0]);
		vfu_caps_init(&ours.caps);
		ours.caps.max_msg_fds = 8;
		ours.caps.twin_socket = true;
		if (vfu_recv(sv[1], &m, VFU_MSG_SIZE_FOR_XFER(VFU_DEFAULT_MAX_DATA_XFER_SIZE),
			     5000, NULL) || m.hdr.cmd != VFU_CMD_VERSION ||
		    vfu_version_decode(&m, &cv, NULL) ||
		    vfu_version_make_reply(&cv, &ours, &rv, NULL) ||
		    socketpair(AF_UNIX, SOCK_STREAM, 0, tw))
			_exit(1);
		rv.caps.twin_socket_fd_index = 0;
		if (vfu_version_encode(rv.major, rv.minor, &rv.caps, &payload, &len, NULL) ||
		    vfu_send_reply(sv[1], &m.hdr, payload, len, &tw[0], 1, NULL))
			_exit(2);
		free(payload);
		vfu_msg_release(&m);
		close(tw[0]);
		/* A server-to-client command on the twin socket. */
		vfu_hdr_command(&h, 1, VFU_CMD_DMA_READ, 0);
		if (vfu_send(tw[1], &h, &rd, sizeof(rd), NULL, 0, NULL) ||
		    vfu_recv(tw[1], &m, 4096, 5000, NULL) || vfu_reply_status(&h, &m, NULL) ||
		    m.len != sizeof(rd) + 4 || memcmp((char *)m.payload + 16, "DATA", 4))
			_exit(3);
		vfu_msg_release(&m);
		_exit(0);
	}
	close(sv[1]);
	CHECK_EQ(vfu_version_encode(prop.major, prop.minor, &prop.caps, &payload, &len, &err), 0);
	vfu_hdr_command(&h, 0x1234, VFU_CMD_VERSION, 0);
	CHECK_EQ(vfu_send(sv[0], &h, payload, len, NULL, 0, &err), 0);
	free(payload);
	CHECK_EQ(vfu_recv(sv[0], &m, 4096, 5000, &err), 0);
	CHECK_EQ(vfu_reply_status(&h, &m, &err), 0);
	CHECK_EQ(vfu_version_decode(&m, &reply, &err), 0);
	CHECK_EQ(vfu_version_negotiate(&prop, &reply, m.nfds, true, &n, &err), 0);
	CHECK(n.twin_socket);
	CHECK_EQ(n.peer_max_fds, 8);
	twin = vfu_msg_take_fd(&m, (size_t)n.twin_socket_fd_index);
	vfu_msg_release(&m);
	CHECK(twin >= 0);

	CHECK_EQ(vfu_recv(twin, &m, n.max_msg_size, 5000, &err), 0);
	CHECK_EQ(m.hdr.cmd, VFU_CMD_DMA_READ);
	CHECK_EQ(vfu_check_payload(&m, sizeof(struct vfu_dma_rw), &err), 0);
	struct vfu_dma_rw rd;
	memcpy(&rd, m.payload, sizeof(rd));
	CHECK_EQ(vfu_check_count(&m, rd.count, n.local_max_xfer, &err), 0);
	uint8_t out[sizeof(rd) + 4];
	memcpy(out, &rd, sizeof(rd));
	memcpy(out + sizeof(rd), "DATA", 4);
	CHECK_EQ(vfu_send_reply(twin, &m.hdr, out, sizeof(out), NULL, 0, &err), 0);
	vfu_msg_release(&m);
	wait_child(pid);
	close(twin);
	close(sv[0]);
}
