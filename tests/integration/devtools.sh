#!/bin/sh
# vfiomig info / check / save / load against 'dma' sample device servers:
# the conformance check passes, a saved state loaded into another instance
# makes it save the same device state, bad files are refused without touching
# the device, a server dying mid-check ends the check with a report.
# usage: devtools.sh PATH_TO_VFIOMIG
set -u
bin=$1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vfiomig-devtools.XXXXXX") || exit 1
. "$(dirname "$0")/wrap-lib.sh"   # VFIOMIG_WRAP: servers and tools under valgrind
pids=""
cleanup() {
	for p in $pids; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
fail=0
die() { echo "FAIL: $*"; fail=1; }

# start NAME [ARGS...]: a dma server on $tmp/NAME.sock, waited for (bounded).
start() {
	name=$1; shift
	"$bin" device dma --socket "$tmp/$name.sock" --state-size 4M "$@" \
		>"$tmp/$name.log" 2>&1 &
	pids="$pids $!"
	eval "pid_$name=$!"
	i=0
	while [ ! -S "$tmp/$name.sock" ] && [ $i -lt $((100 * tscale)) ]; do sleep 0.1; i=$((i + 1)); done
	[ -S "$tmp/$name.sock" ] || { die "dma server $name did not start"; cat "$tmp/$name.log"; }
}

# expect STATUS ARGS...: output in $tmp/out, $tmp/err.
expect() {
	want=$1; shift
	"$bin" "$@" >"$tmp/out" 2>"$tmp/err"; got=$?
	if [ "$got" != "$want" ]; then
		die "vfiomig $* exited $got, want $want"
		tail -5 "$tmp/out" | sed 's/^/  out: /'; tail -5 "$tmp/err" | sed 's/^/  err: /'
		return 1
	fi
	echo "ok: vfiomig $* -> $got"
}

# state_csum FILE: the dma device's state checksum, the last 8 bytes of the
# stream's END record (docs/devices/dma.md), inside the save file's data.
state_csum() {
	python3 - "$1" <<'EOF'
import struct, sys
b = open(sys.argv[1], "rb").read()
assert b[:8] == b"VFMDEVS\0", "magic"
data_len = struct.unpack_from("<Q", b, 56)[0]
print("%016x" % struct.unpack_from("<Q", b, 128 + data_len - 8)[0])
EOF
}

start a
start b

# ---- usage ----
for c in info check save load; do
	expect 0 "$c" --help
	expect 2 "$c"
	expect 2 "$c" nonsense:x
done
expect 2 save "vfio-user:$tmp/a.sock"
expect 2 info --bogus "vfio-user:$tmp/a.sock"
expect 1 info "vfio-user:$tmp/nobody.sock"

# ---- info ----
expect 0 info "vfio-user:$tmp/a.sock"
grep -q '^migration: STOP_COPY|P2P|PRE_COPY' "$tmp/out" || die "info: no migration line"
grep -q 'identity: PCI 1b36:11f0' "$tmp/out" || die "info: no identity"
expect 0 info --json "vfio-user:$tmp/a.sock"
python3 - "$tmp/out" <<'EOF' || die "info --json"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["backend"] == "vfio-user" and j["pci"] and j["vendor"] == "0x1b36", j
assert j["migration"]["supported"] and j["migration"]["state"] == "RUNNING"
assert j["migration"]["flags"] == ["STOP_COPY", "P2P", "PRE_COPY"]
assert len(j["migration"]["states"]) == 7 and j["dma_logging"] is True
assert j["migration"]["stop_copy_size"] > 4 << 20
assert [r["name"] for r in j["regions"]] == ["BAR0", "BAR2", "CONFIG"]
assert [r["mmap"] for r in j["regions"]] == [False, True, False]   # BAR2: the window
EOF

# ---- check ----
expect 0 check --unsafe-load-corrupt-streams "vfio-user:$tmp/a.sock"
grep -q ' 0 failed, 0 skipped' "$tmp/out" || die "check: summary"
[ "$(grep -c '^pass  arc ' "$tmp/out")" = 40 ] || die "check: not 40 arcs"
# Without the flag no bad stream reaches the device: one skip says why.
expect 0 check "vfio-user:$tmp/a.sock"
grep -q '^skip  corrupted and truncated streams refused: .*--unsafe-load-corrupt-streams' \
	"$tmp/out" && ! grep -q 'stream refused' "$tmp/out" && grep -q ' 0 failed, 1 skipped' \
	"$tmp/out" || die "check: default mode loads bad streams"
expect 0 check --json --unsafe-load-corrupt-streams "vfio-user:$tmp/b.sock"
python3 - "$tmp/out" <<'EOF' || die "check --json"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["ok"] and j["failed"] == 0 and j["passed"] == len(j["checks"]) > 50, j
assert all(c["result"] == "pass" for c in j["checks"])
EOF

# ---- save / load ----
expect 0 save "vfio-user:$tmp/a.sock" "$tmp/a.state"
expect 0 save "vfio-user:$tmp/b.sock" "$tmp/b0.state"
ca=$(state_csum "$tmp/a.state"); cb0=$(state_csum "$tmp/b0.state")
[ "$ca" != "$cb0" ] || die "two instances start with the same state"
[ ! -e "$tmp/a.state.tmp" ] || die "temp file left"
expect 0 load "vfio-user:$tmp/b.sock" "$tmp/a.state"
expect 0 save "vfio-user:$tmp/b.sock" "$tmp/b1.state"
[ "$(state_csum "$tmp/b1.state")" = "$ca" ] || die "b after load: state differs from a's"
expect 0 info --json "vfio-user:$tmp/b.sock"
grep -q '"state":"RUNNING"' "$tmp/out" || die "b not RUNNING after load"

# A corrupt, truncated or foreign file is refused before the device is touched.
cp "$tmp/a.state" "$tmp/bad.state"
# Flip the byte (writing a fixed value would be a no-op when it is already there).
b=$(od -An -tu1 -j5000 -N1 "$tmp/bad.state" | tr -d ' ')
printf "\\$(printf %o $((b ^ 255)))" | dd of="$tmp/bad.state" bs=1 seek=5000 conv=notrunc 2>/dev/null
cmp -s "$tmp/a.state" "$tmp/bad.state" && die "corrupting the copy changed nothing"
expect 1 load "vfio-user:$tmp/b.sock" "$tmp/bad.state"
grep -q 'checksum' "$tmp/err" || die "corrupt file: no checksum message"
head -c 100000 "$tmp/a.state" >"$tmp/short.state"
expect 1 load "vfio-user:$tmp/b.sock" "$tmp/short.state"
printf 'not a state file at all, but long enough to have a header of 128 bytes %s' \
	"................................................................" >"$tmp/junk.state"
expect 1 load "vfio-user:$tmp/b.sock" "$tmp/junk.state"
grep -q 'magic' "$tmp/err" || die "junk file: no magic message"
expect 1 load "vfio-user:$tmp/b.sock" "$tmp/missing.state"
expect 0 save "vfio-user:$tmp/b.sock" "$tmp/b2.state"
[ "$(state_csum "$tmp/b2.state")" = "$ca" ] || die "a refused file changed the device"

# ---- a server that dies mid-check ----
# Killed inside the first save (20 ms per MiB of a 64 MiB state: about 1.3 s):
# what follows the save takes about 2.5 s, a window a loaded machine can miss.
start c --save-latency 20000
"$bin" check "vfio-user:$tmp/c.sock" >"$tmp/cout" 2>"$tmp/cerr" &
cpid=$!
i=0
while ! grep -q '^pass  device RUNNING at the start' "$tmp/cout" 2>/dev/null && [ $i -lt $((300 * tscale)) ]; do
	sleep 0.1; i=$((i + 1))
done
kill -9 "$pid_c"
i=0
while kill -0 "$cpid" 2>/dev/null && [ $i -lt $((600 * tscale)) ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 "$cpid" 2>/dev/null; then
	die "check still running 60 s after its server died"
	kill "$cpid"
fi
wait "$cpid"; st=$?
[ "$st" = 1 ] || die "check of a dead server exited $st, want 1"
grep -q 'checks: .* failed' "$tmp/cout" || die "no summary after the server died"
grep -q 'device went away\|not run: the device is gone' "$tmp/cout" ||
	die "the dead server is not reported as gone"
echo "ok: check of a server killed mid-check -> 1, reported"
exit $fail
