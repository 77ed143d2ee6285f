#!/bin/sh
# Live migration of a device built on libvfio-user (tests/peers/lvu_device.c)
# between two `vfiomig vm --guest none` processes, with pre-copy and defaults
# otherwise (docs/interop.md). MODE unix|tcp: one migration, the destination's
# device state equals the source's frozen state. MODE cancel: a migration held
# in pre-copy (a tiny bandwidth and downtime limit) is cancelled; the device is back in
# RUNNING and still changing, and a second attempt completes. MODE refused:
# the source VM is SIGKILLed in pre-copy, so the destination's load is refused
# with its device in RESUMING (libvfio-user's reset keeps that state); a new
# source then migrates into the SAME destination VM process, which must have
# put its device back where RESUMING can be entered again.
# CHANNELS: multifd-channels for the run (0: none). With channels, the
# device's stop-copy goes over them: over unix by multifd-transfer=on (what
# pre-copy leaves of it fits one read, which auto would send on main), over
# tcp by auto's own choice (the stated stop-copy size, 2 MiB, is more than a
# read).
# usage: lvu_migrate.sh VFIOMIG LVU_DEVICE LVU_CLIENT unix|tcp|cancel|refused CHANNELS
set -u
bin=$1 lvu=$2 mode=$4 channels=$5
. "$(dirname "$0")/lvu_lib.sh"

bg src-dev.log timeout -k 5 100 "$lvu" --socket "$tmp/d-src" --state-size 1048576 --tick-ms 5
srcdev_pid=$last
bg dst-dev.log timeout -k 5 100 "$lvu" --socket "$tmp/d-dst" --state-size 1048576 --tick-ms 5
wait_sock "$tmp/d-src" && wait_sock "$tmp/d-dst" || { bad "devices did not start"; cat "$tmp"/*.log; exit 1; }
case $mode in
tcp) in_uri="tcp:127.0.0.1:0" ;;
*) in_uri="unix:$tmp/mig" ;;
esac
# The device cannot report its stop-copy size: over tcp it is stated
# (stop-copy-size=), otherwise estimated from the last pre-copy round.
props=""; sc_src=estimate
[ "$mode" = tcp ] && { props=",stop-copy-size=2M"; sc_src=property; }
[ "$mode" = unix ] && [ "$channels" != 0 ] && props=",migration-multifd-transfer=on"
bg src.log timeout -k 5 100 "$bin" vm --mem 64M --guest none --device "vfio-user:$tmp/d-src$props" \
	--control "$tmp/src"
src_pid=$last
bg dst.log timeout -k 5 100 "$bin" vm --mem 64M --guest none --device "vfio-user:$tmp/d-dst" \
	--incoming "$in_uri" --control "$tmp/dst"
dst_pid=$last
wait_sock "$tmp/src" && wait_sock "$tmp/dst" || { bad "VMs did not start"; cat "$tmp"/*.log; exit 1; }
uri=$in_uri
if [ "$mode" = tcp ]; then
	# Port 0: the destination says which port it got.
	i=0
	while :; do
		uri=$(ctl "$tmp/dst" status | sed -n 's/.*incoming \(tcp:[0-9.]*:[0-9]*\).*/\1/p' | head -1)
		[ -n "$uri" ] && [ "${uri##*:}" != 0 ] && break
		i=$((i + 1)); [ $i -gt 100 ] && { bad "no tcp port: $(ctl "$tmp/dst" status)"; exit 1; }
		sleep 0.1
	done
fi
ok "destination listens on $uri"
ctl "$tmp/src" set multifd-channels="$channels" || bad "set multifd-channels=$channels"

if [ "$mode" = cancel ]; then
	# Held in pre-copy: the device's 1 MiB of initial data needs 16 s at
	# 64 KiB/s, and 1 ms of downtime fits 64 bytes.
	ctl "$tmp/src" set downtime-limit=1 max-bandwidth=64K/s || bad "set downtime-limit=1"
	ctl "$tmp/src" migrate "$uri" && ok "migrate started" || bad "migrate did not start"
	wait_grep "$tmp/src-dev.log" "state running -> pre-copy" && ok "device in pre-copy" \
		|| bad "device never entered pre-copy"
	sleep 0.5
	ctl "$tmp/src" cancel && ok "cancel accepted" || bad "cancel"
	wait_status "$tmp/src" "migration: cancelled" && ok "migration cancelled" || bad "not cancelled"
	wait_grep "$tmp/src-dev.log" "state pre-copy -> running" && ok "device back in RUNNING" \
		|| bad "device not back in RUNNING: $(grep state "$tmp/src-dev.log" | tail -3)"
	ctl "$tmp/src" status | grep -q "^vm: running" && ok "source VM running" || bad "source not running"
	grep -q "stop-copy" "$tmp/src-dev.log" && bad "the device saw STOP_COPY before the cancel"
	wait_status "$tmp/dst" "migration: failed" || bad "destination did not see the attempt fail"
	ctl "$tmp/src" set downtime-limit=300 max-bandwidth=0 || bad "set back"
fi

if [ "$mode" = refused ]; then
	# Held in pre-copy as for cancel, then the source dies mid-stream.
	ctl "$tmp/src" set downtime-limit=1 max-bandwidth=64K/s || bad "set downtime-limit=1"
	ctl "$tmp/src" migrate "$uri" && ok "migrate started" || bad "migrate did not start"
	wait_grep "$tmp/dst-dev.log" "stop -> resume" && ok "destination device in RESUMING" \
		|| bad "destination device never entered RESUMING"
	wait_grep "$tmp/src-dev.log" "state running -> pre-copy" || bad "device never entered pre-copy"
	sleep 1
	# $src_pid is timeout(1): SIGKILL the VM under it, so its sockets close at once.
	kill -9 $(pgrep -P $src_pid) $src_pid; wait $src_pid 2>/dev/null
	ok "source VM killed in pre-copy"
	wait_status "$tmp/dst" "migration: failed" && ok "destination: the load was refused" \
		|| bad "destination did not see the attempt fail: $(ctl "$tmp/dst" status)"
	ctl "$tmp/dst" status | grep -q "^vm: inmigrate" \
		&& ok "destination waits for another attempt" || bad "destination: $(ctl "$tmp/dst" status)"
	grep -q "state resume -> stop" "$tmp/dst-dev.log" && grep -q "state stop -> running" "$tmp/dst-dev.log" \
		&& ok "destination device left RESUMING (RESUME -> STOP -> RUNNING)" \
		|| bad "destination device still in RESUMING: $(grep state "$tmp/dst-dev.log" | tr '\n' ' ')"
	line=$(grep "incoming migration refused: device was in RESUMING; .*RUNNING, ready for the next attempt" \
		"$tmp/dst.log") && ok "the destination says what it did with its device: $line" \
		|| bad "no log line on the device's recovery: $(cat "$tmp/dst.log")"
	# A new source (a fresh device and VM) for the second attempt.
	kill $srcdev_pid 2>/dev/null; wait $srcdev_pid 2>/dev/null
	mv "$tmp/src-dev.log" "$tmp/src1-dev.log"; mv "$tmp/src.log" "$tmp/src1.log"
	rm -f "$tmp/src" "$tmp/d-src"
	bg src-dev.log timeout -k 5 100 "$lvu" --socket "$tmp/d-src" --state-size 1048576 --tick-ms 5
	wait_sock "$tmp/d-src" || bad "second source device did not start"
	bg src.log timeout -k 5 100 "$bin" vm --mem 64M --guest none --device "vfio-user:$tmp/d-src" \
		--control "$tmp/src"
	src_pid=$last
	wait_sock "$tmp/src" || bad "second source VM did not start"
	ctl "$tmp/src" set multifd-channels="$channels" || bad "set multifd-channels=$channels"
fi

i=0
until out=$(ctl "$tmp/src" migrate "$uri" --wait 2>&1); do
	# After a failed attempt the destination re-listens; a connect may beat it.
	i=$((i + 1))
	echo "$out" | grep -qi "connect" && [ $i -lt 10 ] || { bad "migrate --wait: $out"; break; }
	sleep 0.3
done
echo "$out" | grep -q "migration: completed" && ok "migration completed" || bad "not completed: $out"
ctl "$tmp/dst" status | grep -q "^vm: running" && ok "destination running" \
	|| bad "destination: $(ctl "$tmp/dst" status)"
json=$(ctl "$tmp/src" status --json)
echo "$json" | grep -q "\"multifd_channels\":$channels," && ok "$channels multifd channels used" \
	|| bad "multifd_channels is not $channels: $json"
mf_dev=$(echo "$json" | sed -n 's/.*"multifd_device_bytes":\([0-9]*\).*/\1/p')
if [ "$channels" = 0 ]; then
	[ "$mf_dev" = 0 ] && ok "no device bytes on channels" || bad "multifd_device_bytes '$mf_dev' without channels"
else
	[ -n "$mf_dev" ] && [ "$mf_dev" -gt 0 ] && ok "device stop-copy over the channels: $mf_dev bytes" \
		|| bad "multifd_device_bytes '$mf_dev' with $channels channels: $json"
fi
grep -q "state running -> pre-copy" "$tmp/src-dev.log" && grep -q "state pre-copy -> stop-copy" "$tmp/src-dev.log" \
	&& ok "pre-copy in use: RUNNING -> PRE_COPY -> STOP_COPY" \
	|| bad "no pre-copy: $(grep state "$tmp/src-dev.log" | tr '\n' ' ')"
echo "$json" | grep -q "\"stop_copy_size_source\":\"$sc_src\"" && ok "query-migrate: stop-copy size source $sc_src" \
	|| bad "stop_copy_size_source is not $sc_src: $json"
[ "$mode" = tcp ] && { echo "$json" | grep -q '"stop_copy_size":2097152' && ok "stop-copy-size=2M used" \
	|| bad "stop_copy_size not 2M: $json"; }
grep -q "cannot report its stop-copy size" "$tmp/src.log" && [ "$sc_src" = estimate ] \
	&& ok "the estimate is logged" || [ "$sc_src" != estimate ] || bad "no log line about the estimate"
frozen=$(digest_of src-dev.log frozen)
loaded=$(digest_of dst-dev.log loaded)
[ -n "$frozen" ] && [ "$frozen" = "$loaded" ] && ok "destination state equals the source's: $frozen" \
	|| bad "state: source frozen '$frozen', destination loaded '$loaded'"
case $frozen in *" 0") bad "the device never ran before the migration" ;; esac
grep -q "state resume -> stop" "$tmp/dst-dev.log" && grep -q "state stop -> running" "$tmp/dst-dev.log" \
	&& ok "destination device RESUME -> STOP -> RUNNING" || bad "destination device states: $(grep state "$tmp/dst-dev.log")"
ctl "$tmp/src" quit && ok "source quit" || bad "source quit"
ctl "$tmp/dst" quit && ok "destination quit" || bad "destination quit"
wait $src_pid; st=$?; [ $st = 0 ] && ok "source VM exited 0" || bad "source VM exited $st"
wait $dst_pid; st=$?; [ $st = 0 ] && ok "destination VM exited 0" || bad "destination VM exited $st"
grep -q "Sanitizer\|runtime error" "$tmp"/*.log && bad "sanitizer reports in the logs"
[ $fail = 0 ] || for f in "$tmp"/*.log; do echo "--- $f"; tail -30 "$f"; done
exit $fail
