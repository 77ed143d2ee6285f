#!/bin/sh
# Real PCI devices on the real kernel, in a guest of run.sh with its PCI
# machine (q35 with an emulated VT-d IOMMU, intel-iommu,intremap=off, and two
# QEMU `edu` devices behind one conventional PCI bridge, which puts them in
# one IOMMU group), bound to vfio-pci: Debian's own on the group/type1 path,
# the rig's rebuilt one with a cdev on the iommufd path (where `vfio:BDF`
# opens the cdev, and one /dev/iommu replaces the container and group fd):
# - named by PCI address (vfio:0000:BB:DD.F and vfio:BB:DD.F), config space
#   read (identity 1234:11e8), BAR0 mmap()ed (region_areas: one area, edu
#   has no MSI-X table to leave out);
# - `info` on a device without migration support says so;
# - both devices of the group open in one `vfiomig vm` process: one
#   container, one group fd, guest RAM mapped for DMA;
# - edu DMAs a page out of memory the backend mapped and back into another
#   (kvfio-edu-dma, through VT-d), and type1's dirty report has that page
#   set (and, for an IOMMU-backed group, every other page too);
# - the x86 MSI window 0xfee00000 is a reserved IOVA range under VT-d: guest
#   RAM of 4 GiB from 0 crosses it and is refused with a message naming it.
# usage: pci.sh VFIOMIG
bin=$1
. "$(dirname "$0")/lib.sh"

modprobe -d "$KVFIO_STAGE" vfio-pci || { bad "modprobe vfio-pci"; finish; }
# intremap=off: no interrupt remapping, which type1 and iommufd refuse unless
# allowed (vfio_iommu_type1.c and iommufd/device.c, allow_unsafe_interrupts).
echo Y >/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
iommu=type1v2
if [ -e /dev/iommu ]; then
	iommu=iommufd
	echo Y >/sys/module/iommufd/parameters/allow_unsafe_interrupts
fi
edus=""
for d in /sys/bus/pci/devices/*; do
	[ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ] && edus="$edus ${d##*/}"
done
set -- $edus
[ $# = 2 ] && ok "two edu devices: $*" || { bad "edu devices: '$edus'"; ls /sys/bus/pci/devices; finish; }
a=$1 b=$2
ga=$(basename "$(readlink "/sys/bus/pci/devices/$a/iommu_group")")
gb=$(basename "$(readlink "/sys/bus/pci/devices/$b/iommu_group")")
[ -n "$ga" ] && [ "$ga" = "$gb" ] && ok "one IOMMU group ($ga): $(ls "/sys/kernel/iommu_groups/$ga/devices" | tr '\n' ' ')" \
	|| bad "groups '$ga' '$gb'"
for d in $a $b; do
	echo vfio-pci >"/sys/bus/pci/devices/$d/driver_override"
	echo "$d" >/sys/bus/pci/drivers_probe
	[ "$(basename "$(readlink "/sys/bus/pci/devices/$d/driver")")" = vfio-pci ] || bad "$d not bound to vfio-pci"
done
[ -c "/dev/vfio/$ga" ] && ok "/dev/vfio/$ga" || { bad "no /dev/vfio/$ga"; ls -l /dev/vfio; finish; }
if [ $iommu = iommufd ]; then
	ls "/sys/bus/pci/devices/$a/vfio-dev/" | grep -q '^vfio[0-9]' && ok "cdev $(ls "/sys/bus/pci/devices/$a/vfio-dev/")" \
		|| bad "no vfio cdev for $a"
fi

# info by full and short PCI address
vfm info "vfio:$a" >"$tmp/out" 2>&1; rc=$?
sed 's/^/    /' "$tmp/out"
[ $rc = 0 ] && ok "info vfio:$a" || bad "info vfio:$a exited $rc"
grep -q '^identity: PCI 1234:11e8' "$tmp/out" && ok "config space read: 1234:11e8" || bad "identity"
grep -qE '^  BAR0 +1048576 bytes  rwm  \(mapped: 1 area\)' "$tmp/out" && ok "BAR0: 1 MiB, mmap()ed" || bad "BAR0 line"
grep -q '^migration: not supported' "$tmp/out" && ok "no migration support said" || bad "migration line"
grep -q "^IOMMU: $iommu," "$tmp/out" && ok "IOMMU: $iommu" || bad "IOMMU line"
# type1's tracking for an IOMMU-backed group is every page, and info says so.
[ $iommu = iommufd ] || { grep -q '^IOMMU: type1v2, dirty tracking yes (every mapped page: an IOMMU-backed group)' \
	"$tmp/out" && ok "info: type1 tracking is every page here" || bad "info: type1 exactness"; }
vfm info "vfio:${b#0000:}" >"$tmp/out" 2>&1 && grep -q '^identity: PCI 1234:11e8' "$tmp/out" \
	&& ok "info vfio:${b#0000:} (domain 0 implied)" || { bad "short BDF"; cat "$tmp/out"; }
vfm save "vfio:$a" "$tmp/a.state" >"$tmp/out" 2>&1 && bad "save of a device without migration" \
	|| { grep -qi 'migrat' "$tmp/out" && ok "save refused: $(head -1 "$tmp/out")" || { bad "save message"; cat "$tmp/out"; }; }
[ -e "$tmp/a.state" ] && bad "save left a file"

# Both devices of the group in one process: one container and one group fd,
# or one /dev/iommu.
bg timeout -k 5 120 "$bin" vm --mem 32M --guest none --device "vfio:$a,id=a" \
	--device "vfio:$b,id=b" --control "$tmp/vm" -v
vm_pid=$last
wait_sock "$tmp/vm" || { bad "the VM did not start"; cat "$tmp/log"; finish; }
vm=$(pgrep -P "$vm_pid" | head -1)
fds=$(ls -l "/proc/$vm/fd" 2>/dev/null)
if [ $iommu = iommufd ]; then
	n=$(echo "$fds" | grep -c ' -> /dev/iommu$')
	[ "$n" = 1 ] && ok "one /dev/iommu for the two devices" || { bad "/dev/iommu fds: $n"; echo "$fds"; }
	n=$(echo "$fds" | grep -c ' -> /dev/vfio/devices/vfio[0-9]*$')
	[ "$n" = 2 ] && ok "two device cdevs" || { bad "cdev fds: $n"; echo "$fds"; }
else
	n=$(echo "$fds" | grep -c ' -> /dev/vfio/vfio$')
	[ "$n" = 1 ] && ok "one container for the two devices" || { bad "container fds: $n"; echo "$fds"; }
	n=$(echo "$fds" | grep -c " -> /dev/vfio/$ga\$")
	[ "$n" = 1 ] && ok "one fd for their group" || { bad "group fds: $n"; echo "$fds"; }
fi
ctl "$tmp/vm" status >"$tmp/st" 2>&1
sed 's/^/    /' "$tmp/st"
grep -q '^vm: running' "$tmp/st" && ok "VM running with both" || bad "VM status"
[ "$(grep -c 'flags none (no migration)' "$tmp/st")" = 2 ] && ok "status: neither can migrate" ||
	bad "status does not say 'flags none (no migration)' for both"
grep -q 'cannot migrate' "$tmp/log" && ok "the VM says it cannot migrate" || bad "no migration blocker said"
ctl "$tmp/vm" quit >/dev/null
wait $vm_pid

# Real DMA by edu into memory the backend mapped (type1 through VT-d, on both
# paths: the iommufd rig keeps type1), and the container's dirty report after
# it (tests/kernel/edu_dma.c).
edu=$(dirname "$bin")/../tests/kvfio-edu-dma
timeout -k 5 120 "$edu" "vfio:$a" >"$tmp/out" 2>&1; rc=$?
sed 's/^/    /' "$tmp/out"
grep -q '^edu id: 0x010000ed' "$tmp/out" && ok "BAR0 read: edu's id register" || bad "edu id"
grep -q '^DMA moved the page: yes' "$tmp/out" && ok "edu DMA read and wrote the mapped memory" \
	|| bad "edu DMA (rc $rc)"
grep -q '^dirty after DMA: .* the written page dirty' "$tmp/out" && ok "type1 reports the page edu wrote dirty" \
	|| bad "dirty report after DMA"
# An IOMMU-backed group: type1 knows no page-exact bits, it reports all of them.
grep -q "^dirty before DMA: 512/512" "$tmp/out" && ok "type1 reports every mapped page for a real device" \
	|| bad "dirty before DMA not all"

# 4 GiB of guest RAM from 0 crosses the MSI window: refused before pinning.
timeout -k 5 120 "$bin" vm --mem 4G --guest none --device "vfio:$a,id=a" --control "$tmp/vm2" \
	>"$tmp/out" 2>&1 && bad "4 GiB mapped across the MSI window"
sed 's/^/    /' "$tmp/out" | tail -3
grep -q 'is not in an IOVA range the IOMMU can map (reserved: .*0xfee00000' "$tmp/out" \
	&& ok "a map across the MSI window is refused, naming it" || bad "MSI window message"
no_oops "pci"
finish
