/* The vfiomig subcommands: one file each, dispatched from vfiomig.c. */
#ifndef VFM_TOOLS_COMMANDS_H
#define VFM_TOOLS_COMMANDS_H

/* Exit status contract: 0 success, 1 failure, 2 usage error. */
#define VFM_EXIT_OK 0
#define VFM_EXIT_FAIL 1
#define VFM_EXIT_USAGE 2

struct vfm_command {
	const char *name;
	const char *summary;
	int (*run)(int argc, char **argv);  /* argv[0] is the command name */
};

int cmd_demo(int argc, char **argv);
int cmd_device(int argc, char **argv);
int cmd_vm(int argc, char **argv);
int cmd_ctl(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_save(int argc, char **argv);
int cmd_load(int argc, char **argv);

/*
 * Removes -v/-vv/-vvv/--verbose from argv[1..] (argv[0] is kept), raising the
 * log level for each; returns the new argc.
 */
int tool_take_verbose(int argc, char **argv);

/* "--name VALUE" or "--name=VALUE" at argv[*i]: the value, or NULL when
 * argv[*i] is not that option (or its value is missing); *i advances past
 * what it used. */
const char *tool_opt_value(int argc, char **argv, int *i, const char *name);

#endif
