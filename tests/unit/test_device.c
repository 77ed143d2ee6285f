/*
 * The device layer's policies, through the public API, against the in-memory
 * "test" backend: probing, state changes (the exact arcs the device saw),
 * refusals, the recover-or-reset policy branch by branch, data sessions end
 * to end, pass-through validation and tracing.
 */
#include "harness.h"
#include "testdev.h"
#include "vfiomig/log.h"

#define R VFM_STATE_RUNNING
#define RP VFM_STATE_RUNNING_P2P
#define S VFM_STATE_STOP
#define SC VFM_STATE_STOP_COPY
#define RES VFM_STATE_RESUMING
#define PC VFM_STATE_PRE_COPY
#define PCP VFM_STATE_PRE_COPY_P2P
#define ERR VFM_STATE_ERROR

#define F_SC VFM_MIG_STOP_COPY
#define F_ALL VFM_MIG_ALL

#define CHECK_ARCS(td, expect) CHECK_STR(testdev_arcs((td), (char[1024]){ 0 }, 1024), (expect))

#define CALLS(td, op) testdev_calls((td), TESTDEV_OP_##op)

static struct testdev *probed(const char *id, uint64_t flags, size_t size, uint32_t seed)
{
	struct testdev *td = testdev_new(id, flags, size, seed, 0);
	struct vfm_error err = { 0 };

	if (vfm_device_probe_migration(testdev_device(td), &err))
		FAIL("probe %s: %s", id, err.msg);
	return td;
}

/* Move through the device layer; the test fails if that does not work. */
static void go(struct testdev *td, enum vfm_state to)
{
	struct vfm_error err = { 0 };

	if (vfm_device_set_state(testdev_device(td), to, ERR, &err))
		FAIL("%s -> %s: %s", vfm_state_name(testdev_state(td)), vfm_state_name(to),
		     err.msg);
	CHECK_EQ(vfm_device_state(testdev_device(td)), to);
	CHECK_EQ(testdev_state(td), to);
}

struct stream {
	unsigned char *p;
	size_t len, cap;
};

static void stream_put(struct stream *s, const void *p, size_t n)
{
	if (s->len + n > s->cap) {
		s->cap = (s->len + n) * 2;
		s->p = realloc(s->p, s->cap);
		CHECK(s->p);
	}
	memcpy(s->p + s->len, p, n);
	s->len += n;
}

/* Reads up to `max` bytes in `chunk`-sized reads; returns the last read's result. */
static ssize_t read_some(struct testdev *td, struct stream *s, size_t chunk, size_t max)
{
	unsigned char buf[4096];
	size_t got = 0;
	ssize_t n = 0;

	CHECK(chunk <= sizeof(buf));
	while (got < max) {
		struct vfm_error err = { 0 };
		size_t want = max - got < chunk ? max - got : chunk;

		n = vfm_device_read_data(testdev_device(td), buf, want, &err);
		if (n <= 0)
			break;
		CHECK((size_t)n <= want);
		stream_put(s, buf, (size_t)n);
		got += (size_t)n;
	}
	return n;
}

/* The whole STOP_COPY stream of a device that is in STOP_COPY. */
static void read_to_end(struct testdev *td, struct stream *s)
{
	ssize_t n = read_some(td, s, 333, SIZE_MAX);

	CHECK_EQ(n, 0);
}

static void check_info(struct testdev *td, uint64_t initial, uint64_t dirty)
{
	uint64_t i = ~0ull, d = ~0ull;
	struct vfm_error err = { 0 };

	if (vfm_device_precopy_info(testdev_device(td), &i, &d, &err))
		FAIL("precopy info: %s", err.msg);
	if (i != initial || d != dirty)
		FAIL("precopy info: initial %" PRIu64 " dirty %" PRIu64 ", expected %" PRIu64
		     " %" PRIu64, i, d, initial, dirty);
}

static uint64_t stop_copy_size(struct testdev *td)
{
	uint64_t n = 0;

	CHECK_EQ(vfm_device_stop_copy_size(testdev_device(td), &n, NULL), 0);
	return n;
}

/* A complete, valid stream of a device like td (same size), from a fresh source. */
static void valid_stream(size_t size, struct stream *s)
{
	struct testdev *src = probed("src", F_SC, size, 99);

	go(src, SC);
	read_to_end(src, s);
	testdev_free(src);
}

static void write_all(struct testdev *td, const struct stream *s)
{
	struct vfm_error err = { 0 };

	if (vfm_device_write_data(testdev_device(td), s->p, s->len, &err))
		FAIL("write_data: %s", err.msg);
}

/* ---- Probe ---- */

TEST(probe_no_migration_ops)
{
	struct testdev *td = testdev_new("d", F_ALL, 16, 1, TESTDEV_NO_MIG);
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_device_probe_migration(testdev_device(td), &err), VFM_ENOMIGRATION);
	CHECK_EQ(err.code, VFM_ENOMIGRATION);
	CHECK(strstr(err.msg, "test") != NULL);
	CHECK_EQ(vfm_device_mig_flags(testdev_device(td)), 0);
	/* Nothing else works either, and nothing crashes. */
	CHECK_EQ(vfm_device_set_state(testdev_device(td), S, R, NULL), -EINVAL);
	testdev_free(td);
}

TEST(probe_flags_without_stop_copy)
{
	struct testdev *td = testdev_new("d", VFM_MIG_P2P | VFM_MIG_PRE_COPY, 16, 1, 0);
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_device_probe_migration(testdev_device(td), &err), VFM_ENOMIGRATION);
	CHECK_EQ(err.code, VFM_ENOMIGRATION);
	CHECK(strstr(err.msg, "STOP_COPY") != NULL);
	CHECK_EQ(CALLS(td, GET_FLAGS), 1);
	CHECK_EQ(CALLS(td, GET_STATE), 0);
	CHECK_EQ(vfm_device_mig_flags(testdev_device(td)), 0);
	CHECK_EQ(vfm_device_set_state(testdev_device(td), S, R, NULL), -EINVAL);
	CHECK_EQ(CALLS(td, SET_STATE), 0);
	testdev_free(td);
}

TEST(probe_get_flags_errors)
{
	/* "No migration" answers from the kernel map to VFM_ENOMIGRATION... */
	static const int nomig[] = { -ENOTTY, -EINVAL, -ENOTSUP };
	for (size_t i = 0; i < sizeof(nomig) / sizeof(nomig[0]); i++) {
		struct testdev *td = testdev_new("d", F_ALL, 16, 1, 0);
		struct vfm_error err = { 0 };

		testdev_fail_op(td, TESTDEV_OP_GET_FLAGS, nomig[i], 1);
		CHECK_EQ(vfm_device_probe_migration(testdev_device(td), &err), VFM_ENOMIGRATION);
		CHECK_EQ(err.code, VFM_ENOMIGRATION);
		CHECK_EQ(CALLS(td, GET_STATE), 0);
		testdev_free(td);
	}
	/* ...other errors are passed on as they are. */
	struct testdev *td = testdev_new("d", F_ALL, 16, 1, 0);
	struct vfm_error err = { 0 };

	testdev_fail_op(td, TESTDEV_OP_GET_FLAGS, -EIO, 1);
	CHECK_EQ(vfm_device_probe_migration(testdev_device(td), &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	/* A failed probe can be retried. */
	CHECK_EQ(vfm_device_probe_migration(testdev_device(td), &err), 0);
	testdev_free(td);
}

TEST(probe_success_caches_flags_and_state)
{
	struct testdev *td = testdev_new("d", F_SC | VFM_MIG_P2P, 16, 1, 0);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };
	enum vfm_state st = ERR;

	testdev_force_state(td, S);
	CHECK_EQ(vfm_device_probe_migration(dev, &err), 0);
	CHECK_EQ(err.code, 0);
	CHECK_EQ(vfm_device_mig_flags(dev), F_SC | VFM_MIG_P2P);
	CHECK_EQ(vfm_device_state(dev), S);
	CHECK(!vfm_device_has_session(dev));
	CHECK_EQ(CALLS(td, GET_FLAGS), 1);
	CHECK_EQ(CALLS(td, GET_STATE), 1);
	CHECK_STR(vfm_device_backend(dev), "test");
	CHECK_STR(vfm_device_id(dev), "d");
	/* Cached: reading it asks nothing; querying asks. */
	CHECK_EQ(vfm_device_state(dev), S);
	CHECK_EQ(CALLS(td, GET_STATE), 1);
	testdev_force_state(td, R);
	CHECK_EQ(vfm_device_query_state(dev, &st, &err), 0);
	CHECK_EQ(st, R);
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK_EQ(CALLS(td, GET_STATE), 2);
	testdev_free(td);
}

TEST(probe_get_state_fails)
{
	struct testdev *td = testdev_new("d", F_ALL, 16, 1, 0);
	struct vfm_error err = { 0 };

	testdev_fail_op(td, TESTDEV_OP_GET_STATE, -ENODEV, 1);
	CHECK_EQ(vfm_device_probe_migration(testdev_device(td), &err), -ENODEV);
	CHECK_EQ(err.code, -ENODEV);
	/* Not probed: state changes are refused without touching the device. */
	CHECK_EQ(vfm_device_set_state(testdev_device(td), S, R, NULL), -EINVAL);
	CHECK_EQ(CALLS(td, SET_STATE), 0);
	testdev_free(td);
}

TEST(probe_rejects_invalid_state)
{
	struct testdev *td = testdev_new("d", F_ALL, 16, 1, 0);
	struct vfm_error err = { 0 };

	testdev_force_state(td, (enum vfm_state)42);
	CHECK_EQ(vfm_device_probe_migration(testdev_device(td), &err), VFM_EPROTOCOL);
	CHECK_EQ(err.code, VFM_EPROTOCOL);
	CHECK_EQ(vfm_device_set_state(testdev_device(td), S, R, NULL), -EINVAL);
	testdev_free(td);
}

TEST(probe_device_in_error)
{
	struct testdev *td = testdev_new("d", F_ALL, 16, 1, 0);
	struct vfm_device *dev = testdev_device(td);

	testdev_force_state(td, ERR);
	CHECK_EQ(vfm_device_probe_migration(dev, NULL), 0);
	CHECK_EQ(vfm_device_state(dev), ERR);
	CHECK_EQ(vfm_device_set_state(dev, R, R, NULL), VFM_EFORBIDDEN);
	CHECK_EQ(CALLS(td, SET_STATE), 0);
	CHECK_EQ(vfm_device_reset(dev, NULL), 0);
	CHECK_EQ(vfm_device_state(dev), R);
	go(td, SC);
	testdev_free(td);
}

/* ---- State changes ---- */

enum sess { NONE, NEW, SAME };

struct path_case {
	uint64_t flags;
	enum vfm_state from, to;
	const char *arcs;
	enum sess sess;
};

static const struct path_case path_cases[] = {
	{ F_ALL, R, SC, "R>RP,RP>S,S>SC", NEW },
	{ F_ALL, R, S, "R>RP,RP>S", NONE },
	{ F_ALL, R, RES, "R>RP,RP>S,S>RES", NEW },
	{ F_ALL, R, PC, "R>PC", NEW },
	{ F_ALL, R, PCP, "R>RP,RP>PCP", NEW },
	{ F_ALL, RP, PC, "RP>R,R>PC", NEW },
	{ F_ALL, PC, SC, "PC>PCP,PCP>SC", SAME },
	{ F_ALL, PC, PCP, "PC>PCP", SAME },
	{ F_ALL, PCP, PC, "PCP>PC", SAME },
	{ F_ALL, PCP, SC, "PCP>SC", SAME },
	{ F_ALL, PC, R, "PC>R", NONE },
	{ F_ALL, PC, S, "PC>R,R>RP,RP>S", NONE },
	{ F_ALL, PC, RES, "PC>R,R>RP,RP>S,S>RES", NEW },
	{ F_ALL, PCP, R, "PCP>RP,RP>R", NONE },
	{ F_ALL, S, PC, "S>RP,RP>R,R>PC", NEW },
	{ F_ALL, S, PCP, "S>RP,RP>PCP", NEW },
	{ F_ALL, SC, R, "SC>S,S>RP,RP>R", NONE },
	{ F_ALL, SC, S, "SC>S", NONE },
	{ F_ALL, SC, RES, "SC>S,S>RES", NEW },
	{ F_ALL, RES, R, "RES>S,S>RP,RP>R", NONE },
	{ F_ALL, RES, SC, "RES>S,S>SC", NEW },
	{ F_ALL, RES, PC, "RES>S,S>RP,RP>R,R>PC", NEW },
	{ F_ALL, RES, PCP, "RES>S,S>RP,RP>PCP", NEW },
	/* STOP_COPY only: RUNNING <-> STOP is direct. */
	{ F_SC, R, SC, "R>S,S>SC", NEW },
	{ F_SC, SC, R, "SC>S,S>R", NONE },
	{ F_SC, R, RES, "R>S,S>RES", NEW },
	{ F_SC, RES, R, "RES>S,S>R", NONE },
	/* No P2P (hisi_acc): PRE_COPY -> STOP_COPY is direct. */
	{ F_SC | VFM_MIG_PRE_COPY, PC, SC, "PC>SC", SAME },
	{ F_SC | VFM_MIG_PRE_COPY, S, PC, "S>R,R>PC", NEW },
	{ F_SC | VFM_MIG_PRE_COPY, PC, S, "PC>R,R>S", NONE },
	/* No PRE_COPY (pds). */
	{ F_SC | VFM_MIG_P2P, R, SC, "R>RP,RP>S,S>SC", NEW },
	{ F_SC | VFM_MIG_P2P, S, R, "S>RP,RP>R", NONE },
};

TEST(set_state_paths)
{
	for (size_t i = 0; i < sizeof(path_cases) / sizeof(path_cases[0]); i++) {
		const struct path_case *c = &path_cases[i];
		struct testdev *td = probed("d", c->flags, 64, 1);
		struct vfm_device *dev = testdev_device(td);
		struct vfm_error err = { 0 };
		unsigned before, ends, sets;

		if (c->from != R)
			go(td, c->from);
		if (c->from == RES) {
			struct stream s = { 0 };

			valid_stream(64, &s);
			write_all(td, &s);
			free(s.p);
		}
		testdev_clear_arcs(td);
		before = testdev_session_id(td);
		ends = CALLS(td, END_SESSION);
		sets = CALLS(td, SET_STATE);
		if (vfm_device_set_state(dev, c->to, ERR, &err))
			FAIL("case %zu %s -> %s: %s", i, vfm_state_name(c->from),
			     vfm_state_name(c->to), err.msg);
		CHECK_EQ(err.code, 0);
		CHECK_ARCS(td, c->arcs);
		/* One request, the device walks the path itself. */
		CHECK_EQ(CALLS(td, SET_STATE), sets + 1);
		CHECK_EQ(vfm_device_state(dev), c->to);
		CHECK_EQ(testdev_state(td), c->to);
		CHECK_EQ(vfm_device_has_session(dev), testdev_session_id(td) != 0);
		switch (c->sess) {
		case NONE:
			CHECK(!vfm_device_has_session(dev));
			break;
		case NEW:
			CHECK(vfm_device_has_session(dev));
			CHECK(testdev_session_id(td) != before);
			break;
		case SAME:
			CHECK(vfm_device_has_session(dev));
			CHECK_EQ(testdev_session_id(td), before);
			break;
		}
		/* The old session, if any, was ended exactly once unless it goes on. */
		CHECK_EQ(CALLS(td, END_SESSION),
			 ends + (before != 0 && c->sess != SAME ? 1 : 0));
		testdev_free(td);
	}
}

TEST(set_state_to_current_state_is_a_noop)
{
	struct testdev *td = probed("d", F_ALL, 16, 1);

	CHECK_EQ(vfm_device_set_state(testdev_device(td), R, ERR, NULL), 0);
	CHECK_EQ(CALLS(td, SET_STATE), 0);
	go(td, PC);
	CHECK_EQ(vfm_device_set_state(testdev_device(td), PC, ERR, NULL), 0);
	CHECK_EQ(CALLS(td, SET_STATE), 1);
	CHECK(vfm_device_has_session(testdev_device(td)));
	testdev_free(td);
}

/* ---- Refusals ---- */

static void check_refused(struct testdev *td, enum vfm_state to)
{
	struct vfm_device *dev = testdev_device(td);
	enum vfm_state st = vfm_device_state(dev);
	bool sess = vfm_device_has_session(dev);
	unsigned sets = CALLS(td, SET_STATE), resets = CALLS(td, RESET);
	unsigned gets = CALLS(td, GET_STATE);
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_device_set_state(dev, to, R, &err), VFM_EFORBIDDEN);
	CHECK_EQ(err.code, VFM_EFORBIDDEN);
	CHECK(err.msg[0]);
	/* Not touched at all: no request, no read back, no recovery, no reset. */
	CHECK_EQ(CALLS(td, SET_STATE), sets);
	CHECK_EQ(CALLS(td, GET_STATE), gets);
	CHECK_EQ(CALLS(td, RESET), resets);
	CHECK_EQ(vfm_device_state(dev), st);
	CHECK_EQ(testdev_state(td), st);
	CHECK_EQ(vfm_device_has_session(dev), sess);
}

TEST(forbidden_requests_refused)
{
	struct testdev *td = probed("d", F_ALL, 16, 1);

	check_refused(td, ERR);
	check_refused(td, (enum vfm_state)8);
	check_refused(td, (enum vfm_state)-1);
	go(td, SC);
	/* The kernel used to loop forever on these. */
	check_refused(td, PC);
	check_refused(td, PCP);
	check_refused(td, ERR);
	CHECK_ARCS(td, "R>RP,RP>S,S>SC");
	testdev_free(td);
}

TEST(unsupported_states_refused)
{
	/* No P2P: neither P2P state exists. */
	struct testdev *td = probed("d", F_SC | VFM_MIG_PRE_COPY, 16, 1);

	check_refused(td, RP);
	check_refused(td, PCP);
	go(td, PC);
	check_refused(td, PCP);
	testdev_free(td);

	/* No PRE_COPY. */
	td = probed("d", F_SC | VFM_MIG_P2P, 16, 1);
	check_refused(td, PC);
	check_refused(td, PCP);
	go(td, RP);
	check_refused(td, PCP);
	testdev_free(td);

	/* STOP_COPY only. */
	td = probed("d", F_SC, 16, 1);
	check_refused(td, RP);
	check_refused(td, PC);
	check_refused(td, PCP);
	testdev_free(td);
}

/* ---- Recovery policy ---- */

/* RUNNING -> STOP_COPY on a P2P device, failing at STOP -> STOP_COPY with -EIO. */
static struct testdev *failing_to_stop_copy(bool to_error)
{
	struct testdev *td = probed("d", F_SC | VFM_MIG_P2P, 32, 1);

	testdev_fail_arc(td, S, SC, -EIO, to_error, 1);
	return td;
}

TEST(recover_succeeds)
{
	struct testdev *td = failing_to_stop_copy(false);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_device_set_state(dev, SC, RP, &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	CHECK(strstr(err.msg, "STOP -> STOP_COPY") != NULL);
	CHECK_ARCS(td, "R>RP,RP>S,S>SC!,S>RP");
	CHECK_EQ(vfm_device_state(dev), RP);
	CHECK_EQ(testdev_state(td), RP);
	CHECK_EQ(CALLS(td, RESET), 0);
	CHECK(!vfm_device_has_session(dev));
	/* The failed request and the recovery request. */
	CHECK_EQ(CALLS(td, SET_STATE), 2);
	/* Usable afterwards. */
	go(td, SC);
	testdev_free(td);
}

TEST(recover_to_where_the_device_stopped)
{
	struct testdev *td = failing_to_stop_copy(false);
	struct vfm_device *dev = testdev_device(td);

	CHECK_EQ(vfm_device_set_state(dev, SC, S, NULL), -EIO);
	CHECK_ARCS(td, "R>RP,RP>S,S>SC!");
	CHECK_EQ(vfm_device_state(dev), S);
	CHECK_EQ(CALLS(td, SET_STATE), 1);
	CHECK_EQ(CALLS(td, RESET), 0);
	testdev_free(td);
}

TEST(recover_fails_then_reset)
{
	struct testdev *td = failing_to_stop_copy(false);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	testdev_fail_arc(td, S, RP, -EBUSY, false, 1);
	CHECK_EQ(vfm_device_set_state(dev, SC, RP, &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	CHECK_ARCS(td, "R>RP,RP>S,S>SC!,S>RP!");
	CHECK_EQ(CALLS(td, RESET), 1);
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK_EQ(testdev_state(td), R);
	CHECK(!vfm_device_has_session(dev));
	testdev_free(td);
}

TEST(recover_error_means_reset_at_once)
{
	struct testdev *td = failing_to_stop_copy(false);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_device_set_state(dev, SC, ERR, &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	CHECK_ARCS(td, "R>RP,RP>S,S>SC!");
	CHECK_EQ(CALLS(td, SET_STATE), 1);
	CHECK_EQ(CALLS(td, RESET), 1);
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK_EQ(testdev_state(td), R);
	testdev_free(td);
}

TEST(device_in_error_after_failure_is_reset)
{
	struct testdev *td = failing_to_stop_copy(true);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_device_set_state(dev, SC, RP, &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	/* No recovery attempt: ERROR is only left by a reset. */
	CHECK_ARCS(td, "R>RP,RP>S,S>SC!");
	CHECK_EQ(CALLS(td, SET_STATE), 1);
	CHECK_EQ(CALLS(td, RESET), 1);
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK_EQ(testdev_state(td), R);
	testdev_free(td);
}

TEST(state_unreadable_after_failure_is_reset)
{
	struct testdev *td = failing_to_stop_copy(false);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	testdev_fail_op(td, TESTDEV_OP_GET_STATE, -ENXIO, 1);
	CHECK_EQ(vfm_device_set_state(dev, SC, RP, &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	CHECK_ARCS(td, "R>RP,RP>S,S>SC!");
	/* probe, the failed read back, and the read after the reset (a reset
	 * need not leave RUNNING behind: libvfio-user's does not). */
	CHECK_EQ(CALLS(td, GET_STATE), 3);
	CHECK_EQ(CALLS(td, SET_STATE), 1);
	CHECK_EQ(CALLS(td, RESET), 1);
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK_EQ(testdev_state(td), R);
	testdev_free(td);
}

TEST(reset_fails_leaves_error_until_reset)
{
	struct testdev *td = failing_to_stop_copy(true);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	testdev_fail_op(td, TESTDEV_OP_RESET, -ETIMEDOUT, 2);
	CHECK_EQ(vfm_device_set_state(dev, SC, RP, &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	CHECK_EQ(CALLS(td, RESET), 1);
	CHECK_EQ(vfm_device_state(dev), ERR);
	CHECK_EQ(testdev_state(td), ERR);

	/* Refused without touching the device, whatever is asked, recover too. */
	check_refused(td, R);
	check_refused(td, S);
	check_refused(td, SC);
	CHECK_EQ(vfm_device_set_state(dev, R, ERR, NULL), VFM_EFORBIDDEN);
	CHECK_EQ(CALLS(td, SET_STATE), 1);
	CHECK_EQ(CALLS(td, RESET), 1);

	/* A failed reset keeps it in ERROR, a good one brings it back. */
	err = (struct vfm_error){ 0 };
	CHECK_EQ(vfm_device_reset(dev, &err), -ETIMEDOUT);
	CHECK_EQ(err.code, -ETIMEDOUT);
	CHECK_EQ(vfm_device_state(dev), ERR);
	check_refused(td, R);
	CHECK_EQ(vfm_device_reset(dev, NULL), 0);
	CHECK_EQ(CALLS(td, RESET), 3);
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK_EQ(testdev_state(td), R);
	testdev_clear_arcs(td);
	go(td, SC);
	CHECK_ARCS(td, "R>RP,RP>S,S>SC");
	testdev_free(td);
}

TEST(reset_fails_on_a_healthy_device_keeps_its_real_state)
{
	struct testdev *td = failing_to_stop_copy(false);
	struct vfm_device *dev = testdev_device(td);
	unsigned gets;

	testdev_fail_op(td, TESTDEV_OP_RESET, -ETIMEDOUT, 1);
	CHECK_EQ(vfm_device_set_state(dev, SC, ERR, NULL), -EIO);
	CHECK_EQ(CALLS(td, RESET), 1);
	/* The device sits in STOP and says so (libvfio-user refuses a reset
	 * there): that state is kept, not ERROR, and it goes on from there. */
	CHECK_EQ(testdev_state(td), S);
	CHECK_EQ(vfm_device_state(dev), S);
	CHECK_EQ(vfm_device_set_state(dev, R, ERR, NULL), 0);
	CHECK_EQ(testdev_state(td), R);
	/* A failed reset whose state cannot be read back is ERROR. */
	testdev_fail_op(td, TESTDEV_OP_RESET, -ETIMEDOUT, 1);
	testdev_fail_op(td, TESTDEV_OP_GET_STATE, -ENXIO, 1);
	gets = CALLS(td, GET_STATE);
	CHECK_EQ(vfm_device_reset(dev, NULL), -ETIMEDOUT);
	CHECK_EQ(CALLS(td, GET_STATE), gets + 1);
	CHECK_EQ(vfm_device_state(dev), ERR);
	CHECK_EQ(vfm_device_reset(dev, NULL), 0);
	CHECK_EQ(vfm_device_state(dev), R);
	testdev_free(td);
}

TEST(no_reset_op_leaves_error)
{
	struct testdev *td = testdev_new("d", F_ALL, 32, 1, TESTDEV_NO_RESET);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_device_probe_migration(dev, NULL), 0);
	go(td, PC);
	CHECK(vfm_device_has_session(dev));
	testdev_fail_arc(td, PC, PCP, -EIO, false, -1);
	CHECK_EQ(vfm_device_set_state(dev, PCP, ERR, &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	CHECK_EQ(vfm_device_state(dev), ERR);
	/* Whatever the device still thinks, the layer holds no session in ERROR. */
	CHECK(!vfm_device_has_session(dev));
	CHECK_EQ(CALLS(td, END_SESSION), 1);
	CHECK_EQ(vfm_device_reset(dev, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_set_state(dev, R, ERR, NULL), VFM_EFORBIDDEN);
	CHECK_EQ(CALLS(td, SET_STATE), 2);
	testdev_free(td);
}

/* After a failure the layer's session follows where the device really is. */
TEST(failure_midway_drops_or_keeps_the_session)
{
	struct testdev *td = probed("d", F_ALL, 32, 1);
	struct vfm_device *dev = testdev_device(td);
	unsigned sid;
	char buf[8];

	/* PRE_COPY -> STOP dies in RUNNING: the session is gone. */
	go(td, PC);
	testdev_fail_arc(td, R, RP, -EIO, false, 1);
	testdev_clear_arcs(td);
	CHECK_EQ(vfm_device_set_state(dev, S, R, NULL), -EIO);
	CHECK_ARCS(td, "PC>R,R>RP!");
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK(!vfm_device_has_session(dev));
	CHECK_EQ(CALLS(td, END_SESSION), 1);
	CHECK_EQ(CALLS(td, RESET), 0);

	/* PRE_COPY -> STOP_COPY dies in PRE_COPY_P2P: the same session goes on. */
	go(td, PC);
	sid = testdev_session_id(td);
	testdev_fail_arc(td, PCP, SC, -EIO, false, 1);
	testdev_clear_arcs(td);
	CHECK_EQ(vfm_device_set_state(dev, SC, PCP, NULL), -EIO);
	CHECK_ARCS(td, "PC>PCP,PCP>SC!");
	CHECK_EQ(vfm_device_state(dev), PCP);
	CHECK(vfm_device_has_session(dev));
	CHECK_EQ(testdev_session_id(td), sid);
	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), NULL), (ssize_t)sizeof(buf));
	/* And the retry works. */
	go(td, SC);
	CHECK_EQ(testdev_session_id(td), sid);
	testdev_free(td);
}

TEST(spurious_session_while_one_is_open)
{
	struct testdev *td = probed("d", F_ALL, 32, 1);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	go(td, PC);
	CHECK(vfm_device_has_session(dev));
	testdev_spurious_session(td, PC, PCP);
	testdev_clear_arcs(td);
	CHECK_EQ(vfm_device_set_state(dev, PCP, R, &err), VFM_ESESSION);
	CHECK_EQ(err.code, VFM_ESESSION);
	/* The device did move; the policy then recovers to RUNNING. */
	CHECK_ARCS(td, "PC>PCP,PCP>RP,RP>R");
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK(!vfm_device_has_session(dev));
	CHECK_EQ(CALLS(td, RESET), 0);
	testdev_free(td);
}

TEST(spurious_session_on_an_arc_that_opens_none)
{
	struct testdev *td = probed("d", F_ALL, 32, 1);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	testdev_spurious_session(td, R, RP);
	CHECK_EQ(vfm_device_set_state(dev, RP, R, &err), VFM_ESESSION);
	CHECK_EQ(err.code, VFM_ESESSION);
	CHECK_ARCS(td, "R>RP,RP>R");
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK(!vfm_device_has_session(dev));
	/* No session means no data, whatever the backend said. */
	CHECK_EQ(vfm_device_read_data(dev, (char[8]){ 0 }, 8, NULL), -EINVAL);
	testdev_free(td);
}

TEST(missing_session_is_an_error)
{
	struct testdev *td = probed("d", F_ALL, 32, 1);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	testdev_suppress_session(td, S, SC);
	CHECK_EQ(vfm_device_set_state(dev, SC, S, &err), VFM_ESESSION);
	CHECK_EQ(err.code, VFM_ESESSION);
	CHECK_ARCS(td, "R>RP,RP>S,S>SC,SC>S");
	CHECK_EQ(vfm_device_state(dev), S);
	CHECK(!vfm_device_has_session(dev));
	testdev_free(td);
}

/* Every branch of the policy hands back the first error, not a later one. */
TEST(first_error_returned_in_every_branch)
{
	enum branch { RECOVERED, RECOVER_FAILS, RECOVER_ERROR, DEV_ERROR, NO_STATE,
		      RESET_FAILS, BRANCHES };
	static const int codes[] = { -EIO, -EPERM, -ENOSPC, -EFAULT, -ENOMEM, -EBADF };

	for (int b = 0; b < BRANCHES; b++) {
		struct testdev *td = probed("d", F_ALL, 32, 1);
		struct vfm_device *dev = testdev_device(td);
		struct vfm_error err = { 0 };
		enum vfm_state recover = RP;
		int first = codes[b];

		testdev_fail_arc(td, S, SC, first, b == DEV_ERROR || b == RESET_FAILS, 1);
		/* Later failures all carry other codes. */
		testdev_fail_arc(td, S, RP, -E2BIG, false, b == RECOVER_FAILS ? 1 : 0);
		if (b == RECOVER_ERROR)
			recover = ERR;
		if (b == NO_STATE)
			testdev_fail_op(td, TESTDEV_OP_GET_STATE, -ENXIO, 1);
		if (b == RESET_FAILS)
			testdev_fail_op(td, TESTDEV_OP_RESET, -ETIMEDOUT, 1);
		if (vfm_device_set_state(dev, SC, recover, &err) != first)
			FAIL("branch %d: wrong code", b);
		if (err.code != first)
			FAIL("branch %d: err.code %d (%s)", b, err.code, err.msg);
		CHECK(strstr(err.msg, "injected failure of STOP -> STOP_COPY") != NULL);
		CHECK_EQ(vfm_device_state(dev),
			 b == RECOVERED ? RP : b == RESET_FAILS ? ERR : R);
		CHECK_EQ(CALLS(td, RESET), b == RECOVERED ? 0 : 1);
		testdev_free(td);
	}
}

/* ---- Data ---- */

TEST(precopy_flow_and_resume)
{
	const size_t size = 1000;
	const uint64_t H = TESTDEV_HDR_SIZE, E = TESTDEV_END_SIZE;
	struct testdev *src = probed("src", F_ALL, size, 1);
	struct testdev *dst = probed("dst", F_ALL, size, 2);
	struct vfm_device *sdev = testdev_device(src), *ddev = testdev_device(dst);
	struct stream s = { 0 };
	unsigned sid;

	CHECK(memcmp(testdev_data(src, NULL), testdev_data(dst, NULL), size) != 0);
	CHECK_EQ(stop_copy_size(src), H + size + E);

	/* Initial data: the whole state, falling exactly as it is read. */
	go(src, PC);
	sid = testdev_session_id(src);
	CHECK(sid != 0);
	CHECK(vfm_device_has_session(sdev));
	check_info(src, H + size, 0);
	CHECK_EQ(stop_copy_size(src), H + size + E);
	for (uint64_t left = H + size; left;) {
		uint64_t step = left < 100 ? left : 100;

		CHECK_EQ(read_some(src, &s, 100, step), step);
		left -= step;
		check_info(src, left, 0);
	}
	/* Nothing more for now. */
	CHECK_EQ(vfm_device_read_data(sdev, (char[16]){ 0 }, 16, NULL), -ENOMSG);
	check_info(src, 0, 0);
	CHECK_EQ(stop_copy_size(src), E);

	/* The device runs on: dirty data appears, counted exactly. */
	CHECK_EQ(testdev_dirty(src, 10, 20), 0);
	CHECK_EQ(testdev_dirty(src, 500, 5), 0);
	check_info(src, 0, 2 * H + 25);
	CHECK_EQ(stop_copy_size(src), 2 * H + 25 + E);
	CHECK_EQ(read_some(src, &s, 10, 10), 10);
	check_info(src, 0, 2 * H + 15);
	CHECK_EQ(read_some(src, &s, 64, SIZE_MAX), -ENOMSG);
	check_info(src, 0, 0);

	/* More dirt, left for the stop-copy phase. */
	CHECK_EQ(testdev_dirty(src, 100, 50), 0);
	check_info(src, 0, H + 50);
	go(src, PCP);
	CHECK_EQ(testdev_session_id(src), sid);
	check_info(src, 0, H + 50);
	CHECK_EQ(testdev_dirty(src, 999, 1), 0);
	check_info(src, 0, 2 * H + 51);

	/* STOP_COPY continues the session and ends the stream. */
	go(src, SC);
	CHECK_EQ(testdev_session_id(src), sid);
	CHECK(vfm_device_has_session(sdev));
	CHECK_EQ(vfm_device_precopy_info(sdev, &(uint64_t){ 0 }, &(uint64_t){ 0 }, NULL),
		 -EINVAL);
	CHECK_EQ(stop_copy_size(src), 2 * H + 51 + E);
	CHECK_EQ(testdev_dirty(src, 0, 1), -EBUSY);
	read_to_end(src, &s);
	CHECK_EQ(stop_copy_size(src), 0);
	CHECK_EQ(vfm_device_read_data(sdev, (char[16]){ 0 }, 16, NULL), 0);
	go(src, S);
	CHECK(!vfm_device_has_session(sdev));
	CHECK_EQ(s.len, (H + size) + (2 * H + 25) + (2 * H + 51) + E);

	/* Destination: short writes are looped over. */
	go(dst, RES);
	CHECK(vfm_device_has_session(ddev));
	testdev_set_write_chunk(dst, 7);
	write_all(dst, &s);
	CHECK(CALLS(dst, WRITE) >= s.len / 7);
	go(dst, S);
	CHECK(!vfm_device_has_session(ddev));
	CHECK(memcmp(testdev_data(src, NULL), testdev_data(dst, NULL), size) == 0);
	CHECK_EQ(testdev_generation(dst), testdev_generation(src));
	CHECK_EQ(testdev_generation(src), 4);
	go(dst, R);

	free(s.p);
	testdev_free(src);
	testdev_free(dst);
}

TEST(stop_copy_only_device_migrates)
{
	struct testdev *src = probed("src", F_SC, 5000, 3);
	struct testdev *dst = probed("dst", F_SC, 5000, 4);
	struct stream s = { 0 };
	uint64_t expect;

	CHECK_EQ(testdev_dirty(src, 0, 5000), 0);
	expect = stop_copy_size(src);
	go(src, SC);
	CHECK_EQ(stop_copy_size(src), expect);
	read_to_end(src, &s);
	CHECK_EQ(s.len, expect);
	go(src, R);
	go(dst, RES);
	write_all(dst, &s);
	go(dst, R);
	CHECK_ARCS(dst, "R>S,S>RES,RES>S,S>R");
	CHECK(memcmp(testdev_data(src, NULL), testdev_data(dst, NULL), 5000) == 0);
	free(s.p);
	testdev_free(src);
	testdev_free(dst);
}

/* Resuming from a damaged stream: RESUMING -> STOP fails, then the policy runs. */
static void resume_bad(void (*damage)(struct stream *s))
{
	struct testdev *dst = probed("dst", F_ALL, 300, 5);
	struct vfm_device *dev = testdev_device(dst);
	unsigned char before[300];
	struct vfm_error err = { 0 };
	struct stream s = { 0 };

	memcpy(before, testdev_data(dst, NULL), sizeof(before));
	valid_stream(300, &s);
	damage(&s);
	go(dst, RES);
	write_all(dst, &s);
	testdev_clear_arcs(dst);
	CHECK_EQ(vfm_device_set_state(dev, R, RP, &err), -EINVAL);
	CHECK_EQ(err.code, -EINVAL);
	CHECK(strstr(err.msg, "invalid resume stream") != NULL);
	/* Still RESUMING after the failed arc, so recovery (via STOP) fails too. */
	CHECK_ARCS(dst, "RES>S!,RES>S!");
	CHECK_EQ(CALLS(dst, RESET), 1);
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK_EQ(testdev_state(dst), R);
	CHECK(!vfm_device_has_session(dev));
	CHECK(memcmp(before, testdev_data(dst, NULL), sizeof(before)) == 0);
	CHECK_EQ(testdev_generation(dst), 0);
	free(s.p);
	testdev_free(dst);
}

static void flip_payload_byte(struct stream *s)
{
	s->p[TESTDEV_HDR_SIZE + 7] ^= 1;
}

static void drop_end(struct stream *s)
{
	s->len -= TESTDEV_END_SIZE;
}

static void bad_magic(struct stream *s)
{
	s->p[0] ^= 0xff;
}

static void trailing_byte(struct stream *s)
{
	stream_put(s, "x", 1);
}

TEST(corrupted_stream_fails_resume)
{
	resume_bad(flip_payload_byte);
}

TEST(truncated_stream_fails_resume)
{
	resume_bad(drop_end);
}

TEST(bad_magic_fails_resume)
{
	resume_bad(bad_magic);
}

TEST(trailing_garbage_fails_resume)
{
	resume_bad(trailing_byte);
}

TEST(empty_stream_fails_resume_recover_elsewhere)
{
	struct testdev *dst = probed("dst", F_ALL, 64, 5);
	struct vfm_device *dev = testdev_device(dst);
	struct vfm_error err = { 0 };

	go(dst, RES);
	/* Recovering to RESUMING itself succeeds trivially: the stream can be resent. */
	CHECK_EQ(vfm_device_set_state(dev, S, RES, &err), -EINVAL);
	CHECK_EQ(vfm_device_state(dev), RES);
	CHECK(vfm_device_has_session(dev));
	CHECK_EQ(CALLS(dst, RESET), 0);
	testdev_free(dst);
}

TEST(read_data_outside_saving_session)
{
	struct testdev *td = probed("d", F_ALL, 64, 1);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };
	char buf[64];

	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), &err), -EINVAL);
	CHECK_EQ(err.code, -EINVAL);
	go(td, RES);
	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), NULL), -EINVAL);
	CHECK_EQ(vfm_device_reset(dev, NULL), 0);
	go(td, SC);
	go(td, S);
	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), NULL), -EINVAL);
	go(td, PC);
	go(td, R);
	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), NULL), -EINVAL);
	CHECK_EQ(CALLS(td, READ), 0);
	testdev_free(td);
}

TEST(write_data_outside_resuming)
{
	struct testdev *td = probed("d", F_ALL, 64, 1);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_device_write_data(dev, "abc", 3, &err), -EINVAL);
	CHECK_EQ(err.code, -EINVAL);
	go(td, SC);
	CHECK_EQ(vfm_device_write_data(dev, "abc", 3, NULL), -EINVAL);
	go(td, R);
	go(td, PC);
	CHECK_EQ(vfm_device_write_data(dev, "abc", 3, NULL), -EINVAL);
	CHECK_EQ(CALLS(td, WRITE), 0);
	testdev_free(td);
}

TEST(precopy_info_outside_precopy)
{
	static const enum vfm_state states[] = { R, RP, S, SC, RES };
	struct testdev *td = probed("d", F_ALL, 64, 1);
	struct vfm_device *dev = testdev_device(td);

	for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++) {
		struct vfm_error err = { 0 };
		uint64_t a = 7, b = 7;

		go(td, R);
		go(td, states[i]);
		CHECK_EQ(vfm_device_precopy_info(dev, &a, &b, &err), -EINVAL);
		CHECK_EQ(err.code, -EINVAL);
		CHECK_EQ(a, 7);
		CHECK_EQ(b, 7);
	}
	CHECK_EQ(CALLS(td, PRECOPY_INFO), 0);
	testdev_free(td);
}

TEST(missing_ops_not_supported)
{
	struct testdev *td = testdev_new("d", F_ALL, 64, 1,
					 TESTDEV_NO_PRECOPY_INFO | TESTDEV_NO_STOP_COPY_SIZE |
					 TESTDEV_NO_DMA_LOGGING | TESTDEV_NO_IO);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_iova_range range = { 0, 4096 };
	uint64_t a, b, ps = 4096, bitmap[1] = { 0 };
	struct vfm_dma_map map = { .iova = 0, .size = 4096, .fd = -1 };
	struct vfm_device_info info;
	struct vfm_region_info rinfo;
	char buf[4];

	CHECK_EQ(vfm_device_probe_migration(dev, NULL), 0);
	go(td, PC);
	CHECK_EQ(vfm_device_precopy_info(dev, &a, &b, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_stop_copy_size(dev, &a, NULL), -ENOTSUP);
	CHECK(!vfm_device_has_dma_logging(dev));
	CHECK_EQ(vfm_device_log_start(dev, &range, 1, &ps, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_log_stop(dev, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_log_report(dev, 0, 4096, 4096, bitmap, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_get_info(dev, &info, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_region_info(dev, 0, &rinfo, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_region_read(dev, 0, 0, buf, 4, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_region_write(dev, 0, 0, buf, 4, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_dma_map(dev, &map, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_dma_unmap(dev, 0, 4096, 4096, NULL, NULL), -ENOTSUP);
	testdev_free(td);

	/* Without any migration ops table. */
	td = testdev_new("d", F_ALL, 64, 1, TESTDEV_NO_MIG);
	dev = testdev_device(td);
	CHECK_EQ(vfm_device_precopy_info(dev, &a, &b, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_stop_copy_size(dev, &a, NULL), -ENOTSUP);
	CHECK_EQ(vfm_device_read_data(dev, buf, 4, NULL), -EINVAL);
	CHECK_EQ(vfm_device_write_data(dev, buf, 4, NULL), -EINVAL);
	CHECK_EQ(vfm_device_reset(dev, NULL), 0);
	testdev_free(td);
}

TEST(read_data_errors)
{
	struct testdev *td = probed("d", F_ALL, 64, 1);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };
	char buf[16];

	go(td, SC);
	testdev_fail_op(td, TESTDEV_OP_READ, -EIO, 1);
	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	/* A backend claiming more than the buffer holds is broken. */
	testdev_lie_size(td, TESTDEV_OP_READ, 1);
	err = (struct vfm_error){ 0 };
	CHECK(vfm_device_read_data(dev, buf, sizeof(buf), &err) < 0);
	CHECK(err.code < 0);
	/* EAGAIN is not an error worth a message. */
	testdev_lie_size(td, TESTDEV_OP_READ, 0);
	testdev_fail_op(td, TESTDEV_OP_READ, -EAGAIN, 1);
	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), NULL), -EAGAIN);
	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), NULL), (ssize_t)sizeof(buf));
	testdev_free(td);
}

TEST(write_data_errors)
{
	struct testdev *td = probed("d", F_ALL, 64, 1);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_error err = { 0 };

	go(td, RES);
	testdev_fail_op(td, TESTDEV_OP_WRITE, -ENOSPC, 1);
	CHECK_EQ(vfm_device_write_data(dev, "abcd", 4, &err), -ENOSPC);
	CHECK_EQ(err.code, -ENOSPC);
	/* Interrupted or would-block writes are retried. */
	testdev_fail_op(td, TESTDEV_OP_WRITE, -EINTR, 2);
	CHECK_EQ(vfm_device_write_data(dev, "abcd", 4, NULL), 0);
	testdev_fail_op(td, TESTDEV_OP_WRITE, -EAGAIN, 1);
	CHECK_EQ(vfm_device_write_data(dev, "efgh", 4, NULL), 0);
	{
		size_t n;
		const unsigned char *in = testdev_resume_buf(td, &n);

		CHECK_EQ(n, 8);
		CHECK(memcmp(in, "abcdefgh", 8) == 0);
	}
	/* Taking more than offered is broken. */
	testdev_lie_size(td, TESTDEV_OP_WRITE, 1);
	err = (struct vfm_error){ 0 };
	CHECK_EQ(vfm_device_write_data(dev, "abcd", 4, &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	/* Taking nothing as well. */
	testdev_lie_size(td, TESTDEV_OP_WRITE, -4);
	CHECK_EQ(vfm_device_write_data(dev, "abcd", 4, NULL), -EIO);
	testdev_free(td);
}

TEST(reset_kills_the_session)
{
	struct testdev *td = probed("d", F_ALL, 64, 1);
	struct vfm_device *dev = testdev_device(td);

	go(td, PC);
	CHECK(vfm_device_has_session(dev));
	CHECK_EQ(vfm_device_reset(dev, NULL), 0);
	CHECK_EQ(CALLS(td, END_SESSION), 1);
	CHECK(!vfm_device_has_session(dev));
	CHECK_EQ(testdev_session_id(td), 0);
	CHECK_EQ(vfm_device_state(dev), R);
	CHECK_EQ(vfm_device_read_data(dev, (char[4]){ 0 }, 4, NULL), -EINVAL);
	testdev_free(td);
}

/* ---- Pass-throughs ---- */

TEST(dma_logging_validation)
{
	struct testdev *td = testdev_new("d", F_ALL, 16, 1, 0);
	struct vfm_device *dev = testdev_device(td);
	static struct vfm_iova_range many[257];
	static const struct {
		struct vfm_iova_range r[2];
		uint32_t n;
		uint64_t ps;
	} bad[] = {
		{ { { 0x1001, 0x1000 } }, 1, 4096 },                 /* unaligned iova */
		{ { { 0x1000, 0x1800 } }, 1, 4096 },                 /* unaligned length */
		{ { { 0x1000, 0 } }, 1, 4096 },                      /* empty */
		{ { { 0x1000, 0x1000 } }, 0, 4096 },                 /* no ranges */
		{ { { 0x1000, 0x1000 } }, 1, 0 },                    /* page sizes */
		{ { { 0x1000, 0x1000 } }, 1, 2048 },
		{ { { 0x3000, 0x3000 } }, 1, 12288 },
		{ { { 0x2000, 0x1000 } }, 1, 8192 },                 /* not aligned to it */
		{ { { ~0xfffull, 0x2000 } }, 1, 4096 },              /* wraps */
		{ { { 0x0, 0x3000 }, { 0x2000, 0x1000 } }, 2, 4096 }, /* overlap */
		{ { { 0x2000, 0x1000 }, { 0x0, 0x3000 } }, 2, 4096 },
	};
	uint64_t ps, bitmap[2];
	uint32_t n;
	const struct vfm_iova_range *got;

	CHECK(vfm_device_has_dma_logging(dev));
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct vfm_error err = { 0 };

		ps = bad[i].ps;
		if (vfm_device_log_start(dev, bad[i].r, bad[i].n, &ps, &err) != -EINVAL)
			FAIL("bad start %zu accepted", i);
		CHECK_EQ(err.code, -EINVAL);
	}
	for (uint32_t i = 0; i < 257; i++)
		many[i] = (struct vfm_iova_range){ (uint64_t)i * 0x2000, 0x1000 };
	ps = 4096;
	CHECK_EQ(vfm_device_log_start(dev, many, 257, &ps, NULL), -EINVAL);
	CHECK_EQ(vfm_device_log_start(dev, many, 1, NULL, NULL), -EINVAL);
	CHECK_EQ(CALLS(td, LOG_START), 0);

	/* 256 ranges is the limit, not beyond it; the used page size comes back. */
	testdev_log_force_page_size(td, 8192);
	ps = 4096;
	CHECK_EQ(vfm_device_log_start(dev, many, 256, &ps, NULL), 0);
	CHECK_EQ(ps, 8192);
	CHECK(testdev_logging(td));
	got = testdev_log_ranges(td, &n, &ps);
	CHECK_EQ(n, 256);
	CHECK_EQ(ps, 8192);
	CHECK_EQ(got[255].iova, 255 * 0x2000);
	CHECK_EQ(vfm_device_log_stop(dev, NULL), 0);
	CHECK(!testdev_logging(td));

	/* Adjacent (touching) ranges are fine. */
	ps = 4096;
	CHECK_EQ(vfm_device_log_start(dev, (struct vfm_iova_range[]){ { 0, 0x1000 },
								      { 0x1000, 0x1000 } },
				      2, &ps, NULL), 0);
	CHECK_EQ(ps, 8192);

	/* Reports: page size a power of two of at least 4 KiB, non-empty, no wrap. */
	static const uint64_t bad_ps[] = { 0, 2048, 3000, 12288, 1 };
	for (size_t i = 0; i < sizeof(bad_ps) / sizeof(bad_ps[0]); i++)
		if (vfm_device_log_report(dev, 0, 0x10000, bad_ps[i], bitmap, NULL) != -EINVAL)
			FAIL("report page size %" PRIu64 " accepted", bad_ps[i]);
	CHECK_EQ(vfm_device_log_report(dev, 0, 0, 4096, bitmap, NULL), -EINVAL);
	CHECK_EQ(vfm_device_log_report(dev, ~0xfffull, 0x2000, 4096, bitmap, NULL), -EINVAL);
	CHECK_EQ(vfm_device_log_report(dev, 0, 0x1000, 4096, NULL, NULL), -EINVAL);
	CHECK_EQ(CALLS(td, LOG_REPORT), 0);

	testdev_log_dirty(td, 0x3000);
	testdev_log_dirty(td, 0x41000);
	testdev_log_dirty(td, 0x900000);   /* outside the report */
	memset(bitmap, 0, sizeof(bitmap));
	CHECK_EQ(vfm_device_log_report(dev, 0x1000, 0x80000, 4096, bitmap, NULL), 0);
	CHECK_EQ(bitmap[0], 1ull << 2);
	CHECK_EQ(bitmap[1], 1ull << 0);
	/* Reading clears. */
	memset(bitmap, 0, sizeof(bitmap));
	CHECK_EQ(vfm_device_log_report(dev, 0x1000, 0x80000, 4096, bitmap, NULL), 0);
	CHECK_EQ(bitmap[0] | bitmap[1], 0);
	CHECK_EQ(vfm_device_log_stop(dev, NULL), 0);
	testdev_fail_op(td, TESTDEV_OP_LOG_STOP, -EIO, 1);
	CHECK_EQ(vfm_device_log_stop(dev, NULL), -EIO);
	testdev_free(td);
}

TEST(dma_map_validation)
{
	struct testdev *td = testdev_new("d", F_ALL, 16, 1, 0);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_dma_map map = { .iova = 0x1000, .size = 0, .fd = -1,
				   .prot = VFM_DMA_READ | VFM_DMA_WRITE };

	CHECK_EQ(vfm_device_dma_map(dev, &map, NULL), -EINVAL);
	map.iova = ~0ull - 0xfff;
	map.size = 0x2000;
	CHECK_EQ(vfm_device_dma_map(dev, &map, NULL), -EINVAL);
	CHECK_EQ(CALLS(td, DMA_MAP), 0);
	map.iova = 0x1000;
	CHECK_EQ(vfm_device_dma_map(dev, &map, NULL), 0);
	CHECK_EQ(CALLS(td, DMA_MAP), 1);
	CHECK_EQ(vfm_device_dma_unmap(dev, 0x1000, 0x2000, 4096, NULL, NULL), 0);
	CHECK_EQ(CALLS(td, DMA_UNMAP), 1);
	testdev_free(td);
}

TEST(region_io)
{
	struct testdev *td = testdev_new("d", F_ALL, 16, 1, 0);
	struct vfm_device *dev = testdev_device(td);
	struct vfm_device_info info;
	struct vfm_region_info rinfo;
	struct vfm_error err = { 0 };
	unsigned char buf[8], *r;
	size_t rsize;

	CHECK_EQ(vfm_device_get_info(dev, &info, NULL), 0);
	CHECK_EQ(info.num_regions, TESTDEV_NUM_REGIONS);
	CHECK_EQ(vfm_device_region_info(dev, 1, &rinfo, NULL), 0);
	CHECK_EQ(rinfo.size, TESTDEV_REGION1_SIZE);
	CHECK_EQ(vfm_device_region_info(dev, 2, &rinfo, NULL), -EINVAL);

	r = testdev_region(td, 0, &rsize);
	CHECK_EQ(vfm_device_region_read(dev, 0, 8, buf, sizeof(buf), NULL), 0);
	CHECK(memcmp(buf, r + 8, sizeof(buf)) == 0);
	CHECK_EQ(vfm_device_region_write(dev, 1, 100, "hello", 5, NULL), 0);
	r = testdev_region(td, 1, &rsize);
	CHECK(memcmp(r + 100, "hello", 5) == 0);

	/* Short transfers (and over-long claims) are I/O errors. */
	testdev_lie_size(td, TESTDEV_OP_REGION_READ, -1);
	CHECK_EQ(vfm_device_region_read(dev, 0, 0, buf, sizeof(buf), &err), -EIO);
	CHECK_EQ(err.code, -EIO);
	CHECK(strstr(err.msg, "short") != NULL);
	testdev_lie_size(td, TESTDEV_OP_REGION_READ, 1);
	CHECK_EQ(vfm_device_region_read(dev, 0, 0, buf, sizeof(buf), NULL), -EIO);
	testdev_lie_size(td, TESTDEV_OP_REGION_WRITE, -3);
	CHECK_EQ(vfm_device_region_write(dev, 0, 0, buf, sizeof(buf), NULL), -EIO);
	/* Backend errors pass through. */
	testdev_fail_op(td, TESTDEV_OP_REGION_WRITE, -EFAULT, 1);
	CHECK_EQ(vfm_device_region_write(dev, 0, 0, buf, sizeof(buf), NULL), -EFAULT);
	CHECK_EQ(vfm_device_region_read(dev, 0, 250, buf, sizeof(buf), NULL), -EINVAL);
	/* A wrapping range is refused before the backend. */
	unsigned reads = CALLS(td, REGION_READ);
	CHECK_EQ(vfm_device_region_read(dev, 0, ~0ull - 2, buf, sizeof(buf), NULL), -EINVAL);
	CHECK_EQ(CALLS(td, REGION_READ), reads);
	testdev_free(td);
}

/* ---- Tracing ---- */

static char trace_buf[16384];
static size_t trace_len;

static void trace_sink(enum vfm_log_level level, const char *line, void *opaque)
{
	int n;

	(void)opaque;
	if (level != VFM_LOG_TRACE)
		return;
	n = snprintf(trace_buf + trace_len, sizeof(trace_buf) - trace_len, "%s\n", line);
	if (n > 0 && (size_t)n < sizeof(trace_buf) - trace_len)
		trace_len += (size_t)n;
}

static void trace_capture(void)
{
	trace_len = 0;
	trace_buf[0] = '\0';
	vfm_log_set_sink(trace_sink, NULL);
}

/* The trace line that contains both needles, or NULL. */
static const char *trace_line_with(const char *a, const char *b)
{
	const char *p = trace_buf;

	while (*p) {
		const char *end = strchr(p, '\n');
		char line[1024];
		size_t n = end ? (size_t)(end - p) : strlen(p);

		snprintf(line, sizeof(line), "%.*s", (int)n, p);
		if (strstr(line, a) && strstr(line, b))
			return p;
		p += n + (end ? 1 : 0);
	}
	return NULL;
}

TEST(trace_names_the_device)
{
	struct testdev *td = testdev_new("tracedev7", F_ALL, 64, 1, 0);
	struct vfm_device *dev = testdev_device(td);
	char buf[32];

	trace_capture();
	vfm_log_set_level(VFM_LOG_TRACE);
	CHECK_EQ(vfm_device_probe_migration(dev, NULL), 0);
	go(td, SC);
	CHECK_EQ(vfm_device_read_data(dev, buf, sizeof(buf), NULL), (ssize_t)sizeof(buf));
	vfm_log_set_level(VFM_LOG_WARN);
	vfm_log_set_sink(NULL, NULL);

	if (!trace_line_with("[tracedev7]", "RUNNING -> STOP_COPY"))
		FAIL("no state trace in:\n%s", trace_buf);
	if (!trace_line_with("[tracedev7]", "data session opened"))
		FAIL("no session trace in:\n%s", trace_buf);
	if (!trace_line_with("[tracedev7]", "data block read: 32 bytes"))
		FAIL("no data trace in:\n%s", trace_buf);
	CHECK(trace_line_with("trace", "[tracedev7]") != NULL);
	testdev_free(td);
}

TEST(no_trace_below_trace_level)
{
	struct testdev *td = testdev_new("quietdev", F_ALL, 64, 1, 0);
	struct vfm_device *dev = testdev_device(td);

	trace_capture();
	vfm_log_set_level(VFM_LOG_DEBUG);
	CHECK_EQ(vfm_device_probe_migration(dev, NULL), 0);
	go(td, SC);
	vfm_log_set_level(VFM_LOG_WARN);
	vfm_log_set_sink(NULL, NULL);
	CHECK_EQ(trace_len, 0);
	testdev_free(td);
}
