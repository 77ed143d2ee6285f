/* Opening kernel VFIO devices against the fake kernel: cdev + iommufd (with
 * and without a dirty-tracking HWPT), the type1 fallback, sysfs resolution,
 * regions, IRQs, PCI config save/restore, no leaks on failure; and a real
 * /dev/vfio device when one is named. */
#include <stdlib.h>
#include <sys/stat.h>

#include "compat/vfio_compat.h"
#include "compat/iommufd_compat.h"
#include "fake_kvfio.h"
#include "harness.h"

static struct fake_kvfio *fake(struct fake_kvfio_cfg *cfg)
{
	struct fake_kvfio *fk = fake_kvfio_new(cfg);

	CHECK(fk);
	return fk;
}

static void no_leaks(struct fake_kvfio *fk)
{
	struct fake_kvfio_stats st;

	fake_kvfio_stats(fk, &st);
	CHECK_EQ(st.open_objects, 0);
	fake_kvfio_free(fk);
}

static char *make_sysfs(const struct fake_kvfio_cfg *cfg)
{
	static char root[] = "/tmp/vfm-kvfio-sysfs-XXXXXX";

	CHECK(mkdtemp(root));
	CHECK_EQ(fake_kvfio_make_sysfs(cfg, root), 0);
	return root;
}

static void rm_tree(const char *root)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
	CHECK_EQ(system(cmd), 0);
}

TEST(cdev_iommufd_with_dirty_hwpt)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats st;
	struct vfm_error err = { 0 };
	struct vfm_device *dev;
	struct fake_kvfio *fk;

	fake_kvfio_cfg_default(&cfg);
	fk = fake(&cfg);
	if (fake_kvfio_open(fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_AUTO, NULL, &dev, &err))
		FAIL("open: %s", err.msg);
	CHECK(vfm_device_is_vfio(dev));
	CHECK_STR(vfm_device_backend(dev), "vfio");
	CHECK_STR(vfm_vfio_iommu_name(dev), "iommufd+dirty-hwpt");
	CHECK(vfm_vfio_iommu_dirty_supported(dev));
	CHECK(vfm_device_has_dma_logging(dev));
	fake_kvfio_stats(fk, &st);
	CHECK(st.bound && st.attached_hwpt && !st.legacy);
	CHECK_EQ(st.open_objects, 2);
	vfm_device_free(dev);
	no_leaks(fk);
}

TEST(iommufd_without_dirty_tracking_attaches_the_ioas)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats st;
	struct vfm_device *dev;
	struct fake_kvfio *fk;

	fake_kvfio_cfg_default(&cfg);
	cfg.hw_dirty = false;
	cfg.dma_logging = false;
	fk = fake(&cfg);
	CHECK_EQ(fake_kvfio_open(fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_IOMMUFD, NULL, &dev,
				 NULL), 0);
	CHECK_STR(vfm_vfio_iommu_name(dev), "iommufd");
	CHECK(!vfm_vfio_iommu_dirty_supported(dev));
	CHECK(!vfm_device_has_dma_logging(dev));
	CHECK_EQ(vfm_vfio_iommu_dirty_start(dev, NULL), -ENOTSUP);
	fake_kvfio_stats(fk, &st);
	CHECK(st.bound && !st.attached_hwpt);
	vfm_device_free(dev);
	no_leaks(fk);

	/* no_dirty_hwpt: the IOAS even though the IOMMU could track. */
	fake_kvfio_cfg_default(&cfg);
	fk = fake(&cfg);
	{
		struct vfm_vfio_opts o = { .version = VFM_VFIO_OPTS_V1, .no_dirty_hwpt = true,
					   .sysfs_root = "/nonexistent", .sys = fake_kvfio_sys(fk) };

		CHECK_EQ(vfm_vfio_open("/dev/vfio/devices/vfio0", &o, &dev, NULL), 0);
	}
	CHECK_STR(vfm_vfio_iommu_name(dev), "iommufd");
	vfm_device_free(dev);
	no_leaks(fk);
}

TEST(pci_address_resolves_through_sysfs)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_device *dev;
	struct fake_kvfio *fk;
	struct vfm_error err = { 0 };
	char *root;

	fake_kvfio_cfg_default(&cfg);
	cfg.cdev = 3;
	root = make_sysfs(&cfg);
	fk = fake(&cfg);
	if (fake_kvfio_open(fk, "0000:01:00.0", VFM_VFIO_IOMMU_AUTO, root, &dev, &err))
		FAIL("open: %s", err.msg);
	CHECK_STR(vfm_vfio_iommu_name(dev), "iommufd+dirty-hwpt");
	vfm_device_free(dev);
	/* Domain 0 may be left out; upper case is fine. */
	CHECK_EQ(fake_kvfio_open(fk, "01:00.0", VFM_VFIO_IOMMU_AUTO, root, &dev, &err), 0);
	vfm_device_free(dev);
	CHECK_EQ(fake_kvfio_open(fk, "0000:02:00.0", VFM_VFIO_IOMMU_AUTO, root, &dev, &err),
		 -ENOENT);
	CHECK(strstr(err.msg, "no PCI device"));
	CHECK_EQ(fake_kvfio_open(fk, "not-a-device", VFM_VFIO_IOMMU_AUTO, root, &dev, NULL),
		 -EINVAL);
	CHECK_EQ(fake_kvfio_open(fk, "0000:01:00.9", VFM_VFIO_IOMMU_AUTO, root, &dev, NULL),
		 -EINVAL);
	no_leaks(fk);
	rm_tree(root);
}

TEST(falls_back_to_group_and_type1)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats st;
	struct vfm_error err = { 0 };
	struct vfm_device *dev;
	struct fake_kvfio *fk;
	char *root;

	/* No /dev/iommu (iommufd not built): the cdev path falls back too. */
	fake_kvfio_cfg_default(&cfg);
	cfg.no_iommufd = true;
	root = make_sysfs(&cfg);
	fk = fake(&cfg);
	if (fake_kvfio_open(fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_AUTO, root, &dev, &err))
		FAIL("open: %s", err.msg);
	CHECK_STR(vfm_vfio_iommu_name(dev), "type1v2");
	CHECK(vfm_vfio_iommu_dirty_supported(dev));   /* the migration cap */
	fake_kvfio_stats(fk, &st);
	CHECK(st.legacy && st.open_objects == 3);     /* container, group, device */
	CHECK_EQ(vfm_device_probe_migration(dev, NULL), 0);
	vfm_device_free(dev);
	no_leaks(fk);
	/* iommufd mode only: no fallback. */
	fk = fake(&cfg);
	CHECK_EQ(fake_kvfio_open(fk, "0000:01:00.0", VFM_VFIO_IOMMU_IOMMUFD, root, &dev, &err),
		 -ENOENT);
	no_leaks(fk);
	/* BIND failing (device busy in another iommufd) falls back as well. */
	cfg.no_iommufd = false;
	fk = fake(&cfg);
	fake_kvfio_inject(fk, VFIO_DEVICE_BIND_IOMMUFD, 0, 0, -EBUSY);
	CHECK_EQ(fake_kvfio_open(fk, "0000:01:00.0", VFM_VFIO_IOMMU_AUTO, root, &dev, NULL), 0);
	CHECK_STR(vfm_vfio_iommu_name(dev), "type1v2");
	vfm_device_free(dev);
	/* Legacy forced. */
	CHECK_EQ(fake_kvfio_open(fk, "0000:01:00.0", VFM_VFIO_IOMMU_LEGACY, root, &dev, NULL), 0);
	CHECK_STR(vfm_vfio_iommu_name(dev), "type1v2");
	vfm_device_free(dev);
	no_leaks(fk);
	/* Neither works: both reasons in the message, nothing left open. */
	cfg.no_iommufd = true;
	fk = fake(&cfg);
	fake_kvfio_inject(fk, VFIO_GROUP_SET_CONTAINER, 0, 0, -EPERM);
	CHECK_EQ(fake_kvfio_open(fk, "0000:01:00.0", VFM_VFIO_IOMMU_AUTO, root, &dev, &err), -EPERM);
	CHECK(strstr(err.msg, "/dev/iommu") && strstr(err.msg, "type1v2"));
	no_leaks(fk);
	rm_tree(root);
}

TEST(failures_after_attach_leave_nothing_open)
{
	static const unsigned long reqs[] = {
		VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC, VFIO_DEVICE_ATTACH_IOMMUFD_PT,
		VFIO_DEVICE_GET_INFO,
	};

	for (size_t i = 0; i < sizeof(reqs) / sizeof(reqs[0]); i++) {
		struct fake_kvfio_cfg cfg;
		struct vfm_device *dev = NULL;
		struct fake_kvfio *fk;
		int r;

		fake_kvfio_cfg_default(&cfg);
		cfg.hw_dirty = false;
		fk = fake(&cfg);
		fake_kvfio_inject(fk, reqs[i], 0, 0, -EIO);
		r = fake_kvfio_open(fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_IOMMUFD, NULL,
				    &dev, NULL);
		CHECK_EQ(r, -EIO);
		CHECK(!dev);
		no_leaks(fk);
	}
}

TEST(regions_irqs_and_config_io)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_device_info di;
	struct vfm_region_info ri;
	struct vfm_irq_info ii;
	struct vfm_device *dev;
	struct fake_kvfio *fk;
	uint8_t buf[8];
	uint16_t cmd = 0x0006;

	fake_kvfio_cfg_default(&cfg);
	cfg.vendor = 0x15b3;
	fk = fake(&cfg);
	CHECK_EQ(fake_kvfio_open(fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_AUTO, NULL, &dev,
				 NULL), 0);
	CHECK_EQ(vfm_device_get_info(dev, &di, NULL), 0);
	CHECK_EQ(di.num_regions, 9);
	CHECK_EQ(di.num_irqs, 5);
	CHECK(di.flags & VFIO_DEVICE_FLAGS_PCI);
	CHECK_EQ(vfm_device_region_info(dev, 0, &ri, NULL), 0);
	CHECK_EQ(ri.size, 4096);
	CHECK_EQ(ri.flags, VFM_REGION_READ | VFM_REGION_WRITE | VFM_REGION_MMAP);
	CHECK_EQ(vfm_device_region_info(dev, VFM_PCI_CONFIG_REGION, &ri, NULL), 0);
	CHECK_EQ(ri.size, 256);
	CHECK(vfm_device_region_info(dev, 1, &ri, NULL) < 0);   /* size 0: absent */
	CHECK(vfm_device_region_info(dev, 8, &ri, NULL) < 0);   /* VGA: EINVAL */
	/* Region offsets come from the kernel (index << 40 here). */
	CHECK_EQ(vfm_device_region_read(dev, VFM_PCI_CONFIG_REGION, 0, buf, 2, NULL), 0);
	CHECK_EQ(buf[0] | buf[1] << 8, 0x15b3);
	CHECK_EQ(vfm_device_region_write(dev, VFM_PCI_CONFIG_REGION, 4, &cmd, 2, NULL), 0);
	CHECK_EQ(fake_kvfio_config(fk)[4], 0x06);
	CHECK_EQ(vfm_device_region_write(dev, 0, 8, "abcdefgh", 8, NULL), 0);
	CHECK_EQ(vfm_device_region_read(dev, 0, 8, buf, 8, NULL), 0);
	CHECK(!memcmp(buf, "abcdefgh", 8));
	CHECK(vfm_device_region_read(dev, 0, 4092, buf, 8, NULL) < 0);   /* beyond the end */
	CHECK_EQ(vfm_vfio_irq_info(dev, 1, &ii, NULL), 0);
	CHECK_EQ(ii.count, 1);
	CHECK(ii.flags & VFM_IRQ_INFO_EVENTFD);
	CHECK_EQ(vfm_vfio_irq_info(dev, 2, &ii, NULL), 0);
	CHECK_EQ(ii.count, 0);
	CHECK(vfm_vfio_irq_info(dev, 5, &ii, NULL) < 0);
	vfm_device_free(dev);
	no_leaks(fk);
}

/* BAR0 mapped through region_areas (whole, or the sparse capability's areas):
 * the same bytes as pread/pwrite see; config space has no area. */
static void bar_areas(bool sparse)
{
	struct fake_kvfio_cfg cfg;
	struct fake_kvfio_stats st;
	struct vfm_region_area a[4];
	struct vfm_device *dev;
	struct fake_kvfio *fk;
	unsigned n = 99;
	uint8_t buf[8];
	void *first;

	fake_kvfio_cfg_default(&cfg);
	cfg.sparse_bar0 = sparse;
	fk = fake(&cfg);
	CHECK_EQ(fake_kvfio_open(fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_AUTO, NULL, &dev,
				 NULL), 0);
	CHECK_EQ(vfm_device_region_areas(dev, 0, a, 4, &n, NULL), 0);
	CHECK_EQ(n, 1);
	CHECK_EQ(a[0].offset, 0);
	CHECK_EQ(a[0].size, 4096);
	CHECK(a[0].ptr);
	first = a[0].ptr;
	CHECK_EQ(vfm_device_region_write(dev, 0, 16, "mmapped!", 8, NULL), 0);
	CHECK(!memcmp((char *)a[0].ptr + 16, "mmapped!", 8));
	memcpy((char *)a[0].ptr + 32, "through", 8);
	CHECK_EQ(vfm_device_region_read(dev, 0, 32, buf, 8, NULL), 0);
	CHECK(!memcmp(buf, "through", 8));
	/* Mapped once: a second ask gives the same area. */
	CHECK_EQ(vfm_device_region_areas(dev, 0, a, 4, &n, NULL), 0);
	CHECK_EQ(n, 1);
	CHECK(a[0].ptr == first);
	fake_kvfio_stats(fk, &st);
	CHECK_EQ(st.bar_mmaps, 1);
	CHECK_EQ(vfm_device_region_areas(dev, VFM_PCI_CONFIG_REGION, a, 4, &n, NULL), 0);
	CHECK_EQ(n, 0);
	CHECK(vfm_device_region_areas(dev, 1, a, 4, &n, NULL) < 0);   /* absent */
	vfm_device_free(dev);
	no_leaks(fk);
}

TEST(bar_mmapped_through_region_areas)
{
	bar_areas(false);
	bar_areas(true);
}

TEST(pci_config_save_and_restore)
{
	struct fake_kvfio_cfg cfg;
	struct vfm_pci_config saved, now;
	struct vfm_pci_ident id;
	struct vfm_device *dev;
	struct fake_kvfio *fk;
	uint32_t bar = 0xfe000000, addr[2] = { 0xfee00000, 0 }, zero[2] = { 0, 0 };
	uint16_t cmd = 0x0406, data = 0x4021, ctrl;
	int msi = -1;

	fake_kvfio_cfg_default(&cfg);
	fk = fake(&cfg);
	CHECK_EQ(fake_kvfio_open(fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_AUTO, NULL, &dev,
				 NULL), 0);
	/* A guest programmed BAR0, MSI (64-bit address at 0x44, data at 0x4c) and
	 * enabled memory + bus mastering. */
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x10, &bar, 4, NULL), 0);
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x44, addr, 8, NULL), 0);
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x4c, &data, 2, NULL), 0);
	CHECK_EQ(vfm_device_region_read(dev, 7, 0x42, &ctrl, 2, NULL), 0);
	ctrl |= 1;
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x42, &ctrl, 2, NULL), 0);
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x04, &cmd, 2, NULL), 0);
	CHECK_EQ(vfm_pci_config_save(dev, &saved, NULL), 0);
	CHECK_EQ(saved.len, 256);
	vfm_pci_config_ident(&saved, &id);
	CHECK_EQ(id.vendor, cfg.vendor);
	CHECK_EQ(id.device, cfg.device);
	CHECK_EQ(id.class_code, 0x020000);
	/* A reset device: all of it back to zero. */
	ctrl &= (uint16_t)~1;
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x04, zero, 2, NULL), 0);
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x10, zero, 4, NULL), 0);
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x44, zero, 8, NULL), 0);
	CHECK_EQ(vfm_device_region_write(dev, 7, 0x42, &ctrl, 2, NULL), 0);
	CHECK_EQ(vfm_pci_config_save(dev, &now, NULL), 0);
	CHECK(memcmp(now.bytes, saved.bytes, 256) != 0);
	CHECK_EQ(vfm_pci_config_restore(dev, &saved, &msi, NULL), 0);
	CHECK_EQ(msi, 1);
	CHECK_EQ(vfm_pci_config_save(dev, &now, NULL), 0);
	CHECK(memcmp(now.bytes, saved.bytes, 256) == 0);
	saved.len = 10;
	CHECK_EQ(vfm_pci_config_restore(dev, &saved, NULL, NULL), -EINVAL);
	vfm_device_free(dev);
	no_leaks(fk);
}

TEST(bad_options)
{
	struct vfm_vfio_opts o = { .version = 99 };
	struct vfm_vfio_sys half = { .version = VFM_VFIO_SYS_V1 };
	struct vfm_device *dev;

	CHECK_EQ(vfm_vfio_open("/dev/vfio/devices/vfio0", &o, &dev, NULL), -EINVAL);
	o = (struct vfm_vfio_opts){ .version = VFM_VFIO_OPTS_V1, .sys = &half };
	CHECK_EQ(vfm_vfio_open("/dev/vfio/devices/vfio0", &o, &dev, NULL), -EINVAL);
	CHECK_EQ(vfm_vfio_open("", NULL, &dev, NULL), -EINVAL);
	CHECK(!vfm_device_is_vfio(NULL));
	CHECK(!vfm_vfio_iommu_name(NULL));
}

/* Real hardware: VFIOMIG_TEST_VFIO_DEVICE=/dev/vfio/devices/vfioN or a PCI
 * address of a device bound to vfio-pci (or a variant driver). */
TEST(real_device_opens_and_probes)
{
	const char *name = getenv("VFIOMIG_TEST_VFIO_DEVICE");
	struct vfm_error err = { 0 };
	struct vfm_device_info di;
	struct vfm_device *dev;
	struct stat st;
	int r;

	if (!name || !*name)
		SKIP("needs a real VFIO device: set VFIOMIG_TEST_VFIO_DEVICE=/dev/vfio/devices/vfioN "
		     "or 0000:BB:DD.F (bound to vfio-pci)%s",
		     stat("/dev/vfio", &st) ? "; this machine has no /dev/vfio" : "");
	if (vfm_vfio_open(name, NULL, &dev, &err))
		FAIL("open %s: %s", name, err.msg);
	CHECK_EQ(vfm_device_get_info(dev, &di, NULL), 0);
	r = vfm_device_probe_migration(dev, &err);
	CHECK(r == 0 || r == VFM_ENOMIGRATION);
	if (r == 0)
		CHECK_EQ(vfm_device_state(dev), VFM_STATE_RUNNING);
	vfm_device_free(dev);
}
