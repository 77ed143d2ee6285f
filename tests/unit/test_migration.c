/*
 * The migration engine end to end, in two processes: the source (this
 * process: guest memory on memfd, a writer thread dirtying it, a test device)
 * and the destination (a forked child with its own memory and device),
 * over unix:, tcp: and file: channels. After migration the destination's
 * memory and device state must equal the source's frozen ones.
 */
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>

#include "harness.h"
#include "migration/engine.h"
#include "testdev.h"
#include "vfiomig/migration.h"

#define PG 4096ull
#define MEM_SIZE (16ull << 20)
#define DEV_STATE (2u << 20)
/* Pages 0..DMA_PAGES-1 are written by the device's DMA only, never by the
 * CPU writer: a page there reaches the destination after its first copy
 * only if the device's dirty log (or the all-dirty fallback) says so. */
#define DMA_PAGES 64u

struct guest {
	struct vfm_guest_mem *mem;
	struct testdev *dma_dev;  /* device whose "DMA" writes pages 0..63 */
	pthread_t thread;
	atomic_int running;       /* writer loop runs while 1 */
	int started;              /* vm ops and the test thread, never at once */
	unsigned seed;
	uint64_t writes;
	atomic_uint_fast64_t dma_writes;  /* device writes into pages < DMA_PAGES */
};

static void *guest_main(void *arg)
{
	struct guest *g = arg;
	uint64_t npages = MEM_SIZE / PG;

	while (atomic_load(&g->running)) {
		/* The CPU keeps out of the device's pages when there is a device. */
		uint64_t cpu_lo = g->dma_dev ? DMA_PAGES : 0;
		uint64_t page = cpu_lo + rand_r(&g->seed) % (npages - cpu_lo);
		uint64_t *p = vfm_guest_mem_ptr(g->mem, page * PG, PG);
		unsigned r = (unsigned)rand_r(&g->seed);

		if (g->dma_dev && r % 4 == 0) {
			/* The device DMAs into guest memory: only its log knows.
			 * Mutations caught (docs/reliability.md): sync_device_log
			 * made a no-op, or vfm__log_sync's all-dirty fallback
			 * deleted: these pages differ on the destination. */
			page = r % DMA_PAGES;
			p = vfm_guest_mem_ptr(g->mem, page * PG, PG);
			p[r % (PG / 8)] = ++g->writes;
			atomic_fetch_add(&g->dma_writes, 1);
			testdev_log_dirty(g->dma_dev, page * PG);
			continue;
		}
		if (g->dma_dev && r % 64 == 1) {
			/* Device-internal state changes too (firmware churn). */
			testdev_dirty(g->dma_dev, (r / 64) % (DEV_STATE - 512), 512);
			continue;
		}
		/* Write first, then mark: a sync between the two resends the page. */
		p[r % (PG / 8)] = ++g->writes;
		vfm_dirty_mark(g->mem, page * PG, 8);
	}
	return NULL;
}

static int guest_stop(void *opaque)
{
	struct guest *g = opaque;

	if (g->started) {
		atomic_store(&g->running, 0);
		pthread_join(g->thread, NULL);
		g->started = 0;
	}
	return 0;
}

static int guest_start(void *opaque)
{
	struct guest *g = opaque;

	if (!g->started && g->seed) {
		atomic_store(&g->running, 1);
		g->started = 1;
		CHECK_EQ(pthread_create(&g->thread, NULL, guest_main, g), 0);
	}
	return 0;
}

static const struct vfm_vm_ops guest_ops = { .stop = guest_stop, .start = guest_start };

static uint64_t fnv(const void *p, size_t n, uint64_t h)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 1099511628211ull;
	return h;
}

static uint64_t mem_hash(struct vfm_guest_mem *mem)
{
	return fnv(vfm_guest_mem_ptr(mem, 0, MEM_SIZE), MEM_SIZE, 1469598103934665603ull);
}

static uint64_t dma_hash(struct vfm_guest_mem *mem)
{
	return fnv(vfm_guest_mem_ptr(mem, 0, DMA_PAGES * PG), DMA_PAGES * PG,
		   1469598103934665603ull);
}

static uint64_t dev_hash(struct testdev *td)
{
	size_t n;
	const unsigned char *d = testdev_data(td, &n);
	return fnv(d, n, 1469598103934665603ull);
}

struct side {
	struct guest g;
	struct vfm_guest_mem *mem;
	struct testdev *td[2];
	unsigned ndev;
	struct vfm_migration *m;
};

static void side_init(struct side *s, unsigned ndev, uint64_t flags, unsigned seed,
		      const char *props_spec, unsigned td_opts)
{
	struct vfm_error err = { 0 };

	memset(s, 0, sizeof(*s));
	CHECK_EQ(vfm_guest_mem_new(PG, &s->mem, &err), 0);
	CHECK_EQ(vfm_guest_mem_add(s->mem, 0, MEM_SIZE, "ram", &err), 0);
	s->g.mem = s->mem;
	s->g.seed = seed;
	if (seed) {
		/* Some content, some zero pages. */
		for (uint64_t off = 0; off < MEM_SIZE; off += 3 * PG)
			*(uint64_t *)vfm_guest_mem_ptr(s->mem, off, 8) = off ^ seed;
	}
	if (vfm_migration_new(s->mem, &guest_ops, &s->g, &s->m, &err))
		FAIL("migration_new: %s", err.msg);
	s->ndev = ndev;
	s->g.dma_dev = NULL;
	for (unsigned i = 0; i < ndev; i++) {
		char id[16], backend[16], path[64];
		struct vfm_device_props props;

		snprintf(id, sizeof(id), "dev%u", i);
		s->td[i] = testdev_new(id, flags, DEV_STATE, seed + i, td_opts);
		vfm_device_props_default(&props);
		if (props_spec) {
			char spec[256];
			snprintf(spec, sizeof(spec), "vfio-user:/x,%s", props_spec);
			if (vfm_device_spec_parse(spec, backend, sizeof(backend), path, sizeof(path),
						  &props, &err))
				FAIL("props: %s", err.msg);
		}
		snprintf(props.id, sizeof(props.id), "%s", id);
		if (vfm_migration_add_device(s->m, testdev_device(s->td[i]), &props, &err))
			FAIL("add_device: %s", err.msg);
	}
	if (ndev && seed)
		s->g.dma_dev = s->td[0];
}

struct result {
	int32_t status;
	uint64_t mem, dev[2];
	uint64_t dma_mem;  /* hash of the pages only the device writes */
};

/* Destination child: the listener is up, the parent may connect now. */
static void on_listening(void *opaque, const char *uri)
{
	int *fd = opaque;

	if (write(*fd, "r", 1) != 1)
		_exit(4);
}

/* Destination child: load, report hashes over the pipe, exit. */
static void run_destination(const char *uri, int wfd, unsigned ndev, uint64_t flags,
			    int ready_fd)
{
	struct side d;
	struct vfm_error err = { 0 };
	struct result r = { 0 };
	struct vfm_migration_params p;

	side_init(&d, ndev, flags, 0, NULL, 0);
	vfm_migration_params_default(&p);
	p.timeout_ms = 5000;
	r.status = vfm_migration_incoming(d.m, uri, &p, on_listening, &ready_fd, &err);
	close(ready_fd);
	if (r.status)
		fprintf(stderr, "destination: %s\n", err.msg);
	r.mem = mem_hash(d.mem);
	r.dma_mem = dma_hash(d.mem);
	for (unsigned i = 0; i < ndev; i++) {
		r.dev[i] = dev_hash(d.td[i]);
		if (!r.status && testdev_state(d.td[i]) != VFM_STATE_RUNNING)
			r.status = -1000;
	}
	if (write(wfd, &r, sizeof(r)) != sizeof(r))
		_exit(3);
	_exit(r.status ? 1 : 0);
}

struct scenario {
	const char *uri_kind;   /* "unix", "tcp", "file" */
	unsigned ndev;
	uint64_t flags;
	const char *props;      /* device properties or NULL */
	bool writer;
	unsigned td_opts;       /* TESTDEV_NO_* of the source device */
	unsigned expect;        /* EXPECT_*: what the options must have done */
};

/* Effects of the device options, checked on the source's first device. */
#define EXPECT_NO_PRECOPY      (1u << 0)  /* allow-pre-copy=off */
#define EXPECT_NO_PRECOPY_SYNC (1u << 1)  /* pre-copy-dirty-page-tracking=off */
#define EXPECT_NO_DMA_LOG      (1u << 2)  /* no DMA logging: all-dirty fallback */

/* What the source looked like when the guest had stopped and the final dirty
 * sync was done, before the stop-copy data (VFM__PH_STOP_COPY). */
struct at_stop {
	struct side *s;
	uint64_t dev_bytes;       /* device bytes sent in pre-copy */
	unsigned log_reports;     /* DMA log reports so far, the final sync included */
	uint64_t dma_writes_setup, dma_writes_stop;
	bool seen;
};

static void on_phase(void *opaque, struct vfm_migration *m, enum vfm__mig_phase ph)
{
	struct at_stop *a = opaque;
	struct guest *g = &a->s->g;

	if (ph == VFM__PH_SETUP)
		a->dma_writes_setup = atomic_load(&g->dma_writes);
	if (ph == VFM__PH_PRECOPY && g->started && g->dma_dev) {
		/* The first iteration sent pages 0..63: the device writes some
		 * again before pre-copy goes on (bounded: a starved writer on a
		 * loaded machine gets its turn; no timing is asserted). */
		uint64_t w0 = atomic_load(&g->dma_writes);

		for (int i = 0; i < 5000 && atomic_load(&g->dma_writes) < w0 + 16; i++)
			nap_ms(1);
	}
	if (ph != VFM__PH_STOP_COPY || !a->s->ndev)
		return;
	a->seen = true;
	a->dev_bytes = vfm_migration_device_transferred(m, testdev_device(a->s->td[0]));
	a->log_reports = testdev_calls(a->s->td[0], TESTDEV_OP_LOG_REPORT);
	a->dma_writes_stop = atomic_load(&g->dma_writes);
}

/*
 * Checks the options' effects. Each check names the mutation it catches
 * (docs/reliability.md, scripts/mutants.sh): the migration itself succeeds
 * with an option ignored, only these figures tell.
 */
static void check_expect(const struct scenario *sc, struct side *s, const struct at_stop *a)
{
	char arcs[512];
	uint64_t sent;

	if (!sc->ndev)
		return;
	CHECK(a->seen);
	testdev_arcs(s->td[0], arcs, sizeof(arcs));
	sent = vfm_migration_device_transferred(s->m, testdev_device(s->td[0]));
	fprintf(stderr, "# dev0: arcs %s; %" PRIu64 " bytes in pre-copy, %" PRIu64
		" in all; %u log reports by the final sync; %" PRIu64 " DMA writes in pre-copy\n",
		arcs, a->dev_bytes, sent, a->log_reports, a->dma_writes_stop - a->dma_writes_setup);
	/* The device wrote its pages while pre-copy ran: they had to be resent. */
	if (sc->writer && sc->ndev)
		CHECK(a->dma_writes_stop > a->dma_writes_setup);
	if (sc->expect & EXPECT_NO_PRECOPY) {
		/* Mutation: allow-pre-copy ignored (use_precopy from the flags
		 * alone): the device takes RUNNING -> PRE_COPY and sends data. */
		if (strstr(arcs, ">PC"))
			FAIL("allow-pre-copy=off, yet the device went to PRE_COPY: %s", arcs);
		CHECK_EQ(a->dev_bytes, 0);
		/* One copy of the state in stop-copy: the state, its END
		 * record and the framing (measured: 2097308 bytes for 2 MiB);
		 * the device churns all along, so a pre-copy sends ~2.9 MB. */
		if (sent > DEV_STATE + 4096)
			FAIL("%" PRIu64 " device bytes for a %u-byte state without pre-copy",
			     sent, DEV_STATE);
	} else if (!(sc->flags & VFM_MIG_PRE_COPY) || !sc->writer) {
		/* nothing to compare */
	} else {
		CHECK(strstr(arcs, ">PC") != NULL);
		CHECK(a->dev_bytes > 0);
	}
	if (sc->expect & EXPECT_NO_PRECOPY_SYNC) {
		/* Mutation: pre-copy-dirty-page-tracking ignored: every pre-copy
		 * pass reads the device's log. Here only the final sync does
		 * (one report for the one memory region). */
		CHECK_EQ(a->log_reports, 1);
	} else if (sc->expect & EXPECT_NO_DMA_LOG) {
		CHECK_EQ(testdev_calls(s->td[0], TESTDEV_OP_LOG_START), 0);
		CHECK_EQ(a->log_reports, 0);
	} else if (sc->writer) {
		/* Pre-copy syncs read the log too: the final one plus at least one. */
		CHECK(a->log_reports >= 2);
	}
}

static char tmpdir[64];

/* After a passing case (harness.h): its socket or state file, then the dir. */
void vfm_test_passed(void)
{
	char path[128];

	if (!tmpdir[0])
		return;
	snprintf(path, sizeof(path), "%s/mig.sock", tmpdir);
	unlink(path);
	snprintf(path, sizeof(path), "%s/vm.state", tmpdir);
	unlink(path);
	rmdir(tmpdir);
}

static void make_uri(const char *kind, char *uri, size_t len)
{
	strcpy(tmpdir, "/tmp/vfm-mig-XXXXXX");
	CHECK(mkdtemp(tmpdir));
	if (!strcmp(kind, "unix"))
		snprintf(uri, len, "unix:%s/mig.sock", tmpdir);
	else if (!strcmp(kind, "file"))
		snprintf(uri, len, "file:%s/vm.state", tmpdir);
	else
		snprintf(uri, len, "tcp:127.0.0.1:%u", 20000 + (unsigned)(getpid() % 20000));
}

/* Waits until the child's listener is up (it writes one byte), or it died. */
static void wait_listener(int ready_rd)
{
	struct pollfd p = { .fd = ready_rd, .events = POLLIN };
	char c;

	CHECK_EQ(poll(&p, 1, 10000), 1);
	CHECK_EQ(read(ready_rd, &c, 1), 1);
}

/* A destination child loading uri, once it listens (or has the file open);
 * its result comes on *result_fd. */
static pid_t fork_destination(const char *uri, unsigned ndev, uint64_t flags, int *result_fd)
{
	int pfd[2], rfd[2];
	pid_t pid;

	CHECK_EQ(pipe(pfd), 0);
	CHECK_EQ(pipe(rfd), 0);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		close(pfd[0]);
		run_destination(uri, pfd[1], ndev, flags, rfd[1]);
	}
	close(pfd[1]);
	close(rfd[1]);
	wait_listener(rfd[0]);
	close(rfd[0]);
	*result_fd = pfd[0];
	return pid;
}

/* The destination's result; it loaded and exited 0. */
static void destination_result(pid_t pid, int result_fd, struct result *r)
{
	int status;

	CHECK_EQ(read(result_fd, r, sizeof(*r)), sizeof(*r));
	close(result_fd);
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK_EQ(r->status, 0);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static void run_scenario(const struct scenario *sc)
{
	struct side s;
	struct vfm_error err = { 0 };
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct result r;
	char uri[160];
	int rfd = -1;
	pid_t pid = -1;
	bool file = !strcmp(sc->uri_kind, "file");

	struct at_stop at = { .s = &s };

	make_uri(sc->uri_kind, uri, sizeof(uri));
	side_init(&s, sc->ndev, sc->flags, 7, sc->props, sc->td_opts);
	vfm__migration_set_phase_hook(s.m, on_phase, &at);
	for (unsigned i = 0; i < sc->ndev; i++)
		CHECK_EQ(testdev_dirty(s.td[i], 100, 5000), 0);
	if (!file)
		pid = fork_destination(uri, sc->ndev, sc->flags, &rfd);
	if (sc->writer)
		guest_start(&s.g);
	vfm_migration_params_default(&p);
	p.timeout_ms = 5000;
	/* Correctness, not downtime: converge even when a loaded (or sanitized)
	 * machine moves the always-dirty 16 MiB slowly. */
	p.downtime_limit_ms = 1000;
	if (vfm_migration_start(s.m, uri, &p, &err))
		FAIL("start: %s", err.msg);
	CHECK_EQ(vfm_migration_wait(s.m, 25000), 0);
	vfm_migration_get_stats(s.m, &st);
	if (st.status != VFM_MIG_COMPLETED)
		FAIL("source status %s: %s", vfm_mig_status_name(st.status), st.error);
	CHECK(!s.g.started);  /* the source guest stays stopped */
	for (unsigned i = 0; i < sc->ndev; i++)
		CHECK_EQ(testdev_state(s.td[i]), VFM_STATE_STOP);
	/* file: load it in a child, as a later `vm --incoming file:` would. */
	if (file)
		pid = fork_destination(uri, sc->ndev, sc->flags, &rfd);
	destination_result(pid, rfd, &r);
	/* The pages only the device wrote first: its dirty log's part. */
	if (r.dma_mem != dma_hash(s.mem))
		FAIL("pages written by device DMA differ on the destination");
	CHECK(r.mem == mem_hash(s.mem));
	for (unsigned i = 0; i < sc->ndev; i++)
		CHECK(r.dev[i] == dev_hash(s.td[i]));
	CHECK(st.transferred_bytes >= MEM_SIZE / 3);
	CHECK(st.ram_transferred_bytes > 0);
	if (sc->ndev)
		CHECK(st.device_transferred_bytes >= DEV_STATE * sc->ndev);
	/* The guest stopped for a measured, bounded while. */
	CHECK(st.downtime_ms > 0 && st.downtime_ms < 5000);
	check_expect(sc, &s, &at);
	fprintf(stderr, "# %s: %u dev, downtime %.2f ms, %" PRIu64 " iterations, %" PRIu64
		" bytes\n", sc->uri_kind, sc->ndev, st.downtime_ms, st.precopy_iterations,
		st.transferred_bytes);
	vfm_migration_free(s.m);
}

TEST(unix_one_device_precopy)
{
	struct scenario sc = { .uri_kind = "unix", .ndev = 1, .flags = VFM_MIG_ALL, .props = NULL, .writer = true };
	run_scenario(&sc);
}

TEST(tcp_two_devices)
{
	struct scenario sc = { .uri_kind = "tcp", .ndev = 2, .flags = VFM_MIG_ALL, .props = NULL, .writer = true };
	run_scenario(&sc);
}

TEST(unix_no_precopy)
{
	struct scenario sc = { .uri_kind = "unix", .ndev = 1, .flags = VFM_MIG_STOP_COPY | VFM_MIG_P2P, .props = NULL, .writer = true };
	run_scenario(&sc);
}

TEST(unix_precopy_no_p2p)
{
	/* libvfio-user's flags: STOP_COPY|PRE_COPY, one device. */
	struct scenario sc = { .uri_kind = "unix", .ndev = 1, .flags = VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY, .props = NULL, .writer = true };
	run_scenario(&sc);
}

TEST(unix_opt_out_of_precopy_tracking)
{
	struct scenario sc = { .uri_kind = "unix", .ndev = 1, .flags = VFM_MIG_ALL, .props = "pre-copy-dirty-page-tracking=off", .writer = true, .expect = EXPECT_NO_PRECOPY_SYNC };
	run_scenario(&sc);
}

TEST(unix_allow_pre_copy_off)
{
	struct scenario sc = { .uri_kind = "unix", .ndev = 1, .flags = VFM_MIG_ALL, .props = "allow-pre-copy=off", .writer = true, .expect = EXPECT_NO_PRECOPY };
	run_scenario(&sc);
}

TEST(device_without_dma_logging_falls_back_to_all_dirty)
{
	struct scenario sc = { "unix", 1, VFM_MIG_ALL, NULL, true, TESTDEV_NO_DMA_LOGGING,
			       EXPECT_NO_DMA_LOG };
	run_scenario(&sc);
}

TEST(device_dirty_tracking_off)
{
	struct scenario sc = { .uri_kind = "unix", .ndev = 1, .flags = VFM_MIG_ALL, .props = "device-dirty-page-tracking=off", .writer = true, .expect = EXPECT_NO_DMA_LOG };
	run_scenario(&sc);
}

TEST(device_without_precopy_info)
{
	/* vfio-user has no PRECOPY_INFO: pre-copy runs on read amounts alone. */
	struct scenario sc = { "unix", 1, VFM_MIG_ALL, NULL, true,
			       TESTDEV_NO_PRECOPY_INFO | TESTDEV_NO_STOP_COPY_SIZE, 0 };
	run_scenario(&sc);
}

TEST(file_save_and_load)
{
	struct scenario sc = { .uri_kind = "file", .ndev = 1, .flags = VFM_MIG_ALL, .props = NULL, .writer = false };
	run_scenario(&sc);
}

TEST(no_devices)
{
	struct scenario sc = { .uri_kind = "unix", .ndev = 0, .flags = 0, .props = NULL, .writer = true };
	run_scenario(&sc);
}

/* Bytes of the memfd behind guest memory that are allocated. */
static uint64_t allocated(struct vfm_guest_mem *mem)
{
	struct stat st;

	CHECK_EQ(fstat(vfm_guest_mem_region(mem, 0)->fd, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

/* Memory the guest never wrote is a hole of its memfd: the source sends it
 * as zero without reading it (which would allocate every page). */
TEST(untouched_memory_is_not_read)
{
	struct side s;
	struct vfm_error err = { 0 };
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct result r;
	char uri[160];
	uint64_t before;
	int rfd;
	pid_t pid;

	make_uri("unix", uri, sizeof(uri));
	side_init(&s, 0, 0, 0, NULL, 0);
	for (uint64_t off = 5 * PG; off < MEM_SIZE; off += MEM_SIZE / 4)
		*(uint64_t *)vfm_guest_mem_ptr(s.mem, off, 8) = off | 1;
	before = allocated(s.mem);
	CHECK(before <= 64 * PG);
	pid = fork_destination(uri, 0, 0, &rfd);
	vfm_migration_params_default(&p);
	p.timeout_ms = 5000;
	CHECK_EQ(vfm_migration_start(s.m, uri, &p, &err), 0);
	CHECK_EQ(vfm_migration_wait(s.m, 25000), 0);
	vfm_migration_get_stats(s.m, &st);
	CHECK_EQ(st.status, VFM_MIG_COMPLETED);
	fprintf(stderr, "# allocated before %" PRIu64 " KiB, after %" PRIu64 " KiB\n",
		before >> 10, allocated(s.mem) >> 10);
	CHECK_EQ(allocated(s.mem), before);
	destination_result(pid, rfd, &r);
	CHECK(r.mem == mem_hash(s.mem));
	vfm_migration_free(s.m);
}

TEST(refusals)
{
	struct side s;
	struct vfm_error err = { 0 };
	struct vfm_migration_params p;
	struct testdev *nop2p;

	side_init(&s, 1, VFM_MIG_ALL, 7, NULL, 0);
	vfm_migration_params_default(&p);
	p.postcopy = true;
	CHECK_EQ(vfm_migration_start(s.m, "unix:/tmp/x", &p, &err), -ENOTSUP);
	CHECK(strstr(err.msg, "postcopy"));
	/* A second device without P2P: several devices need P2P. */
	nop2p = testdev_new("np", VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY, 4096, 1, 0);
	CHECK_EQ(vfm_migration_add_device(s.m, testdev_device(nop2p), NULL, &err), 0);
	vfm_error_clear(&err);
	CHECK_EQ(vfm_migration_start(s.m, "unix:/tmp/x", NULL, &err), -EOPNOTSUPP);
	CHECK(strstr(err.msg, "P2P"));
	vfm_error_clear(&err);
	CHECK(vfm_migration_start(s.m, "bogus:1", NULL, &err) < 0);
}
