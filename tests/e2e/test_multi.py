"""Two servers in one namespace, on different ports and tunnel ranges."""

from __future__ import annotations

import signal

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e


def test_two_servers_independent(tb2, impl):
    tb = tb2
    key_a, key_b = tb.write_key("key-a"), tb.write_key("key-b")
    cli_a, cli_b = tb.clients
    srv_a, _ = tb.tunnel_up(
        impl, key_a, ns=cli_a, port=443, net="192.168.192", tun="dsva", suffix="-a"
    )
    srv_b, _ = tb.tunnel_up(
        impl, key_b, ns=cli_b, port=8443, net="192.168.193", tun="dsvb", suffix="-b"
    )
    for ns in (cli_a, cli_b):
        ns.wait_ping(tb.inet.ip, 15)
    ra = tb.transfer(cli_a, tb.inet, tb.inet.ip, 5_000_000, port=5301)
    rb = tb.transfer(cli_b, tb.inet, tb.inet.ip, 5_000_000, port=5302)
    for r in (ra, rb):
        assert r["received"]["sha256"] == r["sent"]["sha256"]
        assert r["received"]["peer"] == tb.server_ext_ip

    assert srv_b.stop(signal.SIGTERM) == 0
    # A's rules and forwarding survive B's exit; nothing of B is left.
    rules = testbed.snapshot(tb.server)
    assert testbed.count_rules(tb.server, r"MASQUERADE") == 1, rules["iptables"]
    assert testbed.count_rules(tb.server, r"-s 192\.168\.192\.1(/32)? .*MASQUERADE") == 1
    assert testbed.count_rules(tb.server, r"-d 192\.168\.192\.254(/32)? .*-j DROP") == 1
    assert testbed.count_rules(tb.server, r"dsva") >= 3, rules["iptables"]
    assert "dsvb" not in rules["iptables"] and "192.168.193." not in rules["iptables"]
    assert rules["net.ipv4.ip_forward"] == "1"
    assert "dsvb" not in tb.server.links()
    stats = cli_a.ping(tb.inet.ip, count=10, interval=0.2)
    assert stats["received"] >= 9, stats
    assert srv_a.alive()
    assert not cli_b.ping_ok(tb.inet.ip)


def test_two_servers_share_ipv6_forwarding(tb2, impl):
    """Two servers NATing IPv6 (one with nft, one with iptables): the first to leave hands
    IPv6 forwarding and accept_ra over to the other, and the last one restores both."""
    if impl.reference:
        pytest.skip("the C reference does not forward IPv6 (DSVPN issue #3)")
    tb = tb2
    key_a, key_b = tb.write_key("key-a"), tb.write_key("key-b")
    cli_a, cli_b = tb.clients
    keys = ("net.ipv6.conf.all.forwarding", "net.ipv6.conf.wan0.accept_ra")
    assert [tb.server.sysctl(k) for k in keys] == ["0", "1"]
    before = tb.snapshots()
    srv_a, cl_a = tb.tunnel_up(
        impl, key_a, ns=cli_a, port=443, net="192.168.192", tun="dsva", suffix="-a",
        extra=("-v", "--firewall", "nft"),
    )  # fmt: skip
    srv_b, cl_b = tb.tunnel_up(
        impl, key_b, ns=cli_b, port=8443, net="192.168.193", tun="dsvb", suffix="-b",
        extra=("-v", "--firewall", "iptables"),
    )  # fmt: skip
    far = tb.inet.ip6 or ""
    for ns in (cli_a, cli_b):
        ns.wait_ping(far, 15, procs=(srv_a, srv_b))

    # A leaves first: B keeps forwarding IPv6 and the way out keeps its advertisements.
    assert cl_a.stop(signal.SIGTERM) == 0
    assert srv_a.stop(signal.SIGTERM) == 0
    assert [tb.server.sysctl(k) for k in keys] == ["1", "2"]
    assert testbed.nft_tables(tb.server) == []
    stats = cli_b.ping(far, count=10, interval=0.1)
    assert stats["received"] >= 9, stats

    assert cl_b.stop(signal.SIGTERM) == 0
    assert srv_b.stop(signal.SIGTERM) == 0
    assert [tb.server.sysctl(k) for k in keys] == ["0", "1"]
    assert not tb.changes(before), tb.changes(before)
