/*
 * Guest memory: regions backed by memfd (so device servers can map them for
 * DMA), IOVA = guest physical address, and one dirty bitmap per region that
 * every dirty source feeds and the RAM saver drains.
 */
#ifndef VFIOMIG_MEMORY_H
#define VFIOMIG_MEMORY_H

#include "vfiomig/common.h"

#ifdef __cplusplus
extern "C" {
#endif

struct vfm_guest_mem;

struct vfm_mem_region {
	uint64_t gpa;        /* guest physical = IOVA */
	uint64_t size;
	int fd;              /* memfd; owned by the guest memory object */
	uint64_t fd_offset;
	void *host;          /* MAP_SHARED mapping in this process */
	uint64_t *dirty;     /* atomic bitmap, one bit per page */
	uint64_t npages;
};

#define VFM_MEM_MAX_REGIONS 16

/* page_size: 4096 or a larger power of two (dirty tracking granularity). */
VFM_EXPORT int vfm_guest_mem_new(uint64_t page_size, struct vfm_guest_mem **out,
				 struct vfm_error *err);
VFM_EXPORT void vfm_guest_mem_free(struct vfm_guest_mem *mem);

/*
 * Adds [gpa, gpa+size), page-aligned, not overlapping another region: a new
 * memfd of that size, mapped shared. Pages start dirty (nothing sent yet).
 */
VFM_EXPORT int vfm_guest_mem_add(struct vfm_guest_mem *mem, uint64_t gpa, uint64_t size,
				 const char *name, struct vfm_error *err);

/*
 * Allocates every page of every region now (fallocate on the memfds), so a
 * later write cannot fail for lack of memory (which would be SIGBUS) and
 * costs no page allocation. The incoming side calls it before it listens:
 * allocating on first write was half the CPU time of loading RAM.
 */
VFM_EXPORT int vfm_guest_mem_prealloc(struct vfm_guest_mem *mem, struct vfm_error *err);

VFM_EXPORT uint64_t vfm_guest_mem_page_size(const struct vfm_guest_mem *mem);
VFM_EXPORT unsigned vfm_guest_mem_num_regions(const struct vfm_guest_mem *mem);
VFM_EXPORT const struct vfm_mem_region *vfm_guest_mem_region(const struct vfm_guest_mem *mem,
							     unsigned idx);
VFM_EXPORT uint64_t vfm_guest_mem_total(const struct vfm_guest_mem *mem);

/* Host pointer for [gpa, gpa+len) when it lies inside one region, else NULL. */
VFM_EXPORT void *vfm_guest_mem_ptr(struct vfm_guest_mem *mem, uint64_t gpa, uint64_t len);

/*
 * Dirty tracking. Marking is safe from any thread at any time (atomic OR);
 * ranges outside guest memory are ignored (returns -ERANGE for the caller
 * that wants to know).
 */
VFM_EXPORT int vfm_dirty_mark(struct vfm_guest_mem *mem, uint64_t gpa, uint64_t len);
VFM_EXPORT void vfm_dirty_mark_all(struct vfm_guest_mem *mem);
/*
 * Merges a bitmap at granularity page_size (power of two, any multiple or
 * fraction of the memory page size) covering [iova, iova+length): the
 * shape of a DMA logging report.
 */
VFM_EXPORT int vfm_dirty_merge(struct vfm_guest_mem *mem, uint64_t iova, uint64_t length,
			       uint64_t page_size, const uint64_t *bitmap,
			       struct vfm_error *err);
/* Pages dirty now (approximate while writers run). */
VFM_EXPORT uint64_t vfm_dirty_count(const struct vfm_guest_mem *mem);
/*
 * Read-and-clear region idx's bitmap, OR-ing it into out (npages bits);
 * returns the number of pages collected.
 */
VFM_EXPORT uint64_t vfm_dirty_collect(struct vfm_guest_mem *mem, unsigned idx, uint64_t *out);

#ifdef __cplusplus
}
#endif
#endif
