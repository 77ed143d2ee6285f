/*
 * Shared by the device tools (info, check, save, load): opening a DEVICE
 * spec on either backend, the device's identity, and the save file format
 * (docs/device-tools.md).
 */
#ifndef VFM_TOOLS_DEVTOOL_H
#define VFM_TOOLS_DEVTOOL_H

#include <stdio.h>

#include "vfiomig/device.h"
#include "vfiomig/migration.h"
#include "vfiomig/vfio.h"

/* Per vfio-user request and per kernel data-fd poll. */
#define DEVTOOL_TIMEOUT_MS 5000u

/* Whether spec parses; prints "vfiomig CMD: reason" when it does not. */
bool devtool_spec_ok(const char *cmd, const char *spec);

/*
 * "vfiomig CMD DEVICE FILE" (save, load): -1 with *device and *file set when
 * the arguments are good, else the exit status (usage printed on --help to
 * stdout, on a usage error to stderr with the reason).
 */
int devtool_device_file_args(const char *cmd, int argc, char **argv, void (*usage)(FILE *),
			     const char **device, const char **file);

/* Opens "vfio-user:PATH" or "vfio:NAME" (with ,key=value properties). */
int devtool_open(const char *spec, struct vfm_device **out, struct vfm_device_props *props,
		 struct vfm_error *err);

/* What makes two devices "the same kind" for a saved state. */
struct devtool_ident {
	struct vfm_device_info info;
	bool pci;                    /* a readable config region */
	struct vfm_pci_ident pci_id;
};
int devtool_ident(struct vfm_device *dev, struct devtool_ident *id, struct vfm_pci_config *cfg,
		  struct vfm_error *err);
/* "1af4:1041 (subsystem 1af4:0001, class 020000)" or "non-PCI, 3 regions" */
void devtool_ident_str(const struct devtool_ident *id, char *buf, size_t len);
bool devtool_same_kind(const struct devtool_ident *a, const struct devtool_ident *b);

/* "BAR0".."BAR5", "ROM", "CONFIG", "VGA" for PCI devices, else "REGIONn". */
const char *devtool_region_name(bool pci, uint32_t index, char *buf, size_t len);
/* "INTX", "MSI", "MSIX", "ERR", "REQ" for PCI devices, else "IRQn". */
const char *devtool_irq_name(bool pci, uint32_t index, char *buf, size_t len);
/* IRQ info on either backend. */
int devtool_irq_info(struct vfm_device *dev, uint32_t index, struct vfm_irq_info *ii,
		     struct vfm_error *err);

/*
 * Reads the STOP_COPY data until the end of the stream, handing each block
 * to sink (return non-zero to stop). The device must be in STOP_COPY.
 * Returns 0 and *total, or a negative error.
 */
int devtool_read_stream(struct vfm_device *dev, int (*sink)(void *opaque, const void *buf,
							    size_t len, struct vfm_error *err),
			void *opaque, uint64_t *total, struct vfm_error *err);

/* Back to RUNNING whatever happened (reset if need be); logs and fails when it cannot. */
int devtool_back_to_running(struct vfm_device *dev, struct vfm_error *err);

/* ---- Save files ---- */

#define DEVFILE_MAGIC "VFMDEVS\0"
#define DEVFILE_VERSION 1u
#define DEVFILE_HDR_SIZE 128u

struct devfile_hdr {
	uint64_t mig_flags;
	struct devtool_ident ident;
	uint32_t config_len;
	uint32_t backend;            /* 1 vfio-user, 2 vfio (informational) */
	uint64_t data_len;
	uint64_t data_csum;          /* XXH3-64 of the data */
	uint64_t config_csum;        /* XXH3-64 of the config bytes */
	uint64_t created;            /* unix seconds (informational) */
};

void devfile_hdr_encode(const struct devfile_hdr *h, uint8_t out[DEVFILE_HDR_SIZE]);
/* Checks magic, version, size and header checksum. */
int devfile_hdr_decode(const uint8_t in[DEVFILE_HDR_SIZE], struct devfile_hdr *h,
		       struct vfm_error *err);

#endif
