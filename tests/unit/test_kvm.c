/*
 * The KVM guest on real KVM (skipped without /dev/kvm): boot to long mode and
 * the console, KVM's dirty log into the memory layer, stop/start, and vCPU
 * state carried into a second VM over a copy of the memory.
 */
#include <linux/kvm.h>
#include <sys/utsname.h>
#include <time.h>

#include "guest/abi.h"
#include "harness.h"
#include "vmm/kvm.h"
#include "vfiomig/migration.h"

#define PG 4096ull
#define RAM (8ull << 20)
#define WS (256ull << 10)          /* small: guest code is slow on nested KVM */
#define RATE (1ull << 20)          /* bytes/s over both vCPUs */

static void need_kvm(void)
{
	char why[128];

	if (!vfm_kvm_available(why, sizeof(why)))
		SKIP("%s", why);
}

static struct vfm_guest_mem *new_mem(void)
{
	struct vfm_guest_mem *mem;
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_guest_mem_new(PG, &mem, &err), 0);
	CHECK_EQ(vfm_guest_mem_add(mem, 0, RAM, "ram", &err), 0);
	return mem;
}

static struct vfm_guest *new_guest(struct vfm_guest_mem *mem, uint64_t rate, bool fresh)
{
	struct vfm_kvm_opts o = {
		.vcpus = 2, .dirty_rate = rate, .working_set = WS, .fresh = fresh,
	};
	struct vfm_error err = { 0 };
	struct vfm_guest *g = NULL;
	int ret = vfm_guest_kvm_new(mem, &o, &g, &err);

	if (ret)
		FAIL("vfm_guest_kvm_new: %s", err.msg);
	CHECK_STR(g->ops->kind, "kvm");
	return g;
}

static uint64_t written(struct vfm_guest *g)
{
	struct vfm_kvm_vcpu_info vi;
	uint64_t n = 0;

	for (unsigned i = 0; i < vfm_guest_kvm_vcpus(g); i++) {
		CHECK_EQ(vfm_guest_kvm_vcpu_info(g, i, &vi), 0);
		CHECK(!vi.failed);
		n += vi.pages_written;
	}
	return n;
}

/* Every vCPU has rewritten at least `more` pages beyond base[i] (bounded wait). */
static void wait_progress(struct vfm_guest *g, const uint64_t *base, uint64_t more)
{
	uint64_t deadline = now_ms() + 15000;

	for (;;) {
		unsigned ok = 0;

		for (unsigned i = 0; i < vfm_guest_kvm_vcpus(g); i++) {
			struct vfm_kvm_vcpu_info vi;
			CHECK_EQ(vfm_guest_kvm_vcpu_info(g, i, &vi), 0);
			CHECK(!vi.failed);
			ok += vi.pages_written >= (base ? base[i] : 0) + more;
		}
		if (ok == vfm_guest_kvm_vcpus(g))
			return;
		if (now_ms() > deadline)
			FAIL("the guest made no progress (%" PRIu64 " rewrites)", written(g));
		nap_ms(5);
	}
}

static void counters(struct vfm_guest *g, uint64_t *out)
{
	struct vfm_kvm_vcpu_info vi;

	for (unsigned i = 0; i < vfm_guest_kvm_vcpus(g); i++) {
		CHECK_EQ(vfm_guest_kvm_vcpu_info(g, i, &vi), 0);
		out[i] = vi.pages_written;
	}
}

static void check_verified(struct vfm_guest *g)
{
	struct vfm_guest_verify v;

	CHECK_EQ(g->ops->verify(g, &v), 0);
	if (!v.verified)
		FAIL("verify: %" PRIu64 " errors: %s", v.errors, v.detail);
	CHECK(v.pages_checked >= WS / PG);
}

/* The running guest has slept in at least one idle wait (bounded wait). */
static void wait_idle(struct vfm_guest *g)
{
	struct vfm_kvm_sched_info si;
	uint64_t deadline = now_ms() + 10000;

	do {
		nap_ms(5);
		vfm_guest_kvm_sched_info(g, &si);
		if (now_ms() > deadline)
			FAIL("the idle guest never idled");
	} while (!si.idle_waits);
}

static bool test_bit(const uint64_t *bm, uint64_t i)
{
	return bm[i / 64] >> (i % 64) & 1;
}

TEST(boots_to_long_mode_and_prints)
{
	struct vfm_guest_mem *mem;
	struct vfm_guest *g;
	struct vfm_error err = { 0 };
	uint64_t deadline;
	char con[4096];

	need_kvm();
	mem = new_mem();
	g = new_guest(mem, 0, true);
	CHECK_EQ(g->ops->start(g, &err), 0);
	deadline = now_ms() + 10000;
	for (;;) {
		vfm_guest_kvm_console(g, con, sizeof(con));
		if (strstr(con, "cpu 0: long mode") && strstr(con, "cpu 1: long mode"))
			break;
		if (now_ms() > deadline)
			FAIL("no boot line from both vCPUs; console: '%s'", con);
		nap_ms(5);
	}
	CHECK(strstr(con, "32 of 64 working-set pages are mine"));
	CHECK_EQ(g->ops->stop(g), 0);
	for (unsigned i = 0; i < 2; i++) {
		struct vfm_kvm_vcpu_info vi;
		CHECK_EQ(vfm_guest_kvm_vcpu_info(g, i, &vi), 0);
		CHECK(vi.booted && !vi.failed);
		CHECK_EQ(vi.pages_written, 0);   /* rate 0: nothing rewritten */
	}
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}

TEST(dirty_log_feeds_the_memory_layer)
{
	const struct vfm_mem_region *r;
	uint64_t *bm, n, ws_gpa = 0, marked = 0;
	struct vfm_guest_mem *mem;
	struct vfm_guest *g;
	struct vfm_error err = { 0 };

	need_kvm();
	mem = new_mem();
	g = new_guest(mem, RATE, true);
	CHECK(g->ops->sync_dirty == vfm_guest_kvm_sync_dirty);
	r = vfm_guest_mem_region(mem, 0);
	bm = calloc(r->npages / 64 + 1, 8);
	/* Forget what boot wrote; KVM has seen no guest write yet. */
	vfm_dirty_collect(mem, 0, bm);
	CHECK_EQ(g->ops->sync_dirty(g), 0);
	CHECK_EQ(vfm_dirty_count(mem), 0);

	CHECK_EQ(g->ops->start(g, &err), 0);
	wait_progress(g, NULL, 10);
	CHECK_EQ(g->ops->stop(g), 0);
	n = (uint64_t)g->ops->sync_dirty(g);
	CHECK(n > 0);
	CHECK_EQ(g->ops->sync_dirty(g), 0);    /* stopped: nothing new */
	memset(bm, 0, (r->npages / 64 + 1) * 8);
	CHECK_EQ(vfm_dirty_collect(mem, 0, bm), n);

	/* Every page the guest's table says it rewrote is dirty, and so is
	 * the table and the mailbox; RAM the guest never touches is not. */
	{
		const struct kg_mailbox *mb = (void *)((char *)r->host + KG_MAILBOX_GPA);
		const uint64_t *table = (const uint64_t *)((char *)r->host + mb->table_gpa);
		uint64_t ws_pages = mb->ws_pages;

		ws_gpa = mb->ws_gpa;
		CHECK_EQ(ws_pages, WS / PG);
		for (uint64_t i = 0; i < ws_pages; i++) {
			if (!table[i])
				continue;
			marked++;
			if (!test_bit(bm, ws_gpa / PG + i))
				FAIL("working-set page %" PRIu64 " rewritten but not dirty", i);
		}
		CHECK(marked > 0);
		CHECK(test_bit(bm, mb->table_gpa / PG));
		CHECK(test_bit(bm, 1));
	}
	CHECK(!test_bit(bm, RAM / PG - 1));
	CHECK(!test_bit(bm, ws_gpa / PG + WS / PG + 1));
	CHECK(n < 2 * WS / PG);
	free(bm);
	check_verified(g);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}

TEST(stop_parks_and_start_resumes)
{
	struct vfm_guest_mem *mem;
	struct vfm_guest *g;
	struct vfm_error err = { 0 };
	uint64_t at_stop[2], later[2];

	need_kvm();
	mem = new_mem();
	g = new_guest(mem, RATE, true);
	CHECK_EQ(g->ops->start(g, &err), 0);
	wait_progress(g, NULL, 5);
	for (int round = 0; round < 3; round++) {
		CHECK_EQ(g->ops->stop(g), 0);
		CHECK(!g->running);
		counters(g, at_stop);
		nap_ms(30);
		counters(g, later);
		CHECK_EQ(later[0], at_stop[0]);
		CHECK_EQ(later[1], at_stop[1]);
		check_verified(g);
		counters(g, at_stop);   /* the guest's own check ran the vCPUs */
		CHECK_EQ(g->ops->start(g, &err), 0);
		wait_progress(g, at_stop, 3);
	}
	CHECK_EQ(g->ops->stop(g), 0);
	check_verified(g);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}

TEST(guest_self_check_catches_a_lost_write)
{
	struct vfm_guest_mem *mem;
	struct vfm_guest *g;
	struct vfm_guest_verify v;
	struct vfm_error err = { 0 };
	const struct vfm_mem_region *r;

	need_kvm();
	mem = new_mem();
	g = new_guest(mem, RATE, true);
	CHECK_EQ(g->ops->start(g, &err), 0);
	wait_progress(g, NULL, 5);
	CHECK_EQ(vfm_guest_kvm_self_check(g, &v), 0);
	CHECK(v.verified);
	CHECK_EQ(v.pages_checked, WS / PG);
	CHECK_EQ(g->ops->stop(g), 0);

	/* Roll one rewritten page back to zero, as a lost dirty page would. */
	r = vfm_guest_mem_region(mem, 0);
	{
		const struct kg_mailbox *mb = (void *)((char *)r->host + KG_MAILBOX_GPA);
		const uint64_t *table = (const uint64_t *)((char *)r->host + mb->table_gpa);
		uint64_t i = 0;

		while (!table[i])
			i++;
		memset((char *)r->host + mb->ws_gpa + i * PG, 0, PG);
	}
	CHECK_EQ(g->ops->verify(g, &v), 0);
	CHECK(!v.verified);
	CHECK_EQ(v.errors, 1);
	CHECK(strstr(v.detail, "not generation"));
	/* The guest itself sees it too. */
	vfm_guest_kvm_set_dirty_rate(g, 0);
	CHECK_EQ(g->ops->start(g, &err), 0);
	CHECK_EQ(vfm_guest_kvm_self_check(g, &v), 0);
	CHECK(!v.verified);
	CHECK_EQ(v.errors, 1);
	CHECK(strstr(v.detail, "guest check"));
	CHECK_EQ(g->ops->stop(g), 0);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}

/* vCPU 0's TSC (MSR 0x10) in a vfm_guest_kvm_save_vcpus blob (vmm/kvm_state.c). */
static uint64_t blob_tsc(const void *blob, size_t len)
{
	const unsigned char *p = (const unsigned char *)blob + 24 + 8, *end = p - 32 + len;
	uint32_t n, tag, ilen;

	memcpy(&n, p - 4, 4);
	for (uint32_t i = 0; i < n && end - p >= 8; i++) {
		memcpy(&tag, p, 4);
		memcpy(&ilen, p + 4, 4);
		p += 8;
		if (tag == 6) {     /* ITEM_MSRS: struct kvm_msrs, then entries */
			const struct kvm_msrs *m = (const void *)p;

			for (uint32_t e = 0; e < m->nmsrs; e++)
				if (m->entries[e].index == 0x10)
					return m->entries[e].data;
		}
		p += ilen + (8 - ilen % 8) % 8;
	}
	FAIL("no TSC in the vCPU state");
	return 0;
}

TEST_TIMEOUT(vcpu_state_moves_to_a_second_vm, 60)
{
	struct vfm_guest_mem *mem_a, *mem_b;
	struct vfm_guest *a, *b;
	struct vfm_guest_verify v;
	struct vfm_error err = { 0 };
	struct vfm_kvm_vcpu_info ia, ib;
	uint64_t at_stop[2];
	void *blob;
	size_t len;
	char con[4096];

	need_kvm();
	mem_a = new_mem();
	a = new_guest(mem_a, RATE, true);
	CHECK_EQ(a->ops->start(a, &err), 0);
	wait_progress(a, NULL, 8);
	CHECK_EQ(a->ops->stop(a), 0);
	counters(a, at_stop);
	if (vfm_guest_kvm_save_vcpus(a, &blob, &len, &err))
		FAIL("save: %s", err.msg);
	CHECK(len > 2 * 1000);

	/* The destination: its own memory with the source's bytes, no boot. */
	mem_b = new_mem();
	b = new_guest(mem_b, 0, false);
	CHECK(b->ops->start(b, &err) != 0);    /* no state yet */
	memcpy(vfm_guest_mem_region(mem_b, 0)->host, vfm_guest_mem_region(mem_a, 0)->host, RAM);
	/* The guest's clock keeps time across the gap (kvm_state.c): its TSC
	 * moves on by at least the 50 ms between save and load. */
	nap_ms(50);
	if (vfm_guest_kvm_load_vcpus(b, blob, len, &err))
		FAIL("load: %s", err.msg);
	{
		struct vfm_kvm_sched_info si;
		void *blob_b;
		size_t len_b;
		uint64_t khz = 0;

		vfm_guest_kvm_sched_info(b, &si);
		CHECK(si.tsc_advance_ns >= 50000000ull);
		if (vfm_guest_kvm_save_vcpus(b, &blob_b, &len_b, &err))
			FAIL("save of the loaded state: %s", err.msg);
		memcpy(&khz, (const unsigned char *)blob + 16, 8);
		fprintf(stderr, "# TSC advanced by %" PRIu64 " ticks (%" PRIu64 " us at %" PRIu64
			" kHz) over a %" PRIu64 " us gap\n", blob_tsc(blob_b, len_b) - blob_tsc(blob, len),
			(blob_tsc(blob_b, len_b) - blob_tsc(blob, len)) * 1000 / khz, khz,
			si.tsc_advance_ns / 1000);
		CHECK(blob_tsc(blob_b, len_b) - blob_tsc(blob, len) >= 50 * khz);
		free(blob_b);
	}
	for (unsigned i = 0; i < 2; i++) {
		CHECK_EQ(vfm_guest_kvm_vcpu_info(a, i, &ia), 0);
		CHECK_EQ(vfm_guest_kvm_vcpu_info(b, i, &ib), 0);
		CHECK_EQ(ib.rip, ia.rip);
		CHECK_EQ(ib.pages_written, at_stop[i]);
	}
	a->ops->destroy(a);
	vfm_guest_mem_free(mem_a);

	/* Verify runs the guest's own check on b: registers, RAM and counters
	 * must agree, or the guest panics. */
	CHECK_EQ(b->ops->verify(b, &v), 0);
	if (!v.verified)
		FAIL("destination verify: %s", v.detail);
	vfm_guest_kvm_console(b, con, sizeof(con));
	CHECK(strstr(con, "cpu 0: self-check 1: ok"));
	CHECK(strstr(con, "cpu 1: self-check 1: ok"));
	CHECK(strstr(con, "long mode") == NULL);   /* resumed, not rebooted */

	vfm_guest_kvm_set_dirty_rate(b, RATE);
	CHECK_EQ(b->ops->start(b, &err), 0);
	wait_progress(b, at_stop, 5);
	CHECK_EQ(vfm_guest_kvm_self_check(b, &v), 0);
	if (!v.verified)
		FAIL("destination self-check: %s", v.detail);
	CHECK_EQ(b->ops->stop(b), 0);
	check_verified(b);
	free(blob);
	b->ops->destroy(b);
	vfm_guest_mem_free(mem_b);
}

TEST(load_rejects_bad_state)
{
	struct vfm_guest_mem *mem;
	struct vfm_guest *g, *g1;
	struct vfm_error err = { 0 };
	unsigned char junk[64] = "VFKVCPU1";
	void *blob;
	size_t len;

	need_kvm();
	mem = new_mem();
	g = new_guest(mem, 0, true);
	CHECK_EQ(g->ops->stop(g), 0);
	CHECK_EQ(vfm_guest_kvm_save_vcpus(g, &blob, &len, &err), 0);
	CHECK(vfm_guest_kvm_load_vcpus(g, junk, 8, &err) != 0);
	CHECK(vfm_guest_kvm_load_vcpus(g, junk, sizeof(junk), &err) != 0);
	for (size_t cut = 24; cut < len; cut += len / 7)
		CHECK(vfm_guest_kvm_load_vcpus(g, blob, cut, &err) != 0);
	CHECK_EQ(vfm_guest_kvm_load_vcpus(g, blob, len, &err), 0);
	{
		struct vfm_guest_mem *m1 = new_mem();
		struct vfm_kvm_opts o = { .vcpus = 1, .fresh = false };

		CHECK_EQ(vfm_guest_kvm_new(m1, &o, &g1, &err), 0);
		CHECK_EQ(vfm_guest_kvm_load_vcpus(g1, blob, len, &err), -EINVAL);
		g1->ops->destroy(g1);
		vfm_guest_mem_free(m1);
	}
	free(blob);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}

/* The VM side of the engine: the source's stop also reads KVM's dirty log
 * (the final sync; pre-copy passes would call sync_dirty too). */
static int vm_stop(void *opaque)
{
	struct vfm_guest *g = opaque;
	int ret = g->ops->stop(g);

	return ret ? ret : g->ops->sync_dirty(g) < 0 ? -EIO : 0;
}

static int vm_start(void *opaque)
{
	struct vfm_guest *g = opaque;

	return g->ops->start(g, NULL);
}

static uint64_t vm_kick_ns(void *opaque)
{
	struct vfm_guest *g = opaque;

	return g->ops->kick_ns(g);
}

static const struct vfm_vm_ops vm_ops = { .stop = vm_stop, .start = vm_start,
					  .kick_ns = vm_kick_ns };

/* A temp dir with a file: URI in it for a source's stream. */
struct file_uri {
	char dir[32], path[96], uri[128];
};

static void file_uri_init(struct file_uri *f)
{
	snprintf(f->dir, sizeof(f->dir), "/tmp/vfm-kvm-XXXXXX");
	CHECK(mkdtemp(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/vm.state", f->dir);
	snprintf(f->uri, sizeof(f->uri), "file:%s", f->path);
}

static void file_uri_done(const struct file_uri *f)
{
	unlink(f->path);
	rmdir(f->dir);
}

/*
 * Starts guest g (on mem, with the engine's vm ops) and, once each vCPU has
 * rewritten `progress` pages, migrates it to uri; returns the migration
 * (completed; stats in *st).
 */
static struct vfm_migration *migrate_to_file(struct vfm_guest_mem *mem, struct vfm_guest *g,
					     const struct vfm_vm_ops *ops, uint64_t progress,
					     const char *uri, struct vfm_migration_stats *st)
{
	struct vfm_migration_params p;
	struct vfm_error err = { 0 };
	struct vfm_migration *m;

	vfm_migration_params_default(&p);
	p.timeout_ms = 10000;
	CHECK_EQ(vfm_migration_new(mem, ops, g, &m, &err), 0);
	if (vfm_guest_kvm_register(g, m, NULL, &err))
		FAIL("register: %s", err.msg);
	CHECK_EQ(g->ops->start(g, &err), 0);
	wait_progress(g, NULL, progress);
	if (vfm_migration_start(m, uri, &p, &err))
		FAIL("start: %s", err.msg);
	CHECK_EQ(vfm_migration_wait(m, 60000), 0);
	vfm_migration_get_stats(m, st);
	if (st->status != VFM_MIG_COMPLETED)
		FAIL("source: %s: %s", vfm_mig_status_name(st->status), st->error);
	return m;
}

TEST_TIMEOUT(migrates_through_the_engine, 90)
{
	struct vfm_guest_mem *mem_a, *mem_b;
	struct vfm_guest *a, *b;
	struct vfm_migration *ma, *mb;
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_guest_verify v;
	struct vfm_error err = { 0 };
	uint64_t at_stop[2];
	struct file_uri f;

	need_kvm();
	file_uri_init(&f);
	vfm_migration_params_default(&p);
	p.timeout_ms = 10000;

	mem_a = new_mem();
	a = new_guest(mem_a, RATE, true);
	ma = migrate_to_file(mem_a, a, &vm_ops, 5, f.uri, &st);
	CHECK(!a->running);
	/* The stop was expected as long as the running vCPUs' kicks took. */
	CHECK(st.expected_switchover_ms[0] > 0);
	counters(a, at_stop);
	vfm_migration_free(ma);
	a->ops->destroy(a);
	vfm_guest_mem_free(mem_a);

	mem_b = new_mem();
	b = new_guest(mem_b, 0, false);
	CHECK_EQ(vfm_migration_new(mem_b, &vm_ops, b, &mb, &err), 0);
	CHECK_EQ(vfm_guest_kvm_register(b, mb, NULL, &err), 0);
	if (vfm_migration_incoming(mb, f.uri, &p, NULL, NULL, &err))
		FAIL("incoming: %s", err.msg);
	CHECK(b->running);
	wait_progress(b, at_stop, 3);
	{
		struct vfm_guest_stats gs;

		b->ops->stats(b, &gs);   /* this process's rewrites only */
		CHECK(gs.page_writes >= 6);
		CHECK(gs.page_writes < written(b));
	}
	CHECK_EQ(vfm_guest_kvm_self_check(b, &v), 0);
	if (!v.verified)
		FAIL("destination self-check: %s", v.detail);
	CHECK_EQ(b->ops->stop(b), 0);
	check_verified(b);
	vfm_migration_free(mb);
	b->ops->destroy(b);
	vfm_guest_mem_free(mem_b);
	file_uri_done(&f);
}

static void vm_log_sync(void *opaque)
{
	struct vfm_guest *g = opaque;

	CHECK(g->ops->sync_dirty(g) >= 0);
}

static const struct vfm_vm_ops vm_ops_log = { .stop = vm_stop, .start = vm_start,
					      .log_sync = vm_log_sync, .kick_ns = vm_kick_ns };

/*
 * KVM logs every write from the VM's start. What it logged before the
 * migration goes with the first pass (the send set starts full), so RAM's
 * setup takes that log first, as QEMU's ram_save_setup syncs once: the
 * first sync after the pass then holds only what the guest wrote during
 * it. Left in KVM, the whole working set came back at that sync and was
 * sent again (in stop-copy, when the limit fits it).
 * Arithmetic: the guest has rewritten its whole working set (WS) before the
 * migration starts; during the migration it writes at most RATE x the total
 * time. RAM sent = its non-zero pages (WS and its program's few pages) once,
 * plus what it wrote meanwhile, plus headers; with the stale log, WS more.
 */
TEST_TIMEOUT(first_pass_takes_the_log_from_before_the_migration, 60)
{
	struct vfm_guest_mem *mem;
	struct vfm_guest *g;
	struct vfm_migration *m;
	struct vfm_migration_stats st;
	struct file_uri f;
	uint64_t during;

	need_kvm();
	file_uri_init(&f);
	mem = new_mem();
	g = new_guest(mem, RATE, true);
	/* Each vCPU sweeps its half of WS: every working-set page is in
	 * KVM's log before the migration. */
	m = migrate_to_file(mem, g, &vm_ops_log, WS / PG / 2 + 1, f.uri, &st);
	during = RATE * (st.total_time_ms + 1) / 1000;
	fprintf(stderr, "# RAM sent %" PRIu64 " bytes in %" PRIu64 " ms (working set %llu, "
		"at most %" PRIu64 " written meanwhile)\n", st.ram_transferred_bytes,
		st.total_time_ms, WS, during);
	CHECK(st.ram_transferred_bytes >= WS / 2);
	CHECK(st.ram_transferred_bytes < WS + WS / 2 + during);
	vfm_migration_free(m);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
	file_uri_done(&f);
}

/* auto-converge's vCPU throttle: at 80 % each vCPU sleeps about 80 % of the
 * wall time (the throttle's slices are wall time: a loaded host does not
 * change the share), and the guest rewrites fewer pages than at full speed
 * (by how much depends on the CPU the host gives it: at load ~7 full speed
 * fell to half, throttled stayed); back at 0 the thread ends and it runs on. */
TEST_TIMEOUT(throttle_slows_the_vcpus, 60)
{
	struct vfm_guest_mem *mem;
	struct vfm_guest *g;
	struct vfm_error err = { 0 };
	struct vfm_kvm_sched_info s0, s1;
	uint64_t a, b, full, slow, t0, el;

	need_kvm();
	mem = new_mem();
	g = new_guest(mem, 4 * RATE, true);
	CHECK(g->ops->set_throttle != NULL);
	CHECK_EQ(g->ops->start(g, &err), 0);
	wait_progress(g, NULL, 5);
	a = written(g);
	nap_ms(1000);
	full = written(g) - a;
	g->ops->set_throttle(g, 80);
	nap_ms(100);
	b = written(g);
	vfm_guest_kvm_sched_info(g, &s0);
	t0 = now_ms();
	nap_ms(1000);
	slow = written(g) - b;
	vfm_guest_kvm_sched_info(g, &s1);
	el = now_ms() - t0;
	fprintf(stderr, "# %" PRIu64 " rewrites in 1 s at full speed, %" PRIu64 " throttled 80%%; "
		"%u vCPU(s) slept %" PRIu64 " ms of %" PRIu64 "\n", full, slow,
		vfm_guest_kvm_vcpus(g), (s1.throttle_ns - s0.throttle_ns) / 1000000, el);
	CHECK(full > 20);
	CHECK(slow < full);
	/* 80 %: 40 ms asleep after at least 10 ms of running, and kicks come
	 * every 10 ms in no phase with it: ~15 ms runs, ~73 % asleep (measured
	 * 68-73 %). At least half the span per vCPU (a late kick lengthens a
	 * run; a sleep in progress at either end counts only when it ends). */
	CHECK((s1.throttle_ns - s0.throttle_ns) / 1000000 >= el * 50 / 100 * vfm_guest_kvm_vcpus(g));
	g->ops->set_throttle(g, 0);
	CHECK_EQ(g->ops->stop(g), 0);
	check_verified(g);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}

/* Linux 6.12 and later honour a SCHED_OTHER thread's slice request. */
static bool kernel_has_custom_slices(void)
{
	struct utsname u;
	unsigned maj = 0, min = 0;

	return uname(&u) == 0 && sscanf(u.release, "%u.%u", &maj, &min) == 2 &&
	       (maj > 6 || (maj == 6 && min >= 12));
}

/*
 * An idle guest's vCPUs sleep in their idle exits (port 0xe0, 10 ms each at
 * rate 0): a wait that returns before its deadline would leave the vCPU
 * thread always runnable, time-sliced against the VM's other threads (the
 * heartbeat's 3-12 ms silences, docs/performance.md section 8; the deadline
 * was once on another clock than the condition). Counts, no timing bound:
 * no wait times out early, and there are at most as many waits as 10 ms
 * periods elapsed. The vCPU threads carry the slice they were given, and
 * pauses counts the stops that parked a running guest.
 */
TEST(idle_vcpus_sleep_and_are_scheduled_as_asked)
{
	struct vfm_kvm_opts o = { .vcpus = 2, .working_set = WS, .fresh = true,
				  .vcpu_slice_us = 250 };
	struct vfm_guest_mem *mem;
	struct vfm_kvm_sched_info si;
	struct vfm_guest *g = NULL;
	struct vfm_error err = { 0 };
	uint64_t t0, ms;

	need_kvm();
	mem = new_mem();
	if (vfm_guest_kvm_new(mem, &o, &g, &err))
		FAIL("vfm_guest_kvm_new: %s", err.msg);
	vfm_guest_kvm_sched_info(g, &si);
	CHECK_EQ(si.pauses, 0);
	CHECK_EQ(g->ops->start(g, &err), 0);
	wait_idle(g);
	t0 = now_ms();
	nap_ms(300);
	vfm_guest_kvm_sched_info(g, &si);
	ms = now_ms() - t0;
	fprintf(stderr, "# %" PRIu64 " idle waits in ~%" PRIu64 " ms, %" PRIu64 " early, vCPU slice "
		"%" PRIu64 " ns\n", si.idle_waits, ms, si.idle_early, si.slice_ns);
	CHECK_EQ(si.idle_early, 0);
	CHECK(si.idle_waits <= 2 * (ms / 10 + 3));
	if (kernel_has_custom_slices())
		CHECK_EQ(si.slice_ns, 250000);
	CHECK_EQ(g->ops->stop(g), 0);
	CHECK_EQ(g->ops->stop(g), 0);           /* already parked: no pause */
	vfm_guest_kvm_sched_info(g, &si);
	CHECK_EQ(si.pauses, 1);
	CHECK_EQ(g->ops->start(g, &err), 0);
	CHECK_EQ(g->ops->stop(g), 0);
	vfm_guest_kvm_sched_info(g, &si);
	CHECK_EQ(si.pauses, 2);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}

/* A kick (the engine's kick_ns: what a stop will take) takes every vCPU out
 * of KVM_RUN and leaves it running: the guest goes on rewriting and no stop
 * is counted; a stopped guest has nothing to kick. */
TEST(kick_leaves_the_vcpus_running)
{
	struct vfm_guest_mem *mem;
	struct vfm_kvm_sched_info si;
	struct vfm_guest *g;
	struct vfm_error err = { 0 };
	uint64_t before[2];

	need_kvm();
	mem = new_mem();
	g = new_guest(mem, RATE, true);
	CHECK_EQ(g->ops->start(g, &err), 0);
	wait_progress(g, NULL, 5);
	for (int round = 0; round < 10; round++) {
		CHECK(g->ops->kick_ns(g) > 0);
		CHECK(g->running);
		counters(g, before);
		wait_progress(g, before, 3);
	}
	vfm_guest_kvm_sched_info(g, &si);
	CHECK_EQ(si.pauses, 0);
	CHECK_EQ(g->ops->stop(g), 0);
	CHECK_EQ(g->ops->kick_ns(g), 0);
	check_verified(g);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}

/* A kick reaches vCPUs asleep in idle waits (each acknowledges and sleeps
 * on): it comes back, no wait times out before its deadline, no stop is
 * counted, and the guest still runs. */
TEST(a_kick_reaches_idle_vcpus)
{
	struct vfm_kvm_opts o = { .vcpus = 2, .working_set = WS, .fresh = true };
	struct vfm_guest_mem *mem;
	struct vfm_kvm_sched_info si;
	struct vfm_guest *g = NULL;
	struct vfm_error err = { 0 };

	need_kvm();
	mem = new_mem();
	if (vfm_guest_kvm_new(mem, &o, &g, &err))
		FAIL("vfm_guest_kvm_new: %s", err.msg);
	CHECK_EQ(g->ops->start(g, &err), 0);
	wait_idle(g);
	for (int round = 0; round < 20; round++) {
		CHECK(g->ops->kick_ns(g) > 0);
		nap_ms(2);
	}
	vfm_guest_kvm_sched_info(g, &si);
	CHECK_EQ(si.idle_early, 0);
	CHECK_EQ(si.pauses, 0);
	CHECK(g->running);
	CHECK_EQ(g->ops->stop(g), 0);
	g->ops->destroy(g);
	vfm_guest_mem_free(mem);
}
