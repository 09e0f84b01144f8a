"""The OS backend: chosen once by sys.platform (psutil's habit), or by name for a dry-run
of another system's plan."""

from __future__ import annotations

import functools
import sys

from dsvpn.errors import DsvpnError, UsageError
from dsvpn.platform._common import Backend, NetInfo, TunFraming

__all__ = ["NAMES", "Backend", "NetInfo", "TunFraming", "by_name", "current"]

NAMES: tuple[str, ...] = ("linux", "macos", "openbsd", "freebsd", "netbsd", "dragonfly")

# sys.platform prefix -> backend name (FreeBSD reports e.g. "freebsd14").
_PLATFORMS = (
    ("linux", "linux"),
    ("darwin", "macos"),
    ("openbsd", "openbsd"),
    ("freebsd", "freebsd"),
    ("netbsd", "netbsd"),
    ("dragonfly", "dragonfly"),
)


def by_name(name: str) -> Backend:
    """The backend for `name` (one of NAMES); every module imports on every OS."""
    if name == "linux":
        from dsvpn.platform.linux import LinuxBackend

        return LinuxBackend()
    if name == "macos":
        from dsvpn.platform.darwin import DarwinBackend

        return DarwinBackend()
    if name == "openbsd":
        from dsvpn.platform.openbsd import OpenBSDBackend

        return OpenBSDBackend()
    if name in ("freebsd", "netbsd", "dragonfly"):
        from dsvpn.platform import bsd

        cls = {
            "freebsd": bsd.FreeBSDBackend,
            "netbsd": bsd.NetBSDBackend,
            "dragonfly": bsd.DragonFlyBackend,
        }[name]
        return cls()
    raise UsageError(f"unknown platform {name!r}: choose one of {', '.join(NAMES)}")


def name_for(platform: str) -> str | None:
    for prefix, name in _PLATFORMS:
        if platform.startswith(prefix):
            return name
    return None


@functools.cache
def current() -> Backend:
    """The backend of this OS, chosen once."""
    name = name_for(sys.platform)
    if name is None:
        raise DsvpnError(
            f"unsupported operating system {sys.platform!r}: dsvpn runs on {', '.join(NAMES)}"
        )
    return by_name(name)
