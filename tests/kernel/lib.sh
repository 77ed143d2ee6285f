# Shared by the tests/kernel/*.sh tests (sourced), which run inside the guest
# of run-in-guest.sh: $KVFIO_MDEVS (mtty-2 mdev UUIDs), $KVFIO_GROUPS (their
# IOMMU groups), $KVFIO_RUN. Expects $bin (the vfiomig binary). Everything is
# bounded by timeouts scaled for TCG (user code 10-50x slower than native).
# ok/bad report one line each; the test exits 1 if any was bad.
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d "/tmp/kvfio-$(basename "$0" .sh)-XXXXXX")
pids=""
fail=0
cleanup() {
	for p in $pids; do kill "$p" 2>/dev/null; done
	sleep 1
	for p in $pids; do kill -9 "$p" 2>/dev/null; done
	wait 2>/dev/null
	# Logs of a failed test stay in the run directory (kept by the rig on failure).
	if [ $fail != 0 ] && [ -n "${KVFIO_RUN:-}" ]; then
		for f in "$tmp"/log "$tmp"/*log "$tmp"/err "$tmp"/out; do
			[ -f "$f" ] && cp "$f" "$KVFIO_RUN/$(basename "$0" .sh)-$(basename "$f")"
		done
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
ok() { echo "ok: $*"; }
bad() { echo "FAIL: $*"; fail=1; }
# Progress, also into the run directory: a test killed by its timeout loses its output.
note() { echo "  $(date +%T) $*"; [ -n "${KVFIO_RUN:-}" ] && echo "$(date +%T) $(basename "$0"): $*" >>"$KVFIO_RUN/progress"; }
finish() { exit $fail; }
bg() { "$@" >>"$tmp/log" 2>&1 & last=$!; pids="$pids $last"; }
mdev() { echo $KVFIO_MDEVS | cut -d' ' -f"$1"; }    # mdev N: the Nth UUID
group() { echo $KVFIO_GROUPS | cut -d' ' -f"$1"; }  # group N: its IOMMU group
vfm() { timeout -k 5 120 "$bin" "$@"; }
ctl() { timeout -k 5 60 "$bin" ctl "$@"; }
# fifo N write TEXT | read COUNT [PORT] | clear [PORT]: the mdev's UART FIFO
# through the group path. mtty's ring holds 15 bytes; more wedge it "full"
# and empty-looking until cleared, so tests clear before they write (put).
fifo() { n=$1; shift; timeout -k 5 60 python3 "$here/mtty_fifo.py" "$(group "$n")" "$(mdev "$n")" "$@"; }
put() { fifo "$1" clear ${3:-} >/dev/null && fifo "$1" write "$2" ${3:-} >/dev/null; }  # put N TEXT [PORT]
wait_sock() {  # wait_sock PATH: up to 60 s for a socket file
	i=0
	while [ ! -S "$1" ]; do
		i=$((i + 1)); [ $i -gt 600 ] && return 1; sleep 0.1
	done
}
wait_status() {  # wait_status SOCKET PATTERN: until `ctl status` matches (90 s; a failed migration ends it)
	end=$(( $(date +%s) + 90 ))
	while [ "$(date +%s)" -lt $end ]; do
		ctl "$1" status >"$tmp/ws" 2>&1
		grep -q "$2" "$tmp/ws" && return 0
		if echo "$2" | grep -qv failed && grep -q 'migration: failed' "$tmp/ws"; then
			cat "$tmp/ws"; return 1
		fi
		sleep 0.5
	done
	cat "$tmp/ws"; return 1
}
no_oops() {  # no_oops WHAT: the guest kernel log has no BUG/Oops
	if dmesg | grep -qE 'BUG:|Oops|general protection|UBSAN|KASAN'; then
		bad "$1: the guest kernel log has a BUG"; dmesg | grep -E -A5 'BUG:|Oops' | head -20
	else
		ok "$1: guest kernel log free of BUG:"
	fi
}
