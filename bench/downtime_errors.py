#!/usr/bin/env python3
"""Where the expected downtime misses, from the downtime section's every run.

usage: downtime_errors.py BUILD_DIR/bench-downtime-runs.json

bench/run.py's downtime section writes each run's expected and measured
switchover, step by step. This prints, per row, the median measured and
expected downtime and, per step, the median of (expected - measured) in ms;
then over every run: the median per-run error (expected - measured) /
measured and the median of its absolute value (docs/performance.md,
section 4, reports these).
"""
import json
import statistics
import sys

STEPS = ['guest_stop', 'device_stop', 'final_sync', 'last_bytes', 'dest_load', 'go',
         'dest_resume']


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if len(sys.argv) == 2 else 2
    try:
        with open(sys.argv[1]) as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        print('downtime_errors: %s: %s' % (sys.argv[1], e), file=sys.stderr)
        return 1
    errs = []
    print('%-7s %-5s %4s %8s %8s %6s  ' % ('rate', 'state', 'runs', 'meas', 'exp', 'err') +
          ' '.join('%11s' % s for s in STEPS))
    for row in rows:
        runs = [r for r in row['runs'] if r.get('switchover_ms') and
                r.get('expected_switchover_ms') and r['downtime_ms'] > 0]
        if not runs:
            continue
        meas = statistics.median(r['downtime_ms'] for r in runs)
        exp = statistics.median(r['expected_downtime_ms'] for r in runs)
        for r in runs:
            errs.append((r['expected_downtime_ms'] - r['downtime_ms']) / r['downtime_ms'])
        diffs = [statistics.median(r['expected_switchover_ms'][i] - r['switchover_ms'][i]
                                   for r in runs) for i in range(len(STEPS))]
        print('%-7s %-5s %4d %8.2f %8.2f %+5.0f%%  ' % (
            row['rate'], row['state'], len(runs), meas, exp, 100 * (exp - meas) / meas) +
            ' '.join('%+11.3f' % d for d in diffs))
    if errs:
        print('per-run error: median %+.0f%%, median |error| %.0f%% (%d runs)' % (
            100 * statistics.median(errs), 100 * statistics.median(abs(e) for e in errs),
            len(errs)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
