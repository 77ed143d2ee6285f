/*
 * Name resolution for kernel VFIO devices through sysfs: a PCI address, an
 * mdev UUID or a sysfs device path to its cdev (DIR/vfio-dev/vfioN), IOMMU
 * group (DIR/iommu_group) and device name, and a cdev path back to its device
 * (/sys/class/vfio-dev/vfioN/device).
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vfio/priv.h"

#define CDEV_DIR "/dev/vfio/devices/"

/* The last component of the symlink at path into out; -errno on failure. */
static int link_basename(const char *path, char *out, size_t len)
{
	char buf[PATH_MAX];
	ssize_t n = readlink(path, buf, sizeof(buf) - 1);
	const char *base;

	if (n < 0)
		return -errno;
	buf[n] = '\0';
	base = strrchr(buf, '/');
	base = base ? base + 1 : buf;
	if (!*base || strlen(base) >= len)
		return -ENAMETOOLONG;
	memcpy(out, base, strlen(base) + 1);
	return 0;
}

static bool hex_run(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!isxdigit((unsigned char)s[i]))
			return false;
	return true;
}

/* "DDDD:BB:DD.F" or "BB:DD.F" (domain 0) into the canonical lowercase form. */
static int parse_bdf(const char *s, char *out, size_t len)
{
	char buf[16];
	size_t n = strlen(s);

	if (n == 7)
		snprintf(buf, sizeof(buf), "0000:%s", s);
	else if (n == 12)
		snprintf(buf, sizeof(buf), "%s", s);
	else
		return -EINVAL;
	if (!hex_run(buf, 4) || buf[4] != ':' || !hex_run(buf + 5, 2) || buf[7] != ':' ||
	    !hex_run(buf + 8, 2) || buf[10] != '.' || buf[11] < '0' || buf[11] > '7')
		return -EINVAL;
	for (char *p = buf; *p; p++)
		*p = (char)tolower((unsigned char)*p);
	if (len < 13)
		return -ENAMETOOLONG;
	memcpy(out, buf, 13);
	return 0;
}

/* The vfioN entry of dir, if any. */
static int find_vfio_entry(const char *dir, char *out, size_t len)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int r = -ENOENT;

	if (!d)
		return -errno;
	while ((e = readdir(d))) {
		if (strncmp(e->d_name, "vfio", 4) || !e->d_name[4] ||
		    strspn(e->d_name + 4, "0123456789") != strlen(e->d_name + 4))
			continue;
		r = snprintf(out, len, "%s", e->d_name) >= (int)len ? -ENAMETOOLONG : 0;
		break;
	}
	closedir(d);
	return r;
}

/* 8-4-4-4-12 hex digits: an mdev's name. */
bool kv_is_mdev_name(const char *s)
{
	static const int run[] = { 8, 4, 4, 4, 12 };

	for (size_t i = 0; i < 5; i++) {
		if (!hex_run(s, (size_t)run[i]))
			return false;
		s += run[i];
		if (*s != (i < 4 ? '-' : '\0'))
			return false;
		s += i < 4;
	}
	return true;
}

/* The IOMMU group number of the sysfs device directory dir (its iommu_group link). */
static int group_of(const char *dir, int *group)
{
	char path[PATH_MAX], name[32];
	char *end;
	long g;

	*group = -1;
	snprintf(path, sizeof(path), "%s/iommu_group", dir);
	if (link_basename(path, name, sizeof(name)))
		return -ENOENT;
	g = strtol(name, &end, 10);
	if (*end || g < 0 || g > INT_MAX)
		return -EINVAL;
	*group = (int)g;
	return 0;
}

/*
 * From a sysfs device directory: its cdev (DIR/vfio-dev/vfioN), its IOMMU
 * group (DIR/iommu_group) and the name the kernel matches in
 * VFIO_GROUP_GET_DEVICE_FD: dev_name(), the directory's own name (a PCI
 * address, or an mdev's UUID; drivers/vfio/group.c vfio_device_get_from_name()).
 */
static int from_device_dir(const char *dir, const char *shown, char *cdev, size_t cdev_len, char *devname, size_t devname_len, int *group,
			   struct vfm_error *err)
{
	char path[PATH_MAX], real[PATH_MAX], entry[64], driver[64] = "";
	const char *base;

	if (!realpath(dir, real))
		return vfm_error_set(err, -ENOENT, "vfio: no device %s (%s)", shown, dir);
	base = strrchr(real, '/');
	base = base ? base + 1 : real;
	if (!*base || strlen(base) >= devname_len)
		return vfm_error_set(err, -ENAMETOOLONG, "vfio: device name of %s too long", dir);
	snprintf(devname, devname_len, "%s", base);
	snprintf(path, sizeof(path), "%s/vfio-dev", dir);
	if (find_vfio_entry(path, entry, sizeof(entry)) == 0)
		snprintf(cdev, cdev_len, CDEV_DIR "%s", entry);
	group_of(dir, group);
	if (!cdev[0] && *group < 0) {
		snprintf(path, sizeof(path), "%s/driver", dir);
		link_basename(path, driver, sizeof(driver));
		return vfm_error_set(err, -ENODEV, "vfio: %s is not bound to a VFIO driver "
				     "(driver: %s); bind it to vfio-pci or its variant driver",
				     shown, driver[0] ? driver : "none");
	}
	return 0;
}

int kv_resolve(const char *sysfs, const char *name, char *cdev, size_t cdev_len, char *devname,
	       size_t devname_len, int *group, struct vfm_error *err)
{
	char path[PATH_MAX], bdf[16];

	cdev[0] = devname[0] = '\0';
	*group = -1;
	if (!name || !*name)
		return vfm_error_set(err, -EINVAL, "vfio: empty device name");
	if (!strncmp(name, "/sys/", 5)) {
		/* A sysfs device directory (/sys/bus/mdev/devices/UUID, ...). */
		snprintf(path, sizeof(path), "%s%s", sysfs, name + 4);
		return from_device_dir(path, name, cdev, cdev_len, devname, devname_len,
				       group, err);
	}
	if (name[0] == '/') {
		const char *base = strrchr(name, '/') + 1;

		if (strlen(name) >= cdev_len)
			return vfm_error_set(err, -ENAMETOOLONG, "vfio: path '%s' too long", name);
		strcpy(cdev, name);
		/* The device's name and group matter only for the legacy fallback. */
		snprintf(path, sizeof(path), "%s/class/vfio-dev/%s/device", sysfs, base);
		if (link_basename(path, devname, devname_len) == 0)
			group_of(path, group);
		else
			devname[0] = '\0';
		return 0;
	}
	if (kv_is_mdev_name(name)) {
		snprintf(path, sizeof(path), "%s/bus/mdev/devices/%s", sysfs, name);
		return from_device_dir(path, name, cdev, cdev_len, devname, devname_len,
				       group, err);
	}
	if (parse_bdf(name, bdf, sizeof(bdf)))
		return vfm_error_set(err, -EINVAL, "vfio: '%s' is neither a cdev path "
				     "(/dev/vfio/devices/vfioN), a PCI address (0000:BB:DD.F), an "
				     "mdev UUID nor a sysfs device path (/sys/bus/mdev/devices/UUID)",
				     name);
	snprintf(path, sizeof(path), "%s/bus/pci/devices/%s", sysfs, bdf);
	if (access(path, F_OK))
		return vfm_error_set(err, -ENOENT, "vfio: no PCI device %s (%s)", bdf, path);
	return from_device_dir(path, bdf, cdev, cdev_len, devname, devname_len, group,
			       err);
}
