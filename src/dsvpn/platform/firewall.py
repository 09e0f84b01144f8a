"""Linux packet filter rules, described once and rendered for either tool.

A plan asks for a list of :class:`Rule` and gets :class:`Step` s back from :func:`steps`:

- iptables: one command per rule (``iptables`` or ``ip6tables``), undone one by one with
  ``-D``: the seed's exact commands.
- nft: one table of the instance's own, ``table inet dsvpn-<instance>``, holding every rule
  of both families. It is loaded in one transaction by one command whose only argument is
  the ruleset, and removed by ``nft delete table inet dsvpn-<instance>``: one step, one
  entry in the instance's record, and an undo that can only ever delete a table named
  ``dsvpn-...`` (undo_of).

The nft table has base chains of its own at the same hooks and priorities as iptables'
raw, nat and filter tables, so it works next to iptables-nft and other tables. An
``accept`` there only ends the packet's walk through this table, though: a ``drop`` in
another table at the same hook (Docker sets iptables' FORWARD policy to DROP) still drops
it, whereas an iptables rule appended to that chain would have come before the policy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from dsvpn.config import FirewallName as Firewall
from dsvpn.errors import DsvpnError, PrerequisiteError, UsageError
from dsvpn.plan import Argv, Step
from dsvpn.platform._common import Shape, Word, fits

FIREWALLS: tuple[Firewall, ...] = ("iptables", "nft")
# What provides each, for check_installed (as Backend.tools).
PROVIDED_BY: dict[Firewall, str] = {"iptables": "iptables", "nft": "nftables"}

TABLE_PREFIX = "dsvpn-"
DRY_RUN_TUN = "<tun>"  # what --dry-run calls a tun device the OS has not named yet
Family = Literal[4, 6]


class Hook(Enum):
    """Where a rule goes: (iptables table, iptables chain, nft chain, nft chain type,
    nft priority). Each hook is one base chain of the nft table, named after the hook."""

    RAW_PREROUTING = ("raw", "PREROUTING", "prerouting", "filter", "raw")
    NAT_POSTROUTING = ("nat", "POSTROUTING", "postrouting", "nat", "srcnat")
    INPUT = ("filter", "INPUT", "input", "filter", "filter")
    FORWARD = ("filter", "FORWARD", "forward", "filter", "filter")
    OUTPUT = ("filter", "OUTPUT", "output", "filter", "filter")

    @property
    def ipt_table(self) -> str:
        return self.value[0]

    @property
    def ipt_chain(self) -> str:
        return self.value[1]

    @property
    def nft_chain(self) -> str:
        return self.value[2]


Action = Literal["accept", "drop", "reject", "masquerade"]


@dataclass(frozen=True)
class Rule:
    """One packet filter rule of one address family; every field given must match."""

    hook: Hook
    family: Family
    action: Action
    iif: str | None = None  # input interface (by name, as iptables -i)
    not_iif: bool = False  # ... or rather any other input interface
    oif: str | None = None
    not_oif: bool = False
    saddr: str | None = None  # address or prefix of the family
    daddr: str | None = None
    mark: int | None = None  # the packet's fwmark
    src_not_local: bool = False  # the source is none of this host's addresses
    established: bool = False  # replies only (conntrack RELATED,ESTABLISHED)
    # iptables: insert at the head of the chain (-I) rather than append (-A).
    first: bool = False
    # reject: answer "network unreachable" (the client's kill switch), not "port unreachable".
    no_route: bool = False


# -- choosing the tool ------------------------------------------------------------------------


def choose(wanted: Firewall | None, which: Callable[[str], str | None]) -> Firewall:
    """The tool to use: `wanted`, or for auto iptables when installed (as the seed), else
    nft. Never fails: a plan shown by --dry-run on a host with neither still reads."""
    if wanted is not None:
        return wanted
    if which("iptables") is None and which("nft") is not None:
        return "nft"
    return "iptables"


def check_installed(wanted: Firewall | None, which: Callable[[str], str | None]) -> None:
    """PrerequisiteError (exit 69) when the wanted tool, or for auto both, is missing."""
    if wanted is None:
        if which("iptables") is None and which("nft") is None:
            raise PrerequisiteError("neither iptables nor nft found (install iptables or nftables)")
        return
    if which(wanted) is None:
        raise PrerequisiteError(f"`{wanted}` not found (install {PROVIDED_BY[wanted]})")


# -- rendering --------------------------------------------------------------------------------


def steps(firewall: Firewall, instance: str, rules: Sequence[Rule]) -> list[Step]:
    """The steps that put `rules` in place with `firewall`: one per rule for iptables, one
    for all of them with nft (in table dsvpn-<instance>). No rules, no steps."""
    if not rules:
        return []
    if firewall == "nft":
        return [nft_step(table_name(instance), rules)]
    return [iptables_step(rule) for rule in rules]


def iptables_step(rule: Rule) -> Step:
    tool = "iptables" if rule.family == 4 else "ip6tables"
    table = ("-t", rule.hook.ipt_table)
    spec = (rule.hook.ipt_chain, *_iptables_matches(rule))
    return Step((tool, *table, "-I" if rule.first else "-A", *spec), (tool, *table, "-D", *spec))


def _iptables_matches(rule: Rule) -> Argv:
    # The order the seed's commands use: interfaces, addresses, then match modules.
    out: list[str] = []
    if rule.iif is not None:
        out += [*(["!"] if rule.not_iif else []), "-i", rule.iif]
    if rule.oif is not None:
        out += [*(["!"] if rule.not_oif else []), "-o", rule.oif]
    if rule.saddr is not None:
        out += ["-s", rule.saddr]
    if rule.daddr is not None:
        out += ["-d", rule.daddr]
    if rule.mark is not None:
        out += ["-m", "mark", "--mark", str(rule.mark)]
    if rule.src_not_local:
        out += ["-m", "addrtype", "!", "--src-type", "LOCAL"]
    if rule.established:
        out += ["-m", "state", "--state", "RELATED,ESTABLISHED"]
    out += ["-j", rule.action.upper()]
    if rule.no_route:
        out += ["--reject-with", "icmp-net-unreachable" if rule.family == 4 else "icmp6-no-route"]
    return tuple(out)


def table_name(instance: str) -> str:
    """The nft table of an instance (its tun device name): dsvpn-<instance>. UsageError for a
    name nft cannot take."""
    if not _NAME.fullmatch(instance) and instance != DRY_RUN_TUN:
        raise UsageError(
            f"tun name {instance!r} cannot name an nft table (letters, digits, '_', '.', '-')"
        )
    return TABLE_PREFIX + instance


def nft_step(table: str, rules: Sequence[Rule]) -> Step:
    """Load the table in one transaction; undo: delete it."""
    return Step(("nft", nft_ruleset(table, rules)), ("nft", "delete", "table", "inet", table))


def nft_ruleset(table: str, rules: Sequence[Rule]) -> str:
    """The ruleset text. It starts by deleting a table of the same name, in the same
    transaction, so that loading it replaces what a dsvpn whose record was lost left
    behind instead of adding to it."""
    lines = [f"add table inet {table}", f"delete table inet {table}", f"table inet {table} {{"]
    for hook in Hook:
        mine = [r for r in rules if r.hook is hook]
        if not mine:
            continue
        kind, priority = hook.value[3], hook.value[4]
        lines.append(f"\tchain {hook.nft_chain} {{")
        lines.append(f"\t\ttype {kind} hook {hook.nft_chain} priority {priority}; policy accept;")
        lines += [f"\t\t{_nft_rule(r)}" for r in mine]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nft_rule(rule: Rule) -> str:
    out: list[str] = []
    if rule.saddr is None and rule.daddr is None:
        # An inet table sees both families: keep the rule to its own, as iptables does.
        out.append(f"meta nfproto ipv{rule.family}")
    if rule.iif is not None:
        out.append(f"iifname {'!= ' if rule.not_iif else ''}{_quoted(rule.iif)}")
    if rule.oif is not None:
        out.append(f"oifname {'!= ' if rule.not_oif else ''}{_quoted(rule.oif)}")
    proto = "ip" if rule.family == 4 else "ip6"
    if rule.saddr is not None:
        out.append(f"{proto} saddr {_address(rule.saddr, rule.family)}")
    if rule.daddr is not None:
        out.append(f"{proto} daddr {_address(rule.daddr, rule.family)}")
    if rule.mark is not None:
        out.append(f"meta mark {rule.mark}")
    if rule.src_not_local:
        out.append("fib saddr type != local")
    if rule.established:
        out.append("ct state related,established")
    out.append(rule.action)
    if rule.no_route:
        out.append("with icmpx type no-route")
    return " ".join(out)


# A tun name (at most 15 characters) that nft reads as part of an identifier.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def _quoted(ifname: str) -> str:
    # Interface names may hold almost anything; refuse what nft's quoted strings cannot.
    if not ifname or any(c in ifname for c in '"\\') or not ifname.isprintable():
        raise DsvpnError(f"interface name {ifname!r} cannot be used in an nft rule")
    return f'"{ifname}"'


def _address(value: str, family: int) -> str:
    if value.startswith("<"):
        return value  # --dry-run: what only the host could tell (its local subnets)
    # nft reads IPv6 only in hexadecimal groups (not 64:ff9b::192.0.2.1).
    net = ipaddress.ip_network(value, strict=False)
    if net.version != family:
        raise DsvpnError(f"{value} is not an IPv{family} address")
    if net.num_addresses == 1 and "/" not in value:
        return str(net.network_address)
    return str(net)


# -- reading a recorded step back -------------------------------------------------------------


def iptables_shape(rule: Rule, words: Mapping[str, Word]) -> Shape:
    """The shape of `rule`'s iptables apply argv: `rule` is built with marker strings where
    a plan puts its interfaces and addresses, and `words` maps each marker to its check."""
    return tuple(words.get(w, w) for w in iptables_step(rule).apply)


_NFT_TABLE = re.compile(TABLE_PREFIX + _NAME.pattern)


def undo_of(apply: Sequence[str], iptables_shapes: Sequence[Shape]) -> Argv | None:
    """The undo this module plans for `apply`, or None if `apply` is neither an iptables step
    of one of `iptables_shapes` nor an nft table load as nft_step makes it. For checking a
    record before running its undo as root: the undo is built from the apply, never taken
    from the record, and an nft undo can only delete a table named dsvpn-<tun name>."""
    argv = tuple(apply)
    if len(argv) == 2 and argv[0] == "nft":
        table = _loaded_table(argv[1])
        return ("nft", "delete", "table", "inet", table) if table else None
    if any(fits(argv, shape) for shape in iptables_shapes):
        return (*argv[:3], "-D", *argv[4:])
    return None


def _loaded_table(ruleset: str) -> str | None:
    """The table an nft_ruleset text loads, or None if the text is not of that form."""
    first, _, _ = ruleset.partition("\n")
    words = first.split(" ")
    if len(words) != 4 or words[:3] != ["add", "table", "inet"]:
        return None
    table = words[3]
    head = f"add table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n"
    if not _NFT_TABLE.fullmatch(table) or not ruleset.startswith(head):
        return None
    return table if ruleset.endswith("\n}\n") else None
