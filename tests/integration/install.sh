#!/bin/sh
# meson install into a temp root, then build and run a program against the
# installed headers, shared library and pkg-config file. Also checks that the
# shared library exports only vfm_ symbols (visibility hidden by default).
# usage: install.sh BUILD_DIR
set -eu
build=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

meson install -C "$build" --no-rebuild --quiet --destdir "$tmp/root" >/dev/null

pc=$(find "$tmp/root" -name vfiomig.pc | head -n 1)
[ -n "$pc" ] || { echo "vfiomig.pc not installed"; exit 1; }
so=$(find "$tmp/root" -name 'libvfiomig.so.*' -type f | head -n 1)
[ -n "$so" ] || { echo "libvfiomig.so not installed"; exit 1; }

bad=$(nm -D --defined-only "$so" | awk '$2 ~ /[TDRB]/ {print $3}' | grep -v '^vfm_' || true)
if [ -n "$bad" ]; then
	echo "exported symbols without the vfm_ prefix:"; echo "$bad"; exit 1
fi
nm -D --defined-only "$so" | grep -q ' vfm_device_set_state$' || { echo "vfm_device_set_state not exported"; exit 1; }

cat > "$tmp/use.c" <<'C'
#include <stdio.h>
#include <vfiomig.h>
int main(void)
{
	enum vfm_state path[VFM_STATE_COUNT];
	size_t n;
	if (vfm_fsm_path(VFM_MIG_ALL, VFM_STATE_RUNNING, VFM_STATE_STOP_COPY, path, &n) || n != 3)
		return 1;
	printf("%s %s\n", vfm_version(), vfm_state_name(path[n - 1]));
	return 0;
}
C
export PKG_CONFIG_SYSROOT_DIR="$tmp/root"
export PKG_CONFIG_PATH=$(dirname "$pc")
cflags=$(pkg-config --cflags vfiomig)
libs=$(pkg-config --libs vfiomig)
libdir=$(dirname "$so")
cc -std=c11 -Wall -Werror $cflags "$tmp/use.c" -o "$tmp/use" $libs
out=$(LD_LIBRARY_PATH="$libdir" "$tmp/use")
case "$out" in
	*" STOP_COPY") echo "ok: $out" ;;
	*) echo "unexpected output: $out"; exit 1 ;;
esac
