"""--kill-switch: which packets may leave the client whatever the routes say, as data (one
function, `rules`), and its renderings: iptables/ip6tables (Linux) and a pf anchor (macOS).

What passes: loopback, the tun, the tunnel's own connection, the local subnets (and the
link-local and link-scope multicast ranges every LAN needs), the --exclude prefixes. What is
blocked: the rest of what the tunnel carries (everything, or the --route prefixes). Its
steps are kept after a crash, and by a plain `dsvpn cleanup`: only a deliberate stop, the
next start or `dsvpn cleanup --all` removes them. The undo of each step it makes is recognised
here too (iptables_undo_of, pf_undo_of), for the records.

The steps that depend on the local subnets are marked `local`, so that a client that changes
networks swaps them (Runner.reapply_local): with iptables, one rule per subnet, inserted at the
head of the chain (where it passes as well as anywhere before the blocks) so that it can be
added to a chain in use; with nft and pf, the whole table or anchor, reloaded in one
transaction.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Literal, NamedTuple

from dsvpn.config import ROUTING_TABLE, ClientConfig, FirewallName
from dsvpn.plan import Argv, Step
from dsvpn.platform import firewall as fw
from dsvpn.platform._common import word_ifname

CHAIN = "dsvpn-kill-switch"  # iptables: a chain of our own, jumped to from OUTPUT
# nft: a table of its own (kept, unlike the instance's dsvpn-<tun>), which needs no jump: its
# output chain is one more base chain at that hook, and its accept only ends its own walk.
NFT_TABLE = "dsvpn-kill-switch"
PF_ANCHOR = "com.apple/dsvpn"  # macOS's pf.conf evaluates every anchor under com.apple/
PLACEHOLDER_LAN = "<local-subnets>"
# Never routed beyond the link: DHCP, ARP's IPv6 cousin NDP, mDNS and the like need them.
LINK_LOCAL = ("169.254.0.0/16", "224.0.0.0/24", "255.255.255.255/32", "fe80::/10", "ff02::/16")


class Rule(NamedTuple):
    """One kind of outgoing packet; the first rule that matches decides."""

    verdict: Literal["pass", "block"]
    out_if: str | None = None
    dst: str | None = None  # a CIDR (its family is the rule's), or a placeholder (both)
    mark: int | None = None  # Linux: the tunnel's own socket carries this fwmark
    proto: str | None = None
    dport: int | None = None
    local: bool = False  # a local subnet: follows the host's networks


def rules(
    cfg: ClientConfig, tun: str, loopback: str, own: Rule, lan: Sequence[str] | None = None
) -> list[Rule]:
    """The kill switch of a client. `own` lets the tunnel's own connection out; `lan` are the
    local subnets (default: cfg.network.local_nets, a placeholder when unknown)."""
    net = cfg.network
    if lan is None:
        lan = (PLACEHOLDER_LAN,) if net.local_nets is None else net.local_nets
    out = [Rule("pass", out_if=loopback), Rule("pass", out_if=tun), own]
    out += [Rule("pass", dst=d, local=True) for d in lan]
    out += [Rule("pass", dst=d) for d in (*LINK_LOCAL, *net.excludes)]
    out += [Rule("block", dst=d) for d in net.carried()]
    return out


def family(dst: str | None) -> int | None:
    """4 or 6 for a CIDR, None for no destination or a placeholder."""
    if dst is None:
        return None
    try:
        return ipaddress.ip_network(dst, strict=False).version
    except ValueError:
        return None


def for_family(all_rules: Sequence[Rule], version: int) -> list[Rule]:
    """The rules that apply to one IP family; none at all if nothing of it is blocked."""
    mine = [r for r in all_rules if family(r.dst) in (None, version)]
    if not any(r.verdict == "block" for r in mine):
        return []
    return mine


# -- Linux ------------------------------------------------------------------------------------

REJECT_WITH = {4: "icmp-net-unreachable", 6: "icmp6-no-route"}  # the user sees ENETUNREACH
TOOLS = {4: "iptables", 6: "ip6tables"}


def iptables_match(rule: Rule) -> tuple[str, ...]:
    args: list[str] = []
    if rule.out_if is not None:
        args += ["-o", rule.out_if]
    if rule.dst is not None:
        args += ["-d", rule.dst]
    if rule.proto is not None:
        args += ["-p", rule.proto]
    if rule.dport is not None:
        args += ["--dport", str(rule.dport)]
    if rule.mark is not None:
        args += ["-m", "mark", "--mark", str(rule.mark)]
    return tuple(args)


def iptables_steps(all_rules: Sequence[Rule]) -> list[Step]:
    """A chain of our own per family, filled, then jumped to first thing in OUTPUT (so that
    it is complete before it takes effect). Passing returns to OUTPUT: the host's own rules
    still apply to what we let through. A local subnet's rule is inserted at the head of the
    chain: so is a new one later, into the chain in use."""
    steps: list[Step] = []
    for version, tool in TOOLS.items():
        mine = for_family(all_rules, version)
        if not mine:
            continue
        ipt = (tool, "-t", "filter")
        steps.append(Step((*ipt, "-N", CHAIN), (*ipt, "-X", CHAIN), keep=True))
        for rule in mine:
            spec = (*iptables_match(rule), *_target(rule.verdict, version))
            verb = "-I" if rule.local else "-A"
            steps.append(
                Step(
                    (*ipt, verb, CHAIN, *spec),
                    (*ipt, "-D", CHAIN, *spec),
                    keep=True,
                    local=rule.local,
                )
            )
        hook = ("OUTPUT", "-j", CHAIN)
        steps.append(Step((*ipt, "-I", *hook), (*ipt, "-D", *hook), keep=True))
    return steps


def _target(verdict: str, version: int) -> Argv:
    if verdict == "pass":
        return ("-j", "RETURN")
    return ("-j", "REJECT", "--reject-with", REJECT_WITH[version])


def iptables_undo_of(apply: Argv) -> Argv | None:
    """The undo of a kill-switch step iptables_steps makes, None for anything else."""
    version = {tool: v for v, tool in TOOLS.items()}.get(apply[0]) if apply else None
    if version is None or apply[1:3] != ("-t", "filter") or len(apply) < 5:
        return None
    ipt, verb, rest = apply[:3], apply[3], apply[4:]
    if verb == "-N" and rest == (CHAIN,):
        return (*ipt, "-X", CHAIN)
    if verb == "-I" and rest == ("OUTPUT", "-j", CHAIN):
        return (*ipt, "-D", "OUTPUT", "-j", CHAIN)
    if verb not in ("-A", "-I") or rest[:1] != (CHAIN,):
        return None
    spec = rest[1:]
    if verb == "-I":  # only a local subnet's rule: a subnet, passed
        pass_ = _target("pass", version)
        match = spec[: -len(pass_)]
        if spec[-len(pass_) :] == pass_ and match[:1] == ("-d",) and _match_fits(match, version):
            return (*ipt, "-D", CHAIN, *spec)
        return None
    for verdict in ("pass", "block"):
        target = _target(verdict, version)
        match = spec[: len(spec) - len(target)]
        if spec[len(match) :] == target and _match_fits(match, version):
            return (*ipt, "-D", CHAIN, *spec)
    return None


def _match_fits(match: Argv, version: int) -> bool:
    """One condition, as iptables_match writes it for the rules this module makes."""
    if len(match) == 2 and match[0] == "-o":
        return word_ifname(match[1])
    if len(match) == 2 and match[0] == "-d":
        return family(match[1]) == version and "/" in match[1]
    return match == ("-m", "mark", "--mark", str(ROUTING_TABLE))


def linux_rules(cfg: ClientConfig, tun: str) -> list[Rule]:
    """The Linux kill switch as data, for any firewall's rendering (iptables here)."""
    return rules(cfg, tun, "lo", Rule("pass", mark=ROUTING_TABLE))


def linux_steps(cfg: ClientConfig, tun: str, firewall: FirewallName = "iptables") -> list[Step]:
    rules = linux_rules(cfg, tun)
    if firewall == "nft":
        step = fw.nft_step(NFT_TABLE, to_firewall_rules(rules))
        # The table holds the local subnets: a new one replaces it whole, in one transaction.
        return [dataclasses.replace(step, keep=True, local=True, replaces=True)]
    return iptables_steps(rules)


def to_firewall_rules(all_rules: Sequence[Rule]) -> list[fw.Rule]:
    """The rules as platform/firewall's, one per family they apply to (for nft)."""
    out = []
    for version in (4, 6):
        for r in for_family(all_rules, version):
            out.append(
                fw.Rule(
                    fw.Hook.OUTPUT,
                    4 if version == 4 else 6,
                    "accept" if r.verdict == "pass" else "reject",
                    oif=r.out_if,
                    daddr=r.dst,
                    mark=r.mark,
                    no_route=r.verdict == "block",
                )
            )
    return out


# -- macOS (pf) -------------------------------------------------------------------------------


def pf_line(rule: Rule) -> str:
    words = ["pass" if rule.verdict == "pass" else "block return", "out", "quick"]
    if rule.out_if is not None:
        words += ["on", rule.out_if]
    if rule.proto is not None:
        words += ["proto", rule.proto]
    if rule.dst is None and rule.dport is None:
        words.append("all")
    else:
        words += ["to", rule.dst or "any"]
        if rule.dport is not None:
            words += ["port", str(rule.dport)]
    return " ".join(words)


def pf_text(all_rules: Sequence[Rule]) -> str:
    return "".join(pf_line(r) + "\n" for r in all_rules)


_PF_LOAD = ("pfctl", "-a", PF_ANCHOR, "-f", "-")
_PF_FLUSH = ("pfctl", "-a", PF_ANCHOR, "-F", "rules")


def pf_steps(cfg: ClientConfig, tun: str, server: str) -> list[Step]:
    # No fwmark on macOS: the tunnel's own connection is the one to the server's port.
    own = Rule("pass", dst=server, proto="tcp", dport=cfg.port)
    return [
        # -E: enable pf if it is off (a reference that is never released: pf stays on).
        Step(("pfctl", "-E"), None, keep=True),
        # A new load replaces the anchor's rules at once (a new list of local subnets).
        Step(
            _PF_LOAD,
            _PF_FLUSH,
            input=pf_text(rules(cfg, tun, "lo0", own)),
            keep=True,
            local=True,
            replaces=True,
        ),
    ]


def pf_undo_of(apply: Argv) -> Argv | None:
    return _PF_FLUSH if apply == _PF_LOAD else None
