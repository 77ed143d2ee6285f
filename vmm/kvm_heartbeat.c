/*
 * The guest's heartbeat port (KG_PORT_HEARTBEAT, guest/abi.h) forwarded to a
 * UNIX stream socket, as QEMU's isa-debugcon forwards it to a socket chardev:
 * an observer outside both VMMs (bench/vfm-heartbeat.c) timestamps every byte
 * from a source and a destination, and the longest silence across a
 * migration is the blackout the guest saw (docs/performance.md).
 *
 * The byte is sent from the vCPU thread without blocking: an observer that
 * does not read costs dropped beats (counted), never a stalled vCPU. QEMU's
 * debugcon write blocks instead (qemu_chr_fe_write_all in
 * hw/char/debugcon.c); the observer reads promptly, so neither waits.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "kvm_int.h"
#include "util/logging.h"

int vfm__kvm_heartbeat_open(struct kvm_guest *k, const char *path, struct vfm_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd;

	k->hb_fd = -1;
	if (!path)
		return 0;
	if (strlen(path) >= sizeof(sa.sun_path))
		return vfm_error_set(err, -ENAMETOOLONG, "heartbeat socket path too long: %s",
				     path);
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "heartbeat socket: %s", strerror(errno));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;

		close(fd);
		return vfm_error_set(err, -e, "heartbeat socket %s: %s", path, strerror(e));
	}
	k->hb_fd = fd;
	vfm_info("kvm", "guest heartbeat port 0x%x forwarded to %s", KG_PORT_HEARTBEAT, path);
	return 0;
}

void vfm__kvm_heartbeat(struct kvm_guest *k, const unsigned char *data, unsigned count)
{
	ssize_t n;

	if (k->hb_fd < 0) {
		atomic_fetch_add(&k->hb_dropped, count);
		return;
	}
	n = send(k->hb_fd, data, count, MSG_DONTWAIT | MSG_NOSIGNAL);
	if (n > 0)
		atomic_fetch_add(&k->hb_sent, (uint64_t)n);
	if (n < (ssize_t)count)
		atomic_fetch_add(&k->hb_dropped, count - (n > 0 ? (uint64_t)n : 0));
}

void vfm__kvm_heartbeat_close(struct kvm_guest *k)
{
	if (k->hb_fd >= 0) {
		vfm_info("kvm", "heartbeat: %llu beats sent, %llu dropped",
			 (unsigned long long)k->hb_sent, (unsigned long long)k->hb_dropped);
		close(k->hb_fd);
	}
	k->hb_fd = -1;
}
