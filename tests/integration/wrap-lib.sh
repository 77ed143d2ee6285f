# Sourced by faults-lib.sh, vm_lib.sh and devtools.sh once $bin and $tmp are
# set. With VFIOMIG_WRAP set (scripts/valgrind-integration.sh), $bin becomes a
# script that runs `vfiomig vm`, `device` and the device tools (info, check,
# save, load) under that command, anything else (ctl) as is. VFIOMIG_TIME_SCALE multiplies the
# callers' timeouts (tscale, default 1).
tscale=${VFIOMIG_TIME_SCALE:-1}
if [ -n "${VFIOMIG_WRAP:-}" ]; then
	vfm_real_bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
	bin=$tmp/vfiomig-wrapped
	cat >"$bin" <<WRAP
#!/bin/sh
case "\$1" in vm|device|info|check|save|load) exec $VFIOMIG_WRAP "$vfm_real_bin" "\$@" ;; esac
exec "$vfm_real_bin" "\$@"
WRAP
	chmod +x "$bin"
fi
