/*
 * Fuzz target: an incoming migration with multifd channels through the real
 * path (vfm_migration_incoming on a unix: URI in a thread): the main stream
 * and each channel's stream come from the input, written on real sockets:
 * multifd_dst.c (MF_CHANNELS, channel hellos, MF_DEV_STATE and MF_RAM
 * packets, end markers, ordering) with dest.c and ram.c behind it. Input:
 * each connection as u32 LE length + bytes, main first, at most 8. Each
 * record's checksum is recomputed after the mutation (dest_env.c). Seeds:
 * unix migrations with 1 and 2 channels recorded by mkseeds_dest.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "dest_env.h"
#include "migration/stream.h"

#define MAX_CONN 8

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct feed {
	int fd;
	unsigned char *buf;
	size_t len;
	bool main;
	pthread_t t;
};

struct incoming {
	struct fz_side side;
	char uri[128];
	atomic_bool ready;
	pthread_t t;
};

static void on_ready(void *opaque, const char *uri)
{
	(void)uri;
	atomic_store(&((struct incoming *)opaque)->ready, true);
}

static void *incoming_main(void *arg)
{
	struct incoming *in = arg;
	struct vfm_migration_params p;
	struct vfm_error err = { 0 };

	vfm_migration_params_default(&p);
	/* A channel that never comes, or stays silent, ends the load soon: the
	 * feeders keep channels open, as a source does. */
	p.timeout_ms = 100;
	/* FUZZ_VERBOSE=1: what the destination said (a seed must load: "ok"). */
	if (vfm_migration_incoming(in->side.m, in->uri, &p, on_ready, in, &err) &&
	    getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "fuzz_multifd: %s\n", err.msg);
	else if (getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "fuzz_multifd: ok\n");
	return NULL;
}

/* Writes one connection's bytes; main then ends its direction (a truncated
 * stream fails at once), a channel stays open as a source's does until the
 * end (an early EOF on a channel is an error). Reads (and drops) what the
 * destination sends until the connection is shut down. */
static void *feed_main(void *arg)
{
	struct feed *f = arg;
	size_t off = 0;

	while (off < f->len) {
		ssize_t w = write(f->fd, f->buf + off, f->len - off);
		if (w <= 0)
			break;
		off += (size_t)w;
	}
	if (f->main)
		shutdown(f->fd, SHUT_WR);
	{
		char sink[4096];
		while (read(f->fd, sink, sizeof(sink)) > 0)
			;
	}
	return NULL;
}

static int connect_to(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct timeval tv = { 2, 0 };

	if (fd < 0 || strlen(path) >= sizeof(sa.sun_path))
		abort();
	memcpy(sa.sun_path, path, strlen(path) + 1);
	/* Bounded: a destination that stopped reading cannot hold a feeder. */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		close(fd);
		return -1;
	}
	return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char dir[] = "/tmp/vfm-fuzz-mf-XXXXXX";
	static int once;
	struct feed f[MAX_CONN];
	struct incoming in = { 0 };
	unsigned n = 0;
	size_t off = 0;

	if (!once++) {
		fz_quiet();
		signal(SIGPIPE, SIG_IGN);
		if (!mkdtemp(dir))
			abort();
	}
	while (n < MAX_CONN && off + 4 <= size) {
		size_t len = vfm_get_le32(data + off);

		off += 4;
		if (len > size - off)
			len = size - off;
		f[n].buf = malloc(len ? len : 1);
		if (!f[n].buf)
			abort();
		memcpy(f[n].buf, data + off, len);
		fz_fix_checksums(f[n].buf, len);
		f[n].len = len;
		f[n].main = n == 0;
		off += len;
		n++;
	}
	if (!n)
		return 0;
	if (fz_side_init(&in.side, 0, NULL, NULL))
		abort();
	snprintf(in.uri, sizeof(in.uri), "unix:%s/mig.sock", dir);
	pthread_create(&in.t, NULL, incoming_main, &in);
	for (int i = 0; i < 5000 && !atomic_load(&in.ready); i++)
		usleep(200);
	for (unsigned i = 0; i < n; i++) {
		f[i].fd = atomic_load(&in.ready) ? connect_to(in.uri + 5) : -1;
		if (f[i].fd >= 0)
			pthread_create(&f[i].t, NULL, feed_main, &f[i]);
	}
	pthread_join(in.t, NULL);
	for (unsigned i = 0; i < n; i++) {
		if (f[i].fd >= 0) {
			shutdown(f[i].fd, SHUT_RDWR);
			pthread_join(f[i].t, NULL);
			close(f[i].fd);
		}
		free(f[i].buf);
	}
	fz_side_free(&in.side);
	return 0;
}
