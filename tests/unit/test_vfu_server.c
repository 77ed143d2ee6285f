/*
 * The vfio-user server library against a client written from the spec:
 * VERSION negotiation, the socket, device/region/IRQ info, region access and
 * config space, interrupts. DMA is in test_vfu_server_dma.c.
 */
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "harness.h"
#include "vfu_rawclient.h"
#include "vfu_testdev.h"

/* ------------------------------------------------------------------------ */
/* VERSION                                                                   */

TEST(version_negotiation)
{
	struct vfu_version_info proposed, got;
	struct vfu_negotiated neg;
	const char *json =
		"{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576,"
		"\"pgsizes\":12288,\"max_dma_maps\":100,\"migration\":{\"pgsize\":4096},"
		"\"future_cap\":{\"x\":[1,2,{\"y\":null}]}},\"unknown_top\":\"ok\"}";
	struct vfm_error e = { 0 };
	struct srv s;
	struct rc c;

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	CHECK_EQ(rc_version(&c, json, &got), 0);
	CHECK_EQ(got.major, VFU_VERSION_MAJOR);
	CHECK(got.minor <= VFU_VERSION_MINOR);
	/* We state our limits; the v1 migration key comes back as libvfio-user sends it. */
	CHECK(got.caps.present & VFU_CAP_MAX_MSG_FDS);
	CHECK(got.caps.present & VFU_CAP_MAX_DATA_XFER_SIZE);
	CHECK_EQ(got.caps.max_msg_fds, 8);
	CHECK_EQ(got.caps.max_data_xfer_size, 1048576);
	CHECK(got.caps.present & VFU_CAP_MIGRATION);
	CHECK_EQ(got.caps.migration_pgsize, 4096);
	/* Subset rules: pgsizes within the proposal, max_dma_maps not above it. */
	CHECK_EQ(got.caps.pgsizes, 4096);
	CHECK(got.caps.max_dma_maps <= 100);
	CHECK(!(got.caps.present & VFU_CAP_WRITE_MULTIPLE));
	CHECK(!(got.caps.present & VFU_CAP_TWIN_SOCKET));
	/* And a client checking the reply by the spec accepts it. */
	proposed.major = VFU_VERSION_MAJOR;
	proposed.minor = VFU_VERSION_MINOR;
	CHECK_EQ(vfu_caps_parse(json, strlen(json) + 1, &proposed.caps, &e), 0);
	CHECK_EQ(vfu_version_negotiate(&proposed, &got, 0, true, &neg, &e), 0);
	/* The session works. */
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO,
			 &(struct vfu_device_info){ .argsz = 16 }, 16, NULL, 0, NULL), 0);
	/* VERSION again: refused, the connection stays. */
	CHECK_EQ(rc_version(&c, NULL, NULL), -EINVAL);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO,
			 &(struct vfu_device_info){ .argsz = 16 }, 16, NULL, 0, NULL), 0);
	rc_close(&c);
	CHECK(srv_wait_gone(&s, 1, 5000));
	CHECK_EQ(s.td.attaches, 1);
	CHECK_EQ(s.td.detaches, 1);
	srv_stop(&s);
}

TEST(version_libvfio_user_style_and_minimal)
{
	struct vfu_version_info got;
	struct srv s;
	struct rc c;

	/* Exactly what a libvfio-user client proposes. */
	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	CHECK_EQ(rc_version(&c, "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576,"
			    "\"migration\":{\"pgsize\":4096},\"write_multiple\":true,"
			    "\"twin_socket\":{\"supported\":true}}}", &got), 0);
	CHECK_EQ(got.caps.migration_pgsize, 4096);
	CHECK(got.caps.write_multiple);
	/* Asked for twin_socket; we do not do it and say so. */
	CHECK(got.caps.present & VFU_CAP_TWIN_SOCKET);
	CHECK(!got.caps.twin_socket);
	rc_close(&c);
	srv_stop(&s);

	/* No JSON at all (QEMU may send none): defaults, and our limits. */
	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	CHECK_EQ(rc_version(&c, NULL, &got), 0);
	CHECK(!(got.caps.present & VFU_CAP_MIGRATION));
	CHECK(!(got.caps.present & VFU_CAP_WRITE_MULTIPLE));
	CHECK(got.caps.present & VFU_CAP_MAX_DATA_XFER_SIZE);
	rc_close(&c);
	srv_stop(&s);
}

/* Each of these ends the connection after an error reply. */
TEST(version_refusals)
{
	static const struct { const char *json; uint16_t major; } bad[] = {
		{ "{\"capabilities\":{\"max_msg_fds\":8}}", 1 },          /* wrong major */
		{ "{\"capabilities\":", VFU_VERSION_MAJOR },              /* truncated JSON */
		{ "[1,2]", VFU_VERSION_MAJOR },                           /* not an object */
		{ "{\"capabilities\":{\"max_msg_fds\":\"8\"}}", VFU_VERSION_MAJOR },
		{ "{\"capabilities\":{\"pgsizes\":8192}}", VFU_VERSION_MAJOR }, /* no common page */
	};
	struct srv s;
	struct rc c;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct vfu_version v = { .major = bad[i].major };
		size_t jl = strlen(bad[i].json) + 1;
		uint8_t buf[128];

		srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
		memcpy(buf, &v, 4);
		memcpy(buf + 4, bad[i].json, jl);
		if (rc_call(&c, VFU_CMD_VERSION, buf, 4 + jl, NULL, 0, NULL) >= 0)
			FAIL("VERSION %u with %s accepted", bad[i].major, bad[i].json);
		CHECK(rc_closed_within(&c, 5000));
		CHECK_EQ(s.td.attaches, 0);
		rc_close(&c);
		srv_stop(&s);
	}
	/* Anything before VERSION: an error, then the door. */
	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO, &(struct vfu_device_info){ .argsz = 16 }, 16,
			 NULL, 0, NULL), -EINVAL);
	CHECK(rc_closed_within(&c, 5000));
	rc_close(&c);
	srv_stop(&s);
}

/* ------------------------------------------------------------------------ */
/* The socket                                                                */

TEST(socket_path_rules)
{
	struct vfm_vfu_ctx *ctx, *other;
	struct vfm_error e = { 0 };
	char *dir = test_tmpdir(), path[4300], longp[200];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	char text[8] = { 0 };
	int fd;

	snprintf(path, sizeof(path), "%s/s", dir);
	CHECK_EQ(vfm_vfu_create(path, NULL, NULL, &ctx, &e), 0);
	CHECK_EQ(stat(path, &st), 0);
	CHECK(S_ISSOCK(st.st_mode));
	CHECK_EQ(st.st_mode & 0777, 0600);
	/* A live server is not replaced. */
	CHECK_EQ(vfm_vfu_create(path, NULL, NULL, &other, &e), -EADDRINUSE);
	vfm_vfu_destroy(ctx);
	CHECK(stat(path, &st) != 0);   /* destroy unlinks */

	/* A stale socket (server died) is replaced. */
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	CHECK(strlen(path) < sizeof(sa.sun_path));
	memcpy(sa.sun_path, path, strlen(path) + 1);
	CHECK_EQ(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	close(fd);
	CHECK_EQ(vfm_vfu_create(path, NULL, NULL, &ctx, &e), 0);
	vfm_vfu_destroy(ctx);

	/* Anything else is never clobbered. */
	fd = open(path, O_CREAT | O_WRONLY, 0644);
	CHECK(write(fd, "keep", 4) == 4);
	close(fd);
	CHECK_EQ(vfm_vfu_create(path, NULL, NULL, &ctx, &e), -EEXIST);
	CHECK(strstr(e.msg, "not a socket") != NULL);
	fd = open(path, O_RDONLY);
	CHECK(read(fd, text, sizeof(text)) == 4);
	close(fd);
	CHECK_STR(text, "keep");
	unlink(path);
	CHECK_EQ(mkdir(path, 0700), 0);
	CHECK_EQ(vfm_vfu_create(path, NULL, NULL, &ctx, &e), -EEXIST);
	rmdir(path);

	memset(longp, 'x', sizeof(longp) - 1);
	longp[sizeof(longp) - 1] = '\0';
	CHECK_EQ(vfm_vfu_create(longp, NULL, NULL, &ctx, &e), -ENAMETOOLONG);
	/* Bad options. */
	CHECK_EQ(vfm_vfu_create(NULL, &(struct vfm_vfu_opts){ .max_data_xfer_size = 100 }, NULL,
				&ctx, &e), -EINVAL);
	CHECK_EQ(vfm_vfu_create(NULL, &(struct vfm_vfu_opts){ .max_msg_fds = 17 }, NULL, &ctx, &e),
		 -EINVAL);
	test_rmdir(dir);
}

/*
 * A client that connects the moment the socket file appears must get in:
 * the file shows up only once the server listens (no ECONNREFUSED window,
 * which made tests that wait for the file flaky on a loaded machine). A
 * child creates servers in a loop; the parent spins on stat() and connects.
 */
TEST(socket_appears_only_when_listening)
{
	char *dir = test_tmpdir(), path[4300];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int sync[2], gone[2];

	snprintf(path, sizeof(path), "%s/s", dir);
	CHECK(strlen(path) < sizeof(sa.sun_path));
	memcpy(sa.sun_path, path, strlen(path) + 1);
	CHECK_EQ(pipe(sync), 0);
	CHECK_EQ(pipe(gone), 0);
	pid_t pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		char c;
		for (int i = 0; i < 3000; i++) {
			struct vfm_vfu_ctx *ctx;
			if (vfm_vfu_create(path, NULL, NULL, &ctx, NULL))
				_exit(1);
			/* Wait for the parent's connect, then go away. */
			if (read(sync[0], &c, 1) != 1)
				_exit(2);
			vfm_vfu_destroy(ctx);
			if (write(gone[1], "g", 1) != 1)
				_exit(3);
		}
		_exit(0);
	}
	for (int i = 0; i < 3000; i++) {
		struct stat st;
		int fd, spins = 0;

		while (stat(path, &st) != 0) {
			CHECK(++spins < 2000000);
			sched_yield();
		}
		fd = socket(AF_UNIX, SOCK_STREAM, 0);
		CHECK(fd >= 0);
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
			FAIL("round %d: connect as soon as %s appeared: %s", i, path, strerror(errno));
		close(fd);
		/* The server goes away only after this byte; then the next one starts. */
		CHECK_EQ(write(sync[1], "x", 1), 1);
		char g;
		CHECK_EQ(read(gone[0], &g, 1), 1);
	}
	int status;
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	test_rmdir(dir);
}

TEST(declarations_checked)
{
	struct vfm_vfu_ctx *ctx;
	struct vfm_error e = { 0 };
	struct vfm_vfu_region_ops bad_ops = { .version = 99 };
	struct vfm_vfu_mmap_area area = { 100, 4096 };
	struct vfm_vfu_migration_ops mig = { .version = VFM_VFU_MIGRATION_OPS_VERSION,
					     .flags = VFM_MIG_P2P };

	CHECK_EQ(vfm_vfu_create(NULL, NULL, NULL, &ctx, &e), 0);
	CHECK_EQ(vfm_vfu_setup_region(ctx, 9, &(struct vfm_vfu_region){ .size = 4096,
		.flags = VFM_VFU_REGION_READ, .fd = -1, .ops = &bad_ops }, &e), -EINVAL);
	CHECK_EQ(vfm_vfu_setup_region(ctx, 0, &(struct vfm_vfu_region){ .size = 4096,
		.flags = VFM_VFU_REGION_READ, .fd = -1, .ops = &bad_ops }, &e), -EINVAL);
	CHECK_EQ(vfm_vfu_setup_region(ctx, 0, &(struct vfm_vfu_region){ .size = 4096,
		.flags = VFM_VFU_REGION_READ, .fd = -1 }, &e), -EINVAL);  /* no way to access */
	CHECK_EQ(vfm_vfu_setup_region(ctx, 0, &(struct vfm_vfu_region){ .size = 8192,
		.flags = VFM_VFU_REGION_READ, .fd = 0, .areas = &area, .nr_areas = 1 }, &e), -EINVAL);
	CHECK_EQ(vfm_vfu_setup_irqs(ctx, 5, 1, &e), -EINVAL);
	CHECK_EQ(vfm_vfu_setup_migration(ctx, &mig, &e), -EINVAL);   /* no STOP_COPY */
	mig.flags = VFM_MIG_STOP_COPY;
	CHECK_EQ(vfm_vfu_setup_migration(ctx, &mig, &e), -EINVAL);   /* no callbacks */
	/* A BAR that cannot be a PCI BAR. */
	CHECK_EQ(vfm_vfu_pci_init(ctx, &(struct vfm_vfu_pci_ids){ .vendor_id = 1 }, &e), 0);
	CHECK_EQ(vfm_vfu_setup_region(ctx, 7, &(struct vfm_vfu_region){ .size = 256,
		.flags = VFM_VFU_REGION_READ, .fd = 0 }, &e), -EBUSY);
	CHECK_EQ(vfm_vfu_setup_region(ctx, 0, &(struct vfm_vfu_region){ .size = 3000,
		.flags = VFM_VFU_REGION_READ, .fd = 0 }, &e), 0);
	CHECK_EQ(vfm_vfu_realize(ctx, &e), -EINVAL);
	CHECK(strstr(e.msg, "power of two") != NULL);
	vfm_vfu_destroy(ctx);
}

/* ------------------------------------------------------------------------ */
/* Device, regions, config space                                             */

TEST(device_and_region_info)
{
	struct vfu_region_info req = { .argsz = 32 }, info;
	struct vfu_cap_sparse_mmap cap;
	struct vfu_sparse_area areas[2];
	struct vfu_device_info di;
	struct vfu_msg m = VFU_MSG_INIT;
	uint8_t *map, buf[64];
	struct srv s;
	struct rc c;

	srv_start_pair(&s, VFM_MIG_ALL, NULL, &c);
	rc_hello(&c);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO, &(struct vfu_device_info){ .argsz = 16 }, 16,
			 NULL, 0, &m), 0);
	CHECK_EQ(m.len, 16);
	memcpy(&di, m.payload, 16);
	vfu_msg_release(&m);
	CHECK_EQ(di.argsz, 16);
	CHECK_EQ(di.flags, VFU_DEVICE_F_RESET | VFU_DEVICE_F_PCI);
	CHECK_EQ(di.num_regions, 9);
	CHECK_EQ(di.num_irqs, 5);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO, &(struct vfu_device_info){ .argsz = 8 }, 16,
			 NULL, 0, NULL), -EINVAL);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_INFO, buf, 4, NULL, 0, NULL), -EINVAL);

	/* BAR0: plain, no fd. */
	req.index = 0;
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, 32, NULL, 0, &m), 0);
	memcpy(&info, m.payload, 32);
	CHECK_EQ(m.nfds, 0);
	vfu_msg_release(&m);
	CHECK_EQ(info.argsz, 32);
	CHECK_EQ(info.size, TD_BAR0_SIZE);
	CHECK_EQ(info.flags, VFU_REGION_F_READ | VFU_REGION_F_WRITE);

	/* BAR1: sparse mmap. Too small an argsz gets the needed size back, no fd. */
	req.index = 1;
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, 32, NULL, 0, &m), 0);
	CHECK_EQ(m.len, 32);
	CHECK_EQ(m.nfds, 0);
	memcpy(&info, m.payload, 32);
	vfu_msg_release(&m);
	CHECK_EQ(info.argsz, 32 + 16 + 2 * 16);
	CHECK(info.flags & VFU_REGION_F_CAPS);
	CHECK(info.flags & VFU_REGION_F_MMAP);
	req.argsz = info.argsz;
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, 32, NULL, 0, &m), 0);
	CHECK_EQ(m.len, 80);
	CHECK_EQ(m.nfds, 1);
	memcpy(&info, m.payload, 32);
	CHECK_EQ(info.cap_offset, 32);
	memcpy(&cap, (uint8_t *)m.payload + info.cap_offset, sizeof(cap));
	CHECK_EQ(cap.hdr.id, VFU_REGION_CAP_SPARSE_MMAP);
	CHECK_EQ(cap.hdr.version, 1);
	CHECK_EQ(cap.hdr.next, 0);
	CHECK_EQ(cap.nr_areas, 2);
	memcpy(areas, (uint8_t *)m.payload + info.cap_offset + sizeof(cap), sizeof(areas));
	CHECK_EQ(areas[0].offset, 4096);
	CHECK_EQ(areas[1].offset, 12288);
	/* The fd maps the area; bytes written there read back through REGION_READ. */
	map = mmap(NULL, areas[1].size, PROT_READ | PROT_WRITE, MAP_SHARED, m.fds[0],
		   (off_t)(info.offset + areas[1].offset));
	CHECK(map != MAP_FAILED);
	memcpy(map + 8, "mmapped!", 8);
	CHECK_EQ(rc_region_read(&c, 1, 12288 + 8, buf, 8), 0);
	CHECK(!memcmp(buf, "mmapped!", 8));
	/* And the other way: REGION_WRITE on an fd-only region lands in the fd. */
	CHECK_EQ(rc_region_write(&c, 1, 12288 + 100, "pwrite", 6), 0);
	CHECK(!memcmp(map + 100, "pwrite", 6));
	munmap(map, areas[1].size);
	vfu_msg_release(&m);

	/* Config space, an undeclared region, a region that does not exist. */
	req = (struct vfu_region_info){ .argsz = 32, .index = 7 };
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, 32, NULL, 0, &m), 0);
	memcpy(&info, m.payload, 32);
	vfu_msg_release(&m);
	CHECK_EQ(info.size, 256);
	CHECK_EQ(info.flags, VFU_REGION_F_READ | VFU_REGION_F_WRITE);
	req.index = 8;
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, 32, NULL, 0, &m), 0);
	memcpy(&info, m.payload, 32);
	vfu_msg_release(&m);
	CHECK_EQ(info.size, 0);
	CHECK_EQ(info.flags, 0);
	req.index = 9;
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, 32, NULL, 0, NULL), -EINVAL);
	req = (struct vfu_region_info){ .argsz = 16, .index = 0 };
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, 32, NULL, 0, NULL), -EINVAL);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_INFO, &req, 20, NULL, 0, NULL), -EINVAL);

	/* IO_FDS: a valid region answers with none; bad requests are refused. */
	struct vfu_region_io_fds io = { .argsz = 16, .index = 0 }, iorep;
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_IO_FDS, &io, 16, NULL, 0, &m), 0);
	memcpy(&iorep, m.payload, 16);
	CHECK_EQ(m.nfds, 0);
	vfu_msg_release(&m);
	CHECK_EQ(iorep.count, 0);
	CHECK_EQ(iorep.argsz, 16);
	io.flags = 1;
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_IO_FDS, &io, 16, NULL, 0, NULL), -EINVAL);
	io = (struct vfu_region_io_fds){ .argsz = 16, .index = 8 };
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_REGION_IO_FDS, &io, 16, NULL, 0, NULL), -EINVAL);
	rc_close(&c);
	srv_stop(&s);
}

static uint32_t cfg32(struct rc *c, uint64_t off)
{
	uint32_t v;

	CHECK_EQ(rc_region_read(c, 7, off, &v, 4), 0);
	return v;
}

static void cfg_w32(struct rc *c, uint64_t off, uint32_t v)
{
	CHECK_EQ(rc_region_write(c, 7, off, &v, 4), 0);
}

TEST(pci_config_space)
{
	struct srv s;
	struct rc c;

	srv_start_pair(&s, 0, NULL, &c);
	rc_hello(&c);
	CHECK_EQ(cfg32(&c, 0), 0x56781234u);
	CHECK_EQ(cfg32(&c, 8) >> 8, 0xff0000u);
	CHECK_EQ(cfg32(&c, 8) & 0xff, 3);
	CHECK_EQ((cfg32(&c, 0x3c) >> 8) & 0xff, 1);   /* INTx pin A */
	/* Read-only: IDs. Writable: command bits we emulate. */
	cfg_w32(&c, 0, 0);
	CHECK_EQ(cfg32(&c, 0), 0x56781234u);
	cfg_w32(&c, 4, 0xffff);
	CHECK_EQ(cfg32(&c, 4) & 0xffff, 0x0547);
	/* BAR sizing: BAR0 4 KiB memory, BAR1 16 KiB prefetchable (mappable). */
	cfg_w32(&c, 0x10, 0xffffffffu);
	CHECK_EQ(cfg32(&c, 0x10), 0xfffff000u);
	cfg_w32(&c, 0x10, 0xfebc1234u);
	CHECK_EQ(cfg32(&c, 0x10), 0xfebc1000u);
	cfg_w32(&c, 0x14, 0xffffffffu);
	CHECK_EQ(cfg32(&c, 0x14), 0xffffc008u);
	/* Undeclared BAR3 stays 0. */
	cfg_w32(&c, 0x1c, 0xffffffffu);
	CHECK_EQ(cfg32(&c, 0x1c), 0);
	/* Bounds. */
	uint8_t b[8];
	CHECK_EQ(rc_region_read(&c, 7, 252, b, 8), -EINVAL);
	CHECK_EQ(rc_region_read(&c, 7, 255, b, 1), 0);
	rc_close(&c);
	srv_stop(&s);
}

TEST(region_access)
{
	struct vfm_vfu_opts o = { .max_data_xfer_size = 8192 };
	uint8_t *big = calloc(1, 8192 + 32), buf[16];
	struct vfu_region_rw hdr;
	struct srv s;
	struct rc c;

	srv_start_pair(&s, 0, &o, &c);
	rc_hello(&c);
	CHECK_EQ(rc_region_write(&c, 0, 16, "0123456789", 10), 0);
	CHECK_EQ(rc_region_read(&c, 0, 16, buf, 10), 0);
	CHECK(!memcmp(buf, "0123456789", 10));
	CHECK_EQ(rc_region_read(&c, 2, 300, buf, 4), 0);
	CHECK_EQ(buf[0], 300 & 0xff);
	/* Bounds, permissions, unknown regions, sizes. */
	CHECK_EQ(rc_region_read(&c, 0, TD_BAR0_SIZE - 4, buf, 8), -EINVAL);
	CHECK_EQ(rc_region_read(&c, 0, UINT64_MAX - 2, buf, 8), -EINVAL);
	CHECK_EQ(rc_region_write(&c, 2, 0, buf, 4), -EINVAL);   /* read-only */
	CHECK_EQ(rc_region_read(&c, 5, 0, buf, 4), -EINVAL);    /* undeclared */
	CHECK_EQ(rc_region_read(&c, 100, 0, buf, 4), -EINVAL);
	CHECK_EQ(rc_region_read(&c, 0, 0, big, 4096), 0);
	hdr = (struct vfu_region_rw){ .offset = 0, .region = 2, .count = 8193 };
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_READ, &hdr, 16, NULL, 0, NULL), -E2BIG);
	/* A write whose count disagrees with its data. */
	hdr = (struct vfu_region_rw){ .offset = 0, .region = 0, .count = 8 };
	memcpy(big, &hdr, 16);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE, big, 16 + 4, NULL, 0, NULL), -EINVAL);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_READ, big, 12, NULL, 0, NULL), -EINVAL);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_READ, big, 20, NULL, 0, NULL), -EINVAL);
	free(big);
	rc_close(&c);
	srv_stop(&s);
}

static size_t multi_msg(uint8_t *buf, unsigned n, uint32_t region, uint32_t count, uint8_t val)
{
	uint64_t wr = n;

	memcpy(buf, &wr, 8);
	for (unsigned i = 0; i < n; i++) {
		struct vfu_write_one w = { .offset = 0x40 + 8 * i, .region = region, .count = count };

		memset(w.data, val + (int)i, sizeof(w.data));
		memcpy(buf + 8 + i * sizeof(w), &w, sizeof(w));
	}
	return 8 + n * sizeof(struct vfu_write_one);
}

TEST(region_write_multi)
{
	uint8_t *buf = malloc(8 + 201 * sizeof(struct vfu_write_one)), got[24];
	struct vfu_msg m = VFU_MSG_INIT;
	uint64_t done;
	size_t len;
	struct srv s;
	struct rc c;

	/* Not negotiated: refused. */
	srv_start_pair(&s, 0, NULL, &c);
	CHECK_EQ(rc_version(&c, NULL, NULL), 0);
	len = multi_msg(buf, 3, 0, 8, 0x10);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE_MULTI, buf, len, NULL, 0, NULL), -EINVAL);
	rc_close(&c);
	srv_stop(&s);

	srv_start_pair(&s, 0, NULL, &c);
	rc_hello(&c);   /* proposes write_multiple */
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE_MULTI, buf, len, NULL, 0, &m), 0);
	CHECK_EQ(m.len, 8);
	memcpy(&done, m.payload, 8);
	vfu_msg_release(&m);
	CHECK_EQ(done, 3);
	CHECK_EQ(rc_region_read(&c, 0, 0x40, got, 24), 0);
	CHECK_EQ(got[0], 0x10);
	CHECK_EQ(got[16], 0x12);
	/* A bad batch changes nothing: the third write is out of range. */
	len = multi_msg(buf, 3, 0, 8, 0x70);
	((struct vfu_write_one *)(void *)(buf + 8))[2].offset = TD_BAR0_SIZE;
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE_MULTI, buf, len, NULL, 0, NULL), -EINVAL);
	CHECK_EQ(rc_region_read(&c, 0, 0x40, got, 8), 0);
	CHECK_EQ(got[0], 0x10);
	/* count 9, wr_cnt 0, wr_cnt 201, size mismatch, read-only region. */
	len = multi_msg(buf, 1, 0, 9, 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE_MULTI, buf, len, NULL, 0, NULL), -EINVAL);
	len = multi_msg(buf, 0, 0, 8, 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE_MULTI, buf, len, NULL, 0, NULL), -EINVAL);
	len = multi_msg(buf, 201, 0, 1, 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE_MULTI, buf, len, NULL, 0, NULL), -EINVAL);
	len = multi_msg(buf, 2, 0, 8, 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE_MULTI, buf, len - 1, NULL, 0, NULL), -EINVAL);
	len = multi_msg(buf, 1, 2, 4, 0);
	CHECK_EQ(rc_call(&c, VFU_CMD_REGION_WRITE_MULTI, buf, len, NULL, 0, NULL), -EINVAL);
	free(buf);
	rc_close(&c);
	srv_stop(&s);
}

/* ------------------------------------------------------------------------ */
/* Interrupts                                                                */

static int set_irqs(struct rc *c, uint32_t flags, uint32_t index, uint32_t start,
		    uint32_t count, const void *data, size_t dlen, const int *fds, size_t nfds)
{
	uint8_t buf[64];
	struct vfu_irq_set s = { .argsz = (uint32_t)(20 + dlen), .flags = flags, .index = index,
				 .start = start, .count = count };

	memcpy(buf, &s, 20);
	if (dlen)
		memcpy(buf + 20, data, dlen);
	return rc_call(c, VFU_CMD_DEVICE_SET_IRQS, buf, 20 + dlen, fds, nfds, NULL);
}

/* Events on efd so far (0 when none); never blocks. */
static uint64_t events(int efd)
{
	uint64_t v = 0;

	if (read(efd, &v, 8) != 8)
		return 0;
	return v;
}

static int64_t dev_trigger(struct rc *c, uint32_t index, uint32_t sub)
{
	rc_write64(c, 0, TD_IRQ_GO, (uint64_t)index << 16 | sub);
	return (int64_t)rc_read64(c, 0, TD_IRQ_RES);
}

TEST(interrupts)
{
	const uint32_t EV = VFU_IRQ_SET_DATA_EVENTFD | VFU_IRQ_SET_ACTION_TRIGGER;
	const uint32_t NONE_T = VFU_IRQ_SET_DATA_NONE | VFU_IRQ_SET_ACTION_TRIGGER;
	struct vfu_irq_info info = { .argsz = 16, .index = VFM_VFU_IRQ_MSI };
	struct vfu_msg m = VFU_MSG_INIT;
	int efd[4], pipefd[2];
	uint8_t bools[2] = { 0, 1 };
	struct srv s;
	struct rc c;

	for (int i = 0; i < 4; i++)
		efd[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	srv_start_pair(&s, 0, NULL, &c);
	rc_hello(&c);
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_IRQ_INFO, &info, 16, NULL, 0, &m), 0);
	memcpy(&info, m.payload, 16);
	vfu_msg_release(&m);
	CHECK_EQ(info.count, 4);
	CHECK_EQ(info.flags, VFU_IRQ_INFO_F_EVENTFD | VFU_IRQ_INFO_F_MASKABLE);
	info = (struct vfu_irq_info){ .argsz = 16, .index = 5 };
	CHECK_EQ(rc_call(&c, VFU_CMD_DEVICE_GET_IRQ_INFO, &info, 16, NULL, 0, NULL), -EINVAL);

	/* No eventfd yet: the device's trigger has nowhere to go. */
	CHECK_EQ(dev_trigger(&c, VFM_VFU_IRQ_MSI, 0), -ENOENT);
	CHECK_EQ(set_irqs(&c, EV, VFM_VFU_IRQ_MSI, 0, 4, NULL, 0, efd, 4), 0);
	CHECK_EQ(dev_trigger(&c, VFM_VFU_IRQ_MSI, 2), 0);
	CHECK_EQ(events(efd[2]), 1);
	CHECK_EQ(events(efd[0]), 0);
	/* Masked: held; unmasked: delivered. */
	CHECK_EQ(set_irqs(&c, VFU_IRQ_SET_DATA_NONE | VFU_IRQ_SET_ACTION_MASK, VFM_VFU_IRQ_MSI, 1,
			  1, NULL, 0, NULL, 0), 0);
	CHECK_EQ(dev_trigger(&c, VFM_VFU_IRQ_MSI, 1), 0);
	CHECK_EQ(events(efd[1]), 0);
	CHECK_EQ(set_irqs(&c, VFU_IRQ_SET_DATA_NONE | VFU_IRQ_SET_ACTION_UNMASK, VFM_VFU_IRQ_MSI,
			  1, 1, NULL, 0, NULL, 0), 0);
	CHECK_EQ(events(efd[1]), 1);
	/* The client triggers: DATA_NONE for a range, DATA_BOOL for a subset. */
	CHECK_EQ(set_irqs(&c, NONE_T, VFM_VFU_IRQ_MSI, 0, 2, NULL, 0, NULL, 0), 0);
	CHECK_EQ(events(efd[0]), 1);
	CHECK_EQ(events(efd[1]), 1);
	CHECK_EQ(set_irqs(&c, VFU_IRQ_SET_DATA_BOOL | VFU_IRQ_SET_ACTION_TRIGGER, VFM_VFU_IRQ_MSI,
			  2, 2, bools, 2, NULL, 0), 0);
	CHECK_EQ(events(efd[2]), 0);
	CHECK_EQ(events(efd[3]), 1);
	/* Refusals. */
	CHECK_EQ(set_irqs(&c, VFU_IRQ_SET_DATA_EVENTFD | VFU_IRQ_SET_ACTION_MASK, VFM_VFU_IRQ_MSI,
			  0, 1, NULL, 0, efd, 1), -ENOTSUP);
	CHECK_EQ(set_irqs(&c, EV, VFM_VFU_IRQ_MSI, 3, 2, NULL, 0, efd, 2), -EINVAL);
	CHECK_EQ(set_irqs(&c, EV, VFM_VFU_IRQ_MSI, 0, 2, NULL, 0, efd, 1), -EINVAL);
	CHECK_EQ(set_irqs(&c, EV, 7, 0, 1, NULL, 0, efd, 1), -EINVAL);
	CHECK_EQ(set_irqs(&c, NONE_T | VFU_IRQ_SET_DATA_BOOL, VFM_VFU_IRQ_MSI, 0, 1, NULL, 0,
			  NULL, 0), -EINVAL);
	CHECK(pipe(pipefd) == 0);
	CHECK_EQ(set_irqs(&c, EV, VFM_VFU_IRQ_INTX, 0, 1, NULL, 0, &pipefd[1], 1), -EINVAL);
	close(pipefd[0]);
	close(pipefd[1]);
	/* De-assign one (eventfd flags, no fds), then disable the whole index. */
	CHECK_EQ(set_irqs(&c, EV, VFM_VFU_IRQ_MSI, 3, 1, NULL, 0, NULL, 0), 0);
	CHECK_EQ(dev_trigger(&c, VFM_VFU_IRQ_MSI, 3), -ENOENT);
	CHECK_EQ(dev_trigger(&c, VFM_VFU_IRQ_MSI, 0), 0);
	CHECK_EQ(set_irqs(&c, NONE_T, VFM_VFU_IRQ_MSI, 0, 0, NULL, 0, NULL, 0), 0);
	CHECK_EQ(dev_trigger(&c, VFM_VFU_IRQ_MSI, 0), -ENOENT);
	CHECK_EQ(dev_trigger(&c, VFM_VFU_IRQ_MSI, 9), -EINVAL);
	rc_close(&c);
	srv_stop(&s);
	for (int i = 0; i < 4; i++)
		close(efd[i]);
}
