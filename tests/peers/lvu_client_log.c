/*
 * vfu_log() for libvfio-user's transport compiled into lvu_client (its
 * samples/client.c defines its own the same way).
 */
#include <stdarg.h>
#include <stdio.h>

#include "libvfio-user.h"

void vfu_log(vfu_ctx_t *vfu_ctx, int level, const char *fmt, ...)
{
	va_list ap;

	(void)vfu_ctx;
	(void)level;
	va_start(ap, fmt);
	fputs("lvu_client: libvfio-user: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}
