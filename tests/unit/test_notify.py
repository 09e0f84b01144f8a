"""sd_notify: datagrams to a real unix socket, by path and by abstract name."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsvpn.notify import Notifier


class Manager:
    """Stands in for the service manager: the receiving end of $NOTIFY_SOCKET."""

    def __init__(self, address: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2)
        self.env_value = env_value

    def receive(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2)
        return False


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Manager]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        m = Manager(path, path)
    else:
        if not sys.platform.startswith("linux"):
            pytest.skip("abstract unix socket names are Linux only")
        name = f"dsvpn-test-{os.getpid()}-{secrets.token_hex(4)}"
        m = Manager("\0" + name, "@" + name)
    yield m
    m.sock.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_status_stopping(manager: Manager) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": manager.env_value})
    assert n.enabled and not n.is_ready
    assert n.ready("listening on *:443")
    assert manager.receive() == ["READY=1", "STATUS=listening on *:443"]
    assert n.is_ready
    # The same status again sends nothing; a new one is one STATUS= datagram.
    assert not n.status("listening on *:443")
    assert manager.nothing_pending()
    assert n.status("listening on *:443, 1 client")
    assert manager.receive() == ["STATUS=listening on *:443, 1 client"]
    # READY=1 goes once: a later ready() only carries a changed status.
    assert n.ready("listening on *:443, 2 clients")
    assert manager.receive() == ["STATUS=listening on *:443, 2 clients"]
    assert not n.ready()
    assert n.stopping("stopping")
    assert manager.receive() == ["STOPPING=1", "STATUS=stopping"]
    n.close()


def test_status_is_one_line(manager: Manager) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": manager.env_value})
    n.status("two\nlines")
    assert manager.receive() == ["STATUS=two lines"]


def test_watchdog_at_half_the_interval(manager: Manager) -> None:
    clock = Clock()
    env = {
        "NOTIFY_SOCKET": manager.env_value,
        "WATCHDOG_USEC": "10000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    n = Notifier.from_env(env, clock=clock)
    assert n.watchdog_interval == 10.0
    assert n.due()  # nothing sent yet
    assert n.tick()
    assert manager.receive() == ["WATCHDOG=1"]
    clock.now += 4.9
    assert not n.due() and not n.tick()
    assert manager.nothing_pending()
    clock.now += 0.1  # 5 s: half of 10 s
    assert n.due() and n.tick()
    assert manager.receive() == ["WATCHDOG=1"]
    assert not n.due()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3.0),  # no WATCHDOG_PID: ours
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # another process's
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent/notify", **env})
    assert n.watchdog_interval == interval
    assert n.due() is (interval is not None)


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_disabled_without_a_usable_socket(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    n = Notifier.from_env({**env, "WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert not n.ready("x") and not n.status("y") and not n.stopping() and not n.watchdog()
    assert not n.due() and not n.tick()


def test_unset_removes_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "OTHER": "kept"}
    Notifier.from_env(env, unset=True)
    assert env == {"OTHER": "kept"}
    env = {"NOTIFY_SOCKET": "/x"}
    Notifier.from_env(env)
    assert env == {"NOTIFY_SOCKET": "/x"}


def test_failure_never_raises_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="dsvpn.notify"):
        assert not n.ready("a")
        assert not n.status("b")
        assert not n.stopping()
    assert not n.is_ready
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "cannot notify the service manager" in lines[0]
    assert str(tmp_path / "nobody-listens") in lines[0]


def test_recovers_when_the_socket_appears(tmp_path: Path) -> None:
    path = tmp_path / "late"
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert not n.status("early")
    m = Manager(str(path), str(path))
    try:
        assert n.status("early")  # not marked as sent before: sent now
        assert m.receive() == ["STATUS=early"]
    finally:
        m.sock.close()
