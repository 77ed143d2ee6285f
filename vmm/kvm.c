/*
 * The KVM guest: the VM over the memfd guest memory (one dirty-logged slot
 * per region), a thread per vCPU around KVM_RUN, the exits the guest program
 * uses (console and idle ports, MMIO), stop by kick signal, and the dirty log.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include "kvm_int.h"
#include "util/logging.h"
#include "util/thread.h"

/*
 * Stop kicks vCPUs out of KVM_RUN with this signal; its handler sets the
 * thread's immediate_exit, so a kick that lands just before KVM_RUN is not
 * lost (KVM returns -EINTR at once). The VM process leaves SIGUSR2 to us.
 */
#define KICK_SIGNAL SIGUSR2
#define STOP_TIMEOUT_NS (5ull * 1000000000ull)

static __thread struct kvm_run *tls_run __attribute__((tls_model("initial-exec")));
static pthread_once_t kick_once = PTHREAD_ONCE_INIT;

static void kick_handler(int sig)
{
	(void)sig;
	if (tls_run)
		tls_run->immediate_exit = 1;
}

static void install_kick(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = kick_handler;
	sigemptyset(&sa.sa_mask);
	sigaction(KICK_SIGNAL, &sa, NULL);
}

uint64_t vfm__kvm_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* VMM writes into guest RAM bypass KVM's dirty log: mark them ourselves. */
void vfm__kvm_mark(struct kvm_guest *k, const volatile void *host, uint64_t len)
{
	vfm_dirty_mark(k->g.mem, (uint64_t)((uintptr_t)host - (uintptr_t)k->ram0), len);
}

bool vfm_kvm_available(char *reason, size_t reason_len)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC), v;

	if (fd < 0) {
		if (reason)
			snprintf(reason, reason_len, "/dev/kvm: %s", strerror(errno));
		return false;
	}
	v = ioctl(fd, KVM_GET_API_VERSION, 0);
	close(fd);
	if (v != KVM_API_VERSION) {
		if (reason)
			snprintf(reason, reason_len, "/dev/kvm: API version %d, want %d", v,
				 KVM_API_VERSION);
		return false;
	}
	return true;
}

/* ---- Exits ---- */

static void console_byte(struct kvm_vcpu *v, char c)
{
	struct kvm_guest *k = v->k;

	if (c != '\n' && v->line_len < sizeof(v->line) - 1) {
		v->line[v->line_len++] = c >= 0x20 && c < 0x7f ? c : '.';
		return;
	}
	v->line[v->line_len] = '\0';
	vfm_info("guest", "%s", v->line);
	pthread_mutex_lock(&k->lock);
	for (unsigned i = 0; i <= v->line_len; i++) {
		k->console[(k->con_head + k->con_len) % sizeof(k->console)] =
			i < v->line_len ? v->line[i] : '\n';
		if (k->con_len < sizeof(k->console))
			k->con_len++;
		else
			k->con_head = (k->con_head + 1) % sizeof(k->console);
	}
	pthread_mutex_unlock(&k->lock);
	v->line_len = 0;
	if (c != '\n')
		v->line[v->line_len++] = c;
}

static bool should_run(const struct kvm_guest *k, const struct kvm_vcpu *v)
{
	return k->run && !k->quit && !v->failed;
}

/* Under k->lock: v acknowledges the last kick (kvm_kick_ns), if it has not. */
static void kick_ack(struct kvm_guest *k, struct kvm_vcpu *v)
{
	if (v->kick_seen != k->kick) {
		v->kick_seen = k->kick;
		pthread_cond_broadcast(&k->cond);
	}
}

/* ts = CLOCK_MONOTONIC now + ns: a deadline for k->cond, which waits on that clock. */
void vfm__kvm_deadline(struct timespec *ts, uint64_t ns)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ns += (uint64_t)ts->tv_nsec;
	ts->tv_sec += (time_t)(ns / 1000000000ull);
	ts->tv_nsec = (long)(ns % 1000000000ull);
}

/*
 * The guest has nothing to do for us microseconds: sleep unless stopped.
 * The wait must really sleep: a vCPU thread that comes straight back is
 * always runnable, and the scheduler then runs it in time slices against
 * the VM's other threads (the heartbeat went silent for 3-10 ms, a slice,
 * whenever a migration thread had work). The deadline here was once
 * CLOCK_MONOTONIC while the condition waited on CLOCK_REALTIME: every wait
 * timed out at once and the vCPU spun through idle exits at 100 % CPU.
 * idle_early counts waits that time out before their deadline (must stay 0).
 */
static void idle(struct kvm_vcpu *v, uint32_t us)
{
	struct kvm_guest *k = v->k;
	struct timespec ts;
	uint64_t until;

	if (us > 100000)
		us = 100000;
	until = vfm__kvm_now_ns() + (uint64_t)us * 1000;
	vfm__kvm_deadline(&ts, (uint64_t)us * 1000);
	atomic_fetch_add(&k->idle_waits, 1);
	pthread_mutex_lock(&k->lock);
	while (should_run(k, v)) {
		kick_ack(k, v);   /* and sleeps on, as a halted vCPU would */
		if (pthread_cond_timedwait(&k->cond, &k->lock, &ts) == ETIMEDOUT) {
			if (vfm__kvm_now_ns() < until)
				atomic_fetch_add(&k->idle_early, 1);
			break;
		}
	}
	pthread_mutex_unlock(&k->lock);
}

static void fail(struct kvm_vcpu *v, const char *fmt, ...) VFM_PRINTF(2, 3);
static void fail(struct kvm_vcpu *v, const char *fmt, ...)
{
	struct kvm_regs regs;
	char msg[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
		memset(&regs, 0, sizeof(regs));
	vfm_err("kvm", "vCPU %u stops for good: %s (rip 0x%llx)", v->idx, msg, regs.rip);
	pthread_mutex_lock(&v->k->lock);
	v->failed = true;
	pthread_mutex_unlock(&v->k->lock);
}

static void exit_io(struct kvm_vcpu *v)
{
	struct kvm_run *run = v->run;
	unsigned char *data = (unsigned char *)run + run->io.data_offset;
	uint32_t val = 0;

	v->pending = true;
	if (run->io.direction == KVM_EXIT_IO_IN) {
		memset(data, 0xff, (size_t)run->io.size * run->io.count);
		return;
	}
	memcpy(&val, data, run->io.size < 4 ? run->io.size : 4);
	switch (run->io.port) {
	case KG_PORT_CONSOLE:
		for (uint32_t i = 0; i < run->io.count; i++)
			console_byte(v, (char)data[i * run->io.size]);
		break;
	case KG_PORT_IDLE:
		idle(v, val);
		break;
	case KG_PORT_PANIC:
		fail(v, "guest panic, code %u", val);
		break;
	case KG_PORT_HEARTBEAT:
		if (run->io.size == 1)
			vfm__kvm_heartbeat(v->k, data, run->io.count);
		break;
	default:
		vfm_debug("kvm", "vCPU %u: out 0x%x to port 0x%x ignored", v->idx, val,
			  run->io.port);
		break;
	}
}

static void mmio_handlers(struct kvm_vcpu *v)
{
	struct kvm_run *run = v->run;
	const struct vfm_kvm_mmio_ops *mmio = v->k->opts.mmio;
	unsigned len = run->mmio.len;

	if (vfm__kvm_dev_mmio(v->k, run->mmio.phys_addr, run->mmio.data, len, run->mmio.is_write))
		return;
	if (run->mmio.is_write) {
		if (!mmio || !mmio->write ||
		    mmio->write(v->k->opts.mmio_opaque, run->mmio.phys_addr, run->mmio.data, len))
			vfm_debug("kvm", "vCPU %u: MMIO write of %u at 0x%llx dropped", v->idx,
				  len, run->mmio.phys_addr);
		return;
	}
	if (!mmio || !mmio->read ||
	    mmio->read(v->k->opts.mmio_opaque, run->mmio.phys_addr, run->mmio.data, len)) {
		memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
		vfm_debug("kvm", "vCPU %u: MMIO read of %u at 0x%llx: all-ones", v->idx, len,
			  run->mmio.phys_addr);
	}
}

/*
 * The access completes whatever stop does meanwhile (a device doorbell is
 * not half rung): the kick stays pending while the handler runs and sets
 * immediate_exit when it is unblocked, before the vCPU parks.
 */
static void exit_mmio(struct kvm_vcpu *v)
{
	sigset_t kick, old;

	v->pending = true;
	sigemptyset(&kick);
	sigaddset(&kick, KICK_SIGNAL);
	pthread_sigmask(SIG_BLOCK, &kick, &old);
	mmio_handlers(v);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void handle_exit(struct kvm_vcpu *v)
{
	struct kvm_run *run = v->run;

	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		exit_io(v);
		break;
	case KVM_EXIT_MMIO:
		exit_mmio(v);
		break;
	case KVM_EXIT_INTR:
		break;
	case KVM_EXIT_HLT:
		/* No interrupts exist for this guest: a halt is the end. */
		fail(v, "guest halted");
		break;
	case KVM_EXIT_SHUTDOWN:
		fail(v, "guest shut down (triple fault)");
		break;
	case KVM_EXIT_FAIL_ENTRY:
		fail(v, "entry failed, reason 0x%llx",
		     (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		break;
	case KVM_EXIT_INTERNAL_ERROR:
		fail(v, "KVM internal error, suberror %u", run->internal.suberror);
		break;
	default:
		fail(v, "unexpected exit reason %u", run->exit_reason);
		break;
	}
}

/*
 * An I/O or MMIO exit completes on the next KVM_RUN; entering with
 * immediate_exit finishes it without running guest code, so the state a
 * parked vCPU shows is complete (KVM's documented way before migrating).
 */
static void finish_pending(struct kvm_vcpu *v)
{
	v->run->immediate_exit = 1;
	if (ioctl(v->fd, KVM_RUN, 0) == 0 || errno != EINTR)
		vfm_warn("kvm", "vCPU %u: completing an exit: %s", v->idx, strerror(errno));
	v->run->immediate_exit = 0;
	v->pending = false;
}

/*
 * auto-converge, as QEMU's cpu-throttle (softmmu/cpu-throttle.c): every
 * THROTTLE_SLICE_NS the throttle thread kicks the running vCPUs out of
 * KVM_RUN, and each sleeps pct / (100 - pct) of a slice before it enters
 * again. A stop's kick cuts the sleep short (EINTR).
 */
#define THROTTLE_SLICE_NS 10000000ull

static void throttle_sleep(struct kvm_vcpu *v)
{
	struct kvm_guest *k = v->k;
	unsigned pct = atomic_load(&k->throttle);
	uint64_t now = vfm__kvm_now_ns(), until;

	if (!pct)
		return;
	/* A slice of running first: kicks come every slice, in no phase with
	 * this vCPU's sleeps. */
	if (now - v->throttle_woke < THROTTLE_SLICE_NS)
		return;
	until = now + THROTTLE_SLICE_NS * pct / (100 - pct);
	/* On the condition, not in nanosleep: the throttle's own kicks must not
	 * cut the sleep short; a stop or quit (broadcast) does. */
	pthread_mutex_lock(&k->lock);
	while (k->run && !k->quit && vfm__kvm_now_ns() < until) {
		struct timespec ts;
		uint64_t left = until - vfm__kvm_now_ns();

		kick_ack(k, v);
		vfm__kvm_deadline(&ts, left < 1000000000ull ? left : 999999999ull);
		pthread_cond_timedwait(&k->cond, &k->lock, &ts);
	}
	pthread_mutex_unlock(&k->lock);
	atomic_fetch_add(&k->throttle_ns, vfm__kvm_now_ns() - now);
	/* A kick while asleep left immediate_exit set: the loop re-checks
	 * should_run under the lock before it enters, so dropping it is safe. */
	v->run->immediate_exit = 0;
	v->throttle_woke = vfm__kvm_now_ns();
}

static void kick_all(struct kvm_guest *k);

static void *throttle_main(void *arg)
{
	struct kvm_guest *k = arg;
	struct timespec ts = { 0, (long)THROTTLE_SLICE_NS };

	for (;;) {
		pthread_mutex_lock(&k->lock);
		if (k->quit || !atomic_load(&k->throttle)) {
			pthread_mutex_unlock(&k->lock);
			return NULL;
		}
		if (k->run)
			kick_all(k);
		pthread_mutex_unlock(&k->lock);
		nanosleep(&ts, NULL);
	}
}

/* Ends the throttle thread (throttle already 0 or quit set). */
static void throttle_join(struct kvm_guest *k)
{
	bool live;

	pthread_mutex_lock(&k->lock);
	live = k->throttle_live;
	k->throttle_live = false;
	pthread_mutex_unlock(&k->lock);
	if (live)
		pthread_join(k->throttle_thread, NULL);
}

static void kvm_set_throttle(struct vfm_guest *g, unsigned pct)
{
	struct kvm_guest *k = (struct kvm_guest *)g;

	atomic_store(&k->throttle, pct > 99 ? 99 : pct);
	if (!pct) {
		throttle_join(k);
		return;
	}
	pthread_mutex_lock(&k->lock);
	if (!k->throttle_live && !k->quit &&
	    vfm_thread_create(&k->throttle_thread, NULL, throttle_main, k) == 0)
		k->throttle_live = true;
	pthread_mutex_unlock(&k->lock);
}

/*
 * The vCPU thread's scheduling: a short slice request (sched_attr's
 * sched_runtime for SCHED_OTHER: EEVDF's custom slice, Linux 6.12+; older
 * kernels ignore it) keeps the vCPU's share of the CPU but gives it an early
 * virtual deadline, so a vCPU that wakes from an idle wait runs ahead of the
 * VM's busy service threads instead of after their 1.4 ms slices (kernel
 * commit "sched/eevdf: Allow shorter slices to wakeup-preempt"; the migration
 * threads of a 2-CPU host kept the heartbeat silent 3-12 ms). Unprivileged;
 * the thread's policy and nice value are kept. The slice in force is read
 * back for query-vfiomig (0: the call failed or the kernel has none).
 */
struct vfm_sched_attr {         /* struct sched_attr of linux/sched/types.h (v1) */
	uint32_t size, sched_policy;
	uint64_t sched_flags;
	int32_t sched_nice;
	uint32_t sched_priority;
	uint64_t sched_runtime, sched_deadline, sched_period;
	uint32_t sched_util_min, sched_util_max;
};

static void vcpu_sched(struct kvm_vcpu *v)
{
	struct kvm_guest *k = v->k;
	struct vfm_sched_attr a;

	memset(&a, 0, sizeof(a));
	if (syscall(SYS_sched_getattr, 0, &a, sizeof(a), 0))
		return;
	if (k->opts.vcpu_slice_us && a.sched_policy == SCHED_OTHER) {
		a.size = sizeof(a);
		a.sched_flags = 0;
		a.sched_runtime = (uint64_t)k->opts.vcpu_slice_us * 1000;
		if (syscall(SYS_sched_setattr, 0, &a, 0))
			vfm_warn("kvm", "vCPU %u: slice of %u us: %s", v->idx, k->opts.vcpu_slice_us,
				 strerror(errno));
		memset(&a, 0, sizeof(a));
		if (syscall(SYS_sched_getattr, 0, &a, sizeof(a), 0))
			return;
	}
	atomic_store(&v->slice_ns, a.sched_runtime);
}

static void *vcpu_thread(void *arg)
{
	struct kvm_vcpu *v = arg;
	struct kvm_guest *k = v->k;
	char name[16];
	sigset_t set;

	/* "vcpuN" in ps, perf and the scheduler's trace (QEMU's "CPU N/KVM"). */
	snprintf(name, sizeof(name), "vcpu%u", v->idx);
	pthread_setname_np(pthread_self(), name);
	vcpu_sched(v);
	tls_run = v->run;
	sigemptyset(&set);
	sigaddset(&set, KICK_SIGNAL);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);

	pthread_mutex_lock(&k->lock);
	for (;;) {
		kick_ack(k, v);
		if (!should_run(k, v)) {
			struct kvm_regs regs;

			if (v->pending) {
				pthread_mutex_unlock(&k->lock);
				finish_pending(v);
				pthread_mutex_lock(&k->lock);
				continue;
			}
			if (k->quit)
				break;
			if (ioctl(v->fd, KVM_GET_REGS, &regs) == 0)
				v->rip = regs.rip;
			v->parked = true;
			k->parked++;
			pthread_cond_broadcast(&k->cond);
			while (!should_run(k, v) && !k->quit)
				pthread_cond_wait(&k->cond, &k->lock);
			v->parked = false;
			k->parked--;
			continue;
		}
		pthread_mutex_unlock(&k->lock);
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			int e = errno;

			v->run->immediate_exit = 0;
			if (e != EINTR && e != EAGAIN)
				fail(v, "KVM_RUN: %s", strerror(e));
			else if (e == EINTR)
				throttle_sleep(v);
		} else {
			handle_exit(v);
		}
		pthread_mutex_lock(&k->lock);
	}
	pthread_mutex_unlock(&k->lock);
	return NULL;
}

/* ---- Guest ops ---- */

static int kvm_start(struct vfm_guest *g, struct vfm_error *err)
{
	struct kvm_guest *k = (struct kvm_guest *)g;

	pthread_mutex_lock(&k->lock);
	if (!k->state_ready) {
		pthread_mutex_unlock(&k->lock);
		return vfm_error_set(err, -EAGAIN, "kvm guest: no vCPU state loaded yet");
	}
	k->run = true;
	pthread_cond_broadcast(&k->cond);
	pthread_mutex_unlock(&k->lock);
	g->running = true;
	return 0;
}

static unsigned live_vcpus(const struct kvm_guest *k)
{
	unsigned n = 0;

	for (unsigned i = 0; i < k->nvcpus; i++)
		n += k->vcpu[i].thread_live;
	return n;
}

/* Under k->lock: kicks every vCPU that has not parked yet. */
static void kick_all(struct kvm_guest *k)
{
	for (unsigned i = 0; i < k->nvcpus; i++)
		if (k->vcpu[i].thread_live && !k->vcpu[i].parked)
			pthread_kill(k->vcpu[i].thread, KICK_SIGNAL);
}

/* Under k->lock: a vCPU that runs has not acknowledged the last kick. */
static bool kick_pending(const struct kvm_guest *k)
{
	for (unsigned i = 0; i < k->nvcpus; i++) {
		const struct kvm_vcpu *v = &k->vcpu[i];

		if (v->thread_live && !v->parked && !v->failed && v->kick_seen != k->kick)
			return true;
	}
	return false;
}

/*
 * As kvm_stop, up to where the vCPUs would park: each is kicked out of
 * KVM_RUN (or woken from an idle or throttle sleep), acknowledges under the
 * lock and goes on running. Gives up after STOP_TIMEOUT_NS, as a stop would.
 */
static uint64_t kvm_kick_ns(struct vfm_guest *g)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	uint64_t t0 = vfm__kvm_now_ns(), took = 0;

	pthread_mutex_lock(&k->lock);
	if (k->run && !k->quit) {
		k->kick++;
		pthread_cond_broadcast(&k->cond);
		while (k->run && !k->quit && kick_pending(k) &&
		       vfm__kvm_now_ns() - t0 < STOP_TIMEOUT_NS) {
			struct timespec ts;

			kick_all(k);   /* again every 10 ms: as kvm_stop */
			vfm__kvm_deadline(&ts, 10000000ull);
			pthread_cond_timedwait(&k->cond, &k->lock, &ts);
		}
		took = vfm__kvm_now_ns() - t0;
	}
	pthread_mutex_unlock(&k->lock);
	return took;
}

static int kvm_stop(struct vfm_guest *g)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	uint64_t deadline = vfm__kvm_now_ns() + STOP_TIMEOUT_NS;
	unsigned live;
	int ret = 0;

	pthread_mutex_lock(&k->lock);
	if (k->run)
		k->pauses++;
	k->run = false;
	pthread_cond_broadcast(&k->cond);
	live = live_vcpus(k);
	while (k->parked < live) {
		struct timespec ts;

		/* Kick again every 10 ms: a vCPU between its run check and
		 * KVM_RUN sees the first kick through immediate_exit, but one
		 * that was handling an exit may have cleared it. */
		kick_all(k);
		vfm__kvm_deadline(&ts, 10000000ull);
		pthread_cond_timedwait(&k->cond, &k->lock, &ts);
		if (k->parked < live && vfm__kvm_now_ns() > deadline) {
			vfm_err("kvm", "%u of %u vCPUs did not park", live - k->parked, live);
			ret = -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(&k->lock);
	g->running = false;
	return ret;
}

int vfm_guest_kvm_sync_dirty(struct vfm_guest *g)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	int total = 0;

	pthread_mutex_lock(&k->dirty_lock);
	for (unsigned i = 0; i < k->nslots; i++) {
		struct kvm_slot *s = &k->slot[i];
		struct kvm_dirty_log log;

		memset(&log, 0, sizeof(log));
		memset(s->bitmap, 0, s->bitmap_bytes);
		log.slot = s->slot;
		log.dirty_bitmap = s->bitmap;
		if (ioctl(k->vm_fd, KVM_GET_DIRTY_LOG, &log) < 0) {
			total = -errno;
			vfm_err("kvm", "KVM_GET_DIRTY_LOG slot %u: %s", s->slot, strerror(errno));
			break;
		}
		for (size_t w = 0; w < s->bitmap_bytes / 8; w++)
			total += __builtin_popcountll(s->bitmap[w]);
		vfm_dirty_merge(g->mem, s->gpa, s->size, KG_PAGE_SIZE, s->bitmap, NULL);
	}
	pthread_mutex_unlock(&k->dirty_lock);
	return total;
}

static void kvm_destroy(struct vfm_guest *g)
{
	struct kvm_guest *k = (struct kvm_guest *)g;

	pthread_mutex_lock(&k->lock);
	k->quit = true;
	pthread_cond_broadcast(&k->cond);
	kick_all(k);
	pthread_mutex_unlock(&k->lock);
	throttle_join(k);
	for (unsigned i = 0; i < k->nvcpus; i++) {
		struct kvm_vcpu *v = &k->vcpu[i];

		if (v->thread_live)
			pthread_join(v->thread, NULL);
		if (v->run)
			munmap(v->run, v->run_size);
		if (v->fd >= 0)
			close(v->fd);
	}
	for (unsigned i = 0; i < k->nslots; i++)
		free(k->slot[i].bitmap);
	vfm__kvm_free_savables(k);
	vfm__kvm_heartbeat_close(k);
	if (k->vm_fd >= 0)
		close(k->vm_fd);
	if (k->kvm_fd >= 0)
		close(k->kvm_fd);
	pthread_mutex_destroy(&k->dirty_lock);
	pthread_cond_destroy(&k->cond);
	pthread_mutex_destroy(&k->lock);
	free(k);
}

uint64_t vfm__kvm_written(struct kvm_guest *k)
{
	uint64_t n = 0;

	for (unsigned i = 0; i < k->nvcpus; i++)
		n += ((volatile struct kg_vcpu_stats *)&k->mb->vcpu[i])->pages_written;
	return n;
}

static void kvm_stats(struct vfm_guest *g, struct vfm_guest_stats *st)
{
	struct kvm_guest *k = (struct kvm_guest *)g;

	memset(st, 0, sizeof(*st));
	if (k->mb->magic == KG_MAGIC) {
		st->page_writes = vfm__kvm_written(k) - k->written_base;
		st->dma_ops = vfm__kvm_dev_ops(k) - k->dma_base;
	}
	st->dma_errors = vfm__kvm_dev_failed(k);
}

static const struct vfm_guest_ops kvm_ops = {
	.kind = "kvm",
	.start = kvm_start,
	.stop = kvm_stop,
	.kick_ns = kvm_kick_ns,
	.verify = vfm__kvm_verify,
	.quick_verify = vfm__kvm_quick_verify,
	.stats = kvm_stats,
	.destroy = kvm_destroy,
	.sync_dirty = vfm_guest_kvm_sync_dirty,
	.set_throttle = kvm_set_throttle,
};

/* ---- Creation ---- */

static int add_slots(struct kvm_guest *k, struct vfm_error *err)
{
	for (unsigned i = 0; i < vfm_guest_mem_num_regions(k->g.mem); i++) {
		const struct vfm_mem_region *r = vfm_guest_mem_region(k->g.mem, i);
		struct kvm_userspace_memory_region mr = {
			.slot = i,
			.flags = KVM_MEM_LOG_DIRTY_PAGES,
			.guest_phys_addr = r->gpa,
			.memory_size = r->size,
			.userspace_addr = (uint64_t)(uintptr_t)r->host,
		};
		struct kvm_slot *s = &k->slot[k->nslots];
		uint64_t pages = r->size / KG_PAGE_SIZE;

		s->slot = i;
		s->gpa = r->gpa;
		s->size = r->size;
		s->bitmap_bytes = (size_t)((pages + 63) / 64 * 8);
		s->bitmap = calloc(1, s->bitmap_bytes);
		if (!s->bitmap)
			return vfm_error_set(err, -ENOMEM, "out of memory");
		k->nslots++;
		if (ioctl(k->vm_fd, KVM_SET_USER_MEMORY_REGION, &mr) < 0)
			return vfm_error_set(err, -errno, "KVM_SET_USER_MEMORY_REGION 0x%" PRIx64
					     "+0x%" PRIx64 ": %s", r->gpa, r->size,
					     strerror(errno));
	}
	return 0;
}

static int boot_vcpu(struct kvm_guest *k, struct kvm_vcpu *v, struct vfm_error *err)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		return vfm_error_set(err, -errno, "KVM_GET_SREGS: %s", strerror(errno));
	vfm__kvm_boot_vcpu_regs(k, v->idx, &regs, &sregs);
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
		return vfm_error_set(err, -errno, "KVM_SET_SREGS: %s", strerror(errno));
	if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		return vfm_error_set(err, -errno, "KVM_SET_REGS: %s", strerror(errno));
	return 0;
}

static int create_vcpu(struct kvm_guest *k, unsigned idx, int run_size, struct vfm_error *err)
{
	struct kvm_vcpu *v = &k->vcpu[idx];
	int ret;

	v->fd = ioctl(k->vm_fd, KVM_CREATE_VCPU, (unsigned long)idx);
	if (v->fd < 0)
		return vfm_error_set(err, -errno, "KVM_CREATE_VCPU %u: %s", idx, strerror(errno));
	v->run_size = (size_t)run_size;
	v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED) {
		v->run = NULL;
		return vfm_error_set(err, -errno, "mapping vCPU %u's run area: %s", idx,
				     strerror(errno));
	}
	if ((ret = vfm__kvm_setup_vcpu(k, v, err)))
		return ret;
	if (!k->tsc_khz) {
		int khz = ioctl(v->fd, KVM_GET_TSC_KHZ, 0);
		if (khz <= 0)
			return vfm_error_set(err, -errno, "KVM_GET_TSC_KHZ: %s", strerror(errno));
		k->tsc_khz = (uint64_t)khz;
	}
	if (k->opts.fresh && (ret = boot_vcpu(k, v, err)))
		return vfm_error_set(err, ret, "vCPU %u", idx);
	/* vCPU threads take no process signals but the kick (vcpu_thread
	 * unblocks it). */
	ret = vfm_thread_create(&v->thread, NULL, vcpu_thread, v);
	if (ret)
		return vfm_error_set(err, -ret, "starting vCPU %u's thread", idx);
	v->thread_live = true;
	return 0;
}

int vfm_guest_kvm_new(struct vfm_guest_mem *mem, const struct vfm_kvm_opts *opts,
		      struct vfm_guest **out, struct vfm_error *err)
{
	struct kvm_guest *k;
	int ret, run_size;

	k = calloc(1, sizeof(*k));
	if (!k)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	k->g.ops = &kvm_ops;
	k->g.mem = mem;
	k->kvm_fd = k->vm_fd = k->hb_fd = -1;
	for (unsigned i = 0; i < VFM_KVM_MAX_VCPUS; i++) {
		k->vcpu[i].fd = -1;
		k->vcpu[i].k = k;
		k->vcpu[i].idx = i;
	}
	if (opts)
		k->opts = *opts;
	else
		k->opts.fresh = true;
	k->nvcpus = k->opts.vcpus ? k->opts.vcpus : 2;
	if (!k->opts.check_timeout_ms)
		k->opts.check_timeout_ms = 10000;
	pthread_mutex_init(&k->lock, NULL);
	{
		pthread_condattr_t ca;

		/* Every wait on cond is timed on CLOCK_MONOTONIC (vfm__kvm_deadline). */
		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&k->cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	pthread_mutex_init(&k->dirty_lock, NULL);
	if (k->nvcpus > VFM_KVM_MAX_VCPUS || k->nvcpus > KG_MAX_VCPUS) {
		ret = vfm_error_set(err, -EINVAL, "kvm guest: %u vCPUs (max %d)", k->nvcpus,
				    VFM_KVM_MAX_VCPUS);
		goto err_free;
	}
	pthread_once(&kick_once, install_kick);
	if ((ret = vfm__kvm_heartbeat_open(k, k->opts.heartbeat, err)))
		goto err_free;

	k->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (k->kvm_fd < 0) {
		ret = vfm_error_set(err, -errno, "/dev/kvm: %s", strerror(errno));
		goto err_free;
	}
	if (ioctl(k->kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION ||
	    ioctl(k->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT) <= 0 ||
	    ioctl(k->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) <= 0) {
		ret = vfm_error_set(err, -ENOTSUP, "/dev/kvm lacks the API version or the "
				    "capabilities this VMM needs");
		goto err_free;
	}
	if ((ret = vfm__kvm_probe_state(k, err)))
		goto err_free;
	run_size = ioctl(k->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size <= 0) {
		ret = vfm_error_set(err, -errno, "KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
		goto err_free;
	}
	k->vm_fd = ioctl(k->kvm_fd, KVM_CREATE_VM, 0UL);
	if (k->vm_fd < 0) {
		ret = vfm_error_set(err, -errno, "KVM_CREATE_VM: %s", strerror(errno));
		goto err_free;
	}
	if ((ret = vfm__kvm_dev_init(k, err)) || (ret = vfm__kvm_layout(k, err)) ||
	    (ret = add_slots(k, err)) || (ret = vfm__kvm_dev_slots(k, err)))
		goto err_free;
	for (unsigned i = 0; i < k->nvcpus; i++)
		if ((ret = create_vcpu(k, i, run_size, err)))
			goto err_free;
	if (k->opts.fresh) {
		k->mb->tsc_khz = k->tsc_khz;
		vfm__kvm_mark(k, k->mb, KG_PAGE_SIZE);
	}
	k->state_ready = k->opts.fresh;
	vfm_info("kvm", "VM with %u vCPUs over %u memory slots, %u dma device%s (%u window "
		 "slot%s)%s", k->nvcpus, k->nslots, k->ndev, k->ndev == 1 ? "" : "s", k->nwin_slots,
		 k->nwin_slots == 1 ? "" : "s",
		 k->opts.fresh ? "" : ", waiting for migrated state");
	*out = &k->g;
	return 0;

err_free:
	kvm_destroy(&k->g);
	return ret;
}

/* ---- Accessors ---- */

void vfm_guest_kvm_set_dirty_rate(struct vfm_guest *g, uint64_t bytes_per_s)
{
	struct kvm_guest *k = (struct kvm_guest *)g;

	k->mb->rate_pages = bytes_per_s / KG_PAGE_SIZE;
	vfm__kvm_mark(k, &k->mb->rate_pages, sizeof(k->mb->rate_pages));
}

unsigned vfm_guest_kvm_vcpus(struct vfm_guest *g)
{
	return ((struct kvm_guest *)g)->nvcpus;
}

int vfm_guest_kvm_vcpu_info(struct vfm_guest *g, unsigned idx, struct vfm_kvm_vcpu_info *out)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	const volatile struct kg_vcpu_stats *st;

	if (idx >= k->nvcpus)
		return -EINVAL;
	st = &k->mb->vcpu[idx];
	memset(out, 0, sizeof(*out));
	out->pages_written = st->pages_written;
	out->check_seq = st->check_seq;
	out->booted = st->booted == 1;
	pthread_mutex_lock(&k->lock);
	out->failed = k->vcpu[idx].failed;
	out->rip = k->vcpu[idx].rip;
	pthread_mutex_unlock(&k->lock);
	return 0;
}

void vfm_guest_kvm_sched_info(struct vfm_guest *g, struct vfm_kvm_sched_info *out)
{
	struct kvm_guest *k = (struct kvm_guest *)g;

	memset(out, 0, sizeof(*out));
	out->idle_waits = atomic_load(&k->idle_waits);
	out->idle_early = atomic_load(&k->idle_early);
	out->slice_ns = atomic_load(&k->vcpu[0].slice_ns);
	out->tsc_advance_ns = atomic_load(&k->tsc_advance_ns);
	out->throttle_ns = atomic_load(&k->throttle_ns);
	pthread_mutex_lock(&k->lock);
	out->pauses = k->pauses;
	pthread_mutex_unlock(&k->lock);
}

size_t vfm_guest_kvm_console(struct vfm_guest *g, char *buf, size_t len)
{
	struct kvm_guest *k = (struct kvm_guest *)g;
	size_t n;

	if (!len)
		return 0;
	pthread_mutex_lock(&k->lock);
	n = k->con_len < len - 1 ? k->con_len : len - 1;
	for (size_t i = 0; i < n; i++)
		buf[i] = k->console[(k->con_head + k->con_len - n + i) % sizeof(k->console)];
	pthread_mutex_unlock(&k->lock);
	buf[n] = '\0';
	return n;
}
