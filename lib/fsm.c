/*
 * The VFIO migration v2 state machine as data: a next-hop table with the
 * kernel's semantics (drivers/vfio/vfio_main.c) and the flags each state
 * needs. Walking it gives the shortest path that never rests in a saving
 * state on the way; states a device does not support are hopped over.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "vfiomig/fsm.h"

#define S_ERR VFM_STATE_ERROR
#define S_STOP VFM_STATE_STOP
#define S_RUN VFM_STATE_RUNNING
#define S_SC VFM_STATE_STOP_COPY
#define S_RES VFM_STATE_RESUMING
#define S_RP VFM_STATE_RUNNING_P2P
#define S_PC VFM_STATE_PRE_COPY
#define S_PCP VFM_STATE_PRE_COPY_P2P

/* next_hop[cur][target]: the state to enter next. ERROR = no way. */
static const unsigned char next_hop[VFM_STATE_COUNT][VFM_STATE_COUNT] = {
	[S_STOP] = {
		[S_STOP] = S_STOP, [S_RUN] = S_RP, [S_PC] = S_RP, [S_PCP] = S_RP,
		[S_SC] = S_SC, [S_RES] = S_RES, [S_RP] = S_RP, [S_ERR] = S_ERR,
	},
	[S_RUN] = {
		[S_STOP] = S_RP, [S_RUN] = S_RUN, [S_PC] = S_PC, [S_PCP] = S_RP,
		[S_SC] = S_RP, [S_RES] = S_RP, [S_RP] = S_RP, [S_ERR] = S_ERR,
	},
	[S_PC] = {
		[S_STOP] = S_RUN, [S_RUN] = S_RUN, [S_PC] = S_PC, [S_PCP] = S_PCP,
		[S_SC] = S_PCP, [S_RES] = S_RUN, [S_RP] = S_RUN, [S_ERR] = S_ERR,
	},
	[S_PCP] = {
		[S_STOP] = S_RP, [S_RUN] = S_RP, [S_PC] = S_PC, [S_PCP] = S_PCP,
		[S_SC] = S_SC, [S_RES] = S_RP, [S_RP] = S_RP, [S_ERR] = S_ERR,
	},
	[S_SC] = {
		[S_STOP] = S_STOP, [S_RUN] = S_STOP, [S_PC] = S_ERR, [S_PCP] = S_ERR,
		[S_SC] = S_SC, [S_RES] = S_STOP, [S_RP] = S_STOP, [S_ERR] = S_ERR,
	},
	[S_RES] = {
		[S_STOP] = S_STOP, [S_RUN] = S_STOP, [S_PC] = S_STOP, [S_PCP] = S_STOP,
		[S_SC] = S_STOP, [S_RES] = S_RES, [S_RP] = S_STOP, [S_ERR] = S_ERR,
	},
	[S_RP] = {
		[S_STOP] = S_STOP, [S_RUN] = S_RUN, [S_PC] = S_RUN, [S_PCP] = S_PCP,
		[S_SC] = S_STOP, [S_RES] = S_STOP, [S_RP] = S_RP, [S_ERR] = S_ERR,
	},
	/* ERROR row all zero = ERROR: only a reset leaves it. */
};

/* Flags a device must have for each state; ERROR is never valid. */
static const uint64_t state_needs[VFM_STATE_COUNT] = {
	[S_ERR] = ~0ull,
	[S_STOP] = VFM_MIG_STOP_COPY,
	[S_RUN] = 0,
	[S_SC] = VFM_MIG_STOP_COPY,
	[S_RES] = VFM_MIG_STOP_COPY,
	[S_RP] = VFM_MIG_STOP_COPY | VFM_MIG_P2P,
	[S_PC] = VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY,
	[S_PCP] = VFM_MIG_ALL,
};

static const char *const state_names[VFM_STATE_COUNT] = {
	[S_ERR] = "ERROR", [S_STOP] = "STOP", [S_RUN] = "RUNNING",
	[S_SC] = "STOP_COPY", [S_RES] = "RESUMING", [S_RP] = "RUNNING_P2P",
	[S_PC] = "PRE_COPY", [S_PCP] = "PRE_COPY_P2P",
};

static bool state_valid(enum vfm_state s)
{
	return (unsigned)s < VFM_STATE_COUNT;
}

const char *vfm_state_name(enum vfm_state s)
{
	return state_valid(s) ? state_names[s] : "INVALID";
}

int vfm_state_from_name(const char *name, enum vfm_state *out)
{
	for (unsigned i = 0; name && i < VFM_STATE_COUNT; i++) {
		if (strcasecmp(name, state_names[i]) == 0) {
			*out = (enum vfm_state)i;
			return 0;
		}
	}
	return -EINVAL;
}

bool vfm_state_supported(uint64_t flags, enum vfm_state s)
{
	if (!state_valid(s) || s == S_ERR)
		return false;
	return (state_needs[s] & flags) == state_needs[s];
}

bool vfm_state_is_saving(enum vfm_state s)
{
	return s == S_PC || s == S_PCP || s == S_SC;
}

bool vfm_state_has_session(enum vfm_state s)
{
	return vfm_state_is_saving(s) || s == S_RES;
}

bool vfm_arc_opens_session(enum vfm_state from, enum vfm_state to)
{
	return (from == S_STOP && (to == S_SC || to == S_RES)) ||
	       (from == S_RUN && to == S_PC) || (from == S_RP && to == S_PCP);
}

bool vfm_arc_is_direct(uint64_t flags, enum vfm_state from, enum vfm_state to)
{
	enum vfm_state next;

	if (from == to)
		return false;
	return vfm_fsm_next(flags, from, to, &next) == 0 && next == to;
}

int vfm_fsm_next(uint64_t flags, enum vfm_state cur, enum vfm_state target,
		 enum vfm_state *next)
{
	enum vfm_state hop;

	if (!vfm_state_supported(flags, cur) || !vfm_state_supported(flags, target))
		return -EINVAL;
	hop = (enum vfm_state)next_hop[cur][target];
	/*
	 * Hop over unsupported states. Each step moves along the table towards
	 * target and ERROR ends the walk, so it terminates (the kernel's loop
	 * did not stop on ERROR, which hung STOP_COPY -> PRE_COPY requests).
	 */
	while (hop != S_ERR && !vfm_state_supported(flags, hop))
		hop = (enum vfm_state)next_hop[hop][target];
	if (hop == S_ERR)
		return -EINVAL;
	*next = hop;
	return 0;
}

int vfm_fsm_path(uint64_t flags, enum vfm_state cur, enum vfm_state target,
		 enum vfm_state *path, size_t *len)
{
	size_t n = 0;
	int ret;

	while (cur != target) {
		/* Paths are at most 4 hops; more means a broken table. */
		if (n >= VFM_STATE_COUNT)
			return -ELOOP;
		ret = vfm_fsm_next(flags, cur, target, &cur);
		if (ret)
			return ret;
		path[n++] = cur;
	}
	if (n == 0 && !vfm_state_supported(flags, cur))
		return -EINVAL;
	*len = n;
	return 0;
}

const char *vfm_mig_flags_str(uint64_t flags, char *buf, size_t len)
{
	static const char *const names[] = { "STOP_COPY", "P2P", "PRE_COPY" };
	size_t off = 0;

	if (len)
		buf[0] = '\0';
	for (unsigned i = 0; i < 3; i++) {
		if (!(flags & (1ull << i)))
			continue;
		size_t at = off < len ? off : len;
		int n = snprintf(len ? buf + at : buf, len > off ? len - off : 0, "%s%s",
				 off ? "|" : "", names[i]);
		if (n > 0)
			off += (size_t)n;
	}
	if (flags & ~VFM_MIG_ALL)
		snprintf(buf + (off < len ? off : len), len > off ? len - off : 0,
			 "%s0x%llx", off ? "|" : "",
			 (unsigned long long)(flags & ~VFM_MIG_ALL));
	return buf;
}
