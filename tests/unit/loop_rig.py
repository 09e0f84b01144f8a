"""Rigs for driving dsvpn._loop from the unit tests, shared by the test_loop* and test_frames files.

Sockets only: TCP on loopback for the session, AF_UNIX SOCK_SEQPACKET as the tun stand-in (it
keeps packet boundaries, one packet per read/write, like a tun device). Python-side peers are
written on top of dsvpn.charm. Importable as `loop_rig` (conftest.py puts this folder on
sys.path).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dsvpn import _loop as L
from dsvpn import charm

KX_IV = b"VPN Key Exchange"
TUN_BUFFER = 1 << 22  # the largest of the former copies; test_loop's bulk transfer needs it

Event = tuple[int, str]
_R = TypeVar("_R", bound="_Closes")


def hx(s: str) -> bytes:
    return bytes.fromhex(s)


def stat(loop: L.Loop, name: str) -> int:
    return loop.stats()[name]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


def tun_pair() -> tuple[socket.socket, socket.socket]:
    """(the loop's end, the test's end) of a tun stand-in; the test's end times out after 5 s."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TUN_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TUN_BUFFER)
    b.settimeout(5)
    return a, b


def listener(
    host: str = "127.0.0.1", *, blocking: bool = False, rcvbuf: int | None = None
) -> socket.socket:
    """A TCP listener on an ephemeral port (rcvbuf, when given, is inherited by accepted
    sockets)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((host, 0))
    s.listen(16)
    s.setblocking(blocking)
    return s


def dial(lst: socket.socket, src: str = "127.0.0.1") -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.bind((src, 0))
    c.settimeout(5)
    c.connect(lst.getsockname())
    return c


def pump(
    loops: L.Loop | Sequence[L.Loop],
    cond: Callable[[list[Event]], object],
    timeout: float = 5.0,
    step: int = 2,
) -> list[Event]:
    """Run the loop (or each of the loops in turn) until cond(events) holds; events other than
    timeouts are collected and returned."""
    if isinstance(loops, L.Loop):
        loops = (loops,)
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not cond(events):
        assert time.monotonic() < deadline, f"condition not met, events={events}"
        for lp in loops:
            ev = lp.run(step)
            if ev[0] != L.EV_TIMEOUT:
                events.append(ev)
    return events


def ip4_packet(src: str, dst: str = "10.9.0.1", size: int = 60) -> bytes:
    """An IPv4 packet (UDP, zero payload) of `size` bytes from src; enough for the loop, which
    looks at the version and the source only."""
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, size, 1, 0, 64, 17, 0,
        socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst),
    )  # fmt: skip
    return hdr + bytes(size - len(hdr))


def ip6_packet(src: str, dst: str = "64:ff9b::a09:1", size: int = 80) -> bytes:
    """An IPv6 packet (UDP, zero payload) of `size` bytes from src."""
    hdr = struct.pack(
        "!IHBB16s16s",
        6 << 28, size - 40, 17, 64,
        socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst),
    )  # fmt: skip
    return hdr + bytes(size - len(hdr))


def make_pkt1(key: bytes, rnd: bytes, ts: int) -> tuple[bytes, charm.Charm]:
    """A client's first handshake packet, and the key-exchange state that produced it."""
    kx = charm.Charm(key, KX_IV)
    body = rnd + struct.pack("<Q", ts)
    return body + kx.hash(body), kx


def serve_handshake(srv: socket.socket, key: bytes, server_random: bytes = bytes(32)) -> None:
    """Play the server side of a handshake on an accepted socket: check pkt1, send pkt2."""
    pkt1 = recv_exact(srv, 72)
    kx = charm.Charm(key, KX_IV)
    assert kx.hash(pkt1[:40]) == pkt1[40:]
    srv.sendall(server_random + kx.hash(server_random))


class _Closes:
    """`with Rig(...) as rig:` closes the rig on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawClient:
    """A protocol client written in Python on top of dsvpn.charm, for driving a server Loop."""

    def __init__(
        self,
        lst: socket.socket,
        key: bytes,
        src: str = "127.0.0.1",
        ts: int | None = None,
        family: int = socket.AF_INET,
        rnd: bytes = bytes(range(32)),
    ) -> None:
        if family == socket.AF_INET:
            self.sock = dial(lst, src)
        else:
            self.sock = socket.create_connection(("::1", lst.getsockname()[1]), timeout=5)
        self.key = key
        self.ts = int(time.time()) if ts is None else ts
        self.pkt1, self.kx = make_pkt1(key, rnd, self.ts)

    def hello(self) -> None:
        self.sock.sendall(self.pkt1)

    def finish(self) -> None:
        pkt2 = recv_exact(self.sock, 64)
        assert self.kx.hash(pkt2[:32]) == pkt2[32:]
        k = self.kx.hash(b"")
        self.session_key = k
        self.tx = charm.Charm(k, bytes(16))
        self.rx = charm.Charm(k, b"\x01" + bytes(15))

    def frame(self, pt: bytes) -> bytes:
        ct, tag = self.tx.encrypt(pt)
        return struct.pack("<H", len(pt)) + tag[:6] + ct

    def send(self, pt: bytes) -> None:
        self.sock.sendall(self.frame(pt))

    def recv(self) -> bytes:
        hdr = recv_exact(self.sock, 8)
        (n,) = struct.unpack("<H", hdr[:2])
        return self.rx.decrypt(recv_exact(self.sock, n), hdr[2:8], 6)


class ServerRig(_Closes):
    """A server Loop with its tun stand-in and listener."""

    def __init__(self, key: bytes, host: str = "127.0.0.1", **kw: Any) -> None:
        self.tun, self.peer_tun = tun_pair()
        self.lst = listener(host)
        self.loop = L.Loop(
            self.tun.fileno(), key, is_server=True, listen_fd=self.lst.fileno(), **kw
        )

    def close(self) -> None:
        self.loop.close()
        for s in (self.tun, self.peer_tun, self.lst):
            s.close()


class ClientRig(_Closes):
    """A client Loop with its tun stand-in, and a blocking listener for the test to play the
    server on."""

    def __init__(self, key: bytes, *, rcvbuf: int | None = None, **kw: Any) -> None:
        self.tun, self.peer_tun = tun_pair()
        self.lst = listener(blocking=True, rcvbuf=rcvbuf)
        self.loop = L.Loop(self.tun.fileno(), key, is_server=False, **kw)
        self.srv: socket.socket | None = None
        self.kept: socket.socket | None = None

    def connect(
        self, *, sndbuf: int | None = None, tcp_options: bool = False, keep: bool = False
    ) -> socket.socket | None:
        """Hand the loop a socket connected to the listener and accept the other end into
        self.srv (5 s timeout). With keep, the loop gets a duplicate and the test keeps (and
        gets back) its own handle on the same socket, closed with the rig."""
        c = socket.socket()
        if sndbuf is not None:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if tcp_options:
            L.tcp_options(c.fileno())
        c.settimeout(5)
        c.connect(self.lst.getsockname())
        if keep:
            self.kept = c
            self.loop.connect(socket.dup(c.fileno()))
        else:
            self.loop.connect(c.detach())  # the loop owns it now
        self.srv, _ = self.lst.accept()
        self.srv.settimeout(5)
        return c if keep else None

    def close(self) -> None:
        self.loop.close()
        for s in (self.tun, self.peer_tun, self.lst, self.srv, self.kept):
            if s is not None:
                s.close()


class Pair(_Closes):
    """A client Loop and a server Loop, each with its tun stand-in, talking over loopback TCP
    once connect() has run. server / client: extra Loop() arguments of each side."""

    def __init__(
        self,
        key: bytes,
        *,
        server: dict[str, Any] | None = None,
        client: dict[str, Any] | None = None,
    ) -> None:
        self.stun, self.speer = tun_pair()
        self.ctun, self.cpeer = tun_pair()
        self.lst = listener()
        self.srv = L.Loop(
            self.stun.fileno(), key, is_server=True, listen_fd=self.lst.fileno(), **(server or {})
        )
        self.cli = L.Loop(self.ctun.fileno(), key, is_server=False, **(client or {}))

    def connect(self) -> None:
        c = socket.socket()
        L.tcp_options(c.fileno())
        c.settimeout(5)
        c.connect(self.lst.getsockname())
        self.cli.connect(c.detach())
        evs = pump([self.srv, self.cli], lambda e: len(e) == 2)
        assert sorted(evs) == [(L.EV_SESSION_UP, "127.0.0.1")] * 2

    def close(self) -> None:
        self.srv.close()
        self.cli.close()
        for s in (self.stun, self.speer, self.ctun, self.cpeer, self.lst):
            s.close()


class PfsRawClient(RawClient):
    """A --pfs client written in Python (dsvpn.pfs) for driving a server Loop: hello() sends
    the extended hello, finish() checks the extended reply and keys the frame states."""

    def __init__(
        self,
        lst: socket.socket,
        key: bytes,
        src: str = "127.0.0.1",
        ts: int | None = None,
        **hs: Any,
    ) -> None:
        from dsvpn import pfs

        self.sock = dial(lst, src)
        self.key = key
        self.ts = int(time.time()) if ts is None else ts
        self.hs = pfs.ClientHandshake(key, self.ts, **hs)
        self.pkt1 = self.hs.hello

    def finish(self) -> None:
        from dsvpn import pfs

        k = self.hs.finish(recv_exact(self.sock, pfs.REPLY_LEN))
        self.session_key = k
        self.tx = charm.Charm(k, bytes(16))
        self.rx = charm.Charm(k, b"\x01" + bytes(15))
