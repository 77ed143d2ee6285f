/*
 * PCI config space save and restore through a device's config region (any
 * backend): what QEMU puts back after loading device state.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "vfiomig/vfio.h"

#define CFG_VENDOR 0x00
#define CFG_DEVICE 0x02
#define CFG_COMMAND 0x04
#define CFG_STATUS 0x06
#define CFG_REVISION 0x08
#define CFG_CLASS 0x09
#define CFG_BAR0 0x10
#define CFG_SUBSYS_VENDOR 0x2c
#define CFG_SUBSYS_ID 0x2e
#define CFG_ROM 0x30
#define CFG_CAP_PTR 0x34
#define STATUS_CAP_LIST 0x10
#define CAP_ID_MSI 0x05
#define CAP_ID_MSIX 0x11
#define MSI_CTRL_ENABLE 0x0001
#define MSI_CTRL_64BIT 0x0080
#define MSI_CTRL_MASKBIT 0x0100
#define MSIX_CTRL_ENABLE 0x8000
/* A capability list longer than this is corrupt (48 = (256 - 64) / 4). */
#define CAP_MAX 48

static uint16_t get16(const struct vfm_pci_config *c, uint32_t off)
{
	return (uint16_t)(c->bytes[off] | c->bytes[off + 1] << 8);
}

static uint32_t get32(const struct vfm_pci_config *c, uint32_t off)
{
	return (uint32_t)get16(c, off) | (uint32_t)get16(c, off + 2) << 16;
}

void vfm_pci_config_ident(const struct vfm_pci_config *cfg, struct vfm_pci_ident *id)
{
	memset(id, 0, sizeof(*id));
	if (cfg->len < 0x30)
		return;
	id->vendor = get16(cfg, CFG_VENDOR);
	id->device = get16(cfg, CFG_DEVICE);
	id->revision = cfg->bytes[CFG_REVISION];
	id->class_code = get32(cfg, CFG_REVISION) >> 8;
	id->subsys_vendor = get16(cfg, CFG_SUBSYS_VENDOR);
	id->subsys_device = get16(cfg, CFG_SUBSYS_ID);
}

int vfm_pci_config_save(struct vfm_device *dev, struct vfm_pci_config *cfg,
			struct vfm_error *err)
{
	struct vfm_region_info ri;
	int r;

	memset(cfg, 0, sizeof(*cfg));
	if (vfm_device_region_info(dev, VFM_PCI_CONFIG_REGION, &ri, NULL) || ri.size < 64 ||
	    !(ri.flags & VFM_REGION_READ))
		return vfm_error_set(err, -ENOENT, "%s: no PCI config region",
				     vfm_device_id(dev));
	cfg->len = ri.size < VFM_PCI_CONFIG_MAX ? (uint32_t)ri.size : VFM_PCI_CONFIG_MAX;
	r = vfm_device_region_read(dev, VFM_PCI_CONFIG_REGION, 0, cfg->bytes, cfg->len, err);
	if (r) {
		cfg->len = 0;
		return vfm_error_set(err, r, "%s: reading config space", vfm_device_id(dev));
	}
	return 0;
}

static int put(struct vfm_device *dev, const struct vfm_pci_config *c, uint32_t off,
	       uint32_t len, struct vfm_error *err)
{
	int r = vfm_device_region_write(dev, VFM_PCI_CONFIG_REGION, off, c->bytes + off, len, err);

	if (r)
		return vfm_error_set(err, r, "%s: restoring config 0x%" PRIx32 "+%" PRIu32,
				     vfm_device_id(dev), off, len);
	return 0;
}

/* MSI: address, data and mask bits first, the control word (enable) last. */
static int restore_msi(struct vfm_device *dev, const struct vfm_pci_config *c, uint32_t cap,
		       struct vfm_error *err)
{
	uint16_t ctrl = get16(c, cap + 2);
	bool is64 = ctrl & MSI_CTRL_64BIT;
	uint32_t data = cap + (is64 ? 0x0c : 0x08);
	int r;

	if (cap + 0x18 > c->len)
		return 0;
	r = put(dev, c, cap + 4, is64 ? 8 : 4, err);
	if (!r)
		r = put(dev, c, data, 2, err);
	if (!r && (ctrl & MSI_CTRL_MASKBIT))
		r = put(dev, c, data + 4, 4, err);
	if (!r)
		r = put(dev, c, cap + 2, 2, err);
	return r;
}

int vfm_pci_config_restore(struct vfm_device *dev, const struct vfm_pci_config *c,
			   int *msi_out, struct vfm_error *err)
{
	uint32_t cap;
	int msi = 0, r;

	if (c->len < 64 || c->len > VFM_PCI_CONFIG_MAX)
		return vfm_error_set(err, -EINVAL, "%s: saved config space of %" PRIu32 " bytes",
				     vfm_device_id(dev), c->len);
	/*
	 * Decoding and bus mastering off first, so no BAR is live at a half-
	 * written address (QEMU hw/vfio/pci.c vfio_pci_load_config() likewise
	 * restores the command register after the BARs); the saved command
	 * register goes back last.
	 */
	{
		uint16_t cmd = get16(c, CFG_COMMAND) & (uint16_t)~0x7u;   /* IO, MEM, MASTER */
		uint8_t off[2] = { (uint8_t)cmd, (uint8_t)(cmd >> 8) };

		r = vfm_device_region_write(dev, VFM_PCI_CONFIG_REGION, CFG_COMMAND, off, 2, err);
		if (r)
			return vfm_error_set(err, r, "%s: turning decoding off: %s",
					     vfm_device_id(dev), vfm_strerror(r));
	}
	r = put(dev, c, CFG_BAR0, 24, err);
	if (!r)
		r = put(dev, c, CFG_ROM, 4, err);
	if (r)
		return r;
	cap = get16(c, CFG_STATUS) & STATUS_CAP_LIST ? c->bytes[CFG_CAP_PTR] & 0xfc : 0;
	for (int n = 0; cap >= 0x40 && cap + 4 <= c->len && cap < 256 && n < CAP_MAX; n++) {
		uint8_t id = c->bytes[cap];

		if (id == CAP_ID_MSI) {
			r = restore_msi(dev, c, cap, err);
			if (get16(c, cap + 2) & MSI_CTRL_ENABLE)
				msi = 1;
		} else if (id == CAP_ID_MSIX) {
			/* Only the control word: the MSI-X table and PBA are the VMM's
			 * emulated state (vfio-pci drops table writes), which the
			 * VMM restores and re-arms with VFIO_DEVICE_SET_IRQS. */
			r = put(dev, c, cap + 2, 2, err);
			if (!msi && (get16(c, cap + 2) & MSIX_CTRL_ENABLE))
				msi = 2;
		}
		if (r)
			return r;
		cap = c->bytes[cap + 1] & 0xfc;
	}
	r = put(dev, c, CFG_COMMAND, 2, err);
	if (r)
		return r;
	if (msi_out)
		*msi_out = msi;
	return 0;
}
