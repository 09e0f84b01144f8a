"""A real utun device on macOS (root only): open it through the backend, give it addresses,
and move one IPv4 packet each way through the loop's address-family header framing.

Skipped everywhere else; the macOS CI job runs it with sudo where the runner allows utun."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "darwin" or os.geteuid() != 0, reason="needs macOS and root (utun)"
)

LOCAL, PEER = "10.213.77.1", "10.213.77.2"


def ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # no UDP checksum
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    head = head[:10] + struct.pack("!H", ip_checksum(head)) + head[12:]
    return head + udp


def test_utun_roundtrip_with_address_family_header() -> None:
    from dsvpn.errors import DsvpnError
    from dsvpn.platform import by_name

    backend = by_name("macos")
    try:
        fd, name = backend.open_tun(None, 1500)
    except DsvpnError as exc:  # a sandboxed runner may refuse utun: say so, do not fail
        pytest.skip(f"utun not available here: {exc}")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert name.startswith("utun")
        subprocess.run(["ifconfig", name, LOCAL, PEER, "up"], check=True)
        receiver.bind((LOCAL, 0))
        receiver.settimeout(5)
        # Out: a datagram to the peer comes out of the utun with the AF_INET header (2, BE).
        receiver.sendto(b"ping", (PEER, 9))
        assert select.select([fd], [], [], 5)[0], "nothing came out of the utun"
        packet = os.read(fd, 65536)
        assert struct.unpack("!I", packet[:4])[0] == backend.framing.af_inet
        assert socket.inet_ntoa(packet[4 + 16 : 4 + 20]) == PEER
        # In: a packet written with the header is delivered to the local socket.
        port = receiver.getsockname()[1]
        reply = udp_packet(PEER, LOCAL, 9, port, b"pong")
        os.write(fd, struct.pack("!I", backend.framing.af_inet) + reply)
        data, sender = receiver.recvfrom(100)
        assert (data, sender[0]) == (b"pong", PEER)
    finally:
        receiver.close()
        os.close(fd)  # the utun and its addresses vanish with the descriptor
