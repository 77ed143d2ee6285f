#!/bin/sh
# A KVM guest (`vfiomig vm --guest kvm`) migrated live through `vfiomig ctl`
# with a dma device per side: vCPU state and KVM-dirtied RAM arrive, the
# destination's guest runs on (its own counters go on), both of its checks
# pass and the device checksums match. Skipped (exit 77) without /dev/kvm.
# usage: vm_kvm.sh PATH_TO_VFIOMIG
set -u
bin=$1
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
	echo "SKIP: no usable /dev/kvm"; exit 77
fi
lib_name=vmkvm
. "$(dirname "$0")/vm_lib.sh"
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
# The guest writes (bounded wait, no timing asserted).
i=0
while [ "$(jq_status "$tmp/src" 'g["guest"]["page_writes"] > 20')" != True ]; do
	i=$((i + 1)); [ $i -gt 100 ] && { bad "source guest does not write"; break; }; sleep 0.1
done
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
i=0
while [ "$(jq_status "$tmp/dst" "g['guest']['page_writes'] > $w0")" != True ]; do
	i=$((i + 1)); [ $i -gt 100 ] && { bad "destination guest does not run on"; break; }; sleep 0.1
done
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
