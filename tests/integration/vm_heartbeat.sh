#!/bin/sh
# The guest-visible blackout of a KVM guest migration, measured from outside
# both VM processes (issue 19): the guest's heartbeat (port 0xe8, every 1 ms)
# goes from each VM (`vm --heartbeat`) to one observer (bench/vfm-heartbeat),
# which must see beats from the source, then from the destination, and a
# blackout > 0 and under a bound that includes the switch gap. The source's
# query-migrate switchover_ms timeline has every step and sums to its
# downtime, and its expected steps include the guest stop (the vCPUs' kicks,
# timed without stopping them). Bad input: an observer that is not there, a synthetic guest,
# bad observer arguments, a bad --vcpu-slice-us. How the vCPU threads ran
# (status guest.kvm): no idle wait cut short on either side, the source
# paused once (the switchover) and the destination not at all until a
# verify (nothing stops its vCPUs after the resume), each vCPU thread with
# the 100 us slice asked for (Linux 6.12+; docs/kvm-guest.md). Skipped
# (exit 77) without /dev/kvm.
# usage: vm_heartbeat.sh PATH_TO_VFIOMIG PATH_TO_VFM_HEARTBEAT
set -u
bin=$1
obs_bin=$2
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
	echo "SKIP: no usable /dev/kvm"; exit 77
fi
lib_name=vmhb
. "$(dirname "$0")/vm_lib.sh"
ctl() { timeout -k 5 30 "$bin" ctl "$@"; }
jq_status() { ctl "$1" status --json | python3 -c "import json,sys; g=json.load(sys.stdin); print($2)"; }

# Bad input first: clear errors, no hang.
out=$(timeout -k 5 20 "$bin" vm --mem 32M --guest kvm --heartbeat "$tmp/nobody" \
	--control "$tmp/x" 2>&1); st=$?
[ $st = 1 ] && echo "$out" | grep -q "heartbeat socket $tmp/nobody" &&
	ok "no observer: exit 1, says which socket" || bad "no observer: exit $st: $out"
out=$(timeout -k 5 20 "$bin" vm --mem 32M --guest synthetic --heartbeat "$tmp/hs" \
	--control "$tmp/x" 2>&1); st=$?
[ $st = 2 ] && echo "$out" | grep -q "only the kvm guest" && ok "synthetic guest: usage error" ||
	bad "synthetic guest with --heartbeat: exit $st: $out"
out=$(timeout -k 5 20 "$bin" vm --mem 32M --guest kvm --vcpu-slice-us 50 --control "$tmp/x" 2>&1)
st=$?
[ $st = 2 ] && echo "$out" | grep -q "vcpu-slice-us" && ok "--vcpu-slice-us 50: usage error" ||
	bad "--vcpu-slice-us 50: exit $st: $out"
out=$(timeout -k 5 20 "$obs_bin" "$tmp/a" "$tmp/b" --gaps x 2>&1); st=$?
[ $st = 2 ] && ok "observer: bad --gaps refused" || bad "observer --gaps x: exit $st: $out"
out=$(timeout -k 5 20 "$obs_bin" "$tmp/a" "$tmp/b" --timeout -3 2>&1); st=$?
[ $st = 2 ] && ok "observer: bad timeout refused" || bad "observer --timeout -3: exit $st: $out"

# The observer, bounded by its own --timeout (timeout(1) would not pass SIGUSR1 on).
# It timestamps beats as it reads them: on a loaded machine (make check runs
# tests in parallel on 2 cores) a starved observer reads bursts late, so it
# runs at a higher priority where it may (root), as a bench would.
prio=""
nice -n -10 true 2>/dev/null && prio="nice -n -10"
$prio "$obs_bin" "$tmp/hs" "$tmp/hd" --timeout 80 --gaps 2 >"$tmp/obs.out" 2>>"$tmp/log" &
obs=$!
pids="$pids $obs"
i=0
until grep -q ready "$tmp/obs.out" 2>/dev/null; do
	i=$((i + 1)); [ $i -gt 200 ] && { bad "observer did not start"; exit 1; }; sleep 0.05
done
common="--guest kvm --mem 64M --working-set 1M --vcpus 1 --dirty-rate 2M/s -v"
bg timeout -k 5 60 "$bin" vm $common --heartbeat "$tmp/hs" --control "$tmp/src"
src_pid=$last
bg timeout -k 5 60 "$bin" vm $common --heartbeat "$tmp/hd" --incoming "unix:$tmp/mig" \
	--control "$tmp/dst"
dst_pid=$last
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp/log"; exit 1; }
i=0
while [ "$(jq_status "$tmp/src" 'g["guest"]["page_writes"] > 20')" != True ]; do
	i=$((i + 1)); [ $i -gt 100 ] && { bad "source guest does not run"; break; }; sleep 0.1
done
sleep 0.3      # beats from the source before the migration
kill -USR1 $obs
if ctl "$tmp/src" migrate "unix:$tmp/mig" --wait >"$tmp/mig.out" 2>&1; then
	ok "migration completed"
else
	bad "migration failed: $(cat "$tmp/mig.out")"
fi
i=0
while [ "$(jq_status "$tmp/dst" 'g["guest"]["running"]')" != True ]; do
	i=$((i + 1)); [ $i -gt 100 ] && { bad "destination guest never ran"; break; }; sleep 0.1
done
sleep 0.3      # beats from the destination
kill -USR2 $obs
ctl "$tmp/src" status --json >"$tmp/src.json"
ctl "$tmp/dst" status --json >"$tmp/dst.json"
ctl "$tmp/dst" verify >/dev/null 2>&1 || bad "destination verify failed"
ctl "$tmp/dst" status --json >"$tmp/dst2.json"
python3 - "$tmp/src.json" "$tmp/dst.json" "$tmp/dst2.json" <<'PY' && ok "vCPU scheduling checks" || bad "vCPU scheduling: $(tail -1 "$tmp/dst.json")"
import json, os, sys
s, d, d2 = (json.load(open(f))["guest"]["kvm"] for f in sys.argv[1:4])
print("src:", s, "dst:", d, "dst after verify:", d2)
fails = []
major, minor = (int(x) for x in os.uname().release.split(".")[:2])
for name, k in (("source", s), ("destination", d)):
    if k["idle_early"] != 0:
        fails.append("%s: %d idle waits cut short" % (name, k["idle_early"]))
    if k["idle_waits"] <= 0:
        fails.append("%s: no idle waits" % name)
    if (major, minor) >= (6, 12) and k["vcpu_slice_us"] != 100:
        fails.append("%s: vCPU slice %s us, not 100" % (name, k["vcpu_slice_us"]))
if s["pauses"] != 1:
    fails.append("source paused %d times, not once (the switchover)" % s["pauses"])
if d["pauses"] != 0:
    fails.append("destination paused %d times after its resume" % d["pauses"])
# verify stops the guest (and its own check runs it and stops it again)
if d2["pauses"] < 1:
    fails.append("destination verify did not count as a pause")
if fails:
    print("FAILED:", "; ".join(fails))
    sys.exit(1)
PY
kill -TERM $obs
wait $obs; st=$?
[ $st = 0 ] && ok "observer exited 0" || bad "observer exited $st"
python3 - "$tmp/obs.out" "$tmp/src.json" <<'PY' && ok "blackout and timeline checks" || bad "blackout/timeline: $(tail -1 "$tmp/obs.out")"
import json, sys
hb = json.loads(open(sys.argv[1]).read().splitlines()[-1])
m = json.load(open(sys.argv[2]))["migration"]
print("observer:", json.dumps(hb))
print("switchover_ms:", m.get("switchover_ms"), "downtime_ms:", m["downtime_ms"])
fails = []
def check(cond, what):
    if not cond:
        fails.append(what)
check(hb["src"]["beats"] >= 100, "too few source beats")
check(hb["dst"]["beats"] >= 50, "too few destination beats")
check(hb["src"]["last_ms"] < hb["dst"]["first_ms"], "the guest beat on both sides at once")
# The mean period (an observer starved on a loaded machine reads a burst of
# beats at once, so its median gap can be 0; the mean stays the guest's).
def period(side):
    return (side["last_ms"] - side["first_ms"]) / max(side["beats"] - 1, 1)
check(0.5 <= period(hb["src"]) <= 5, "source beat period %.3f ms is not ~1 ms" % period(hb["src"]))
check(0.5 <= period(hb["dst"]) <= 5, "destination beat period %.3f ms is not ~1 ms" % period(hb["dst"]))
check(hb["switch_ms"] > 0, "no gap between the sides")
check(hb["blackout_ms"] >= hb["switch_ms"], "blackout shorter than the switch gap")
check(0 < hb["blackout_ms"] < 3000, "blackout out of bounds (0, 3000) ms")
# The guest cannot have run while the source reports it stopped (one clock,
# one host): the switch gap covers the downtime up to the beat period and
# the observer's own read delays.
check(hb["switch_ms"] >= 0.5 * m["downtime_ms"] - 2, "switch gap much shorter than the downtime")
tl = m.get("switchover_ms") or {}
steps = ["guest_stop", "device_stop", "final_sync", "last_bytes", "dest_load", "go",
         "dest_resume"]
check(list(tl) == steps, "timeline steps %s" % list(tl))
check(all(tl.get(k, -1) >= 0 for k in steps), "a negative step")
total = sum(tl.get(k, 0) for k in steps)
check(m["downtime_same_clock"] is True, "not the same clock")
check(total <= m["downtime_ms"] + 0.01, "steps sum to %.3f > downtime %.3f" % (total, m["downtime_ms"]))
check(total >= 0.95 * m["downtime_ms"], "steps sum to %.3f, far below downtime" % total)
check(tl.get("guest_stop", 0) > 0 and tl.get("dest_load", 0) > 0, "empty guest stop or load step")
ex = m.get("expected_switchover_ms") or {}
check(list(ex) == steps, "expected steps %s" % list(ex))
check(all(ex.get(k, -1) >= 0 for k in steps), "a negative expected step")
exp_total = sum(ex.get(k, 0) for k in steps)
check(abs(exp_total - m["expected_downtime_ms"]) <= 0.01 + 0.001 * len(steps),
      "expected steps sum to %.3f, expected_downtime_ms %.3f" % (exp_total, m["expected_downtime_ms"]))
check(ex.get("dest_load", 0) > 0, "no expected destination load")
# The running vCPUs' kicks were timed (vm's kick_ns): the stop is expected.
check(ex.get("guest_stop", 0) > 0, "guest stop expected as 0: no kick timed")
if fails:
    print("FAILED:", "; ".join(fails))
    sys.exit(1)
PY
ctl "$tmp/src" quit >/dev/null; ctl "$tmp/dst" quit >/dev/null
wait "$src_pid"; st=$?; [ $st = 0 ] && ok "source exited 0" || bad "source exited $st"
wait "$dst_pid"; st=$?; [ $st = 0 ] && ok "destination exited 0" || bad "destination exited $st"
grep -q "heartbeat: [0-9]* beats sent" "$tmp/log" && ok "VMs report beats sent" ||
	bad "no beat count in the VM logs"
[ $fail = 0 ] || { echo "--- log"; tail -40 "$tmp/log"; }
[ $fail = 0 ] && echo PASS
exit $fail
