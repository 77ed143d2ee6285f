/*
 * The migration state machine, tested against tables derived by hand from the
 * kernel's arc rules (docs: /work/shared/reference/vfio-uapi.md, "Arcs"), not
 * from lib/fsm.c. Every (flags, from, to) cell of four flag sets is checked:
 * the full path of vfm_fsm_path(), the first hop of vfm_fsm_next(), and
 * structural properties of the path (direct hops, no saving intermediates).
 */
#include <ctype.h>

#include "harness.h"
#include "vfiomig/fsm.h"

#define NS VFM_STATE_COUNT

/* Short names used in the expected tables. */
static const struct {
	const char *abbr;
	enum vfm_state s;
} abbrs[] = {
	{ "S", VFM_STATE_STOP },         { "R", VFM_STATE_RUNNING },
	{ "SC", VFM_STATE_STOP_COPY },   { "RES", VFM_STATE_RESUMING },
	{ "RP", VFM_STATE_RUNNING_P2P }, { "PC", VFM_STATE_PRE_COPY },
	{ "PCP", VFM_STATE_PRE_COPY_P2P },
};

static const char *const full_names[NS] = {
	"ERROR", "STOP", "RUNNING", "STOP_COPY",
	"RESUMING", "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P",
};

/*
 * Expected tables. Rows are `from`, columns are `to`, both in enum order:
 *   ERROR, S, R, SC, RES, RP, PC, PCP
 * A cell is "-" (refused), "." (from == to: empty path, success) or the states
 * entered, separated by '>', ending in `to`.
 */
struct fsm_table {
	uint64_t flags;
	const char *name;
	const char *cell[NS][NS];
};

#define REFUSED_ROW { "-", "-", "-", "-", "-", "-", "-", "-" }

static const struct fsm_table tables[] = {
	{
		VFM_MIG_STOP_COPY, "STOP_COPY",
		{
			/*          ERR  S      R        SC         RES        RP   PC   PCP */
			/* ERR */ REFUSED_ROW,
			/* S   */ { "-", ".",   "R",     "SC",      "RES",     "-", "-", "-" },
			/* R   */ { "-", "S",   ".",     "S>SC",    "S>RES",   "-", "-", "-" },
			/* SC  */ { "-", "S",   "S>R",   ".",       "S>RES",   "-", "-", "-" },
			/* RES */ { "-", "S",   "S>R",   "S>SC",    ".",       "-", "-", "-" },
			/* RP  */ REFUSED_ROW,
			/* PC  */ REFUSED_ROW,
			/* PCP */ REFUSED_ROW,
		},
	},
	{
		VFM_MIG_STOP_COPY | VFM_MIG_P2P, "STOP_COPY|P2P",
		{
			/*          ERR  S       R         SC          RES         RP      PC   PCP */
			/* ERR */ REFUSED_ROW,
			/* S   */ { "-", ".",    "RP>R",   "SC",       "RES",      "RP",   "-", "-" },
			/* R   */ { "-", "RP>S", ".",      "RP>S>SC",  "RP>S>RES", "RP",   "-", "-" },
			/* SC  */ { "-", "S",    "S>RP>R", ".",        "S>RES",    "S>RP", "-", "-" },
			/* RES */ { "-", "S",    "S>RP>R", "S>SC",     ".",        "S>RP", "-", "-" },
			/* RP  */ { "-", "S",    "R",      "S>SC",     "S>RES",    ".",    "-", "-" },
			/* PC  */ REFUSED_ROW,
			/* PCP */ REFUSED_ROW,
		},
	},
	{
		VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY, "STOP_COPY|PRE_COPY",
		{
			/*          ERR  S      R       SC      RES        RP   PC        PCP */
			/* ERR */ REFUSED_ROW,
			/* S   */ { "-", ".",   "R",    "SC",   "RES",     "-", "R>PC",   "-" },
			/* R   */ { "-", "S",   ".",    "S>SC", "S>RES",   "-", "PC",     "-" },
			/* SC  */ { "-", "S",   "S>R",  ".",    "S>RES",   "-", "-",      "-" },
			/* RES */ { "-", "S",   "S>R",  "S>SC", ".",       "-", "S>R>PC", "-" },
			/* RP  */ REFUSED_ROW,
			/* PC  */ { "-", "R>S", "R",    "SC",   "R>S>RES", "-", ".",      "-" },
			/* PCP */ REFUSED_ROW,
		},
	},
	{
		VFM_MIG_STOP_COPY | VFM_MIG_P2P | VFM_MIG_PRE_COPY, "STOP_COPY|P2P|PRE_COPY",
		{
			/*          ERR  S         R         SC         RES           RP      PC            PCP */
			/* ERR */ REFUSED_ROW,
			/* S   */ { "-", ".",      "RP>R",   "SC",      "RES",        "RP",   "RP>R>PC",    "RP>PCP" },
			/* R   */ { "-", "RP>S",   ".",      "RP>S>SC", "RP>S>RES",   "RP",   "PC",         "RP>PCP" },
			/* SC  */ { "-", "S",      "S>RP>R", ".",       "S>RES",      "S>RP", "-",          "-" },
			/* RES */ { "-", "S",      "S>RP>R", "S>SC",    ".",          "S>RP", "S>RP>R>PC",  "S>RP>PCP" },
			/* RP  */ { "-", "S",      "R",      "S>SC",    "S>RES",      ".",    "R>PC",       "PCP" },
			/* PC  */ { "-", "R>RP>S", "R",      "PCP>SC",  "R>RP>S>RES", "R>RP", ".",          "PCP" },
			/* PCP */ { "-", "RP>S",   "RP>R",   "SC",      "RP>S>RES",   "RP",   "PC",         "." },
		},
	},
};
#define NTABLES (sizeof(tables) / sizeof(tables[0]))

/* Parsed cell: refused, or a path of len states. */
struct cell {
	bool refused;
	size_t len;
	enum vfm_state path[NS];
};

static enum vfm_state abbr_state(const char *tok, size_t n)
{
	for (size_t i = 0; i < sizeof(abbrs) / sizeof(abbrs[0]); i++)
		if (strlen(abbrs[i].abbr) == n && !strncmp(abbrs[i].abbr, tok, n))
			return abbrs[i].s;
	FAIL("bad state abbreviation '%.*s' in an expected table", (int)n, tok);
}

static void parse_cell(const char *s, struct cell *c)
{
	memset(c, 0, sizeof(*c));
	if (!strcmp(s, "-")) {
		c->refused = true;
		return;
	}
	if (!strcmp(s, "."))
		return;
	while (*s) {
		size_t n = strcspn(s, ">");
		if (c->len >= NS)
			FAIL("expected path '%s' too long", s);
		c->path[c->len++] = abbr_state(s, n);
		s += n;
		if (*s == '>')
			s++;
	}
}

static const char *sname(enum vfm_state s)
{
	return (unsigned)s < NS ? full_names[s] : "?";
}

static const char *fmt_path(const enum vfm_state *p, size_t len, char *buf, size_t size)
{
	size_t off = 0;

	buf[0] = '\0';
	if (len == 0)
		snprintf(buf, size, "(empty)");
	for (size_t i = 0; i < len && off < size; i++)
		off += (size_t)snprintf(buf + off, size - off, "%s%s", i ? ">" : "",
					sname(p[i]));
	return buf;
}

static const char *fmt_cell(const struct cell *c, char *buf, size_t size)
{
	if (c->refused) {
		snprintf(buf, size, "refused");
		return buf;
	}
	return fmt_path(c->path, c->len, buf, size);
}

/* ---- Independent model of the rules, used for the property checks. ---- */

static bool model_supported(uint64_t flags, enum vfm_state s)
{
	bool sc = flags & VFM_MIG_STOP_COPY, p2p = flags & VFM_MIG_P2P,
	     pre = flags & VFM_MIG_PRE_COPY;

	switch (s) {
	case VFM_STATE_RUNNING:
		return true;
	case VFM_STATE_STOP:
	case VFM_STATE_STOP_COPY:
	case VFM_STATE_RESUMING:
		return sc;
	case VFM_STATE_RUNNING_P2P:
		return sc && p2p;
	case VFM_STATE_PRE_COPY:
		return sc && pre;
	case VFM_STATE_PRE_COPY_P2P:
		return sc && p2p && pre;
	default:
		return false;
	}
}

static bool model_saving(enum vfm_state s)
{
	return s == VFM_STATE_PRE_COPY || s == VFM_STATE_PRE_COPY_P2P ||
	       s == VFM_STATE_STOP_COPY;
}

/* The direct arcs of the reference, listed literally. */
static bool model_direct(uint64_t flags, enum vfm_state from, enum vfm_state to)
{
	static const struct {
		enum vfm_state from, to;
		int need_p2p;  /* 1: only with P2P, 0: only without, -1: either */
	} arcs[] = {
		{ VFM_STATE_STOP, VFM_STATE_STOP_COPY, -1 },
		{ VFM_STATE_STOP_COPY, VFM_STATE_STOP, -1 },
		{ VFM_STATE_STOP, VFM_STATE_RESUMING, -1 },
		{ VFM_STATE_RESUMING, VFM_STATE_STOP, -1 },
		{ VFM_STATE_RUNNING, VFM_STATE_RUNNING_P2P, 1 },
		{ VFM_STATE_RUNNING_P2P, VFM_STATE_RUNNING, 1 },
		{ VFM_STATE_RUNNING_P2P, VFM_STATE_STOP, 1 },
		{ VFM_STATE_STOP, VFM_STATE_RUNNING_P2P, 1 },
		{ VFM_STATE_RUNNING, VFM_STATE_PRE_COPY, -1 },
		{ VFM_STATE_PRE_COPY, VFM_STATE_RUNNING, -1 },
		{ VFM_STATE_RUNNING_P2P, VFM_STATE_PRE_COPY_P2P, 1 },
		{ VFM_STATE_PRE_COPY_P2P, VFM_STATE_RUNNING_P2P, 1 },
		{ VFM_STATE_PRE_COPY, VFM_STATE_PRE_COPY_P2P, 1 },
		{ VFM_STATE_PRE_COPY_P2P, VFM_STATE_PRE_COPY, 1 },
		{ VFM_STATE_PRE_COPY_P2P, VFM_STATE_STOP_COPY, 1 },
		{ VFM_STATE_RUNNING, VFM_STATE_STOP, 0 },
		{ VFM_STATE_STOP, VFM_STATE_RUNNING, 0 },
		{ VFM_STATE_PRE_COPY, VFM_STATE_STOP_COPY, 0 },
	};
	int p2p = (flags & VFM_MIG_P2P) ? 1 : 0;

	if (!model_supported(flags, from) || !model_supported(flags, to))
		return false;
	for (size_t i = 0; i < sizeof(arcs) / sizeof(arcs[0]); i++)
		if (arcs[i].from == from && arcs[i].to == to &&
		    (arcs[i].need_p2p < 0 || arcs[i].need_p2p == p2p))
			return true;
	return false;
}

/*
 * Path properties: every hop is a direct arc, and no saving state is visited
 * except as the last element, or immediately before a final STOP_COPY through
 * one of the in-session arcs PRE_COPY_P2P->STOP_COPY / PRE_COPY->STOP_COPY.
 * Returns NULL or a description of the violation.
 */
static const char *path_violation(uint64_t flags, enum vfm_state from,
				  const enum vfm_state *p, size_t len)
{
	static char why[128];
	enum vfm_state prev = from;

	for (size_t i = 0; i < len; i++) {
		if (!model_direct(flags, prev, p[i])) {
			snprintf(why, sizeof(why), "hop %s->%s is not a direct arc",
				 sname(prev), sname(p[i]));
			return why;
		}
		if (i + 1 < len && model_saving(p[i]) &&
		    !(i + 2 == len && p[i + 1] == VFM_STATE_STOP_COPY &&
		      (p[i] == VFM_STATE_PRE_COPY_P2P || p[i] == VFM_STATE_PRE_COPY))) {
			snprintf(why, sizeof(why), "saving state %s visited as an intermediate",
				 sname(p[i]));
			return why;
		}
		prev = p[i];
	}
	return NULL;
}

/*
 * Length and count of shortest paths from -> to over direct arcs whose
 * intermediate states are non-saving; when from is saving and to is STOP_COPY
 * the session may also continue through saving intermediates. -1: no path.
 */
static int model_shortest(uint64_t flags, enum vfm_state from, enum vfm_state to,
			  unsigned *count)
{
	int dist[NS];
	unsigned ways[NS];
	enum vfm_state queue[NS];
	size_t head = 0, tail = 0;
	bool session_ok = model_saving(from) && to == VFM_STATE_STOP_COPY;

	for (int i = 0; i < NS; i++) {
		dist[i] = -1;
		ways[i] = 0;
	}
	dist[from] = 0;
	ways[from] = 1;
	queue[tail++] = from;
	while (head < tail) {
		enum vfm_state u = queue[head++];

		if (u != from && u != to && model_saving(u) && !session_ok)
			continue;  /* may not pass through */
		if (u == to)
			continue;
		for (int v = 0; v < NS; v++) {
			if (!model_direct(flags, u, (enum vfm_state)v))
				continue;
			if (dist[v] < 0) {
				dist[v] = dist[u] + 1;
				ways[v] = ways[u];
				queue[tail++] = (enum vfm_state)v;
			} else if (dist[v] == dist[u] + 1) {
				ways[v] += ways[u];
			}
		}
	}
	*count = ways[to];
	return dist[to];
}

/* ---- Tests ---- */

/* The hand-written tables agree with the model (catches typos in this file). */
TEST(expected_tables_consistent)
{
	unsigned bad = 0;

	for (size_t t = 0; t < NTABLES; t++) {
		uint64_t flags = tables[t].flags;

		for (int f = 0; f < NS; f++) {
			for (int g = 0; g < NS; g++) {
				struct cell c;
				char b[128];
				const char *why;
				unsigned ways = 0;
				bool should_refuse =
					!model_supported(flags, (enum vfm_state)f) ||
					!model_supported(flags, (enum vfm_state)g) ||
					(f == VFM_STATE_STOP_COPY &&
					 (g == VFM_STATE_PRE_COPY || g == VFM_STATE_PRE_COPY_P2P));

				parse_cell(tables[t].cell[f][g], &c);
				if (c.refused != should_refuse) {
					fprintf(stderr, "# table %s %s->%s: refused=%d, model says %d\n",
						tables[t].name, sname((enum vfm_state)f),
						sname((enum vfm_state)g), c.refused, should_refuse);
					bad++;
					continue;
				}
				if (c.refused)
					continue;
				if (f == g) {
					if (c.len) {
						fprintf(stderr, "# table %s %s->%s: not empty\n",
							tables[t].name, sname((enum vfm_state)f),
							sname((enum vfm_state)g));
						bad++;
					}
					continue;
				}
				if (c.path[c.len - 1] != (enum vfm_state)g) {
					fprintf(stderr, "# table %s %s->%s: path %s does not end in target\n",
						tables[t].name, sname((enum vfm_state)f),
						sname((enum vfm_state)g), fmt_cell(&c, b, sizeof(b)));
					bad++;
				}
				why = path_violation(flags, (enum vfm_state)f, c.path, c.len);
				if (why) {
					fprintf(stderr, "# table %s %s->%s: path %s: %s\n", tables[t].name,
						sname((enum vfm_state)f), sname((enum vfm_state)g),
						fmt_cell(&c, b, sizeof(b)), why);
					bad++;
				}
				int d = model_shortest(flags, (enum vfm_state)f, (enum vfm_state)g,
						       &ways);
				if (d != (int)c.len || ways != 1) {
					fprintf(stderr,
						"# table %s %s->%s: path %s has %zu hops, shortest %d (%u of them)\n",
						tables[t].name, sname((enum vfm_state)f),
						sname((enum vfm_state)g), fmt_cell(&c, b, sizeof(b)),
						c.len, d, ways);
					bad++;
				}
			}
		}
	}
	if (bad)
		FAIL("%u inconsistencies in the expected tables", bad);
}

static unsigned check_table_path(const struct fsm_table *t)
{
	unsigned bad = 0;

	for (int f = 0; f < NS; f++) {
		for (int g = 0; g < NS; g++) {
			enum vfm_state from = (enum vfm_state)f, to = (enum vfm_state)g;
			enum vfm_state path[NS];
			size_t len = 12345;
			struct cell want;
			char wb[128], ab[128];
			int rc;

			parse_cell(t->cell[f][g], &want);
			for (int i = 0; i < NS; i++)
				path[i] = VFM_STATE_ERROR;
			rc = vfm_fsm_path(t->flags, from, to, path, &len);
			if (want.refused) {
				if (rc != -EINVAL) {
					fprintf(stderr,
						"# path flags=%s %s->%s: expected refused (-EINVAL), got rc=%d path %s\n",
						t->name, sname(from), sname(to), rc,
						rc == 0 && len <= NS ? fmt_path(path, len, ab, sizeof(ab))
								     : "-");
					bad++;
				}
				continue;
			}
			if (rc != 0 || len != want.len ||
			    memcmp(path, want.path, want.len * sizeof(path[0]))) {
				fprintf(stderr,
					"# path flags=%s %s->%s: expected %s, got rc=%d path %s\n",
					t->name, sname(from), sname(to),
					fmt_cell(&want, wb, sizeof(wb)), rc,
					rc == 0 && len <= NS ? fmt_path(path, len, ab, sizeof(ab))
							     : "-");
				bad++;
			}
		}
	}
	return bad;
}

static unsigned check_table_next(const struct fsm_table *t)
{
	unsigned bad = 0;

	for (int f = 0; f < NS; f++) {
		for (int g = 0; g < NS; g++) {
			enum vfm_state from = (enum vfm_state)f, to = (enum vfm_state)g;
			enum vfm_state next = (enum vfm_state)99, want_next;
			struct cell want;
			char wb[128];
			int rc;

			parse_cell(t->cell[f][g], &want);
			rc = vfm_fsm_next(t->flags, from, to, &next);
			if (want.refused) {
				if (rc != -EINVAL) {
					fprintf(stderr,
						"# next flags=%s %s->%s: expected refused (-EINVAL), got rc=%d next %s\n",
						t->name, sname(from), sname(to), rc, sname(next));
					bad++;
				}
				continue;
			}
			want_next = want.len ? want.path[0] : to;
			if (rc != 0 || next != want_next) {
				fprintf(stderr,
					"# next flags=%s %s->%s: expected first hop %s (path %s), got rc=%d next %s\n",
					t->name, sname(from), sname(to), sname(want_next),
					fmt_cell(&want, wb, sizeof(wb)), rc, sname(next));
				bad++;
			}
		}
	}
	return bad;
}

#define TABLE_TESTS(idx, tag)                                                 \
	TEST(path_##tag)                                                      \
	{                                                                     \
		unsigned bad = check_table_path(&tables[idx]);                \
		if (bad)                                                      \
			FAIL("vfm_fsm_path: %u of 64 cells wrong for %s", bad, \
			     tables[idx].name);                               \
	}                                                                     \
	TEST(next_##tag)                                                      \
	{                                                                     \
		unsigned bad = check_table_next(&tables[idx]);                \
		if (bad)                                                      \
			FAIL("vfm_fsm_next: %u of 64 cells wrong for %s", bad, \
			     tables[idx].name);                               \
	}

TABLE_TESTS(0, sc)
TABLE_TESTS(1, sc_p2p)
TABLE_TESTS(2, sc_pre)
TABLE_TESTS(3, all)

/* Walking vfm_fsm_next() hop by hop reproduces vfm_fsm_path(). */
TEST(next_walk_matches_path)
{
	unsigned bad = 0;

	for (size_t t = 0; t < NTABLES; t++) {
		for (int f = 0; f < NS; f++) {
			for (int g = 0; g < NS; g++) {
				enum vfm_state path[NS], cur = (enum vfm_state)f;
				size_t len = 0;

				if (vfm_fsm_path(tables[t].flags, cur, (enum vfm_state)g, path, &len))
					continue;
				for (size_t i = 0; i < len; i++) {
					enum vfm_state next;

					if (vfm_fsm_next(tables[t].flags, cur, (enum vfm_state)g,
							 &next) || next != path[i]) {
						fprintf(stderr, "# walk flags=%s %s->%s: hop %zu differs\n",
							tables[t].name, sname((enum vfm_state)f),
							sname((enum vfm_state)g), i);
						bad++;
						break;
					}
					cur = next;
				}
			}
		}
	}
	if (bad)
		FAIL("%u walks differ", bad);
}

/* Properties of whatever the library returns, over all 256 cells. */
TEST(path_properties)
{
	unsigned bad = 0, cells = 0;

	for (size_t t = 0; t < NTABLES; t++) {
		uint64_t flags = tables[t].flags;

		for (int f = 0; f < NS; f++) {
			for (int g = 0; g < NS; g++) {
				enum vfm_state path[NS], prev = (enum vfm_state)f;
				size_t len = 0;
				char b[128];
				const char *why;

				cells++;
				if (vfm_fsm_path(flags, (enum vfm_state)f, (enum vfm_state)g, path,
						 &len))
					continue;
				if (len > NS) {
					fprintf(stderr, "# flags=%s %s->%s: len %zu\n", tables[t].name,
						sname((enum vfm_state)f), sname((enum vfm_state)g), len);
					bad++;
					continue;
				}
				why = path_violation(flags, (enum vfm_state)f, path, len);
				if (!why && len && path[len - 1] != (enum vfm_state)g)
					why = "does not end in target";
				if (!why && !len && f != g)
					why = "empty path for from != to";
				for (size_t i = 0; !why && i < len; i++) {
					if (!model_supported(flags, path[i]))
						why = "enters an unsupported state";
					else if (!vfm_arc_is_direct(flags, prev, path[i]))
						why = "a hop is not direct per vfm_arc_is_direct";
					prev = path[i];
				}
				if (why) {
					fprintf(stderr, "# flags=%s %s->%s: path %s: %s\n",
						tables[t].name, sname((enum vfm_state)f),
						sname((enum vfm_state)g), fmt_path(path, len, b, sizeof(b)),
						why);
					bad++;
				}
			}
		}
	}
	CHECK_EQ(cells, 256);
	if (bad)
		FAIL("%u paths violate the properties", bad);
}

/* Out-of-range state values are refused, never crash. */
TEST(out_of_range_states)
{
	static const unsigned vals[] = { 8, 9, 100, 0xffffffffu };

	for (size_t t = 0; t < NTABLES; t++) {
		for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
			enum vfm_state bogus = (enum vfm_state)vals[i], path[NS], next;
			size_t len;

			CHECK(!vfm_state_supported(tables[t].flags, bogus));
			CHECK_EQ(vfm_fsm_path(tables[t].flags, VFM_STATE_RUNNING, bogus, path, &len),
				 -EINVAL);
			CHECK_EQ(vfm_fsm_path(tables[t].flags, bogus, VFM_STATE_RUNNING, path, &len),
				 -EINVAL);
			CHECK_EQ(vfm_fsm_next(tables[t].flags, VFM_STATE_RUNNING, bogus, &next),
				 -EINVAL);
			CHECK_EQ(vfm_fsm_next(tables[t].flags, bogus, VFM_STATE_RUNNING, &next),
				 -EINVAL);
			CHECK_EQ(vfm_fsm_next(tables[t].flags, bogus, bogus, &next), -EINVAL);
		}
	}
}

TEST(state_supported)
{
	/* Literal expectations from "States and which flags make them valid". */
	static const struct {
		uint64_t flags;
		const char *sup;  /* one char per state in enum order: '1' supported */
	} cases[] = {
		/*                                           E S R S R R P P
		 *                                           R T U C E P C C
		 *                                                   S     P */
		{ VFM_MIG_STOP_COPY,                        "01111000" },
		{ VFM_MIG_STOP_COPY | VFM_MIG_P2P,          "01111100" },
		{ VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY,     "01111010" },
		{ VFM_MIG_ALL,                              "01111111" },
		/* Without STOP_COPY only RUNNING is valid. */
		{ 0,                                        "00100000" },
		{ VFM_MIG_P2P,                              "00100000" },
		{ VFM_MIG_PRE_COPY,                         "00100000" },
		{ VFM_MIG_P2P | VFM_MIG_PRE_COPY,           "00100000" },
	};
	unsigned bad = 0;

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char buf[64];

		for (int s = 0; s < NS; s++) {
			bool want = cases[i].sup[s] == '1';

			if (vfm_state_supported(cases[i].flags, (enum vfm_state)s) != want) {
				fprintf(stderr, "# supported(%s [0x%" PRIx64 "], %s) != %d\n",
					vfm_mig_flags_str(cases[i].flags, buf, sizeof(buf)),
					cases[i].flags, sname((enum vfm_state)s), want);
				bad++;
			}
		}
	}
	if (bad)
		FAIL("%u wrong", bad);
}

TEST(saving_and_session)
{
	/* enum order: ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P */
	static const bool saving[NS] = { 0, 0, 0, 1, 0, 0, 1, 1 };
	static const bool session[NS] = { 0, 0, 0, 1, 1, 0, 1, 1 };

	for (int s = 0; s < NS; s++) {
		if (vfm_state_is_saving((enum vfm_state)s) != saving[s])
			FAIL("is_saving(%s) != %d", sname((enum vfm_state)s), saving[s]);
		if (vfm_state_has_session((enum vfm_state)s) != session[s])
			FAIL("has_session(%s) != %d", sname((enum vfm_state)s), session[s]);
	}
}

TEST(arc_opens_session)
{
	unsigned n = 0;

	for (int f = 0; f < NS; f++) {
		for (int g = 0; g < NS; g++) {
			bool want = (f == VFM_STATE_STOP && g == VFM_STATE_STOP_COPY) ||
				    (f == VFM_STATE_STOP && g == VFM_STATE_RESUMING) ||
				    (f == VFM_STATE_RUNNING && g == VFM_STATE_PRE_COPY) ||
				    (f == VFM_STATE_RUNNING_P2P && g == VFM_STATE_PRE_COPY_P2P);

			n += want;
			if (vfm_arc_opens_session((enum vfm_state)f, (enum vfm_state)g) != want)
				FAIL("arc_opens_session(%s, %s) != %d", sname((enum vfm_state)f),
				     sname((enum vfm_state)g), want);
		}
	}
	CHECK_EQ(n, 4);
}

TEST(arc_is_direct)
{
	/*
	 * Literal lists of the direct arcs per flag set (from the reference's
	 * "Arcs"), as "FROM>TO" pairs; every other pair must not be direct.
	 */
	static const struct {
		uint64_t flags;
		const char *arcs[20];
	} cases[] = {
		{ VFM_MIG_STOP_COPY,
		  { "S>SC", "SC>S", "S>RES", "RES>S", "R>S", "S>R" } },
		{ VFM_MIG_STOP_COPY | VFM_MIG_P2P,
		  { "S>SC", "SC>S", "S>RES", "RES>S", "R>RP", "RP>R", "RP>S", "S>RP" } },
		{ VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY,
		  { "S>SC", "SC>S", "S>RES", "RES>S", "R>S", "S>R", "R>PC", "PC>R", "PC>SC" } },
		{ VFM_MIG_ALL,
		  { "S>SC", "SC>S", "S>RES", "RES>S", "R>RP", "RP>R", "RP>S", "S>RP", "R>PC",
		    "PC>R", "RP>PCP", "PCP>RP", "PC>PCP", "PCP>PC", "PCP>SC" } },
	};
	unsigned bad = 0;

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		bool want[NS][NS] = { { false } };

		for (size_t a = 0; a < 20 && cases[i].arcs[a]; a++) {
			struct cell c;

			parse_cell(cases[i].arcs[a], &c);
			CHECK_EQ(c.len, 2);
			want[c.path[0]][c.path[1]] = true;
		}
		for (int f = 0; f < NS; f++) {
			for (int g = 0; g < NS; g++) {
				bool got = vfm_arc_is_direct(cases[i].flags, (enum vfm_state)f,
							     (enum vfm_state)g);

				/* The literal list and the model used above agree. */
				CHECK(model_direct(cases[i].flags, (enum vfm_state)f,
						   (enum vfm_state)g) == want[f][g]);
				if (got != want[f][g]) {
					fprintf(stderr, "# arc_is_direct(flags=0x%" PRIx64
						", %s, %s) = %d, expected %d\n",
						cases[i].flags, sname((enum vfm_state)f),
						sname((enum vfm_state)g), got, want[f][g]);
					bad++;
				}
			}
		}
	}
	if (bad)
		FAIL("%u wrong", bad);
}

TEST(state_names)
{
	for (int s = 0; s < NS; s++) {
		enum vfm_state back = (enum vfm_state)99;
		char lower[32];
		size_t i;

		CHECK_STR(vfm_state_name((enum vfm_state)s), full_names[s]);
		CHECK_EQ(vfm_state_from_name(full_names[s], &back), 0);
		CHECK_EQ(back, s);

		for (i = 0; full_names[s][i] && i + 1 < sizeof(lower); i++)
			lower[i] = (char)tolower((unsigned char)full_names[s][i]);
		lower[i] = '\0';
		back = (enum vfm_state)99;
		CHECK_EQ(vfm_state_from_name(lower, &back), 0);
		CHECK_EQ(back, s);
	}
	enum vfm_state back = VFM_STATE_STOP;
	CHECK_EQ(vfm_state_from_name("Pre_Copy_P2p", &back), 0);
	CHECK_EQ(back, VFM_STATE_PRE_COPY_P2P);

	CHECK_STR(vfm_state_name((enum vfm_state)8), "INVALID");
	CHECK_STR(vfm_state_name((enum vfm_state)100), "INVALID");
	CHECK_STR(vfm_state_name((enum vfm_state)0xffffffffu), "INVALID");

	static const char *const unknown[] = {
		"", "RUN", "RUNNINGX", " RUNNING", "RUNNING ", "PRE-COPY", "PRECOPY",
		"STOP_COPY_", "P2P", "R", "RP", "3", "RUNNING_P2P\n",
	};
	for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++)
		if (vfm_state_from_name(unknown[i], &back) != -EINVAL)
			FAIL("vfm_state_from_name('%s') accepted", unknown[i]);
}

TEST(mig_flags_str)
{
	static const struct {
		uint64_t flags;
		const char *s;
	} cases[] = {
		{ VFM_MIG_STOP_COPY, "STOP_COPY" },
		{ VFM_MIG_STOP_COPY | VFM_MIG_P2P, "STOP_COPY|P2P" },
		{ VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY, "STOP_COPY|PRE_COPY" },
		{ VFM_MIG_ALL, "STOP_COPY|P2P|PRE_COPY" },
		{ VFM_MIG_P2P, "P2P" },
		{ VFM_MIG_PRE_COPY, "PRE_COPY" },
		{ VFM_MIG_P2P | VFM_MIG_PRE_COPY, "P2P|PRE_COPY" },
	};
	char buf[64];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		CHECK(vfm_mig_flags_str(cases[i].flags, buf, sizeof(buf)) == buf);
		CHECK_STR(buf, cases[i].s);
	}

	/* No flags / unknown bits: some NUL-terminated text in buf. */
	memset(buf, 'x', sizeof(buf));
	CHECK(vfm_mig_flags_str(0, buf, sizeof(buf)) == buf);
	CHECK(memchr(buf, '\0', sizeof(buf)) != NULL);
	memset(buf, 'x', sizeof(buf));
	CHECK(vfm_mig_flags_str(VFM_MIG_ALL | (1ull << 40), buf, sizeof(buf)) == buf);
	CHECK(memchr(buf, '\0', sizeof(buf)) != NULL);

	/* A short buffer is respected and terminated. */
	char small[8 + 8];
	memset(small, 'Z', sizeof(small));
	CHECK(vfm_mig_flags_str(VFM_MIG_ALL, small, 8) == small);
	CHECK(memchr(small, '\0', 8) != NULL);
	for (size_t i = 8; i < sizeof(small); i++)
		CHECK_EQ(small[i], 'Z');
}

/* Without STOP_COPY only RUNNING is valid: only RUNNING->RUNNING succeeds. */
TEST(flags_without_stop_copy)
{
	static const uint64_t sets[] = { 0, VFM_MIG_P2P, VFM_MIG_PRE_COPY,
					 VFM_MIG_P2P | VFM_MIG_PRE_COPY };
	unsigned bad = 0;

	for (size_t i = 0; i < sizeof(sets) / sizeof(sets[0]); i++) {
		for (int f = 0; f < NS; f++) {
			for (int g = 0; g < NS; g++) {
				enum vfm_state path[NS], next = VFM_STATE_ERROR;
				size_t len = 99;
				bool ok = f == VFM_STATE_RUNNING && g == VFM_STATE_RUNNING;
				int rp = vfm_fsm_path(sets[i], (enum vfm_state)f, (enum vfm_state)g,
						      path, &len);
				int rn = vfm_fsm_next(sets[i], (enum vfm_state)f, (enum vfm_state)g,
						      &next);

				if (ok ? (rp || len || rn || next != VFM_STATE_RUNNING)
				       : (rp != -EINVAL || rn != -EINVAL)) {
					fprintf(stderr, "# flags=0x%" PRIx64 " %s->%s: path rc=%d, next rc=%d\n",
						sets[i], sname((enum vfm_state)f),
						sname((enum vfm_state)g), rp, rn);
					bad++;
				}
			}
		}
	}
	if (bad)
		FAIL("%u wrong", bad);
}
