"""Linux: /dev/net/tun, iproute2 and iptables or nft; the client routes through table 42069."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import struct
from collections.abc import Callable

from dsvpn.config import ROUTING_TABLE, Config, FirewallName
from dsvpn.errors import DsvpnError, PrerequisiteError, UsageError
from dsvpn.platform import firewall as fw
from dsvpn.platform._common import (
    PLACEHOLDER_IF,
    Backend,
    NetInfo,
    TunFraming,
    discover,
    tun_open_error,
)
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
FORWARDING = "net.ipv4.ip_forward"
FORWARDING6 = "net.ipv6.conf.all.forwarding"
NO_IPV6_OUT = "no IPv6 route out: clients' IPv6 traffic will not be forwarded"


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


def accept_ra_key(ifname: str) -> str:
    # sysctl reads dots as separators; a name with a dot (eth0.100) needs the slash form.
    if "." in ifname:
        return f"net/ipv6/conf/{ifname}/accept_ra"
    return f"net.ipv6.conf.{ifname}.accept_ra"


_ACCEPT_RA = re.compile(
    r"net\.ipv6\.conf\.[^./\s]{1,15}\.accept_ra|net/ipv6/conf/(?!\.\.?/)[^/\s]{1,15}/accept_ra"
)


def is_planned_sysctl(key: str) -> bool:
    """Whether the Linux plans may set `key` (for checking a record before acting on it)."""
    planned = (FORWARDING, FORWARDING6, "net.ipv4.tcp_congestion_control")
    return key in planned or _ACCEPT_RA.fullmatch(key) is not None


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


def server_plan(cfg: Config, tun: str, net: NetInfo, firewall: FirewallName = "iptables") -> Plan:
    rules = [_anti_spoof(tun, cfg.local_tun_ip, 4), *_nat(tun, net.ext_if, cfg.remote_tun_ip, 4)]
    ext6 = net.ext_if6
    if ext6:
        rules += [
            _anti_spoof(tun, cfg.local_tun_ip6, 6),
            *_nat(tun, ext6, cfg.remote_tun_ip6, 6),
        ]
    steps = [
        # Restored (or handed to another live server) on exit by the runner.
        Step(("sysctl", f"{FORWARDING}=1"), None, sysctl=(FORWARDING, "1")),
        *_addresses(cfg, tun),
        Step((*_LINK_UP, tun, "up"), None),
        *fw.steps(firewall, tun, rules),
    ]
    if ext6:
        # Every server's tun covers all of 64:ff9b::/96 (the peer /96 above): with two
        # servers the replies to a client would take the first tun. Its own address is
        # routed to its own tun (the route goes with the device).
        steps.append(
            Step(("ip", "-6", "route", "add", f"{cfg.remote_tun_ip6}/128", "dev", tun), None)
        )
        if net.ext6_accepts_ra:
            # Forwarding makes the kernel ignore router advertisements on interfaces with
            # accept_ra 1, and drop the default route they gave at once: 2 keeps them.
            key = accept_ra_key(ext6)
            steps.append(Step(("sysctl", f"{key}=2"), None, sysctl=(key, "2")))
        steps.append(Step(("sysctl", f"{FORWARDING6}=1"), None, sysctl=(FORWARDING6, "1")))
    return Plan(steps)


def client_plan(cfg: Config, tun: str, net: NetInfo, firewall: FirewallName = "iptables") -> Plan:
    # The gateway plays no part: the tunnel's socket carries fwmark 42069 and so keeps
    # using the main table, whatever its default route is.
    steps = [
        Step(
            ("sysctl", "net.ipv4.tcp_congestion_control=bbr"),
            None,
            sysctl=("net.ipv4.tcp_congestion_control", "bbr"),
            # Only a speed-up; a kernel without bbr still runs the tunnel.
            best_effort=True,
        ),
        Step((*_LINK_UP, tun, "up"), None),
        *fw.steps(firewall, tun, [_anti_spoof(tun, cfg.local_tun_ip, 4)]),
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
    tools = (("ip", "iproute2"), ("sysctl", "procps"))
    firewalls = fw.FIREWALLS

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

    def check_host(self, cfg: Config) -> None:
        if not os.path.exists(self._clone_dev):
            raise PrerequisiteError(f"{self._clone_dev} does not exist (try: modprobe tun)")
        super().check_host(cfg)
        fw.check_installed(cfg.firewall, self._which)

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

    def server_plan(self, cfg: Config, tun: str, net: NetInfo) -> Plan:
        return server_plan(cfg, tun, net, self.firewall(cfg))

    def client_plan(self, cfg: Config, tun: str, net: NetInfo) -> Plan:
        return client_plan(cfg, tun, net, self.firewall(cfg))

    def notes(self, cfg: Config, tun: str, net: NetInfo) -> list[str]:
        if not cfg.is_server or net.ext_if6:
            return []
        if net.ext_if == PLACEHOLDER_IF:  # a dry run for another host: its routes are unknown
            return ["with an IPv6 route out, its clients' IPv6 traffic is NATed there too"]
        return [NO_IPV6_OUT]

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
