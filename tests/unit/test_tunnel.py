"""Lifecycle pieces that need no root: listener errors, name resolution, signal wake-ups,
reconnecting and following the gateway."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from host_rig import CmdDialect, FakeHost

from dsvpn import tunnel
from dsvpn.config import ClientConfig, ServerConfig
from dsvpn.errors import NetworkError
from dsvpn.notify import Notifier
from dsvpn.plan import Plan, Step
from dsvpn.platform._common import NetInfo
from dsvpn.runner import Runner


def server_cfg(address: str | None, port: int) -> ServerConfig:
    return ServerConfig(key_file="k", listen_ip=address, port=port)


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

    session_active = False

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

    def session(self) -> None:
        return None

    def ended_session(self) -> None:
        return None


def notify_socket(tmp_path: Path) -> socket.socket:
    """The service manager's end of $NOTIFY_SOCKET (tmp_path/notify)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    return sock


def received(sock: socket.socket) -> list[str]:
    """The datagrams queued so far (the kernel queues only a few: read often)."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


class FakeRunner:
    def __init__(self) -> None:
        self.reapplied: list[tuple[object, object]] = []

    def reapply_gateway(self, old: object, new: object) -> bool:
        self.reapplied.append((old, new))
        return True


def client_cfg(tmp_path: Path) -> ClientConfig:
    key = tmp_path / "k"
    key.write_bytes(bytes(32))
    key.chmod(0o600)
    return ClientConfig(key_file=str(key), server="192.0.2.1", server_ip="192.0.2.1")


def test_client_retries_like_the_reference_and_follows_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = client_cfg(tmp_path)
    nets = iter([NetInfo("eth0", "10.1.0.1")] * 3 + [NetInfo("wlan0", "10.2.0.1")] * 200)

    class Backend:
        def prepare(self, cfg: ClientConfig) -> ClientConfig:
            return cfg

        def discover(self, cfg: ClientConfig) -> NetInfo:
            return next(nets)

        def plan(self, cfg: ClientConfig, tun: str, net: NetInfo) -> str:
            return f"plan via {net.gateway}"

    t = tunnel.Tunnel(cfg, Backend())  # type: ignore[arg-type]
    t.runner = FakeRunner()  # type: ignore[assignment]
    t.net, t.plan = NetInfo("eth0", "10.1.0.1"), "plan via 10.1.0.1"  # type: ignore[assignment]
    waits: list[float] = []

    class NoSleep(tunnel.Signals):
        def wait(self, seconds: float, sock: socket.socket | None = None) -> bool:
            waits.append(seconds)
            statuses.extend(received(manager))
            return False

    monkeypatch.setattr(t, "_dial", lambda signals: (socket.socket(), None))
    t.live = t._live("tun0")
    manager = notify_socket(tmp_path)
    t.notifier = Notifier(str(tmp_path / "notify"))
    statuses: list[str] = []
    loop = FakeLoop()
    caplog.set_level(logging.INFO, logger="dsvpn")
    with NoSleep() as signals, pytest.raises(NetworkError, match="gave up after 100 attempts"):
        t._connect_forever(loop, signals, "tun0")  # type: ignore[arg-type]
    assert len(loop.connected) == 100
    assert waits == [0, 1, 2] + [3] * 97
    # Each failure in one line with what comes next; the key is not blamed for a closed
    # connection, and `dsvpn status` shows the attempt.
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "connecting to 192.0.2.1 port 443"
    assert lines[1] == (
        "the server closed the connection during the handshake (wrong key, server busy, or "
        "server restarting); reconnecting in 1 s (attempt 2 of 100)"
    )
    assert lines[-1].endswith("reconnecting in 3 s (attempt 100 of 100)")
    assert (t.live.state, t.live.attempt) == ("reconnecting", 100)
    # Never READY without a session; STATUS says which attempt it is.
    manager.close()
    assert statuses == ["STATUS=connecting to 192.0.2.1:443"] + [
        f"STATUS=reconnecting, attempt {n} of 100" for n in range(2, 101)
    ]
    # The gateway moved before the fourth attempt: its routes moved once, and only then.
    assert t.runner.reapplied == [("plan via 10.1.0.1", "plan via 10.2.0.1")]  # type: ignore[attr-defined]


class RouteBackend:
    """A BSD-like client: one host route through the gateway; discovery answers from a list."""

    def __init__(self, nets: list[NetInfo]) -> None:
        self.nets = nets

    def prepare(self, cfg: ClientConfig) -> ClientConfig:
        return cfg

    def discover(self, cfg: ClientConfig) -> NetInfo:
        return self.nets.pop(0)

    def plan(self, cfg: ClientConfig, tun: str, net: NetInfo) -> Plan:
        host_route = Step(
            ("route", "add", "192.0.2.1", net.gateway), ("route", "delete", "192.0.2.1"),
            gateway=True,
        )  # fmt: skip
        return Plan([Step(("ifconfig", tun, "up"), None), host_route])

    def sysctl_read(self, key: str) -> tuple[str, ...]:
        return ("sysctl", "-n", key)

    def sysctl_write(self, key: str, value: str) -> tuple[str, ...]:
        return ("sysctl", f"{key}={value}")

    def undo_of(self, apply: Sequence[str]) -> None:
        return None


def test_a_failed_route_add_after_a_gateway_change_keeps_the_client(tmp_path: Path) -> None:
    old, new = NetInfo("eth0", "10.1.0.1"), NetInfo("wlan0", "10.2.0.1")
    backend = RouteBackend([new, new, new])
    calls: list[str] = []
    failing = {"route add 192.0.2.1 10.2.0.1"}

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        line = " ".join(argv)
        calls.append(line)
        code = 1 if line in failing else 0
        return subprocess.CompletedProcess(argv, code, "", "Network is unreachable\n")

    t = tunnel.Tunnel(client_cfg(tmp_path), backend)  # type: ignore[arg-type]
    t.runner = Runner(backend, lambda _: None, run=run)  # type: ignore[arg-type]
    t.net, t.plan = old, backend.plan(t.cfg, "tun0", old)  # type: ignore[arg-type]
    t.runner.apply(t.plan)
    calls.clear()
    t._follow_gateway("tun0")  # the new gateway is not reachable yet: no exception
    assert calls == [
        "route delete 192.0.2.1",
        "route add 192.0.2.1 10.2.0.1",
        "route add 192.0.2.1 10.1.0.1",  # the old route is back
    ]
    assert t.net == old
    assert [a.step.apply[-1] for a in t.runner.applied if a.step.gateway] == ["10.1.0.1"]
    # The next attempt tries again, and this time it works.
    failing.clear()
    calls.clear()
    t._follow_gateway("tun0")
    assert calls == ["route delete 192.0.2.1", "route add 192.0.2.1 10.2.0.1"]
    assert t.net == new
    calls.clear()
    t._follow_gateway("tun0")  # nothing moved
    assert calls == []


# -- the whole lifecycle, on a fake host --------------------------------------------------------


class FakeServerBackend(CmdDialect):
    """Opens /dev/null as its tun; its plan is one `cmd a` step."""

    name = "fake"

    def prepare(self, cfg: ServerConfig) -> ServerConfig:
        return cfg

    def check_host(self, cfg: ServerConfig) -> None:
        pass

    def discover(self, cfg: ServerConfig) -> NetInfo:
        return NetInfo("eth0", "10.0.0.1")

    def open_tun(
        self, wanted: str | None, mtu: int, run: Callable[[Sequence[str]], None], *, queues: int = 1
    ) -> tuple[int, str]:
        assert queues == 1  # a server of one client
        run(("ip", "link", "set", "dev", "tun9", "mtu", str(mtu)))
        return os.open(os.devnull, os.O_RDWR), "tun9"

    def plan(self, cfg: ServerConfig, tun: str, net: NetInfo) -> Plan:
        return Plan([Step(("cmd", "a"), ("uncmd", "a"))])

    def notes(self, cfg: ServerConfig, tun: str, net: NetInfo) -> list[str]:
        return []


class StopAtOnce:
    """The loop: its first run() ends in a SIGTERM, as if the operator stopped the server."""

    session_active = False

    def __init__(self, run_dir: Path) -> None:
        self.closed = False
        self.socket = run_dir / f"{os.getpid()}.sock"  # where `dsvpn status` asks
        self.socket_mode: int | None = None

    def run(self, timeout_ms: int) -> tuple[int, str]:
        from dsvpn._loop import EV_TIMEOUT

        self.socket_mode = stat.S_IMODE(os.lstat(self.socket).st_mode)
        os.kill(os.getpid(), signal.SIGTERM)
        return EV_TIMEOUT, ""

    def session(self) -> None:
        return None

    def ended_session(self) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self.closed = True


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_server_lifecycle_claim_apply_loop_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "k"
    key.write_bytes(bytes(32))
    key.chmod(0o600)
    cfg = ServerConfig(key_file=str(key), listen_ip="127.0.0.1", port=0, tun_name="tun9")
    sockets: list[socket.socket] = []
    real_listener = tunnel._listener

    def listener(cfg: ServerConfig) -> socket.socket:
        sockets.append(real_listener(cfg))
        return sockets[-1]

    run_dir = tmp_path / "run"
    loop = StopAtOnce(run_dir)
    monkeypatch.setattr(tunnel, "_listener", listener)
    monkeypatch.setattr(tunnel.Tunnel, "_make_loop", lambda *a, **kw: loop)
    host = FakeHost()
    listening_at_undo: list[bool] = []

    def at_undo(argv: list[str]) -> None:
        if argv == ["uncmd", "a"]:
            listening_at_undo.append(sockets[0].fileno() != -1)
            assert loop.closed
            assert not loop.socket.exists()  # status says "stopping", not waits for an answer

    host.on_call = at_undo
    lines = Lines()
    logger = logging.getLogger("dsvpn")
    logger.addHandler(lines)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        t = tunnel.Tunnel(cfg, FakeServerBackend(), run_dir=run_dir, run=host)  # type: ignore[arg-type]
        assert t.run() == 0
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old_level)
    assert host.calls == ["ip link set dev tun9 mtu 9000", "cmd a", "uncmd a"]
    # The listener was closed before the rules were undone.
    assert listening_at_undo == [False]
    assert loop.socket_mode == 0o600
    assert lines.lines[:3] == [
        "[#] ip link set dev tun9 mtu 9000",
        "opened tun device tun9",
        "[#] cmd a",
    ]
    assert os.listdir(run_dir) == [".lock"]  # the record is gone


def session_record(port: int, **kw: object) -> dict[str, object]:
    return {
        "endpoint": f"198.51.100.2:{port}",
        "since": 1000,
        "latest_handshake": 1000,
        "rx_bytes": 2048,
        "tx_bytes": 100,
        "rx_packets": 2,
        "tx_packets": 1,
        "drops": {},
        **kw,
    }


class ScriptedLoop:
    """Returns the given events in turn, with the session records they imply; then stops."""

    def __init__(self, signals: tunnel.Signals, script: list[tuple[int, str, object, object]]):
        self.signals = signals
        self.script = script
        self.current: object = None
        self.ended: object = None

    def run(self, timeout_ms: int) -> tuple[int, str]:
        from dsvpn._loop import EV_TIMEOUT

        if not self.script:
            self.signals.received = signal.SIGTERM
            return EV_TIMEOUT, ""
        event, message, self.current, self.ended = self.script.pop(0)
        return event, message

    def session(self) -> object:
        return self.current

    @property
    def session_active(self) -> bool:
        return self.current is not None

    def ended_session(self) -> object:
        return self.ended

    def stats(self) -> dict[str, int]:
        return {}


def test_server_says_what_happened_to_each_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dsvpn._loop import EV_CONTROL, EV_LOG, EV_SESSION_DOWN, EV_SESSION_UP

    key = tmp_path / "k"
    key.write_bytes(bytes(32))
    key.chmod(0o600)
    cfg = ServerConfig(key_file=str(key), port=443)
    t = tunnel.Tunnel(cfg, FakeServerBackend())  # type: ignore[arg-type]
    t.live = t._live("tun0")
    handled: list[int] = []

    class Status:
        def handle(self) -> None:
            handled.append(1)

        def expire(self) -> None:
            pass

    t.status_server = Status()  # type: ignore[assignment]
    manager = notify_socket(tmp_path)
    t.notifier = Notifier(str(tmp_path / "notify"))
    first, second = session_record(1000), session_record(1001)
    replaced = {**first, "ended": 1060, "reason": "replaced by a new session from the same address"}
    closed = {**second, "ended": 1200, "reason": "connection closed by peer"}
    caplog.set_level(logging.INFO, logger="dsvpn")
    with tunnel.Signals() as signals:
        loop = ScriptedLoop(
            signals,
            [
                (EV_SESSION_UP, "198.51.100.2", first, None),
                (EV_CONTROL, "", first, None),
                # a reconnect from the same address replaces the session without a down event
                (EV_SESSION_UP, "198.51.100.2", second, replaced),
                (EV_SESSION_DOWN, "connection closed by peer", None, closed),
                (
                    EV_LOG,
                    "authentication failed from 203.0.113.9: wrong key or garbage",
                    None,
                    closed,
                ),
            ],
        )
        t._serve(loop, signals)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "listening on all addresses port 443",
        "session up: client 198.51.100.2 port 1000",
        "session down: client 198.51.100.2 port 1000: replaced by a reconnect from the same "
        "address (up 1 minute, received 2.00 KiB, sent 100 B)",
        "session up: client 198.51.100.2 port 1001",
        "session down: client 198.51.100.2 port 1001: the client closed the connection "
        "(up 3 minutes, 20 seconds, received 2.00 KiB, sent 100 B)",
        "authentication failed from 203.0.113.9: wrong key or garbage",
        "stopping (signal 15)",
    ]
    assert handled == [1]
    assert t.live.sessions_up == 2 and t.live.state == "listening"
    # READY once listening; STATUS as the client comes and goes, each change once.
    with manager:
        statuses = received(manager)
    assert statuses == [
        "READY=1\nSTATUS=listening on *:443, no client",
        "STATUS=listening on *:443, 1 client",
        "STATUS=listening on *:443, no client",
    ]


class AdoptLoop(FakeLoop):
    """A client loop stand-in for --pfs: records adopt() and reports the session ending."""

    def __init__(self) -> None:
        super().__init__()
        self.adopted: list[bytes] = []

    def adopt(self, fd: int, key: bytes) -> None:
        os.close(fd)
        self.adopted.append(key)

    def run(self, timeout_ms: int) -> tuple[int, str]:
        from dsvpn._loop import EV_SESSION_DOWN

        return EV_SESSION_DOWN, "connection closed by peer"


def pfs_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[[socket.socket], None]
) -> tuple[tunnel.Tunnel, list[socket.socket]]:
    """A --pfs client Tunnel whose every dial reaches a local listener handled by serve (one
    thread per connection); returns (tunnel, dials)."""
    cfg = dataclasses.replace(client_cfg(tmp_path), pfs=True)

    class Backend:
        def prepare(self, cfg: ClientConfig) -> ClientConfig:
            return cfg

    t = tunnel.Tunnel(cfg, Backend())  # type: ignore[arg-type]
    monkeypatch.setattr(t, "_follow_gateway", lambda tun: None)
    lst = socket.create_server(("127.0.0.1", 0))
    dials: list[socket.socket] = []

    def dial(signals: tunnel.Signals) -> tuple[socket.socket, None]:
        c = socket.create_connection(lst.getsockname(), timeout=5)
        s, _ = lst.accept()
        threading.Thread(target=serve, args=(s,), daemon=True).start()
        c.setblocking(False)
        dials.append(c)
        return c, None

    monkeypatch.setattr(t, "_dial", dial)
    t.live = t._live("tun0")
    return t, dials


def test_pfs_client_stops_when_the_server_does_not_accept_the_handshake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def c_dsvpn(s: socket.socket) -> None:
        with s:
            s.recv(72)  # a C server reads the classic length, finds no valid H1, closes

    t, dials = pfs_client(tmp_path, monkeypatch, c_dsvpn)
    loop = AdoptLoop()
    t0 = time.monotonic()
    with tunnel.Signals() as signals, pytest.raises(NetworkError) as info:
        t._connect_forever(loop, signals, "tun0")  # type: ignore[arg-type]
    assert str(info.value) == tunnel.PFS_NOT_ACCEPTED
    assert str(info.value) == (
        "the server did not accept the --pfs handshake: is it C DSVPN or an older dsvpn?"
    )
    assert len(dials) == 1 and loop.adopted == [] and loop.connected == []
    assert time.monotonic() - t0 < 5


def test_pfs_client_reconnects_after_other_failures_with_fresh_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dsvpn import pfs

    key = bytes(32)  # client_cfg's key file
    hellos: list[bytes] = []

    def server(s: socket.socket) -> None:
        with s:
            s.settimeout(5)
            hello = b""
            while len(hello) < pfs.HELLO_LEN:
                hello += s.recv(pfs.HELLO_LEN - len(hello))
            hellos.append(hello)
            if len(hellos) == 1:
                s.sendall(bytes(pfs.REPLY_LEN))  # a reply that does not verify: reconnect
                s.recv(1)
                return
            st = pfs.verify_hello(key, hello, int(time.time()))
            reply, _ = pfs.server_reply(st, pfs.client_public(hello))
            s.sendall(reply)
            s.recv(1)

    t, dials = pfs_client(tmp_path, monkeypatch, server)
    loop = AdoptLoop()

    class Stopper(tunnel.Signals):
        def wait(
            self, seconds: float, sock: socket.socket | None = None, readable: bool = False
        ) -> bool:
            if sock is None and len(loop.adopted) == 1:
                self.received = signal.SIGTERM  # stop before a third connection
            return super().wait(0 if sock is None else seconds, sock, readable)

    with caplog.at_level(logging.WARNING, logger="dsvpn"), Stopper() as signals:
        assert t._connect_forever(loop, signals, "tun0") == 0  # type: ignore[arg-type]
    assert len(dials) == 2 and len(loop.adopted) == 1 and len(loop.adopted[0]) == 32
    assert "the server's reply failed authentication: wrong key?" in caplog.text
    assert pfs.client_public(hellos[0]) != pfs.client_public(hellos[1])
    for c in dials:
        c.close()
