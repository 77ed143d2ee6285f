#!/usr/bin/env bash
# Reruns the mutation checks of docs/reliability.md ("Tests that can fail"):
# each mutation breaks one behaviour on purpose, in a scratch copy of the
# committed tree (git archive HEAD), and the test named after it must fail;
# with the code restored the same test must pass. Nothing here touches the
# working tree.
# usage: scripts/mutants.sh [-k] [ID...]    (no ID: every mutation)
#   -k: keep the scratch copy (printed) for a look.
# Exit status: 1 when a mutation survived (its test passed) or a test failed
# on the real code, or a mutation no longer applies (the code moved: update
# its pattern here and in docs/reliability.md).
set -uo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = -k ] && { keep=1; shift; }
only=" $* "

scratch=$(mktemp -d "${TMPDIR:-/tmp}/vfiomig-mutants.XXXXXX")
cleanup() { [ $keep = 1 ] && echo "scratch copy kept: $scratch" || rm -rf "$scratch"; }
trap cleanup EXIT
git archive HEAD | tar -x -C "$scratch" || exit 1
echo "mutants: building a scratch copy of $(git rev-parse --short HEAD) in $scratch"
(cd "$scratch" && nice meson setup build >/dev/null && nice ninja -C build >/dev/null) ||
	{ echo "mutants: the scratch build failed"; exit 1; }

status=0
# run TEST [CASE...]: 0 when the test passed. A shell test named with cases
# gets them as arguments (demo.sh); a TAP test as case names.
run() {
	local t=$1; shift
	local args=()
	for c in "$@"; do args+=(--test-args "$c"); done
	timeout -k 10 600 nice meson test -C "$scratch/build" "$t" "${args[@]}" \
		>"$scratch/last.log" 2>&1
}

# The last run's failing output: what meson logged of each failed test.
why() {
	python3 -c '
import json, sys
for line in open(sys.argv[1]):
    t = json.loads(line)
    if t.get("result") != "OK":
        for k in ("stdout", "stderr"):
            print("\n".join((t.get(k) or "").splitlines()[-15:]))
' "$scratch/build/meson-logs/testlog.json"
}

# mutant ID FILE PERL_SUBSTITUTION TEST [CASE...]
mutant() {
	local id=$1 file=$2 expr=$3; shift 3
	case "$only" in "  ") ;; *" $id "*) ;; *) return 0 ;; esac
	cp "$scratch/$file" "$scratch/.orig"
	perl -0777 -pi -e "$expr" "$scratch/$file"
	if cmp -s "$scratch/$file" "$scratch/.orig"; then
		echo "STALE  $id: the pattern no longer matches $file"
		status=1
		return
	fi
	if ! nice ninja -C "$scratch/build" >"$scratch/last.log" 2>&1; then
		echo "STALE  $id: the mutated $file does not build"
		status=1
	elif run "$@"; then
		echo "SURVIVED $id: '$*' passed with $file mutated"
		status=1
	else
		echo "killed $id: '$*' failed with $file mutated"
	fi
	cp "$scratch/.orig" "$scratch/$file"
	nice ninja -C "$scratch/build" >/dev/null 2>&1
	if run "$@"; then
		echo "      $id: '$*' passes on the real code"
	else
		echo "FAILED $id: '$*' fails on the real code too:"
		why
		if run "$@"; then
			echo "FLAKY  $id: '$*' passed when run again"
		fi
		status=1
	fi
}

# 1. The device's dirty log and the all-dirty fallback (tests/unit/test_migration.c).
mutant dev-log-noop lib/migration/vfio.c \
	's/(static bool sync_device_log\(struct vfm_migration \*m, struct vfm_mig_device \*md\)\n\{\n)/$1\treturn true;\n/' \
	migration unix_one_device_precopy
mutant all-dirty-fallback lib/migration/vfio.c \
	's/all_dirty = true;  \/\* cannot track/(void)0;  \/* cannot track/' \
	migration device_without_dma_logging_falls_back_to_all_dirty device_dirty_tracking_off
# 2. Options that must change what moves (test_migration.c, test_migration_dma.c).
mutant precopy-tracking-ignored lib/migration/vfio.c \
	's/if \(in_precopy && \(!md->props.pre_copy_dirty_page_tracking/if (0 \&\& in_precopy \&\& (!md->props.pre_copy_dirty_page_tracking/' \
	migration unix_opt_out_of_precopy_tracking
mutant precopy-tracking-ignored-dma lib/migration/vfio.c \
	's/if \(in_precopy && \(!md->props.pre_copy_dirty_page_tracking/if (0 \&\& in_precopy \&\& (!md->props.pre_copy_dirty_page_tracking/' \
	migration_dma unix_opt_out_of_precopy_dirty_tracking
mutant allow-pre-copy-ignored lib/migration/vfio.c \
	's/\(md->flags & VFM_MIG_PRE_COPY\) && md->props.allow_pre_copy\)/(md->flags \& VFM_MIG_PRE_COPY))/' \
	migration unix_allow_pre_copy_off
mutant allow-pre-copy-ignored-dma lib/migration/vfio.c \
	's/\(md->flags & VFM_MIG_PRE_COPY\) && md->props.allow_pre_copy\)/(md->flags \& VFM_MIG_PRE_COPY))/' \
	migration_dma unix_two_devices_without_precopy unix_stop_copy_only_data_and_a_quiet_guest_converges
# 3. Fault cells' reasons (faults-lib.sh): the source reports no error text.
mutant empty-error vmm/vm_cmd.c \
	's/json_object_object_add\(o, "error", json_object_new_string\(st.error\)\)/json_object_object_add(o, "error", json_object_new_string(""))/' \
	faults_dst
# 4. A crashed destination (faults-lib.sh expect_dest_clean).
mutant mem-mismatch-abort lib/migration/ram.c \
	's/(if \(gpa != r->gpa \|\| size != r->size\)\n)/$1\t\t\tabort();\n\t\tif (0)\n/' \
	faults_dst
# 5. The bandwidth limiter (test_migration_fail.c max_bandwidth_honoured).
mutant no-rate-limit lib/migration/source.c \
	's/(static void rate_limit\(struct source \*src\)\n\{\n)/$1\tif (src) return;\n/' \
	migration_fail max_bandwidth_honoured
# 6. Checks that checked nothing.
mutant no-downtime lib/migration/source.c \
	's/m->stats.downtime_ms = \(double\)\(vfm_get_le64\(pl\) - src->t_stop\) \/ 1e6;/m->stats.downtime_ms = 0;/' \
	migration unix_one_device_precopy
mutant no-dma-ops-key vmm/vm_cmd.c \
	's/"dma_ops", ju64/"dma_ops_", ju64/' \
	vm_ctl
mutant demo-fd-refusal tools/cmd-demo.c \
	's/the demo cannot hand one fd to two VMs /the demo takes no fd: URI /' \
	demo-bad-input
mutant none-guest-never-runs vmm/guest_synthetic.c \
	's/(static int none_start\(struct vfm_guest \*g, struct vfm_error \*err\)\n\{\n)\tg->running = true;/$1\t(void)g;/' \
	vm_bad
mutant listener-unlinks-any lib/migration/channel.c \
	's/S_ISSOCK\(st.st_mode\) &&\n(\s*)st.st_dev == l->dev && st.st_ino == l->ino\)/S_ISSOCK(st.st_mode))/' \
	channel listener_close_leaves_a_newer_socket

exit $status
