/* Migration channels: URI parsing, and tcp/unix/file/fd channels on loopback
 * and in temporary directories, with streams running over them. */
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include "harness.h"
#include "migration/channel.h"
#include "migration/stream.h"

static uint64_t ms_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static bool contains(const char *hay, const char *needle)
{
	return strstr(hay, needle) != NULL;
}

static struct vfm_uri parse_ok(const char *text)
{
	struct vfm_uri u;
	struct vfm_error err = { 0 };

	if (vfm_uri_parse(text, &u, &err))
		FAIL("'%s' rejected: %s", text, err.msg);
	return u;
}

static void check_cloexec(int fd)
{
	int fl = fcntl(fd, F_GETFD);

	CHECK(fl >= 0);
	CHECK(fl & FD_CLOEXEC);
}

static char *tmpdir(void)
{
	static char dir[64];

	strcpy(dir, "/tmp/vfm-chan-XXXXXX");
	CHECK(mkdtemp(dir) != NULL);
	return dir;
}

/* Removes a temp dir of plain entries (the tests make no subdirectories). */
static void rmtree(const char *dir, const char *const *names)
{
	char p[256];

	for (; *names; names++) {
		snprintf(p, sizeof(p), "%s/%s", dir, *names);
		unlink(p);
	}
	rmdir(dir);
}

/* ------------------------------------------------------------------------ */
/* URI parsing                                                               */

TEST(uri_parse_good)
{
	static const struct {
		const char *text;
		enum vfm_uri_kind kind;
		const char *host_or_path;
		unsigned port;
		int fd;
		const char *canon;
	} cases[] = {
		{ "tcp:127.0.0.1:4444", VFM_URI_TCP, "127.0.0.1", 4444, -1, NULL },
		{ "tcp:localhost:1", VFM_URI_TCP, "localhost", 1, -1, NULL },
		{ "tcp:example.com:65535", VFM_URI_TCP, "example.com", 65535, -1, NULL },
		{ "tcp:0.0.0.0:0", VFM_URI_TCP, "0.0.0.0", 0, -1, NULL },
		{ "tcp:[::1]:4444", VFM_URI_TCP, "::1", 4444, -1, NULL },
		{ "tcp:[::]:80", VFM_URI_TCP, "::", 80, -1, NULL },
		{ "tcp:[fe80::1%lo]:5", VFM_URI_TCP, "fe80::1%lo", 5, -1, NULL },
		{ "tcp:[localhost]:7", VFM_URI_TCP, "localhost", 7, -1, "tcp:localhost:7" },
		{ "tcp:host:007", VFM_URI_TCP, "host", 7, -1, "tcp:host:7" },
		{ "unix:/tmp/mig.sock", VFM_URI_UNIX, "/tmp/mig.sock", 0, -1, NULL },
		{ "unix:relative.sock", VFM_URI_UNIX, "relative.sock", 0, -1, NULL },
		{ "unix:/a:b", VFM_URI_UNIX, "/a:b", 0, -1, NULL },
		{ "file:/var/tmp/vm.state", VFM_URI_FILE, "/var/tmp/vm.state", 0, -1, NULL },
		{ "file:with space", VFM_URI_FILE, "with space", 0, -1, NULL },
		{ "fd:0", VFM_URI_FD, NULL, 0, 0, NULL },
		{ "fd:17", VFM_URI_FD, NULL, 0, 17, NULL },
		{ "fd:2147483647", VFM_URI_FD, NULL, 0, 2147483647, NULL },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct vfm_uri u = parse_ok(cases[i].text);
		char buf[600];

		CHECK_EQ(u.kind, cases[i].kind);
		if (u.kind == VFM_URI_TCP) {
			CHECK_STR(u.host, cases[i].host_or_path);
			CHECK_EQ(u.port, cases[i].port);
		} else if (u.kind == VFM_URI_FD) {
			CHECK_EQ(u.fd, cases[i].fd);
		} else {
			CHECK_STR(u.path, cases[i].host_or_path);
		}
		CHECK_STR(vfm_uri_str(&u, buf, sizeof(buf)),
			  cases[i].canon ? cases[i].canon : cases[i].text);
	}

	/* The longest unix path that fits sun_path (107 bytes + NUL). */
	char text[5 + 108];
	memcpy(text, "unix:", 5);
	memset(text + 5, 'a', 107);
	text[5 + 107] = '\0';
	CHECK_EQ(strlen(parse_ok(text).path), 107);

	CHECK(vfm_uri_has_return_path(&(struct vfm_uri){ .kind = VFM_URI_TCP }));
	CHECK(vfm_uri_has_return_path(&(struct vfm_uri){ .kind = VFM_URI_UNIX }));
	CHECK(!vfm_uri_has_return_path(&(struct vfm_uri){ .kind = VFM_URI_FILE }));
	CHECK(!vfm_uri_has_return_path(&(struct vfm_uri){ .kind = VFM_URI_FD }));
}

TEST(uri_parse_bad)
{
	static const struct {
		const char *text;
		const char *says;
	} bad[] = {
		{ "", "empty" },
		{ "tcp", "not a migration URI" },
		{ "/tmp/sock", "not a migration URI" },
		{ "exec:cat > f", "unknown URI scheme 'exec'" },
		{ "rdma:host:1", "unknown URI scheme 'rdma'" },
		{ "TCP:host:1", "unknown URI scheme 'TCP'" },
		{ "Tcp:host:1", "unknown" },
		{ ":4444", "unknown URI scheme ''" },
		{ "tcp:", "no port" },
		{ "tcp::4444", "empty host" },
		{ "tcp:host", "no port" },
		{ "tcp:host:", "empty port" },
		{ "tcp:host:65536", "65535" },
		{ "tcp:host:99999999999999999999", "65535" },
		{ "tcp:host:-1", "not a number" },
		{ "tcp:host:+1", "not a number" },
		{ "tcp:host:0x10", "not a number" },
		{ "tcp:host:44a", "not a number" },
		{ "tcp:host: 44", "not a number" },
		{ "tcp:::1:4444", "brackets" },
		{ "tcp:::1", "brackets" },
		{ "tcp:[::1]", "expected ':PORT'" },
		{ "tcp:[::1]4444", "expected ':PORT'" },
		{ "tcp:[::1:4444", "missing ']'" },
		{ "tcp:[]:4444", "empty host" },
		{ "tcp:[::1]:", "empty port" },
		{ "tcp:ho st:1", "invalid character" },
		{ "tcp:a/b:1", "invalid character" },
		{ "tcp:[a]b]:1", "expected ':PORT'" },
		{ "unix:", "empty path" },
		{ "file:", "empty path" },
		{ "fd:", "fd:N" },
		{ "fd:-1", "fd:N" },
		{ "fd:x", "fd:N" },
		{ "fd:3x", "fd:N" },
		{ "fd: 3", "fd:N" },
		{ "fd:2147483648", "fd:N" },
	};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct vfm_uri u = { .kind = VFM_URI_FD, .fd = 1234 };
		struct vfm_error err = { 0 };

		if (vfm_uri_parse(bad[i].text, &u, &err) != VFM_EPARSE)
			FAIL("'%s' accepted", bad[i].text);
		if (!contains(err.msg, bad[i].says))
			FAIL("'%s': message '%s' lacks '%s'", bad[i].text, err.msg, bad[i].says);
		CHECK_EQ(u.fd, 1234);   /* untouched on error */
	}
	CHECK_EQ(vfm_uri_parse(NULL, &(struct vfm_uri){ 0 }, NULL), VFM_EPARSE);

	/* Host and paths one byte too long. */
	char text[600];
	struct vfm_error err = { 0 };
	memcpy(text, "unix:", 5);
	memset(text + 5, 'a', 108);
	text[5 + 108] = '\0';
	CHECK_EQ(vfm_uri_parse(text, &(struct vfm_uri){ 0 }, &err), VFM_EPARSE);
	CHECK(contains(err.msg, "too long") && contains(err.msg, "unix socket"));
	memcpy(text, "file:", 5);
	CHECK_EQ(vfm_uri_parse(text, &(struct vfm_uri){ 0 }, NULL), VFM_EPARSE);
	memcpy(text, "tcp:", 4);
	memset(text + 4, 'h', 256);
	strcpy(text + 4 + 256, ":1");
	vfm_error_clear(&err);
	CHECK_EQ(vfm_uri_parse(text, &(struct vfm_uri){ 0 }, &err), VFM_EPARSE);
	if (!contains(err.msg, "longer than 255"))
		FAIL("long host: %s", err.msg);
	text[4 + 255] = ':';
	text[4 + 256] = '1';
	text[4 + 257] = '\0';
	CHECK_EQ(parse_ok(text).port, 1);
}

/* ------------------------------------------------------------------------ */
/* Streams both ways over a connected pair                                   */

static void exchange(int src_fd, int dst_fd)
{
	struct vfm_stream *out, *in, *rp_w, *rp_r;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;

	CHECK_EQ(vfm_stream_open(src_fd, 2000, &out, &err), 0);
	CHECK_EQ(vfm_stream_open(src_fd, 2000, &rp_r, &err), 0);
	CHECK_EQ(vfm_stream_open(dst_fd, 2000, &in, &err), 0);
	CHECK_EQ(vfm_stream_open(dst_fd, 2000, &rp_w, &err), 0);
	vfm_stream_write_header(out);
	vfm_stream_put_record(out, VFM_REC_PING, 0, 0, "token-01", 8);
	vfm_stream_flush(out);
	CHECK_EQ(vfm_stream_error(out, NULL), 0);
	if (vfm_stream_read_header(in, &err) || vfm_stream_get_record(in, &h, &p, 8, &err))
		FAIL("destination: %s", err.msg);
	CHECK_EQ(h.type, VFM_REC_PING);
	CHECK(!memcmp(p, "token-01", 8));
	vfm_stream_write_header(rp_w);
	vfm_stream_put_record(rp_w, VFM_REC_RP_PONG, 0, 0, p, 8);
	vfm_stream_flush(rp_w);
	if (vfm_stream_read_header(rp_r, &err) || vfm_stream_get_record(rp_r, &h, &p, 16, &err))
		FAIL("return path: %s", err.msg);
	CHECK_EQ(h.type, VFM_REC_RP_PONG);
	CHECK(!memcmp(p, "token-01", 8));
	vfm_stream_free(out);
	vfm_stream_free(in);
	vfm_stream_free(rp_w);
	vfm_stream_free(rp_r);
}

static int get_int_opt(int fd, int level, int opt)
{
	int v = -1;
	socklen_t l = sizeof(v);

	CHECK(getsockopt(fd, level, opt, &v, &l) == 0);
	return v;
}

/* ------------------------------------------------------------------------ */
/* tcp                                                                       */

static void tcp_pair(const char *listen_text)
{
	struct vfm_uri u = parse_ok(listen_text), cu;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	int cfd = -1, afd = -1;
	char buf[300];

	if (vfm_listen(&u, &l, &err)) {
		if (strchr(listen_text, '[') && (err.code == -EADDRNOTAVAIL ||
						 err.code == -EAFNOSUPPORT))
			SKIP("no IPv6 loopback: %s", err.msg);
		FAIL("listen: %s", err.msg);
	}
	CHECK(u.port > 0);             /* the listener picked a port and said which */
	CHECK(vfm_listener_fd(l) >= 0);
	check_cloexec(vfm_listener_fd(l));
	cu = parse_ok(vfm_uri_str(&u, buf, sizeof(buf)));
	if (vfm_connect(&cu, 2000, &cfd, &err))
		FAIL("connect %s: %s", buf, err.msg);
	if (vfm_accept(l, 2000, &afd, &err))
		FAIL("accept: %s", err.msg);
	check_cloexec(cfd);
	check_cloexec(afd);
	CHECK_EQ(get_int_opt(cfd, IPPROTO_TCP, TCP_NODELAY), 1);
	CHECK_EQ(get_int_opt(afd, IPPROTO_TCP, TCP_NODELAY), 1);
	CHECK(!(fcntl(cfd, F_GETFL) & O_NONBLOCK));
	CHECK(!(fcntl(afd, F_GETFL) & O_NONBLOCK));
	exchange(cfd, afd);
	close(cfd);
	close(afd);
	vfm_listener_close(l);
}

TEST(tcp_ipv4_port0)
{
	tcp_pair("tcp:127.0.0.1:0");
}

TEST(tcp_ipv6_port0)
{
	tcp_pair("tcp:[::1]:0");
}

TEST(tcp_listen_busy_port)
{
	struct vfm_uri u = parse_ok("tcp:127.0.0.1:0");
	struct vfm_listener *l1, *l2;
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_listen(&u, &l1, &err), 0);
	CHECK_EQ(vfm_listen(&u, &l2, &err), -EADDRINUSE);
	CHECK(contains(err.msg, "cannot listen on tcp:127.0.0.1:"));
	vfm_listener_close(l1);
	/* SO_REUSEADDR: the port is free again at once, connections or not. */
	CHECK_EQ(vfm_listen(&u, &l2, NULL), 0);
	vfm_listener_close(l2);
}

/* A port that nobody listens on: bound (so nobody else takes it) but not listening. */
TEST(tcp_connect_refused_quickly)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof(sa);
	int hold = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct vfm_error err = { 0 };
	struct vfm_uri u;
	char text[64];
	uint64_t t0;
	int fd = -1;

	CHECK(hold >= 0);
	CHECK(bind(hold, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	CHECK(getsockname(hold, (struct sockaddr *)&sa, &sl) == 0);
	snprintf(text, sizeof(text), "tcp:127.0.0.1:%u", ntohs(sa.sin_port));
	u = parse_ok(text);
	t0 = ms_now();
	CHECK_EQ(vfm_connect(&u, 5000, &fd, &err), -ECONNREFUSED);
	CHECK(ms_now() - t0 < 1000);
	CHECK_EQ(fd, -1);
	CHECK(contains(err.msg, text));
	CHECK(contains(err.msg, "refused"));
	close(hold);

	/* Port 0 is for listeners only. */
	vfm_error_clear(&err);
	CHECK_EQ(vfm_connect(&(struct vfm_uri){ .kind = VFM_URI_TCP, .host = "127.0.0.1" }, 100,
			     &fd, &err), -EINVAL);
	CHECK(contains(err.msg, "port 0"));
	/* A name that cannot resolve. */
	vfm_error_clear(&err);
	u = parse_ok("tcp:no-such-host.invalid:1");
	CHECK(vfm_connect(&u, 1000, &fd, &err) < 0);
	CHECK(contains(err.msg, "no-such-host.invalid"));
}

static void check_accept_timeout(const char *text)
{
	struct vfm_uri u = parse_ok(text);
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	uint64_t t0, el;
	int fd = -1;

	CHECK_EQ(vfm_listen(&u, &l, &err), 0);
	t0 = ms_now();
	CHECK_EQ(vfm_accept(l, 200, &fd, &err), -ETIMEDOUT);
	el = ms_now() - t0;
	if (el < 190 || el > 1500)
		FAIL("accept gave up after %llu ms", (unsigned long long)el);
	CHECK(contains(err.msg, "200 ms"));
	CHECK_EQ(fd, -1);
	vfm_error_clear(&err);
	CHECK_EQ(vfm_accept(l, 0, &fd, &err), -ETIMEDOUT);
	vfm_listener_close(l);
}

TEST(tcp_accept_timeout)
{
	check_accept_timeout("tcp:127.0.0.1:0");
}

/* ------------------------------------------------------------------------ */
/* unix                                                                      */

static void sock_uri(struct vfm_uri *u, const char *dir, const char *name)
{
	char text[200];

	snprintf(text, sizeof(text), "unix:%s/%s", dir, name);
	*u = parse_ok(text);
}

TEST(unix_socket_mode_and_cleanup)
{
	const char *dir = tmpdir();
	struct vfm_uri u;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	struct stat st;
	int cfd, afd;

	umask(0);   /* the 0600 must not depend on the caller's umask */
	sock_uri(&u, dir, "mig.sock");
	if (vfm_listen(&u, &l, &err))
		FAIL("listen: %s", err.msg);
	CHECK(lstat(u.path, &st) == 0);
	CHECK(S_ISSOCK(st.st_mode));
	CHECK_EQ(st.st_mode & 07777, 0600);
	check_cloexec(vfm_listener_fd(l));
	CHECK_EQ(vfm_connect(&u, 2000, &cfd, &err), 0);
	CHECK_EQ(vfm_accept(l, 2000, &afd, &err), 0);
	check_cloexec(cfd);
	check_cloexec(afd);
	CHECK(!(fcntl(cfd, F_GETFL) & O_NONBLOCK));
	/* Both ends asked for large buffers (granted up to wmem_max; doubled by Linux). */
	CHECK(get_int_opt(cfd, SOL_SOCKET, SO_SNDBUF) >= 400000);
	CHECK(get_int_opt(afd, SOL_SOCKET, SO_SNDBUF) >= 400000);
	exchange(cfd, afd);
	close(cfd);
	close(afd);
	vfm_listener_close(l);
	CHECK(lstat(u.path, &st) < 0 && errno == ENOENT);
	CHECK(rmdir(dir) == 0);
}

TEST(unix_accept_timeout)
{
	const char *dir = tmpdir();
	char text[200];

	snprintf(text, sizeof(text), "unix:%s/s", dir);
	check_accept_timeout(text);
	CHECK(rmdir(dir) == 0);   /* the socket file went with the listener */
}

TEST(unix_stale_socket_replaced)
{
	const char *dir = tmpdir();
	struct vfm_uri u;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat after;
	int fd, cfd, afd;

	sock_uri(&u, dir, "s");
	/* A socket file whose process is gone: bound, never listening, closed. */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	strcpy(sa.sun_path, u.path);
	CHECK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	close(fd);
	if (vfm_listen(&u, &l, &err))
		FAIL("stale socket not replaced: %s", err.msg);
	/* (The inode number may be reused: a working connection is the proof.) */
	CHECK(lstat(u.path, &after) == 0 && S_ISSOCK(after.st_mode));
	CHECK_EQ(vfm_connect(&u, 2000, &cfd, &err), 0);
	CHECK_EQ(vfm_accept(l, 2000, &afd, &err), 0);
	close(cfd);
	close(afd);
	vfm_listener_close(l);
	CHECK(rmdir(dir) == 0);
}

TEST(unix_live_socket_not_stolen)
{
	const char *dir = tmpdir();
	struct vfm_uri u;
	struct vfm_listener *l1, *l2;
	struct vfm_error err = { 0 };
	int cfd, afd;

	sock_uri(&u, dir, "s");
	CHECK_EQ(vfm_listen(&u, &l1, &err), 0);
	CHECK_EQ(vfm_listen(&u, &l2, &err), -EADDRINUSE);
	CHECK(contains(err.msg, "another process is listening"));
	/* The first listener still works. */
	CHECK_EQ(vfm_connect(&u, 2000, &cfd, NULL), 0);
	close(cfd);
	/* (The probe connection is in its queue too.) */
	CHECK_EQ(vfm_accept(l1, 2000, &afd, NULL), 0);
	close(afd);
	vfm_listener_close(l1);
	CHECK(rmdir(dir) == 0);
}

TEST(unix_regular_file_refused)
{
	const char *dir = tmpdir();
	struct vfm_uri u;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	char buf[8] = { 0 };
	int fd;

	sock_uri(&u, dir, "precious");
	fd = open(u.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	CHECK(fd >= 0);
	CHECK(write(fd, "keep", 4) == 4);
	close(fd);
	CHECK_EQ(vfm_listen(&u, &l, &err), -EEXIST);
	CHECK(contains(err.msg, "regular file") && contains(err.msg, "refusing"));
	fd = open(u.path, O_RDONLY | O_CLOEXEC);
	CHECK(fd >= 0);
	CHECK(read(fd, buf, sizeof(buf)) == 4);
	CHECK_STR(buf, "keep");
	close(fd);
	/* A directory is refused the same way. */
	vfm_error_clear(&err);
	sock_uri(&u, dir, "d");
	CHECK(mkdir(u.path, 0700) == 0);
	CHECK_EQ(vfm_listen(&u, &l, &err), -EEXIST);
	CHECK(contains(err.msg, "directory"));
	CHECK(rmdir(u.path) == 0);
	rmtree(dir, (const char *const[]){ "precious", NULL });
}

TEST(unix_symlink_refused)
{
	const char *dir = tmpdir();
	struct vfm_uri u, target;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd;

	/* A link to a stale socket (which alone would be replaced)... */
	sock_uri(&target, dir, "target");
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	strcpy(sa.sun_path, target.path);
	CHECK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	close(fd);
	sock_uri(&u, dir, "link");
	CHECK(symlink(target.path, u.path) == 0);
	CHECK_EQ(vfm_listen(&u, &l, &err), -EEXIST);
	CHECK(contains(err.msg, "symbolic link"));
	CHECK(lstat(u.path, &st) == 0 && S_ISLNK(st.st_mode));
	CHECK(lstat(target.path, &st) == 0 && S_ISSOCK(st.st_mode));
	/* ...and a dangling one, which must not be followed to create a file. */
	CHECK(unlink(target.path) == 0);
	vfm_error_clear(&err);
	CHECK_EQ(vfm_listen(&u, &l, &err), -EEXIST);
	CHECK(lstat(target.path, &st) < 0 && errno == ENOENT);
	rmtree(dir, (const char *const[]){ "link", NULL });
}

TEST(unix_close_spares_a_replaced_path)
{
	const char *dir = tmpdir();
	struct vfm_uri u;
	struct vfm_listener *l;
	struct stat st;
	int fd;

	sock_uri(&u, dir, "s");
	CHECK_EQ(vfm_listen(&u, &l, NULL), 0);
	/* Someone else took the path meanwhile: closing must not delete theirs. */
	CHECK(unlink(u.path) == 0);
	fd = open(u.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	CHECK(fd >= 0);
	close(fd);
	vfm_listener_close(l);
	CHECK(lstat(u.path, &st) == 0 && S_ISREG(st.st_mode));
	rmtree(dir, (const char *const[]){ "s", NULL });
}

TEST(unix_connect_errors)
{
	const char *dir = tmpdir();
	struct vfm_uri u;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	uint64_t t0;
	int fd = -1, got_timeout = 0, fds[64], n = 0;

	sock_uri(&u, dir, "nobody");
	t0 = ms_now();
	CHECK_EQ(vfm_connect(&u, 2000, &fd, &err), -ENOENT);
	CHECK(ms_now() - t0 < 500);
	CHECK(contains(err.msg, "is the destination listening"));

	/* A listener that never accepts: once its backlog is full, connect
	 * waits and gives up at the deadline. */
	sock_uri(&u, dir, "busy");
	CHECK_EQ(vfm_listen(&u, &l, NULL), 0);
	while (n < 64) {
		vfm_error_clear(&err);
		t0 = ms_now();
		int ret = vfm_connect(&u, 150, &fds[n], &err);
		if (ret == -ETIMEDOUT) {
			uint64_t el = ms_now() - t0;
			if (el < 140 || el > 1500)
				FAIL("connect gave up after %llu ms", (unsigned long long)el);
			CHECK(contains(err.msg, "150 ms"));
			got_timeout = 1;
			break;
		}
		CHECK_EQ(ret, 0);
		n++;
	}
	CHECK(got_timeout);
	while (n)
		close(fds[--n]);
	vfm_listener_close(l);
	CHECK(rmdir(dir) == 0);
}

/* ------------------------------------------------------------------------ */
/* file: and fd:                                                             */

TEST(file_write_then_read)
{
	const char *dir = tmpdir();
	char text[200];
	struct vfm_uri u;
	struct vfm_listener *l;
	struct vfm_stream *s;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;
	struct stat st;
	int fd = -1, fd2;

	snprintf(text, sizeof(text), "file:%s/state", dir);
	u = parse_ok(text);
	/* The destination of a file has nothing to read yet. */
	CHECK_EQ(vfm_listen(&u, &l, &err), -ENOENT);
	CHECK(contains(err.msg, "state"));

	umask(0);
	CHECK_EQ(vfm_connect(&u, 100, &fd, &err), 0);
	check_cloexec(fd);
	CHECK(fstat(fd, &st) == 0);
	CHECK_EQ(st.st_mode & 07777, 0600);
	CHECK_EQ(vfm_stream_open(fd, 100, &s, &err), 0);
	vfm_stream_write_header(s);
	vfm_stream_put_record(s, VFM_REC_CONFIG, 0, 16, "config", 6);
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
	vfm_stream_flush(s);
	CHECK_EQ(vfm_stream_error(s, NULL), 0);
	vfm_stream_free(s);
	close(fd);

	CHECK_EQ(vfm_listen(&u, &l, &err), 0);
	CHECK_EQ(vfm_listener_fd(l), -1);
	CHECK_EQ(vfm_accept(l, 0, &fd, &err), 0);
	check_cloexec(fd);
	CHECK_EQ(vfm_accept(l, 0, &fd2, &err), -EINVAL);  /* one stream per file */
	vfm_listener_close(l);
	CHECK_EQ(vfm_stream_open(fd, 100, &s, &err), 0);
	CHECK_EQ(vfm_stream_read_header(s, &err), 0);
	CHECK_EQ(vfm_stream_get_record(s, &h, &p, 100, &err), 0);
	CHECK_EQ(h.type, VFM_REC_CONFIG);
	CHECK(!memcmp(p, "config", 6));
	CHECK_EQ(vfm_stream_get_record(s, &h, &p, 100, &err), 0);
	CHECK_EQ(h.type, VFM_REC_EOS);
	vfm_stream_free(s);
	close(fd);

	/* A second save truncates. */
	CHECK_EQ(vfm_connect(&u, 100, &fd, &err), 0);
	close(fd);
	CHECK(stat(u.path, &st) == 0 && st.st_size == 0);
	rmtree(dir, (const char *const[]){ "state", NULL });
}

TEST(fd_uri)
{
	struct vfm_listener *l;
	struct vfm_stream *w, *r;
	struct vfm_error err = { 0 };
	struct vfm_rec_hdr h;
	const void *p;
	struct vfm_uri src, dst;
	char text[32];
	int pfd[2], wfd = -1, rfd = -1, other;

	CHECK(pipe(pfd) == 0);   /* not close-on-exec: as a parent would pass them */
	snprintf(text, sizeof(text), "fd:%d", pfd[1]);
	src = parse_ok(text);
	snprintf(text, sizeof(text), "fd:%d", pfd[0]);
	dst = parse_ok(text);

	CHECK_EQ(vfm_connect(&src, 100, &wfd, &err), 0);
	CHECK(wfd != pfd[1]);     /* a duplicate: the number given stays its owner's */
	check_cloexec(wfd);
	CHECK_EQ(vfm_listen(&dst, &l, &err), 0);
	CHECK_EQ(vfm_listener_fd(l), -1);
	CHECK_EQ(vfm_accept(l, 100, &rfd, &err), 0);
	CHECK(rfd != pfd[0]);
	check_cloexec(rfd);
	CHECK_EQ(vfm_accept(l, 100, &other, &err), -EINVAL);
	vfm_listener_close(l);
	CHECK(fcntl(pfd[0], F_GETFD) >= 0);   /* closing the listener kept the original */

	CHECK_EQ(vfm_stream_open(wfd, 1000, &w, &err), 0);
	CHECK_EQ(vfm_stream_open(rfd, 1000, &r, &err), 0);
	vfm_stream_write_header(w);
	vfm_stream_put_record(w, VFM_REC_SYNC, 0, 0, "\7\0\0\0\0\0\0\0", 8);
	vfm_stream_flush(w);
	CHECK_EQ(vfm_stream_error(w, NULL), 0);
	CHECK_EQ(vfm_stream_read_header(r, &err), 0);
	CHECK_EQ(vfm_stream_get_record(r, &h, &p, 8, &err), 0);
	CHECK_EQ(vfm_get_le64(p), 7);
	vfm_stream_free(w);
	vfm_stream_free(r);
	close(wfd);
	close(rfd);
	close(pfd[0]);
	close(pfd[1]);

	/* Numbers that are not open. */
	snprintf(text, sizeof(text), "fd:%d", pfd[1]);
	src = parse_ok(text);
	vfm_error_clear(&err);
	CHECK_EQ(vfm_connect(&src, 100, &wfd, &err), -EBADF);
	CHECK(contains(err.msg, "not an open file descriptor"));
	vfm_error_clear(&err);
	CHECK_EQ(vfm_listen(&src, &l, &err), -EBADF);
	CHECK(contains(err.msg, "not an open file descriptor"));
}

/*
 * Closing a listener removes only the socket file it made: when another
 * listener has taken the path since, that one's file stays and still
 * answers. NULL is a no-op. (Mutation caught: the inode comparison in
 * vfm_listener_close dropped, so the newer listener's file is unlinked.)
 */
TEST(listener_close_leaves_a_newer_socket)
{
	const char *dir = tmpdir();
	struct vfm_listener *a, *b;
	struct vfm_error err = { 0 };
	struct vfm_uri u;
	struct stat st;
	int cfd, afd;

	vfm_listener_close(NULL);
	sock_uri(&u, dir, "s");
	if (vfm_listen(&u, &a, &err))
		FAIL("listen a: %s", err.msg);
	CHECK(unlink(u.path) == 0);   /* someone removed it; b listens there now */
	if (vfm_listen(&u, &b, &err))
		FAIL("listen b: %s", err.msg);
	vfm_listener_close(a);
	CHECK(lstat(u.path, &st) == 0 && S_ISSOCK(st.st_mode));
	CHECK_EQ(vfm_connect(&u, 2000, &cfd, &err), 0);
	CHECK_EQ(vfm_accept(b, 2000, &afd, &err), 0);
	close(cfd);
	close(afd);
	vfm_listener_close(b);
	CHECK(lstat(u.path, &st) < 0 && errno == ENOENT);
	CHECK(rmdir(dir) == 0);
}
