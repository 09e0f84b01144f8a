"""Traffic through the tunnel: reachability, a large checked transfer, NAT, no stalls."""

from __future__ import annotations

import itertools
import re

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

TRANSFER_BYTES = 50_000_000


def test_ping_transfer_and_nat(tb, impl, key):
    # Without the VPN the far host is unreachable: the server does not forward yet.
    assert not tb.client.ping_ok(tb.inet.ip), "far host reachable without the VPN"
    server, client = tb.tunnel_up(impl, key)
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))

    # Checksums at both ends, the server's NAT address seen at the far host, and the bytes
    # counted on the server's tun device.
    tb.check_transfer_through_vpn(tb.client, TRANSFER_BYTES)


@pytest.mark.parametrize("sends", [0, 1], ids=["silent", "stalled-handshake"])
def test_silent_connection_does_not_stall_tunnel(request, tb, impl, key, sends):
    """A connection to the server port that never completes a handshake (from the client's own
    IP) must not block the data plane while the server waits for it."""
    if impl.reference and sends:
        # Run it anyway: it shows the test does detect a stall.
        request.applymarker(
            pytest.mark.xfail(
                reason="the C reference blocks up to 10 s reading a stalled handshake", strict=True
            )
        )
    server, client = tb.tunnel_up(impl, key)
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))

    hold = 12.0
    pinger = tb.start_script(tb.client, testbed.PING, [tb.inet.ip, 170, 0.1, 1.0, 56], "pinger")
    tb.wait_log(pinger, r"^reply ", 10)
    silent = tb.start_script(tb.client, testbed.SILENT, [tb.server.ip, 443, hold, sends], "silent")
    tb.wait_log(silent, "connected", 10)
    silent.wait(hold + 10)
    pinger.wait(40)

    replies = [
        (int(m.group(1)), float(m.group(2)))
        for m in re.finditer(r"^reply (\d+) ([\d.]+)", pinger.log(), re.MULTILINE)
    ]
    times = [t for _, t in replies]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(replies) >= 150, f"only {len(replies)}/170 ping replies"
    assert max(gaps) < 1.0, f"tunnel stalled for {max(gaps):.2f}s"
    assert server.alive() and client.alive()
    tb.client.wait_ping(tb.inet.ip, 5, procs=(server, client))
