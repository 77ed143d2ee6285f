/*
 * The server library against broken and hostile clients: disconnects at
 * every step (nothing of the client's is kept: mappings, eventfds), broken
 * framing (truncated, oversized, bad type), unknown commands, short
 * payloads, random messages; after each the next client is served.
 */
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include "harness.h"
#include "vfu_rawclient.h"
#include "vfu_testdev.h"

static void raw_write(int fd, const void *buf, size_t len)
{
	if (send(fd, buf, len, MSG_NOSIGNAL) != (ssize_t)len)
		FAIL("send: %s", strerror(errno));
}

/* A new client on a path server that works: VERSION and a GET_INFO. */
static void check_served(struct srv *s)
{
	struct rc c;
	uint32_t st = 99;

	rc_init(&c, rc_connect_path(s->path, 5000));
	CHECK(c.fd >= 0);
	rc_hello(&c);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO, &(struct vfu_device_info){ .argsz = 16 }, 16,
			 NULL, 0, NULL), 0);
	CHECK_EQ(rc_get_state(&c, &st), 0);
	CHECK_EQ(st, VFM_STATE_RUNNING);
	rc_close(&c);
}

/* The conversation cut after `steps` steps; the last may stop mid-message. */
static void converse(struct rc *c, int steps, int memfd, int efd)
{
	struct vfu_dma_logging_range range = { 0x100000, 1 << 20 };
	struct vfu_hdr h;
	uint8_t junk[64] = { 0 };
	int step = 0;

	if (step++ == steps)
		return;
	/* half a header */
	if (step++ == steps) {
		raw_write(c->fd, "\x01\x00\x01\x00\x20\x00\x00", 7);
		return;
	}
	rc_hello(c);
	if (step++ == steps)
		return;
	CHECK_EQ(rc_dma_map(c, memfd, 0, 0x100000, 1 << 20, VFU_DMA_F_READ | VFU_DMA_F_WRITE), 0);
	if (step++ == steps)
		return;
	{
		uint8_t buf[20];
		struct vfu_irq_set s = { .argsz = 20, .index = VFM_VFU_IRQ_MSI, .start = 0, .count = 1,
			.flags = VFU_IRQ_SET_DATA_EVENTFD | VFU_IRQ_SET_ACTION_TRIGGER };

		memcpy(buf, &s, 20);
		CHECK_EQ(rc_call(c, VFU_CMD_DEVICE_SET_IRQS, buf, 20, &efd, 1, NULL), 0);
	}
	if (step++ == steps)
		return;
	CHECK_EQ(rc_log_start(c, 4096, &range, 1, NULL), 0);
	if (step++ == steps)
		return;
	CHECK_EQ(rc_set_state(c, VFM_STATE_PRE_COPY), 0);
	if (step++ == steps)
		return;
	CHECK_EQ(rc_mig_read(c, junk, 64), 64);
	if (step++ == steps)
		return;
	/* A request whose reply is never read. */
	rc_send(c, VFU_CMD_MIG_DATA_READ, 0, &(struct vfu_mig_data){ .argsz = 8 + 1000, .size = 1000 },
		8, NULL, 0);
	if (step++ == steps)
		return;
	/* A header promising 1000 bytes, then 100 of them. */
	vfu_hdr_command(&h, 77, VFU_CMD_REGION_WRITE, 0);
	h.msg_size = 1000;
	raw_write(c->fd, &h, sizeof(h));
	raw_write(c->fd, junk, 64);
	raw_write(c->fd, junk, 36);
}

#define CONVERSATION_STEPS 10

TEST_TIMEOUT(disconnect_at_every_step, 60)
{
	struct vfm_vfu_opts o = { .io_timeout_ms = 300 };
	int memfd = test_memfd("guest", 1 << 20, NULL);
	int efd = eventfd(0, EFD_CLOEXEC);
	int base;
	struct srv s;

	srv_start_path(&s, VFM_MIG_ALL, &o);
	check_served(&s);
	CHECK(srv_wait_gone(&s, 1, 5000));
	base = count_open_fds();
	for (int k = 0; k <= CONVERSATION_STEPS; k++) {
		struct rc c;

		rc_init(&c, rc_connect_path(s.path, 5000));
		CHECK(c.fd >= 0);
		converse(&c, k, memfd, efd);
		rc_close(&c);
		if (!srv_wait_gone(&s, 2 + 2 * k, 5000))
			FAIL("server did not notice the client of step %d leave", k);
		/* Everything the client gave (memfd mapping, eventfd) is gone. */
		CHECK_EQ(count_open_fds(), base);
		check_served(&s);
		if (!srv_wait_gone(&s, 3 + 2 * k, 5000))
			FAIL("step %d: checker not seen leaving", k);
	}
	/* Each client that got past VERSION and left mid-migration caused a reset. */
	CHECK(s.td.resets >= 3);
	srv_stop(&s);
	close(memfd);
	close(efd);
}

TEST_TIMEOUT(hostile_framing, 60)
{
	struct vfm_vfu_opts o = { .io_timeout_ms = 300, .max_data_xfer_size = 65536 };
	int fds[VFU_MAX_FDS + 4], before, gone = 0;
	struct vfu_hdr h;
	struct srv s;
	struct rc c;

	srv_start_path(&s, VFM_MIG_ALL, &o);
	for (int i = 0; i < (int)(sizeof(fds) / sizeof(fds[0])); i++)
		fds[i] = eventfd(0, EFD_CLOEXEC);
	before = count_open_fds();

	/* msg_size 4 GiB - 1: refused before anything is allocated. */
	rc_init(&c, rc_connect_path(s.path, 5000));
	rc_hello(&c);
	vfu_hdr_command(&h, 1, VFU_CMD_MIG_DATA_WRITE, 0);
	h.msg_size = UINT32_MAX;
	raw_write(c.fd, &h, sizeof(h));
	CHECK(rc_closed_within(&c, 5000));
	rc_close(&c);
	CHECK(srv_wait_gone(&s, ++gone, 5000));

	/* Just over our limit (64 KiB + slack), and below a header. */
	rc_init(&c, rc_connect_path(s.path, 5000));
	rc_hello(&c);
	h.msg_size = 65536 + 4096 + 1;
	raw_write(c.fd, &h, sizeof(h));
	CHECK(rc_closed_within(&c, 5000));
	rc_close(&c);
	CHECK(srv_wait_gone(&s, ++gone, 5000));
	rc_init(&c, rc_connect_path(s.path, 5000));
	h.msg_size = 8;
	raw_write(c.fd, &h, sizeof(h));
	CHECK(rc_closed_within(&c, 5000));
	rc_close(&c);
	CHECK(srv_wait_gone(&s, ++gone, 5000));

	/* A message that never completes: dropped after io_timeout_ms. */
	rc_init(&c, rc_connect_path(s.path, 5000));
	rc_hello(&c);
	vfu_hdr_command(&h, 2, VFU_CMD_REGION_WRITE, 0);
	h.msg_size = 100;
	raw_write(c.fd, &h, sizeof(h));
	raw_write(c.fd, "partial", 7);
	CHECK(rc_closed_within(&c, 5000));
	rc_close(&c);
	CHECK(srv_wait_gone(&s, ++gone, 5000));

	/* A type that is neither command nor reply. */
	rc_init(&c, rc_connect_path(s.path, 5000));
	rc_hello(&c);
	vfu_hdr_command(&h, 3, VFU_CMD_DEVICE_GET_INFO, 0);
	h.flags = 5;
	h.msg_size = sizeof(h);
	raw_write(c.fd, &h, sizeof(h));
	CHECK(rc_closed_within(&c, 5000));
	rc_close(&c);
	CHECK(srv_wait_gone(&s, ++gone, 5000));

	/* More fds than any message may carry: dropped, every fd closed. */
	rc_init(&c, rc_connect_path(s.path, 5000));
	rc_hello(&c);
	{
		char ctl[CMSG_SPACE(sizeof(fds))] __attribute__((aligned(8)));
		struct vfu_hdr hh;
		struct iovec iov = { &hh, sizeof(hh) };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
				     .msg_controllen = sizeof(ctl) };
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);

		vfu_hdr_command(&hh, 4, VFU_CMD_DEVICE_RESET, 0);
		hh.msg_size = sizeof(hh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(fds));
		memcpy(CMSG_DATA(cm), fds, sizeof(fds));
		CHECK(sendmsg(c.fd, &mh, MSG_NOSIGNAL) == sizeof(hh));
	}
	CHECK(rc_closed_within(&c, 5000));
	rc_close(&c);
	CHECK(srv_wait_gone(&s, ++gone, 5000));
	CHECK_EQ(count_open_fds(), before);

	check_served(&s);
	srv_stop(&s);
	for (int i = 0; i < (int)(sizeof(fds) / sizeof(fds[0])); i++)
		close(fds[i]);
}

TEST(hostile_commands)
{
	uint8_t junk[64];
	struct vfu_hdr h;
	int efd = eventfd(0, EFD_CLOEXEC), before;
	struct srv s;
	struct rc c;

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	rc_hello(&c);
	before = count_open_fds();
	/* Unknown and removed commands, and the server-to-client ones. */
	static const uint16_t unknown[] = { 0, 14, 19, 200, 0xffff, VFU_CMD_DMA_READ,
					    VFU_CMD_DMA_WRITE };
	for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++)
		CHECK_EQ(rc_call(&c, unknown[i], NULL, 0, NULL, 0, NULL), -ENOSYS);
	/* Every command with a 1-byte payload: refused, never a crash. */
	memset(junk, 0xff, sizeof(junk));
	for (uint16_t cmd = 2; cmd <= VFU_CMD_MAX; cmd++) {
		int r;

		if (cmd == VFU_CMD_DEVICE_RESET || cmd == 11 || cmd == 12 || cmd == 14)
			continue;
		r = rc_call(&c, cmd, junk, 1, NULL, 0, NULL);
		if (r >= 0)
			FAIL("%s with 1 byte accepted", vfu_cmd_name(cmd));
	}
	/* fds on commands that take none are closed with the message. */
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO, &(struct vfu_device_info){ .argsz = 16 }, 16,
			 &efd, 1, NULL), 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_READ, junk, 1, &efd, 1, NULL), -EINVAL);
	/* A message's fds go after its reply: one more round trip first. */
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO, &(struct vfu_device_info){ .argsz = 16 }, 16,
			 NULL, 0, NULL), 0);
	CHECK_EQ(count_open_fds(), before);
	/* A stray reply is ignored; NO_REPLY commands get no answer. */
	vfu_hdr_reply(&h, &(struct vfu_hdr){ .msg_id = 999, .cmd = VFU_CMD_DMA_READ });
	h.msg_size = sizeof(h);
	raw_write(c.fd, &h, sizeof(h));
	rc_send(&c, VFU_CMD_DEVICE_RESET, VFU_F_NO_REPLY, NULL, 0, NULL, 0);
	rc_send(&c, 0x77, VFU_F_NO_REPLY, NULL, 0, NULL, 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO, &(struct vfu_device_info){ .argsz = 16 }, 16,
			 NULL, 0, NULL), 0);
	CHECK_EQ(s.td.resets, 1);
	rc_close(&c);
	srv_stop(&s);
	close(efd);
}

static uint64_t rnd(uint64_t *st)
{
	*st ^= *st << 13;
	*st ^= *st >> 7;
	*st ^= *st << 17;
	return *st;
}

/* Random commands with random payloads: answered or dropped, never fatal. */
TEST_TIMEOUT(random_messages, 120)
{
	struct vfm_vfu_opts o = { .io_timeout_ms = 200 };
	uint64_t seed = 0x9e3779b97f4a7c15ull;
	unsigned answered = 0, drops = 0;
	uint8_t payload[300];
	struct srv s;
	struct rc c;

	srv_start_path(&s, VFM_MIG_ALL, &o);
	rc_init(&c, rc_connect_path(s.path, 5000));
	rc_hello(&c);
	for (int i = 0; i < 3000; i++) {
		uint16_t cmd = (uint16_t)(rnd(&seed) % 20);
		size_t len = rnd(&seed) % sizeof(payload);
		struct vfu_msg m = VFU_MSG_INIT;
		struct vfm_error e = { 0 };
		uint16_t id;
		int r;

		for (size_t j = 0; j < len; j++)
			payload[j] = (uint8_t)rnd(&seed);
		/* Plausible small numbers in the first fields, now and then. */
		if (len >= 16 && rnd(&seed) % 2)
			for (size_t j = 0; j < 16; j += 4)
				payload[j] = (uint8_t)(rnd(&seed) % 40), payload[j + 1] = 0,
				payload[j + 2] = 0, payload[j + 3] = 0;
		id = rc_send(&c, cmd, 0, payload, len, NULL, 0);
		for (;;) {
			r = vfu_recv(c.fd, &m, VFU_MAX_MSG_SIZE, 5000, &e);
			if (r || vfu_hdr_is_reply(&m.hdr))
				break;
			/* A server DMA command: refuse it. */
			vfu_send_error(c.fd, &m.hdr, EFAULT, NULL);
			vfu_msg_release(&m);
		}
		if (r == -ECONNRESET) {
			drops++;
			rc_close(&c);
			rc_init(&c, rc_connect_path(s.path, 5000));
			rc_hello(&c);
			continue;
		}
		if (r)
			FAIL("message %d (%s, %zu bytes): %s", i, vfu_cmd_name(cmd), len, e.msg);
		CHECK_EQ(m.hdr.msg_id, id);
		CHECK_EQ(m.hdr.cmd, cmd);
		if (m.hdr.flags & VFU_F_ERROR)
			CHECK_EQ(m.len, 0);
		answered++;
		vfu_msg_release(&m);
	}
	fprintf(stderr, "# %u answered, %u drops\n", answered, drops);
	rc_close(&c);
	check_served(&s);
	srv_stop(&s);
}
