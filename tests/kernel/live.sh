#!/bin/sh
# Live migration between two `vfiomig vm --guest none` processes over real
# mtty mdevs, two per VM sharing one container or iommufd (both P2P:
# PRE_COPY_P2P on the way, as QEMU does with several devices), default
# parameters: it converges (mtty DMAs nothing, so the IOMMU's tracking on
# type1, or mtty's own logging on iommufd, reports clean memory) and the
# bytes put in the source devices' FIFOs come out of the destination's. The
# default 2 multifd channels: device b has multifd-transfer=on, so its
# stop-copy goes over them (a save thread reading mtty's data fd), while a,
# on auto with less than a read pending, goes on main (no end marker for it).
# Then a migration held in pre-copy (a synthetic guest, one vCPU dirtying
# 1 MiB/s, 512 KiB/s allowed; mtty's data fd O_NONBLOCK) is cancelled: the
# device is back in RUNNING and keeps working.
# usage: live.sh VFIOMIG
bin=$1
. "$(dirname "$0")/lib.sh"
put 1 "live-one" || bad "FIFO write 1"
put 3 "live-three" || bad "FIFO write 3"
note "starting the VMs"
bg timeout -k 5 300 "$bin" vm --mem 32M --guest none --device "vfio:$(mdev 1),id=a" \
	--device "vfio:/sys/bus/mdev/devices/$(mdev 3),id=b,migration-multifd-transfer=on" \
	--control "$tmp/src" -vvv
src_pid=$last
timeout -k 5 300 "$bin" vm --mem 32M --guest none --device "vfio:$(mdev 2),id=a" \
	--device "vfio:$(mdev 4),id=b" --incoming "unix:$tmp/mig" --control "$tmp/dst" >"$tmp/dlog" 2>&1 &
dst_pid=$!; pids="$pids $dst_pid"
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp/log" "$tmp/dlog"; exit 1; }
ok "two VMs with two mdevs each"
note "VMs up"
# One container (type1) or iommufd (cdev) for both devices of the process.
vm=$(pgrep -P "$src_pid" | head -1)
fds=$(ls -l "/proc/$vm/fd" 2>/dev/null)
if [ -e /dev/iommu ]; then
	n=$(echo "$fds" | grep -c ' -> /dev/iommu$')
	[ "$n" = 1 ] && ok "one /dev/iommu for two devices" || { bad "/dev/iommu fds: $n"; echo "$fds"; }
else
	n=$(echo "$fds" | grep -c ' -> /dev/vfio/vfio$')
	[ "$n" = 1 ] && ok "one container for two devices" || { bad "container fds: $n"; echo "$fds"; }
	n=$(echo "$fds" | grep -cE ' -> /dev/vfio/[0-9]+$')
	[ "$n" = 2 ] && ok "one fd per group" || { bad "group fds: $n"; echo "$fds"; }
fi
out=$(ctl "$tmp/src" migrate "unix:$tmp/mig" --wait 2>&1)
echo "$out" | grep -q "migration: completed" && ok "migration completed: $(echo "$out" | grep completed)" \
	|| { bad "not completed: $out"; tail -30 "$tmp/log"; }
note "migrated"
mf=$(ctl "$tmp/src" status --json | sed -n 's/.*"multifd_device_bytes":\([0-9]*\).*/\1/p')
[ -n "$mf" ] && [ "$mf" -gt 0 ] && ok "device b's stop-copy over the channels: $mf bytes" \
	|| bad "multifd_device_bytes '$mf'"
grep -q 'vfio:a: [0-9]* bytes pending fit one read: on main' "$tmp/log" && ok "device a's on main" \
	|| { bad "device a not sent on main"; grep -i 'multifd\|channel' "$tmp/log" | head; }
ctl "$tmp/dst" status >"$tmp/dst.st" 2>&1
grep -q '^vm: running' "$tmp/dst.st" && ok "destination running" || { bad "destination"; cat "$tmp/dst.st"; }
[ "$(grep -c 'RUNNING' "$tmp/dst.st")" -ge 2 ] && ok "both destination devices RUNNING" || bad "destination devices"
if [ -e /dev/iommu ]; then
	[ "$(grep -c 'dirty tracking: device DMA logging' "$tmp/log")" = 2 ] && ok "tracked by mtty's DMA logging" \
		|| { bad "tracking"; grep -i 'dirty' "$tmp/log" | head; }
else
	[ "$(grep -c 'dirty tracking: IOMMU (type1v2' "$tmp/log")" = 2 ] && ok "tracked by type1 IOMMU dirty pages" \
		|| { bad "tracking"; grep -i 'dirty' "$tmp/log" | head; }
fi
grep -q 'all memory dirty\|all memory counts as dirty' "$tmp/log" && bad "a sync fell back to all dirty"
[ "$(grep -c 'state PRE_COPY_P2P -> STOP_COPY\|state PRE_COPY -> PRE_COPY_P2P' "$tmp/log")" -ge 2 ] \
	&& ok "both devices went through P2P" || { bad "P2P"; grep 'state ' "$tmp/log" | tail -12; }
ctl "$tmp/src" quit >/dev/null; ctl "$tmp/dst" quit >/dev/null
wait $src_pid; wait $dst_pid
note "VMs quit"
got=$(fifo 2 read 15); echo "$got" | grep -q "'live-one'" && ok "FIFO moved: $got" || bad "mdev 2 FIFO: $got"
got=$(fifo 4 read 15); echo "$got" | grep -q "'live-three'" && ok "FIFO moved: $got" || bad "mdev 4 FIFO: $got"

# Held in pre-copy (1 MiB/s dirtied, 512 KiB/s sent; one vCPU leaves the
# destination CPU time under TCG), then cancelled.
: >"$tmp/log"
bg timeout -k 5 300 "$bin" vm --mem 32M --guest synthetic --vcpus 1 --dirty-rate 1M/s \
	--device "vfio:$(mdev 1),id=a" --control "$tmp/src2" -vvv
src_pid=$last
bg timeout -k 5 300 "$bin" vm --mem 32M --device "vfio:$(mdev 2),id=a" --incoming "unix:$tmp/mig2" \
	--control "$tmp/dst2"
wait_sock "$tmp/src2" && wait_sock "$tmp/dst2" || { bad "VMs did not start"; cat "$tmp/log"; exit 1; }
note "second pair up"
ctl "$tmp/src2" set max-bandwidth=512K/s >/dev/null || bad "set"
ctl "$tmp/src2" migrate "unix:$tmp/mig2" >/dev/null && ok "migrate started" || bad "migrate"
wait_status "$tmp/src2" 'migration: active' || { bad "never active"; tail -20 "$tmp/log"; }
ctl "$tmp/src2" status >"$tmp/st" 2>&1
grep -q 'device a (vfio): PRE_COPY' "$tmp/st" && ok "device in PRE_COPY" || { bad "not in PRE_COPY"; cat "$tmp/st"; }
# The data fd mtty handed out was made O_NONBLOCK (fdinfo flags, octal 04000).
vm=$(pgrep -P "$src_pid" | head -1) nb=none
for f in /proc/"$vm"/fd/*; do
	[ "$(readlink "$f")" = anon_inode:mtty_mig ] || continue
	fl=$(awk '/^flags:/ {print $2}' "/proc/$vm/fdinfo/${f##*/}")
	nb="blocking (flags $fl)"; [ $(( 0$fl & 04000 )) != 0 ] && nb=yes
done
[ "$nb" = yes ] && ok "mtty's data fd is O_NONBLOCK" || bad "mtty's data fd: $nb"
ctl "$tmp/src2" cancel >/dev/null && ok "cancel accepted" || bad "cancel"
wait_status "$tmp/src2" "migration: cancelled" && ok "cancelled" || bad "not cancelled"
note "cancelled"
# mdev 1 was the first pair's source: the migration left it in STOP and the
# kernel keeps that across close; the VM runs it with its guest.
grep -q 'found in STOP: to RUNNING with the guest' "$tmp/log" && ok "a device found stopped runs with the guest" \
	|| { bad "device left stopped at start"; grep 'state \|found in' "$tmp/log" | tail -5; }
ctl "$tmp/src2" status >"$tmp/st" 2>&1
grep -q 'device a (vfio): RUNNING' "$tmp/st" && grep -q '^vm: running' "$tmp/st" \
	&& ok "device RUNNING, VM running after cancel" || { bad "after cancel"; cat "$tmp/st"; }
grep -q 'state PRE_COPY -> RUNNING' "$tmp/log" && ok "PRE_COPY -> RUNNING on cancel" \
	|| { bad "no PRE_COPY -> RUNNING"; grep 'state ' "$tmp/log" | tail; }
ctl "$tmp/src2" quit >/dev/null; ctl "$tmp/dst2" quit >/dev/null
wait $src_pid
put 1 "after" && got=$(fifo 1 read 15) && echo "$got" | grep -q "'after'" \
	&& ok "the device keeps working: $got" || bad "FIFO after cancel: $got"
no_oops "live migration"
finish
