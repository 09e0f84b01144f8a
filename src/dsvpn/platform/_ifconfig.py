"""What macOS, OpenBSD, FreeBSD, NetBSD and DragonFly share: ifconfig/route/sysctl -w plans,
/dev/tunN opening, and setting the MTU with ifconfig."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from dsvpn.config import ClientConfig, Config, ServerConfig, tun_ip6
from dsvpn.errors import DsvpnError, NetworkError, UsageError
from dsvpn.plan import Argv, Plan, Run, Step
from dsvpn.platform import _dns
from dsvpn.platform._common import (
    Backend,
    NetInfo,
    Shape,
    fits,
    is_ipv6,
    server_address,
    tun_open_error,
    word_gateway,
    word_ipv4,
    word_ipv6,
)

FORWARDING = "net.inet.ip.forwarding"
TUN_UNITS = 256  # tun0 .. tun255


def sysctl_write(key: str, value: str) -> Argv:
    return ("sysctl", "-w", f"{key}={value}")


def address_steps(cfg: Config, tun: str) -> list[Step]:
    # No undo: the addresses go away with the tun device when its fd is closed.
    return [
        Step(("ifconfig", tun, cfg.local_tun_ip, cfg.remote_tun_ip, "up"), None),
        Step(
            (
                "ifconfig",
                tun,
                "inet6",
                cfg.local_tun_ip6,
                cfg.remote_tun_ip6,
                "prefixlen",
                "128",
                "up",
            ),
            None,
        ),
    ]


def server_plan(cfg: ServerConfig, tun: str) -> Plan:
    steps = [
        # The reference never restores forwarding; the runner does (see Step.sysctl).
        Step(sysctl_write(FORWARDING, "1"), None, sysctl=(FORWARDING, "1")),
        *address_steps(cfg, tun),
    ]
    if cfg.pool is not None:
        # A server of several clients (a peers file): the tun's peer is the pool's network
        # address (cfg.remote_tun_ip, no client's), through which the whole pool and its IPv6
        # twin are routed. Each client configures its own end as with one client.
        pool = ipaddress.IPv4Network(cfg.pool)
        twin = ipaddress.IPv6Network((tun_ip6(str(pool.network_address)), 96 + pool.prefixlen))
        steps += [
            _net_route(str(pool), cfg.remote_tun_ip),
            _net_route(str(twin), cfg.remote_tun_ip6),
        ]
    return Plan(steps)


# The halves of the address space that beat the default route without replacing it (as the
# reference), IPv4 through the tunnel, IPv6 blackholed rather than leaked outside it.
_V4_HALVES = ("0/1", "128/1")
_V6_HALVES = ("0000::/1", "8000::/1")


def _host_route(server: str, gateway: str) -> Step:
    # Keeps the tunnel's own connection off the tunnel; redone when the gateway moves.
    inet = ("-inet6",) if is_ipv6(server) else ()
    return Step(
        ("route", "add", *inet, server, gateway), ("route", "delete", *inet, server), gateway=True
    )


def _v4_half(half: str, remote: str) -> Step:
    return Step(("route", "add", half, remote), ("route", "delete", half))


def _v6_half(half: str, remote6: str) -> Step:
    return Step(
        ("route", "add", "-inet6", "-blackhole", half, remote6),
        ("route", "delete", "-inet6", half),
    )


def _net_route(prefix: str, via: str, gateway: bool = False) -> Step:
    """A --route prefix through the tun's peer, or an --exclude one through the gateway of its
    family (redone when it moves)."""
    inet = ("-inet6",) if ":" in prefix else ()
    return Step(
        ("route", "add", *inet, "-net", prefix, via),
        ("route", "delete", *inet, "-net", prefix),
        gateway=gateway,
    )


def client_plan(cfg: ClientConfig, tun: str, net: NetInfo, platform: str = "freebsd") -> Plan:
    """The routes of the client (everything, --route, --exclude, --no-routes) and --dns; the
    kill switch is the backend's own (IfconfigBackend.kill_switch_steps)."""
    opts = cfg.network
    server = server_address(cfg)
    steps = address_steps(cfg, tun)
    if opts.full:
        steps += [
            _host_route(server, net.gateway),
            *(_v4_half(half, cfg.remote_tun_ip) for half in _V4_HALVES),
            *(_v6_half(half, cfg.remote_tun_ip6) for half in _V6_HALVES),
        ]
    else:
        carried = opts.carried()
        if _covers(carried, server):
            steps.append(_host_route(server, net.gateway))
        for p in carried:
            steps.append(_net_route(p, cfg.remote_tun_ip6 if ":" in p else cfg.remote_tun_ip))
    for p in opts.excludes:
        same_family = (":" in p) == is_ipv6(server)
        gateway = net.gateway if same_family else net.other_gateway
        if not gateway:
            kind = "IPv6" if ":" in p else "IPv4"
            raise NetworkError(f"no default {kind} route to send --exclude {p} around the tunnel")
        steps.append(_net_route(p, gateway, gateway=True))
    if opts.dns:
        method = opts.dns_via or _dns.default_method(platform)
        steps += _dns.steps(method, tun, opts.dns, opts.dns_service)
    return Plan(steps)


def _covers(prefixes: tuple[str, ...], address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True  # a placeholder: show the route
    return any(ip in ipaddress.ip_network(p) for p in prefixes if (":" in p) == (ip.version == 6))


# Each shape with the function that makes its step from the apply argv: a record's undo is
# accepted only if it is that step's undo.
_ROUTE_SHAPES: tuple[tuple[Shape, Callable[[Argv], Step]], ...] = (
    (("route", "add", word_ipv4, word_gateway), lambda a: _host_route(a[2], a[3])),
    (("route", "add", "-inet6", word_ipv6, word_gateway), lambda a: _host_route(a[3], a[4])),
    *((("route", "add", half, word_ipv4), lambda a: _v4_half(a[2], a[3])) for half in _V4_HALVES),
    *(
        (("route", "add", "-inet6", "-blackhole", half, word_ipv6), lambda a: _v6_half(a[4], a[5]))
        for half in _V6_HALVES
    ),
)


def _prefix(version: int) -> Callable[[str], bool]:
    def check(word: str) -> bool:
        try:
            return "/" in word and ipaddress.ip_network(word).version == version
        except ValueError:
            return False

    return check


_NET_ROUTE_SHAPES: tuple[Shape, ...] = (
    ("route", "add", "-net", _prefix(4), word_gateway),
    ("route", "add", "-inet6", "-net", _prefix(6), word_gateway),
)


def undo_of(apply: Sequence[str]) -> Argv | None:
    apply = tuple(apply)
    for shape, make in _ROUTE_SHAPES:
        if fits(apply, shape):
            return make(apply).undo
    if any(fits(apply, shape) for shape in _NET_ROUTE_SHAPES):
        return _net_route(apply[-2], apply[-1]).undo
    return _dns.undo_of(apply, resolved=False)


class IfconfigBackend(Backend):
    """Base for macOS and the BSDs; they differ in tun opening, framing and notes."""

    tools = (
        ("ifconfig", "the base system's ifconfig; is /sbin in PATH?"),
        ("route", "the base system's route; is /sbin in PATH?"),
        ("sysctl", "the base system's sysctl; is /sbin in PATH?"),
    )
    sysctl_keys = frozenset({FORWARDING})

    def __init__(
        self,
        which: Callable[[str], str | None] | None = None,
        dev_dir: str | os.PathLike[str] = "/dev",
    ) -> None:
        if which is None:
            super().__init__()
        else:
            super().__init__(which)
        self._dev_dir = Path(dev_dir)

    def check_tun_name(self, name: str) -> None:
        parse_tun_name(name)

    def server_plan(self, cfg: ServerConfig, tun: str, net: NetInfo) -> Plan:
        return server_plan(cfg, tun)

    def client_plan(self, cfg: ClientConfig, tun: str, net: NetInfo) -> Plan:
        plan = client_plan(cfg, tun, net, self.name)
        if cfg.network.kill_switch:
            # Last: applied once the routes are in, undone first (see Tunnel).
            plan.steps += self.kill_switch_steps(cfg, tun)
        return plan

    def kill_switch_steps(self, cfg: ClientConfig, tun: str) -> list[Step]:
        raise UsageError(f"--kill-switch is available on Linux and macOS, not on {self.name}")

    def sysctl_write(self, key: str, value: str) -> Argv:
        return sysctl_write(key, value)

    def undo_of(self, apply: Sequence[str]) -> Argv | None:
        return undo_of(apply)

    def mtu_argv(self, tun: str, mtu: int) -> Argv:
        # ifconfig rather than ioctl(SIOCSIFMTU): struct ifreq and the request number differ
        # between these systems, and ifconfig is in every base system.
        return ("ifconfig", tun, "mtu", str(mtu))

    def open_tun(
        self, wanted: str | None, mtu: int, run: Run, *, queues: int = 1
    ) -> tuple[int, str]:
        fd, name = open_dev_tun(self._dev_dir, wanted)
        try:
            run(self.mtu_argv(name, mtu))
        except BaseException:
            os.close(fd)
            raise
        return fd, name


_TUN_NAME = re.compile(r"tun(\d{1,3})")


def parse_tun_name(name: str) -> int:
    """The unit of a `tunN` name; UsageError for anything else."""
    m = _TUN_NAME.fullmatch(name)
    if not m or int(m.group(1)) >= TUN_UNITS:
        raise UsageError(f"invalid tun device name {name!r}: expected tun0 .. tun{TUN_UNITS - 1}")
    return int(m.group(1))


def open_dev_tun(dev_dir: Path, wanted: str | None) -> tuple[int, str]:
    """Open /dev/tunN: the wanted one, or the first of tun0..tun255 that opens.

    A missing node is skipped as well as a busy one: FreeBSD and DragonFly create tunN on
    first open (devfs cloning), the others have a fixed set.
    """
    flags = os.O_RDWR | os.O_CLOEXEC
    if wanted is not None:
        parse_tun_name(wanted)
        try:
            return os.open(dev_dir / wanted, flags), wanted
        except FileNotFoundError as exc:
            raise DsvpnError(f"tun device {dev_dir / wanted} does not exist") from exc
        except OSError as exc:
            raise tun_open_error(exc, wanted) from exc
    for unit in range(TUN_UNITS):
        name = f"tun{unit}"
        try:
            return os.open(dev_dir / name, flags), name
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOENT, errno.ENXIO):
                continue
            raise tun_open_error(exc, name) from exc
    raise DsvpnError(f"no free tun device in {dev_dir} (tried tun0 .. tun{TUN_UNITS - 1})")
