/*
 * Device regions and interrupts over vfio-user: region info with its
 * capability list (sparse mmap areas), mmap() of what the server shares,
 * REGION_READ/WRITE in max_data_xfer_size pieces for the rest, and
 * GET_IRQ_INFO / SET_IRQS with eventfds.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "util/logging.h"
#include "vfio-user/client.h"

/* Sparse areas per region we are willing to map (QEMU's limit is similar). */
#define CLI_MAX_AREAS 32u

static int bad_reply(struct vfu_client *c, const char *what, struct vfm_error *err,
		     const char *fmt, ...) VFM_PRINTF(4, 5);
static int bad_reply(struct vfu_client *c, const char *what, struct vfm_error *err,
		     const char *fmt, ...)
{
	char detail[128];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	return vfm_error_set(err, VFM_EPROTOCOL, "%s: vfio-user server at %s: bad %s reply: %s",
			     c->id, c->name, what, detail);
}

/* ---- Region info ---- */

/* Walks the capability list for a sparse mmap capability; 0 when absent. */
static int find_sparse(struct vfu_client *c, const struct vfu_msg *m, uint32_t cap_offset,
		       struct vfu_sparse_area *areas, unsigned *nareas, bool *found,
		       struct vfm_error *err)
{
	uint32_t off = cap_offset;

	*found = false;
	for (unsigned n = 0; off; n++) {
		struct vfu_cap_sparse_mmap sp;
		struct vfu_cap_hdr h;

		if (n >= VFU_MAX_REGION_CAPS)
			return bad_reply(c, "REGION_INFO", err, "more than %u capabilities",
					 VFU_MAX_REGION_CAPS);
		if (!vfu_range_ok(off, sizeof(h), m->len))
			return bad_reply(c, "REGION_INFO", err, "capability at %" PRIu32
					 " outside %zu bytes", off, m->len);
		memcpy(&h, (const char *)m->payload + off, sizeof(h));
		if (h.id == VFU_REGION_CAP_SPARSE_MMAP && !*found) {
			uint64_t room;

			if (!vfu_range_ok(off, sizeof(sp), m->len))
				return bad_reply(c, "REGION_INFO", err, "sparse capability at %" PRIu32
						 " outside %zu bytes", off, m->len);
			memcpy(&sp, (const char *)m->payload + off, sizeof(sp));
			room = (m->len - off - sizeof(sp)) / sizeof(struct vfu_sparse_area);
			if (sp.nr_areas > room)
				return bad_reply(c, "REGION_INFO", err, "%" PRIu32 " sparse areas, room for %"
						 PRIu64, sp.nr_areas, room);
			*nareas = sp.nr_areas < CLI_MAX_AREAS ? sp.nr_areas : CLI_MAX_AREAS;
			memcpy(areas, (const char *)m->payload + off + sizeof(sp),
			       *nareas * sizeof(*areas));
			*found = true;
		}
		off = h.next;
	}
	return 0;
}

/* Maps what the server lets us map; a failure only costs speed. */
static void map_areas(struct vfu_client *c, struct cli_region *rg, int fd,
		      const struct vfu_sparse_area *areas, unsigned nareas)
{
	int prot = (rg->wire_flags & VFU_REGION_F_READ ? PROT_READ : 0) |
		   (rg->wire_flags & VFU_REGION_F_WRITE ? PROT_WRITE : 0);
	long pg = sysconf(_SC_PAGESIZE);

	rg->areas = calloc(nareas, sizeof(*rg->areas));
	if (!rg->areas)
		return;
	for (unsigned i = 0; i < nareas; i++) {
		const struct vfu_sparse_area *a = &areas[i];
		uint64_t file_off = rg->mmap_offset + a->offset;
		void *p;

		if (!a->size || !vfu_range_ok(a->offset, a->size, rg->info.size) ||
		    file_off < rg->mmap_offset || (file_off % (uint64_t)pg) || !prot) {
			vfm_warn(c->id, "region %u: not mapping area %#" PRIx64 "+%#" PRIx64,
				 rg->info.index, a->offset, a->size);
			continue;
		}
		p = mmap(NULL, a->size, prot, MAP_SHARED, fd, (off_t)file_off);
		if (p == MAP_FAILED) {
			vfm_warn(c->id, "region %u: mmap of %#" PRIx64 "+%#" PRIx64 ": %s",
				 rg->info.index, a->offset, a->size, strerror(errno));
			continue;
		}
		rg->areas[rg->nareas++] = (struct cli_area){ a->offset, a->size, p };
	}
	/* Sorted by offset, as vfm_device_region_areas() promises (few: insertion). */
	for (unsigned i = 1; i < rg->nareas; i++) {
		struct cli_area t = rg->areas[i];
		unsigned j = i;

		for (; j && rg->areas[j - 1].offset > t.offset; j--)
			rg->areas[j] = rg->areas[j - 1];
		rg->areas[j] = t;
	}
	if (rg->nareas)
		rg->info.flags |= VFM_REGION_MMAP;
}

/* One GET_REGION_INFO, asked again with the argsz the server says it needs. */
static int fetch_region(struct vfu_client *c, uint32_t index, struct cli_region *rg,
			struct vfm_error *err)
{
	struct vfu_sparse_area areas[CLI_MAX_AREAS];
	struct vfu_msg reply = VFU_MSG_INIT;
	uint32_t argsz = CLI_REGION_INFO_ARGSZ;
	struct vfu_region_info info;
	unsigned nareas = 0;
	bool sparse = false;
	int r, fd;

	for (int attempt = 0;; attempt++) {
		struct vfu_region_info req = { .argsz = argsz, .index = index };

		r = vfu_cli_simple(c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, sizeof(req), &reply, err);
		if (r)
			return r;
		if (reply.len < sizeof(info)) {
			r = bad_reply(c, "REGION_INFO", err, "%zu bytes, need %zu",
				      reply.len, sizeof(info));
			goto out;
		}
		memcpy(&info, reply.payload, sizeof(info));
		if (info.argsz <= argsz)
			break;
		/* Too small: the capabilities were left out. Once more, bigger. */
		if (attempt || info.argsz > c->max_msg_size - sizeof(struct vfu_hdr)) {
			r = bad_reply(c, "REGION_INFO", err, "wants argsz %" PRIu32 " after %" PRIu32,
				      info.argsz, argsz);
			goto out;
		}
		vfm_debug(c->id, "region %u: info needs %" PRIu32 " bytes", index, info.argsz);
		argsz = info.argsz;
		vfu_msg_release(&reply);
	}
	if (info.index != index) {
		r = bad_reply(c, "REGION_INFO", err, "index %" PRIu32 " for %" PRIu32, info.index,
			      index);
		goto out;
	}
	if ((info.flags & VFU_REGION_F_CAPS) && info.cap_offset) {
		r = find_sparse(c, &reply, info.cap_offset, areas, &nareas, &sparse, err);
		if (r)
			goto out;
	}
	rg->info = (struct vfm_region_info){
		.index = index,
		.flags = (info.flags & VFU_REGION_F_READ ? VFM_REGION_READ : 0) |
			 (info.flags & VFU_REGION_F_WRITE ? VFM_REGION_WRITE : 0),
		.size = info.size,
	};
	rg->wire_flags = info.flags;
	rg->mmap_offset = info.offset;
	fd = (info.flags & VFU_REGION_F_MMAP) ? vfu_msg_take_fd(&reply, 0) : -1;
	if (fd >= 0) {
		if (!sparse) {
			areas[0] = (struct vfu_sparse_area){ 0, info.size };
			nareas = 1;
		}
		map_areas(c, rg, fd, areas, nareas);
		close(fd);
	} else if (info.flags & VFU_REGION_F_MMAP) {
		vfm_warn(c->id, "region %u: mmap-able but no fd came with it", index);
	}
	vfm_debug(c->id, "region %u: size %#" PRIx64 " flags %#" PRIx32 ", %u area(s) mapped",
		  index, info.size, info.flags, rg->nareas);
	r = 0;
out:
	vfu_msg_release(&reply);
	return r;
}

int vfu_cli_load_regions(struct vfu_client *c, struct vfm_error *err)
{
	c->regions = calloc(c->info.num_regions ? c->info.num_regions : 1, sizeof(*c->regions));
	if (!c->regions)
		return vfm_error_set(err, -ENOMEM, "%s: no memory for regions", c->id);
	for (uint32_t i = 0; i < c->info.num_regions; i++) {
		struct vfm_error e = { 0 };
		int r = fetch_region(c, i, &c->regions[i], &e);

		c->regions[i].info.index = i;
		if (r && (c->dead || r == VFM_EPROTOCOL || r == -ENOMEM))
			return vfm_error_set(err, r, "%s", e.msg);
		/* A region the server will not describe is one we cannot use. */
		if (r)
			vfm_debug(c->id, "region %u: %s", i, e.msg);
	}
	return 0;
}

void vfu_cli_region_cleanup(struct vfu_client *c)
{
	if (!c->regions)
		return;
	for (uint32_t i = 0; i < c->info.num_regions; i++) {
		struct cli_region *rg = &c->regions[i];

		for (unsigned a = 0; a < rg->nareas; a++)
			munmap(rg->areas[a].ptr, rg->areas[a].size);
		free(rg->areas);
	}
	free(c->regions);
	c->regions = NULL;
}

int vfu_cli_get_info(struct vfm_device *dev, struct vfm_device_info *info,
		     struct vfm_error *err)
{
	*info = cli_of(dev)->info;
	return 0;
}

int vfu_cli_region_info(struct vfm_device *dev, uint32_t index,
			struct vfm_region_info *info, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);

	if (index >= c->info.num_regions)
		return vfm_error_set(err, -EINVAL, "%s: no region %u (%u regions)", c->id, index,
				     c->info.num_regions);
	*info = c->regions[index].info;
	return 0;
}

/* The table never changes after open: no lock, as for the I/O fast path. */
int vfu_cli_region_areas(struct vfm_device *dev, uint32_t index, struct vfm_region_area *areas,
			 unsigned max, unsigned *count, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	const struct cli_region *rg;

	if (index >= c->info.num_regions)
		return vfm_error_set(err, -EINVAL, "%s: no region %u (%u regions)", c->id, index,
				     c->info.num_regions);
	rg = &c->regions[index];
	for (unsigned i = 0; i < rg->nareas && i < max; i++)
		areas[i] = (struct vfm_region_area){ rg->areas[i].offset, rg->areas[i].size,
						     rg->areas[i].ptr };
	*count = rg->nareas;
	return 0;
}

/* ---- Region I/O ---- */

/* The mapped area holding all of [off, off + len), or NULL. */
static const struct cli_area *find_area(const struct cli_region *rg, uint64_t off, size_t len)
{
	for (unsigned i = 0; i < rg->nareas; i++)
		if (off >= rg->areas[i].offset &&
		    vfu_range_ok(off - rg->areas[i].offset, len, rg->areas[i].size))
			return &rg->areas[i];
	return NULL;
}

/* Device memory: naturally aligned 1/2/4/8-byte accesses stay single accesses. */
static void mmio_copy(void *dst, const void *src, size_t len, bool to_device)
{
	const void *dev = to_device ? dst : src;

	if (((uintptr_t)dev & (len - 1)) == 0 && (len == 1 || len == 2 || len == 4 || len == 8)) {
		switch (len) {
		case 1: *(volatile uint8_t *)dst = *(const volatile uint8_t *)src; return;
		case 2: *(volatile uint16_t *)dst = *(const volatile uint16_t *)src; return;
		case 4: *(volatile uint32_t *)dst = *(const volatile uint32_t *)src; return;
		case 8: *(volatile uint64_t *)dst = *(const volatile uint64_t *)src; return;
		}
	}
	memcpy(dst, src, len);
}

static int region_check(struct vfu_client *c, uint32_t index, uint64_t offset, size_t len,
			const struct cli_region **out, struct vfm_error *err)
{
	if (index >= c->info.num_regions)
		return vfm_error_set(err, -EINVAL, "%s: no region %u", c->id, index);
	if (!vfu_range_ok(offset, len, c->regions[index].info.size))
		return vfm_error_set(err, -EINVAL, "%s: %zu bytes at %#" PRIx64
				     " are outside region %u (%#" PRIx64 " bytes)", c->id, len,
				     offset, index, c->regions[index].info.size);
	*out = &c->regions[index];
	return 0;
}

ssize_t vfu_cli_region_read(struct vfm_device *dev, uint32_t index, uint64_t offset,
			    void *buf, size_t len, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	const struct cli_region *rg;
	const struct cli_area *a;
	size_t done = 0;
	int r;

	r = region_check(c, index, offset, len, &rg, err);
	if (r)
		return r;
	a = find_area(rg, offset, len);
	if (a && len) {
		mmio_copy(buf, (const char *)a->ptr + (offset - a->offset), len, false);
		return (ssize_t)len;
	}
	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	while (done < len) {
		uint32_t chunk = (uint32_t)(len - done < c->neg.max_xfer ? len - done : c->neg.max_xfer);
		struct vfu_region_rw req = { .offset = offset + done, .region = index, .count = chunk };
		struct vfu_msg reply = VFU_MSG_INIT;
		struct vfu_region_rw rep;

		r = vfu_cli_simple(c, VFU_CMD_REGION_READ, &req, sizeof(req), &reply, err);
		if (r)
			break;
		if (reply.len < sizeof(rep)) {
			r = bad_reply(c, "REGION_READ", err, "%zu bytes, need %zu",
				      reply.len, sizeof(rep));
		} else {
			memcpy(&rep, reply.payload, sizeof(rep));
			if (rep.count > chunk || reply.len - sizeof(rep) != rep.count)
				r = bad_reply(c, "REGION_READ", err, "count %" PRIu32 " with %zu"
					      " data bytes", rep.count, reply.len - sizeof(rep));
			else
				memcpy((char *)buf + done, (const char *)reply.payload + sizeof(rep),
				       rep.count);
		}
		vfu_msg_release(&reply);
		if (r)
			break;
		done += rep.count;
		if (rep.count < chunk)
			break;  /* short: the device layer reports it */
	}
	vfu_cli_unlock(c);
	return r ? r : (ssize_t)done;
}

ssize_t vfu_cli_region_write(struct vfm_device *dev, uint32_t index, uint64_t offset,
			     const void *buf, size_t len, struct vfm_error *err)
{
	struct vfu_client *c = cli_of(dev);
	const struct cli_region *rg;
	const struct cli_area *a;
	size_t done = 0;
	int r;

	r = region_check(c, index, offset, len, &rg, err);
	if (r)
		return r;
	a = find_area(rg, offset, len);
	if (a && len) {
		mmio_copy((char *)a->ptr + (offset - a->offset), buf, len, true);
		return (ssize_t)len;
	}
	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	while (done < len) {
		uint32_t max = c->neg.max_xfer < CLI_MAX_SEND_DATA ? c->neg.max_xfer : CLI_MAX_SEND_DATA;
		uint32_t chunk = (uint32_t)(len - done < max ? len - done : max);
		struct vfu_region_rw req = { .offset = offset + done, .region = index, .count = chunk };
		struct iovec iov[2] = { { &req, sizeof(req) }, { (char *)buf + done, chunk } };
		struct vfu_msg reply = VFU_MSG_INIT;
		struct vfu_region_rw rep;

		r = vfu_cli_request(c, VFU_CMD_REGION_WRITE, iov, 2, NULL, 0, &reply, err);
		if (r)
			break;
		if (reply.len < sizeof(rep)) {
			r = bad_reply(c, "REGION_WRITE", err, "%zu bytes, need %zu",
				      reply.len, sizeof(rep));
		} else {
			memcpy(&rep, reply.payload, sizeof(rep));
			if (rep.count > chunk)
				r = bad_reply(c, "REGION_WRITE", err, "count %" PRIu32 " for %" PRIu32,
					      rep.count, chunk);
		}
		vfu_msg_release(&reply);
		if (r)
			break;
		done += rep.count;
		if (rep.count < chunk)
			break;
	}
	vfu_cli_unlock(c);
	return r ? r : (ssize_t)done;
}

/* ---- Interrupts ---- */

int vfm_vfio_user_irq_info(struct vfm_device *dev, uint32_t index, struct vfm_irq_info *info,
			   struct vfm_error *err)
{
	struct vfu_irq_info req = { .argsz = sizeof(req), .index = index }, rep;
	struct vfu_msg reply = VFU_MSG_INIT;
	struct vfu_client *c;
	int r;

	if (!vfm_device_is_vfio_user(dev))
		return vfm_error_set(err, -EINVAL, "not a vfio-user device");
	c = cli_of(dev);
	if (index >= c->info.num_irqs)
		return vfm_error_set(err, -EINVAL, "%s: no IRQ index %u (%u)", c->id, index,
				     c->info.num_irqs);
	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	r = vfu_cli_simple(c, VFU_CMD_DEVICE_GET_IRQ_INFO, &req, sizeof(req), &reply, err);
	if (!r && reply.len < sizeof(rep))
		r = bad_reply(c, "GET_IRQ_INFO", err, "%zu bytes, need %zu",
			      reply.len, sizeof(rep));
	if (!r) {
		memcpy(&rep, reply.payload, sizeof(rep));
		if (rep.index != index)
			r = bad_reply(c, "GET_IRQ_INFO", err, "index %" PRIu32 " for %" PRIu32,
				      rep.index, index);
		else
			*info = (struct vfm_irq_info){ index, rep.flags, rep.count };
	}
	vfu_msg_release(&reply);
	vfu_cli_unlock(c);
	return r;
}

static bool one_bit(uint32_t v)
{
	return v && !(v & (v - 1));
}

static int set_irqs_one(struct vfu_client *c, const struct vfu_irq_set *s, const void *data,
			size_t data_len, const int *fds, size_t nfds, struct vfm_error *err)
{
	struct iovec iov[2] = { { (void *)s, sizeof(*s) }, { (void *)data, data_len } };
	struct vfu_msg reply = VFU_MSG_INIT;
	int r;

	r = vfu_cli_request(c, VFU_CMD_DEVICE_SET_IRQS, iov, 2, fds, nfds, &reply, err);
	vfu_msg_release(&reply);
	return r;
}

int vfm_vfio_user_set_irqs(struct vfm_device *dev, uint32_t index, uint32_t flags,
			   uint32_t start, uint32_t count, const void *data,
			   struct vfm_error *err)
{
	const uint32_t known = VFU_IRQ_SET_DATA_TYPE_MASK | VFU_IRQ_SET_ACTION_TYPE_MASK;
	uint32_t dtype = flags & VFU_IRQ_SET_DATA_TYPE_MASK;
	struct vfu_irq_set s = { .argsz = sizeof(s), .flags = flags, .index = index,
				 .start = start, .count = count };
	struct vfu_client *c;
	int r;

	if (!vfm_device_is_vfio_user(dev))
		return vfm_error_set(err, -EINVAL, "not a vfio-user device");
	c = cli_of(dev);
	if ((flags & ~known) || !one_bit(dtype) || !one_bit(flags & VFU_IRQ_SET_ACTION_TYPE_MASK) ||
	    (count == 0 && dtype != VFU_IRQ_SET_DATA_NONE) ||
	    (dtype == VFU_IRQ_SET_DATA_BOOL && (!data || count > c->neg.max_xfer)) ||
	    (uint64_t)start + count > UINT32_MAX)
		return vfm_error_set(err, -EINVAL, "%s: SET_IRQS flags %#x start %u count %u",
				     c->id, flags, start, count);
	r = vfu_cli_lock(c, err);
	if (r)
		return r;
	if (dtype == VFU_IRQ_SET_DATA_BOOL) {
		s.argsz += count;
		r = set_irqs_one(c, &s, data, count, NULL, 0, err);
	} else if (dtype == VFU_IRQ_SET_DATA_NONE || !data) {
		r = set_irqs_one(c, &s, NULL, 0, NULL, 0, err);
	} else if (c->neg.peer_max_fds == 0) {
		r = vfm_error_set(err, -ENOTSUP, "%s: the server takes no fds", c->id);
	} else {
		/* As many messages as the server's max_msg_fds needs. */
		const int *fds = data;
		uint32_t per = c->neg.peer_max_fds;

		for (uint32_t done = 0; done < count && !r; done += s.count) {
			s.start = start + done;
			s.count = count - done < per ? count - done : per;
			r = set_irqs_one(c, &s, NULL, 0, fds + done, s.count, err);
		}
	}
	vfu_cli_unlock(c);
	if (r)
		return vfm_error_set(err, r, "%s: SET_IRQS index %u", c->id, index);
	return 0;
}
