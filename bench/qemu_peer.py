#!/usr/bin/env python3
"""The QEMU peer row of docs/performance.md: the same KVM guest program
(QEMU boots lib/guest-mb.img, vfiomig runs its embedded image), same RAM,
vCPUs, working set, dirty rate, downtime limit and kind of channel (UNIX
socket), migrated by Debian's qemu-system-x86_64 and by `vfiomig vm --guest
kvm`; medians of N runs and the ratios vfiomig / QEMU.

usage: qemu_peer.py BUILD_DIR [--runs N] [--json]
run.py imports section() for its "## 8. Peer: QEMU".

Each run also measures the blackout as the guest sees it: the guest's vCPU 0
writes a heartbeat byte to port 0xe8 every HEARTBEAT_US (guest/guest.c); QEMU
forwards it through an isa-debugcon on a socket chardev, vfiomig through `vm
--heartbeat`, both to one observer (bench/vfm-heartbeat) that timestamps
every beat. Blackout = the longest silence over both sockets during the
migration, the same measure for both VMMs.
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
RAM_MIB = 256
WS = 4 * MiB
RATE = 4 * MiB              # bytes/s the guest rewrites
DOWNTIME_LIMIT_MS = 300
MAX_BW = 100 << 30          # QEMU's default cap is 128 MiB/s; vfiomig has none
MAILBOX = 0x1000
VCPU0 = MAILBOX + 0x80      # struct kg_vcpu_stats of vCPU 0 (guest/abi.h)
BOOT_TIMEOUT = 60
HEARTBEAT_US = 1000
HEARTBEAT_PORT = 0xe8       # KG_PORT_HEARTBEAT, guest/abi.h
GAPS_MS = 2                 # silences longer than this are listed per run (--json)

# The explanation under section 8's tables (docs/performance.md): what the
# traces of these runs showed and what was changed (issue 19). Static text;
# the figures it quotes were measured as it says.
NOTES = """
### Where the silences come from

Found with the kernel's trace (`sched_switch`, `sched_wakeup`, `kvm_pio` at port 0xe8 for
each beat as the vCPU thread wrote it, `trace_clock` mono) over single bench runs, and the
observer's list of every silence over 2 ms (`vfm-heartbeat --gaps 2`, in `--json`), each
silence put down to what the vCPU thread was doing (sleeping, or runnable and waiting) and who
held the two CPUs meanwhile (the VMs' own threads or other processes).

- **The vCPU never slept (fixed).** An idle exit (port 0xe0) waited on a condition variable
  timed on `CLOCK_REALTIME` with a `CLOCK_MONOTONIC` deadline: every wait timed out at once,
  so the vCPU thread went back into the guest, which asked to idle again 30-250 µs later.
  Always runnable at 100 % of a CPU, it was time-sliced (1.4 ms slices) against the source's
  multifd threads and the destination's receiving threads: silences of 3-12 ms on the source
  during the first pass, and on the destination whenever anything else wanted its CPU (the
  `dst-dst` silences 300-400 ms after the start of earlier runs came after the migration,
  with the destination's vCPU spinning; in traces since, every `dst-dst` silence over 2 ms
  had other processes on both CPUs). The wait now sleeps (monotonic
  clock); `guest.kvm.idle_early` counts a wait that times out early and stays 0 (tests `kvm`
  `idle_vcpus_sleep_and_are_scheduled_as_asked`, `vm_heartbeat`).
- **The destination's quick check read every word of the working set inside the downtime
  (fixed).** 1024 pages, ~0.9 ms (the "dst check" column of earlier runs). It samples three
  words a page now (the page being rewritten whole), as the synthetic guest's does: a lost
  page differs in every word; `guest-verify` still reads every word after the migration.
- **The destination's multifd wait woke at every RAM packet (fixed).** The main thread
  waiting for the channels' RAM (drain PING, RAM end marker) and a channel thread took turns
  on one CPU every 2-3 µs: ~600-750 context switches per migration, 0.5 ms of them inside
  the switchover, the rest taking CPU from the source's vCPU during the drain. A channel
  now wakes the waiter when it reaches the count waited for: ~20 switches (test
  `multifd_ram` `ram_end_wait_wakes_per_channel_not_per_packet`: 2 wakeups for 2 x 40
  packets, 20 with a wakeup per packet).
- **The guest's clock stood still from the source's MSR read to the destination's load
  (fixed).** The TSC was restored as saved (QEMU 7.2 does the same), so the guest's next
  beat (and any timer) came that much late after the resume. It is moved on by the time
  since, the procedure of the kernel's `KVM_VCPU_TSC_OFFSET` documentation
  (`guest.kvm.tsc_advance_ms`).
- **vCPU threads ask for 100 µs scheduler slices** (`vm --vcpu-slice-us`, EEVDF's custom
  slice), so that a vCPU waking from an idle wait can preempt a busy thread; its share of the
  CPU is unchanged. Its effect could not be told apart from this host's load in A/B runs
  (blackout medians 10.4 ms with it, 16.2 ms without, 8 alternated runs each at load ~4, but
  silences before the migration varied 7-70 ms in both).
- **Not causes:** `guest-verify` runs after the window (the bench calls it after the
  observer's end mark), and nothing pauses the destination's vCPUs after the resume
  (`guest.kvm.pauses` is 0 until a verify, test `vm_heartbeat`); the heartbeat is sent
  from the vCPU thread with a non-blocking `send()` (~15 µs from the beat's exit to the next
  `KVM_RUN` in the traces); the destination does no RAM work after the resume (its memory is
  populated before it listens; the full check runs only on `guest-verify`); first touches
  and dirty-log write faults show as vCPU run time, not as silences; the stop's kick takes
  0.1-0.4 ms (`guest_stop`).
- **The destination read a first pass's 256 MiB of zero pages (fixed).** Its memory is
  populated before it listens, so every zero run was resident and read whole to test it
  (`vfm__guest_is_zero`, 4096 bytes compared per zero page): both channel threads on both
  CPUs for ~30-50 ms, and a source vCPU that ran just before waited its lag out (EEVDF)
  behind them: 4-5 ms silences on the source early in the migration. The destination now
  notes its memfd's holes before it populates it (`SEEK_HOLE`/`SEEK_DATA`); those pages are
  known zero until a data run writes them, and a zero run over known-zero pages does nothing
  (QEMU's multifd does the same with its `receivedmap`); others are still tested and cleared.
  `perf record -a -g`, one migration each: the destination's channel threads 55.8 ms of CPU
  (51.0 ms in `vfm__guest_is_zero`) → 8.5 ms (0.8 ms); vfiomig's total time (median of 5)
  43 → 8 ms in alternated runs (test `multifd_ram` `zero_runs_over_fresh_memory_are_not_read`: 11 pages read of 277,
  277 before). The source already sent never-written pages as header-only zero runs, unread.
- **Left:** the rest of the silences in loaded runs are other processes (other sessions'
  autogroups, which no nice value or slice of ours reaches): most of vfiomig's longest
  silences are now the switch itself or the destination's vCPU after the resume (`dst-dst`,
  with 7-65 silences over 2 ms in the loaded runs and 0-5 in the others).

Why the switch gap is longer than the reported downtime: the source's last beat comes up
to one beat period (1 ms) before the stop, the guest having nothing to send in between
(the same for QEMU); the destination stamps its resume when it lets the vCPUs go, and the
vCPU thread's wakeup and first `KVM_RUN` come after (0.02-0.2 ms in the traces, more under
load); the guest's clock stood still between the MSR read and the load (fixed, above); and
the observer reads each beat a little late. QEMU's own downtime leaves out the
destination's load and start, so its switch gap exceeds it by more.
"""


def raise_prio():
    """The observer timestamps beats as it reads them: ahead of the VMs and of
    whatever else runs on the host, where allowed: SCHED_FIFO (it sleeps in
    poll() but for a read per beat; nice alone loses to other sessions'
    autogroups), else nice -10. The same for both VMMs."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return
    except (OSError, AttributeError):
        pass
    try:
        os.nice(-10)
    except OSError:
        pass


class Observer:
    """bench/vfm-heartbeat on two sockets; mark() brackets the migration."""

    def __init__(self, exe, tmp):
        self.src = os.path.join(tmp, 'hb-src.sock')
        self.dst = os.path.join(tmp, 'hb-dst.sock')
        self.p = subprocess.Popen([exe, self.src, self.dst, '--timeout', '300',
                                   '--gaps', str(GAPS_MS)],
                                  stdout=subprocess.PIPE, text=True, preexec_fn=raise_prio)
        if self.p.stdout.readline().strip() != 'ready':
            self.p.kill()
            raise RuntimeError('heartbeat observer did not start')

    def start(self):
        self.p.send_signal(10)      # SIGUSR1: the migration starts

    def end(self):
        self.p.send_signal(12)      # SIGUSR2: the destination runs

    def result(self):
        if self.p.poll() is None:
            self.p.terminate()
        out = self.p.communicate(timeout=10)[0]
        return json.loads(out)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Qmp:
    """A line-oriented QMP client; QEMU and `vfiomig vm --control` both speak it."""

    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.settimeout(timeout)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile('rwb')
        json.loads(self.f.readline())          # greeting
        self.cmd('qmp_capabilities')

    def cmd(self, name, **args):
        msg = {'execute': name}
        if args:
            msg['arguments'] = args
        self.f.write((json.dumps(msg) + '\n').encode())
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError('%s: connection closed' % name)
            r = json.loads(line)
            if 'event' in r:
                continue
            if 'error' in r:
                raise RuntimeError('%s: %s' % (name, r['error'].get('desc')))
            return r['return']

    def close(self):
        self.s.close()


def kg_mix(x):
    M = (1 << 64) - 1
    x ^= x >> 33
    x = (x * 0xff51afd7ed558ccd) & M
    x ^= x >> 33
    x = (x * 0xc4ceb9fe1a85ec53) & M
    x ^= x >> 33
    return x


def kg_page_word(p, gen):
    M = (1 << 64) - 1
    return (kg_mix(((p << 20) ^ (gen << 40) ^ 0x9e3779b97f4a7c15) & M) | 1) if gen else 0


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def migrate(s, uri, who, error_key):
    """Starts a migration over QMP and polls query-migrate to its end; the last answer."""
    s.cmd('migrate', uri=uri)
    info = {}

    def done():
        info.update(s.cmd('query-migrate'))
        if info.get('status') == 'failed':
            raise RuntimeError('%s migration failed: %s' % (who, info.get(error_key)))
        return info.get('status') == 'completed'
    wait_for(done, 120, who + ' migration')
    return info


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise RuntimeError('timed out waiting for ' + what)
        time.sleep(0.1)


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, cmd, log):
        p = subprocess.Popen(cmd, stdout=open(log, 'w'), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def qemu_read_u64(q, gpa):
    out = q.cmd('human-monitor-command', **{'command-line': 'xp /1gx 0x%x' % gpa})
    return int(out.split(':')[1].split()[0], 16)


def qemu_verify(q, tmp):
    """Stopped destination: every working-set page holds its generation's
    value, as the host check of vmm/kvm_check.c (the in-flight page may hold
    either generation's). Returns (ok, detail)."""
    def dump(gpa, size):
        path = os.path.join(tmp, 'dump.bin')
        q.cmd('pmemsave', val=gpa, size=size, filename=path)
        with open(path, 'rb') as f:
            return f.read()
    mb = dump(MAILBOX, 4096)
    magic, _ver, _n, table_gpa, ws_gpa, ws_pages = struct.unpack_from('<QIIQQQ', mb, 0)
    if magic != 0x314753454d4b4656:
        return False, 'mailbox magic 0x%x' % magic
    written, inflight_page, inflight_gen = struct.unpack_from('<QQQ', mb, VCPU0 - MAILBOX)
    table = struct.unpack('<%dQ' % ws_pages, dump(table_gpa, ws_pages * 8))
    ws = dump(ws_gpa, ws_pages * 4096)
    base = ws_gpa // 4096
    bad = 0
    for i in range(ws_pages):
        p = base + i
        page = ws[i * 4096:(i + 1) * 4096]
        if page == struct.pack('<Q', kg_page_word(p, table[i])) * 512:
            continue
        if p == inflight_page:
            new, old = kg_page_word(p, inflight_gen), kg_page_word(p, table[i])
            words = struct.unpack('<512Q', page)
            if all(w in (new, old) for w in words):
                continue
        bad += 1
    return bad == 0, '%d pages, %d bad, %d rewrites' % (ws_pages, bad, written)


def qemu_version(qemu):
    p = subprocess.run([qemu, '--version'], capture_output=True, text=True)
    return p.stdout.splitlines()[0] if p.stdout else '?'


def hb_result(obs, res):
    """The observer's verdict into a run's result."""
    hb = obs.result()
    res.update({'blackout_ms': hb['blackout_ms'], 'switch_ms': hb['switch_ms'],
                'before_max_gap_ms': hb['before_max_gap_ms'],
                'blackout_between': hb['blackout_between'],
                'blackout_at_ms': hb['blackout_at_ms'] - hb['window_ms'][0],
                'beats': (hb['src']['beats'], hb['dst']['beats']),
                # every silence > GAPS_MS, ms from the migration's start
                'gaps': [dict(g, at_ms=round(g['at_ms'] - hb['window_ms'][0], 3))
                         for g in hb.get('gaps', [])],
                'dst_first_ms': hb['dst']['first_ms'] - hb['window_ms'][0],
                'beat_period_ms': hb['src']['median_gap_ms']})
    return res


def qemu_run(qemu, img, tmp, hb_exe):
    """One QEMU migration: source and -incoming destination on UNIX sockets."""
    procs = Procs()
    obs = Observer(hb_exe, tmp)
    base = ['-enable-kvm', '-m', str(RAM_MIB), '-smp', '1', '-nodefaults', '-no-reboot',
            '-display', 'none', '-monitor', 'none', '-serial', 'none', '-kernel', img,
            '-append', 'ws=%d rate=%d hb=%d' % (WS, RATE, HEARTBEAT_US)]

    def heartbeat(path):
        return ['-chardev', 'socket,id=hb,path=' + path,
                '-device', 'isa-debugcon,iobase=0x%x,chardev=hb' % HEARTBEAT_PORT]
    con_s, con_d = os.path.join(tmp, 'src.console'), os.path.join(tmp, 'dst.console')
    qmp_s, qmp_d = os.path.join(tmp, 'src.qmp'), os.path.join(tmp, 'dst.qmp')
    mig = os.path.join(tmp, 'mig.sock')
    for f in (con_s, con_d, qmp_s, qmp_d, mig):
        if os.path.exists(f):
            os.unlink(f)
    try:
        src = procs.start([qemu] + base + heartbeat(obs.src) + ['-debugcon', 'file:' + con_s,
                                           '-qmp', 'unix:%s,server=on,wait=off' % qmp_s],
                          os.path.join(tmp, 'src.log'))
        procs.start([qemu] + base + heartbeat(obs.dst) + ['-debugcon', 'file:' + con_d,
                                     '-qmp', 'unix:%s,server=on,wait=off' % qmp_d,
                                     '-incoming', 'unix:' + mig],
                    os.path.join(tmp, 'dst.log'))

        def booted():
            if src.poll() is not None:
                raise RuntimeError('qemu exited: ' + open(os.path.join(tmp, 'src.log')).read())
            return os.path.exists(con_s) and 'long mode' in open(con_s).read()
        wait_for(booted, BOOT_TIMEOUT, 'the guest console line')
        s, d = Qmp(qmp_s), Qmp(qmp_d)
        w0 = qemu_read_u64(s, VCPU0)
        time.sleep(1.0)         # steady dirtying before the migration starts
        rate = (qemu_read_u64(s, VCPU0) - w0) * 4096 / 1.0
        s.cmd('migrate-set-parameters', **{'downtime-limit': DOWNTIME_LIMIT_MS,
                                           'max-bandwidth': MAX_BW})
        obs.start()
        info = migrate(s, 'unix:' + mig, 'qemu', 'error-desc')
        wait_for(lambda: d.cmd('query-status')['status'] == 'running', 30, 'destination running')
        time.sleep(0.5)     # the destination's first half second counts too
        obs.end()
        d0 = qemu_read_u64(d, VCPU0)
        time.sleep(0.5)
        resumed = qemu_read_u64(d, VCPU0) > d0
        d.cmd('stop')
        ok, detail = qemu_verify(d, tmp)
        panicked = 'PANIC' in open(con_d).read() + open(con_s).read()
        s.close()
        d.close()
        return hb_result(obs, {
                'downtime_ms': float(info['downtime']), 'total_time_ms': float(info['total-time']),
                'setup_time_ms': float(info.get('setup-time', 0)),
                'transferred_bytes': info['ram']['transferred'],
                'iterations': info['ram'].get('dirty-sync-count', 0),
                'dirty_rate_measured': rate, 'dst_check_ms': 0.0,
                'verified': ok and resumed and not panicked,
                'detail': detail + ('' if resumed else ', guest not running after migration')
                + (', PANIC on console' if panicked else '')})
    finally:
        procs.stop()
        obs.kill()


def vfiomig_run(vfiomig, tmp, hb_exe):
    """One vfiomig migration of the same guest: `vfiomig vm --guest kvm`."""
    procs = Procs()
    obs = Observer(hb_exe, tmp)
    base = [vfiomig, 'vm', '--mem', '%dM' % RAM_MIB, '--guest', 'kvm', '--vcpus', '1',
            '--working-set', str(WS), '--dirty-rate', str(RATE),
            '--heartbeat-us', str(HEARTBEAT_US)]
    ctl_s, ctl_d = os.path.join(tmp, 'src.ctl'), os.path.join(tmp, 'dst.ctl')
    mig = os.path.join(tmp, 'vmig.sock')
    for f in (ctl_s, ctl_d, mig):
        if os.path.exists(f):
            os.unlink(f)
    try:
        procs.start(base + ['--heartbeat', obs.src, '--control', ctl_s],
                    os.path.join(tmp, 'vsrc.log'))
        procs.start(base + ['--heartbeat', obs.dst, '--control', ctl_d, '--incoming', 'unix:' + mig],
                    os.path.join(tmp, 'vdst.log'))
        s, d = Qmp(ctl_s), Qmp(ctl_d)
        wait_for(lambda: s.cmd('query-vfiomig')['guest'].get('page_writes', 0) > 0,
                 BOOT_TIMEOUT, 'the vfiomig guest writing')
        w0 = s.cmd('query-vfiomig')['guest']['page_writes']
        time.sleep(1.0)
        rate = (s.cmd('query-vfiomig')['guest']['page_writes'] - w0) * 4096 / 1.0
        s.cmd('migrate-set-parameters', **{'downtime-limit': DOWNTIME_LIMIT_MS})
        obs.start()
        info = migrate(s, 'unix:' + mig, 'vfiomig', 'error')
        wait_for(lambda: d.cmd('query-status')['status'] == 'running', 30, 'destination running')
        time.sleep(0.5)
        obs.end()
        quick = (d.cmd('query-vfiomig')['guest'].get('quick') or {}).get('verify_ms') or 0.0
        g = d.cmd('guest-verify')
        s.close()
        d.close()
        return hb_result(obs, {
                'switchover_ms': info.get('switchover_ms') or {},
                'downtime_ms': info['downtime_ms'], 'total_time_ms': float(info['total_time_ms']),
                'setup_time_ms': float(info.get('setup_time_ms', 0)),
                'transferred_bytes': info['transferred_bytes'],
                'iterations': info.get('precopy_iterations', 0),
                'dirty_rate_measured': rate, 'verified': bool(g.get('verified')),
                'dst_check_ms': quick,
                'detail': g.get('detail', '')})
    finally:
        procs.stop()
        obs.kill()


def loadavg():
    try:
        return open('/proc/loadavg').read().split()[0]
    except OSError:
        return '?'


def in_window(r):
    """A run's silences > GAPS_MS from the migration's start to half a second
    after the destination's first beat (the blackout's window)."""
    end = r['dst_first_ms'] + 500
    return [g for g in r.get('gaps', []) if g['at_ms'] + g['ms'] > 0 and g['at_ms'] < end]


def gap_summary(r):
    """Silences > GAPS_MS in the window: on the source, the switch, the destination."""
    w = in_window(r)
    n = {k: [g['ms'] for g in w if g['between'] == k] for k in ('src-src', 'src-dst', 'dst-dst')}
    return 'silences > %d ms: %d src (max %.1f), %d dst (max %.1f)' % (
        GAPS_MS, len(n['src-src']), max(n['src-src'] or [0]), len(n['dst-dst']),
        max(n['dst-dst'] or [0]))


def measure(build, vfiomig=None, runs=3):
    qemu = shutil.which('qemu-system-x86_64')
    img = os.path.join(build, 'lib', 'guest-mb.img')
    vfiomig = vfiomig or os.path.join(build, 'tools', 'vfiomig')
    hb_exe = os.path.join(build, 'bench', 'vfm-heartbeat')
    res = {'ram_mib': RAM_MIB, 'working_set': WS, 'dirty_rate': RATE,
           'downtime_limit_ms': DOWNTIME_LIMIT_MS, 'runs': runs}
    if not qemu:
        res['error'] = 'qemu-system-x86_64 not installed (scripts/deps.sh --bench installs it)'
        return res
    if not os.access('/dev/kvm', os.R_OK | os.W_OK):
        res['error'] = '/dev/kvm is not usable here'
        return res
    if not os.path.exists(img):
        res['error'] = '%s not built' % img
        return res
    res['qemu_version'] = qemu_version(qemu)
    res['load_before'] = loadavg()
    with tempfile.TemporaryDirectory(prefix='vfm-qemupeer-') as tmp:
        res['qemu'], res['vfiomig'] = [], []
        # Alternated, so that a change in the host's load falls on both.
        for i in range(runs):
            for name, fn in (('qemu', lambda: qemu_run(qemu, img, tmp, hb_exe)),
                             ('vfiomig', lambda: vfiomig_run(vfiomig, tmp, hb_exe))):
                try:
                    r = fn()
                except (RuntimeError, OSError, KeyError, ValueError) as e:
                    res.setdefault('errors', []).append('%s run %d: %s' % (name, i + 1, e))
                    continue
                print('  peer %s run %d: downtime %.1f ms, blackout %.1f ms (%s, %.0f ms after '
                      'the start), total %.0f ms, verified %s; %s; load %s' % (
                          name, i + 1, r['downtime_ms'], r['blackout_ms'], r['blackout_between'],
                          r['blackout_at_ms'], r['total_time_ms'], r['verified'],
                          gap_summary(r), loadavg()), flush=True)
                res[name].append(r)
    res['load_after'] = loadavg()
    return res


def blackout_lines(r):
    """The blackout rows (issue 19): the same observer for both VMMs."""
    w = ['\n### Blackout as the guest sees it (heartbeat)\n',
         'The guest\'s vCPU 0 writes a byte to port 0x%x every %d µs; QEMU forwards it with an '
         '`isa-debugcon` on a socket chardev, vfiomig with `vm --heartbeat`; one observer '
         '(`bench/vfm-heartbeat`) timestamps every beat from the source\'s and the '
         'destination\'s socket. Blackout = the longest silence over both sockets between the '
         'migration\'s start and half a second after the destination runs (silences clipped to that window); switch gap = the '
         'destination\'s first beat minus the source\'s last. Same runs as above.\n' %
         (HEARTBEAT_PORT, HEARTBEAT_US),
         '| peer | blackout ms (runs) | switch gap ms (runs) | own downtime ms | longest gap '
         'before the migration ms | silences > %d ms in the window, src / dst (median) | '
         'beats src/dst |' % GAPS_MS,
         '|---|---|---|---:|---:|---|---|']
    meds = {}
    for name in ('qemu', 'vfiomig'):
        xs = [x for x in r.get(name) or [] if 'blackout_ms' in x]
        if not xs:
            w.append('| %s | failed | | | |' % name)
            continue
        b = median([x['blackout_ms'] for x in xs])
        meds[name] = b
        sw = [x['switch_ms'] for x in xs if x.get('switch_ms') is not None]
        meds[name + '_switch'] = median(sw) if sw else 0
        w.append('| %s | %.1f (%s) | %s (%s) | %.1f | %.1f | %d / %d | %s |' % (
            'QEMU' if name == 'qemu' else 'vfiomig', b,
            ', '.join('%.1f' % x['blackout_ms'] for x in xs),
            '%.1f' % median(sw) if sw else '—', ', '.join('%.1f' % v for v in sw),
            median([x['downtime_ms'] for x in xs]),
            median([x['before_max_gap_ms'] for x in xs]),
            median([sum(1 for g in in_window(x) if g['between'] == 'src-src') for x in xs]),
            median([sum(1 for g in in_window(x) if g['between'] == 'dst-dst') for x in xs]),
            ', '.join('%d/%d' % tuple(x['beats']) for x in xs)))
    if 'qemu' in meds and 'vfiomig' in meds and meds['qemu'] > 0:
        w.append('\nBlackout ratio vfiomig / QEMU (medians): **%.2f** (goal ≤ 0.5); switch gap '
                 'ratio **%.2f**.' % (meds['vfiomig'] / meds['qemu'],
                                      meds['vfiomig_switch'] / meds['qemu_switch']
                                      if meds.get('qemu_switch') else float('inf')))
    tl = [x['switchover_ms'] for x in r.get('vfiomig') or [] if x.get('switchover_ms')]
    if tl:
        w.append('\nvfiomig\'s switchover step by step (`query-migrate` `switchover_ms`, '
                 'medians over the runs, ms):\n')
        keys = list(tl[0].keys())
        w.append('| ' + ' | '.join(keys) + ' |')
        w.append('|' + '---:|' * len(keys))
        w.append('| ' + ' | '.join('%.2f' % median([t.get(k, 0) for t in tl]) for k in keys)
                 + ' |')
    w.append('')
    return w


def section(build, vfiomig=None, runs=3):
    """The markdown lines of run.py's section 8."""
    r = measure(build, vfiomig, runs)
    w = []
    w.append('## 8. Peer: QEMU\n')
    w.append('The same guest program (`guest/guest.c`) in both: QEMU boots it as a multiboot '
             'image (`lib/guest-mb.img`, `-kernel`, console on debugcon 0xe9), vfiomig runs it '
             'embedded (`vfiomig vm --guest kvm`). Both: %d MiB RAM, 1 vCPU, KVM, a %d MiB '
             'working set rewritten at %d MiB/s by the guest itself (KVM dirty log), '
             'downtime-limit %d ms, source and destination processes on this host over a UNIX '
             'socket, no devices; QEMU\'s max-bandwidth raised from its 128 MiB/s default to '
             'unlimited as vfiomig\'s. Median of %d runs each, alternated (QEMU, vfiomig, QEMU, ...) so that the host\'s load falls on both; downtime and total time are each '
             'tool\'s own report. Each destination is checked after the migration (QEMU: the '
             'destination is stopped and its working set, table and mailbox read with '
             '`pmemsave` and checked as `vmm/kvm_check.c` does; vfiomig: `guest-verify`). '
             'The two downtimes are not measured the same way: QEMU 7.2 reports its source\'s '
             '(guest stopped to the last byte sent; the destination\'s final load and start '
             'come after), vfiomig from the source\'s stop to the destination\'s guest running, '
             'including the destination\'s quick guest check (its own column).\n' %
             (r['ram_mib'], r['working_set'] // MiB, r['dirty_rate'] // MiB,
              r['downtime_limit_ms'], r['runs']))
    if 'error' in r:
        w.append('Not measured: %s.\n' % r['error'])
        return w
    w.append('QEMU: %s. Load average (1 min) %s before the runs, %s after (2 CPUs).\n' % (
        r['qemu_version'], r.get('load_before', '?'), r.get('load_after', '?')))
    rows = {}
    w.append('| peer | downtime ms (runs) | total time ms (runs) | setup ms | bytes sent | '
             'measured dirty MB/s | dst check in downtime ms | verified |')
    w.append('|---|---|---|---:|---:|---:|---:|---|')
    for name in ('qemu', 'vfiomig'):
        xs = r.get(name) or []
        if not xs:
            w.append('| %s | failed | | | | | | |' % name)
            continue
        dt = median([x['downtime_ms'] for x in xs])
        tt = median([x['total_time_ms'] for x in xs])
        rows[name] = (dt, tt)
        w.append('| %s | %.1f (%s) | %.0f (%s) | %.0f | %.1f MB | %.1f | %s | %s |' % (
            'QEMU' if name == 'qemu' else 'vfiomig', dt,
            ', '.join('%.1f' % x['downtime_ms'] for x in xs), tt,
            ', '.join('%.0f' % x['total_time_ms'] for x in xs),
            median([x['setup_time_ms'] for x in xs]),
            median([x['transferred_bytes'] for x in xs]) / 1e6,
            median([x['dirty_rate_measured'] for x in xs]) / 1e6,
            '%.1f' % median([x['dst_check_ms'] for x in xs]) if name == 'vfiomig' else '—',
            '%d of %d' % (sum(1 for x in xs if x['verified']), len(xs))))
    if 'qemu' in rows and 'vfiomig' in rows:
        q, v = rows['qemu'], rows['vfiomig']
        w.append('\nRatios vfiomig / QEMU (medians; < 1 means vfiomig is faster): downtime '
                 '**%.2f**, total time **%.2f**.' % (v[0] / q[0] if q[0] else float('inf'),
                                                     v[1] / q[1] if q[1] else float('inf')))
    for e in r.get('errors', []):
        w.append('\n- error: %s' % e)
    w.append('')
    w.extend(blackout_lines(r))
    w.append('Measured %s UTC by `bench/qemu_peer.py BUILD --runs %d`; load average (1 min) %s '
             'before the runs and %s after on this 2-CPU host shared with other work.' % (
                 time.strftime('%Y-%m-%d %H:%M', time.gmtime()), r['runs'],
                 r.get('load_before', '?'), r.get('load_after', '?')))
    w.extend(NOTES.splitlines())
    return w


def main():
    build = sys.argv[1]
    runs = int(sys.argv[sys.argv.index('--runs') + 1]) if '--runs' in sys.argv else 3
    if '--json' in sys.argv:
        print(json.dumps(measure(build, None, runs)))
    else:
        print('\n'.join(section(build, None, runs)))


if __name__ == '__main__':
    main()
