/*
 * A vfio-user client on libvfio-user's own transport (lib/tran_sock.c,
 * lib/tran.c, compiled in as its samples/client.c does) with that sample's
 * negotiation: max_msg_fds 32, max_data_xfer_size 1024. It migrates a
 * `vfiomig device dma` to another one by hand: PRE_COPY reads until a short
 * reply (twice, the device churning in between), STOP_COPY until an empty
 * one, RESUMING writes in 1024-byte pieces, and compares the two devices'
 * CHECKSUM registers. libvfio-user's transport takes a reply shorter than
 * the buffer it expects for a reset connection: our server must pad
 * MIG_DATA_READ replies and keep every reply within 1024 bytes of data.
 *
 *   lvu_client SRC_SOCKET DST_SOCKET      exit 0: the state arrived intact
 */
#include <err.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "libvfio-user.h"
#include "tran_sock.h"

#define CLIENT_MAX_FDS 32
#define CLIENT_MAX_XFER 1024
#define DMADEV_REG_CHECKSUM 0x58   /* devices/dma.h: BAR0 register, state checksum */

static uint16_t msg_id = 1;

static int connect_to(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	struct timeval tv = { 10, 0 };

	if (s < 0 || strlen(path) >= sizeof(sa.sun_path))
		err(1, "socket");
	memcpy(sa.sun_path, path, strlen(path) + 1);
	if (connect(s, (struct sockaddr *)&sa, sizeof(sa)))
		err(1, "connect %s", path);
	/* Bounded: the transport itself waits forever. */
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	return s;
}

/* samples/client.c send_version()/recv_version(), as they are. */
static void negotiate(int s)
{
	struct vfio_user_version v = { .major = LIB_VFIO_USER_MAJOR, .minor = LIB_VFIO_USER_MINOR };
	struct vfio_user_version *rv = NULL;
	struct vfio_user_header hdr;
	struct iovec iov[3] = { { 0 } };
	char caps[256];
	size_t vlen, xfer = 0, pgsize = 0;
	int n, fds = 0;

	n = snprintf(caps, sizeof(caps),
		     "{\"capabilities\":{\"max_msg_fds\":%u,\"max_data_xfer_size\":%u}}",
		     CLIENT_MAX_FDS, CLIENT_MAX_XFER);
	iov[1] = (struct iovec){ &v, sizeof(v) };
	iov[2] = (struct iovec){ caps, (size_t)n + 1 };
	if (tran_sock_send_iovec(s, msg_id++, false, VFIO_USER_VERSION, iov, 3, NULL, 0, 0) < 0)
		err(1, "sending VERSION");
	if (tran_sock_recv_alloc(s, &hdr, true, NULL, (void **)&rv, &vlen) < 0)
		err(1, "VERSION refused or no reply");
	if (vlen <= sizeof(*rv) || rv->major != LIB_VFIO_USER_MAJOR)
		errx(1, "VERSION reply of %zu bytes", vlen);
	if (tran_parse_version_json((const char *)rv->data, &fds, &xfer, &pgsize, NULL) < 0)
		err(1, "server VERSION JSON '%s'", (const char *)rv->data);
	printf("negotiated: server max_msg_fds %d max_data_xfer_size %zu pgsize %zu\n", fds, xfer,
	       pgsize);
	free(rv);
}

/* DEVICE_FEATURE with len bytes of data; the reply (header + rlen) into rep. */
static void feature(int s, uint32_t flags, const void *data, size_t len, void *rep, size_t rlen,
		    const char *what)
{
	struct vfio_user_device_feature f = { (uint32_t)(sizeof(f) + (len > rlen ? len : rlen)), flags };
	uint8_t req[sizeof(f) + 16], out[sizeof(f) + 16];

	if (len > 16 || rlen > 16)
		errx(1, "%s: feature data too large", what);
	memcpy(req, &f, sizeof(f));
	memcpy(req + sizeof(f), data, len);
	if (tran_sock_msg(s, msg_id++, VFIO_USER_DEVICE_FEATURE, req, sizeof(f) + len, NULL, out,
			  sizeof(f) + rlen) < 0)
		err(1, "%s", what);
	memcpy(rep, out + sizeof(f), rlen);
}

static void set_state(int s, uint32_t state)
{
	struct vfio_user_device_feature_mig_state st = { state, 0xffffffffu }, echo;

	feature(s, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET, &st, sizeof(st),
		&echo, sizeof(echo), "setting the state");
}

static uint64_t mig_flags(int s)
{
	struct vfio_user_device_feature_migration m;

	feature(s, VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_GET, NULL, 0, &m, sizeof(m),
		"GET MIGRATION");
	return m.flags;
}

/* samples/client.c read_migr_data(): the reply must fill the whole buffer. */
static ssize_t read_data(int s, void *buf, size_t len)
{
	struct vfio_user_mig_data req = { sizeof(req) + len, len };
	struct vfio_user_mig_data *rep = calloc(1, sizeof(*rep) + len);
	ssize_t n;

	if (!rep)
		err(1, "calloc");
	if (tran_sock_msg(s, msg_id++, VFIO_USER_MIG_DATA_READ, &req, sizeof(req), NULL, rep,
			  sizeof(*rep) + len) < 0)
		err(1, "MIG_DATA_READ of %zu", len);
	if (rep->size > len)
		errx(1, "MIG_DATA_READ: size %u for %zu", rep->size, len);
	memcpy(buf, rep->data, rep->size);
	n = rep->size;
	free(rep);
	return n;
}

static void write_data(int s, const void *buf, size_t len)
{
	struct vfio_user_mig_data req = { sizeof(req) + len, len };
	struct iovec iov[3] = { { 0 }, { &req, sizeof(req) }, { (void *)buf, len } };

	if (tran_sock_msg_iovec(s, msg_id++, VFIO_USER_MIG_DATA_WRITE, iov, 3, NULL, 0, NULL,
				NULL, 0, NULL, 0) < 0)
		err(1, "MIG_DATA_WRITE of %zu", len);
}

static uint64_t checksum(int s)
{
	struct vfio_user_region_access req = { DMADEV_REG_CHECKSUM, VFU_PCI_DEV_BAR0_REGION_IDX, 8 };
	uint8_t rep[sizeof(req) + 8];
	uint64_t v;

	if (tran_sock_msg(s, msg_id++, VFIO_USER_REGION_READ, &req, sizeof(req), NULL, rep,
			  sizeof(rep)) < 0)
		err(1, "REGION_READ of CHECKSUM");
	memcpy(&v, rep + sizeof(req), 8);
	return v;
}

/* Appends what the device gives until a reply shorter than asked (or empty). */
static size_t drain(int s, char **data, size_t *len, size_t *cap, bool to_empty, unsigned *short_replies)
{
	size_t got = 0;

	for (;;) {
		ssize_t n;

		if (*len + CLIENT_MAX_XFER > *cap) {
			*cap = *cap ? *cap * 2 : 1 << 20;
			*data = realloc(*data, *cap);
			if (!*data)
				err(1, "realloc");
		}
		n = read_data(s, *data + *len, CLIENT_MAX_XFER);
		*len += (size_t)n;
		got += (size_t)n;
		if (n < CLIENT_MAX_XFER)
			(*short_replies)++;
		if (n == 0 || (!to_empty && n < CLIENT_MAX_XFER))
			return got;
	}
}

int main(int argc, char **argv)
{
	struct timespec pause = { 0, 100 * 1000 * 1000 };
	size_t len = 0, cap = 0, pre1, pre2, sc;
	unsigned shorts = 0;
	uint64_t flags, src_sum, dst_sum;
	char *data = NULL;
	int src, dst;

	if (argc != 3)
		errx(2, "usage: lvu_client SRC_SOCKET DST_SOCKET");
	src = connect_to(argv[1]);
	negotiate(src);
	flags = mig_flags(src);
	printf("source migration flags %#" PRIx64 "\n", flags);
	if (!(flags & VFIO_MIGRATION_STOP_COPY) || !(flags & VFIO_MIGRATION_PRE_COPY))
		errx(1, "the source offers no STOP_COPY | PRE_COPY");
	set_state(src, VFIO_USER_DEVICE_STATE_PRE_COPY);
	pre1 = drain(src, &data, &len, &cap, false, &shorts);
	nanosleep(&pause, NULL);   /* the device churns: more pre-copy data */
	pre2 = drain(src, &data, &len, &cap, false, &shorts);
	set_state(src, VFIO_USER_DEVICE_STATE_STOP_COPY);
	sc = drain(src, &data, &len, &cap, true, &shorts);
	src_sum = checksum(src);
	set_state(src, VFIO_USER_DEVICE_STATE_STOP);
	printf("source: pre-copy %zu + %zu bytes, stop-copy %zu bytes, %u short replies, "
	       "checksum %016" PRIx64 "\n", pre1, pre2, sc, shorts, src_sum);

	dst = connect_to(argv[2]);
	negotiate(dst);
	set_state(dst, VFIO_USER_DEVICE_STATE_RESUMING);
	for (size_t off = 0; off < len; off += CLIENT_MAX_XFER)
		write_data(dst, data + off, len - off < CLIENT_MAX_XFER ? len - off : CLIENT_MAX_XFER);
	set_state(dst, VFIO_USER_DEVICE_STATE_STOP);
	dst_sum = checksum(dst);
	printf("destination: %zu bytes written, checksum %016" PRIx64 "\n", len, dst_sum);
	set_state(dst, VFIO_USER_DEVICE_STATE_RUNNING);
	close(src);
	close(dst);
	free(data);
	if (!pre1 || !sc || shorts < 2)
		errx(1, "too little was exercised: pre-copy %zu, stop-copy %zu, %u short replies",
		     pre1, sc, shorts);
	if (src_sum != dst_sum)
		errx(1, "checksums differ: source %016" PRIx64 ", destination %016" PRIx64, src_sum,
		     dst_sum);
	printf("ok: the destination's state equals the source's\n");
	return 0;
}
