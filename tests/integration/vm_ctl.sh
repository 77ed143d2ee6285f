#!/bin/sh
# A live migration driven through `vfiomig ctl`: two dma device servers per
# side, a source VM with the synthetic guest, an incoming destination. A slow
# first attempt is refused a second migrate and cancelled (the source keeps
# running, verified), then a full one completes: the destination's guest
# verifies and every device checksum equals the source's. The control socket
# survives garbage.
# usage: vm_ctl.sh PATH_TO_VFIOMIG
set -u
bin=$1
lib_name=vmctl
. "$(dirname "$0")/vm_lib.sh"
ctl() { timeout -k 5 20 "$bin" ctl "$@"; }
field() {  # field SOCKET KEY: the value after KEY in `ctl status` (first match)
	ctl "$1" status | sed -n "s/.*$2 \([^ ,]*\).*/\1/p" | head -1
}
wait_status() {  # wait_status SOCKET PATTERN: until `ctl status` matches (10 s)
	i=0
	while ! ctl "$1" status 2>/dev/null | grep -q "$2"; do
		i=$((i + 1)); [ $i -gt 100 ] && return 1; sleep 0.1
	done
}

for d in d0 d1 e0 e1; do
	churn=0; case $d in *0) churn=2M/s ;; esac
	bg timeout -k 5 60 "$bin" device dma --socket "$tmp/$d" --state-size 4M --churn $churn
	[ $d = d0 ] && d0_pid=$last
done
for d in d0 d1 e0 e1; do wait_sock "$tmp/$d" || bad "device $d did not start"; done
bg timeout -k 5 60 "$bin" vm --mem 32M --device "vfio-user:$tmp/d0" --device "vfio-user:$tmp/d1" \
	--dirty-rate 16M/s --control "$tmp/src"
src_pid=$last
bg timeout -k 5 60 "$bin" vm --mem 32M --device "vfio-user:$tmp/e0" --device "vfio-user:$tmp/e1" \
	--incoming "unix:$tmp/mig" --control "$tmp/dst"
dst_pid=$last
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp/log"; exit 1; }

ctl "$tmp/dst" status | grep -q "vm: inmigrate (incoming unix:$tmp/mig)" && ok "destination inmigrate" \
	|| bad "destination not inmigrate"
# The guest drives both devices' rings (bounded wait, no timing asserted):
# guest.dma_ops must be a number above 0 (a missing key is a failure), with
# no DMA error.
dma_ops() {
	ctl "$tmp/src" status --json | python3 -c '
import json, sys
g = json.load(sys.stdin)["guest"]
n, e = g.get("dma_ops"), g.get("dma_errors")
print(n if isinstance(n, int) and e == 0 else "bad: dma_ops %r, dma_errors %r" % (n, e))'
}
i=0
while [ "$(dma_ops)" = 0 ]; do
	i=$((i + 1)); [ $i -gt 100 ] && break; sleep 0.1
done
n=$(dma_ops)
case "$n" in
[1-9]*) ok "guest DMA through the devices ($n descriptor pairs)" ;;
*) bad "no guest DMA: $n" ;;
esac

# A slow migration: a second migrate is refused, cancel rolls back.
ctl "$tmp/src" set max-bandwidth=512K/s downtime-limit=50 || bad "set"
ctl "$tmp/src" migrate "unix:$tmp/mig" && ok "migrate started" || bad "migrate did not start"
out=$(ctl "$tmp/src" migrate "unix:$tmp/mig" 2>&1); rc=$?
[ $rc = 1 ] && echo "$out" | grep -q "already in progress" && ok "second migrate refused" \
	|| bad "second migrate: rc $rc: $out"
# Every thread but the main one blocks SIGINT and SIGTERM (vfm_thread_create):
# the main loops, which wait without SA_RESTART, are what a signal must cut
# short; one taken by a worker left them waiting (and a handler ran on two
# threads at once: a TSan report). Checked while the migration runs (its
# thread, the vCPUs, a device's churn thread). SigBlk's last 4 hex digits hold
# signals 1-16: SIGINT is 0x2, SIGTERM 0x4000.
sig_threads() {  # sig_threads PID NAME: PID is timeout's, the tool is its child
	p=$(pgrep -P "$1" | head -1)
	n=0; open=""
	for st in /proc/$p/task/*/status; do
		tid=${st#/proc/$p/task/}; tid=${tid%/status}
		blk=$(sed -n 's/^SigBlk:[[:space:]]*//p' "$st" 2>/dev/null)
		[ -n "$p" ] && [ "$tid" != "$p" ] && [ -n "$blk" ] || continue
		n=$((n + 1)); low=${blk#"${blk%????}"}
		[ $((0x$low & 0x4002)) = $((0x4002)) ] || open="$open $tid:$blk"
	done
	[ $n -gt 0 ] && [ -z "$open" ] && ok "$2: its $n other threads block SIGINT and SIGTERM" \
		|| bad "$2 (pid ${p:-none}): $n other threads, taking signals:$open"
}
sig_threads $src_pid "source VM"
sig_threads $d0_pid "device d0"
ctl "$tmp/src" cancel && ok "cancel accepted" || bad "cancel"
wait_status "$tmp/src" "migration: cancelled" && ok "migration cancelled" || bad "not cancelled"
ctl "$tmp/src" status | grep -q "^vm: running" && ok "source still running" || bad "source not running"
ctl "$tmp/src" verify && ok "source verified after cancel" || bad "source verification after cancel"
ctl "$tmp/src" cont && ok "cont after cancel" || bad "cont after cancel"

# The destination takes the next attempt; this one runs to the end.
wait_status "$tmp/dst" "migration: failed" || bad "destination did not see the attempt fail"
ctl "$tmp/src" set max-bandwidth=0 downtime-limit=300 || bad "set back"
# The last run goes without multifd channels and with a stated switchover bandwidth.
ctl "$tmp/src" set multifd-channels=0 avail-switchover-bandwidth=2G/s && ok "set channels 0" \
	|| bad "set multifd-channels=0 avail-switchover-bandwidth"
ctl "$tmp/src" set avail-switchover-bandwidth=fast 2>/dev/null; [ $? = 2 ] \
	&& ok "bad avail-switchover-bandwidth is a usage error" || bad "bad value accepted"
i=0
until out=$(ctl "$tmp/src" migrate "unix:$tmp/mig" --wait 2>&1); do
	# The destination re-listens right after its failure; a connect may beat it.
	i=$((i + 1))
	echo "$out" | grep -qi "connect" && [ $i -lt 10 ] || { bad "migrate --wait: $out"; break; }
	sleep 0.3
done
echo "$out" | grep -q "migration: completed" && ok "migration completed" || bad "not completed: $out"
src_status=$(ctl "$tmp/src" status)
dst_status=$(ctl "$tmp/dst" status)
echo "$src_status" | grep -q "^vm: postmigrate" && ok "source postmigrate" || bad "source: $src_status"
echo "$dst_status" | grep -q "^vm: running" && ok "destination running" || bad "destination: $dst_status"
echo "$dst_status" | grep -q "guest: synthetic, verified yes" && ok "destination guest verified" \
	|| bad "destination guest: $dst_status"
src_sums=$(echo "$src_status" | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p' | tr '\n' ' ')
dst_sums=$(echo "$dst_status" | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p' | tr '\n' ' ')
[ -n "$src_sums" ] && [ "$src_sums" = "$dst_sums" ] && ok "device checksums equal: $src_sums" \
	|| bad "checksums: source '$src_sums' destination '$dst_sums'"
[ "$(echo "$src_sums" | wc -w)" = 2 ] || bad "expected 2 device checksums: '$src_sums'"
ctl "$tmp/dst" status --json | grep -q '"verified":true' && ok "status --json verified" \
	|| bad "status --json"
# This run had multifd-channels=0: no channel, no RAM on one.
src_json=$(ctl "$tmp/src" status --json)
echo "$src_json" | grep -q '"multifd_channels":0,"multifd_ram_bytes":0' \
	&& ok "0 multifd channels, 0 RAM bytes on them" || bad "multifd stats: $src_json"
out=$(ctl "$tmp/src" cont 2>&1); rc=$?
[ $rc = 1 ] && echo "$out" | grep -q postmigrate && ok "cont refused after migrating" \
	|| bad "cont on postmigrate: rc $rc: $out"
sleep 0.5
ctl "$tmp/dst" verify && ok "destination verified while running on" || bad "destination verify"

# Garbage on the control socket gets error replies; the socket survives.
if timeout -k 5 10 python3 - "$tmp/dst" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb", buffering=0)
def rd():
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
assert "QMP" in rd()
s.sendall(b'{"execute": "query-status"}\n')
assert rd()["error"]["desc"].startswith("Expecting capabilities"), "before negotiation"
s.sendall(b"this is not json\n")
assert rd()["error"]["class"] == "GenericError", "garbage"
s.sendall(b'{"execute": "qmp_capabilities"}\n')
assert rd() == {"return": {}}
s.sendall(b"[1, 2]\n")
assert "error" in rd(), "not an object"
s.sendall(b"x" * 70000 + b"\n")
assert "64 KiB" in rd()["error"]["desc"], "overlong line"
s.sendall(b'{"execute": "no-such", "id": 7}\n')
r = rd()
assert r["error"]["class"] == "CommandNotFound" and r["id"] == 7, r
s.sendall(b'{"execute": "stop", "arguments": {"bogus": 1}}\n')
assert "unexpected" in rd()["error"]["desc"]
s.sendall(b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "x"}}\n')
assert "error" in rd()
s.sendall(b'{"execute": "query-status", "id": "q"}\n')
r = rd()
assert r["return"]["status"] == "running" and r["id"] == "q", r
EOF
then ok "garbage answered with errors"; else bad "garbage handling"; fi
ctl "$tmp/dst" status >/dev/null && ok "control socket survives" || bad "control socket gone"

ctl "$tmp/src" quit && ok "source quit" || bad "source quit"
ctl "$tmp/dst" quit && ok "destination quit" || bad "destination quit"
exited_ok $src_pid "source VM"
exited_ok $dst_pid "destination VM"
grep -q "Sanitizer\|runtime error" "$tmp/log" && bad "sanitizer reports in the log"
[ ! -e "$tmp/src" ] && [ ! -e "$tmp/dst" ] && ok "control sockets removed" || bad "sockets left"
[ $fail = 0 ] || { echo "--- log"; tail -40 "$tmp/log"; }
exit $fail
