/*
 * A vfio-user test device written only against libvfio-user's public API
 * (nutanix/libvfio-user, BSD-3-Clause, built unmodified by
 * /work/shared/peers/build-libvfio-user.sh): a device vfiomig did not write
 * the server side of, for the interoperability tests (docs/interop.md).
 *
 *   lvu_device --socket PATH [--state-size BYTES] [--tick-ms N] [--once] [-v]
 *              [--config-fails-in-stop]   (config space past the header cannot be
 *                                          read in STOP: a save must fail)
 *
 * What it offers is what libvfio-user offers at efd091b: STOP_COPY | PRE_COPY
 * (no P2P), DMA logging of fd-backed DMA regions, no MIG_DATA_SIZE and no
 * PRECOPY_INFO (unknown features get EINVAL).
 *
 * Its state: a page array (--state-size, default 256 KiB) and a counter.
 * Every tick in RUNNING or PRE_COPY the counter goes up, one page changes
 * (it is dirty for pre-copy), and the device DMA-writes the counter into the
 * first mapped DMA region (dirty for the client's DMA logging). Migration
 * data is a record stream: [u32 page index, u32 FNV-1a of the 4096 bytes,
 * 4096 bytes] per dirty page, then in STOP_AND_COPY a trailer record (index
 * 0xffffffff) with the counter. A record that does not check out, or half a
 * record when RESUME ends, is refused (and dropped).
 * BAR0 (4 KiB, RW): 0x0 counter (RO), 0x8 digest (RO), 0x10 scratch (RW).
 *
 * It logs every state change and, on stderr, "lvu-device: frozen digest D
 * counter N" on entering STOP_AND_COPY and "lvu-device: loaded digest D
 * counter N" on leaving RESUME: the tests compare the two.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "libvfio-user.h"

#define PAGE 4096u
#define TRAILER 0xffffffffu
#define REC_HDR 8u
#define REC_SIZE (REC_HDR + PAGE)

struct lvu {
	vfu_ctx_t *ctx;
	uint8_t *state;          /* npages pages */
	uint32_t npages;
	uint8_t *dirty;          /* one byte per page: changed since last sent */
	uint64_t counter;
	uint64_t scratch;
	vfu_migr_state_t mig;
	bool migrating_from_precopy;
	/* The record being read out or written in. */
	uint8_t rec[REC_SIZE];
	uint32_t rec_len, rec_off;
	uint32_t scan;           /* next page to look at for a dirty one */
	bool trailer_sent;
	/* The first DMA region with a local mapping. */
	uint64_t dma_iova, dma_len;
	bool dma_ok;
	bool resume_abandoned;   /* reset while in RESUME: what was loaded is not a state */
	bool cfg_fails_in_stop;  /* --config-fails-in-stop: config reads past the header fail in STOP */
	bool verbose;
};

static volatile sig_atomic_t quit;

static void on_signal(int sig)
{
	(void)sig;
	quit = 1;
}

static const char *mig_name(vfu_migr_state_t s)
{
	switch (s) {
	case VFU_MIGR_STATE_STOP: return "stop";
	case VFU_MIGR_STATE_RUNNING: return "running";
	case VFU_MIGR_STATE_STOP_AND_COPY: return "stop-copy";
	case VFU_MIGR_STATE_PRE_COPY: return "pre-copy";
	case VFU_MIGR_STATE_RESUME: return "resume";
	}
	return "?";
}

static uint32_t fnv32(const uint8_t *p, size_t n)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

/* FNV-1a over the pages and the counter. */
static uint64_t digest(const struct lvu *d)
{
	uint64_t h = 0xcbf29ce484222325ull;
	size_t n = (size_t)d->npages * PAGE;

	for (size_t i = 0; i < n; i++)
		h = (h ^ d->state[i]) * 0x100000001b3ull;
	for (unsigned i = 0; i < 8; i++)
		h = (h ^ (uint8_t)(d->counter >> (8 * i))) * 0x100000001b3ull;
	return h;
}

static void log_digest(const struct lvu *d, const char *what)
{
	fprintf(stderr, "lvu-device: %s digest %016" PRIx64 " counter %" PRIu64 "\n", what,
		digest(d), d->counter);
}

static void lvu_log(vfu_ctx_t *ctx, int level, const char *msg)
{
	(void)ctx;
	(void)level;
	fprintf(stderr, "lvu-device: libvfio-user: %s\n", msg);
}

static ssize_t bar0_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t off, bool is_write)
{
	struct lvu *d = vfu_get_private(ctx);
	uint64_t regs[3] = { d->counter, digest(d), d->scratch };

	if (off < 0 || (uint64_t)off + count > sizeof(regs)) {
		if (is_write || (uint64_t)off >= PAGE || (uint64_t)off + count > PAGE) {
			errno = EINVAL;
			return -1;
		}
		memset(buf, 0, count);   /* reads past the registers: zeros */
		if ((uint64_t)off < sizeof(regs))
			memcpy(buf, (char *)regs + off, sizeof(regs) - (size_t)off);
		return (ssize_t)count;
	}
	if (is_write) {
		if (off != 0x10 || count != 8) {
			errno = EINVAL;
			return -1;
		}
		memcpy(&d->scratch, buf, 8);
		return 8;
	}
	memcpy(buf, (char *)regs + off, count);
	return (ssize_t)count;
}

/* Config space past the standard header (libvfio-user serves the header). */
static ssize_t config_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t off, bool is_write)
{
	struct lvu *d = vfu_get_private(ctx);
	char *cs = (char *)vfu_pci_get_config_space(ctx);

	if (off < 0 || (uint64_t)off + count > 256 || is_write ||
	    (d->cfg_fails_in_stop && d->mig == VFU_MIGR_STATE_STOP)) {
		errno = is_write ? EINVAL : EIO;
		return -1;
	}
	memcpy(buf, cs + off, count);
	return (ssize_t)count;
}

static void dma_register(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
	struct lvu *d = vfu_get_private(ctx);

	if (!d->dma_ok && info->vaddr && info->iova.iov_len >= PAGE) {
		d->dma_iova = (uint64_t)(uintptr_t)info->iova.iov_base;
		d->dma_len = info->iova.iov_len;
		d->dma_ok = true;
	}
}

static void dma_unregister(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
	struct lvu *d = vfu_get_private(ctx);

	if (d->dma_ok && d->dma_iova == (uint64_t)(uintptr_t)info->iova.iov_base)
		d->dma_ok = false;
}

/*
 * A reset forgets a half-loaded stream. libvfio-user keeps the migration
 * state across it (docs/interop.md): a device left in RESUME must be able
 * to leave it afterwards.
 */
static int dev_reset(vfu_ctx_t *ctx, vfu_reset_type_t type)
{
	struct lvu *d = vfu_get_private(ctx);

	(void)type;
	d->scratch = 0;
	if (d->mig == VFU_MIGR_STATE_RESUME) {
		fprintf(stderr, "lvu-device: reset in resume: %u bytes of a record dropped\n",
			d->rec_off);
		d->rec_off = 0;
		d->resume_abandoned = true;
	}
	return 0;
}

/* One tick of a running device: the counter, one page, one DMA write. */
static void tick(struct lvu *d)
{
	uint32_t page = (uint32_t)(d->counter % d->npages);
	uint64_t *p = (uint64_t *)(d->state + (size_t)page * PAGE);

	d->counter++;
	for (unsigned i = 0; i < PAGE / 8; i += 61)
		p[i] = d->counter * 0x9e3779b97f4a7c15ull + i;
	d->dirty[page] = 1;
	if (d->dma_ok) {
		char sgbuf[256];
		dma_sg_t *sg = (dma_sg_t *)sgbuf;
		uint64_t pages = d->dma_len / PAGE;
		uint64_t iova = d->dma_iova + (d->counter % pages) * PAGE;
		struct iovec iov;

		if (dma_sg_size() > sizeof(sgbuf))
			return;
		if (vfu_addr_to_sgl(d->ctx, (vfu_dma_addr_t)(uintptr_t)iova, 8, sg, 1,
				    PROT_READ | PROT_WRITE) == 1 &&
		    vfu_sgl_get(d->ctx, sg, &iov, 1, 0) == 0) {
			memcpy(iov.iov_base, &d->counter, 8);
			vfu_sgl_put(d->ctx, sg, &iov, 1);   /* marks the page dirty */
		}
	}
}

static int transition(vfu_ctx_t *ctx, vfu_migr_state_t s)
{
	struct lvu *d = vfu_get_private(ctx);
	vfu_migr_state_t old = d->mig;

	fprintf(stderr, "lvu-device: state %s -> %s\n", mig_name(old), mig_name(s));
	if (old == VFU_MIGR_STATE_RESUME && s != VFU_MIGR_STATE_RESUME) {
		if (d->rec_off) {
			fprintf(stderr, "lvu-device: leaving resume with %u bytes of a record\n",
				d->rec_off);
			d->rec_off = 0;
			errno = EINVAL;
			return -1;
		}
		if (d->resume_abandoned)
			fprintf(stderr, "lvu-device: leaving an abandoned resume\n");
		else
			log_digest(d, "loaded");
		d->resume_abandoned = false;
	}
	switch (s) {
	case VFU_MIGR_STATE_PRE_COPY:
		memset(d->dirty, 1, d->npages);
		d->rec_len = d->rec_off = 0;
		d->scan = 0;
		d->trailer_sent = false;
		break;
	case VFU_MIGR_STATE_STOP_AND_COPY:
		if (old != VFU_MIGR_STATE_PRE_COPY) {
			memset(d->dirty, 1, d->npages);
			d->rec_len = d->rec_off = 0;
		}
		d->scan = 0;
		d->trailer_sent = false;
		log_digest(d, "frozen");
		break;
	case VFU_MIGR_STATE_RESUME:
		d->resume_abandoned = false;
		memset(d->state, 0, (size_t)d->npages * PAGE);
		d->counter = 0;
		d->rec_off = 0;
		break;
	default:
		break;
	}
	d->mig = s;
	return 0;
}

/* The next record to read out, or false when nothing is left. */
static bool next_record(struct lvu *d)
{
	for (uint32_t n = 0; n < d->npages; n++) {
		uint32_t i = (d->scan + n) % d->npages;

		if (!d->dirty[i])
			continue;
		uint32_t sum;

		d->dirty[i] = 0;
		d->scan = i + 1;
		memcpy(d->rec, &i, 4);
		memcpy(d->rec + REC_HDR, d->state + (size_t)i * PAGE, PAGE);
		sum = fnv32(d->rec + REC_HDR, PAGE);
		memcpy(d->rec + 4, &sum, 4);
		d->rec_len = REC_SIZE;
		d->rec_off = 0;
		return true;
	}
	if (d->mig == VFU_MIGR_STATE_STOP_AND_COPY && !d->trailer_sent) {
		uint32_t t = TRAILER, sum;

		memset(d->rec, 0, REC_SIZE);
		memcpy(d->rec, &t, 4);
		memcpy(d->rec + REC_HDR, &d->counter, 8);
		sum = fnv32(d->rec + REC_HDR, PAGE);
		memcpy(d->rec + 4, &sum, 4);
		d->rec_len = REC_SIZE;
		d->rec_off = 0;
		d->trailer_sent = true;
		return true;
	}
	return false;
}

static ssize_t read_data(vfu_ctx_t *ctx, void *buf, uint64_t count)
{
	struct lvu *d = vfu_get_private(ctx);
	uint64_t done = 0;

	while (done < count) {
		uint32_t n;

		if (d->rec_off == d->rec_len && !next_record(d))
			break;
		n = d->rec_len - d->rec_off;
		if (n > count - done)
			n = (uint32_t)(count - done);
		memcpy((char *)buf + done, d->rec + d->rec_off, n);
		d->rec_off += n;
		done += n;
	}
	return (ssize_t)done;
}

static int apply_record(struct lvu *d)
{
	uint32_t idx, sum;

	memcpy(&idx, d->rec, 4);
	memcpy(&sum, d->rec + 4, 4);
	if (sum != fnv32(d->rec + REC_HDR, PAGE)) {
		fprintf(stderr, "lvu-device: record for page %u fails its checksum\n", idx);
		return -1;
	}
	if (idx == TRAILER) {
		memcpy(&d->counter, d->rec + REC_HDR, 8);
		return 0;
	}
	if (idx >= d->npages) {
		fprintf(stderr, "lvu-device: record for page %u of %u\n", idx, d->npages);
		return -1;
	}
	memcpy(d->state + (size_t)idx * PAGE, d->rec + REC_HDR, PAGE);
	return 0;
}

static ssize_t write_data(vfu_ctx_t *ctx, void *buf, uint64_t count)
{
	struct lvu *d = vfu_get_private(ctx);
	uint64_t done = 0;

	while (done < count) {
		uint32_t n = REC_SIZE - d->rec_off;

		if (n > count - done)
			n = (uint32_t)(count - done);
		memcpy(d->rec + d->rec_off, (char *)buf + done, n);
		d->rec_off += n;
		done += n;
		if (d->rec_off == REC_SIZE) {
			d->rec_off = 0;
			if (apply_record(d)) {
				errno = EINVAL;
				return -1;
			}
		}
	}
	return (ssize_t)count;
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int setup(struct lvu *d, const char *path)
{
	static const vfu_migration_callbacks_t mig = {
		.version = VFU_MIGR_CALLBACKS_VERS,
		.transition = transition,
		.read_data = read_data,
		.write_data = write_data,
	};

	d->ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, LIBVFIO_USER_FLAG_ATTACH_NB, d,
				VFU_DEV_TYPE_PCI);
	if (!d->ctx)
		return -1;
	if (vfu_setup_log(d->ctx, lvu_log, d->verbose ? LOG_DEBUG : LOG_ERR) ||
	    vfu_pci_init(d->ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0))
		return -1;
	vfu_pci_set_id(d->ctx, 0x4e58, 0x0001, 0x4e58, 0x0001);
	if (vfu_setup_region(d->ctx, VFU_PCI_DEV_BAR0_REGION_IDX, PAGE, bar0_access,
			     VFU_REGION_FLAG_RW, NULL, 0, -1, 0) ||
	    vfu_setup_region(d->ctx, VFU_PCI_DEV_CFG_REGION_IDX, 256, config_access,
			     VFU_REGION_FLAG_RW, NULL, 0, -1, 0) ||
	    vfu_setup_device_dma(d->ctx, 64, dma_register, dma_unregister) ||
	    vfu_setup_device_reset_cb(d->ctx, dev_reset) ||
	    vfu_setup_device_migration_callbacks(d->ctx, &mig) ||
	    vfu_realize_ctx(d->ctx))
		return -1;
	return 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: lvu_device --socket PATH [--state-size BYTES] [--tick-ms N] "
		"[--config-fails-in-stop] [--once] [-v]\n");
	return 2;
}

int main(int argc, char **argv)
{
	struct lvu d = { .mig = VFU_MIGR_STATE_RUNNING };
	const char *path = NULL;
	unsigned long long size = 256 * 1024;
	int tick_ms = 10, clients = 0;
	bool once = false;
	struct sigaction sa = { .sa_handler = on_signal };

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--socket") && i + 1 < argc)
			path = argv[++i];
		else if (!strcmp(argv[i], "--state-size") && i + 1 < argc)
			size = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--tick-ms") && i + 1 < argc)
			tick_ms = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--config-fails-in-stop"))
			d.cfg_fails_in_stop = true;
		else if (!strcmp(argv[i], "--once"))
			once = true;
		else if (!strcmp(argv[i], "-v"))
			d.verbose = true;
		else
			return usage();
	}
	if (!path || size < PAGE || size % PAGE || size > (1ull << 30) || tick_ms <= 0)
		return usage();
	d.npages = (uint32_t)(size / PAGE);
	d.state = calloc(d.npages, PAGE);
	d.dirty = calloc(d.npages, 1);
	if (!d.state || !d.dirty)
		return 1;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (setup(&d, path)) {
		perror("lvu-device: libvfio-user setup");
		return 1;
	}
	fprintf(stderr, "lvu-device: listening on %s, %u pages\n", path, d.npages);

	while (!quit) {
		int64_t next = now_ms() + tick_ms;

		if (vfu_attach_ctx(d.ctx)) {
			if (errno != EAGAIN && errno != EWOULDBLOCK) {
				perror("lvu-device: attach");
				break;
			}
			/* The device runs with no client too. */
			if (d.mig == VFU_MIGR_STATE_RUNNING)
				tick(&d);
			usleep((useconds_t)tick_ms * 1000);
			continue;
		}
		clients++;
		fprintf(stderr, "lvu-device: client %d attached\n", clients);
		while (!quit) {
			struct pollfd p = { .fd = vfu_get_poll_fd(d.ctx), .events = POLLIN };
			int64_t left = next - now_ms();
			int r;

			if (left <= 0) {
				if (d.mig == VFU_MIGR_STATE_RUNNING || d.mig == VFU_MIGR_STATE_PRE_COPY)
					tick(&d);
				next = now_ms() + tick_ms;
				left = tick_ms;
			}
			if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
				break;
			do {
				r = vfu_run_ctx(d.ctx);
			} while (r > 0);
			if (r < 0 && errno == ENOTCONN)
				break;
			if (r < 0 && errno != EAGAIN && errno != EBUSY && errno != EINTR) {
				perror("lvu-device: run");
				break;
			}
		}
		fprintf(stderr, "lvu-device: client %d left\n", clients);
		d.dma_ok = false;
		if (once)
			break;
	}
	vfu_destroy_ctx(d.ctx);
	free(d.state);
	free(d.dirty);
	return 0;
}
