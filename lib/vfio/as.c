/*
 * One IOMMU address space per process, shared by every kernel VFIO device
 * opened through the same system-call table: one iommufd with one IOAS, or
 * one type1v2 container, and one fd per IOMMU group. Refcounted: the last
 * device closed closes them.
 *
 * Why: a group can be opened once (a second open of /dev/vfio/G is EBUSY,
 * drivers/vfio/group.c vfio_group_fops_open), so two devices of one group
 * need the same group fd; and guest RAM mapped into one container or IOAS
 * per device is pinned and charged to RLIMIT_MEMLOCK once per device
 * (vfio_iommu_type1.c vfio_lock_acct, iommufd's pages.c). QEMU shares the
 * same way (hw/vfio/container.c vfio_connect_container, iommufd.c).
 *
 * DMA maps live here too, counted: the VMM maps the same guest RAM for each
 * device; the first map reaches the kernel, later identical ones only count,
 * and the kernel unmap happens when the last device lets go.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/logging.h"
#include "vfio/priv.h"

static pthread_mutex_t registry = PTHREAD_MUTEX_INITIALIZER;
static struct kv_as *spaces;
static struct kv_group *groups;

static void close_quiet(const struct vfm_vfio_sys *sys, int fd)
{
	if (fd >= 0)
		sys->close(sys->opaque, fd);
}

static int new_as(const struct vfm_vfio_sys *sys, enum kv_iommu iommu, const char *id,
		  struct kv_as **out, struct vfm_error *err)
{
	struct kv_as *as = calloc(1, sizeof(*as));
	int r;

	if (!as)
		return vfm_error_set(err, -ENOMEM, "no memory for an IOMMU address space");
	as->sys = sys;
	as->iommu = iommu;
	as->fd = -1;
	pthread_mutex_init(&as->lock, NULL);
	if (iommu == KV_IOMMUFD) {
		struct iommu_ioas_alloc ioas = { .size = sizeof(ioas) };

		r = sys->open(sys->opaque, "/dev/iommu", O_RDWR);
		if (r < 0) {
			vfm_error_set(err, r, "%s: open /dev/iommu: %s", id, strerror(-r));
			goto fail;
		}
		as->fd = r;
		r = sys->ioctl(sys->opaque, as->fd, IOMMU_IOAS_ALLOC, &ioas);
		if (r) {
			vfm_error_set(err, r, "%s: IOMMU_IOAS_ALLOC: %s", id, strerror(-r));
			goto fail;
		}
		as->ioas_id = ioas.out_ioas_id;
	} else {
		r = sys->open(sys->opaque, "/dev/vfio/vfio", O_RDWR);
		if (r < 0) {
			vfm_error_set(err, r, "%s: open /dev/vfio/vfio: %s", id, strerror(-r));
			goto fail;
		}
		as->fd = r;
		r = sys->ioctl(sys->opaque, as->fd, VFIO_GET_API_VERSION, NULL);
		if (r != VFIO_API_VERSION) {
			r = vfm_error_set(err, r < 0 ? r : -EPROTO, "%s: VFIO API version %d (want %d)",
					  id, r, VFIO_API_VERSION);
			goto fail;
		}
		r = sys->ioctl(sys->opaque, as->fd, VFIO_CHECK_EXTENSION,
			       (void *)(uintptr_t)VFIO_TYPE1v2_IOMMU);
		if (r <= 0) {
			r = vfm_error_set(err, r < 0 ? r : -ENOTSUP, "%s: no type1v2 IOMMU", id);
			goto fail;
		}
	}
	*out = as;
	return 0;
fail:
	close_quiet(sys, as->fd);
	pthread_mutex_destroy(&as->lock);
	free(as);
	return r;
}

int kv_as_get(const struct vfm_vfio_sys *sys, enum kv_iommu iommu, const char *id,
	      struct kv_as **out, struct vfm_error *err)
{
	struct kv_as *as;
	int r = 0;

	pthread_mutex_lock(&registry);
	for (as = spaces; as; as = as->next)
		if (as->sys == sys && as->iommu == iommu)
			break;
	if (as) {
		as->refs++;
	} else if (!(r = new_as(sys, iommu, id, &as, err))) {
		as->refs = 1;
		as->next = spaces;
		spaces = as;
	}
	pthread_mutex_unlock(&registry);
	*out = r ? NULL : as;
	return r;
}

void kv_as_put(struct kv_as *as)
{
	struct kv_as **p;

	if (!as)
		return;
	pthread_mutex_lock(&registry);
	if (--as->refs) {
		pthread_mutex_unlock(&registry);
		return;
	}
	for (p = &spaces; *p; p = &(*p)->next)
		if (*p == as) {
			*p = as->next;
			break;
		}
	pthread_mutex_unlock(&registry);
	/* Closing the IOAS or container drops the kernel's mappings; ours remain. */
	for (size_t i = 0; i < as->nmaps; i++)
		if (as->maps[i].mapped)
			as->sys->munmap(as->sys->opaque, as->maps[i].mapped, as->maps[i].size);
	close_quiet(as->sys, as->fd);
	free(as->maps);
	free(as->iova_ok);
	pthread_mutex_destroy(&as->lock);
	free(as);
}

int kv_group_get(struct kv_as *as, int num, const char *id, struct kv_group **out,
		 struct vfm_error *err)
{
	const struct vfm_vfio_sys *sys = as->sys;
	struct vfio_group_status gs = { .argsz = sizeof(gs) };
	struct kv_group *g;
	char path[64];
	int r, fd = -1;

	*out = NULL;
	pthread_mutex_lock(&registry);
	for (g = groups; g; g = g->next)
		if (g->as == as && g->num == num) {
			g->refs++;
			*out = g;
			pthread_mutex_unlock(&registry);
			return 0;
		}
	snprintf(path, sizeof(path), "/dev/vfio/%d", num);
	r = sys->open(sys->opaque, path, O_RDWR);
	if (r < 0) {
		vfm_error_set(err, r, "%s: open %s: %s", id, path, strerror(-r));
		goto out;
	}
	fd = r;
	r = sys->ioctl(sys->opaque, fd, VFIO_GROUP_GET_STATUS, &gs);
	if (!r && !(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
		r = vfm_error_set(err, -EBUSY, "%s: IOMMU group %d is not viable (bind every "
				  "device of the group to vfio-pci)", id, num);
	else if (r)
		vfm_error_set(err, r, "%s: VFIO_GROUP_GET_STATUS: %s", id, strerror(-r));
	if (r)
		goto out;
	/* The first group gives the container its IOMMU; later ones join it. */
	r = sys->ioctl(sys->opaque, fd, VFIO_GROUP_SET_CONTAINER, &as->fd);
	if (!r && !as->iommu_set)
		r = sys->ioctl(sys->opaque, as->fd, VFIO_SET_IOMMU,
			       (void *)(uintptr_t)VFIO_TYPE1v2_IOMMU);
	if (r) {
		vfm_error_set(err, r, "%s: setting up the type1v2 container: %s", id, strerror(-r));
		goto out;
	}
	as->iommu_set = true;
	g = calloc(1, sizeof(*g));
	if (!g) {
		r = vfm_error_set(err, -ENOMEM, "no memory for a group");
		goto out;
	}
	*g = (struct kv_group){ .next = groups, .as = as, .num = num, .fd = fd, .refs = 1 };
	groups = g;
	*out = g;
	fd = -1;
out:
	pthread_mutex_unlock(&registry);
	close_quiet(sys, fd);
	return r;
}

void kv_group_put(struct kv_group *g)
{
	struct kv_group **p;

	if (!g)
		return;
	pthread_mutex_lock(&registry);
	if (--g->refs) {
		pthread_mutex_unlock(&registry);
		return;
	}
	for (p = &groups; *p; p = &(*p)->next)
		if (*p == g) {
			*p = g->next;
			break;
		}
	pthread_mutex_unlock(&registry);
	/* Closing the last group fd takes it out of the container. */
	close_quiet(g->as->sys, g->fd);
	free(g);
}
