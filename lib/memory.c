/* Guest memory regions on memfd, and their dirty bitmaps. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "util/bitmap.h"
#include "util/logging.h"
#include "memory_access.h"
#include "vfiomig/memory.h"

struct vfm_guest_mem {
	/* Regions are only added before the guest runs; afterwards read-only. */
	uint64_t page_size;
	unsigned page_shift;
	unsigned nregions;
	struct vfm_mem_region regions[VFM_MEM_MAX_REGIONS];
};

int vfm_guest_mem_new(uint64_t page_size, struct vfm_guest_mem **out, struct vfm_error *err)
{
	struct vfm_guest_mem *mem;

	if (page_size < 4096 || (page_size & (page_size - 1)))
		return vfm_error_set(err, -EINVAL, "page size %" PRIu64 " is not a power of two >= 4096",
				     page_size);
	mem = calloc(1, sizeof(*mem));
	if (!mem)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	mem->page_size = page_size;
	mem->page_shift = (unsigned)__builtin_ctzll(page_size);
	*out = mem;
	return 0;
}

void vfm_guest_mem_free(struct vfm_guest_mem *mem)
{
	if (!mem)
		return;
	for (unsigned i = 0; i < mem->nregions; i++) {
		struct vfm_mem_region *r = &mem->regions[i];
		munmap(r->host, r->size);
		close(r->fd);
		free(r->dirty);
	}
	free(mem);
}

int vfm_guest_mem_add(struct vfm_guest_mem *mem, uint64_t gpa, uint64_t size,
		      const char *name, struct vfm_error *err)
{
	struct vfm_mem_region *r;
	void *host;
	int fd;

	if (mem->nregions >= VFM_MEM_MAX_REGIONS)
		return vfm_error_set(err, -ENOSPC, "too many memory regions (max %d)",
				     VFM_MEM_MAX_REGIONS);
	if (!size || (gpa | size) & (mem->page_size - 1) || gpa + size < gpa)
		return vfm_error_set(err, -EINVAL, "memory region 0x%" PRIx64 "+0x%" PRIx64
				     " is empty, unaligned or wraps", gpa, size);
	for (unsigned i = 0; i < mem->nregions; i++) {
		const struct vfm_mem_region *o = &mem->regions[i];
		if (gpa < o->gpa + o->size && o->gpa < gpa + size)
			return vfm_error_set(err, -EEXIST, "memory region 0x%" PRIx64
					     " overlaps 0x%" PRIx64, gpa, o->gpa);
	}
	fd = memfd_create(name && *name ? name : "vfiomig-guest", MFD_CLOEXEC);
	if (fd < 0)
		return vfm_error_set(err, -errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(fd, (off_t)size) < 0) {
		int e = errno;
		close(fd);
		return vfm_error_set(err, -e, "sizing guest memory to %" PRIu64 " bytes: %s",
				     size, strerror(e));
	}
	host = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (host == MAP_FAILED) {
		int e = errno;
		close(fd);
		return vfm_error_set(err, -e, "mapping guest memory: %s", strerror(e));
	}
	r = &mem->regions[mem->nregions];
	r->npages = size >> mem->page_shift;
	r->dirty = calloc(VFM_BITMAP_WORDS(r->npages), sizeof(uint64_t));
	if (!r->dirty) {
		munmap(host, size);
		close(fd);
		return vfm_error_set(err, -ENOMEM, "out of memory for the dirty bitmap");
	}
	r->gpa = gpa;
	r->size = size;
	r->fd = fd;
	r->fd_offset = 0;
	r->host = host;
	vfm_bitmap_set_range_atomic(r->dirty, 0, r->npages);
	mem->nregions++;
	vfm_debug("memory", "region %u: gpa 0x%" PRIx64 " size 0x%" PRIx64 " memfd %d",
		  mem->nregions - 1, gpa, size, fd);
	return 0;
}

uint64_t vfm_guest_mem_page_size(const struct vfm_guest_mem *mem)
{
	return mem->page_size;
}

unsigned vfm_guest_mem_num_regions(const struct vfm_guest_mem *mem)
{
	return mem->nregions;
}

const struct vfm_mem_region *vfm_guest_mem_region(const struct vfm_guest_mem *mem, unsigned idx)
{
	return idx < mem->nregions ? &mem->regions[idx] : NULL;
}

uint64_t vfm_guest_mem_total(const struct vfm_guest_mem *mem)
{
	uint64_t total = 0;

	for (unsigned i = 0; i < mem->nregions; i++)
		total += mem->regions[i].size;
	return total;
}

static struct vfm_mem_region *find_region(struct vfm_guest_mem *mem, uint64_t gpa)
{
	for (unsigned i = 0; i < mem->nregions; i++) {
		struct vfm_mem_region *r = &mem->regions[i];
		if (gpa >= r->gpa && gpa - r->gpa < r->size)
			return r;
	}
	return NULL;
}

void *vfm_guest_mem_ptr(struct vfm_guest_mem *mem, uint64_t gpa, uint64_t len)
{
	struct vfm_mem_region *r = find_region(mem, gpa);

	if (!r || len > r->size - (gpa - r->gpa))
		return NULL;
	return (char *)r->host + (gpa - r->gpa);
}

int vfm_dirty_mark(struct vfm_guest_mem *mem, uint64_t gpa, uint64_t len)
{
	int ret = 0;

	/* A range may span regions: mark each part, note what fell outside. */
	while (len) {
		struct vfm_mem_region *r = find_region(mem, gpa);
		uint64_t off, take, first, last;

		if (!r) {
			uint64_t step = mem->page_size - (gpa & (mem->page_size - 1));
			ret = -ERANGE;
			if (step >= len)
				break;
			gpa += step;
			len -= step;
			continue;
		}
		off = gpa - r->gpa;
		take = r->size - off < len ? r->size - off : len;
		first = off >> mem->page_shift;
		last = (off + take - 1) >> mem->page_shift;
		vfm_bitmap_set_range_atomic(r->dirty, first, last - first + 1);
		gpa += take;
		len -= take;
	}
	return ret;
}

void vfm_dirty_mark_all(struct vfm_guest_mem *mem)
{
	for (unsigned i = 0; i < mem->nregions; i++)
		vfm_bitmap_set_range_atomic(mem->regions[i].dirty, 0, mem->regions[i].npages);
}

int vfm_dirty_merge(struct vfm_guest_mem *mem, uint64_t iova, uint64_t length,
		    uint64_t page_size, const uint64_t *bitmap, struct vfm_error *err)
{
	uint64_t nbits;

	if (!page_size || (page_size & (page_size - 1)) || !length || iova + length < iova)
		return vfm_error_set(err, -EINVAL, "bad dirty bitmap geometry");
	nbits = (length + page_size - 1) / page_size;
	for (uint64_t w = 0; w < VFM_BITMAP_WORDS(nbits); w++) {
		uint64_t word = bitmap[w];

		while (word) {
			uint64_t bit = w * 64 + (uint64_t)__builtin_ctzll(word);
			word &= word - 1;
			if (bit >= nbits)
				break;
			/* Out-of-memory ranges (e.g. MMIO windows) are ignored. */
			vfm_dirty_mark(mem, iova + bit * page_size, page_size);
		}
	}
	return 0;
}

uint64_t vfm_dirty_count(const struct vfm_guest_mem *mem)
{
	uint64_t n = 0;

	for (unsigned i = 0; i < mem->nregions; i++)
		n += vfm_bitmap_weight(mem->regions[i].dirty, VFM_BITMAP_WORDS(mem->regions[i].npages));
	return n;
}

uint64_t vfm_dirty_collect(struct vfm_guest_mem *mem, unsigned idx, uint64_t *out)
{
	struct vfm_mem_region *r;

	if (idx >= mem->nregions)
		return 0;
	r = &mem->regions[idx];
	return vfm_bitmap_collect(r->dirty, out, VFM_BITMAP_WORDS(r->npages));
}

#ifdef MADV_POPULATE_WRITE
#define VFM_MADV_POPULATE_WRITE MADV_POPULATE_WRITE
#else
#define VFM_MADV_POPULATE_WRITE 23   /* linux/mman.h since 5.14 */
#endif

int vfm_guest_mem_prealloc(struct vfm_guest_mem *mem, struct vfm_error *err)
{
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(mem, i);
		int ret;

		if (r->fd < 0)
			continue;
		/* Allocate and map in one go (Linux 5.14): no fault on first touch
		 * either. Older kernels: allocate only. */
		if (madvise(r->host, r->size, VFM_MADV_POPULATE_WRITE) == 0)
			continue;
		/* posix_fallocate returns the error rather than setting errno. */
		ret = posix_fallocate(r->fd, (off_t)r->fd_offset, (off_t)r->size);
		if (ret)
			return vfm_error_set(err, -ret, "allocating %" PRIu64 " MiB of guest memory "
					     "(region at 0x%" PRIx64 "): %s", r->size >> 20, r->gpa,
					     strerror(ret));
	}
	return 0;
}

/* ---- Racy guest memory access (memory_access.h) ---- */

#ifdef __SANITIZE_THREAD__
/* Relaxed atomics keep the compiler from turning the loops into memcpy calls,
 * which TSan intercepts (and would check) even here. */
#define GUEST_NOSAN __attribute__((no_sanitize("thread"), noinline))

GUEST_NOSAN static void copy_bytes(unsigned char *d, const unsigned char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		__atomic_store_n(&d[i], __atomic_load_n(&s[i], __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}

void vfm__guest_read(void *dst, const void *src, size_t len)
{
	copy_bytes(dst, src, len);
}

void vfm__guest_write(void *dst, const void *src, size_t len)
{
	copy_bytes(dst, src, len);
}

GUEST_NOSAN bool vfm__guest_is_zero(const void *p, size_t len)
{
	const uint64_t *w = p;

	for (size_t i = 0; i < len / 8; i++)
		if (__atomic_load_n(&w[i], __ATOMIC_RELAXED))
			return false;
	return true;
}
#else
void vfm__guest_read(void *dst, const void *src, size_t len)
{
	memcpy(dst, src, len);
}

void vfm__guest_write(void *dst, const void *src, size_t len)
{
	memcpy(dst, src, len);
}

bool vfm__guest_is_zero(const void *p, size_t len)
{
	const uint64_t *w = p;

	for (size_t i = 0; i < len / 8; i += 4)
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3])
			return false;
	return true;
}
#endif
