# Shared by faults_src.sh, faults_dst.sh, faults_late.sh, faults_sec.sh: one
# fault-matrix cell = a dma device and a VM per side, a fault, then every
# expectation asserted.
# Sourced; the caller sets bin and calls cell_* functions, then finish.
# VFIOMIG_WRAP / VFIOMIG_TIME_SCALE: wrap-lib.sh (valgrind runs).
set -u
tmp=$(mktemp -d /tmp/vfm-faults-XXXXXX)
. "$(dirname "$0")/wrap-lib.sh"
life=$((90 * tscale))
pids=""
fail=0
cells_failed=""
cleanup() {
	for p in $pids; do kill -9 "$p" 2>/dev/null; done
	wait 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
ok() { echo "ok: $cell: $*"; }
bad() { echo "FAIL: $cell: $*"; fail=1; case " $cells_failed " in *" $cell "*) ;; *) cells_failed="$cells_failed $cell" ;; esac; }
bg() { "$@" >>"$tmp/$cell.log" 2>&1 & last=$!; pids="$pids $last"; }
wait_sock() {
	i=0
	while [ ! -S "$1" ]; do
		i=$((i + 1)); [ $i -gt $((200 * tscale)) ] && return 1; sleep 0.05
	done
}
ctl() { timeout -k 5 $((20 * tscale)) "$bin" ctl "$@"; }
wait_status() {  # wait_status SOCKET PATTERN [TENTHS]: until `ctl status` matches
	i=0
	while ! ctl "$1" status 2>/dev/null | grep -q "$2"; do
		i=$((i + 1)); [ $i -gt $((${3:-150} * tscale)) ] && return 1; sleep 0.1
	done
}
wait_log() {  # wait_log PATTERN [TENTHS]: until the cell's log matches
	i=0
	while ! grep -q -- "$1" "$tmp/$cell.log"; do
		i=$((i + 1)); [ $i -gt $((${2:-150} * tscale)) ] && return 1; sleep 0.1
	done
}
alive() { kill -0 "$1" 2>/dev/null; }
# alive and not a zombie waiting to be reaped
running() { [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# SIGKILL a process started by bg: the program under its `timeout` first.
killtree() { kill -9 $(pgrep -P "$1") "$1" 2>/dev/null; }

# start NAME "SRC_DEV_OPTS" "DST_DEV_OPTS" "SRC_VM_OPTS" "DST_VM_OPTS" [DEVPROPS]
start() {
	cell=$1; c=$tmp/$1
	# shellcheck disable=SC2086
	bg timeout -k 5 $life "$bin" device dma --socket "$c.sd" --state-size 4M --churn 1M/s $2
	sdev=$last
	# shellcheck disable=SC2086
	bg timeout -k 5 $life "$bin" device dma --socket "$c.dd" --state-size 4M $3
	ddev=$last
	wait_sock "$c.sd" && wait_sock "$c.dd" || { bad "devices did not start"; return 1; }
	# shellcheck disable=SC2086
	bg timeout -k 5 $life "$bin" vm --mem 16M --device "vfio-user:$c.sd${6:-}" \
		--dirty-rate 4M/s --control "$c.src" $4
	src=$last
	dst_opts="$5"; dst_props="${6:-}"
	start_dst
	wait_sock "$c.src" && wait_sock "$c.dst" || { bad "VMs did not start"; return 1; }
	# The guest must have driven its device before the fault means anything.
	i=0
	while ctl "$c.src" status --json | grep -q '"dma_ops":0[,}]'; do
		i=$((i + 1)); [ $i -gt $((100 * tscale)) ] && { bad "no guest DMA"; break; }; sleep 0.1
	done
}

# The destination VM (again, after a fault killed it: the device server
# serves one client after another).
start_dst() {
	rm -f "$c.dst" "$c.mig"
	# shellcheck disable=SC2086
	bg timeout -k 5 $life "$bin" vm --mem 16M --device "vfio-user:$c.dd$dst_props" \
		$dst_opts --incoming "unix:$c.mig" --control "$c.dst"
	dst=$last
}
restart_dst() {
	wait "$dst" 2>/dev/null
	start_dst
	wait_sock "$c.dst" || bad "the new destination did not start"
}

# Before the destination resumed: the source runs on as if nothing happened.
expect_source_intact() {  # expect_source_intact ERROR_PATTERN
	wait_status "$c.src" "migration: failed" && ok "source migration failed" \
		|| bad "source status: $(ctl "$c.src" status | head -2)"
	# The reason, not just any text: a pattern that an empty error matches
	# (".", "") would check nothing.
	e=$(ctl "$c.src" status --json | grep -o '"error":"[^"]*"' | head -1 |
		sed 's/^"error":"//; s/"$//')
	if [ -z "$1" ] || printf '' | grep -q -- "$1"; then
		bad "expected error pattern '$1' matches an empty error"
	elif [ -z "$e" ]; then
		bad "source failed without an error"
	else
		echo "$e" | grep -q -- "$1" && ok "error says '$1' ($e)" || bad "error lacks '$1': '$e'"
	fi
	st=$(ctl "$c.src" status)
	echo "$st" | grep -q "^vm: running" && ok "source running" || bad "source: $(echo "$st" | head -1)"
	echo "$st" | grep -q "^device dev0 (vfio-user): RUNNING" && ok "source device RUNNING" \
		|| bad "source device: $(echo "$st" | grep '^device')"
	ctl "$c.src" verify >/dev/null && ok "source guest verified" || bad "source guest verification"
}

# The destination never ran the guest: still waiting (it re-listens on
# unix:), or gone. expect_dest_clean [killed | DEST_ERROR_RE]:
#   killed: the cell SIGKILLed the destination VM: gone by that signal;
#   DEST_ERROR_RE: the destination said why it failed ("incoming migration
#     failed: ..." matching it) and, if it is gone, it exited by itself with
#     status 1: a crash (abort, SIGSEGV: status > 128) is a failure;
#   nothing: as DEST_ERROR_RE, without checking the words of the message.
expect_dest_clean() {
	if [ "${1:-}" = killed ]; then
		if alive "$dst"; then
			bad "the killed destination still runs"
		else
			wait "$dst" 2>/dev/null; rc=$?
			[ $rc = 137 ] && ok "destination gone (SIGKILL)" || bad "killed destination: status $rc"
		fi
		return
	fi
	# Bounded wait: the destination may notice the failure after the source.
	if wait_log "\[vm\] incoming migration failed: .*${1:-}" 50; then
		ok "destination says why: '${1:-any}'"
	else
		bad "no 'incoming migration failed: ${1:-}' from the destination: $(grep '\[vm\] incoming' "$tmp/$cell.log" | tail -1)"
	fi
	if ! alive "$dst"; then
		wait "$dst" 2>/dev/null; rc=$?
		[ $rc = 1 ] && ok "destination exited 1 by itself" \
			|| bad "destination gone with status $rc (signal if > 128): not a clean exit"
		return
	fi
	st=$(ctl "$c.dst" status)
	echo "$st" | grep -q "^vm: inmigrate" && ok "destination still inmigrate" \
		|| bad "destination: $(echo "$st" | head -1)"
	echo "$st" | grep -q "guest:.*running no\|guest: synthetic, verified no\|guest: synthetic$" \
		|| ctl "$c.dst" status --json | grep -q '"running":false' && ok "destination guest never ran" \
		|| bad "destination guest ran: $(echo "$st" | grep guest)"
}

# The source can still migrate once the fault is out of the way.
expect_retry_ok() {
	ctl "$c.src" set max-bandwidth=0 >/dev/null
	i=0
	until out=$(ctl "$c.src" migrate "unix:$c.mig" --wait 2>&1); do
		i=$((i + 1))
		[ $i -lt 10 ] || break
		sleep 0.3
	done
	echo "$out" | grep -q "migration: completed" && ok "retry completed" || bad "retry: $out"
	ctl "$c.dst" verify >/dev/null && ok "destination verified after retry" || bad "destination verify"
}

# one_shot_fault ERROR_RE [DEST_ERROR_RE]: a migration that the cell's
# one-shot fault breaks: the fault fired, the source is intact (its error
# matching ERROR_RE), the destination clean (expect_dest_clean DEST_ERROR_RE),
# and a retry completes.
one_shot_fault() {
	ctl "$c.src" migrate "unix:$c.mig" --wait >/dev/null 2>&1
	fault_hit; expect_source_intact "$1"; expect_dest_clean "${2:-}"; expect_retry_ok
}

# The source's error when the destination went away or cut the connection
# before it could say why over the return path (which channel sees it first
# depends on timing: main, a multifd channel, the return path).
LOST='peer closed the connection\|closed by peer'
# A destination device server that died: what its vfio-user client says.
DEVLOST='vfio-user server at .*\(connection is down\|closed the connection\)'


fault_hit() {  # fault_hit: the injected fault really fired
	grep -q "fault injected" "$tmp/$cell.log" && ok "fault fired" || bad "the fault never fired"
}

stop_cell() {
	for p in $src $dst; do alive "$p" && ctl "$c.$([ "$p" = "$src" ] && echo src || echo dst)" quit >/dev/null 2>&1; done
	# A VM told to quit gets time to finish (cancel, join, close devices:
	# slow under valgrind) before the kill below, which would cut it short.
	for p in $src $dst; do
		i=0
		while running "$p" && [ $i -lt $((100 * tscale)) ]; do i=$((i + 1)); sleep 0.1; done
	done
	for p in $src $dst $sdev $ddev; do
		alive "$p" && kill "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	grep -q "Sanitizer\|runtime error" "$tmp/$cell.log" && bad "sanitizer reports in the log"
	if echo " $cells_failed " | grep -q " $cell "; then
		echo "--- $cell log"; tail -25 "$tmp/$cell.log"
	fi
	return 0
}

# Cells in known_failures (bugs outside this test, reported) are printed
# and do not fail the suite; any other failed cell does.
finish() {
	st=0
	for x in $cells_failed; do
		case " ${known_failures:-} " in
		*" $x "*) echo "KNOWN FAILURE: $x" ;;
		*) st=1 ;;
		esac
	done
	echo "cells failed:${cells_failed:- none}"
	exit $st
}
