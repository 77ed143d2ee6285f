#!/usr/bin/env bash
# Runs every libFuzzer target for SECONDS each, starting from the seed corpus
# in tests/fuzz/corpus/NAME (new inputs go to BUILD/fuzz-corpus/NAME, crashes
# to BUILD/fuzz-artifacts/). Prints each target's executions; exits 1 if any
# target found a crash.
# usage: fuzz.sh BUILD_DIR SECONDS [TARGET...]
set -uo pipefail
build=$1; secs=$2; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
	for f in "$build"/tests/fuzz/fuzz_*; do
		[ -f "$f" ] && [ -x "$f" ] || continue
		n=$(basename "$f"); n=${n#fuzz_}
		case $n in mkseeds*) ;; *) targets+=("$n") ;; esac   # seed recorders
	done
fi
mkdir -p "$build/fuzz-artifacts"
status=0
for t in "${targets[@]}"; do
	work="$build/fuzz-corpus/$t"
	mkdir -p "$work"
	log="$build/fuzz-$t.log"
	"$build/tests/fuzz/fuzz_$t" -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="$build/fuzz-artifacts/$t-" \
		"$work" "$root/tests/fuzz/corpus/$t" >"$log" 2>&1
	rc=$?
	execs=$(grep -aE '^stat::number_of_executed_units' "$log" | awk '{print $2}')
	cov=$(grep -aE '#[0-9]+.*(DONE|pulse).*cov:' "$log" | tail -n1 | sed -E 's/.*cov: ([0-9]+).*/\1/')
	if [ $rc -ne 0 ]; then
		echo "fuzz $t: FAILED after ${execs:-?} executions (see $log)"
		grep -aE 'ERROR|SUMMARY' "$log" | head -n 5
		status=1
	else
		echo "fuzz $t: ok, ${execs:-?} executions in ${secs}s, coverage ${cov:-?} edges"
	fi
done
exit $status
