#!/usr/bin/env python3
"""Prints 'N passed, N failed, N skipped' for a meson test run, with the
reason of every skip listed above it ('skipped: TEST: REASON').

Counts TAP cases inside each test executable (every TEST() of
tests/harness.h is one case); a test whose process failed without reporting
a failing case (crash, timeout) counts as one failure. Silence is no pass:
a test that printed nothing, a TAP plan of no cases ('1..0'), or a skip
without a reason (TAP '# SKIP' with no text; a script's exit 77 without a
'SKIP: reason' line) counts as failed. Exit status: 1 when anything failed."""
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
reasons = []    # "test: reason" of each skip
silent = []     # "test: why" of each test counted failed for saying nothing
try:
    lines = open(log, encoding="utf-8", errors="replace").read().splitlines()
except OSError as e:
    print(f"test-summary: cannot read {log}: {e}", file=sys.stderr)
    print("0 passed, 1 failed, 0 skipped")
    sys.exit(1)

for line in lines:
    if not line.strip():
        continue
    t = json.loads(line)
    name = re.sub(r"^[^:]*:", "", t.get("name", "?")).strip()
    out = t.get("stdout") or ""
    res = t.get("result", "")
    ok_lines = re.findall(r"^ok \d+.*$", out, re.M)
    bad = len(re.findall(r"^not ok \d+", out, re.M))
    if not ok_lines and not bad:
        # No TAP case: an empty plan, a silent test, or a script judged by
        # its result.
        if re.search(r"^1\.\.0\b", out, re.M):
            m = re.search(r"^1\.\.0\s*#\s*SKIP\s+(\S.*)$", out, re.M)
            if m and res == "SKIP":
                skipped += 1
                reasons.append(f"{name}: {m.group(1)}")
            else:
                failed += 1
                silent.append(f"{name}: a plan of no cases ('1..0') and no skip reason")
            continue
        if not out.strip():
            failed += 1
            silent.append(f"{name}: printed nothing (result {res})")
            continue
        if res == "OK":
            passed += 1
        elif res == "SKIP":
            m = re.search(r"^\s*(?:#\s*)?SKIP:?\s+(\S.*)$", out, re.M | re.I)
            if m:
                skipped += 1
                reasons.append(f"{name}: {m.group(1)}")
            else:
                failed += 1
                silent.append(f"{name}: skipped without a 'SKIP: reason' line")
        else:
            failed += 1
        continue
    for ln in ok_lines:
        m = re.match(r"^ok \d+\s*-?\s*(.*?)\s*#\s*SKIP\b\s*(.*)$", ln)
        if not m:
            passed += 1
        elif m.group(2).strip():
            skipped += 1
            reasons.append(f"{name} / {m.group(1)}: {m.group(2).strip()}")
        else:
            failed += 1
            silent.append(f"{name} / {m.group(1)}: '# SKIP' without a reason")
    failed += bad
    if res not in ("OK", "SKIP", "EXPECTEDFAIL") and bad == 0:
        failed += 1

for s in silent:
    print(f"failed (silent): {s}")
for r in reasons:
    print(f"skipped: {r}")
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
