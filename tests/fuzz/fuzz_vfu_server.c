/*
 * Fuzz target: the vfio-user server's message dispatch, with the `dma`
 * sample device behind it. The input is the byte stream a client sends
 * (any number of messages, no fds); the server must answer or drop the
 * client, never crash, and never wait past its bounds.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../devices/dma.h"
#include "vfiomig/log.h"
#include "vfiomig/vfu_server.h"

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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
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
	if (size && write(sv[0], data, size) != (ssize_t)size)
		abort();
	/* The client is done talking: the server sees EOF after the input. */
	shutdown(sv[0], SHUT_WR);
	if (vfm_vfu_attach_fd(ctx, sv[1], NULL) == 0) {
		/* Each step handles one message; the input holds at most size/16. */
		for (size_t i = 0; i <= size / 16 + 2 && vfm_vfu_attached(ctx); i++) {
			if (vfm_vfu_run_once(ctx, NULL) < 0)
				break;
			drain(sv[0]);
		}
	}
	vfm_dmadev_destroy(dev);
	close(sv[0]);
	return 0;
}
