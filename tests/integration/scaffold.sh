# Sourced by the shell tests' libraries (vm_lib.sh, tests/peers/lvu_lib.sh) and
# by demo-session.sh: a temp dir named after $lib_name, children recorded in
# $pids and killed on exit, ok/bad reporting into $fail, and a bounded wait for
# a socket file. Each caller defines its own bg() (where children's output goes).
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vfm-$lib_name-XXXXXX") || exit 1
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
wait_sock() {  # wait_sock PATH: up to 10 s for a socket file
	i=0
	while [ ! -S "$1" ]; do
		i=$((i + 1)); [ $i -gt 200 ] && return 1; sleep 0.05
	done
}
