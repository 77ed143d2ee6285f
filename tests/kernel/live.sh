#!/bin/sh
# Live migration between two `vfiomig vm --guest none` processes over real
# mtty mdevs, two per VM (both P2P: RUNNING_P2P on the way, as QEMU does with
# several devices). First a migration held in pre-copy (tiny bandwidth) is
# cancelled: the devices return to RUNNING and keep working. Then one with
# default parameters converges (mtty DMAs nothing, so the IOMMU's tracking on
# type1, or mtty's own logging on iommufd, reports clean memory) and the
# bytes put in the source devices' FIFOs come out of the destination's.
# usage: live.sh VFIOMIG
bin=$1
. "$(dirname "$0")/lib.sh"
fifo 1 write "live-one" >/dev/null || bad "FIFO write 1"
fifo 3 write "live-three" >/dev/null || bad "FIFO write 3"
bg timeout -k 5 400 "$bin" vm --mem 32M --guest none --device "vfio:$(mdev 1),id=a" \
	--device "vfio:/sys/bus/mdev/devices/$(mdev 3),id=b" --control "$tmp/src" -vvv
src_pid=$last
timeout -k 5 400 "$bin" vm --mem 32M --guest none --device "vfio:$(mdev 2),id=a" \
	--device "vfio:$(mdev 4),id=b" --incoming "unix:$tmp/mig" --control "$tmp/dst" >"$tmp/dlog" 2>&1 &
dst_pid=$!; pids="$pids $dst_pid"
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp/log" "$tmp/dlog"; exit 1; }
ok "two VMs with two mdevs each"

# Held in pre-copy, then cancelled.
ctl "$tmp/src" set max-bandwidth=256K/s >/dev/null || bad "set"
ctl "$tmp/src" migrate "unix:$tmp/mig" >/dev/null && ok "migrate started" || bad "migrate"
wait_status "$tmp/src" '"status": *"active"\|migration: active' || bad "never active"
sleep 2
ctl "$tmp/src" status --json >"$tmp/st" 2>&1
grep -q '"PRE_COPY"' "$tmp/st" && ok "devices in PRE_COPY" || { bad "not in PRE_COPY"; cat "$tmp/st"; }
ctl "$tmp/src" cancel && ok "cancel accepted" || bad "cancel"
wait_status "$tmp/src" "migration: cancelled" && ok "cancelled" || bad "not cancelled"
ctl "$tmp/src" status --json >"$tmp/st" 2>&1
[ "$(grep -o '"state": *"RUNNING"' "$tmp/st" | wc -l)" -ge 2 ] && ok "both devices RUNNING after cancel" \
	|| { bad "devices after cancel"; cat "$tmp/st"; }

# The next attempt, defaults, runs to the end.
wait_status "$tmp/dst" "migration: failed" || bad "destination did not see the attempt fail"
ctl "$tmp/src" set max-bandwidth=0 >/dev/null || bad "set back"
i=0
until out=$(ctl "$tmp/src" migrate "unix:$tmp/mig" --wait 2>&1); do
	i=$((i + 1))   # the destination re-listens right after its failure
	echo "$out" | grep -qi "connect" && [ $i -lt 20 ] || { bad "migrate --wait: $out"; break; }
	sleep 0.5
done
echo "$out" | grep -q "migration: completed" && ok "migration completed (converged)" \
	|| { bad "not completed: $out"; tail -30 "$tmp/log"; }
ctl "$tmp/dst" status >"$tmp/dst.st" 2>&1
grep -q '^vm: running' "$tmp/dst.st" && ok "destination running" || { bad "destination"; cat "$tmp/dst.st"; }
if [ -e /dev/iommu ]; then
	grep -q 'dirty tracking: device DMA logging' "$tmp/log" && ok "tracked by mtty's DMA logging" \
		|| { bad "tracking"; grep -i 'dirty' "$tmp/log" | head; }
else
	grep -q 'dirty tracking: IOMMU (type1v2' "$tmp/log" && ok "tracked by type1 IOMMU dirty pages" \
		|| { bad "tracking"; grep -i 'dirty' "$tmp/log" | head; }
fi
grep -q 'all memory dirty' "$tmp/log" && bad "a sync fell back to all dirty"
[ "$(grep -c 'state PRE_COPY_P2P -> STOP_COPY\|-> PRE_COPY_P2P' "$tmp/log")" -ge 2 ] \
	&& ok "both devices went through P2P" || { bad "P2P"; grep 'state ' "$tmp/log" | tail -12; }
ctl "$tmp/src" quit >/dev/null; ctl "$tmp/dst" quit >/dev/null
wait $src_pid; wait $dst_pid
got=$(fifo 2 read 15); echo "$got" | grep -q "'live-one'" && ok "FIFO moved: $got" || bad "mdev 2 FIFO: $got"
got=$(fifo 4 read 15); echo "$got" | grep -q "'live-three'" && ok "FIFO moved: $got" || bad "mdev 4 FIFO: $got"
got=$(fifo 1 read 15); echo "$got" | grep -q "''" && ok "source FIFO read empty? $got" || ok "source FIFO: $got"
no_oops "live migration"
finish
