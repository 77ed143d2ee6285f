/*
 * "test": an in-memory device backend with real migration semantics (state
 * machine stepped arc by arc like the kernel, a pre-copy session with initial
 * and dirty data, a validated RESUMING stream) plus fault injection and call
 * counting, so device-layer policy can be tested without hardware.
 */
#ifndef VFM_TESTS_TESTDEV_H
#define VFM_TESTS_TESTDEV_H

#include <sys/types.h>

#include "vfiomig/device.h"

struct testdev;

/* Creation options: which optional ops tables / ops the backend leaves out. */
#define TESTDEV_NO_MIG            (1u << 0)  /* no migration ops table */
#define TESTDEV_NO_PRECOPY_INFO   (1u << 1)
#define TESTDEV_NO_STOP_COPY_SIZE (1u << 2)
#define TESTDEV_NO_DMA_LOGGING    (1u << 3)  /* no DMA logging ops table */
#define TESTDEV_NO_RESET          (1u << 4)
#define TESTDEV_NO_IO             (1u << 5)  /* no info/region/DMA ops */

/*
 * The migration stream is a sequence of records, each a 16-byte header
 * { u32 magic, u32 type, u32 offset, u32 length } in host byte order:
 *   DATA: length bytes of state data for [offset, offset + length);
 *   END:  offset = state size, length = 16, then { u64 generation,
 *         u64 FNV-1a of the whole state }; it must be the last record.
 * RESUMING -> STOP accepts the stream only if it is well formed, covers every
 * byte, and the checksum matches what was assembled.
 */
#define TESTDEV_MAGIC     0x54534456u  /* "VDST" */
#define TESTDEV_REC_DATA  1u
#define TESTDEV_REC_END   2u
#define TESTDEV_HDR_SIZE  16u
#define TESTDEV_END_SIZE  (TESTDEV_HDR_SIZE + 16u)

/* Every op, for fault injection and call counts. */
enum testdev_op {
	TESTDEV_OP_GET_FLAGS,
	TESTDEV_OP_GET_STATE,
	TESTDEV_OP_SET_STATE,
	TESTDEV_OP_END_SESSION,
	TESTDEV_OP_READ,
	TESTDEV_OP_WRITE,
	TESTDEV_OP_PRECOPY_INFO,
	TESTDEV_OP_STOP_COPY_SIZE,
	TESTDEV_OP_RESET,
	TESTDEV_OP_GET_INFO,
	TESTDEV_OP_REGION_INFO,
	TESTDEV_OP_REGION_READ,
	TESTDEV_OP_REGION_WRITE,
	TESTDEV_OP_DMA_MAP,
	TESTDEV_OP_DMA_UNMAP,
	TESTDEV_OP_LOG_START,
	TESTDEV_OP_LOG_STOP,
	TESTDEV_OP_LOG_REPORT,
	TESTDEV_OP_COUNT
};

/* Regions: 0 = config space, 1 = BAR0. */
#define TESTDEV_NUM_REGIONS 2u
#define TESTDEV_REGION0_SIZE 256u
#define TESTDEV_REGION1_SIZE 4096u

/*
 * A device starting in RUNNING with state_size bytes of state (filled with a
 * pattern derived from seed, generation 0). Freed with testdev_free() (or
 * vfm_device_free() on its vfm_device). Aborts on allocation failure.
 */
struct testdev *testdev_new(const char *id, uint64_t mig_flags, size_t state_size,
			    uint32_t seed, unsigned opts);
void testdev_free(struct testdev *td);
struct vfm_device *testdev_device(struct testdev *td);

/* ---- Device-internal state ---- */
enum vfm_state testdev_state(const struct testdev *td);
/* Puts the device in a state directly (no arcs, no session): test setup. */
void testdev_force_state(struct testdev *td, enum vfm_state st);
const unsigned char *testdev_data(const struct testdev *td, size_t *size);
uint64_t testdev_generation(const struct testdev *td);
/*
 * The running device changes [off, off+len) of its state (generation + 1);
 * in a pre-copy session those bytes become dirty data. -EINVAL out of range,
 * -EBUSY when the device is not running (STOP, STOP_COPY, RESUMING, ERROR).
 */
int testdev_dirty(struct testdev *td, size_t off, size_t len);
/* Data session: 0 = none; each new session gets a new id. */
unsigned testdev_session_id(const struct testdev *td);
/* Bytes written in RESUMING so far (the unvalidated stream), for corrupting. */
unsigned char *testdev_resume_buf(struct testdev *td, size_t *len);
/* Largest chunk write_data takes per call (0 = all): exercises short writes. */
void testdev_set_write_chunk(struct testdev *td, size_t max);

/* ---- The arc log: every arc the device attempted, in order ---- */
/*
 * "R>RP,RP>S,S>SC!" with short names (R RP S SC RES PC PCP ERR); "!" marks an
 * arc that failed. Returns buf.
 */
const char *testdev_arcs(const struct testdev *td, char *buf, size_t len);
unsigned testdev_num_arcs(const struct testdev *td);
void testdev_clear_arcs(struct testdev *td);
/* fn runs on every arc as it is logged (several devices can share one fn to
 * see the order of arcs across devices); NULL removes it. */
typedef void (*testdev_arc_fn)(void *opaque, const struct testdev *td, enum vfm_state from,
			       enum vfm_state to, bool failed);
void testdev_set_arc_hook(struct testdev *td, testdev_arc_fn fn, void *opaque);

/* ---- Fault injection ---- */
/*
 * The next `times` calls of op fail with code (times < 0: every call). A
 * failed SET_STATE takes no arc; a failed RESET leaves the state as it was.
 */
void testdev_fail_op(struct testdev *td, enum testdev_op op, int code, int times);
/*
 * Arc from -> to fails with code the next `times` times it is taken (< 0:
 * always): the device stays in `from`, or goes to ERROR when to_error.
 */
void testdev_fail_arc(struct testdev *td, enum vfm_state from, enum vfm_state to,
		      int code, bool to_error, int times);
/* READ/WRITE/REGION_READ/REGION_WRITE report `delta` more bytes than moved. */
void testdev_lie_size(struct testdev *td, enum testdev_op op, ssize_t delta);
/* The arc from -> to, as the final arc, reports a new data session (or none). */
void testdev_spurious_session(struct testdev *td, enum vfm_state from, enum vfm_state to);
void testdev_suppress_session(struct testdev *td, enum vfm_state from, enum vfm_state to);
/* Calls of op so far (failed ones included). */
unsigned testdev_calls(const struct testdev *td, enum testdev_op op);

/* ---- DMA logging ---- */
bool testdev_logging(const struct testdev *td);
/* Ranges and page size of the last start. */
const struct vfm_iova_range *testdev_log_ranges(const struct testdev *td, uint32_t *num,
						uint64_t *page_size);
/* Makes the device's DMA write to iova show up in the next report covering it. */
void testdev_log_dirty(struct testdev *td, uint64_t iova);
/* START answers with this page size instead of the hint (0: the hint). */
void testdev_log_force_page_size(struct testdev *td, uint64_t page_size);

/* Region contents, for checking region_write and seeding region_read. */
unsigned char *testdev_region(struct testdev *td, uint32_t index, size_t *size);

#endif
