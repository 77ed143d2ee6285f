/* Size, rate, duration and switch parsing: good values and every kind of bad. */
#include "harness.h"
#include "vfiomig/parse.h"

TEST(size_good)
{
	static const struct { const char *s; uint64_t v; } cases[] = {
		{ "0", 0 }, { "4096", 4096 }, { "64K", 64ull << 10 }, { "64k", 64ull << 10 },
		{ "64M", 64ull << 20 }, { "64MiB", 64ull << 20 }, { "64MB", 64ull << 20 },
		{ "1G", 1ull << 30 }, { "2T", 2ull << 40 }, { "10B", 10 },
		{ "16383T", 16383ull << 40 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t v = 1;
		struct vfm_error err = { 0 };
		if (vfm_parse_size(cases[i].s, &v, &err))
			FAIL("'%s' rejected: %s", cases[i].s, err.msg);
		if (v != cases[i].v)
			FAIL("'%s' -> %" PRIu64, cases[i].s, v);
	}
}

TEST(size_bad)
{
	static const char *const bad[] = {
		"", "M", "-1", "+5", "1.5G", "64X", "64MM", "64 M", " 64", "64M ",
		"18446744073709551616", "16777216T", "99999999999999999999999", "0x10",
		"64M/s", "1iB",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		uint64_t v = 12345;
		struct vfm_error err = { 0 };
		if (vfm_parse_size(bad[i], &v, &err) != VFM_EPARSE)
			FAIL("'%s' accepted as %" PRIu64, bad[i], v);
		CHECK(err.msg[0] != '\0');
		CHECK_EQ(v, 12345); /* output untouched on error */
	}
	CHECK_EQ(vfm_parse_size(NULL, &(uint64_t){ 0 }, NULL), VFM_EPARSE);
}

TEST(rate)
{
	uint64_t v;
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_parse_rate("8M/s", &v, &err), 0);
	CHECK_EQ(v, 8ull << 20);
	CHECK_EQ(vfm_parse_rate("8M", &v, &err), 0);
	CHECK_EQ(v, 8ull << 20);
	CHECK_EQ(vfm_parse_rate("0", &v, &err), 0);
	CHECK_EQ(v, 0);
	CHECK_EQ(vfm_parse_rate("1G/s", &v, &err), 0);
	CHECK_EQ(v, 1ull << 30);
	static const char *const bad[] = { "", "/s", "8M/", "8M/h", "8M/s/s", "fast", "-8M/s" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (vfm_parse_rate(bad[i], &v, NULL) != VFM_EPARSE)
			FAIL("rate '%s' accepted", bad[i]);
}

TEST(duration)
{
	static const struct { const char *s; uint64_t ns; } cases[] = {
		{ "300", 300000000ull }, { "300ms", 300000000ull }, { "2s", 2000000000ull },
		{ "500us", 500000ull }, { "10ns", 10 }, { "0", 0 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t v;
		if (vfm_parse_duration_ns(cases[i].s, &v, NULL) || v != cases[i].ns)
			FAIL("duration '%s'", cases[i].s);
	}
	static const char *const bad[] = {
		"", "ms", "3h", "1.5s", "-1", "10 ms", "99999999999999999s", "300MS0",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		uint64_t v;
		if (vfm_parse_duration_ns(bad[i], &v, NULL) != VFM_EPARSE)
			FAIL("duration '%s' accepted", bad[i]);
	}
}

TEST(uint_range)
{
	uint64_t v;

	CHECK_EQ(vfm_parse_uint("4", 0, 16, &v, NULL), 0);
	CHECK_EQ(v, 4);
	CHECK_EQ(vfm_parse_uint("17", 0, 16, &v, NULL), VFM_EPARSE);
	CHECK_EQ(vfm_parse_uint("0", 1, 16, &v, NULL), VFM_EPARSE);
	CHECK_EQ(vfm_parse_uint("4x", 0, 16, &v, NULL), VFM_EPARSE);
	CHECK_EQ(vfm_parse_uint("", 0, 16, &v, NULL), VFM_EPARSE);
	CHECK_EQ(vfm_parse_uint("18446744073709551616", 0, UINT64_MAX, &v, NULL), VFM_EPARSE);
	CHECK_EQ(vfm_parse_uint("18446744073709551615", 0, UINT64_MAX, &v, NULL), 0);
	CHECK(v == UINT64_MAX);
}

TEST(onoff)
{
	enum vfm_onoff o;

	CHECK_EQ(vfm_parse_onoff("on", false, &o, NULL), 0);
	CHECK_EQ(o, VFM_ON);
	CHECK_EQ(vfm_parse_onoff("OFF", false, &o, NULL), 0);
	CHECK_EQ(o, VFM_OFF);
	CHECK_EQ(vfm_parse_onoff("auto", true, &o, NULL), 0);
	CHECK_EQ(o, VFM_AUTO);
	CHECK_EQ(vfm_parse_onoff("auto", false, &o, NULL), VFM_EPARSE);
	CHECK_EQ(vfm_parse_onoff("maybe", true, &o, NULL), VFM_EPARSE);
	CHECK_EQ(vfm_parse_onoff(NULL, true, &o, NULL), VFM_EPARSE);
}

TEST(format_size)
{
	char buf[32];

	CHECK_STR(vfm_format_size(512, buf, sizeof(buf)), "512 B");
	CHECK_STR(vfm_format_size(64ull << 20, buf, sizeof(buf)), "64.0 MiB");
	CHECK_STR(vfm_format_size(3ull << 29, buf, sizeof(buf)), "1.5 GiB");
}

TEST(error_chain)
{
	struct vfm_error err = { 0 };

	CHECK_EQ(vfm_error_set(&err, -EIO, "inner %d", 1), -EIO);
	CHECK_EQ(vfm_error_set(&err, -EIO, "outer"), -EIO);
	CHECK_STR(err.msg, "outer: inner 1");
	vfm_error_clear(&err);
	CHECK_EQ(err.code, 0);
	CHECK_STR(vfm_strerror(VFM_EFORBIDDEN), "forbidden device state transition");
	CHECK_STR(vfm_strerror(-ENOENT), "No such file or directory");
	CHECK_EQ(vfm_error_set(NULL, -EINVAL, "nothing"), -EINVAL);
}
