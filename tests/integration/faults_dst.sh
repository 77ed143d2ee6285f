#!/bin/sh
# Fault matrix, destination and link side (docs/reliability.md): the
# destination VM or its device server killed mid-migration, its device
# failing a load write or the last load arc, a stream it rejects (memory
# size, device count), and a migration peer that closes the connection.
# The source must run on verified with its device RUNNING and `failed`; a
# source VM killed mid-stream leaves the destination ready for a new source.
# usage: faults_dst.sh PATH_TO_VFIOMIG
bin=$1
. "$(dirname "$0")/faults-lib.sh"
known_failures="${FAULTS_KNOWN:-}"

slow_migrate() {  # MIGRATE_URI: a pre-copy long enough to hit
	ctl "$c.src" set max-bandwidth=256K/s >/dev/null
	ctl "$c.src" migrate "$1" >/dev/null || bad "migrate did not start"
	wait_status "$c.src" "migration: active" 50 || bad "never active"
	sleep 0.3
}

# pre-copy: the destination VM is SIGKILLed.
start dstvm-killed "" "" "" "" && {
	slow_migrate "unix:$c.mig"
	killtree "$dst"
	expect_source_intact "$LOST"; expect_dest_clean killed
}; stop_cell

# pre-copy: the destination's device server is SIGKILLed.
start dstdev-killed "" "" "" "" && {
	slow_migrate "unix:$c.mig"
	killtree "$ddev"
	expect_source_intact "$DEVLOST\|$LOST"; expect_dest_clean "$DEVLOST"
}; stop_cell

# pre-copy: the destination's device fails a RESUMING write.
start write-fail "" "--fault write:2" "" "" && {
	one_shot_fault "MIG_DATA_WRITE failed\|$LOST" "device refused migration data: .*MIG_DATA_WRITE failed"
}; stop_cell

# config / load end: the destination's device refuses RESUMING -> STOP.
start arc-resume "" "--fault arc:RESUMING>STOP" "" "" && {
	one_shot_fault "device rejected the loaded state\|$LOST" "device rejected the loaded state"
}; stop_cell

# pre-copy: the source VM is SIGKILLed. The destination's device is left in
# RESUMING with part of a stream: the destination stays up, puts it back in
# RUNNING (lib/migration/vfio.c vfm__vfio_load_recover()) and says so, and a
# new source (its own device server and VM) migrates into the same destination.
start srcvm-killed "" "" "" "" && {
	slow_migrate "unix:$c.mig"
	killtree "$src"; wait "$src" 2>/dev/null
	expect_dest_clean "$LOST"
	wait_log "incoming migration refused: device was in RESUMING; .*RUNNING, ready for the next attempt" \
		&& ok "destination says it put its device back in RUNNING" \
		|| bad "no recovery line: $(grep 'incoming\|dev0' "$tmp/$cell.log" | tail -3)"
	ctl "$c.dst" status | grep -q "^device dev0 (vfio-user): RUNNING" && ok "destination device RUNNING" \
		|| bad "destination device: $(ctl "$c.dst" status | grep '^device')"
	killtree "$sdev"; wait "$sdev" 2>/dev/null
	rm -f "$c.sd" "$c.src"
	bg timeout -k 5 $life "$bin" device dma --socket "$c.sd" --state-size 4M --churn 1M/s
	sdev=$last
	wait_sock "$c.sd" || bad "new source device did not start"
	bg timeout -k 5 $life "$bin" vm --mem 16M --device "vfio-user:$c.sd" --dirty-rate 4M/s \
		--control "$c.src"
	src=$last
	wait_sock "$c.src" || bad "new source VM did not start"
	i=0
	while ctl "$c.src" status --json | grep -q '"dma_ops":0[,}]'; do
		i=$((i + 1)); [ $i -gt $((100 * tscale)) ] && { bad "no guest DMA"; break; }; sleep 0.1
	done
	expect_retry_ok
}; stop_cell

# setup: the destination has twice the memory: it rejects the stream.
start mem-mismatch "" "" "" "--mem 32M" && {
	ctl "$c.src" migrate "unix:$c.mig" --wait >/dev/null 2>&1
	expect_source_intact "source region 0 is\|$LOST"
	expect_dest_clean "ram: source region 0 is 0x0+0x1000000, ours 0x0+0x2000000"
}; stop_cell

# setup: the migration connection closes (a peer that reads a little, hangs up).
start conn-closed "" "" "" "" && {
	timeout -k 5 30 python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
c, _ = s.accept(); c.recv(4096); c.close()' "$c.peer" &
	peer=$!
	wait_sock "$c.peer" || bad "peer did not listen"
	ctl "$c.src" migrate "unix:$c.peer" --wait >/dev/null 2>&1
	wait "$peer"
	expect_source_intact "$LOST"
}; stop_cell

finish
