/*
 * Fuzz target: the CLI's parsers of user input: sizes, rates, durations,
 * integers, on/off, migration URIs and device specs. The first byte picks
 * the parser; the rest is the text.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "migration/channel.h"
#include "vfiomig/migration.h"
#include "vfiomig/parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct vfm_error err = { 0 };
	char *s, backend[16], path[256], buf[600];
	struct vfm_device_props props;
	struct vfm_uri uri;
	enum vfm_onoff o;
	uint64_t v;

	if (size < 1 || size > 4096)
		return 0;
	s = malloc(size);
	if (!s)
		return 0;
	memcpy(s, data + 1, size - 1);
	s[size - 1] = '\0';
	switch (data[0] % 7) {
	case 0: vfm_parse_size(s, &v, &err); break;
	case 1: vfm_parse_rate(s, &v, &err); break;
	case 2: vfm_parse_duration_ns(s, &v, &err); break;
	case 3: vfm_parse_uint(s, 1, 1000, &v, &err); break;
	case 4: vfm_parse_onoff(s, true, &o, &err); break;
	case 5:
		if (vfm_uri_parse(s, &uri, &err) == 0)
			vfm_uri_str(&uri, buf, sizeof(buf));
		break;
	default:
		vfm_device_spec_parse(s, backend, sizeof(backend), path, sizeof(path), &props, &err);
		break;
	}
	free(s);
	return 0;
}
