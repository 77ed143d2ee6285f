#!/bin/sh
# The opt-in destructive mode of vfiomig check on a dedicated mdev: the
# truncated stream is refused (mtty checks the length at RESUMING -> STOP)
# and vfiomig resets the device though mtty does not advertise reset, so it
# never stays in RESUMING (mtty's dangling resuming file oopses the next
# user: mtty_load_state). The corrupted stream is loaded by mtty (it checks
# only the header): reported as the device's failure, exit 1. After it, the
# device is reusable (state changes, save, FIFO) and the kernel log is clean.
# Runs last: it loads a corrupted state into mdev 4 (restored after).
# usage: refused_load.sh VFIOMIG
bin=$1
. "$(dirname "$0")/lib.sh"
u=$(mdev 4)
vfm check --unsafe-load-corrupt-streams "vfio:$u" >"$tmp/out" 2>"$tmp/err"; rc=$?
[ $rc = 1 ] && ok "opt-in check exits 1" || bad "opt-in check: exit $rc"
grep -q '^pass  truncated stream refused' "$tmp/out" && ok "truncated stream refused" \
	|| { bad "truncated"; grep stream "$tmp/out"; }
grep -q '^FAIL  corrupted stream refused: the device accepted it' "$tmp/out" \
	&& ok "mtty's missing validation reported as the device's failure" || { bad "corrupted"; grep stream "$tmp/out"; }
others=$(grep '^FAIL' "$tmp/out" | grep -v 'corrupted stream refused')
[ -z "$others" ] && ok "nothing else failed" \
	|| { bad "other failures"; echo "$others"; }
grep -q 'resetting\|reset' "$tmp/err" && ok "the refused load was reset" || bad "no reset seen"
grep -q 'reset failed\|device cannot be reset' "$tmp/err" && bad "reset failed: $(grep reset "$tmp/err" | head -3)"
# A refused load through `load` (a stream cut short) leaves it usable too.
vfm save "vfio:$u" "$tmp/s" >/dev/null 2>&1 || bad "save after check"
vfm info "vfio:$u" >"$tmp/info" 2>&1 && grep -q 'state: RUNNING' "$tmp/info" && ok "RUNNING after" \
	|| { bad "state after"; grep -i state "$tmp/info"; }
vfm check "vfio:$u" >"$tmp/out2" 2>&1
[ -z "$(grep '^FAIL' "$tmp/out2")" ] \
	&& ok "a second check passes (state changes work)" || { bad "second check"; grep -v '^pass' "$tmp/out2"; }
put 4 xyz && got=$(fifo 4 read 15) && echo "$got" | grep -q "'xyz'" \
	&& ok "FIFO works after" || { bad "FIFO after: $got"; fifo 4 regs; }
no_oops "refused load"
finish
