/*
 * Device regions (declaration, REGION_INFO with sparse mmap, IO_FDS,
 * REGION_READ/WRITE/WRITE_MULTI), the library-kept PCI config space, and
 * interrupts (IRQ_INFO, SET_IRQS, triggering through the client's eventfds).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/logging.h"
#include "vfio-user/server.h"

VFU_ARGSZ_FIRST(struct vfu_region_info);
VFU_ARGSZ_FIRST(struct vfu_region_io_fds);
VFU_ARGSZ_FIRST(struct vfu_irq_info);

#define PAGE 4096u

static bool page_aligned(uint64_t v)
{
	return (v & (PAGE - 1)) == 0;
}

/* ------------------------------------------------------------------------ */
/* Declaration                                                               */

int vfm_vfu_setup_region(struct vfm_vfu_ctx *ctx, uint32_t index,
			 const struct vfm_vfu_region *reg, struct vfm_error *err)
{
	struct vfu_srv_region *slot;
	int fd = -1;

	if (ctx->realized)
		return vfm_error_set(err, -EBUSY, "%s: region %u after realize", ctx->id, index);
	if (index >= VFM_VFU_NUM_REGIONS || !reg)
		return vfm_error_set(err, -EINVAL, "%s: no region %u", ctx->id, index);
	if (index == VFM_VFU_PCI_CONFIG && ctx->pci)
		return vfm_error_set(err, -EBUSY, "%s: config space is kept by the library", ctx->id);
	if (!reg->size || !reg->flags || (reg->flags & ~(VFM_VFU_REGION_READ | VFM_VFU_REGION_WRITE)))
		return vfm_error_set(err, -EINVAL, "%s: region %u needs a size and READ/WRITE flags",
				     ctx->id, index);
	if (reg->ops && reg->ops->version != VFM_VFU_REGION_OPS_VERSION)
		return vfm_error_set(err, -EINVAL, "%s: region %u ops version %u, expected %u",
				     ctx->id, index, reg->ops->version, VFM_VFU_REGION_OPS_VERSION);
	if (!reg->ops && reg->fd < 0)
		return vfm_error_set(err, -EINVAL, "%s: region %u has neither ops nor an fd",
				     ctx->id, index);
	if (reg->nr_areas > VFM_VFU_MAX_MMAP_AREAS || (reg->nr_areas && (reg->fd < 0 || !reg->areas)))
		return vfm_error_set(err, -EINVAL, "%s: region %u: %u mmap areas (at most %u, with an fd)",
				     ctx->id, index, reg->nr_areas, VFM_VFU_MAX_MMAP_AREAS);
	if (reg->fd >= 0 && !page_aligned(reg->fd_offset))
		return vfm_error_set(err, -EINVAL, "%s: region %u: fd offset not page-aligned",
				     ctx->id, index);
	for (uint32_t i = 0; i < reg->nr_areas; i++) {
		const struct vfm_vfu_mmap_area *a = &reg->areas[i];

		if (!a->size || !page_aligned(a->offset) || !page_aligned(a->size) ||
		    !vfu_range_ok(a->offset, a->size, reg->size))
			return vfm_error_set(err, -EINVAL, "%s: region %u: mmap area %u is not page-aligned inside the region",
					     ctx->id, index, i);
	}
	if (reg->fd >= 0) {
		fd = fcntl(reg->fd, F_DUPFD_CLOEXEC, 3);
		if (fd < 0)
			return vfm_error_set(err, -errno, "%s: region %u: dup: %s", ctx->id, index,
					     strerror(errno));
	}
	slot = &ctx->regions[index];
	if (slot->fd >= 0)
		close(slot->fd);
	*slot = (struct vfu_srv_region){
		.declared = true, .size = reg->size, .flags = reg->flags, .ops = reg->ops,
		.fd = fd, .fd_offset = reg->fd_offset, .nr_areas = reg->nr_areas,
	};
	if (reg->nr_areas)
		memcpy(slot->areas, reg->areas, reg->nr_areas * sizeof(reg->areas[0]));
	return 0;
}

int vfm_vfu_setup_irqs(struct vfm_vfu_ctx *ctx, uint32_t index, uint32_t count,
		       struct vfm_error *err)
{
	struct vfu_srv_irq *irq;

	if (ctx->realized)
		return vfm_error_set(err, -EBUSY, "%s: IRQs after realize", ctx->id);
	if (index >= VFM_VFU_NUM_IRQS || count > VFU_SRV_MAX_IRQS)
		return vfm_error_set(err, -EINVAL, "%s: IRQ index %u count %u", ctx->id, index, count);
	irq = &ctx->irqs[index];
	free(irq->efd);
	free(irq->masked);
	free(irq->pending);
	*irq = (struct vfu_srv_irq){ .count = count };
	if (!count)
		return 0;
	irq->efd = malloc(count * sizeof(int));
	irq->masked = calloc(count, 1);
	irq->pending = calloc(count, 1);
	if (!irq->efd || !irq->masked || !irq->pending) {
		free(irq->efd);
		free(irq->masked);
		free(irq->pending);
		*irq = (struct vfu_srv_irq){ 0 };
		return vfm_error_set(err, -ENOMEM, "%s: no memory for IRQs", ctx->id);
	}
	for (uint32_t i = 0; i < count; i++)
		irq->efd[i] = -1;
	return 0;
}

void vfu_srv_regions_free(struct vfm_vfu_ctx *ctx)
{
	vfu_srv_irqs_release(ctx);
	for (unsigned i = 0; i < VFM_VFU_NUM_REGIONS; i++)
		if (ctx->regions[i].fd >= 0)
			close(ctx->regions[i].fd);
	for (unsigned i = 0; i < VFM_VFU_NUM_IRQS; i++) {
		free(ctx->irqs[i].efd);
		free(ctx->irqs[i].masked);
		free(ctx->irqs[i].pending);
	}
}

/* ------------------------------------------------------------------------ */
/* PCI config space                                                          */

#define CFG_VENDOR    0x00
#define CFG_DEVICE    0x02
#define CFG_COMMAND   0x04
#define CFG_REVISION  0x08
#define CFG_CLASS     0x09
#define CFG_CACHELINE 0x0c
#define CFG_HDR_TYPE  0x0e
#define CFG_BAR0      0x10
#define CFG_SUBSYS_VENDOR 0x2c
#define CFG_SUBSYS_ID 0x2e
#define CFG_ROM       0x30
#define CFG_INT_LINE  0x3c
#define CFG_INT_PIN   0x3d
/* IO, MEMORY, BUS_MASTER, PARITY, SERR, INTX_DISABLE */
#define CFG_COMMAND_WMASK 0x0547u

static void put16(uint8_t *p, uint16_t v)
{
	memcpy(p, &v, sizeof(v));
}

static void put32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, sizeof(v));
}

int vfm_vfu_pci_init(struct vfm_vfu_ctx *ctx, const struct vfm_vfu_pci_ids *ids,
		     struct vfm_error *err)
{
	if (ctx->realized)
		return vfm_error_set(err, -EBUSY, "%s: PCI init after realize", ctx->id);
	if (!ids || ctx->regions[VFM_VFU_PCI_CONFIG].declared)
		return vfm_error_set(err, -EBUSY, "%s: config space already declared", ctx->id);
	memset(ctx->cfg, 0, sizeof(ctx->cfg));
	memset(ctx->cfg_wmask, 0, sizeof(ctx->cfg_wmask));
	put16(ctx->cfg + CFG_VENDOR, ids->vendor_id);
	put16(ctx->cfg + CFG_DEVICE, ids->device_id);
	ctx->cfg[CFG_REVISION] = ids->revision;
	ctx->cfg[CFG_CLASS] = (uint8_t)ids->class_code;
	ctx->cfg[CFG_CLASS + 1] = (uint8_t)(ids->class_code >> 8);
	ctx->cfg[CFG_CLASS + 2] = (uint8_t)(ids->class_code >> 16);
	put16(ctx->cfg + CFG_SUBSYS_VENDOR, ids->subsys_vendor_id);
	put16(ctx->cfg + CFG_SUBSYS_ID, ids->subsys_id);
	put16(ctx->cfg_wmask + CFG_COMMAND, CFG_COMMAND_WMASK);
	ctx->cfg_wmask[CFG_CACHELINE] = 0xff;
	ctx->cfg_wmask[CFG_CACHELINE + 1] = 0xff;   /* latency timer */
	ctx->cfg_wmask[CFG_INT_LINE] = 0xff;
	ctx->pci = true;
	return 0;
}

/*
 * BARs read back what was written masked by their size, so writing ~0 and
 * reading gives the size as PCI sizing expects; the low type bits are fixed.
 */
int vfu_srv_pci_realize(struct vfm_vfu_ctx *ctx, struct vfm_error *err)
{
	for (uint32_t i = 0; i <= VFM_VFU_PCI_BAR5; i++) {
		const struct vfu_srv_region *reg = &ctx->regions[i];
		uint8_t *bar = ctx->cfg + CFG_BAR0 + 4 * i;
		uint8_t *wm = ctx->cfg_wmask + CFG_BAR0 + 4 * i;
		uint32_t type;

		if (!reg->declared)
			continue;
		if (reg->size < 16 || (reg->size & (reg->size - 1)))
			return vfm_error_set(err, -EINVAL, "%s: BAR%u size %#" PRIx64
					     " is not a power of two >= 16", ctx->id, i, reg->size);
		type = reg->fd >= 0 ? 0x8 : 0;   /* prefetchable when mappable */
		if (reg->size > 0x80000000ull) {
			if (i == VFM_VFU_PCI_BAR5 || ctx->regions[i + 1].declared)
				return vfm_error_set(err, -EINVAL, "%s: 64-bit BAR%u needs BAR%u free",
						     ctx->id, i, i + 1);
			type |= 0x4;
			put32(wm + 4, (uint32_t)(~(reg->size - 1) >> 32));
		}
		put32(bar, type);
		put32(wm, (uint32_t)~(reg->size - 1) & ~0xfu);
		if (type & 0x4)
			i++;
	}
	if (ctx->regions[VFM_VFU_PCI_ROM].declared) {
		uint64_t sz = ctx->regions[VFM_VFU_PCI_ROM].size;

		if (sz < 2048 || (sz & (sz - 1)) || sz > 0x80000000ull)
			return vfm_error_set(err, -EINVAL, "%s: ROM size %#" PRIx64 " invalid",
					     ctx->id, sz);
		put32(ctx->cfg_wmask + CFG_ROM, (uint32_t)~(sz - 1) | 1u);
	}
	ctx->cfg[CFG_INT_PIN] = ctx->irqs[VFM_VFU_IRQ_INTX].count ? 1 : 0;
	return 0;
}

static void cfg_write(struct vfm_vfu_ctx *ctx, uint64_t off, const uint8_t *src, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint8_t m = ctx->cfg_wmask[off + i];

		ctx->cfg[off + i] = (uint8_t)((ctx->cfg[off + i] & ~m) | (src[i] & m));
	}
}

/* ------------------------------------------------------------------------ */
/* Region access                                                             */

static bool is_cfg(const struct vfm_vfu_ctx *ctx, uint32_t index)
{
	return index == VFM_VFU_PCI_CONFIG && ctx->pci;
}

static uint64_t region_size(const struct vfm_vfu_ctx *ctx, uint32_t index)
{
	if (is_cfg(ctx, index))
		return VFU_SRV_PCI_CFG_SIZE;
	return ctx->regions[index].declared ? ctx->regions[index].size : 0;
}

static uint32_t region_flags(const struct vfm_vfu_ctx *ctx, uint32_t index)
{
	if (is_cfg(ctx, index))
		return VFM_VFU_REGION_READ | VFM_VFU_REGION_WRITE;
	return ctx->regions[index].declared ? ctx->regions[index].flags : 0;
}

/* Checks an access request against the region: index, permission, bounds. */
static int check_access(struct vfm_vfu_ctx *ctx, const struct vfu_msg *m, uint32_t index,
			uint64_t offset, uint64_t count, bool write, struct vfm_error *err)
{
	uint32_t need = write ? VFM_VFU_REGION_WRITE : VFM_VFU_REGION_READ;
	char what[32];

	if (index >= VFM_VFU_NUM_REGIONS || !region_size(ctx, index))
		return vfm_error_set(err, -EINVAL, "%s: no region %" PRIu32,
				     vfu_cmd_name(m->hdr.cmd), index);
	if (!(region_flags(ctx, index) & need))
		return vfm_error_set(err, -EINVAL, "%s: region %" PRIu32 " is not %s",
				     vfu_cmd_name(m->hdr.cmd), index, write ? "writable" : "readable");
	snprintf(what, sizeof(what), "region %" PRIu32, index);
	return vfu_check_range(m, offset, count, region_size(ctx, index), what, err);
}

static ssize_t fd_io(int fd, uint64_t off, void *buf, size_t count, bool write)
{
	size_t done = 0;

	while (done < count) {
		ssize_t n = write ? pwrite(fd, (char *)buf + done, count - done, (off_t)(off + done))
				  : pread(fd, (char *)buf + done, count - done, (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		done += (size_t)n;
	}
	return (ssize_t)count;
}

/* One checked access: config space, the device's ops, or its fd. */
static int region_access(struct vfm_vfu_ctx *ctx, uint32_t index, uint64_t offset,
			 void *buf, size_t count, bool write, struct vfm_error *err)
{
	const struct vfu_srv_region *reg = &ctx->regions[index];
	ssize_t n;

	if (is_cfg(ctx, index)) {
		if (write)
			cfg_write(ctx, offset, buf, count);
		else
			memcpy(buf, ctx->cfg + offset, count);
		return 0;
	}
	if (!count)
		return 0;
	if (reg->ops && (write ? reg->ops->write != NULL : reg->ops->read != NULL))
		n = write ? reg->ops->write(ctx, index, offset, buf, count)
			  : reg->ops->read(ctx, index, offset, buf, count);
	else if (reg->fd >= 0)
		n = fd_io(reg->fd, reg->fd_offset + offset, buf, count, write);
	else
		return vfm_error_set(err, -EINVAL, "region %" PRIu32 " cannot be %s", index,
				     write ? "written" : "read");
	if (n == (ssize_t)count)
		return 0;
	if (n >= 0)
		n = -EIO;
	return vfm_error_set(err, (int)n, "device %s of %zu bytes at %#" PRIx64 " in region %"
			     PRIu32 " failed: %s", write ? "write" : "read", count, offset, index,
			     vfm_strerror((int)n));
}

int vfu_srv_region_read(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_region_rw req;
	int ret;

	ret = vfu_check_payload_exact(m, sizeof(req), err);
	if (ret)
		return ret;
	memcpy(&req, m->payload, sizeof(req));
	ret = vfu_check_count(m, req.count, ctx->max_xfer, err);
	if (!ret && req.count > ctx->neg.peer_max_xfer)
		ret = vfm_error_set(err, -EINVAL, "REGION_READ of %" PRIu32 " bytes: above the client's "
				    "max_data_xfer_size %" PRIu32, req.count, ctx->neg.peer_max_xfer);
	ret = ret ?: check_access(ctx, m, req.region, req.offset, req.count, false, err);
	ret = ret ?: region_access(ctx, req.region, req.offset, r->buf + sizeof(req), req.count,
				   false, err);
	if (ret)
		return ret;
	memcpy(r->buf, &req, sizeof(req));
	r->len = sizeof(req) + req.count;
	return 0;
}

int vfu_srv_region_write(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			 struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_region_rw req;
	int ret;

	ret = vfu_check_payload(m, sizeof(req), err);
	if (ret)
		return ret;
	memcpy(&req, m->payload, sizeof(req));
	if (m->len - sizeof(req) != req.count)
		return vfm_error_set(err, -EINVAL, "REGION_WRITE: count %" PRIu32 " but %zu data bytes",
				     req.count, m->len - sizeof(req));
	ret = vfu_check_count(m, req.count, ctx->max_xfer, err);
	ret = ret ?: check_access(ctx, m, req.region, req.offset, req.count, true, err);
	ret = ret ?: region_access(ctx, req.region, req.offset,
				   (uint8_t *)m->payload + sizeof(req), req.count, true, err);
	if (ret)
		return ret;
	memcpy(r->buf, &req, sizeof(req));
	r->len = sizeof(req);
	return 0;
}

/*
 * Every write is checked before the first is done, so a bad batch changes
 * nothing. A device failure part-way answers with the number done (the
 * reply's wr_cnt), or an error when none was.
 */
int vfu_srv_region_write_multi(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			       struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_write_multi hdr;
	struct vfu_write_one w;
	uint64_t done = 0;
	int ret;

	if (!ctx->neg.write_multiple)
		return vfm_error_set(err, -EINVAL, "REGION_WRITE_MULTI without the write_multiple capability");
	ret = vfu_check_payload(m, sizeof(hdr), err);
	if (ret)
		return ret;
	memcpy(&hdr, m->payload, sizeof(hdr));
	if (!hdr.wr_cnt || hdr.wr_cnt > VFU_WRITE_MULTI_MAX ||
	    m->len != sizeof(hdr) + hdr.wr_cnt * sizeof(w))
		return vfm_error_set(err, -EINVAL, "REGION_WRITE_MULTI: wr_cnt %" PRIu64
				     " (1..%u) with %zu payload bytes", hdr.wr_cnt,
				     VFU_WRITE_MULTI_MAX, m->len);
	for (uint64_t i = 0; i < hdr.wr_cnt; i++) {
		memcpy(&w, (uint8_t *)m->payload + sizeof(hdr) + i * sizeof(w), sizeof(w));
		if (w.count < 1 || w.count > sizeof(w.data))
			return vfm_error_set(err, -EINVAL, "REGION_WRITE_MULTI: write %" PRIu64
					     " has count %" PRIu32, i, w.count);
		ret = check_access(ctx, m, w.region, w.offset, w.count, true, err);
		if (ret)
			return ret;
	}
	for (; done < hdr.wr_cnt; done++) {
		memcpy(&w, (uint8_t *)m->payload + sizeof(hdr) + done * sizeof(w), sizeof(w));
		ret = region_access(ctx, w.region, w.offset, w.data, w.count, true, err);
		if (ret && !done)
			return ret;
		if (ret)
			break;
	}
	memcpy(r->buf, &done, sizeof(done));
	r->len = sizeof(done);
	return 0;
}

int vfu_srv_get_region_info(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			    struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_region_info req, info;
	const struct vfu_srv_region *reg;
	struct vfu_cap_sparse_mmap cap;
	size_t cap_len = 0, need;
	int ret;

	ret = vfu_take_request(m, &req, sizeof(req), sizeof(info), UINT32_MAX, err);
	if (ret)
		return ret;
	if (req.index >= VFM_VFU_NUM_REGIONS)
		return vfm_error_set(err, -EINVAL, "REGION_INFO: no region %" PRIu32 " (of %u)",
				     req.index, VFM_VFU_NUM_REGIONS);
	reg = &ctx->regions[req.index];
	info = (struct vfu_region_info){
		.index = req.index,
		.size = region_size(ctx, req.index),
		.flags = region_flags(ctx, req.index) & (VFU_REGION_F_READ | VFU_REGION_F_WRITE),
	};
	if (!is_cfg(ctx, req.index) && reg->fd >= 0) {
		info.flags |= VFU_REGION_F_MMAP;
		info.offset = reg->fd_offset;
		if (reg->nr_areas)
			cap_len = sizeof(cap) + reg->nr_areas * sizeof(struct vfu_sparse_area);
	}
	need = sizeof(info) + cap_len;
	info.argsz = (uint32_t)need;
	if (cap_len)
		info.flags |= VFU_REGION_F_CAPS;
	/* Too small for the capabilities: the needed size comes back alone. */
	if (req.argsz < need) {
		memcpy(r->buf, &info, sizeof(info));
		r->len = sizeof(info);
		return 0;
	}
	if (cap_len) {
		info.cap_offset = sizeof(info);
		cap = (struct vfu_cap_sparse_mmap){
			.hdr = { .id = VFU_REGION_CAP_SPARSE_MMAP, .version = 1, .next = 0 },
			.nr_areas = reg->nr_areas,
		};
		memcpy(r->buf + sizeof(info), &cap, sizeof(cap));
		for (uint32_t i = 0; i < reg->nr_areas; i++) {
			struct vfu_sparse_area a = { reg->areas[i].offset, reg->areas[i].size };

			memcpy(r->buf + sizeof(info) + sizeof(cap) + i * sizeof(a), &a, sizeof(a));
		}
	}
	memcpy(r->buf, &info, sizeof(info));
	r->len = need;
	if (info.flags & VFU_REGION_F_MMAP)
		r->fds[r->nfds++] = reg->fd;
	return 0;
}

/* No ioeventfd/ioregionfd sub-regions: a valid region answers with none. */
int vfu_srv_get_region_io_fds(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			      struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_region_io_fds req, rep;
	int ret;

	ret = vfu_take_request(m, &req, sizeof(req), sizeof(rep), UINT32_MAX, err);
	if (ret)
		return ret;
	if (req.flags || req.count)
		return vfm_error_set(err, -EINVAL, "REGION_IO_FDS: flags %#" PRIx32 " count %" PRIu32
				     " must be 0", req.flags, req.count);
	if (req.index >= VFM_VFU_NUM_REGIONS || !region_size(ctx, req.index))
		return vfm_error_set(err, -EINVAL, "REGION_IO_FDS: no region %" PRIu32, req.index);
	rep = (struct vfu_region_io_fds){ .argsz = sizeof(rep), .index = req.index };
	memcpy(r->buf, &rep, sizeof(rep));
	r->len = sizeof(rep);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Interrupts                                                                */

int vfu_srv_get_irq_info(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			 struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_irq_info req, rep;
	int ret;

	ret = vfu_take_request(m, &req, sizeof(req), sizeof(rep), UINT32_MAX, err);
	if (ret)
		return ret;
	if (req.index >= VFM_VFU_NUM_IRQS)
		return vfm_error_set(err, -EINVAL, "IRQ_INFO: no IRQ index %" PRIu32, req.index);
	rep = (struct vfu_irq_info){
		.argsz = sizeof(rep), .index = req.index, .count = ctx->irqs[req.index].count,
		.flags = ctx->irqs[req.index].count ? VFU_IRQ_INFO_F_EVENTFD | VFU_IRQ_INFO_F_MASKABLE : 0,
	};
	memcpy(r->buf, &rep, sizeof(rep));
	r->len = sizeof(rep);
	return 0;
}

/* Caller holds irq_lock. */
static void irq_signal(struct vfm_vfu_ctx *ctx, struct vfu_srv_irq *irq, uint32_t i)
{
	uint64_t one = 1;

	if (irq->masked[i]) {
		irq->pending[i] = 1;
		return;
	}
	irq->pending[i] = 0;
	if (irq->efd[i] >= 0 && write(irq->efd[i], &one, sizeof(one)) != sizeof(one))
		vfm_debug(ctx->id, "eventfd write: %s", strerror(errno));
}

int vfm_vfu_irq_trigger(struct vfm_vfu_ctx *ctx, uint32_t index, uint32_t subindex)
{
	struct vfu_srv_irq *irq;
	int r = 0;

	if (index >= VFM_VFU_NUM_IRQS || subindex >= ctx->irqs[index].count)
		return -EINVAL;
	irq = &ctx->irqs[index];
	pthread_mutex_lock(&ctx->irq_lock);
	if (irq->efd[subindex] < 0)
		r = -ENOENT;
	else
		irq_signal(ctx, irq, subindex);
	pthread_mutex_unlock(&ctx->irq_lock);
	return r;
}

/*
 * Eventfds only: writing 8 bytes to anything else could block or mean
 * nothing. Without /proc there is no way to tell, and the fd is trusted.
 */
static bool is_eventfd(int fd)
{
	char path[64], target[64];
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, target, sizeof(target) - 1);
	if (n < 0)
		return errno == ENOENT && access("/proc/self/fd", F_OK) != 0;
	target[n] = '\0';
	return strcmp(target, "anon_inode:[eventfd]") == 0;
}

static void irq_close_range(struct vfu_srv_irq *irq, uint32_t start, uint32_t count)
{
	for (uint32_t i = start; i < start + count; i++) {
		if (irq->efd[i] >= 0)
			close(irq->efd[i]);
		irq->efd[i] = -1;
		irq->masked[i] = irq->pending[i] = 0;
	}
}

void vfu_srv_irqs_release(struct vfm_vfu_ctx *ctx)
{
	pthread_mutex_lock(&ctx->irq_lock);
	for (unsigned i = 0; i < VFM_VFU_NUM_IRQS; i++)
		if (ctx->irqs[i].count)
			irq_close_range(&ctx->irqs[i], 0, ctx->irqs[i].count);
	pthread_mutex_unlock(&ctx->irq_lock);
}

static int set_irq_eventfds(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
			    const struct vfu_irq_set *s, struct vfm_error *err)
{
	struct vfu_srv_irq *irq = &ctx->irqs[s->index];

	for (size_t i = 0; i < m->nfds; i++)
		if (!is_eventfd(m->fds[i]))
			return vfm_error_set(err, -EINVAL, "SET_IRQS: fd %zu is not an eventfd", i);
	pthread_mutex_lock(&ctx->irq_lock);
	if (!m->nfds) {
		irq_close_range(irq, s->start, s->count);
	} else {
		for (uint32_t i = 0; i < s->count; i++) {
			int old = irq->efd[s->start + i];

			irq->efd[s->start + i] = vfu_msg_take_fd(m, i);
			if (old >= 0)
				close(old);
		}
	}
	pthread_mutex_unlock(&ctx->irq_lock);
	return 0;
}

int vfu_srv_set_irqs(struct vfm_vfu_ctx *ctx, struct vfu_msg *m,
		     struct vfu_srv_reply *r, struct vfm_error *err)
{
	struct vfu_irq_set s;
	struct vfu_srv_irq *irq;
	uint32_t data, action;
	const uint8_t *bools;
	int ret;

	ret = vfu_check_irq_set(m, ctx->max_fds, &s, err);
	if (ret)
		return ret;
	if (s.index >= VFM_VFU_NUM_IRQS)
		return vfm_error_set(err, -EINVAL, "SET_IRQS: no IRQ index %" PRIu32, s.index);
	irq = &ctx->irqs[s.index];
	data = s.flags & VFU_IRQ_SET_DATA_TYPE_MASK;
	action = s.flags & VFU_IRQ_SET_ACTION_TYPE_MASK;
	if (s.count == 0) {
		/* DATA_NONE (checked): start = count = 0 disables the whole index. */
		if (action == VFU_IRQ_SET_ACTION_TRIGGER && s.start == 0 && irq->count) {
			pthread_mutex_lock(&ctx->irq_lock);
			irq_close_range(irq, 0, irq->count);
			pthread_mutex_unlock(&ctx->irq_lock);
		}
		return 0;
	}
	if (!vfu_range_ok(s.start, s.count, irq->count))
		return vfm_error_set(err, -EINVAL, "SET_IRQS: IRQs %" PRIu32 "..+%" PRIu32
				     " outside index %" PRIu32 " (%" PRIu32 ")", s.start, s.count,
				     s.index, irq->count);
	if (data == VFU_IRQ_SET_DATA_EVENTFD) {
		if (action != VFU_IRQ_SET_ACTION_TRIGGER)
			return vfm_error_set(err, -ENOTSUP,
					     "SET_IRQS: eventfds for MASK/UNMASK are not supported");
		return set_irq_eventfds(ctx, m, &s, err);
	}
	bools = data == VFU_IRQ_SET_DATA_BOOL ? (const uint8_t *)m->payload + sizeof(s) : NULL;
	pthread_mutex_lock(&ctx->irq_lock);
	for (uint32_t i = 0; i < s.count; i++) {
		uint32_t n = s.start + i;

		if (bools && !bools[i])
			continue;
		if (action == VFU_IRQ_SET_ACTION_TRIGGER) {
			irq_signal(ctx, irq, n);
		} else if (action == VFU_IRQ_SET_ACTION_MASK) {
			irq->masked[n] = 1;
		} else {
			irq->masked[n] = 0;
			if (irq->pending[n])
				irq_signal(ctx, irq, n);
		}
	}
	pthread_mutex_unlock(&ctx->irq_lock);
	return 0;
}
