/* vfiomig info DEVICE: identity, regions, IRQs, migration and dirty tracking
 * support of a vfio-user or kernel VFIO device, as text or JSON. The device
 * is left as it was (the DMA logging trial maps and unmaps a window). */
#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "commands.h"
#include "devtool.h"

static void info_usage(FILE *out)
{
	fprintf(out,
		"usage: vfiomig info DEVICE [--json] [-v]\n\n"
		"Shows what a device offers: identity, regions, interrupts, migration flags\n"
		"and supported states, the current state, the stop-copy size estimate, DMA\n"
		"logging and (kernel devices) IOMMU dirty tracking. Changes nothing.\n\n"
		"DEVICE: vfio-user:SOCKET, vfio:/dev/vfio/devices/vfioN, vfio:0000:BB:DD.F, or an mdev:\n"
		"        vfio:UUID or vfio:/sys/bus/mdev/devices/UUID\n");
}

static json_object *jflags(uint64_t flags)
{
	static const char *const names[] = { "STOP_COPY", "P2P", "PRE_COPY" };
	json_object *a = json_object_new_array();

	for (unsigned i = 0; i < 3; i++)
		if (flags & (1ull << i))
			json_object_array_add(a, json_object_new_string(names[i]));
	return a;
}

static json_object *jhex(unsigned v, int width)
{
	char buf[16];

	snprintf(buf, sizeof(buf), "0x%0*x", width, v);
	return json_object_new_string(buf);
}

/* An mmap()able region of a backend that maps regions: whether it mapped
 * (mapping reads and writes nothing on the device). */
static void print_mapped(struct vfm_device *dev, uint32_t index, const struct vfm_region_info *ri)
{
	struct vfm_error err = { 0 };
	unsigned n = 0;
	int r;

	if (!(ri->flags & VFM_REGION_MMAP) || !vfm_device_ops(dev)->region_areas) {
		printf("\n");
		return;
	}
	r = vfm_device_region_areas(dev, index, NULL, 0, &n, &err);
	if (r)
		printf("  (mmap failed: %s)\n", err.msg);
	else
		printf("  (mapped: %u area%s)\n", n, n == 1 ? "" : "s");
}

static void add_regions(struct vfm_device *dev, const struct devtool_ident *id, json_object *arr,
			bool text)
{
	char nb[32];

	if (text)
		printf("regions:\n");
	for (uint32_t i = 0; i < id->info.num_regions; i++) {
		struct vfm_region_info ri;
		const char *name = devtool_region_name(id->pci, i, nb, sizeof(nb));
		json_object *o;

		if (vfm_device_region_info(dev, i, &ri, NULL) || !ri.size)
			continue;
		if (text) {
			printf("  %-8s %10" PRIu64 " bytes  %s%s%s", name, ri.size,
			       ri.flags & VFM_REGION_READ ? "r" : "-",
			       ri.flags & VFM_REGION_WRITE ? "w" : "-",
			       ri.flags & VFM_REGION_MMAP ? "m" : "-");
			print_mapped(dev, i, &ri);
			continue;
		}
		o = json_object_new_object();
		json_object_object_add(o, "index", json_object_new_int((int)i));
		json_object_object_add(o, "name", json_object_new_string(name));
		json_object_object_add(o, "size", json_object_new_uint64(ri.size));
		json_object_object_add(o, "read", json_object_new_boolean(ri.flags & VFM_REGION_READ));
		json_object_object_add(o, "write", json_object_new_boolean(ri.flags & VFM_REGION_WRITE));
		json_object_object_add(o, "mmap", json_object_new_boolean(ri.flags & VFM_REGION_MMAP));
		json_object_array_add(arr, o);
	}
}

static void add_irqs(struct vfm_device *dev, const struct devtool_ident *id, json_object *arr,
		     bool text)
{
	static const char *const fnames[] = { "eventfd", "maskable", "automasked", "noresize" };
	char nb[32];

	if (text)
		printf("interrupts:\n");
	for (uint32_t i = 0; i < id->info.num_irqs; i++) {
		struct vfm_irq_info ii;
		const char *name = devtool_irq_name(id->pci, i, nb, sizeof(nb));
		json_object *o = NULL, *fl = NULL;

		if (devtool_irq_info(dev, i, &ii, NULL) || !ii.count)
			continue;
		if (text) {
			printf("  %-8s count %-4" PRIu32, name, ii.count);
		} else {
			o = json_object_new_object();
			fl = json_object_new_array();
			json_object_object_add(o, "index", json_object_new_int((int)i));
			json_object_object_add(o, "name", json_object_new_string(name));
			json_object_object_add(o, "count", json_object_new_int((int)ii.count));
		}
		for (unsigned b = 0; b < 4; b++) {
			if (!(ii.flags & (1u << b)))
				continue;
			if (text)
				printf(" %s", fnames[b]);
			else
				json_object_array_add(fl, json_object_new_string(fnames[b]));
		}
		if (text) {
			printf("\n");
		} else {
			json_object_object_add(o, "flags", fl);
			json_object_array_add(arr, o);
		}
	}
}

static void add_migration(struct vfm_device *dev, json_object *root, bool text)
{
	struct vfm_error err = { 0 };
	json_object *m = json_object_new_object(), *states = json_object_new_array();
	uint64_t flags, size;
	char fb[64];
	int r = vfm_device_probe_migration(dev, &err);

	json_object_object_add(root, "migration", m);
	json_object_object_add(m, "supported", json_object_new_boolean(r == 0));
	if (r) {
		json_object_object_add(m, "error", json_object_new_string(err.msg));
		json_object_put(states);
		if (text)
			printf("migration: not supported (%s)\n", err.msg);
		return;
	}
	flags = vfm_device_mig_flags(dev);
	json_object_object_add(m, "flags", jflags(flags));
	if (text)
		printf("migration: %s\n  states:", vfm_mig_flags_str(flags, fb, sizeof(fb)));
	for (int s = 1; s < VFM_STATE_COUNT; s++) {
		if (!vfm_state_supported(flags, (enum vfm_state)s))
			continue;
		json_object_array_add(states, json_object_new_string(vfm_state_name(s)));
		if (text)
			printf(" %s", vfm_state_name(s));
	}
	json_object_object_add(m, "states", states);
	json_object_object_add(m, "state",
			       json_object_new_string(vfm_state_name(vfm_device_state(dev))));
	r = vfm_device_stop_copy_size(dev, &size, NULL);
	json_object_object_add(m, "stop_copy_size", r ? NULL : json_object_new_uint64(size));
	if (text) {
		printf("\n  state: %s\n", vfm_state_name(vfm_device_state(dev)));
		if (r)
			printf("  stop-copy size: unknown (%s)\n", vfm_strerror(r));
		else
			printf("  stop-copy size: %" PRIu64 " bytes\n", size);
	}
}

#define LOG_WINDOW (1u << 20)

/*
 * A 1 MiB memfd window DMA-mapped at IOVA 0 for the logging trial, as check
 * does (a device may refuse to log what is not mapped: libvfio-user). NULL
 * when it cannot be had: the trial then runs without it.
 */
static void *map_window(struct vfm_device *dev)
{
	struct vfm_dma_map map = { .iova = 0, .size = LOG_WINDOW,
				   .prot = VFM_DMA_READ | VFM_DMA_WRITE };
	int fd = memfd_create("vfiomig-info", MFD_CLOEXEC);
	void *mem = MAP_FAILED;

	if (fd >= 0 && !ftruncate(fd, LOG_WINDOW))
		mem = mmap(NULL, LOG_WINDOW, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	map.fd = fd;
	map.vaddr = mem;
	if (mem != MAP_FAILED && vfm_device_dma_map(dev, &map, NULL)) {
		munmap(mem, LOG_WINDOW);
		mem = MAP_FAILED;
	}
	if (fd >= 0)
		close(fd);
	return mem == MAP_FAILED ? NULL : mem;
}

/*
 * What works, not what a probe accepted: DMA logging is started over the
 * first MiB, reported and stopped (Debian's 6.12 accepts START, then fails
 * every REPORT with EOPNOTSUPP: no CONFIG_IOMMUFD_DRIVER). Logging is off
 * and the window unmapped again afterwards; nothing else of the device changes.
 */
static bool logging_works(struct vfm_device *dev, char *why, size_t len)
{
	struct vfm_iova_range range = { 0, LOG_WINDOW };
	uint64_t bits[LOG_WINDOW / 4096 / 64] = { 0 }, pg = 4096;
	struct vfm_error e = { 0 };
	bool works = false;
	void *mem;

	if (!vfm_device_has_dma_logging(dev)) {
		snprintf(why, len, "the device has none");
		return false;
	}
	mem = map_window(dev);
	if (vfm_device_log_start(dev, &range, 1, &pg, &e)) {
		snprintf(why, len, "start: %s", e.msg);
	} else if (vfm_device_log_report(dev, 0, LOG_WINDOW, pg, bits, &e)) {
		snprintf(why, len, "report: %s", e.msg);
		vfm_device_log_stop(dev, NULL);
	} else if (vfm_device_log_stop(dev, &e)) {
		snprintf(why, len, "stop: %s", e.msg);
	} else {
		works = true;
	}
	if (mem) {
		vfm_device_dma_unmap(dev, 0, LOG_WINDOW, 0, NULL, NULL);
		munmap(mem, LOG_WINDOW);
	}
	return works;
}

/* The IOMMU's dirty tracking of this process's own (empty) address space: on and off. */
static bool iommu_dirty_works(struct vfm_device *dev, char *why, size_t len)
{
	struct vfm_error e = { 0 };

	if (!vfm_vfio_iommu_dirty_supported(dev)) {
		snprintf(why, len, "the IOMMU offers none");
		return false;
	}
	if (vfm_vfio_iommu_dirty_start(dev, &e) || vfm_vfio_iommu_dirty_stop(dev, &e)) {
		snprintf(why, len, "%s", e.msg);
		return false;
	}
	return true;
}

static int info_run(const char *spec, bool json)
{
	struct vfm_device_props props;
	struct vfm_error err = { 0 };
	struct vfm_pci_config cfg;
	struct devtool_ident id;
	struct vfm_device *dev;
	json_object *root, *regions, *irqs;
	char idstr[128];
	int r;

	r = devtool_open(spec, &dev, &props, &err);
	if (r) {
		fprintf(stderr, "vfiomig info: %s\n", err.msg);
		return VFM_EXIT_FAIL;
	}
	r = devtool_ident(dev, &id, &cfg, &err);
	if (r) {
		fprintf(stderr, "vfiomig info: %s\n", err.msg);
		vfm_device_free(dev);
		return VFM_EXIT_FAIL;
	}
	devtool_ident_str(&id, idstr, sizeof(idstr));
	root = json_object_new_object();
	regions = json_object_new_array();
	irqs = json_object_new_array();
	json_object_object_add(root, "device", json_object_new_string(spec));
	json_object_object_add(root, "backend", json_object_new_string(vfm_device_backend(dev)));
	json_object_object_add(root, "identity", json_object_new_string(idstr));
	json_object_object_add(root, "pci", json_object_new_boolean(id.pci));
	if (id.pci) {
		json_object_object_add(root, "vendor", jhex(id.pci_id.vendor, 4));
		json_object_object_add(root, "device_id", jhex(id.pci_id.device, 4));
		json_object_object_add(root, "subsystem_vendor", jhex(id.pci_id.subsys_vendor, 4));
		json_object_object_add(root, "subsystem_device", jhex(id.pci_id.subsys_device, 4));
		json_object_object_add(root, "class", jhex(id.pci_id.class_code, 6));
		json_object_object_add(root, "revision", json_object_new_int(id.pci_id.revision));
	}
	json_object_object_add(root, "reset", json_object_new_boolean(id.info.flags & 1u));
	json_object_object_add(root, "num_regions", json_object_new_int((int)id.info.num_regions));
	json_object_object_add(root, "num_irqs", json_object_new_int((int)id.info.num_irqs));
	if (!json) {
		printf("device: %s (%s backend)\nidentity: %s\nreset: %s\n", spec,
		       vfm_device_backend(dev), idstr, id.info.flags & 1u ? "yes" : "no");
	}
	add_regions(dev, &id, regions, !json);
	add_irqs(dev, &id, irqs, !json);
	json_object_object_add(root, "regions", regions);
	json_object_object_add(root, "irqs", irqs);
	add_migration(dev, root, !json);
	{
		char why[VFM_ERROR_MSG_MAX + 32] = "";
		bool works = logging_works(dev, why, sizeof(why));

		json_object_object_add(root, "dma_logging", json_object_new_boolean(works));
		if (!works)
			json_object_object_add(root, "dma_logging_why", json_object_new_string(why));
		if (!json)
			printf("DMA logging: %s%s%s%s\n", works ? "yes" : "no", works ? "" : " (",
			       why, works ? "" : ")");
	}
	if (vfm_device_is_vfio(dev)) {
		json_object *io = json_object_new_object();
		char why[VFM_ERROR_MSG_MAX + 32] = "";
		bool works = iommu_dirty_works(dev, why, sizeof(why));

		json_object_object_add(io, "kind", json_object_new_string(vfm_vfio_iommu_name(dev)));
		bool exact = works && vfm_vfio_iommu_dirty_exact(dev);

		json_object_object_add(io, "dirty_tracking", json_object_new_boolean(works));
		if (!works)
			json_object_object_add(io, "dirty_tracking_why", json_object_new_string(why));
		else
			json_object_object_add(io, "dirty_exact", json_object_new_boolean(exact));
		json_object_object_add(root, "iommu", io);
		if (!json)
			printf("IOMMU: %s, dirty tracking %s%s%s%s%s\n", vfm_vfio_iommu_name(dev),
			       works ? "yes" : "no", works ? "" : " (", why, works ? "" : ")",
			       works && !exact ? " (every mapped page: an IOMMU-backed group)" : "");
	}
	if (json)
		printf("%s\n", json_object_to_json_string_ext(root, JSON_C_TO_STRING_PLAIN));
	json_object_put(root);
	vfm_device_free(dev);
	return VFM_EXIT_OK;
}

int cmd_info(int argc, char **argv)
{
	const char *spec = NULL;
	bool json = false;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			info_usage(stdout);
			return VFM_EXIT_OK;
		} else if (!strcmp(argv[i], "--json")) {
			json = true;
		} else if (argv[i][0] == '-' || spec) {
			fprintf(stderr, "vfiomig info: unexpected argument '%s'\n", argv[i]);
			info_usage(stderr);
			return VFM_EXIT_USAGE;
		} else {
			spec = argv[i];
		}
	}
	if (!spec) {
		fprintf(stderr, "vfiomig info: which DEVICE?\n");
		info_usage(stderr);
		return VFM_EXIT_USAGE;
	}
	if (!devtool_spec_ok("info", spec))
		return VFM_EXIT_USAGE;
	return info_run(spec, json);
}
