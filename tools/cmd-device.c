/* vfiomig device dma: run the sample vfio-user device server. */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "../devices/dma.h"
#include "commands.h"
#include "vfiomig/log.h"
#include "vfiomig/parse.h"
#include "vfiomig/vfu_server.h"

static volatile sig_atomic_t stop_signal;

static void on_signal(int sig)
{
	stop_signal = sig;
}

static void device_usage(FILE *out)
{
	fprintf(out,
		"usage: vfiomig device dma --socket PATH [--state-size SIZE] [--churn RATE]\n"
		"                          [--save-latency US] [--fault SPEC]... [--no-mig-shm]\n"
		"                          [--once] [-v]\n\n"
		"Serves the 'dma' sample device (a DMA engine with SIZE bytes of internal\n"
		"state, default 64M) over vfio-user on the UNIX socket PATH (mode 0600), to\n"
		"one client after another until SIGINT or SIGTERM.\n\n"
		"  --socket PATH        where to listen\n"
		"  --state-size SIZE    device memory, the migratable state (64M, 1G, ...)\n"
		"  --churn RATE         bytes per second rewritten while running (8M/s); 0 = none\n"
		"  --save-latency US    added per MiB of state read while saving (emulated firmware)\n"
		"  --fault SPEC         inject faults (tests), a comma list of arc:FROM>TO[:N],\n"
		"                       read[:N], write[:N], size, stall:MS[:N],\n"
		"                       trickle:MS[:N]; N = which\n"
		"                       occurrence (default 1, * = every); docs/devices/dma.md\n"
		"  --no-mig-shm         do not offer the vfiomig_mig_shm window: migration data\n"
		"                       in MIG_DATA_READ/WRITE payloads (docs/vfio-user-server.md)\n"
		"  --once               exit after the first client leaves\n"
		"  -v                   more logging (-vv, -vvv)\n");
}

static int usage_error(const char *fmt, ...) VFM_PRINTF(1, 2);

static int usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "vfiomig device dma: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	device_usage(stderr);
	return VFM_EXIT_USAGE;
}

static int serve(const char *socket, const struct vfm_dmadev_opts *o, bool once)
{
	struct sigaction sa = { .sa_handler = on_signal };
	struct vfm_error err = { 0 };
	struct vfm_dmadev *dev;
	int r, status = VFM_EXIT_OK;

	/* No SA_RESTART: the signal must interrupt the wait. */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (vfm_dmadev_create(socket, o, &dev, &err)) {
		fprintf(stderr, "vfiomig device dma: %s\n", err.msg);
		return VFM_EXIT_FAIL;
	}
	vfm_log(VFM_LOG_INFO, "dma", "listening on %s", socket);
	while (!stop_signal) {
		/* Bounded waits: a signal between the check and the wait costs
		 * at most this long. */
		r = vfm_vfu_run(vfm_dmadev_ctx(dev), 200, &err);
		if (r == -ENOTCONN && once)
			break;
		if (r && r != -ENOTCONN && r != -EINTR) {
			fprintf(stderr, "vfiomig device dma: %s\n", err.msg[0] ? err.msg : vfm_strerror(r));
			status = VFM_EXIT_FAIL;
			break;
		}
	}
	if (stop_signal)
		vfm_log(VFM_LOG_INFO, "dma", "stopping on signal %d", (int)stop_signal);
	vfm_dmadev_destroy(dev);
#ifdef __SANITIZE_ADDRESS__
	/*
	 * Sanitizer builds only: skip LeakSanitizer's exit-time check here.
	 * In the integration tests it sometimes never finished in this
	 * process (main thread spinning, LSan's tracer attached, for 20+
	 * minutes: seen 4 times under load, not reproduced alone), which hung
	 * whole test scripts. The device's code is leak-checked in-process by
	 * tests/unit/test_dma_device.c (ASan) and by make valgrind.
	 */
	fflush(NULL);
	_exit(status);
#endif
	return status;
}

int cmd_device(int argc, char **argv)
{
	struct vfm_dmadev_fault faults[DMADEV_FAULTS_MAX];
	struct vfm_dmadev_opts o = { .id = "dma", .faults = faults };
	const char *socket = NULL, *v;
	struct vfm_error err = { 0 };
	bool once = false;

	if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
		device_usage(stdout);
		return VFM_EXIT_OK;
	}
	if (argc < 2)
		return usage_error("%s", "which device? (dma)");
	if (strcmp(argv[1], "dma"))
		return usage_error("unknown device '%s' (only 'dma')", argv[1]);
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			device_usage(stdout);
			return VFM_EXIT_OK;
		} else if (!strcmp(a, "--once")) {
			once = true;
		} else if (!strcmp(a, "--no-mig-shm")) {
			o.no_mig_shm = true;
		} else if ((v = tool_opt_value(argc, argv, &i, "--socket"))) {
			socket = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--state-size"))) {
			if (vfm_parse_size(v, &o.state_size, &err) || !o.state_size)
				return usage_error("--state-size: %s", err.msg[0] ? err.msg : "must not be 0");
		} else if ((v = tool_opt_value(argc, argv, &i, "--churn"))) {
			if (vfm_parse_rate(v, &o.churn_rate, &err))
				return usage_error("--churn: %s", err.msg);
		} else if ((v = tool_opt_value(argc, argv, &i, "--save-latency"))) {
			if (vfm_parse_uint(v, 0, 10000000, &o.save_latency_us, &err))
				return usage_error("--save-latency: %s", err.msg);
		} else if ((v = tool_opt_value(argc, argv, &i, "--fault"))) {
			if (vfm_dmadev_parse_faults(v, faults, &o.nfaults, DMADEV_FAULTS_MAX, &err))
				return usage_error("--fault: %s", err.msg);
		} else {
			return usage_error("unknown or incomplete option '%s'", a);
		}
	}
	if (!socket || !*socket)
		return usage_error("%s", "--socket PATH is required");
	if (o.state_size % 4096)
		return usage_error("%s", "--state-size must be a multiple of 4K");
	return serve(socket, &o, once);
}
