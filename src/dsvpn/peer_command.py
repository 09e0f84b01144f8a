"""`dsvpn peer add|remove|list`: keep a peers file (dsvpn.peers) and tell the servers using it."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from dsvpn import instances, peers
from dsvpn.config import DEFAULT_PORT
from dsvpn.errors import DsvpnError, UsageError

USAGE = """\
usage:
  dsvpn peer add <peers file> <name> [<tun ip>]
      add a client: creates the peers file if it is missing, writes the client's new key
      to <name>.key beside it (mode 0600, never overwritten), gives it <tun ip> or the
      pool's next free address, and prints the command that starts that client (the same
      for C DSVPN)
  dsvpn peer remove <peers file> <name>
      remove a client (and the <name>.key that add wrote); its session ends
  dsvpn peer list <peers file>

A server started as `dsvpn server <peers file> ...` serves every client in the file and
re-reads it on SIGHUP; add and remove send that signal to the servers using the file.

The peers file is plain text, one client per line, "<name> <key file> <tunnel IPv4
address>" ("#" starts a comment; a relative key file is relative to the peers file). An
optional first line "pool <network>/<prefix> [<server tunnel address>]" sets the clients'
range (default: pool 192.168.192.0/24 192.168.192.254).
"""


def main(
    argv: Sequence[str],
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    run_dir: str | os.PathLike[str] = instances.RUN_DIR,
) -> int:
    """`dsvpn peer ...` (argv without `dsvpn peer`)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if not argv or argv[0] in ("-h", "--help", "help") or "-h" in argv or "--help" in argv:
        out.write(USAGE)
        return 0
    action, args = argv[0], list(argv[1:])
    for arg in args:
        if arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r} for dsvpn peer {action}")
    if action == "add":
        if len(args) not in (2, 3):
            raise UsageError("usage: dsvpn peer add <peers file> <name> [<tun ip>]")
        return _add(args[0], args[1], args[2] if len(args) == 3 else None, out, err, run_dir)
    if action == "remove":
        if len(args) != 2:
            raise UsageError("usage: dsvpn peer remove <peers file> <name>")
        return _remove(args[0], args[1], err, run_dir)
    if action == "list":
        if len(args) != 1:
            raise UsageError("usage: dsvpn peer list <peers file>")
        return _list(args[0], out)
    raise UsageError(f"unknown peer action {action!r}: expected add, remove or list")


def _add(
    path: str,
    name: str,
    address: str | None,
    out: TextIO,
    err: TextIO,
    run_dir: str | os.PathLike[str],
) -> int:
    created = not os.path.lexists(path)
    loaded, peer = peers.add(path, name, address)
    if created:
        print(f"created the peers file {loaded.path} (pool {loaded.pool})", file=err)
    print(
        f"added peer {peer.name} with tunnel address {peer.address}; copy its key "
        f"{loaded.key_path(peer)} to the client and run there (as root):",
        file=err,
    )
    servers = _servers(loaded.path, err, run_dir)
    ports = {port for _, port in servers}
    port = ports.pop() if len(ports) == 1 else DEFAULT_PORT
    print(peers.client_command(loaded, peer, port), file=out)
    _reload(loaded.path, servers, err)
    return 0


def _remove(path: str, name: str, err: TextIO, run_dir: str | os.PathLike[str]) -> int:
    peer, key_removed = peers.remove(path, name)
    where = os.path.abspath(path)
    gone = f" and its key {key_removed}" if key_removed else ""
    print(f"removed peer {peer.name} ({peer.address}){gone}", file=err)
    _reload(where, _servers(where, err, run_dir), err)
    return 0


def _list(path: str, out: TextIO) -> int:
    loaded = peers.load(path)
    print(f"# {loaded.path}: pool {loaded.pool}, server {loaded.server}", file=out)
    rows = [("NAME", "ADDRESS", "KEY FILE")]
    rows += [(p.name, p.address, p.key_file) for p in loaded.peers]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}", file=out)
    return 0


def _servers(path: str, err: TextIO, run_dir: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(PID, port) of each live server using the peers file; [] (and a note) if the instance
    records cannot be read (they are root's)."""
    from dsvpn import platform

    try:
        return instances.servers_using(path, platform.current(), run_dir=run_dir)
    except DsvpnError as exc:
        print(
            f"note: cannot look for a server using {path} ({exc}); a running one re-reads "
            "it on SIGHUP",
            file=err,
        )
        return []


def _reload(path: str, servers: list[tuple[int, int]], err: TextIO) -> None:
    for pid, _ in servers:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            continue
        except PermissionError:
            print(f"note: not allowed to signal the server (PID {pid}) using {path}", file=err)
            continue
        print(f"told the server (PID {pid}) using {Path(path).name} to re-read it", file=err)
