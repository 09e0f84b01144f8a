"""Exact command lists of every backend and mode (facts from the reference's os.c), and the
backends' own knowledge of them: every planned undo is recognised as the undo of its apply,
nothing else is."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from dsvpn.config import ClientConfig, ClientNetwork, Config, ServerConfig
from dsvpn.errors import UsageError
from dsvpn.plan import Plan
from dsvpn.platform import NAMES, by_name
from dsvpn.platform._common import NetInfo

NET = NetInfo("eth0", "198.51.100.1")
NET6 = NetInfo("eth0", "198.51.100.1", ext_if6="eth6")
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
        # Fail closed: these outlive the tun (kill -9) while the rules send traffic here.
        "ip route add unreachable default metric 4294967295 table 42069",
        "ip -6 route add unreachable default metric 4294967295 table 42069",
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
        "ip -6 route delete unreachable default metric 4294967295 table 42069",
        "ip route delete unreachable default metric 4294967295 table 42069",
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
    # Linux NATs IPv6 too when the server has an IPv6 route out, and says when it has none.
    assert by_name("linux").notes(s, "tun0", NET) == [
        "no IPv6 route out: clients' IPv6 traffic will not be forwarded"
    ]
    assert by_name("linux").notes(s, "tun0", NET6) == []
    assert by_name("linux").notes(c, "tun0", NET) == []


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


# -- Linux: IPv6 NAT and the nft firewall ------------------------------------------------------

RAW6 = "PREROUTING ! -i tun0 -d 64:ff9b::192.168.192.254 -m addrtype ! --src-type LOCAL -j DROP"


def linux_plan(cfg: Config, net: NetInfo, firewall: str | None) -> Plan:
    cfg = dataclasses.replace(cfg, firewall=firewall)  # type: ignore[arg-type]
    return by_name("linux").plan(cfg, "tun0", net)


def test_linux_server_plan_with_ipv6_route_out() -> None:
    plan = linux_plan(server_cfg(), NET6, "iptables")
    seed = cmds(by_name("linux").plan(server_cfg(), "tun0", NET))
    # The seed's commands first, unchanged; then the same for IPv6 out of eth6.
    assert cmds(plan)[: len(seed)] == seed
    assert cmds(plan)[len(seed) :] == [
        f"ip6tables -t raw -I {RAW6}",
        "ip6tables -t nat -A POSTROUTING -o eth6 -s 64:ff9b::192.168.192.1 -j MASQUERADE",
        "ip6tables -t filter -A FORWARD -i eth6 -o tun0 -m state --state RELATED,ESTABLISHED"
        " -j ACCEPT",
        "ip6tables -t filter -A FORWARD -i tun0 -o eth6 -j ACCEPT",
        # Its own client's address to its own tun, however many servers share 64:ff9b::/96.
        "ip -6 route add 64:ff9b::192.168.192.1/128 dev tun0",
        "sysctl net.ipv6.conf.all.forwarding=1",
    ]
    assert undos(plan)[:5] == [
        "restore net.ipv6.conf.all.forwarding",
        "ip6tables -t filter -D FORWARD -i tun0 -o eth6 -j ACCEPT",
        "ip6tables -t filter -D FORWARD -i eth6 -o tun0 -m state --state RELATED,ESTABLISHED"
        " -j ACCEPT",
        "ip6tables -t nat -D POSTROUTING -o eth6 -s 64:ff9b::192.168.192.1 -j MASQUERADE",
        f"ip6tables -t raw -D {RAW6}",
    ]
    assert undos(plan)[5:] == undos(by_name("linux").plan(server_cfg(), "tun0", NET))
    assert plan.steps[-1].sysctl == ("net.ipv6.conf.all.forwarding", "1")


@pytest.mark.parametrize(
    ("ifname", "key"),
    [("eth6", "net.ipv6.conf.eth6.accept_ra"), ("eth0.7", "net/ipv6/conf/eth0.7/accept_ra")],
)
def test_linux_server_keeps_router_advertisements(ifname: str, key: str) -> None:
    # Turning forwarding on would drop the default route learnt from advertisements: the
    # interface is told to keep taking them first, and is set back after forwarding.
    net = NetInfo("eth0", "198.51.100.1", ext_if6=ifname, ext6_accepts_ra=True)
    plan = linux_plan(server_cfg(), net, "iptables")
    assert cmds(plan)[-2:] == [f"sysctl {key}=2", "sysctl net.ipv6.conf.all.forwarding=1"]
    assert plan.steps[-2].sysctl == (key, "2")
    assert undos(plan)[:2] == ["restore net.ipv6.conf.all.forwarding", f"restore {key}"]
    # Without advertisements there is nothing to keep.
    assert not any("accept_ra" in c for c in cmds(linux_plan(server_cfg(), NET6, "iptables")))


def test_linux_server_auto_firewall_is_iptables_when_installed() -> None:
    assert cmds(by_name("linux").plan(server_cfg(), "tun0", NET6)) == cmds(
        linux_plan(server_cfg(), NET6, "iptables")
    )


NFT_SERVER_HEAD = """\
add table inet dsvpn-tun0
delete table inet dsvpn-tun0
table inet dsvpn-tun0 {
	chain prerouting {
		type filter hook prerouting priority raw; policy accept;
		iifname != "tun0" ip daddr 192.168.192.254 fib saddr type != local drop
"""


def test_linux_server_plan_nft_ipv4_only() -> None:
    plan = linux_plan(server_cfg(), NET, "nft")
    table = cmds(linux_plan(server_cfg(), NET, "iptables"))
    # The four iptables commands become one nft command at the place of the first.
    assert cmds(plan)[:4] == table[:4]
    assert len(plan.steps) == 5
    nft = plan.steps[4]
    assert nft.apply[0] == "nft" and len(nft.apply) == 2
    assert nft.apply[1] == NFT_SERVER_HEAD + (
        "\t}\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        '\t\toifname "eth0" ip saddr 192.168.192.1 masquerade\n'
        "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        '\t\tmeta nfproto ipv4 iifname "eth0" oifname "tun0" ct state related,established'
        " accept\n"
        '\t\tmeta nfproto ipv4 iifname "tun0" oifname "eth0" accept\n'
        "\t}\n"
        "}\n"
    )
    assert nft.undo == ("nft", "delete", "table", "inet", "dsvpn-tun0")
    assert undos(plan) == ["nft delete table inet dsvpn-tun0", "restore net.ipv4.ip_forward"]
    assert "ip6" not in nft.apply[1]


def test_linux_server_plan_nft_with_ipv6() -> None:
    plan = linux_plan(server_cfg(), NET6, "nft")
    assert cmds(plan)[-2:] == [
        "ip -6 route add 64:ff9b::192.168.192.1/128 dev tun0",
        "sysctl net.ipv6.conf.all.forwarding=1",
    ]
    (nft,) = [s for s in plan.steps if s.apply[0] == "nft"]
    assert nft.apply[1] == NFT_SERVER_HEAD + (
        '\t\tiifname != "tun0" ip6 daddr 64:ff9b::c0a8:c0fe fib saddr type != local drop\n'
        "\t}\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        '\t\toifname "eth0" ip saddr 192.168.192.1 masquerade\n'
        '\t\toifname "eth6" ip6 saddr 64:ff9b::c0a8:c001 masquerade\n'
        "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        '\t\tmeta nfproto ipv4 iifname "eth0" oifname "tun0" ct state related,established'
        " accept\n"
        '\t\tmeta nfproto ipv4 iifname "tun0" oifname "eth0" accept\n'
        '\t\tmeta nfproto ipv6 iifname "eth6" oifname "tun0" ct state related,established'
        " accept\n"
        '\t\tmeta nfproto ipv6 iifname "tun0" oifname "eth6" accept\n'
        "\t}\n"
        "}\n"
    )
    assert undos(plan) == [
        "restore net.ipv6.conf.all.forwarding",
        "nft delete table inet dsvpn-tun0",
        "restore net.ipv4.ip_forward",
    ]
    assert not any(s.apply[0] in ("iptables", "ip6tables") for s in plan.steps)


def test_linux_client_plan_nft() -> None:
    plan = linux_plan(client_cfg(), NET, "nft")
    ipt = linux_plan(client_cfg(), NET, "iptables")
    # Only the anti-spoof rule changes tool; everything else is the same plan.
    assert [c for c in cmds(plan) if not c.startswith("nft")] == [
        c for c in cmds(ipt) if not c.startswith("iptables")
    ]
    nft = plan.steps[2]
    assert nft.apply == (
        "nft",
        "add table inet dsvpn-tun0\n"
        "delete table inet dsvpn-tun0\n"
        "table inet dsvpn-tun0 {\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority raw; policy accept;\n"
        '\t\tiifname != "tun0" ip daddr 192.168.192.1 fib saddr type != local drop\n'
        "\t}\n"
        "}\n",
    )
    assert undos(plan)[-2:] == [
        "nft delete table inet dsvpn-tun0",
        "restore net.ipv4.tcp_congestion_control",
    ]


def test_render_linux_server_nft() -> None:
    backend = by_name("linux")
    cfg = dataclasses.replace(server_cfg(), firewall="nft")
    plan = backend.plan(cfg, "tun0", backend.placeholder_net())
    lines = "\n".join(plan.render(backend)).split("\n")
    # The ruleset reads as it is, in single quotes (so the line also works in a shell).
    start = lines.index("nft 'add table inet dsvpn-tun0")
    end = lines.index("'")
    assert lines[start + 1 : start + 3] == [
        "delete table inet dsvpn-tun0",
        "table inet dsvpn-tun0 {",
    ]
    assert '\t\toifname "<ext-if>" ip saddr 192.168.192.1 masquerade' in lines[start:end]
    assert lines[end + 1 :] == [
        "# on exit",
        "nft delete table inet dsvpn-tun0",
        "sysctl net.ipv4.ip_forward=<saved>",
    ]


@pytest.mark.parametrize("name", BSDS)
def test_firewall_option_is_linux_only(name: str) -> None:
    # Refused for a real run and a dry run alike (both prepare the config).
    for cfg in (server_cfg(), client_cfg()):
        with pytest.raises(UsageError, match=f"--firewall has no effect on {name}"):
            by_name(name).prepare(dataclasses.replace(cfg, firewall="nft"))
        by_name(name).prepare(cfg)


# -- what the backends recognise in a record ------------------------------------------------------

IPV6_NET = NetInfo("em0", "fe80::1%em0")
RA_NETS = (
    NetInfo("eth0", "198.51.100.1", ext_if6="eth6", ext6_accepts_ra=True),
    NetInfo("eth0", "198.51.100.1", ext_if6="eth0.7", ext6_accepts_ra=True),
)


def every_plan(name: str) -> list[Plan]:
    backend = by_name(name)
    plans = [
        backend.plan(server_cfg(), "tun0", NET),
        backend.plan(client_cfg(), "tun0", NET),
        backend.plan(client_cfg("2001:db8::5"), "tun3", IPV6_NET),
        backend.plan(ServerConfig(key_file="k", local_tun_ip="10.8.0.1", remote_tun_ip="10.8.0.2"),
                     "dsvpn-a", NetInfo("wan0", "10.0.0.1")),
        *client_network_plans(name),
    ]  # fmt: skip
    if name == "linux":
        # IPv6 NAT (ip6tables, accept_ra) and both firewalls.
        for firewall in ("iptables", "nft"):
            for net in (NET6, *RA_NETS):
                plans.append(linux_plan(server_cfg(), net, firewall))
                plans.append(linux_plan(client_cfg(), net, firewall))
                for pool in POOLS:
                    plans.append(linux_plan(pool_cfg(*pool), net, firewall))
            plans.append(linux_plan(pool_cfg(), NET, firewall))
    if backend.serves_pools and name != "linux":
        plans += [backend.plan(pool_cfg(*pool), "tun0", NET) for pool in POOLS]
        plans.append(backend.plan(pool_cfg(), "tun0", NET))
    return plans


def client_network_plans(name: str) -> list[Plan]:
    """The client's --route/--exclude/--no-routes/--dns/--kill-switch, every DNS method."""
    backend = by_name(name)
    net = NetInfo("eth0", "198.51.100.1", other_gateway="fe80::1%eth0")
    methods = {"linux": ("resolved", "resolvconf", "openresolv", "file"), "macos": ("scutil",)}
    plans = []
    for method in methods.get(name, ("resolvconf", "openresolv", "file")):
        options = ClientNetwork(
            routes=("10.0.0.0/8", "2001:db8::/32"), excludes=("10.1.0.0/16", "fd00::/8"),
            dns=("10.0.0.53", "192.0.2.53"), dns_via=method, dns_service="A1-B2",
            kill_switch=backend.kill_switch, local_nets=("192.0.2.0/24", "2001:db8:1::/64"),
        )  # fmt: skip
        for network in (options, ClientNetwork(excludes=("192.168.0.0/16",), dns_via=method)):
            for firewall in backend.firewalls or (None,):
                cfg = ClientConfig(
                    key_file="k", server="s", server_ip="203.0.113.5", network=network,
                    firewall=firewall,  # type: ignore[arg-type]
                )  # fmt: skip
                plans.append(backend.plan(cfg, "tun0", net))
    return plans


@pytest.mark.parametrize("name", NAMES)
def test_every_planned_undo_is_recognised(name: str) -> None:
    backend = by_name(name)
    for plan in every_plan(name):
        for step in plan.steps:
            if step.sysctl:
                assert backend.is_sysctl_key(step.sysctl[0]), step
                assert step.apply == backend.sysctl_write(*step.sysctl)
                assert step.undo is None
            elif step.undo is not None:
                assert backend.undo_of(step.apply) == step.undo, step
            else:
                assert backend.undo_of(step.apply) is None, step


@pytest.mark.parametrize(
    "apply",
    [
        # A pool only as a server plans one: a prefix of 16 to 30, in 64:ff9b::/96 for IPv6,
        # in its one spelling.
        ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-s", "10.0.0.0/15", "-j",
         "MASQUERADE"),
        ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-s", "10.0.0.0/31", "-j",
         "MASQUERADE"),
        ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-s", "10.0.0.1/24", "-j",
         "MASQUERADE"),
        ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-s", "010.0.0.0/24", "-j",
         "MASQUERADE"),
        ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-s", "64:ff9b::/120",
         "-j", "MASQUERADE"),
        ("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth6", "-s", "2001:db8::/120",
         "-j", "MASQUERADE"),
        ("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth6", "-s",
         "64:ff9b::c0a8:c000/104", "-j", "MASQUERADE"),
        ("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth6", "-s",
         "64:ff9b:0::c0a8:c000/120", "-j", "MASQUERADE"),
        ("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth6", "-s", "10.0.0.0/24",
         "-j", "MASQUERADE"),
        ("iptables", "-t", "filter", "-A", "FORWARD", "-i", "tun0", "-o", "eth0", "-s",
         "10.0.0.0/24", "-j", "ACCEPT"),
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
        # ip6tables: only the shapes of the IPv6 rules, with IPv6 addresses.
        ("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth6", "-s", "192.168.192.1",
         "-j", "MASQUERADE"),
        ("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth6", "-s", "64:ff9b::/96",
         "-j", "MASQUERADE"),
        ("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "--modprobe=/x", "-s",
         "64:ff9b::c0a8:c001", "-j", "MASQUERADE"),
        ("ip6tables", "-t", "filter", "-A", "INPUT", "-i", "eth6", "-j", "ACCEPT"),
        ("ip6tables", "-t", "filter", "-D", "FORWARD", "-i", "tun0", "-o", "eth6", "-j",
         "ACCEPT"),
        # nft: only the load of a dsvpn-<tun> table, as one ruleset argument.
        ("nft", "-f", "/tmp/evil"),
        ("nft", "delete table inet dsvpn-tun0"),
        ("nft", "add table inet other-table-not-ours\ndelete table inet other-table-not-ours\n"
         "table inet other-table-not-ours {\n}\n"),
        ("nft", "add table inet dsvpn-tun0\ndelete table inet dsvpn-tun0\n"
         "table inet dsvpn-tun1 {\n}\n"),
        ("nft", "add table inet dsvpn-tun0\nflush ruleset\ntable inet dsvpn-tun0 {\n}\n"),
        ("nft", "add table inet dsvpn-../x\ndelete table inet dsvpn-../x\n"
         "table inet dsvpn-../x {\n}\n"),
        ("nft", "add table ip dsvpn-tun0\ndelete table ip dsvpn-tun0\n"
         "table ip dsvpn-tun0 {\n}\n"),
        ("nft", "add table inet dsvpn-tun0\ndelete table inet dsvpn-tun0\n"
         "table inet dsvpn-tun0 {\n}\n", "-f"),
        ("nft", "add table inet dsvpn-tun0\ndelete table inet dsvpn-tun0\n"
         "table inet dsvpn-tun0 {\n"),
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
        "net.ipv6.conf.all.forwarding",
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


@pytest.mark.parametrize(
    "key",
    [
        "net.ipv6.conf.eth6.accept_ra",
        "net/ipv6/conf/eth0.7/accept_ra",
        "net.ipv6.conf.a-fifteen-chars.accept_ra",
        "net.ipv6.conf.all.forwarding",
    ],
)
def test_linux_sysctl_keys_it_plans(key: str) -> None:
    assert by_name("linux").is_sysctl_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "kernel.core_pattern",
        "net.ipv6.conf.eth6.forwarding",
        "net.ipv6.conf.eth6.accept_ra.x",
        "net.ipv6.conf.all.accept_ra",  # every interface, not one
        "net.ipv6.conf.default.accept_ra",  # interfaces to come
        "net/ipv6/conf/all/accept_ra",
        "net.ipv6.conf.eth0.7.accept_ra",  # sysctl would read net.ipv6.conf.eth0 . 7...
        "net/ipv6/conf/eth6/accept_ra",  # dsvpn writes the dot form for a name without dots
        "net/ipv6/conf/../accept_ra",
        "net/ipv6/conf/../x/accept_ra",
        "net/ipv6/conf/./accept_ra",
        "net.ipv6.conf..accept_ra",
        "net.ipv6.conf.a-sixteen-chars!.accept_ra",
        "net.ipv6.conf.-x.accept_ra",
        "net.ipv6.conf.eth 6.accept_ra",
        "net.ipv6.conf.eth6.accept_ra\n",
        " net.ipv6.conf.eth6.accept_ra",
    ],
)
def test_linux_sysctl_keys_it_does_not_plan(key: str) -> None:
    assert not by_name("linux").is_sysctl_key(key)
    for name in BSDS:
        assert not by_name(name).is_sysctl_key(key)


def test_accept_ra_key_refuses_what_it_could_not_read_back() -> None:
    from dsvpn.errors import DsvpnError
    from dsvpn.platform.linux import accept_ra_key

    for ifname in ("all", "default", "-x", "a/b", "x" * 16, ""):
        with pytest.raises(DsvpnError, match="cannot be used in a sysctl key"):
            accept_ra_key(ifname)


# -- a server of several clients (a peers file) -------------------------------------------------

POOLS = (
    ("10.8.0.0/24", "10.8.0.1"),
    ("172.16.0.0/16", "172.16.255.254"),
    ("10.9.9.8/30", "10.9.9.9"),
)


def pool_cfg(pool: str = "192.168.192.0/24", server: str = "192.168.192.254") -> ServerConfig:
    network = pool.split("/")[0]
    return ServerConfig(key_file="peers", local_tun_ip=server, remote_tun_ip=network,
                        peers_file="/etc/dsvpn/peers", pool=pool)  # fmt: skip


def test_linux_pool_server_plan() -> None:
    plan = linux_plan(pool_cfg(), NET6, "iptables")
    single = cmds(linux_plan(server_cfg(), NET6, "iptables"))
    assert (
        cmds(plan)
        == [
            "sysctl net.ipv4.ip_forward=1",
            "ip addr add 192.168.192.254/24 dev tun0",
            "ip -6 addr add 64:ff9b::192.168.192.254/120 dev tun0",
            "ip link set dev tun0 up",
            f"iptables -t raw -I {RAW_S}",
            "iptables -t nat -A POSTROUTING -o eth0 -s 192.168.192.0/24 -j MASQUERADE",
            *single[6:8],  # FORWARD both ways: the same rules as for one client
            single[8],  # the IPv6 anti-spoof rule
            "ip6tables -t nat -A POSTROUTING -o eth6 -s 64:ff9b::c0a8:c000/120 -j MASQUERADE",
            *single[10:12],
            # no /128 route: the pool's /120 beats the /96 of servers of one client
            "sysctl net.ipv6.conf.all.forwarding=1",
        ]
    )
    assert undos(plan)[1:5] == [
        "ip6tables -t filter -D FORWARD -i tun0 -o eth6 -j ACCEPT",
        "ip6tables -t filter -D FORWARD -i eth6 -o tun0 -m state --state RELATED,ESTABLISHED"
        " -j ACCEPT",
        "ip6tables -t nat -D POSTROUTING -o eth6 -s 64:ff9b::c0a8:c000/120 -j MASQUERADE",
        "ip6tables -t raw -D PREROUTING ! -i tun0 -d 64:ff9b::192.168.192.254 -m addrtype !"
        " --src-type LOCAL -j DROP",
    ]


@pytest.mark.parametrize(("pool", "server"), POOLS)
def test_linux_pool_server_plan_nft(pool: str, server: str) -> None:
    plan = linux_plan(pool_cfg(pool, server), NET6, "nft")
    prefix = int(pool.split("/")[1])
    assert cmds(plan)[1:3] == [
        f"ip addr add {server}/{prefix} dev tun0",
        f"ip -6 addr add 64:ff9b::{server}/{96 + prefix} dev tun0",
    ]
    (nft,) = [s for s in plan.steps if s.apply[0] == "nft"]
    twin = ipaddress.IPv6Network(f"64:ff9b::{pool.split('/')[0]}/{96 + prefix}")
    assert f'oifname "eth0" ip saddr {pool} masquerade' in nft.apply[1]
    assert f'oifname "eth6" ip6 saddr {twin} masquerade' in nft.apply[1]
    assert f"ip daddr {server} fib saddr type != local drop" in nft.apply[1]
    assert undos(plan) == [
        "restore net.ipv6.conf.all.forwarding",
        "nft delete table inet dsvpn-tun0",
        "restore net.ipv4.ip_forward",
    ]
    assert by_name("linux").undo_of(nft.apply) == nft.undo


@pytest.mark.parametrize(("name", "tun"), [("macos", "utun4"), ("openbsd", "tun2")])
@pytest.mark.parametrize(("pool", "server"), [("192.168.192.0/24", "192.168.192.254"), *POOLS])
def test_bsd_pool_server_plan(name: str, tun: str, pool: str, server: str) -> None:
    backend = by_name(name)
    cfg = backend.prepare(pool_cfg(pool, server))
    network, prefix = pool.split("/")
    twin = ipaddress.IPv6Network(f"64:ff9b::{network}/{96 + int(prefix)}")
    plan = backend.plan(cfg, tun, NET)
    assert cmds(plan) == [
        "sysctl -w net.inet.ip.forwarding=1",
        # the tun's peer is the pool's network address, which is no client's
        f"ifconfig {tun} {server} {network} up",
        f"ifconfig {tun} inet6 64:ff9b::{server} 64:ff9b::{network} prefixlen 128 up",
        f"route add -net {pool} {network}",
        f"route add -inet6 -net {twin} 64:ff9b::{network}",
    ]
    assert undos(plan) == [
        f"route delete -inet6 -net {twin}",
        f"route delete -net {pool}",
        "restore net.inet.ip.forwarding",
    ]
    assert plan.gateway_steps() == []  # nothing to redo when the default route moves


def test_bsd_pool_server_plan_exact() -> None:
    plan = by_name("macos").plan(pool_cfg(), "utun4", NET)
    assert cmds(plan)[3:] == [
        "route add -net 192.168.192.0/24 192.168.192.0",
        "route add -inet6 -net 64:ff9b::c0a8:c000/120 64:ff9b::192.168.192.0",
    ]


def test_bsd_pool_server_notes() -> None:
    cfg = pool_cfg("10.8.0.0/24", "10.8.0.1")
    assert by_name("macos").notes(cfg, "utun4", NET)[1].strip() == (
        "nat on eth0 from 10.8.0.0/24 to any -> (eth0)"
    )
    assert by_name("openbsd").notes(cfg, "tun2", NET)[1].strip() == (
        "pass out from 10.8.0.0/24 nat-to egress"
    )


@pytest.mark.parametrize("name", ["freebsd", "netbsd", "dragonfly"])
def test_a_pool_is_refused_where_no_server_of_several_clients_runs(name: str) -> None:
    with pytest.raises(
        UsageError,
        match=f"several clients .* runs on Linux, macOS and OpenBSD, not on {name}: give it a key",
    ):
        by_name(name).prepare(pool_cfg())
