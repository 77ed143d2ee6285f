/*
 * The kernel VFIO backend's system call seam: the libc implementation, and
 * the process-wide default that tests may replace.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vfio/priv.h"

static int sys_open(void *o, const char *path, int flags)
{
	int fd = open(path, flags | O_CLOEXEC);

	return fd < 0 ? -errno : fd;
}

static int sys_close(void *o, int fd)
{
	/* Linux closes the fd even when close() reports EINTR: never retry. */
	return close(fd) ? -errno : 0;
}

static int sys_ioctl(void *o, int fd, unsigned long req, void *arg)
{
	int r = ioctl(fd, req, arg);

	return r < 0 ? -errno : r;
}

static ssize_t sys_read(void *o, int fd, void *buf, size_t len)
{
	ssize_t n = read(fd, buf, len);

	return n < 0 ? -errno : n;
}

static ssize_t sys_write(void *o, int fd, const void *buf, size_t len)
{
	ssize_t n = write(fd, buf, len);

	return n < 0 ? -errno : n;
}

static ssize_t sys_pread(void *o, int fd, void *buf, size_t len, off_t off)
{
	ssize_t n = pread(fd, buf, len, off);

	return n < 0 ? -errno : n;
}

static ssize_t sys_pwrite(void *o, int fd, const void *buf, size_t len, off_t off)
{
	ssize_t n = pwrite(fd, buf, len, off);

	return n < 0 ? -errno : n;
}

static void *sys_mmap(void *o, void *addr, size_t len, int prot, int flags, int fd, off_t off,
		      int *err_out)
{
	void *p = mmap(addr, len, prot, flags, fd, off);

	if (p == MAP_FAILED && err_out)
		*err_out = -errno;
	return p;
}

static int sys_munmap(void *o, void *addr, size_t len)
{
	return munmap(addr, len) ? -errno : 0;
}

static int sys_poll(void *o, struct pollfd *fds, nfds_t n, int timeout_ms)
{
	int r = poll(fds, n, timeout_ms);

	return r < 0 ? -errno : r;
}

static int sys_fcntl(void *o, int fd, int cmd, int arg)
{
	int r = fcntl(fd, cmd, arg);

	return r < 0 ? -errno : r;
}

static const struct vfm_vfio_sys libc_sys = {
	.version = VFM_VFIO_SYS_V2,
	.open = sys_open,
	.close = sys_close,
	.ioctl = sys_ioctl,
	.read = sys_read,
	.write = sys_write,
	.pread = sys_pread,
	.pwrite = sys_pwrite,
	.mmap = sys_mmap,
	.munmap = sys_munmap,
	.poll = sys_poll,
	.fcntl = sys_fcntl,
};

static _Atomic(const struct vfm_vfio_sys *) default_sys;

const struct vfm_vfio_sys *vfm_vfio_sys_libc(void)
{
	return &libc_sys;
}

void vfm_vfio_set_default_sys(const struct vfm_vfio_sys *sys)
{
	atomic_store(&default_sys, sys);
}

const struct vfm_vfio_sys *kv_default_sys(void)
{
	const struct vfm_vfio_sys *s = atomic_load(&default_sys);

	return s ? s : &libc_sys;
}
