"""--dns as plan steps: point the resolver configuration at the tunnel's resolvers while it is
up, one way per resolver manager (dsvpn.dns detects which one a host has); and the undos of
those steps recognised again, for the records.

Linux: systemd-resolved (per-link DNS on the tun, one revert at exit), resolvconf (Debian's,
which merges records, or openresolv, which can make ours exclusive), or /etc/resolv.conf itself
(a file step: the runner keeps the old content in the record). macOS: the primary network
service's DNS in the dynamic store (scutil), its previous value kept in the store.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from dsvpn.errors import DsvpnError
from dsvpn.plan import RESOLV_CONF, Argv, Step
from dsvpn.platform._common import fits, word_ifname

RESOLVED = "resolved"
RESOLVCONF = "resolvconf"  # Debian's resolvconf: merges our servers with the others
OPENRESOLV = "openresolv"  # resolvconf of most other systems: -x makes ours exclusive
FILE = "file"
SCUTIL = "scutil"
METHODS = (RESOLVED, RESOLVCONF, OPENRESOLV, FILE, SCUTIL)
PLACEHOLDER_SERVICE = "<primary-service>"
DEBIAN_SUFFIX = ".dsvpn"  # Debian's resolvconf names records <interface>.<program>


def default_method(platform: str) -> str:
    """What a dry run for another OS shows (the most common case there)."""
    return {"linux": RESOLVED, "macos": SCUTIL}.get(platform, FILE)


def resolv_conf_text(servers: Sequence[str]) -> str:
    lines = ["# written by dsvpn while its tunnel is up; the previous file comes back at exit"]
    lines += [f"nameserver {s}" for s in servers]
    return "\n".join(lines) + "\n"


def steps(method: str, tun: str, servers: Sequence[str], service: str = "") -> list[Step]:
    """The plan steps of one method pointing DNS at `servers`."""
    servers = tuple(servers)
    if method == RESOLVED:
        # One revert undoes all three; it runs last, after the kill switch is gone.
        return [
            Step(("resolvectl", "dns", tun, *servers), ("resolvectl", "revert", tun)),
            Step(("resolvectl", "domain", tun, "~."), None),
            Step(("resolvectl", "default-route", tun, "yes"), None),
        ]
    text = "".join(f"nameserver {s}\n" for s in servers)
    if method == OPENRESOLV:
        # -m 0: first in line; -x: exclusive, the other interfaces' servers are not used.
        return [_openresolv(tun, text)]
    if method == RESOLVCONF:
        # Debian's resolvconf orders records by interface name (tun* early): ours come first.
        return [_debian_resolvconf(tun, text)]
    if method == FILE:
        return [Step(("write", RESOLV_CONF), None, file=(RESOLV_CONF, resolv_conf_text(servers)))]
    if method == SCUTIL:
        return [_scutil(servers, service or PLACEHOLDER_SERVICE)]
    raise DsvpnError(f"unknown DNS method {method!r}")


def _openresolv(tun: str, text: str = "") -> Step:
    return Step(
        ("resolvconf", "-a", tun, "-m", "0", "-x"), ("resolvconf", "-d", tun, "-f"), input=text
    )


def _debian_resolvconf(record: str, text: str = "") -> Step:
    if not record.endswith(DEBIAN_SUFFIX):
        record += DEBIAN_SUFFIX
    return Step(("resolvconf", "-a", record), ("resolvconf", "-d", record), input=text)


def _is_address(word: str) -> bool:
    try:
        ipaddress.ip_address(word)
    except ValueError:
        return False
    return True


def _debian_record(word: str) -> bool:
    return word.endswith(DEBIAN_SUFFIX) and word_ifname(word[: -len(DEBIAN_SUFFIX)])


def undo_of(apply: Argv, resolved: bool) -> Argv | None:
    """The undo of a DNS step this module makes (with one), None for anything else;
    systemd-resolved's only where `resolved` (Linux)."""
    servers = apply[3:]
    resolvectl = fits(apply[:3], ("resolvectl", "dns", word_ifname))
    if resolved and resolvectl and servers and all(_is_address(w) for w in servers):
        return ("resolvectl", "revert", apply[2])
    if fits(apply, ("resolvconf", "-a", word_ifname, "-m", "0", "-x")):
        return _openresolv(apply[2]).undo
    if fits(apply, ("resolvconf", "-a", _debian_record)):
        return _debian_resolvconf(apply[2]).undo
    return None


# -- macOS --------------------------------------------------------------------------------------

SERVICE_ID = re.compile(r"[A-Za-z0-9-]{1,64}")  # the dynamic store's service IDs are UUIDs


def _keys(service: str) -> tuple[str, str]:
    return f"State:/Network/Service/{service}/DNS", f"State:/Network/dsvpn/{service}/SavedDNS"


def _scutil_undo_input(service: str) -> str:
    key, saved = _keys(service)
    return f"open\nd.init\nget {saved}\nset {key}\nremove {saved}\nquit\n"


def _scutil(servers: tuple[str, ...], service: str) -> Step:
    key, saved = _keys(service)
    # The dynamic store keeps the previous value for us (it lives until reboot, like /run),
    # so the undo also works after a crash. A service without DNS state saves an empty one.
    apply = (
        f"open\nd.init\nget {key}\nset {saved}\n"
        f"d.init\nd.add ServerAddresses * {' '.join(servers)}\nset {key}\nquit\n"
    )
    return Step(("scutil",), ("scutil",), input=apply, undo_input=_scutil_undo_input(service))


SCUTIL_STEP = ("scutil",)


def scutil_undo_input_fits(text: str) -> bool:
    """Whether `text` is the restore dsvpn feeds scutil (for one service ID)."""
    m = re.match(
        rf"open\nd\.init\nget State:/Network/dsvpn/({SERVICE_ID.pattern})/SavedDNS\n", text
    )
    return m is not None and text == _scutil_undo_input(m[1])
