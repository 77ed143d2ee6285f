#!/bin/sh
# Runs inside the guest of run-in-guest.sh (--mdevs 4): every tests/kernel
# test in order, each bounded, one 'PASS name' / 'FAIL name' line each (their
# output indented), then 'kernel suite (PATH): N passed, N failed'.
# usage: suite.sh VFIOMIG [TEST...]
bin=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
path=type1; [ -e /dev/iommu ] && path=iommufd
tests=${*:-info check save_load live refused_load pci}
pass=0 failed=0
for t in $tests; do
	start=$(date +%s)
	timeout -k 10 600 sh "$here/$t.sh" "$bin" >/tmp/kvfio-suite.out 2>&1; rc=$?
	sed 's/^/    /' /tmp/kvfio-suite.out
	if [ $rc = 0 ]; then
		pass=$((pass + 1)); echo "PASS $t ($path, $(( $(date +%s) - start )) s)"
	else
		failed=$((failed + 1)); echo "FAIL $t ($path, rc $rc, $(( $(date +%s) - start )) s)"
	fi
done
echo "kernel suite ($path): $pass passed, $failed failed"
[ $failed = 0 ]
