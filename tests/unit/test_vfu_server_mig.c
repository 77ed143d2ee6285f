/*
 * The server library's migration over the wire: every (from, to) request for
 * each set of migration flags with the device seeing only single arcs,
 * forbidden and unsupported requests refused before the device hears of
 * them, failing arcs, DEVICE_FEATURE rules, MIG_DATA_READ/WRITE.
 */
#include <sys/mman.h>
#include <unistd.h>

#include "harness.h"
#include "vfu_rawclient.h"
#include "vfu_testdev.h"

#define R VFM_STATE_RUNNING
#define RP VFM_STATE_RUNNING_P2P
#define PC VFM_STATE_PRE_COPY
#define PCP VFM_STATE_PRE_COPY_P2P
#define S VFM_STATE_STOP
#define SC VFM_STATE_STOP_COPY
#define RES VFM_STATE_RESUMING

/* vfio-uapi.md's table of full paths with all three flags; {} = forbidden. */
static const unsigned char all_paths[8][8][5] = {
	[R] = { [RP] = { RP }, [PC] = { PC }, [PCP] = { RP, PCP }, [S] = { RP, S },
		[SC] = { RP, S, SC }, [RES] = { RP, S, RES } },
	[RP] = { [R] = { R }, [PC] = { R, PC }, [PCP] = { PCP }, [S] = { S },
		 [SC] = { S, SC }, [RES] = { S, RES } },
	[PC] = { [R] = { R }, [RP] = { R, RP }, [PCP] = { PCP }, [S] = { R, RP, S },
		 [SC] = { PCP, SC }, [RES] = { R, RP, S, RES } },
	[PCP] = { [R] = { RP, R }, [RP] = { RP }, [PC] = { PC }, [S] = { RP, S },
		  [SC] = { SC }, [RES] = { RP, S, RES } },
	[S] = { [R] = { RP, R }, [RP] = { RP }, [PC] = { RP, R, PC }, [PCP] = { RP, PCP },
		[SC] = { SC }, [RES] = { RES } },
	[SC] = { [R] = { S, RP, R }, [RP] = { S, RP }, [S] = { S }, [RES] = { S, RES } },
	[RES] = { [R] = { S, RP, R }, [RP] = { S, RP }, [PC] = { S, RP, R, PC },
		  [PCP] = { S, RP, PCP }, [S] = { S }, [SC] = { S, SC } },
};

static bool supported(uint64_t flags, unsigned s)
{
	switch (s) {
	case R: return true;
	case S: case SC: case RES: return flags & VFM_MIG_STOP_COPY;
	case RP: return flags & VFM_MIG_P2P;
	case PC: return flags & VFM_MIG_PRE_COPY;
	case PCP: return (flags & VFM_MIG_P2P) && (flags & VFM_MIG_PRE_COPY);
	}
	return false;
}

static bool saving(unsigned s)
{
	return s == PC || s == PCP || s == SC;
}

/*
 * Shortest path over direct arcs that passes through a saving state only
 * while it never left the saving group (PRE_COPY -> PRE_COPY_P2P ->
 * STOP_COPY is one session; RUNNING -> PRE_COPY -> ... would open one).
 */
static int bfs_len(uint64_t flags, unsigned from, unsigned to)
{
	int dist[8];
	bool pure[8];   /* reached through saving states only */
	unsigned queue[8], qh = 0, qt = 0;

	for (int i = 0; i < 8; i++)
		dist[i] = -1;
	dist[from] = 0;
	pure[from] = saving(from);
	queue[qt++] = from;
	while (qh < qt) {
		unsigned u = queue[qh++];

		if (u == to)
			return dist[u];
		if (u != from && saving(u) && !pure[u])
			continue;
		for (unsigned v = 1; v < 8; v++) {
			if (dist[v] < 0 && supported(flags, v) &&
			    td_arc_direct(flags, (enum vfm_state)u, (enum vfm_state)v)) {
				dist[v] = dist[u] + 1;
				pure[v] = pure[u] && saving(v);
				queue[qt++] = v;
			}
		}
	}
	return -1;
}

static uint32_t state_of(struct rc *c)
{
	uint32_t st = 99;

	CHECK_EQ(rc_get_state(c, &st), 0);
	return st;
}

TEST_TIMEOUT(fsm_every_pair_single_arcs, 120)
{
	static const uint64_t flag_sets[] = {
		VFM_MIG_STOP_COPY, VFM_MIG_STOP_COPY | VFM_MIG_P2P,
		VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY, VFM_MIG_ALL,
	};
	struct td_arc arcs[16];

	for (size_t f = 0; f < sizeof(flag_sets) / sizeof(flag_sets[0]); f++) {
		uint64_t fl = flag_sets[f];
		unsigned pairs = 0;
		struct srv s;
		struct rc c;

		srv_start_pair(&s, fl, NULL, &c);
		rc_hello(&c);
		CHECK_EQ(state_of(&c), R);
		for (unsigned from = 1; from < 8; from++) {
			if (!supported(fl, from))
				continue;
			for (unsigned to = 1; to < 8; to++) {
				unsigned n, prev = from;
				bool in_group = saving(from);
				int r;

				if (!supported(fl, to))
					continue;
				CHECK_EQ(rc_set_state(&c, R), 0);
				CHECK_EQ(rc_set_state(&c, from), 0);
				td_take_arcs(&s.td, arcs, 16);
				r = rc_set_state(&c, to);
				n = td_take_arcs(&s.td, arcs, 16);
				if (from == SC && (to == PC || to == PCP)) {
					if (r != -EINVAL || n)
						FAIL("flags %#llx: SC -> %u gave %d after %u arcs",
						     (unsigned long long)fl, to, r, n);
					CHECK_EQ(state_of(&c), SC);
					continue;
				}
				if (r)
					FAIL("flags %#llx: %u -> %u refused: %d", (unsigned long long)fl,
					     from, to, r);
				CHECK_EQ(state_of(&c), to);
				for (unsigned i = 0; i < n; i++) {
					if (arcs[i].from != prev || !td_arc_direct(fl, arcs[i].from, arcs[i].to))
						FAIL("flags %#llx: %u -> %u: arc %u is %u -> %u",
						     (unsigned long long)fl, from, to, i, arcs[i].from,
						     arcs[i].to);
					in_group = in_group && saving(arcs[i].to);
					if (i + 1 < n && saving(arcs[i].to) && !in_group)
						FAIL("flags %#llx: %u -> %u rests in saving state %u",
						     (unsigned long long)fl, from, to, arcs[i].to);
					prev = arcs[i].to;
				}
				CHECK_EQ(prev, to);
				if (from != to)
					CHECK_EQ((int)n, bfs_len(fl, from, to));
				else
					CHECK_EQ(n, 0);
				if (fl == VFM_MIG_ALL) {
					for (unsigned i = 0; i < n; i++)
						CHECK_EQ(arcs[i].to, all_paths[from][to][i]);
					CHECK_EQ(all_paths[from][to][n], 0);
				}
				pairs++;
			}
		}
		/* Unsupported states, ERROR and nonsense: refused, device untouched. */
		CHECK_EQ(rc_set_state(&c, R), 0);
		td_take_arcs(&s.td, arcs, 16);
		for (unsigned to = 0; to < 12; to++) {
			if (to < 8 && supported(fl, to))
				continue;
			CHECK_EQ(rc_set_state(&c, to), -EINVAL);
		}
		CHECK_EQ(rc_set_state(&c, 0xffffffffu), -EINVAL);
		CHECK_EQ(td_take_arcs(&s.td, arcs, 16), 0);
		CHECK_EQ(state_of(&c), R);
		CHECK_EQ(s.td.not_direct, 0);
		fprintf(stderr, "# flags %#llx: %u requests checked\n", (unsigned long long)fl, pairs);
		rc_close(&c);
		srv_stop(&s);
	}
}

TEST(fsm_failing_arcs)
{
	struct td_arc arcs[16];
	struct srv s;
	struct rc c;

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	rc_hello(&c);
	/* The walk stops at the failing arc; the state is where it got. */
	td_fail_arc(&s.td, S, SC, -EIO, false);
	CHECK_EQ(rc_set_state(&c, SC), -EIO);
	CHECK_EQ(td_take_arcs(&s.td, arcs, 16), 3);
	CHECK_EQ(state_of(&c), S);
	td_fail_arc(&s.td, S, SC, 0, false);
	CHECK_EQ(rc_set_state(&c, SC), 0);
	/* A device that reports ERROR: nothing but a reset gets it out. */
	CHECK_EQ(rc_set_state(&c, R), 0);
	td_fail_arc(&s.td, RP, S, -ENOMEM, true);
	CHECK_EQ(rc_set_state(&c, RES), -ENOMEM);
	CHECK_EQ(state_of(&c), VFM_STATE_ERROR);
	td_take_arcs(&s.td, arcs, 16);
	CHECK_EQ(rc_set_state(&c, R), -EINVAL);
	CHECK_EQ(td_take_arcs(&s.td, arcs, 16), 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_RESET, NULL, 0, NULL, 0, NULL), 0);
	CHECK_EQ(s.td.resets, 1);
	CHECK_EQ(state_of(&c), R);
	/* A failing RESUMING -> STOP keeps RESUMING (a device rejecting its data). */
	td_fail_arc(&s.td, RES, S, -EINVAL, false);
	CHECK_EQ(rc_set_state(&c, RES), 0);
	CHECK_EQ(rc_set_state(&c, R), -EINVAL);
	CHECK_EQ(state_of(&c), RES);
	rc_close(&c);
	/* The client left mid-migration: the device asked for a reset. */
	CHECK(srv_wait_gone(&s, 1, 5000));
	CHECK_EQ(s.td.resets, 2);
	srv_stop(&s);
}

TEST(feature_rules)
{
	uint8_t req[8] = { 0 }, out[64] = { 0 };
	struct vfu_msg m = VFU_MSG_INIT;
	uint64_t flags;
	struct srv s;
	struct rc c;

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	rc_hello(&c);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION | VFU_FEATURE_GET, 16, NULL, 0, &flags, 8), 0);
	CHECK_EQ(flags, VFM_MIG_ALL);
	/* GET reply: argsz = full size, flags echoed. */
	struct vfu_device_feature f = { .argsz = 64, .flags = VFU_FEATURE_MIGRATION | VFU_FEATURE_GET };
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_FEATURE, &f, 8, NULL, 0, &m), 0);
	CHECK_EQ(m.len, 16);
	memcpy(&f, m.payload, 8);
	vfu_msg_release(&m);
	CHECK_EQ(f.argsz, 16);
	CHECK_EQ(f.flags, VFU_FEATURE_MIGRATION | VFU_FEATURE_GET);
	/* PROBE: echoes the request, only for supported operations. */
	f = (struct vfu_device_feature){ .argsz = 8,
		.flags = VFU_FEATURE_MIG_DEVICE_STATE | VFU_FEATURE_GET | VFU_FEATURE_SET | VFU_FEATURE_PROBE };
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_FEATURE, &f, 8, NULL, 0, &m), 0);
	CHECK_EQ(m.len, 8);
	CHECK(!memcmp(m.payload, &f, 8));
	vfu_msg_release(&m);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION | VFU_FEATURE_PROBE, 8, NULL, 0, NULL, 0), 0);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION | VFU_FEATURE_SET | VFU_FEATURE_PROBE, 8, NULL,
			    0, NULL, 0), -EINVAL);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION | VFU_FEATURE_SET, 16, &flags, 8, NULL, 0),
		 -EINVAL);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_DMA_LOGGING_REPORT | VFU_FEATURE_SET | VFU_FEATURE_PROBE,
			    8, NULL, 0, NULL, 0), -EINVAL);
	/* Malformed flags; unknown features are ENOTTY, like the kernel's. */
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION | VFU_FEATURE_GET | VFU_FEATURE_SET, 16, NULL,
			    0, NULL, 0), -EINVAL);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION, 16, NULL, 0, NULL, 0), -EINVAL);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION | VFU_FEATURE_GET | (1u << 20), 16, NULL, 0,
			    NULL, 0), -EINVAL);
	CHECK_EQ(rc_feature(&c, 42 | VFU_FEATURE_GET, 64, NULL, 0, NULL, 0), -ENOTTY);
	CHECK_EQ(rc_feature(&c, 42 | VFU_FEATURE_PROBE, 64, NULL, 0, NULL, 0), -ENOTTY);
	/* argsz rules: a GET needs room for its data, a SET for its request. */
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION | VFU_FEATURE_GET, 12, NULL, 0, NULL, 0),
		 -EINVAL);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIG_DEVICE_STATE | VFU_FEATURE_SET, 16, out, 4, NULL, 0),
		 -EINVAL);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_FEATURE, req, 6, NULL, 0, NULL), -EINVAL);
	/* The extensions: sizes before and during a session. */
	uint64_t sz, ini, dirty;
	CHECK_EQ(rc_stop_copy_size(&c, &sz), 0);
	CHECK_EQ(sz, TD_STREAM);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), -EINVAL);
	rc_close(&c);
	srv_stop(&s);

	/* STOP_COPY only: no PRECOPY_INFO at all. Without migration: ENOTTY. */
	srv_start_pair(&s, VFM_MIG_STOP_COPY, NULL, &c);
	rc_hello(&c);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), -ENOTTY);
	rc_close(&c);
	srv_stop(&s);
	srv_start_pair(&s, 0, NULL, &c);
	rc_hello(&c);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIGRATION | VFU_FEATURE_GET, 16, NULL, 0, NULL, 0),
		 -ENOTTY);
	CHECK_EQ(rc_feature(&c, VFU_FEATURE_MIG_DEVICE_STATE | VFU_FEATURE_PROBE, 16, NULL, 0, NULL,
			    0), -ENOTTY);
	CHECK_EQ(rc_stop_copy_size(&c, &sz), -ENOTTY);
	CHECK_EQ(rc_mig_read(&c, out, 8), -ENOTTY);
	CHECK_EQ(rc_log_start(&c, 4096, NULL, 0, NULL), 0);   /* logging needs no migration */
	rc_close(&c);
	srv_stop(&s);
}

static void check_stream(const uint8_t *buf, size_t from, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (buf[i] != (uint8_t)((from + i) * 7 + 3))
			FAIL("stream byte %zu is %#x", from + i, buf[i]);
}

TEST(mig_data)
{
	uint8_t *buf = calloc(1, (1u << 20) + 64);
	struct vfu_mig_data rq;
	uint64_t ini, dirty, sz;
	size_t at = 0;
	long n;
	struct srv s;
	struct rc c;

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	rc_hello(&c);
	CHECK_EQ(rc_mig_read(&c, buf, 100), -EINVAL);     /* RUNNING */
	CHECK_EQ(rc_mig_write(&c, buf, 100), -EINVAL);

	/* PRE_COPY: the initial part, with exact sizes, then "nothing for now". */
	CHECK_EQ(rc_set_state(&c, PC), 0);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), 0);
	CHECK_EQ(ini, TD_PRECOPY);
	CHECK_EQ(dirty, 0);
	CHECK_EQ(rc_mig_read(&c, buf, 1500), 1500);     /* the device gives 1000 at a time */
	check_stream(buf, at, 1500);
	at += 1500;
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), 0);
	CHECK_EQ(ini, TD_PRECOPY - 1500);
	n = rc_mig_read(&c, buf, 5000);
	CHECK_EQ(n, TD_PRECOPY - 1500);                   /* short: no more for now */
	check_stream(buf, at, (size_t)n);
	at += (size_t)n;
	CHECK_EQ(rc_mig_read(&c, buf, 5000), 0);
	CHECK_EQ(rc_mig_write(&c, buf, 10), -EINVAL);
	CHECK_EQ(rc_stop_copy_size(&c, &sz), 0);
	CHECK_EQ(sz, TD_STREAM - TD_PRECOPY);
	/* Bad requests. */
	rq = (struct vfu_mig_data){ .argsz = 8 + 100, .size = 200 };
	CHECK_EQ(rc_call(&c, VFU_CMD_MIG_DATA_READ, &rq, 8, NULL, 0, NULL), -EINVAL);
	rq = (struct vfu_mig_data){ .argsz = UINT32_MAX, .size = (1u << 20) + 1 };
	CHECK_EQ(rc_call(&c, VFU_CMD_MIG_DATA_READ, &rq, 8, NULL, 0, NULL), -E2BIG);
	CHECK_EQ(rc_call(&c, VFU_CMD_MIG_DATA_READ, &rq, 4, NULL, 0, NULL), -EINVAL);

	/* On to STOP_COPY in the same session: the rest, then end of stream. */
	CHECK_EQ(rc_set_state(&c, SC), 0);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), -EINVAL);
	CHECK_EQ(rc_mig_read(&c, buf, 4096), 4096);
	check_stream(buf, at, 4096);
	at += 4096;
	n = rc_mig_read(&c, buf, 1u << 20);
	CHECK_EQ(n, TD_STREAM - at);
	check_stream(buf, at, (size_t)n);
	CHECK_EQ(rc_mig_read(&c, buf, 1u << 20), 0);
	CHECK_EQ(rc_mig_read(&c, buf, 0), 0);

	/* RESUMING takes everything, in order. */
	CHECK_EQ(rc_set_state(&c, RES), 0);
	CHECK_EQ(rc_mig_read(&c, buf, 10), -EINVAL);
	for (size_t i = 0; i < 3000; i++)
		buf[i] = (uint8_t)(i * 7 + 3);
	CHECK_EQ(rc_mig_write(&c, buf, 1000), 0);
	CHECK_EQ(rc_mig_write(&c, buf + 1000, 2000), 0);
	CHECK_EQ(rc_mig_write(&c, buf, 0), 0);
	CHECK_EQ(s.td.sink_len, 3000);
	check_stream(s.td.sink, 0, 3000);
	memset(buf, 0, 64);
	rq = (struct vfu_mig_data){ .argsz = 8 + 10, .size = 10 };
	memcpy(buf, &rq, 8);
	CHECK_EQ(rc_call(&c, VFU_CMD_MIG_DATA_WRITE, buf, 8 + 9, NULL, 0, NULL), -EINVAL);
	CHECK_EQ(rc_mig_write(&c, buf, (1u << 20) + 1), -E2BIG);
	CHECK_EQ(s.td.sink_len, 3000);
	CHECK_EQ(rc_set_state(&c, R), 0);
	free(buf);
	rc_close(&c);
	srv_stop(&s);
}

/* DEVICE_FEATURE SET MIG_SHM { size } with fd (-1: none). */
static int shm_set(struct rc *c, int fd, uint64_t size)
{
	struct vfu_device_feature f = { 16, VFM_VFU_FEATURE_MIG_SHM | VFU_FEATURE_SET };
	uint8_t req[sizeof(f) + sizeof(size)];

	memcpy(req, &f, sizeof(f));
	memcpy(req + sizeof(f), &size, sizeof(size));
	return rc_call(c, VFU_CMD_DEVICE_FEATURE, &req, sizeof(req), fd >= 0 ? &fd : NULL,
		       fd >= 0 ? 1 : 0, NULL);
}

/* A windowed MIG_DATA_WRITE request naming [offset, offset + size). */
static int shm_write(struct rc *c, uint32_t size, uint64_t offset)
{
	struct vfu_mig_shm_data rq = { sizeof(rq), size, offset };

	return rc_call(c, VFU_CMD_MIG_DATA_WRITE, &rq, sizeof(rq), NULL, 0, NULL);
}

#define SHM_HELLO "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576," \
		  "\"vfiomig_mig_shm\":true}}"

/*
 * The vfiomig_mig_shm extension (proto.h struct vfu_mig_shm_data): stated in
 * VERSION, then a window passed by SET; MIG_DATA_READ replies and
 * MIG_DATA_WRITE requests then carry {argsz, size, offset} and the bytes are
 * in the window. The client's offsets and sizes are untrusted: a range
 * outside the window (or wrapping, or above max_data_xfer_size), a bad SET
 * (no fd, a size that is not 4 KiB pages, a file shorter than it says) is
 * refused with EINVAL and the device hears nothing. Without the extension
 * negotiated the feature does not exist (ENOTTY).
 */
TEST(mig_shm_window)
{
	const uint64_t wsize = 1u << 20;
	struct vfu_version_info v;
	struct vfu_mig_data rq = { .argsz = sizeof(struct vfu_mig_shm_data), .size = 1500 };
	struct vfu_mig_shm_data rep;
	struct vfu_msg m = VFU_MSG_INIT;
	uint8_t *win;
	int fd, small;
	struct srv s;
	struct rc c;

	/* Not negotiated: no such feature, the standard messages. */
	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	rc_hello(&c);
	fd = test_memfd("win", wsize, (void **)&win);
	CHECK_EQ(shm_set(&c, fd, wsize), -ENOTTY);
	rc_close(&c);
	srv_stop(&s);

	/* A server that does not offer it leaves it off. */
	{
		struct vfm_vfu_opts o = { .no_mig_shm = true };

		srv_start_pair(&s, VFM_MIG_ALL, &o, &c);
		CHECK_EQ(rc_version(&c, SHM_HELLO, &v), 0);
		CHECK(!v.caps.mig_shm);
		CHECK_EQ(shm_set(&c, fd, wsize), -ENOTTY);
		rc_close(&c);
		srv_stop(&s);
	}

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	CHECK_EQ(rc_version(&c, SHM_HELLO, &v), 0);
	CHECK(v.caps.mig_shm);
	/* Bad SETs. */
	CHECK_EQ(shm_set(&c, -1, wsize), -EINVAL);
	CHECK_EQ(shm_set(&c, fd, 1000), -EINVAL);
	CHECK_EQ(shm_set(&c, fd, 0), -EINVAL);
	CHECK_EQ(shm_set(&c, fd, (uint64_t)VFU_MIG_SHM_MAX + 4096), -EINVAL);
	small = test_memfd("small", 4096, NULL);
	CHECK_EQ(shm_set(&c, small, wsize), -EINVAL);   /* would SIGBUS past 4 KiB */
	close(small);
	CHECK_EQ(shm_set(&c, fd, wsize), 0);

	/* PRE_COPY: the device's bytes land in the window. */
	CHECK_EQ(rc_set_state(&c, PC), 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_MIG_DATA_READ, &rq, sizeof(rq), NULL, 0, &m), 0);
	CHECK_EQ(m.len, sizeof(rep));
	memcpy(&rep, m.payload, sizeof(rep));
	vfu_msg_release(&m);
	CHECK_EQ(rep.argsz, sizeof(rep));
	CHECK_EQ(rep.size, 1500);
	CHECK_EQ(rep.offset, 0);
	check_stream(win, 0, 1500);
	/* A READ whose argsz cannot take the windowed reply. */
	rq.argsz = 8;
	CHECK_EQ(rc_call(&c, VFU_CMD_MIG_DATA_READ, &rq, sizeof(rq), NULL, 0, NULL), -EINVAL);
	CHECK_EQ(vfm_vfu_mig_shm_bytes(s.ctx), 1500);

	/* RESUMING: from the window, and only from inside it. */
	CHECK_EQ(rc_set_state(&c, R), 0);
	CHECK_EQ(rc_set_state(&c, RES), 0);
	for (size_t i = 0; i < 3000; i++)
		win[wsize - 3000 + i] = (uint8_t)(i * 7 + 3);
	CHECK_EQ(shm_write(&c, 1000, wsize - 3000), 0);
	CHECK_EQ(shm_write(&c, 2000, wsize - 2000), 0);   /* ends at the window's end */
	CHECK_EQ(s.td.sink_len, 3000);
	check_stream(s.td.sink, 0, 3000);
	CHECK_EQ(shm_write(&c, 100, wsize - 50), -EINVAL);
	CHECK_EQ(shm_write(&c, 1, wsize), -EINVAL);
	CHECK_EQ(shm_write(&c, 4096, UINT64_MAX - 100), -EINVAL);   /* wraps */
	CHECK_EQ(shm_write(&c, (1u << 20) + 1, 0), -EINVAL);        /* above max_xfer */
	{
		/* The standard layout (data in the message) once the window is set. */
		uint8_t raw[8 + 10] = { 0 };
		struct vfu_mig_data hdr = { .argsz = sizeof(raw), .size = 10 };

		memcpy(raw, &hdr, sizeof(hdr));
		CHECK_EQ(rc_call(&c, VFU_CMD_MIG_DATA_WRITE, raw, sizeof(raw), NULL, 0, NULL),
			 -EINVAL);
	}
	CHECK_EQ(s.td.sink_len, 3000);   /* nothing of the refused ones reached the device */
	CHECK_EQ(vfm_vfu_mig_shm_bytes(s.ctx), 4500);
	CHECK_EQ(rc_set_state(&c, R), 0);
	close(fd);
	munmap(win, wsize);
	rc_close(&c);
	srv_stop(&s);
}

static uint64_t td_pos(struct srv *s)
{
	uint64_t pos;

	pthread_mutex_lock(&s->td.lock);
	pos = s->td.pos;
	pthread_mutex_unlock(&s->td.lock);
	return pos;
}

/* A windowed MIG_DATA_READ of size bytes: returns the reply's size, *off its offset. */
static long shm_read(struct rc *c, uint32_t size, uint64_t *off)
{
	struct vfu_mig_data rq = { .argsz = sizeof(struct vfu_mig_shm_data), .size = size };
	struct vfu_mig_shm_data rep;
	struct vfu_msg m = VFU_MSG_INIT;
	int r = rc_call(c, VFU_CMD_MIG_DATA_READ, &rq, sizeof(rq), NULL, 0, &m);

	if (r)
		return r;
	CHECK_EQ(m.len, sizeof(rep));
	memcpy(&rep, m.payload, sizeof(rep));
	vfu_msg_release(&m);
	*off = rep.offset;
	return rep.size;
}

/*
 * Read-ahead through the window: after a full reply the server reads the
 * next block from the device into the other part of the window (the next
 * reply names it), and PRECOPY_INFO and MIG_DATA_SIZE count what it holds
 * as not yet read. The stream stays in order across PRE_COPY -> STOP_COPY,
 * a request larger than what is held is topped up from the device, and
 * leaving the saving states drops the rest. (A request answered after the
 * read-ahead: the server's loop does one thing at a time.)
 */
TEST(mig_shm_read_ahead)
{
	const uint64_t wsize = 64u << 10;
	struct vfu_version_info v;
	uint64_t off, ini, dirty, sz;
	uint8_t *win;
	int fd;
	struct srv s;
	struct rc c;

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	CHECK_EQ(rc_version(&c, SHM_HELLO, &v), 0);
	fd = test_memfd("win", wsize, (void **)&win);
	CHECK_EQ(shm_set(&c, fd, wsize), 0);
	CHECK_EQ(rc_set_state(&c, PC), 0);
	CHECK_EQ(shm_read(&c, 1000, &off), 1000);
	CHECK_EQ(off, 0);
	check_stream(win, 0, 1000);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), 0);
	CHECK_EQ(td_pos(&s), 2000);                  /* the next 1000 read ahead */
	CHECK_EQ(ini, TD_PRECOPY - 1000);            /* ... and still counted */
	CHECK_EQ(dirty, 0);
	CHECK_EQ(shm_read(&c, 1000, &off), 1000);
	CHECK_EQ(off, 1000);                         /* where it was read ahead */
	check_stream(win + off, 1000, 1000);
	CHECK_EQ(rc_precopy_info(&c, &ini, &dirty), 0);
	CHECK_EQ(td_pos(&s), TD_PRECOPY);            /* [2000, 3000) at 0 now */
	CHECK_EQ(ini, TD_PRECOPY - 2000);
	/* Larger than what is held: that, and the device has no more for now. */
	CHECK_EQ(shm_read(&c, 1500, &off), 1000);
	CHECK_EQ(off, 0);
	check_stream(win, 2000, 1000);
	CHECK_EQ(rc_stop_copy_size(&c, &sz), 0);
	CHECK_EQ(sz, TD_STREAM - TD_PRECOPY);
	/* On into STOP_COPY: a full block, the rest read ahead and counted. */
	CHECK_EQ(rc_set_state(&c, SC), 0);
	CHECK_EQ(shm_read(&c, 4096, &off), 4096);
	CHECK_EQ(off, 0);
	check_stream(win, TD_PRECOPY, 4096);
	CHECK_EQ(rc_stop_copy_size(&c, &sz), 0);
	CHECK_EQ(td_pos(&s), TD_STREAM);
	CHECK_EQ(sz, TD_STREAM - TD_PRECOPY - 4096);
	/* Out of the session: what was held is dropped, nothing is counted. */
	CHECK_EQ(rc_set_state(&c, R), 0);
	CHECK_EQ(rc_stop_copy_size(&c, &sz), 0);
	CHECK_EQ(sz, 0);
	close(fd);
	munmap(win, wsize);
	rc_close(&c);
	srv_stop(&s);
}
