"""Log lines that say what happened: where they go and how they look, and the words for each
thing the loop reports (a session up or down and why, a failed handshake, a reconnect, the
counters of -v).

Lines carry a timestamp only where nothing else adds one: not on a terminal (a person is
watching) and not on systemd's journal (JOURNAL_STREAM names stderr), where a syslog level
prefix lets journald record each line's priority instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from dsvpn import human

log = logging.getLogger("dsvpn")

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
STATS_EVERY = 10.0  # seconds between the -v lines of a session
DROP_NAMES = {
    "bad_tag": "bad tag",
    "oversize": "oversized",
    "no_session": "no session",
    "spoofed": "spoofed source",
    "congestion": "congestion",
    "non_ip": "not IP",
    "link_local": "link-local",
}

# sd-daemon(3) prefixes: journald takes them as the line's priority.
_JOURNAL_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


# -- where lines go ----------------------------------------------------------------------------


def on_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True if `stream` is connected to systemd's journal: JOURNAL_STREAM ("dev:inode") names
    the very file it writes to (a child whose stderr was redirected inherits the variable,
    so the variable alone is not enough)."""
    environ = os.environ if environ is None else environ
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = _JOURNAL_PRIORITY.get(record.levelno, 6)
        return f"<{level}>{super().format(record)}"


def formatter_for(stream: TextIO, environ: Mapping[str, str] | None = None) -> logging.Formatter:
    """Plain lines on a terminal, priority-prefixed lines on the journal, timestamped lines
    anywhere else (a file, a pipe, another supervisor)."""
    if on_journal(stream, environ):
        return _JournalFormatter("%(message)s")
    if _is_tty(stream):
        return logging.Formatter("%(message)s")
    return logging.Formatter("%(asctime)s %(message)s", TIME_FORMAT)


def setup(
    verbosity: int, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """The "dsvpn" logger: -1 warnings and errors, 0 also what happens, 1 also counters."""
    stream = sys.stderr if stream is None else stream
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(stream, environ))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


# -- the words ---------------------------------------------------------------------------------


def endpoint_text(endpoint: str) -> str:
    """ "203.0.113.7:443" and "[2001:db8::7]:443" -> "203.0.113.7 port 443", "2001:db8::7 port
    443"."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        return endpoint
    return f"{host.removeprefix('[').removesuffix(']')} port {port}"


def _timeout_s() -> int:
    """The loop's session and handshake deadline, in seconds."""
    from dsvpn._loop import Timeout  # compiled: imported when a session has ended

    return int(Timeout.TIMEOUT_MS) // 1000


def _other(mode: str) -> str:
    return "the client" if mode == "server" else "the server"


def down_reason(reason: str, mode: str) -> str:
    """Why a session ended, in words (reason: EndedSession.reason of the loop)."""
    peer = _other(mode)
    error = reason.partition(": ")[2] if reason.startswith(("read error:", "write error:")) else ""
    if reason == "connection closed by peer":
        return f"{peer} closed the connection"
    if error in ("Connection reset by peer", "Broken pipe"):
        return f"{peer} reset the connection"
    if error == "Connection timed out":
        return f"timed out: no answer from {peer} for {_timeout_s()} s"
    if reason == "send timeout":
        return f"timed out after {_timeout_s()} s: {peer} stopped reading"
    if reason == "corrupted stream":
        return "a frame failed authentication (corrupted stream)"
    if reason == "replaced by a new session from the same address":
        return "replaced by a reconnect from the same address"
    if reason == "loop closed":
        return "stopped"
    return reason


def session_up(
    mode: str, endpoint: str, name: str | None = None, forward_secret: bool = False
) -> str:
    """The line for a session that came up; `name`: the peer's name where one is known."""
    where = endpoint_text(endpoint)
    note = " (forward secret)" if forward_secret else ""
    if mode == "server":
        return f"session up: client {where}{note}"
    if name:
        host, _, port = where.partition(" port ")
        return f"session up: connected to {name} ({host}) port {port}{note}"
    return f"session up: connected to {where}{note}"


def session_down(ended: Mapping[str, Any], mode: str) -> str:
    """The line for a session that ended (ended: Loop.ended_session()): who, why, how long,
    how much."""
    why = down_reason(str(ended.get("reason", "")), mode)
    lasted = human.duration(int(ended.get("ended", 0)) - int(ended.get("since", 0)))
    moved = (
        f"up {lasted}, received {human.size(int(ended.get('rx_bytes', 0)))}, "
        f"sent {human.size(int(ended.get('tx_bytes', 0)))}"
    )
    if mode == "server":
        return f"session down: client {endpoint_text(str(ended.get('endpoint')))}: {why} ({moved})"
    return f"session down: {why} ({moved})"


class SessionLog:
    """The up and down lines of one instance's sessions. A session replaced by another has
    no event of its own: whoever sees a new ended session first tells it, once."""

    def __init__(self, mode: str, peer_name: str | None = None) -> None:
        self.mode = mode
        self.peer_name = peer_name  # the client's name for its server, where it has one
        self._told: tuple[str, int, int] | None = None

    def up(self, session: Mapping[str, Any] | None, peer_ip: str) -> str:
        """session: Loop.session() (None if it went down again at once: then the peer's IP
        from the event)."""
        endpoint = str(session["endpoint"]) if session else peer_ip
        forward_secret = bool(session.get("pfs")) if session else False
        return session_up(self.mode, endpoint, self.peer_name, forward_secret)

    def ended(self, ended: Mapping[str, Any] | None) -> str | None:
        """The line for Loop.ended_session(), or None if that one was told already."""
        if ended is None:
            return None
        key = (str(ended.get("endpoint")), int(ended.get("since", 0)), int(ended.get("ended", 0)))
        if key == self._told:
            return None
        self._told = key
        return session_down(ended, self.mode)


CLIENT_EOF_PREFIX = "the server closed the connection during the handshake"


def handshake_failed(message: str) -> str:
    """A client's failed handshake (EV_HANDSHAKE_FAILED), said without blaming the key unless
    the key is provably wrong. A server closes (or resets) the connection during the
    handshake for a wrong key, for another client's session, and while it restarts: the
    client cannot tell which."""
    if message.startswith(CLIENT_EOF_PREFIX):
        return f"{CLIENT_EOF_PREFIX} (wrong key, server busy, or server restarting)"
    if message.startswith("the server's reply failed authentication"):
        # The server answered, with a proof of another key.
        return "wrong key: the server's reply failed authentication"
    if message == "handshake timed out":
        return f"the server did not complete the handshake within {_timeout_s()} s"
    return f"handshake failed: {message}"


def retry(attempt: int, of: int, delay: float) -> str:
    """ "reconnecting in 3 s (attempt 4 of 100)"; attempt: the one about to be made."""
    when = f" in {delay:g} s" if delay > 0 else ""
    return f"reconnecting{when} (attempt {attempt} of {of})"


# -- -v counters -------------------------------------------------------------------------------


class SessionStats:
    """With -v: every STATS_EVERY seconds, one line per session whose counters moved."""

    def __init__(self, every: float = STATS_EVERY) -> None:
        self.every = every
        self._next = time.monotonic() + every
        self._last: dict[tuple[str, int], tuple[int, ...]] = {}

    def due(self, now: float | None = None) -> bool:
        if not log.isEnabledFor(logging.DEBUG):
            return False
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.every
        return True

    def lines(self, sessions: Sequence[Mapping[str, Any]]) -> list[str]:
        """The lines for these sessions (Loop.session() records), only those that moved."""
        out = []
        seen: dict[tuple[str, int], tuple[int, ...]] = {}
        for s in sessions:
            key = (str(s.get("endpoint")), int(s.get("since", 0)))
            drops: Mapping[str, int] = s.get("drops") or {}
            now = (
                int(s.get("rx_bytes", 0)),
                int(s.get("tx_bytes", 0)),
                int(s.get("rx_packets", 0)),
                int(s.get("tx_packets", 0)),
                *(int(v) for _, v in sorted(drops.items())),
            )
            seen[key] = now
            before = self._last.get(key)
            if before == now:
                continue
            rx0, tx0 = (before[0], before[1]) if before else (0, 0)
            who = endpoint_text(key[0])
            if s.get("peer"):
                who = f"peer {s['peer']} ({who})"
            line = (
                f"{who}: received {human.size(now[0])} "
                f"(+{human.size(now[0] - rx0)}), sent {human.size(now[1])} "
                f"(+{human.size(now[1] - tx0)})"
            )
            dropped = [(k, v) for k, v in sorted(drops.items()) if v]
            if dropped:
                line += "; drops: " + ", ".join(
                    f"{DROP_NAMES.get(k, k)} {human.count(v)}" for k, v in dropped
                )
            out.append(line)
        self._last = seen
        return out
