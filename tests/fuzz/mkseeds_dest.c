/*
 * Records the seeds of fuzz_dest and fuzz_multifd from real migrations in
 * the fuzz environment (dest_env.h): a file-mode stream, and unix migrations
 * (a guest writing, a device churning, so pre-copy iterates) through a relay
 * that records what the source sent on each connection: main alone without
 * multifd; main and its channels with multifd (fuzz_multifd's input: each
 * connection as u32 LE length + bytes, main first).
 * usage: mkseeds_dest CORPUS_DIR   (writes CORPUS_DIR/dest, CORPUS_DIR/multifd)
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "dest_env.h"
#include "migration/stream.h"

#define MAX_CONN 8

static void die(const char *what, const char *msg)
{
	fprintf(stderr, "mkseeds_dest: %s: %s\n", what, msg);
	exit(1);
}

static void save(const char *dir, const char *name, const void *p, size_t n)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "wb");
	if (!f || fwrite(p, 1, n, f) != n || fclose(f))
		die(path, strerror(errno));
	printf("mkseeds_dest: %s (%zu bytes)\n", path, n);
}

/* ---- The source's guest: a writer thread, stopped and started by the engine ---- */

struct writer {
	struct fz_side *s;
	pthread_t t;
	atomic_bool run;
	bool started;
	unsigned seed;
};

static void *write_loop(void *arg)
{
	struct writer *w = arg;

	while (atomic_load(&w->run)) {
		unsigned r = (unsigned)rand_r(&w->seed);
		uint64_t off = (uint64_t)(r % (FZ_MEM / 8)) * 8;

		*(uint64_t *)vfm_guest_mem_ptr(w->s->mem, off, 8) = r;
		vfm_dirty_mark(w->s->mem, off, 8);
		if (r % 64 == 0)
			testdev_dirty(w->s->td, r % (FZ_DEV_STATE - 64), 64);
		usleep(50);
	}
	return NULL;
}

static int w_stop(void *opaque)
{
	struct writer *w = opaque;

	if (w->started) {
		atomic_store(&w->run, false);
		pthread_join(w->t, NULL);
		w->started = false;
	}
	return 0;
}

static int w_start(void *opaque)
{
	struct writer *w = opaque;

	if (!w->started) {
		atomic_store(&w->run, true);
		w->started = true;
		pthread_create(&w->t, NULL, write_loop, w);
	}
	return 0;
}

static const struct vfm_vm_ops writer_ops = { .stop = w_stop, .start = w_start };

/* ---- A relay recording what the source sends on each connection ---- */

struct conn {
	int a, b;                 /* source side, destination side */
	unsigned char *log;
	size_t n, cap;
	pthread_t t;
};

struct relay {
	int lfd;
	char to[108];
	struct conn c[MAX_CONN];
	unsigned n;
	pthread_t t;
	atomic_bool stop;
};

static int unix_socket(const char *path, bool listen_on)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (fd < 0)
		die("socket", strerror(errno));
	if (listen_on ? bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 16)
		      : connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		die(path, strerror(errno));
	return fd;
}

static void *pump(void *arg)
{
	struct conn *c = arg;
	bool a_open = true, b_open = true;
	unsigned char buf[65536];

	while (a_open || b_open) {
		struct pollfd p[2] = { { a_open ? c->a : -1, POLLIN, 0 },
				       { b_open ? c->b : -1, POLLIN, 0 } };
		ssize_t r;

		if (poll(p, 2, 1000) <= 0)
			continue;
		if (p[0].revents) {
			r = read(c->a, buf, sizeof(buf));
			if (r <= 0) {
				a_open = false;
				shutdown(c->b, SHUT_WR);
			} else {
				if (c->n + (size_t)r > c->cap) {
					c->cap = (c->n + (size_t)r) * 2;
					c->log = realloc(c->log, c->cap);
					if (!c->log)
						die("relay", "out of memory");
				}
				memcpy(c->log + c->n, buf, (size_t)r);
				c->n += (size_t)r;
				if (write(c->b, buf, (size_t)r) != r)
					a_open = false;
			}
		}
		if (p[1].revents) {
			r = read(c->b, buf, sizeof(buf));
			if (r <= 0) {
				b_open = false;
				shutdown(c->a, SHUT_WR);
			} else if (write(c->a, buf, (size_t)r) != r) {
				b_open = false;
			}
		}
	}
	return NULL;
}

static void *accept_loop(void *arg)
{
	struct relay *r = arg;

	while (!atomic_load(&r->stop) && r->n < MAX_CONN) {
		struct pollfd p = { r->lfd, POLLIN, 0 };
		struct conn *c;

		if (poll(&p, 1, 50) <= 0)
			continue;
		c = &r->c[r->n];
		c->a = accept4(r->lfd, NULL, NULL, SOCK_CLOEXEC);
		if (c->a < 0)
			continue;
		c->b = unix_socket(r->to, false);
		pthread_create(&c->t, NULL, pump, c);
		r->n++;
	}
	return NULL;
}

/* ---- Destination in a thread ---- */

struct dst {
	struct fz_side side;
	char uri[200];
	pthread_t t;
	atomic_bool ready;
	int ret;
	struct vfm_error err;
};

static void on_ready(void *opaque, const char *uri)
{
	(void)uri;
	atomic_store(&((struct dst *)opaque)->ready, true);
}

static void *dst_main(void *arg)
{
	struct dst *d = arg;
	struct vfm_migration_params p;

	vfm_migration_params_default(&p);
	p.timeout_ms = 10000;
	d->ret = vfm_migration_incoming(d->side.m, d->uri, &p, on_ready, d, &d->err);
	return NULL;
}

static void migrate(struct fz_side *s, const char *uri, unsigned channels)
{
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };

	vfm_migration_params_default(&p);
	p.timeout_ms = 10000;
	p.multifd_channels = channels;
	/* No bandwidth probe: its MiBs of PAD records would make the seeds big. */
	p.avail_switchover_bandwidth = 1ull << 30;
	if (vfm_migration_start(s->m, uri, &p, &err))
		die("start", err.msg);
	if (vfm_migration_wait(s->m, 60000))
		die("migration", "did not end");
	vfm_migration_get_stats(s->m, &st);
	if (st.status != VFM_MIG_COMPLETED)
		die("migration", st.error);
}

/* A unix migration through the relay; records every connection. */
static void record_unix(const char *dir, const char *tmp, unsigned channels, const char *name)
{
	struct writer w = { .seed = 11 };
	struct relay r = { 0 };
	struct dst d = { 0 };
	struct fz_side s;
	char path[4096];
	unsigned char *out;
	size_t n = 0;

	snprintf(d.uri, sizeof(d.uri), "unix:%s/dst.sock", tmp);
	snprintf(r.to, sizeof(r.to), "%s/dst.sock", tmp);
	snprintf(path, sizeof(path), "%s/relay.sock", tmp);
	unlink(path);
	r.lfd = unix_socket(path, true);
	if (fz_side_init(&d.side, 0, NULL, NULL))
		exit(1);
	pthread_create(&d.t, NULL, dst_main, &d);
	for (int i = 0; i < 10000 && !atomic_load(&d.ready); i++)
		usleep(1000);
	if (!atomic_load(&d.ready))
		die("destination", "never listened");
	pthread_create(&r.t, NULL, accept_loop, &r);
	if (fz_side_init(&s, 7, &writer_ops, &w))
		exit(1);
	w.s = &s;
	w_start(&w);
	usleep(20000);
	snprintf(path, sizeof(path), "unix:%s/relay.sock", tmp);
	migrate(&s, path, channels);
	pthread_join(d.t, NULL);
	if (d.ret)
		die("destination", d.err.msg);
	atomic_store(&r.stop, true);
	pthread_join(r.t, NULL);
	for (unsigned i = 0; i < r.n; i++) {
		pthread_join(r.c[i].t, NULL);
		close(r.c[i].a);
		close(r.c[i].b);
	}
	close(r.lfd);
	if (channels && r.n != channels + 1)
		die(name, "not every multifd channel connected");
	/* Main alone for fuzz_dest; every connection framed for fuzz_multifd. */
	snprintf(path, sizeof(path), "%s/dest", dir);
	save(path, name, r.c[0].log, r.c[0].n);
	for (unsigned i = 0; i < r.n; i++)
		n += 4 + r.c[i].n;
	out = malloc(n);
	n = 0;
	for (unsigned i = 0; i < r.n; i++) {
		vfm_put_le32(out + n, (uint32_t)r.c[i].n);
		memcpy(out + n + 4, r.c[i].log, r.c[i].n);
		n += 4 + r.c[i].n;
		free(r.c[i].log);
	}
	snprintf(path, sizeof(path), "%s/multifd", dir);
	save(path, name, out, n);
	free(out);
	fz_side_free(&s);
	fz_side_free(&d.side);
}

static void record_file(const char *dir, const char *tmp)
{
	struct fz_side s;
	char uri[4200], path[4096];
	unsigned char *buf;
	FILE *f;
	long n = 0;

	if (fz_side_init(&s, 5, NULL, NULL))
		exit(1);
	snprintf(path, sizeof(path), "%s/vm.state", tmp);
	snprintf(uri, sizeof(uri), "file:%s", path);
	migrate(&s, uri, 0);
	f = fopen(path, "rb");
	if (!f || fseek(f, 0, SEEK_END) || (n = ftell(f)) <= 0 || fseek(f, 0, SEEK_SET))
		die(path, "cannot read");
	buf = malloc((size_t)n);
	if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n)
		die(path, "cannot read");
	fclose(f);
	unlink(path);
	snprintf(path, sizeof(path), "%s/dest", dir);
	save(path, "file-mode", buf, (size_t)n);
	free(buf);
	fz_side_free(&s);
}

int main(int argc, char **argv)
{
	char tmp[] = "/tmp/vfm-mkseeds-XXXXXX", path[4096];

	if (argc != 2) {
		fprintf(stderr, "usage: mkseeds_dest CORPUS_DIR\n");
		return 2;
	}
	fz_quiet();
	if (!mkdtemp(tmp))
		die("mkdtemp", strerror(errno));
	snprintf(path, sizeof(path), "%s/dest", argv[1]);
	mkdir(path, 0755);
	snprintf(path, sizeof(path), "%s/multifd", argv[1]);
	mkdir(path, 0755);
	record_file(argv[1], tmp);
	record_unix(argv[1], tmp, 0, "unix-main");
	record_unix(argv[1], tmp, 2, "unix-multifd-2");
	record_unix(argv[1], tmp, 1, "unix-multifd-1");
	rmdir(tmp);
	return 0;
}
