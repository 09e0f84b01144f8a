#!/usr/bin/env python3
"""Quick data-plane benchmark of dsvpn._loop without root: two Loops over loopback TCP.

tun stand-ins are AF_UNIX SOCK_SEQPACKET pairs; a forked feeder writes packets into the client's
"tun", a forked sink counts what comes out of the server's. Both loops run in threads of this
process (run() releases the GIL). Crude (every party shares the machine's cores), but it shows
the loop's own cost per packet and the effect of batching.

    PYTHONPATH=src python ci/bench_loop.py [--size 1400] [--seconds 3]

``--handshakes N`` measures the handshake instead: N classic and N forward-secret (--pfs)
handshakes between a client and a server Loop over loopback TCP, from connect() until both
sides have the session, and the cryptography alone (no sockets) for comparison.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time

from dsvpn import _loop as L
from dsvpn import pfs
from dsvpn.charm import Charm

KEY = bytes(range(32))


def seqpacket_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return a, b


def _until_up(loops, timeout=5.0):
    """Run the loops in turn until each has reported EV_SESSION_UP."""
    up = set()
    deadline = time.monotonic() + timeout
    while len(up) < len(loops):
        assert time.monotonic() < deadline, "handshake failed"
        for i, lp in enumerate(loops):
            if i not in up and lp.run(0)[0] == L.EV_SESSION_UP:
                up.add(i)


def _classic_handshake(srv, cli, addr):
    c = socket.create_connection(addr)
    L.tcp_options(c.fileno())
    cli.connect(c.detach())
    _until_up([srv, cli])


def _pfs_handshake(srv, cli, addr):
    """What a --pfs client and a dsvpn server do, in one thread: the client's exchange in
    Python (dsvpn.pfs), the server's hello check in the loop and its X25519 in Python."""
    c = socket.create_connection(addr)
    L.tcp_options(c.fileno())
    hs = pfs.ClientHandshake(KEY, int(time.time()))
    c.sendall(hs.hello)
    while srv.run(1000)[0] != L.EV_PFS_HELLO:
        pass
    assert pfs.answer_hellos(srv) == 1
    reply = b""
    while len(reply) < pfs.REPLY_LEN:
        reply += c.recv(pfs.REPLY_LEN - len(reply))
    cli.adopt(c.detach(), hs.finish(reply))
    _until_up([srv, cli])


def _crypto_classic():
    kx = Charm(KEY, b"VPN Key Exchange")
    c, s = kx.copy(), kx.copy()
    body = os.urandom(32) + int(time.time()).to_bytes(8, "little")
    hello = body + c.hash(body)
    assert s.hash(hello[:40]) == hello[40:]
    rs = os.urandom(32)
    reply = rs + s.hash(rs)
    assert c.hash(reply[:32]) == reply[32:]
    assert c.hash(b"") == s.hash(b"")


def _crypto_pfs():
    hs = pfs.ClientHandshake(KEY, int(time.time()))
    st = pfs.verify_hello(KEY, hs.hello, int(time.time()))
    reply, k = pfs.server_reply(st, pfs.client_public(hs.hello))
    assert hs.finish(reply) == k


def bench_handshakes(n):
    """Print the cost of n handshakes of each kind (median and mean per handshake)."""
    tun = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    lst.setblocking(False)
    srv = L.Loop(tun[0][0].fileno(), KEY, is_server=True, listen_fd=lst.fileno())
    cli = L.Loop(tun[1][0].fileno(), KEY, is_server=False)
    addr = lst.getsockname()

    def timed(one, *a):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            one(*a)
            times.append(time.perf_counter() - t0)
            # Start each from no session, so the server does not hold it on probation.
            srv.disconnect()
            cli.disconnect()
        return statistics.median(times) * 1e6, statistics.fmean(times) * 1e6

    rows = [
        ("classic, loop to loop over loopback TCP", timed(_classic_handshake, srv, cli, addr)),
        ("--pfs, loop to loop over loopback TCP", timed(_pfs_handshake, srv, cli, addr)),
        ("classic, cryptography only (both sides)", timed(_crypto_classic)),
        ("--pfs, cryptography only (both sides)", timed(_crypto_pfs)),
    ]
    print(f"{n} handshakes of each kind, per handshake:")
    for label, (median, mean) in rows:
        print(f"  {label:42s} median {median:8.1f} us   mean {mean:8.1f} us")
    assert srv.stats()["handshakes_pfs"] == n
    srv.close()
    cli.close()
    lst.close()
    for a, b in tun:
        a.close()
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--handshakes", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if args.handshakes > 0:
        bench_handshakes(args.handshakes)
        return

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
