"""The client's network options: command line, and the plans they make on every platform
(--route, --exclude, --no-routes, --kill-switch, --dns)."""

from __future__ import annotations

import dataclasses

import pytest

from dsvpn import cli
from dsvpn.config import ClientConfig, ClientNetwork, ServerConfig
from dsvpn.errors import NetworkError, UsageError
from dsvpn.plan import Plan
from dsvpn.platform import NAMES, _killswitch, by_name
from dsvpn.platform._common import NetInfo

NET = NetInfo("eth0", "198.51.100.1", other_gateway="fe80::1%eth0")
LAN = ("192.0.2.0/24", "2001:db8:1::/64")
BSDS = ("openbsd", "freebsd", "netbsd", "dragonfly")


def client(**network: object) -> ClientConfig:
    return ClientConfig(
        key_file="k", server="vpn.example", server_ip="203.0.113.5",
        network=ClientNetwork(**network),  # type: ignore[arg-type]
    )  # fmt: skip


def cmds(plan: Plan) -> list[str]:
    return [" ".join(s.apply) for s in plan.steps]


def undos(plan: Plan) -> list[str]:
    return [" ".join(s.undo) for s in reversed(plan.steps) if s.undo]


def linux(cfg: ClientConfig) -> Plan:
    return by_name("linux").plan(cfg, "tun0", NET)


# -- command line -----------------------------------------------------------------------------


def test_options_parse_and_normalise() -> None:
    inv = cli.parse_args(
        ["client", "k", "vpn.example", "--route", "10.1.2.3/8", "--route=2001:db8::/32",
         "--exclude", "10.9.0.0/16", "--dns", "10.0.0.53,2001:db8::53", "--dns=10.0.0.53",
         "--kill-switch", "-v"]
    )  # fmt: skip
    assert inv.config is not None
    assert inv.config.network == ClientNetwork(
        routes=("10.0.0.0/8", "2001:db8::/32"),
        excludes=("10.9.0.0/16",),
        kill_switch=True,
        dns=("10.0.0.53", "2001:db8::53"),
    )
    assert inv.verbosity == 1
    plain = cli.parse_args(["client", "k", "vpn.example"]).config
    assert plain is not None and plain.network == ClientNetwork() and plain.network.full
    # A bare address is one host.
    one = cli.parse_args(["client", "k", "s", "--route", "192.0.2.9"]).config
    assert one is not None and one.network.routes == ("192.0.2.9/32",)


def test_cleanup_all() -> None:
    assert cli.parse_args(["cleanup"]).cleanup_all is False
    assert cli.parse_args(["cleanup", "--all"]).cleanup_all is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--route", "10.0.0.0/33"], r"invalid --route '10\.0\.0\.0/33'"),
        (["--exclude", "lan"], r"invalid --exclude 'lan'"),
        (["--dns", "10.0.0.1,resolver"], r"invalid --dns address 'resolver'"),
        (["--route"], "--route needs a value"),
        (["--dns="], "--dns needs a value"),
        (["--no-routes", "--route", "10.0.0.0/8"], "contradict"),
        (["--no-routes", "--exclude", "10.0.0.0/8"], "--exclude needs routes"),
        (["--no-routes", "--dns", "10.0.0.1"], "--dns needs routes"),
        (["--no-routes", "--kill-switch"], "would protect nothing"),
        (["--dns", "10.1.0.53", "--exclude", "10.1.0.0/16"], "would bypass the tunnel"),
        (["--all"], "unknown option '--all'"),
    ],
)
def test_bad_client_options(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        cli.parse_args(["client", "k", "vpn.example", *argv])


@pytest.mark.parametrize(
    "option", ["--route", "--exclude", "--dns", "--no-routes", "--kill-switch"]
)
def test_client_options_are_refused_elsewhere(option: str) -> None:
    value = [] if option.startswith("--no") or option == "--kill-switch" else ["10.0.0.1"]
    for argv in (["server", "k"], ["cleanup"], ["keygen", "k"]):
        with pytest.raises(UsageError, match=f"{option} is a client option"):
            cli.parse_args([*argv, option, *value])


def test_carried() -> None:
    assert ClientNetwork().carried() == ("0.0.0.0/0", "::/0")
    assert ClientNetwork(no_routes=True).carried() == ()
    # --route: the resolvers are carried too, unless a route already holds them.
    net = ClientNetwork(routes=("10.0.0.0/8",), dns=("10.0.0.53", "192.0.2.53", "2001:db8::53"))
    assert net.carried() == ("10.0.0.0/8", "192.0.2.53/32", "2001:db8::53/128")


# -- Linux --------------------------------------------------------------------------------------

HEAD = [
    "sysctl net.ipv4.tcp_congestion_control=bbr",
    "ip link set dev tun0 up",
    "iptables -t raw -I PREROUTING ! -i tun0 -d 192.168.192.1 -m addrtype ! --src-type LOCAL"
    " -j DROP",
    "ip addr add 192.168.192.1 peer 192.168.192.254 dev tun0",
    "ip -6 addr add 64:ff9b::192.168.192.1 peer 64:ff9b::192.168.192.254/96 dev tun0",
]
RULES = [
    "ip rule add not fwmark 42069 table 42069",
    "ip -6 rule add not fwmark 42069 table 42069",
    "ip rule add table main suppress_prefixlength 0",
    "ip -6 rule add table main suppress_prefixlength 0",
]


def test_linux_split_routes_fail_closed_for_what_they_carry() -> None:
    plan = linux(
        client(routes=("10.0.0.0/8", "2001:db8::/32"), excludes=("10.1.0.0/16", "2001:db8:1::/48"))
    )
    assert cmds(plan) == [
        *HEAD,
        "ip route add 10.0.0.0/8 dev tun0 table 42069",
        "ip -6 route add 2001:db8::/32 dev tun0 table 42069",
        "ip route add unreachable 10.0.0.0/8 metric 4294967295 table 42069",
        "ip -6 route add unreachable 2001:db8::/32 metric 4294967295 table 42069",
        "ip route add throw 10.1.0.0/16 table 42069",
        "ip -6 route add throw 2001:db8:1::/48 table 42069",
        *RULES,
    ]
    assert undos(plan)[:6] == [
        "ip -6 rule delete table main suppress_prefixlength 0",
        "ip rule delete table main suppress_prefixlength 0",
        "ip -6 rule delete table 42069",
        "ip rule delete table 42069",
        "ip -6 route delete throw 2001:db8:1::/48 table 42069",
        "ip route delete throw 10.1.0.0/16 table 42069",
    ]
    assert not plan.gateway_steps() and not any(s.keep for s in plan.steps)


def test_linux_full_tunnel_with_exclude() -> None:
    plan = linux(client(excludes=("192.168.0.0/16",)))
    assert cmds(plan)[5:10] == [
        "ip route add default dev tun0 table 42069",
        "ip -6 route add default dev tun0 table 42069",
        "ip route add unreachable default metric 4294967295 table 42069",
        "ip -6 route add unreachable default metric 4294967295 table 42069",
        "ip route add throw 192.168.0.0/16 table 42069",
    ]


def test_linux_no_routes() -> None:
    assert cmds(linux(client(no_routes=True))) == HEAD


def test_linux_kill_switch() -> None:
    plan = linux(client(kill_switch=True, local_nets=LAN, excludes=("10.1.0.0/16",)))
    kill = [s for s in plan.steps if s.keep]
    assert kill == plan.steps[-len(kill) :]  # the last steps, so applied after the routes
    ks = "-t filter -A dsvpn-kill-switch"
    assert [" ".join(s.apply) for s in kill] == [
        "iptables -t filter -N dsvpn-kill-switch",
        f"iptables {ks} -o lo -j RETURN",
        f"iptables {ks} -o tun0 -j RETURN",
        f"iptables {ks} -m mark --mark 42069 -j RETURN",
        # A local subnet's hole goes at the head: a new one can be added to the chain in use.
        "iptables -t filter -I dsvpn-kill-switch -d 192.0.2.0/24 -j RETURN",
        f"iptables {ks} -d 169.254.0.0/16 -j RETURN",
        f"iptables {ks} -d 224.0.0.0/24 -j RETURN",
        f"iptables {ks} -d 255.255.255.255/32 -j RETURN",
        f"iptables {ks} -d 10.1.0.0/16 -j RETURN",
        f"iptables {ks} -d 0.0.0.0/0 -j REJECT --reject-with icmp-net-unreachable",
        "iptables -t filter -I OUTPUT -j dsvpn-kill-switch",
        "ip6tables -t filter -N dsvpn-kill-switch",
        f"ip6tables {ks} -o lo -j RETURN",
        f"ip6tables {ks} -o tun0 -j RETURN",
        f"ip6tables {ks} -m mark --mark 42069 -j RETURN",
        "ip6tables -t filter -I dsvpn-kill-switch -d 2001:db8:1::/64 -j RETURN",
        f"ip6tables {ks} -d fe80::/10 -j RETURN",
        f"ip6tables {ks} -d ff02::/16 -j RETURN",
        f"ip6tables {ks} -d ::/0 -j REJECT --reject-with icmp6-no-route",
        "ip6tables -t filter -I OUTPUT -j dsvpn-kill-switch",
    ]
    # Undone in reverse: unhooked first, the chain emptied, then deleted.
    assert [" ".join(s.undo or ()) for s in reversed(kill)][:2] == [
        "ip6tables -t filter -D OUTPUT -j dsvpn-kill-switch",
        "ip6tables -t filter -D dsvpn-kill-switch -d ::/0 -j REJECT --reject-with icmp6-no-route",
    ]
    assert " ".join(kill[0].undo or ()) == "iptables -t filter -X dsvpn-kill-switch"


def test_linux_kill_switch_with_nft_is_one_kept_table() -> None:
    cfg = dataclasses.replace(
        client(kill_switch=True, local_nets=LAN, excludes=("10.1.0.0/16",)), firewall="nft"
    )
    plan = linux(cfg)
    (step,) = [s for s in plan.steps if s.keep]
    assert step is plan.steps[-1]
    assert step.apply[0] == "nft" and len(step.apply) == 2
    assert step.undo == ("nft", "delete", "table", "inet", "dsvpn-kill-switch")
    assert by_name("linux").undo_of(step.apply) == step.undo
    lines = [ln.strip() for ln in step.apply[1].splitlines()]
    assert lines[:3] == [
        "add table inet dsvpn-kill-switch",
        "delete table inet dsvpn-kill-switch",
        "table inet dsvpn-kill-switch {",
    ]
    assert "type filter hook output priority filter; policy accept;" in lines
    rules = lines[lines.index("chain output {") + 2 : -2]
    assert rules == [
        'meta nfproto ipv4 oifname "lo" accept',
        'meta nfproto ipv4 oifname "tun0" accept',
        "meta nfproto ipv4 meta mark 42069 accept",
        "ip daddr 192.0.2.0/24 accept",
        "ip daddr 169.254.0.0/16 accept",
        "ip daddr 224.0.0.0/24 accept",
        "ip daddr 255.255.255.255/32 accept",
        "ip daddr 10.1.0.0/16 accept",
        "ip daddr 0.0.0.0/0 reject with icmpx type no-route",
        'meta nfproto ipv6 oifname "lo" accept',
        'meta nfproto ipv6 oifname "tun0" accept',
        "meta nfproto ipv6 meta mark 42069 accept",
        "ip6 daddr 2001:db8:1::/64 accept",
        "ip6 daddr fe80::/10 accept",
        "ip6 daddr ff02::/16 accept",
        "ip6 daddr ::/0 reject with icmpx type no-route",
    ]
    # The instance's own table (the anti-spoof rule) is another one, not kept.
    (own,) = [s for s in plan.steps if s.apply[0] == "nft" and not s.keep]
    assert "table inet dsvpn-tun0 {" in own.apply[1]


def test_linux_kill_switch_covers_only_the_routes() -> None:
    plan = linux(client(kill_switch=True, local_nets=LAN, routes=("10.0.0.0/8",)))
    kill = [" ".join(s.apply) for s in plan.steps if s.keep]
    # IPv4 only: nothing of IPv6 is carried, so nothing of it is blocked.
    assert not any(c.startswith("ip6tables") for c in kill)
    blocks = [c for c in kill if "REJECT" in c]
    assert blocks == [
        "iptables -t filter -A dsvpn-kill-switch -d 10.0.0.0/8 -j REJECT --reject-with"
        " icmp-net-unreachable"
    ]


def test_kill_switch_rules_are_data() -> None:
    cfg = client(kill_switch=True, local_nets=("192.0.2.0/24",), routes=("10.0.0.0/8",))
    rules = _killswitch.rules(cfg, "tun0", "lo", _killswitch.Rule("pass", mark=42069))
    assert rules[:3] == [
        _killswitch.Rule("pass", out_if="lo"),
        _killswitch.Rule("pass", out_if="tun0"),
        _killswitch.Rule("pass", mark=42069),
    ]
    assert rules[-1] == _killswitch.Rule("block", dst="10.0.0.0/8")
    assert _killswitch.Rule("pass", dst="192.0.2.0/24", local=True) in rules
    # Without discovery (a dry run of another OS) the local subnets are a placeholder.
    unknown = _killswitch.rules(client(kill_switch=True), "tun0", "lo", rules[2])
    assert _killswitch.Rule("pass", dst="<local-subnets>", local=True) in unknown


@pytest.mark.parametrize(
    ("method", "expected", "undo"),
    [
        (
            "resolved",
            [
                "resolvectl dns tun0 10.8.0.1 2001:db8::53",
                "resolvectl domain tun0 ~.",
                "resolvectl default-route tun0 yes",
            ],
            ["resolvectl revert tun0"],
        ),
        ("openresolv", ["resolvconf -a tun0 -m 0 -x"], ["resolvconf -d tun0 -f"]),
        ("resolvconf", ["resolvconf -a tun0.dsvpn"], ["resolvconf -d tun0.dsvpn"]),
        ("file", ["write /etc/resolv.conf"], []),
    ],
)
def test_linux_dns(method: str, expected: list[str], undo: list[str]) -> None:
    plan = linux(client(dns=("10.8.0.1", "2001:db8::53"), dns_via=method))
    dns = plan.steps[len(HEAD) + 8 :]
    assert [" ".join(s.apply) for s in dns] == expected
    assert [" ".join(s.undo) for s in dns if s.undo] == undo
    if method in ("openresolv", "resolvconf"):
        assert dns[0].input == "nameserver 10.8.0.1\nnameserver 2001:db8::53\n"
    if method == "file":
        path, text = dns[0].file or ("", "")
        assert path == "/etc/resolv.conf"
        assert text.splitlines()[1:] == ["nameserver 10.8.0.1", "nameserver 2001:db8::53"]
        assert text.startswith("#")


def test_linux_dns_with_routes_carries_the_resolver() -> None:
    plan = linux(client(routes=("10.0.0.0/8",), dns=("192.0.2.53",), dns_via="resolved"))
    assert "ip route add 192.0.2.53/32 dev tun0 table 42069" in cmds(plan)
    assert "ip route add unreachable 192.0.2.53/32 metric 4294967295 table 42069" in cmds(plan)


# -- macOS and the BSDs -------------------------------------------------------------------------


def bsd(name: str, cfg: ClientConfig, net: NetInfo = NET) -> Plan:
    return by_name(name).plan(cfg, "utun3", net)


@pytest.mark.parametrize("name", ["macos", *BSDS])
def test_bsd_split_routes(name: str) -> None:
    plan = bsd(name, client(routes=("10.0.0.0/8", "2001:db8::/32"), excludes=("10.1.0.0/16",)))
    assert cmds(plan)[2:] == [
        "route add -net 10.0.0.0/8 192.168.192.254",
        "route add -inet6 -net 2001:db8::/32 64:ff9b::192.168.192.254",
        "route add -net 10.1.0.0/16 198.51.100.1",
    ]
    assert undos(plan) == [
        "route delete -net 10.1.0.0/16",
        "route delete -inet6 -net 2001:db8::/32",
        "route delete -net 10.0.0.0/8",
    ]
    # The exclusion follows the gateway; no route to the server is needed: it is not routed.
    assert cmds(Plan(plan.gateway_steps())) == ["route add -net 10.1.0.0/16 198.51.100.1"]


def test_bsd_route_covering_the_server_keeps_it_outside() -> None:
    plan = bsd("freebsd", client(routes=("203.0.113.0/24",)))
    assert cmds(plan)[2:] == [
        "route add 203.0.113.5 198.51.100.1",
        "route add -net 203.0.113.0/24 192.168.192.254",
    ]


def test_bsd_full_tunnel_excludes_both_families() -> None:
    plan = bsd("macos", client(excludes=("192.168.0.0/16", "fd00::/8")))
    assert cmds(plan)[-2:] == [
        "route add -net 192.168.0.0/16 198.51.100.1",
        "route add -inet6 -net fd00::/8 fe80::1%eth0",
    ]
    with pytest.raises(NetworkError, match=r"no default IPv6 route .* --exclude fd00::/8"):
        bsd("macos", client(excludes=("fd00::/8",)), NetInfo("en0", "198.51.100.1"))


def test_bsd_no_routes() -> None:
    assert len(bsd("openbsd", client(no_routes=True)).steps) == 2


def test_needs_gateway() -> None:
    linux_backend, mac = by_name("linux"), by_name("macos")
    assert linux_backend.needs_gateway(client()) is False  # its plan never names the gateway
    assert linux_backend.needs_gateway(ServerConfig(key_file="k"))
    assert mac.needs_gateway(client())
    assert not mac.needs_gateway(client(no_routes=True))
    assert not mac.needs_gateway(client(routes=("10.0.0.0/8",)))
    assert mac.needs_gateway(client(routes=("10.0.0.0/8",), excludes=("10.1.0.0/16",)))
    assert mac.needs_gateway(client(routes=("203.0.0.0/8",)))


def test_macos_kill_switch_is_a_pf_anchor() -> None:
    plan = bsd("macos", client(kill_switch=True, local_nets=("192.0.2.0/24",)))
    enable, anchor = [s for s in plan.steps if s.keep]
    assert enable.apply == ("pfctl", "-E")
    assert anchor.apply == ("pfctl", "-a", "com.apple/dsvpn", "-f", "-")
    assert anchor.undo == ("pfctl", "-a", "com.apple/dsvpn", "-F", "rules")
    assert (anchor.input or "").splitlines() == [
        "pass out quick on lo0 all",
        "pass out quick on utun3 all",
        "pass out quick proto tcp to 203.0.113.5 port 443",
        "pass out quick to 192.0.2.0/24",
        "pass out quick to 169.254.0.0/16",
        "pass out quick to 224.0.0.0/24",
        "pass out quick to 255.255.255.255/32",
        "pass out quick to fe80::/10",
        "pass out quick to ff02::/16",
        "block return out quick to 0.0.0.0/0",
        "block return out quick to ::/0",
    ]


@pytest.mark.parametrize("name", BSDS)
def test_kill_switch_is_refused_on_the_other_bsds(name: str) -> None:
    # Refused as the config is checked (before anything is done), and by the plan itself.
    for call in (
        lambda: by_name(name).prepare(client(kill_switch=True)),
        lambda: bsd(name, client(kill_switch=True)),
    ):
        with pytest.raises(UsageError, match=f"available on Linux and macOS, not on {name}"):
            call()
    assert by_name("macos").prepare(client(kill_switch=True)).network.kill_switch


def test_macos_dns_through_scutil() -> None:
    plan = bsd("macos", client(dns=("10.8.0.1", "10.8.0.2"), dns_via="scutil", dns_service="ABC"))
    (step,) = [s for s in plan.steps if s.apply == ("scutil",)]
    assert step.undo == ("scutil",)
    assert "d.add ServerAddresses * 10.8.0.1 10.8.0.2" in (step.input or "")
    assert "set State:/Network/Service/ABC/DNS" in (step.input or "")
    # The previous value is kept in the dynamic store, and comes back from there.
    assert "get State:/Network/Service/ABC/DNS\nset State:/Network/dsvpn/ABC/SavedDNS" in (
        step.input or ""
    )
    assert "get State:/Network/dsvpn/ABC/SavedDNS\nset State:/Network/Service/ABC/DNS" in (
        step.undo_input or ""
    )


@pytest.mark.parametrize("name", BSDS)
def test_bsd_dns_defaults_to_resolv_conf(name: str) -> None:
    plan = bsd(name, client(dns=("10.8.0.1",)))
    assert [s.file[0] for s in plan.steps if s.file] == ["/etc/resolv.conf"]


# -- dry run ----------------------------------------------------------------------------------


def test_dry_run_shows_every_new_step(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["client", "k", "192.0.2.7", "--dry-run", "--platform", "macos", "--kill-switch",
            "--dns", "10.8.0.1", "--route", "10.0.0.0/8", "--exclude", "10.1.0.0/16"]  # fmt: skip
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    i = lines.index("# on exit")
    setup, on_exit = lines[:i], lines[i:]
    assert "route add -net 10.0.0.0/8 192.168.192.254" in setup
    assert "route add -net 10.1.0.0/16 <gateway>" in setup
    assert "scutil <<'EOF'" in setup and "d.add ServerAddresses * 10.8.0.1" in setup
    assert "pfctl -a com.apple/dsvpn -f - <<'EOF'" in setup
    assert "pass out quick to <local-subnets>" in setup
    assert "block return out quick to 10.0.0.0/8" in setup
    assert on_exit[1] == "pfctl -a com.apple/dsvpn -F rules"
    assert "remove State:/Network/dsvpn/<primary-service>/SavedDNS" in on_exit
    assert on_exit[-1] == "route delete -net 10.0.0.0/8"


def test_dry_run_of_a_resolv_conf(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["client", "k", "192.0.2.7", "--dry-run", "--platform", "openbsd", "--dns", "10.8.0.1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "write /etc/resolv.conf (saved first) <<'EOF'\n" in out
    assert "nameserver 10.8.0.1\nEOF\n" in out
    assert "# on exit\nrestore /etc/resolv.conf\n" in out


@pytest.mark.parametrize("name", NAMES)
def test_every_platform_plans_every_routing_option(name: str) -> None:
    for net in (
        ClientNetwork(routes=("10.0.0.0/8",), excludes=("10.1.0.0/16",), dns=("10.0.0.53",)),
        ClientNetwork(no_routes=True),
    ):
        cfg = dataclasses.replace(client(), network=dataclasses.replace(net, dns_via=""))
        plan = by_name(name).plan(cfg, "tun0", by_name(name).placeholder_net())
        assert plan.render(by_name(name))[0] == "# set up"
