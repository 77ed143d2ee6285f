/*
 * Fuzz target: the vfio-user client's handling of what a server sends. The
 * input is the server's whole byte stream (replies and server-initiated
 * requests); the client negotiates VERSION, reads device and region info,
 * then tries a few requests. Any answer must give an error or a device,
 * never a crash or a wait past the request timeout.
 */
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vfiomig/log.h"
#include "vfiomig/vfio_user.h"

#define MAX_INPUT (64u << 10)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void quiet(enum vfm_log_level level, const char *line, void *opaque)
{
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct vfm_vfio_user_opts o = { .version = VFM_VFIO_USER_OPTS_V1, .id = "fuzz",
					.timeout_ms = 200 };
	struct vfm_device *dev = NULL;
	struct vfm_device_info info;
	unsigned char buf[256];
	int sv[2];

	if (size > MAX_INPUT)
		return 0;
	vfm_log_set_sink(quiet, NULL);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return 0;
	/* The whole "server" is written up front, then EOF: nothing can hang. */
	if (size && write(sv[0], data, size) != (ssize_t)size)
		abort();
	shutdown(sv[0], SHUT_WR);
	if (vfm_vfio_user_open_fd(sv[1], "fuzz", &o, &dev, NULL) == 0) {
		uint64_t init, dirty;

		vfm_device_get_info(dev, &info, NULL);
		vfm_device_region_read(dev, 0, 0, buf, 8, NULL);
		if (vfm_device_probe_migration(dev, NULL) == 0) {
			vfm_device_set_state(dev, VFM_STATE_STOP, VFM_STATE_RUNNING, NULL);
			vfm_device_precopy_info(dev, &init, &dirty, NULL);
			vfm_device_read_data(dev, buf, sizeof(buf), NULL);
		}
		vfm_vfio_user_poll(dev, NULL);
		vfm_device_free(dev);
	}
	close(sv[0]);
	return 0;
}
