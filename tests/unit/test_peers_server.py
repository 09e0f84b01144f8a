"""A server of a peers file: the reload on SIGHUP (what changes, what stays, an error keeps the
previous peers), its log lines, and the signal that asks for it."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from loop_rig import MultiRig, ip4_packet, pump

from dsvpn import _loop as L
from dsvpn import peers, peers_server, tunnel
from dsvpn.errors import DsvpnError


def make(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "peers"
    for name in names:
        peers.add(path, name)
    return path


def rig_for(current: peers.Peers) -> MultiRig:
    return MultiRig([(p.name, p.key, p.address) for p in current.peers], pool=str(current.pool))


def test_reload_changes_what_changed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dsvpn")
    path = make(tmp_path, ["alice", "bob", "carol"])
    current = peers.load(path)
    with rig_for(current) as rig:
        alice = rig.client("alice")
        bob = rig.client("bob")
        peers.remove(path, "bob")
        peers.add(path, "dave")
        # carol's key is replaced by hand
        (tmp_path / "carol.key").write_bytes(os.urandom(32))
        fresh = peers_server.reload(rig.loop, current)
        assert [p.name for p in fresh.peers] == ["alice", "carol", "dave"]
        assert f"reloaded {path}: added dave; removed bob; changed carol (3 peer(s))" in caplog.text
        evs = pump(rig.loop, lambda e: len(e) >= 1)
        assert evs == [(L.EV_SESSION_DOWN, "bob removed from the peers file")]
        bob.sock.settimeout(5)
        assert bob.sock.recv(1) == b""
        pkt = ip4_packet("10.0.0.9", fresh.peers[0].address)
        rig.peer_tun.send(pkt)
        assert rig.recv(alice) == pkt
        rig.peers["dave"] = (fresh.peers[2].key, fresh.peers[2].address)
        rig.client("dave")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.write_text(p.read_text() + "bob alice.key 192.168.192.1\n"),
         r"peers:\d+: duplicate address 192\.168\.192\.1"),
        (lambda p: p.write_text(p.read_text().replace("192.168.192.", "10.0.0.")),
         r"the pool line of .* changed .*: restart the server"),
        (lambda p: p.unlink(), r"peers file .* does not exist"),
        (lambda p: p.chmod(0o666), r"writable by group or others"),
    ],
)  # fmt: skip
def test_a_reload_with_an_error_keeps_the_previous_peers(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    edit,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    path = make(tmp_path, ["alice"])
    current = peers.load(path)
    with rig_for(current) as rig:
        alice = rig.client("alice")
        edit(path)
        assert peers_server.reload(rig.loop, current) is current
        assert "reload failed, still serving the previous peers: " in caplog.text
        assert re.search(message, caplog.text), caplog.text
        assert sorted(rig.loop.sessions()) == ["alice"]
        pkt = ip4_packet("10.0.0.9", "192.168.192.1")
        rig.peer_tun.send(pkt)
        assert rig.recv(alice) == pkt


def test_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dsvpn")
    peers_server.log_event(L.EV_SESSION_DOWN, "bob replaced by a new connection from 10.0.0.7")
    peers_server.log_event(L.EV_LOG, "replayed handshake from 10.0.0.9 refused (peer bob)")
    assert caplog.messages == [
        "session down: peer bob: replaced by a new connection from 10.0.0.7",
        "replayed handshake from 10.0.0.9 refused (peer bob)",
    ]
    with pytest.raises(DsvpnError, match="tun device failed: boom"):
        peers_server.log_event(L.EV_TUN_ERROR, "boom")


def test_sighup_reloads_a_server_of_peers_and_stops_the_others() -> None:
    with tunnel.Signals(reload_on_hup=True) as signals:
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not signals.reload:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert signals.received is None
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        signals.wait(10)
        timer.join()
        assert signals.received == signal.SIGTERM
    with tunnel.Signals() as plain:
        os.kill(os.getpid(), signal.SIGHUP)
        plain.wait(5)
        assert plain.received == signal.SIGHUP and not plain.reload


def test_status_shows_each_peer_by_name(tmp_path: Path) -> None:
    from dsvpn import status

    path = make(tmp_path, ["alice", "bob", "carol"])
    current = peers.load(path)
    with rig_for(current) as rig:
        rig.client("bob")
        rig.client("alice")
        replacement = rig.connect("alice")
        pump(rig.loop, lambda e: any("new connection" in m for _, m in e))
        replacement.finish()
        live = status.Live(mode="server", tun="tun0", mtu=9000, listen="*:443", pid=7)
        answer = live.answer(rig.loop)
        assert [s["peer"] for s in answer["sessions"]] == ["alice", "bob"]
        assert answer["summary"] == "listening on *:443, 2 clients"
        assert answer["stats"]["peers"] == 3
        text = status.render([answer], now=time.time())
        assert "  peer:" in text
        assert "alice (192.168.192.1)" in text and "bob (192.168.192.2)" in text
        assert "    endpoint:" in text and "127.0.0.1:" in text
        assert "(on probation)" in text
        assert "listening, 2 clients" in text
        # one column for every value of the instance
        columns = {len(ln) - len(ln.split(": ", 1)[1].lstrip()) for ln in text.splitlines()
                   if ": " in ln}  # fmt: skip
        assert len(columns) == 1, text
