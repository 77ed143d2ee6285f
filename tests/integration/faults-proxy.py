#!/usr/bin/env python3
# A migration-channel relay for the fault matrix: forwards every connection on
# LISTEN to TARGET both ways, withholds the first connection's RP_ACK records
# (the destination's switchover-acks) so the source waits for them for good
# (unless --pass-acks), and closes everything on SIGUSR1 (the migration
# connection is cut).
# usage: faults-proxy.py LISTEN_PATH TARGET_PATH [--pass-acks]
import os
import signal
import socket
import struct
import sys
import threading

RP_ACK = 64          # lib/migration/stream.h, docs/stream-format.md
HDR = 24             # record header: u16 type, u16 flags, u32 section, u32 length, ...

listen_path, target_path = sys.argv[1], sys.argv[2]
hold_acks = "--pass-acks" not in sys.argv[3:]
socks = []
lock = threading.Lock()


def say(msg):
    print("proxy: " + msg, flush=True)


def close_pair(a, b):
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def relay(src, dst, pair):
    """Copies bytes until either side ends; then cuts both (a dead peer)."""
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    close_pair(*pair)


def relay_rp(src, dst, pair):
    """The main connection's return path: whole records, RP_ACK withheld."""
    buf = b""
    held = 0
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            buf += data
            out = b""
            while len(buf) >= HDR:
                rtype, _, section, length = struct.unpack_from("<HHII", buf)
                if len(buf) < HDR + length:
                    break
                if rtype == RP_ACK:
                    held += 1
                    say("held RP_ACK for section %u (%u held)" % (section, held))
                else:
                    out += buf[:HDR + length]
                buf = buf[HDR + length:]
            if out:
                dst.sendall(out)
    except OSError:
        pass
    close_pair(*pair)


def cut(*_):
    say("cutting every connection")
    with lock:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    os._exit(0)


signal.signal(signal.SIGUSR1, cut)
ls = socket.socket(socket.AF_UNIX)
ls.bind(listen_path)
ls.listen(16)
n = 0
while True:
    c, _ = ls.accept()
    t = socket.socket(socket.AF_UNIX)
    try:
        t.connect(target_path)
    except OSError as e:
        say("cannot reach %s: %s" % (target_path, e))
        c.close()
        continue
    with lock:
        socks.extend((c, t))
    pair = (c, t)
    # The source opens the main channel first, multifd channels after it.
    back = relay_rp if n == 0 and hold_acks else relay
    threading.Thread(target=relay, args=(c, t, pair), daemon=True).start()
    threading.Thread(target=back, args=(t, c, pair), daemon=True).start()
    say("connection %u relayed" % n)
    n += 1
