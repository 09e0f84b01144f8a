"""Linux: /dev/net/tun, iproute2 and iptables; the client routes through table 42069."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable

from dsvpn.config import ROUTING_TABLE, Config
from dsvpn.errors import DsvpnError, PrerequisiteError, UsageError
from dsvpn.platform._common import Backend, NetInfo, TunFraming, tun_open_error
from dsvpn.rules import Plan, Step

# <linux/if_tun.h>, <linux/sockios.h>
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
# TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN: the stack may hand us 64 KiB TCP
# packets with partial checksums; the loop cuts them into ordinary packets (tun_vnet.h).
TUN_OFFLOADS = 0x01 | 0x02 | 0x04 | 0x08
SIOCSIFMTU = 0x8922
IFNAMSIZ = 16

TABLE = str(ROUTING_TABLE)


def _drop_foreign_to_tun_ip(tun: str, local_ip: str) -> tuple[str, ...]:
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
# check_conflicts refuses), and skipping it would make our undo delete theirs. Leftovers
# of our own crashed runs are removed by cleanup_stale before we start.


def server_plan(cfg: Config, tun: str, net: NetInfo) -> Plan:
    ext = net.ext_if
    raw = _drop_foreign_to_tun_ip(tun, cfg.local_tun_ip)
    masq = ("POSTROUTING", "-o", ext, "-s", cfg.remote_tun_ip, "-j", "MASQUERADE")
    back = (
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
    out = ("FORWARD", "-i", tun, "-o", ext, "-j", "ACCEPT")
    return Plan(
        [
            # Restored (or handed to another live server) on exit by the runner.
            Step(("sysctl", "net.ipv4.ip_forward=1"), None, sysctl=("net.ipv4.ip_forward", "1")),
            *_addresses(cfg, tun),
            Step((*_LINK_UP, tun, "up"), None),
            Step(("iptables", "-t", "raw", "-I", *raw), ("iptables", "-t", "raw", "-D", *raw)),
            Step(("iptables", "-t", "nat", "-A", *masq), ("iptables", "-t", "nat", "-D", *masq)),
            Step(
                ("iptables", "-t", "filter", "-A", *back), ("iptables", "-t", "filter", "-D", *back)
            ),
            Step(
                ("iptables", "-t", "filter", "-A", *out), ("iptables", "-t", "filter", "-D", *out)
            ),
        ]
    )


def client_plan(cfg: Config, tun: str, net: NetInfo) -> Plan:
    # The gateway plays no part: the tunnel's socket carries fwmark 42069 and so keeps
    # using the main table, whatever its default route is.
    raw = _drop_foreign_to_tun_ip(tun, cfg.local_tun_ip)
    steps = [
        Step(
            ("sysctl", "net.ipv4.tcp_congestion_control=bbr"),
            None,
            sysctl=("net.ipv4.tcp_congestion_control", "bbr"),
            # Only a speed-up; a kernel without bbr still runs the tunnel.
            best_effort=True,
        ),
        Step((*_LINK_UP, tun, "up"), None),
        Step(("iptables", "-t", "raw", "-I", *raw), ("iptables", "-t", "raw", "-D", *raw)),
        *_addresses(cfg, tun),
        # The table's routes vanish with the device.
        Step(("ip", "route", "add", "default", "dev", tun, "table", TABLE), None),
        Step(("ip", "-6", "route", "add", "default", "dev", tun, "table", TABLE), None),
    ]
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
    return Plan(steps)


class LinuxBackend(Backend):
    name = "linux"
    # vnet_hdr: lets the loop write merged TCP segments as one GSO packet (see tun_vnet.h).
    framing = TunFraming(header=False, af_inet=socket.AF_INET, af_inet6=10, vnet_hdr=True)
    tools = (("ip", "iproute2"), ("iptables", "iptables"), ("sysctl", "procps"))

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

    def server_plan(self, cfg: Config, tun: str, net: NetInfo) -> Plan:
        return server_plan(cfg, tun, net)

    def client_plan(self, cfg: Config, tun: str, net: NetInfo) -> Plan:
        return client_plan(cfg, tun, net)

    def open_tun(self, wanted: str | None, mtu: int) -> tuple[int, str]:
        if wanted is not None and (not wanted or len(wanted.encode()) >= IFNAMSIZ):
            raise UsageError(f"invalid tun device name {wanted!r}: 1 to {IFNAMSIZ - 1} bytes")
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
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS)
            set_mtu(name, mtu)
        except BaseException:
            os.close(fd)
            raise
        return fd, name


def set_mtu(name: str, mtu: int) -> None:
    ifr = struct.pack("16si20x", name.encode(), mtu)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCSIFMTU, ifr)
        except OSError as exc:
            raise DsvpnError(f"cannot set the MTU of {name} to {mtu}: {exc.strerror}") from exc
