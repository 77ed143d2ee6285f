#!/bin/sh
# Honest non-convergence through the VM process and `vfiomig ctl`: a dma
# device whose firmware churns more than max-bandwidth carries, on a VM whose
# guest dirties memory. query-migrate says it is not converging, the downtime
# it would need and who holds it, each device's pending bytes and dirty rate;
# RAM moves meanwhile; raising downtime-limit (and lifting max-bandwidth) on
# the running migration completes it, and the destination verifies. Then
# auto-converge, of the vCPUs and of the device's churn, completes the same
# kind of migration by itself.
# usage: vm_converge.sh PATH_TO_VFIOMIG
set -u
bin=$1
lib_name=vmconv
. "$(dirname "$0")/vm_lib.sh"
ctl() { timeout -k 5 20 "$bin" ctl "$@"; }

bg timeout -k 5 90 "$bin" device dma --socket "$tmp/d0" --state-size 16M --churn 32M/s
bg timeout -k 5 90 "$bin" device dma --socket "$tmp/e0" --state-size 16M
for d in d0 e0; do wait_sock "$tmp/$d" || bad "device $d did not start"; done
bg timeout -k 5 90 "$bin" vm --mem 32M --device "vfio-user:$tmp/d0" --dirty-rate 8M/s \
	--control "$tmp/src"
bg timeout -k 5 90 "$bin" vm --mem 32M --device "vfio-user:$tmp/e0" --incoming "unix:$tmp/mig" \
	--control "$tmp/dst"
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp/log"; exit 1; }

ctl "$tmp/src" set max-bandwidth=12M/s || bad "set max-bandwidth"
ctl "$tmp/src" migrate "unix:$tmp/mig" && ok "migrate started" || bad "migrate did not start"
# query-migrate, polled (bounded) until it reports non-convergence.
if timeout -k 5 40 python3 - "$tmp/src" > "$tmp/report" <<'PYEOF'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb", buffering=0)
def cmd(c, args=None):
    m = {"execute": c}
    if args is not None:
        m["arguments"] = args
    s.sendall(json.dumps(m).encode() + b"\n")
    while True:
        r = json.loads(f.readline())
        if "event" not in r:
            return r
assert "QMP" in json.loads(f.readline())
cmd("qmp_capabilities")
t0 = time.time()
while True:
    m = cmd("query-migrate")["return"]
    assert m["status"] in ("setup", "active"), m
    if not m["converging"]:
        break
    assert time.time() - t0 < 30, "never reported as not converging: %s" % m
    time.sleep(0.1)
d = m["devices"][0]
print("needed %.0f ms, bottleneck %s, device pending %d, dirty rate %d B/s, RAM %d" %
      (m["needed_downtime_ms"], m["bottleneck"], d["pending_bytes"], d["dirty_rate_bps"],
       m["ram_transferred_bytes"]))
assert m["needed_downtime_ms"] > m["downtime_limit_ms"], m
assert m["bottleneck"].startswith("vfio:"), m
assert d["pending_bytes"] > 0 and d["dirty_rate_bps"] > 0, d
# RAM shares the 12 MB/s with the device from the first iteration on.
assert m["ram_transferred_bytes"] >= 4 << 20, "RAM did not move: %s" % m
# The user's answer, live: a limit that fits, and the link unthrottled.
limit = int(m["needed_downtime_ms"] * 2) + 100
r = cmd("migrate-set-parameters", {"downtime-limit": limit, "max-bandwidth": 0})
assert r == {"return": {}}, r
m = cmd("query-migrate")["return"]
assert m["downtime_limit_ms"] == limit, m
PYEOF
then ok "not converging reported: $(cat "$tmp/report")"
else bad "convergence report: $(cat "$tmp/report")"; fi
i=0
until ctl "$tmp/src" status | grep -q "migration: completed"; do
	i=$((i + 1)); [ $i -gt 200 ] && break; sleep 0.1
done
[ $i -le 200 ] && ok "completed after the live change" || bad "not completed: $(ctl "$tmp/src" status)"
i=0
until ctl "$tmp/dst" status | grep -q "^vm: running"; do
	i=$((i + 1)); [ $i -gt 100 ] && break; sleep 0.1
done
dst_status=$(ctl "$tmp/dst" status)
echo "$dst_status" | grep -q "guest: synthetic, verified yes" && ok "destination guest verified" \
	|| bad "destination guest: $dst_status"
src_sum=$(ctl "$tmp/src" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
dst_sum=$(echo "$dst_status" | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
[ -n "$src_sum" ] && [ "$src_sum" = "$dst_sum" ] && ok "device checksum equal" \
	|| bad "checksums: '$src_sum' '$dst_sum'"
ctl "$tmp/src" quit >/dev/null
ctl "$tmp/dst" quit >/dev/null

# auto-converge: WHAT=vcpu (the guest dirties more than the link carries) or
# device (the device's churn does, device-throttle): with the throttle on, the
# migration completes at 300 ms without any other change, and query-migrate
# showed the throttle while it ran; the destination verifies.
auto_converge() {
	what=$1; n=$2
	if [ "$what" = vcpu ]; then
		churn=0; rate=32M/s; params="auto-converge=on"; key=cpu_throttle_percentage
	else
		churn=32M/s; rate=1M/s; params="device-throttle=on"; key=device_throttle_percentage
	fi
	bg timeout -k 5 90 "$bin" device dma --socket "$tmp/d$n" --state-size 8M --churn $churn
	bg timeout -k 5 90 "$bin" device dma --socket "$tmp/e$n" --state-size 8M
	for d in d$n e$n; do wait_sock "$tmp/$d" || bad "device $d did not start"; done
	bg timeout -k 5 90 "$bin" vm --mem 16M --device "vfio-user:$tmp/d$n" --dirty-rate $rate \
		--control "$tmp/src$n"
	bg timeout -k 5 90 "$bin" vm --mem 16M --device "vfio-user:$tmp/e$n" \
		--incoming "unix:$tmp/mig$n" --control "$tmp/dst$n"
	wait_sock "$tmp/src$n" && wait_sock "$tmp/dst$n" || { bad "VMs did not start"; return; }
	ctl "$tmp/src$n" set max-bandwidth=12M/s $params cpu-throttle-initial=80 \
		cpu-throttle-increment=19 || bad "set $params"
	ctl "$tmp/src$n" migrate "unix:$tmp/mig$n" || bad "migrate did not start"
	if timeout -k 5 60 python3 - "$tmp/src$n" "$key" > "$tmp/report" <<'PYEOF'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb", buffering=0)
def cmd(c):
    s.sendall(json.dumps({"execute": c}).encode() + b"\n")
    while True:
        r = json.loads(f.readline())
        if "event" not in r:
            return r
assert "QMP" in json.loads(f.readline())
cmd("qmp_capabilities")
top = 0
while True:
    m = cmd("query-migrate")["return"]
    top = max(top, m[sys.argv[2]])
    if m["status"] in ("completed", "failed", "cancelled"):
        break
    time.sleep(0.05)
print("%s, throttled up to %d%%, %d iterations, downtime %.1f ms" %
      (m["status"], top, m["precopy_iterations"], m["downtime_ms"]))
assert m["status"] == "completed", m
assert top > 0, "never throttled"
assert m[sys.argv[2]] == 0, "throttle left on: %s" % m
PYEOF
	then ok "auto-converge ($what): $(cat "$tmp/report")"
	else bad "auto-converge ($what): $(cat "$tmp/report")"; fi
	i=0
	until ctl "$tmp/dst$n" status | grep -q "^vm: running"; do
		i=$((i + 1)); [ $i -gt 100 ] && break; sleep 0.1
	done
	ctl "$tmp/dst$n" status | grep -q "guest: synthetic, verified yes" \
		&& ok "auto-converge ($what): destination guest verified" \
		|| bad "auto-converge ($what): destination: $(ctl "$tmp/dst$n" status)"
	ctl "$tmp/src$n" quit >/dev/null
	ctl "$tmp/dst$n" quit >/dev/null
}
auto_converge vcpu 1
auto_converge device 2
grep -q "Sanitizer\|runtime error" "$tmp/log" && bad "sanitizer reports in the log"
[ $fail = 0 ] || { echo "--- log"; tail -40 "$tmp/log"; }
exit $fail
