#!/bin/sh
# Fault matrix, the late phases (docs/reliability.md): the migration
# connection cut, the destination VM or its device server killed, while the
# source waits for the switchover-ack and while the source is in
# stop-and-copy (guest stopped). Before the destination resumed the source
# must run on verified with its device RUNNING and `failed`.
# usage: faults_late.sh PATH_TO_VFIOMIG
bin=$1
here=$(dirname "$0")
. "$here/faults-lib.sh"
known_failures="${FAULTS_KNOWN:-}"

# Waiting for switchover-ack, held for good: the source migrates through a
# relay that withholds the destination's RP_ACK records (faults-proxy.py),
# so the source has sent its device's initial data and cannot switch over.
ack_hold() {
	bg timeout -k 5 $life python3 "$here/faults-proxy.py" "$c.px" "$c.mig"
	proxy=$last
	wait_sock "$c.px" || { bad "proxy did not listen"; return 1; }
	ctl "$c.src" migrate "unix:$c.px" >/dev/null || { bad "migrate did not start"; return 1; }
	wait_log "held RP_ACK" || { bad "no switchover-ack to hold"; return 1; }
	wait_log "initial pre-copy data sent" && ok "source sent the initial data" \
		|| bad "source never said its initial data was sent"
	# Without the ack there is no switchover, however long it waits.
	ctl "$c.src" status | grep -q "^migration: active" && ok "source waits in pre-copy" \
		|| bad "source: $(ctl "$c.src" status | sed -n 2p)"
}
# The source failed without ever seeing the ack.
expect_no_ack() {
	grep -q "switchover-ack for section" "$tmp/$cell.log" && bad "the source got an ack" \
		|| ok "the ack never reached the source"
}
stop_proxy() { alive "$proxy" && kill "$proxy" 2>/dev/null; wait "$proxy" 2>/dev/null; }

# ack wait: the migration connection is cut (the destination stays up).
start ack-conn-cut "" "" "-vv" "" && {
	ack_hold && {
		kill -USR1 $(pgrep -P "$proxy")  # the relay itself, not its timeout
		expect_source_intact "$LOST"; expect_no_ack; expect_dest_clean "$LOST"; expect_retry_ok
	}
	stop_proxy
}; stop_cell

# ack wait: the destination VM is SIGKILLed; a new one takes the retry.
start ack-dstvm-killed "" "" "-vv" "" && {
	ack_hold && {
		killtree "$dst"
		expect_source_intact "$LOST"; expect_no_ack; expect_dest_clean killed
		restart_dst; expect_retry_ok
	}
	stop_proxy
}; stop_cell

# ack wait: the destination's device server is SIGKILLed.
start ack-dstdev-killed "" "" "-vv" "" && {
	ack_hold && {
		killtree "$ddev"
		expect_source_intact "$DEVLOST\|$LOST"; expect_no_ack; expect_dest_clean "$DEVLOST"
	}
	stop_proxy
}; stop_cell

# Stop-and-copy, held: the source device's STOP_COPY reads trickle (a byte a
# second, each request answered in time), so the guest stays stopped with the
# device in STOP_COPY until the destination's own 10 s no-progress timeout on
# the main channel; the cell acts right after seeing that state.
stopcopy_hold() {  # [URI]
	ctl "$c.src" migrate "${1:-unix:$c.mig}" >/dev/null || { bad "migrate did not start"; return 1; }
	wait_log "fault injected: trickle" || { bad "the source never entered STOP_COPY"; return 1; }
	st=$(ctl "$c.src" status)
	echo "$st" | grep -q "^vm: paused" && echo "$st" | grep -q "^migration: device" \
		&& echo "$st" | grep -q "^device dev0 (vfio-user): STOP_COPY" \
		&& ok "source in stop-and-copy (guest paused, device STOP_COPY)" \
		|| bad "source not in stop-and-copy: $(echo "$st" | head -3 | tr '\n' ' ')"
	ctl "$c.dst" status | grep -q "^migration: device" && ok "destination loading stop-copy data" \
		|| bad "destination: $(ctl "$c.dst" status | sed -n 2p)"
}

# stop-and-copy: the destination VM is SIGKILLed; a new one takes the retry
# (the trickle hits the first STOP_COPY only).
start stopcopy-dstvm-killed "--fault trickle:1000" "" "" "" && {
	stopcopy_hold && {
		killtree "$dst"
		expect_source_intact "$LOST"; expect_dest_clean killed
		restart_dst; expect_retry_ok
	}
}; stop_cell

# stop-and-copy: the migration connection is cut (through a relay that
# passes everything until then); the destination stays up for the retry.
start stopcopy-conn-cut "--fault trickle:1000" "" "" "" && {
	bg timeout -k 5 $life python3 "$here/faults-proxy.py" "$c.px" "$c.mig" --pass-acks
	proxy=$last
	wait_sock "$c.px" || bad "proxy did not listen"
	stopcopy_hold "unix:$c.px" && {
		kill -USR1 $(pgrep -P "$proxy")
		expect_source_intact "$LOST"; expect_dest_clean "$LOST"; expect_retry_ok
	}
	stop_proxy
}; stop_cell

# stop-and-copy: the destination's device server is SIGKILLed.
start stopcopy-dstdev-killed "--fault trickle:1000" "" "" "" && {
	stopcopy_hold && {
		killtree "$ddev"
		expect_source_intact "$DEVLOST\|$LOST"; expect_dest_clean "$DEVLOST"
	}
}; stop_cell

finish
