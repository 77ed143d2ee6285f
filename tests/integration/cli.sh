#!/bin/sh
# The vfiomig command's exit-status contract: 0 success, 1 failure (with a
# message on stderr), 2 usage error.
# usage: cli.sh PATH_TO_VFIOMIG
set -u
bin=$1
fail=0
expect() {  # expect STATUS ARGS...
	want=$1; shift
	out=$("$bin" "$@" 2>&1); got=$?
	if [ "$got" != "$want" ]; then
		echo "FAIL: vfiomig $* exited $got, want $want"; echo "$out" | head -5; fail=1
	else
		echo "ok: vfiomig $* -> $got"
	fi
}
expect 2
expect 0 --help
expect 0 --version
expect 2 no-such-command
expect 0 demo --help
expect 0 -v demo --help
expect 0 demo --mem 64M --device-state 4M
"$bin" no-such-command 2>&1 | grep -q "unknown command 'no-such-command'" || { echo "FAIL: no message"; fail=1; }
exit $fail
