#!/bin/sh
# The device tools against a device built on libvfio-user (docs/interop.md):
# info describes it, check passes every check (the DMA logging ones on a
# mapped window, a refused reset keeping the real state), save + load put
# the frozen state back, exit codes as documented.
# usage: lvu_tools.sh VFIOMIG LVU_DEVICE LVU_CLIENT
set -u
bin=$1 lvu=$2
. "$(dirname "$0")/lvu_lib.sh"
tool() { timeout -k 5 60 "$bin" "$@"; }

bg dev.log timeout -k 5 100 "$lvu" --socket "$tmp/d" --tick-ms 2
wait_sock "$tmp/d" || { bad "device did not start"; cat "$tmp/dev.log"; exit 1; }
dev="vfio-user:$tmp/d"

out=$(tool info "$dev" 2>&1); rc=$?
[ $rc = 0 ] && ok "info exits 0" || bad "info exited $rc: $out"
echo "$out" | grep -q "identity: PCI 4e58:0001" && ok "info: PCI identity" || bad "info: $out"
echo "$out" | grep -q "migration: STOP_COPY|PRE_COPY" && ok "info: STOP_COPY|PRE_COPY, no P2P" \
	|| bad "info flags: $out"
echo "$out" | grep -q "DMA logging: yes" && ok "info: DMA logging" || bad "info logging: $out"

# The test device validates its stream: the destructive checks are opted into.
out=$(tool check --unsafe-load-corrupt-streams "$dev" 2>&1); rc=$?
echo "$out" | grep -v "^pass"
[ $rc = 0 ] && ok "check exits 0" || bad "check exited $rc"
echo "$out" | grep -q "checks: [0-9]* passed, 0 failed" && ok "check: nothing failed" || bad "check failed"
for c in "DMA logging: map a 1 MiB window" "DMA logging: report:" "DMA logging: report after stop refused" \
	"truncated stream refused" "corrupted stream refused" "device RUNNING at the end"; do
	echo "$out" | grep -q "^pass  $c" && ok "check: $c" || bad "check: no pass for '$c'"
done

sleep 0.2   # the device runs on: its state moves
out=$(tool save "$dev" "$tmp/f" 2>&1); rc=$?
[ $rc = 0 ] && ok "save exits 0: $out" || bad "save exited $rc: $out"
echo "$out" | grep -q "and 256 bytes of config space" && ok "save: config space saved" \
	|| bad "save: config: $out"
saved=$(digest_of dev.log frozen)
grep -q "state stop -> running" "$tmp/dev.log" && ok "save: device back to RUNNING" || bad "save left it stopped"
sleep 0.2
out=$(tool load "$dev" "$tmp/f" 2>&1); rc=$?
[ $rc = 0 ] && ok "load exits 0" || bad "load exited $rc: $out"
loaded=$(digest_of dev.log loaded)
[ -n "$saved" ] && [ "$saved" = "$loaded" ] && ok "load put the saved state back: $saved" \
	|| bad "saved '$saved', loaded '$loaded'"
case $saved in *" 0") bad "the device never ran before the save" ;; esac
out=$(tool load "$dev" "$tmp/nonexistent" 2>&1); rc=$?
[ $rc = 1 ] && ok "load of a missing file exits 1" || bad "load of a missing file: rc $rc: $out"
out=$(tool info 2>&1); rc=$?
[ $rc = 2 ] && ok "info without DEVICE exits 2" || bad "info without DEVICE: rc $rc"
# A save that would lose the config space fails and leaves no file; the
# device runs again (its config cannot be read in STOP).
bg bad.log timeout -k 5 100 "$lvu" --socket "$tmp/b" --config-fails-in-stop
wait_sock "$tmp/b" || bad "second device did not start"
out=$(tool save "vfio-user:$tmp/b" "$tmp/g" 2>&1); rc=$?
[ $rc = 1 ] && echo "$out" | grep -q "config space lost" && ok "save without config space fails: $out" \
	|| bad "save without config space: rc $rc: $out"
[ ! -e "$tmp/g" ] && [ ! -e "$tmp/g.tmp" ] && ok "no file left" || bad "a file was left"
grep -q "state stop -> running" "$tmp/bad.log" && ok "the device runs again" \
	|| bad "device states: $(grep state "$tmp/bad.log" | tr '\n' ' ')"
grep -q "Sanitizer\|runtime error" "$tmp"/*.log && bad "sanitizer reports"
[ $fail = 0 ] || for f in "$tmp"/*.log; do echo "--- $f"; tail -30 "$f"; done
exit $fail
