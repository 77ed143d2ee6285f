/*
 * A minimal vfio-user client for tests, written from the spec: it builds
 * each request by hand, waits for the matching reply with a timeout, and
 * answers the server's DMA_READ/DMA_WRITE from a buffer of its own. Every
 * transport failure FAILs the test; error replies come back as -errno.
 */
#ifndef VFM_TESTS_VFU_RAWCLIENT_H
#define VFM_TESTS_VFU_RAWCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vfio-user/proto.h"

struct rc {
	int fd;
	uint16_t next_id;
	int timeout_ms;
	/* Memory served to DMA_READ/DMA_WRITE from the server (optional). */
	uint8_t *mem;
	uint64_t mem_iova, mem_size;
	unsigned dma_msgs;            /* server commands answered */
	/* Called when a server command arrives, before it is answered. */
	void (*on_server_cmd)(struct rc *c, const struct vfu_msg *m);
};

void rc_init(struct rc *c, int fd);
/* Connects to a socket path, retrying until it listens (bounded). */
int rc_connect_path(const char *path, int timeout_ms);
void rc_close(struct rc *c);

/* One command: 0 (reply in *reply unless NULL) or -errno of an error reply. */
int rc_call(struct rc *c, uint16_t cmd, const void *payload, size_t len, const int *fds,
	    size_t nfds, struct vfu_msg *reply);
/* Sends a command and returns its id without waiting. */
uint16_t rc_send(struct rc *c, uint16_t cmd, uint32_t flags, const void *payload, size_t len,
		 const int *fds, size_t nfds);
/* Waits for the reply to id (answering server commands meanwhile). */
int rc_wait(struct rc *c, uint16_t id, uint16_t cmd, struct vfu_msg *reply);
/* true when the server closed the connection within timeout_ms. */
bool rc_closed_within(struct rc *c, int timeout_ms);

/* VERSION with this JSON (NULL: none); the decoded reply into *out. */
int rc_version(struct rc *c, const char *json, struct vfu_version_info *out);
/* VERSION with a typical QEMU-like proposal. */
void rc_hello(struct rc *c);

int rc_region_read(struct rc *c, uint32_t region, uint64_t off, void *buf, uint32_t count);
int rc_region_write(struct rc *c, uint32_t region, uint64_t off, const void *buf, uint32_t count);
uint64_t rc_read64(struct rc *c, uint32_t region, uint64_t off);
void rc_write64(struct rc *c, uint32_t region, uint64_t off, uint64_t v);
int rc_dma_map(struct rc *c, int fd, uint64_t offset, uint64_t iova, uint64_t size, uint32_t flags);
int rc_dma_unmap(struct rc *c, uint64_t iova, uint64_t size, uint32_t flags);

/* DEVICE_FEATURE with data; the reply's feature data (after the 8-byte header) in out. */
int rc_feature(struct rc *c, uint32_t flags, uint32_t argsz, const void *data, size_t len,
	       void *out, size_t out_len);
int rc_set_state(struct rc *c, uint32_t state);
int rc_get_state(struct rc *c, uint32_t *state);
/* MIG_DATA_READ of size: bytes returned (>= 0) or -errno. */
long rc_mig_read(struct rc *c, void *buf, uint32_t size);
int rc_mig_write(struct rc *c, const void *buf, uint32_t size);
int rc_precopy_info(struct rc *c, uint64_t *initial, uint64_t *dirty);
int rc_stop_copy_size(struct rc *c, uint64_t *bytes);

int rc_log_start(struct rc *c, uint64_t page_size, const struct vfu_dma_logging_range *ranges,
		 uint32_t n, uint64_t *used_page_size);
int rc_log_stop(struct rc *c);
/* Bitmap into bits (bytes as vfu_bitmap_size says). */
int rc_log_report(struct rc *c, uint64_t iova, uint64_t length, uint64_t page_size,
		  uint64_t *bits, size_t bits_bytes);

/* Helpers. */
int test_memfd(const char *name, size_t size, void **map);
int count_open_fds(void);
char *test_tmpdir(void);     /* mkdtemp under $TMPDIR or /tmp */
void test_rmdir(char *dir);  /* removes the dir and what is in it, frees */

#endif
