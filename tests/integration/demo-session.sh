#!/bin/sh
# The README's example session by hand: dma device servers, two VMs, a
# migration through `vfiomig ctl ... migrate --wait`, then the checks the demo
# makes. With allow-pre-copy=off the device state moves only in stop-and-copy:
# exactly one copy, although the device rewrites its memory meanwhile.
# usage: demo-session.sh PATH_TO_VFIOMIG on|off
set -u
bin=$1
precopy=$2
lib_name=session
. "$(dirname "$0")/scaffold.sh"
die() { bad "$@"; }
bg() { log=$1; shift; "$@" >"$tmp/$log.log" 2>&1 & pids="$pids $!"; }
ctl() { timeout -k 5 30 "$bin" ctl "$@"; }

state=4M
bg dev0-src timeout -k 5 60 "$bin" device dma --socket "$tmp/dev0-src.sock" --state-size $state \
	--churn 8M/s
bg dev0-dst timeout -k 5 60 "$bin" device dma --socket "$tmp/dev0-dst.sock" --state-size $state
wait_sock "$tmp/dev0-src.sock" && wait_sock "$tmp/dev0-dst.sock" || die "devices did not start"
bg vm-src timeout -k 5 60 "$bin" vm --mem 64M --dirty-rate 16M/s --control "$tmp/src.ctl" \
	--device "vfio-user:$tmp/dev0-src.sock,id=dev0,allow-pre-copy=$precopy"
bg vm-dst timeout -k 5 60 "$bin" vm --mem 64M --control "$tmp/dst.ctl" \
	--device "vfio-user:$tmp/dev0-dst.sock,id=dev0,allow-pre-copy=$precopy" \
	--incoming "unix:$tmp/mig.sock"
wait_sock "$tmp/src.ctl" && wait_sock "$tmp/dst.ctl" || { die "VMs did not start"; cat "$tmp"/*.log; exit 1; }
sleep 0.5  # let the device churn and the guest write

ctl "$tmp/src.ctl" migrate "unix:$tmp/mig.sock" --wait >"$tmp/migrate.out" 2>&1 ||
	{ die "migrate --wait failed"; cat "$tmp/migrate.out" "$tmp"/*.log; }
grep -q "^migration: completed" "$tmp/migrate.out" || die "no 'completed' line"
if [ "$precopy" = off ]; then
	grep -q "assumes the link's pace for vfio:dev0" "$tmp/migrate.out" ||
		die "migrate --wait did not say the expected downtime assumed the link's pace"
else
	! grep -q "assumes the link's pace" "$tmp/migrate.out" || die "pace assumed with pre-copy"
fi
# The destination reports completed once its guest runs.
i=0
while ! ctl "$tmp/dst.ctl" status | grep -q "^migration: completed"; do
	i=$((i + 1)); [ $i -gt 100 ] && { die "destination not completed"; break; }; sleep 0.1
done
ctl "$tmp/src.ctl" status --json >"$tmp/src.json" || die "source status"
ctl "$tmp/dst.ctl" status --json >"$tmp/dst.json" || die "destination status"
python3 - "$tmp/src.json" "$tmp/dst.json" "$precopy" "$state" <<'EOF' || die "checks failed"
import json, sys
src, dst = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
precopy, state = sys.argv[3], int(sys.argv[4][:-1]) << 20
assert src["migration"]["status"] == "completed", src["migration"]
assert dst["vm"]["state"] == "running", dst["vm"]
assert dst["guest"]["verified"] is True and dst["guest"]["errors"] == 0, dst["guest"]
s, d = src["devices"][0], dst["devices"][0]
assert s["id"] == d["id"] == "dev0"
assert s["state_checksum"] == d["state_checksum"], (s, d)
# One pass over the state, with its headers (docs/devices/dma.md: 56 + pages x
# 4128 + 4128 + 152 bytes), and at most a few hundred bytes of engine framing.
one_copy = 56 + (state // 4096) * 4128 + 4128 + 152
moved = s["transferred_bytes"]
assert moved >= one_copy, (moved, one_copy)
if precopy == "off":
    assert moved < one_copy + 4096, "pages re-sent without pre-copy: %d > %d" % (moved, one_copy)
# Without pre-copy the device never read before stop-copy: the expected
# downtime assumed the link's pace for it, and the source says so.
assert src["migration"]["unpaced"] == ("vfio:dev0" if precopy == "off" else ""), src["migration"]
assert "unpaced" not in dst["migration"] or dst["migration"]["unpaced"] == "", dst["migration"]
print("ok: pre-copy %s, device moved %d bytes (one copy %d), checksum %s" %
      (precopy, moved, one_copy, s["state_checksum"]))
EOF
[ $fail = 0 ] && echo "PASS: session with pre-copy $precopy"
exit $fail
