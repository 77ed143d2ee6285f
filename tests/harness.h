/*
 * A small test runner: TEST(name) { ... } registers a test; main() runs each
 * in its own forked process with a timeout and prints TAP, so meson counts
 * every case. CHECK* macros report the failing expression and exit the child.
 * Set VFM_TEST_NOFORK=1 to run in-process (for gdb), pass names to filter.
 */
#ifndef VFM_TESTS_HARNESS_H
#define VFM_TESTS_HARNESS_H

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef void (*vfm_test_fn)(void);

/* A test file's helpers may define this: called in a case's process after the
 * case passed (e.g. to remove its temp dir; a failed case leaves it to look at). */
void vfm_test_passed(void) __attribute__((weak));

/* Monotonic milliseconds, and a sleep of ms, for the tests' bounded waits. */
static inline uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static inline void nap_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };

	nanosleep(&ts, NULL);
}

struct vfm_test_case {
	const char *name;
	vfm_test_fn fn;
	unsigned timeout_s;
};

#define VFM_TEST_MAX 512
static struct vfm_test_case vfm_tests[VFM_TEST_MAX];
static unsigned vfm_ntests;
static unsigned vfm_default_timeout_s = 30;

static inline void vfm_test_register(const char *name, vfm_test_fn fn, unsigned timeout_s)
{
	if (vfm_ntests >= VFM_TEST_MAX) {
		fprintf(stderr, "too many tests\n");
		abort();
	}
	vfm_tests[vfm_ntests++] = (struct vfm_test_case){ name, fn, timeout_s };
}

#define TEST_TIMEOUT(name, secs)                                              \
	static void test_##name(void);                                        \
	__attribute__((constructor)) static void register_##name(void)       \
	{                                                                     \
		vfm_test_register(#name, test_##name, secs);                  \
	}                                                                     \
	static void test_##name(void)
#define TEST(name) TEST_TIMEOUT(name, 0)

#define FAIL(...)                                                             \
	do {                                                                  \
		fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);               \
		fprintf(stderr, __VA_ARGS__);                                 \
		fprintf(stderr, "\n");                                        \
		exit(1);                                                      \
	} while (0)

/* The running test's skip reason goes to the parent over this pipe, which
 * prints it on the TAP line ("ok N - name # SKIP reason"). */
static int vfm_skip_fd = -1;

/* Skip the running test with a reason (exit code 77, as automake does). */
#define SKIP(...)                                                             \
	do {                                                                  \
		fprintf(stderr, "# SKIP: ");                                  \
		fprintf(stderr, __VA_ARGS__);                                 \
		fprintf(stderr, "\n");                                        \
		if (vfm_skip_fd >= 0)                                         \
			dprintf(vfm_skip_fd, __VA_ARGS__);                    \
		fflush(NULL);                                                 \
		_exit(77);                                                    \
	} while (0)

/*
 * Under `make valgrind` (which sets VFM_VALGRIND): code runs 20-50x slower and
 * valgrind runs one thread at a time, so a test bounded in real time (a
 * handshake within 400 ms) cannot hold there; such a test skips, saying so,
 * and a stress loop runs fewer rounds (what valgrind checks is the memory
 * use of each path, not how often it runs).
 */
static inline int vfm_test_under_valgrind(void)
{
	const char *v = getenv("VFM_VALGRIND");

	return v && *v && strcmp(v, "0");
}

#define SKIP_UNDER_VALGRIND(why)                                              \
	do {                                                                  \
		if (vfm_test_under_valgrind())                                \
			SKIP("under valgrind: %s", why);                      \
	} while (0)

#define CHECK(cond)                                                           \
	do {                                                                  \
		if (!(cond))                                                  \
			FAIL("CHECK(%s) failed", #cond);                      \
	} while (0)

#define CHECK_EQ(a, b)                                                        \
	do {                                                                  \
		long long va_ = (long long)(a), vb_ = (long long)(b);         \
		if (va_ != vb_)                                               \
			FAIL("CHECK_EQ(%s, %s): %lld != %lld", #a, #b, va_, vb_); \
	} while (0)

#define CHECK_STR(a, b)                                                       \
	do {                                                                  \
		const char *sa_ = (a), *sb_ = (b);                            \
		if (!sa_ || !sb_ || strcmp(sa_, sb_))                         \
			FAIL("CHECK_STR(%s, %s): '%s' != '%s'", #a, #b,       \
			     sa_ ? sa_ : "(null)", sb_ ? sb_ : "(null)");     \
	} while (0)

static inline int vfm_test_selected(int argc, char **argv, const char *name)
{
	if (argc < 2)
		return 1;
	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], name))
			return 1;
	return 0;
}

/* Runs t in a child; 0 passed, 1 skipped (reason in why), -1 failed. */
static inline int vfm_test_run_one(const struct vfm_test_case *t, char *why, size_t whylen)
{
	unsigned timeout = t->timeout_s ? t->timeout_s : vfm_default_timeout_s;
	int status, pfd[2];
	ssize_t n;
	pid_t pid;

	why[0] = '\0';
	if (pipe(pfd)) {
		perror("pipe");
		return -1;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		perror("fork");
		close(pfd[0]);
		close(pfd[1]);
		return -1;
	}
	if (pid == 0) {
		close(pfd[0]);
		vfm_skip_fd = pfd[1];
		alarm(timeout);  /* SIGALRM kills a hung test */
		t->fn();
		if (vfm_test_passed)
			vfm_test_passed();
		fflush(NULL);
		_exit(0);
	}
	close(pfd[1]);
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR) {
			close(pfd[0]);
			return -1;
		}
	}
	/* The child has exited: what it wrote is all there (a grandchild
	 * holding the pipe open makes this read wait, hence O_NONBLOCK). */
	fcntl(pfd[0], F_SETFL, O_NONBLOCK);
	n = read(pfd[0], why, whylen - 1);
	close(pfd[0]);
	why[n > 0 ? n : 0] = '\0';
	for (char *c = why; *c; c++)
		if (*c == '\n')
			*c = ' ';
	if (WIFSIGNALED(status)) {
		fprintf(stderr, "# %s: killed by signal %d%s\n", t->name, WTERMSIG(status),
			WTERMSIG(status) == SIGALRM ? " (timeout)" : "");
		return -1;
	}
	if (WEXITSTATUS(status) == 77)
		return 1;
	return WEXITSTATUS(status) == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
	unsigned n = 0, failed = 0, idx = 0;
	int nofork = getenv("VFM_TEST_NOFORK") != NULL;

	signal(SIGPIPE, SIG_IGN);
	for (unsigned i = 0; i < vfm_ntests; i++)
		n += (unsigned)vfm_test_selected(argc, argv, vfm_tests[i].name);
	printf("TAP version 13\n1..%u\n", n);
	for (unsigned i = 0; i < vfm_ntests; i++) {
		const struct vfm_test_case *t = &vfm_tests[i];
		char why[200] = "";
		int ok, r = 0;

		if (!vfm_test_selected(argc, argv, t->name))
			continue;
		if (nofork) {
			t->fn();
			ok = 1;
		} else {
			r = vfm_test_run_one(t, why, sizeof(why));
			ok = r >= 0;
		}
		/* A skip without a reason counts as a failure (test-summary.py). */
		printf("%sok %u - %s%s%s\n", ok ? "" : "not ", ++idx, t->name,
		       r == 1 ? " # SKIP " : "", r == 1 ? why : "");
		fflush(stdout);
		failed += !ok;
	}
	return failed ? 1 : 0;
}

#endif
