/* Helpers of the device tools: open a DEVICE spec, identity, stream reading,
 * and the save file header (docs/device-tools.md). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "commands.h"
#include "devtool.h"
#include "vfiomig/log.h"
#include "vfiomig/vfio_user.h"

bool devtool_spec_ok(const char *cmd, const char *spec)
{
	struct vfm_device_props props;
	struct vfm_error err = { 0 };
	char backend[16], path[512];

	if (vfm_device_spec_parse(spec, backend, sizeof(backend), path, sizeof(path), &props,
				  &err) == 0)
		return true;
	fprintf(stderr, "vfiomig %s: %s\n", cmd, err.msg);
	return false;
}

int devtool_device_file_args(const char *cmd, int argc, char **argv, void (*usage)(FILE *),
			     const char **device, const char **file)
{
	const char *args[2] = { NULL, NULL };
	int n = 0;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage(stdout);
			return VFM_EXIT_OK;
		}
		if (argv[i][0] == '-' || n == 2) {
			fprintf(stderr, "vfiomig %s: unexpected argument '%s'\n", cmd, argv[i]);
			usage(stderr);
			return VFM_EXIT_USAGE;
		}
		args[n++] = argv[i];
	}
	if (n != 2) {
		fprintf(stderr, "vfiomig %s: needs DEVICE and FILE\n", cmd);
		usage(stderr);
		return VFM_EXIT_USAGE;
	}
	if (!devtool_spec_ok(cmd, args[0]))
		return VFM_EXIT_USAGE;
	*device = args[0];
	*file = args[1];
	return -1;
}

int devtool_open(const char *spec, struct vfm_device **out, struct vfm_device_props *props,
		 struct vfm_error *err)
{
	char backend[16], path[512];
	int r;

	r = vfm_device_spec_parse(spec, backend, sizeof(backend), path, sizeof(path), props, err);
	if (r)
		return r;
	if (!strcmp(backend, "vfio-user")) {
		struct vfm_vfio_user_opts o = { .version = VFM_VFIO_USER_OPTS_V1,
						.id = props->id[0] ? props->id : "dev",
						.timeout_ms = DEVTOOL_TIMEOUT_MS };

		return vfm_vfio_user_open(path, &o, out, err);
	}
	{
		struct vfm_vfio_opts o = { .version = VFM_VFIO_OPTS_V1,
					   .id = props->id[0] ? props->id : "dev",
					   .timeout_ms = DEVTOOL_TIMEOUT_MS };

		return vfm_vfio_open(path, &o, out, err);
	}
}

int devtool_ident(struct vfm_device *dev, struct devtool_ident *id, struct vfm_pci_config *cfg,
		  struct vfm_error *err)
{
	int r;

	memset(id, 0, sizeof(*id));
	r = vfm_device_get_info(dev, &id->info, err);
	if (r)
		return r;
	/* PCI identity only for devices that say they are PCI. */
	if ((id->info.flags & (1u << 1)) && vfm_pci_config_save(dev, cfg, NULL) == 0) {
		id->pci = true;
		vfm_pci_config_ident(cfg, &id->pci_id);
	} else {
		cfg->len = 0;
	}
	return 0;
}

void devtool_ident_str(const struct devtool_ident *id, char *buf, size_t len)
{
	if (id->pci)
		snprintf(buf, len, "PCI %04x:%04x (subsystem %04x:%04x, class %06" PRIx32 ")",
			 id->pci_id.vendor, id->pci_id.device, id->pci_id.subsys_vendor,
			 id->pci_id.subsys_device, id->pci_id.class_code);
	else
		snprintf(buf, len, "non-PCI device (flags %#" PRIx32 ", %" PRIu32 " regions, %" PRIu32
			 " IRQ types)", id->info.flags, id->info.num_regions, id->info.num_irqs);
}

bool devtool_same_kind(const struct devtool_ident *a, const struct devtool_ident *b)
{
	if (a->pci != b->pci || a->info.num_regions != b->info.num_regions ||
	    a->info.num_irqs != b->info.num_irqs)
		return false;
	if (!a->pci)
		return a->info.flags == b->info.flags;
	/* The revision may differ (firmware updates); the driver judges the data. */
	return a->pci_id.vendor == b->pci_id.vendor && a->pci_id.device == b->pci_id.device &&
	       a->pci_id.subsys_vendor == b->pci_id.subsys_vendor &&
	       a->pci_id.subsys_device == b->pci_id.subsys_device &&
	       a->pci_id.class_code == b->pci_id.class_code;
}

const char *devtool_region_name(bool pci, uint32_t index, char *buf, size_t len)
{
	static const char *const names[] = { "BAR0", "BAR1", "BAR2", "BAR3", "BAR4",
					     "BAR5", "ROM", "CONFIG", "VGA" };

	if (pci && index < sizeof(names) / sizeof(names[0]))
		return names[index];
	snprintf(buf, len, "REGION%" PRIu32, index);
	return buf;
}

const char *devtool_irq_name(bool pci, uint32_t index, char *buf, size_t len)
{
	static const char *const names[] = { "INTX", "MSI", "MSIX", "ERR", "REQ" };

	if (pci && index < sizeof(names) / sizeof(names[0]))
		return names[index];
	snprintf(buf, len, "IRQ%" PRIu32, index);
	return buf;
}

int devtool_irq_info(struct vfm_device *dev, uint32_t index, struct vfm_irq_info *ii,
		     struct vfm_error *err)
{
	if (vfm_device_is_vfio_user(dev))
		return vfm_vfio_user_irq_info(dev, index, ii, err);
	if (vfm_device_is_vfio(dev))
		return vfm_vfio_irq_info(dev, index, ii, err);
	return vfm_error_set(err, -ENOTSUP, "no IRQ info for this backend");
}

int devtool_read_stream(struct vfm_device *dev,
			int (*sink)(void *opaque, const void *buf, size_t len,
				    struct vfm_error *err),
			void *opaque, uint64_t *total, struct vfm_error *err)
{
	static uint8_t buf[1u << 20];   /* QEMU's block size; the tools are single-threaded */
	const struct timespec pause = { 0, 1000000 };
	unsigned again = 0;

	*total = 0;
	for (;;) {
		ssize_t n = vfm_device_read_data(dev, buf, sizeof(buf), err);
		int r;

		if (n == 0)
			return 0;
		if (n == -EAGAIN && again++ < DEVTOOL_TIMEOUT_MS) {
			nanosleep(&pause, NULL);   /* bounded: about the timeout in all */
			continue;
		}
		if (n == -ENOMSG)
			return vfm_error_set(err, VFM_EPROTOCOL, "device said 'no data for now' in "
					     "STOP_COPY (only PRE_COPY may)");
		if (n < 0)
			return (int)n;
		again = 0;
		r = sink(opaque, buf, (size_t)n, err);
		if (r)
			return r;
		*total += (uint64_t)n;
	}
}

int devtool_back_to_running(struct vfm_device *dev, struct vfm_error *err)
{
	struct vfm_error e = { 0 };
	int r;

	if (vfm_device_state(dev) == VFM_STATE_RUNNING)
		return 0;
	r = vfm_device_set_state(dev, VFM_STATE_RUNNING, VFM_STATE_ERROR, &e);
	if (r) {
		vfm_log(VFM_LOG_ERROR, vfm_device_id(dev), "back to RUNNING: %s", e.msg);
		return vfm_error_set(err, r, "the device did not return to RUNNING (it is %s): %s",
				     vfm_state_name(vfm_device_state(dev)), e.msg);
	}
	return 0;
}

/* ---- Save file header: little-endian fields at fixed offsets ---- */

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)v);
	put16(p + 2, (uint16_t)(v >> 16));
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)v);
	put32(p + 4, (uint32_t)(v >> 32));
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get32(const uint8_t *p)
{
	return get16(p) | (uint32_t)get16(p + 2) << 16;
}

static uint64_t get64(const uint8_t *p)
{
	return get32(p) | (uint64_t)get32(p + 4) << 32;
}

#define HDR_CSUM_AT (DEVFILE_HDR_SIZE - 8)
#define F_PCI 1u

void devfile_hdr_encode(const struct devfile_hdr *h, uint8_t out[DEVFILE_HDR_SIZE])
{
	const struct devtool_ident *id = &h->ident;

	memset(out, 0, DEVFILE_HDR_SIZE);
	memcpy(out, DEVFILE_MAGIC, 8);
	put32(out + 8, DEVFILE_VERSION);
	put32(out + 12, DEVFILE_HDR_SIZE);
	put64(out + 16, h->mig_flags);
	put32(out + 24, id->info.flags);
	put32(out + 28, id->info.num_regions);
	put32(out + 32, id->info.num_irqs);
	put32(out + 36, h->config_len);
	put16(out + 40, id->pci_id.vendor);
	put16(out + 42, id->pci_id.device);
	put16(out + 44, id->pci_id.subsys_vendor);
	put16(out + 46, id->pci_id.subsys_device);
	put32(out + 48, id->pci_id.class_code | (uint32_t)id->pci_id.revision << 24);
	put32(out + 52, h->backend);
	put64(out + 56, h->data_len);
	put64(out + 64, h->data_csum);
	put64(out + 72, h->config_csum);
	put64(out + 80, h->created);
	put32(out + 88, id->pci ? F_PCI : 0);
	put64(out + HDR_CSUM_AT, XXH3_64bits(out, HDR_CSUM_AT));
}

int devfile_hdr_decode(const uint8_t in[DEVFILE_HDR_SIZE], struct devfile_hdr *h,
		       struct vfm_error *err)
{
	struct devtool_ident *id = &h->ident;
	uint32_t v;

	memset(h, 0, sizeof(*h));
	if (memcmp(in, DEVFILE_MAGIC, 8))
		return vfm_error_set(err, VFM_ESTREAM, "not a vfiomig device state file (bad magic)");
	v = get32(in + 8);
	if (v != DEVFILE_VERSION)
		return vfm_error_set(err, VFM_ESTREAM, "device state file version %" PRIu32
				     " (this vfiomig reads %u)", v, DEVFILE_VERSION);
	if (get32(in + 12) != DEVFILE_HDR_SIZE)
		return vfm_error_set(err, VFM_ESTREAM, "header size %" PRIu32 " (want %u)",
				     get32(in + 12), DEVFILE_HDR_SIZE);
	if (get64(in + HDR_CSUM_AT) != XXH3_64bits(in, HDR_CSUM_AT))
		return vfm_error_set(err, VFM_ECHECKSUM, "device state file header is corrupt "
				     "(checksum mismatch)");
	h->mig_flags = get64(in + 16);
	id->info.flags = get32(in + 24);
	id->info.num_regions = get32(in + 28);
	id->info.num_irqs = get32(in + 32);
	h->config_len = get32(in + 36);
	id->pci_id.vendor = get16(in + 40);
	id->pci_id.device = get16(in + 42);
	id->pci_id.subsys_vendor = get16(in + 44);
	id->pci_id.subsys_device = get16(in + 46);
	id->pci_id.class_code = get32(in + 48) & 0xffffff;
	id->pci_id.revision = (uint8_t)(get32(in + 48) >> 24);
	h->backend = get32(in + 52);
	h->data_len = get64(in + 56);
	h->data_csum = get64(in + 64);
	h->config_csum = get64(in + 72);
	h->created = get64(in + 80);
	id->pci = get32(in + 88) & F_PCI;
	if (h->config_len > VFM_PCI_CONFIG_MAX || (!id->pci && h->config_len))
		return vfm_error_set(err, VFM_ESTREAM, "config space of %" PRIu32 " bytes",
				     h->config_len);
	return 0;
}
