#!/bin/sh
# The device tools on the vfio: backend, run by the test build of vfiomig
# whose kernel is the in-process fake (VFM_FAKE_KVFIO configures it): info,
# check on several driver flavours, save -> load, refused files.
# usage: devtools_kvfio.sh PATH_TO_VFIOMIG_FAKEKVFIO
set -u
bin=$1
dev=vfio:/dev/vfio/devices/vfio0
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vfiomig-devtools-kvfio.XXXXXX") || exit 1
pid=""
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$tmp"' EXIT
fail=0
die() { echo "FAIL: $*"; fail=1; }

# expect STATUS FAKE_CONFIG ARGS...
expect() {
	want=$1; cfg=$2; shift 2
	VFM_FAKE_KVFIO=$cfg "$bin" "$@" >"$tmp/out" 2>"$tmp/err"; got=$?
	if [ "$got" != "$want" ]; then
		die "[$cfg] vfiomig $* exited $got, want $want"
		grep -v '^pass' "$tmp/out" | tail -8 | sed 's/^/  out: /'
		tail -5 "$tmp/err" | sed 's/^/  err: /'
		return 1
	fi
	echo "ok: [$cfg] vfiomig $* -> $got"
}

expect 0 seed=1 info "$dev"
grep -q 'IOMMU: iommufd+dirty-hwpt, dirty tracking yes' "$tmp/out" || die "info: iommu line"
grep -q 'identity: PCI 1af4:1041' "$tmp/out" || die "info: identity"
expect 0 hw_dirty=0 info --json "$dev"
python3 - "$tmp/out" <<'EOF' || die "info --json"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["backend"] == "vfio" and j["iommu"]["kind"] == "iommufd", j
assert j["iommu"]["dirty_tracking"] is False and "offers none" in j["iommu"]["dirty_tracking_why"], j
assert j["migration"]["flags"] == ["STOP_COPY", "P2P", "PRE_COPY"]
assert [i["name"] for i in j["irqs"]] == ["INTX", "MSI", "ERR", "REQ"], j["irqs"]
EOF
expect 0 flags=0 info "$dev"
grep -q '^migration: not supported' "$tmp/out" || die "info: no migration"

# check on driver flavours: mlx5-like, hisi_acc (no P2P), pds (no pre-copy),
# mtty (0 at the end of pre-copy data), non-blocking data fds, no logging.
for cfg in seed=1 info_produces=1 flags=5 flags=3 flags=1 zero_end=1 nonblocking=1,chunk=3000 \
	   logging=0 no_data_size=1; do
	expect 0 "$cfg" check --unsafe-load-corrupt-streams "$dev"
	grep -q ' 0 failed' "$tmp/out" || die "[$cfg] check summary"
done
# mtty's logging stub answers a report after stop: a warning (vfio.h wants
# an error; no migration asks it), exit 0; --strict fails it.
expect 0 log_report_when_off=1 check "$dev"
grep -q '^warn  DMA logging: report after stop refused: it succeeded' "$tmp/out" \
	&& grep -q ' 0 failed, [0-9]* skipped, 1 warned$' "$tmp/out" || die "mtty stub: warn line"
expect 1 log_report_when_off=1 check --strict "$dev"
grep -q '^FAIL  DMA logging: report after stop refused: it succeeded' "$tmp/out" || die "--strict"
expect 0 log_report_when_off=1 check --json "$dev"
python3 - "$tmp/out" <<'EOF' || die "check --json warned"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["ok"] and j["failed"] == 0 and j["warned"] == 1, j
assert [c["name"] for c in j["checks"] if c["result"] == "warn"] == \
	["DMA logging: report after stop refused"], j
EOF
expect 0 seed=1 check "$dev"
grep -q ' 0 warned$' "$tmp/out" || die "a conforming fake warned"
expect 1 flags=0 check "$dev"
expect 1 flags=0 save "$dev" "$tmp/x.state"

# save on one fake, load on another with different contents (the fake checks
# the stream's own checksum of the state at RESUMING -> STOP).
expect 0 seed=1 save "$dev" "$tmp/one.state"
expect 0 seed=2 load "$dev" "$tmp/one.state"
expect 0 seed=2,nonblocking=1 load "$dev" "$tmp/one.state"
# Another kind of device: refused from the header, before RESUMING.
expect 1 seed=2,vendor=0x15b3 load "$dev" "$tmp/one.state"
grep -q 'holds the state of a PCI 1af4:1041' "$tmp/err" || die "foreign device message"
# Same kind, other state size: the driver itself refuses at RESUMING -> STOP.
expect 1 seed=2,state=128K load "$dev" "$tmp/one.state"
grep -q 'rejected the state' "$tmp/err" || die "driver refusal message"
# A PCI address needs sysfs: the message says what is missing.
expect 1 seed=1 info vfio:0000:01:00.0
grep -q 'no PCI device 0000:01:00.0' "$tmp/err" || die "bdf message"

# Dirty tracking of a kernel device in a VM's migration (to a file): device
# logging whose report fails falls back to the IOMMU's; with neither,
# enable-migration=auto refuses with both reasons and =on migrates anyway.
# migrate_file CFG DEVICE_PROPS: vm + ctl migrate file: --wait, output in $tmp/mig
migrate_file() {
	rm -f "$tmp/vm.sock" "$tmp/vm.state"
	VFM_FAKE_KVFIO=$1 timeout -k 5 30 "$bin" vm --mem 16M --guest none \
		--device "$dev$2" --control "$tmp/vm.sock" -v >"$tmp/vm.log" 2>&1 &
	vpid=$!
	i=0
	while [ ! -S "$tmp/vm.sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	timeout -k 5 30 "$bin" ctl "$tmp/vm.sock" migrate "file:$tmp/vm.state" --wait >"$tmp/mig" 2>&1
	mrc=$?
	timeout -k 5 10 "$bin" ctl "$tmp/vm.sock" quit >/dev/null 2>&1
	wait $vpid
	return $mrc
}
migrate_file seed=1,hw_dirty=0,logging=0 "" && die "untracked device migrated with auto"
grep -q 'nothing tracks its DMA, refused with enable-migration=auto' "$tmp/mig" &&
	grep -q 'device: the device has no DMA logging; IOMMU: the IOMMU cannot track' "$tmp/mig" \
	&& echo "ok: auto refuses an untracked kernel device" || { die "auto refusal"; cat "$tmp/mig"; }
migrate_file seed=1,hw_dirty=0,logging=0 ",enable-migration=on" \
	&& grep -q 'all memory counts as dirty' "$tmp/vm.log" \
	&& echo "ok: enable-migration=on migrates it, all dirty" || { die "=on"; cat "$tmp/mig"; }
migrate_file seed=1 "" && grep -q 'dirty tracking: device DMA logging' "$tmp/vm.log" \
	&& echo "ok: device DMA logging used" || { die "logging"; cat "$tmp/mig" "$tmp/vm.log"; }
migrate_file seed=1,logging=0 "" && grep -q 'dirty tracking: IOMMU (iommufd+dirty-hwpt' "$tmp/vm.log" \
	&& echo "ok: IOMMU tracking without device logging" || { die "iommu"; cat "$tmp/mig" "$tmp/vm.log"; }
# Debian's 6.12: START accepted, every REPORT EOPNOTSUPP; info says so too.
migrate_file seed=1,log_report_unsupported=1 "" &&
	grep -q 'dirty tracking: IOMMU (iommufd+dirty-hwpt; DMA logging report: .*Operation not supported' \
	"$tmp/vm.log" && ! grep -q 'all memory' "$tmp/vm.log" \
	&& echo "ok: a failing DMA logging report falls back to the IOMMU" || { die "fallback"; cat "$tmp/vm.log"; }
expect 0 seed=1,log_report_unsupported=1 info "$dev"
grep -q '^DMA logging: no (report: .*Operation not supported)' "$tmp/out" || die "info: logging that cannot report"

# A driver stuck in a pre-copy read (its data fd never readable): cancel ends
# the migration within a few poll slices, not at the 5 s data-fd timeout, and
# the device is back in RUNNING; the fd was made O_NONBLOCK (-vvv traces it).
rm -f "$tmp/vm.sock"
VFM_FAKE_KVFIO=seed=1,stall_ms=4294967295 timeout -k 5 30 "$bin" vm --mem 16M --guest none \
	--device "$dev" --control "$tmp/vm.sock" -vvv >"$tmp/vm.log" 2>&1 &
vpid=$!
i=0
while [ ! -S "$tmp/vm.sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ctlq() { timeout -k 5 10 "$bin" ctl "$tmp/vm.sock" "$@"; }
ctlq migrate "file:$tmp/vm.state" >"$tmp/mig" 2>&1 || die "stuck: migrate did not start"
i=0
while ! ctlq status 2>/dev/null | grep -q '^device dev0 (vfio): PRE_COPY' && [ $i -lt 50 ]; do
	sleep 0.1; i=$((i + 1))
done
sleep 0.3   # the read is waiting now
t0=$(date +%s%N)
ctlq cancel >/dev/null 2>&1 || die "stuck: cancel"
i=0
while ! ctlq status 2>/dev/null | grep -q '^migration: cancelled' && [ $i -lt 100 ]; do
	sleep 0.05; i=$((i + 1))
done
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
ctlq status >"$tmp/st" 2>&1
if grep -q '^migration: cancelled' "$tmp/st" &&
	grep -q 'cancelled while waiting for the data fd' "$tmp/st" &&
	grep -q '^device dev0 (vfio): RUNNING' "$tmp/st" && [ $ms -lt 3000 ]; then
	echo "ok: a read stuck in the driver ends on cancel (${ms} ms), device RUNNING"
else
	die "stuck read not cancelled promptly (${ms} ms)"; cat "$tmp/st"
fi
ctlq quit >/dev/null 2>&1
wait $vpid
grep -q 'data fd [0-9]* (non-blocking)' "$tmp/vm.log" || die "the data fd was not made non-blocking"

# Across backends: a state from this fake device into a dma server is refused.
"$bin" device dma --socket "$tmp/d.sock" --state-size 4M >"$tmp/d.log" 2>&1 &
pid=$!
i=0
while [ ! -S "$tmp/d.sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
expect 1 seed=1 load "vfio-user:$tmp/d.sock" "$tmp/one.state"
grep -q 'holds the state of a PCI 1af4:1041.* is a PCI 1b36:11f0' "$tmp/err" ||
	die "cross-backend message"
exit $fail
