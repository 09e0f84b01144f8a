"""The peers file: the clients one server accepts, each with a key of its own and a tunnel address.

A plain text file that a person edits, one client per line::

    # comments run from "#" to the end of the line
    pool 192.168.192.0/24 192.168.192.254
    alice  alice.key  192.168.192.1
    bob    /etc/dsvpn/bob.key  192.168.192.2

``pool <network>/<prefix> [<server address>]`` (at most once, before the peers; default
192.168.192.0/24 with the server at its last host address, .254) is the clients' address range
and the server's own tunnel address. Each other line is ``<name> <key file> <IPv4 address>``;
a relative key file is relative to the directory of the peers file. A key file is exactly 32
raw bytes, so a peers file (text) cannot be taken for one (`looks_like_peers_file`).

`load` checks everything and reports the first problem as one line naming the file and the
line; `add` and `remove` edit the file in place (comments and order stay), under a lock of
its directory, and write through a temporary file renamed over it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsvpn.config import DEFAULT_PORT, NAT64_PREFIX, POOL_PREFIXES
from dsvpn.errors import DsvpnError
from dsvpn.keys import KEY_BYTES, generate_key_file, warn_if_exposed

log = logging.getLogger("dsvpn")

DEFAULT_POOL = "192.168.192.0/24"
MIN_PREFIX, MAX_PREFIX = POOL_PREFIXES[0], POOL_PREFIXES[-1]
MAX_FILE_BYTES = 4 << 20
POOL_WORD = "pool"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")

HEADER = """\
# dsvpn peers file: one client per line, "<name> <key file> <tunnel IPv4 address>".
# A relative key file is relative to this file's directory. The pool line gives the
# clients' address range and the server's own tunnel address. `dsvpn peer add|remove|list`
# keep this file; a server using it re-reads it on SIGHUP.
"""


class PeersError(DsvpnError):
    """A peers file that cannot be used; the message names the file (and the line)."""


# Makes the error about the line being read.
_Fail = Callable[[str], PeersError]


@dataclass(frozen=True)
class Peer:
    name: str
    key_file: str  # as written in the file
    address: str  # its tunnel IPv4 address; the IPv6 one is NAT64_PREFIX + address
    line: int
    key: bytes = field(default=b"", repr=False, compare=False)

    @property
    def address6(self) -> str:
        return NAT64_PREFIX + self.address


@dataclass(frozen=True)
class Peers:
    """A checked peers file."""

    path: str  # absolute
    pool: ipaddress.IPv4Network
    server: str  # the server's tunnel address
    peers: tuple[Peer, ...]
    lines: tuple[str, ...] = field(default=(), repr=False, compare=False)  # the text, as read

    @property
    def pool6(self) -> ipaddress.IPv6Network:
        """The pool's IPv6 twin (64:ff9b::<pool>)."""
        return pool6(self.pool)

    def get(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    def key_path(self, peer: Peer) -> str:
        return key_path(self.path, peer.key_file)

    def next_free(self) -> str | None:
        """The lowest address of the pool that no peer and not the server has."""
        taken = {p.address for p in self.peers} | {self.server}
        for host in self.pool.hosts():
            if str(host) not in taken:
                return str(host)
        return None


def pool6(pool: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    base = ipaddress.IPv6Address(NAT64_PREFIX + str(pool.network_address))
    return ipaddress.IPv6Network((base, 96 + pool.prefixlen))


def key_path(peers_path: str, key_file: str) -> str:
    return os.path.join(os.path.dirname(peers_path), key_file)


def default_server(pool: ipaddress.IPv4Network) -> str:
    """The last host address of the pool (.254 of a /24), as the reference's default."""
    return str(pool.broadcast_address - 1)


# -- telling a peers file from a key file ----------------------------------------------------


def looks_like_peers_file(path: str) -> bool:
    """Whether `path` holds a peers file rather than a key. A key is 32 raw bytes (C DSVPN
    ignores anything after them); a peers file is text with a comment or a line of several
    words. False for anything unreadable: the key loader then reports it as today."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError:
        return False
    return is_peers_text(data)


def is_peers_text(data: bytes) -> bool:
    if len(data) == KEY_BYTES:
        return False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if any(c < " " and c not in "\t\r\n" for c in text):
        return False
    return any(ln.lstrip().startswith("#") or len(ln.split()) >= 2 for ln in text.splitlines())


# -- reading ----------------------------------------------------------------------------------


def _read_capped(path: str, limit: int, what: str, fail: _Fail) -> tuple[bytes, os.stat_result]:
    """At most limit bytes of the file ``what`` (peers file, key file) and its status; a
    missing or unreadable file is one line through fail."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(limit), st
    except FileNotFoundError:
        raise fail(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise fail(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise fail(f"cannot read {what} {path}: {exc.strerror}") from None


def _read(path: str) -> tuple[str, os.stat_result]:
    data, st = _read_capped(path, MAX_FILE_BYTES + 1, "peers file", PeersError)
    if len(data) > MAX_FILE_BYTES:
        raise PeersError(f"peers file {path} is larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PeersError(f"peers file {path} is not UTF-8 text") from None
    return text, st


def _check_mode(path: str, st: os.stat_result) -> None:
    # Whoever can write the file can let any key in: refuse what others could have written.
    if st.st_mode & 0o022:
        raise PeersError(
            f"peers file {path} is writable by group or others; run: chmod go-w {path}"
        )
    if st.st_uid not in (0, os.geteuid()):
        raise PeersError(f"peers file {path} belongs to uid {st.st_uid}, not to this user or root")


def load(path: str | os.PathLike[str], *, keys: bool = True) -> Peers:
    """The peers file at `path`, checked line by line (PeersError naming the file and line of
    the first problem). With `keys`, every key file is read and checked too."""
    path = os.path.abspath(path)
    text, st = _read(path)
    _check_mode(path, st)
    return parse(text, path, keys=keys)


def parse(text: str, path: str, *, keys: bool = True) -> Peers:
    """The checked content of a peers file whose text is `text` (`path`: for messages and for
    the key files, which are relative to its directory)."""
    pool = ipaddress.IPv4Network(DEFAULT_POOL)
    server: str | None = None
    pool_line: int | None = None
    peers: list[Peer] = []
    names: dict[str, int] = {}
    addresses: dict[str, int] = {}
    key_owner: dict[bytes, Peer] = {}
    lines = text.splitlines()
    for n, raw in enumerate(lines, 1):

        def fail(what: str, n: int = n) -> PeersError:
            return PeersError(f"{path}:{n}: {what}")

        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == POOL_WORD:
            if pool_line is not None:
                raise fail(f"a second pool line (the first is line {pool_line})")
            if peers:
                raise fail("the pool line must come before the peers")
            pool, server = _pool(words[1:], fail)
            pool_line = n
            continue
        if len(words) != 3:
            raise fail(
                f"expected <name> <key file> <IPv4 address>, found {len(words)} word(s)"
                if len(words) < 3
                else "too many words: expected <name> <key file> <IPv4 address> "
                "(key file names cannot contain spaces)"
            )
        name, key_file, address = words
        if not _NAME.fullmatch(name) or name == POOL_WORD:
            raise fail(
                f"invalid peer name {name!r}: 1 to 32 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        if name in names:
            raise fail(f"duplicate peer name {name} (also on line {names[name]})")
        address = _address(address, fail)
        if server is None:
            server = default_server(pool)
        _check_in_pool(address, pool, server, fail)
        if address in addresses:
            raise fail(f"duplicate address {address} (also on line {addresses[address]})")
        peer = Peer(name, key_file, address, n)
        if keys:
            key = _load_key(key_path(path, key_file), fail)
            if key in key_owner:
                other = key_owner[key]
                raise fail(
                    f"{key_file} holds the same key as peer {other.name} (line {other.line}): "
                    "the server could not tell them apart"
                )
            peer = Peer(name, key_file, address, n, key)
            key_owner[key] = peer
        names[name] = n
        addresses[address] = n
        peers.append(peer)
    return Peers(path, pool, server or default_server(pool), tuple(peers), tuple(lines))


def _pool(words: list[str], fail: _Fail) -> tuple[ipaddress.IPv4Network, str]:
    if not 1 <= len(words) <= 2:
        raise fail("expected: pool <network>/<prefix> [<server tunnel address>]")
    try:
        pool = ipaddress.IPv4Network(words[0])
    except ValueError as exc:
        raise fail(f"invalid pool {words[0]!r}: {exc}") from None
    if "/" not in words[0] or not MIN_PREFIX <= pool.prefixlen <= MAX_PREFIX:
        raise fail(
            f"invalid pool {words[0]!r}: give a network with a prefix length from "
            f"{MIN_PREFIX} to {MAX_PREFIX}, such as {DEFAULT_POOL}"
        )
    server = default_server(pool)
    if len(words) == 2:
        server = _address(words[1], fail)
        if not _is_host(ipaddress.IPv4Address(server), pool):
            raise fail(f"the server address {server} is not a host address of the pool {pool}")
    return pool, server


def _is_host(address: ipaddress.IPv4Address, pool: ipaddress.IPv4Network) -> bool:
    return address in pool and address not in (pool.network_address, pool.broadcast_address)


def _address(word: str, fail: _Fail) -> str:
    try:
        return str(ipaddress.IPv4Address(word))
    except ValueError:
        raise fail(f"invalid address {word!r}: expected an IPv4 address") from None


def _check_in_pool(address: str, pool: ipaddress.IPv4Network, server: str, fail: _Fail) -> None:
    if not _is_host(ipaddress.IPv4Address(address), pool):
        raise fail(f"address {address} is not a host address of the pool {pool}")
    if address == server:
        raise fail(f"address {address} is the server's own tunnel address")


def _load_key(path: str, fail: _Fail) -> bytes:
    data, st = _read_capped(path, KEY_BYTES + 1, "key file", fail)
    if len(data) != KEY_BYTES:
        raise fail(
            f"key file {path} is not a key: a key file is exactly {KEY_BYTES} raw bytes "
            f"(dsvpn keygen writes one)"
        )
    warn_if_exposed(path, st)
    return data


# -- editing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold a lock on the directory of `path`, so that two edits never interleave."""
    directory = os.path.dirname(path)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PeersError(f"cannot use directory {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: str, text: str, mode: int) -> None:
    """Replace `path` with `text` atomically (same directory, renamed over it)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PeersError(f"cannot write peers file {path}: {exc.strerror}") from None


def _text(lines: tuple[str, ...] | list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def add(path: str | os.PathLike[str], name: str, address: str | None = None) -> tuple[Peers, Peer]:
    """Add peer `name` to the peers file (created if missing) with a new key file
    `<name>.key` beside it (mode 0600, never overwritten) and `address`, or the lowest free
    address of the pool. Returns the file as it now is and the new peer."""
    path = os.path.abspath(path)
    with _locked(path):
        created = not os.path.lexists(path)
        if created:
            pool = ipaddress.IPv4Network(DEFAULT_POOL)
            current = parse(f"{HEADER}{POOL_WORD} {pool} {default_server(pool)}\n", path)
            mode = 0o600
        else:
            current = load(path)
            mode = stat.S_IMODE(os.stat(path).st_mode)

        def fail(what: str) -> PeersError:
            return PeersError(f"{path}: {what}")

        if not _NAME.fullmatch(name) or name == POOL_WORD:
            raise PeersError(
                f"invalid peer name {name!r}: 1 to 32 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        existing = current.get(name)
        if existing is not None:
            raise PeersError(f"{path}: peer {name} already exists (line {existing.line})")
        if address is None:
            address = current.next_free()
            if address is None:
                raise PeersError(f"{path}: no free address left in the pool {current.pool}")
        else:
            address = _address(address, fail)
            _check_in_pool(address, current.pool, current.server, fail)
            owner = next((p for p in current.peers if p.address == address), None)
            if owner is not None:
                raise PeersError(f"{path}: address {address} belongs to peer {owner.name}")
        key_file = f"{name}.key"
        key_abs = key_path(path, key_file)
        generate_key_file(key_abs)
        try:
            lines = list(current.lines)
            lines.append(f"{name} {key_file} {address}")
            text = _text(lines)
            new = parse(text, path)  # the key is read back: the file works as written
            _write(path, text, mode)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(key_abs)
            raise
    peer = new.get(name)
    assert peer is not None
    return new, peer


def remove(path: str | os.PathLike[str], name: str) -> tuple[Peer, str | None]:
    """Remove peer `name` from the peers file. Its key file goes too when it is the one `add`
    made (`<name>.key` beside the file). Returns the peer and the key file removed, if any."""
    path = os.path.abspath(path)
    with _locked(path):
        current = load(path, keys=False)
        peer = current.get(name)
        if peer is None:
            raise PeersError(f"{path}: no peer named {name}")
        lines = [ln for i, ln in enumerate(current.lines, 1) if i != peer.line]
        _write(path, _text(lines), stat.S_IMODE(os.stat(path).st_mode))
        removed = None
        if peer.key_file == f"{name}.key":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(current.key_path(peer))
                removed = current.key_path(peer)
    return peer, removed


def client_command(peers: Peers, peer: Peer, port: int = DEFAULT_PORT) -> str:
    """The command that starts this peer's client (ours and C DSVPN's alike)."""
    return (
        f"dsvpn client {Path(peer.key_file).name} <server> {port} auto "
        f"{peer.address} {peers.server}"
    )
