/* Parsers for the CLI's sizes ("64M"), rates ("8M/s"), durations ("300ms")
 * and switches. They reject empty strings, signs, overflow and junk. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "vfiomig/parse.h"

/* Leading decimal digits of s into *v; returns chars used, 0 if none, -1 on overflow. */
static int parse_digits(const char *s, uint64_t *v)
{
	uint64_t acc = 0;
	int i = 0;

	while (isdigit((unsigned char)s[i])) {
		unsigned d = (unsigned)(s[i] - '0');
		if (acc > (UINT64_MAX - d) / 10)
			return -1;
		acc = acc * 10 + d;
		i++;
	}
	*v = acc;
	return i;
}

static int mul_checked(uint64_t a, uint64_t b, uint64_t *out)
{
	if (b && a > UINT64_MAX / b)
		return -ERANGE;
	*out = a * b;
	return 0;
}

/* Parses "<digits><K|M|G|T>[i][B]" up to end or stop; *end points after it. */
static int parse_size_prefix(const char *s, uint64_t *bytes, const char **end,
			     struct vfm_error *err, const char *what)
{
	uint64_t v, mult = 1;
	const char *p;
	int n;

	if (!s || !*s)
		return vfm_error_set(err, VFM_EPARSE, "empty %s", what);
	n = parse_digits(s, &v);
	if (n < 0)
		return vfm_error_set(err, VFM_EPARSE, "%s '%s' is too large", what, s);
	if (n == 0)
		return vfm_error_set(err, VFM_EPARSE, "%s '%s' must start with a number", what, s);
	p = s + n;
	switch (toupper((unsigned char)*p)) {
	case 'K': mult = 1ull << 10; p++; break;
	case 'M': mult = 1ull << 20; p++; break;
	case 'G': mult = 1ull << 30; p++; break;
	case 'T': mult = 1ull << 40; p++; break;
	default: break;
	}
	if (mult > 1 && *p == 'i')
		p++;
	if (toupper((unsigned char)*p) == 'B')
		p++;
	if (mul_checked(v, mult, bytes))
		return vfm_error_set(err, VFM_EPARSE, "%s '%s' is too large", what, s);
	*end = p;
	return 0;
}

int vfm_parse_size(const char *s, uint64_t *bytes, struct vfm_error *err)
{
	const char *end;
	uint64_t v;
	int ret = parse_size_prefix(s, &v, &end, err, "size");

	if (ret)
		return ret;
	if (*end)
		return vfm_error_set(err, VFM_EPARSE,
				     "invalid size '%s' (expected e.g. 4096, 64K, 64M, 1G)", s);
	*bytes = v;
	return 0;
}

int vfm_parse_rate(const char *s, uint64_t *bytes_per_sec, struct vfm_error *err)
{
	const char *end;
	uint64_t v;
	int ret = parse_size_prefix(s, &v, &end, err, "rate");

	if (ret)
		return ret;
	if (strcmp(end, "/s") != 0 && *end)
		return vfm_error_set(err, VFM_EPARSE,
				     "invalid rate '%s' (expected e.g. 8M/s)", s);
	*bytes_per_sec = v;
	return 0;
}

int vfm_parse_duration_ns(const char *s, uint64_t *ns, struct vfm_error *err)
{
	static const struct { const char *suffix; uint64_t mult; } units[] = {
		{ "", 1000000ull }, { "ms", 1000000ull }, { "s", 1000000000ull },
		{ "us", 1000ull }, { "ns", 1ull },
	};
	uint64_t v;
	int n;

	if (!s || !*s)
		return vfm_error_set(err, VFM_EPARSE, "empty duration");
	n = parse_digits(s, &v);
	if (n <= 0)
		return vfm_error_set(err, VFM_EPARSE,
				     "invalid duration '%s' (expected e.g. 300, 300ms, 2s)", s);
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		if (strcmp(s + n, units[i].suffix) == 0) {
			if (mul_checked(v, units[i].mult, ns))
				return vfm_error_set(err, VFM_EPARSE, "duration '%s' is too large", s);
			return 0;
		}
	}
	return vfm_error_set(err, VFM_EPARSE,
			     "invalid duration '%s' (units: ns, us, ms, s; default ms)", s);
}

int vfm_parse_uint(const char *s, uint64_t min, uint64_t max, uint64_t *out,
		   struct vfm_error *err)
{
	uint64_t v;
	int n;

	if (!s || !*s)
		return vfm_error_set(err, VFM_EPARSE, "empty number");
	n = parse_digits(s, &v);
	if (n <= 0 || s[n])
		return vfm_error_set(err, VFM_EPARSE, "invalid number '%s'", s);
	if (v < min || v > max)
		return vfm_error_set(err, VFM_EPARSE,
				     "number '%s' out of range [%" PRIu64 ", %" PRIu64 "]",
				     s, min, max);
	*out = v;
	return 0;
}

int vfm_parse_onoff(const char *s, bool allow_auto, enum vfm_onoff *out,
		    struct vfm_error *err)
{
	static const char *const on[] = { "on", "true", "yes", "1" };
	static const char *const off[] = { "off", "false", "no", "0" };

	for (size_t i = 0; s && i < 4; i++) {
		if (strcasecmp(s, on[i]) == 0) {
			*out = VFM_ON;
			return 0;
		}
		if (strcasecmp(s, off[i]) == 0) {
			*out = VFM_OFF;
			return 0;
		}
	}
	if (s && allow_auto && strcasecmp(s, "auto") == 0) {
		*out = VFM_AUTO;
		return 0;
	}
	return vfm_error_set(err, VFM_EPARSE, "invalid switch '%s' (expected on|off%s)",
			     s ? s : "", allow_auto ? "|auto" : "");
}

const char *vfm_format_size(uint64_t bytes, char *buf, size_t len)
{
	static const char *const unit[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	double v = (double)bytes;
	int u = 0;

	while (v >= 1024.0 && u < 4) {
		v /= 1024.0;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%" PRIu64 " B", bytes);
	else
		snprintf(buf, len, "%.1f %s", v, unit[u]);
	return buf;
}
