"""The backend interface every OS module implements, and the types and helpers they share."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

from dsvpn.config import DEFAULT_MTU, ClientConfig, Config, ServerConfig
from dsvpn.errors import (
    DsvpnError,
    NetworkError,
    PermissionDenied,
    PrerequisiteError,
    UsageError,
)
from dsvpn.plan import Argv, Plan, Run

PLACEHOLDER_IF = "<ext-if>"
PLACEHOLDER_GW = "<gateway>"
PLACEHOLDER_SERVER = "<server-ip>"
PLACEHOLDER_OTHER_GW = "<other-gateway>"


class NetInfo(NamedTuple):
    """server: the interface carrying NATed IPv4 traffic (and its gateway), "" on a server
    without an IPv4 route out (IPv6 only);
    client: the gateway towards the server, and the interface that reaches it."""

    ext_if: str
    gateway: str
    # server: the interface of the IPv6 route out (None: there is none, IPv6 is not NATed),
    # and whether it takes router advertisements (Linux accept_ra 1 or 2), which turning
    # forwarding on would stop unless accept_ra is 2.
    ext_if6: str | None = None
    ext6_accepts_ra: bool = False
    # client: the default gateway of the other IP family ("" if none): macOS and the BSDs
    # route --exclude prefixes of that family through it.
    other_gateway: str = ""


class TunFraming(NamedTuple):
    """Whether tun packets carry a 4-byte address-family header (utun, OpenBSD tun) and the
    values this OS puts there, in network byte order."""

    header: bool
    af_inet: int
    af_inet6: int
    # Linux: the tun is opened with IFF_VNET_HDR (a virtio_net_hdr before every packet).
    vnet_hdr: bool = False


class Backend(ABC):
    """One OS: how to open a tun, which commands make up the plans, and (as a plan.Dialect)
    what those commands look like, so that a record can be checked against them."""

    name: str
    framing: TunFraming
    default_mtu: int = DEFAULT_MTU
    # (tool, what provides it) that check_host() requires on PATH.
    tools: tuple[tuple[str, str], ...] = ()
    # Every sysctl key of fixed name a plan of this backend sets (see is_sysctl_key).
    sysctl_keys: frozenset[str] = frozenset()
    # The packet filters --firewall may name (Linux only).
    firewalls: tuple[str, ...] = ()
    # Whether its server plan can serve a pool of clients (a peers file).
    serves_pools: bool = False
    # Whether its client plans have a --kill-switch.
    kill_switch = False
    # Whether its server runs without an IPv4 route out (NATing its clients' IPv6 alone).
    serves_ipv6_only = False

    def __init__(self, which: Callable[[str], str | None] = shutil.which) -> None:
        self._which = which

    def prepare(self, cfg: Config) -> Config:
        """The config as this OS runs it, for a real run and a dry run alike: the tun name
        checked as open_tun would (UsageError), and this OS's MTU."""
        self.check_firewall(cfg)
        if isinstance(cfg, ServerConfig) and cfg.pool is not None and not self.serves_pools:
            raise UsageError(
                "a server of several clients (a peers file) runs on Linux, macOS and OpenBSD, "
                f"not on {self.name}: give it a key file"
            )
        if cfg.tun_name is not None:
            self.check_tun_name(cfg.tun_name)
        if isinstance(cfg, ClientConfig) and cfg.network.kill_switch and not self.kill_switch:
            raise UsageError(f"--kill-switch is available on Linux and macOS, not on {self.name}")
        return dataclasses.replace(cfg, mtu=self.default_mtu)

    @abstractmethod
    def check_tun_name(self, name: str) -> None:
        """UsageError if this OS cannot have a tun device of that name."""

    def check_host(self, cfg: Config) -> None:
        """PrerequisiteError naming what to install when a tool or device is missing."""
        for tool, package in self.tools:
            if self._which(tool) is None:
                raise PrerequisiteError(f"`{tool}` not found (install {package})")

    def discover(self, cfg: Config) -> NetInfo:
        net = discover(cfg)
        if isinstance(cfg, ServerConfig) and not net.ext_if and not self.serves_ipv6_only:
            raise NetworkError(
                f"no default IPv4 route: a server on {self.name} needs one, for its clients' "
                "IPv4 traffic (or give the external IP explicitly)"
            )
        return net

    def placeholder_net(self) -> NetInfo:
        return NetInfo(PLACEHOLDER_IF, PLACEHOLDER_GW, other_gateway=PLACEHOLDER_OTHER_GW)

    def needs_gateway(self, cfg: Config) -> bool:
        """Whether the plan uses the default gateway (or interface): only then must discovery
        succeed, and only then is it repeated when the client reconnects."""
        if isinstance(cfg, ServerConfig):
            return True
        return bool(self.client_plan(cfg, "<tun>", self.placeholder_net()).gateway_steps())

    @abstractmethod
    def open_tun(
        self, wanted: str | None, mtu: int, run: Run, *, queues: int = 1
    ) -> tuple[int, str]:
        """Open a tun device (the `wanted` one, or the first free one), set its MTU with
        `run(self.mtu_argv(...))` and return (fd, actual name). queues > 1 (only where
        multi_queue_tun): a tun that more queues can join (open_tun_queue)."""

    # Whether a tun can have several queues, one per worker of a server (dsvpn.workers).
    multi_queue_tun = False

    def open_tun_queue(self, name: str) -> int:
        """Another queue of the multi-queue tun `name` (open_tun(queues > 1)): its fd."""
        raise NotImplementedError(f"{self.name} has no multi-queue tun")

    @abstractmethod
    def mtu_argv(self, tun: str, mtu: int) -> Argv: ...

    def check_firewall(self, cfg: Config) -> None:
        """UsageError for a --firewall this OS does not have."""
        if cfg.firewall is not None and cfg.firewall not in self.firewalls:
            raise UsageError(f"--firewall has no effect on {self.name}: it sets no packet filter")

    def plan(self, cfg: Config, tun: str, net: NetInfo) -> Plan:
        if isinstance(cfg, ServerConfig):
            return self.server_plan(cfg, tun, net)
        return self.client_plan(cfg, tun, net)

    @abstractmethod
    def server_plan(self, cfg: ServerConfig, tun: str, net: NetInfo) -> Plan: ...

    @abstractmethod
    def client_plan(self, cfg: ClientConfig, tun: str, net: NetInfo) -> Plan: ...

    def notes(self, cfg: Config, tun: str, net: NetInfo) -> list[str]:
        """Lines to print once the tunnel is up: what the user still has to do by hand."""
        return []

    # -- plan.Dialect ------------------------------------------------------------------------

    def is_sysctl_key(self, key: str) -> bool:
        return key in self.sysctl_keys

    def sysctl_read(self, key: str) -> Argv:
        return ("sysctl", "-n", key)

    @abstractmethod
    def sysctl_write(self, key: str, value: str) -> Argv: ...

    @abstractmethod
    def undo_of(self, apply: Sequence[str]) -> Argv | None:
        """The undo this backend plans for `apply`, or None if it plans no such step."""

    def undo_input_fits(self, undo: Sequence[str], text: str) -> bool:
        """Whether `text` is stdin this backend feeds to `undo` (none, unless it says so)."""
        return False


def server_address(cfg: ClientConfig) -> str:
    """The server's IP as seen by a client (resolved once at start, as the reference)."""
    return cfg.server_ip or PLACEHOLDER_SERVER


def is_ipv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).version == 6
    except ValueError:
        return False


def tun_open_error(exc: OSError, name: str) -> DsvpnError:
    """The one-line error for a tun device that cannot be opened or configured."""
    if exc.errno == errno.EBUSY:
        return DsvpnError(f"tun device {name} is busy (another program or dsvpn uses it)")
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"cannot open tun device {name}: permission denied (run as root)")
    return DsvpnError(f"cannot open tun device {name}: {exc.strerror or exc}")


# -- the shapes of planned commands ------------------------------------------------------------
# A shape is an argv whose words are literals or checks of one word; undo_of uses them to
# recognise exactly the commands its plans produce.

Word = Callable[[str], bool]
Shape = tuple["str | Word", ...]


def fits(argv: Sequence[str], shape: Shape) -> bool:
    return len(argv) == len(shape) and all(
        w == s if isinstance(s, str) else s(w) for w, s in zip(argv, shape, strict=True)
    )


def word_ifname(word: str) -> bool:
    """An interface name as the OS allows it, never one a tool could read as an option."""
    return (
        0 < len(word) <= 15
        and word[0] not in "-!"
        and word not in (".", "..")
        and not any(c in word for c in "/:%")
        and not any(c.isspace() for c in word)
    )


def _address(word: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(word).version == version
    except ValueError:
        return False


def word_ipv4(word: str) -> bool:
    return _address(word, 4)


def word_ipv6(word: str) -> bool:
    return "%" not in word and _address(word, 6)


def word_gateway(word: str) -> bool:
    """A gateway address; an IPv6 link-local one may carry its interface (fe80::1%em0)."""
    address, _, scope = word.partition("%")
    if scope:
        return word_ipv6(address) and word_ifname(scope)
    return word_ipv4(word) or word_ipv6(word)


# -- discovery through netifaces ----------------------------------------------------------------


def _netifaces() -> Any:
    try:
        import netifaces
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise PrerequisiteError(
            "the netifaces module is missing (pip install netifaces-plus)"
        ) from exc
    return netifaces


def discover(cfg: Config, ni: Any = None) -> NetInfo:
    """Find the external interface and gateway. `ni` stands in for netifaces in tests."""
    ni = ni if ni is not None else _netifaces()
    if isinstance(cfg, ServerConfig):
        if cfg.external_ip:
            ext_if = interface_with_address(ni, cfg.external_ip)
            if ext_if is None:
                raise NetworkError(f"no interface has the external address {cfg.external_ip}")
            family = ni.AF_INET6 if is_ipv6(cfg.external_ip) else ni.AF_INET
            gateway = ni.gateways().get("default", {}).get(family, ("", ""))[0]
            if not is_ipv6(cfg.external_ip):
                return NetInfo(ext_if, gateway, _route_out6(ni))
            if _default_route(ni, ni.AF_INET) is None:
                return NetInfo("", "", ext_if)  # IPv6 only: no IPv4 leaves anyway
            return NetInfo(ext_if, gateway, ext_if)
        default = _default_route(ni, ni.AF_INET)
        ext_if6 = _route_out6(ni)
        if default is None:
            if ext_if6 is not None:
                return NetInfo("", "", ext_if6)  # an IPv6-only server
            raise NetworkError(
                "no default route (IPv4 or IPv6), so the interface that should carry the "
                "clients' traffic is unknown; give the external IP explicitly"
            )
        gateway, ext_if = default
        return NetInfo(ext_if, gateway, ext_if6)

    server = server_address(cfg)
    family = ni.AF_INET6 if is_ipv6(server) else ni.AF_INET
    other = _default_route(ni, ni.AF_INET if family == ni.AF_INET6 else ni.AF_INET6)
    other_gateway = other[0] if other else ""
    if cfg.gateway_ip:
        ext_if = interface_reaching(ni, cfg.gateway_ip)
        if ext_if is None:
            default = _default_route(ni, family)
            ext_if = default[1] if default else ""
        return NetInfo(ext_if, cfg.gateway_ip, other_gateway=other_gateway)
    default = _default_route(ni, family)
    if default is None:
        kind = "IPv6" if family == ni.AF_INET6 else "IPv4"
        raise NetworkError(
            f"no default {kind} route towards the server {server}; give the gateway IP explicitly"
        )
    gateway, ext_if = default
    return NetInfo(ext_if, gateway, other_gateway=other_gateway)


def _route_out6(ni: Any) -> str | None:
    """The interface of the default IPv6 route, if there is one."""
    default = _default_route(ni, ni.AF_INET6)
    return default[1] if default else None


def _default_route(ni: Any, family: int) -> tuple[str, str] | None:
    entry = ni.gateways().get("default", {}).get(family)
    if not entry:
        return None
    return str(entry[0]), str(entry[1])


def _addresses(ni: Any, family: int) -> Iterable[tuple[str, dict[str, str]]]:
    for name in ni.interfaces():
        try:
            addrs = ni.ifaddresses(name).get(family, [])
        except ValueError:
            continue  # vanished meanwhile
        for a in addrs:
            yield name, a


def _family(ni: Any, address: str) -> int:
    return int(ni.AF_INET6 if is_ipv6(address) else ni.AF_INET)


def interface_with_address(ni: Any, address: str) -> str | None:
    wanted = ipaddress.ip_address(address)
    for name, a in _addresses(ni, _family(ni, address)):
        try:
            if ipaddress.ip_address(a["addr"].split("%", 1)[0]) == wanted:
                return name
        except (KeyError, ValueError):
            continue
    return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(ni: Any, family: int) -> Iterable[tuple[str, Network]]:
    """(interface, on-link subnet) of every address of one family."""
    for name, a in _addresses(ni, family):
        try:
            host = a["addr"].split("%", 1)[0]
            mask = a.get("netmask", "")
            # netifaces gives IPv6 masks as "ffff:ffff::/64": only the prefix length counts.
            prefix = mask.rsplit("/", 1)[1] if "/" in mask else mask
            yield name, ipaddress.ip_network(f"{host}/{prefix}" if prefix else host, strict=False)
        except (KeyError, ValueError):
            continue


def interface_reaching(ni: Any, address: str) -> str | None:
    """The interface whose on-link subnet contains `address` (the gateway)."""
    try:
        wanted = ipaddress.ip_address(address)
    except ValueError:
        return None
    for name, net in _networks(ni, _family(ni, address)):
        if wanted in net and net.num_addresses > 1:
            return name
    return None


def local_networks(ni: Any = None, skip: Collection[str] = ()) -> tuple[str, ...]:
    """The subnets of this host's interfaces but those named in `skip` (the tun), sorted: what
    the kill switch lets through besides the tunnel. Loopback, link-local (passed anyway) and
    single addresses (a point-to-point link's own end) are left out."""
    ni = ni if ni is not None else _netifaces()
    found: set[Network] = set()
    for family in (ni.AF_INET, ni.AF_INET6):
        for name, net in _networks(ni, family):
            if name in skip or net.is_loopback or net.is_link_local or net.num_addresses == 1:
                continue
            found.add(net)
    return tuple(
        str(n)
        for n in sorted(found, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    )
