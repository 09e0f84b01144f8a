"""Framing and the congestion drop of dsvpn._loop (docs/protocol.md, Framing, Congestion drop)."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import pytest
from loop_rig import (
    ClientRig,
    RawClient,
    ServerRig,
    hx,
    pump,
    recv_exact,
    serve_handshake,
    stat,
    tun_pair,
)

from dsvpn import _loop as L

KEY = bytes(range(32))


def tun_drain(peer_tun):
    """Every packet currently queued on the test end of the tun stand-in."""
    out = []
    peer_tun.setblocking(False)
    try:
        while True:
            out.append(peer_tun.recv(70000))
    except BlockingIOError:
        return out
    finally:
        peer_tun.settimeout(5)


class Session(ServerRig):
    """A server Loop with one authenticated raw client (Python Charm) on loopback."""

    def __init__(self, key=KEY, rnd=bytes(32), ts=None, clock=None, srv_rnd=None, **kw):
        super().__init__(key, **kw)
        if clock is not None:
            self.loop._set_test_clock(clock)
        if srv_rnd is not None:
            self.loop._set_test_random(srv_rnd)
        self.client = RawClient(self.lst, key, ts=ts, rnd=rnd)
        self.sock = self.client.sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.hello()
        pump(self.loop, lambda e: (L.EV_SESSION_UP, "127.0.0.1") in e)
        self.client.finish()
        self.session_key = self.client.session_key
        self.rx = self.client.rx
        self.frame = self.client.frame
        self.recv_frame = self.client.recv

    def feed(self, data):
        """Send bytes and run the loop until it has read all of them."""
        want = stat(self.loop, "sock_rx_bytes") + len(data)
        self.sock.sendall(data)
        return pump(self.loop, lambda e: stat(self.loop, "sock_rx_bytes") >= want or e)

    def close(self):
        super().close()
        self.sock.close()


@pytest.fixture
def sessions():
    made: list[Session] = []

    def make(**kw):
        s = Session(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def stream_session(sessions, vectors):
    fs = vectors["frames_stream"]
    h = fs["handshake"]
    s = sessions(
        key=hx(h["key"]),
        rnd=hx(h["client_random"]),
        ts=h["timestamp"],
        clock=h["server_clock"],
        srv_rnd=hx(h["server_random"]),
    )
    assert s.session_key == hx(fs["session_key"])
    return s, fs


# --------------------------------------------------------------------- frames_stream vectors


def test_stream_whole(sessions, vectors):
    s, fs = stream_session(sessions, vectors)
    assert s.feed(hx(fs["stream"])) == []
    pump(s.loop, lambda _: stat(s.loop, "tun_tx_packets") == len(fs["frames"]))
    assert tun_drain(s.peer_tun) == [hx(f["plaintext"]) for f in fs["frames"]]
    assert stat(s.loop, "rx_buffered") == 0 and stat(s.loop, "frames_rx") == 5


def test_stream_chunked(sessions, vectors):
    s, fs = stream_session(sessions, vectors)
    stream = hx(fs["stream"])
    for d in fs["chunked_delivery"]["deliveries"]:
        a, b = d["range"]
        assert s.feed(stream[a:b]) == []
        want = [hx(fs["frames"][i]["plaintext"]) for i in d["packets_emitted"]]
        assert tun_drain(s.peer_tun) == want, d
        assert stat(s.loop, "rx_buffered") == d["buffered_after"], d


def test_stream_byte_by_byte(sessions, vectors):
    s, fs = stream_session(sessions, vectors)
    stream = hx(fs["stream"])
    for i in range(len(stream)):
        s.feed(stream[i : i + 1])
        assert stat(s.loop, "rx_buffered") <= 8 + 104
    assert tun_drain(s.peer_tun) == [hx(f["plaintext"]) for f in fs["frames"]]
    assert stat(s.loop, "rx_buffered") == 0


def test_stream_tampered(sessions, vectors):
    s, fs = stream_session(sessions, vectors)
    t = fs["tampered"]
    stream = bytearray(hx(fs["stream"]))
    stream[t["flipped_byte_offset"]] ^= int(t["xor_mask"], 16)
    assert bytes(stream) == hx(t["stream"])
    s.sock.sendall(bytes(stream))
    evs = pump(s.loop, lambda e: e)
    assert evs == [(L.EV_SESSION_DOWN, "corrupted stream")]
    assert tun_drain(s.peer_tun) == [hx(f["plaintext"]) for f in fs["frames"][:2]]
    assert not s.loop.session_active
    assert s.sock.recv(10) == b""


# --------------------------------------------------------------------- parser edge cases


def test_zero_length_frame(sessions):
    s = sessions()
    pkt = b"\x45" + bytes(40)
    s.feed(s.frame(b"") + s.frame(pkt) + s.frame(b""))
    assert stat(s.loop, "frames_rx") == 3
    assert tun_drain(s.peer_tun) == [pkt]
    # the state advanced for the empty frames: the next frame still decrypts
    s.feed(s.frame(pkt[::-1]))
    assert tun_drain(s.peer_tun) == [pkt[::-1]]


def test_truncated_frame_then_eof(sessions):
    s = sessions()
    f = s.frame(b"\x45" * 100)
    s.feed(f[:50])
    assert stat(s.loop, "rx_buffered") == 50
    assert tun_drain(s.peer_tun) == []
    s.sock.shutdown(socket.SHUT_WR)
    evs = pump(s.loop, lambda e: e)
    assert evs == [(L.EV_SESSION_DOWN, "connection closed by peer")]
    assert stat(s.loop, "rx_buffered") == 0


@pytest.mark.parametrize("where", [1, 5, 8, 20])
def test_corrupted_frame(sessions, where):
    s = sessions()
    good = s.frame(b"\x45" * 30)
    bad = bytearray(s.frame(b"\x46" * 30))
    bad[where] ^= 0x01
    if where == 1:
        # a corrupted length: the receiver waits for a frame that never completes
        s.feed(good + bytes(bad))
        assert tun_drain(s.peer_tun) == [b"\x45" * 30]
        assert stat(s.loop, "rx_buffered") == len(bad)
        return
    s.sock.sendall(good + bytes(bad) + s.frame(b"\x47" * 30))
    evs = pump(s.loop, lambda e: e)
    assert evs == [(L.EV_SESSION_DOWN, "corrupted stream")]
    assert tun_drain(s.peer_tun) == [b"\x45" * 30]


def test_large_and_oversized_packets(sessions):
    s = sessions(mtu=65535)  # an MTU that lets the largest frame through to the tun
    big = bytes([0x45]) + bytes(i % 251 for i in range(65534))
    assert len(big) == 65535
    s.peer_tun.send(bytes(65536))  # refused: LEN cannot encode it
    s.peer_tun.send(big)  # the largest that fits
    pump(s.loop, lambda _: stat(s.loop, "frames_tx") == 1 and stat(s.loop, "tx_queued") == 0)
    assert stat(s.loop, "oversize_drops") == 1
    assert recv_exact(s.sock, 2) == b"\xff\xff"
    hdr_tag = recv_exact(s.sock, 6)
    assert s.rx.decrypt(recv_exact(s.sock, 65535), hdr_tag, 6) == big
    # the other direction, in many small TCP segments
    f = s.frame(big)
    for i in range(0, len(f), 7000):
        s.feed(f[i : i + 7000])
    assert tun_drain(s.peer_tun) == [big]


def test_split_frames_across_reads(sessions):
    s = sessions()
    pkts = [bytes([0x45]) + bytes([i]) * (i * 37 % 1400) for i in range(60)]
    wire = b"".join(s.frame(p) for p in pkts)
    for i in range(0, len(wire), 997):
        s.feed(wire[i : i + 997])
    assert tun_drain(s.peer_tun) == pkts


# --------------------------------------------------------------------- address-family header


def test_tun_header_both_directions(sessions):
    s = sessions(tun_header=True, af_inet=2, af_inet6=30)
    v4 = bytes([0x45]) + bytes(range(39))
    v6 = bytes([0x60]) + bytes(range(59))
    # tun -> socket: the 4-byte header is stripped
    s.peer_tun.send(struct.pack("!I", 2) + v4)
    s.peer_tun.send(struct.pack("!I", 30) + v6)
    pump(s.loop, lambda _: stat(s.loop, "frames_tx") == 2)
    assert s.recv_frame() == v4
    assert s.recv_frame() == v6
    # socket -> tun: the header is added from the version nibble; < 20 bytes dropped
    short = bytes([0x45]) + bytes(18)
    odd = bytes([0x55]) + bytes(30)
    s.feed(s.frame(v4) + s.frame(short) + s.frame(v6) + s.frame(odd))
    assert tun_drain(s.peer_tun) == [struct.pack("!I", 2) + v4, struct.pack("!I", 30) + v6]
    st = s.loop.stats()
    assert st["short_drops"] == 1 and st["tun_tx_errors"] == 1 and st["frames_rx"] == 4


# --------------------------------------------------------------------- no session, errors


def test_no_session_discards_tun_packets():
    tun, peer_tun = tun_pair()
    loop = L.Loop(tun.fileno(), KEY, is_server=True)
    try:
        for _ in range(5):
            peer_tun.send(b"\x45" * 60)
        pump(loop, lambda _: stat(loop, "no_session_drops") == 5)
        assert stat(loop, "frames_tx") == 0
        peer_tun.close()
        evs = pump(loop, lambda e: e)
        assert evs == [(L.EV_TUN_ERROR, "end of file on the tun device")]
    finally:
        loop.close()
        tun.close()


# --------------------------------------------------------------------- bufferbloat control


def test_bufferbloat_control(vectors):
    """Reference vector: EAGAIN on A sets the congestion flag, B is dropped, C follows A."""
    bb = vectors["vpn_behaviour"]["bufferbloat_control"]
    sess = bb["session"]
    key = hx(sess["key"])
    with ClientRig(key, rcvbuf=32768) as rig:
        loop, peer_tun = rig.loop, rig.peer_tun
        loop._set_test_random(hx(sess["client_random"]))
        loop._set_test_clock(sess["timestamp"])
        # keep c: we fill the socket through it
        c = rig.connect(sndbuf=32768, tcp_options=True, keep=True)
        srv = rig.srv
        serve_handshake(srv, key, hx(sess["server_random"]))
        pump(loop, lambda e: e)
        assert loop.session_active
        # Fill the path with bytes outside the protocol (through our own handle on the same
        # socket) until the kernel refuses more, as the reference harness did.
        c.setblocking(False)
        junk = 0
        for size in (65536, 1024, 1):
            refusals = 0
            while refusals < 3:
                try:
                    junk += c.send(b"\0" * size)
                    refusals = 0
                except BlockingIOError:
                    refusals += 1
                    time.sleep(0.02)
        A, B, C = (hx(bb["packets"][k]) for k in "ABC")
        peer_tun.send(A)
        pump(loop, lambda _: stat(loop, "frames_tx") == 1)
        assert stat(loop, "tx_queued") == len(A) + 8  # EAGAIN: held in our buffer
        peer_tun.send(B)
        peer_tun.send(C)
        pump(loop, lambda _: stat(loop, "tun_rx_packets") == 3)
        # B and C wait in the flow queue, unframed, while the socket cannot take more
        assert stat(loop, "tun_queued") == len(B) + len(C)
        assert stat(loop, "frames_tx") == 1 and stat(loop, "tx_queued") == len(A) + 8
        want = junk + 2 * (len(A) + 8)
        got = bytearray()
        deadline = time.monotonic() + 10
        srv.setblocking(False)
        while len(got) < want:
            assert time.monotonic() < deadline, (len(got), want, loop.stats())
            with contextlib.suppress(BlockingIOError):
                got += srv.recv(1 << 20)
            loop.run(1)
        assert bytes(got[:junk]) == bytes(junk)
        tail = bytes(got[junk:])
        assert tail == hx(bb["frames_sent"]["A"]) + hx(bb["frames_sent"]["C"])
        st = loop.stats()
        assert st["congestion_drops"] == 1 and st["frames_tx"] == 2
        assert st["tun_rx_packets"] == 3
        # the receiving side decrypts A then C (its state never saw B)
        h = vectors["handshake"][0]
        assert hx(h["key"]) == key
