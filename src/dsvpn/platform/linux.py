"""Linux: /dev/net/tun, iproute2 and iptables or nft; the client routes through table 42069."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Callable, Sequence

from dsvpn.config import (
    ALL_IPV4,
    ALL_IPV6,
    NAT64_PREFIX,
    POOL_PREFIXES,
    ROUTING_TABLE,
    ClientConfig,
    Config,
    FirewallName,
    ServerConfig,
    tun_ip6,
)
from dsvpn.errors import DsvpnError, PrerequisiteError, UsageError
from dsvpn.plan import Argv, Plan, Run, Step
from dsvpn.platform import _dns, _killswitch
from dsvpn.platform import firewall as fw
from dsvpn.platform._common import (
    PLACEHOLDER_IF,
    Backend,
    NetInfo,
    Shape,
    TunFraming,
    discover,
    fits,
    tun_open_error,
    word_ifname,
    word_ipv4,
    word_ipv6,
)

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUNSETOFFLOAD = 0x400454D0
# TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN: the stack may hand us 64 KiB TCP
# packets with partial checksums; the loop cuts them into ordinary packets (tun_vnet.h).
TUN_OFFLOADS = 0x01 | 0x02 | 0x04 | 0x08
# TUN_F_USO4 | TUN_F_USO6 (Linux 6.2+): UDP super-packets too (from sockets using UDP_SEGMENT).
TUN_USO = 0x20 | 0x40
IFNAMSIZ = 16

TABLE = str(ROUTING_TABLE)
# The lowest route priority: the unreachable routes lose to every real route of the table.
LAST_METRIC = "4294967295"
FORWARDING = "net.ipv4.ip_forward"
FORWARDING6 = "net.ipv6.conf.all.forwarding"
CONGESTION = "net.ipv4.tcp_congestion_control"
# The keys of fixed name the plans set; accept_ra's names an interface (is_sysctl_key).
SYSCTL_KEYS = frozenset({FORWARDING, FORWARDING6, CONGESTION})
NO_IPV6_OUT = "no IPv6 route out: clients' IPv6 traffic will not be forwarded"
NO_IPV4_OUT = (
    "no IPv4 route out: clients' IPv4 traffic cannot leave this server (their IPv6 traffic is "
    "NATed out of {ext6})"
)


def sysctl_write(key: str, value: str) -> Argv:
    return ("sysctl", f"{key}={value}")


# -- sysctls whose key names an interface ------------------------------------------------------

# Interfaces whose names are sysctl directories of their own, not interfaces.
_NOT_IFNAMES = ("all", "default")


def accept_ra_key(ifname: str) -> str:
    """The accept_ra sysctl key of an interface. DsvpnError for a name it cannot be built of
    (a plan must hold only keys that is_sysctl_key accepts back from a record)."""
    if not word_ifname(ifname) or ifname in _NOT_IFNAMES:
        raise DsvpnError(f"interface name {ifname!r} cannot be used in a sysctl key")
    # sysctl reads dots as separators; a name with a dot (eth0.100) needs the slash form.
    if "." in ifname:
        return f"net/ipv6/conf/{ifname}/accept_ra"
    return f"net.ipv6.conf.{ifname}.accept_ra"


_ACCEPT_RA = re.compile(r"net\.ipv6\.conf\.(.+)\.accept_ra|net/ipv6/conf/(.+)/accept_ra")


def is_sysctl_key(key: str) -> bool:
    """Whether a Linux plan may set `key`: a fixed key, or exactly what accept_ra_key makes of
    a valid interface name (for checking a record before restoring a value as root)."""
    if key in SYSCTL_KEYS:
        return True
    m = _ACCEPT_RA.fullmatch(key)
    if m is None:
        return False
    try:
        return accept_ra_key(m[1] or m[2]) == key
    except DsvpnError:
        return False


# -- packet filter rules: built here for the plans, recognised here for the records -----------


def _anti_spoof(tun: str, address: str, family: fw.Family) -> fw.Rule:
    # Packets for our tun address that arrive on another interface are spoofed: drop them.
    return fw.Rule(
        fw.Hook.RAW_PREROUTING,
        family,
        "drop",
        iif=tun,
        not_iif=True,
        daddr=address,
        src_not_local=True,
        first=True,
    )


def _nat(tun: str, ext: str, client: str, family: fw.Family) -> list[fw.Rule]:
    """The client's address leaves through `ext` as the server's; replies come back."""
    return [
        fw.Rule(fw.Hook.NAT_POSTROUTING, family, "masquerade", oif=ext, saddr=client),
        fw.Rule(fw.Hook.FORWARD, family, "accept", iif=ext, oif=tun, established=True),
        fw.Rule(fw.Hook.FORWARD, family, "accept", iif=tun, oif=ext),
    ]


def _pool_word(word: str) -> bool:
    """A pool of clients as server_plan writes it: an IPv4 network of a pool's prefix
    length, or its twin inside 64:ff9b::/96, in the one spelling ipaddress gives it."""
    try:
        net = ipaddress.ip_network(word)
    except ValueError:
        return False
    if str(net) != word:
        return False
    if net.version == 4:
        return net.prefixlen in POOL_PREFIXES
    nat64 = ipaddress.IPv6Network(f"{NAT64_PREFIX}/96")
    return net.prefixlen - 96 in POOL_PREFIXES and net.subnet_of(nat64)


def _word_pool4(word: str) -> bool:
    return "." in word and _pool_word(word)


def _word_pool6(word: str) -> bool:
    return ":" in word and _pool_word(word)


# The same builders called with markers give the shapes: a record's iptables or ip6tables
# undo is accepted only as the -D twin of an apply of one of these shapes.
_IF, _V4, _V6 = "\0ifname", "\0ipv4", "\0ipv6"
_NET4, _NET6 = "\0ipv4 network", "\0ipv6 network"  # a server's pool of clients
_WORDS = {
    _IF: word_ifname,
    _V4: word_ipv4,
    _V6: word_ipv6,
    _NET4: _word_pool4,
    _NET6: _word_pool6,
}
_IPTABLES_SHAPES = tuple(
    fw.iptables_shape(rule, _WORDS)
    for rule in (
        _anti_spoof(_IF, _V4, 4),
        *_nat(_IF, _IF, _V4, 4),
        _anti_spoof(_IF, _V6, 6),
        *_nat(_IF, _IF, _V6, 6),
        # only the MASQUERADE rule carries the clients' addresses
        _nat(_IF, _IF, _NET4, 4)[0],
        _nat(_IF, _IF, _NET6, 6)[0],
    )
)


def _ip_rules() -> list[Step]:
    """The client's policy rules: everything unmarked goes to table 42069 (the tunnel), except
    what the main table routes more specifically than its default route."""
    steps = []
    for ip in (("ip",), ("ip", "-6")):
        steps.append(
            Step(
                (*ip, "rule", "add", "not", "fwmark", TABLE, "table", TABLE),
                (*ip, "rule", "delete", "table", TABLE),
            )
        )
    for ip in (("ip",), ("ip", "-6")):
        rule = ("table", "main", "suppress_prefixlength", "0")
        steps.append(Step((*ip, "rule", "add", *rule), (*ip, "rule", "delete", *rule)))
    return steps


_IP_RULE_UNDO: dict[Argv, Argv | None] = {s.apply: s.undo for s in _ip_rules()}


def _ip(prefix: str) -> Argv:
    return ("ip", "-6") if ":" in prefix else ("ip",)


def _dst(prefix: str) -> str:
    return "default" if prefix in (ALL_IPV4, ALL_IPV6) else prefix


def _unreachable(prefix: str) -> Step:
    # Fail closed: stays when the tun dies with the process (kill -9, OOM), as do the policy
    # rules, so what the tunnel carried finds "unreachable" instead of the bare network.
    spec = ("unreachable", _dst(prefix), "metric", LAST_METRIC, "table", TABLE)
    return Step((*_ip(prefix), "route", "add", *spec), (*_ip(prefix), "route", "delete", *spec))


def _throw(prefix: str) -> Step:
    # An --exclude prefix: the lookup goes on to the main table.
    spec = ("throw", prefix, "table", TABLE)
    return Step((*_ip(prefix), "route", "add", *spec), (*_ip(prefix), "route", "delete", *spec))


def _prefix_word(version: int, *, default: bool) -> Callable[[str], bool]:
    """A CIDR prefix of one family (or "default", where allowed) as the plans write it."""

    def check(word: str) -> bool:
        if default and word == "default":
            return True
        try:
            return "/" in word and ipaddress.ip_network(word).version == version
        except ValueError:
            return False

    return check


# The shapes of the table-42069 routes that have an undo (the unreachable and throw routes);
# their undo is the same command with "delete" for "add", as the builders above make it.
_TABLE_SHAPES: tuple[Shape, ...] = tuple(
    shape
    for ip, version in ((("ip",), 4), (("ip", "-6"), 6))
    for shape in (
        (*ip, "route", "add", "unreachable", _prefix_word(version, default=True), "metric",
         LAST_METRIC, "table", TABLE),
        (*ip, "route", "add", "throw", _prefix_word(version, default=False), "table", TABLE),
    )
)  # fmt: skip


def undo_of(apply: Sequence[str]) -> Argv | None:
    apply = tuple(apply)
    if apply in _IP_RULE_UNDO:
        return _IP_RULE_UNDO[apply]
    if any(fits(apply, shape) for shape in _TABLE_SHAPES):
        add = apply.index("add")
        return (*apply[:add], "delete", *apply[add + 1 :])
    return (
        fw.undo_of(apply, _IPTABLES_SHAPES)
        or _killswitch.iptables_undo_of(apply)
        or _dns.undo_of(apply, resolved=True)
    )


def _addresses(cfg: Config, tun: str) -> list[Step]:
    # No undo: addresses and routes on the tun device vanish with it when its fd closes.
    return [
        Step(("ip", "addr", "add", cfg.local_tun_ip, "peer", cfg.remote_tun_ip, "dev", tun), None),
        Step(
            (
                "ip",
                "-6",
                "addr",
                "add",
                cfg.local_tun_ip6,
                "peer",
                f"{cfg.remote_tun_ip6}/96",
                "dev",
                tun,
            ),
            None,
        ),
    ]


_LINK_UP = ("ip", "link", "set", "dev")

# iptables rules are added unconditionally (no `iptables -C` check first): a rule that is
# already there belongs to someone else (the admin, or a live instance, which
# instances.claim refuses), and skipping it would make our undo delete theirs. Leftovers
# of our own crashed runs are removed by instances.claim before we start (an nft table
# replaces its namesake in the same transaction, see firewall.nft_ruleset).


def _pool_addresses(cfg: ServerConfig, pool: ipaddress.IPv4Network, tun: str) -> list[Step]:
    """A server of several clients (a peers file): its address with the pool's prefix, so
    that the whole pool (and its IPv6 twin) is routed to the tun. Each client configures
    `ip addr add CLIENT peer SERVER` on its own side, which this does not constrain."""
    return [
        Step(("ip", "addr", "add", f"{cfg.local_tun_ip}/{pool.prefixlen}", "dev", tun), None),
        Step(
            (
                "ip",
                "-6",
                "addr",
                "add",
                f"{cfg.local_tun_ip6}/{96 + pool.prefixlen}",
                "dev",
                tun,
            ),
            None,
        ),
    ]


def _server_pool(cfg: ServerConfig) -> ipaddress.IPv4Network | None:
    return ipaddress.IPv4Network(cfg.pool) if cfg.pool is not None else None


def _v6_twin(pool: ipaddress.IPv4Network) -> str:
    base = ipaddress.IPv6Address(tun_ip6(str(pool.network_address)))
    return str(ipaddress.IPv6Network((base, 96 + pool.prefixlen)))


def server_plan(
    cfg: ServerConfig, tun: str, net: NetInfo, firewall: FirewallName = "iptables"
) -> Plan:
    pool = _server_pool(cfg)
    # The clients' addresses: the one client's, or the whole pool's.
    clients = str(pool) if pool else cfg.remote_tun_ip
    clients6 = _v6_twin(pool) if pool else cfg.remote_tun_ip6
    rules = [_anti_spoof(tun, cfg.local_tun_ip, 4)]
    if net.ext_if:  # else an IPv6-only server: its clients' IPv4 has nowhere to go
        rules += _nat(tun, net.ext_if, clients, 4)
    ext6 = net.ext_if6
    if ext6:
        rules += [
            _anti_spoof(tun, cfg.local_tun_ip6, 6),
            *_nat(tun, ext6, clients6, 6),
        ]
    steps = [
        # Restored (or handed to another live server) on exit by the runner.
        Step(sysctl_write(FORWARDING, "1"), None, sysctl=(FORWARDING, "1")),
        *(_pool_addresses(cfg, pool, tun) if pool else _addresses(cfg, tun)),
        Step((*_LINK_UP, tun, "up"), None),
        *fw.steps(firewall, tun, rules),
    ]
    if ext6 and pool is None:
        # Every server's tun covers all of 64:ff9b::/96 (the peer /96 above): with two
        # servers the replies to a client would take the first tun. Its own address is
        # routed to its own tun (the route goes with the device).
        steps.append(
            Step(("ip", "-6", "route", "add", f"{cfg.remote_tun_ip6}/128", "dev", tun), None)
        )
    if ext6:
        if net.ext6_accepts_ra:
            # Forwarding makes the kernel ignore router advertisements on interfaces with
            # accept_ra 1, and drop the default route they gave at once: 2 keeps them.
            key = accept_ra_key(ext6)
            steps.append(Step(sysctl_write(key, "2"), None, sysctl=(key, "2")))
        steps.append(Step(sysctl_write(FORWARDING6, "1"), None, sysctl=(FORWARDING6, "1")))
    return Plan(steps)


def client_plan(
    cfg: ClientConfig, tun: str, net: NetInfo, firewall: FirewallName = "iptables"
) -> Plan:
    # The gateway plays no part: the tunnel's socket carries fwmark 42069 and so keeps
    # using the main table, whatever its default route is.
    opts = cfg.network
    steps = [
        Step(
            sysctl_write(CONGESTION, "bbr"),
            None,
            sysctl=(CONGESTION, "bbr"),
            # Only a speed-up; a kernel without bbr still runs the tunnel.
            best_effort=True,
        ),
        Step((*_LINK_UP, tun, "up"), None),
        *fw.steps(firewall, tun, [_anti_spoof(tun, cfg.local_tun_ip, 4)]),
        *_addresses(cfg, tun),
    ]
    if not opts.no_routes:
        steps += _table(cfg, tun)
        steps += _ip_rules()
    if opts.dns:
        method = opts.dns_via or _dns.default_method("linux")
        steps += _dns.steps(method, tun, opts.dns)
    if opts.kill_switch:
        # Last: applied once the routes are in, undone first (see Tunnel).
        steps += _killswitch.linux_steps(cfg, tun, firewall)
    return Plan(steps)


def _table(cfg: ClientConfig, tun: str) -> list[Step]:
    """Table 42069: what the tunnel carries (through the tun; these routes vanish with it),
    unreachable behind it, and the --exclude holes."""
    opts = cfg.network
    if opts.full:
        steps = [
            Step(("ip", "route", "add", "default", "dev", tun, "table", TABLE), None),
            Step(("ip", "-6", "route", "add", "default", "dev", tun, "table", TABLE), None),
        ]
    else:
        steps = [
            Step((*_ip(p), "route", "add", p, "dev", tun, "table", TABLE), None)
            for p in opts.carried()
        ]
    # Local subnets keep working after a crash (the suppress_prefixlength rule lets the main
    # table's more specific routes win), and so does the tunnel's own connection (fwmark).
    steps += [_unreachable(p) for p in opts.carried()]
    steps += [_throw(p) for p in opts.excludes]
    return steps


class LinuxBackend(Backend):
    name = "linux"
    # vnet_hdr: lets the loop write merged TCP segments as one GSO packet (see tun_vnet.h).
    framing = TunFraming(header=False, af_inet=socket.AF_INET, af_inet6=10, vnet_hdr=True)
    # iptables or nft: checked by fw.check_installed, as --firewall asks.
    tools = (("ip", "iproute2"), ("sysctl", "procps"))
    sysctl_keys = SYSCTL_KEYS
    firewalls = fw.FIREWALLS
    serves_pools = True
    kill_switch = True
    serves_ipv6_only = True

    def __init__(
        self,
        which: Callable[[str], str | None] | None = None,
        clone_dev: str = "/dev/net/tun",
        proc_sys: str = "/proc/sys",
    ) -> None:
        if which is None:
            super().__init__()
        else:
            super().__init__(which)
        self._clone_dev = clone_dev
        self._proc_sys = proc_sys

    def prepare(self, cfg: Config) -> Config:
        cfg = super().prepare(cfg)
        if cfg.tun_name is not None and self.firewall(cfg) == "nft":
            fw.table_name(cfg.tun_name)  # the table is named after the tun
        return cfg

    def check_host(self, cfg: Config) -> None:
        if not os.path.exists(self._clone_dev):
            raise PrerequisiteError(f"{self._clone_dev} does not exist (try: modprobe tun)")
        super().check_host(cfg)
        fw.check_installed(cfg.firewall, self._which)
        kill_switch = isinstance(cfg, ClientConfig) and cfg.network.kill_switch
        if kill_switch and self.firewall(cfg) == "iptables" and self._which("ip6tables") is None:
            raise PrerequisiteError("`ip6tables` not found (install iptables)")

    def firewall(self, cfg: Config) -> FirewallName:
        return fw.choose(cfg.firewall, self._which)

    def discover(self, cfg: Config) -> NetInfo:
        net = discover(cfg)
        if net.ext_if6 and self._accepts_ra(net.ext_if6):
            net = net._replace(ext6_accepts_ra=True)
        return net

    def _accepts_ra(self, ifname: str) -> bool:
        path = os.path.join(self._proc_sys, "net", "ipv6", "conf", ifname, "accept_ra")
        try:
            with open(path) as f:
                # 2 as well: set by another live server (or the admin), it must be handed
                # over rather than left to whoever restores it first.
                return f.read().strip() in ("1", "2")
        except OSError:
            return False

    def needs_gateway(self, cfg: Config) -> bool:
        # The client's plan never names the gateway (see client_plan).
        return isinstance(cfg, ServerConfig)

    def check_tun_name(self, name: str) -> None:
        if not 0 < len(name.encode()) < IFNAMSIZ or not word_ifname(name):
            raise UsageError(
                f"invalid tun device name {name!r}: at most {IFNAMSIZ - 1} characters, "
                "without '/', ':' or spaces"
            )

    def server_plan(self, cfg: ServerConfig, tun: str, net: NetInfo) -> Plan:
        return server_plan(cfg, tun, net, self.firewall(cfg))

    def client_plan(self, cfg: ClientConfig, tun: str, net: NetInfo) -> Plan:
        return client_plan(cfg, tun, net, self.firewall(cfg))

    def notes(self, cfg: Config, tun: str, net: NetInfo) -> list[str]:
        if not isinstance(cfg, ServerConfig):
            return []
        if not net.ext_if:
            return [NO_IPV4_OUT.format(ext6=net.ext_if6)]
        if net.ext_if6:
            return []
        if net.ext_if == PLACEHOLDER_IF:  # a dry run for another host: its routes are unknown
            return ["with an IPv6 route out, its clients' IPv6 traffic is NATed there too"]
        return [NO_IPV6_OUT]

    def is_sysctl_key(self, key: str) -> bool:
        return is_sysctl_key(key)

    def sysctl_write(self, key: str, value: str) -> Argv:
        return sysctl_write(key, value)

    def undo_of(self, apply: Sequence[str]) -> Argv | None:
        return undo_of(apply)

    def mtu_argv(self, tun: str, mtu: int) -> Argv:
        return (*_LINK_UP, tun, "mtu", str(mtu))

    multi_queue_tun = True

    def open_tun(
        self, wanted: str | None, mtu: int, run: Run, *, queues: int = 1
    ) -> tuple[int, str]:
        if wanted is not None:
            self.check_tun_name(wanted)
        # An empty name lets the kernel pick tunN.
        fd, name = self._attach(wanted or "", wanted or "tun", multi_queue=queues > 1)
        try:
            # TSO on the tun is only a speed-up: without it the kernel sends ordinary packets.
            with contextlib.suppress(OSError):
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS | TUN_USO)
                except OSError:  # a kernel without USO refuses the whole set: TCP only
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS)
            run(self.mtu_argv(name, mtu))
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def open_tun_queue(self, name: str) -> int:
        return self._attach(name, name, multi_queue=True)[0]

    def _attach(self, name: str, label: str, *, multi_queue: bool) -> tuple[int, str]:
        """Open the clone device and attach it to tun `name` (created if needed): (fd, name)."""
        try:
            fd = os.open(self._clone_dev, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise PrerequisiteError(
                f"{self._clone_dev} does not exist (try: modprobe tun)"
            ) from exc
        except OSError as exc:
            raise tun_open_error(exc, self._clone_dev) from exc
        # IFF_VNET_HDR: a virtio_net_hdr before every packet, for GSO in both directions.
        flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise tun_open_error(exc, label) from exc
        return fd, ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
