"""Lifecycle pieces that need no root: listener errors, name resolution, signal wake-ups."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from dsvpn import tunnel
from dsvpn.config import Config
from dsvpn.errors import NetworkError


def server_cfg(address: str | None, port: int) -> Config:
    return Config("server", "k", address, port, None, "10.0.0.254", "10.0.0.1", None)


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NetworkError, match=f"port {port} is already in use"):
            tunnel._listener(server_cfg("127.0.0.1", port))


def test_address_not_on_this_host() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a host, so bind() must fail.
    with pytest.raises(NetworkError, match="not on this host"):
        tunnel._listener(server_cfg("192.0.2.1", 4433))


def test_listener_is_non_blocking_and_listening() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tunnel._listener(server_cfg("127.0.0.1", port)) as sock:
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_unresolvable_server_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(NetworkError, match=r"cannot resolve server name 'vpn\.example'"):
        tunnel._resolve("vpn.example", 443)


def test_resolution_prefers_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::7", 443, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 443)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: list(answers))
    assert tunnel._resolve("vpn.example", 443) == "192.0.2.7"


def test_a_signal_wakes_a_wait_and_is_recorded() -> None:
    with tunnel.Signals() as signals:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGHUP))
        timer.start()
        started = time.monotonic()
        signals.wait(10)
        elapsed = time.monotonic() - started
        timer.join()
        assert signals.received == signal.SIGHUP
        assert elapsed < 5, "the wait did not wake on the signal"


def test_signals_restores_previous_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with tunnel.Signals():
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


class FakeLoop:
    """Every connection attempt ends in a failed handshake."""

    def __init__(self) -> None:
        self.connected: list[int] = []

    def connect(self, fd: int) -> None:
        os.close(fd)
        self.connected.append(fd)

    def run(self, timeout_ms: int) -> tuple[int, str]:
        from dsvpn._loop import EV_HANDSHAKE_FAILED

        return EV_HANDSHAKE_FAILED, "the server closed the connection during the handshake"

    def stats(self) -> dict[str, int]:
        return {}


class FakeRunner:
    def __init__(self) -> None:
        self.reapplied: list[tuple[object, object]] = []

    def reapply_gateway(self, old: object, new: object) -> None:
        self.reapplied.append((old, new))


def test_client_retries_like_the_reference_and_follows_the_gateway(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsvpn.platform._common import NetInfo

    key = tmp_path / "k"  # type: ignore[operator]
    key.write_bytes(bytes(32))
    key.chmod(0o600)
    cfg = Config("client", str(key), "192.0.2.1", 443, None, "10.0.0.1", "10.0.0.254", None)
    cfg = tunnel.dataclasses.replace(cfg, server_ip="192.0.2.1")
    nets = iter([NetInfo("eth0", "10.1.0.1")] * 3 + [NetInfo("wlan0", "10.2.0.1")] * 200)

    class Backend:
        def discover(self, cfg: Config) -> NetInfo:
            return next(nets)

        def plan(self, cfg: Config, tun: str, net: NetInfo) -> str:
            return f"plan via {net.gateway}"

    t = tunnel.Tunnel(cfg, Backend())  # type: ignore[arg-type]
    t.runner = FakeRunner()  # type: ignore[assignment]
    t.net, t.plan = NetInfo("eth0", "10.1.0.1"), "plan via 10.1.0.1"  # type: ignore[assignment]
    waits: list[float] = []

    class NoSleep(tunnel.Signals):
        def wait(self, seconds: float, sock: socket.socket | None = None) -> bool:
            waits.append(seconds)
            return False

    monkeypatch.setattr(t, "_dial", lambda signals: socket.socket())
    loop = FakeLoop()
    with NoSleep() as signals, pytest.raises(NetworkError, match="gave up after 100 attempts"):
        t._connect_forever(loop, signals, "tun0")  # type: ignore[arg-type]
    assert len(loop.connected) == 100
    assert waits == [0, 1, 2] + [3] * 97
    # The gateway moved before the fourth attempt: its routes moved once, and only then.
    assert t.runner.reapplied == [("plan via 10.1.0.1", "plan via 10.2.0.1")]  # type: ignore[attr-defined]
