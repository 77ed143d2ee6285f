/*
 * vfm-heartbeat: the observer of a migrating guest's heartbeat, outside both
 * VMMs. It listens on two UNIX sockets, one for the source VMM and one for
 * the destination's (QEMU: an isa-debugcon at iobase 0xe8 on a socket
 * chardev; vfiomig: `vm --heartbeat PATH`), and timestamps every byte the
 * guest's vCPU 0 writes to its heartbeat port (guest/guest.c, one byte every
 * heartbeat_us, a sequence number mod 256) with CLOCK_MONOTONIC as it reads
 * it. The blackout is the longest silence over both sockets together: the
 * time the guest did not run, as the guest and the outside world see it,
 * whatever each VMM reports as its downtime.
 *
 * usage: vfm-heartbeat SRC_SOCKET DST_SOCKET [--timeout SECONDS] [--gaps MS]
 * Prints "ready" once both listen, then runs until SIGTERM/SIGINT or the
 * timeout (default 300 s) and prints one JSON object (docs/performance.md).
 * SIGUSR1 marks the migration's start, SIGUSR2 its end: the blackout is the
 * longest silence inside that window (a host hiccup before the migration, or
 * a check of the stopped guest after it, is not its blackout); without
 * marks, the whole run. --gaps MS also lists every silence longer than MS
 * (from a second before the window to its end), where it lies and between
 * which sides: the evidence of what made each one (docs/performance.md).
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4     /* per side: a VMM that reconnects, or a stray client */

struct beat {
	uint64_t t_ns;
	uint8_t seq;
};

struct side {
	const char *name, *path;
	int lfd;
	int conn[MAX_CONNS];
	unsigned nconn;
	struct beat *b;
	size_t n, cap;
	uint64_t seq_skips;     /* beats the VMM dropped (sequence jumped) */
};

static volatile sig_atomic_t stop, mark_start, mark_end;

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		mark_start = 1;
	else if (sig == SIGUSR2)
		mark_end = 1;
	else
		stop = 1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int listen_on(struct side *s)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	if (strlen(s->path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "vfm-heartbeat: %s: path too long\n", s->path);
		return -1;
	}
	strcpy(sa.sun_path, s->path);
	unlink(s->path);
	s->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->lfd < 0 || bind(s->lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(s->lfd, MAX_CONNS) < 0) {
		fprintf(stderr, "vfm-heartbeat: %s: %s\n", s->path, strerror(errno));
		return -1;
	}
	return 0;
}

static int record(struct side *s, const unsigned char *buf, size_t n, uint64_t t)
{
	if (s->n + n > s->cap) {
		size_t cap = (s->cap ? s->cap * 2 : 4096) + n;
		struct beat *b = realloc(s->b, cap * sizeof(*b));

		if (!b)
			return -1;
		s->b = b;
		s->cap = cap;
	}
	for (size_t i = 0; i < n; i++) {
		if (s->n && (uint8_t)(s->b[s->n - 1].seq + 1) != buf[i])
			s->seq_skips++;
		s->b[s->n].t_ns = t;
		s->b[s->n++].seq = buf[i];
	}
	return 0;
}

static void drop_conn(struct side *s, unsigned i)
{
	close(s->conn[i]);
	s->conn[i] = s->conn[--s->nconn];
}

/* One poll round over both sides; -1 on a fatal error. */
static int pump(struct side *sides, int timeout_ms)
{
	struct pollfd pfd[2 * (1 + MAX_CONNS)];
	struct side *owner[2 * (1 + MAX_CONNS)];
	int conn_idx[2 * (1 + MAX_CONNS)];
	unsigned n = 0;

	for (unsigned k = 0; k < 2; k++) {
		struct side *s = &sides[k];

		if (s->nconn < MAX_CONNS) {
			pfd[n] = (struct pollfd){ .fd = s->lfd, .events = POLLIN };
			owner[n] = s;
			conn_idx[n++] = -1;
		}
		for (unsigned i = 0; i < s->nconn; i++) {
			pfd[n] = (struct pollfd){ .fd = s->conn[i], .events = POLLIN };
			owner[n] = s;
			conn_idx[n++] = (int)i;
		}
	}
	if (poll(pfd, n, timeout_ms) < 0)
		return errno == EINTR ? 0 : -1;
	/* Connections first, from the highest index, so drops keep indexes valid. */
	for (unsigned j = n; j-- > 0;) {
		struct side *s = owner[j];
		unsigned char buf[4096];
		ssize_t r;

		if (!pfd[j].revents || conn_idx[j] < 0)
			continue;
		r = read(pfd[j].fd, buf, sizeof(buf));
		if (r > 0) {
			if (record(s, buf, (size_t)r, now_ns()))
				return -1;
		} else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
			drop_conn(s, (unsigned)conn_idx[j]);
		}
	}
	for (unsigned j = 0; j < n; j++) {
		struct side *s = owner[j];
		int fd;

		if (!pfd[j].revents || conn_idx[j] >= 0)
			continue;
		fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd >= 0 && s->nconn < MAX_CONNS)
			s->conn[s->nconn++] = fd;
		else if (fd >= 0)
			close(fd);
	}
	return 0;
}

static double ms(uint64_t ns)
{
	return (double)ns / 1e6;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void print_side(const struct side *s, uint64_t t0)
{
	uint64_t max_gap = 0, *gaps = NULL;
	double median = 0;

	if (s->n > 1 && (gaps = malloc((s->n - 1) * sizeof(*gaps)))) {
		for (size_t i = 1; i < s->n; i++) {
			gaps[i - 1] = s->b[i].t_ns - s->b[i - 1].t_ns;
			if (gaps[i - 1] > max_gap)
				max_gap = gaps[i - 1];
		}
		qsort(gaps, s->n - 1, sizeof(*gaps), cmp_u64);
		median = ms(gaps[(s->n - 1) / 2]);
	}
	free(gaps);
	printf("\"%s\": {\"beats\": %zu, \"seq_skips\": %llu, \"first_ms\": %.3f, "
	       "\"last_ms\": %.3f, \"median_gap_ms\": %.3f, \"max_gap_ms\": %.3f}",
	       s->name, s->n, (unsigned long long)s->seq_skips,
	       s->n ? ms(s->b[0].t_ns - t0) : -1.0, s->n ? ms(s->b[s->n - 1].t_ns - t0) : -1.0,
	       median, ms(max_gap));
}

/*
 * The longest silence between two consecutive beats of both sides merged in
 * time order, and which sides it lies between.
 */
static void print_blackout(const struct side *src, const struct side *dst, uint64_t t0,
			   uint64_t w0, uint64_t w1)
{
	size_t i = 0, j = 0;
	uint64_t prev = 0, gap = 0, at = 0;
	int have = 0, prev_side = -1, from = -1, to = -1;

	while (i < src->n || j < dst->n) {
		int k = j >= dst->n || (i < src->n && src->b[i].t_ns <= dst->b[j].t_ns) ? 0 : 1;
		uint64_t t = k == 0 ? src->b[i++].t_ns : dst->b[j++].t_ns;

		/* The silence inside the window: a gap that runs past its end
		 * (the harness checks a stopped guest after the migration)
		 * counts up to the end only. */
		if (have && prev < w1 && t > w0) {
			uint64_t a = prev > w0 ? prev : w0, b = t < w1 ? t : w1;

			if (b - a > gap) {
				gap = b - a;
				at = prev;
				from = prev_side;
				to = k;
			}
		}
		prev = t;
		prev_side = k;
		have = 1;
	}
	/* The same measure before the window: what this host does to a guest
	 * that is not migrating (preemption of a loaded or nested host). */
	uint64_t before = 0;

	for (size_t k = 1; k < src->n && src->b[k].t_ns <= w0; k++)
		if (src->b[k].t_ns - src->b[k - 1].t_ns > before)
			before = src->b[k].t_ns - src->b[k - 1].t_ns;
	printf("\"before_max_gap_ms\": %.3f, ", ms(before));
	printf("\"blackout_ms\": %.3f, \"blackout_at_ms\": %.3f, \"blackout_between\": \"%s-%s\", "
	       "\"window_ms\": [%.3f, %.3f], ",
	       ms(gap), from >= 0 ? ms(at - t0) : -1.0, from < 0 ? "none" : from ? "dst" : "src",
	       to < 0 ? "none" : to ? "dst" : "src", ms(w0 - t0),
	       w1 == UINT64_MAX ? -1.0 : ms(w1 - t0));
	if (src->n && dst->n)
		printf("\"switch_ms\": %.3f, ", ((double)dst->b[0].t_ns - (double)src->b[src->n - 1].t_ns) / 1e6);
	else
		printf("\"switch_ms\": null, ");
}

/* Every silence longer than min_ns from a second before the window to its end. */
static void print_gaps(const struct side *src, const struct side *dst, uint64_t t0,
		       uint64_t w0, uint64_t w1, uint64_t min_ns)
{
	size_t i = 0, j = 0, shown = 0;
	uint64_t prev = 0, from_t = w0 > t0 + 1000000000ull ? w0 - 1000000000ull : t0;
	int prev_side = -1;

	printf("\"gaps\": [");
	while (i < src->n || j < dst->n) {
		int k = j >= dst->n || (i < src->n && src->b[i].t_ns <= dst->b[j].t_ns) ? 0 : 1;
		uint64_t t = k == 0 ? src->b[i++].t_ns : dst->b[j++].t_ns;

		if (prev_side >= 0 && t - prev > min_ns && t > from_t && prev < w1 && shown < 200)
			printf("%s{\"at_ms\": %.3f, \"ms\": %.3f, \"between\": \"%s-%s\"}",
			       shown++ ? ", " : "", ms(prev - t0), ms(t - prev),
			       prev_side ? "dst" : "src", k ? "dst" : "src");
		prev = t;
		prev_side = k;
	}
	printf("], ");
}

int main(int argc, char **argv)
{
	struct side sides[2] = {
		{ .name = "src", .lfd = -1 },
		{ .name = "dst", .lfd = -1 },
	};
	struct sigaction sa = { .sa_handler = on_signal };
	double timeout_s = 300, gaps_ms = -1;
	uint64_t t0, deadline, w0 = 0, w1 = UINT64_MAX;

	if (argc < 3 || argc % 2 == 0)
		goto usage;
	for (int a = 3; a + 1 < argc; a += 2) {
		char *end;
		double v = strtod(argv[a + 1], &end);

		if (!strcmp(argv[a], "--timeout") && !*end && v > 0 && v <= 3600)
			timeout_s = v;
		else if (!strcmp(argv[a], "--gaps") && !*end && v >= 0 && v <= 60000)
			gaps_ms = v;
		else if (!strcmp(argv[a], "--timeout") || !strcmp(argv[a], "--gaps")) {
			fprintf(stderr, "vfm-heartbeat: %s: '%s' is not %s\n", argv[a], argv[a + 1],
				argv[a][2] == 't' ? "0 < seconds <= 3600" : "0 <= ms <= 60000");
			return 2;
		} else {
			goto usage;
		}
	}
	sides[0].path = argv[1];
	sides[1].path = argv[2];
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (listen_on(&sides[0]) || listen_on(&sides[1]))
		return 1;
	t0 = w0 = now_ns();
	deadline = t0 + (uint64_t)(timeout_s * 1e9);
	printf("ready\n");
	fflush(stdout);
	while (!stop && now_ns() < deadline) {
		if (mark_start) {
			mark_start = 0;
			w0 = now_ns();
		}
		if (mark_end) {
			mark_end = 0;
			w1 = now_ns();
		}
		if (pump(sides, 100)) {
			fprintf(stderr, "vfm-heartbeat: %s\n", strerror(errno ? errno : ENOMEM));
			return 1;
		}
	}
	/* What is already queued still counts. */
	for (int k = 0; k < 3; k++)
		if (pump(sides, 0))
			break;
	printf("{");
	if (gaps_ms >= 0)
		print_gaps(&sides[0], &sides[1], t0, w0, w1, (uint64_t)(gaps_ms * 1e6));
	print_blackout(&sides[0], &sides[1], t0, w0, w1);
	print_side(&sides[0], t0);
	printf(", ");
	print_side(&sides[1], t0);
	printf(", \"timed_out\": %s}\n", stop ? "false" : "true");
	for (int k = 0; k < 2; k++) {
		for (unsigned i = 0; i < sides[k].nconn; i++)
			close(sides[k].conn[i]);
		close(sides[k].lfd);
		unlink(sides[k].path);
		free(sides[k].b);
	}
	return 0;
usage:
	fprintf(stderr, "usage: vfm-heartbeat SRC_SOCKET DST_SOCKET [--timeout SECONDS] "
		"[--gaps MS]\n");
	return 2;
}
