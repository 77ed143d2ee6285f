#!/bin/sh
# The multiboot image of the KVM guest program (lib/guest-mb.img) boots under
# QEMU with KVM: the console (port 0xe9, QEMU's debugcon) shows the multiboot
# setup line with the command line's working set and rate, then the guest's
# own long-mode line, and no PANIC. Skips (77) without QEMU or /dev/kvm;
# in CI (CI=true, where scripts/deps.sh installs qemu-system-x86) a missing
# QEMU is a failure.
# usage: qemu_boot.sh PATH_TO_GUEST_MB_IMG
set -u
img=$1
if ! qemu=$(command -v qemu-system-x86_64); then
	[ "${CI:-}" = true ] && { echo "FAIL: no qemu-system-x86_64 in CI (scripts/deps.sh installs it)"; exit 1; }
	echo "SKIP: no qemu-system-x86_64 (scripts/deps.sh installs qemu-system-x86)"; exit 77
fi
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "SKIP: /dev/kvm not usable"; exit 77; }
tmp=$(mktemp -d /tmp/vfm-qemuboot-XXXXXX)
pid=""
cleanup() {
	[ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

"$qemu" -enable-kvm -m 64 -smp 1 -nodefaults -no-reboot -display none \
	-monitor none -serial none -kernel "$img" -append "ws=512K rate=256K" \
	-debugcon "file:$tmp/console" >"$tmp/qemu.err" 2>&1 &
pid=$!
# SeaBIOS plus the boot take ~6 s on this nested KVM; bounded at 45 s.
i=0
while ! grep -q "long mode" "$tmp/console" 2>/dev/null; do
	if ! kill -0 "$pid" 2>/dev/null; then
		echo "FAIL: qemu exited before the guest printed; stderr:"; cat "$tmp/qemu.err"
		exit 1
	fi
	i=$((i + 1))
	[ $i -gt 450 ] && { echo "FAIL: no long-mode line in 45 s"; cat "$tmp/console"; exit 1; }
	sleep 0.1
done
sleep 1      # let the guest run its loop a moment: a broken one panics at once
cat "$tmp/console"
fail=0
grep -q "^multiboot: 63 MiB RAM, working set 128 pages at [0-9]*, rate 64 pages/s, tsc [1-9][0-9]* kHz$" \
	"$tmp/console" && echo "ok: multiboot setup line (working set and rate from -append)" ||
	{ echo "FAIL: multiboot setup line"; fail=1; }
grep -q "^cpu 0: long mode, 128 of 128 working-set pages are mine$" "$tmp/console" &&
	echo "ok: guest entered long mode" || { echo "FAIL: guest long-mode line"; fail=1; }
grep -q PANIC "$tmp/console" && { echo "FAIL: guest panicked"; fail=1; }
kill -0 "$pid" 2>/dev/null && echo "ok: qemu still running" || { echo "FAIL: qemu died"; fail=1; }
exit $fail
