#!/usr/bin/env python3
"""Prints 'N passed, N failed, N skipped' for a meson test run, with the
reason of every skip listed above it ('skipped: TEST: REASON').

Counts TAP cases inside each test executable (every TEST() of
tests/harness.h is one case); a test whose process failed without reporting
a failing case (crash, timeout) counts as one failure. Silence is no pass:
a test that printed nothing, a TAP plan of no cases ('1..0'), or a skip
without a reason (TAP '# SKIP' with no text; a script's exit 77 without a
'SKIP: reason' line) counts as failed. With --expected FILE
(tests/expected-tests.txt), every test listed there must have run with its
count of cases, and no other: each difference is one failure, named.
Exit status: 1 when anything failed.

usage: test-summary.py [BUILD/meson-logs | testlog.json] [--expected FILE]"""
import glob
import json
import os
import re
import sys

args = sys.argv[1:]
expected_file = None
if "--expected" in args:
    i = args.index("--expected")
    if i + 1 >= len(args):
        sys.exit("usage: test-summary.py [LOG] [--expected FILE]")
    expected_file = args[i + 1]
    del args[i:i + 2]
log = args[0] if args else "build/meson-logs"
logdir = log if os.path.isdir(log) else os.path.dirname(log)
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

ran = {}       # test name (no suite) -> cases in its TAP plan, or None
for line in lines:
    if not line.strip():
        continue
    t = json.loads(line)
    name = re.sub(r"^[^:]*:", "", t.get("name", "?")).strip()
    out = t.get("stdout") or ""
    plan = re.search(r"^1\.\.(\d+)", out, re.M)
    ran[name.split(" / ", 1)[-1]] = int(plan.group(1)) if plan else None
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

def sanitized():
    """Whether the build the log belongs to is a sanitizer build."""
    try:
        opts = json.load(open(os.path.join(logdir, "..", "meson-info",
                                           "intro-buildoptions.json")))
    except (OSError, ValueError):
        return False
    return any(o.get("name") == "b_sanitize" and o.get("value") not in ("none", [], "")
               for o in opts)


# The expected list: a test that vanished, appeared or changed its number of
# cases is a failure, so that no guard drops one silently.
differences = []
if expected_file:
    want = {}
    try:
        for ln in open(expected_file, encoding="utf-8"):
            f = ln.split("#", 1)[0].split()
            if not f:
                continue
            if len(f) > 2 and f[2] == "nosan" and sanitized():
                continue
            want[f[0]] = None if f[1] == "-" else int(f[1])
    except (OSError, ValueError, IndexError) as e:
        differences.append(f"cannot read {expected_file}: {e}")
    for n, c in sorted(want.items()):
        if n not in ran:
            differences.append(f"'{n}' did not run (listed in {expected_file})")
        elif c is not None and ran[n] != c:
            differences.append(f"'{n}' ran {ran[n]} cases, {expected_file} says {c}")
    for n in sorted(set(ran) - set(want)):
        differences.append(f"'{n}' ran but is not in {expected_file}")
    failed += len(differences)

for d in differences:
    print(f"failed (expected tests): {d}")
for s in silent:
    print(f"failed (silent): {s}")
for r in reasons:
    print(f"skipped: {r}")
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
