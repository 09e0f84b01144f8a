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
