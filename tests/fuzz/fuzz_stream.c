/* Fuzz target: the migration stream reader (header, record framing, checksums). */
#include <stdint.h>
#include <stddef.h>

#include "migration/stream.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct vfm_error err = { 0 };

	vfm_stream_parse_buffer(data, size, &err);
	return 0;
}
