"""A client that waits (for a TCP connect, a forward-secret handshake, a reconnect delay) keeps
sending WATCHDOG=1 at half the interval of $WATCHDOG_USEC, as the event loop's tick does."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsvpn import pfs, tunnel
from dsvpn.config import ClientConfig
from dsvpn.notify import Notifier

# 0.2 s: WATCHDOG=1 is due every 0.1 s, so a wait of ~1 s must send about ten.
WATCHDOG_USEC = 200_000
WAIT = 1.0


class Manager:
    """The service manager's end of $NOTIFY_SOCKET: notes when each datagram arrives."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.path = path
        self.arrivals: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.arrivals.append((time.monotonic(), data))

    def watchdogs(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return [t for t, data in self.arrivals if "WATCHDOG=1" in data.split("\n")]

    def notifier(self) -> Notifier:
        env = {
            "NOTIFY_SOCKET": str(self.path),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": str(os.getpid()),
        }
        return Notifier.from_env(env)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify")
    yield m
    m._stop.set()
    m.sock.close()


def assert_ticked(stamps: list[float], started: float, ended: float) -> None:
    """WATCHDOG=1 through the whole wait, never more than the interval apart (the manager's
    reader thread adds its own delay, so the bound is the interval, not half of it)."""
    interval = WATCHDOG_USEC / 1e6
    assert len(stamps) >= (ended - started) / interval, stamps
    gaps = [b - a for a, b in zip([started, *stamps], [*stamps, ended], strict=True)]
    assert max(gaps) < interval * 1.5, gaps


def hup_after(seconds: float) -> threading.Timer:
    """What ends each wait below: a signal, as a stop would (the waits are a minute long)."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGHUP))
    timer.start()
    return timer


def test_until_due_follows_the_interval() -> None:
    now = [100.0]
    n = Notifier("/nonexistent", 10.0, clock=lambda: now[0])
    assert n.until_due() == 0.0  # never sent: due at once
    n.watchdog()
    assert n.until_due() == 5.0
    now[0] += 4.0
    assert n.until_due() == pytest.approx(1.0)
    now[0] += 3.0
    assert n.until_due() == 0.0
    assert Notifier("/nonexistent").until_due() is None  # no watchdog asked for
    assert Notifier(None, 10.0).until_due() is None  # no service manager


def test_a_long_wait_ticks_the_watchdog(manager: Manager) -> None:
    with tunnel.Signals(watchdog=manager.notifier()) as signals:
        started = time.monotonic()
        signals.wait(WAIT)
        ended = time.monotonic()
    assert ended - started >= WAIT
    assert_ticked(manager.watchdogs(), started, ended)


def test_a_wait_without_a_watchdog_sends_nothing(manager: Manager) -> None:
    n = Notifier(str(manager.path))  # a service manager, but no WatchdogSec
    with tunnel.Signals(watchdog=n) as signals:
        signals.wait(0.3)
    assert manager.watchdogs() == []


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[tunnel.Tunnel, socket.socket]]:
    """A client of a loopback server that never answers: its listen queue is full (backlog 0
    and one connection never accepted), so a connect hangs; an accepted connection (see the
    PFS test) stays silent."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    key = tmp_path / "k"
    key.write_bytes(bytes(32))
    key.chmod(0o600)
    port = server.getsockname()[1]
    cfg = ClientConfig(key_file=str(key), server="127.0.0.1", server_ip="127.0.0.1", port=port)

    class Backend:
        def prepare(self, cfg: ClientConfig) -> ClientConfig:
            return cfg

    yield tunnel.Tunnel(cfg, Backend()), server  # type: ignore[arg-type]
    server.close()


def test_waiting_for_a_connect_ticks_the_watchdog(
    client: tuple[tunnel.Tunnel, socket.socket], manager: Manager
) -> None:
    t, server = client
    port = server.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # fills the queue
    try:
        with tunnel.Signals(watchdog=manager.notifier()) as signals:
            timer = hup_after(WAIT)
            started = time.monotonic()
            sock, why = t._dial(signals)
            ended = time.monotonic()
            timer.join()
    finally:
        queued.close()
    assert (sock, why) == (None, None), "the connect was expected to hang until the signal"
    assert ended - started >= WAIT * 0.9
    assert_ticked(manager.watchdogs(), started, ended)


def test_waiting_for_a_forward_secret_handshake_ticks_the_watchdog(
    client: tuple[tunnel.Tunnel, socket.socket], manager: Manager
) -> None:
    t, server = client
    pfs.ClientHandshake(bytes(32), 0).abort()  # loads libsodium first: not part of the wait
    sock = socket.create_connection(server.getsockname())
    sock.setblocking(False)
    accepted, _ = server.accept()  # and never answers the hello
    try:
        with tunnel.Signals(watchdog=manager.notifier()) as signals:
            timer = hup_after(WAIT)
            started = time.monotonic()
            key, why = t._pfs_handshake(sock, signals)
            ended = time.monotonic()
            timer.join()
    finally:
        accepted.close()
    assert (key, why) == (None, None), "the handshake was expected to wait until the signal"
    assert ended - started >= WAIT * 0.9
    assert_ticked(manager.watchdogs(), started, ended)


def test_the_classic_handshake_in_the_loop_ticks_the_watchdog(
    client: tuple[tunnel.Tunnel, socket.socket], tmp_path: Path
) -> None:
    """The classic handshake runs inside loop.run(), which returns every TICK_MS while it
    waits: each return ticks the watchdog."""
    from dsvpn._loop import EV_TIMEOUT

    t, _ = client
    now = [0.0]
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "classic"))
    t.notifier = Notifier(str(tmp_path / "classic"), 60.0, clock=lambda: now[0])
    t.live = t._live("tun0")
    t.follow_gateway = False
    t.runner, t.plan, t.net = object(), object(), object()  # type: ignore[assignment]

    class Loop:
        turns = 0

        def connect(self, fd: int) -> None:
            os.close(fd)

        def run(self, timeout_ms: int) -> tuple[int, str]:
            now[0] += timeout_ms / 1000 * 30  # a turn as long as half the interval
            self.turns += 1
            if self.turns == 4:
                signals.received = signal.SIGTERM
            return EV_TIMEOUT, ""

        def session(self) -> None:
            return None

    with tunnel.Signals() as signals:
        t._dial = lambda signals: (socket.socket(), None)  # type: ignore[method-assign]
        t._connect_forever(Loop(), signals, "tun0")  # type: ignore[arg-type]
    manager.setblocking(False)
    got = []
    while True:
        try:
            got.append(manager.recv(4096).decode())
        except BlockingIOError:
            break
    manager.close()
    # One before the attempt, then one per turn of the loop (each 30 s: half of 60 s).
    assert sum("WATCHDOG=1" in g.split("\n") for g in got) == 5, got
