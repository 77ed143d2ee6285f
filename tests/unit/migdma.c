/* Helpers for engine tests with real dma device servers (see migdma.h). */
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <xxhash.h>

#include <inttypes.h>

#include "../../devices/dma.h"
#include "migdma.h"
#include "vfiomig/vfio_user.h"
#include "vfiomig/vfu_server.h"

/* harness.h has main(): its checks, restated for this helper file. */
#define FAIL(...)                                                             \
	do {                                                                  \
		fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);               \
		fprintf(stderr, __VA_ARGS__);                                 \
		fprintf(stderr, "\n");                                        \
		exit(1);                                                      \
	} while (0)
#define CHECK(cond)                                                           \
	do {                                                                  \
		if (!(cond))                                                  \
			FAIL("check failed: %s", #cond);                      \
	} while (0)
#define CHECK_EQ(a, b)                                                        \
	do {                                                                  \
		long long a_ = (long long)(a), b_ = (long long)(b);           \
		if (a_ != b_)                                                 \
			FAIL("%s == %lld, expected %s == %lld", #a, a_, #b, b_); \
	} while (0)

static char dir_buf[64];
static pid_t dir_owner;

/* When a case passed, in the process that made it (forked device servers
 * share dir_buf): the sockets and files in the dir, then the dir. */
void vfm_test_passed(void)
{
	DIR *d;
	struct dirent *e;

	if (!dir_buf[0] || getpid() != dir_owner || !(d = opendir(dir_buf)))
		return;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			unlinkat(dirfd(d), e->d_name, 0);
	closedir(d);
	rmdir(dir_buf);
}

const char *md_dir(void)
{
	if (!dir_buf[0]) {
		strcpy(dir_buf, "/tmp/vfm-mdma-XXXXXX");
		CHECK(mkdtemp(dir_buf) != NULL);
		dir_owner = getpid();
	}
	return dir_buf;
}

/* ---- Device servers ---- */

static void devsrv_main(const char *path, const struct md_opts *o, uint64_t churn, uint64_t seed,
			int ready_fd)
{
	struct vfm_dmadev_opts dopts = { .id = strrchr(path, '/') + 1,
					 .state_size = o->state_size ? o->state_size : MD_DEV_STATE,
					 .churn_rate = churn, .seed = seed,
					 .mig_flags = o->mig_flags,
					 .save_latency_us = o->save_latency_us,
					 .no_mig_shm = o->no_mig_shm };
	struct vfm_error err = { 0 };
	struct vfm_dmadev *dev;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	signal(SIGTERM, SIG_DFL);
	if (vfm_dmadev_create(path, &dopts, &dev, &err)) {
		fprintf(stderr, "dma server %s: %s\n", path, err.msg);
		_exit(1);
	}
	/* Listening now (the socket file appears at bind, before listen). */
	if (write(ready_fd, "r", 1) != 1)
		_exit(1);
	close(ready_fd);
	/* Clients one after another, as `vfiomig device dma` does. */
	for (;;) {
		int r = vfm_vfu_run(vfm_dmadev_ctx(dev), -1, &err);

		if (r && r != -ENOTCONN && r != -EINTR) {
			fprintf(stderr, "dma server %s: %s\n", path, err.msg);
			_exit(2);
		}
		vfm_error_clear(&err);
	}
}

void md_devsrv_spawn(struct md_devsrv *d, const char *name, const struct md_opts *o,
		     uint64_t churn, uint64_t seed)
{
	struct pollfd pfd;
	int ready[2];
	char c;

	snprintf(d->path, sizeof(d->path), "%s/%s", md_dir(), name);
	CHECK_EQ(pipe(ready), 0);
	fflush(NULL);
	d->pid = fork();
	CHECK(d->pid >= 0);
	if (d->pid == 0) {
		close(ready[0]);
		devsrv_main(d->path, o, churn, seed, ready[1]);
	}
	close(ready[1]);
	pfd = (struct pollfd){ .fd = ready[0], .events = POLLIN };
	CHECK_EQ(poll(&pfd, 1, 20000), 1);
	if (read(ready[0], &c, 1) != 1)
		FAIL("dma server for %s did not start", d->path);
	close(ready[0]);
}

void md_devsrv_kill(struct md_devsrv *d)
{
	if (d->pid > 0) {
		kill(d->pid, SIGTERM);
		waitpid(d->pid, NULL, 0);
		d->pid = 0;
	}
}

/* ---- Registers ---- */

uint64_t md_reg(struct vfm_device *dev, uint64_t off)
{
	struct vfm_error err = { 0 };
	uint64_t v = 0;

	if (vfm_device_region_read(dev, VFM_VFU_PCI_BAR0, off, &v, sizeof(v), &err))
		FAIL("read reg %#" PRIx64 ": %s", off, err.msg);
	return v;
}

static int set_reg(struct vfm_device *dev, uint64_t off, uint64_t v)
{
	return vfm_device_region_write(dev, VFM_VFU_PCI_BAR0, off, &v, sizeof(v), NULL);
}

enum vfm_state md_dev_state(struct vfm_device *dev)
{
	struct vfm_error err = { 0 };
	enum vfm_state st;

	if (vfm_device_query_state(dev, &st, &err))
		FAIL("query state: %s", err.msg);
	return st;
}

/* ---- The guest: a writer and a driver of every device's ring ---- */

static struct dmadev_desc *ring_slot(struct md_side *s, unsigned i, uint64_t idx)
{
	return vfm_guest_mem_ptr(s->mem, i * MD_PG + (idx % MD_RING_N) * sizeof(struct dmadev_desc),
				 sizeof(struct dmadev_desc));
}

/* Queues one descriptor on device i and rings; false if it failed. */
static bool drive_one(struct md_side *s, unsigned i, const struct dmadev_desc *d)
{
	struct md_guest *g = &s->g;
	uint64_t idx = g->tail[i]++;
	struct dmadev_desc *slot = ring_slot(s, i, idx);
	uint32_t st;

	/* The guest writes the descriptor: its own write, so it marks it. */
	*slot = *d;
	vfm_dirty_mark(s->mem, i * MD_PG, MD_PG);
	if (set_reg(s->dev[i], DMADEV_REG_RING_TAIL, g->tail[i]))
		return false;
	/* The device runs the ring before it answers the doorbell. */
	st = __atomic_load_n(&slot->status, __ATOMIC_ACQUIRE);
	return st == DMADEV_DESC_OK;
}

static void *driver_main(void *arg)
{
	struct md_side *s = arg;
	struct md_guest *g = &s->g;
	unsigned seed = g->seed * 31u;
	uint64_t half = MD_BUF_SIZE / MD_MAXDEV;

	while (atomic_load(&g->run)) {
		if (!s->ndev)
			usleep(1000);  /* no device to drive: do not spin */
		for (unsigned i = 0; i < s->ndev; i++) {
			unsigned r = (unsigned)rand_r(&seed);
			uint64_t len = MD_PG * (1 + r % 4);
			uint64_t goff = MD_BUF_GPA + i * half + (r % (half / MD_PG - 4)) * MD_PG;
			uint64_t doff = ((unsigned)rand_r(&seed) % (MD_DEV_STATE / MD_PG - 4)) * MD_PG;
			struct dmadev_desc d = { .len = len, .dev = doff };

			switch (r % 3) {
			case 0:  /* device -> guest: only the device's dirty log knows */
				d.op = DMADEV_OP_COPY_FROM_DEV;
				d.guest = goff;
				break;
			case 1:  /* device state changes */
				d.op = DMADEV_OP_FILL;
				d.pattern = ((uint64_t)rand_r(&seed) << 32) | (unsigned)rand_r(&seed);
				break;
			default: /* guest -> device, from what the writer dirties */
				d.op = DMADEV_OP_COPY_TO_DEV;
				d.guest = MD_WRITER_GPA + (r % 64) * MD_PG;
				break;
			}
			if (drive_one(s, i, &d))
				atomic_fetch_add(&g->completed, 1);
			else
				atomic_fetch_add(&g->errors, 1);
		}
	}
	return NULL;
}

static void *writer_main(void *arg)
{
	struct md_side *s = arg;
	struct md_guest *g = &s->g;
	unsigned seed = g->seed;
	uint64_t npages = (MD_MEM - MD_WRITER_GPA) / MD_PG;

	while (atomic_load(&g->run)) {
		uint64_t gpa = MD_WRITER_GPA + ((unsigned)rand_r(&seed) % npages) * MD_PG;
		uint64_t *p = vfm_guest_mem_ptr(s->mem, gpa, MD_PG);
		uint64_t n = atomic_fetch_add(&g->writes, 1) + 1;

		/* Write, then mark: a sync in between only resends the page. */
		__atomic_store_n(&p[n % (MD_PG / 8)], n, __ATOMIC_RELAXED);
		vfm_dirty_mark(s->mem, gpa, 8);
	}
	return NULL;
}

/* A guest that dirties (almost) nothing: one page now and then. */
static void *quiet_main(void *arg)
{
	struct md_side *s = arg;
	struct md_guest *g = &s->g;

	while (atomic_load(&g->run)) {
		uint64_t *p = vfm_guest_mem_ptr(s->mem, MD_WRITER_GPA, MD_PG);

		__atomic_store_n(p, atomic_fetch_add(&g->writes, 1) + 1, __ATOMIC_RELAXED);
		vfm_dirty_mark(s->mem, MD_WRITER_GPA, 8);
		usleep(20000);
	}
	return NULL;
}

static int guest_stop(void *opaque)
{
	struct md_guest *g = opaque;

	if (g->started && g->workload) {
		atomic_store(&g->run, false);
		pthread_join(g->writer, NULL);
		pthread_join(g->driver, NULL);
	}
	g->started = false;
	return 0;
}

static int guest_start(void *opaque)
{
	struct md_guest *g = opaque;

	atomic_fetch_add(&g->starts, 1);
	if (g->started)
		return 0;
	g->started = true;
	if (g->workload) {
		atomic_store(&g->run, true);
		CHECK_EQ(pthread_create(&g->writer, NULL, g->quiet ? quiet_main : writer_main, g->side),
			 0);
		CHECK_EQ(pthread_create(&g->driver, NULL, driver_main, g->side), 0);
	}
	return 0;
}

static uint64_t guest_kick_ns(void *opaque)
{
	struct md_guest *g = opaque;
	struct timespec ts = { (time_t)(g->kick_delay_ns / 1000000000ull),
			       (long)(g->kick_delay_ns % 1000000000ull) };

	if (!g->started || !g->workload)
		return 0;
	if (g->kick_delay_ns)
		nanosleep(&ts, NULL);
	return g->kick_delay_ns;
}

const struct vfm_vm_ops md_vm_ops = {
	.stop = guest_stop, .start = guest_start, .kick_ns = guest_kick_ns
};

bool md_dma_works(struct md_side *s, unsigned i)
{
	struct dmadev_desc d = { .op = DMADEV_OP_COPY_FROM_DEV, .guest = MD_BUF_GPA, .dev = 0,
				 .len = MD_PG };

	return drive_one(s, i, &d);
}

bool md_dma_fill(struct md_side *s, unsigned i, uint64_t gpa, uint64_t len)
{
	struct dmadev_desc d = { .op = DMADEV_OP_COPY_FROM_DEV, .guest = gpa, .dev = 0,
				 .len = len };

	return drive_one(s, i, &d);
}

/* ---- A side: memory, devices, migration object ---- */

void md_side_init(struct md_side *s, const struct md_devsrv *srv, const struct md_opts *o,
		  bool workload, unsigned seed)
{
	struct vfm_error err = { 0 };
	const struct vfm_mem_region *r;

	memset(s, 0, sizeof(*s));
	s->g.side = s;
	s->g.seed = seed ? seed : 1;
	s->g.workload = workload;
	s->g.quiet = o->quiet;
	CHECK_EQ(vfm_guest_mem_new(MD_PG, &s->mem, &err), 0);
	CHECK_EQ(vfm_guest_mem_add(s->mem, 0, MD_MEM, "ram", &err), 0);
	r = vfm_guest_mem_region(s->mem, 0);
	if (seed) {
		/* Content on every third page, zero pages between. */
		for (uint64_t off = MD_WRITER_GPA; off < MD_MEM; off += 3 * MD_PG)
			*(uint64_t *)vfm_guest_mem_ptr(s->mem, off, 8) = off ^ seed;
	}
	if (vfm_migration_new(s->mem, &md_vm_ops, &s->g, &s->m, &err))
		FAIL("migration_new: %s", err.msg);
	s->ndev = o->ndev;
	for (unsigned i = 0; i < o->ndev; i++) {
		struct vfm_vfio_user_opts vo = { .version = VFM_VFIO_USER_OPTS_V1, .timeout_ms = 5000 };
		struct vfm_dma_map map = { .iova = 0, .size = MD_MEM,
					   .prot = VFM_DMA_READ | VFM_DMA_WRITE,
					   .fd = o->by_messages ? -1 : r->fd, .fd_offset = 0,
					   .vaddr = r->host };
		struct vfm_device_props props;
		char id[16], spec[256], backend[16], path[160];

		snprintf(id, sizeof(id), "dev%u", i);
		vo.id = id;
		if (vfm_vfio_user_open(srv[i].path, &vo, &s->dev[i], &err))
			FAIL("open %s: %s", srv[i].path, err.msg);
		if (vfm_device_dma_map(s->dev[i], &map, &err))
			FAIL("dma map: %s", err.msg);
		snprintf(spec, sizeof(spec), "vfio-user:%s,id=%s%s%s", srv[i].path, id,
			 o->props ? "," : "", o->props ? o->props : "");
		if (vfm_device_spec_parse(spec, backend, sizeof(backend), path, sizeof(path), &props,
					  &err))
			FAIL("props: %s", err.msg);
		if (vfm_migration_add_device(s->m, s->dev[i], &props, &err))
			FAIL("add_device: %s", err.msg);
		if (workload) {
			CHECK_EQ(set_reg(s->dev[i], DMADEV_REG_RING_BASE, i * MD_PG), 0);
			CHECK_EQ(set_reg(s->dev[i], DMADEV_REG_RING_SIZE, MD_RING_N), 0);
			CHECK_EQ(set_reg(s->dev[i], DMADEV_REG_CTRL, DMADEV_CTRL_ENABLE), 0);
			CHECK_EQ(set_reg(s->dev[i], DMADEV_REG_SCRATCH, 0x5c0000u + i), 0);
		}
	}
}

void md_side_free(struct md_side *s)
{
	vfm_migration_free(s->m);
	for (unsigned i = 0; i < s->ndev; i++)
		vfm_device_free(s->dev[i]);
	vfm_guest_mem_free(s->mem);
}

uint64_t md_mem_hash(struct vfm_guest_mem *mem)
{
	return XXH3_64bits(vfm_guest_mem_ptr(mem, 0, MD_MEM), MD_MEM);
}

void md_params(struct vfm_migration_params *p)
{
	vfm_migration_params_default(p);
	p->timeout_ms = 5000;
}

void md_params_for(struct vfm_migration_params *p, const struct md_opts *o)
{
	md_params(p);
	if (o->timeout_ms)
		p->timeout_ms = o->timeout_ms;
	if (o->mf_channels)
		p->multifd_channels = o->mf_channels - 1;
	if (o->max_queued)
		p->max_queued_buffers_size = o->max_queued;
	if (o->downtime_limit_ms)
		p->downtime_limit_ms = o->downtime_limit_ms;
}

void md_wait(struct md_side *s, struct vfm_migration_stats *st)
{
	CHECK_EQ(vfm_migration_wait(s->m, 30000), 0);
	vfm_migration_get_stats(s->m, st);
}

/* ---- The destination process ---- */

void md_make_uri(const char *kind, char *uri, size_t len)
{
	if (!strcmp(kind, "unix"))
		snprintf(uri, len, "unix:%s/mig.sock", md_dir());
	else if (!strcmp(kind, "file"))
		snprintf(uri, len, "file:%s/vm.state", md_dir());
	else
		snprintf(uri, len, "tcp:127.0.0.1:0");
}

static void dest_ready(void *opaque, const char *uri)
{
	int fd = *(int *)opaque;
	char buf[256] = { 0 };

	snprintf(buf, sizeof(buf), "%s", uri);
	if (write(fd, buf, sizeof(buf)) != sizeof(buf))
		_exit(4);
}

static void dest_main(const char *uri, const struct md_opts *o, int rfd, int wfd)
{
	struct md_devsrv srv[MD_MAXDEV];
	struct vfm_migration_params p;
	struct vfm_error err = { 0 };
	struct md_result res = { 0 };
	struct md_side s;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	alarm(o->dest_alarm_s ? o->dest_alarm_s : 60);
	for (unsigned i = 0; i < o->ndev; i++) {
		char name[32];

		snprintf(name, sizeof(name), "dst%u", i);
		/* No churn here: the checksum must show the migrated state. */
		md_devsrv_spawn(&srv[i], name, o, 0, 1000 + i);
	}
	md_side_init(&s, srv, o, false, 0);
	md_params_for(&p, o);
	if (o->mf_delay_chan)
		vfm__multifd_set_test_delay(s.m, o->mf_delay_chan - 1, 30);
	if (o->mf_ram_delay_chan)
		vfm__multifd_set_test_ram_delay(s.m, o->mf_ram_delay_chan - 1, 150);

	res.status = vfm_migration_incoming(s.m, uri, &p, dest_ready, &rfd, &err);
	if (res.status)
		snprintf(res.error, sizeof(res.error), "%s", err.msg);
	res.guest_starts = (uint32_t)atomic_load(&s.g.starts);
	res.mem_hash = md_mem_hash(s.mem);
	for (unsigned i = 0; i < s.m->ndevs; i++) {
		res.mf_out_of_order += atomic_load(&s.m->devs[i]->mf_out_of_order);
		res.mf_queue_waits += atomic_load(&s.m->devs[i]->mf_queue_waits);
	}
	{
		struct vfm_migration_stats st;

		vfm_migration_get_stats(s.m, &st);
		res.mf_ram_bytes = st.multifd_ram_bytes;
	}

	for (unsigned i = 0; i < o->ndev; i++) {
		res.dev_state[i] = (int32_t)md_dev_state(s.dev[i]);
		res.dev_sum[i] = md_reg(s.dev[i], DMADEV_REG_CHECKSUM);
		res.dev_shm[i] = vfm_vfio_user_mig_shm_bytes(s.dev[i]);
	}
	if (write(wfd, &res, sizeof(res)) != sizeof(res))
		_exit(3);
	md_side_free(&s);
	for (unsigned i = 0; i < o->ndev; i++)
		md_devsrv_kill(&srv[i]);
	_exit(res.status ? 1 : 0);
}

void md_dest_start(struct md_dest *d, const char *uri, const struct md_opts *o)
{
	int ready[2], result[2];
	struct pollfd pfd;

	CHECK_EQ(pipe(ready), 0);
	CHECK_EQ(pipe(result), 0);
	fflush(NULL);
	d->pid = fork();
	CHECK(d->pid >= 0);
	if (d->pid == 0) {
		close(ready[0]);
		close(result[0]);
		dest_main(uri, o, ready[1], result[1]);
	}
	close(ready[1]);
	close(result[1]);
	d->result_fd = result[0];
	/* Wait (bounded) until it listens, and learn the real URI. A hang
	 * bound: under TSan four 256 MiB device servers took over 20 s to
	 * fill their state first. */
	pfd = (struct pollfd){ .fd = ready[0], .events = POLLIN };
	CHECK_EQ(poll(&pfd, 1, 120000), 1);
	CHECK_EQ(read(ready[0], d->uri, sizeof(d->uri)), (ssize_t)sizeof(d->uri));
	d->uri[sizeof(d->uri) - 1] = '\0';
	close(ready[0]);
}

int md_dest_wait(struct md_dest *d, struct md_result *r)
{
	struct pollfd pfd = { .fd = d->result_fd, .events = POLLIN };
	int status;

	memset(r, 0, sizeof(*r));
	CHECK_EQ(poll(&pfd, 1, 30000), 1);
	CHECK_EQ(read(d->result_fd, r, sizeof(*r)), (ssize_t)sizeof(*r));
	close(d->result_fd);
	CHECK_EQ(waitpid(d->pid, &status, 0), d->pid);
	CHECK(WIFEXITED(status));
	return WEXITSTATUS(status);
}
