#!/bin/sh
# vfiomig demo end to end: device servers and two VMs as child processes,
# migrated and verified; bad input; cleanup on a signal.
# usage: demo.sh PATH_TO_VFIOMIG CASE
set -u
bin=$1
case_=$2
# Small sizes: every case moves a few MiB; the demo itself bounds its waits.
small="--mem 64M --device-state 4M --dirty-rate 16M/s"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vfiomig-demo-test.XXXXXX") || exit 1
# The demo makes its private dir under $TMPDIR: here, so leftovers are visible.
TMPDIR=$tmp
export TMPDIR
trap 'rm -rf "$tmp"' EXIT
fail=0

die() { echo "FAIL: $*"; fail=1; }

# run STATUS ARGS...: runs the demo, output in $tmp/out and $tmp/err.
run() {
	want=$1; shift
	"$bin" demo "$@" >"$tmp/out" 2>"$tmp/err"; got=$?
	if [ "$got" != "$want" ]; then
		die "vfiomig demo $* exited $got, want $want"
		sed 's/^/  stdout: /' "$tmp/out" | tail -20
		sed 's/^/  stderr: /' "$tmp/err" | tail -30
		return 1
	fi
	# A verified run whose children did not stop cleanly still warns.
	if [ "$want" = 0 ] && grep -q "warning:" "$tmp/err"; then
		die "vfiomig demo $*: warnings"; cat "$tmp/err"; return 1
	fi
	echo "ok: vfiomig demo $* -> $got"
	return 0
}

# No child process and no private dir may outlive the demo.
check_clean() {
	left=$(ls -d "$tmp"/vfiomig-demo.* 2>/dev/null)
	[ -z "$left" ] || die "temp dir left behind: $left"
	for p in /proc/[0-9]*; do
		if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q "$tmp/vfiomig-demo"; then
			die "child left running: $(tr '\0' ' ' <"$p/cmdline")"
		fi
	done
}

# The human report of a verified run.
check_report() {
	grep -q '^result: VERIFIED' "$tmp/out" || die "no VERIFIED line"
	grep -q 'guest .*synthetic: ok, [1-9][0-9]* pages checked, 0 errors' "$tmp/out" ||
		die "no guest verification line"
	grep -q '^    quick  *ok, [1-9]' "$tmp/out" && grep -q '^    full  *ok, [1-9]' "$tmp/out" ||
		die "no quick and full check lines"
	for i in $(seq 0 $(($1 - 1))); do
		grep -q "dev$i .*state checksum 0x[0-9a-f]* == 0x[0-9a-f]*: ok" "$tmp/out" ||
			die "no verified checksum line for dev$i"
	done
	grep -q 'downtime .* ms measured.*, .* ms expected, limit [0-9]* ms' "$tmp/out" ||
		die "no downtime line"
}

# check_json DEVICES URI_PREFIX LIVE [LIMIT_MS]: the JSON contract's keys and values.
check_json() {
	python3 - "$tmp/out" "$1" "$2" "$3" "${4:-300}" <<'EOF' || die "JSON check failed"
import json, sys
path, ndev, uri_prefix, live = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
limit = int(sys.argv[5])
r = json.load(open(path))
keys = ["verified", "guest", "devices", "uri", "downtime_ms", "expected_downtime_ms",
        "downtime_limit_ms", "total_time_ms", "setup_time_ms", "precopy_iterations",
        "transferred_bytes", "ram_transferred_bytes", "device_transferred_bytes",
        "throughput_mbps", "multifd_channels"]
missing = [k for k in keys if k not in r]
assert not missing, "missing keys: %s" % missing
assert r["verified"] is True, r.get("error")
assert r["guest"]["kind"] == "synthetic" and r["guest"]["verified"] is True, r["guest"]
# Both of the destination's checks ran and passed: quick on load, full after.
for c in ["quick", "full"]:
    g = r["guest"][c]
    assert g["verified"] is True and g["errors"] == 0 and g["pages_checked"] > 0, (c, g)
    assert g["verify_ms"] >= 0, (c, g)
assert len(r["devices"]) == ndev, r["devices"]
for d in r["devices"]:
    assert d["verified"] is True and d["source_checksum"] == d["destination_checksum"], d
assert r["uri"].startswith(uri_prefix), r["uri"]
assert r["live"] == live, r["live"]
assert not r["uri"].endswith(":0"), "port not resolved: " + r["uri"]
# Zero pages travel as runs: RAM is less than 64M, device state at least 4M each.
assert r["ram_transferred_bytes"] > 0, r["ram_transferred_bytes"]
assert r["device_transferred_bytes"] >= ndev * (4 << 20), r["device_transferred_bytes"]
assert r["transferred_bytes"] >= r["ram_transferred_bytes"] + r["device_transferred_bytes"]
# With channels the stop-copy RAM of the writing guest goes over them.
if r["multifd_channels"]:
    assert r["multifd_ram_bytes"] > 0, r["multifd_ram_bytes"]
else:
    assert r["multifd_ram_bytes"] == 0, r["multifd_ram_bytes"]
# The limit the demo set is the one the source VM migrated with.
assert r["downtime_limit_ms"] == limit, (r["downtime_limit_ms"], limit)
assert r["total_time_ms"] > 0 and r["downtime_ms"] > 0
if live:
    assert r["precopy_iterations"] >= 1, r["precopy_iterations"]
phases = [e["phase"] for e in r["timeline"]]
for p in ["start", "running", "migrate", "completed", "verify", "verified"]:
    assert p in phases, "phase %s missing from %s" % (p, phases)
print("json ok:", r["uri"], r["transferred_bytes"], "bytes")
EOF
}

case $case_ in
one-device)
	run 0 $small && check_report 1
	check_clean
	;;
two-devices)
	run 0 $small --devices 2 && check_report 2
	# multifd channels are passed to both VMs (used once the engine has multifd).
	run 0 $small --devices 2 --channels 2 && check_report 2
	check_clean
	;;
json)
	run 0 $small --devices 2 --json --downtime-limit 250ms && check_json 2 tcp:127.0.0.1: 1 250
	check_clean
	;;
unix)
	run 0 $small --json --uri "unix:$tmp/mig.sock" && check_json 1 "unix:$tmp/mig.sock" 1
	run 0 $small --uri unix: && check_report 1
	check_clean
	;;
file)
	run 0 $small --json --uri "file:$tmp/vm.state" && check_json 1 "file:$tmp/vm.state" 0
	[ -s "$tmp/vm.state" ] || die "no state file"
	run 0 $small --uri file: && check_report 1
	grep -q 'non-live migration' "$tmp/out" || die "file: not reported as non-live"
	check_clean
	;;
bad-input)
	for args in "--mem lots" "--mem 0" "--device-state 4097" "--devices 0" "--devices 17" \
		"--mem 12K" "--dirty-rate fast" "--downtime-limit soon" "--channels -1" "--bogus" "--mem" \
		"--guest windows" "--save-latency x"; do
		# shellcheck disable=SC2086
		run 2 $args && { grep -q "vfiomig demo: " "$tmp/err" || die "$args: no message"; }
	done
	run 1 $small --uri bogus:1234 && {
		grep -q "unknown transport" "$tmp/err" || die "bogus URI: no message"; }
	# The refusal's own words (any message with "fd" in it used to pass).
	run 1 $small --uri fd:3 && {
		grep -q "cannot hand one fd to two VMs" "$tmp/err" || die "fd: URI: no message"; }
	# The destination cannot listen there: the VM's own message reaches the user.
	run 1 $small --uri tcp:192.0.2.1:1 && {
		grep -q "vm-dst" "$tmp/err" || die "bad tcp URI: the failing child is not named"; }
	run 1 $small --json --uri bogus: && python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
assert r["verified"] is False and "unknown transport" in r["error"], r' "$tmp/out" ||
		die "failed run: JSON without verified false and the error"
	check_clean
	;;
kvm)
	# The KVM guest end to end (skipped without a usable /dev/kvm): a small
	# working set, as guest code runs slowly on these machines.
	if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
		echo "SKIP: no usable /dev/kvm"; exit 77
	fi
	run 0 --mem 64M --device-state 4M --dirty-rate 2M/s --guest kvm --json && python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
g = r["guest"]
assert r["verified"] is True and g["kind"] == "kvm" and g["verified"] is True, r
for c in ["quick", "full"]:
    assert g[c]["verified"] is True and g[c]["pages_checked"] > 0, (c, g)
assert r["devices"][0]["verified"] is True, r["devices"]' "$tmp/out" || die "kvm: JSON check failed"
	run 0 --mem 64M --device-state 4M --dirty-rate 2M/s --guest kvm &&
		{ grep -q '^result: VERIFIED' "$tmp/out" && grep -q 'guest .*kvm: ok' "$tmp/out" ||
			die "kvm: no verified kvm guest in the report"; }
	check_clean
	;;
tls)
	# Throwaway credentials, every connection under TLS; both kinds.
	run 0 $small --tls x509 --channels 2 && check_report 1
	grep -q 'TLS 1.3 (x509)' "$tmp/out" || die "x509: not announced"
	run 0 $small --tls psk --json && check_json 1 tcp:127.0.0.1: 1
	python3 -c 'import json, sys; assert json.load(open(sys.argv[1]))["tls"] == "psk"' \
		"$tmp/out" || die "psk: no tls in the JSON"
	run 2 $small --tls rsa && { grep -q "expected x509 or psk" "$tmp/err" || die "--tls rsa"; }
	run 1 $small --tls psk --uri file: && { grep -q "TLS needs" "$tmp/err" || die "--tls file:"; }
	check_clean
	;;
signal)
	# A SIGINT in the middle stops every child and removes the temp dir.
	"$bin" demo --mem 64M --device-state 4M >"$tmp/out" 2>"$tmp/err" &
	pid=$!
	i=0
	while [ $i -lt 100 ] && ! ls "$tmp"/vfiomig-demo.*/vm-src.log >/dev/null 2>&1; do
		sleep 0.05; i=$((i + 1))
	done
	sleep 0.3
	kill -INT $pid
	wait $pid; got=$?
	[ "$got" = 1 ] || die "demo after SIGINT exited $got, want 1"
	grep -q "interrupted by signal" "$tmp/err" || die "no 'interrupted' message"
	check_clean
	;;
*)
	echo "unknown case $case_"; exit 2
	;;
esac
[ $fail = 0 ] && echo "PASS: $case_"
exit $fail
