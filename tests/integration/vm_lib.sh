# Shared by the vm_*.sh tests (sourced): scaffold.sh (a temp dir named after
# $lib_name, children killed on exit, ok/bad into $fail, wait_sock), bg() with
# output into $tmp/log, and exited_ok. Expects $bin (the vfiomig binary).
. "$(dirname "$0")/scaffold.sh"
. "$(dirname "$0")/wrap-lib.sh"  # VFIOMIG_WRAP: valgrind runs
bg() { "$@" >>"$tmp/log" 2>&1 & last=$!; pids="$pids $last"; }
exited_ok() {  # exited_ok PID NAME: the process ended (after quit) with status 0
	wait "$1"; st=$?
	[ $st = 0 ] && ok "$2 exited 0" || bad "$2 exited $st"
}
