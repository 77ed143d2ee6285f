/*
 * Checking the KVM guest: the host reads the bookkeeping in guest RAM (as the
 * synthetic guest's verifier does), and the guest checks itself on request
 * (each vCPU its own pages, the counters it keeps in registers and RAM).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "kvm_int.h"
#include "util/logging.h"

static int bad_layout(const struct kvm_guest *k, const struct kg_mailbox *mb, char *detail,
		      size_t len)
{
	uint64_t ws_end = mb->ws_gpa + mb->ws_pages * KG_PAGE_SIZE;
	uint64_t table_end = mb->table_gpa + mb->ws_pages * 8;

	if (mb->magic != KG_MAGIC || mb->version != KG_ABI_VERSION)
		snprintf(detail, len, "no guest mailbox in RAM (magic 0x%" PRIx64 ")", mb->magic);
	else if (mb->nvcpus != k->nvcpus)
		snprintf(detail, len, "guest RAM is for %u vCPUs, this VM has %u", mb->nvcpus,
			 k->nvcpus);
	else if (!mb->ws_pages || mb->ws_gpa % KG_PAGE_SIZE || ws_end > k->ram0_size ||
		 ws_end < mb->ws_gpa || table_end > mb->ws_gpa || mb->table_gpa < KG_TABLE_GPA)
		snprintf(detail, len, "guest mailbox describes a working set outside RAM");
	else if (!vfm__kvm_dev_bad_layout(k, detail, len))
		return 0;
	return -EINVAL;
}

/*
 * Stopped guest. A vCPU may have stopped in the middle of a rewrite: its
 * announced page then holds words of either the old or the new generation
 * and the table either one (the vCPU finishes the page when it runs again).
 * sample: the first, middle and last word of each page only (the announced
 * page whole): a page of the wrong generation differs in every word, so a
 * lost or stale page is caught; a torn one only by the full check. 1024
 * pages are ~0.05 ms sampled and ~0.9 ms read whole on this machine, and the
 * quick check runs inside the destination's downtime.
 */
static void check_pages(struct kvm_guest *k, struct vfm_guest_verify *out, bool sample)
{
	const struct kg_mailbox *mb = k->mb;
	const volatile uint64_t *table;
	const uint64_t words = KG_PAGE_SIZE / 8;
	const uint64_t few[3] = { 0, words / 2, words - 1 };
	uint64_t base;

	table = (const volatile uint64_t *)(k->ram0 + mb->table_gpa);
	base = mb->ws_gpa / KG_PAGE_SIZE;
	for (uint64_t idx = 0; idx < mb->ws_pages; idx++) {
		const struct kg_vcpu_stats *st = &mb->vcpu[idx % mb->nvcpus];
		uint64_t p = base + idx, gen = table[idx];
		uint64_t ig = st->inflight_page == p ? st->inflight_gen : 0;
		const uint64_t *w = (const uint64_t *)(k->ram0 + p * KG_PAGE_SIZE);
		bool bad = ig && gen != ig && gen + 1 != ig;
		bool whole = !sample || ig;
		uint64_t want = kg_page_word(p, ig ? ig : gen), old = ig ? kg_page_word(p, ig - 1) : want;

		for (uint64_t i = 0; i < (whole ? words : 3) && !bad; i++) {
			uint64_t x = w[whole ? i : few[i]];

			bad = x != want && x != old;
		}
		out->pages_checked++;
		if (bad) {
			if (!out->errors)
				snprintf(out->detail, sizeof(out->detail), "page 0x%" PRIx64
					 ": content is not generation %" PRIu64 "%s", p * KG_PAGE_SIZE,
					 gen, ig ? " (page was being rewritten)" : "");
			out->errors++;
		}
	}
}

static int host_check(struct kvm_guest *k, struct vfm_guest_verify *out, bool sample)
{
	memset(out, 0, sizeof(*out));
	if (bad_layout(k, k->mb, out->detail, sizeof(out->detail))) {
		out->errors = 1;
		return 0;
	}
	check_pages(k, out, sample);
	vfm__kvm_dev_check(k, out);
	return 0;
}

int vfm__kvm_host_check(struct kvm_guest *k, struct vfm_guest_verify *out)
{
	return host_check(k, out, false);
}

static uint64_t failed_vcpus(struct kvm_guest *k)
{
	uint64_t n = 0;

	pthread_mutex_lock(&k->lock);
	for (unsigned i = 0; i < k->nvcpus; i++)
		n += k->vcpu[i].failed;
	pthread_mutex_unlock(&k->lock);
	return n;
}

/* The guest runs: ask every vCPU for its check and collect the answers. */
int vfm_guest_kvm_self_check(struct vfm_guest *g, struct vfm_guest_verify *out)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	struct kg_mailbox *mb = k->mb;
	uint64_t req, deadline;
	unsigned done = 0;

	memset(out, 0, sizeof(*out));
	if (bad_layout(k, mb, out->detail, sizeof(out->detail))) {
		out->errors = 1;
		return 0;
	}
	req = mb->check_req + 1;
	mb->check_req = req;
	vfm__kvm_mark(k, &mb->check_req, sizeof(mb->check_req));
	deadline = vfm__kvm_now_ns() + (uint64_t)k->opts.check_timeout_ms * 1000000ull;
	while (vfm__kvm_now_ns() < deadline) {
		struct timespec ts = { 0, 2000000 };

		done = 0;
		for (unsigned i = 0; i < k->nvcpus; i++)
			done += ((volatile struct kg_vcpu_stats *)&mb->vcpu[i])->check_seq == req;
		if (done == k->nvcpus || failed_vcpus(k))
			break;
		nanosleep(&ts, NULL);
	}
	/* The vCPUs' results after their check_seq. TSan rejects fences
	 * (-Wtsan) and cannot see KVM's writes anyway; x86 keeps loads in
	 * order, so there a compiler barrier is enough. */
#ifdef __SANITIZE_THREAD__
	__atomic_signal_fence(__ATOMIC_ACQUIRE);
#else
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
#endif
	/* A device's own words first: they say what was lost. */
	vfm__kvm_dev_check_detail(k, req, out->detail, sizeof(out->detail));
	for (unsigned i = 0; i < k->nvcpus; i++) {
		const struct kg_vcpu_stats *st = &mb->vcpu[i];

		if (st->check_seq != req)
			continue;
		out->pages_checked += st->check_pages;
		if (st->check_errors && !out->errors && !out->detail[0])
			snprintf(out->detail, sizeof(out->detail), "guest check: vCPU %u found "
				 "page 0x%" PRIx64 " wrong", i, st->check_first_bad * KG_PAGE_SIZE);
		out->errors += st->check_errors;
	}
	if (failed_vcpus(k)) {
		if (!out->errors)
			snprintf(out->detail, sizeof(out->detail), "%" PRIu64 " vCPU(s) failed "
				 "(see the log)", failed_vcpus(k));
		out->errors++;
	} else if (done < k->nvcpus) {
		if (!out->errors)
			snprintf(out->detail, sizeof(out->detail), "guest check: %u of %u vCPUs "
				 "answered within %u ms", done, k->nvcpus, k->opts.check_timeout_ms);
		out->errors++;
	}
	out->verified = out->errors == 0;
	return done < k->nvcpus && !failed_vcpus(k) ? -ETIMEDOUT : 0;
}

int vfm__kvm_quick_verify(struct vfm_guest *g, struct vfm_guest_verify *out)
{
	struct kvm_guest *k = (struct kvm_guest *)g;

	/* Bounded by the working set, not RAM, and sampled (check_pages); the
	 * guest's own check needs it to run for seconds here, so it waits for
	 * a full verify, as does a torn page. */
	host_check(k, out, true);
	if (failed_vcpus(k) && !out->errors) {
		snprintf(out->detail, sizeof(out->detail), "%" PRIu64 " vCPU(s) failed (see the log)",
			 failed_vcpus(k));
		out->errors++;
	}
	out->verified = out->errors == 0;
	return 0;
}

/*
 * The verify op (stopped guest): the host check, then the guest's own one:
 * the vCPUs run with page rewrites paused until each answered, and park
 * again. Both must pass.
 */
int vfm__kvm_verify(struct vfm_guest *g, struct vfm_guest_verify *out)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	struct vfm_guest_verify gv;
	uint64_t rate;
	bool ready;
	int ret;

	vfm__kvm_host_check(k, out);
	if (failed_vcpus(k) && !out->errors) {
		snprintf(out->detail, sizeof(out->detail), "%" PRIu64 " vCPU(s) failed (see the log)",
			 failed_vcpus(k));
		out->errors++;
	}
	pthread_mutex_lock(&k->lock);
	ready = k->state_ready;
	pthread_mutex_unlock(&k->lock);
	if (out->errors || k->opts.no_guest_check || !ready || g->running) {
		out->verified = out->errors == 0;
		return 0;
	}
	rate = k->mb->rate_pages;
	vfm_guest_kvm_set_dirty_rate(g, 0);
	ret = g->ops->start(g, NULL);
	if (!ret) {
		vfm_guest_kvm_self_check(g, &gv);
		ret = g->ops->stop(g);
	}
	k->mb->rate_pages = rate;
	vfm__kvm_mark(k, &k->mb->rate_pages, sizeof(k->mb->rate_pages));
	if (ret) {
		snprintf(out->detail, sizeof(out->detail), "could not run the guest's own check: %s",
			 strerror(-ret));
		out->errors++;
	} else {
		if (gv.errors && !out->errors)
			snprintf(out->detail, sizeof(out->detail), "%s", gv.detail);
		out->errors += gv.errors;
	}
	out->verified = out->errors == 0;
	return 0;
}
