/* The server library's test device and server threads (see vfu_testdev.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "vfu_testdev.h"

#define TD_FAIL(...)                                                          \
	do {                                                                  \
		fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);               \
		fprintf(stderr, __VA_ARGS__);                                 \
		fprintf(stderr, "\n");                                        \
		exit(1);                                                      \
	} while (0)

#define S_STOP VFM_STATE_STOP
#define S_RUN VFM_STATE_RUNNING
#define S_SC VFM_STATE_STOP_COPY
#define S_RES VFM_STATE_RESUMING
#define S_RP VFM_STATE_RUNNING_P2P
#define S_PC VFM_STATE_PRE_COPY
#define S_PCP VFM_STATE_PRE_COPY_P2P

bool td_arc_direct(uint64_t flags, enum vfm_state f, enum vfm_state t)
{
	bool p2p = flags & VFM_MIG_P2P, pre = flags & VFM_MIG_PRE_COPY;

	if ((f == S_STOP && (t == S_SC || t == S_RES)) || (t == S_STOP && (f == S_SC || f == S_RES)))
		return true;
	if (p2p && ((f == S_RUN && t == S_RP) || (f == S_RP && (t == S_RUN || t == S_STOP)) ||
		    (f == S_STOP && t == S_RP)))
		return true;
	if (!p2p && ((f == S_RUN && t == S_STOP) || (f == S_STOP && t == S_RUN)))
		return true;
	if (pre && ((f == S_RUN && t == S_PC) || (f == S_PC && t == S_RUN)))
		return true;
	if (pre && !p2p && f == S_PC && t == S_SC)
		return true;
	if (pre && p2p && ((f == S_RP && t == S_PCP) || (f == S_PCP && (t == S_RP || t == S_PC ||
		t == S_SC)) || (f == S_PC && t == S_PCP)))
		return true;
	return false;
}

/* ------------------------------------------------------------------------ */
/* Device callbacks                                                          */

static struct tdev *td_of(struct vfm_vfu_ctx *ctx)
{
	return vfm_vfu_priv(ctx);
}

static void put64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return v;
}

static ssize_t bar0_read(struct vfm_vfu_ctx *ctx, uint32_t index, uint64_t off, void *buf,
			 size_t count)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	memcpy(buf, td->bar0 + off, count);
	pthread_mutex_unlock(&td->lock);
	return (ssize_t)count;
}

/* GO registers act on the loop thread, as a doorbell would. */
static ssize_t bar0_write(struct vfm_vfu_ctx *ctx, uint32_t index, uint64_t off,
			  const void *buf, size_t count)
{
	struct tdev *td = td_of(ctx);
	uint64_t iova, len, v = 0;
	uint8_t *tmp;
	int r;

	pthread_mutex_lock(&td->lock);
	memcpy(td->bar0 + off, buf, count);
	iova = get64(td->bar0 + TD_DMA_IOVA);
	len = get64(td->bar0 + TD_DMA_LEN);
	memcpy(&v, buf, count < 8 ? count : 8);
	pthread_mutex_unlock(&td->lock);
	if (off == TD_DMA_GO && count == 8) {
		tmp = malloc(len ? len : 1);
		if (!tmp)
			return -ENOMEM;
		if (v == 1) {
			memset(tmp, (int)get64(td->bar0 + TD_DMA_BYTE), len);
			r = vfm_vfu_dma_write(ctx, iova, tmp, len);
		} else {
			r = len > TD_BAR0_SIZE - TD_READBUF ? -EINVAL : vfm_vfu_dma_read(ctx, iova, tmp, len);
			if (!r) {
				pthread_mutex_lock(&td->lock);
				memcpy(td->bar0 + TD_READBUF, tmp, len);
				pthread_mutex_unlock(&td->lock);
			}
		}
		free(tmp);
		pthread_mutex_lock(&td->lock);
		put64(td->bar0 + TD_DMA_RES, (uint64_t)(int64_t)r);
		pthread_mutex_unlock(&td->lock);
	} else if (off == TD_IRQ_GO && count == 8) {
		r = vfm_vfu_irq_trigger(ctx, (uint32_t)(v >> 16), (uint32_t)(v & 0xffff));
		pthread_mutex_lock(&td->lock);
		put64(td->bar0 + TD_IRQ_RES, (uint64_t)(int64_t)r);
		pthread_mutex_unlock(&td->lock);
	}
	return (ssize_t)count;
}

static const struct vfm_vfu_region_ops bar0_ops = {
	.version = VFM_VFU_REGION_OPS_VERSION, .read = bar0_read, .write = bar0_write,
};

static ssize_t bar2_read(struct vfm_vfu_ctx *ctx, uint32_t index, uint64_t off, void *buf,
			 size_t count)
{
	for (size_t i = 0; i < count; i++)
		((uint8_t *)buf)[i] = (uint8_t)(off + i);
	return (ssize_t)count;
}

static const struct vfm_vfu_region_ops bar2_ops = {
	.version = VFM_VFU_REGION_OPS_VERSION, .read = bar2_read,
};

static uint8_t stream_byte(size_t i)
{
	return (uint8_t)(i * 7 + 3);
}

static int td_transition(struct vfm_vfu_ctx *ctx, enum vfm_state from, enum vfm_state to)
{
	struct tdev *td = td_of(ctx);
	int r = 0;

	pthread_mutex_lock(&td->lock);
	if (td->narcs < sizeof(td->arcs) / sizeof(td->arcs[0]))
		td->arcs[td->narcs++] = (struct td_arc){ from, to };
	if (!td_arc_direct(td->flags, from, to))
		td->not_direct++;
	if (td->fail_err && from == td->fail_from && to == td->fail_to) {
		r = td->fail_err;
		if (td->fail_to_error)
			vfm_vfu_mig_set_error(ctx);
	} else if (vfm_arc_opens_session(from, to)) {
		td->pos = 0;
		td->sink_len = 0;
	}
	pthread_mutex_unlock(&td->lock);
	return r;
}

static ssize_t td_read_data(struct vfm_vfu_ctx *ctx, void *buf, size_t len)
{
	struct tdev *td = td_of(ctx);
	size_t end, n;

	pthread_mutex_lock(&td->lock);
	end = vfm_vfu_mig_state(ctx) == VFM_STATE_STOP_COPY ? TD_STREAM : TD_PRECOPY;
	n = td->pos < end ? end - td->pos : 0;
	/* Odd pieces, so the library has to loop to fill a request. */
	if (n > len)
		n = len;
	if (n > 1000)
		n = 1000;
	for (size_t i = 0; i < n; i++)
		((uint8_t *)buf)[i] = stream_byte(td->pos + i);
	td->pos += n;
	pthread_mutex_unlock(&td->lock);
	return (ssize_t)n;
}

static ssize_t td_write_data(struct vfm_vfu_ctx *ctx, const void *buf, size_t len)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	if (td->sink_len + len > TD_SINK_MAX) {
		pthread_mutex_unlock(&td->lock);
		return -ENOSPC;
	}
	memcpy(td->sink + td->sink_len, buf, len);
	td->sink_len += len;
	pthread_mutex_unlock(&td->lock);
	return (ssize_t)len;
}

static int td_precopy_info(struct vfm_vfu_ctx *ctx, uint64_t *initial, uint64_t *dirty)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	*initial = td->pos < TD_PRECOPY ? TD_PRECOPY - td->pos : 0;
	*dirty = 0;
	pthread_mutex_unlock(&td->lock);
	return 0;
}

static int td_stop_copy_size(struct vfm_vfu_ctx *ctx, uint64_t *bytes)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	*bytes = TD_STREAM - td->pos;
	pthread_mutex_unlock(&td->lock);
	return 0;
}

static void td_attach(struct vfm_vfu_ctx *ctx)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	td->attaches++;
	pthread_mutex_unlock(&td->lock);
}

static bool td_detach(struct vfm_vfu_ctx *ctx)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	td->detaches++;
	pthread_mutex_unlock(&td->lock);
	return vfm_vfu_mig_state(ctx) != VFM_STATE_RUNNING;
}

static int td_reset(struct vfm_vfu_ctx *ctx)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	td->resets++;
	td->pos = 0;
	pthread_mutex_unlock(&td->lock);
	return 0;
}

static void td_dma_map(struct vfm_vfu_ctx *ctx, uint64_t iova, uint64_t size, uint32_t prot)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	td->maps++;
	pthread_mutex_unlock(&td->lock);
}

static void td_dma_unmap(struct vfm_vfu_ctx *ctx, uint64_t iova, uint64_t size)
{
	struct tdev *td = td_of(ctx);

	pthread_mutex_lock(&td->lock);
	td->unmaps++;
	pthread_mutex_unlock(&td->lock);
}

static const struct vfm_vfu_device_ops td_ops = {
	.version = VFM_VFU_DEVICE_OPS_VERSION,
	.attach = td_attach, .detach = td_detach, .reset = td_reset,
	.dma_map = td_dma_map, .dma_unmap = td_dma_unmap,
};

unsigned td_take_arcs(struct tdev *td, struct td_arc *out, unsigned max)
{
	unsigned n;

	pthread_mutex_lock(&td->lock);
	n = td->narcs < max ? td->narcs : max;
	memcpy(out, td->arcs, n * sizeof(*out));
	td->narcs = 0;
	pthread_mutex_unlock(&td->lock);
	return n;
}

void td_fail_arc(struct tdev *td, enum vfm_state from, enum vfm_state to, int err, bool to_error)
{
	pthread_mutex_lock(&td->lock);
	td->fail_from = from;
	td->fail_to = to;
	td->fail_err = err;
	td->fail_to_error = to_error;
	pthread_mutex_unlock(&td->lock);
}

/* ------------------------------------------------------------------------ */
/* Servers                                                                   */

static void td_setup(struct srv *s, const char *path, uint64_t mig_flags,
		     const struct vfm_vfu_opts *o)
{
	static const struct vfm_vfu_mmap_area areas[] = { { 4096, 4096 }, { 12288, 4096 } };
	const struct vfm_vfu_pci_ids ids = { .vendor_id = 0x1234, .device_id = 0x5678,
					     .class_code = 0xff0000, .revision = 3 };
	struct tdev *td = &s->td;
	struct vfm_error e = { 0 };
	int r;

	memset(td, 0, sizeof(*td));
	pthread_mutex_init(&td->lock, NULL);
	td->flags = mig_flags;
	td->sink = malloc(TD_SINK_MAX);
	td->memfd = test_memfd("bar1", TD_BAR1_SIZE, NULL);
	if (!td->sink)
		TD_FAIL("no memory");
	td->mig = (struct vfm_vfu_migration_ops){
		.version = VFM_VFU_MIGRATION_OPS_VERSION, .flags = mig_flags,
		.transition = td_transition, .read_data = td_read_data,
		.write_data = td_write_data, .precopy_info = td_precopy_info,
		.stop_copy_size = td_stop_copy_size,
	};
	r = vfm_vfu_create(path, o, td, &s->ctx, &e);
	r = r ?: vfm_vfu_set_device_ops(s->ctx, &td_ops, &e);
	r = r ?: vfm_vfu_pci_init(s->ctx, &ids, &e);
	r = r ?: vfm_vfu_setup_region(s->ctx, 0, &(struct vfm_vfu_region){
		.size = TD_BAR0_SIZE, .flags = VFM_VFU_REGION_READ | VFM_VFU_REGION_WRITE,
		.ops = &bar0_ops, .fd = -1 }, &e);
	r = r ?: vfm_vfu_setup_region(s->ctx, 1, &(struct vfm_vfu_region){
		.size = TD_BAR1_SIZE, .flags = VFM_VFU_REGION_READ | VFM_VFU_REGION_WRITE,
		.fd = td->memfd, .fd_offset = 0, .areas = areas, .nr_areas = 2 }, &e);
	r = r ?: vfm_vfu_setup_region(s->ctx, 2, &(struct vfm_vfu_region){
		.size = TD_BAR2_SIZE, .flags = VFM_VFU_REGION_READ, .ops = &bar2_ops, .fd = -1 }, &e);
	r = r ?: vfm_vfu_setup_irqs(s->ctx, VFM_VFU_IRQ_INTX, 1, &e);
	r = r ?: vfm_vfu_setup_irqs(s->ctx, VFM_VFU_IRQ_MSI, 4, &e);
	if (!r && mig_flags)
		r = vfm_vfu_setup_migration(s->ctx, &td->mig, &e);
	r = r ?: vfm_vfu_realize(s->ctx, &e);
	if (r)
		TD_FAIL("test device setup: %s", e.msg);
}

static void *srv_main(void *arg)
{
	struct srv *s = arg;

	while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
		struct vfm_error e = { 0 };
		int r = vfm_vfu_run(s->ctx, 20, &e);

		if (r == -ENOTCONN)
			__atomic_add_fetch(&s->gone, 1, __ATOMIC_ACQ_REL);
		else if (r && r != -EINTR)
			TD_FAIL("server loop: %s", e.msg[0] ? e.msg : vfm_strerror(r));
	}
	return NULL;
}

static void srv_run(struct srv *s)
{
	if (pthread_create(&s->thread, NULL, srv_main, s))
		TD_FAIL("pthread_create");
}

void srv_start_pair(struct srv *s, uint64_t mig_flags, const struct vfm_vfu_opts *o,
		    struct rc *c)
{
	struct vfm_error e = { 0 };
	int sv[2];

	memset(s, 0, sizeof(*s));
	td_setup(s, NULL, mig_flags, o);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		TD_FAIL("socketpair: %s", strerror(errno));
	if (vfm_vfu_attach_fd(s->ctx, sv[0], &e))
		TD_FAIL("attach: %s", e.msg);
	rc_init(c, sv[1]);
	srv_run(s);
}

void srv_start_path(struct srv *s, uint64_t mig_flags, const struct vfm_vfu_opts *o)
{
	memset(s, 0, sizeof(*s));
	s->dir = test_tmpdir();
	s->path = malloc(4200);
	if (!s->path)
		TD_FAIL("no memory");
	snprintf(s->path, 4200, "%s/dev.sock", s->dir);
	td_setup(s, s->path, mig_flags, o);
	srv_run(s);
}

void srv_stop(struct srv *s)
{
	__atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
	pthread_join(s->thread, NULL);
	vfm_vfu_destroy(s->ctx);
	close(s->td.memfd);
	free(s->td.sink);
	pthread_mutex_destroy(&s->td.lock);
	if (s->dir)
		test_rmdir(s->dir);
	free(s->path);
}

bool srv_wait_gone(struct srv *s, int n, int timeout_ms)
{
	struct timespec ts = { 0, 5 * 1000 * 1000 };

	for (int waited = 0; waited <= timeout_ms; waited += 5) {
		if (__atomic_load_n(&s->gone, __ATOMIC_ACQUIRE) >= n)
			return true;
		nanosleep(&ts, NULL);
	}
	return false;
}
