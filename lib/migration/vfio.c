/*
 * The VFIO device savable (one per device) and dirty tracking of the guest
 * memory devices write by DMA: the seeds' save/load handlers over the device
 * layer.
 *
 * DATA records of a device section carry the record flag DEV_SETUP (payload:
 * u64 migration flags of the source device) or DEV_STATE (opaque device data,
 * in order). CONFIG carries PCI config space bytes.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "migration/engine.h"
#include "migration/multifd.h"
#include "util/bitmap.h"
#include "vfiomig/vfio.h"
#include "vfiomig/vfio_user.h"
#include "util/logging.h"

#define DEV_SETUP 1
#define DEV_STATE 2

/* Data block size: QEMU found no gain above 1 MiB on mlx5 (128 MB, 1 GB tried). */
#define DEV_BLOCK_MAX (1u << 20)
/* Estimate when the device cannot tell its stop-copy size (as QEMU): 100 GiB,
 * so downtime is never under-estimated. */
#define DEV_STOP_COPY_UNKNOWN (100ull << 30)
#define PCI_CONFIG_REGION 7
#define STOP_COPY_FLUSH_NS 100000000ull   /* 100 ms */

static const char *md_id(const struct vfm_mig_device *md)
{
	return vfm_device_id(md->dev);
}

/*
 * PRECOPY_INFO costs a firmware command on real devices: asked at setup, then
 * at most once per iteration (the span between two exact checks), at the end
 * of the device's data or by the exact check if the iteration has not asked
 * yet; in between the figures are decremented as data is read (QEMU:
 * vfio_update_estimated_pending_data in hw/vfio/migration.c).
 */
static void ask_precopy_info(struct vfm_mig_device *md)
{
	uint64_t init, dirty;

	if (!md->precopy_info_ok || md->info_asked)
		return;
	md->info_asked = true;
	md->precopy_info_calls++;
	if (vfm_device_precopy_info(md->dev, &init, &dirty, NULL) == 0) {
		md->precopy_init = init;
		md->precopy_dirty = dirty;
	}
}

/* n bytes were read: initial data goes first, then dirty (as QEMU). */
static void consume_precopy(struct vfm_mig_device *md, uint64_t n)
{
	uint64_t a = n < md->precopy_init ? n : md->precopy_init;

	md->precopy_init -= a;
	n -= a;
	md->precopy_dirty -= n < md->precopy_dirty ? n : md->precopy_dirty;
}

/* The pass of the iteration that starts: what the device has pending now
 * (from precopy info), or one turn when it cannot say. */
static void start_pass(struct vfm_mig_device *md)
{
	md->pass_one_turn = !md->precopy_info_ok;
	md->pass_left = md->precopy_init + md->precopy_dirty;
}

static uint64_t vfio_pending_estimate(void *opaque);

static void sc_publish(struct vfm_mig_device *md, uint64_t bytes, enum vfm__sc_source src)
{
	atomic_store(&md->sc_bytes, bytes);
	atomic_store(&md->sc_source, (int)src);
}

/* A query's round trip: what a switchover arc costs is the least seen. */
static void note_round_trip(struct vfm_mig_device *md, uint64_t dt)
{
	if (!md->arc_ns || dt < md->arc_ns)
		md->arc_ns = dt;
}

/*
 * The stop-copy size policy (docs/interop.md): the device's own figure when
 * it has one (kernel MIG_DATA_SIZE, our vfio-user extension); else the
 * stop-copy-size= property; else, for a device that cannot say (-ENOTSUP:
 * libvfio-user, a plain vfio-user server), an estimate from what it produced
 * in its last pre-copy round (vfio_pending_estimate), reported as such;
 * a device that fails to say counts as 100 GiB, as QEMU, so the downtime is
 * never under-estimated. Each case but the first is logged once per
 * migration, so a migration that cannot converge never loops silently.
 */
static void refresh_stop_copy_size(struct vfm_mig_device *md)
{
	struct vfm_error e = { 0 };
	uint64_t size, t0 = vfm__now_ns();
	int ret = vfm_device_stop_copy_size(md->dev, &size, &e);

	if (ret == 0) {
		note_round_trip(md, vfm__now_ns() - t0);
		md->stop_copy_size = size;
		md->stop_copy_known = true;
		sc_publish(md, size, VFM__SC_DEVICE);
		return;
	}
	if (md->props.stop_copy_size_set) {
		md->stop_copy_size = md->props.stop_copy_size;
		md->stop_copy_known = true;
		sc_publish(md, md->stop_copy_size, VFM__SC_PROPERTY);
		if (!md->sc_warned)
			vfm_info(md_id(md), "stop-copy size %" PRIu64 " bytes from stop-copy-size= "
				 "(the device: %s)", md->stop_copy_size, e.msg);
	} else if (ret == -ENOTSUP) {
		/* Not known: vfio_pending_exact() uses the estimate. */
		md->stop_copy_known = false;
		sc_publish(md, vfio_pending_estimate(md), VFM__SC_ESTIMATE);
		if (!md->sc_warned)
			vfm_warn(md_id(md), "the device cannot report its stop-copy size: estimating "
				 "it from its last pre-copy round; set stop-copy-size=SIZE to state it");
	} else {
		md->stop_copy_size = DEV_STOP_COPY_UNKNOWN;
		md->stop_copy_known = true;
		sc_publish(md, DEV_STOP_COPY_UNKNOWN, VFM__SC_UNKNOWN);
		if (!md->sc_warned)
			vfm_warn(md_id(md), "the device failed to report its stop-copy size (%s): "
				 "counting 100 GiB, which will not converge; set stop-copy-size=SIZE",
				 e.msg);
	}
	md->sc_warned = true;
}

/* The savable's section id is needed for records; found through the registry. */
static uint32_t section_of(const struct vfm_mig_device *md)
{
	const struct vfm_migration *m = md->m;

	for (unsigned i = 0; i < m->nsv; i++)
		if (m->sv[i].opaque == md)
			return m->sv[i].section;
	return 0;
}

uint32_t vfm__vfio_section(const struct vfm_mig_device *md)
{
	return section_of(md);
}

static int vfio_save_setup(void *opaque, struct vfm_stream *s, struct vfm_error *err)
{
	struct vfm_mig_device *md = opaque;
	unsigned char payload[8];
	uint64_t init, dirty;
	int ret;

	md->use_precopy = false;
	md->init_data_sent = false;
	md->precopy_info_ok = false;
	md->precopy_init = md->precopy_dirty = md->last_iter_bytes = 0;
	md->info_asked = false;
	md->stop_copy_exact = false;
	md->read_since_exact = 0;
	md->short_read_fixed_ns = 0;
	md->full_read_ns_per_byte = 0;
	md->arc_ns = 0;
	md->ndst_rt = 0;
	md->ndst_rt2 = 0;
	md->precopy_info_calls = 0;
	md->stop_copy_size = 0;
	md->stop_copy_known = false;
	md->sc_warned = false;
	md->cfg_len = 0;
	{
		struct vfm_region_info ri;

		md->has_config = !vfm_device_region_info(md->dev, PCI_CONFIG_REGION, &ri, NULL) &&
				 ri.size >= 0x28;
	}
	atomic_store(&md->transferred, 0);
	atomic_store(&md->mf_sent, 0);
	refresh_stop_copy_size(md);
	md->data_buf_size = DEV_BLOCK_MAX;
	if (md->stop_copy_size && md->stop_copy_size < DEV_BLOCK_MAX)
		md->data_buf_size = md->stop_copy_size < 4096 ? 4096 : md->stop_copy_size;
	free(md->buf);
	md->buf = malloc(md->data_buf_size);
	if (!md->buf)
		return vfm_error_set(err, -ENOMEM, "%s: out of memory", md_id(md));

	/* PRE_COPY only from RUNNING: a stopped device (a paused VM) has
	 * nothing to pre-copy and goes straight to STOP_COPY at the switchover
	 * (QEMU's vfio_save_setup checks the VM is running the same way). */
	if ((md->flags & VFM_MIG_PRE_COPY) && md->props.allow_pre_copy &&
	    vfm_device_state(md->dev) == VFM_STATE_RUNNING) {
		ret = vfm_device_set_state(md->dev, VFM_STATE_PRE_COPY, VFM_STATE_RUNNING, err);
		if (ret)
			return vfm_error_set(err, ret, "%s: entering PRE_COPY", md_id(md));
		md->use_precopy = true;
		md->precopy_info_calls++;
		if (vfm_device_precopy_info(md->dev, &init, &dirty, NULL) == 0) {
			md->precopy_info_ok = true;
			md->precopy_init = init;
			md->precopy_dirty = dirty;
		}
		start_pass(md);
	}
	{
		/*
		 * What a switchover arc (to P2P, to STOP_COPY, the destination's)
		 * costs: a state query's round trip. Not RUNNING -> PRE_COPY: it
		 * opens the saving session (the dma device sets up its snapshot),
		 * and under a loaded CI run it took ~100 ms, so five "arcs" of it
		 * made the expected downtime 535 ms with 200 KB pending and the
		 * migration never switched over (migration_fail's
		 * cancel_waiting_for_loaded), where the switchover's own arcs take
		 * 0.04-0.10 ms (make bench). A device whose arcs do heavy work has
		 * it counted as too little: the steps' expectation stays a lower
		 * bound there, as QEMU's pending / bandwidth is. The least of
		 * five here and of every MIG_DATA_SIZE query after: one query
		 * on a loaded machine took 0.27 ms where the switchover's arcs
		 * took 0.04-0.05 (make bench), and its device stop, load and
		 * resume steps count it six times.
		 */
		for (int i = 0; i < 5; i++) {
			uint64_t ns = vfm__vfio_round_trip_ns(md);

			if (ns)   /* a failed query is no arc's cost */
				note_round_trip(md, ns);
		}
	}
	vfm_put_le64(payload, md->flags);
	vfm_stream_put_record(s, VFM_REC_DATA, DEV_SETUP, section_of(md), payload, sizeof(payload));
	return vfm_stream_error(s, err);
}

static bool vfio_is_active_iterate(void *opaque)
{
	struct vfm_mig_device *md = opaque;
	enum vfm_state st = vfm_device_state(md->dev);

	return md->use_precopy && (st == VFM_STATE_PRE_COPY || st == VFM_STATE_PRE_COPY_P2P);
}

/*
 * Reads one block and puts it on the stream. Returns bytes (> 0), 0 at end of
 * data, -ENOMSG when pre-copy has nothing now, or an error.
 */
static ssize_t move_block(struct vfm_mig_device *md, struct vfm_stream *s, uint32_t section,
			  struct vfm_error *err)
{
	const void *data = md->buf;
	/*
	 * A vfio-user device that took our migration data window (the
	 * vfiomig_mig_shm extension) leaves the block there: the stream writes
	 * it to the channel from the window, no copy into md->buf (the record
	 * is sent before the next read; docs/performance.md, device-state hops).
	 */
	ssize_t n = vfm_device_is_vfio_user(md->dev)
			    ? vfm_vfio_user_read_data_view(md->dev, md->buf, md->data_buf_size, &data,
							   err)
			    : vfm_device_read_data(md->dev, md->buf, md->data_buf_size, err);

	if (n <= 0)
		return n;
	vfm_stream_put_record(s, VFM_REC_DATA, DEV_STATE, section, data, (size_t)n);
	atomic_fetch_add(&md->transferred, (uint64_t)n + sizeof(struct vfm_rec_hdr));
	if (vfm_stream_error(s, err))
		return err ? err->code : -EIO;
	return n;
}

static void init_data_sent(struct vfm_mig_device *md, struct vfm_stream *s, uint32_t section)
{
	md->init_data_sent = true;
	vfm_stream_put_record(s, VFM_REC_INIT_DATA_SENT, 0, section, NULL, 0);
	vfm_debug(md_id(md), "initial pre-copy data sent");
}

/*
 * One turn of this iteration's pass: up to budget bytes, and no more than the
 * pass (what the device had pending at the last exact check). Returns 1 once
 * the pass is out or the device has nothing now, 0 when the pass goes on.
 */
static int vfio_save_iterate(void *opaque, struct vfm_stream *s, uint64_t budget,
			     struct vfm_error *err)
{
	struct vfm_mig_device *md = opaque;
	uint32_t section = section_of(md);
	uint64_t sent = 0;
	bool end_of_data = false;
	ssize_t n;

	while (sent < budget && (md->pass_one_turn || md->pass_left)) {
		uint64_t t0 = vfm__now_ns();

		n = move_block(md, s, section, err);
		if (n > 0 && (size_t)n == md->data_buf_size) {
			double npb = (double)(vfm__now_ns() - t0) / (double)n;

			if (!md->full_read_ns_per_byte || npb < md->full_read_ns_per_byte)
				md->full_read_ns_per_byte = npb;
		} else if (n >= 0 || n == -ENOMSG) {
			/*
			 * A read that does not fill the block: a round trip and
			 * its bytes. Stop-copy ends with two (the last data,
			 * then none); what such a read costs beyond its bytes
			 * (at the quickest full block's pace) is kept, the least
			 * seen: often the only short read is the first pass's
			 * tail (128 KiB: 0.07-1.8 ms where each closing read
			 * took ~0.05), and the closing reads' bytes are counted
			 * with the device's pending bytes (savable_ms).
			 */
			uint64_t dt = vfm__now_ns() - t0;
			double data = n > 0 ? (double)n * md->full_read_ns_per_byte : 0;
			uint64_t fixed = (double)dt > data ? (uint64_t)((double)dt - data) : 1;

			if (!md->short_read_fixed_ns || fixed < md->short_read_fixed_ns)
				md->short_read_fixed_ns = fixed;
		}
		if (n > 0) {
			sent += (uint64_t)n;
			consume_precopy(md, (uint64_t)n);
			md->read_since_exact += (uint64_t)n;
			md->pass_left -= (uint64_t)n < md->pass_left ? (uint64_t)n : md->pass_left;
			/* switchover-ack as soon as the initial data is out, even
			 * when every turn fills its budget. */
			if (!md->init_data_sent && md->precopy_info_ok && !md->precopy_init)
				init_data_sent(md, s, section);
			continue;
		}
		if (n == -EAGAIN)
			continue;
		if (n < 0 && n != -ENOMSG)
			return (int)n;
		/* End of data (ENOMSG, or 0 from some drivers): the point where
		 * mlx5/virtio produce new dirty data on PRECOPY_INFO; once per
		 * iteration. What it reports belongs to the next pass. */
		if (!md->info_asked && md->precopy_info_ok) {
			ask_precopy_info(md);
			if (md->precopy_dirty && !md->pass_one_turn)
				continue;
		} else {
			md->precopy_init = md->precopy_dirty = 0;   /* nothing now, as QEMU */
		}
		end_of_data = true;
		break;
	}
	md->last_iter_bytes = sent;
	/* Without precopy info (vfio-user without the extension), the initial
	 * data is out at the first point the device had nothing more. */
	if (!md->init_data_sent && ((md->precopy_info_ok && !md->precopy_init) ||
				    (!md->precopy_info_ok && end_of_data)))
		init_data_sent(md, s, section);
	if (vfm_stream_error(s, err))
		return err ? err->code : -EIO;
	return end_of_data || md->pass_one_turn || !md->pass_left ? 1 : 0;
}

/* What pre-copy still has to read, as far as the device said. */
static uint64_t precopy_left(const struct vfm_mig_device *md)
{
	if (!md->use_precopy)
		return 0;
	if (md->precopy_info_ok)
		return md->precopy_init + md->precopy_dirty;
	return md->last_iter_bytes;
}

/*
 * What the device still has to move, from its two figures. The uAPI
 * (include/uapi/linux/vfio.h, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE) defines
 * stop_copy_length as "the estimated data length that will be required to
 * complete stop copy": data the device has not delivered in pre-copy is
 * still required then, so the figure already holds PRECOPY_INFO's initial
 * and dirty bytes (our dma device and the test device report it so; mlx5
 * reports its whole state size, hisi_acc and mtty a constant). QEMU's
 * vfio_state_pending_exact() adds both, counting that remainder twice; its
 * author agreed the sum should go (qemu-devel, "Re: [PATCH v11 08/11]
 * vfio/migration: Implement VFIO migration protocol v2", Avihai Horon,
 * 2024-09-05). The larger of the two, then: never the sum, and never less
 * than the pre-copy bytes the device says it has now, whatever a device
 * puts in its stop-copy figure.
 */
static uint64_t pending_of(uint64_t stop_copy, uint64_t precopy)
{
	return stop_copy > precopy ? stop_copy : precopy;
}

/*
 * Cheap: the pre-copy figures as decremented locally, and the stop-copy size
 * of the last exact check less what pre-copy read since (the device reads
 * that part of its stop-copy data early), so the estimate and the exact
 * figure count the same way and an estimate under the threshold does not
 * ask the exact figure again and again while it says no (the loop
 * libvfio-user's unknown size caused). 0 before setup.
 */
static uint64_t vfio_pending_estimate(void *opaque)
{
	struct vfm_mig_device *md = opaque;
	uint64_t sc = 0;

	if (md->stop_copy_exact)
		sc = md->stop_copy_size > md->read_since_exact ?
		     md->stop_copy_size - md->read_since_exact : 0;
	return pending_of(sc, precopy_left(md));
}

/*
 * The end of an iteration: fresh figures, as QEMU's vfio_state_pending_exact,
 * but the larger of the stop-copy size and the pre-copy initial and dirty
 * bytes, not their sum (pending_of). The size comes from
 * refresh_stop_copy_size, whatever it makes of a device that cannot report
 * it (never 0 for a failed query). Starts the next pass.
 */
static int vfio_pending_exact(void *opaque, uint64_t *pending, struct vfm_error *err)
{
	struct vfm_mig_device *md = opaque;
	uint64_t sc;

	(void)err;
	refresh_stop_copy_size(md);
	/* A device that cannot say (stop_copy_known false): the pre-copy
	 * figure below is the whole estimate refresh_stop_copy_size published
	 * (its last round's bytes). */
	sc = md->stop_copy_known ? md->stop_copy_size : 0;
	md->stop_copy_exact = md->stop_copy_known;
	md->read_since_exact = 0;
	if (md->use_precopy)
		ask_precopy_info(md);
	*pending = pending_of(sc, precopy_left(md));
	md->info_asked = false;   /* a new iteration */
	if (md->use_precopy)
		start_pass(md);
	return 0;
}

static bool vfio_switchover_ack_needed(void *opaque)
{
	struct vfm_mig_device *md = opaque;

	return md->use_precopy;
}

static int vfio_save_complete(void *opaque, struct vfm_stream *s, struct vfm_error *err)
{
	struct vfm_mig_device *md = opaque;
	uint32_t section = section_of(md);
	uint64_t deadline = vfm__now_ns() + md->m->params.timeout_ms * 1000000ull;
	uint64_t flushed = vfm__now_ns();
	ssize_t n;
	int r;

	if (md->mf_use)
		return 0;  /* a multifd save thread sends it */
	/* The engine has moved the device to STOP_COPY: read until 0. */
	for (;;) {
		if (atomic_load(&md->m->cancel))
			return vfm_error_set(err, VFM_ECANCELED, "migration cancelled");
		n = move_block(md, s, section, err);
		if (n > 0) {
			/* A slow device's blocks go out as they come, not when the
			 * buffer fills: the destination sees progress (its timeout)
			 * and a dead destination is seen here. */
			if (vfm__now_ns() - flushed >= STOP_COPY_FLUSH_NS) {
				vfm_stream_flush(s);
				flushed = vfm__now_ns();
				if ((r = vfm_stream_error(s, err)))
					return vfm_error_set(err, r, "%s: stop-copy", md_id(md));
			}
			continue;
		}
		if (n == 0)
			return 0;
		if ((n == -EAGAIN || n == -ENOMSG) && vfm__now_ns() < deadline) {
			struct timespec ts = { 0, 100000 };
			nanosleep(&ts, NULL);
			continue;
		}
		return vfm_error_set(err, (int)n, "%s: reading stop-copy data", md_id(md));
	}
}

int vfm__vfio_snapshot_config(struct vfm_mig_device *md, struct vfm_error *err)
{
	struct vfm_region_info ri;
	size_t len;
	int ret;

	md->cfg_len = 0;
	if (vfm_device_region_info(md->dev, PCI_CONFIG_REGION, &ri, NULL) || !ri.size)
		return 0;  /* not a PCI device: no config state */
	len = ri.size < sizeof(md->cfg) ? (size_t)ri.size : sizeof(md->cfg);
	ret = vfm_device_region_read(md->dev, PCI_CONFIG_REGION, 0, md->cfg, len, err);
	if (ret)
		return vfm_error_set(err, ret, "%s: reading config space", md_id(md));
	md->cfg_len = len;
	return 0;
}

/* The config space snapshot taken before STOP_COPY (vfm__vfio_snapshot_config). */
static int vfio_save_state(void *opaque, struct vfm_stream *s, struct vfm_error *err)
{
	struct vfm_mig_device *md = opaque;

	if (md->mf_use || !md->cfg_len)
		return 0;  /* the last multifd packet carried it, or no config space */
	vfm_stream_put_record(s, VFM_REC_CONFIG, 0, section_of(md), md->cfg, md->cfg_len);
	return vfm_stream_error(s, err);
}

/* One state query, timed: what a request to the device costs now. 0 if the
 * device did not answer. */
uint64_t vfm__vfio_round_trip_ns(struct vfm_mig_device *md)
{
	enum vfm_state st;
	uint64_t t0 = vfm__now_ns();

	if (vfm_device_query_state(md->dev, &st, NULL))
		return 0;
	return vfm__now_ns() - t0;
}

static void vfio_save_cleanup(void *opaque, bool succeeded)
{
	struct vfm_mig_device *md = opaque;
	struct vfm_error err = { 0 };

	/* STOP_COPY -> STOP after completion is off the downtime; on failure the
	 * device goes back to RUNNING (reset if it cannot). */
	if (succeeded) {
		if (vfm_device_set_state(md->dev, VFM_STATE_STOP, VFM_STATE_ERROR, &err))
			vfm_warn(md_id(md), "to STOP after migration: %s", err.msg);
	} else if (vfm_device_state(md->dev) != VFM_STATE_RUNNING) {
		if (vfm_device_set_state(md->dev, VFM_STATE_RUNNING, VFM_STATE_ERROR, &err))
			vfm_err(md_id(md), "back to RUNNING: %s", err.msg);
		else
			vfm_info(md_id(md), "back to RUNNING");
	}
	md->use_precopy = false;
	md->mf_use = false;
	free(md->buf);
	md->buf = NULL;
}

static int vfio_load_setup(void *opaque, uint32_t version, struct vfm_error *err)
{
	struct vfm_mig_device *md = opaque;
	int ret;

	if (version != 1)
		return vfm_error_set(err, VFM_ESTREAM, "%s: unsupported section version %u",
				     md_id(md), version);
	atomic_store(&md->transferred, 0);
	ret = vfm_device_set_state(md->dev, VFM_STATE_RESUMING, VFM_STATE_ERROR, err);
	if (ret)
		return vfm_error_set(err, ret, "%s: entering RESUMING", md_id(md));
	return 0;
}

static int load_config(struct vfm_mig_device *md, const unsigned char *cfg, size_t len,
		       struct vfm_error *err)
{
	int ret;

	/* What QEMU restores: the BARs, then the command register. */
	if (len < 0x28)
		return vfm_error_set(err, VFM_ESTREAM, "%s: config state of %zu bytes", md_id(md), len);
	ret = vfm_device_region_write(md->dev, PCI_CONFIG_REGION, 0x10, cfg + 0x10, 24, err);
	if (!ret)
		ret = vfm_device_region_write(md->dev, PCI_CONFIG_REGION, 0x4, cfg + 0x4, 2, err);
	if (ret)
		return vfm_error_set(err, ret, "%s: restoring config space", md_id(md));
	return 0;
}

static int vfio_load_state(void *opaque, uint16_t type, uint16_t rflags, const void *buf,
			   size_t len, struct vfm_error *err)
{
	struct vfm_mig_device *md = opaque;

	if (type == VFM_REC_CONFIG)
		return load_config(md, buf, len, err);
	if (type != VFM_REC_DATA)
		return vfm_error_set(err, VFM_ESTREAM, "%s: unexpected record %u", md_id(md), type);
	if (rflags == DEV_SETUP) {
		if (len != 8)
			return vfm_error_set(err, VFM_ESTREAM, "%s: bad setup record", md_id(md));
		md->flags = vfm_device_mig_flags(md->dev);
		return 0;
	}
	if (rflags == VFM__DEV_MF_END) {
		if (len != 4)
			return vfm_error_set(err, VFM_ESTREAM, "%s: bad multifd end marker", md_id(md));
		return vfm__mf_dst_dev_end(md, vfm_get_le32(buf), err);
	}
	if (rflags != DEV_STATE)
		return vfm_error_set(err, VFM_ESTREAM, "%s: unknown data kind %u", md_id(md), rflags);
	return vfm__vfio_load_buffer(md, false, buf, len, err);
}

int vfm__vfio_load_buffer(struct vfm_mig_device *md, bool config, const void *buf, size_t len,
			  struct vfm_error *err)
{
	int ret;

	if (config)
		return load_config(md, buf, len, err);
	ret = vfm_device_write_data(md->dev, buf, len, err);
	if (ret)
		return vfm_error_set(err, ret, "%s: device refused migration data", md_id(md));
	atomic_fetch_add(&md->transferred, len + sizeof(struct vfm_rec_hdr));
	return 0;
}

static int vfio_load_finish(void *opaque, struct vfm_error *err)
{
	struct vfm_mig_device *md = opaque;
	int ret;

	/* RESUMING -> STOP: the device validates what it was given. The engine
	 * (dest.c) moves it on to RUNNING_P2P after the VM's loaded hook. */
	ret = vfm_device_set_state(md->dev, VFM_STATE_STOP, VFM_STATE_ERROR, err);
	if (ret)
		return vfm_error_set(err, ret, "%s: device rejected the loaded state", md_id(md));
	return 0;
}

static void vfio_load_cleanup(void *opaque, bool succeeded)
{
	/* A refused load's devices are put back by the engine
	 * (vfm__vfio_load_recover(), from dest.c), loaded or not. */
	(void)opaque;
	(void)succeeded;
}

/*
 * After a refused incoming migration, put the device where RESUMING can be
 * entered again. QEMU's destination exits on a failed load
 * (migration/migration.c process_incoming_migration_co()); a vfiomig VM stays
 * up for the next attempt, and its guest has not started, so the device goes
 * back to RUNNING as the VM opened it. The uAPI arcs (include/uapi/linux/
 * vfio.h, enum vfio_device_mig_state): RESUMING -> STOP is a valid arc (it
 * also ends the data session), STOP -> RUNNING too; "ERROR ... the device
 * must be reset" (VFIO_DEVICE_RESET) to leave ERROR. A reset alone is not
 * enough: the kernel's returns to RUNNING, libvfio-user's keeps the migration
 * state (lib/libvfio-user.c device_reset() at efd091b, docs/interop.md), so a
 * device reset in RESUMING stayed there and the next attempt failed. Last, a
 * device that took the partial stream as a state at RESUMING -> STOP is reset
 * from RUNNING so no half state survives (every backend accepts a reset in
 * RUNNING; libvfio-user refuses it in STOP). The device layer's set_state
 * resets a device whose arc fails and reads the state back (lib/device.c).
 */
void vfm__vfio_load_recover(struct vfm_mig_device *md)
{
	enum vfm_state from = vfm_device_state(md->dev), now;
	struct vfm_error err = { 0 };
	char how[160] = "";
	size_t n = 0;
	int ret = 0;

	if (from == VFM_STATE_RUNNING)
		return;
	if (from == VFM_STATE_ERROR) {
		ret = vfm_device_reset(md->dev, &err);
		n += (size_t)snprintf(how + n, sizeof(how) - n, "reset");
	} else {
		if (from == VFM_STATE_RESUMING) {
			ret = vfm_device_set_state(md->dev, VFM_STATE_STOP, VFM_STATE_ERROR, &err);
			n += (size_t)snprintf(how + n, sizeof(how) - n, "%s", ret ?
					      "RESUMING -> STOP refused, so reset;" : "RESUMING -> STOP");
			vfm_error_clear(&err);
		}
		if (vfm_device_state(md->dev) == VFM_STATE_ERROR) {
			ret = vfm_device_reset(md->dev, &err);
			if (n < sizeof(how))
				n += (size_t)snprintf(how + n, sizeof(how) - n, "%sreset;",
						      n ? " in ERROR, " : "");
		} else
			ret = vfm_device_set_state(md->dev, VFM_STATE_RUNNING, VFM_STATE_ERROR, &err);
		if (!ret && n < sizeof(how))
			n += (size_t)snprintf(how + n, sizeof(how) - n, "%s-> RUNNING",
					      n ? " " : "");
		/* Whatever it loaded must not stay: reset from RUNNING. */
		if (!ret && (ret = vfm_device_reset(md->dev, &err)) == 0 && n < sizeof(how))
			snprintf(how + n, sizeof(how) - n, "; reset");
	}
	if (!ret && !vfm_device_query_state(md->dev, &now, &err) && now == VFM_STATE_RUNNING) {
		vfm_warn(md_id(md), "incoming migration refused: device was in %s; %s: "
			 "RUNNING, ready for the next attempt", vfm_state_name(from), how);
		return;
	}
	vfm_err(md_id(md), "incoming migration refused: device was in %s; %s: now %s%s%s "
		"(the next incoming attempt may fail to enter RESUMING)", vfm_state_name(from),
		how[0] ? how : "no step", vfm_state_name(vfm_device_state(md->dev)),
		err.msg[0] ? ": " : "", err.msg);
}

const struct vfm_savable_ops vfm__vfio_savable_ops = {
	.save_setup = vfio_save_setup,
	.is_active_iterate = vfio_is_active_iterate,
	.save_iterate = vfio_save_iterate,
	.pending_estimate = vfio_pending_estimate,
	.pending_exact = vfio_pending_exact,
	.switchover_ack_needed = vfio_switchover_ack_needed,
	.save_complete = vfio_save_complete,
	.save_state = vfio_save_state,
	.save_cleanup = vfio_save_cleanup,
	.load_setup = vfio_load_setup,
	.load_state = vfio_load_state,
	.load_finish = vfio_load_finish,
	.load_cleanup = vfio_load_cleanup,
};

/* ---- Dirty tracking of device DMA ---- */

#define WHY_MAX (VFM_ERROR_MSG_MAX + 32)   /* a prefix and an error message */

/*
 * Whether a report works, asked once at start over the first region (its
 * bits are dropped: the first pass sends all memory anyway). A probe is not
 * enough: Debian's 6.12 (no CONFIG_IOMMUFD_DRIVER) accepts
 * DMA_LOGGING_START yet answers every REPORT with EOPNOTSUPP
 * (include/linux/iova_bitmap.h stubs), so logging must be seen to report.
 */
static int trial_report(struct vfm_migration *m, struct vfm_mig_device *md, bool iommu,
			uint64_t pgsize, struct vfm_error *e)
{
	const struct vfm_mem_region *r = vfm_guest_mem_region(m->mem, 0);
	uint64_t *bits = calloc(VFM_BITMAP_WORDS(r->size / pgsize), sizeof(uint64_t));
	int ret;

	if (!bits)
		return vfm_error_set(e, -ENOMEM, "no memory for a dirty bitmap");
	ret = iommu ? vfm_vfio_iommu_dirty_report(md->dev, r->gpa, r->size, pgsize, bits, e)
		    : vfm_device_log_report(md->dev, r->gpa, r->size, pgsize, bits, e);
	free(bits);
	return ret;
}

/* Device DMA logging: started, and a report works. */
static bool start_device_log(struct vfm_migration *m, struct vfm_mig_device *md,
			     const struct vfm_iova_range *ranges, unsigned n, char *why, size_t len)
{
	uint64_t pgsize = vfm_guest_mem_page_size(m->mem);
	struct vfm_error e = { 0 };

	if (!md->props.device_dirty_page_tracking) {
		snprintf(why, len, "device-dirty-page-tracking=off");
		return false;
	}
	if (!vfm_device_has_dma_logging(md->dev)) {
		snprintf(why, len, "the device has no DMA logging");
		return false;
	}
	if (vfm_device_log_start(md->dev, ranges, n, &pgsize, &e)) {
		snprintf(why, len, "DMA logging start: %s", e.msg);
		return false;
	}
	/* Kernel devices only: the kernel's iova_bitmap is what may be missing. A
	 * vfio-user report failing later still costs only that sync (all dirty). */
	if (vfm_device_is_vfio(md->dev) &&
	    trial_report(m, md, false, vfm_guest_mem_page_size(m->mem), &e)) {
		snprintf(why, len, "DMA logging report: %s", e.msg);
		vfm_device_log_stop(md->dev, NULL);
		return false;
	}
	return true;
}

/* The IOMMU's tracking (type1 VFIO_IOMMU_DIRTY_PAGES, iommufd dirty HWPT). */
static bool start_iommu_dirty(struct vfm_migration *m, struct vfm_mig_device *md, char *why,
			      size_t len)
{
	struct vfm_error e = { 0 };

	if (!vfm_device_is_vfio(md->dev) || !vfm_vfio_iommu_dirty_supported(md->dev)) {
		snprintf(why, len, "the IOMMU cannot track dirty pages");
		return false;
	}
	if (vfm_vfio_iommu_dirty_start(md->dev, &e)) {
		snprintf(why, len, "%s", e.msg);
		return false;
	}
	if (trial_report(m, md, true, vfm_guest_mem_page_size(m->mem), &e)) {
		snprintf(why, len, "IOMMU dirty report: %s", e.msg);
		vfm_vfio_iommu_dirty_stop(md->dev, NULL);
		return false;
	}
	return true;
}

/*
 * As QEMU (hw/vfio/migration.c vfio_migration_realize, container dirty
 * tracking in hw/vfio/common.c): the device's own DMA logging, else the
 * IOMMU's tracking (kernel devices), else every sync marks all memory dirty.
 * With enable-migration=auto a kernel device that nothing can track is
 * refused ("VFIO device doesn't support device and IOMMU dirty tracking"):
 * pre-copy would never converge.
 */
int vfm__dirty_tracking_start(struct vfm_migration *m, struct vfm_error *err)
{
	struct vfm_iova_range ranges[VFM_MEM_MAX_REGIONS];
	unsigned n = m->mem ? vfm_guest_mem_num_regions(m->mem) : 0;

	for (unsigned i = 0; i < n; i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(m->mem, i);
		ranges[i].iova = r->gpa;
		ranges[i].length = r->size;
	}
	for (unsigned d = 0; d < m->ndevs; d++) {
		struct vfm_mig_device *md = m->devs[d];
		char dev_why[WHY_MAX] = "", io_why[WHY_MAX] = "";

		md->dma_logging = md->iommu_dirty = false;
		if (!n)
			continue;
		md->dma_logging = start_device_log(m, md, ranges, n, dev_why, sizeof(dev_why));
		if (md->dma_logging) {
			vfm_info(md_id(md), "dirty tracking: device DMA logging");
			continue;
		}
		md->iommu_dirty = start_iommu_dirty(m, md, io_why, sizeof(io_why));
		if (md->iommu_dirty) {
			vfm_info(md_id(md), "dirty tracking: IOMMU (%s; %s)",
				 vfm_vfio_iommu_name(md->dev), dev_why);
			continue;
		}
		if (vfm_device_is_vfio(md->dev) && md->props.enable_migration == VFM_AUTO) {
			vfm__dirty_tracking_stop(m);
			return vfm_error_set(err, -ENOTSUP, "%s: nothing tracks its DMA, refused "
					     "with enable-migration=auto (=on: all memory dirty at "
					     "each sync); device: %s; IOMMU: %s", md_id(md), dev_why,
					     io_why);
		}
		vfm_info(md_id(md), "no dirty tracking (%s; %s): all memory counts as dirty at "
			 "each sync", dev_why, io_why);
	}
	return 0;
}

void vfm__dirty_tracking_stop(struct vfm_migration *m)
{
	for (unsigned d = 0; d < m->ndevs; d++) {
		struct vfm_mig_device *md = m->devs[d];
		if (md->dma_logging && vfm_device_log_stop(md->dev, NULL))
			vfm_warn(md_id(md), "DMA logging stop failed");
		if (md->iommu_dirty && vfm_vfio_iommu_dirty_stop(md->dev, NULL))
			vfm_warn(md_id(md), "IOMMU dirty tracking stop failed");
		md->dma_logging = md->iommu_dirty = false;
	}
}

/* One device's DMA log (or its IOMMU's) into guest memory; false when it is lost. */
static bool sync_device_log(struct vfm_migration *m, struct vfm_mig_device *md)
{
	uint64_t pgsize = vfm_guest_mem_page_size(m->mem);

	for (unsigned i = 0; i < vfm_guest_mem_num_regions(m->mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(m->mem, i);
		size_t words = VFM_BITMAP_WORDS(r->npages);
		uint64_t *bits = calloc(words, sizeof(uint64_t));
		struct vfm_error e = { 0 };
		int ret;

		if (!bits)
			return false;
		ret = md->iommu_dirty
			      ? vfm_vfio_iommu_dirty_report(md->dev, r->gpa, r->size, pgsize, bits, &e)
			      : vfm_device_log_report(md->dev, r->gpa, r->size, pgsize, bits, &e);
		if (!ret)
			vfm_dirty_merge(m->mem, r->gpa, r->size, pgsize, bits, NULL);
		free(bits);
		if (ret) {
			vfm_warn(md_id(md), "dirty report failed (%s): all memory dirty", e.msg);
			return false;
		}
	}
	return true;
}

/*
 * What a vfio-user server wrote with DMA_WRITE messages (windows without an
 * fd): the client logs those itself, the server's DMA logging never sees them.
 */
static void sync_client_log(struct vfm_migration *m, struct vfm_mig_device *md)
{
	uint64_t pgsize = vfm_guest_mem_page_size(m->mem);

	if (!vfm_device_is_vfio_user(md->dev))
		return;
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(m->mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(m->mem, i);
		uint64_t *bits = calloc(VFM_BITMAP_WORDS(r->npages), sizeof(uint64_t));

		if (!bits) {
			/* Cannot look: everything may be dirty. */
			vfm_dirty_mark(m->mem, r->gpa, r->size);
			continue;
		}
		if (vfm_vfio_user_dirty_collect(md->dev, r->gpa, r->size, pgsize, bits, NULL) > 0)
			vfm_dirty_merge(m->mem, r->gpa, r->size, pgsize, bits, NULL);
		free(bits);
	}
}

void vfm__log_sync(struct vfm_migration *m, bool in_precopy)
{
	bool all_dirty = false;

	if (!m->mem)
		return;
	if (m->vm && m->vm->log_sync)
		m->vm->log_sync(m->vm_opaque);   /* the vCPUs' writes (KVM's dirty log) */
	for (unsigned d = 0; d < m->ndevs; d++) {
		struct vfm_mig_device *md = m->devs[d];

		/* Opt-out: nothing synced in pre-copy; everything at stop-and-copy. */
		if (in_precopy && (!md->props.pre_copy_dirty_page_tracking ||
				   !m->params.pre_copy_dirty_page_tracking))
			continue;
		sync_client_log(m, md);
		if ((md->dma_logging || md->iommu_dirty) && sync_device_log(m, md))
			continue;
		all_dirty = true;  /* cannot track its DMA: QEMU's fallback */
	}
	if (all_dirty)
		vfm_dirty_mark_all(m->mem);
	if (m->ram)
		vfm__ram_sync(m->ram);
}
