/*
 * Fuzz target: the vfio-user server's message dispatch, with the `dma`
 * sample device behind it. The input is the byte stream a client sends
 * (any number of messages, no fds); the server must answer or drop the
 * client, never crash, and never wait past its bounds.
 *
 * An input that starts with "SHM!" is fed after a VERSION stating
 * vfiomig_mig_shm and a SET of a 64 KiB migration data window (a memfd,
 * which input bytes cannot carry): the rest then reaches the windowed
 * MIG_DATA_READ/WRITE paths with whatever offsets and sizes it names.
 */
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../devices/dma.h"
#include "vfio-user/proto.h"
#include "vfiomig/log.h"
#include "vfiomig/vfu_server.h"

#define SHM_MAGIC "SHM!"
#define SHM_SIZE (64u << 10)

#define MAX_INPUT (64u << 10)   /* fits a socketpair's buffer: the write never blocks */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void drain(int fd)
{
	char buf[4096];

	while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0)
		;
}

/* A dropped client is the expected outcome: keep the fuzzer's output readable. */
static void quiet(enum vfm_log_level level, const char *line, void *opaque)
{
}

/* VERSION with vfiomig_mig_shm, then SET MIG_SHM with a memfd (ids 0xfff0, 0xfff1). */
static void shm_preamble(int fd)
{
	static const char json[] = "{\"capabilities\":{\"max_msg_fds\":8,"
				   "\"vfiomig_mig_shm\":true}}";
	struct vfu_hdr vh = { 0xfff0, VFU_CMD_VERSION, 16 + 4 + sizeof(json), 0, 0 };
	struct vfu_hdr sh = { 0xfff1, VFU_CMD_DEVICE_FEATURE, 16 + 8 + 8, 0, 0 };
	struct vfu_version v = { VFU_VERSION_MAJOR, VFU_VERSION_MINOR };
	struct vfu_device_feature f = { 16, VFM_VFU_FEATURE_MIG_SHM | VFU_FEATURE_SET };
	struct vfu_mig_shm_set s = { SHM_SIZE };
	uint8_t ver[16 + 4 + sizeof(json)], set[16 + 8 + 8];
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { set, sizeof(set) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
	int mfd = memfd_create("fuzz-shm", MFD_CLOEXEC);

	if (mfd < 0 || ftruncate(mfd, SHM_SIZE))
		abort();
	memcpy(ver, &vh, 16);
	memcpy(ver + 16, &v, 4);
	memcpy(ver + 20, json, sizeof(json));
	memcpy(set, &sh, 16);
	memcpy(set + 16, &f, 8);
	memcpy(set + 24, &s, 8);
	if (write(fd, ver, sizeof(ver)) != (ssize_t)sizeof(ver))
		abort();
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &mfd, sizeof(int));
	if (sendmsg(fd, &mh, 0) != (ssize_t)sizeof(set))
		abort();
	close(mfd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	bool shm = size >= 4 && !memcmp(data, SHM_MAGIC, 4);
	struct vfm_dmadev_opts o = { .id = "fuzz", .state_size = 64u << 10, .seed = 1 };
	struct vfm_dmadev *dev;
	struct vfm_vfu_ctx *ctx;
	int sv[2];

	if (size > MAX_INPUT)
		return 0;
	vfm_log_set_sink(quiet, NULL);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return 0;
	if (vfm_dmadev_create(NULL, &o, &dev, NULL)) {
		close(sv[0]);
		close(sv[1]);
		return 0;
	}
	ctx = vfm_dmadev_ctx(dev);
	if (shm) {
		shm_preamble(sv[0]);
		data += 4;
		size -= 4;
	}
	if (size && write(sv[0], data, size) != (ssize_t)size)
		abort();
	/* The client is done talking: the server sees EOF after the input. */
	shutdown(sv[0], SHUT_WR);
	if (vfm_vfu_attach_fd(ctx, sv[1], NULL) == 0) {
		/* Each step handles one message; the input holds at most size/16. */
		for (size_t i = 0; i <= size / 16 + 2 + 2 * shm && vfm_vfu_attached(ctx); i++) {
			if (vfm_vfu_run_once(ctx, NULL) < 0)
				break;
			drain(sv[0]);
		}
	}
	vfm_dmadev_destroy(dev);
	close(sv[0]);
	return 0;
}
