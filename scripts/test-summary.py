#!/usr/bin/env python3
"""Prints 'N passed, N failed[, N skipped]' for a meson test run.

Counts TAP cases inside each test executable (every TEST() of
tests/harness.h is one case); a test whose process failed without reporting
a failing case (crash, timeout) counts as one failure. Exit status: 1 when
anything failed."""
import glob
import json
import os
import re
import sys

log = sys.argv[1] if len(sys.argv) > 1 else "build/meson-logs"
if os.path.isdir(log):
    # meson names the log after a --wrapper ("testlog-setarch.json"): newest wins.
    logs = sorted(glob.glob(os.path.join(log, "testlog*.json")), key=os.path.getmtime)
    log = logs[-1] if logs else os.path.join(log, "testlog.json")
passed = failed = skipped = 0
try:
    lines = open(log, encoding="utf-8", errors="replace").read().splitlines()
except OSError as e:
    print(f"test-summary: cannot read {log}: {e}", file=sys.stderr)
    print("0 passed, 1 failed")
    sys.exit(1)

for line in lines:
    if not line.strip():
        continue
    t = json.loads(line)
    out = t.get("stdout") or ""
    ok = len(re.findall(r"^ok \d+.*$", out, re.M))
    skip = len(re.findall(r"^ok \d+ .*# SKIP.*$", out, re.M))
    bad = len(re.findall(r"^not ok \d+", out, re.M))
    res = t.get("result", "")
    if ok + bad == 0:
        # Not a TAP test: judge by its result.
        if res == "OK":
            passed += 1
        elif res == "SKIP":
            skipped += 1
        else:
            failed += 1
        continue
    passed += ok - skip
    skipped += skip
    failed += bad
    if res not in ("OK", "SKIP", "EXPECTEDFAIL") and bad == 0:
        failed += 1

line = f"{passed} passed, {failed} failed"
if skipped:
    line += f", {skipped} skipped"
print(line)
sys.exit(1 if failed else 0)
