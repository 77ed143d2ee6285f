/*
 * Reading and writing guest memory that guest threads (vCPUs) and devices
 * may be writing at the same time, as the RAM saver and the vfio-user client
 * do. That race is inherent to live migration (QEMU has it too) and harmless
 * by construction: a page written during the copy was marked dirty after the
 * write, so it is copied again later. Under ThreadSanitizer these copies are
 * done word by word in uninstrumented code, so the race is not reported;
 * every other access stays checked.
 */
#ifndef VFM_MEMORY_ACCESS_H
#define VFM_MEMORY_ACCESS_H

#include <stdbool.h>
#include <stddef.h>

/* memcpy from guest memory (src) into private memory. */
void vfm__guest_read(void *dst, const void *src, size_t len);
/* memcpy from private memory into guest memory (dst). */
void vfm__guest_write(void *dst, const void *src, size_t len);
/* Whether len bytes of guest memory (8-byte aligned, len % 32 == 0) are zero. */
bool vfm__guest_is_zero(const void *p, size_t len);

#endif
