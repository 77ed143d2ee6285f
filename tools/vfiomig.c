/* The vfiomig multi-command binary: a table of subcommands. */
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "vfiomig.h"

static const struct vfm_command commands[] = {
	{ "demo", "start devices and two VMs, migrate live, verify", cmd_demo },
	{ "device", "run a sample vfio-user device server (dma)", cmd_device },
	{ "vm", "run a VM process with devices, a guest and a control socket", cmd_vm },
	{ "ctl", "control a running VM: migrate, status, cancel, set, stop, cont, quit", cmd_ctl },
	{ "info", "show a device's regions, IRQs and migration support", cmd_info },
	{ "check", "conformance test of a device's migration uAPI", cmd_check },
	{ "save", "checkpoint a device's state to a file", cmd_save },
	{ "load", "restore a device's state from a file", cmd_load },
};

static void usage(FILE *out)
{
	fprintf(out, "usage: vfiomig COMMAND [ARGS...]\n\n"
		     "Live migration of VFIO devices and the VMs that own them.\n\n"
		     "commands:\n");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(out, "  %-8s %s\n", commands[i].name, commands[i].summary);
	fprintf(out, "\n'vfiomig COMMAND --help' describes a command.\n"
		     "-v anywhere raises the log level (-v info, -vv debug, -vvv trace: every\n"
		     "device state change and data block).\n"
		     "Environment: VFIOMIG_LOG=error|warn|info|debug|trace, VFIOMIG_TRACE=1.\n");
}

int main(int argc, char **argv)
{
	argc = tool_take_verbose(argc, argv);
	if (argc < 2) {
		usage(stderr);
		return VFM_EXIT_USAGE;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return VFM_EXIT_OK;
	}
	if (!strcmp(argv[1], "--version")) {
		printf("vfiomig %s\n", vfm_version());
		return VFM_EXIT_OK;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (!strcmp(argv[1], commands[i].name))
			return commands[i].run(argc - 1, argv + 1);
	fprintf(stderr, "vfiomig: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return VFM_EXIT_USAGE;
}
