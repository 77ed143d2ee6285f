#!/usr/bin/env python3
"""A test of the test counting: scripts/test-summary.py over made-up meson
logs. Silence is no pass (a test that printed nothing, a '1..0' plan, a
skip without a reason all count as failed), a skip with a reason is counted
and listed, and --expected fails on a test that vanished, appeared or
changed its number of cases.
usage: summary_selftest.py PATH_TO_TEST_SUMMARY_PY"""
import json
import os
import subprocess
import sys
import tempfile

summary = sys.argv[1]
failures = 0


def entry(name, stdout, result="OK"):
    return {"name": "vfiomig:" + name, "stdout": stdout, "result": result}


def run(entries, expected=None):
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "testlog.json")
        with open(log, "w") as f:
            for e in entries:
                f.write(json.dumps(e) + "\n")
        args = [sys.executable, summary, log]
        if expected is not None:
            exp = os.path.join(d, "expected.txt")
            with open(exp, "w") as f:
                f.write(expected)
            args += ["--expected", exp]
        p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout


def case(what, entries, want_line, want_rc, want_text=None, expected=None):
    global failures
    rc, out = run(entries, expected)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    good = last == want_line and rc == want_rc and (want_text is None or want_text in out)
    print(("ok: " if good else "FAIL: ") + what + ("" if good else f": rc {rc}, output:\n{out}"))
    failures += not good


TAP2 = "TAP version 13\n1..2\nok 1 - a\nok 2 - b\n"
case("passing TAP cases count one each", [entry("unit / t", TAP2)], "2 passed, 0 failed, 0 skipped", 0)
case("a test that printed nothing fails", [entry("unit / t", "", "OK")],
     "0 passed, 1 failed, 0 skipped", 1, "printed nothing")
case("a plan of no cases fails", [entry("unit / t", "TAP version 13\n1..0\n", "SKIP")],
     "0 passed, 1 failed, 0 skipped", 1, "1..0")
case("a reasonless TAP skip fails",
     [entry("unit / t", "TAP version 13\n1..2\nok 1 - a\nok 2 - b # SKIP\n")],
     "1 passed, 1 failed, 0 skipped", 1, "without a reason")
case("a TAP skip with a reason is listed",
     [entry("unit / t", "TAP version 13\n1..2\nok 1 - a\nok 2 - b # SKIP no /dev/kvm\n")],
     "1 passed, 0 failed, 1 skipped", 0, "skipped: unit / t / b: no /dev/kvm")
case("a script's skip with a reason is listed",
     [entry("integration / s", "SKIP: no qemu-system-x86_64\n", "SKIP")],
     "0 passed, 0 failed, 1 skipped", 0, "skipped: integration / s: no qemu-system-x86_64")
case("a script's exit 77 without a reason fails",
     [entry("integration / s", "starting\n", "SKIP")], "0 passed, 1 failed, 0 skipped", 1)
case("a crash after passing cases is one failure",
     [entry("unit / t", "TAP version 13\n1..3\nok 1 - a\n", "ERROR")],
     "1 passed, 1 failed, 0 skipped", 1)
case("the expected list matches", [entry("unit / t", TAP2), entry("integration / s", "PASS\n")],
     "3 passed, 0 failed, 0 skipped", 0, expected="t 2\ns -\n")
case("a test that vanished fails", [entry("unit / t", TAP2)],
     "2 passed, 1 failed, 0 skipped", 1, "'s' did not run", expected="t 2\ns -\n")
case("a test not in the list fails", [entry("unit / t", TAP2), entry("integration / s", "PASS\n")],
     "3 passed, 1 failed, 0 skipped", 1, "'s' ran but is not in", expected="t 2\n")
case("a case that vanished fails", [entry("unit / t", TAP2)],
     "2 passed, 1 failed, 0 skipped", 1, "'t' ran 2 cases", expected="t 3\n")
sys.exit(1 if failures else 0)
