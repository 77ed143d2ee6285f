/*
 * For the kernel backend's tests against the fake kernel (include after
 * harness.h): one device opened through the cdev path and probed, closed with
 * every fd of the fake closed and no STOP_COPY -> PRE_COPY* request sent, and
 * a state change that must succeed.
 */
#ifndef VFM_TESTS_FAKE_KVFIO_RIG_H
#define VFM_TESTS_FAKE_KVFIO_RIG_H

#include "fake_kvfio.h"

struct rig {
	struct fake_kvfio *fk;
	struct vfm_device *dev;
};

static void rig_open(struct rig *r, const struct fake_kvfio_cfg *cfg)
{
	struct vfm_error err = { 0 };

	r->fk = fake_kvfio_new(cfg);
	CHECK(r->fk);
	if (fake_kvfio_open(r->fk, "/dev/vfio/devices/vfio0", VFM_VFIO_IOMMU_AUTO, NULL, &r->dev,
			    &err))
		FAIL("open: %s", err.msg);
	if (vfm_device_probe_migration(r->dev, &err))
		FAIL("probe: %s", err.msg);
}

static void rig_close(struct rig *r)
{
	struct fake_kvfio_stats st;

	vfm_device_free(r->dev);
	fake_kvfio_stats(r->fk, &st);
	CHECK_EQ(st.open_objects, 0);    /* every fd closed, data fds too */
	CHECK_EQ(st.hang_requests, 0);   /* STOP_COPY -> PRE_COPY* never sent */
	fake_kvfio_free(r->fk);
}

static void set(struct vfm_device *dev, enum vfm_state s)
{
	struct vfm_error err = { 0 };

	if (vfm_device_set_state(dev, s, VFM_STATE_ERROR, &err))
		FAIL("-> %s: %s", vfm_state_name(s), err.msg);
}

#endif
