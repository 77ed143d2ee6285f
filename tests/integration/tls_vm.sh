#!/bin/sh
# TLS between two VMs on loopback (docs/security.md): a migration under x509
# with two multifd channels (main, return path and channels all through
# TLS), verified; a source with the wrong key (PSK) and one with no TLS are
# refused with the reason on both sides, the source's guest and devices keep
# running, the destination waits on and takes the real migration; a
# non-loopback plaintext listener is refused without --insecure.
# usage: tls_vm.sh PATH_TO_VFIOMIG PATH_TO_TLS_GEN_TOOL
set -u
bin=$1
gen=$2
lib_name=tlsvm
. "$(dirname "$0")/vm_lib.sh"
ctl() { timeout -k 5 20 "$bin" ctl "$@"; }
wait_status() {  # wait_status SOCKET PATTERN: until `ctl status` matches (15 s)
	i=0
	while ! ctl "$1" status 2>/dev/null | grep -q "$2"; do
		i=$((i + 1)); [ $i -gt 150 ] && return 1; sleep 0.1
	done
}

"$gen" "$tmp/x509" x509 127.0.0.1 >/dev/null && "$gen" "$tmp/psk" psk qemu >/dev/null \
	&& "$gen" "$tmp/psk2" psk qemu >/dev/null || { bad "credentials"; exit 1; }

# A plaintext listener beyond loopback is refused, and says why.
out=$(timeout -k 5 10 "$bin" vm --mem 16M --guest none --incoming tcp:0.0.0.0:0 \
	--control "$tmp/x" 2>&1); rc=$?
[ $rc != 0 ] && echo "$out" | grep -q -- "--insecure" && ok "plaintext 0.0.0.0 listener refused" \
	|| bad "plaintext 0.0.0.0 listener: rc $rc: $out"
out=$(timeout -k 5 10 "$bin" vm --mem 16M --tls-creds "x509:$tmp/none" --control "$tmp/x" 2>&1)
[ $? != 0 ] && echo "$out" | grep -q "ca-cert.pem" && ok "missing credentials refused at start" \
	|| bad "missing credentials: $out"

for d in d0 e0; do
	bg timeout -k 5 100 "$bin" device dma --socket "$tmp/$d" --state-size 4M --churn 1M/s
done
for d in d0 e0; do wait_sock "$tmp/$d" || bad "device $d did not start"; done
bg timeout -k 5 100 "$bin" vm --mem 64M --device "vfio-user:$tmp/d0" --dirty-rate 8M/s \
	--tls-creds "x509:$tmp/x509" --control "$tmp/src"
bg timeout -k 5 100 "$bin" vm --mem 64M --device "vfio-user:$tmp/e0" \
	--incoming tcp:127.0.0.1:0 --tls-creds "x509:$tmp/x509" --control "$tmp/dst" \
	--tls-authz "CN=someone-else" --tls-authz "CN=vfiomig-source,O=vfiomig test"
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp/log"; exit 1; }
uri=$(ctl "$tmp/dst" status | sed -n 's/.*(incoming \(tcp:[^)]*\)).*/\1/p')
[ -n "$uri" ] && ok "destination listens on $uri" || bad "no incoming URI"

# A source with the wrong PSK, then one without TLS: both refused.
bg timeout -k 5 60 "$bin" vm --mem 16M --guest none --tls-creds "psk:$tmp/psk2" --control "$tmp/bad1"
bg timeout -k 5 60 "$bin" vm --mem 16M --guest none --control "$tmp/bad2"
wait_sock "$tmp/bad1" && wait_sock "$tmp/bad2" || bad "intruder VMs did not start"
out=$(ctl "$tmp/bad1" migrate "$uri" --wait 2>&1)
[ $? = 1 ] && echo "$out" | grep -qi "TLS" && ok "x509 destination refused a PSK source: $(echo "$out" | tail -1)" \
	|| bad "PSK source: $out"
out=$(ctl "$tmp/bad2" migrate "$uri" --wait 2>&1)
[ $? = 1 ] && echo "$out" | grep -q "accepts TLS only" && ok "plaintext source told: TLS only" \
	|| bad "plaintext source: $out"
grep -q "refused a migration connection" "$tmp/log" && ok "destination logged the refusals" \
	|| bad "no refusal in the destination's log"
ctl "$tmp/dst" status | grep -q "^vm: inmigrate" && ok "destination still waiting" \
	|| bad "destination: $(ctl "$tmp/dst" status)"

# A source whose tls-hostname does not match the certificate: refused, rolls back.
ctl "$tmp/src" set tls-hostname=dest.example.org && ok "set tls-hostname" || bad "set tls-hostname"
out=$(ctl "$tmp/src" migrate "$uri" --wait 2>&1)
[ $? = 1 ] && echo "$out" | grep -q "does not match" && ok "hostname mismatch refused" \
	|| bad "hostname mismatch: $out"
st=$(ctl "$tmp/src" status)
echo "$st" | grep -q "^vm: running" && ok "source guest still running" || bad "source: $st"
echo "$st" | grep -qi "device.*running" && ok "source device running" || bad "source devices: $st"
ctl "$tmp/src" set tls-hostname= && ok "tls-hostname back to the URI's host" || bad "reset tls-hostname"
ctl "$tmp/src" status --json >/dev/null
ctl "$tmp/dst" set tls-authz=CN=vfiomig-source,O=vfiomig\ test tls-authz=CN=other \
	&& ok "set tls-authz (two DNs)" || bad "set tls-authz"
# What query-migrate-parameters says now (QMP, as a management tool sees it).
timeout -k 5 10 python3 - "$tmp/dst" "$tmp/x509" <<'PY' && ok "query-migrate-parameters: tls keys" \
	|| bad "query-migrate-parameters"
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb", buffering=0)
def rd():
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
rd()
s.sendall(b'{"execute": "qmp_capabilities"}\n'); rd()
s.sendall(b'{"execute": "query-migrate-parameters"}\n'); r = rd()["return"]
assert r["tls-authz"] == ["CN=vfiomig-source,O=vfiomig test", "CN=other"], r
assert r["tls-creds"] == "x509:" + sys.argv[2] and r["tls-hostname"] == "", r
s.sendall(b'{"execute": "migrate-set-parameters", "arguments": {"tls-authz": [1]}}\n')
assert "error" in rd()
s.sendall(b'{"execute": "migrate-set-parameters", "arguments": {"tls-authz": "a\\nb"}}\n')
assert "error" in rd()
PY

# Cancelled half way under TLS: the source runs on, the destination fails
# that attempt and waits for the next.
ctl "$tmp/src" set max-bandwidth=1M/s >/dev/null || bad "set max-bandwidth"
ctl "$tmp/src" migrate "$uri" && wait_status "$tmp/src" "migration: active" \
	&& ok "slow TLS migration running" || bad "slow migration did not start"
ctl "$tmp/src" cancel && wait_status "$tmp/src" "migration: cancelled" && ok "cancelled" \
	|| bad "cancel: $(ctl "$tmp/src" status | head -2)"
ctl "$tmp/src" status | grep -q "^vm: running" && ok "source running after cancel" || bad "source after cancel"
wait_status "$tmp/dst" "migration: failed" && ok "destination saw the attempt end" \
	|| bad "destination after cancel: $(ctl "$tmp/dst" status | head -2)"
ctl "$tmp/src" set max-bandwidth=0 >/dev/null

# The real one: x509, two multifd channels, verified.
ctl "$tmp/src" set multifd-channels=2 || bad "set channels"
i=0
until out=$(ctl "$tmp/src" migrate "$uri" --wait 2>&1); do
	# The destination re-listens right after the cancelled attempt.
	i=$((i + 1)); [ $i -lt 10 ] || break; sleep 0.3
done
echo "$out" | grep -q "migration: completed" && ok "TLS migration completed" || bad "TLS migration: $out"
dst_status=$(ctl "$tmp/dst" status)
echo "$dst_status" | grep -q "guest: synthetic, verified yes" && ok "destination guest verified" \
	|| bad "destination: $dst_status"
src_sum=$(ctl "$tmp/src" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
dst_sum=$(echo "$dst_status" | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
[ -n "$src_sum" ] && [ "$src_sum" = "$dst_sum" ] && ok "device checksum equal" \
	|| bad "checksums '$src_sum' '$dst_sum'"
ctl "$tmp/src" status --json | grep -q '"multifd_channels":2' && ok "2 channels used" \
	|| bad "channels: $(ctl "$tmp/src" status --json)"
# A TLS source to a plaintext destination: the source says what is likely.
bg timeout -k 5 60 "$bin" vm --mem 16M --guest none --incoming tcp:127.0.0.1:0 --control "$tmp/plain"
bg timeout -k 5 60 "$bin" vm --mem 16M --guest none --tls-creds "x509:$tmp/x509" --control "$tmp/tsrc"
wait_sock "$tmp/plain" && wait_sock "$tmp/tsrc" || bad "plain pair did not start"
puri=$(ctl "$tmp/plain" status | sed -n 's/.*(incoming \(tcp:[^)]*\)).*/\1/p')
out=$(ctl "$tmp/tsrc" migrate "$puri" --wait 2>&1)
[ $? = 1 ] && echo "$out" | grep -q "is the destination listening with --tls-creds" && ok "TLS source to a plaintext destination: told" \
	|| bad "TLS source to plaintext: $out"
for s in src dst bad1 bad2 plain tsrc; do ctl "$tmp/$s" quit >/dev/null 2>&1; done
[ $fail = 0 ] || { echo "--- log"; tail -40 "$tmp/log"; }
exit $fail
