/*
 * The migration engine with real dma device servers (separate processes,
 * vfio-user over UNIX sockets) and memfd guest memory they DMA into: a writer
 * thread dirties memory and a driver thread keeps each device copying into
 * guest memory and changing its own state while pre-copy runs. Afterwards the
 * destination's guest memory and every device's CHECKSUM register equal the
 * source's frozen ones.
 */
#include "../../devices/dma.h"
#include "harness.h"
#include "migdma.h"

struct scenario {
	const char *kind;          /* unix, tcp, file */
	struct md_opts o;
};

static void run(const struct scenario *sc)
{
	struct md_devsrv srv[MD_MAXDEV];
	struct vfm_migration_params p;
	struct vfm_migration_stats st;
	struct vfm_error err = { 0 };
	struct md_result r;
	struct md_dest d;
	struct md_side s;
	uint64_t sums[MD_MAXDEV], completed;
	char uri[256];
	bool file = !strcmp(sc->kind, "file");
	int status;

	for (unsigned i = 0; i < sc->o.ndev; i++) {
		char name[16];

		snprintf(name, sizeof(name), "src%u", i);
		md_devsrv_spawn(&srv[i], name, &sc->o, sc->o.churn ? sc->o.churn : (1u << 20), 7 + i);
	}
	md_make_uri(sc->kind, uri, sizeof(uri));
	if (!file) {
		md_dest_start(&d, uri, &sc->o);
		snprintf(uri, sizeof(uri), "%s", d.uri);
	}
	md_side_init(&s, srv, &sc->o, true, 7);
	md_vm_ops.start(&s.g);
	/* Let the guest and the devices get going before setup. */
	while (atomic_load(&s.g.completed) < 20 && atomic_load(&s.g.errors) == 0)
		usleep(1000);
	md_params(&p);
	if (vfm_migration_start(s.m, uri, &p, &err))
		FAIL("start: %s", err.msg);
	md_wait(&s, &st);
	if (st.status != VFM_MIG_COMPLETED)
		FAIL("source status %s: %s", vfm_mig_status_name(st.status), st.error);
	CHECK(!s.g.started);                       /* the source stays stopped */
	CHECK_EQ(atomic_load(&s.g.errors), 0);
	completed = atomic_load(&s.g.completed);
	CHECK(completed >= 20);
	for (unsigned i = 0; i < sc->o.ndev; i++) {
		CHECK_EQ(md_dev_state(s.dev[i]), VFM_STATE_STOP);
		sums[i] = md_reg(s.dev[i], DMADEV_REG_CHECKSUM);
		/* The ring ran during the migration and nothing is latched. */
		CHECK_EQ(md_reg(s.dev[i], DMADEV_REG_RING_HEAD), md_reg(s.dev[i], DMADEV_REG_RING_TAIL));
	}
	if (file) {
		md_dest_start(&d, uri, &sc->o);
	}
	status = md_dest_wait(&d, &r);
	if (status || r.status)
		FAIL("destination exit %d: %s", status, r.error);
	CHECK_EQ(r.guest_starts, 1);
	if (r.mem_hash != md_mem_hash(s.mem))
		FAIL("guest memory differs after migration");
	for (unsigned i = 0; i < sc->o.ndev; i++) {
		CHECK_EQ(r.dev_state[i], VFM_STATE_RUNNING);
		if (r.dev_sum[i] != sums[i])
			FAIL("device %u checksum %#" PRIx64 " != source %#" PRIx64, i, r.dev_sum[i],
			     sums[i]);
	}
	CHECK(st.ram_transferred_bytes >= MD_MEM / 4);
	CHECK(st.device_transferred_bytes >= MD_DEV_STATE * sc->o.ndev);
	fprintf(stderr, "# %s %u dev: %" PRIu64 " descriptors, %" PRIu64 " writes, %" PRIu64
		" iterations, downtime %.1f ms\n", sc->kind, sc->o.ndev, completed,
		(uint64_t)atomic_load(&s.g.writes), st.precopy_iterations, st.downtime_ms);
	md_side_free(&s);
	for (unsigned i = 0; i < sc->o.ndev; i++)
		md_devsrv_kill(&srv[i]);
}

TEST_TIMEOUT(unix_one_device, 60)
{
	struct scenario sc = { "unix", { .ndev = 1 } };
	run(&sc);
}

TEST_TIMEOUT(tcp_two_devices, 60)
{
	struct scenario sc = { "tcp", { .ndev = 2 } };
	run(&sc);
}

TEST_TIMEOUT(unix_two_devices_without_precopy, 60)
{
	struct scenario sc = { "unix", { .ndev = 2, .props = "allow-pre-copy=off" } };
	run(&sc);
}

TEST_TIMEOUT(tcp_stop_copy_only_devices, 60)
{
	/* Devices that offer no PRE_COPY at all. */
	struct scenario sc = { "tcp", { .ndev = 1, .mig_flags = VFM_MIG_STOP_COPY | VFM_MIG_P2P } };
	run(&sc);
}

TEST_TIMEOUT(unix_opt_out_of_precopy_dirty_tracking, 60)
{
	struct scenario sc = { "unix", { .ndev = 2, .props = "pre-copy-dirty-page-tracking=off" } };
	run(&sc);
}

TEST_TIMEOUT(unix_no_device_dirty_tracking_falls_back_to_all_dirty, 60)
{
	struct scenario sc = { "unix", { .ndev = 1, .props = "device-dirty-page-tracking=off" } };
	run(&sc);
}

TEST_TIMEOUT(unix_dma_by_messages_tracked_by_the_client, 60)
{
	/* No fd in DMA_MAP: the device DMAs with DMA_READ/WRITE messages and only
	 * the client's own log knows what it wrote. */
	struct scenario sc = { "unix", { .ndev = 1, .by_messages = true } };
	run(&sc);
}

TEST_TIMEOUT(unix_libvfio_user_flags, 60)
{
	/* STOP_COPY | PRE_COPY, no P2P, with DMA logging: what libvfio-user offers. */
	struct scenario sc = { "unix", { .ndev = 1, .mig_flags = VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY } };
	run(&sc);
}

TEST_TIMEOUT(file_save_and_load, 60)
{
	struct scenario sc = { "file", { .ndev = 2 } };
	run(&sc);
}

TEST_TIMEOUT(two_devices_without_p2p_refused, 30)
{
	struct md_opts o = { .ndev = 2, .mig_flags = VFM_MIG_STOP_COPY | VFM_MIG_PRE_COPY };
	struct md_devsrv srv[2];
	struct vfm_error err = { 0 };
	struct md_side s;

	md_devsrv_spawn(&srv[0], "np0", &o, 0, 1);
	md_devsrv_spawn(&srv[1], "np1", &o, 0, 2);
	md_side_init(&s, srv, &o, false, 3);
	CHECK_EQ(vfm_migration_start(s.m, "unix:/nonexistent/x", NULL, &err), -EOPNOTSUPP);
	CHECK(strstr(err.msg, "P2P") != NULL);
	/* Nothing was touched. */
	CHECK_EQ(md_dev_state(s.dev[0]), VFM_STATE_RUNNING);
	CHECK_EQ(md_dev_state(s.dev[1]), VFM_STATE_RUNNING);
	md_side_free(&s);
	md_devsrv_kill(&srv[0]);
	md_devsrv_kill(&srv[1]);
}

TEST_TIMEOUT(postcopy_refused, 30)
{
	struct md_opts o = { .ndev = 1 };
	struct md_devsrv srv;
	struct vfm_migration_params p;
	struct vfm_error err = { 0 };
	struct md_side s;

	md_devsrv_spawn(&srv, "pc0", &o, 0, 1);
	md_side_init(&s, &srv, &o, false, 3);
	md_params(&p);
	p.postcopy = true;
	CHECK_EQ(vfm_migration_start(s.m, "unix:/nonexistent/x", &p, &err), -ENOTSUP);
	CHECK(strstr(err.msg, "postcopy") != NULL);
	CHECK_EQ(md_dev_state(s.dev[0]), VFM_STATE_RUNNING);
	md_side_free(&s);
	md_devsrv_kill(&srv);
}
