#!/bin/sh
# `vfiomig vm` and `vfiomig ctl` on bad input (exit 2 for usage, 1 with a
# clear message for failures), a device that refuses migration, a migration
# to nowhere that leaves the source running, and `--guest none` with a device
# the VM does not drive, migrated and checked on both sides.
# usage: vm_bad.sh PATH_TO_VFIOMIG
set -u
bin=$1
lib_name=vmbad
. "$(dirname "$0")/vm_lib.sh"
ctl() { timeout -k 5 20 "$bin" ctl "$@"; }
expect() {  # expect STATUS MESSAGE_PATTERN ARGS...: exit status and stderr
	want=$1; pat=$2; shift 2
	out=$(timeout -k 5 20 "$bin" "$@" 2>&1); got=$?
	if [ "$got" != "$want" ]; then
		bad "vfiomig $* exited $got, want $want: $(echo "$out" | head -3)"
	elif [ -n "$pat" ] && ! echo "$out" | grep -qi -- "$pat"; then
		bad "vfiomig $*: no '$pat' in: $(echo "$out" | head -3)"
	else
		ok "vfiomig $* -> $got"
	fi
}

c=$tmp/c
# Usage errors.
expect 0 "" vm --help
expect 0 "" ctl --help
expect 2 "mem SIZE is required" vm --control "$c"
expect 2 "control PATH is required" vm --mem 16M
expect 2 "guest" vm --mem 16M --guest bogus --control "$c"
expect 2 "unknown" vm --mem 16M --control "$c" --frobnicate
expect 2 "mem" vm --mem 16Q --control "$c"
expect 2 "which command" ctl "$c"
expect 2 "unknown command" ctl "$c" dance
expect 2 "unknown parameter" ctl "$c" set bogus=1
expect 2 "downtime-limit" ctl "$c" set downtime-limit=soon
expect 2 "KEY=VALUE" ctl "$c" set downtime-limit
expect 2 "URI" ctl "$c" migrate
expect 2 "working-set" vm --mem 16M --working-set 5 --control "$c"
# Failures.
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
	expect 1 "40 vCPUs (max 32)" vm --mem 16M --guest kvm --vcpus 40 --control "$c"
else
	expect 1 "guest kvm" vm --mem 16M --guest kvm --control "$c"
fi
expect 1 "cannot connect\|no such" vm --mem 16M --device "vfio-user:$tmp/nothing" --control "$c"
expect 1 "backend" vm --mem 16M --device "pci:0000:00:01.0" --control "$c"
expect 1 "unknown device property" vm --mem 16M --device "vfio-user:$tmp/x,colour=blue" --control "$c"
expect 1 "scheme\|uri" vm --mem 16M --guest none --incoming "bogus:1" --control "$c"
expect 1 "" vm --mem 16M --guest none --incoming "file:$tmp/no-such-file" --control "$c"
expect 1 "no VM control socket" ctl "$tmp/nobody" status
: >"$tmp/plain"
expect 1 "not a socket" vm --mem 16M --guest none --control "$tmp/plain"
ln -s "$tmp/elsewhere" "$tmp/link"
expect 1 "symbolic link" vm --mem 16M --guest none --control "$tmp/link"
[ ! -e "$tmp/elsewhere" ] && ok "nothing created through the symlink" || bad "symlink followed"

# A device that may not migrate, next to one that may, in a --guest none VM.
for d in d0 e0; do bg timeout -k 5 60 "$bin" device dma --socket "$tmp/$d" --state-size 1M; done
wait_sock "$tmp/d0" && wait_sock "$tmp/e0" || bad "devices did not start"
bg timeout -k 5 60 "$bin" vm --mem 16M --guest none \
	--device "vfio-user:$tmp/d0,id=blocked,enable-migration=off" --control "$tmp/nomig"
nomig_pid=$last
wait_sock "$tmp/nomig" || bad "VM with a blocked device did not start"
expect 1 "enable-migration=off" ctl "$tmp/nomig" migrate "unix:$tmp/mig"
expect 1 "in use" vm --mem 16M --guest none --control "$tmp/nomig"
expect 0 "" ctl "$tmp/nomig" quit
exited_ok $nomig_pid "VM with a blocked device"
wait_sock "$tmp/d0" || bad "device d0 gone"

# --guest none, a device it knows nothing about: migrate and compare.
bg timeout -k 5 60 "$bin" vm --mem 16M --guest none --device "vfio-user:$tmp/d0" --control "$tmp/src"
src_pid=$last
bg timeout -k 5 60 "$bin" vm --mem 16M --guest none --device "vfio-user:$tmp/e0" \
	--incoming "tcp:127.0.0.1:0" --control "$tmp/dst"
dst_pid=$last
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp/log"; exit 1; }
# Port 0: the bound port is in the status once the control socket is up.
uri=$(ctl "$tmp/dst" status | sed -n 's/^vm: inmigrate (incoming \(tcp:127.0.0.1:[0-9]*\))$/\1/p')
case $uri in tcp:127.0.0.1:0 | "") bad "no bound port: '$uri'" ;; *) ok "listening on $uri" ;; esac
expect 1 "scheme\|uri" ctl "$tmp/src" migrate "bogus:1"
expect 1 "port" ctl "$tmp/src" migrate "tcp:127.0.0.1:99999"
expect 1 "waiting for an incoming" ctl "$tmp/dst" migrate "unix:$tmp/x"
expect 1 "not arrived" ctl "$tmp/dst" cont
# Nobody listens there: the migration fails, the source runs on.
expect 1 "failed" ctl "$tmp/src" migrate "unix:$tmp/nobody-listens" --wait
ctl "$tmp/src" status | grep -q "^vm: running" && ok "source runs after a failed migration" \
	|| bad "source after a failed migration: $(ctl "$tmp/src" status)"
expect 0 "" ctl "$tmp/src" stop
ctl "$tmp/src" status | grep -q "^vm: paused" && ok "stop pauses" || bad "stop"
expect 0 "" ctl "$tmp/src" cont
expect 0 "completed" ctl "$tmp/src" migrate "$uri" --wait
src_sum=$(ctl "$tmp/src" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
dst_sum=$(ctl "$tmp/dst" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
[ -n "$src_sum" ] && [ "$src_sum" = "$dst_sum" ] && ok "checksums equal ($src_sum)" \
	|| bad "checksums '$src_sum' vs '$dst_sum'"
# The none guest's "verified" is a constant (nothing to verify): check what
# the migration did instead: the destination's guest was started by it, and
# the report claims no pages checked.
ctl "$tmp/dst" status --json | python3 -c '
import json, sys
g = json.load(sys.stdin)["guest"]
assert g["kind"] == "none" and g["running"] is True and g["pages_checked"] == 0, g' \
	&& ok "none guest running on the destination, nothing claimed checked" \
	|| bad "guest none: $(ctl "$tmp/dst" status --json)"
ctl "$tmp/dst" status | grep -q "^vm: running" && ok "destination runs" || bad "destination state"
expect 1 "already migrated\|migrated out" ctl "$tmp/src" migrate "unix:$tmp/mig"
ctl "$tmp/src" quit || bad "source quit"
exited_ok $src_pid "source VM"

# The destination migrates on, into a file; a third VM loads it and runs.
expect 0 "completed" ctl "$tmp/dst" migrate "file:$tmp/image" --wait
dst_sum=$(ctl "$tmp/dst" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
ctl "$tmp/dst" status | grep -q "^vm: postmigrate" && ok "postmigrate after file:" \
	|| bad "after file: $(ctl "$tmp/dst" status)"
ctl "$tmp/dst" quit || bad "destination quit"
exited_ok $dst_pid "destination VM"
bg timeout -k 5 60 "$bin" vm --mem 16M --guest none --device "vfio-user:$tmp/d0" \
	--incoming "file:$tmp/image" --control "$tmp/third"
third_pid=$last
wait_sock "$tmp/third" || bad "VM loading the file did not start"
i=0
until ctl "$tmp/third" status | grep -q "^vm: running"; do
	i=$((i + 1)); [ $i -gt 100 ] && { bad "file: load: $(ctl "$tmp/third" status)"; break; }
	sleep 0.1
done
third_sum=$(ctl "$tmp/third" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
[ -n "$dst_sum" ] && [ "$dst_sum" = "$third_sum" ] && ok "file: checksums equal" \
	|| bad "file: checksums '$dst_sum' vs '$third_sum'"
ctl "$tmp/third" quit || bad "third quit"
exited_ok $third_pid "VM loaded from a file"
grep -q "Sanitizer\|runtime error" "$tmp/log" && bad "sanitizer reports in the log"
[ $fail = 0 ] || { echo "--- log"; tail -30 "$tmp/log"; }
exit $fail
