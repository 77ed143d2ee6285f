/*
 * The "test" backend: a device that lives in memory and behaves like a VFIO
 * migration driver (see testdev.h for the stream format), with faults that
 * tests switch on to drive every branch of the device layer's policy.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testdev.h"

#define MAX_ARCS 256
#define MAX_ARC_FAULTS 8
#define MAX_LOG_RANGES 256
#define MAX_LOG_DIRTY 1024
#define MAX_RESUME_BYTES (64u << 20)

struct bytebuf {
	unsigned char *p;
	size_t len, cap;
};

struct arc_rec {
	enum vfm_state from, to;
	bool failed;
};

struct arc_fault {
	enum vfm_state from, to;
	int code;
	bool to_error;
	int times;             /* 0 = spent, < 0 = forever */
};

struct op_fault {
	int code;
	int times;
};

struct testdev {
	struct vfm_device *dev;
	/* Held by every op and by the test-side mutators, so a test thread can
	 * dirty the device while the migration thread reads it. */
	pthread_mutex_t lock;
	/* Per-device copies, so that options can leave ops out. */
	struct vfm_device_ops ops;
	struct vfm_migration_ops mig;
	struct vfm_dma_logging_ops log;

	uint64_t flags;
	enum vfm_state state;

	/* The device-internal state the migration stream carries. */
	unsigned char *data;
	size_t size;
	uint64_t generation;

	/* The data session (session_id != 0 while one is open). */
	unsigned session_id, sessions_opened;
	struct bytebuf out;        /* saving: the stream, produced ahead of reads */
	size_t out_head;           /* next byte of out to hand out */
	size_t initial_end;        /* out[0, initial_end) is the initial data */
	unsigned char *dirty;      /* one flag per byte, pre-copy only */
	struct bytebuf in;         /* resuming: what was written */
	size_t write_chunk;

	struct arc_rec arcs[MAX_ARCS];
	unsigned num_arcs;
	testdev_arc_fn arc_hook;
	void *arc_opaque;

	struct arc_fault arc_faults[MAX_ARC_FAULTS];
	struct op_fault op_faults[TESTDEV_OP_COUNT];
	ssize_t lie[TESTDEV_OP_COUNT];
	unsigned calls[TESTDEV_OP_COUNT];
	bool spurious[VFM_STATE_COUNT][VFM_STATE_COUNT];
	bool suppress[VFM_STATE_COUNT][VFM_STATE_COUNT];

	bool logging;
	struct vfm_iova_range log_ranges[MAX_LOG_RANGES];
	uint32_t num_log_ranges;
	uint64_t log_page_size, log_forced_page_size;
	uint64_t log_dirty[MAX_LOG_DIRTY];
	unsigned num_log_dirty;
	bool log_overflow;         /* more writes than log_dirty holds: all dirty */

	unsigned char region0[TESTDEV_REGION0_SIZE];
	unsigned char region1[TESTDEV_REGION1_SIZE];
};

static const char *const short_names[VFM_STATE_COUNT] = {
	[VFM_STATE_ERROR] = "ERR", [VFM_STATE_STOP] = "S", [VFM_STATE_RUNNING] = "R",
	[VFM_STATE_STOP_COPY] = "SC", [VFM_STATE_RESUMING] = "RES",
	[VFM_STATE_RUNNING_P2P] = "RP", [VFM_STATE_PRE_COPY] = "PC",
	[VFM_STATE_PRE_COPY_P2P] = "PCP",
};

static struct testdev *to_td(struct vfm_device *dev)
{
	return vfm_device_priv(dev);
}

static void *xcalloc(size_t n)
{
	void *p = calloc(1, n ? n : 1);

	if (!p)
		abort();
	return p;
}

static void buf_put(struct bytebuf *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;

		while (cap < b->len + n)
			cap *= 2;
		b->p = realloc(b->p, cap);
		if (!b->p)
			abort();
		b->cap = cap;
	}
	memcpy(b->p + b->len, p, n);
	b->len += n;
}

static void buf_free(struct bytebuf *b)
{
	free(b->p);
	*b = (struct bytebuf){ 0 };
}

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

/* The next call of op: counted, and failed if a fault is armed. */
static int injected(struct testdev *td, enum testdev_op op, struct vfm_error *err)
{
	struct op_fault *f = &td->op_faults[op];

	td->calls[op]++;
	if (!f->times)
		return 0;
	if (f->times > 0)
		f->times--;
	return vfm_error_set(err, f->code, "testdev: injected failure of op %d", (int)op);
}

/* ---- The stream ---- */

static void put_hdr(struct bytebuf *b, uint32_t type, uint32_t off, uint32_t len)
{
	uint32_t hdr[4] = { TESTDEV_MAGIC, type, off, len };

	buf_put(b, hdr, sizeof(hdr));
}

static void put_data(struct testdev *td, size_t off, size_t len)
{
	put_hdr(&td->out, TESTDEV_REC_DATA, (uint32_t)off, (uint32_t)len);
	buf_put(&td->out, td->data + off, len);
}

static void put_end(struct testdev *td)
{
	uint64_t tail[2] = { td->generation, fnv1a(td->data, td->size) };

	put_hdr(&td->out, TESTDEV_REC_END, (uint32_t)td->size, sizeof(tail));
	buf_put(&td->out, tail, sizeof(tail));
}

/* Stream size of the dirty runs; with flush, appends them as records and clears the marks. */
static size_t dirty_runs(struct testdev *td, bool flush)
{
	size_t total = 0, i = 0;

	if (!td->dirty)
		return 0;
	while (i < td->size) {
		size_t start;

		if (!td->dirty[i]) {
			i++;
			continue;
		}
		start = i;
		while (i < td->size && td->dirty[i])
			i++;
		total += TESTDEV_HDR_SIZE + (i - start);
		if (flush) {
			put_data(td, start, i - start);
			memset(td->dirty + start, 0, i - start);
		}
	}
	return total;
}

static void session_end(struct testdev *td)
{
	buf_free(&td->out);
	buf_free(&td->in);
	free(td->dirty);
	td->dirty = NULL;
	td->out_head = td->initial_end = 0;
	td->session_id = 0;
}

static void session_new(struct testdev *td)
{
	session_end(td);
	td->session_id = ++td->sessions_opened;
}

/* RUNNING -> PRE_COPY: the whole state is the initial data; track changes. */
static void open_precopy(struct testdev *td)
{
	session_new(td);
	put_data(td, 0, td->size);
	td->initial_end = td->out.len;
	td->dirty = xcalloc(td->size);
}

/* PRE_COPY* -> STOP_COPY: same session, the rest and the end follow. */
static void precopy_to_stop_copy(struct testdev *td)
{
	dirty_runs(td, true);
	free(td->dirty);
	td->dirty = NULL;
	put_end(td);
}

/* STOP -> STOP_COPY: a fresh session with everything. */
static void open_stop_copy(struct testdev *td)
{
	session_new(td);
	put_data(td, 0, td->size);
	put_end(td);
}

/* RESUMING -> STOP: accept the stream only if it is whole and intact. */
static int load(struct testdev *td, struct vfm_error *err)
{
	unsigned char *staging = xcalloc(td->size), *covered = xcalloc(td->size);
	const unsigned char *in = td->in.p;
	size_t n = td->in.len, pos = 0;
	uint64_t tail[2] = { 0, 0 };
	const char *why = NULL;
	bool ended = false;

	while (pos < n) {
		uint32_t hdr[4];

		if (ended) {
			why = "data after the end record";
			break;
		}
		if (n - pos < sizeof(hdr)) {
			why = "truncated record header";
			break;
		}
		memcpy(hdr, in + pos, sizeof(hdr));
		pos += sizeof(hdr);
		if (hdr[0] != TESTDEV_MAGIC) {
			why = "bad record magic";
			break;
		}
		if (hdr[1] == TESTDEV_REC_DATA) {
			if (hdr[2] > td->size || hdr[3] > td->size - hdr[2] || hdr[3] > n - pos) {
				why = "data record out of range";
				break;
			}
			memcpy(staging + hdr[2], in + pos, hdr[3]);
			memset(covered + hdr[2], 1, hdr[3]);
			pos += hdr[3];
		} else if (hdr[1] == TESTDEV_REC_END) {
			if (hdr[2] != td->size || hdr[3] != sizeof(tail) || n - pos < sizeof(tail)) {
				why = "bad end record";
				break;
			}
			memcpy(tail, in + pos, sizeof(tail));
			pos += sizeof(tail);
			ended = true;
		} else {
			why = "unknown record type";
			break;
		}
	}
	if (!why && !ended)
		why = "no end record";
	for (size_t i = 0; !why && i < td->size; i++)
		if (!covered[i])
			why = "state not fully covered";
	if (!why && fnv1a(staging, td->size) != tail[1])
		why = "checksum mismatch";
	if (!why) {
		memcpy(td->data, staging, td->size);
		td->generation = tail[0];
	}
	free(staging);
	free(covered);
	if (why)
		return vfm_error_set(err, -EINVAL, "testdev: invalid resume stream: %s", why);
	return 0;
}

static int apply_arc(struct testdev *td, enum vfm_state from, enum vfm_state to,
		     struct vfm_error *err)
{
	int ret;

	if ((from == VFM_STATE_RUNNING && to == VFM_STATE_PRE_COPY) ||
	    (from == VFM_STATE_RUNNING_P2P && to == VFM_STATE_PRE_COPY_P2P)) {
		open_precopy(td);
	} else if ((from == VFM_STATE_PRE_COPY || from == VFM_STATE_PRE_COPY_P2P) &&
		   to == VFM_STATE_STOP_COPY) {
		precopy_to_stop_copy(td);
	} else if ((from == VFM_STATE_PRE_COPY && to == VFM_STATE_RUNNING) ||
		   (from == VFM_STATE_PRE_COPY_P2P && to == VFM_STATE_RUNNING_P2P) ||
		   (from == VFM_STATE_STOP_COPY && to == VFM_STATE_STOP)) {
		session_end(td);
	} else if (from == VFM_STATE_STOP && to == VFM_STATE_STOP_COPY) {
		open_stop_copy(td);
	} else if (from == VFM_STATE_STOP && to == VFM_STATE_RESUMING) {
		session_new(td);
	} else if (from == VFM_STATE_RESUMING && to == VFM_STATE_STOP) {
		ret = load(td, err);
		if (ret)
			return ret;
		session_end(td);
	}
	/* Other arcs (P2P on/off, RUNNING <-> STOP, PRE_COPY <-> PRE_COPY_P2P) move no data. */
	td->state = to;
	return 0;
}

static void log_arc(struct testdev *td, enum vfm_state from, enum vfm_state to, bool failed)
{
	if (td->num_arcs < MAX_ARCS)
		td->arcs[td->num_arcs++] = (struct arc_rec){ from, to, failed };
	if (td->arc_hook)
		td->arc_hook(td->arc_opaque, td, from, to, failed);
}

void testdev_set_arc_hook(struct testdev *td, testdev_arc_fn fn, void *opaque)
{
	td->arc_hook = fn;
	td->arc_opaque = opaque;
}

static struct arc_fault *arc_fault(struct testdev *td, enum vfm_state from, enum vfm_state to)
{
	for (unsigned i = 0; i < MAX_ARC_FAULTS; i++) {
		struct arc_fault *f = &td->arc_faults[i];

		if (f->times && f->from == from && f->to == to)
			return f;
	}
	return NULL;
}

/* ---- Migration ops ---- */

static int td_get_flags(struct vfm_device *dev, uint64_t *flags, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_GET_FLAGS, err);

	if (ret)
		return ret;
	*flags = td->flags;
	return 0;
}

static int td_get_state(struct vfm_device *dev, enum vfm_state *state, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_GET_STATE, err);

	if (ret)
		return ret;
	*state = td->state;
	return 0;
}

/* Like the kernel: one arc at a time along vfm_fsm_next, stopping at a failure. */
static int td_set_state_unlocked(struct vfm_device *dev, enum vfm_state new_state,
			bool *session_opened, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	enum vfm_state cur = td->state, next, last_from = cur;
	int ret = injected(td, TESTDEV_OP_SET_STATE, err);
	unsigned hops = 0;

	*session_opened = false;
	if (ret)
		return ret;
	while (cur != new_state) {
		struct arc_fault *f;

		if (vfm_fsm_next(td->flags, cur, new_state, &next))
			return vfm_error_set(err, -EINVAL, "testdev: no way from %s to %s",
					     vfm_state_name(cur), vfm_state_name(new_state));
		if (++hops > VFM_STATE_COUNT)
			return vfm_error_set(err, -ELOOP, "testdev: path does not end");
		f = arc_fault(td, cur, next);
		if (f) {
			if (f->times > 0)
				f->times--;
			log_arc(td, cur, next, true);
			if (f->to_error) {
				session_end(td);
				td->state = VFM_STATE_ERROR;
			}
			return vfm_error_set(err, f->code, "testdev: injected failure of %s -> %s",
					     vfm_state_name(cur), vfm_state_name(next));
		}
		ret = apply_arc(td, cur, next, err);
		log_arc(td, cur, next, ret != 0);
		if (ret)
			return ret;
		last_from = cur;
		cur = next;
	}
	if (hops) {
		*session_opened = vfm_arc_opens_session(last_from, new_state);
		if (td->spurious[last_from][new_state])
			*session_opened = true;
		if (td->suppress[last_from][new_state])
			*session_opened = false;
	}
	return 0;
}

static void td_end_session(struct vfm_device *dev)
{
	/* The data fd is closed; the device state does not change. */
	to_td(dev)->calls[TESTDEV_OP_END_SESSION]++;
}

static ssize_t td_read_data_unlocked(struct vfm_device *dev, void *buf, size_t len,
			    struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_READ, err);
	size_t avail;

	if (ret)
		return ret;
	if (!td->session_id || !vfm_state_is_saving(td->state))
		return vfm_error_set(err, -EINVAL, "testdev: read in state %s",
				     vfm_state_name(td->state));
	if (td->out_head == td->out.len && td->state != VFM_STATE_STOP_COPY)
		dirty_runs(td, true);
	avail = td->out.len - td->out_head;
	if (!avail)
		return td->state == VFM_STATE_STOP_COPY ? 0 : -ENOMSG;
	if (len > avail)
		len = avail;
	memcpy(buf, td->out.p + td->out_head, len);
	td->out_head += len;
	return (ssize_t)len + td->lie[TESTDEV_OP_READ];
}

static ssize_t td_write_data(struct vfm_device *dev, const void *buf, size_t len,
			     struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_WRITE, err);

	if (ret)
		return ret;
	if (!td->session_id || td->state != VFM_STATE_RESUMING)
		return vfm_error_set(err, -EINVAL, "testdev: write in state %s",
				     vfm_state_name(td->state));
	if (td->write_chunk && len > td->write_chunk)
		len = td->write_chunk;
	if (td->in.len + len > MAX_RESUME_BYTES)
		return vfm_error_set(err, -EFBIG, "testdev: resume stream too large");
	buf_put(&td->in, buf, len);
	return (ssize_t)len + td->lie[TESTDEV_OP_WRITE];
}

static int td_precopy_info_unlocked(struct vfm_device *dev, uint64_t *initial_bytes,
			   uint64_t *dirty_bytes, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_PRECOPY_INFO, err);
	size_t head, rest_start;

	if (ret)
		return ret;
	if (td->state != VFM_STATE_PRE_COPY && td->state != VFM_STATE_PRE_COPY_P2P)
		return vfm_error_set(err, -EINVAL, "testdev: precopy info in state %s",
				     vfm_state_name(td->state));
	head = td->out_head;
	rest_start = head > td->initial_end ? head : td->initial_end;
	*initial_bytes = td->initial_end > head ? td->initial_end - head : 0;
	*dirty_bytes = (td->out.len - rest_start) + dirty_runs(td, false);
	return 0;
}

static int td_stop_copy_size_unlocked(struct vfm_device *dev, uint64_t *bytes, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_STOP_COPY_SIZE, err);

	if (ret)
		return ret;
	switch (td->state) {
	case VFM_STATE_PRE_COPY:
	case VFM_STATE_PRE_COPY_P2P:
		*bytes = (td->out.len - td->out_head) + dirty_runs(td, false) + TESTDEV_END_SIZE;
		break;
	case VFM_STATE_STOP_COPY:
		*bytes = td->out.len - td->out_head;
		break;
	default:
		*bytes = TESTDEV_HDR_SIZE + td->size + TESTDEV_END_SIZE;
		break;
	}
	return 0;
}

/* ---- Device ops ---- */

static int td_reset(struct vfm_device *dev, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_RESET, err);

	if (ret)
		return ret;
	session_end(td);
	td->state = VFM_STATE_RUNNING;
	return 0;
}

static int td_get_info(struct vfm_device *dev, struct vfm_device_info *info,
		       struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_GET_INFO, err);

	if (ret)
		return ret;
	info->flags = (1u << 1) | (td->ops.reset ? 1u : 0u);
	info->num_regions = TESTDEV_NUM_REGIONS;
	info->num_irqs = 0;
	return 0;
}

static int td_region_info(struct vfm_device *dev, uint32_t index,
			  struct vfm_region_info *info, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	size_t size;
	int ret = injected(td, TESTDEV_OP_REGION_INFO, err);

	if (ret)
		return ret;
	if (!testdev_region(td, index, &size))
		return vfm_error_set(err, -EINVAL, "testdev: no region %u", index);
	info->index = index;
	info->flags = VFM_REGION_READ | VFM_REGION_WRITE | (index ? VFM_REGION_MMAP : 0);
	info->size = size;
	return 0;
}

static ssize_t region_io(struct testdev *td, enum testdev_op op, uint32_t index,
			 uint64_t offset, void *buf, size_t len, struct vfm_error *err)
{
	int ret = injected(td, op, err);
	unsigned char *r;
	size_t size;

	if (ret)
		return ret;
	r = testdev_region(td, index, &size);
	if (!r)
		return vfm_error_set(err, -EINVAL, "testdev: no region %u", index);
	if (offset > size || len > size - offset)
		return vfm_error_set(err, -EINVAL, "testdev: region %u access out of range", index);
	if (op == TESTDEV_OP_REGION_READ)
		memcpy(buf, r + offset, len);
	else
		memcpy(r + offset, buf, len);
	return (ssize_t)len + td->lie[op];
}

static ssize_t td_region_read(struct vfm_device *dev, uint32_t index, uint64_t offset,
			      void *buf, size_t len, struct vfm_error *err)
{
	return region_io(to_td(dev), TESTDEV_OP_REGION_READ, index, offset, buf, len, err);
}

static ssize_t td_region_write(struct vfm_device *dev, uint32_t index, uint64_t offset,
			       const void *buf, size_t len, struct vfm_error *err)
{
	return region_io(to_td(dev), TESTDEV_OP_REGION_WRITE, index, offset, (void *)buf, len,
			 err);
}

static int td_dma_map(struct vfm_device *dev, const struct vfm_dma_map *map,
		      struct vfm_error *err)
{
	(void)map;
	return injected(to_td(dev), TESTDEV_OP_DMA_MAP, err);
}

static int td_dma_unmap(struct vfm_device *dev, uint64_t iova, uint64_t size,
			uint64_t page_size, uint64_t *dirty_bitmap, struct vfm_error *err)
{
	(void)iova, (void)size, (void)page_size, (void)dirty_bitmap;
	return injected(to_td(dev), TESTDEV_OP_DMA_UNMAP, err);
}

/* ---- DMA logging ---- */

static int td_log_start_unlocked(struct vfm_device *dev, const struct vfm_iova_range *ranges,
			uint32_t num_ranges, uint64_t *page_size, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_LOG_START, err);

	if (ret)
		return ret;
	if (td->logging)
		return vfm_error_set(err, -EBUSY, "testdev: logging already started");
	if (num_ranges > MAX_LOG_RANGES)
		return vfm_error_set(err, -E2BIG, "testdev: %u ranges", num_ranges);
	memcpy(td->log_ranges, ranges, num_ranges * sizeof(*ranges));
	td->num_log_ranges = num_ranges;
	if (td->log_forced_page_size)
		*page_size = td->log_forced_page_size;
	td->log_page_size = *page_size;
	td->num_log_dirty = 0;
	td->log_overflow = false;
	td->logging = true;
	return 0;
}

static int td_log_stop_unlocked(struct vfm_device *dev, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_LOG_STOP, err);

	if (ret)
		return ret;
	td->logging = false;
	td->num_log_dirty = 0;
	return 0;
}

static int td_log_report_unlocked(struct vfm_device *dev, uint64_t iova, uint64_t length,
			 uint64_t page_size, uint64_t *bitmap, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret = injected(td, TESTDEV_OP_LOG_REPORT, err);
	unsigned i = 0;

	if (ret)
		return ret;
	if (!td->logging)
		return vfm_error_set(err, -EINVAL, "testdev: logging not started");
	if (td->log_overflow) {
		for (uint64_t bit = 0; bit < (length + page_size - 1) / page_size; bit++)
			bitmap[bit / 64] |= 1ull << (bit % 64);
		/* Sticky until the next start: over-reporting is safe, losing is not. */
		return 0;
	}
	while (i < td->num_log_dirty) {
		uint64_t a = td->log_dirty[i], bit;

		if (a < iova || a - iova >= length) {
			i++;
			continue;
		}
		bit = (a - iova) / page_size;
		bitmap[bit / 64] |= 1ull << (bit % 64);
		/* Reading clears: drop the entry (order does not matter). */
		td->log_dirty[i] = td->log_dirty[--td->num_log_dirty];
	}
	return 0;
}

static void td_close(struct vfm_device *dev)
{
	struct testdev *td = to_td(dev);

	session_end(td);
	free(td->data);
	free(td);
}

/* ---- Locked entry points ---- */
static int td_set_state(struct vfm_device *dev, enum vfm_state new_state, bool *session_opened, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret;

	pthread_mutex_lock(&td->lock);
	ret = td_set_state_unlocked(dev, new_state, session_opened, err);
	pthread_mutex_unlock(&td->lock);
	return ret;
}

static ssize_t td_read_data(struct vfm_device *dev, void *buf, size_t len, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	ssize_t ret;

	pthread_mutex_lock(&td->lock);
	ret = td_read_data_unlocked(dev, buf, len, err);
	pthread_mutex_unlock(&td->lock);
	return ret;
}

static int td_precopy_info(struct vfm_device *dev, uint64_t *initial_bytes, uint64_t *dirty_bytes, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret;

	pthread_mutex_lock(&td->lock);
	ret = td_precopy_info_unlocked(dev, initial_bytes, dirty_bytes, err);
	pthread_mutex_unlock(&td->lock);
	return ret;
}

static int td_stop_copy_size(struct vfm_device *dev, uint64_t *bytes, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret;

	pthread_mutex_lock(&td->lock);
	ret = td_stop_copy_size_unlocked(dev, bytes, err);
	pthread_mutex_unlock(&td->lock);
	return ret;
}

static int td_log_start(struct vfm_device *dev, const struct vfm_iova_range *ranges, uint32_t num_ranges, uint64_t *page_size, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret;

	pthread_mutex_lock(&td->lock);
	ret = td_log_start_unlocked(dev, ranges, num_ranges, page_size, err);
	pthread_mutex_unlock(&td->lock);
	return ret;
}

static int td_log_stop(struct vfm_device *dev, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret;

	pthread_mutex_lock(&td->lock);
	ret = td_log_stop_unlocked(dev, err);
	pthread_mutex_unlock(&td->lock);
	return ret;
}

static int td_log_report(struct vfm_device *dev, uint64_t iova, uint64_t length, uint64_t page_size, uint64_t *bitmap, struct vfm_error *err)
{
	struct testdev *td = to_td(dev);
	int ret;

	pthread_mutex_lock(&td->lock);
	ret = td_log_report_unlocked(dev, iova, length, page_size, bitmap, err);
	pthread_mutex_unlock(&td->lock);
	return ret;
}

static const struct vfm_migration_ops td_mig_ops = {
	.get_flags = td_get_flags,
	.get_state = td_get_state,
	.set_state = td_set_state,
	.end_session = td_end_session,
	.read_data = td_read_data,
	.write_data = td_write_data,
	.precopy_info = td_precopy_info,
	.stop_copy_size = td_stop_copy_size,
};

static const struct vfm_dma_logging_ops td_log_ops = {
	.start = td_log_start,
	.stop = td_log_stop,
	.report = td_log_report,
};

static const struct vfm_device_ops td_ops = {
	.backend = "test",
	.get_info = td_get_info,
	.region_info = td_region_info,
	.region_read = td_region_read,
	.region_write = td_region_write,
	.dma_map = td_dma_map,
	.dma_unmap = td_dma_unmap,
	.reset = td_reset,
	.close = td_close,
};

/* ---- Public (to tests) ---- */

struct testdev *testdev_new(const char *id, uint64_t mig_flags, size_t state_size,
			    uint32_t seed, unsigned opts)
{
	struct testdev *td = xcalloc(sizeof(*td));
	uint32_t x = seed * 2654435761u + 1;

	pthread_mutex_init(&td->lock, NULL);
	td->flags = mig_flags;
	td->state = VFM_STATE_RUNNING;
	td->size = state_size;
	td->data = xcalloc(state_size);
	for (size_t i = 0; i < state_size; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		td->data[i] = (unsigned char)x;
	}
	for (size_t i = 0; i < sizeof(td->region0); i++)
		td->region0[i] = (unsigned char)(i ^ seed);

	td->ops = td_ops;
	td->mig = td_mig_ops;
	td->log = td_log_ops;
	td->ops.mig = (opts & TESTDEV_NO_MIG) ? NULL : &td->mig;
	td->ops.log = (opts & TESTDEV_NO_DMA_LOGGING) ? NULL : &td->log;
	if (opts & TESTDEV_NO_PRECOPY_INFO)
		td->mig.precopy_info = NULL;
	if (opts & TESTDEV_NO_STOP_COPY_SIZE)
		td->mig.stop_copy_size = NULL;
	if (opts & TESTDEV_NO_RESET)
		td->ops.reset = NULL;
	if (opts & TESTDEV_NO_IO) {
		td->ops.get_info = NULL;
		td->ops.region_info = NULL;
		td->ops.region_read = NULL;
		td->ops.region_write = NULL;
		td->ops.dma_map = NULL;
		td->ops.dma_unmap = NULL;
	}
	td->dev = vfm_device_new(id, &td->ops, td);
	if (!td->dev)
		abort();
	return td;
}

void testdev_free(struct testdev *td)
{
	if (td)
		vfm_device_free(td->dev);
}

struct vfm_device *testdev_device(struct testdev *td)
{
	return td->dev;
}

enum vfm_state testdev_state(const struct testdev *td)
{
	return td->state;
}

void testdev_force_state(struct testdev *td, enum vfm_state st)
{
	session_end(td);
	td->state = st;
}

const unsigned char *testdev_data(const struct testdev *td, size_t *size)
{
	if (size)
		*size = td->size;
	return td->data;
}

uint64_t testdev_generation(const struct testdev *td)
{
	return td->generation;
}

static int testdev_dirty_unlocked(struct testdev *td, size_t off, size_t len);

int testdev_dirty(struct testdev *td, size_t off, size_t len)
{
	int ret;

	pthread_mutex_lock(&td->lock);
	ret = testdev_dirty_unlocked(td, off, len);
	pthread_mutex_unlock(&td->lock);
	return ret;
}

static int testdev_dirty_unlocked(struct testdev *td, size_t off, size_t len)
{
	unsigned char x;

	if (off > td->size || len > td->size - off)
		return -EINVAL;
	switch (td->state) {
	case VFM_STATE_RUNNING:
	case VFM_STATE_RUNNING_P2P:
	case VFM_STATE_PRE_COPY:
	case VFM_STATE_PRE_COPY_P2P:
		break;
	default:
		return -EBUSY;
	}
	td->generation++;
	/* A non-zero XOR: every byte really changes. */
	x = (unsigned char)(0x80 | (td->generation & 0x7f));
	for (size_t i = off; i < off + len; i++) {
		td->data[i] ^= x;
		if (td->dirty)
			td->dirty[i] = 1;
	}
	return 0;
}

unsigned testdev_session_id(const struct testdev *td)
{
	return td->session_id;
}

unsigned char *testdev_resume_buf(struct testdev *td, size_t *len)
{
	*len = td->in.len;
	return td->in.p;
}

void testdev_set_write_chunk(struct testdev *td, size_t max)
{
	td->write_chunk = max;
}

const char *testdev_arcs(const struct testdev *td, char *buf, size_t len)
{
	size_t off = 0;

	if (len)
		buf[0] = '\0';
	for (unsigned i = 0; i < td->num_arcs; i++) {
		const struct arc_rec *a = &td->arcs[i];
		int n = snprintf(buf + off, len > off ? len - off : 0, "%s%s>%s%s",
				 i ? "," : "", short_names[a->from], short_names[a->to],
				 a->failed ? "!" : "");

		if (n > 0)
			off += (size_t)n;
	}
	return buf;
}

unsigned testdev_num_arcs(const struct testdev *td)
{
	return td->num_arcs;
}

void testdev_clear_arcs(struct testdev *td)
{
	td->num_arcs = 0;
}

void testdev_fail_op(struct testdev *td, enum testdev_op op, int code, int times)
{
	/* Under the lock the ops take: a test may change it while a migration
	 * thread calls the device. */
	pthread_mutex_lock(&td->lock);
	td->op_faults[op] = (struct op_fault){ code, times };
	pthread_mutex_unlock(&td->lock);
}

void testdev_fail_arc(struct testdev *td, enum vfm_state from, enum vfm_state to,
		      int code, bool to_error, int times)
{
	for (unsigned i = 0; i < MAX_ARC_FAULTS; i++) {
		struct arc_fault *f = &td->arc_faults[i];

		if (!f->times || (f->from == from && f->to == to)) {
			*f = (struct arc_fault){ from, to, code, to_error, times };
			return;
		}
	}
	abort();
}

void testdev_lie_size(struct testdev *td, enum testdev_op op, ssize_t delta)
{
	td->lie[op] = delta;
}

void testdev_spurious_session(struct testdev *td, enum vfm_state from, enum vfm_state to)
{
	td->spurious[from][to] = true;
}

void testdev_suppress_session(struct testdev *td, enum vfm_state from, enum vfm_state to)
{
	td->suppress[from][to] = true;
}

unsigned testdev_calls(const struct testdev *td, enum testdev_op op)
{
	return td->calls[op];
}

bool testdev_logging(const struct testdev *td)
{
	return td->logging;
}

const struct vfm_iova_range *testdev_log_ranges(const struct testdev *td, uint32_t *num,
						uint64_t *page_size)
{
	*num = td->num_log_ranges;
	if (page_size)
		*page_size = td->log_page_size;
	return td->log_ranges;
}

void testdev_log_dirty(struct testdev *td, uint64_t iova)
{
	pthread_mutex_lock(&td->lock);
	for (unsigned i = 0; i < td->num_log_dirty; i++) {
		if (td->log_dirty[i] == iova) {
			pthread_mutex_unlock(&td->lock);
			return;
		}
	}
	if (td->num_log_dirty < MAX_LOG_DIRTY)
		td->log_dirty[td->num_log_dirty++] = iova;
	else
		td->log_overflow = true;  /* like a device whose log overflows */
	pthread_mutex_unlock(&td->lock);
}

void testdev_log_force_page_size(struct testdev *td, uint64_t page_size)
{
	td->log_forced_page_size = page_size;
}

unsigned char *testdev_region(struct testdev *td, uint32_t index, size_t *size)
{
	switch (index) {
	case 0:
		*size = sizeof(td->region0);
		return td->region0;
	case 1:
		*size = sizeof(td->region1);
		return td->region1;
	default:
		*size = 0;
		return NULL;
	}
}
