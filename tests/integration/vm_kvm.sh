#!/bin/sh
# A KVM guest (`vfiomig vm --guest kvm`) migrated live through `vfiomig ctl`
# with a dma device per side that the guest program drives through its BAR0:
# vCPU state, KVM-dirtied RAM and the device's DMA arrive, the destination's
# guest runs on and drives the destination's device, both of its checks pass
# and the device checksums match. Case demo-auto: `vfiomig demo --guest
# auto` (kvm here). Skipped (exit 77) without /dev/kvm.
# usage: vm_kvm.sh PATH_TO_VFIOMIG [migrate|demo-auto]
set -u
bin=$1
case=${2:-migrate}
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
	echo "SKIP: no usable /dev/kvm"; exit 77
fi
lib_name=vmkvm
. "$(dirname "$0")/vm_lib.sh"

if [ "$case" = demo-auto ]; then
	# The demo picks kvm here by itself; its verdict includes the guest's own check.
	if timeout -k 5 60 "$bin" demo --guest auto --mem 32M --device-state 4M --dirty-rate 2M/s \
		--json >"$tmp/demo.json" 2>>"$tmp/log"; then
		ok "demo --guest auto verified"
	else
		bad "demo --guest auto: $(tail -5 "$tmp/demo.json")"
	fi
	python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
g = r["guest"]
assert r["verified"] is True and g["kind"] == "kvm" and g["full"]["verified"] is True, r
assert any(e["detail"] == "--guest auto: kvm (/dev/kvm works)" for e in r["timeline"]), r["timeline"]
assert r["devices"][0]["verified"] is True, r["devices"]' "$tmp/demo.json" &&
		ok "demo --guest auto chose kvm and both checks passed" ||
		bad "demo --guest auto: JSON check failed"
	[ $fail = 0 ] || { echo "--- log"; tail -40 "$tmp/log"; }
	[ $fail = 0 ] && echo PASS
	exit $fail
fi

ctl() { timeout -k 5 30 "$bin" ctl "$@"; }
# jq_status SOCKET EXPR: prints a Python expression over the status object g
jq_status() { ctl "$1" status --json | python3 -c "import json,sys; g=json.load(sys.stdin); print($2)"; }

bg timeout -k 5 60 "$bin" device dma --socket "$tmp/d0" --state-size 4M --churn 1M/s
bg timeout -k 5 60 "$bin" device dma --socket "$tmp/e0" --state-size 4M
wait_sock "$tmp/d0" && wait_sock "$tmp/e0" || { bad "devices did not start"; exit 1; }
common="--guest kvm --mem 32M --working-set 1M --vcpus 2"
bg timeout -k 5 60 "$bin" vm $common --device "vfio-user:$tmp/d0" --dirty-rate 2M/s \
	--control "$tmp/src"
src_pid=$last
bg timeout -k 5 60 "$bin" vm $common --device "vfio-user:$tmp/e0" --incoming "unix:$tmp/mig" \
	--control "$tmp/dst"
dst_pid=$last
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp/log"; exit 1; }

[ "$(jq_status "$tmp/src" 'g["guest"]["kind"]')" = kvm ] && ok "source guest is kvm" ||
	bad "source guest is not kvm"
# The guest writes and drives its device (bounded wait, no timing asserted).
i=0
while [ "$(jq_status "$tmp/src" 'g["guest"]["page_writes"] > 20 and g["guest"]["dma_ops"] > 3')" != True ]; do
	i=$((i + 1)); [ $i -gt 100 ] && { bad "source guest does not write and copy"; break; }; sleep 0.1
done
[ "$(jq_status "$tmp/src" 'g["guest"]["dma_errors"]')" = 0 ] && ok "source guest drives its device" ||
	bad "source guest: $(jq_status "$tmp/src" 'g["guest"]')"
if ctl "$tmp/src" migrate "unix:$tmp/mig" --wait >"$tmp/mig.out" 2>&1; then
	ok "migration completed"
else
	bad "migration failed: $(cat "$tmp/mig.out")"
fi
# The destination's status shows completed once its guest runs.
i=0
while [ "$(jq_status "$tmp/dst" 'g["migration"]["status"]')" != completed ]; do
	i=$((i + 1)); [ $i -gt 100 ] && { bad "destination never completed"; break; }; sleep 0.1
done
[ "$(jq_status "$tmp/dst" 'g["guest"]["quick"]["verified"] and g["guest"]["running"]')" = True ] &&
	ok "destination quick check on load passed, guest runs" ||
	bad "destination quick check: $(jq_status "$tmp/dst" 'g["guest"]')"
w0=$(jq_status "$tmp/dst" 'g["guest"]["page_writes"]')
c0=$(jq_status "$tmp/dst" 'g["guest"]["dma_ops"]')
i=0
while [ "$(jq_status "$tmp/dst" "g['guest']['page_writes'] > $w0 and g['guest']['dma_ops'] > $c0")" != True ]; do
	i=$((i + 1)); [ $i -gt 100 ] && { bad "destination guest does not run on"; break; }; sleep 0.1
done
[ "$(jq_status "$tmp/dst" 'g["guest"]["dma_errors"]')" = 0 ] &&
	ok "destination guest drives the destination's device" ||
	bad "destination guest: $(jq_status "$tmp/dst" 'g["guest"]')"
ctl "$tmp/dst" verify >/dev/null || bad "verify failed to run"
[ "$(jq_status "$tmp/dst" 'g["guest"]["full"]["verified"] and g["guest"]["check"] == "full"')" = True ] &&
	ok "destination full check (with the guest's own check) passed" ||
	bad "full check: $(jq_status "$tmp/dst" 'g["guest"]')"
s=$(jq_status "$tmp/src" 'g["devices"][0]["state_checksum"]')
d=$(jq_status "$tmp/dst" 'g["devices"][0]["state_checksum"]')
[ -n "$s" ] && [ "$s" = "$d" ] && ok "device checksums match ($s)" || bad "checksums $s != $d"
[ "$(jq_status "$tmp/src" 'g["vm"]["state"]')" = postmigrate ] && ok "source postmigrate" ||
	bad "source not postmigrate"

ctl "$tmp/src" quit >/dev/null; ctl "$tmp/dst" quit >/dev/null
wait "$src_pid"; st=$?; [ $st = 0 ] && ok "source exited 0" || bad "source exited $st"
wait "$dst_pid"; st=$?; [ $st = 0 ] && ok "destination exited 0" || bad "destination exited $st"
[ $fail = 0 ] || { echo "--- log"; tail -40 "$tmp/log"; }
[ $fail = 0 ] && echo PASS
exit $fail
