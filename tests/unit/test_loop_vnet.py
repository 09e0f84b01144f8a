"""Loops with a Linux IFF_VNET_HDR tun (tun_vnet.h): TCP segments merged into one GSO write on
the way into the tun, TSO packets from the tun cut into ordinary packets on the way out.
The fake tun is a SEQPACKET socketpair that carries the 10-byte virtio_net_hdr like a tun."""

from __future__ import annotations

import struct

import pytest
from loop_rig import Pair, pump

KEY = bytes(range(1, 33))

VH = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NO_VH = bytes(10)


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp4(
    seq: int,
    payload: bytes,
    *,
    flags: int = 0x10,
    sport: int = 1000,
    ident: int = 1,
    src: bytes = bytes([10, 0, 0, 1]),
    fix: bool = True,
) -> bytes:
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 7, 9)  # NOP NOP timestamps
    th = (
        struct.pack("!HHIIBBHHH", sport, 80, seq, 555, (20 + len(opts)) // 4 << 4, flags, 512, 0, 0)
        + opts
    )
    total = 20 + len(th) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000, 64, 6, 0, src, bytes([10, 0, 0, 2])
    )
    ip = ip[:10] + struct.pack("!H", 0xFFFF ^ csum(ip)) + ip[12:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(th) + len(payload))
    c = 0xFFFF ^ csum(pseudo + th + payload)
    if not fix:
        c ^= 1
    th = th[:16] + struct.pack("!H", c) + th[18:]
    return ip + th + payload


def valid(pkt: bytes) -> bool:
    ihl = (pkt[0] & 15) * 4
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(pkt) - ihl)
    return csum(pkt[:ihl]) == 0xFFFF and csum(pseudo + pkt[ihl:]) == 0xFFFF


@pytest.fixture
def vpair():
    p = Pair(KEY, server={"vnet_hdr": True}, client={"vnet_hdr": True})
    p.connect()
    yield p
    p.close()


def test_segments_of_one_flow_become_one_gso_write(vpair):
    pay = [bytes([i]) * 1448 for i in range(5)]
    pkts = [tcp4(1000 + 1448 * i, pay[i], ident=i + 1) for i in range(4)]
    pkts.append(tcp4(1000 + 1448 * 4, pay[4][:100], flags=0x18, ident=5))  # short, PSH
    # One flow's segments in one batch, so that the server gets them from one socket read (the
    # other flows come after them: the sender's flow queue would interleave them).
    for p in pkts:
        vpair.cpeer.send(NO_VH + p)
    pump([vpair.cli, vpair.srv], lambda _: vpair.srv.stats()["tun_tx_packets"] == len(pkts))
    st = vpair.srv.stats()
    assert st["tun_writes"] == 1 and st["tun_merged"] == 5 and st["frames_rx"] == len(pkts)
    pkts.append(tcp4(1000, b"x" * 50, sport=2000))  # another flow
    pkts.append(tcp4(9, b"bad", sport=3000, fix=False))  # bad checksum
    pkts.append(b"\x45" + bytes(40))  # not TCP
    for p in pkts[5:]:
        vpair.cpeer.send(NO_VH + p)
    pump([vpair.cli, vpair.srv], lambda _: vpair.srv.stats()["tun_tx_packets"] == len(pkts))
    assert vpair.srv.stats()["tun_writes"] == 4
    big = vpair.speer.recv(70000)
    flags, gso_type, hdr_len, gso_size, cstart, coff = VH.unpack(big[:10])
    body = big[10:]
    assert (flags, gso_type, hdr_len, gso_size, cstart, coff) == (1, 1, 52, 1448, 20, 16)
    assert body[52:] == b"".join(pay[:4]) + pay[4][:100]
    assert struct.unpack("!H", body[2:4])[0] == len(body) and csum(body[:20]) == 0xFFFF
    assert body[33] == 0x18  # PSH of the last segment
    # partial checksum = folded pseudo-header sum over the merged TCP length
    pseudo = body[12:20] + struct.pack("!BBH", 0, 6, len(body) - 20)
    assert struct.unpack("!H", body[36:38])[0] == csum(pseudo)
    # the rest, unchanged and in order, each with an empty header
    for p in pkts[5:]:
        assert vpair.speer.recv(70000) == NO_VH + p


def test_tso_packet_is_cut_into_ordinary_frames(vpair):
    payload = bytes(range(256)) * 40  # 10240 bytes -> 8 segments of 1400 (last 440)
    sup = tcp4(77, payload, flags=0x18, ident=100)
    # As the kernel hands it over: partial checksum, header says TSO with MSS 1400.
    vpair.cpeer.send(VH.pack(1, 1, 52, 1400, 20, 16) + sup)
    pump(
        [vpair.cli, vpair.srv],
        lambda _: vpair.cli.stats()["frames_tx"] == 8 and vpair.srv.stats()["frames_rx"] == 8,
    )
    assert vpair.cli.stats()["tun_rx_packets"] == 8
    # the server merges them back into one GSO write; undo that to check the segments the
    # wire carried, via the receiving loop's counters and the merged body
    st = vpair.srv.stats()
    assert st["tun_merged"] == 8 and st["tun_writes"] == 1
    big = vpair.speer.recv(70000)
    assert VH.unpack(big[:10])[3] == 1400 and big[10 + 52 :] == payload


def test_tso_segments_on_a_plain_receiver():
    """The wire carries ordinary packets: a receiver without vnet_hdr (a C DSVPN) gets each
    segment as its own valid IP packet."""
    p = Pair(KEY, client={"vnet_hdr": True})
    try:
        p.connect()
        payload = bytes(range(256)) * 23  # 5888 bytes: 4 x 1448 + 96
        p.cpeer.send(VH.pack(1, 1, 52, 1448, 20, 16) + tcp4(5, payload, flags=0x19, ident=7))
        pump([p.cli, p.srv], lambda _: p.srv.stats()["tun_tx_packets"] == 5)
        segs = [p.speer.recv(70000) for _ in range(5)]
        for i, s in enumerate(segs):
            assert valid(s), i
            assert struct.unpack("!I", s[24:28])[0] == 5 + 1448 * i
            assert struct.unpack("!H", s[4:6])[0] == 7 + i
            assert s[33] == (0x19 if i == 4 else 0x10)  # FIN/PSH only on the last
        assert b"".join(s[52:] for s in segs) == payload
        assert [len(s) for s in segs] == [1500] * 4 + [148]
    finally:
        p.close()


# ------------------------------------------------------------------------------ UDP (USO)


def udp4(payload: bytes, *, sport: int = 4000, ident: int = 1, df: bool = True) -> bytes:
    total = 28 + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, total, ident, 0x4000 if df else 0, 64, 17, 0,
        bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]),
    )  # fmt: skip
    ip = ip[:10] + struct.pack("!H", 0xFFFF ^ csum(ip)) + ip[12:]
    uh = struct.pack("!HHHH", sport, 53, 8 + len(payload), 0)
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, 8 + len(payload))
    c = 0xFFFF ^ csum(pseudo + uh + payload) or 0xFFFF
    return ip + uh[:6] + struct.pack("!H", c) + payload


def udp_valid(pkt: bytes) -> bool:
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 17, len(pkt) - 20)
    return (
        csum(pkt[:20]) == 0xFFFF
        and struct.unpack("!H", pkt[24:26])[0] == len(pkt) - 20
        and csum(pseudo + pkt[20:]) == 0xFFFF
    )


def test_datagrams_of_one_flow_become_one_uso_write(vpair):
    pay = [bytes([i]) * 1000 for i in range(4)] + [b"end"]
    pkts = [udp4(pay[i], ident=10 + i) for i in range(5)]
    for p in pkts:
        vpair.cpeer.send(NO_VH + p)
    pump([vpair.cli, vpair.srv], lambda _: vpair.srv.stats()["tun_tx_packets"] == 5)
    st = vpair.srv.stats()
    assert st["tun_writes"] == 1 and st["tun_merged"] == 5
    big = vpair.speer.recv(70000)
    # NEEDS_CSUM, UDP_L4, IP + UDP header, payload per datagram, checksum at 20 + 6
    assert VH.unpack(big[:10]) == (1, 5, 28, 1000, 20, 6)
    body = big[10:]
    assert body[28:] == b"".join(pay)
    assert struct.unpack("!H", body[2:4])[0] == len(body) and csum(body[:20]) == 0xFFFF
    # the UDP length covers the whole packet, as does the pseudo-header sum in the checksum
    assert struct.unpack("!H", body[24:26])[0] == len(body) - 20
    pseudo = body[12:20] + struct.pack("!BBH", 0, 17, len(body) - 20)
    assert struct.unpack("!H", body[26:28])[0] == csum(pseudo)


def test_datagrams_that_are_not_merged(vpair):
    pkts = [
        udp4(b"a" * 500, sport=1),
        udp4(b"b" * 600, sport=1),  # longer than the first: a group of its own
        udp4(b"c" * 600, sport=2),  # another flow
        udp4(b"d" * 600, sport=2, df=False),  # may be fragmented: IP ID matters
    ]
    nocsum = bytearray(udp4(b"e" * 600, sport=2))
    nocsum[26:28] = b"\0\0"  # no checksum (IPv4): merging would invent one
    pkts.append(bytes(nocsum))
    for p in pkts:
        vpair.cpeer.send(NO_VH + p)
    pump([vpair.cli, vpair.srv], lambda _: vpair.srv.stats()["tun_tx_packets"] == len(pkts))
    assert vpair.srv.stats()["tun_merged"] == 0
    got = [vpair.speer.recv(70000) for _ in pkts]
    assert sorted(got) == sorted(NO_VH + p for p in pkts)


def test_a_kernel_without_uso_gets_the_datagrams_one_by_one(vpair):
    vpair.srv._set_test_refuse_uso(True)
    pkts = [udp4(bytes([i]) * 700, ident=i) for i in range(4)]
    for p in pkts:
        vpair.cpeer.send(NO_VH + p)
    pump([vpair.cli, vpair.srv], lambda _: vpair.srv.stats()["tun_tx_packets"] == 4)
    assert [vpair.speer.recv(70000) for _ in pkts] == [NO_VH + p for p in pkts]
    st = vpair.srv.stats()
    assert st["tun_tx_errors"] == 0 and st["tun_merged"] == 0
    # and UDP is not merged again (TCP still is)
    for p in pkts:
        vpair.cpeer.send(NO_VH + p)
    pump([vpair.cli, vpair.srv], lambda _: vpair.srv.stats()["tun_tx_packets"] == 8)
    assert vpair.srv.stats()["tun_writes"] == st["tun_writes"] + 4


def test_uso_packet_is_cut_into_datagrams():
    """A UDP GSO packet from the tun (a socket sending with UDP_SEGMENT) leaves as ordinary
    datagrams, each with its own length, IP ID and checksum."""
    p = Pair(KEY, client={"vnet_hdr": True})
    try:
        p.connect()
        payload = bytes(range(256)) * 10  # 2560 bytes: 2 x 1200 + 160
        sup = bytearray(udp4(payload, ident=40))
        # as the kernel hands it over: partial checksum (pseudo-header sum) in the field
        pseudo = sup[12:20] + struct.pack("!BBH", 0, 17, len(sup) - 20)
        sup[26:28] = struct.pack("!H", csum(pseudo))
        p.cpeer.send(VH.pack(1, 5, 28, 1200, 20, 6) + bytes(sup))
        pump([p.cli, p.srv], lambda _: p.srv.stats()["tun_tx_packets"] == 3)
        assert p.cli.stats()["tun_rx_packets"] == 3 and p.cli.stats()["frames_tx"] == 3
        dgrams = [p.speer.recv(70000) for _ in range(3)]
        for i, d in enumerate(dgrams):
            assert udp_valid(d), i
            assert struct.unpack("!H", d[4:6])[0] == 40 + i
        assert b"".join(d[28:] for d in dgrams) == payload
        assert [len(d) for d in dgrams] == [1228, 1228, 188]
    finally:
        p.close()
