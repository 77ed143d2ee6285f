/* vfiomig vm: the VM process (guest memory, devices, a guest, the migration
 * engine) driven through its control socket. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "migration/tls.h"
#include "vfiomig/parse.h"
#include "vmm/control.h"
#include "vmm/main_loop.h"
#include "vmm/vm.h"

#define DEFAULT_DIRTY_RATE (8ull << 20)

static void vm_usage(FILE *out)
{
	fprintf(out,
		"usage: vfiomig vm --mem SIZE [--device SPEC]... [--guest synthetic|kvm|auto|none]\n"
		"                  [--vcpus N] [--dirty-rate RATE] [--working-set SIZE]\n"
		"                  [--heartbeat PATH [--heartbeat-us N]] [--vcpu-slice-us N]\n"
		"                  [--incoming URI] [--tls-creds x509:DIR|psk:DIR] [--insecure]\n"
		"                  --control PATH [-v]\n\n"
		"Runs a VM: SIZE bytes of guest memory (memfd, mapped into every device for DMA),\n"
		"its devices, a guest, and the migration engine, controlled through a QMP-style\n"
		"socket at PATH (vfiomig ctl PATH ..., docs/control-protocol.md).\n\n"
		"  --mem SIZE          guest memory (64M, 1G, ...)\n"
		"  --device SPEC       vfio-user:SOCKET or vfio:/dev/vfio/devices/vfioN|BDF|UUID, with\n"
		"                      ,id=NAME ,enable-migration=on|off|auto ,allow-pre-copy=on|off\n"
		"                      ,pre-copy-dirty-page-tracking=on|off\n"
		"                      ,device-dirty-page-tracking=on|off\n"
		"                      ,migration-multifd-transfer=on|off|auto\n"
		"                      ,stop-copy-size=SIZE (repeatable, up to %d)\n"
		"  --guest KIND        synthetic (default): vCPU threads writing memory and driving\n"
		"                      'dma' devices, verifiable after migration; kvm: a KVM virtual\n"
		"                      machine running the guest program (needs /dev/kvm); auto: kvm\n"
		"                      when /dev/kvm works, else synthetic; none: no workload\n"
		"  --vcpus N           guest vCPUs (default 2; kvm: at most 32)\n"
		"  --dirty-rate RATE   bytes per second the vCPUs rewrite (default 8M/s; 0 = idle)\n"
		"  --working-set SIZE  kvm: memory the guest rewrites (default 4M)\n"
		"  --heartbeat PATH    kvm: the guest's heartbeat port (0xe8) to the UNIX socket\n"
		"                      PATH, one byte per beat (bench/vfm-heartbeat listens)\n"
		"  --heartbeat-us N    kvm, fresh guest: beat every N us (default 1000 with\n"
		"                      --heartbeat, else none; the period migrates with the guest)\n"
		"  --vcpu-slice-us N   kvm: the vCPU threads ask the scheduler for N us slices\n"
		"                      (default %d: a vCPU that wakes runs ahead of busy threads;\n"
		"                      0 = the kernel's default)\n"
		"  --incoming URI      wait for a migration on URI (tcp:HOST:PORT, port 0 = any;\n"
		"                      unix:PATH; file:PATH; fd:N), then run the guest\n"
		"  --tls-creds KIND:DIR  TLS 1.3 on every migration connection, in or out; x509:\n"
		"                      ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,\n"
		"                      client-key.pem (ca-crl.pem); psk: keys.psk (QEMU's layouts;\n"
		"                      docs/security.md). Control keys tls-hostname, tls-authz\n"
		"  --tls-authz ID      incoming: only this client certificate DN (as in\n"
		"                      CN=src,O=org) or PSK identity (repeatable; default any)\n"
		"  --insecure          allow --incoming tcp: on a non-loopback address without TLS\n"
		"  --control PATH      the control socket (mode 0600)\n"
		"  -v                  more logging (-vv, -vvv)\n", VM_MAX_DEVICES, VM_VCPU_SLICE_US);
}

static int usage_error(const char *fmt, ...) VFM_PRINTF(1, 2);

static int usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "vfiomig vm: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	vm_usage(stderr);
	return VFM_EXIT_USAGE;
}

static int parse_args(int argc, char **argv, struct vm_config *cfg, const char **control)
{
	struct vfm_error err = { 0 };
	bool hb_us_set = false;
	uint64_t n;
	const char *v;

	cfg->dirty_rate = DEFAULT_DIRTY_RATE;
	cfg->guest = "synthetic";
	cfg->vcpu_slice_us = VM_VCPU_SLICE_US;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		vfm_error_clear(&err);
		if ((v = tool_opt_value(argc, argv, &i, "--mem"))) {
			if (vfm_parse_size(v, &cfg->mem_size, &err) || cfg->mem_size < (1u << 20) ||
			    cfg->mem_size % 4096)
				return usage_error("--mem: %s", err.msg[0] ? err.msg :
						   "at least 1M, a multiple of 4K");
		} else if ((v = tool_opt_value(argc, argv, &i, "--device"))) {
			if (cfg->ndevices == VM_MAX_DEVICES)
				return usage_error("at most %d devices", VM_MAX_DEVICES);
			cfg->devices[cfg->ndevices++] = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--guest"))) {
			if (strcmp(v, "synthetic") && strcmp(v, "kvm") && strcmp(v, "auto") &&
			    strcmp(v, "none"))
				return usage_error("--guest: '%s' is not synthetic, kvm, auto or none",
						   v);
			cfg->guest = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--vcpus"))) {
			if (vfm_parse_uint(v, 1, 64, &n, &err))
				return usage_error("--vcpus: %s", err.msg);
			cfg->vcpus = (unsigned)n;
		} else if ((v = tool_opt_value(argc, argv, &i, "--dirty-rate"))) {
			if (vfm_parse_rate(v, &cfg->dirty_rate, &err))
				return usage_error("--dirty-rate: %s", err.msg);
		} else if ((v = tool_opt_value(argc, argv, &i, "--working-set"))) {
			if (vfm_parse_size(v, &cfg->working_set, &err) || cfg->working_set < 4096 ||
			    cfg->working_set % 4096)
				return usage_error("--working-set: %s", err.msg[0] ? err.msg :
						   "at least 4K, a multiple of 4K");
		} else if ((v = tool_opt_value(argc, argv, &i, "--heartbeat"))) {
			if (!*v)
				return usage_error("%s", "--heartbeat: empty path");
			cfg->heartbeat = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--heartbeat-us"))) {
			if (vfm_parse_uint(v, 10, 1000000, &n, &err))
				return usage_error("--heartbeat-us: %s", err.msg);
			cfg->heartbeat_us = (uint32_t)n;
			hb_us_set = true;
		} else if ((v = tool_opt_value(argc, argv, &i, "--vcpu-slice-us"))) {
			if (vfm_parse_uint(v, 0, 100000, &n, &err) || (n && n < 100))
				return usage_error("--vcpu-slice-us: %s", err.msg[0] ? err.msg :
						   "0, or 100 to 100000");
			cfg->vcpu_slice_us = (unsigned)n;
		} else if ((v = tool_opt_value(argc, argv, &i, "--incoming"))) {
			if (!*v)
				return usage_error("%s", "--incoming: empty URI");
			cfg->incoming = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--tls-creds"))) {
			if ((strncmp(v, "x509:", 5) || !v[5]) && (strncmp(v, "psk:", 4) || !v[4]))
				return usage_error("--tls-creds: '%s' is not x509:DIR or psk:DIR", v);
			if (strlen(v) >= 256)
				return usage_error("%s", "--tls-creds: path too long");
			cfg->tls_creds = v;
		} else if ((v = tool_opt_value(argc, argv, &i, "--tls-authz"))) {
			size_t have = strlen(cfg->tls_authz);

			if (!*v || strchr(v, '\n') || have + strlen(v) + 2 > sizeof(cfg->tls_authz))
				return usage_error("--tls-authz: '%.64s': empty, multi-line or too long",
						   v);
			snprintf(cfg->tls_authz + have, sizeof(cfg->tls_authz) - have, "%s%s",
				 have ? "\n" : "", v);
		} else if (!strcmp(a, "--insecure")) {
			cfg->insecure = true;
		} else if ((v = tool_opt_value(argc, argv, &i, "--control"))) {
			*control = v;
		} else {
			return usage_error("unknown or incomplete option '%s'", a);
		}
	}
	if (!cfg->mem_size)
		return usage_error("%s", "--mem SIZE is required");
	if ((cfg->heartbeat || hb_us_set) && (!strcmp(cfg->guest, "synthetic") ||
						  !strcmp(cfg->guest, "none")))
		return usage_error("--heartbeat: only the kvm guest beats (--guest kvm|auto), not '%s'",
				   cfg->guest);
	if (cfg->heartbeat && !hb_us_set)
		cfg->heartbeat_us = 1000;
	if (!*control || !**control)
		return usage_error("%s", "--control PATH is required");
	return 0;
}

int cmd_vm(int argc, char **argv)
{
	struct vm_config cfg = { 0 };
	const char *control = NULL;
	struct vfm_error err = { 0 };
	struct control *ctl = NULL;
	struct vm *vm = NULL;
	json_object *data;
	int r, sig;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			vm_usage(stdout);
			return VFM_EXIT_OK;
		}
	}
	if ((r = parse_args(argc, argv, &cfg, &control)))
		return r;
	if (cfg.tls_creds) {
		/* Bad credentials fail now, not at the first migration. */
		struct vfm_tls *t;

		if (vfm_tls_new(cfg.tls_creds, cfg.incoming ? VFM_TLS_SERVER : VFM_TLS_CLIENT,
				"localhost", NULL, &t, &err)) {
			fprintf(stderr, "vfiomig vm: --tls-creds: %s\n", err.msg);
			return VFM_EXIT_FAIL;
		}
		vfm_tls_unref(t);
	}
	/* A client or device server that goes away must not kill the VM. */
	signal(SIGPIPE, SIG_IGN);
	if (vm_create(&cfg, &vm, &err) || vm_run(vm, &err) ||
	    control_open(control, vm, &ctl, &err)) {
		fprintf(stderr, "vfiomig vm: %s\n", err.msg[0] ? err.msg : vfm_strerror(err.code));
		vm_destroy(vm);
		return VFM_EXIT_FAIL;
	}
	vm_set_event_sink(vm, control_vm_event, ctl);
	sig = vm_main_loop(vm, ctl);
	vm_shutdown(vm);
	data = json_object_new_object();
	json_object_object_add(data, "guest", json_object_new_boolean(false));
	json_object_object_add(data, "reason", json_object_new_string(sig ? "host-signal"
									     : "host-qmp-quit"));
	control_event(ctl, "SHUTDOWN", data);
	control_flush(ctl, 1000);
	vm_set_event_sink(vm, NULL, NULL);
	vm_destroy(vm);
	/* Last, so that a client sees the connection close once the VM is gone. */
	control_close(ctl);
	return VFM_EXIT_OK;
}
