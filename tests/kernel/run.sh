#!/bin/sh
# make check-kernel: tests/kernel/suite.sh in two nested guests (Debian's
# 6.12 kernel, tests/kernel/run-in-guest.sh): the group/type1 path as Debian
# builds it, then --iommufd (cdev + iommufd, vfio and vfio-pci rebuilt as
# modules). Each is a q35 machine with an emulated VT-d IOMMU and two QEMU
# edu devices behind one PCI bridge (one IOMMU group) for vfio-pci
# (tests/kernel/pci.sh), and 4 mtty mdevs (the other tests). Prints each
# suite's lines, then 'N passed, N failed' over both. A guest that fails to
# boot or times out counts as one failure.
# usage: run.sh BUILD_DIR [type1|iommufd]...
# KVFIO_RIG overrides the rig; KVFIO_TIMEOUT the per-guest bound (s, default 900).
set -u
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "${1:?usage: run.sh BUILD_DIR [type1|iommufd]...}" && pwd); shift
rig=${KVFIO_RIG:-$here/run-in-guest.sh}
paths=${*:-type1 iommufd}
# The machine: VT-d without interrupt remapping (pci.sh allows that);
# devices behind a conventional bridge share its requester ID, hence one group.
PCI_QEMU="-machine q35 -device intel-iommu,intremap=off -device pci-bridge,id=br0,chassis_nr=1
	-device edu,bus=br0,addr=1 -device edu,bus=br0,addr=2"
pass=0 failed=0
# The setup (packages, kernel, modules) once, before any guest.
nice "$rig" --iommufd --setup-only >/dev/null || { echo "check-kernel: rig setup failed"; echo "0 passed, 1 failed"; exit 1; }
for p in $paths; do
	set --
	for a in $PCI_QEMU; do set -- "$@" --qemu-arg "$a"; done
	[ "$p" = iommufd ] && set -- "$@" --iommufd
	out=$(nice "$rig" "$@" --mdevs 4 --append "intel_iommu=on iommu=pt" \
		--timeout "${KVFIO_TIMEOUT:-900}" -- sh "$here/suite.sh" "$build/tools/vfiomig" 2>&1)
	echo "$out"
	line=$(echo "$out" | grep -E "^kernel suite \\($p\\): [0-9]+ passed, [0-9]+ failed" | tail -1)
	if [ -z "$line" ]; then
		echo "FAIL the $p guest ended without a summary"
		failed=$((failed + 1))
		continue
	fi
	pass=$((pass + $(echo "$line" | sed -E 's/.*: ([0-9]+) passed.*/\1/')))
	failed=$((failed + $(echo "$line" | sed -E 's/.* ([0-9]+) failed/\1/')))
done
echo "$pass passed, $failed failed"
[ $failed = 0 ]
