/* vfiomig load DEVICE FILE: verify a file from 'vfiomig save' completely,
 * then RESUMING, the data, STOP (the driver validates), config, RUNNING. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "commands.h"
#include "devtool.h"

#define CHUNK (1u << 20)

static void load_usage(FILE *out)
{
	fprintf(out,
		"usage: vfiomig load DEVICE FILE [-v]\n\n"
		"Restores a state saved by 'vfiomig save': the file is checked whole first\n"
		"(header, sizes, checksums) and refused if it came from a different kind of\n"
		"device, all before the device is touched; then RESUMING, the data, STOP\n"
		"(where the driver validates it), the PCI config space, RUNNING.\n\n"
		"DEVICE: vfio-user:SOCKET, vfio:/dev/vfio/devices/vfioN, vfio:0000:BB:DD.F, or an mdev:\n"
		"        vfio:UUID or vfio:/sys/bus/mdev/devices/UUID\n");
}

static int read_at(int fd, void *buf, size_t len, off_t off, struct vfm_error *err)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, off + (off_t)done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return vfm_error_set(err, n < 0 ? -errno : VFM_ESTREAM, "reading the file: %s",
					     n < 0 ? strerror(errno) : "truncated");
		done += (size_t)n;
	}
	return 0;
}

/* The whole file, before any device call: header, size, data and config sums. */
static int verify_file(int fd, struct devfile_hdr *h, struct vfm_pci_config *cfg, uint8_t *buf,
		       struct vfm_error *err)
{
	uint8_t hdr[DEVFILE_HDR_SIZE];
	XXH3_state_t *xx;
	struct stat st;
	uint64_t off;
	int r;

	if (fstat(fd, &st))
		return vfm_error_set(err, -errno, "stat: %s", strerror(errno));
	if ((uint64_t)st.st_size < DEVFILE_HDR_SIZE)
		return vfm_error_set(err, VFM_ESTREAM, "file of %lld bytes is no device state file",
				     (long long)st.st_size);
	r = read_at(fd, hdr, sizeof(hdr), 0, err);
	if (!r)
		r = devfile_hdr_decode(hdr, h, err);
	if (r)
		return r;
	if (h->data_len > (uint64_t)st.st_size ||
	    (uint64_t)st.st_size != DEVFILE_HDR_SIZE + h->data_len + h->config_len)
		return vfm_error_set(err, VFM_ESTREAM, "file is %lld bytes, the header says %" PRIu64,
				     (long long)st.st_size,
				     DEVFILE_HDR_SIZE + h->data_len + h->config_len);
	xx = XXH3_createState();
	if (!xx)
		return vfm_error_set(err, -ENOMEM, "no memory");
	XXH3_64bits_reset(xx);
	for (off = 0; off < h->data_len && !r; off += CHUNK) {
		size_t n = h->data_len - off < CHUNK ? (size_t)(h->data_len - off) : CHUNK;

		r = read_at(fd, buf, n, (off_t)(DEVFILE_HDR_SIZE + off), err);
		if (!r)
			XXH3_64bits_update(xx, buf, n);
	}
	if (!r && XXH3_64bits_digest(xx) != h->data_csum)
		r = vfm_error_set(err, VFM_ECHECKSUM, "device data is corrupt (checksum mismatch)");
	XXH3_freeState(xx);
	if (r)
		return r;
	cfg->len = h->config_len;
	if (h->config_len) {
		r = read_at(fd, cfg->bytes, h->config_len, (off_t)(DEVFILE_HDR_SIZE + h->data_len),
			    err);
		if (!r && XXH3_64bits(cfg->bytes, h->config_len) != h->config_csum)
			r = vfm_error_set(err, VFM_ECHECKSUM, "config space is corrupt (checksum mismatch)");
	}
	return r;
}

static int load_into(struct vfm_device *dev, int fd, const struct devfile_hdr *h,
		     const struct vfm_pci_config *cfg, uint8_t *buf, struct vfm_error *err)
{
	int r = vfm_device_set_state(dev, VFM_STATE_RESUMING, VFM_STATE_RUNNING, err);

	if (r)
		return vfm_error_set(err, r, "entering RESUMING");
	for (uint64_t off = 0; off < h->data_len && !r; off += CHUNK) {
		size_t n = h->data_len - off < CHUNK ? (size_t)(h->data_len - off) : CHUNK;

		r = read_at(fd, buf, n, (off_t)(DEVFILE_HDR_SIZE + off), err);
		if (!r)
			r = vfm_device_write_data(dev, buf, n, err);
	}
	if (r)
		return r;
	/* A device left holding half a state must never run it: ERROR = reset. */
	r = vfm_device_set_state(dev, VFM_STATE_STOP, VFM_STATE_ERROR, err);
	if (r)
		return vfm_error_set(err, r, "the device rejected the state");
	if (cfg->len) {
		r = vfm_pci_config_restore(dev, cfg, NULL, err);
		if (r)
			return r;
	}
	return vfm_device_set_state(dev, VFM_STATE_RUNNING, VFM_STATE_ERROR, err);
}

static int load_run(const char *spec, const char *file)
{
	struct vfm_device_props props;
	struct vfm_error err = { 0 };
	struct vfm_pci_config cfg, now;
	struct devtool_ident id;
	struct devfile_hdr h;
	struct vfm_device *dev = NULL;
	uint8_t *buf = malloc(CHUNK);
	char a[128], b[128];
	int fd, r;
	enum vfm_state st;

	fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || !buf) {
		r = vfm_error_set(&err, fd < 0 ? -errno : -ENOMEM, "%s: %s", file, strerror(errno));
		goto out;
	}
	r = verify_file(fd, &h, &cfg, buf, &err);
	if (r) {
		vfm_error_set(&err, r, "%s", file);
		goto out;
	}
	r = devtool_open(spec, &dev, &props, &err);
	if (!r)
		r = devtool_ident(dev, &id, &now, &err);
	if (r)
		goto out;
	if (!devtool_same_kind(&h.ident, &id)) {
		devtool_ident_str(&h.ident, a, sizeof(a));
		devtool_ident_str(&id, b, sizeof(b));
		r = vfm_error_set(&err, -EINVAL, "%s holds the state of a %s; %s is a %s", file, a,
				  spec, b);
		goto out;
	}
	r = vfm_device_probe_migration(dev, &err);
	if (r)
		goto out;
	st = vfm_device_state(dev);
	if (st != VFM_STATE_RUNNING && st != VFM_STATE_STOP) {
		r = vfm_error_set(&err, -EBUSY, "device is in %s (a migration in progress?)",
				  vfm_state_name(st));
		goto out;
	}
	if (h.mig_flags != vfm_device_mig_flags(dev))
		fprintf(stderr, "vfiomig load: note: saved from a device with migration flags %#"
			PRIx64 ", this one has %#" PRIx64 "\n", h.mig_flags,
			vfm_device_mig_flags(dev));
	r = load_into(dev, fd, &h, &cfg, buf, &err);
	devtool_back_to_running(dev, NULL);
out:
	if (r)
		fprintf(stderr, "vfiomig load: %s\n", err.msg[0] ? err.msg : vfm_strerror(r));
	else
		printf("loaded %" PRIu64 " bytes of device state and %" PRIu32
		       " bytes of config space from %s into %s\n", h.data_len, h.config_len, file,
		       spec);
	vfm_device_free(dev);
	if (fd >= 0)
		close(fd);
	free(buf);
	return r ? VFM_EXIT_FAIL : VFM_EXIT_OK;
}

int cmd_load(int argc, char **argv)
{
	const char *device, *file;
	int r = devtool_device_file_args("load", argc, argv, load_usage, &device, &file);

	return r >= 0 ? r : load_run(device, file);
}
