"""Linux: /dev/net/tun, iproute2 and iptables; the client routes through table 42069."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Sequence

from dsvpn.config import ROUTING_TABLE, ClientConfig, Config, ServerConfig
from dsvpn.errors import PrerequisiteError, UsageError
from dsvpn.plan import Argv, Plan, Run, Step
from dsvpn.platform._common import (
    Backend,
    NetInfo,
    Shape,
    TunFraming,
    fits,
    tun_open_error,
    word_ifname,
    word_ipv4,
)

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
# TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN: the stack may hand us 64 KiB TCP
# packets with partial checksums; the loop cuts them into ordinary packets (tun_vnet.h).
TUN_OFFLOADS = 0x01 | 0x02 | 0x04 | 0x08
# TUN_F_USO4 | TUN_F_USO6 (Linux 6.2+): UDP super-packets too (from sockets using UDP_SEGMENT).
TUN_USO = 0x20 | 0x40
IFNAMSIZ = 16

TABLE = str(ROUTING_TABLE)
FORWARDING = "net.ipv4.ip_forward"
CONGESTION = "net.ipv4.tcp_congestion_control"


def sysctl_write(key: str, value: str) -> Argv:
    return ("sysctl", f"{key}={value}")


# -- iptables rules: built here for the plans, recognised here for the records ----------------


def _drop_foreign_to_tun_ip(tun: str, local_ip: str) -> Argv:
    # Packets for our tun address that arrive on another interface are spoofed: drop them.
    return (
        "PREROUTING",
        "!",
        "-i",
        tun,
        "-d",
        local_ip,
        "-m",
        "addrtype",
        "!",
        "--src-type",
        "LOCAL",
        "-j",
        "DROP",
    )


def _masquerade(ext: str, remote_ip: str) -> Argv:
    return ("POSTROUTING", "-o", ext, "-s", remote_ip, "-j", "MASQUERADE")


def _forward_back(ext: str, tun: str) -> Argv:
    return (
        "FORWARD",
        "-i",
        ext,
        "-o",
        tun,
        "-m",
        "state",
        "--state",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    )


def _forward_out(tun: str, ext: str) -> Argv:
    return ("FORWARD", "-i", tun, "-o", ext, "-j", "ACCEPT")


def _iptables(table: str, verb: str, rule: Argv) -> Step:
    return Step(("iptables", "-t", table, verb, *rule), ("iptables", "-t", table, "-D", *rule))


# The same builders called with markers give the shapes: a record's iptables undo is accepted
# only as the -D twin of an apply of one of these shapes.
_IF, _V4 = "\0ifname", "\0ipv4"
_IPTABLES_SHAPES: tuple[tuple[str, str, Shape], ...] = tuple(
    (table, verb, tuple({_IF: word_ifname, _V4: word_ipv4}.get(w, w) for w in rule))
    for table, verb, rule in (
        ("raw", "-I", _drop_foreign_to_tun_ip(_IF, _V4)),
        ("nat", "-A", _masquerade(_IF, _V4)),
        ("filter", "-A", _forward_back(_IF, _IF)),
        ("filter", "-A", _forward_out(_IF, _IF)),
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


def undo_of(apply: Sequence[str]) -> Argv | None:
    apply = tuple(apply)
    if apply in _IP_RULE_UNDO:
        return _IP_RULE_UNDO[apply]
    if len(apply) > 4 and apply[:2] == ("iptables", "-t"):
        table, verb, rule = apply[2], apply[3], apply[4:]
        for t, v, shape in _IPTABLES_SHAPES:
            if (table, verb) == (t, v) and fits(rule, shape):
                return _iptables(table, verb, rule).undo
    return None


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
# of our own crashed runs are removed by instances.claim before we start.


def server_plan(cfg: ServerConfig, tun: str, net: NetInfo) -> Plan:
    ext = net.ext_if
    return Plan(
        [
            # Restored (or handed to another live server) on exit by the runner.
            Step(sysctl_write(FORWARDING, "1"), None, sysctl=(FORWARDING, "1")),
            *_addresses(cfg, tun),
            Step((*_LINK_UP, tun, "up"), None),
            _iptables("raw", "-I", _drop_foreign_to_tun_ip(tun, cfg.local_tun_ip)),
            _iptables("nat", "-A", _masquerade(ext, cfg.remote_tun_ip)),
            _iptables("filter", "-A", _forward_back(ext, tun)),
            _iptables("filter", "-A", _forward_out(tun, ext)),
        ]
    )


def client_plan(cfg: ClientConfig, tun: str, net: NetInfo) -> Plan:
    # The gateway plays no part: the tunnel's socket carries fwmark 42069 and so keeps
    # using the main table, whatever its default route is.
    return Plan(
        [
            Step(
                sysctl_write(CONGESTION, "bbr"),
                None,
                sysctl=(CONGESTION, "bbr"),
                # Only a speed-up; a kernel without bbr still runs the tunnel.
                best_effort=True,
            ),
            Step((*_LINK_UP, tun, "up"), None),
            _iptables("raw", "-I", _drop_foreign_to_tun_ip(tun, cfg.local_tun_ip)),
            *_addresses(cfg, tun),
            # The table's routes vanish with the device.
            Step(("ip", "route", "add", "default", "dev", tun, "table", TABLE), None),
            Step(("ip", "-6", "route", "add", "default", "dev", tun, "table", TABLE), None),
            *_ip_rules(),
        ]
    )


class LinuxBackend(Backend):
    name = "linux"
    # vnet_hdr: lets the loop write merged TCP segments as one GSO packet (see tun_vnet.h).
    framing = TunFraming(header=False, af_inet=socket.AF_INET, af_inet6=10, vnet_hdr=True)
    tools = (("ip", "iproute2"), ("iptables", "iptables"), ("sysctl", "procps"))
    sysctl_keys = frozenset({FORWARDING, CONGESTION})

    def __init__(
        self,
        which: Callable[[str], str | None] | None = None,
        clone_dev: str = "/dev/net/tun",
    ) -> None:
        if which is None:
            super().__init__()
        else:
            super().__init__(which)
        self._clone_dev = clone_dev

    def check_host(self, cfg: Config) -> None:
        if not os.path.exists(self._clone_dev):
            raise PrerequisiteError(f"{self._clone_dev} does not exist (try: modprobe tun)")
        super().check_host(cfg)

    def check_tun_name(self, name: str) -> None:
        if not 0 < len(name.encode()) < IFNAMSIZ or not word_ifname(name):
            raise UsageError(
                f"invalid tun device name {name!r}: at most {IFNAMSIZ - 1} characters, "
                "without '/', ':' or spaces"
            )

    def server_plan(self, cfg: ServerConfig, tun: str, net: NetInfo) -> Plan:
        return server_plan(cfg, tun, net)

    def client_plan(self, cfg: ClientConfig, tun: str, net: NetInfo) -> Plan:
        return client_plan(cfg, tun, net)

    def sysctl_write(self, key: str, value: str) -> Argv:
        return sysctl_write(key, value)

    def undo_of(self, apply: Sequence[str]) -> Argv | None:
        return undo_of(apply)

    def mtu_argv(self, tun: str, mtu: int) -> Argv:
        return (*_LINK_UP, tun, "mtu", str(mtu))

    def open_tun(self, wanted: str | None, mtu: int, run: Run) -> tuple[int, str]:
        if wanted is not None:
            self.check_tun_name(wanted)
        label = wanted or "tun"
        try:
            fd = os.open(self._clone_dev, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise PrerequisiteError(
                f"{self._clone_dev} does not exist (try: modprobe tun)"
            ) from exc
        except OSError as exc:
            raise tun_open_error(exc, self._clone_dev) from exc
        try:
            # An empty name lets the kernel pick tunN.
            # IFF_VNET_HDR: a virtio_net_hdr before every packet, for GSO in both directions.
            flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR
            ifr = struct.pack("16sH22x", (wanted or "").encode(), flags)
            try:
                ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as exc:
                raise tun_open_error(exc, label) from exc
            name = ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
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
