#!/bin/sh
# vfiomig save from one mtty mdev and load into another: bytes put in the
# source's UART FIFO come out of the destination's (device state moved).
# usage: save_load.sh VFIOMIG
bin=$1
. "$(dirname "$0")/lib.sh"
put 1 "saved-in-fifo" || bad "FIFO write"
put 1 "port1" 1 || bad "FIFO write port 1"
vfm save "vfio:$(mdev 1)" "$tmp/s" >"$tmp/out" 2>&1 && ok "save" || { bad "save"; cat "$tmp/out"; }
fifo 2 clear >/dev/null; fifo 2 clear 1 >/dev/null   # loaded over anyway
vfm load "vfio:/sys/bus/mdev/devices/$(mdev 2)" "$tmp/s" >"$tmp/out" 2>&1 && ok "load" \
	|| { bad "load"; cat "$tmp/out"; }
got=$(fifo 2 read 15)
echo "$got" | grep -q "'saved-in-fifo'" && ok "FIFO bytes on the destination: $got" || bad "destination FIFO: $got"
got=$(fifo 2 read 15 1)
echo "$got" | grep -q "'port1'" && ok "port 1 bytes too" || bad "destination port 1: $got"
no_oops "save/load"
finish
