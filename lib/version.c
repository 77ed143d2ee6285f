/* Library version string. */
#include "vfiomig.h"

const char *vfm_version(void)
{
	return VFM_VERSION;
}
