# Shared by the vm_*.sh tests (sourced): a temp dir named after $lib_name,
# children started with bg() and killed on exit, ok/bad reporting into $fail,
# and waits for sockets and exits. Expects $bin (the vfiomig binary).
tmp=$(mktemp -d "/tmp/vfm-$lib_name-XXXXXX")
. "$(dirname "$0")/wrap-lib.sh"  # VFIOMIG_WRAP: valgrind runs
pids=""
fail=0
cleanup() {
	for p in $pids; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
ok() { echo "ok: $*"; }
bad() { echo "FAIL: $*"; fail=1; }
bg() { "$@" >>"$tmp/log" 2>&1 & last=$!; pids="$pids $last"; }
exited_ok() {  # exited_ok PID NAME: the process ended (after quit) with status 0
	wait "$1"; st=$?
	[ $st = 0 ] && ok "$2 exited 0" || bad "$2 exited $st"
}
wait_sock() {  # wait_sock PATH: up to 10 s for a socket file
	i=0
	while [ ! -S "$1" ]; do
		i=$((i + 1)); [ $i -gt 200 ] && return 1; sleep 0.05
	done
}
