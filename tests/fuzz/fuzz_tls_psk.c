/*
 * Fuzz target: keys.psk (lib/migration/tls_creds.c), read from a file the
 * user points --tls-creds psk:DIR at. The whole input is the file; it is
 * parsed for the first entry (the client's view) and for an identity (the
 * server's lookup of what a client named).
 */
#include <stdint.h>
#include <string.h>

#include "migration/tls.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	unsigned char key[VFM_TLS_PSK_MAX_KEY];
	char id[VFM_TLS_PSK_MAX_ID + 1];
	struct vfm_error err = { 0 };
	size_t klen = 0;

	if (size > 65536)
		return 0;
	if (!vfm_tls_psk_parse((const char *)data, size, NULL, id, key, &klen, &err)) {
		/* What the first entry yields is found again by its name. */
		char again[VFM_TLS_PSK_MAX_ID + 1];
		unsigned char k2[VFM_TLS_PSK_MAX_KEY];
		size_t l2 = 0;

		if (klen < 1 || klen > VFM_TLS_PSK_MAX_KEY || strlen(id) > VFM_TLS_PSK_MAX_ID ||
		    vfm_tls_psk_parse((const char *)data, size, id, again, k2, &l2, &err) ||
		    l2 != klen || memcmp(key, k2, klen))
			__builtin_trap();
	}
	vfm_tls_psk_parse((const char *)data, size, "qemu", id, key, &klen, &err);
	return 0;
}
