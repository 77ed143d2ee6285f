/*
 * The shell tests' credentials: tls-gen-tool DIR x509 [SERVER_IP [CLIENT_CN]]
 * or tls-gen-tool DIR psk [IDENTITY]. DIR is created (mode 0700).
 */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "../tools/tls-gen.h"

int main(int argc, char **argv)
{
	struct vfm_error err = { 0 };
	struct tls_gen_opts o;
	int ret;

	if (argc < 3 || (strcmp(argv[2], "x509") && strcmp(argv[2], "psk"))) {
		fprintf(stderr, "usage: tls-gen-tool DIR x509 [SERVER_IP [CLIENT_CN]] | "
			"DIR psk [IDENTITY]\n");
		return 2;
	}
	mkdir(argv[1], 0700);
	if (!strcmp(argv[2], "psk")) {
		ret = tls_gen_psk(argv[1], argc > 3 ? argv[3] : "qemu", &err);
	} else {
		tls_gen_opts_default(&o);
		if (argc > 3)
			o.server_ip = argv[3];
		if (argc > 4)
			o.client_cn = argv[4];
		ret = tls_gen_x509(argv[1], &o, &err);
	}
	if (ret)
		fprintf(stderr, "tls-gen-tool: %s\n", err.msg);
	return ret ? 1 : 0;
}
