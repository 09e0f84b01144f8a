"""Exact command lists of every backend and mode (facts from the reference's os.c), and the
backends' own knowledge of them: every planned undo is recognised as the undo of its apply,
nothing else is."""

from __future__ import annotations

import pytest

from dsvpn.config import ClientConfig, Config, ServerConfig
from dsvpn.plan import Plan
from dsvpn.platform import NAMES, by_name
from dsvpn.platform._common import NetInfo

NET = NetInfo("eth0", "198.51.100.1")
BSDS = ("macos", "openbsd", "freebsd", "netbsd", "dragonfly")


def server_cfg() -> ServerConfig:
    return ServerConfig(key_file="k")


def client_cfg(server_ip: str = "203.0.113.5") -> ClientConfig:
    return ClientConfig(key_file="k", server="vpn.example", server_ip=server_ip)


def cmds(plan: Plan) -> list[str]:
    return [" ".join(s.apply) for s in plan.steps]


def undos(plan: Plan) -> list[str | None]:
    """Undo argv per step, in the order the runner runs them (reverse)."""
    out: list[str | None] = []
    for s in reversed(plan.steps):
        if s.sysctl:
            out.append(f"restore {s.sysctl[0]}")
        elif s.undo:
            out.append(" ".join(s.undo))
    return out


RAW_S = "PREROUTING ! -i tun0 -d 192.168.192.254 -m addrtype ! --src-type LOCAL -j DROP"
RAW_C = "PREROUTING ! -i tun0 -d 192.168.192.1 -m addrtype ! --src-type LOCAL -j DROP"


def test_linux_server_plan() -> None:
    plan = by_name("linux").plan(server_cfg(), "tun0", NET)
    assert cmds(plan) == [
        "sysctl net.ipv4.ip_forward=1",
        "ip addr add 192.168.192.254 peer 192.168.192.1 dev tun0",
        "ip -6 addr add 64:ff9b::192.168.192.254 peer 64:ff9b::192.168.192.1/96 dev tun0",
        "ip link set dev tun0 up",
        f"iptables -t raw -I {RAW_S}",
        "iptables -t nat -A POSTROUTING -o eth0 -s 192.168.192.1 -j MASQUERADE",
        "iptables -t filter -A FORWARD -i eth0 -o tun0 -m state --state RELATED,ESTABLISHED"
        " -j ACCEPT",
        "iptables -t filter -A FORWARD -i tun0 -o eth0 -j ACCEPT",
    ]
    assert undos(plan) == [
        "iptables -t filter -D FORWARD -i tun0 -o eth0 -j ACCEPT",
        "iptables -t filter -D FORWARD -i eth0 -o tun0 -m state --state RELATED,ESTABLISHED"
        " -j ACCEPT",
        "iptables -t nat -D POSTROUTING -o eth0 -s 192.168.192.1 -j MASQUERADE",
        f"iptables -t raw -D {RAW_S}",
        "restore net.ipv4.ip_forward",
    ]
    assert plan.steps[0].sysctl == ("net.ipv4.ip_forward", "1")
    assert not plan.gateway_steps()


def test_linux_client_plan() -> None:
    plan = by_name("linux").plan(client_cfg(), "tun0", NET)
    assert cmds(plan) == [
        "sysctl net.ipv4.tcp_congestion_control=bbr",
        "ip link set dev tun0 up",
        f"iptables -t raw -I {RAW_C}",
        "ip addr add 192.168.192.1 peer 192.168.192.254 dev tun0",
        "ip -6 addr add 64:ff9b::192.168.192.1 peer 64:ff9b::192.168.192.254/96 dev tun0",
        "ip route add default dev tun0 table 42069",
        "ip -6 route add default dev tun0 table 42069",
        "ip rule add not fwmark 42069 table 42069",
        "ip -6 rule add not fwmark 42069 table 42069",
        "ip rule add table main suppress_prefixlength 0",
        "ip -6 rule add table main suppress_prefixlength 0",
    ]
    assert undos(plan) == [
        "ip -6 rule delete table main suppress_prefixlength 0",
        "ip rule delete table main suppress_prefixlength 0",
        "ip -6 rule delete table 42069",
        "ip rule delete table 42069",
        f"iptables -t raw -D {RAW_C}",
        "restore net.ipv4.tcp_congestion_control",
    ]
    assert plan.steps[0].best_effort
    assert not plan.gateway_steps()


@pytest.mark.parametrize("name", BSDS)
def test_bsd_server_plan(name: str) -> None:
    plan = by_name(name).plan(server_cfg(), "tun0", NET)
    assert cmds(plan) == [
        "sysctl -w net.inet.ip.forwarding=1",
        "ifconfig tun0 192.168.192.254 192.168.192.1 up",
        "ifconfig tun0 inet6 64:ff9b::192.168.192.254 64:ff9b::192.168.192.1 prefixlen 128 up",
    ]
    assert undos(plan) == ["restore net.inet.ip.forwarding"]


@pytest.mark.parametrize("name", BSDS)
def test_bsd_client_plan(name: str) -> None:
    plan = by_name(name).plan(client_cfg(), "utun3", NET)
    assert cmds(plan) == [
        "ifconfig utun3 192.168.192.1 192.168.192.254 up",
        "ifconfig utun3 inet6 64:ff9b::192.168.192.1 64:ff9b::192.168.192.254 prefixlen 128 up",
        "route add 203.0.113.5 198.51.100.1",
        "route add 0/1 192.168.192.254",
        "route add 128/1 192.168.192.254",
        "route add -inet6 -blackhole 0000::/1 64:ff9b::192.168.192.254",
        "route add -inet6 -blackhole 8000::/1 64:ff9b::192.168.192.254",
    ]
    assert undos(plan) == [
        "route delete -inet6 8000::/1",
        "route delete -inet6 0000::/1",
        "route delete 128/1",
        "route delete 0/1",
        "route delete 203.0.113.5",
    ]
    assert [" ".join(s.apply) for s in plan.gateway_steps()] == [
        "route add 203.0.113.5 198.51.100.1"
    ]


def test_bsd_client_ipv6_server() -> None:
    net = NetInfo("em0", "fe80::1%em0")
    plan = by_name("freebsd").plan(client_cfg("2001:db8::5"), "tun0", net)
    (step,) = plan.gateway_steps()
    assert step.apply == ("route", "add", "-inet6", "2001:db8::5", "fe80::1%em0")
    assert step.undo == ("route", "delete", "-inet6", "2001:db8::5")


def test_render_linux_server() -> None:
    backend = by_name("linux")
    lines = backend.plan(server_cfg(), "tun0", backend.placeholder_net()).render(backend)
    assert lines[0] == "# set up"
    assert lines[1] == "sysctl net.ipv4.ip_forward=1"
    assert "iptables -t nat -A POSTROUTING -o <ext-if> -s 192.168.192.1 -j MASQUERADE" in lines
    i = lines.index("# on exit")
    assert len(lines[1:i]) == 8
    assert lines[i + 1] == "iptables -t filter -D FORWARD -i tun0 -o <ext-if> -j ACCEPT"
    assert lines[-1] == "sysctl net.ipv4.ip_forward=<saved>"


def test_render_bsd_client() -> None:
    backend = by_name("openbsd")
    lines = backend.plan(client_cfg(), "tun0", backend.placeholder_net()).render(backend)
    assert "route add 203.0.113.5 <gateway>" in lines
    assert lines[-1] == "route delete 203.0.113.5"
    assert lines.index("# on exit") == 8


def test_server_notes() -> None:
    s, c = server_cfg(), client_cfg()
    assert by_name("openbsd").notes(s, "tun0", NET)[1].strip() == (
        "pass out from 192.168.192.1 nat-to egress"
    )
    assert "pfctl -f /etc/pf.conf" in by_name("openbsd").notes(s, "tun0", NET)[2]
    assert by_name("macos").notes(s, "utun0", NET)[1].strip() == (
        "nat on eth0 from 192.168.192.1 to any -> (eth0)"
    )
    for name in ("freebsd", "netbsd", "dragonfly"):
        (line,) = by_name(name).notes(s, "tun0", NET)
        assert line.startswith("NAT is not configured on ")
    for name in NAMES:
        assert by_name(name).notes(c, "tun0", NET) == []
    assert by_name("linux").notes(s, "tun0", NET) == []


def test_only_a_new_gateway_changes_the_gateway_steps() -> None:
    # Runner.reapply_gateway moves routes only when these steps differ between two plans.
    def changed(name: str, cfg: Config, old: NetInfo, new: NetInfo) -> bool:
        plan = by_name(name).plan
        return plan(cfg, "tun0", old).gateway_steps() != plan(cfg, "tun0", new).gateway_steps()

    other = NetInfo("wlan0", "10.0.0.1")
    same_gw = NetInfo("wlan0", NET.gateway)
    assert changed("macos", client_cfg(), NET, other)
    assert not changed("macos", client_cfg(), NET, same_gw)
    assert not changed("macos", client_cfg(), NET, NET)
    assert not changed("linux", client_cfg(), NET, other)
    assert not changed("openbsd", server_cfg(), NET, other)


# -- what the backends recognise in a record ------------------------------------------------------

IPV6_NET = NetInfo("em0", "fe80::1%em0")


def every_plan(name: str) -> list[Plan]:
    backend = by_name(name)
    return [
        backend.plan(server_cfg(), "tun0", NET),
        backend.plan(client_cfg(), "tun0", NET),
        backend.plan(client_cfg("2001:db8::5"), "tun3", IPV6_NET),
        backend.plan(ServerConfig(key_file="k", local_tun_ip="10.8.0.1", remote_tun_ip="10.8.0.2"),
                     "dsvpn-a", NetInfo("wan0", "10.0.0.1")),
    ]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_every_planned_undo_is_recognised(name: str) -> None:
    backend = by_name(name)
    for plan in every_plan(name):
        for step in plan.steps:
            if step.sysctl:
                assert step.sysctl[0] in backend.sysctl_keys
                assert step.apply == backend.sysctl_write(*step.sysctl)
                assert step.undo is None
            elif step.undo is not None:
                assert backend.undo_of(step.apply) == step.undo, step
            else:
                assert backend.undo_of(step.apply) is None, step


@pytest.mark.parametrize(
    "apply",
    [
        ("/bin/sh", "-c", "id"),
        ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"),
        ("iptables", "-t", "nat", "-I", "POSTROUTING", "-o", "eth0", "-s", "10.0.0.1", "-j",
         "MASQUERADE"),
        ("iptables", "-t", "filter", "-A", "POSTROUTING", "-o", "eth0", "-s", "10.0.0.1", "-j",
         "MASQUERADE"),
        ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "--modprobe=/x", "-s", "10.0.0.1",
         "-j", "MASQUERADE"),
        ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-s", "10.0.0.0/8", "-j",
         "MASQUERADE"),
        ("iptables", "-t", "nat", "-D", "POSTROUTING", "-o", "eth0", "-s", "10.0.0.1", "-j",
         "MASQUERADE"),
        ("ip", "rule", "add", "not", "fwmark", "1", "table", "1"),
        ("ip", "-6", "rule", "add", "table", "main"),
        ("ip", "route", "add", "default", "dev", "tun0", "table", "42069"),
        ("route", "add", "-net", "0/0", "10.0.0.1"),
        ("route", "add", "203.0.113.5", "-iface"),
        ("route", "add", "0/1", "64:ff9b::1"),
        ("route", "add", "-inet6", "-blackhole", "0000::/1", "10.0.0.1"),
        ("route", "add", "-inet6", "2001:db8::5", "fe80::1%-x"),
        ("sysctl", "net.ipv4.ip_forward=1"),
        ("ifconfig", "tun0", "10.0.0.1", "10.0.0.2", "up"),
    ],
)  # fmt: skip
def test_nothing_else_is_recognised(apply: tuple[str, ...]) -> None:
    for name in NAMES:
        assert by_name(name).undo_of(apply) is None, (name, apply)


def test_sysctl_syntax_and_keys() -> None:
    assert by_name("linux").sysctl_write("k", "v") == ("sysctl", "k=v")
    assert by_name("freebsd").sysctl_write("k", "v") == ("sysctl", "-w", "k=v")
    assert by_name("linux").sysctl_keys == {
        "net.ipv4.ip_forward",
        "net.ipv4.tcp_congestion_control",
    }
    for name in BSDS:
        assert by_name(name).sysctl_keys == {"net.inet.ip.forwarding"}
        assert by_name(name).sysctl_read("net.inet.ip.forwarding") == (
            "sysctl",
            "-n",
            "net.inet.ip.forwarding",
        )


def test_mtu_commands() -> None:
    assert by_name("linux").mtu_argv("tun0", 9000) == ("ip", "link", "set", "dev", "tun0", "mtu",
                                                       "9000")  # fmt: skip
    assert by_name("netbsd").mtu_argv("tun1", 1500) == ("ifconfig", "tun1", "mtu", "1500")
