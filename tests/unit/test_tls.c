/*
 * TLS on migration channels over loopback: x509 and PSK connections carrying
 * streams both ways through the relay, and every refusal (wrong CA, wrong
 * hostname, expired and not-yet-valid certificates, a client of another CA,
 * tls-authz, wrong PSK, plaintext, a stalled handshake) with the listener
 * taking the next, real, connection. Also the plaintext-listener rule and
 * the keys.psk parser.
 */
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "harness.h"
#include "migration/channel.h"
#include "migration/stream.h"
#include "migration/tls.h"
#include "../../tools/tls-gen.h"
#include "vfiomig/migration.h"

static char root[64];

/* dir/NAME: fresh credentials of kind (x509 with o, or psk with identity id). */
static const char *creds(const char *name, const struct tls_gen_opts *o, const char *psk_id)
{
	static char paths[8][128];
	static unsigned n;
	struct vfm_error err = { 0 };
	char *p = paths[n++ % 8];

	if (!root[0]) {
		strcpy(root, "/tmp/vfm-tls-XXXXXX");
		CHECK(mkdtemp(root) != NULL);
	}
	snprintf(p, 128, "%s/%s", root, name);
	CHECK(mkdir(p, 0700) == 0);
	if (psk_id) {
		if (tls_gen_psk(p, psk_id, &err))
			FAIL("psk: %s", err.msg);
	} else {
		struct tls_gen_opts d;

		tls_gen_opts_default(&d);
		if (tls_gen_x509(p, o ? o : &d, &err))
			FAIL("x509: %s", err.msg);
	}
	return p;
}

static void copy(const char *from_dir, const char *to_dir, const char *name)
{
	char a[256], b[256], cmd[600];

	snprintf(a, sizeof(a), "%s/%s", from_dir, name);
	snprintf(b, sizeof(b), "%s/%s", to_dir, name);
	snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", a, b);
	CHECK(system(cmd) == 0);
}

static void cleanup(void)
{
	char cmd[128];

	if (root[0]) {
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
		if (system(cmd)) {}
		root[0] = '\0';
	}
}

struct client {
	struct vfm_uri uri;
	struct vfm_migration_params p;     /* the good client */
	struct vfm_migration_params bad;   /* tried first when bad_kind != NONE */
	enum { NONE, TLS_BAD, RAW_STALL, RAW_PLAIN } bad_kind;
	struct vfm_error bad_err;
	int bad_ret;
	int good_ret;
	struct vfm_error good_err;
};

#define PAYLOAD (3u << 20)

/* Writes PAYLOAD bytes of a pattern as records and reads one record back. */
static int talk_client(int fd, struct vfm_error *err)
{
	static unsigned char buf[1u << 20];
	struct vfm_stream *s, *r;
	struct vfm_rec_hdr h;
	const void *pl;
	int ret;

	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (unsigned char)(i * 7 + 3);
	if ((ret = vfm_stream_open(fd, 5000, &s, err)))
		return ret;
	if ((ret = vfm_stream_open(fd, 5000, &r, err)))
		return ret;
	vfm_stream_write_header(s);
	for (unsigned i = 0; i < PAYLOAD / sizeof(buf); i++)
		vfm_stream_put_record(s, VFM_REC_DATA, 0, i, buf, sizeof(buf));
	vfm_stream_put_record(s, VFM_REC_EOS, 0, 0, NULL, 0);
	vfm_stream_flush(s);
	ret = vfm_stream_error(s, err);
	if (!ret)
		ret = vfm_stream_get_record(r, &h, &pl, 64, err);
	if (!ret && (h.type != VFM_REC_RP_ACK || h.section != 42))
		ret = vfm_error_set(err, -EPROTO, "unexpected reply %u", h.type);
	vfm_stream_free(s);
	vfm_stream_free(r);
	return ret;
}

static void *client_main(void *arg)
{
	struct client *c = arg;
	int fd = -1;

	if (c->bad_kind == TLS_BAD) {
		c->bad_ret = vfm_connect_mig(&c->uri, &c->bad, NULL, &fd, &c->bad_err);
		if (!c->bad_ret)
			close(fd);
	} else if (c->bad_kind == RAW_STALL) {
		/* Connects and says nothing for longer than the handshake bound. */
		c->bad_ret = vfm_connect(&c->uri, 2000, &fd, &c->bad_err);
		nap_ms(900);
		close(fd);
	} else if (c->bad_kind == RAW_PLAIN) {
		/* A source without TLS: it hears why on its return path. */
		struct vfm_stream *s, *r;
		struct vfm_rec_hdr h;
		const void *pl;

		c->bad_ret = vfm_connect(&c->uri, 2000, &fd, &c->bad_err);
		if (!c->bad_ret && !vfm_stream_open(fd, 3000, &s, NULL) &&
		    !vfm_stream_open(fd, 3000, &r, NULL)) {
			vfm_stream_write_header(s);
			vfm_stream_flush(s);
			c->bad_ret = vfm_stream_get_record(r, &h, &pl, 4096, &c->bad_err);
			if (!c->bad_ret && h.type == VFM_REC_RP_ERROR)
				snprintf(c->bad_err.msg, sizeof(c->bad_err.msg), "%.*s",
					 (int)h.length - 4, (const char *)pl + 4);
			vfm_stream_free(s);
			vfm_stream_free(r);
		}
		close(fd);
	}
	c->good_ret = vfm_connect_mig(&c->uri, &c->p, NULL, &fd, &c->good_err);
	if (!c->good_ret) {
		c->good_ret = talk_client(fd, &c->good_err);
		close(fd);
	}
	return NULL;
}

/* The destination's side: reads everything the client wrote, answers. */
static void talk_server(int fd)
{
	struct vfm_stream *s, *r;
	struct vfm_rec_hdr h;
	const void *pl;
	struct vfm_error err = { 0 };
	uint64_t got = 0;

	CHECK(vfm_stream_open(fd, 5000, &s, &err) == 0);
	CHECK(vfm_stream_open(fd, 5000, &r, &err) == 0);
	if (vfm_stream_read_header(r, &err))
		FAIL("header: %s", err.msg);
	for (;;) {
		if (vfm_stream_get_record(r, &h, &pl, 1u << 20, &err))
			FAIL("record: %s", err.msg);
		if (h.type == VFM_REC_EOS)
			break;
		for (uint32_t i = 0; i < h.length; i += 4099)
			CHECK_EQ(((const unsigned char *)pl)[i], (unsigned char)(i * 7 + 3));
		got += h.length;
	}
	CHECK_EQ(got, (uint64_t)PAYLOAD);
	vfm_stream_put_record(s, VFM_REC_RP_ACK, 0, 42, NULL, 0);
	vfm_stream_flush(s);
	CHECK(vfm_stream_error(s, NULL) == 0);
	vfm_stream_free(s);
	vfm_stream_free(r);
}

/* Refusals are counted by the handshake threads: wait for the count (2 s). */
static void check_refused(struct vfm_listener *l, unsigned want)
{
	uint64_t t0 = now_ms();

	while (vfm_listener_refused(l) < want && now_ms() - t0 < 2000)
		nap_ms(10);
	CHECK_EQ(vfm_listener_refused(l), want);
}

/*
 * Listens with server params sp, runs the client c; the listener must
 * refuse `refusals` connections and then carry the good one.
 */
static void run(struct vfm_migration_params *sp, struct client *c, unsigned refusals)
{
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	atomic_bool cancel = false;
	pthread_t th;
	struct stat st;
	int fd;

	c->uri = (struct vfm_uri){ 0 };
	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &c->uri, &err) == 0);
	if (vfm_listen_mig(&c->uri, sp, &cancel, &l, &err))
		FAIL("listen: %s", err.msg);
	CHECK(pthread_create(&th, NULL, client_main, c) == 0);
	if (vfm_accept(l, 8000, &fd, &err))
		FAIL("accept: %s (client: %s / %s)", err.msg, c->bad_err.msg, c->good_err.msg);
	/* The engine gets the relay's plaintext end, never the TCP socket. */
	CHECK(fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode));
	{
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);

		CHECK(getsockname(fd, (struct sockaddr *)&ss, &sl) == 0);
		CHECK_EQ(ss.ss_family, sp->tls_creds[0] ? AF_UNIX : AF_INET);
	}
	talk_server(fd);
	pthread_join(th, NULL);
	close(fd);
	if (c->good_ret)
		FAIL("good client: %s", c->good_err.msg);
	check_refused(l, refusals);
	vfm_listener_close(l);
	cleanup();
}

static void params(struct vfm_migration_params *p, const char *kind, const char *dir)
{
	vfm_migration_params_default(p);
	p->timeout_ms = 5000;
	snprintf(p->tls_creds, sizeof(p->tls_creds), "%s:%s", kind, dir);
}

static void expect_refused(const struct client *c, const char *why)
{
	if (!c->bad_ret)
		FAIL("the bad client got through");
	if (!strstr(c->bad_err.msg, why))
		FAIL("bad client's error '%s' lacks '%s'", c->bad_err.msg, why);
}

TEST(x509_both_ways)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp;
	struct client c = { 0 };

	params(&sp, "x509", d);
	params(&c.p, "x509", d);
	run(&sp, &c, 0);
}

TEST(psk_both_ways)
{
	const char *d = creds("p", NULL, "qemu");
	struct vfm_migration_params sp;
	struct client c = { 0 };

	params(&sp, "psk", d);
	params(&c.p, "psk", d);
	run(&sp, &c, 0);
}

TEST(unix_socket_with_tls)
{
	const char *d = creds("u", NULL, NULL);
	struct vfm_migration_params sp;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	struct client c = { 0 };
	char uri[160];
	pthread_t th;
	int fd;

	params(&sp, "x509", d);
	params(&c.p, "x509", d);
	snprintf(uri, sizeof(uri), "unix:%s/sock", d);
	CHECK(vfm_uri_parse(uri, &c.uri, &err) == 0);
	CHECK(vfm_listen_mig(&c.uri, &sp, NULL, &l, &err) == 0);
	CHECK(pthread_create(&th, NULL, client_main, &c) == 0);
	if (vfm_accept(l, 8000, &fd, &err))
		FAIL("accept: %s / %s", err.msg, c.good_err.msg);
	talk_server(fd);
	pthread_join(th, NULL);
	close(fd);
	CHECK(c.good_ret == 0);
	vfm_listener_close(l);
	cleanup();
}

TEST(wrong_ca_refused)
{
	const char *good = creds("a", NULL, NULL), *other = creds("b", NULL, NULL);
	const char *mixed = creds("m", NULL, NULL);
	struct vfm_migration_params sp;
	struct client c = { .bad_kind = TLS_BAD };

	/* The client trusts another CA than the one that signed the server. */
	copy(other, mixed, "ca-cert.pem");
	params(&sp, "x509", good);
	params(&c.p, "x509", good);
	params(&c.bad, "x509", mixed);
	run(&sp, &c, 1);
	expect_refused(&c, "issuer is unknown");
}

TEST(wrong_hostname_refused)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp;
	struct client c = { .bad_kind = TLS_BAD };

	params(&sp, "x509", d);
	params(&c.p, "x509", d);
	params(&c.bad, "x509", d);
	snprintf(c.bad.tls_hostname, sizeof(c.bad.tls_hostname), "dest.example.org");
	run(&sp, &c, 1);
	expect_refused(&c, "does not match");
}

/*
 * Only a refused connection: the client (params cp) fails with `why` in
 * its message, the listener refuses it and goes on waiting.
 */
static void refused_only(struct vfm_migration_params *sp, struct vfm_migration_params *cp,
			 const char *why)
{
	struct client c = { .p = *cp };
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	pthread_t th;
	int fd;

	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &c.uri, &err) == 0);
	CHECK(vfm_listen_mig(&c.uri, sp, NULL, &l, &err) == 0);
	CHECK(pthread_create(&th, NULL, client_main, &c) == 0);
	CHECK_EQ(vfm_accept(l, 2500, &fd, &err), -ETIMEDOUT);
	pthread_join(th, NULL);
	CHECK(c.good_ret != 0);
	if (!strstr(c.good_err.msg, why))
		FAIL("client's error '%s' lacks '%s'", c.good_err.msg, why);
	check_refused(l, 1);
	vfm_listener_close(l);
}

TEST(expired_server_cert_refused)
{
	struct vfm_migration_params sp, cp;
	struct tls_gen_opts o;
	const char *d;

	tls_gen_opts_default(&o);
	o.server_not_before_s = -7200;
	o.server_not_after_s = -60;
	d = creds("old", &o, NULL);
	params(&sp, "x509", d);
	params(&cp, "x509", d);
	refused_only(&sp, &cp, "expired");
	cleanup();
}

TEST(not_yet_valid_certs_refused)
{
	struct vfm_migration_params sp, cp;
	struct tls_gen_opts o;
	const char *d;

	/* The server's: the client refuses. */
	tls_gen_opts_default(&o);
	o.server_not_before_s = 3600;
	d = creds("f", &o, NULL);
	params(&sp, "x509", d);
	params(&cp, "x509", d);
	refused_only(&sp, &cp, "not yet valid");
	/* The client's: the server refuses, and says so to the client. */
	tls_gen_opts_default(&o);
	o.client_not_before_s = 3600;
	d = creds("g", &o, NULL);
	params(&sp, "x509", d);
	params(&cp, "x509", d);
	refused_only(&sp, &cp, "the peer refused");
	/* An expired client certificate likewise. */
	tls_gen_opts_default(&o);
	o.client_not_before_s = -7200;
	o.client_not_after_s = -60;
	d = creds("h", &o, NULL);
	params(&sp, "x509", d);
	params(&cp, "x509", d);
	refused_only(&sp, &cp, "the peer refused");
	cleanup();
}

TEST(client_of_another_ca_refused)
{
	const char *good = creds("a", NULL, NULL), *other = creds("b", NULL, NULL);
	const char *mixed = creds("m", NULL, NULL);
	struct vfm_migration_params sp;
	struct client c = { .bad_kind = TLS_BAD };

	/* Trusts the right CA (the server checks out) but presents a client
	 * certificate of another CA: the server refuses, the client hears why. */
	copy(good, mixed, "ca-cert.pem");
	copy(other, mixed, "client-cert.pem");
	copy(other, mixed, "client-key.pem");
	params(&sp, "x509", good);
	params(&c.p, "x509", good);
	params(&c.bad, "x509", mixed);
	run(&sp, &c, 1);
	expect_refused(&c, "the peer refused");
}

TEST(authz_lists_the_allowed_dns)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp, cp;
	struct client c = { 0 };

	params(&sp, "x509", d);
	params(&cp, "x509", d);
	snprintf(sp.tls_authz, sizeof(sp.tls_authz), "CN=someone-else,O=vfiomig test");
	refused_only(&sp, &cp, "Access was denied");
	/* The client's DN (RFC 4514, as the refusal logs it) lets it in. */
	snprintf(sp.tls_authz, sizeof(sp.tls_authz), "CN=someone-else,O=x\n"
		 "CN=vfiomig-source,O=vfiomig test");
	c.p = cp;
	run(&sp, &c, 0);
}

TEST(psk_wrong_key_unknown_identity_and_authz_refused)
{
	const char *good = creds("p", NULL, "qemu"), *other = creds("q", NULL, "qemu");
	const char *stranger;
	struct vfm_migration_params sp, cp;
	struct client c = { .bad_kind = TLS_BAD };
	char cmd[400];

	params(&sp, "psk", good);
	params(&c.p, "psk", good);
	params(&c.bad, "psk", other);
	run(&sp, &c, 1);
	expect_refused(&c, "keys.psk");

	/* An identity the destination's keys.psk does not have. */
	good = creds("p", NULL, "qemu");
	stranger = creds("s", NULL, "stranger");
	params(&sp, "psk", good);
	params(&cp, "psk", stranger);
	refused_only(&sp, &cp, "TLS handshake");

	/* Known with the right key, but not in tls-authz. */
	snprintf(cmd, sizeof(cmd), "cat '%s/keys.psk' >> '%s/keys.psk'", stranger, good);
	CHECK(system(cmd) == 0);
	snprintf(sp.tls_authz, sizeof(sp.tls_authz), "qemu");
	memset(&c, 0, sizeof(c));
	c.bad_kind = TLS_BAD;
	params(&c.p, "psk", good);
	params(&c.bad, "psk", stranger);
	run(&sp, &c, 1);
	expect_refused(&c, "Access was denied");
}

TEST(plaintext_source_refused_and_told)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp;
	struct client c = { .bad_kind = RAW_PLAIN };

	params(&sp, "x509", d);
	params(&c.p, "x509", d);
	run(&sp, &c, 1);
	if (!strstr(c.bad_err.msg, "accepts TLS only"))
		FAIL("plaintext source heard '%s'", c.bad_err.msg);
}

TEST(stalled_handshake_bounded)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp;
	struct client c = { .bad_kind = RAW_STALL };

	SKIP_UNDER_VALGRIND("a good handshake after the stalled one must finish within 400 ms");
	params(&sp, "x509", d);
	sp.timeout_ms = 400;
	params(&c.p, "x509", d);
	run(&sp, &c, 1);
}

TEST(plaintext_tls_client_to_plain_listener_fails_clearly)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp, cp;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	struct vfm_uri u;
	int fd, cfd;

	vfm_migration_params_default(&sp);
	params(&cp, "x509", d);
	cp.timeout_ms = 800;
	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &u, &err) == 0);
	CHECK(vfm_listen_mig(&u, &sp, NULL, &l, &err) == 0);
	/* The plain listener accepts and never answers the ClientHello. */
	{
		pid_t pid = fork();

		if (!pid) {
			if (!vfm_accept(l, 3000, &fd, NULL))
				nap_ms(1500);
			_exit(0);
		}
		CHECK(vfm_connect_mig(&u, &cp, NULL, &cfd, &err) != 0);
		waitpid(pid, NULL, 0);
	}
	if (!strstr(err.msg, "no answer within 800 ms"))
		FAIL("'%s'", err.msg);
	vfm_listener_close(l);
	cleanup();
}

static void *stall(void *arg)
{
	const struct vfm_uri *u = arg;
	struct vfm_error err = { 0 };
	int fd;

	if (!vfm_connect(u, 2000, &fd, &err)) {
		nap_ms(2500);
		close(fd);
	}
	return NULL;
}

/*
 * Peers that connect and say nothing hold back nobody: the real source's
 * handshake runs beside theirs, long before they time out.
 */
TEST(stalled_peers_hold_back_nobody)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	struct client c = { 0 };
	pthread_t st[3], th;
	uint64_t t0;
	int fd;

	SKIP_UNDER_VALGRIND("the handshake is timed against 1.5 s");
	params(&sp, "x509", d);
	sp.timeout_ms = 2000;
	params(&c.p, "x509", d);
	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &c.uri, &err) == 0);
	CHECK(vfm_listen_mig(&c.uri, &sp, NULL, &l, &err) == 0);
	for (int i = 0; i < 3; i++)
		CHECK(pthread_create(&st[i], NULL, stall, &c.uri) == 0);
	nap_ms(200);
	t0 = now_ms();
	CHECK(pthread_create(&th, NULL, client_main, &c) == 0);
	if (vfm_accept(l, 5000, &fd, &err))
		FAIL("accept: %s", err.msg);
	/* Serial handshakes would have waited 3 x 2 s here. */
	CHECK(now_ms() - t0 < 1500);
	talk_server(fd);
	pthread_join(th, NULL);
	close(fd);
	CHECK(c.good_ret == 0);
	for (int i = 0; i < 3; i++)
		pthread_join(st[i], NULL);
	check_refused(l, 3);
	vfm_listener_close(l);
	cleanup();
}

static void *cancel_later(void *arg)
{
	nap_ms(200);
	atomic_store((atomic_bool *)arg, true);
	return NULL;
}

/* The source's cancel ends a handshake with a destination that never answers. */
TEST(cancel_ends_a_client_handshake)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp, cp;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	atomic_bool cancel = false;
	struct vfm_uri u;
	pthread_t th;
	uint64_t t0;
	int fd;

	vfm_migration_params_default(&sp);
	params(&cp, "x509", d);
	cp.timeout_ms = 8000;
	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &u, &err) == 0);
	/* A plaintext listener whose backlog takes the connection; nobody accepts. */
	CHECK(vfm_listen_mig(&u, &sp, NULL, &l, &err) == 0);
	CHECK(pthread_create(&th, NULL, cancel_later, &cancel) == 0);
	t0 = now_ms();
	CHECK_EQ(vfm_connect_mig(&u, &cp, &cancel, &fd, &err), VFM_ECANCELED);
	CHECK(now_ms() - t0 < 2000);
	pthread_join(th, NULL);
	vfm_listener_close(l);
	cleanup();
}

TEST(plaintext_listener_loopback_only)
{
	struct vfm_migration_params p;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	struct vfm_uri u;

	vfm_migration_params_default(&p);
	CHECK(vfm_uri_parse("tcp:0.0.0.0:0", &u, &err) == 0);
	CHECK(!vfm_uri_is_loopback(&u));
	CHECK(vfm_listen_mig(&u, &p, NULL, &l, &err) == -EPERM);
	CHECK(strstr(err.msg, "--insecure") != NULL);
	p.insecure = true;
	CHECK(vfm_listen_mig(&u, &p, NULL, &l, &err) == 0);
	vfm_listener_close(l);
	p.insecure = false;
	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &u, &err) == 0);
	CHECK(vfm_uri_is_loopback(&u));
	CHECK(vfm_listen_mig(&u, &p, NULL, &l, &err) == 0);
	vfm_listener_close(l);
	CHECK(vfm_uri_parse("tcp:localhost:0", &u, &err) == 0);
	CHECK(vfm_uri_is_loopback(&u));
	/* With TLS any address is fine. */
	snprintf(p.tls_creds, sizeof(p.tls_creds), "psk:%s", creds("p", NULL, "qemu"));
	CHECK(vfm_uri_parse("tcp:0.0.0.0:0", &u, &err) == 0);
	CHECK(vfm_listen_mig(&u, &p, NULL, &l, &err) == 0);
	vfm_listener_close(l);
	/* TLS on a file is refused, as are missing credentials. */
	CHECK(vfm_uri_parse("file:/tmp/x", &u, &err) == 0);
	CHECK(vfm_listen_mig(&u, &p, NULL, &l, &err) == -EINVAL);
	snprintf(p.tls_creds, sizeof(p.tls_creds), "x509:/nonexistent");
	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &u, &err) == 0);
	CHECK(vfm_listen_mig(&u, &p, NULL, &l, &err) != 0);
	CHECK(strstr(err.msg, "ca-cert.pem") != NULL);
	snprintf(p.tls_creds, sizeof(p.tls_creds), "tls:/x");
	CHECK(vfm_listen_mig(&u, &p, NULL, &l, &err) == VFM_EPARSE);
	cleanup();
}

TEST(cancel_ends_a_handshake_wait)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	atomic_bool cancel = false;
	struct client c = { .bad_kind = RAW_STALL };
	pthread_t th;
	uint64_t t0;
	int fd;

	params(&sp, "x509", d);
	params(&c.p, "x509", d);
	c.p.timeout_ms = 300;
	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &c.uri, &err) == 0);
	CHECK(vfm_listen_mig(&c.uri, &sp, &cancel, &l, &err) == 0);
	CHECK(pthread_create(&th, NULL, client_main, &c) == 0);
	nap_ms(100);
	atomic_store(&cancel, true);
	t0 = now_ms();
	CHECK_EQ(vfm_accept(l, 8000, &fd, &err), VFM_ECANCELED);
	CHECK(now_ms() - t0 < 1500);
	pthread_join(th, NULL);
	vfm_listener_close(l);
	cleanup();
}

/*
 * A destination that closes its last connection and exits at once (the
 * bench's child did): what it wrote must still arrive. A plain close()
 * would lose what sat in the relay, which dies with the process.
 */
TEST(close_then_exit_delivers_everything)
{
	const char *d = creds("a", NULL, NULL);
	struct vfm_migration_params sp, cp;
	struct vfm_listener *l;
	struct vfm_error err = { 0 };
	static unsigned char buf[1u << 20];
	uint64_t got = 0;
	struct vfm_uri u;
	pid_t pid;
	int fd, st;

	params(&sp, "x509", d);
	params(&cp, "x509", d);
	CHECK(vfm_uri_parse("tcp:127.0.0.1:0", &u, &err) == 0);
	CHECK(vfm_listen_mig(&u, &sp, NULL, &l, &err) == 0);
	pid = fork();
	CHECK(pid >= 0);
	if (!pid) {
		if (vfm_accept(l, 5000, &fd, &err))
			_exit(1);
		memset(buf, 0x5a, sizeof(buf));
		for (int i = 0; i < 8; i++)
			if (write(fd, buf, sizeof(buf)) != (ssize_t)sizeof(buf))
				_exit(2);
		vfm_channel_close(fd, &sp);
		_exit(0);
	}
	if (vfm_connect_mig(&u, &cp, NULL, &fd, &err))
		FAIL("connect: %s", err.msg);
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));

		if (n <= 0)
			break;
		for (ssize_t i = 0; i < n; i += 4096)
			CHECK_EQ(buf[i], 0x5a);
		got += (uint64_t)n;
	}
	close(fd);
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
	CHECK_EQ(got, 8ull << 20);
	vfm_listener_close(l);
	cleanup();
}

TEST(psk_file_parser)
{
	unsigned char key[VFM_TLS_PSK_MAX_KEY];
	char id[VFM_TLS_PSK_MAX_ID + 1];
	struct vfm_error err = { 0 };
	size_t kl;
	const char *ok = "qemu:00ff10\r\n\nother:abcd\n";

	CHECK(vfm_tls_psk_parse(ok, strlen(ok), NULL, id, key, &kl, &err) == 0);
	CHECK_STR(id, "qemu");
	CHECK(kl == 3 && key[0] == 0 && key[1] == 0xff && key[2] == 0x10);
	CHECK(vfm_tls_psk_parse(ok, strlen(ok), "other", id, key, &kl, &err) == 0);
	CHECK(kl == 2 && key[0] == 0xab && key[1] == 0xcd);
	CHECK(vfm_tls_psk_parse(ok, strlen(ok), "nobody", id, key, &kl, &err) == -ENOENT);
	CHECK(vfm_tls_psk_parse("", 0, NULL, id, key, &kl, &err) == VFM_EPARSE);
	CHECK(vfm_tls_psk_parse("a:0g\n", 5, NULL, id, key, &kl, &err) == VFM_EPARSE);
	CHECK(strstr(err.msg, "line 1") != NULL);
	CHECK(vfm_tls_psk_parse("a:abc", 5, NULL, id, key, &kl, &err) == VFM_EPARSE);
	CHECK(vfm_tls_psk_parse(":ab", 3, NULL, id, key, &kl, &err) == VFM_EPARSE);
	CHECK(vfm_tls_psk_parse("noco\n", 5, NULL, id, key, &kl, &err) == VFM_EPARSE);
	/* A damaged line after the one wanted is still an error. */
	CHECK(vfm_tls_psk_parse("a:ab\nb:x\n", 9, "a", id, key, &kl, &err) == VFM_EPARSE);
	CHECK(strstr(err.msg, "line 2") != NULL);
	{
		char big[200];

		memset(big, 'a', sizeof(big));
		big[150] = ':';
		CHECK(vfm_tls_psk_parse(big, sizeof(big), NULL, id, key, &kl, &err) == VFM_EPARSE);
	}
}

