#!/bin/sh
# `make valgrind-integration`: integration scripts with every `vfiomig vm` and
# `vfiomig device` they start running under valgrind memcheck (wrap-lib.sh).
# A script that fails, or any process with a valgrind report other than a
# "possibly lost" block (an error, a definite or indirect leak), fails the
# run; possibly-lost blocks (threads alive at exit) are counted and shown.
# Logs: BUILD/valgrind-integration.
# usage: scripts/valgrind-integration.sh BUILD_DIR [SCRIPT...]
set -u
build=${1:?usage: valgrind-integration.sh BUILD_DIR [SCRIPT...]}
shift
scripts=${*:-faults_src faults_dst faults_late faults_sec vm_ctl vm_bad devtools}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "$build" && pwd)/tools/vfiomig
logs=$(cd "$build" && pwd)/valgrind-integration
scale=${VFIOMIG_TIME_SCALE:-5}
[ -x "$bin" ] || { echo "no $bin: build first" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind not installed (scripts/deps.sh)" >&2; exit 2; }
rm -rf "$logs"
mkdir -p "$logs"
# %q{VFM_VG_SCRIPT}: the log names say which script started the process.
export VFIOMIG_WRAP="valgrind -q --error-exitcode=99 --leak-check=full \
--errors-for-leak-kinds=definite,indirect --track-fds=no \
--log-file=$logs/%q{VFM_VG_SCRIPT}.%p.log"
export VFIOMIG_TIME_SCALE=$scale
# Valgrind records (blank-line separated) that are not "possibly lost" leaks.
real_reports() {
	awk '/^==[0-9]+== *$/ { if (rec != "" && rec !~ /are possibly lost/) n++; rec = ""; next }
	     { rec = rec $0 "\n" }
	     END { if (rec != "" && rec !~ /are possibly lost/) n++; print n + 0 }' "$1"
}
st=0
for s in $scripts; do
	export VFM_VG_SCRIPT=$s
	timeout -k 5 $((120 * scale)) sh "$root/tests/integration/$s.sh" "$bin" >"$logs/$s.out" 2>&1
	rc=$?
	n=$(ls "$logs" | grep -c "^$s\.[0-9]*\.log$")
	dirty=0 possibly=0 shown=0
	for f in $(find "$logs" -name "$s.*.log" -size +0); do
		if [ "$(real_reports "$f")" -gt 0 ]; then
			dirty=$((dirty + 1))
			[ $shown -lt 3 ] && head -40 "$f" && shown=$((shown + 1))
		else
			possibly=$((possibly + 1))
		fi
	done
	note=""
	[ $possibly -gt 0 ] && note=", $possibly with only possibly-lost blocks (threads alive at exit)"
	if [ $rc = 0 ] && [ "$dirty" = 0 ]; then
		echo "ok: $s ($n processes under valgrind, no errors or leaks$note)"
	else
		st=1
		echo "FAIL: $s: exit $rc, $dirty of $n processes with valgrind reports$note (logs in $logs)"
		grep '^FAIL' "$logs/$s.out" | head -10
	fi
done
exit $st
