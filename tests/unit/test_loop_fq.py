"""The flow queue between the tun and the socket (flowq.h): new (sparse) flows leave ahead of a
bulk flow's backlog, bulk flows share by deficit round robin, and a full queue stops the loop
reading the tun (the kernel's backpressure) instead of dropping. And the receive budget: the
session's receive buffer follows the rate we read at."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import struct
import sys
import threading
import time

import pytest
from loop_rig import KX_IV, ClientRig, Pair, ip4_packet, pump, recv_exact, tun_pair

from dsvpn import _loop as L
from dsvpn import charm

KEY = bytes(range(1, 33))


def udp4(sport: int, size: int, tag: int = 0, dst: str = "10.9.0.1") -> bytes:
    """An IPv4 UDP packet 10.0.0.1:sport -> dst:80 of size bytes; tag marks its payload."""
    pkt = bytearray(ip4_packet("10.0.0.1", dst, size))
    pkt[20:24] = struct.pack("!HH", sport, 80)
    pkt[28:32] = struct.pack("!I", tag)
    return bytes(pkt)


def icmp4(seq: int) -> bytes:
    """An ICMP echo request 10.0.0.1 -> 10.9.0.1 (84 bytes, like ping's)."""
    pkt = bytearray(ip4_packet("10.0.0.1", size=84))
    pkt[9] = 1
    pkt[20:28] = struct.pack("!BBHHH", 8, 0, 0, 7, seq)
    return bytes(pkt)


def received(p: Pair, n: int) -> list[bytes]:
    """Run both loops until the server's tun got n packets; return them in order."""
    pump([p.cli, p.srv], lambda _: p.srv.stats()["tun_tx_packets"] >= n, timeout=20)
    return [p.speer.recv(70000) for _ in range(n)]


def test_a_ping_leaves_ahead_of_a_bulk_backlog():
    with Pair(KEY) as p:
        p.connect()
        bulk = [udp4(1000, 1400, i) for i in range(40)]
        for pkt in [*bulk, icmp4(1)]:
            p.cpeer.send(pkt)
        got = received(p, 41)
        # the bulk flow spends its quantum (two packets), then the new flow goes first
        assert got.index(icmp4(1)) <= 2
        assert [g for g in got if g != icmp4(1)] == bulk  # one flow keeps its order


def test_bulk_flows_take_turns():
    with Pair(KEY) as p:
        p.connect()
        a = [udp4(1000, 1400, i) for i in range(30)]
        b = [udp4(2000, 1400, i) for i in range(30)]
        for pkt in a + b:  # all of a first, as one flow's burst would arrive
            p.cpeer.send(pkt)
        got = received(p, 60)
        first = got[:20]
        assert sum(g in a for g in first) >= 8 and sum(g in b for g in first) >= 8
        assert [g for g in got if g in a] == a and [g for g in got if g in b] == b


def test_a_full_queue_stops_reading_the_tun_and_drops_nothing():
    with Pair(KEY) as p:
        p.connect()
        # The server loop does not run: the client's socket fills, then its flow queue.
        sent = [udp4(1000, 1400, i) for i in range(1900)]  # the stand-in holds 512 more
        for i, pkt in enumerate(sent):
            p.cpeer.send(pkt)
            if i % 100 == 99:
                p.cli.run(5)  # drain the stand-in as a tun would be drained
        pump(p.cli, lambda _: p.cli.stats()["tun_queued"] >= 2 << 20)
        read = p.cli.stats()["tun_rx_packets"]
        for _ in range(20):
            p.cli.run(2)
        st = p.cli.stats()
        # past 2 MiB the tun is left alone: the rest waits in the kernel's queue
        assert st["tun_rx_packets"] == read < len(sent)
        assert (2 << 20) <= st["tun_queued"] < (2 << 20) + 1400
        assert st["congestion_drops"] == 0
        # once the socket drains, everything arrives, in order
        p.speer.setblocking(False)
        got: list[bytes] = []

        def drained(_: object) -> bool:
            with contextlib.suppress(BlockingIOError):
                while True:
                    got.append(p.speer.recv(70000))
            return len(got) == len(sent)

        pump([p.cli, p.srv], drained, timeout=20)
        assert got == sent
        assert p.cli.stats()["congestion_drops"] == 0 and p.srv.stats()["tun_tx_errors"] == 0


def test_the_queue_empties_with_the_session():
    with Pair(KEY) as p:
        p.connect()
        for i in range(1000):
            p.cpeer.send(udp4(1000, 1400, i))
            if i % 100 == 99:  # the stand-in holds a few hundred packets
                pump(p.cli, lambda _, n=i + 1: p.cli.stats()["tun_rx_packets"] == n)
        assert p.cli.stats()["tun_queued"] > 0
        p.cli.disconnect()
        assert p.cli.stats()["tun_queued"] == 0 and p.cli.stats()["tx_queued"] == 0
        pump(p.srv, lambda e: e and e[-1][0] == L.EV_SESSION_DOWN)


# ------------------------------------------------------------------------- receive budget

RXW_MIN = 65536  # _loop.pyx


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the receive budget needs Linux and SO_RCVBUFFORCE (root)",
)
def test_receive_budget_grows_with_reading_and_shrinks_gradually():
    with ClientRig(KEY) as rig:
        # a large allowance for our own reading: growth shows at any speed of this machine
        rig.loop._set_test_rx_queue_us(200_000)
        c = rig.connect(keep=True, tcp_options=True)
        assert c is not None and rig.srv is not None
        srv = rig.srv
        pkt1 = recv_exact(srv, 72)
        kx = charm.Charm(KEY, KX_IV)
        assert kx.hash(pkt1[:40]) == pkt1[40:]
        srv.sendall(bytes(32) + kx.hash(bytes(32)))
        tx = charm.Charm(kx.hash(b""), b"\x01" + bytes(15))  # the server's sending state
        pump(rig.loop, lambda e: e)
        assert rig.loop.session_active

        def frame(pt: bytes) -> bytes:
            ct, tag = tx.encrypt(pt)
            return struct.pack("<H", len(pt)) + tag[:6] + ct

        blob = b"".join(frame(udp4(1000, 1400, i)) for i in range(3000))
        sender = threading.Thread(target=srv.sendall, args=(blob,))
        sender.start()
        pump(rig.loop, lambda _: rig.loop.stats()["sock_rx_bytes"] == len(blob), timeout=20)
        sender.join()
        grown = c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert grown > 2 * RXW_MIN  # (the kernel reports twice what was set)
        # Idle: the budget falls back to its floor, by at most a quarter at a time.
        seen = [grown]
        deadline = time.monotonic() + 10
        while seen[-1] > 2 * RXW_MIN:
            assert time.monotonic() < deadline, seen
            rig.loop.run(25)
            seen.append(c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        assert all(b >= a - a // 4 - 2 for a, b in itertools.pairwise(seen)), seen
        assert seen[-1] == 2 * RXW_MIN and len(seen) > 3


def test_many_flows_and_sizes_through_the_ring_intact():
    """The flow queue's ring against a model: packets of many sizes and flows, pushed and
    taken out at random (so that space comes back out of ring order, and the ring wraps many
    times): every packet comes out whole, each flow's in its order."""
    rnd = random.Random(12)
    tun, _ = tun_pair()
    loop = L.Loop(tun.fileno(), KEY, is_server=False)
    try:
        cap = 96 << 10
        loop._set_test_queue(cap, 256, 48 << 10)
        model: dict[int, list[bytes]] = {}
        queued = pushed = popped = refused = 0
        for _ in range(20000):
            if rnd.random() < 0.55:
                port = rnd.choice((1, 2, 3, 4, 5 + rnd.randrange(20)))
                size = rnd.choice((28, 64, 200, 1400, rnd.randrange(28, 9000)))
                pkt = bytearray(udp4(port, max(size, 32)))
                pkt[32:] = rnd.randbytes(len(pkt) - 32)
                if loop._test_fq_push(bytes(pkt)):
                    model.setdefault(port, []).append(bytes(pkt))
                    queued += len(pkt)
                    pushed += 1
                else:
                    assert queued > 0  # an empty queue always has room
                    refused += 1
            else:
                out = loop._test_fq_pop()
                if out is None:
                    assert not any(model.values())
                    continue
                port = struct.unpack("!H", out[20:22])[0]
                assert out == model[port].pop(0)
                queued -= len(out)
                popped += 1
        while (out := loop._test_fq_pop()) is not None:
            assert out == model[struct.unpack("!H", out[20:22])[0]].pop(0)
            popped += 1
        assert not any(model.values()) and popped == pushed > 8000 and refused > 0
        # empty again: the whole ring is one place
        assert loop._test_fq_push(bytes(cap - 16))
    finally:
        loop.close()
        tun.close()
