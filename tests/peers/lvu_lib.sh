# Sourced by the interop tests (tests/peers/*.sh): a temp dir, children
# started with bg() and killed on exit, ok/bad reporting into $fail, bounded
# waits. Expects $bin (vfiomig) and $lvu (the libvfio-user test device).
lib_name=lvu
. "$(dirname "$0")/../integration/scaffold.sh"
bg() {  # bg LOG CMD...: in the background, output to $tmp/LOG
	log=$1; shift
	"$@" >>"$tmp/$log" 2>&1 & last=$!; pids="$pids $last"
}
wait_grep() {  # wait_grep FILE PATTERN [TENTHS]: until FILE has PATTERN (default 10 s)
	i=0
	while ! grep -q "$2" "$1" 2>/dev/null; do
		i=$((i + 1)); [ $i -gt "${3:-100}" ] && return 1; sleep 0.1
	done
}
ctl() { timeout -k 5 30 "$bin" ctl "$@"; }
wait_status() {  # wait_status SOCKET PATTERN: until `ctl status` matches (20 s)
	i=0
	while ! ctl "$1" status 2>/dev/null | grep -q "$2"; do
		i=$((i + 1)); [ $i -gt 200 ] && return 1; sleep 0.1
	done
}
digest_of() {  # digest_of LOG WHAT: the last "lvu-device: WHAT digest D counter N"
	sed -n "s/^lvu-device: $2 digest \([0-9a-f]*\) counter \([0-9]*\)$/\1 \2/p" "$tmp/$1" | tail -1
}
