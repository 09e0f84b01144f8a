"""`dsvpn status`: the socket protocol (server side driven by hand and by a real Loop, client
side and its refusals), collecting instances, and the text view."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loop_rig import Pair

from dsvpn import _loop as L
from dsvpn import status
from dsvpn.status import Known, Live, StatusError, StatusServer

KEY = bytes(range(32))
SESSION: dict[str, Any] = {
    "endpoint": "198.51.100.2:53422",
    "since": 1_000_000,
    "latest_handshake": 1_000_000,
    "rx_bytes": 1_269_000,
    "tx_bytes": 6 * 2**30,
    "rx_packets": 1234,
    "tx_packets": 4_567_890,
    "drops": {
        "bad_tag": 0,
        "oversize": 0,
        "no_session": 0,
        "spoofed": 0,
        "congestion": 3,
        "non_ip": 0,
        "link_local": 2,
    },
}


class FakeLoop:
    def __init__(self, session: dict[str, Any] | None = None) -> None:
        self._session = session

    def session(self) -> dict[str, Any] | None:
        return self._session

    def stats(self) -> dict[str, int]:
        return {"frames_rx": 7, "handshakes_ok": 2, "handshakes_failed": 1234}


def server_live(**kw: Any) -> Live:
    return Live(mode="server", tun="tun0", mtu=9000, listen="*:443", **kw)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def served(run_dir: Path) -> Iterator[StatusServer]:
    live = server_live()
    fake = FakeLoop(SESSION)
    with StatusServer(status.socket_path(run_dir, os.getpid()), lambda: live.answer(fake)) as srv:
        yield srv


def drive(srv: StatusServer, done: threading.Event) -> None:
    """Play the loop: wait for the control descriptor, then handle() as on EV_CONTROL."""
    import select

    while not done.is_set():
        ready, _, _ = select.select([srv.fileno()], [], [], 0.02)
        if ready:
            srv.handle()


def ask_in_background(srv: StatusServer, pid: int | None = None) -> dict[str, Any]:
    done = threading.Event()
    t = threading.Thread(target=drive, args=(srv, done))
    t.start()
    try:
        return status.query(srv.path, pid if pid is not None else os.getpid(), timeout=5)
    finally:
        done.set()
        t.join()


# -- the running side's state ------------------------------------------------------------------


def test_summary_says_the_state() -> None:
    srv = server_live()
    assert srv.summary(0) == "listening on *:443, no client"
    assert srv.summary(1) == "listening on *:443, 1 client"
    cli = Live(mode="client", tun="tun0", mtu=9000, server="203.0.113.7:443", max_attempts=100)
    assert cli.summary(0) == "connecting to 203.0.113.7:443"
    cli.session_up()
    assert cli.summary(1) == "connected to 203.0.113.7:443"
    cli.state, cli.attempt = "reconnecting", 3
    assert cli.summary(0) == "reconnecting, attempt 3 of 100"
    cli.session_up()
    assert (cli.reconnects, cli.attempt, cli.state) == (1, 0, "connected")


def test_answer_carries_the_json_keys() -> None:
    doc = server_live(name="home").answer(FakeLoop(SESSION))
    for key in ("name", "pid", "mode", "tun", "listen", "started", "mtu", "sessions", "stats"):
        assert key in doc
    assert doc["name"] == "home" and doc["pid"] == os.getpid()
    assert doc["sessions"] == [SESSION]
    assert doc["summary"] == "listening on *:443, 1 client"
    json.dumps(doc)  # serialisable as it is
    assert server_live().answer(FakeLoop(None))["sessions"] == []


# -- server side -------------------------------------------------------------------------------


def test_socket_is_private_and_removed_on_close(run_dir: Path) -> None:
    path = status.socket_path(run_dir, 4242)
    path.write_text("stale")  # left by a dead process that had this PID
    old = os.umask(0)  # the most permissive umask: the socket must still be 0600
    try:
        srv = StatusServer(path, dict)
    finally:
        os.umask(old)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    srv.close()
    assert not path.exists()


def test_round_trip(served: StatusServer) -> None:
    doc = ask_in_background(served)
    assert doc["mode"] == "server" and doc["pid"] == os.getpid()
    assert doc["sessions"][0]["endpoint"] == "198.51.100.2:53422"
    assert doc["stats"]["frames_rx"] == 7


def test_a_request_in_pieces_never_blocks(served: StatusServer) -> None:
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(served.path))
        served.handle()  # accepts; nothing to read yet
        c.sendall(b"sta")
        t0 = time.monotonic()
        served.handle()
        served.handle()
        assert time.monotonic() - t0 < 1  # returned at once, twice (a blocking read never would)
        c.sendall(b"tus\n")
        served.handle()
        c.settimeout(2)
        doc = json.loads(c.makefile("rb").read())
    assert doc["pid"] == os.getpid()


def test_unknown_request_is_answered_with_an_error(served: StatusServer) -> None:
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(served.path))
        c.sendall(b"reboot\n")
        served.handle()
        served.handle()
        c.settimeout(2)
        doc = json.loads(c.makefile("rb").read())
    assert doc == {"protocol": status.PROTOCOL, "error": "unknown request"}


def test_an_oversized_request_is_cut_short(served: StatusServer) -> None:
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(served.path))
        c.sendall(b"x" * (status.MAX_REQUEST + 10))
        served.handle()
        served.handle()
        c.settimeout(2)
        assert json.loads(c.makefile("rb").read())["error"] == "request too long"


def test_a_silent_client_expires(served: StatusServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(served.path))
        served.handle()
        assert len(served._conns) == 1
        later = time.monotonic() + status.CLIENT_TIMEOUT + 1
        monkeypatch.setattr(status.time, "monotonic", lambda: later)
        served.expire()
        assert not served._conns
        c.settimeout(2)
        assert c.recv(10) == b""  # closed without an answer


def test_connections_are_bounded(served: StatusServer) -> None:
    clients = []
    try:
        for _ in range(status.MAX_CLIENTS + 3):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(served.path))
            clients.append(c)
            served.handle()
        assert len(served._conns) == status.MAX_CLIENTS
        clients[0].settimeout(2)
        assert clients[0].recv(10) == b""  # the oldest was dropped
    finally:
        for c in clients:
            c.close()


def test_a_failing_answer_does_not_raise(run_dir: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("bug")

    path = status.socket_path(run_dir, os.getpid())
    with StatusServer(path, broken) as srv, pytest.raises(StatusError, match="internal error"):
        ask_in_background(srv)


def test_fallback_without_a_pollable_selector(run_dir: Path) -> None:
    live = server_live()
    path = status.socket_path(run_dir, os.getpid())
    with StatusServer(path, lambda: live.answer(None), pollable=False) as srv:
        assert srv.fileno() != -1 and not srv.pollable
        assert ask_in_background(srv)["pid"] == os.getpid()


def test_the_loop_wakes_for_status_under_load(run_dir: Path) -> None:
    """The selector's descriptor as a real Loop's control_fd: EV_CONTROL comes back while a
    session carries traffic, and the answer holds the loop's own session counters."""
    live = server_live()
    loops: list[L.Loop] = []
    path = status.socket_path(run_dir, os.getpid())
    with (
        StatusServer(path, lambda: live.answer(loops[0])) as srv,
        Pair(KEY, server={"control_fd": srv.fileno()}) as pair,
    ):
        loops.append(pair.srv)
        pair.connect()
        packet = bytes([0x45]) + bytes(59)
        result: dict[str, Any] = {}

        def ask() -> None:
            result["doc"] = status.query(path, os.getpid(), timeout=5)

        t = threading.Thread(target=ask)
        t.start()
        controls = 0
        deadline = time.monotonic() + 5
        while t.is_alive():
            assert time.monotonic() < deadline, "no answer"
            pair.cpeer.send(packet)  # traffic all along
            for lp in (pair.cli, pair.srv):
                event, _ = lp.run(5)
                if event == L.EV_CONTROL:
                    assert lp is pair.srv
                    controls += 1
                    srv.handle()
        t.join()
    assert controls >= 1
    session = result["doc"]["sessions"][0]
    assert session["endpoint"].startswith("127.0.0.1:")
    assert session["rx_packets"] >= 1 and session["rx_bytes"] > 0


# -- client side -------------------------------------------------------------------------------


def test_query_refuses_a_socket_others_may_use(served: StatusServer) -> None:
    os.chmod(served.path, 0o660)
    with pytest.raises(StatusError, match=r"group or others may use it \(mode 0660\)"):
        status.query(served.path, os.getpid())


def test_query_refuses_a_directory_others_may_write(served: StatusServer) -> None:
    os.chmod(served.path.parent, 0o733)
    with pytest.raises(StatusError, match="group or others may write to it"):
        status.query(served.path, os.getpid())


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_query_refuses_a_socket_of_another_user(served: StatusServer) -> None:
    os.chown(served.path, 65534, -1)
    with pytest.raises(StatusError, match="belongs to uid 65534"):
        status.query(served.path, os.getpid())


def test_query_refuses_what_is_not_a_socket(run_dir: Path) -> None:
    path = status.socket_path(run_dir, 77)
    path.write_text("")
    os.chmod(path, 0o600)
    with pytest.raises(StatusError, match="not a socket"):
        status.query(path, 77)
    path.unlink()
    path.symlink_to(run_dir)
    with pytest.raises(StatusError, match="not a socket"):
        status.query(path, 77)


@pytest.mark.skipif(not hasattr(socket, "SO_PEERCRED"), reason="Linux peer credentials")
def test_query_refuses_a_socket_served_by_another_process(served: StatusServer) -> None:
    with pytest.raises(StatusError, match=f"served by PID {os.getpid()}, not 1"):
        ask_in_background(served, pid=1)


def test_query_gives_up_on_a_silent_server(run_dir: Path) -> None:
    path = status.socket_path(run_dir, os.getpid())
    with StatusServer(path, dict):  # never handled: nobody answers
        t0 = time.monotonic()
        with pytest.raises(StatusError, match=r"no answer within 0\.3 s"):
            status.query(path, os.getpid(), timeout=0.3)
        assert time.monotonic() - t0 < 2


def test_query_of_a_stale_socket(run_dir: Path) -> None:
    path = status.socket_path(run_dir, 99)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    os.chmod(path, 0o600)
    with pytest.raises(StatusError, match="nobody answers"):
        status.query(path, 99)


# -- every instance ----------------------------------------------------------------------------


def test_collect_live_dead_and_silent(run_dir: Path) -> None:
    def ask(path: Path, pid: int) -> dict[str, Any]:
        assert path == status.socket_path(run_dir, pid)
        if pid == 3:
            raise StatusError("no answer within 2 s")
        return {"protocol": 1, **server_live(pid=pid).answer(FakeLoop(SESSION))}

    known = [
        Known(pid=3, mode="server", tun="tun1", port=443, alive=True),
        Known(pid=1, mode="server", tun="tun0", port=443, alive=True),
        Known(pid=7, mode="client", tun="tun2", port=443, alive=False, applied=5),
        Known(pid=8, mode="client", tun="tun3", port=443, alive=False, applied=5, kept=2),
        Known(
            pid=10, mode="client", tun="tun4", port=443, alive=False, applied=3, fail_closed=True
        ),
        Known(pid=9, mode="server", tun=None, port=443, alive=False),
    ]
    out = status.collect(known, run_dir, ask)
    assert [i["pid"] for i in out] == [1, 3, 7, 8, 9, 10]
    live, silent, dead, kept, clean, closed = out
    assert live["state"] == "starting" and live["pid"] == 1
    assert "protocol" not in live and live["sessions"] == [SESSION]
    assert silent["state"] == "unknown" and "no answer" in silent["error"]
    assert dead["state"] == "dead" and dead["leftovers"] and "dsvpn cleanup" in dead["hint"]
    assert kept["kept"] and "--all" in kept["hint"]
    assert clean["state"] == "dead" and not clean["leftovers"] and "hint" not in clean
    assert closed["fail_closed"] and not closed["kept"] and "dsvpn cleanup`" in closed["hint"]
    for inst in out:
        for key in ("name", "pid", "mode", "tun", "listen", "started", "sessions"):
            assert key in inst
    assert json.loads(status.to_json(out))["instances"][0]["pid"] == 1


# -- the text view -----------------------------------------------------------------------------


def test_render_nothing() -> None:
    assert status.render([]) == "no dsvpn running in this network namespace\n"


def test_render_a_server_with_a_session() -> None:
    now = 1_000_200
    live = server_live(name="home", pid=1234, started=now - 7300)
    text = status.render([live.answer(FakeLoop(SESSION))], now=now)
    lines = text.splitlines()
    assert lines[0] == "server home (pid 1234)"
    assert "  started:" in text and "2 hours, 1 minute ago" in text
    assert "tun0 (mtu 9000)" in text and "*:443" in text
    assert "listening, 1 client" in text
    assert "    connected:" in text and "3 minutes, 20 seconds ago" in text
    assert "1.21 MiB in 1,234 packets" in text
    assert "6.00 GiB in 4,567,890 packets" in text
    assert "congestion 3" in text and "bad tag" not in text
    assert "link-local 2" in text and "spoofed" not in text
    assert "2 ok, 1,234 failed" in text
    # one column for every value of the instance
    columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines if ":" in line}
    assert len(columns) == 1, text


def test_render_a_server_of_several_workers() -> None:
    now = 1_000_200
    live = server_live(pid=1234, started=now - 60)
    answer = live.answer(FakeLoop(None))
    answer["stats"]["workers"] = 2
    answer["sessions"] = [
        {**SESSION, "peer": "alice", "address": "10.8.0.1", "worker": 1},
        {**SESSION, "peer": "bob", "address": "10.8.0.2", "worker": 0},
    ]
    lines = status.render([answer], now=now).splitlines()
    assert "  workers:" in lines[5] and lines[5].endswith("2 (threads sharing the clients)")
    rows = [line.split(":", 1)[0].strip() for line in lines]
    alice, bob = rows.index("peer"), len(rows) - 1 - rows[::-1].index("peer")
    assert lines[alice].endswith("alice (10.8.0.1)") and lines[alice + 2].endswith("1")
    assert rows[alice + 2] == rows[bob + 2] == "worker" and lines[bob + 2].endswith("0")


def test_render_a_reconnecting_client() -> None:
    live = Live(
        mode="client",
        tun="tun0",
        mtu=9000,
        pid=42,
        server="203.0.113.7:443",
        server_name="vpn.example.com",
        max_attempts=100,
    )
    live.session_up()
    live.state, live.attempt = "reconnecting", 3
    text = status.render([live.answer(FakeLoop(None))], now=time.time())
    assert "client (pid 42)" in text
    assert "vpn.example.com (203.0.113.7:443)" in text
    assert "reconnecting, attempt 3 of 100" in text
    assert "reconnects:" in text


def test_live_instance_without_a_socket(run_dir: Path) -> None:
    known = [Known(pid=os.getpid(), mode="server", tun="tun0", port=443, alive=True)]
    found = status.collect(known, run_dir)
    assert found[0]["state"] == "unknown"
    assert status.render(found) == (
        f"server (pid {os.getpid()}): running; not answering yet, or any more "
        "(starting or stopping)\n"
    )


def test_render_dead_instances() -> None:
    known = [
        Known(pid=7, mode="server", tun="tun0", port=443, alive=False, applied=4),
        Known(pid=8, mode="client", tun="tun1", port=443, alive=False, applied=4, kept=1),
        Known(pid=9, mode="client", tun="tun2", port=443, alive=False, applied=4, fail_closed=True),
    ]
    text = status.render(status.collect(known, Path("/nonexistent")))
    assert "server (pid 7): dead; its rules are still in place: run `dsvpn cleanup`" in text
    assert (
        "client (pid 8): dead; its kill switch still blocks traffic outside the tunnel: "
        "run `dsvpn cleanup --all` as root to remove it"
    ) in text
    assert (
        "client (pid 9): dead; its routes still hold back traffic outside the tunnel (fail "
        "closed): run `dsvpn cleanup` as root to remove them"
    ) in text
