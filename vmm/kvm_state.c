/*
 * KVM vCPU state as a blob and as a savable entry: per vCPU, tagged items
 * (registers, sregs, XSAVE or FPU, XCRs, MSRs, events, debug registers),
 * loaded in the order QEMU puts them back.
 *
 * Blob (little-endian, the x86 host order): "VFKVCPU1", u32 version, u32
 * nvcpus, u64 tsc_khz; per vCPU: u32 index, u32 item count, then items of
 * u32 tag, u32 length, payload padded to 8 bytes.
 *
 * The guest's TSC (MSR 0x10) keeps time across a migration: ITEM_CLOCK is
 * the CLOCK_REALTIME at which the source read the MSRs, and the loader
 * advances the TSC by the time since (at this host's TSC rate), as the
 * migration procedure of KVM_VCPU_TSC_OFFSET does (the kernel's
 * Documentation/virt/kvm/devices/vcpu.rst: "ofs_dst[i] = ofs_src[i] -
 * (guest_src - guest_dest) * freq + ..."). Restored as saved, the clock
 * stood still for the downtime and the guest's timers (its heartbeat) came
 * up to one period late after the resume; QEMU 7.2 restores the raw TSC as
 * saved. Across hosts this relies on synchronised wall clocks, as KVM's
 * procedure does; a clock behind the source's advances nothing.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "kvm_int.h"
#include "migration/engine.h"
#include "util/logging.h"

#define BLOB_MAGIC "VFKVCPU1"
#define BLOB_VERSION 1u

enum item_tag {
	ITEM_REGS = 1, ITEM_SREGS, ITEM_XSAVE, ITEM_FPU, ITEM_XCRS, ITEM_MSRS, ITEM_EVENTS,
	ITEM_DEBUGREGS, ITEM_CLOCK, ITEM_MAX
};

#define MSR_IA32_TSC 0x10
#define TSC_ADVANCE_MAX_NS (3600ull * 1000000000ull)   /* a clock jump, not a downtime */

static uint64_t realtime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* struct kvm_msrs with room for 16 entries in its flexible entries[] (ISO C
 * allows no field after a struct with a flexible member: a union of bytes). */
union msrs_buf {
	struct kvm_msrs hdr;
	unsigned char raw[sizeof(struct kvm_msrs) + 16 * sizeof(struct kvm_msr_entry)];
};

struct buf {
	unsigned char *p;
	size_t len, cap;
	int err;
};

static bool reserve(struct buf *b, size_t n)
{
	if (b->err)
		return false;
	if (b->len + n > b->cap) {
		size_t cap = (b->cap ? b->cap * 2 : 16384) + n;
		unsigned char *p = realloc(b->p, cap);

		if (!p) {
			b->err = -ENOMEM;
			return false;
		}
		b->p = p;
		b->cap = cap;
	}
	return true;
}

/* Payloads are padded to 8 bytes; u32s go in pairs, so alignment holds. */
static void put(struct buf *b, const void *data, size_t len)
{
	size_t pad = (8 - len % 8) % 8;

	if (!reserve(b, len + pad))
		return;
	memcpy(b->p + b->len, data, len);
	memset(b->p + b->len + len, 0, pad);
	b->len += len + pad;
}

static void put_u32(struct buf *b, uint32_t v)
{
	if (!reserve(b, 4))
		return;
	memcpy(b->p + b->len, &v, 4);
	b->len += 4;
}

static void put_item(struct buf *b, uint32_t tag, const void *data, size_t len)
{
	put_u32(b, tag);
	put_u32(b, (uint32_t)len);
	put(b, data, len);
}

static int save_one(struct kvm_guest *k, struct kvm_vcpu *v, struct buf *b, void *xsave,
		    struct vfm_error *err)
{
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_xcrs xcrs;
	struct kvm_vcpu_events ev;
	struct kvm_debugregs dr;
	struct kvm_fpu fpu;
	union msrs_buf msrs;
	uint64_t clock_ns;
	unsigned n = 2;

#define GET(req, arg, what)                                                            \
	do {                                                                           \
		if (ioctl(v->fd, req, arg) < 0)                                        \
			return vfm_error_set(err, -errno, "vCPU %u: " what ": %s", v->idx, \
					     strerror(errno));                         \
	} while (0)

	GET(KVM_GET_REGS, &regs, "KVM_GET_REGS");
	GET(KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	if (k->xsave_size) {
		GET(k->xsave_size > sizeof(struct kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE,
		    xsave, "KVM_GET_XSAVE");
	} else {
		GET(KVM_GET_FPU, &fpu, "KVM_GET_FPU");
	}
	n++;
	if (k->have_xcrs) {
		GET(KVM_GET_XCRS, &xcrs, "KVM_GET_XCRS");
		n++;
	}
	memset(&msrs, 0, sizeof(msrs));
	msrs.hdr.nmsrs = k->nmsrs;
	for (unsigned i = 0; i < k->nmsrs; i++)
		msrs.hdr.entries[i].index = k->msr_index[i];
	if (ioctl(v->fd, KVM_GET_MSRS, &msrs) != (int)k->nmsrs)
		return vfm_error_set(err, -EIO, "vCPU %u: KVM_GET_MSRS read fewer MSRs than listed",
				     v->idx);
	clock_ns = realtime_ns();
	n += 2;
	if (k->have_events) {
		GET(KVM_GET_VCPU_EVENTS, &ev, "KVM_GET_VCPU_EVENTS");
		n++;
	}
	if (k->have_debugregs) {
		GET(KVM_GET_DEBUGREGS, &dr, "KVM_GET_DEBUGREGS");
		n++;
	}
#undef GET
	put_u32(b, v->idx);
	put_u32(b, n);
	put_item(b, ITEM_REGS, &regs, sizeof(regs));
	put_item(b, ITEM_SREGS, &sregs, sizeof(sregs));
	if (k->xsave_size)
		put_item(b, ITEM_XSAVE, xsave, k->xsave_size);
	else
		put_item(b, ITEM_FPU, &fpu, sizeof(fpu));
	if (k->have_xcrs)
		put_item(b, ITEM_XCRS, &xcrs, sizeof(xcrs));
	put_item(b, ITEM_MSRS, &msrs, sizeof(msrs.hdr) + k->nmsrs * sizeof(msrs.hdr.entries[0]));
	if (k->have_events)
		put_item(b, ITEM_EVENTS, &ev, sizeof(ev));
	if (k->have_debugregs)
		put_item(b, ITEM_DEBUGREGS, &dr, sizeof(dr));
	put_item(b, ITEM_CLOCK, &clock_ns, sizeof(clock_ns));
	return 0;
}

/* State moves only between stopped vCPUs; a guest just created may still
 * be parking its threads, so wait for them (bounded). */
static bool all_parked(struct kvm_guest *k)
{
	uint64_t deadline = vfm__kvm_now_ns() + 5000000000ull;
	bool ok;

	pthread_mutex_lock(&k->lock);
	while (!k->run && k->parked < k->nvcpus && vfm__kvm_now_ns() < deadline) {
		struct timespec ts;

		vfm__kvm_deadline(&ts, 1000000000ull);
		pthread_cond_timedwait(&k->cond, &k->lock, &ts);
	}
	ok = !k->run && k->parked == k->nvcpus;
	pthread_mutex_unlock(&k->lock);
	return ok;
}

int vfm_guest_kvm_save_vcpus(struct vfm_guest *g, void **out, size_t *out_len,
			     struct vfm_error *err)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	struct buf b = { 0 };
	void *xsave = NULL;
	uint64_t khz = k->tsc_khz;
	int ret = 0;

	if (!all_parked(k))
		return vfm_error_set(err, -EBUSY, "kvm guest: vCPU state saved while running");
	if (k->xsave_size && !(xsave = calloc(1, k->xsave_size)))
		return vfm_error_set(err, -ENOMEM, "out of memory");
	put(&b, BLOB_MAGIC, 8);
	put_u32(&b, BLOB_VERSION);
	put_u32(&b, k->nvcpus);
	put(&b, &khz, sizeof(khz));
	for (unsigned i = 0; i < k->nvcpus && !ret; i++)
		ret = save_one(k, &k->vcpu[i], &b, xsave, err);
	free(xsave);
	if (!ret && b.err)
		ret = vfm_error_set(err, b.err, "out of memory");
	if (ret) {
		free(b.p);
		return ret;
	}
	*out = b.p;
	*out_len = b.len;
	return 0;
}

struct items {
	const unsigned char *p[ITEM_MAX];
	uint32_t len[ITEM_MAX];
};

static int parse_vcpu(const unsigned char **pp, const unsigned char *end, unsigned want_idx,
		      struct items *it, struct vfm_error *err)
{
	const unsigned char *p = *pp;
	uint32_t idx, n;

	memset(it, 0, sizeof(*it));
	if (end - p < 8)
		return vfm_error_set(err, VFM_ESTREAM, "vCPU state: truncated");
	memcpy(&idx, p, 4);
	memcpy(&n, p + 4, 4);
	p += 8;
	if (idx != want_idx || n >= 64)
		return vfm_error_set(err, VFM_ESTREAM, "vCPU state: vCPU %u out of order", idx);
	for (uint32_t i = 0; i < n; i++) {
		uint32_t tag, len;
		size_t padded;

		if (end - p < 8)
			return vfm_error_set(err, VFM_ESTREAM, "vCPU state: truncated item");
		memcpy(&tag, p, 4);
		memcpy(&len, p + 4, 4);
		p += 8;
		padded = (size_t)len + (8 - len % 8) % 8;
		if ((size_t)(end - p) < padded)
			return vfm_error_set(err, VFM_ESTREAM, "vCPU state: item %u overruns", tag);
		if (tag > 0 && tag < ITEM_MAX) {
			it->p[tag] = p;
			it->len[tag] = len;
		}   /* unknown items: a newer writer's extra, skipped */
		p += padded;
	}
	*pp = p;
	return 0;
}

static int need(const struct items *it, enum item_tag tag, size_t len, unsigned idx,
		struct vfm_error *err)
{
	if (!it->p[tag] || it->len[tag] != len)
		return vfm_error_set(err, VFM_ESTREAM, "vCPU %u state: item %d missing or %u "
				     "bytes, want %zu", idx, tag, it->len[tag], len);
	return 0;
}

/* Every item's shape, before anything is loaded into any vCPU. */
static int validate(const struct kvm_guest *k, const struct items *it, unsigned idx,
		    struct vfm_error *err)
{
	const struct kvm_msrs *m = (const void *)it->p[ITEM_MSRS];
	uint32_t nmsrs;
	int ret;

	if ((ret = need(it, ITEM_REGS, sizeof(struct kvm_regs), idx, err)) ||
	    (ret = need(it, ITEM_SREGS, sizeof(struct kvm_sregs), idx, err)))
		return ret;
	if (it->p[ITEM_XSAVE]) {
		if (!k->xsave_size)
			return vfm_error_set(err, -ENOTSUP, "vCPU %u: XSAVE state, host has none",
					     idx);
		if (it->len[ITEM_XSAVE] < sizeof(struct kvm_xsave))
			return vfm_error_set(err, VFM_ESTREAM, "vCPU %u: short XSAVE item", idx);
	} else if (!it->p[ITEM_FPU]) {
		return vfm_error_set(err, VFM_ESTREAM, "vCPU %u state: no FPU state", idx);
	} else if ((ret = need(it, ITEM_FPU, sizeof(struct kvm_fpu), idx, err))) {
		return ret;
	}
	if ((it->p[ITEM_XCRS] && (ret = need(it, ITEM_XCRS, sizeof(struct kvm_xcrs), idx, err))) ||
	    (it->p[ITEM_EVENTS] &&
	     (ret = need(it, ITEM_EVENTS, sizeof(struct kvm_vcpu_events), idx, err))) ||
	    (it->p[ITEM_DEBUGREGS] &&
	     (ret = need(it, ITEM_DEBUGREGS, sizeof(struct kvm_debugregs), idx, err))))
		return ret;
	if (!m || it->len[ITEM_MSRS] < sizeof(*m))
		return vfm_error_set(err, VFM_ESTREAM, "vCPU %u state: bad MSR item", idx);
	memcpy(&nmsrs, &m->nmsrs, sizeof(nmsrs));
	if (nmsrs > 16 || sizeof(*m) + nmsrs * sizeof(struct kvm_msr_entry) != it->len[ITEM_MSRS])
		return vfm_error_set(err, VFM_ESTREAM, "vCPU %u state: bad MSR count", idx);
	return 0;
}

static int load_one(struct kvm_guest *k, struct kvm_vcpu *v, const struct items *it,
		    struct vfm_error *err)
{
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	union msrs_buf msrs;
	int ret = 0;

#define SET(req, arg, what)                                                            \
	do {                                                                           \
		if (ioctl(v->fd, req, arg) < 0)                                        \
			return vfm_error_set(err, -errno, "vCPU %u: " what ": %s", v->idx, \
					     strerror(errno));                         \
	} while (0)

	memcpy(&regs, it->p[ITEM_REGS], sizeof(regs));
	memcpy(&sregs, it->p[ITEM_SREGS], sizeof(sregs));
	memset(&msrs, 0, sizeof(msrs));
	memcpy(&msrs, it->p[ITEM_MSRS], it->len[ITEM_MSRS]);
	if (it->p[ITEM_CLOCK] && it->len[ITEM_CLOCK] == 8) {
		uint64_t then, now = realtime_ns(), dt;

		memcpy(&then, it->p[ITEM_CLOCK], 8);
		dt = now > then && now - then < TSC_ADVANCE_MAX_NS ? now - then : 0;
		for (unsigned i = 0; i < msrs.hdr.nmsrs; i++)
			if (msrs.hdr.entries[i].index == MSR_IA32_TSC)
				msrs.hdr.entries[i].data += dt / 1000 * k->tsc_khz / 1000;
		if (v->idx == 0)
			atomic_store(&k->tsc_advance_ns, dt);
	}

	SET(KVM_SET_REGS, &regs, "KVM_SET_REGS");
	if (it->p[ITEM_XSAVE]) {
		/* KVM_SET_XSAVE takes the (larger) XSAVE2 buffer as well. */
		void *x = calloc(1, k->xsave_size > it->len[ITEM_XSAVE] ? k->xsave_size
								: it->len[ITEM_XSAVE]);
		if (!x)
			return vfm_error_set(err, -ENOMEM, "out of memory");
		memcpy(x, it->p[ITEM_XSAVE], it->len[ITEM_XSAVE]);
		if (ioctl(v->fd, KVM_SET_XSAVE, x) < 0)
			ret = vfm_error_set(err, -errno, "vCPU %u: KVM_SET_XSAVE: %s", v->idx,
					    strerror(errno));
		free(x);
		if (ret)
			return ret;
	} else {
		struct kvm_fpu fpu;
		memcpy(&fpu, it->p[ITEM_FPU], sizeof(fpu));
		SET(KVM_SET_FPU, &fpu, "KVM_SET_FPU");
	}
	if (it->p[ITEM_XCRS]) {
		struct kvm_xcrs xcrs;
		memcpy(&xcrs, it->p[ITEM_XCRS], sizeof(xcrs));
		SET(KVM_SET_XCRS, &xcrs, "KVM_SET_XCRS");
	}
	SET(KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	if (ioctl(v->fd, KVM_SET_MSRS, &msrs) != (int)msrs.hdr.nmsrs)
		return vfm_error_set(err, -EIO, "vCPU %u: KVM_SET_MSRS took fewer MSRs than given",
				     v->idx);
	if (it->p[ITEM_EVENTS]) {
		struct kvm_vcpu_events ev;
		memcpy(&ev, it->p[ITEM_EVENTS], sizeof(ev));
		SET(KVM_SET_VCPU_EVENTS, &ev, "KVM_SET_VCPU_EVENTS");
	}
	if (it->p[ITEM_DEBUGREGS]) {
		struct kvm_debugregs dr;
		memcpy(&dr, it->p[ITEM_DEBUGREGS], sizeof(dr));
		SET(KVM_SET_DEBUGREGS, &dr, "KVM_SET_DEBUGREGS");
	}
#undef SET
	v->rip = regs.rip;
	return 0;
}

int vfm_guest_kvm_load_vcpus(struct vfm_guest *g, const void *data, size_t len,
			     struct vfm_error *err)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	const unsigned char *p = data, *end = p + len;
	struct items it[VFM_KVM_MAX_VCPUS];
	uint32_t version, n;
	uint64_t khz;
	int ret;

	if (!all_parked(k))
		return vfm_error_set(err, -EBUSY, "kvm guest: vCPU state loaded while running");
	if (len < 24 || memcmp(p, BLOB_MAGIC, 8))
		return vfm_error_set(err, VFM_ESTREAM, "vCPU state: bad magic");
	memcpy(&version, p + 8, 4);
	memcpy(&n, p + 12, 4);
	memcpy(&khz, p + 16, 8);
	p += 24;
	if (version != BLOB_VERSION)
		return vfm_error_set(err, VFM_ESTREAM, "vCPU state: version %u", version);
	if (n != k->nvcpus)
		return vfm_error_set(err, -EINVAL, "vCPU state for %u vCPUs, this VM has %u", n,
				     k->nvcpus);
	/* All of it is checked before any vCPU changes. */
	for (unsigned i = 0; i < n; i++)
		if ((ret = parse_vcpu(&p, end, i, &it[i], err)) ||
		    (ret = validate(k, &it[i], i, err)))
			return ret;
	for (unsigned i = 0; i < n; i++)
		if ((ret = load_one(k, &k->vcpu[i], &it[i], err)))
			return ret;
	/* The TSC travelled in the MSRs; pacing needs this host's rate. */
	if (khz != k->tsc_khz)
		vfm_info("kvm", "TSC rate %" PRIu64 " kHz here, %" PRIu64 " kHz at the source",
			 k->tsc_khz, khz);
	if (k->mb->magic == KG_MAGIC) {
		k->written_base = vfm__kvm_written(k);
		k->dma_base = vfm__kvm_dev_ops(k);
		k->mb->tsc_khz = k->tsc_khz;
		vfm__kvm_mark(k, &k->mb->tsc_khz, sizeof(k->mb->tsc_khz));
	}
	pthread_mutex_lock(&k->lock);
	k->state_ready = true;
	pthread_mutex_unlock(&k->lock);
	return 0;
}

/* ---- The savable entry ---- */

struct kvm_savable {
	struct kvm_savable *next;      /* the guest's registrations, freed with it */
	struct vfm_guest *g;
	struct vfm_migration *m;
	char name[VFM_SAVABLE_NAME_MAX];
	bool loaded;
};

/*
 * The section number the engine gave this entry. The public API has no
 * getter yet; the VMM links the library statically, so it reads the
 * registry (lib/migration/engine.h) by name.
 */
static uint32_t section_of(const struct kvm_savable *s)
{
	for (unsigned i = 0; i < s->m->nsv; i++)
		if (!strcmp(s->m->sv[i].name, s->name))
			return s->m->sv[i].section;
	return 0;
}

static int sv_save_state(void *opaque, struct vfm_stream *st, struct vfm_error *err)
{
	struct kvm_savable *s = opaque;
	size_t len;
	void *buf;
	int ret;

	if ((ret = vfm_guest_kvm_save_vcpus(s->g, &buf, &len, err)))
		return ret;
	vfm_stream_put_record(st, VFM_REC_CONFIG, 0, section_of(s), buf, len);
	free(buf);
	return vfm_stream_error(st, err);
}

static int sv_load_setup(void *opaque, uint32_t version, struct vfm_error *err)
{
	struct kvm_savable *s = opaque;

	s->loaded = false;
	if (version != VFM_KVM_SAVABLE_VERSION)
		return vfm_error_set(err, VFM_ESTREAM, "%s: unsupported section version %u",
				     s->name, version);
	return 0;
}

static int sv_load_state(void *opaque, uint16_t type, uint16_t flags, const void *buf,
			 size_t len, struct vfm_error *err)
{
	struct kvm_savable *s = opaque;
	int ret;

	if (type != VFM_REC_CONFIG)
		return vfm_error_set(err, VFM_ESTREAM, "%s: unexpected data record", s->name);
	if ((ret = vfm_guest_kvm_load_vcpus(s->g, buf, len, err)))
		return ret;
	s->loaded = true;
	return 0;
}

static int sv_load_finish(void *opaque, struct vfm_error *err)
{
	struct kvm_savable *s = opaque;

	if (!s->loaded)
		return vfm_error_set(err, VFM_ESTREAM, "%s: the stream carried no vCPU state",
				     s->name);
	return 0;
}

static const struct vfm_savable_ops kvm_savable_ops = {
	.save_state = sv_save_state,
	.load_setup = sv_load_setup,
	.load_state = sv_load_state,
	.load_finish = sv_load_finish,
};

int vfm_guest_kvm_register(struct vfm_guest *g, struct vfm_migration *m, const char *name,
			   struct vfm_error *err)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	struct kvm_savable *s;
	int ret;

	if (g->ops->sync_dirty != vfm_guest_kvm_sync_dirty)
		return vfm_error_set(err, -EINVAL, "not a kvm guest");
	if (!name)
		name = VFM_KVM_SAVABLE_NAME;
	/* Lives as long as the guest (kvm_destroy frees the list). */
	s = calloc(1, sizeof(*s));
	if (!s)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	s->g = g;
	s->m = m;
	snprintf(s->name, sizeof(s->name), "%s", name);
	ret = vfm_migration_register(m, s->name, VFM_KVM_SAVABLE_VERSION, &kvm_savable_ops, s, err);
	if (ret) {
		free(s);
		return ret;
	}
	s->next = k->savables;
	k->savables = s;
	return 0;
}

void vfm__kvm_free_savables(struct kvm_guest *k)
{
	while (k->savables) {
		struct kvm_savable *s = k->savables;
		k->savables = s->next;
		free(s);
	}
}
