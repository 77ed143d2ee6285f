/* The main loop: one poll() over the control socket, the vfio-user device
 * sockets (server-initiated DMA between requests), IRQ eventfds and a
 * signal eventfd. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "util/logging.h"
#include "vmm/main_loop.h"

#define MAX_FDS 64
/* Bounds how late a device whose poll was deferred is looked at again. */
#define LOOP_TIMEOUT_MS 50

static int signal_fd = -1;
static volatile sig_atomic_t signal_seen;

static void on_signal(int sig)
{
	int saved = errno;
	uint64_t one = 1;

	signal_seen = sig;
	if (write(signal_fd, &one, sizeof(one)) < 0)
		(void)0;   /* the eventfd is readable already */
	errno = saved;
}

int vm_main_loop(struct vm *vm, struct control *ctl)
{
	struct sigaction sa = { .sa_handler = on_signal };
	struct pollfd pfd[MAX_FDS];
	int sig = 0;

	signal_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	sigemptyset(&sa.sa_mask);
	if (signal_fd >= 0) {
		sigaction(SIGINT, &sa, NULL);
		sigaction(SIGTERM, &sa, NULL);
	}
	while (!control_quit_requested(ctl)) {
		unsigned n = 0, nctl, ndev;

		if (signal_fd >= 0)
			pfd[n++] = (struct pollfd){ .fd = signal_fd, .events = POLLIN };
		nctl = control_poll_fds(ctl, pfd + n, MAX_FDS - n);
		ndev = vm_poll_fds(vm, pfd + n + nctl, MAX_FDS - n - nctl);
		if (poll(pfd, n + nctl + ndev, LOOP_TIMEOUT_MS) < 0) {
			if (errno == EINTR)
				continue;
			vfm_err("vm", "poll: %s", strerror(errno));
			break;
		}
		if (signal_seen) {
			sig = signal_seen;
			vfm_info("vm", "signal %d: shutting down", sig);
			break;
		}
		control_poll_handle(ctl, pfd + n, nctl);
		vm_poll_handle(vm, pfd + n + nctl, ndev);
	}
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	if (signal_fd >= 0)
		close(signal_fd);
	signal_fd = -1;
	return sig;
}
