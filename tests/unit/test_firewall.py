"""The firewall layer: one rule list, rendered as iptables commands or one nft table."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from dsvpn.config import ClientConfig, Config, ServerConfig
from dsvpn.errors import DsvpnError, PrerequisiteError, UsageError
from dsvpn.plan import show
from dsvpn.platform import by_name
from dsvpn.platform import firewall as fw
from dsvpn.platform._common import NetInfo, word_ifname
from dsvpn.platform.firewall import Hook, Rule

KILL = [
    Rule(Hook.OUTPUT, 4, "accept", oif="lo"),
    Rule(Hook.OUTPUT, 4, "accept", mark=42069),
    Rule(Hook.OUTPUT, 6, "accept", daddr="fd00::/8"),
    Rule(Hook.OUTPUT, 4, "reject", oif="tun0", not_oif=True, first=True),
    Rule(Hook.INPUT, 6, "drop", iif="eth0", saddr="2001:db8::1"),
]


def which(*installed: str) -> Callable[[str], str | None]:
    return lambda tool: f"/usr/sbin/{tool}" if tool in installed else None


def test_iptables_commands() -> None:
    steps = fw.steps("iptables", "tun0", KILL)
    assert [show(s.apply) for s in steps] == [
        "iptables -t filter -A OUTPUT -o lo -j ACCEPT",
        "iptables -t filter -A OUTPUT -m mark --mark 42069 -j ACCEPT",
        "ip6tables -t filter -A OUTPUT -d fd00::/8 -j ACCEPT",
        "iptables -t filter -I OUTPUT ! -o tun0 -j REJECT",
        "ip6tables -t filter -A INPUT -i eth0 -s 2001:db8::1 -j DROP",
    ]
    assert [show(s.undo or ()) for s in steps] == [
        "iptables -t filter -D OUTPUT -o lo -j ACCEPT",
        "iptables -t filter -D OUTPUT -m mark --mark 42069 -j ACCEPT",
        "ip6tables -t filter -D OUTPUT -d fd00::/8 -j ACCEPT",
        "iptables -t filter -D OUTPUT ! -o tun0 -j REJECT",
        "ip6tables -t filter -D INPUT -i eth0 -s 2001:db8::1 -j DROP",
    ]


def test_nft_table() -> None:
    (step,) = fw.steps("nft", "tun0", KILL)
    # Chains in hook order, whatever order the rules came in; rules in their own order.
    assert step.apply == (
        "nft",
        "add table inet dsvpn-tun0\n"
        "delete table inet dsvpn-tun0\n"
        "table inet dsvpn-tun0 {\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tiifname "eth0" ip6 saddr 2001:db8::1 drop\n'
        "\t}\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy accept;\n"
        '\t\tmeta nfproto ipv4 oifname "lo" accept\n'
        "\t\tmeta nfproto ipv4 meta mark 42069 accept\n"
        "\t\tip6 daddr fd00::/8 accept\n"
        '\t\tmeta nfproto ipv4 oifname != "tun0" reject\n'
        "\t}\n"
        "}\n",
    )
    assert step.undo == ("nft", "delete", "table", "inet", "dsvpn-tun0")
    assert fw.steps("nft", "tun0", []) == [] == fw.steps("iptables", "tun0", [])


def test_nft_addresses_are_written_as_nft_reads_them() -> None:
    rule = Rule(Hook.RAW_PREROUTING, 6, "drop", daddr="64:ff9b::192.168.192.1")
    assert "ip6 daddr 64:ff9b::c0a8:c001 drop" in fw.nft_ruleset("dsvpn-x", [rule])
    with pytest.raises(DsvpnError, match=r"192\.0\.2\.1 is not an IPv6 address"):
        fw.nft_ruleset("dsvpn-x", [dataclasses.replace(rule, daddr="192.0.2.1")])


@pytest.mark.parametrize("name", ['we"ird', "back\\slash", "tab\tname", ""])
def test_nft_refuses_interface_names_it_cannot_quote(name: str) -> None:
    with pytest.raises(DsvpnError, match="cannot be used in an nft rule"):
        fw.nft_ruleset("dsvpn-x", [Rule(Hook.FORWARD, 4, "accept", iif=name)])


def test_table_name() -> None:
    assert fw.table_name("tun0") == "dsvpn-tun0"
    assert fw.table_name("vpn_1.a-b") == "dsvpn-vpn_1.a-b"
    assert fw.table_name("<tun>") == "dsvpn-<tun>"  # --dry-run before the OS names it
    for bad in ("tun 0", "tun;0", "tün", "", "<x>", "x" * 16):
        with pytest.raises(UsageError, match="cannot name an nft table"):
            fw.table_name(bad)


def test_choose_and_check_installed() -> None:
    assert fw.choose(None, which("iptables", "nft")) == "iptables"
    assert fw.choose(None, which("iptables")) == "iptables"
    assert fw.choose(None, which("nft")) == "nft"
    assert fw.choose(None, which()) == "iptables"  # only shown (dry run); check_installed stops
    assert fw.choose("nft", which("iptables")) == "nft"
    fw.check_installed(None, which("nft"))
    fw.check_installed("iptables", which("iptables"))
    with pytest.raises(PrerequisiteError, match=r"^neither iptables nor nft found"):
        fw.check_installed(None, which())
    with pytest.raises(PrerequisiteError, match=r"^`nft` not found \(install nftables\)$"):
        fw.check_installed("nft", which("iptables"))


def _cfg(mode: str) -> Config:
    if mode == "server":
        return ServerConfig(key_file="k")
    return ClientConfig(key_file="k", server="vpn", server_ip="203.0.113.5")


@pytest.mark.parametrize("firewall", ["iptables", "nft"])
@pytest.mark.parametrize("mode", ["server", "client"])
def test_undo_of_matches_every_planned_firewall_step(firewall: str, mode: str) -> None:
    cfg = dataclasses.replace(_cfg(mode), firewall=firewall)  # type: ignore[arg-type]
    net = NetInfo("eth0", "198.51.100.1", "eth0.6", True)
    plan = by_name("linux").plan(cfg, "tun0", net)
    found = [s for s in plan.steps if s.apply[0] in ("iptables", "ip6tables", "nft")]
    assert found
    for step in found:
        assert by_name("linux").undo_of(step.apply) == step.undo
        # nft needs no shapes: the table's name is all its undo takes from the apply.
        assert fw.undo_of(step.apply, ()) == (step.undo if step.apply[0] == "nft" else None)


@pytest.mark.parametrize(
    "apply",
    [
        ("nft", "delete table inet dsvpn-tun0\n"),
        ("nft", "add table inet other\n"),
        ("nft", "add table ip dsvpn-tun0\n"),
        ("nft", "add table inet dsvpn-tun0; flush ruleset\n"),
        ("nft", "-f", "-"),
        ("nft", "add table inet dsvpn-tun0\n", "x"),
        ("iptables", "-t", "raw", "-D", "PREROUTING", "-j", "DROP"),
        ("iptables", "-t", "filter", "-A", "PREROUTING", "-j", "DROP"),
        ("iptables", "-t", "nat", "-F"),
        ("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE"),
        ("sh", "-c", "true"),
        (),
    ],
)
def test_undo_of_refuses_other_shapes(apply: tuple[str, ...]) -> None:
    assert fw.undo_of(apply, ()) is None
    assert by_name("linux").undo_of(apply) is None


def test_iptables_shapes_check_the_words_that_vary() -> None:
    words = {"<if>": word_ifname}
    shape = fw.iptables_shape(Rule(Hook.FORWARD, 6, "accept", iif="<if>", oif="tun0"), words)
    apply = ("ip6tables", "-t", "filter", "-A", "FORWARD", "-i", "eth0", "-o", "tun0", "-j",
             "ACCEPT")  # fmt: skip
    assert fw.undo_of(apply, [shape]) == (*apply[:3], "-D", *apply[4:])
    for bad in ("-x", "a/b", "x" * 16):
        assert fw.undo_of((*apply[:6], bad, *apply[7:]), [shape]) is None
    assert fw.undo_of(("iptables", *apply[1:]), [shape]) is None  # the IPv6 rule's tool
    assert fw.undo_of((*apply[:8], "tun1", *apply[9:]), [shape]) is None  # a literal word


def test_show_keeps_a_ruleset_readable() -> None:
    assert show(("nft", "add table inet t\ntable inet t {\n}\n")) == (
        "nft 'add table inet t\ntable inet t {\n}\n'"
    )
    # A quote inside would end the shell's quoting: repr instead, on one line.
    assert show(("nft", "a 'b'\nc")) == "nft \"a 'b'\\nc\""
