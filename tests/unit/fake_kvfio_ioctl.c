/*
 * The fake kernel's ioctls, by object: device (info, regions, IRQs, reset,
 * VFIO_DEVICE_FEATURE, cdev bind/attach), data fd (PRECOPY_INFO), iommufd,
 * type1 container and group. Argument checks follow the kernel's.
 */
#include <errno.h>
#include <string.h>

#include "fake_kvfio_priv.h"

/* vfio_check_feature(): 1 = go on, 0 = answered (PROBE), < 0 = refused. */
static int check_feature(uint32_t flags, uint32_t argsz, uint32_t ops, uint32_t minsz)
{
	if ((flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET)) & ~ops)
		return -EINVAL;
	if (flags & VFIO_DEVICE_FEATURE_PROBE)
		return 0;
	if (!(flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET)))
		return -EINVAL;
	if (argsz < sizeof(struct vfio_device_feature) + minsz)
		return -EINVAL;
	return 1;
}

static int feature(struct fake_kvfio *fk, struct vfio_device_feature *f)
{
	const uint32_t G = VFIO_DEVICE_FEATURE_GET, S = VFIO_DEVICE_FEATURE_SET;
	uint32_t id = f->flags & VFIO_DEVICE_FEATURE_MASK;
	bool mig = fk->cfg.mig_flags != 0;
	int r;

	if (f->argsz < sizeof(*f))
		return -EINVAL;
	if (f->flags & ~(VFIO_DEVICE_FEATURE_MASK | G | S | VFIO_DEVICE_FEATURE_PROBE))
		return -EINVAL;
	if (!(f->flags & VFIO_DEVICE_FEATURE_PROBE) && (f->flags & G) && (f->flags & S))
		return -EINVAL;
	switch (id) {
	case VFIO_DEVICE_FEATURE_MIGRATION:
		if (!mig)
			return -ENOTTY;
		r = check_feature(f->flags, f->argsz, G, 8);
		if (r == 1)
			memcpy(f->data, &fk->cfg.mig_flags, 8);
		return r < 0 ? r : 0;
	case VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: {
		struct vfio_device_feature_mig_state s;

		if (!mig)
			return -ENOTTY;
		r = check_feature(f->flags, f->argsz, G | S, sizeof(s));
		if (r <= 0)
			return r;
		memcpy(&s, f->data, sizeof(s));
		if (f->flags & G) {
			fk->st.gets++;
			s.device_state = fk->state;
			s.data_fd = -1;
			r = 0;
		} else {
			/* On failure the requested state is copied back, data_fd -1. */
			r = fkv_set_state(fk, &s);
		}
		memcpy(f->data, &s, sizeof(s));
		return r;
	}
	case VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: {
		uint64_t init, dirty, size;

		if (!mig || fk->cfg.no_mig_data_size)
			return -ENOTTY;
		r = check_feature(f->flags, f->argsz, G, 8);
		if (r <= 0)
			return r;
		fkv_precopy_sizes(fk, &init, &dirty);
		/* In a session: what is left; outside: the whole stream. */
		size = fk->saving ? init + dirty + 32 : 40 + fk->npages * (24 + 4096) + 32;
		memcpy(f->data, &size, 8);
		return 0;
	}
	case VFIO_DEVICE_FEATURE_DMA_LOGGING_START: {
		struct vfio_device_feature_dma_logging_control c;

		if (!fk->cfg.dma_logging)
			return -ENOTTY;
		r = check_feature(f->flags, f->argsz, S, sizeof(c));
		if (r <= 0)
			return r;
		memcpy(&c, f->data, sizeof(c));
		r = fkv_log_start(fk, &c);
		memcpy(f->data, &c, sizeof(c));
		return r;
	}
	case VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP:
		if (!fk->cfg.dma_logging)
			return -ENOTTY;
		r = check_feature(f->flags, f->argsz, S, 0);
		if (r <= 0)
			return r;
		fkv_log_free(fk);
		return 0;
	case VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: {
		struct vfio_device_feature_dma_logging_report q;

		if (!fk->cfg.dma_logging)
			return -ENOTTY;
		r = check_feature(f->flags, f->argsz, G, sizeof(q));
		if (r <= 0)
			return r;
		memcpy(&q, f->data, sizeof(q));
		/* Debian's 6.12: no CONFIG_IOMMUFD_DRIVER, iova_bitmap_alloc() stub. */
		if (fk->cfg.log_report_unsupported)
			return -EOPNOTSUPP;
		return fkv_log_report(fk, &q);
	}
	default:
		return -ENOTTY;
	}
}

static int device_ioctl(struct fake_kvfio *fk, struct obj *ob, unsigned long req, void *arg)
{
	if (req == VFIO_DEVICE_BIND_IOMMUFD) {
		struct vfio_device_bind_iommufd *b = arg;
		struct obj *io = fkv_obj_of(fk, b->iommufd);

		if (b->argsz < sizeof(*b) || b->flags)
			return -EINVAL;
		if (ob->granted)
			return -EINVAL;
		if (!io || io->kind != O_IOMMUFD)
			return -EBADF;
		ob->granted = true;
		fk->devid = fk->next_id++;
		b->out_devid = fk->devid;
		return 0;
	}
	if (!ob->granted)
		return -EINVAL;   /* a cdev fd does nothing before BIND */
	switch (req) {
	case VFIO_DEVICE_ATTACH_IOMMUFD_PT: {
		struct vfio_device_attach_iommufd_pt *a = arg;

		if (a->argsz < sizeof(*a) || a->flags)
			return -EINVAL;
		if (a->pt_id && a->pt_id == fk->hwpt)
			fk->attached_hwpt = true;
		else if (a->pt_id && a->pt_id == fk->ioas)
			fk->attached_hwpt = false;
		else
			return -ENOENT;
		fk->attached = true;
		return 0;
	}
	case VFIO_DEVICE_DETACH_IOMMUFD_PT:
		fk->attached = fk->attached_hwpt = false;
		return 0;
	case VFIO_DEVICE_GET_INFO: {
		struct vfio_device_info *d = arg;

		if (d->argsz < 16)
			return -EINVAL;
		d->flags = VFIO_DEVICE_FLAGS_PCI | (fk->cfg.no_reset || fk->cfg.reset_hidden ? 0 : VFIO_DEVICE_FLAGS_RESET);
		d->num_regions = NREGIONS;
		d->num_irqs = NIRQS;
		return 0;
	}
	case VFIO_DEVICE_GET_REGION_INFO: {
		struct vfio_region_info *ri = arg;

		if (ri->argsz < sizeof(*ri) || ri->index >= NREGIONS)
			return -EINVAL;
		if (ri->index == VFIO_PCI_VGA_REGION_INDEX)
			return -EINVAL;   /* not a VGA device */
		ri->offset = (uint64_t)ri->index << REGION_SHIFT;
		ri->cap_offset = 0;
		ri->flags = 0;
		ri->size = 0;
		if (ri->index == 0) {
			ri->size = PG;
			ri->flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE |
				    VFIO_REGION_INFO_FLAG_MMAP;
			if (fk->cfg.sparse_bar0) {
				/* As vfio_pci_ioctl_get_region_info(): the chain after the
				 * struct if argsz has room, else only the size it needs. */
				struct vfio_region_info_cap_sparse_mmap *sm;
				uint32_t need = sizeof(*ri) + sizeof(*sm) + sizeof(sm->areas[0]);

				ri->flags |= VFIO_REGION_INFO_FLAG_CAPS;
				if (ri->argsz < need) {
					ri->argsz = need;
					return 0;
				}
				sm = (void *)((char *)ri + sizeof(*ri));
				memset(sm, 0, sizeof(*sm) + sizeof(sm->areas[0]));
				sm->header.id = VFIO_REGION_INFO_CAP_SPARSE_MMAP;
				sm->header.version = 1;
				sm->nr_areas = 1;
				sm->areas[0].offset = 0;
				sm->areas[0].size = PG;
				ri->cap_offset = sizeof(*ri);
			}
		} else if (ri->index == VFIO_PCI_CONFIG_REGION_INDEX) {
			ri->size = 256;
			ri->flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
		}
		return 0;
	}
	case VFIO_DEVICE_GET_IRQ_INFO: {
		struct vfio_irq_info *ii = arg;
		static const uint32_t count[NIRQS] = { 1, 1, 0, 1, 1 };

		if (ii->argsz < sizeof(*ii) || ii->index >= NIRQS)
			return -EINVAL;
		ii->count = count[ii->index];
		ii->flags = VFIO_IRQ_INFO_EVENTFD;
		if (ii->index == VFIO_PCI_INTX_IRQ_INDEX)
			ii->flags |= VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED;
		else if (ii->index <= VFIO_PCI_MSIX_IRQ_INDEX)
			ii->flags |= VFIO_IRQ_INFO_NORESIZE;
		return 0;
	}
	case VFIO_DEVICE_RESET:
		if (fk->cfg.no_reset)
			return -EINVAL;
		fk->st.resets++;
		fk->state = VFM_STATE_RUNNING;
		fkv_end_session(fk);
		return 0;
	case VFIO_DEVICE_FEATURE:
		return feature(fk, arg);
	default:
		return -ENOTTY;
	}
}

static int data_ioctl(struct fake_kvfio *fk, struct obj *ob, unsigned long req, void *arg)
{
	struct vfio_precopy_info *pi = arg;

	if (req != VFIO_MIG_GET_PRECOPY_INFO)
		return -ENOTTY;
	if (ob->session != fk->session || !fk->session)
		return -ENODEV;
	fk->st.precopy_info++;
	if (fk->state != VFM_STATE_PRE_COPY && fk->state != VFM_STATE_PRE_COPY_P2P)
		return -EINVAL;
	if (pi->argsz < sizeof(*pi) || pi->flags)
		return -EINVAL;
	/* mlx5: at the end of the current data, asking starts the next chunk. */
	if (fk->cfg.info_produces_dirty && fk->rec_off == fk->rec_len &&
	    fk->next_page == fk->npages && fk->hdr_sent) {
		for (uint64_t p = 0; p < fk->npages; p++) {
			fk->produced[p] |= fk->dirty[p];
			fk->dirty[p] = 0;
		}
	}
	{
		uint64_t init, dirty;

		fkv_precopy_sizes(fk, &init, &dirty);
		pi->initial_bytes = init;
		pi->dirty_bytes = dirty;
	}
	return 0;
}

static int iommufd_ioctl(struct fake_kvfio *fk, unsigned long req, void *arg)
{
	switch (req) {
	case IOMMU_IOAS_ALLOC: {
		struct iommu_ioas_alloc *a = arg;

		if (a->size < sizeof(*a) || a->flags || fk->ioas)
			return -EINVAL;
		fk->ioas = a->out_ioas_id = fk->next_id++;
		return 0;
	}
	case IOMMU_IOAS_IOVA_RANGES: {
		struct iommu_ioas_iova_ranges *q = arg;
		struct iommu_iova_range r[2] = { { 0, 0xfedfffffull }, { 0xfef00000ull, ~0ull } };
		uint32_t n = fk->cfg.msi_hole ? 2 : 1;

		if (q->size < sizeof(*q) || q->ioas_id != fk->ioas)
			return -EINVAL;
		if (!fk->cfg.msi_hole)
			r[0].last = ~0ull;
		if (q->num_iovas < n) {
			q->num_iovas = n;
			return -EMSGSIZE;
		}
		q->num_iovas = n;
		memcpy((void *)(uintptr_t)q->allowed_iovas, r, n * sizeof(r[0]));
		q->out_iova_alignment = PG;
		return 0;
	}
	case IOMMU_GET_HW_INFO: {
		struct iommu_hw_info *h = arg;

		if (h->size < sizeof(*h) || h->flags || !fk->devid || h->dev_id != fk->devid)
			return -EINVAL;
		h->out_data_type = IOMMU_HW_INFO_TYPE_NONE;
		h->out_capabilities = fk->cfg.hw_dirty ? IOMMU_HW_CAP_DIRTY_TRACKING : 0;
		return 0;
	}
	case IOMMU_HWPT_ALLOC: {
		struct iommu_hwpt_alloc *h = arg;

		if (h->size < sizeof(*h) || h->dev_id != fk->devid || h->pt_id != fk->ioas ||
		    h->data_type != IOMMU_HWPT_DATA_NONE)
			return -EINVAL;
		if ((h->flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING) && !fk->cfg.hw_dirty)
			return -EOPNOTSUPP;
		fk->hwpt = h->out_hwpt_id = fk->next_id++;
		fk->hwpt_dirty = h->flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
		return 0;
	}
	case IOMMU_DESTROY: {
		struct iommu_destroy *d = arg;

		if (d->id && d->id == fk->hwpt) {
			fk->hwpt = 0;
			fk->hwpt_dirty = false;
			return 0;
		}
		return -ENOENT;
	}
	case IOMMU_IOAS_MAP: {
		struct iommu_ioas_map *m = arg;

		if (m->size < sizeof(*m) || m->ioas_id != fk->ioas || !fk->ioas)
			return -ENOENT;
		if (!(m->flags & IOMMU_IOAS_MAP_FIXED_IOVA))
			return -EINVAL;
		return fkv_map_add(fk, m->iova, m->length, m->user_va);
	}
	case IOMMU_IOAS_UNMAP: {
		struct iommu_ioas_unmap *u = arg;
		uint64_t done;
		int r;

		if (u->size < sizeof(*u) || u->ioas_id != fk->ioas || !fk->ioas)
			return -ENOENT;
		r = fkv_map_remove(fk, u->iova, u->length, &done);
		u->length = done;
		return r;
	}
	case IOMMU_HWPT_SET_DIRTY_TRACKING: {
		struct iommu_hwpt_set_dirty_tracking *s = arg;

		if (s->size < sizeof(*s) || !fk->hwpt || s->hwpt_id != fk->hwpt)
			return -ENOENT;
		if (!fk->hwpt_dirty)
			return -EOPNOTSUPP;
		fk->iommu_dirty = s->flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE;
		return 0;
	}
	case IOMMU_HWPT_GET_DIRTY_BITMAP: {
		struct iommu_hwpt_get_dirty_bitmap *g = arg;

		if (g->size < sizeof(*g) || !fk->hwpt || g->hwpt_id != fk->hwpt)
			return -ENOENT;
		if (!fk->iommu_dirty)
			return -EINVAL;
		return fkv_dirty_collect(fk, g->iova, g->length, g->page_size,
					 (uint64_t *)(uintptr_t)g->data,
					 g->flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR);
	}
	default:
		return -ENOTTY;
	}
}

/* type1's GET_BITMAP / unmap-with-bitmap: 4 KiB pages, a big enough bitmap. */
static int type1_bits(struct fake_kvfio *fk, uint64_t iova, uint64_t size,
		      const struct vfio_bitmap *b)
{
	if (!fk->iommu_dirty || b->pgsize != PG || b->size < (size / PG + 63) / 64 * 8 || !b->data)
		return -EINVAL;
	return fkv_dirty_collect(fk, iova, size, PG, (uint64_t *)b->data, false);
}

static int container_ioctl(struct fake_kvfio *fk, unsigned long req, void *arg)
{
	switch (req) {
	case VFIO_GET_API_VERSION:
		return VFIO_API_VERSION;
	case VFIO_CHECK_EXTENSION:
		return (uintptr_t)arg == VFIO_TYPE1_IOMMU || (uintptr_t)arg == VFIO_TYPE1v2_IOMMU;
	case VFIO_SET_IOMMU:
		if (!fk->group_set || (uintptr_t)arg != VFIO_TYPE1v2_IOMMU)
			return -EINVAL;
		fk->iommu_set = true;
		return 0;
	case VFIO_IOMMU_GET_INFO: {
		/* As vfio_iommu_type1_get_info(): caps only with room for them all,
		 * else argsz says how much; the IOVA range cap first, then migration. */
		struct vfio_iommu_type1_info *in = arg;
		struct vfio_iommu_type1_info_cap_migration cap = {
			.header = { VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 1, 0 },
			.pgsize_bitmap = PG, .max_dirty_bitmap_size = 1ull << 20,
		};
		/* The IOVA range cap: its header, then two ranges in its flexible
		 * iova_ranges[] (bytes: ISO C allows no field after it). */
		struct vfio_iommu_type1_info_cap_iova_range h = {
			.header = { VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0 }, .nr_iovas = 2 };
		const struct vfio_iova_range r[2] = { { 0, 0xfedfffffull }, { 0xfef00000ull, ~0ull } };
		unsigned char iov[sizeof(h) + sizeof(r)];
		uint32_t need = sizeof(*in), at = sizeof(*in);

		if (!fk->iommu_set || in->argsz < sizeof(*in))
			return -EINVAL;
		need += fk->cfg.msi_hole ? sizeof(iov) : 0;
		need += fk->cfg.type1_dirty ? sizeof(cap) : 0;
		in->flags = VFIO_IOMMU_INFO_PGSIZES;
		in->iova_pgsizes = PG;
		in->cap_offset = 0;
		if (need == sizeof(*in))
			return 0;
		if (in->argsz < need) {
			in->argsz = need;
			return 0;
		}
		in->flags |= VFIO_IOMMU_INFO_CAPS;
		in->cap_offset = at;
		if (fk->cfg.msi_hole) {
			h.header.next = fk->cfg.type1_dirty ? at + sizeof(iov) : 0;
			memcpy(iov, &h, sizeof(h));
			memcpy(iov + sizeof(h), r, sizeof(r));
			memcpy((char *)in + at, iov, sizeof(iov));
			at += sizeof(iov);
		}
		if (fk->cfg.type1_dirty)
			memcpy((char *)in + at, &cap, sizeof(cap));
		return 0;
	}
	case VFIO_IOMMU_MAP_DMA: {
		struct vfio_iommu_type1_dma_map *m = arg;

		if (!fk->iommu_set || m->argsz < sizeof(*m) ||
		    m->flags & ~(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE))
			return -EINVAL;
		return fkv_map_add(fk, m->iova, m->size, m->vaddr);
	}
	case VFIO_IOMMU_UNMAP_DMA: {
		struct vfio_iommu_type1_dma_unmap *u = arg;
		uint64_t done;
		int r;

		if (!fk->iommu_set || u->argsz < sizeof(*u) ||
		    u->flags & ~VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)
			return -EINVAL;
		if (u->flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) {
			struct vfio_bitmap b;

			if (u->argsz < sizeof(*u) + sizeof(b))
				return -EINVAL;
			memcpy(&b, u->data, sizeof(b));
			r = type1_bits(fk, u->iova, u->size, &b);
			if (r)
				return r;
		}
		r = fkv_map_remove(fk, u->iova, u->size, &done);
		u->size = done;
		return r;
	}
	case VFIO_IOMMU_DIRTY_PAGES: {
		struct vfio_iommu_type1_dirty_bitmap *d = arg;
		uint32_t f = d->flags;

		if (!fk->iommu_set || d->argsz < sizeof(*d) || __builtin_popcount(f) != 1)
			return -EINVAL;
		if (!fk->cfg.type1_dirty)
			return -ENOTTY;
		if (f == VFIO_IOMMU_DIRTY_PAGES_FLAG_START || f == VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP) {
			fk->iommu_dirty = f == VFIO_IOMMU_DIRTY_PAGES_FLAG_START;
			return 0;
		}
		if (f == VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP) {
			struct vfio_iommu_type1_dirty_bitmap_get g;
			uint64_t done = 0;

			if (d->argsz < sizeof(*d) + sizeof(g))
				return -EINVAL;
			memcpy(&g, d->data, sizeof(g));
			/* The range must be made of whole mappings. */
			for (unsigned i = 0; i < fk->nmaps; i++) {
				const struct fmap *m = &fk->maps[i];
				bool overlap = m->iova < g.iova + g.size && g.iova < m->iova + m->size;

				if (overlap && (m->iova < g.iova || m->iova + m->size > g.iova + g.size))
					return -EINVAL;
				if (overlap)
					done += m->size;
			}
			if (done != g.size)
				return -EINVAL;
			return type1_bits(fk, g.iova, g.size, &g.bitmap);
		}
		return -EINVAL;
	}
	default:
		return -ENOTTY;
	}
}

static int group_ioctl(struct fake_kvfio *fk, unsigned long req, void *arg)
{
	switch (req) {
	case VFIO_GROUP_GET_STATUS: {
		struct vfio_group_status *gs = arg;

		if (gs->argsz < sizeof(*gs))
			return -EINVAL;
		gs->flags = VFIO_GROUP_FLAGS_VIABLE | (fk->group_set ? VFIO_GROUP_FLAGS_CONTAINER_SET : 0);
		return 0;
	}
	case VFIO_GROUP_SET_CONTAINER: {
		struct obj *c = fkv_obj_of(fk, *(const int *)arg);

		if (!c || c->kind != O_CONTAINER)
			return -EBADF;
		if (fk->group_set)
			return -EBUSY;
		fk->group_set = true;
		return 0;
	}
	case VFIO_GROUP_GET_DEVICE_FD: {
		int fd;

		if (!fk->iommu_set)
			return -EINVAL;
		if (strcmp(arg, fk->cfg.bdf))
			return -ENODEV;
		fd = fkv_obj_new(fk, O_DEV);
		if (fd >= 0) {
			fkv_obj_of(fk, fd)->granted = true;
			fk->legacy = true;
		}
		return fd;
	}
	default:
		return -ENOTTY;
	}
}

int fkv_ioctl(void *o, int fd, unsigned long req, void *arg)
{
	struct fake_kvfio *fk = o;
	struct obj *ob = fkv_obj_of(fk, fd);

	if (!ob)
		return -EBADF;
	if (fk->inj.on && fk->inj.req == req &&
	    (req != VFIO_DEVICE_FEATURE || !fk->inj.feature ||
	     (((struct vfio_device_feature *)arg)->flags & VFIO_DEVICE_FEATURE_MASK) == fk->inj.feature)) {
		if (fk->inj.skip) {
			fk->inj.skip--;
		} else {
			fk->inj.on = false;
			return fk->inj.err;   /* never reaches the driver */
		}
	}
	switch (ob->kind) {
	case O_DEV:
		return device_ioctl(fk, ob, req, arg);
	case O_DATA:
		return data_ioctl(fk, ob, req, arg);
	case O_IOMMUFD:
		return iommufd_ioctl(fk, req, arg);
	case O_CONTAINER:
		return container_ioctl(fk, req, arg);
	case O_GROUP:
		return group_ioctl(fk, req, arg);
	}
	return -ENOTTY;
}
