#!/usr/bin/env python3
"""Quick data-plane benchmark of dsvpn._loop without root: two Loops over loopback TCP.

tun stand-ins are AF_UNIX SOCK_SEQPACKET pairs; a forked feeder writes packets into the client's
"tun", a forked sink counts what comes out of the server's. Both loops run in threads of this
process (run() releases the GIL). Crude (every party shares the machine's cores), but it shows
the loop's own cost per packet and the effect of batching.

    PYTHONPATH=src python ci/bench_loop.py [--size 1400] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time

from dsvpn import _loop as L

KEY = bytes(range(32))


def seqpacket_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()

    ctun, cpeer = seqpacket_pair()
    stun, speer = seqpacket_pair()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    lst.setblocking(False)
    srv = L.Loop(stun.fileno(), KEY, is_server=True, listen_fd=lst.fileno())
    cli = L.Loop(ctun.fileno(), KEY, is_server=False)
    c = socket.socket()
    L.tcp_options(c.fileno())
    c.connect(lst.getsockname())
    cli.connect(c.detach())
    ups = 0
    deadline = time.monotonic() + 5
    while ups < 2 and time.monotonic() < deadline:
        for lp in (srv, cli):
            if lp.run(5)[0] == L.EV_SESSION_UP:
                ups += 1
    assert ups == 2, "handshake failed"

    rd, wr = os.pipe()
    pkt = b"\x45" + bytes(args.size - 1)
    feeder = os.fork()
    if feeder == 0:
        end = time.monotonic() + args.seconds + 0.5
        while time.monotonic() < end:
            for _ in range(256):
                cpeer.send(pkt)
        os._exit(0)
    sink = os.fork()
    if sink == 0:
        speer.settimeout(0.5)
        got = 0
        t_first = None
        t_end = None
        while True:
            try:
                n = len(speer.recv(70000))
            except TimeoutError:
                break
            now = time.monotonic()
            if t_first is None:
                t_first = now
            if now - t_first <= args.seconds:
                got += n
                t_end = now
        dt = (t_end or 1) - (t_first or 0)
        os.write(wr, f"{got} {dt}".encode())
        os._exit(0)

    stop = threading.Event()

    def spin(lp):
        while not stop.is_set():
            lp.run(100)

    threads = [threading.Thread(target=spin, args=(lp,), daemon=True) for lp in (srv, cli)]
    t0 = os.times()
    for t in threads:
        t.start()
    os.waitpid(feeder, 0)
    got, dt = os.read(rd, 100).decode().split()
    os.waitpid(sink, 0)
    t1 = os.times()
    stop.set()
    for t in threads:
        t.join()
    cs, ss = cli.stats(), srv.stats()
    gbps = int(got) * 8 / float(dt) / 1e9
    print(
        f"packet {args.size} B: {gbps:.2f} Gbit/s of payload "
        f"({int(got) / args.size / float(dt) / 1e3:.0f} kpps), "
        f"loops' CPU {((t1.user - t0.user) + (t1.system - t0.system)):.1f} s "
        f"(user {t1.user - t0.user:.1f} sys {t1.system - t0.system:.1f})"
    )
    print(
        f"client: frames_tx {cs['frames_tx']} sock_tx {cs['sock_tx_bytes']} "
        f"congestion_drops {cs['congestion_drops']}; "
        f"server: frames_rx {ss['frames_rx']} tun_tx_errors {ss['tun_tx_errors']}"
    )
    srv.close()
    cli.close()


if __name__ == "__main__":
    main()
