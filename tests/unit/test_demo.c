/* vfiomig demo's pieces: comparing the two VMs' status into the result,
 * the report, and the child process and temp dir helpers. */
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "harness.h"
#include "../../tools/demo.h"

/* A query-vfiomig status object as a VM reports it. */
static json_object *status(const char *mig_status, const char *sum0, const char *sum1,
			   const char *guest_verified)
{
	char text[2048];

	snprintf(text, sizeof(text),
		 "{\"vm\": {\"state\": \"running\"},"
		 " \"migration\": {\"status\": \"%s\", \"error\": \"%s\", \"downtime_ms\": 12.5,"
		 "  \"expected_downtime_ms\": 10.25, \"downtime_limit_ms\": 300,"
		 "  \"total_time_ms\": 800, \"setup_time_ms\": 4, \"precopy_iterations\": 6,"
		 "  \"transferred_bytes\": 3000, \"ram_transferred_bytes\": 2000,"
		 "  \"device_transferred_bytes\": 1000, \"throughput_mbps\": 950.5,"
		 "  \"multifd_channels\": 2, \"pending_bytes\": 0},"
		 " \"devices\": [{\"id\": \"dev0\", \"backend\": \"vfio-user\", \"state\": \"STOP\","
		 "   \"transferred_bytes\": 600 %s%s%s},"
		 "  {\"id\": \"dev1\", \"backend\": \"vfio-user\", \"state\": \"STOP\","
		 "   \"transferred_bytes\": 400 %s%s%s}],"
		 " \"guest\": {\"kind\": \"synthetic\", \"verified\": %s, \"errors\": %d,"
		 "  \"pages_checked\": 64, \"detail\": \"%s\","
		 "  \"quick\": {\"verified\": true, \"errors\": 0, \"pages_checked\": 64,"
		 "   \"detail\": \"\", \"verify_ms\": 1.5},"
		 "  \"full\": null}}",
		 mig_status, strcmp(mig_status, "completed") ? "connection reset" : "",
		 sum0 ? ", \"state_checksum\": \"" : "", sum0 ? sum0 : "", sum0 ? "\"" : "",
		 sum1 ? ", \"state_checksum\": \"" : "", sum1 ? sum1 : "", sum1 ? "\"" : "",
		 guest_verified, !strcmp(guest_verified, "false") ? 3 : 0,
		 !strcmp(guest_verified, "false") ? "page 7: generation 4, expected 5" : "");
	json_object *o = json_tokener_parse(text), *g, *full;

	if (!o)
		FAIL("bad test JSON: %s", text);
	/* As guest-verify returns it: the full check (the last one) is the
	 * top-level keys; "null": only the quick check on load ran. */
	if (strcmp(guest_verified, "null") && json_object_object_get_ex(o, "guest", &g)) {
		full = json_object_new_object();
		json_object_object_foreach(g, k, v)
			if (strcmp(k, "kind") && strcmp(k, "quick") && strcmp(k, "full"))
				json_object_object_add(full, k, json_object_get(v));
		json_object_object_add(g, "full", full);
	}
	return o;
}

static json_object *key(json_object *o, const char *k)
{
	json_object *v = NULL;

	if (!json_object_object_get_ex(o, k, &v))
		FAIL("key '%s' missing in %s", k, json_object_to_json_string(o));
	return v;
}

static bool compare(const char *s_st, const char *s0, const char *s1, const char *d_st,
		    const char *d0, const char *d1, const char *guest, json_object **res_out,
		    char *why, size_t len)
{
	json_object *res = demo_result_new("synthetic", "tcp:127.0.0.1:4444", 300);
	json_object *src = status(s_st, s0, s1, "null"), *dst = status(d_st, d0, d1, guest);
	bool ok = demo_result_compare(res, src, dst, why, len);

	json_object_put(src);
	json_object_put(dst);
	if (res_out)
		*res_out = res;
	else
		json_object_put(res);
	return ok;
}

static const char *const contract_keys[] = {
	"verified", "guest", "devices", "uri", "downtime_ms", "expected_downtime_ms",
	"downtime_limit_ms", "total_time_ms", "setup_time_ms", "precopy_iterations",
	"transferred_bytes", "ram_transferred_bytes", "device_transferred_bytes",
	"throughput_mbps", "multifd_channels",
};

TEST(new_result_has_every_contract_key)
{
	json_object *res = demo_result_new("kvm", NULL, 250);

	for (size_t i = 0; i < sizeof(contract_keys) / sizeof(contract_keys[0]); i++)
		key(res, contract_keys[i]);
	CHECK(!json_object_get_boolean(key(res, "verified")));
	CHECK_EQ(json_object_get_int64(key(res, "downtime_limit_ms")), 250);
	CHECK_STR(json_object_get_string(key(key(res, "guest"), "kind")), "kvm");
	json_object_put(res);
}

TEST(all_match_verifies_and_copies_the_source_figures)
{
	json_object *res, *devs, *d0;
	char why[256];

	CHECK(compare("completed", "0xaa", "0xbb", "completed", "0xaa", "0xbb", "true", &res,
		      why, sizeof(why)));
	CHECK(json_object_get_boolean(key(res, "verified")));
	CHECK_STR(json_object_get_string(key(res, "error")), "");
	CHECK_EQ(json_object_get_int64(key(res, "transferred_bytes")), 3000);
	CHECK_EQ(json_object_get_int64(key(res, "ram_transferred_bytes")), 2000);
	CHECK_EQ(json_object_get_int64(key(res, "device_transferred_bytes")), 1000);
	CHECK_EQ(json_object_get_int64(key(res, "precopy_iterations")), 6);
	CHECK_EQ(json_object_get_int64(key(res, "multifd_channels")), 2);
	CHECK(json_object_get_double(key(res, "downtime_ms")) == 12.5);
	CHECK(json_object_get_double(key(res, "throughput_mbps")) == 950.5);
	devs = key(res, "devices");
	CHECK_EQ(json_object_array_length(devs), 2);
	d0 = json_object_array_get_idx(devs, 0);
	CHECK_STR(json_object_get_string(key(d0, "id")), "dev0");
	CHECK_STR(json_object_get_string(key(d0, "source_checksum")), "0xaa");
	CHECK_STR(json_object_get_string(key(d0, "destination_checksum")), "0xaa");
	CHECK_EQ(json_object_get_int64(key(d0, "transferred_bytes")), 600);
	CHECK(json_object_get_boolean(key(d0, "verified")));
	CHECK(json_object_get_boolean(key(key(res, "guest"), "verified")));
	CHECK_EQ(json_object_get_int64(key(key(res, "guest"), "pages_checked")), 64);
	json_object_put(res);
}

TEST(device_checksum_mismatch_fails_naming_the_device)
{
	json_object *res;
	char why[256];

	CHECK(!compare("completed", "0xaa", "0xbb", "completed", "0xaa", "0xbc", "true", &res,
		       why, sizeof(why)));
	CHECK(strstr(why, "dev1") && strstr(why, "0xbb") && strstr(why, "0xbc"));
	CHECK(!json_object_get_boolean(key(res, "verified")));
	CHECK_STR(json_object_get_string(key(res, "error")), why);
	CHECK(json_object_get_boolean(key(json_object_array_get_idx(key(res, "devices"), 0),
					  "verified")));
	CHECK(!json_object_get_boolean(key(json_object_array_get_idx(key(res, "devices"), 1),
					   "verified")));
	json_object_put(res);
}

TEST(missing_checksum_fails)
{
	char why[256];

	CHECK(!compare("completed", "0xaa", NULL, "completed", "0xaa", NULL, "true", NULL,
		       why, sizeof(why)));
	CHECK(strstr(why, "dev1") && strstr(why, "checksum"));
}

TEST(guest_check_failure_fails_with_its_detail)
{
	char why[256];

	CHECK(!compare("completed", "0xaa", "0xbb", "completed", "0xaa", "0xbb", "false", NULL,
		       why, sizeof(why)));
	CHECK(strstr(why, "guest") && strstr(why, "3 errors") && strstr(why, "page 7"));
}

TEST(guest_never_verified_fails)
{
	char why[256];

	CHECK(!compare("completed", "0xaa", "0xbb", "completed", "0xaa", "0xbb", "null", NULL,
		       why, sizeof(why)));
	CHECK(strstr(why, "never verified"));
}

TEST(failed_migration_fails_with_its_error_first)
{
	char why[256];

	CHECK(!compare("failed", "0xaa", "0xbb", "completed", "0xaa", "0xbc", "true", NULL,
		       why, sizeof(why)));
	CHECK(strstr(why, "failed: connection reset"));
}

TEST(missing_destination_device_fails)
{
	json_object *res = demo_result_new("synthetic", "unix:/x", 300);
	json_object *src = status("completed", "0xaa", "0xbb", "null");
	json_object *dst = status("completed", "0xaa", "0xbb", "true"), *devs;
	char why[256];

	json_object_object_get_ex(dst, "devices", &devs);
	json_object_array_del_idx(devs, 1, 1);
	CHECK(!demo_result_compare(res, src, dst, why, sizeof(why)));
	CHECK(strstr(why, "2 devices") && strstr(why, "1"));
	json_object_put(src);
	json_object_put(dst);
	json_object_put(res);
}

static char *report(json_object *res)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	CHECK(f);
	demo_report_human(res, f);
	fclose(f);
	return buf;
}

TEST(report_of_a_verified_run)
{
	json_object *res;
	char why[256], *text;

	CHECK(compare("completed", "0xaa", "0xbb", "completed", "0xaa", "0xbb", "true", &res,
		      why, sizeof(why)));
	demo_result_event(res, 0, "start", "2 dma devices");
	demo_result_event(res, 1200.4, "completed", "");
	text = report(res);
	CHECK(strstr(text, "result: VERIFIED"));
	CHECK(strstr(text, "tcp:127.0.0.1:4444"));
	CHECK(strstr(text, "dev0") && strstr(text, "0xaa == 0xaa: ok"));
	CHECK(strstr(text, "12.5 ms measured, 10.2 ms expected, limit 300 ms"));
	CHECK(strstr(text, "6 pre-copy iterations"));
	CHECK(strstr(text, "1200 ms  completed"));
	CHECK(strstr(text, "start              2 dma devices"));
	CHECK(strstr(text, "64 pages checked"));
	free(text);
	json_object_put(res);
}

TEST(report_of_a_failed_run_says_why)
{
	json_object *res;
	char why[256], *text;

	CHECK(!compare("completed", "0xaa", "0xbb", "completed", "0xaa", "0xbc", "true", &res,
		       why, sizeof(why)));
	text = report(res);
	CHECK(strstr(text, "result: NOT VERIFIED: dev1"));
	CHECK(strstr(text, "0xbb != 0xbc: FAILED"));
	free(text);
	json_object_put(res);
}

TEST(progress_line)
{
	json_object *mig = json_tokener_parse("{\"status\": \"active\", \"transferred_bytes\": "
					      "1048576, \"pending_bytes\": 2097152, "
					      "\"bandwidth_bps\": 3145728.0}");
	char line[160];

	demo_progress_line(mig, line, sizeof(line));
	CHECK(strstr(line, "active") && strstr(line, "1.0 MiB sent") &&
	      strstr(line, "2.0 MiB pending") && strstr(line, "3.0 MiB/s"));
	CHECK(!strstr(line, "converging"));
	json_object_put(mig);
}

TEST(progress_line_not_converging)
{
	json_object *mig = json_tokener_parse("{\"status\": \"active\", \"transferred_bytes\": "
					      "1048576, \"pending_bytes\": 2097152, "
					      "\"bandwidth_bps\": 3145728.0, \"converging\": false, "
					      "\"needed_downtime_ms\": 812.4, "
					      "\"bottleneck\": \"vfio:dev0\"}");
	char line[256];

	demo_progress_line(mig, line, sizeof(line));
	CHECK(strstr(line, "NOT converging: needs ~812 ms downtime (vfio:dev0)"));
	json_object_put(mig);
}

/* ---- processes and files ---- */

static char tmp[128];

static void make_tmp(void)
{
	struct vfm_error err = { 0 };
	struct stat st;

	if (demo_tmpdir_create(tmp, sizeof(tmp), &err))
		FAIL("tmpdir: %s", err.msg);
	CHECK(!stat(tmp, &st) && S_ISDIR(st.st_mode) && (st.st_mode & 0777) == 0700);
}

TEST(child_exit_status_and_output_tail)
{
	char log[256], how[96], tail[256];
	char *argv[] = { "/bin/sh", "-c", "for i in 1 2 3 4 5; do echo line$i >&2; done; exit 3",
			 NULL };
	struct demo_child c;
	struct vfm_error err = { 0 };
	double end;

	make_tmp();
	snprintf(log, sizeof(log), "%s/sh.log", tmp);
	CHECK_EQ(demo_child_spawn(&c, "sh", log, argv, &err), 0);
	CHECK(c.pid > 0);
	end = demo_now_ms() + 5000;
	while (!demo_child_exited(&c) && demo_now_ms() < end)
		usleep(1000);
	CHECK(c.reaped);
	CHECK_STR(demo_child_describe(&c, how, sizeof(how)), "exited with status 3");
	demo_tail(log, 2, tail, sizeof(tail));
	CHECK_STR(tail, "line4\nline5");
	demo_tail(log, 10, tail, sizeof(tail));
	CHECK_STR(tail, "line1\nline2\nline3\nline4\nline5");
	demo_tail(log, 1, tail, 4);  /* the last len-1 bytes of the file */
	CHECK_STR(tail, "e5");
	demo_tmpdir_remove(tmp);
	CHECK(access(tmp, F_OK) && errno == ENOENT);
}

TEST(child_that_cannot_run_is_an_error)
{
	char log[256];
	char *argv[] = { "/nonexistent/vfiomig", NULL };
	struct demo_child c;
	struct vfm_error err = { 0 };

	make_tmp();
	snprintf(log, sizeof(log), "%s/x.log", tmp);
	CHECK(demo_child_spawn(&c, "x", log, argv, &err) == -ENOENT);
	CHECK(strstr(err.msg, "x: cannot run /nonexistent/vfiomig"));
	CHECK(c.reaped);
	demo_tmpdir_remove(tmp);
}

TEST(stop_kills_a_child_that_ignores_sigterm)
{
	char log[256], how[96];
	/* Only builtins: a forked sleep would outlive the shell we kill. */
	char *argv[] = { "/bin/sh", "-c", "trap '' TERM; echo ready; while :; do :; done", NULL };
	struct demo_child c[2];
	struct vfm_error err = { 0 };
	char *argv2[] = { "/bin/sh", "-c", "while :; do :; done", NULL };
	char tail[64] = "";
	double end;

	make_tmp();
	snprintf(log, sizeof(log), "%s/stubborn.log", tmp);
	CHECK_EQ(demo_child_spawn(&c[0], "stubborn", log, argv, &err), 0);
	snprintf(log, sizeof(log), "%s/polite.log", tmp);
	CHECK_EQ(demo_child_spawn(&c[1], "polite", log, argv2, &err), 0);
	/* The trap must be set before the signal comes. */
	end = demo_now_ms() + 5000;
	while (strcmp(tail, "ready") && demo_now_ms() < end) {
		usleep(1000);
		demo_tail(c[0].log_path, 1, tail, sizeof(tail));
	}
	CHECK_STR(tail, "ready");
	demo_children_stop(c, 2, 200);
	CHECK(c[0].reaped && c[1].reaped);
	CHECK_STR(demo_child_describe(&c[0], how, sizeof(how)), "killed by signal 9 (Killed)");
	CHECK_STR(demo_child_describe(&c[1], how, sizeof(how)), "killed by signal 15 (Terminated)");
	CHECK(kill(c[0].pid, 0) && errno == ESRCH);
	demo_children_stop(c, 2, 200);  /* twice is harmless */
	demo_tmpdir_remove(tmp);
}

static int bind_unix(const char *path, bool do_listen)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);

	CHECK(fd >= 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	CHECK(!bind(fd, (struct sockaddr *)&sa, sizeof(sa)));
	if (do_listen)
		CHECK(!listen(fd, 4));
	return fd;
}

TEST(wait_socket_sees_a_listener_not_a_bound_socket)
{
	char path[200];
	struct vfm_error err = { 0 };
	int fd;

	make_tmp();
	snprintf(path, sizeof(path), "%s/s.sock", tmp);
	CHECK(demo_wait_socket(path, NULL, 100, NULL, &err) == -ETIMEDOUT);
	fd = bind_unix(path, false);
	CHECK(demo_wait_socket(path, NULL, 100, NULL, &err) == -ETIMEDOUT);
	CHECK(strstr(err.msg, "s.sock"));
	CHECK(!listen(fd, 4));
	vfm_error_clear(&err);
	CHECK_EQ(demo_wait_socket(path, NULL, 1000, NULL, &err), 0);
	close(fd);
	demo_tmpdir_remove(tmp);
}

TEST(wait_socket_fails_early_when_the_owner_dies)
{
	char path[200], log[256];
	char *argv[] = { "/bin/sh", "-c", "echo no such option >&2; exit 2", NULL };
	struct vfm_error err = { 0 };
	struct demo_child c;
	volatile sig_atomic_t stop = 0;


	make_tmp();
	snprintf(path, sizeof(path), "%s/never.sock", tmp);
	snprintf(log, sizeof(log), "%s/owner.log", tmp);
	CHECK_EQ(demo_child_spawn(&c, "dev0-src", log, argv, &err), 0);
	CHECK(demo_wait_socket(path, &c, 20000, &stop, &err) == -ECHILD);
	CHECK(strstr(err.msg, "dev0-src exited with status 2"));
	stop = 1;
	CHECK(demo_wait_socket(path, NULL, 20000, &stop, &err) == -EINTR);
	demo_tmpdir_remove(tmp);
}

TEST(tmpdir_removal_takes_files_and_sockets)
{
	char path[200];
	int fd;

	make_tmp();
	snprintf(path, sizeof(path), "%s/a.log", tmp);
	fd = open(path, O_CREAT | O_WRONLY, 0600);
	CHECK(fd >= 0);
	close(fd);
	snprintf(path, sizeof(path), "%s/b.sock", tmp);
	close(bind_unix(path, true));
	demo_tmpdir_remove(tmp);
	CHECK(access(tmp, F_OK) && errno == ENOENT);
}
