/*
 * Writes the seed corpora of the fuzz targets from real traffic: a small
 * migration stream made by the stream writer, and both directions of a
 * vfio-user session between our client and the `dma` device, recorded by a
 * proxy between them. Run by hand (make fuzz-seeds) when formats change.
 * usage: mkseeds CORPUS_DIR
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../devices/dma.h"
#include "migration/stream.h"
#include "vfiomig/vfio_user.h"
#include "vfiomig/vfu_server.h"

#define CAP (256u << 10)

struct capture {
	int client_side, server_side;   /* proxy ends */
	unsigned char to_server[CAP], to_client[CAP];
	size_t n_server, n_client;
	volatile int stop;
};

static struct capture cap;

static void save(const char *dir, const char *name, const void *p, size_t n)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "wb");
	if (!f || fwrite(p, 1, n, f) != n || fclose(f)) {
		fprintf(stderr, "mkseeds: writing %s: %s\n", path, strerror(errno));
		exit(1);
	}
}

static void copy(int from, int to, unsigned char *log, size_t *n)
{
	unsigned char buf[65536];
	ssize_t r = read(from, buf, sizeof(buf));

	if (r <= 0) {
		cap.stop = 1;
		return;
	}
	if (*n + (size_t)r <= CAP) {
		memcpy(log + *n, buf, (size_t)r);
		*n += (size_t)r;
	}
	if (write(to, buf, (size_t)r) != r)
		cap.stop = 1;
}

static void *proxy(void *arg)
{
	while (!cap.stop) {
		struct pollfd p[2] = { { cap.client_side, POLLIN, 0 }, { cap.server_side, POLLIN, 0 } };

		if (poll(p, 2, 50) <= 0)
			continue;
		if (p[0].revents)
			copy(cap.client_side, cap.server_side, cap.to_server, &cap.n_server);
		if (p[1].revents)
			copy(cap.server_side, cap.client_side, cap.to_client, &cap.n_client);
	}
	return NULL;
}

struct server_arg {
	struct vfm_vfu_ctx *ctx;
	volatile int stop;
};

static void *serve(void *arg)
{
	struct server_arg *s = arg;

	while (!s->stop && vfm_vfu_attached(s->ctx))
		if (vfm_vfu_run(s->ctx, 50, NULL) == -ENOTCONN)
			break;
	return NULL;
}

static void vfu_seeds(const char *dir)
{
	struct vfm_dmadev_opts o = { .id = "seed", .state_size = 16u << 10, .seed = 7 };
	struct vfm_vfio_user_opts co = { .version = VFM_VFIO_USER_OPTS_V1, .id = "seed" };
	struct server_arg sa = { 0 };
	struct vfm_error err = { 0 };
	struct vfm_device *dev;
	struct vfm_dmadev *dma;
	struct vfm_device_info info;
	unsigned char buf[8192];
	pthread_t tp, ts;
	int a[2], b[2];
	char dirbuf[4096];

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, a) || socketpair(AF_UNIX, SOCK_STREAM, 0, b) ||
	    vfm_dmadev_create(NULL, &o, &dma, &err)) {
		fprintf(stderr, "mkseeds: %s\n", err.msg);
		exit(1);
	}
	sa.ctx = vfm_dmadev_ctx(dma);
	if (vfm_vfu_attach_fd(sa.ctx, a[1], &err)) {
		fprintf(stderr, "mkseeds: %s\n", err.msg);
		exit(1);
	}
	cap.server_side = a[0];
	cap.client_side = b[0];
	pthread_create(&ts, NULL, serve, &sa);
	pthread_create(&tp, NULL, proxy, NULL);
	if (vfm_vfio_user_open_fd(b[1], "seed", &co, &dev, &err)) {
		fprintf(stderr, "mkseeds: open: %s\n", err.msg);
		exit(1);
	}
	vfm_device_get_info(dev, &info, NULL);
	vfm_device_region_read(dev, 0, DMADEV_REG_ID, buf, 8, NULL);
	vfm_device_region_read(dev, 0, DMADEV_REG_CHECKSUM, buf, 8, NULL);
	if (vfm_device_probe_migration(dev, &err) == 0) {
		ssize_t n;

		vfm_device_set_state(dev, VFM_STATE_STOP_COPY, VFM_STATE_RUNNING, NULL);
		/* A few blocks only: the seed stays small. */
		for (int i = 0; i < 2 && (n = vfm_device_read_data(dev, buf, sizeof(buf), NULL)) > 0;
		     i++)
			;
		vfm_device_set_state(dev, VFM_STATE_RUNNING, VFM_STATE_RUNNING, NULL);
	}
	vfm_device_free(dev);
	usleep(200000);
	cap.stop = 1;
	sa.stop = 1;
	pthread_join(tp, NULL);
	pthread_join(ts, NULL);
	vfm_dmadev_destroy(dma);
	snprintf(dirbuf, sizeof(dirbuf), "%s/vfu_server", dir);
	save(dirbuf, "session", cap.to_server, cap.n_server);
	save(dirbuf, "first-message", cap.to_server, cap.n_server > 16 ? 16 : cap.n_server);
	snprintf(dirbuf, sizeof(dirbuf), "%s/vfu_client", dir);
	save(dirbuf, "session", cap.to_client, cap.n_client);
	printf("vfio-user: %zu bytes client->server, %zu server->client\n", cap.n_server,
	       cap.n_client);
}

static void stream_seeds(const char *dir)
{
	char path[4096], name[] = "ram";
	unsigned char payload[64] = { 0 };
	struct vfm_stream *s;
	FILE *f = tmpfile();
	unsigned char sec[8 + sizeof(name) - 1];
	unsigned char data[4096];
	long n;

	if (!f || vfm_stream_open(fileno(f), -1, &s, NULL))
		exit(1);
	vfm_stream_write_header(s);
	vfm_put_le32(sec, 1);
	vfm_put_le32(sec + 4, 1);
	memcpy(sec + 8, name, sizeof(name) - 1);
	vfm_stream_put_record(s, VFM_REC_SECTION, 0, 1, sec, sizeof(sec));
	vfm_put_le64(payload, 0x1000);
	vfm_put_le32(payload + 8, 1);
	vfm_stream_put_record(s, VFM_REC_DATA, 0, 1, payload, 16);
	vfm_stream_put_record(s, VFM_REC_SWITCHOVER, 0, 0, payload, 8);
	vfm_stream_put_record(s, VFM_REC_SECTION_END, 0, 1, NULL, 0);
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
	vfm_stream_put_record(s, VFM_REC_GO, 0, 0, NULL, 0);
	vfm_stream_flush(s);
	if (vfm_stream_error(s, NULL))
		exit(1);
	vfm_stream_free(s);
	n = ftell(f);
	rewind(f);
	if (n <= 0 || n > (long)sizeof(data) || fread(data, 1, (size_t)n, f) != (size_t)n)
		exit(1);
	fclose(f);
	snprintf(path, sizeof(path), "%s/stream", dir);
	save(path, "small", data, (size_t)n);
	save(path, "header-only", data, VFM_STREAM_HDR_SIZE);
	printf("stream: %ld bytes\n", n);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: mkseeds CORPUS_DIR\n");
		return 2;
	}
	stream_seeds(argv[1]);
	vfu_seeds(argv[1]);
	return 0;
}
