#!/bin/sh
# Fault matrix, source side (docs/reliability.md): the source's device fails
# an arc, a read, stalls past the vfio-user timeout, misreports its sizes, or
# its server dies. Before the destination resumed, the source must run on
# verified with its device RUNNING, its migration `failed` with the reason,
# and the destination must not have run the guest.
# usage: faults_src.sh PATH_TO_VFIOMIG
bin=$1
. "$(dirname "$0")/faults-lib.sh"
known_failures="${FAULTS_KNOWN:-}"

# setup: the first arc of the save fails.
start arc-setup "--fault arc:RUNNING>PRE_COPY" "" "" "" && {
	out=$(ctl "$c.src" migrate "unix:$c.mig" --wait 2>&1)
	echo "$out" | grep -q "failed" && ok "migrate reports failure" || bad "migrate: $out"
	fault_hit; expect_source_intact "PRE_COPY"; expect_dest_clean; expect_retry_ok
}; stop_cell

# pre-copy: the third data read fails.
start read-precopy "--fault read:3" "" "" "" && {
	one_shot_fault "MIG_DATA_READ failed"
}; stop_cell

# stop-and-copy: entering STOP_COPY fails after the guest stopped.
start arc-stopcopy "--fault arc:PRE_COPY_P2P>STOP_COPY" "" "" "" && {
	one_shot_fault "STOP_COPY"
}; stop_cell

# pre-copy: a read stalls past the 5 s vfio-user timeout. Without the
# vfiomig_mig_shm window the device reads while the engine waits for its
# MIG_DATA_READ reply: the engine's request is the one that times out.
start stall-precopy "--fault stall:6000:3 --no-mig-shm" "" "" "" && {
	one_shot_fault "sent nothing"
}; stop_cell

# pre-copy: the stall hits the server's read-ahead (the window's default),
# after its reply went out, while the engine waits on its rate limit
# (256 KiB/s: a turn under a limit reads one 1 MiB block, then the engine
# sleeps about 4 s, so its next read waits about 2 s of the 6 s stall, not
# the 5 s timeout) rather than on the device: the
# guest's doorbell is the request that times out (about 30 a second: vCPU 0
# rings every 16 of its 512 page writes a second), the server
# runs it late, and the guest reads the ring head back instead of calling
# its device dead. The migration goes on, and no byte is lost.
start stall-readahead "--fault stall:6000:3" "" "" "" && {
	ctl "$c.src" set max-bandwidth=256K/s >/dev/null
	ctl "$c.src" migrate "unix:$c.mig" >/dev/null
	wait_log "reading the ring head back" 300 && ok "the guest's doorbell timed out" \
		|| bad "no doorbell timed out"
	fault_hit
	ctl "$c.src" set max-bandwidth=0 >/dev/null
	wait_status "$c.src" "migration: completed" 300 && ok "completed" \
		|| bad "source: $(ctl "$c.src" status | head -2)"
	grep -q "stops driving" "$tmp/$cell.log" && bad "the guest gave up on its device" \
		|| ok "the guest kept its device"
	ctl "$c.dst" verify >/dev/null && ok "destination verified" || bad "destination verify"
}; stop_cell

# Sizes reported 16x too small: estimates are off, the data must not be.
start size "--fault size" "" "" "" && {
	out=$(ctl "$c.src" migrate "unix:$c.mig" --wait 2>&1)
	echo "$out" | grep -q "migration: completed" && ok "completed" || bad "migrate: $out"
	fault_hit
	s1=$(ctl "$c.src" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
	s2=$(ctl "$c.dst" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
	[ -n "$s1" ] && [ "$s1" = "$s2" ] && ok "device checksums equal" || bad "checksums '$s1' '$s2'"
	ctl "$c.dst" verify >/dev/null && ok "destination verified" || bad "destination verify"
}; stop_cell

# pre-copy: the source's device server dies. Its device is gone, so
# RUNNING cannot come back; the guest must still run and the error say so.
start srcdev-killed "" "" "" "" && {
	ctl "$c.src" set max-bandwidth=256K/s >/dev/null
	ctl "$c.src" migrate "unix:$c.mig" >/dev/null
	wait_status "$c.src" "migration: active" 50 || bad "never active"
	killtree "$sdev"
	wait_status "$c.src" "migration: failed" && ok "source migration failed" || bad "not failed"
	ctl "$c.src" status | grep -q "^vm: running" && ok "source guest running" \
		|| bad "source: $(ctl "$c.src" status | head -1)"
	expect_dest_clean
}; stop_cell

# After the destination resumed: the source stays stopped whatever happens.
start after-resume "" "" "" "" && {
	out=$(ctl "$c.src" migrate "unix:$c.mig" --wait 2>&1)
	echo "$out" | grep -q "migration: completed" && ok "completed" || bad "migrate: $out"
	killtree "$dst"; killtree "$ddev"
	wait "$dst" 2>/dev/null
	sleep 0.3
	ctl "$c.src" status | grep -q "^vm: postmigrate" && ok "source stays postmigrate" \
		|| bad "source: $(ctl "$c.src" status | head -1)"
	ctl "$c.src" cont >/dev/null 2>&1 && bad "cont accepted after completion" || ok "cont refused"
}; stop_cell

finish
