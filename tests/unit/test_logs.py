"""Log lines: where timestamps go, and the words for what the loop reports."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsvpn import logs

ENDED: dict[str, Any] = {
    "endpoint": "198.51.100.2:53422",
    "since": 1000,
    "latest_handshake": 1000,
    "ended": 1000 + 192,
    "reason": "connection closed by peer",
    "rx_bytes": 1_269_000,
    "tx_bytes": 350_000,
    "rx_packets": 10,
    "tx_packets": 20,
    "drops": {"bad_tag": 0, "congestion": 0},
}


@pytest.fixture
def restore_logger() -> Iterator[None]:
    log = logging.getLogger("dsvpn")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


# -- where timestamps go -----------------------------------------------------------------------


def journal_env(f: io.TextIOWrapper) -> dict[str, str]:
    st = os.fstat(f.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_is_recognised_by_its_inode(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        assert logs.on_journal(a, journal_env(a))
        # inherited by a child whose stderr goes elsewhere: not the journal
        assert not logs.on_journal(b, journal_env(a))
        assert not logs.on_journal(a, {})
        assert not logs.on_journal(a, {"JOURNAL_STREAM": "garbage"})


def format_line(stream: Any, environ: dict[str, str], level: int = logging.INFO) -> str:
    record = logging.LogRecord("dsvpn", level, __file__, 1, "session up", None, None)
    return logs.formatter_for(stream, environ).format(record)


def test_timestamps_only_off_the_terminal_and_the_journal(tmp_path: Path) -> None:
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d session up"
    with open(tmp_path / "log", "w") as f:
        assert re.fullmatch(stamp, format_line(f, {}))
        assert format_line(f, journal_env(f)) == "<6>session up"
        assert format_line(f, journal_env(f), logging.WARNING) == "<4>session up"
    primary, secondary = pty.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            assert format_line(tty, {}) == "session up"
    finally:
        os.close(primary)
        os.close(secondary)
    assert re.fullmatch(stamp, format_line(io.StringIO(), {}))  # no descriptor: a pipe-alike


def test_setup_levels(tmp_path: Path, restore_logger: None) -> None:
    with open(tmp_path / "log", "w") as f:
        logs.setup(-1, f, {})
        log = logging.getLogger("dsvpn")
        assert log.level == logging.WARNING and not log.propagate and len(log.handlers) == 1
        logs.setup(1, f, {})
        assert log.level == logging.DEBUG
        log.info("hello")
    assert re.fullmatch(r"\d{4}-\S+ \S+ hello\n", (tmp_path / "log").read_text())


# -- the words ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "mode", "text"),
    [
        ("connection closed by peer", "client", "the server closed the connection"),
        ("connection closed by peer", "server", "the client closed the connection"),
        ("read error: Connection reset by peer", "client", "the server reset the connection"),
        ("write error: Broken pipe", "server", "the client reset the connection"),
        ("read error: Connection timed out", "client", "timed out: no answer from the server"),
        ("send timeout", "server", "timed out after 60 s: the client stopped reading"),
        ("corrupted stream", "client", "a frame failed authentication (corrupted stream)"),
        (
            "replaced by a new session from the same address",
            "server",
            "replaced by a reconnect from the same address",
        ),
        ("replaced by a new connection", "client", "replaced by a new connection"),
        ("loop closed", "server", "stopped"),
        ("read error: No route to host", "client", "read error: No route to host"),
    ],
)
def test_down_reasons(reason: str, mode: str, text: str) -> None:
    assert logs.down_reason(reason, mode).startswith(text)


def test_session_lines() -> None:
    assert logs.session_up("server", "198.51.100.2:53422") == (
        "session up: client 198.51.100.2 port 53422"
    )
    assert logs.session_up("client", "203.0.113.7:443", "vpn.example.com") == (
        "session up: connected to vpn.example.com (203.0.113.7) port 443"
    )
    assert logs.session_up("client", "[2001:db8::7]:443") == (
        "session up: connected to 2001:db8::7 port 443"
    )
    assert logs.session_up("server", "198.51.100.2:53422", forward_secret=True) == (
        "session up: client 198.51.100.2 port 53422 (forward secret)"
    )
    assert logs.session_down(ENDED, "server") == (
        "session down: client 198.51.100.2 port 53422: the client closed the connection "
        "(up 3 minutes, 12 seconds, received 1.21 MiB, sent 341.80 KiB)"
    )
    assert logs.session_down(ENDED, "client").startswith(
        "session down: the server closed the connection (up 3 minutes"
    )


def test_handshake_failures_blame_the_key_only_when_proven() -> None:
    eof = (
        "the server closed the connection during the handshake: wrong key, or the server is "
        "busy with another client"
    )
    said = logs.handshake_failed(eof)
    assert said == (
        "the server closed the connection during the handshake "
        "(wrong key, server busy, or server restarting)"
    )
    assert logs.handshake_failed("the server's reply failed authentication: wrong key?") == (
        "wrong key: the server's reply failed authentication"
    )
    assert "wrong key" not in logs.handshake_failed("handshake timed out")
    assert "within 60 s" in logs.handshake_failed("handshake timed out")
    assert logs.handshake_failed("read error: Connection refused") == (
        "handshake failed: read error: Connection refused"
    )


def test_retry() -> None:
    assert logs.retry(4, 100, 3) == "reconnecting in 3 s (attempt 4 of 100)"
    assert logs.retry(1, 100, 0) == "reconnecting (attempt 1 of 100)"


# -- -v counters -------------------------------------------------------------------------------


def session(rx: int, tx: int, congestion: int = 0, link_local: int = 0) -> dict[str, Any]:
    return {
        "endpoint": "198.51.100.2:53422",
        "since": 1000,
        "rx_bytes": rx,
        "tx_bytes": tx,
        "rx_packets": rx // 100,
        "tx_packets": tx // 100,
        "drops": {"bad_tag": 0, "congestion": congestion, "link_local": link_local},
    }


def test_stats_only_when_something_moved(restore_logger: None) -> None:
    stats = logs.SessionStats(every=10)
    assert stats.lines([session(2048, 100)]) == [
        "198.51.100.2 port 53422: received 2.00 KiB (+2.00 KiB), sent 100 B (+100 B)"
    ]
    assert stats.lines([session(2048, 100)]) == []  # nothing moved
    assert stats.lines([session(2048, 100, congestion=3)]) == [
        "198.51.100.2 port 53422: received 2.00 KiB (+0 B), sent 100 B (+0 B); drops: congestion 3"
    ]
    assert stats.lines([session(2048, 100, congestion=3, link_local=2)]) == [
        "198.51.100.2 port 53422: received 2.00 KiB (+0 B), sent 100 B (+0 B); "
        "drops: congestion 3, link-local 2"
    ]
    assert stats.lines([]) == []


def test_stats_are_due_every_period_with_verbose(restore_logger: None) -> None:
    log = logging.getLogger("dsvpn")
    stats = logs.SessionStats(every=10)
    log.setLevel(logging.INFO)
    assert not stats.due(now=1e12)  # not verbose: never
    log.setLevel(logging.DEBUG)
    t = stats._next
    assert not stats.due(now=t - 1)
    assert stats.due(now=t)
    assert not stats.due(now=t + 9)
    assert stats.due(now=t + 10)
