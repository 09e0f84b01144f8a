"""A server whose host reaches the world over IPv6 only (no IPv4 address or route out): its
clients connect over IPv6, their IPv6 traffic reaches the far host through its NAT, their IPv4
traffic stops at the server, which says so once; nothing is left after a stop."""

from __future__ import annotations

import signal

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

NO_IPV4_OUT = "no IPv4 route out: clients' IPv4 traffic cannot leave this server"


@pytest.mark.parametrize("firewall", ["iptables", "nft"])
def test_ipv6_only_server(tb, impl, key, firewall):
    if impl.reference:
        pytest.skip("the C reference needs an IPv4 route out and does not forward IPv6")
    # The server host's way out loses its IPv4 address, and with it the IPv4 default route.
    tb.server.run(["ip", "addr", "del", f"{tb.wan}.1/24", "dev", "wan0"])
    assert "default" not in tb.server.run(["ip", "route"]).stdout
    far6 = tb.inet.ip6
    assert far6
    before = tb.snapshots()
    assert not tb.client.ping_ok(far6), "far host reachable over IPv6 without the VPN"

    server, client = tb.tunnel_up(
        impl, key, server_ip=tb.server.ip6, extra=("-v", "--firewall", firewall)
    )
    tb.client.wait_ping(far6, 15, procs=(server, client), what="far host over IPv6, through NAT")
    assert server.log().count(NO_IPV4_OUT) == 1, server.log_tail()
    # The tunnel itself is IPv4 inside (the server's tun address answered); beyond, nothing.
    assert not tb.client.ping_ok(tb.inet.ip or "")
    ss = tb.client.run(["ss", "-Htn", "state", "established"]).stdout
    assert f"[{tb.server.ip6}]:{testbed.DEFAULT_PORT}" in ss, ss  # the outer connection: IPv6
    v4 = tb.server.run(["iptables-save", "-t", "nat"]).stdout
    assert "MASQUERADE" not in v4, v4

    assert client.stop(signal.SIGTERM) == 0, client.log_tail()
    assert server.stop(signal.SIGTERM) == 0, server.log_tail()
    assert "Traceback" not in server.log()
    changes = tb.changes(before)
    assert not changes, changes
