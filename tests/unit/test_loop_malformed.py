"""A test peer that knows the key sends each malformed frame to a server Loop: each one gets the
answer _loop.pyi documents (dropped and counted, or the session ended for a bad tag), a valid
packet still gets through, and the server keeps serving (a new handshake works afterwards)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from loop_rig import RawClient, ServerRig, ip4_packet, ip6_packet, pump, stat

from dsvpn import _loop as L

KEY = bytes(range(7, 39))
CLIENT4 = "10.9.0.2"
CLIENT6 = "64:ff9b::a09:2"  # the IPv6 twin of CLIENT4
MTU = 1500


@pytest.fixture
def rig() -> Iterator[ServerRig]:
    r = ServerRig(KEY, client_ip4=CLIENT4, mtu=MTU)
    yield r
    r.close()


def connect(rig: ServerRig) -> RawClient:
    rc = RawClient(rig.lst, KEY)
    rc.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rc.hello()
    pump(rig.loop, lambda e: (L.EV_SESSION_UP, "127.0.0.1") in e)
    rc.finish()
    return rc


def feed(rig: ServerRig, rc: RawClient, data: bytes) -> list[tuple[int, str]]:
    """Send bytes and run the loop until it has read all of them (or an event came)."""
    want = stat(rig.loop, "sock_rx_bytes") + len(data)
    rc.sock.sendall(data)
    return pump(rig.loop, lambda e: stat(rig.loop, "sock_rx_bytes") >= want or e)


def tun_packets(rig: ServerRig) -> list[bytes]:
    out = []
    rig.peer_tun.setblocking(False)
    try:
        while True:
            out.append(rig.peer_tun.recv(70000))
    except BlockingIOError:
        return out
    finally:
        rig.peer_tun.settimeout(5)


def assert_serves_again(rig: ServerRig) -> None:
    """A new client gets a session and its packets through."""
    rc = connect(rig)
    good = ip6_packet(CLIENT6)
    assert feed(rig, rc, rc.frame(good)) == []
    assert tun_packets(rig) == [good]
    rc.sock.close()


DROPPED = {
    "larger than the MTU": (ip4_packet(CLIENT4, size=MTU + 1), "oversize"),
    "65535 bytes": (ip4_packet(CLIENT4, size=65535), "oversize"),
    "IP version 5": (b"\x55" + bytes(59), "non_ip"),
    "no IP version at all": (b"\x00" * 30, "non_ip"),
    "shorter than an IPv4 header": (ip4_packet(CLIENT4)[:19], "non_ip"),
    "shorter than an IPv6 header": (ip6_packet(CLIENT6)[:39], "non_ip"),
    "one byte": (b"\x45", "non_ip"),
    "another tunnel IPv4 source": (ip4_packet("10.9.0.99"), "spoofed"),
    "a public IPv4 source": (ip4_packet("1.2.3.4"), "spoofed"),
    "the server's own IPv4 source": (ip4_packet("10.9.0.1"), "spoofed"),
    "another tunnel IPv6 source": (ip6_packet("64:ff9b::a09:63"), "spoofed"),
    "a public IPv6 source": (ip6_packet("2001:db8::1"), "spoofed"),
    # A link-local source passes for no one, but one that leaves the link is still spoofed.
    "a link-local IPv6 source": (ip6_packet("fe80::1"), "spoofed"),
    "a link-local source to a site-scope group": (ip6_packet("fe80::1", "ff05::2"), "spoofed"),
    "another tunnel source to all nodes": (ip6_packet("64:ff9b::a09:63", "ff02::1"), "spoofed"),
    "a public source to a link-local address": (ip6_packet("2001:db8::1", "fe80::1"), "spoofed"),
    # What the client's kernel sends on its own link: not spoofing, counted apart.
    "a router solicitation": (ip6_packet("fe80::1", "ff02::2"), "link_local"),
    "an MLD report from the unspecified address": (ip6_packet("::", "ff02::16"), "link_local"),
    "a neighbour solicitation": (ip6_packet("fe80::1", "ff02::1:ff00:2"), "link_local"),
    "to a link-local neighbour": (ip6_packet("fe80::1", "fe80::2"), "link_local"),
    "to an interface-local group": (ip6_packet("fe80::1", "ff01::1"), "link_local"),
    "to a transient link-scope group": (ip6_packet("fe80::1", "ff12::1:3"), "link_local"),
    "from a multicast source": (ip6_packet("ff02::1", "ff02::1"), "link_local"),
}


@pytest.mark.parametrize("case", DROPPED)
def test_dropped_and_counted(rig: ServerRig, case: str) -> None:
    bad, reason = DROPPED[case]
    rc = connect(rig)
    good = ip4_packet(CLIENT4, size=MTU)  # the largest allowed, from the client's own address
    assert feed(rig, rc, rc.frame(bad) + rc.frame(good)) == []
    assert tun_packets(rig) == [good]
    st = rig.loop.stats()
    assert st[f"{reason}_drops"] == 1 and st["frames_rx"] == 2
    assert sum(v for k, v in st.items() if k.endswith("_drops")) == 1
    session = rig.loop.session()
    assert session is not None and session["drops"][reason] == 1
    assert sum(session["drops"].values()) == 1
    assert rig.loop.session_active
    rc.sock.close()
    pump(rig.loop, lambda e: (L.EV_SESSION_DOWN, "connection closed by peer") in e)
    assert_serves_again(rig)


def test_valid_ipv4_and_ipv6_are_delivered(rig: ServerRig) -> None:
    rc = connect(rig)
    pkts = [ip4_packet(CLIENT4), ip6_packet(CLIENT6), ip4_packet(CLIENT4, size=20)]
    pkts.append(ip6_packet(CLIENT6, size=40))
    assert feed(rig, rc, b"".join(rc.frame(p) for p in pkts)) == []
    assert tun_packets(rig) == pkts
    session = rig.loop.session()
    assert session is not None and sum(session["drops"].values()) == 0


def test_destinations_are_left_to_the_kernel(rig: ServerRig) -> None:
    """The loop judges sources, not destinations: a packet from the client to the server's own
    tunnel address (a ping of the server) or to a loopback address goes to the tun as it is.
    The kernel then answers the first and drops the second as a martian (a loopback destination
    never arrives on another interface), exactly as for any other interface."""
    rc = connect(rig)
    pkts = [
        ip4_packet(CLIENT4, dst="10.9.0.1"),
        ip4_packet(CLIENT4, dst="127.0.0.1"),
        ip6_packet(CLIENT6, dst="::1"),
        ip4_packet(CLIENT4, dst="255.255.255.255"),
    ]
    assert feed(rig, rc, b"".join(rc.frame(p) for p in pkts)) == []
    assert tun_packets(rig) == pkts
    st = rig.loop.stats()
    assert sum(v for k, v in st.items() if k.endswith("_drops")) == 0
    assert rig.loop.session_active


def test_empty_frame_is_accepted_and_writes_nothing(rig: ServerRig) -> None:
    """As the reference: LEN 0 works as a keepalive; its tag is checked and it advances the
    receiving state like any frame, so the frame after it still decrypts."""
    rc = connect(rig)
    good = ip4_packet(CLIENT4)
    assert feed(rig, rc, rc.frame(b"") + rc.frame(b"") + rc.frame(good)) == []
    assert tun_packets(rig) == [good]
    st = rig.loop.stats()
    assert st["frames_rx"] == 3 and sum(v for k, v in st.items() if k.endswith("_drops")) == 0
    assert rig.loop.session_active


@pytest.mark.parametrize("where", ["tag", "payload"])
def test_bad_tag_ends_the_session(rig: ServerRig, where: str) -> None:
    rc = connect(rig)
    good = ip4_packet(CLIENT4)
    first = rc.frame(good)  # frames are encrypted in the order they are sent
    bad = bytearray(rc.frame(ip4_packet(CLIENT4, size=100)))
    bad[2 if where == "tag" else 30] ^= 0x40
    rc.sock.sendall(first + bytes(bad) + rc.frame(good))
    evs = pump(rig.loop, lambda e: e)
    assert evs == [(L.EV_SESSION_DOWN, "corrupted stream")]
    assert tun_packets(rig) == [good]  # the frame before it was delivered, none after
    assert not rig.loop.session_active and rig.loop.session() is None
    assert stat(rig.loop, "bad_tag_drops") == 1
    ended = rig.loop.ended_session()
    assert ended is not None
    assert ended["reason"] == "corrupted stream" and ended["drops"]["bad_tag"] == 1
    assert ended["rx_packets"] == 1  # only the genuine frame counts as received
    rc.sock.settimeout(5)
    assert rc.sock.recv(10) == b""  # the server closed the connection
    assert_serves_again(rig)


def test_truncated_frame_then_eof(rig: ServerRig) -> None:
    rc = connect(rig)
    frame = rc.frame(ip4_packet(CLIENT4, size=200))
    assert feed(rig, rc, frame[:100]) == []
    assert stat(rig.loop, "rx_buffered") == 100
    rc.sock.shutdown(socket.SHUT_WR)
    evs = pump(rig.loop, lambda e: e)
    assert evs == [(L.EV_SESSION_DOWN, "connection closed by peer")]
    assert tun_packets(rig) == []
    assert stat(rig.loop, "rx_buffered") == 0
    ended = rig.loop.ended_session()
    assert ended is not None and ended["reason"] == "connection closed by peer"
    rc.sock.close()
    assert_serves_again(rig)


def test_length_prefix_larger_than_what_arrives(rig: ServerRig) -> None:
    """LEN 65535 with only part of the payload: the loop waits for the rest, keeps serving
    nothing from it, and the frame is dropped as oversize once complete."""
    rc = connect(rig)
    frame = rc.frame(ip4_packet(CLIENT4, size=65535))
    assert frame[:2] == b"\xff\xff"
    assert feed(rig, rc, frame[:40000]) == []
    assert tun_packets(rig) == [] and rig.loop.session_active
    assert feed(rig, rc, frame[40000:]) == []
    assert tun_packets(rig) == [] and stat(rig.loop, "oversize_drops") == 1


def test_every_malformed_frame_in_one_session(rig: ServerRig) -> None:
    """All the droppable cases back to back in one stream: the state stays in step."""
    rc = connect(rig)
    good = ip4_packet(CLIENT4)
    wire = b"".join(rc.frame(bad) + rc.frame(good) for bad, _ in DROPPED.values())
    assert feed(rig, rc, wire) == []
    assert tun_packets(rig) == [good] * len(DROPPED)
    session = rig.loop.session()
    assert session is not None
    for reason in ("oversize", "non_ip", "spoofed", "link_local"):
        want = sum(1 for _, r in DROPPED.values() if r == reason)
        assert session["drops"][reason] == want, reason
        assert stat(rig.loop, f"{reason}_drops") == want


def test_without_client_ip4_any_source_is_delivered() -> None:
    """The client side (no client_ip4): what the server forwards may come from anywhere."""
    with ServerRig(KEY, mtu=MTU) as r:
        rc = connect(r)
        pkts = [ip4_packet("1.2.3.4"), ip6_packet("2001:db8::1"), b"\x55" + bytes(10)]
        assert feed(r, rc, b"".join(rc.frame(p) for p in pkts)) == []
        assert tun_packets(r) == pkts
        assert stat(r.loop, "spoofed_drops") == 0 and stat(r.loop, "non_ip_drops") == 0


def test_explicit_ipv6_twin() -> None:
    with ServerRig(KEY, client_ip4=CLIENT4, client_ip6="2001:db8::2") as r:
        rc = connect(r)
        mine, twin = ip6_packet("2001:db8::2"), ip6_packet(CLIENT6)
        assert feed(r, rc, rc.frame(mine) + rc.frame(twin)) == []
        assert tun_packets(r) == [mine] and stat(r.loop, "spoofed_drops") == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"mtu": 67},
        {"mtu": 65536},
        {"client_ip6": CLIENT6},
        {"client_ip4": "10.9.0"},
        {"client_ip4": CLIENT6},
        {"client_ip4": CLIENT4, "client_ip6": CLIENT4},
    ],
)
def test_bad_arguments(kw: dict[str, object]) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with pytest.raises(ValueError):
            L.Loop(a.fileno(), KEY, is_server=True, **kw)
    finally:
        a.close()
        b.close()
