# Thin front end to meson. `make demo` and `make check` are the README's two
# commands; everything else is for developers.
BUILD      ?= build
MESON      ?= meson
ifeq ($(CI),true)
WERROR     := --werror
endif
MESON_OPTS ?=
TEST_OPTS  ?= --print-errorlogs

.PHONY: all deps demo check check-slow check-asan check-tsan clean install fuzz fuzz-seeds bench bench-quick \
	valgrind valgrind-integration check-kernel build-clang

all: $(BUILD)/build.ninja
	ninja -C $(BUILD)

$(BUILD)/build.ninja:
	$(MESON) setup $(BUILD) $(WERROR) $(MESON_OPTS)

deps:
	./scripts/deps.sh

demo: deps all
	./$(BUILD)/tools/vfiomig demo

# Runs every test, then prints the closing 'N passed, N failed, N skipped'
# line; a test missing from (or not in) tests/expected-tests.txt fails.
check: all
	-$(MESON) test -C $(BUILD) $(TEST_OPTS)
	./scripts/test-summary.py $(BUILD)/meson-logs --expected tests/expected-tests.txt

# The whole convergence matrix (48 cases of real dma device processes; `make
# check` runs a reduced one). Minutes, not seconds. Ends with 'N passed, N
# failed, N skipped' (the convergence test's cases; .ci/run counts them).
check-slow: all
	-VFM_MATRIX=full $(MESON) test -C $(BUILD) $(TEST_OPTS) --timeout-multiplier 3 convergence
	./scripts/test-summary.py $(BUILD)/meson-logs

# The kernel VFIO backend against a real kernel: tests/kernel/*.sh in a nested
# Debian 6.12 guest with mtty mdevs (tests/kernel/run-in-guest.sh; first use
# downloads ~277 MB), one boot on group/type1 and one on cdev/iommufd. Ends
# with 'N passed, N failed' (docs/kernel-vfio.md).
check-kernel: all
	./tests/kernel/run.sh $(BUILD)

# Sanitized builds run several times slower: meson's per-test timeouts x3.
check-asan:
	$(MAKE) check BUILD=build-asan \
		MESON_OPTS="-Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug" \
		TEST_OPTS="$(TEST_OPTS) --timeout-multiplier 3"

# TSan needs a fixed address layout on kernels with high mmap randomness.
check-tsan:
	$(MAKE) check BUILD=build-tsan MESON_OPTS="-Db_sanitize=thread -Db_lundef=false" \
		TEST_OPTS="$(TEST_OPTS) --timeout-multiplier 3 --wrapper 'setarch $(shell uname -m) -R'"

# The unit tests and fuzz corpora under valgrind memcheck (leaks are errors).
# VALGRIND_SKIP: tests too slow under valgrind (memory-heavy migrations).
VALGRIND_SKIP ?= migration migration_dma migration_fail kvm convergence
valgrind: all
	$(MESON) test -C $(BUILD) $(TEST_OPTS) --timeout-multiplier 10 \
		$(filter-out $(VALGRIND_SKIP),$(shell $(MESON) test -C $(BUILD) --list --suite unit \
			--suite fuzz 2>/dev/null | sed -n 's|.* / ||p')) \
		--wrapper 'env VFM_VALGRIND=1 valgrind -q --fair-sched=yes --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect --track-fds=no'

# Integration scripts with their vm and device processes under valgrind
# (scripts/valgrind-integration.sh; VALGRIND_SCRIPTS: which, default the fault
# matrix and vm_ctl/vm_bad). Low priority: it is long and CPU-bound.
VALGRIND_SCRIPTS ?=
valgrind-integration: all
	nice ./scripts/valgrind-integration.sh $(BUILD) $(VALGRIND_SCRIPTS)

# Benchmarks: write docs/performance.md (+ docs/perf/*.png). Not tests.
bench: all
	-./scripts/deps.sh --bench   # without QEMU the peer row says so
	./bench/run.py $(BUILD)

bench-quick: all
	-./scripts/deps.sh --bench   # without QEMU the peer row says so
	./bench/run.py $(BUILD) --quick --out $(BUILD)/performance-quick.md

# The same tree with a second compiler, every warning an error (gcc is the
# default; clang once failed on GNU extensions gcc accepts).
build-clang/build.ninja:
	CC=clang $(MESON) setup build-clang --werror
build-clang: build-clang/build.ninja
	ninja -C build-clang

# libFuzzer (clang) build of tests/fuzz; FUZZ_TIME seconds per target.
FUZZ_TIME ?= 60
build-fuzz/build.ninja:
	CC=clang $(MESON) setup build-fuzz -Dfuzz=true -Db_sanitize=address,undefined \
		-Db_lundef=false -Dbuildtype=debugoptimized

fuzz: build-fuzz/build.ninja
	ninja -C build-fuzz
	./scripts/fuzz.sh build-fuzz $(FUZZ_TIME) $(FUZZ_TARGETS)

# Re-records the seed corpora from real traffic (after a format change).
fuzz-seeds: all
	./$(BUILD)/tests/fuzz/fuzz_mkseeds tests/fuzz/corpus
	./$(BUILD)/tests/fuzz/fuzz_mkseeds_dest tests/fuzz/corpus

install: all
	$(MESON) install -C $(BUILD)

clean:
	rm -rf build build-asan build-tsan build-fuzz
