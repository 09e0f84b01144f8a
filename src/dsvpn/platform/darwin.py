"""macOS: utun devices (a kernel-control socket) with a 4-byte address-family header;
NAT is left to pf."""

from __future__ import annotations

import errno
import fcntl
import re
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from dsvpn.config import ClientConfig, Config, ServerConfig
from dsvpn.errors import DsvpnError, UsageError
from dsvpn.plan import Argv, Run, Step
from dsvpn.platform import _dns, _killswitch
from dsvpn.platform._common import NetInfo, TunFraming, server_address, tun_open_error
from dsvpn.platform._ifconfig import IfconfigBackend

UTUN_CONTROL = "com.apple.net.utun_control"
# <sys/kern_control.h>: _IOWR('N', 3, struct ctl_info { u_int32_t ctl_id; char ctl_name[96]; })
CTLIOCGINFO = 0xC0644E03
CTL_INFO = struct.Struct("=I96s")
UTUN_OPT_IFNAME = 2  # <net/if_utun.h>
UTUN_UNITS = 32  # auto picks the first free of utun0 .. utun31, as the reference
# Not defined by Python on other systems; the values of <sys/socket.h>, <sys/sys_domain.h>.
PF_SYSTEM = getattr(socket, "PF_SYSTEM", 32)
SYSPROTO_CONTROL = getattr(socket, "SYSPROTO_CONTROL", 2)

_UTUN_NAME = re.compile(r"utun(\d{1,3})")


def parse_utun_name(name: str) -> int:
    """N of `utunN`; UsageError for anything else (macOS names utun devices itself)."""
    m = _UTUN_NAME.fullmatch(name)
    if not m or int(m.group(1)) > 254:
        raise UsageError(f"invalid tun device name {name!r}: on macOS it must be utunN")
    return int(m.group(1))


class DarwinBackend(IfconfigBackend):
    name = "macos"
    framing = TunFraming(header=True, af_inet=2, af_inet6=30)
    kill_switch = True
    serves_pools = True

    def __init__(
        self,
        which: Callable[[str], str | None] | None = None,
        socket_factory: Callable[..., Any] | None = None,
        ioctl: Callable[[int, int, bytes], bytes] | None = None,
    ) -> None:
        super().__init__(which=which)
        self._socket = socket_factory or socket.socket
        self._ioctl = ioctl or fcntl.ioctl

    def check_tun_name(self, name: str) -> None:
        parse_utun_name(name)

    def _control_id(self, sock: Any) -> int:
        # Python's connect() takes (ctl_id, unit); a bare name would always mean unit 0,
        # so look the id of the utun control up ourselves.
        info = self._ioctl(sock.fileno(), CTLIOCGINFO, CTL_INFO.pack(0, UTUN_CONTROL.encode()))
        ctl_id: int = CTL_INFO.unpack(info)[0]
        return ctl_id

    def open_tun(
        self, wanted: str | None, mtu: int, run: Run, *, queues: int = 1
    ) -> tuple[int, str]:
        units = [parse_utun_name(wanted)] if wanted is not None else range(UTUN_UNITS)
        for n in units:
            name = f"utun{n}"
            try:
                sock = self._socket(PF_SYSTEM, socket.SOCK_DGRAM, SYSPROTO_CONTROL)
            except OSError as exc:
                raise tun_open_error(exc, name) from exc
            try:
                # Unit N+1 asks the kernel for utunN.
                sock.connect((self._control_id(sock), n + 1))
            except OSError as exc:
                sock.close()
                if wanted is None and exc.errno == errno.EBUSY:
                    continue
                raise tun_open_error(exc, name) from exc
            try:
                raw = sock.getsockopt(SYSPROTO_CONTROL, UTUN_OPT_IFNAME, 16)
                name = raw.split(b"\0", 1)[0].decode() or name
            except OSError:
                pass  # the name we asked for is the name we got
            try:
                run(self.mtu_argv(name, mtu))
            except BaseException:
                sock.close()
                raise
            fd: int = sock.detach()
            return fd, name
        raise DsvpnError(f"no free utun device (tried utun0 .. utun{UTUN_UNITS - 1})")

    def kill_switch_steps(self, cfg: ClientConfig, tun: str) -> list[Step]:
        return _killswitch.pf_steps(cfg, tun, server_address(cfg))

    def undo_of(self, apply: Sequence[str]) -> Argv | None:
        apply = tuple(apply)
        if apply == _dns.SCUTIL_STEP:
            return _dns.SCUTIL_STEP
        return _killswitch.pf_undo_of(apply) or super().undo_of(apply)

    def undo_input_fits(self, undo: Sequence[str], text: str) -> bool:
        return tuple(undo) == _dns.SCUTIL_STEP and _dns.scutil_undo_input_fits(text)

    def notes(self, cfg: Config, tun: str, net: NetInfo) -> list[str]:
        if not isinstance(cfg, ServerConfig):
            return []
        ext = net.ext_if
        clients = cfg.pool or cfg.remote_tun_ip  # a peers file's pool, or the one client
        return [
            "NAT is not set up automatically on macOS. Add this rule to /etc/pf.conf "
            "(next to the other nat rules):",
            f"    nat on {ext} from {clients} to any -> ({ext})",
            "and load it with: pfctl -ef /etc/pf.conf",
        ]
