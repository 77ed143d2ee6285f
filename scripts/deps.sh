#!/usr/bin/env bash
# Installs the Debian packages vfiomig's build, tests and demo need, when any
# is missing. Idempotent. As root it runs apt-get; otherwise it prints the
# command to run and exits non-zero. `deps.sh --bench` is accepted for the
# benchmarks (qemu-system-x86 is always installed: qemu_boot is a test).
set -euo pipefail

packages=(
	build-essential    # gcc, make, libc headers
	meson
	ninja-build
	pkg-config
	python3            # meson, and scripts/test-summary.py
	libjson-c-dev      # vfio-user VERSION capabilities, control socket
	libcmocka-dev      # libvfio-user's build needs it (interop tests, tests/peers/)
	libxxhash-dev      # XXH3 record checksums in the migration stream
	linux-libc-dev     # linux/vfio.h (6.1; lib/compat adds what it lacks)
	clang              # fuzz targets and the clang build
	libclang-rt-dev    # sanitizer and libFuzzer runtimes for clang
	valgrind
	gnuplot-nox        # plots of make bench (docs/performance.md)
	qemu-system-x86    # the qemu_boot test (CI runs it), the QEMU peer row of make bench,
	                   # and make check-kernel's nested guest (with its virtiofsd)
	libgnutls28-dev    # TLS on migration connections (lib/migration/tls.c)
	gnutls-bin         # certtool, psktool: making TLS credentials by hand (docs/security.md)
	iproute2           # ip, tc: the two-host tests (network namespaces, veth, tbf)
	kmod               # make check-kernel: depmod for the guest's modules
	bc                 # make check-kernel: the rig's stage timings
	xz-utils           # make check-kernel: the kernel source tarball
	libelf1            # make check-kernel: building mtty.ko
)
# --bench: also the extras only `make bench` uses (none beyond the above now).

missing=()
for p in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing+=("$p")
	fi
done

if [ ${#missing[@]} -eq 0 ]; then
	echo "deps: all ${#packages[@]} packages present"
	exit 0
fi

cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
	echo "deps: missing packages: ${missing[*]}" >&2
	echo "deps: run as root: apt-get update && $cmd" >&2
	exit 1
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends "${missing[@]}"
