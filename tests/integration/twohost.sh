#!/bin/sh
# Two hosts on one machine: the source and the destination (each VM with its
# device server) in two network namespaces joined by a veth pair, rate
# limited with tc tbf, addresses from 10.99/16 inside the namespaces only.
#  - a migration across at 1 and at 10 Gbit/s, plain (--insecure) and TLS,
#    verified (guest memory, device checksum), with its figures printed;
#  - the link cut during pre-copy and during stop-and-copy: the source's
#    guest and device run on, the destination fails cleanly and then takes
#    a migration over the restored link;
#  - a third namespace connecting first to the TLS port, in plaintext and
#    with a certificate of another CA: refused, then the real one succeeds;
#  - a plaintext listener on the veth address is refused without --insecure.
# usage: twohost.sh VFIOMIG TLS_GEN_TOOL [bench]
#   bench: only the four measured migrations, bigger, as "twohost:" rows.
set -u
bin=$1
gen=$2
mode=${3:-test}
[ "$(id -u)" = 0 ] || { echo "SKIP: network namespaces need root"; exit 77; }
command -v ip >/dev/null && command -v tc >/dev/null \
	|| { echo "SKIP: no ip/tc (iproute2, scripts/deps.sh)"; exit 77; }
lib_name=twohost
. "$(dirname "$0")/vm_lib.sh"

tag=$(($$ % 100000))
S=vfm-s$tag D=vfm-d$tag T=vfm-t$tag
SIF=vfa$tag DIF=vfb$tag TIF=vfc$tag EIF=vfe$tag
SRC_IP=10.99.1.1 DST_IP=10.99.1.2 T_IP=10.99.2.1 DT_IP=10.99.2.2
nscleanup() {
	cleanup
	for n in $S $D $T; do ip netns del "$n" 2>/dev/null; done
}
trap nscleanup EXIT
for n in $S $D $T; do
	ip netns add "$n" || { echo "SKIP: cannot create a network namespace"; exit 77; }
	ip -n "$n" link set lo up
done
ip link add "$SIF" netns "$S" type veth peer name "$DIF" netns "$D" &&
ip link add "$TIF" netns "$T" type veth peer name "$EIF" netns "$D" &&
ip -n "$S" addr add $SRC_IP/24 dev "$SIF" && ip -n "$D" addr add $DST_IP/24 dev "$DIF" &&
ip -n "$T" addr add $T_IP/24 dev "$TIF" && ip -n "$D" addr add $DT_IP/24 dev "$EIF" &&
ip -n "$S" link set "$SIF" up && ip -n "$D" link set "$DIF" up &&
ip -n "$T" link set "$TIF" up && ip -n "$D" link set "$EIF" up &&
ip -n "$T" route add default via $DT_IP || { echo "SKIP: veth setup failed"; exit 77; }

link_rate() {  # link_rate 1gbit|10gbit: both directions of the source-destination link
	case $1 in 10gbit) burst=4mb ;; *) burst=512kb ;; esac
	tc -n "$S" qdisc replace dev "$SIF" root tbf rate "$1" burst $burst latency 20ms &&
	tc -n "$D" qdisc replace dev "$DIF" root tbf rate "$1" burst $burst latency 20ms
}
ctl() { timeout -k 5 30 "$bin" ctl "$@"; }
inns() { ns=$1; shift; ip netns exec "$ns" "$@"; }
wait_status() {  # wait_status SOCKET PATTERN [TENTHS]: until `ctl status` matches
	i=0
	while ! ctl "$1" status 2>/dev/null | grep -q "$2"; do
		i=$((i + 1)); [ $i -gt "${3:-200}" ] && return 1; sleep 0.1
	done
}
jfield() {  # jfield JSON KEY: a number from ctl status --json
	echo "$1" | grep -o "\"$2\":[0-9.]*" | head -1 | cut -d: -f2
}

"$gen" "$tmp/x509" x509 $DST_IP >/dev/null && "$gen" "$tmp/other" x509 $DST_IP >/dev/null \
	|| { bad "credentials"; exit 1; }

mem=64M state=8M
[ "$mode" = bench ] && mem=512M state=64M
run=0
# start_pair TLS_OPTS...: device servers and VMs, source in S, destination in D.
start_pair() {
	run=$((run + 1)); port=$((4400 + run))
	uri=tcp:$DST_IP:$port
	bg inns "$S" timeout -k 5 200 "$bin" device dma --socket "$tmp/d$run" --state-size $state \
		--churn 1M/s
	bg inns "$D" timeout -k 5 200 "$bin" device dma --socket "$tmp/e$run" --state-size $state
	wait_sock "$tmp/d$run" && wait_sock "$tmp/e$run" || bad "run $run: devices did not start"
	bg inns "$S" timeout -k 5 200 "$bin" vm --mem $mem --device "vfio-user:$tmp/d$run$devopt" \
		--dirty-rate 4M/s --control "$tmp/src$run" "$@"
	bg inns "$D" timeout -k 5 200 "$bin" vm --mem $mem --device "vfio-user:$tmp/e$run" \
		--incoming "$uri" --control "$tmp/dst$run" "$@"
	wait_sock "$tmp/src$run" && wait_sock "$tmp/dst$run" \
		|| { bad "run $run: VMs did not start"; tail -20 "$tmp/log"; exit 1; }
	src=$tmp/src$run dst=$tmp/dst$run
}
stop_pair() {
	ctl "$src" quit >/dev/null 2>&1; ctl "$dst" quit >/dev/null 2>&1
}
verified() {  # verified WHAT: the destination runs the verified guest, device state equal
	dst_status=$(ctl "$dst" status)
	echo "$dst_status" | grep -q "guest: synthetic, verified yes" && ok "$1: destination guest verified" \
		|| bad "$1: destination: $dst_status"
	s1=$(ctl "$src" status | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
	s2=$(echo "$dst_status" | sed -n 's/.*checksum \(0x[0-9a-f]*\).*/\1/p')
	[ -n "$s1" ] && [ "$s1" = "$s2" ] && ok "$1: device checksum equal" || bad "$1: checksums '$s1' '$s2'"
}
# measure RATE_GBIT WHAT: prints what crossed, how fast, against the link.
measure() {
	j=$(ctl "$src" status --json)
	bytes=$(jfield "$j" transferred_bytes); ms=$(jfield "$j" total_time_ms)
	down=$(jfield "$j" downtime_ms)
	[ -n "${TWOHOST_DEBUG:-}" ] && echo "$j"
	awk -v b="$bytes" -v ms="$ms" -v g="$1" -v d="$down" -v w="$2" 'BEGIN {
		gbps = ms > 0 ? b * 8 / ms / 1e6 : 0
		printf "twohost: %-14s %8.1f MiB in %6d ms = %6.2f Gbit/s, %.2f of the %s Gbit/s link " \
		       "(arithmetic %d ms), downtime %.1f ms\n", w, b / 1048576, ms, gbps, gbps / g, g,
		       b * 8 / g / 1e6, d }'
}

devopt=""
if [ "$mode" != bench ]; then
	# A plaintext listener on the veth address needs --insecure.
	out=$(inns "$D" timeout -k 5 10 "$bin" vm --mem 16M --guest none --incoming tcp:$DST_IP:4399 \
		--control "$tmp/x" 2>&1)
	[ $? != 0 ] && echo "$out" | grep -q -- "--insecure" && ok "plaintext listener on $DST_IP refused" \
		|| bad "plaintext listener on $DST_IP: $out"
fi

for rate in 1 10; do
	link_rate ${rate}gbit || { bad "tc tbf ${rate}gbit"; continue; }
	for kind in plain tls; do
		if [ $kind = tls ]; then start_pair --tls-creds "x509:$tmp/x509"
		else start_pair --insecure; fi
		if [ $kind = tls ] && [ $rate = 1 ] && [ "$mode" != bench ]; then
			# A third namespace gets there first: plaintext, then another CA.
			bg inns "$T" timeout -k 5 60 "$bin" vm --mem 16M --guest none --control "$tmp/t1"
			bg inns "$T" timeout -k 5 60 "$bin" vm --mem 16M --guest none \
				--tls-creds "x509:$tmp/other" --control "$tmp/t2"
			wait_sock "$tmp/t1" && wait_sock "$tmp/t2" || bad "third-namespace VMs"
			out=$(ctl "$tmp/t1" migrate "$uri" --wait 2>&1)
			[ $? = 1 ] && echo "$out" | grep -q "accepts TLS only" \
				&& ok "third namespace, plaintext: refused and told" || bad "plaintext intruder: $out"
			out=$(ctl "$tmp/t2" migrate "$uri" --wait 2>&1)
			[ $? = 1 ] && echo "$out" | grep -q "TLS handshake" \
				&& ok "third namespace, other CA: refused ($(echo "$out" | tail -1 | cut -c1-90))" \
				|| bad "other-CA intruder: $out"
			[ "$(grep -c "refused a migration connection on $uri" "$tmp/log")" -ge 2 ] \
				&& ok "destination logged both refusals" || bad "refusals not logged"
			ctl "$tmp/t1" quit >/dev/null 2>&1; ctl "$tmp/t2" quit >/dev/null 2>&1
		fi
		out=$(ctl "$src" migrate "$uri" --wait 2>&1)
		echo "$out" | grep -q "migration: completed" && ok "${rate} Gbit/s $kind: completed" \
			|| bad "${rate} Gbit/s $kind: $out"
		verified "${rate} Gbit/s $kind"
		measure $rate "${rate}G $kind"
		stop_pair
	done
done
[ "$mode" = bench ] && exit $fail

# The link cut in pre-copy (bandwidth-limited so it lasts), then in
# stop-and-copy (a device without pre-copy: all its state moves there).
link_rate 1gbit
for phase in pre-copy stop-copy; do
	if [ $phase = pre-copy ]; then
		devopt="" state=32M
		start_pair --tls-creds "x509:$tmp/x509"
		ctl "$src" set max-bandwidth=8M/s >/dev/null || bad "set max-bandwidth"
		want="migration: active"
	else
		devopt=",allow-pre-copy=off" state=96M
		start_pair --tls-creds "x509:$tmp/x509"
		ctl "$src" set downtime-limit=60000 >/dev/null || bad "set downtime-limit"
		want="migration: device"
	fi
	ctl "$src" migrate "$uri" >/dev/null || bad "$phase: migrate did not start"
	if wait_status "$src" "$want" 300; then
		[ $phase = pre-copy ] && sleep 0.5
		ip -n "$S" link set "$SIF" down
		ok "$phase: link cut ($(ctl "$src" status | grep '^migration' | cut -c1-60))"
	else
		bad "$phase: never reached '$want': $(ctl "$src" status | grep '^migration')"
	fi
	wait_status "$src" "migration: failed" 300 && ok "$phase: source failed the migration" \
		|| bad "$phase: source: $(ctl "$src" status | grep '^migration')"
	st=$(ctl "$src" status)
	echo "$st" | grep -q "^vm: running" && ok "$phase: source guest running" || bad "$phase: source: $st"
	echo "$st" | grep -q "^device .*: RUNNING" && ok "$phase: source device running" \
		|| bad "$phase: source device: $st"
	ctl "$src" verify >/dev/null && ok "$phase: source guest verified" || bad "$phase: source verify"
	wait_status "$dst" "migration: failed" 300 && ok "$phase: destination failed cleanly" \
		|| bad "$phase: destination: $(ctl "$dst" status | grep '^migration')"
	ctl "$dst" status | grep -q "^vm: inmigrate" && ok "$phase: destination waits for the next" \
		|| bad "$phase: destination: $(ctl "$dst" status | head -3)"
	ip -n "$S" link set "$SIF" up
	ctl "$src" set max-bandwidth=0 >/dev/null
	i=0
	until out=$(ctl "$src" migrate "$uri" --wait 2>&1); do
		i=$((i + 1)); [ $i -lt 10 ] || break; sleep 0.5
	done
	echo "$out" | grep -q "migration: completed" && ok "$phase: migration over the restored link" \
		|| bad "$phase: after the cut: $out"
	verified "$phase: after the cut"
	stop_pair
done
[ $fail = 0 ] || { echo "--- log"; tail -40 "$tmp/log"; }
exit $fail
