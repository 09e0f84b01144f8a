"""`dsvpn status`: every running instance answers for itself, over a unix socket of its own
beside its record (``<run dir>/<pid>.sock``, mode 0600), from its event loop.

The protocol: the client connects, sends one line (``status``), and reads one JSON document
until the server closes. The server side never blocks the data plane: its sockets are all
non-blocking and watched by one selector (epoll, kqueue) whose descriptor is the loop's
control_fd, so a request that arrives in pieces is finished on later turns of the loop; a
request or answer that takes longer than CLIENT_TIMEOUT is dropped, and sizes are bounded.

The client side trusts a socket only as far as only dsvpn could have made it: a socket owned
by the effective user that nobody else may use, in a directory nobody else may write to, and
(Linux) served by the process the record names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsvpn import human, instances, platform
from dsvpn.errors import DsvpnError
from dsvpn.logs import DROP_NAMES

log = logging.getLogger("dsvpn")

PROTOCOL = 1
REQUEST = b"status\n"
MAX_REQUEST = 256  # bytes of a request line
MAX_ANSWER = 1 << 20  # bytes of an answer
MAX_CLIENTS = 8  # connections served at once; the oldest is dropped for a new one
CLIENT_TIMEOUT = 2.0  # seconds a connection may take, server side
QUERY_TIMEOUT = 2.0  # seconds the client waits for an answer
FALLBACK_WAIT = 0.05  # seconds handle() may wait where the selector cannot be polled
LISTEN_BACKLOG = 8

CLEANUP_HINT = "run `dsvpn cleanup` as root to remove them"
KEPT_HINT = "run `dsvpn cleanup --all` as root to remove it"


class StatusError(DsvpnError):
    """An instance's status socket cannot be used; str() says why."""


class NoSocket(StatusError):
    """A live instance without a status socket: starting (it answers once its loop runs) or
    stopping (the socket goes first)."""


def socket_path(run_dir: str | os.PathLike[str], pid: int) -> Path:
    """Where instance `pid` answers: beside its record, removed with it."""
    return Path(run_dir) / instances.socket_name(pid)


# -- what a running instance says about itself -------------------------------------------------


class LoopView(Protocol):
    """What the answer reads from the compiled loop (dsvpn._loop.Loop; a server of a peers
    file's dsvpn._multi.MultiLoop has sessions() instead of session())."""

    def stats(self) -> dict[str, int]: ...


def sessions_of(loop: Any) -> list[dict[str, Any]]:
    """The loop's live sessions as `dsvpn status` shows them: a server of a peers file's one
    per peer, each with its "peer" name; the one session of the others, if it is up."""
    if loop is None:
        return []
    if hasattr(loop, "sessions"):
        return [{"peer": name, **s} for name, s in sorted(loop.sessions().items())]
    session = loop.session()
    return [dict(session)] if session else []


@dataclass
class Live:
    """A running instance's own state, kept up to date by the tunnel: what `dsvpn status`
    shows of it and what systemd's STATUS= says."""

    mode: str
    tun: str
    mtu: int
    name: str | None = None
    pid: int = field(default_factory=os.getpid)
    started: int = field(default_factory=lambda: int(time.time()))
    netns: str | None = None
    listen: str | None = None  # server: "*:443", "192.0.2.1:443", "[2001:db8::1]:443"
    server: str | None = None  # client: the server's "ip:port"
    server_name: str | None = None  # client: the server's name, when one was given
    max_attempts: int = 0  # client: attempts before giving up
    state: str = "starting"  # listening | connecting | connected | reconnecting
    attempt: int = 0  # client: the current connection attempt (1 = the first)
    reconnects: int = 0  # client: sessions that came up after the first one
    sessions_up: int = 0  # sessions that came up since the start

    def session_up(self) -> None:
        if self.mode == "client":
            if self.sessions_up:
                self.reconnects += 1
            self.state = "connected"
            self.attempt = 0
        self.sessions_up += 1

    def summary(self, sessions: int) -> str:
        """One line for systemd's STATUS=: "listening on *:443, 1 client", "connected to
        203.0.113.7:443", "reconnecting, attempt 3 of 100"."""
        if self.mode == "server":
            clients = "no client" if not sessions else human.plural(sessions, "client", "clients")
            return f"listening on {self.listen}, {clients}"
        if self.state == "connected":
            return f"connected to {self.server}"
        if self.state == "reconnecting":
            return f"reconnecting, attempt {self.attempt} of {self.max_attempts}"
        return f"connecting to {self.server}"

    def answer(self, loop: LoopView | None) -> dict[str, Any]:
        """The JSON document `dsvpn status` receives."""
        sessions = sessions_of(loop)
        out: dict[str, Any] = {
            "protocol": PROTOCOL,
            "name": self.name,
            "pid": self.pid,
            "mode": self.mode,
            "netns": self.netns,
            "started": self.started,
            "tun": self.tun,
            "mtu": self.mtu,
            "listen": self.listen,
            "server": self.server,
            "server_name": self.server_name,
            "state": self.state,
            "summary": self.summary(len(sessions)),
            "sessions": sessions,
            "stats": loop.stats() if loop is not None else {},
        }
        if self.mode == "client":
            out["attempt"] = self.attempt
            out["max_attempts"] = self.max_attempts
            out["reconnects"] = self.reconnects
        return out


# -- server side -------------------------------------------------------------------------------


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None


class StatusServer:
    """The listening socket of one instance. Give `fileno()` to the loop as control_fd, call
    `handle()` on each EV_CONTROL and `expire()` from the periodic tick; `close()` removes the
    socket file."""

    def __init__(
        self, path: Path, answer: Callable[[], Mapping[str, Any]], *, pollable: bool = True
    ) -> None:
        self.path = path
        self._answer = answer
        self._sel = selectors.DefaultSelector()
        # epoll and kqueue descriptors can themselves be polled: the loop then wakes for
        # every socket here. Elsewhere the loop watches the listener only and handle() waits
        # a moment for the request (root only can connect, so nobody else can stall us).
        self._sel_fileno: Callable[[], int] | None = getattr(self._sel, "fileno", None)
        self.pollable = pollable and self._sel_fileno is not None
        self._conns: dict[int, _Conn] = {}
        try:
            self._listener = _bind(path)
        except BaseException:
            self._sel.close()
            raise
        self._sel.register(self._listener, selectors.EVENT_READ)

    def fileno(self) -> int:
        if self.pollable and self._sel_fileno is not None:
            return self._sel_fileno()
        return self._listener.fileno()

    def __enter__(self) -> StatusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self) -> None:
        """Serve what is ready (EV_CONTROL). Never waits with a pollable selector."""
        deadline = None if self.pollable else time.monotonic() + FALLBACK_WAIT
        while True:
            timeout = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
            for key, events in self._sel.select(timeout):
                if key.fileobj is self._listener:
                    self._accept()
                else:
                    self._serve(key.data, events)
            if deadline is None or not self._conns or time.monotonic() >= deadline:
                break
        self.expire()

    def expire(self) -> None:
        """Drop connections that took too long (a client that connected and went quiet)."""
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._drop(conn)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)
        self._listener.close()
        self._sel.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED, EMFILE: nothing to serve now
            sock.setblocking(False)
            if len(self._conns) >= MAX_CLIENTS:
                self._drop(min(self._conns.values(), key=lambda c: c.deadline))
            conn = _Conn(sock, time.monotonic() + CLIENT_TIMEOUT)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _serve(self, conn: _Conn, events: int) -> None:
        if conn.out is None and events & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(MAX_REQUEST + 1 - len(conn.request))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            conn.request += data
            if not data and not conn.request:
                self._drop(conn)  # connected and left without asking
                return
            if data and b"\n" not in conn.request and len(conn.request) <= MAX_REQUEST:
                return  # more to come
            self._respond(conn)
        if conn.out is not None and events & selectors.EVENT_WRITE:
            self._send(conn)

    def _respond(self, conn: _Conn) -> None:
        doc: Mapping[str, Any]
        line, newline, _ = bytes(conn.request).partition(b"\n")
        if not newline and len(line) > MAX_REQUEST:
            doc = {"protocol": PROTOCOL, "error": "request too long"}
            # What is left unread would make the close a reset that loses the answer.
            with contextlib.suppress(OSError):
                conn.sock.recv(MAX_ANSWER)
        elif line.strip() == REQUEST.strip():
            try:
                doc = self._answer()
            except Exception as exc:  # a bug here must not take the tunnel down
                log.warning("status: cannot build the answer: %r", exc)
                doc = {"protocol": PROTOCOL, "error": "internal error"}
        else:
            doc = {"protocol": PROTOCOL, "error": "unknown request"}
        data = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
        if len(data) > MAX_ANSWER:
            data = b'{"protocol":1,"error":"answer too large"}\n'
        conn.out = memoryview(data)
        self._send(conn)

    def _send(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            n = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[n:]
        if not conn.out:
            self._drop(conn)
        else:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()


def _bind(path: Path) -> socket.socket:
    """A listening, non-blocking unix socket at `path`, mode 0600 from its creation on."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a dead process that had our PID: the record is ours now
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- client side -------------------------------------------------------------------------------


def check_private(path: Path, kind: str) -> None:
    """`path` (not followed) is a `kind` ("directory", "socket") of the effective user that
    nobody else may use (socket) or write to (directory); StatusError otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if kind == "socket":
            raise NoSocket("not answering yet, or any more (starting or stopping)") from None
        raise StatusError(f"{path} does not exist") from None
    except OSError as exc:
        raise StatusError(f"cannot check {path}: {exc.strerror}") from None
    is_kind = stat.S_ISDIR if kind == "directory" else stat.S_ISSOCK
    if not is_kind(st.st_mode):
        raise StatusError(f"refusing {path}: not a {kind}")
    if st.st_uid != os.geteuid():
        raise StatusError(f"refusing {path}: it belongs to uid {st.st_uid}, not {os.geteuid()}")
    mask = 0o022 if kind == "directory" else 0o077
    if st.st_mode & mask:
        mode = stat.S_IMODE(st.st_mode)
        who = "write to it" if kind == "directory" else "use it"
        raise StatusError(f"refusing {path}: group or others may {who} (mode {mode:04o})")


def _peer_pid(sock: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the process serving a connected unix socket, where the OS says (Linux)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


def query(path: Path, pid: int | None = None, timeout: float = QUERY_TIMEOUT) -> dict[str, Any]:
    """Ask the instance at `path` (expected to be process `pid`) for its status."""
    check_private(path.parent, "directory")
    check_private(path, "socket")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StatusError(f"no answer within {timeout:g} s")
            return remaining

        try:
            sock.settimeout(left())
            sock.connect(os.fspath(path))
            peer = _peer_pid(sock)
            if peer is not None:
                if peer[1] != os.geteuid():
                    raise StatusError(f"refusing {path}: served by uid {peer[1]}")
                if pid is not None and peer[0] != pid:
                    raise StatusError(f"refusing {path}: served by PID {peer[0]}, not {pid}")
            sock.sendall(REQUEST)
            data = bytearray()
            while True:
                sock.settimeout(left())
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise StatusError("answer too large")
        except TimeoutError:
            raise StatusError(f"no answer within {timeout:g} s") from None
        except ConnectionRefusedError:
            raise StatusError("nobody answers on its status socket") from None
        except OSError as exc:
            raise StatusError(f"cannot ask it: {exc.strerror or exc}") from None
    try:
        doc = json.loads(data)
    except ValueError:
        raise StatusError("its answer is not JSON") from None
    if not isinstance(doc, dict) or doc.get("protocol") != PROTOCOL:
        raise StatusError("its answer is of an unknown version")
    if "error" in doc:
        raise StatusError(f"it answered: {doc['error']}")
    if pid is not None and doc.get("pid") != pid:
        raise StatusError(f"it answered for PID {doc.get('pid')!r}, not {pid}")
    return doc


# -- every instance of this namespace ----------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """What an instance's record says (the record of this namespace)."""

    pid: int
    mode: str
    tun: str | None
    port: int
    alive: bool
    applied: int = 0  # steps recorded as applied and not yet undone
    kept: int = 0  # of those, steps that outlive a crash (a client's kill switch)
    # a client whose routes, once it is dead, keep its traffic from leaving outside the
    # tunnel (Linux: table 42069 holds unreachable routes until they are undone)
    fail_closed: bool = False


Ask = Callable[[Path, int], dict[str, Any]]


def collect(known: Iterable[Known], run_dir: Path, ask: Ask | None = None) -> list[dict[str, Any]]:
    """One entry per instance: a live one's own answer, or what its record says."""
    ask = ask or (lambda path, pid: query(path, pid))
    out = []
    for k in sorted(known, key=lambda k: k.pid):
        base: dict[str, Any] = {
            "name": None,
            "pid": k.pid,
            "mode": k.mode,
            "tun": k.tun,
            "listen": None,
            "started": None,
            "sessions": [],
        }
        if not k.alive:
            base["state"] = "dead"
            base["leftovers"] = k.applied > 0
            base["kept"] = k.kept > 0
            base["fail_closed"] = k.fail_closed and k.applied > 0
            if k.kept:
                base["hint"] = KEPT_HINT
            elif k.applied:
                base["hint"] = CLEANUP_HINT
            out.append(base)
            continue
        try:
            answer = ask(socket_path(run_dir, k.pid), k.pid)
        except StatusError as exc:
            base["state"] = "unknown"
            base["error"] = str(exc)
            out.append(base)
            continue
        answer.pop("protocol", None)
        out.append({**base, **answer})
    return out


def to_json(instances: list[dict[str, Any]]) -> str:
    return json.dumps({"instances": instances}, indent=2) + "\n"


# -- the text view -----------------------------------------------------------------------------

NONE_RUNNING = "no dsvpn running in this network namespace"


def render(instances: list[dict[str, Any]], now: float | None = None) -> str:
    """The text view: one block per instance, its sessions indented below it, values aligned
    in one column per instance."""
    if not instances:
        return NONE_RUNNING + "\n"
    now = time.time() if now is None else now
    return "\n".join(_render_one(i, now) for i in instances)


def _title(inst: dict[str, Any]) -> str:
    mode = inst.get("mode") or "instance"
    if inst.get("name"):
        return f"{mode} {inst['name']} (pid {inst['pid']})"
    return f"{mode} (pid {inst['pid']})"


def _when(t: Any, now: float) -> str:
    if not isinstance(t, (int, float)) or t <= 0:
        return "never"
    return human.age(t, now)


def _traffic(nbytes: int, packets: int) -> str:
    unit = "packet" if packets == 1 else "packets"
    return f"{human.size(nbytes)} in {human.count(packets)} {unit}"


def _drops(drops: Mapping[str, int]) -> str:
    moved = [f"{DROP_NAMES.get(k, k)} {human.count(v)}" for k, v in drops.items() if v]
    return ", ".join(moved) or "none"


def _render_one(inst: dict[str, Any], now: float) -> str:
    title = _title(inst)
    state = inst.get("state")
    if state == "dead":
        if inst.get("kept"):
            what = "dead; its kill switch still blocks traffic outside the tunnel"
        elif inst.get("fail_closed"):
            what = "dead; its routes still hold back traffic outside the tunnel (fail closed)"
        elif inst.get("leftovers"):
            what = "dead; its rules are still in place"
        else:
            what = "dead"
        hint = f": {inst['hint']}" if inst.get("hint") else ""
        return f"{title}: {what}{hint}\n"
    if state == "unknown":
        return f"{title}: running; {inst.get('error')}\n"
    rows: list[tuple[int, str, str]] = []  # (indent, key, value)
    rows.append((2, "started", _when(inst.get("started"), now)))
    tun = str(inst.get("tun"))
    if inst.get("mtu"):
        tun += f" (mtu {inst['mtu']})"
    rows.append((2, "tun", tun))
    if inst.get("listen"):
        rows.append((2, "listening on", str(inst["listen"])))
    if inst.get("server"):
        server = str(inst["server"])
        if inst.get("server_name"):
            server = f"{inst['server_name']} ({server})"
        rows.append((2, "server", server))
    rows.append((2, "state", _state(inst)))
    if inst.get("mode") == "client":
        rows.append((2, "reconnects", human.count(int(inst.get("reconnects") or 0))))
    stats = inst.get("stats") or {}
    if int(stats.get("workers", 1)) > 1:
        rows.append((2, "workers", f"{stats['workers']} (threads sharing the clients)"))
    if "handshakes_ok" in stats:
        ok, failed = int(stats["handshakes_ok"]), int(stats.get("handshakes_failed", 0))
        rows.append((2, "handshakes", f"{human.count(ok)} ok, {human.count(failed)} failed"))
    blocks = [rows]
    for s in inst.get("sessions") or []:
        srows: list[tuple[int, str, str]] = [(2, "session", str(s.get("endpoint")))]
        if s.get("peer"):
            # A server of a peers file: the session of a named peer, at its tunnel address.
            srows = [(2, "peer", f"{s['peer']} ({s.get('address')})"),
                     (4, "endpoint", str(s.get("endpoint")))]  # fmt: skip
            if "worker" in s:
                srows.append((4, "worker", str(s["worker"])))
            if s.get("replacement"):
                srows.append((4, "replacement", f"{s['replacement']} (on probation)"))
        srows.append((4, "connected", _when(s.get("since"), now)))
        srows.append((4, "latest handshake", _when(s.get("latest_handshake"), now)))
        if "pfs" in s:
            srows.append((4, "forward secret", "yes" if s["pfs"] else "no"))
        srows.append((4, "received", _traffic(s.get("rx_bytes", 0), s.get("rx_packets", 0))))
        srows.append((4, "sent", _traffic(s.get("tx_bytes", 0), s.get("tx_packets", 0))))
        srows.append((4, "drops", _drops(s.get("drops") or {})))
        blocks.append(srows)
    width = max(indent + len(key) for block in blocks for indent, key, _ in block) + 2
    lines = [title]
    for n, block in enumerate(blocks):
        if n:
            lines.append("")
        for indent, key, value in block:
            lines.append(f"{' ' * indent}{key + ':':<{width - indent}}{value}")
    return "\n".join(lines) + "\n"


def _state(inst: dict[str, Any]) -> str:
    if inst.get("mode") == "server":
        n = len(inst.get("sessions") or [])
        return "listening, " + ("no client" if not n else human.plural(n, "client", "clients"))
    state = str(inst.get("state"))
    if state == "reconnecting" and inst.get("max_attempts"):
        return f"reconnecting, attempt {inst.get('attempt')} of {inst['max_attempts']}"
    return state


# -- the command -------------------------------------------------------------------------------


def known_here(run_dir: str | os.PathLike[str] | None = None) -> list[Known]:
    """What the records of this network namespace say (none if there is no run directory)."""
    directory = instances.RunDir(instances.RUN_DIR if run_dir is None else run_dir)
    if not directory.exists():
        return []
    netns = instances.current_netns()
    with directory.lock():
        records = directory.records(platform.current())
    return [
        Known(
            pid=r.pid,
            mode=r.identity.mode,
            tun=r.identity.tun,
            port=r.identity.port,
            alive=r.alive(),
            applied=len(r.applied),
            kept=sum(1 for a in r.applied if a.step.keep),
            fail_closed=r.identity.mode == "client" and sys.platform.startswith("linux"),
        )
        for r in records
        if r.identity.netns == netns
    ]


def command(as_json: bool, run_dir: str | os.PathLike[str] | None = None) -> int:
    """`dsvpn status [--json]`: every dsvpn of this network namespace, to stdout."""
    directory = Path(instances.RUN_DIR if run_dir is None else run_dir)
    found = collect(known_here(directory), directory)
    sys.stdout.write(to_json(found) if as_json else render(found))
    return 0
