"""A server whose host has an IPv6 route out and no IPv4 one: on Linux it serves (clients reach
it over IPv6, their IPv6 is NATed out, their IPv4 cannot leave, and it says so in one line);
where the server NATs IPv4 alone (by hand, macOS and the BSDs) it refuses in one line."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dsvpn import cli, tunnel
from dsvpn.config import ServerConfig
from dsvpn.errors import NetworkError
from dsvpn.platform import _common, by_name, linux
from dsvpn.platform._common import NetInfo, discover

V6_ONLY = NetInfo("", "", ext_if6="eth0")


class FakeNetifaces:
    """A host whose eth0 has only IPv6 (and a default IPv6 route, unless told otherwise)."""

    AF_INET = 2
    AF_INET6 = 10

    def __init__(self, default: dict[int, tuple[str, str]] | None = None) -> None:
        self.default = {10: ("fe80::1", "eth0")} if default is None else default

    def gateways(self) -> dict[Any, Any]:
        return {"default": self.default}

    def interfaces(self) -> list[str]:
        return ["lo", "eth0"]

    def ifaddresses(self, name: str) -> dict[int, list[dict[str, str]]]:
        return {
            "lo": {2: [{"addr": "127.0.0.1", "netmask": "255.0.0.0"}]},
            "eth0": {10: [{"addr": "2001:db8::2", "netmask": "ffff:ffff:ffff:ffff::/64"}]},
        }[name]


def test_discovery_finds_the_ipv6_route_out_alone() -> None:
    ni = FakeNetifaces()
    assert discover(ServerConfig(key_file="k"), ni) == V6_ONLY
    assert discover(ServerConfig(key_file="k", external_ip="2001:db8::2"), ni) == V6_ONLY
    with pytest.raises(NetworkError, match=r"no default route \(IPv4 or IPv6\)"):
        discover(ServerConfig(key_file="k"), FakeNetifaces({}))


def test_linux_plan_nats_ipv6_and_no_ipv4() -> None:
    plan = linux.server_plan(ServerConfig(key_file="k"), "tun0", V6_ONLY)
    lines = [" ".join(s.apply) for s in plan.steps]
    assert not any("MASQUERADE" in ln and ln.startswith("iptables ") for ln in lines)
    assert not any(" -o  " in ln or ln.endswith(" -o") for ln in lines)  # no empty interface
    assert "ip6tables -t nat -A POSTROUTING -o eth0 -s 64:ff9b::192.168.192.1 -j MASQUERADE" in (
        lines
    )
    assert "ip6tables -t filter -A FORWARD -i tun0 -o eth0 -j ACCEPT" in lines
    # The tunnel's own IPv4 addresses and their anti-spoof rule stay: the client still reaches
    # the server itself over IPv4 inside the tunnel.
    assert any(ln.startswith("iptables -t raw -I PREROUTING") for ln in lines)
    assert "sysctl net.ipv6.conf.all.forwarding=1" in lines
    # nft: one table, no IPv4 NAT in it either.
    nft = linux.server_plan(ServerConfig(key_file="k"), "tun0", V6_ONLY, "nft")
    (table,) = [s.apply[1] for s in nft.steps if s.apply[0] == "nft"]
    assert "ip6 saddr 64:ff9b::c0a8:c001 masquerade" in table
    assert "ip saddr" not in table


def test_linux_says_in_one_line_that_ipv4_cannot_leave() -> None:
    backend = by_name("linux")
    assert backend.notes(ServerConfig(key_file="k"), "tun0", V6_ONLY) == [
        "no IPv4 route out: clients' IPv4 traffic cannot leave this server (their IPv6 traffic "
        "is NATed out of eth0)"
    ]
    with_both = NetInfo("eth0", "192.0.2.1", ext_if6="eth0")
    assert backend.notes(ServerConfig(key_file="k"), "tun0", with_both) == []


@pytest.mark.parametrize("name", ["macos", "openbsd", "freebsd"])
def test_servers_that_nat_ipv4_alone_refuse(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(_common, "_netifaces", FakeNetifaces)
    with pytest.raises(NetworkError, match=f"no default IPv4 route: a server on {name} needs one"):
        by_name(name).discover(ServerConfig(key_file="k"))


def test_linux_backend_serves_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "_netifaces", FakeNetifaces)
    assert by_name("linux").discover(ServerConfig(key_file="k")).ext_if == ""


def test_dry_run_shows_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_common, "_netifaces", FakeNetifaces)
    backend = by_name("linux")
    monkeypatch.setattr(backend, "discover", lambda cfg: V6_ONLY)
    monkeypatch.setattr(tunnel.platform, "current", lambda: backend)
    inv = cli.parse_args(["server", "k", "--dry-run"])
    assert inv.config is not None
    cfg = dataclasses.replace(inv.config, firewall="iptables")
    assert tunnel.dry_run(cfg, None) == 0
    out = capsys.readouterr().out
    assert "# no IPv4 route out: clients' IPv4 traffic cannot leave this server" in out
    assert "ip6tables -t nat -A POSTROUTING -o eth0" in out
    assert "iptables -t nat" not in out
