#!/usr/bin/env python3
"""Handshake cost of a server of several clients (dsvpn._multi) by the number of peers.

A server of a peers file finds the client of a hello by trying each peer's key in turn, so a
handshake costs more the further down the file its peer is, and a hello under an unknown key
costs the whole file. This measures, over loopback TCP without root, the time from a client's
hello to the server's reply (connect, accept and the reply included), for the first peer, the
last one, and an unknown key (refused once every key was tried), with 1, 100 and 10,000
peers; and the server's cost per peer tried, from the difference. The unknown key's hello is
followed by the 32 bytes that would complete a forward-secret hello: 72 bytes alone could be
the start of one, which the server waits for until its deadline; with all 104 it refuses at
once, after trying every peer's classic and then every forward-secret state (two trials per
peer, the worst case).

    PYTHONPATH=src python ci/bench_handshake.py [--peers 1,100,10000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import time

from dsvpn import charm
from dsvpn._multi import MultiLoop

KX_IV = b"VPN Key Exchange"


def hello(key: bytes) -> bytes:
    kx = charm.Charm(key, KX_IV)
    body = os.urandom(32) + struct.pack("<Q", int(time.time()))
    return body + kx.hash(body)


def one(loop: MultiLoop, lst: socket.socket, key: bytes, unknown: bool) -> float:
    """Seconds from the hello to the reply (or to the refusal, for an unknown key)."""
    c = socket.create_connection(lst.getsockname())
    c.setblocking(False)
    pkt1 = hello(key) + (bytes(32) if unknown else b"")
    t0 = time.perf_counter()
    c.sendall(pkt1)
    got = b""
    while True:
        loop.run(0)
        try:
            chunk = c.recv(64)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
        if len(got) == 64:
            break
    elapsed = time.perf_counter() - t0
    c.close()
    # drain the session's end (or the refusal's log line)
    for _ in range(3):
        loop.run(0)
    return elapsed


def measure(n: int, rounds: int) -> dict[str, float]:
    keys = [os.urandom(32) for _ in range(n)]
    prefix = 16 if n > 250 else 24
    pool = "10.0.0.0/16" if prefix == 16 else "10.0.0.0/24"
    peers = [(f"p{i}", k, f"10.0.{(i + 1) // 256}.{(i + 1) % 256}") for i, k in enumerate(keys)]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    loop = MultiLoop(a.fileno(), listen_fd=lst.fileno(), pool=pool)
    t0 = time.perf_counter()
    loop.set_peers(peers)
    load = time.perf_counter() - t0
    out = {"set_peers_ms": load * 1000}
    stranger = os.urandom(32)
    for label, key in (("first", keys[0]), ("last", keys[-1]), ("unknown", stranger)):
        times = [one(loop, lst, key, label == "unknown") for _ in range(rounds)]
        out[label] = statistics.median(times) * 1000
    loop.close()
    for s in (a, b, lst):
        s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="1,100,10000")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    counts = [int(x) for x in args.peers.split(",")]
    print(f"charm kernel: {charm.KERNEL}; median of {args.rounds} handshakes, milliseconds")
    print(f"{'peers':>7} {'set_peers':>10} {'first peer':>11} {'last peer':>10} {'unknown':>9}")
    rows = {}
    for n in counts:
        r = rows[n] = measure(n, args.rounds)
        print(
            f"{n:>7} {r['set_peers_ms']:>10.2f} {r['first']:>11.3f} {r['last']:>10.3f} "
            f"{r['unknown']:>9.3f}"
        )
    big = max(counts)
    if big > 1:
        per = (rows[big]["unknown"] - rows[min(counts)]["unknown"]) / (big - min(counts))
        print(f"cost per peer of an unknown key (both trials): about {per * 1000:.2f} microseconds")


if __name__ == "__main__":
    main()
