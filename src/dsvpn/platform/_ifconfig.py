"""What macOS, OpenBSD, FreeBSD, NetBSD and DragonFly share: ifconfig/route/sysctl -w plans,
/dev/tunN opening, and setting the MTU with ifconfig."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from dsvpn.config import Config
from dsvpn.errors import DsvpnError, UsageError
from dsvpn.platform._common import (
    Backend,
    NetInfo,
    is_ipv6,
    server_address,
    tun_open_error,
)
from dsvpn.rules import Plan, Step

FORWARDING = "net.inet.ip.forwarding"
TUN_UNITS = 256  # tun0 .. tun255

RunFn = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30)


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


def server_plan(cfg: Config, tun: str) -> Plan:
    return Plan(
        [
            # The reference never restores forwarding; the runner does (see Step.sysctl).
            Step(("sysctl", "-w", f"{FORWARDING}=1"), None, sysctl=(FORWARDING, "1")),
            *address_steps(cfg, tun),
        ]
    )


def client_plan(cfg: Config, tun: str, net: NetInfo) -> Plan:
    server = server_address(cfg)
    inet = ("-inet6",) if is_ipv6(server) else ()
    remote, remote6 = cfg.remote_tun_ip, cfg.remote_tun_ip6
    return Plan(
        [
            *address_steps(cfg, tun),
            # Keeps the tunnel's own connection off the tunnel; redone when the gateway moves.
            Step(
                ("route", "add", *inet, server, net.gateway),
                ("route", "delete", *inet, server),
                gateway=True,
            ),
            # Two halves beat the default route without replacing it (same as the reference).
            Step(("route", "add", "0/1", remote), ("route", "delete", "0/1")),
            Step(("route", "add", "128/1", remote), ("route", "delete", "128/1")),
            # IPv6 is blackholed rather than leaked outside the tunnel.
            Step(
                ("route", "add", "-inet6", "-blackhole", "0000::/1", remote6),
                ("route", "delete", "-inet6", "0000::/1"),
            ),
            Step(
                ("route", "add", "-inet6", "-blackhole", "8000::/1", remote6),
                ("route", "delete", "-inet6", "8000::/1"),
            ),
        ]
    )


class IfconfigBackend(Backend):
    """Base for macOS and the BSDs; they differ in tun opening, framing and notes."""

    tools = (
        ("ifconfig", "the base system's ifconfig; is /sbin in PATH?"),
        ("route", "the base system's route; is /sbin in PATH?"),
        ("sysctl", "the base system's sysctl; is /sbin in PATH?"),
    )

    def __init__(
        self,
        which: Callable[[str], str | None] | None = None,
        run: RunFn | None = None,
        dev_dir: str | os.PathLike[str] = "/dev",
    ) -> None:
        if which is None:
            super().__init__()
        else:
            super().__init__(which)
        self._run_cmd = run or _run
        self._dev_dir = Path(dev_dir)

    def server_plan(self, cfg: Config, tun: str, net: NetInfo) -> Plan:
        return server_plan(cfg, tun)

    def client_plan(self, cfg: Config, tun: str, net: NetInfo) -> Plan:
        return client_plan(cfg, tun, net)

    def set_mtu(self, name: str, mtu: int) -> None:
        # ifconfig rather than ioctl(SIOCSIFMTU): struct ifreq and the request number differ
        # between these systems, and ifconfig is in every base system.
        argv = ("ifconfig", name, "mtu", str(mtu))
        try:
            done = self._run_cmd(argv)
        except OSError as exc:
            raise DsvpnError(f"`{' '.join(argv)}` failed: {exc.strerror or exc}") from exc
        if done.returncode != 0:
            why = (done.stderr or "").strip().splitlines()[:1] or [f"exit {done.returncode}"]
            raise DsvpnError(f"cannot set the MTU of {name} to {mtu}: {why[0]}")

    def open_tun(self, wanted: str | None, mtu: int) -> tuple[int, str]:
        fd, name = open_dev_tun(self._dev_dir, wanted)
        try:
            self.set_mtu(name, mtu)
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
