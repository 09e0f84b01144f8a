"""One exception family: the CLI prints str(exc) as one line and exits with exc.exit_code."""

from __future__ import annotations


class DsvpnError(Exception):
    """A failure the user can act on. Never shown with a traceback."""

    exit_code = 1


class UsageError(DsvpnError):
    """Bad command line or argument value."""

    exit_code = 2


class KeyFileError(DsvpnError):
    """The key file is missing, unreadable or too short."""


class PermissionDenied(DsvpnError):
    """Not root / no CAP_NET_ADMIN."""

    exit_code = 77


class PrerequisiteError(DsvpnError):
    """A tool, module or device the host needs is missing (ip, iptables, /dev/net/tun)."""

    exit_code = 69


class ConflictError(DsvpnError):
    """Another running dsvpn instance already owns the tun name, port, address or table."""

    exit_code = 75


class CommandError(DsvpnError):
    """A plan command failed; everything applied before it has been undone."""


class NetworkError(DsvpnError):
    """Name resolution, bind, connect or handshake failure."""
