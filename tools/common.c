/* Helpers shared by the vfiomig subcommands. */
#include <string.h>

#include "commands.h"
#include "vfiomig/log.h"

int tool_take_verbose(int argc, char **argv)
{
	int out = 0;

	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		int raise = 0;

		if (i > 0 && !strcmp(a, "--verbose")) {
			raise = 1;
		} else if (i > 0 && a[0] == '-' && a[1] == 'v' && strspn(a + 1, "v") == strlen(a + 1)) {
			raise = (int)strlen(a + 1);  /* -v, -vv, -vvv */
		}
		if (raise) {
			/* -v: info, -vv: debug, -vvv: trace (state changes and data blocks). */
			int lvl = (int)vfm_log_get_level();
			lvl = lvl < VFM_LOG_INFO ? VFM_LOG_INFO + raise - 1 : lvl + raise;
			vfm_log_set_level(lvl > VFM_LOG_TRACE ? VFM_LOG_TRACE : (enum vfm_log_level)lvl);
			continue;
		}
		argv[out++] = argv[i];
	}
	argv[out] = NULL;
	return out;
}

const char *tool_opt_value(int argc, char **argv, int *i, const char *name)
{
	size_t n = strlen(name);

	if (strncmp(argv[*i], name, n))
		return NULL;
	if (argv[*i][n] == '=')
		return argv[*i] + n + 1;
	if (argv[*i][n] == '\0' && *i + 1 < argc)
		return argv[++*i];
	return NULL;
}
