"""A server of several clients on several workers (--workers, dsvpn.workers): each peer's
session lives in the worker that owns its address, whose tun queue the kernel gives that
peer's packets; the first worker accepts and hands sessions over. Checked: traffic of three
clients on two workers at once (one of them C DSVPN when DSVPN_REFERENCE is set), a
forward-secret client handed over, a reload that adds and removes peers on either worker,
`dsvpn status` naming each session's worker, and the host as it was after a stop."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import pytest
from test_peers_live import (  # (the e2e directory is on the path, as pytest runs it)
    POOL,
    SERVER_TUN,
    all_transfer,
    client_impls,
    ours,
    peer_add,
    peer_remove,
    start_peer_client,
)

from dsvpn import testbed
from dsvpn._multi import owner

pytestmark = pytest.mark.e2e

__all__ = ["ours"]  # (a fixture)

WORKERS = 2


# A multi-queue tun with three queues, steered as a server of three workers steers it; UDP to
# pool addresses and their 64:ff9b:: twins; which queue each packet came out of.
STEERING = r"""
import fcntl, json, os, select, socket, struct, subprocess, sys, time
from dsvpn._multi import steer
from dsvpn.platform.linux import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TUNSETIFF
pool, queues = sys.argv[1], 3
fds = []
for _ in range(queues):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"dsvq0", flags))
    fds.append(fd)
steer(fds[0], pool + ".0/24", queues)
for cmd in (["ip", "link", "set", "dsvq0", "up"],
            ["ip", "addr", "add", pool + ".254/24", "dev", "dsvq0"],
            ["ip", "-6", "addr", "add", "64:ff9b::" + pool + ".254/96", "dev", "dsvq0"]):
    subprocess.run(cmd, check=True)
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sent = set()
for host in range(1, 13):
    s4.sendto(b"x", (f"{pool}.{host}", 9))
    s6.sendto(b"x", (f"64:ff9b::{pool}.{host}", 9))
    sent |= {f"{pool}.{host}", f"64:ff9b::{pool}.{host}"}
got, deadline = {}, time.monotonic() + 10
while len(got) < len(sent) and time.monotonic() < deadline:
    select.select(fds, [], [], 0.5)
    for q, fd in enumerate(fds):
        try:
            pkt = os.read(fd, 70000)[10:]  # (the virtio_net_hdr first)
        except BlockingIOError:
            continue
        v = pkt[0] >> 4
        dst = (socket.inet_ntoa(pkt[16:20]) if v == 4
               else "64:ff9b::" + socket.inet_ntoa(pkt[36:40]) if v == 6 else None)
        if dst in sent:
            got[dst] = q
print(json.dumps(got))
"""


def test_the_kernel_gives_each_queue_its_peers_packets(tb: testbed.Testbed) -> None:
    proc = tb.run_in(tb.server, [sys.executable, "-c", STEERING, "10.77.0"], timeout=60)
    got = json.loads(proc.stdout)
    assert len(got) == 24, got  # every packet came out of some queue ...
    for dst, queue in got.items():
        # ... the one of the worker that owns its peer (IPv6 twins with their IPv4 address).
        assert queue == owner(dst.removeprefix("64:ff9b::"), "10.77.0.0/24", 3), (dst, got)
    assert set(got.values()) == {0, 1, 2}
    assert "dsvq0" not in tb.server.links()  # gone with its queues


def sessions(tb: testbed.Testbed, impl: testbed.Impl) -> tuple[dict[str, Any], dict[str, int]]:
    """The server's sessions by peer name, and its counters, from `dsvpn status --json`."""
    proc = tb.run_in(tb.server, [*impl.base, "status", "--json"], timeout=30)
    (instance,) = json.loads(proc.stdout)["instances"]
    return {s["peer"]: s for s in instance["sessions"]}, instance["stats"]


def test_three_clients_on_two_workers(tb3: testbed.Testbed, ours: testbed.Impl) -> None:
    tb = tb3
    names = ["alice", "bob", "carol"]
    before = tb.snapshots()
    for name in names:
        peer_add(tb, name)
    server = tb.start_server(ours, tb.workdir / "peers", extra=("-v", "--workers", str(WORKERS)))
    tb.wait_log(server, rf"serving 3 peer\(s\) .* with {WORKERS} workers", 10)
    addresses = {name: f"{POOL}.{i + 1}" for i, name in enumerate(names)}
    where = {name: owner(addresses[name], f"{POOL}.0/24", WORKERS) for name in names}
    assert set(where.values()) == {0, 1}  # both workers have sessions to serve
    impls = client_impls(ours)
    clients = [
        start_peer_client(tb, impls[i], tb.clients[i], name, addresses[name])
        for i, name in enumerate(names)
    ]
    for ns, client in zip(tb.clients, clients, strict=True):
        ns.wait_ping(tb.inet.ip, 30, procs=(server, client))

    all_transfer(tb)
    # The server's own tunnel address answers every peer, whichever worker has it.
    for ns in tb.clients:
        assert ns.ping(SERVER_TUN, count=3, interval=0.1)["received"] == 3
    # Clients on different workers reach each other through the server.
    assert tb.clients[0].ping(addresses["bob"], count=3, interval=0.1)["received"] == 3
    assert tb.clients[1].ping(addresses["carol"], count=3, interval=0.1)["received"] == 3

    live, stats = sessions(tb, ours)
    assert {name: s["worker"] for name, s in live.items()} == where
    assert stats["workers"] == WORKERS and stats["sessions"] == 3, stats
    assert stats["handshakes_ok"] == 3, stats
    # Each session carried the transfer both ways (its ACKs came through its worker's queue).
    for name, s in live.items():
        assert s["rx_bytes"] > 4_000_000 and s["tx_packets"] > 10, (name, s)

    assert server.stop(signal.SIGTERM) == 0
    for client in clients:
        client.stop()
    assert not tb.changes(before), tb.changes(before)


def test_handover_of_a_forward_secret_session_and_reloads(
    tb3: testbed.Testbed, ours: testbed.Impl
) -> None:
    tb = tb3
    for name in ("alice", "bob"):
        peer_add(tb, name)
    server = tb.start_server(ours, tb.workdir / "peers", extra=("-v", "--workers", str(WORKERS)))
    # alice (.1) is the second worker's: her --pfs session is handed over after the handshake.
    assert owner(f"{POOL}.1", f"{POOL}.0/24", WORKERS) == 1
    alice = tb.start_client(
        ours, tb.workdir / "alice.key", ns=tb.clients[0], name="client-alice",
        local=f"{POOL}.1", remote=SERVER_TUN, extra=("-v", "--pfs"),
    )  # fmt: skip
    bob = start_peer_client(tb, ours, tb.clients[1], "bob", f"{POOL}.2")
    tb.clients[0].wait_ping(tb.inet.ip, 30, procs=(server, alice))
    tb.clients[1].wait_ping(tb.inet.ip, 30, procs=(server, bob))
    live, _ = sessions(tb, ours)
    assert live["alice"]["pfs"] is True and live["alice"]["worker"] == 1, live
    assert live["bob"]["worker"] == 0, live

    # carol (.3, the second worker's) is added while the others flow, and connects at once.
    seen = len(server.log())
    peer_add(tb, "carol")
    tb.wait_log(server, r"reloaded .*added carol", 15)
    carol = start_peer_client(tb, ours, tb.clients[2], "carol", f"{POOL}.3")
    tb.clients[2].wait_ping(tb.inet.ip, 30, procs=(server, carol))
    # alice (second worker) is removed: her session ends, bob's and carol's carry on.
    peer_remove(tb, "alice")
    tb.wait_log(server, r"session down: peer alice: removed from the peers file", 15)
    for ns in tb.clients[1:]:
        assert ns.ping(tb.inet.ip, count=5, interval=0.1)["received"] == 5
    assert "session down: peer bob" not in server.log()[seen:]
    assert "session down: peer carol" not in server.log()[seen:]
    live, stats = sessions(tb, ours)
    assert sorted(live) == ["bob", "carol"] and stats["peers"] == 2, (live, stats)

    for proc in (alice, bob, carol):
        proc.stop()
    assert server.stop(signal.SIGTERM) == 0


def test_workers_need_a_peers_file(tb: testbed.Testbed, ours: testbed.Impl) -> None:
    key = tb.write_key()
    proc = tb.run_in(
        tb.server, [*ours.base, "server", str(key), "--workers", "2"], check=False, timeout=30
    )
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines() == [
        f"dsvpn: --workers goes with a peers file; {key} is a key file (one client)"
    ], proc.stderr


def test_without_cap_bpf_one_worker_serves(tb3: testbed.Testbed, ours: testbed.Impl) -> None:
    # A server whose capabilities leave out CAP_BPF (a unit without it, a container) cannot
    # steer the tun's queues: it says so in one line and serves everyone with one worker.
    tb = tb3
    for name in ("alice", "bob"):
        peer_add(tb, name)
    bounded = testbed.Impl(
        ours.name,
        ("setpriv", "--bounding-set=-all,+net_admin,+net_raw,+net_bind_service", *ours.base),
    )
    server = tb.start_server(bounded, tb.workdir / "peers", extra=("-v", "--workers", "2"))
    line = tb.wait_log(server, r"one worker instead of 2", 10)
    assert line.endswith("cannot steer the tun's queues: loading its eBPF program needs CAP_BPF")
    tb.wait_log(server, r"serving 2 peer\(s\) of .*\(pool [^)]*\)$", 10)
    alice = start_peer_client(tb, ours, tb.clients[0], "alice", f"{POOL}.1")
    bob = start_peer_client(tb, ours, tb.clients[1], "bob", f"{POOL}.2")
    tb.clients[0].wait_ping(tb.inet.ip, 30, procs=(server, alice))
    tb.clients[1].wait_ping(tb.inet.ip, 30, procs=(server, bob))
    live, stats = sessions(tb, ours)
    assert sorted(live) == ["alice", "bob"] and "workers" not in stats, stats
    for proc in (alice, bob):
        proc.stop()
    assert server.stop(signal.SIGTERM) == 0
