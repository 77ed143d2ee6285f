/*
 * vfm-bench: measurements for docs/performance.md. Each mode prints one
 * JSON object on stdout. Migrations are real: guest memory on memfd, `dma`
 * device servers as separate processes (`vfiomig device dma`), the source
 * engine in this process and the destination in a forked child, over a
 * real TCP loopback or UNIX socket connection.
 *
 *   vfm-bench link --kind tcp|unix --bytes SIZE
 *   vfm-bench migrate --vfiomig PATH [--kind tcp|unix] [--mem SIZE] [--fill]
 *                     [--devices N] [--device-state SIZE] [--precopy on|off]
 *                     [--dirty-rate RATE] [--downtime-limit MS] [--save-latency US]
 *                     [--channels N] [--tls x509|psk]
 *   vfm-bench sync --vfiomig PATH [--mem SIZE] [--dirty-percent P]
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "migration/channel.h"
#include "vfiomig/migration.h"
#include "vfiomig/parse.h"
#include "vfiomig/vfio_user.h"
#include "../tools/tls-gen.h"

#define PG 4096ull
#define MAX_DEV 8

struct opts {
	const char *mode, *kind, *vfiomig;
	const char *tls;          /* migrate: "x509" or "psk" (throwaway credentials), or NULL */
	uint64_t bytes, mem, dev_state, dirty_rate, downtime_ms, save_latency_us;
	unsigned devices, channels, dirty_percent;
	bool fill, precopy;
	bool no_mig_shm;          /* devices without the vfiomig_mig_shm window */
};

static char tmpdir[64];
static pid_t dev_pids[2 * MAX_DEV];
static unsigned ndev_pids;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const struct vfm_error *err)
{
	fprintf(stderr, "vfm-bench: %s: %s\n", what, err && err->msg[0] ? err->msg : strerror(errno));
	for (unsigned i = 0; i < ndev_pids; i++)
		kill(dev_pids[i], SIGKILL);
	exit(1);
}

static void make_uri(const struct opts *o, char *uri, size_t len)
{
	if (!strcmp(o->kind, "unix"))
		snprintf(uri, len, "unix:%s/mig.sock", tmpdir);
	else
		snprintf(uri, len, "tcp:127.0.0.1:%u", 30000 + (unsigned)(getpid() % 20000));
}

/* ---- link: the raw channel, measured with the same sockets the engine uses ---- */

static int bench_link(const struct opts *o)
{
	struct vfm_error err = { 0 };
	struct vfm_uri uri;
	struct vfm_listener *l;
	char text[160];
	size_t chunk = 1u << 20;
	char *buf = malloc(chunk);
	int fd, status;
	pid_t pid;
	double t0, t1;

	make_uri(o, text, sizeof(text));
	if (!buf || vfm_uri_parse(text, &uri, &err) || vfm_listen(&uri, &l, &err))
		die("listen", &err);
	memset(buf, 0x5a, chunk);
	pid = fork();
	if (pid == 0) {
		/* Writer: as the source writes, 1 MiB at a time. */
		uint64_t left = o->bytes;
		if (vfm_connect(&uri, 5000, &fd, &err))
			_exit(1);
		while (left) {
			size_t n = left < chunk ? (size_t)left : chunk;
			ssize_t w = write(fd, buf, n);
			if (w <= 0)
				_exit(1);
			left -= (uint64_t)w;
		}
		_exit(0);
	}
	if (vfm_accept(l, 10000, &fd, &err))
		die("accept", &err);
	t0 = now_s();
	uint64_t got = 0;
	for (;;) {
		ssize_t r = read(fd, buf, chunk);
		if (r <= 0)
			break;
		got += (uint64_t)r;
	}
	t1 = now_s();
	waitpid(pid, &status, 0);
	close(fd);
	vfm_listener_close(l);
	if (got != o->bytes)
		die("link: short transfer", NULL);
	printf("{\"mode\":\"link\",\"kind\":\"%s\",\"bytes\":%" PRIu64 ",\"seconds\":%.6f,"
	       "\"bytes_per_sec\":%.0f}\n", o->kind, got, t1 - t0, (double)got / (t1 - t0));
	free(buf);
	return 0;
}

/* ---- migrate ---- */

static void start_device(const struct opts *o, const char *sock)
{
	char size[32], lat[32];
	pid_t pid;
	struct stat st;

	snprintf(size, sizeof(size), "%" PRIu64, o->dev_state);
	snprintf(lat, sizeof(lat), "%" PRIu64, o->save_latency_us);
	pid = fork();
	if (pid == 0) {
		execl(o->vfiomig, o->vfiomig, "device", "dma", "--socket", sock, "--state-size", size,
		      "--save-latency", lat, "--once", o->no_mig_shm ? "--no-mig-shm" : (char *)NULL,
		      (char *)NULL);
		_exit(127);
	}
	dev_pids[ndev_pids++] = pid;
	/* The server fills and hashes its state before it binds: 10 s, and 10 s
	 * more a GiB (a loaded 2-core host took over 10 s for 4 GiB). */
	double deadline = now_s() + 10.0 + 10.0 * (double)(o->dev_state >> 30);
	int status;

	while (stat(sock, &st)) {
		if (waitpid(pid, &status, WNOHANG) == pid)
			die("the device server exited before it listened", NULL);
		if (now_s() > deadline)
			die("the device server did not listen in time", NULL);
		usleep(10000);
	}
}

struct side {
	struct vfm_guest_mem *mem;
	struct vfm_device *dev[MAX_DEV];
	struct vfm_migration *m;
	pthread_t writer;
	pthread_mutex_t lock;
	pthread_cond_t cond;   /* CLOCK_MONOTONIC; a stop wakes the writer's nap */
	uint64_t rate;
	/* Under lock. */
	bool running, parked, quit;
	uint64_t kick, kick_seen;   /* vm_kick_ns */
};

/*
 * The guest of the bench: one thread writing pages at the rate, as a vCPU.
 * A stop parks it, as a VM parks its vCPUs (it once ended the thread, and
 * the join added 0.03-0.05 ms to guest_stop that no VM's stop has).
 */
static void *writer_main(void *arg)
{
	struct side *s = arg;
	uint64_t npages = vfm_guest_mem_total(s->mem) / PG, page = 0, written = 0;
	double t0 = now_s();

	for (;;) {
		pthread_mutex_lock(&s->lock);
		if (s->kick_seen != s->kick) {   /* vm_kick_ns */
			s->kick_seen = s->kick;
			pthread_cond_broadcast(&s->cond);
		}
		if (!s->running && !s->quit) {
			s->parked = true;
			pthread_cond_broadcast(&s->cond);
			while (!s->running && !s->quit)
				pthread_cond_wait(&s->cond, &s->lock);
			s->parked = false;
			t0 = now_s();
			written = 0;
		}
		if (s->quit) {
			pthread_mutex_unlock(&s->lock);
			return NULL;
		}
		pthread_mutex_unlock(&s->lock);
		/* Pace to the rate in 1 ms steps. */
		double due = (double)written / (double)s->rate;
		double late = now_s() - t0;
		if (due > late) {
			/* Nap on the condition: vm_stop cuts it short, as a kick
			 * takes a vCPU out of KVM_RUN (asleep in usleep, the stop
			 * waited the nap out: 0.1-0.6 ms of guest_stop). */
			struct timespec ts;

			clock_gettime(CLOCK_MONOTONIC, &ts);
			ts.tv_nsec += (long)((due - late) * 1e9) + 1000;
			ts.tv_sec += ts.tv_nsec / 1000000000L;
			ts.tv_nsec %= 1000000000L;
			pthread_mutex_lock(&s->lock);
			if (s->running && !s->quit && s->kick_seen == s->kick)
				pthread_cond_timedwait(&s->cond, &s->lock, &ts);
			pthread_mutex_unlock(&s->lock);
			continue;
		}
		uint64_t *p = vfm_guest_mem_ptr(s->mem, page * PG, PG);
		p[0]++;
		vfm_dirty_mark(s->mem, page * PG, 8);
		page = (page + 7919) % npages;
		written += PG;
	}
}

static int vm_stop(void *opaque)
{
	struct side *s = opaque;

	if (!s->rate)
		return 0;
	pthread_mutex_lock(&s->lock);
	s->running = false;
	pthread_cond_broadcast(&s->cond);
	while (!s->parked)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* As vm_stop up to where the writer would park: it acknowledges and goes on. */
static uint64_t vm_kick_ns(void *opaque)
{
	struct side *s = opaque;
	double t0 = now_s();
	uint64_t took = 0;

	if (!s->rate)
		return 0;
	pthread_mutex_lock(&s->lock);
	if (s->running) {
		s->kick++;
		pthread_cond_broadcast(&s->cond);
		while (s->running && s->kick_seen != s->kick)
			pthread_cond_wait(&s->cond, &s->lock);
		took = (uint64_t)((now_s() - t0) * 1e9);
	}
	pthread_mutex_unlock(&s->lock);
	return took;
}

/* A rolled-back source runs its guest again. */
static int vm_start(void *opaque)
{
	struct side *s = opaque;

	if (!s->rate)
		return 0;
	pthread_mutex_lock(&s->lock);
	s->running = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* Ends the writer thread (after the migration). */
static void writer_end(struct side *s)
{
	if (!s->rate)
		return;
	pthread_mutex_lock(&s->lock);
	s->quit = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	pthread_join(s->writer, NULL);
}

static const struct vfm_vm_ops vm_ops = {
	.stop = vm_stop, .start = vm_start, .kick_ns = vm_kick_ns
};

static void side_init(struct side *s, const struct opts *o, const char *role, bool fill)
{
	struct vfm_error err = { 0 };

	memset(s, 0, sizeof(*s));
	if (vfm_guest_mem_new(PG, &s->mem, &err) || vfm_guest_mem_add(s->mem, 0, o->mem, "ram", &err))
		die("guest memory", &err);
	if (fill) {
		/* Non-zero pages, so RAM is sent, not skipped as zero runs. */
		for (uint64_t off = 0; off < o->mem; off += PG)
			*(uint64_t *)vfm_guest_mem_ptr(s->mem, off, 8) = off | 1;
	}
	if (vfm_migration_new(s->mem, &vm_ops, s, &s->m, &err))
		die("migration", &err);
	for (unsigned i = 0; i < o->devices; i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(s->mem, 0);
		struct vfm_vfio_user_opts co = { .version = VFM_VFIO_USER_OPTS_V1 };
		struct vfm_dma_map map = { .iova = r->gpa, .size = r->size, .prot = 3, .fd = r->fd,
					   .fd_offset = r->fd_offset, .vaddr = r->host };
		struct vfm_device_props props;
		char sock[128], id[16];

		snprintf(sock, sizeof(sock), "%s/%s%u.sock", tmpdir, role, i);
		snprintf(id, sizeof(id), "dev%u", i);
		co.id = id;
		start_device(o, sock);
		/* The server may have bound but not yet listen: retry for 5 s. */
		for (int t = 0; vfm_vfio_user_open(sock, &co, &s->dev[i], &err); t++) {
			if (t >= 500)
				die("device open", &err);
			usleep(10000);
		}
		if (vfm_device_dma_map(s->dev[i], &map, &err))
			die("dma map", &err);
		vfm_device_props_default(&props);
		snprintf(props.id, sizeof(props.id), "%s", id);
		props.allow_pre_copy = o->precopy;
		if (vfm_migration_add_device(s->m, s->dev[i], &props, &err))
			die("add device", &err);
	}
}

static long maxrss_kib(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_maxrss;
}

/*
 * Reaps the device servers this process started (they exit once their
 * client has gone: --once), waiting at most 5 s; returns the largest peak
 * RSS among them in KiB and their CPU seconds in *cpu_s (wait4()'s rusage:
 * their whole life, the state fill at start included).
 */
static long reap_devices(double *cpu_s)
{
	long peak = 0;

	*cpu_s = 0;

	for (unsigned i = 0; i < ndev_pids; i++) {
		struct rusage ru;
		int status;
		pid_t r = 0;

		for (int t = 0; t < 500 && (r = wait4(dev_pids[i], &status, WNOHANG, &ru)) == 0; t++)
			usleep(10000);
		if (r == 0) {
			kill(dev_pids[i], SIGKILL);
			r = wait4(dev_pids[i], &status, 0, &ru);
		}
		if (r != dev_pids[i])
			continue;
		if (ru.ru_maxrss > peak)
			peak = ru.ru_maxrss;
		*cpu_s += (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
			  (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
	}
	ndev_pids = 0;
	return peak;
}

static double cpu_seconds(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
	       (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* Destination CPU from the listener being up (memory allocated) to the end. */
static double dst_cpu_at_listen;

/* Destination: tells the parent the listener is up. */
static void on_listening(void *opaque, const char *uri)
{
	int *fd = opaque;

	dst_cpu_at_listen = cpu_seconds();
	if (write(*fd, "r", 1) != 1)
		_exit(1);
}

static void params(const struct opts *o, struct vfm_migration_params *p)
{
	vfm_migration_params_default(p);
	p->downtime_limit_ms = o->downtime_ms;
	p->multifd_channels = o->channels;
	p->timeout_ms = 30000;
	if (o->tls)
		snprintf(p->tls_creds, sizeof(p->tls_creds), "%s:%s/tls", o->tls, tmpdir);
}

static int bench_migrate(const struct opts *o)
{
	struct vfm_error err = { 0 };
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct rusage ru_src0, ru_src1;
	struct side s;
	char uri[160];
	int status;
	pid_t pid;

	int ready[2];
	char c;

	make_uri(o, uri, sizeof(uri));
	if (pipe(ready))
		die("pipe", NULL);
	pid = fork();
	if (pid == 0) {
		struct side d;
		close(ready[0]);
		side_init(&d, o, "dst", false);
		params(o, &p);
		if (vfm_migration_incoming(d.m, uri, &p, on_listening, &ready[1], &err)) {
			fprintf(stderr, "vfm-bench: destination: %s\n", err.msg);
			_exit(1);
		}
		double cpu = cpu_seconds() - dst_cpu_at_listen;
		/* Peak RSS: this engine's own, then its device servers' once gone. */
		long rss[2] = { maxrss_kib(), 0 };
		double dev_cpu;
		vfm_migration_free(d.m);
		for (unsigned i = 0; i < o->devices; i++)
			vfm_device_free(d.dev[i]);
		rss[1] = reap_devices(&dev_cpu);
		if (write(ready[1], &cpu, sizeof(cpu)) != sizeof(cpu) ||
		    write(ready[1], rss, sizeof(rss)) != sizeof(rss) ||
		    write(ready[1], &dev_cpu, sizeof(dev_cpu)) != sizeof(dev_cpu))
			_exit(1);
		_exit(0);
	}
	close(ready[1]);
	side_init(&s, o, "src", o->fill);
	if (read(ready[0], &c, 1) != 1)
		die("the destination did not start listening", NULL);
	if (o->dirty_rate) {
		pthread_condattr_t ca;

		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&s.cond, &ca);
		pthread_condattr_destroy(&ca);
		pthread_mutex_init(&s.lock, NULL);
		s.rate = o->dirty_rate;
		s.running = true;
		pthread_create(&s.writer, NULL, writer_main, &s);
	}
	params(o, &p);
	getrusage(RUSAGE_SELF, &ru_src0);
	if (vfm_migration_start(s.m, uri, &p, &err))
		die("start", &err);
	if (vfm_migration_wait(s.m, 600000))
		die("migration did not end", NULL);
	getrusage(RUSAGE_SELF, &ru_src1);
	writer_end(&s);
	vfm_migration_get_stats(s.m, &st);
	double cpu_dst = -1;
	long rss_dst[2] = { -1, -1 };
	double cpu_dev_dst = -1, cpu_dev_src;
	if (read(ready[0], &cpu_dst, sizeof(cpu_dst)) != sizeof(cpu_dst) ||
	    read(ready[0], rss_dst, sizeof(rss_dst)) != sizeof(rss_dst) ||
	    read(ready[0], &cpu_dev_dst, sizeof(cpu_dev_dst)) != sizeof(cpu_dev_dst))
		cpu_dst = -1;
	close(ready[0]);
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
		die("destination failed", NULL);
	if (st.status != VFM_MIG_COMPLETED) {
		fprintf(stderr, "vfm-bench: migration %s: %s\n", vfm_mig_status_name(st.status),
			st.error);
		return 1;
	}
	double cpu_src = (double)(ru_src1.ru_utime.tv_sec - ru_src0.ru_utime.tv_sec +
				  ru_src1.ru_stime.tv_sec - ru_src0.ru_stime.tv_sec) +
			 (double)(ru_src1.ru_utime.tv_usec - ru_src0.ru_utime.tv_usec +
				  ru_src1.ru_stime.tv_usec - ru_src0.ru_stime.tv_usec) / 1e6;
	long rss_src = maxrss_kib(), rss_dev;
	vfm_migration_free(s.m);
	for (unsigned i = 0; i < o->devices; i++)
		vfm_device_free(s.dev[i]);
	rss_dev = reap_devices(&cpu_dev_src);
	printf("{\"mode\":\"migrate\",\"kind\":\"%s\",\"mem\":%" PRIu64 ",\"fill\":%s,"
	       "\"devices\":%u,\"device_state\":%" PRIu64 ",\"precopy\":%s,\"dirty_rate\":%" PRIu64
	       ",\"downtime_limit_ms\":%" PRIu64 ",\"save_latency_us\":%" PRIu64 ",\"channels\":%u,"
	       "\"downtime_ms\":%.3f,\"expected_downtime_ms\":%.3f,\"total_time_ms\":%" PRIu64
	       ",\"setup_time_ms\":%" PRIu64 ",\"precopy_iterations\":%" PRIu64
	       ",\"transferred_bytes\":%" PRIu64 ",\"ram_transferred_bytes\":%" PRIu64
	       ",\"device_transferred_bytes\":%" PRIu64 ",\"bandwidth_bps\":%.0f,"
	       "\"cpu_src_s\":%.3f,\"cpu_dst_s\":%.3f,\"same_clock\":%s,"
	       "\"rss_src_kib\":%ld,\"rss_dst_kib\":%ld,\"rss_dev_src_kib\":%ld,"
	       "\"rss_dev_dst_kib\":%ld,\"cpu_dev_src_s\":%.3f,\"cpu_dev_dst_s\":%.3f,",
	       o->kind, o->mem, o->fill ? "true" : "false", o->devices, o->dev_state,
	       o->precopy ? "true" : "false", o->dirty_rate, o->downtime_ms, o->save_latency_us,
	       o->channels, st.downtime_ms, st.expected_downtime_ms, st.total_time_ms,
	       st.setup_time_ms, st.precopy_iterations, st.transferred_bytes,
	       st.ram_transferred_bytes, st.device_transferred_bytes, st.bandwidth_bps, cpu_src,
	       cpu_dst, st.downtime_from_same_clock ? "true" : "false", rss_src, rss_dst[0], rss_dev,
	       rss_dst[1], cpu_dev_src, cpu_dev_dst);
	/* The switchover step by step, measured and as the engine expected it. */
	for (unsigned k = 0; k < 2; k++) {
		const double *v = k ? st.expected_switchover_ms : st.switchover_ms;

		printf("\"%s\":[", k ? "expected_switchover_ms" : "switchover_ms");
		for (unsigned i = 0; i < VFM_SWITCHOVER_STEPS; i++)
			printf("%s%.3f", i ? "," : "", v[i]);
		printf("]%s", k ? "}\n" : ",");
	}
	return 0;
}

/* ---- sync: dirty bitmap collection and device log merging, per GiB ---- */

static int bench_sync(const struct opts *o)
{
	struct vfm_error err = { 0 };
	struct opts d = *o;
	struct side s;
	const struct vfm_mem_region *r;
	uint64_t *out, *bm, words, pgsize = PG;
	unsigned rounds = 20;
	double t_collect = 0, t_report = 0, t_merge = 0;
	struct vfm_iova_range range;

	d.devices = 1;
	d.dev_state = 1 << 20;
	side_init(&s, &d, "sync", false);
	r = vfm_guest_mem_region(s.mem, 0);
	words = (r->npages + 63) / 64;
	out = calloc(words, 8);
	bm = calloc(words, 8);
	range.iova = r->gpa;
	range.length = r->size;
	if (!out || !bm || vfm_device_log_start(s.dev[0], &range, 1, &pgsize, &err))
		die("log start", &err);
	for (unsigned k = 0; k < rounds; k++) {
		/* Guest writes: dirty_percent of the pages, spread out. */
		uint64_t step = o->dirty_percent ? 100 / o->dirty_percent : 0;
		for (uint64_t p = 0; step && p < r->npages; p += step)
			vfm_dirty_mark(s.mem, r->gpa + p * PG, 8);
		double t0 = now_s();
		vfm_dirty_collect(s.mem, 0, out);
		double t1 = now_s();
		memset(bm, 0, words * 8);
		if (vfm_device_log_report(s.dev[0], r->gpa, r->size, pgsize, bm, &err))
			die("log report", &err);
		double t2 = now_s();
		if (vfm_dirty_merge(s.mem, r->gpa, r->size, pgsize, bm, &err))
			die("merge", &err);
		double t3 = now_s();
		t_collect += t1 - t0;
		t_report += t2 - t1;
		t_merge += t3 - t2;
		memset(out, 0, words * 8);
	}
	double gib = (double)o->mem / (double)(1ull << 30);
	printf("{\"mode\":\"sync\",\"mem\":%" PRIu64 ",\"dirty_percent\":%u,"
	       "\"collect_us_per_gib\":%.1f,\"device_report_us_per_gib\":%.1f,"
	       "\"merge_us_per_gib\":%.1f,\"total_us_per_gib\":%.1f}\n",
	       o->mem, o->dirty_percent, t_collect / rounds / gib * 1e6,
	       t_report / rounds / gib * 1e6, t_merge / rounds / gib * 1e6,
	       (t_collect + t_report + t_merge) / rounds / gib * 1e6);
	vfm_device_log_stop(s.dev[0], NULL);
	vfm_migration_free(s.m);
	vfm_device_free(s.dev[0]);
	free(out);
	free(bm);
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: vfm-bench link --kind tcp|unix --bytes SIZE\n"
		"       vfm-bench migrate --vfiomig PATH [--kind tcp|unix] [--mem SIZE] [--fill]\n"
		"                 [--devices N] [--device-state SIZE] [--precopy on|off]\n"
		"                 [--dirty-rate RATE] [--downtime-limit MS] [--save-latency US]\n"
		"                 [--no-mig-shm]\n"
		"                 [--channels N] [--tls x509|psk]\n"
		"       vfm-bench sync --vfiomig PATH [--mem SIZE] [--dirty-percent P]\n");
	exit(2);
}

static uint64_t num(const char *what, const char *v, int kind)
{
	struct vfm_error err = { 0 };
	uint64_t x = 0;
	int r = kind == 0 ? vfm_parse_size(v, &x, &err) : kind == 1 ? vfm_parse_rate(v, &x, &err)
			  : vfm_parse_uint(v, 0, UINT32_MAX, &x, &err);

	if (r) {
		fprintf(stderr, "vfm-bench: %s: %s\n", what, err.msg);
		exit(2);
	}
	return x;
}

int main(int argc, char **argv)
{
	struct opts o = { .kind = "tcp", .bytes = 1ull << 30, .mem = 64ull << 20,
			  .dev_state = 64ull << 20, .downtime_ms = 300, .precopy = true,
			  .dirty_percent = 10 };
	int ret;

	if (argc < 2)
		usage();
	o.mode = argv[1];
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "--fill")) { o.fill = true; continue; }
		if (!strcmp(a, "--no-mig-shm")) { o.no_mig_shm = true; continue; }
		if (!v)
			usage();
		i++;
		if (!strcmp(a, "--kind")) o.kind = v;
		else if (!strcmp(a, "--vfiomig")) o.vfiomig = v;
		else if (!strcmp(a, "--bytes")) o.bytes = num(a, v, 0);
		else if (!strcmp(a, "--mem")) o.mem = num(a, v, 0);
		else if (!strcmp(a, "--device-state")) o.dev_state = num(a, v, 0);
		else if (!strcmp(a, "--dirty-rate")) o.dirty_rate = num(a, v, 1);
		else if (!strcmp(a, "--downtime-limit")) o.downtime_ms = num(a, v, 2);
		else if (!strcmp(a, "--save-latency")) o.save_latency_us = num(a, v, 2);
		else if (!strcmp(a, "--devices")) o.devices = (unsigned)num(a, v, 2);
		else if (!strcmp(a, "--channels")) o.channels = (unsigned)num(a, v, 2);
		else if (!strcmp(a, "--dirty-percent")) o.dirty_percent = (unsigned)num(a, v, 2);
		else if (!strcmp(a, "--precopy")) o.precopy = !strcmp(v, "on");
		else if (!strcmp(a, "--tls")) o.tls = v;
		else usage();
	}
	if (strcmp(o.kind, "tcp") && strcmp(o.kind, "unix"))
		usage();
	if (o.devices > MAX_DEV || o.dirty_percent > 100)
		usage();
	if (strcmp(o.mode, "link") && !o.vfiomig && (o.devices || !strcmp(o.mode, "sync")))
		usage();
	strcpy(tmpdir, "/tmp/vfm-bench-XXXXXX");
	if (!mkdtemp(tmpdir))
		die("mkdtemp", NULL);
	signal(SIGPIPE, SIG_IGN);
	if (o.tls) {
		struct vfm_error err = { 0 };
		struct tls_gen_opts g;
		char dir[96];

		snprintf(dir, sizeof(dir), "%s/tls", tmpdir);
		tls_gen_opts_default(&g);
		if (mkdir(dir, 0700) || (strcmp(o.tls, "psk") ? tls_gen_x509(dir, &g, &err)
							       : tls_gen_psk(dir, "qemu", &err)))
			die("tls credentials", &err);
	}
	if (!strcmp(o.mode, "link"))
		ret = bench_link(&o);
	else if (!strcmp(o.mode, "migrate"))
		ret = bench_migrate(&o);
	else if (!strcmp(o.mode, "sync"))
		ret = bench_sync(&o);
	else
		usage();
	for (unsigned i = 0; i < ndev_pids; i++) {
		kill(dev_pids[i], SIGTERM);
		waitpid(dev_pids[i], NULL, 0);
	}
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	if (system(cmd))
		fprintf(stderr, "vfm-bench: could not remove %s\n", tmpdir);
	return ret;
}
