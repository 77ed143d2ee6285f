/*
 * The destination engine: accept one migration, load every section, then
 * commit with the source (LOADED, wait for GO), bring devices to RUNNING
 * (all to RUNNING_P2P first) and start the guest. It never runs a guest whose
 * state did not load completely.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migration/channel.h"
#include "migration/engine.h"
#include "migration/multifd.h"
#include "util/logging.h"

#define LOG "incoming"
#define ACCEPT_SLICE_MS 200   /* how soon a cancel ends the wait for a source */

struct dest {
	struct vfm_migration *m;
	struct vfm_migration_params p;
	struct vfm_stream *in;
	struct vfm_stream *rp;        /* NULL without a return path */
	struct vfm_listener *l;       /* multifd channels connect here too */
	int fd;
	struct vfm_mf_dst *mf;
	struct vfm_savable *by_section[256];
	bool saw_eos;
};

static struct vfm_savable *lookup(struct dest *d, uint32_t section, struct vfm_error *err)
{
	struct vfm_savable *sv = section < 256 ? d->by_section[section] : NULL;

	if (!sv)
		vfm_error_set(err, VFM_ESTREAM, "record for unannounced section %u", section);
	return sv;
}

static int on_section(struct dest *d, const struct vfm_rec_hdr *h, const unsigned char *pl,
		      struct vfm_error *err)
{
	struct vfm_migration *m = d->m;
	char name[VFM_SAVABLE_NAME_MAX];
	uint32_t section, version;
	size_t nl;

	if (h->length < 9 || h->length - 8 >= sizeof(name))
		return vfm_error_set(err, VFM_ESTREAM, "bad section record (%u bytes)", h->length);
	section = vfm_get_le32(pl);
	version = vfm_get_le32(pl + 4);
	nl = h->length - 8;
	memcpy(name, pl + 8, nl);
	name[nl] = '\0';
	if (section != h->section || section >= 256 || d->by_section[section])
		return vfm_error_set(err, VFM_ESTREAM, "bad or duplicate section id %u", section);
	for (unsigned i = 0; i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];
		int ret;

		if (strcmp(sv->name, name))
			continue;
		if (sv->loaded_setup)
			return vfm_error_set(err, VFM_ESTREAM, "section '%s' announced twice", name);
		if (sv->ops->load_setup && (ret = sv->ops->load_setup(sv->opaque, version, err)))
			return vfm_error_set(err, ret, "setting up '%s'", name);
		sv->loaded_setup = true;
		d->by_section[section] = sv;
		return 0;
	}
	return vfm_error_set(err, VFM_ESTREAM, "the source sends '%s', which this VM does not have "
			     "(start the destination with the same devices)", name);
}

static void send_rp_flags(struct dest *d, uint16_t type, uint16_t flags, uint32_t section,
			  const void *pl, size_t len)
{
	if (!d->rp)
		return;
	vfm_stream_put_record(d->rp, type, flags, section, pl, len);
	vfm_stream_flush(d->rp);
}

static void send_rp(struct dest *d, uint16_t type, uint32_t section, const void *pl, size_t len)
{
	send_rp_flags(d, type, 0, section, pl, len);
}

static int load_records(struct dest *d, struct vfm_error *err)
{
	struct vfm_rec_hdr h;
	const void *pl;
	int ret;

	while (!d->saw_eos) {
		ret = vfm_stream_get_record(d->in, &h, &pl, VFM_STREAM_MAX_RECORD, err);
		if (ret)
			return ret;
		switch (h.type) {
		case VFM_REC_SECTION:
			ret = on_section(d, &h, pl, err);
			break;
		case VFM_REC_DATA:
		case VFM_REC_CONFIG: {
			struct vfm_savable *sv = lookup(d, h.section, err);
			if (!sv)
				return VFM_ESTREAM;
			if (!sv->ops->load_state)
				return vfm_error_set(err, VFM_ESTREAM, "'%s' takes no data", sv->name);
			ret = sv->ops->load_state(sv->opaque, h.type, h.flags, pl, h.length, err);
			if (ret)
				vfm_error_set(err, ret, "loading '%s'", sv->name);
			break;
		}
		case VFM_REC_INIT_DATA_SENT:
			/* Loaded synchronously above, so it is in the device: ack now. */
			if (!lookup(d, h.section, err))
				return VFM_ESTREAM;
			send_rp(d, VFM_REC_RP_ACK, h.section, NULL, 0);
			break;
		case VFM_REC_PING: {
			unsigned char pong[16 + 12 * VFM_MAX_SAVABLES];
			size_t plen = 16;
			bool two = h.flags & VFM_PING_TWO_QUERIES;
			/* u64 token; a drain PING adds the RAM packets sent on
			 * each multifd channel: answered once they are applied
			 * too, so the channels' backlog (zero runs of a first
			 * pass are checked page by page here) does not load
			 * inside the downtime. */
			if (h.length < 8 || (h.length > 8 && (h.length < 12 || h.length % 4)))
				return vfm_error_set(err, VFM_ESTREAM, "bad ping");
			if (h.length > 8)
				vfm__mf_dst_wait_ram(d->mf, (const unsigned char *)pl + 8, h.length - 8);
			memcpy(pong, pl, 8);
			/*
			 * Then, per device section: u32 section, u32 ns of one
			 * state query to this side's device, timed now, and
			 * when the PING asks (VFM_PING_TWO_QUERIES) u32 ns of a
			 * second one right after it. The source counts this
			 * side's load end (its data write, config writes and
			 * arcs) in these: the first as a request to a device
			 * woken from idle (its own device's queries were 0.02 ms
			 * where this side's requests after the end of stream
			 * took 0.05-0.06), the second as each next request
			 * (the device sleeps between them, or not, as now).
			 */
			for (unsigned i = 0; i < d->m->nsv; i++) {
				struct vfm_savable *sv = &d->m->sv[i];
				uint64_t ns, ns2 = 0;

				if (sv->ops != &vfm__vfio_savable_ops || !sv->loaded_setup ||
				    !(ns = vfm__vfio_round_trip_ns(sv->opaque)))
					continue;
				if (two && !(ns2 = vfm__vfio_round_trip_ns(sv->opaque)))
					continue;
				vfm_put_le32(pong + plen, sv->section);
				vfm_put_le32(pong + plen + 4, ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns);
				plen += 8;
				if (two) {
					vfm_put_le32(pong + plen, ns2 > UINT32_MAX ? UINT32_MAX
										  : (uint32_t)ns2);
					plen += 4;
				}
			}
			vfm_put_le64(pong + 8, vfm__now_ns());
			send_rp_flags(d, VFM_REC_RP_PONG, two ? VFM_PING_TWO_QUERIES : 0, 0, pong, plen);
			break;
		}
		case VFM_REC_SWITCHOVER:
			vfm__mig_set_status(d->m, VFM_MIG_DEVICE);
			vfm__mf_dst_switchover(d->mf);
			break;
		case VFM_REC_MF_CHANNELS:
			ret = vfm__mf_dst_open(d->m, d->rp ? d->l : NULL, d->fd, &d->p, pl, h.length,
					       &d->mf, err);
			break;
		case VFM_REC_SECTION_END:
			if (!lookup(d, h.section, err))
				return VFM_ESTREAM;
			break;
		case VFM_REC_EOS:
			d->saw_eos = true;
			ret = vfm__mf_dst_check(d->mf, err);
			break;
		case VFM_REC_PAD:
			break;  /* the source's bandwidth probe or keepalive */
		default:
			return vfm_error_set(err, VFM_ESTREAM, "unexpected record type %u", h.type);
		}
		if (ret)
			return ret;
		if (d->rp && vfm_stream_error(d->rp, err))
			return vfm_error_set(err, err ? err->code : -EIO, "return path");
	}
	return 0;
}

static int finish_load(struct dest *d, struct vfm_error *err)
{
	struct vfm_migration *m = d->m;
	struct vfm_rec_hdr h;
	const void *pl;
	int ret;

	/*
	 * Every multifd buffer is in its device (checked at EOS): the channel
	 * and load threads stop, and the caller joins them once the guest
	 * runs. Joining them here put a thread switch per channel and device
	 * inside the downtime.
	 */
	vfm__mf_dst_stop(d->mf);
	for (unsigned i = 0; i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];

		if (!sv->loaded_setup)
			return vfm_error_set(err, VFM_ESTREAM, "the stream has no state for '%s'",
					     sv->name);
		if (sv->ops->load_finish && (ret = sv->ops->load_finish(sv->opaque, err)))
			return ret;
	}
	/* Devices are in STOP with their state accepted: the VM may look now. */
	if (m->vm && m->vm->loaded)
		m->vm->loaded(m->vm_opaque);
	for (unsigned i = 0; i < m->ndevs; i++) {
		struct vfm_device *dev = m->devs[i]->dev;

		/* All to RUNNING_P2P before any runs: none may DMA into a peer
		 * that is not ready (QEMU's prepare step). */
		if (!(m->devs[i]->flags & VFM_MIG_P2P) ||
		    vfm_device_state(dev) == VFM_STATE_RUNNING_P2P)
			continue;
		ret = vfm_device_set_state(dev, VFM_STATE_RUNNING_P2P, VFM_STATE_ERROR, err);
		if (ret)
			return vfm_error_set(err, ret, "%s: to RUNNING_P2P", vfm_device_id(dev));
	}
	if (d->rp) {
		send_rp(d, VFM_REC_RP_LOADED, 0, NULL, 0);
		if (vfm_stream_error(d->rp, err))
			return vfm_error_set(err, err ? err->code : -EIO, "return path");
		/* Run nothing until the source commits. */
		ret = vfm_stream_get_record(d->in, &h, &pl, 0, err);
		if (ret)
			return vfm_error_set(err, ret, "waiting for the source to commit");
		if (h.type != VFM_REC_GO)
			return vfm_error_set(err, VFM_ESTREAM, "expected GO, got record %u", h.type);
	}
	for (unsigned i = 0; i < m->ndevs; i++) {
		struct vfm_device *dev = m->devs[i]->dev;
		ret = vfm_device_set_state(dev, VFM_STATE_RUNNING, VFM_STATE_ERROR, err);
		if (ret)
			return vfm_error_set(err, ret, "%s: to RUNNING", vfm_device_id(dev));
	}
	if (m->vm && m->vm->start && (ret = m->vm->start(m->vm_opaque)))
		return vfm_error_set(err, ret, "starting the guest");
	{
		unsigned char msg[8 + 36];
		char boot[37];

		vfm_put_le64(msg, vfm__now_ns());
		vfm__boot_id(boot);
		memset(msg + 8, 0, 36);
		memcpy(msg + 8, boot, strlen(boot));
		send_rp(d, VFM_REC_RP_RESUMED, 0, msg, sizeof(msg));
	}
	return 0;
}

/*
 * Waits for the main connection in short slices so that a cancel (the VM
 * quitting) ends the wait; the accepted fd is published for cancel to cut.
 */
static int accept_main(struct vfm_migration *m, struct vfm_listener *l, int *fd,
		       struct vfm_error *err)
{
	int ret;

	do {
		if (atomic_load(&m->in_cancel))
			return vfm_error_set(err, VFM_ECANCELED, "incoming migration cancelled");
		ret = vfm_accept(l, ACCEPT_SLICE_MS, fd, err);
		if (ret == -ETIMEDOUT)
			vfm_error_clear(err);   /* a slice ended: not an error */
	} while (ret == -ETIMEDOUT);
	if (ret)
		return ret;
	pthread_mutex_lock(&m->lock);
	if (atomic_load(&m->in_cancel)) {
		pthread_mutex_unlock(&m->lock);
		close(*fd);
		*fd = -1;
		return vfm_error_set(err, VFM_ECANCELED, "incoming migration cancelled");
	}
	atomic_store(&m->sock_fd, *fd);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

int vfm_migration_incoming(struct vfm_migration *m, const char *uri,
			   const struct vfm_migration_params *params,
			   void (*ready)(void *opaque, const char *uri), void *ready_opaque,
			   struct vfm_error *err)
{
	struct vfm_listener *l = NULL;
	struct dest d = { .m = m };
	struct vfm_uri u;
	char ubuf[600];
	uint64_t t0;
	int fd = -1, ret;

	if (params)
		d.p = *params;
	else
		vfm_migration_params_default(&d.p);
	if (atomic_load(&m->in_cancel))
		return vfm_error_set(err, VFM_ECANCELED, "incoming migration cancelled");
	ret = vfm_uri_parse(uri, &u, err);
	if (ret)
		return ret;
	/* Memory first: better to fail now than to SIGBUS half way through.
	 * What reads zero before it is populated needs no work for zero runs. */
	vfm__ram_dst_learn_holes(m->ram);
	ret = vfm_guest_mem_prealloc(m->mem, err);
	if (ret)
		return ret;
	ret = vfm_listen_mig(&u, &d.p, &m->in_cancel, &l, err);
	if (ret)
		return ret;
	if (ready)
		ready(ready_opaque, vfm_uri_str(&u, ubuf, sizeof(ubuf)));
	ret = accept_main(m, l, &fd, err);
	if (ret)
		goto out;
	t0 = vfm__now_ns();
	d.l = l;
	d.fd = fd;
	vfm__mig_set_status(m, VFM_MIG_ACTIVE);
	ret = vfm_stream_open(fd, (int)d.p.timeout_ms, &d.in, err);
	if (!ret && vfm_uri_has_return_path(&u))
		ret = vfm_stream_open(fd, (int)d.p.timeout_ms, &d.rp, err);
	if (!ret)
		ret = vfm_stream_read_header(d.in, err);
	if (!ret)
		ret = load_records(&d, err);
	if (!ret)
		ret = finish_load(&d, err);
	if (ret && d.mf) {
		/* A channel or load thread failing cuts main short: its reason is the one. */
		struct vfm_error why = { 0 };
		int r2 = vfm__mf_dst_error(d.mf, &why);

		if (r2) {
			ret = r2;
			if (err)
				*err = why;
		}
	}
	vfm__mf_dst_close(d.mf);
	d.mf = NULL;
	if (ret && ret != VFM_ECANCELED && atomic_load(&m->in_cancel)) {
		/* The cut connection is the symptom; say what happened. */
		struct vfm_error why = { 0 };

		vfm_error_set(&why, VFM_ECANCELED, "incoming migration cancelled (%s)",
			      err ? err->msg : "");
		ret = VFM_ECANCELED;
		if (err)
			*err = why;
	}
	if (ret && d.rp) {
		/* Tell the source why, so it can roll back with a clear message. */
		unsigned char msg[4 + VFM_ERROR_MSG_MAX];
		size_t n = err ? strlen(err->msg) : 0;
		vfm_put_le32(msg, (uint32_t)ret);
		if (n)
			memcpy(msg + 4, err->msg, n);
		send_rp(&d, VFM_REC_RP_ERROR, 0, msg, 4 + n);
	}
	for (unsigned i = 0; i < m->nsv; i++) {
		struct vfm_savable *sv = &m->sv[i];
		if (sv->loaded_setup && sv->ops->load_cleanup)
			sv->ops->load_cleanup(sv->opaque, ret == 0);
		sv->loaded_setup = false;
	}
	/* Refused: this VM stays up for the next attempt, so every device goes
	 * back where RESUMING can be entered again (vfio.c). */
	for (unsigned i = 0; ret && i < m->ndevs; i++)
		vfm__vfio_load_recover(m->devs[i]);
	pthread_mutex_lock(&m->lock);
	m->stats.total_time_ms = (vfm__now_ns() - t0) / 1000000ull;
	m->stats.transferred_bytes = d.in ? vfm_stream_bytes(d.in) : 0;
	m->stats.ram_transferred_bytes = vfm__ram_transferred(m->ram);
	m->stats.multifd_ram_bytes = vfm__ram_mf_transferred(m->ram);
	pthread_mutex_unlock(&m->lock);
	if (ret) {
		vfm__mig_set_error(m, err);
		vfm__mig_set_status(m, VFM_MIG_FAILED);
	} else {
		vfm__mig_set_status(m, VFM_MIG_COMPLETED);
	}
	vfm_stream_free(d.rp);
	vfm_stream_free(d.in);
out:
	pthread_mutex_lock(&m->lock);
	atomic_store(&m->sock_fd, -1);   /* before close: cancel never hits a reused fd */
	pthread_mutex_unlock(&m->lock);
	vfm_channel_close(fd, &d.p);   /* under TLS: after the relay sent the last records */
	vfm_listener_close(l);
	return ret;
}

void vfm_migration_incoming_cancel(struct vfm_migration *m)
{
	int fd;

	pthread_mutex_lock(&m->lock);
	atomic_store(&m->in_cancel, true);
	fd = atomic_load(&m->sock_fd);
	if (fd >= 0)
		shutdown(fd, SHUT_RDWR);   /* every read and write on main fails now */
	pthread_mutex_unlock(&m->lock);
}
