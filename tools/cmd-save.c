/* vfiomig save DEVICE FILE: stop the device, write its migration data and
 * config space to FILE (docs/device-tools.md), and let it run again. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "commands.h"
#include "devtool.h"

static void save_usage(FILE *out)
{
	fprintf(out,
		"usage: vfiomig save DEVICE FILE [-v]\n\n"
		"Checkpoints a device: RUNNING -> STOP_COPY, every byte of its migration data\n"
		"into FILE with a header (device identity, migration flags, sizes, checksums)\n"
		"and its PCI config space, then STOP -> RUNNING. FILE is replaced only when\n"
		"the save succeeded. 'vfiomig load' puts the state back.\n\n"
		"DEVICE: vfio-user:SOCKET, vfio:/dev/vfio/devices/vfioN, vfio:0000:BB:DD.F, or an mdev:\n"
		"        vfio:UUID or vfio:/sys/bus/mdev/devices/UUID\n");
}

struct sink {
	int fd;
	XXH3_state_t *xx;
};

static int write_all(int fd, const void *buf, size_t len, struct vfm_error *err)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return vfm_error_set(err, n < 0 ? -errno : -EIO, "writing the file: %s",
					     n < 0 ? strerror(errno) : "no progress");
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int to_file(void *opaque, const void *buf, size_t len, struct vfm_error *err)
{
	struct sink *s = opaque;

	XXH3_64bits_update(s->xx, buf, len);
	return write_all(s->fd, buf, len, err);
}

/*
 * Data and config (read before STOP_COPY) into fd, the header last, at
 * offset 0. Device in STOP_COPY.
 */
static int write_file(struct vfm_device *dev, int fd, struct devfile_hdr *h,
		      const struct vfm_pci_config *cfg, struct vfm_error *err)
{
	uint8_t hdr[DEVFILE_HDR_SIZE] = { 0 };
	struct sink s = { fd, XXH3_createState() };
	int r;

	if (!s.xx)
		return vfm_error_set(err, -ENOMEM, "no memory");
	XXH3_64bits_reset(s.xx);
	r = write_all(fd, hdr, sizeof(hdr), err);
	if (!r)
		r = devtool_read_stream(dev, to_file, &s, &h->data_len, err);
	h->data_csum = XXH3_64bits_digest(s.xx);
	XXH3_freeState(s.xx);
	if (r)
		return vfm_error_set(err, r, "reading the device's state");
	/* Config space after the data in the file (as QEMU's stream). */
	if (h->ident.pci) {
		h->config_len = cfg->len;
		h->config_csum = XXH3_64bits(cfg->bytes, cfg->len);
		r = write_all(fd, cfg->bytes, cfg->len, err);
		if (r)
			return r;
	}
	h->created = (uint64_t)time(NULL);
	devfile_hdr_encode(h, hdr);
	if (pwrite(fd, hdr, sizeof(hdr), 0) != (ssize_t)sizeof(hdr) || fsync(fd))
		return vfm_error_set(err, -errno, "writing the file header: %s", strerror(errno));
	return 0;
}

static int save_run(const char *spec, const char *file)
{
	struct vfm_device_props props;
	struct vfm_error err = { 0 };
	struct devfile_hdr h = { 0 };
	struct vfm_pci_config cfg;
	struct vfm_device *dev;
	char tmp[4096];
	int fd = -1, r, status = VFM_EXIT_FAIL;
	enum vfm_state st;

	r = devtool_open(spec, &dev, &props, &err);
	if (r) {
		fprintf(stderr, "vfiomig save: %s\n", err.msg);
		return VFM_EXIT_FAIL;
	}
	r = devtool_ident(dev, &h.ident, &cfg, &err);
	if (!r)
		r = vfm_device_probe_migration(dev, &err);
	if (r)
		goto out;
	st = vfm_device_state(dev);
	if (st != VFM_STATE_RUNNING && st != VFM_STATE_STOP) {
		r = vfm_error_set(&err, -EBUSY, "device is in %s (a migration in progress?)",
				  vfm_state_name(st));
		goto out;
	}
	h.mig_flags = vfm_device_mig_flags(dev);
	h.backend = vfm_device_is_vfio(dev) ? 2 : 1;
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", file) >= (int)sizeof(tmp)) {
		r = vfm_error_set(&err, -ENAMETOOLONG, "file name too long");
		goto out;
	}
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = vfm_error_set(&err, -errno, "%s: %s", tmp, strerror(errno));
		goto out;
	}
	/*
	 * Config space with the device stopped and before STOP_COPY: a device
	 * may refuse region access in STOP_COPY (libvfio-user does). A PCI
	 * device whose config cannot be read fails the save: never a file
	 * that silently lacks it.
	 */
	r = vfm_device_set_state(dev, VFM_STATE_STOP, VFM_STATE_RUNNING, &err);
	if (!r && h.ident.pci) {
		struct vfm_error ce = { 0 };

		r = vfm_pci_config_save(dev, &cfg, &ce);
		if (r)
			vfm_error_set(&err, r, "config space lost, nothing saved: %s", ce.msg);
	}
	if (!r)
		r = vfm_device_set_state(dev, VFM_STATE_STOP_COPY, VFM_STATE_RUNNING, &err);
	if (!r)
		r = write_file(dev, fd, &h, &cfg, &err);
	if (!r)
		r = vfm_device_set_state(dev, VFM_STATE_STOP, VFM_STATE_RUNNING, &err);
	/* A save that leaves the device stopped failed, whatever the file says. */
	if (!r)
		r = devtool_back_to_running(dev, &err);
	if (close(fd) && !r)
		r = vfm_error_set(&err, -errno, "closing %s: %s", tmp, strerror(errno));
	if (!r && rename(tmp, file))
		r = vfm_error_set(&err, -errno, "renaming to %s: %s", file, strerror(errno));
	if (r)
		unlink(tmp);
	else
		status = VFM_EXIT_OK;
out:
	if (vfm_device_mig_flags(dev))
		devtool_back_to_running(dev, NULL);
	if (status == VFM_EXIT_OK)
		printf("saved %" PRIu64 " bytes of device state (checksum %016" PRIx64
		       ") and %" PRIu32 " bytes of config space from %s to %s\n", h.data_len,
		       h.data_csum, h.config_len, spec, file);
	else
		fprintf(stderr, "vfiomig save: %s\n", err.msg[0] ? err.msg : vfm_strerror(r));
	vfm_device_free(dev);
	return status;
}

int cmd_save(int argc, char **argv)
{
	const char *device, *file;
	int r = devtool_device_file_args("save", argc, argv, save_usage, &device, &file);

	return r >= 0 ? r : save_run(device, file);
}
