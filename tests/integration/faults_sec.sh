#!/bin/sh
# Control socket security (docs/reliability.md): created 0600, refused in a
# directory others may write, one client at a time (a second waits until
# the first leaves), garbage and a vanished client survived.
# usage: faults_sec.sh PATH_TO_VFIOMIG
bin=$1
. "$(dirname "$0")/faults-lib.sh"
known_failures="${FAULTS_KNOWN:-}"
cell=sec
bg timeout -k 5 60 "$bin" vm --mem 4M --guest none --control "$tmp/vm"
vm=$last
wait_sock "$tmp/vm" || { bad "VM did not start"; finish; }
[ "$(stat -c %a "$tmp/vm")" = 600 ] && ok "control socket is 0600" \
	|| bad "mode $(stat -c %a "$tmp/vm")"
mkdir "$tmp/open" && chmod 777 "$tmp/open"
out=$(timeout -k 5 20 "$bin" vm --mem 4M --guest none --control "$tmp/open/vm" 2>&1); rc=$?
[ $rc = 1 ] && echo "$out" | grep -q "others may write" && ok "world-writable directory refused" \
	|| bad "open directory: rc $rc: $out"
if timeout -k 5 20 python3 - "$tmp/vm" <<'PY'
import json, socket, sys, time
def conn():
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5); return s
a = conn(); fa = a.makefile("rb")
assert "QMP" in json.loads(fa.readline())
b = conn(); b.settimeout(0.5)
try:
    b.recv(1); raise SystemExit("second client served while the first is connected")
except socket.timeout:
    pass
a.sendall(b"\x00\xff garbage {{{\n")
assert "error" in json.loads(fa.readline())
a.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"')  # half a line
fa.close(); a.close()                       # vanishes mid-line
b.settimeout(5); fb = b.makefile("rb")
assert "QMP" in json.loads(fb.readline()), "second client served after the first left"
PY
then ok "one client at a time; garbage and a vanished client survived"; else bad "client handling"; fi
ctl "$tmp/vm" status >/dev/null && ok "still serving" || bad "control socket gone"
ctl "$tmp/vm" quit >/dev/null && wait "$vm" && ok "VM exited 0" || bad "VM exit"
grep -q "Sanitizer\|runtime error" "$tmp/sec.log" && bad "sanitizer reports in the log"
finish
