"""Forward secrecy on a server of a peers file: a --pfs client and a classic one of the same
server at once, and --require-pfs refusing the classic one while the --pfs one works; the host
as it was after a stop."""

from __future__ import annotations

import re
import signal
import sys

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

POOL = "192.168.192"
SERVER_TUN = f"{POOL}.254"


@pytest.fixture
def ours(impl: testbed.Impl) -> testbed.Impl:
    if impl.reference:
        pytest.skip("peers files and --pfs are dsvpn's extensions")
    return impl


def add_peers(tb: testbed.Testbed, names: list[str]) -> None:
    for name in names:
        argv = [sys.executable, "-m", "dsvpn", "peer", "add", str(tb.workdir / "peers"), name]
        tb.run_in(tb.server, argv, timeout=60)


def start_peer(
    tb: testbed.Testbed, impl: testbed.Impl, i: int, name: str, *, pfs: bool
) -> testbed.Proc:
    """Peer name's client on client host i, with the address `peer add` gave it (.i+1)."""
    return tb.start_client(
        impl, tb.workdir / f"{name}.key", ns=tb.clients[i], name=f"client-{name}",
        local=f"{POOL}.{i + 1}", remote=SERVER_TUN, extra=("-v", "--pfs") if pfs else ("-v",),
    )  # fmt: skip


def forward_secret(status: str) -> dict[str, str]:
    """From `dsvpn status`: each peer's "forward secret" value."""
    out = {}
    for block in status.split("\n\n"):
        peer = re.search(r"^\s*peer:\s+(\S+)", block, re.MULTILINE)
        value = re.search(r"^\s*forward secret:\s+(\S+)", block, re.MULTILINE)
        if peer and value:
            out[peer.group(1)] = value.group(1)
    return out


def test_a_pfs_client_and_a_classic_client_of_one_peers_file(
    tb2: testbed.Testbed, ours: testbed.Impl
) -> None:
    tb = tb2
    before = tb.snapshots()
    add_peers(tb, ["alice", "bob"])
    server = tb.start_server(ours, tb.workdir / "peers")
    alice = start_peer(tb, ours, 0, "alice", pfs=True)
    bob = start_peer(tb, ours, 1, "bob", pfs=False)
    for ns, client in zip(tb.clients, (alice, bob), strict=True):
        ns.wait_ping(SERVER_TUN, 30, procs=(server, client))
        stats = ns.ping(tb.inet.ip, count=5, interval=0.1, size=1200)
        assert stats["received"] >= 4, stats
    lan = re.escape(tb.lan)
    tb.wait_log(server, rf"forward-secret handshake from {lan}\.\S+, peer alice \(client key")
    tb.wait_log(server, rf"session up: peer alice from {lan}\.", 10)
    tb.wait_log(server, rf"session up: peer bob from {lan}\.", 10)
    tb.wait_log(alice, r"session up: connected to \S+ port \d+ \(forward secret\)")
    # Exactly one extended handshake: bob's was the base one.
    assert server.log().count("forward-secret handshake from") == 1, server.log()
    # `dsvpn status` says which session is forward secret.
    shown = tb.run_in(tb.server, [sys.executable, "-m", "dsvpn", "status"], timeout=30).stdout
    assert forward_secret(shown) == {"alice": "yes", "bob": "no"}, shown
    # The two reach each other through the server.
    assert tb.clients[0].ping(f"{POOL}.2", count=3, interval=0.1)["received"] == 3

    assert server.stop(signal.SIGTERM) == 0
    for client in (alice, bob):
        client.stop()
    assert not tb.changes(before), tb.changes(before)


def test_require_pfs_with_a_peers_file(tb2: testbed.Testbed, ours: testbed.Impl) -> None:
    tb = tb2
    before = tb.snapshots()
    add_peers(tb, ["alice", "bob"])
    server = tb.start_server(ours, tb.workdir / "peers", extra=("-v", "--require-pfs"))
    tb.wait_log(server, r"listening on .* \(forward-secret handshakes only\)")
    bob = start_peer(tb, ours, 1, "bob", pfs=False)
    tb.wait_log(server, r"classic handshake from \S+ refused \(--require-pfs\): peer bob", 20)
    assert not tb.clients[1].ping_ok(SERVER_TUN, wait=2)
    alice = start_peer(tb, ours, 0, "alice", pfs=True)
    tb.clients[0].wait_ping(SERVER_TUN, 30, procs=(server, alice))
    stats = tb.clients[0].ping(tb.inet.ip, count=5, interval=0.1)
    assert stats["received"] >= 4, stats
    assert "session up: peer bob" not in server.log()
    assert server.alive() and alice.alive()

    assert server.stop(signal.SIGTERM) == 0
    for client in (alice, bob):
        client.stop()
    assert not tb.changes(before), tb.changes(before)
