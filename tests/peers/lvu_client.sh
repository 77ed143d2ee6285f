#!/bin/sh
# libvfio-user's client conventions against our server (docs/interop.md):
# tests/peers/lvu_client.c, on libvfio-user's own transport with its sample
# client's negotiation (max_msg_fds 32, max_data_xfer_size 1024), migrates
# one `vfiomig device dma` to another: VERSION accepted, 1024-byte replies
# only, short MIG_DATA_READ replies padded as its transport needs, the
# destination's checksum equal to the source's.
# usage: lvu_client.sh VFIOMIG LVU_DEVICE LVU_CLIENT
set -u
bin=$1 lvu=$2 client=$3
. "$(dirname "$0")/lvu_lib.sh"

bg src-dev.log timeout -k 5 60 "$bin" device dma --socket "$tmp/a" --state-size 256K --churn 1M/s --once -v
bg dst-dev.log timeout -k 5 60 "$bin" device dma --socket "$tmp/b" --state-size 256K --once -v
wait_sock "$tmp/a" && wait_sock "$tmp/b" || { bad "devices did not start"; cat "$tmp"/*.log; exit 1; }
out=$(timeout -k 5 40 "$client" "$tmp/a" "$tmp/b" 2>&1); rc=$?
echo "$out"
[ $rc = 0 ] && ok "libvfio-user-style client migrated the dma device" || bad "lvu_client exited $rc"
echo "$out" | grep -q "server max_msg_fds [0-9]* max_data_xfer_size" && ok "VERSION negotiated" \
	|| bad "no VERSION"
grep -q "refus\|outside \[" "$tmp/src-dev.log" && bad "the server refused something: $(grep -i "refus\|outside" "$tmp/src-dev.log")"
grep -q "client speaks .*max_xfer 1024" "$tmp/src-dev.log" && ok "server honours max_data_xfer_size 1024" \
	|| bad "server log: $(grep -i "client speaks" "$tmp/src-dev.log")"
[ $fail = 0 ] || for f in "$tmp"/*.log; do echo "--- $f"; tail -30 "$f"; done
exit $fail
