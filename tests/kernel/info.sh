#!/bin/sh
# vfiomig info on a real mtty mdev, named every way the kernel backend takes:
# the UUID, the sysfs path and (iommufd rig) the cdev. It reports the
# migration flags mtty has, the IOMMU path, and DMA logging as what works
# (Debian's kernel accepts DMA_LOGGING_START but fails every REPORT).
# usage: info.sh VFIOMIG
bin=$1
. "$(dirname "$0")/lib.sh"
u=$(mdev 1)
if vfm info "vfio:$u" >"$tmp/out" 2>&1; then ok "info vfio:UUID"; else bad "info vfio:UUID"; cat "$tmp/out"; fi
grep -q 'STOP_COPY' "$tmp/out" && grep -q 'P2P' "$tmp/out" && grep -q 'PRE_COPY' "$tmp/out" \
	&& ok "mtty flags STOP_COPY P2P PRE_COPY" || { bad "flags"; cat "$tmp/out"; }
vfm info "vfio:/sys/bus/mdev/devices/$u" >"$tmp/out2" 2>&1 && ok "info vfio:/sys/bus/mdev/devices/UUID" \
	|| { bad "info by sysfs path"; cat "$tmp/out2"; }
vfm info --json "vfio:$u" >"$tmp/json" 2>"$tmp/err" || bad "info --json"
if [ -e /dev/iommu ]; then
	grep -q '^IOMMU: iommufd' "$tmp/out" && ok "iommufd path" || { bad "not iommufd"; cat "$tmp/out"; }
	cdev=/dev/vfio/devices/$(ls "/sys/bus/mdev/devices/$u/vfio-dev")
	vfm info "vfio:$cdev" >"$tmp/out3" 2>&1 && ok "info vfio:$cdev" || { bad "info by cdev"; cat "$tmp/out3"; }
	# iova_bitmap is built in: mtty's logging stubs report (nothing).
	grep -q '^DMA logging: yes' "$tmp/out" && ok "DMA logging works" || { bad "DMA logging"; cat "$tmp/out"; }
else
	# page-exact: a container of mdevs (type1 reports what they pin)
	grep -q '^IOMMU: type1v2, dirty tracking yes$' "$tmp/out" && ok "type1v2 with dirty tracking" \
		|| { bad "IOMMU line"; cat "$tmp/out"; }
	grep -q '^DMA logging: no (.*report' "$tmp/out" && ok "DMA logging: no (its report fails)" \
		|| { bad "DMA logging line"; cat "$tmp/out"; }
fi
# A name that is nothing: a clear error, exit 1.
vfm info "vfio:nonsense" >"$tmp/out" 2>&1; rc=$?
[ $rc = 1 ] && grep -q 'mdev UUID' "$tmp/out" && ok "bad name refused" || { bad "bad name: rc $rc"; cat "$tmp/out"; }
vfm info "vfio:00000000-0000-4000-8000-000000000000" >"$tmp/out" 2>&1; rc=$?
[ $rc = 1 ] && grep -q 'no device' "$tmp/out" && ok "unknown UUID refused" || { bad "unknown UUID: rc $rc"; cat "$tmp/out"; }
finish
