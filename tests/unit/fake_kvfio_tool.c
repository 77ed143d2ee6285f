/*
 * Test build of the vfiomig tool against the fake kernel: linked with the
 * tool's own objects, it installs the fake as the kernel VFIO backend's
 * default syscall table before main() when VFM_FAKE_KVFIO is set (its value
 * configures the fake: "flags=7,state=64K,seed=2,...", see fake_kvfio.h).
 */
#include <stdio.h>
#include <stdlib.h>

#include "fake_kvfio.h"

static struct fake_kvfio *fake;

static void drop_fake(void)
{
	vfm_vfio_set_default_sys(NULL);
	fake_kvfio_free(fake);
}

__attribute__((constructor)) static void install_fake(void)
{
	const char *spec = getenv("VFM_FAKE_KVFIO");
	struct fake_kvfio_cfg cfg;

	if (!spec)
		return;
	fake_kvfio_cfg_default(&cfg);
	if (fake_kvfio_cfg_parse(spec, &cfg) || !(fake = fake_kvfio_new(&cfg))) {
		fprintf(stderr, "VFM_FAKE_KVFIO='%s': bad fake kernel configuration\n", spec);
		exit(2);
	}
	vfm_vfio_set_default_sys(fake_kvfio_sys(fake));
	atexit(drop_fake);
}
