"""One server, several clients, a key and a tunnel address each (a peers file): traffic of
three clients at once (one of them C DSVPN when DSVPN_REFERENCE is set), isolation, keys not
in the file, replays, reloads on SIGHUP, a killed client, and the host as it was after a stop
or a crash."""

from __future__ import annotations

import os
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

POOL = "192.168.192"
SERVER_TUN = f"{POOL}.254"


def peer_add(tb: testbed.Testbed, name: str, address: str | None = None) -> list[str]:
    """`dsvpn peer add` on the server host: the client's command line it prints."""
    argv = [sys.executable, "-m", "dsvpn", "peer", "add", str(tb.workdir / "peers"), name]
    proc = tb.run_in(tb.server, [*argv, *([address] if address else [])], timeout=60)
    return proc.stdout.split()


def peer_remove(tb: testbed.Testbed, name: str) -> str:
    argv = [sys.executable, "-m", "dsvpn", "peer", "remove", str(tb.workdir / "peers"), name]
    return tb.run_in(tb.server, argv, timeout=60).stderr


def start_peer_client(
    tb: testbed.Testbed, impl: testbed.Impl, ns: testbed.Netns, name: str, address: str,
    key: str | None = None,
) -> testbed.Proc:  # fmt: skip
    """A client with the key of peer `key` (default: its own) and the given tunnel address."""
    return tb.start_client(
        impl, tb.workdir / f"{key or name}.key", ns=ns, name=f"client-{name}",
        local=address, remote=SERVER_TUN,
    )  # fmt: skip


def all_transfer(tb: testbed.Testbed, nbytes: int = 4_000_000) -> None:
    """Every client host sends nbytes to the far host at once, checked at both ends; the far
    host sees the server's address (NAT)."""
    n = len(tb.clients)
    with ThreadPoolExecutor(n) as pool:
        results = list(
            pool.map(
                lambda i: tb.transfer(tb.clients[i], tb.inet, tb.inet.ip, nbytes, port=5301 + i),
                range(n),
            )
        )
    for r in results:
        assert r["received"]["bytes"] == r["sent"]["bytes"] == nbytes, r
        assert r["received"]["sha256"] == r["sent"]["sha256"] == r["sent"]["echo"], r
        assert r["received"]["peer"] == tb.server_ext_ip


def client_impls(impl: testbed.Impl) -> list[testbed.Impl]:
    """Ours three times, or the C reference for the last client when DSVPN_REFERENCE names it."""
    path = os.environ.get("DSVPN_REFERENCE")
    return [impl, impl, testbed.reference(path) if path else impl]


@pytest.fixture
def ours(impl: testbed.Impl) -> testbed.Impl:
    if impl.reference:
        pytest.skip("a peers file is dsvpn's extension: the C server has none")
    return impl


def serve(tb: testbed.Testbed, impl: testbed.Impl, names: list[str], **kw: Any) -> testbed.Proc:
    for name in names:
        peer_add(tb, name)
    return tb.start_server(impl, tb.workdir / "peers", **kw)


def test_three_clients_at_once(tb3: testbed.Testbed, ours: testbed.Impl) -> None:
    tb = tb3
    names = ["alice", "bob", "carol"]
    before = tb.snapshots()
    for name in names:
        command = peer_add(tb, name)
        # The command `peer add` prints is the client's: its address and the server's.
        assert command[:3] == ["dsvpn", "client", f"{name}.key"]
        assert command[-2:] == [f"{POOL}.{names.index(name) + 1}", SERVER_TUN]
    server = tb.start_server(ours, tb.workdir / "peers")
    impls = client_impls(ours)
    clients = [
        start_peer_client(tb, impls[i], tb.clients[i], name, f"{POOL}.{i + 1}")
        for i, name in enumerate(names)
    ]
    for ns, client in zip(tb.clients, clients, strict=True):
        ns.wait_ping(SERVER_TUN, 30, procs=(server, client))
        ns.wait_ping(tb.inet.ip, 15, procs=(server, client))
    for name in names:
        tb.wait_log(server, rf"session up: peer {name} from {re.escape(tb.lan)}\.", 10)

    all_transfer(tb)
    # Clients reach each other through the server, each at its own address.
    assert tb.clients[0].ping(f"{POOL}.2", count=3, interval=0.1)["received"] == 3
    # `dsvpn status` shows each peer by name, with its address.
    shown = tb.run_in(tb.server, [sys.executable, "-m", "dsvpn", "status"], timeout=30).stdout
    assert "listening, 3 clients" in shown, shown
    for i, name in enumerate(names):
        assert "peer:" in shown and f"{name} ({POOL}.{i + 1})" in shown, shown

    assert server.stop(signal.SIGTERM) == 0
    for client in clients:
        client.stop()
    assert not tb.changes(before), tb.changes(before)


def test_keys_and_addresses_are_each_peers_own(tb3: testbed.Testbed, ours: testbed.Impl) -> None:
    tb = tb3
    server = serve(tb, ours, ["alice", "bob", "carol"])
    alice = start_peer_client(tb, ours, tb.clients[0], "alice", f"{POOL}.1")
    bob = start_peer_client(tb, ours, tb.clients[1], "bob", f"{POOL}.2")
    tb.clients[0].wait_ping(SERVER_TUN, 30, procs=(server, alice))
    tb.clients[1].wait_ping(SERVER_TUN, 30, procs=(server, bob))

    # carol's key, but bob's address: her packets are dropped (spoofed), she gets none of bob's.
    impostor = start_peer_client(tb, ours, tb.clients[2], "impostor", f"{POOL}.2", key="carol")
    tb.wait_log(server, r"session up: peer carol", 20)
    assert not tb.clients[2].ping_ok(SERVER_TUN, wait=2)
    assert not tb.clients[2].ping_ok(tb.inet.ip, wait=2)
    (tun,) = tb.clients[2].tun_links()
    received_before = tb.clients[2].link_stats(tun)["rx_packets"]
    stats = tb.server.ping(f"{POOL}.2", count=5, interval=0.1)
    assert stats["received"] == 5, stats  # bob answers
    assert tb.clients[2].link_stats(tun)["rx_packets"] == received_before
    assert impostor.alive()
    assert impostor.stop() == 0

    # A key that is in no peer's line is refused; nothing changes for the others.
    stranger = tb.write_key("stranger.key")
    intruder = tb.start_client(ours, stranger, ns=tb.clients[2], name="intruder",
                               local=f"{POOL}.9", remote=SERVER_TUN)  # fmt: skip
    tb.wait_log(server, r"authentication failed from", 20)
    assert not tb.clients[2].ping_ok(SERVER_TUN, wait=2)
    intruder.stop()
    for ns in tb.clients[:2]:
        assert ns.ping(tb.inet.ip, count=5, interval=0.1)["received"] == 5


# A genuine hello of a peer (the first 72 bytes its client sends), as an eavesdropper records it.
HELLO = r"""
import os, struct, sys, time
from dsvpn import charm
key_path, out = sys.argv[1], sys.argv[2]
key = open(key_path, "rb").read()
kx = charm.Charm(key, b"VPN Key Exchange")
body = os.urandom(32) + struct.pack("<Q", int(time.time()))
open(out, "wb").write(body + kx.hash(body))
print("recorded", flush=True)
"""

REPLAY = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(open(sys.argv[3], "rb").read())
s.settimeout(10)
print("answer", len(s.recv(64)), flush=True)
"""


def test_a_replayed_hello_from_another_host(tb3: testbed.Testbed, ours: testbed.Impl) -> None:
    tb = tb3
    server = serve(tb, ours, ["alice"])
    hello = tb.workdir / "hello"
    tb.run_in(tb.clients[0], [sys.executable, "-c", HELLO, str(tb.workdir / "alice.key"),
                              str(hello)])  # fmt: skip
    # The hello is used once, by a connection that the server answers ...
    first = tb.run_in(tb.clients[0], [sys.executable, "-c", REPLAY, tb.server.ip or "", "443",
                                      str(hello)])  # fmt: skip
    assert first.stdout.split() == ["answer", "64"]
    alice = start_peer_client(tb, ours, tb.clients[0], "alice", f"{POOL}.1")
    tb.clients[0].wait_ping(tb.inet.ip, 30, procs=(server, alice))
    seen = len(server.log())
    # ... and replayed from another host while alice's session is live: refused.
    again = tb.run_in(tb.clients[1], [sys.executable, "-c", REPLAY, tb.server.ip or "", "443",
                                      str(hello)], check=False)  # fmt: skip
    assert again.stdout.split() == ["answer", "0"], again
    tb.wait_log(server, r"replayed handshake from .* refused \(peer alice\)", 10)
    stats = tb.clients[0].ping(tb.inet.ip, count=10, interval=0.1)
    assert stats["received"] == 10, stats
    assert "session down" not in server.log()[seen:]


def test_reload_adds_and_removes_while_others_flow(
    tb3: testbed.Testbed, ours: testbed.Impl
) -> None:
    tb = tb3
    server = serve(tb, ours, ["alice", "bob"])
    alice = start_peer_client(tb, ours, tb.clients[0], "alice", f"{POOL}.1")
    bob = start_peer_client(tb, ours, tb.clients[1], "bob", f"{POOL}.2")
    tb.clients[0].wait_ping(tb.inet.ip, 30, procs=(server, alice))
    tb.clients[1].wait_ping(tb.inet.ip, 30, procs=(server, bob))
    # alice pings all along, through the reloads.
    pinger = tb.start(tb.clients[0], [sys.executable, "-c", testbed.PING, tb.inet.ip or "",
                                      "60", "0.1", "1", "56"], "alice-pings")  # fmt: skip
    # carol is added: `peer add` tells the server, she gets in at once.
    out = peer_add(tb, "carol")
    assert out[-2:] == [f"{POOL}.3", SERVER_TUN]
    tb.wait_log(server, r"reloaded .*: added carol \(3 peer\(s\)\)", 10)
    carol = start_peer_client(tb, ours, tb.clients[2], "carol", f"{POOL}.3")
    tb.clients[2].wait_ping(tb.inet.ip, 30, procs=(server, carol))
    # bob is removed: his session ends, and he cannot come back.
    assert "told the server" in peer_remove(tb, "bob")
    tb.wait_log(server, r"session down: peer bob: removed from the peers file", 10)
    tb.wait_log(bob, r"session down|handshake", 10)
    assert not tb.clients[1].ping_ok(tb.inet.ip, wait=2)
    # A peers file with an error keeps the peers served so far.
    peers_file = tb.workdir / "peers"
    good = peers_file.read_text()
    peers_file.write_text(good + "dave nothere.key 192.168.192.9\n")
    server.send_signal(signal.SIGHUP)
    tb.wait_log(server, r"reload failed, still serving the previous peers: .*peers:\d+: key file",
                10)  # fmt: skip
    assert tb.clients[2].ping(tb.inet.ip, count=3, interval=0.1)["received"] == 3
    peers_file.write_text(good)
    pinger.wait(30)
    result = testbed.json.loads(pinger.log().splitlines()[-1])
    # Not one of alice's pings was lost meanwhile.
    assert result["received"] == result["sent"] == 60, result
    assert server.alive()


def test_killing_one_client_leaves_the_others(tb3: testbed.Testbed, ours: testbed.Impl) -> None:
    tb = tb3
    server = serve(tb, ours, ["alice", "bob"])
    alice = start_peer_client(tb, ours, tb.clients[0], "alice", f"{POOL}.1")
    bob = start_peer_client(tb, ours, tb.clients[1], "bob", f"{POOL}.2")
    for ns, c in ((tb.clients[0], alice), (tb.clients[1], bob)):
        ns.wait_ping(tb.inet.ip, 30, procs=(server, c))
    pinger = tb.start(tb.clients[0], [sys.executable, "-c", testbed.PING, tb.inet.ip or "",
                                      "30", "0.1", "1", "56"], "alice-pings")  # fmt: skip
    bob.kill()
    pinger.wait(30)
    result = testbed.json.loads(pinger.log().splitlines()[-1])
    assert result["received"] == 30, result
    # bob comes back with a new connection: it replaces his old session (after probation
    # when the server has not noticed yet).
    again = start_peer_client(tb, ours, tb.clients[1], "bob-again", f"{POOL}.2", key="bob")
    tb.clients[1].wait_ping(tb.inet.ip, 40, procs=(server, again))


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_host_is_left_as_it_was(tb3: testbed.Testbed, ours: testbed.Impl, how: str) -> None:
    tb = tb3
    for name in ("alice", "bob"):
        peer_add(tb, name)
    before = testbed.snapshot(tb.server)
    server = tb.start_server(ours, tb.workdir / "peers", extra=("-v", "--firewall", "nft")
                             if how == "sigkill" else ("-v",))  # fmt: skip
    alice = start_peer_client(tb, ours, tb.clients[0], "alice", f"{POOL}.1")
    tb.clients[0].wait_ping(tb.inet.ip, 30, procs=(server, alice))
    rules = testbed.snapshot(tb.server)
    text = rules["iptables"] + rules.get("nft", "")
    assert f"{POOL}.0/24" in text, text
    if how == "sigterm":
        assert server.stop(signal.SIGTERM) == 0
    else:
        server.kill()
        proc = tb.run_in(tb.server, ours.cleanup_argv(), check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
    alice.stop()
    assert testbed.diff_snapshots(before, testbed.snapshot(tb.server)) == ""


# -- many peers -----------------------------------------------------------------------------------

# A small client for many peers at once, built on dsvpn.charm: for each key, a TCP connection,
# a real handshake, then ICMP echo requests from the peer's tunnel address to the server's,
# whose replies come back through the tunnel. Prints one JSON line with the answers counted.
MANY = r"""
import json, os, select, socket, struct, sys, time
from dsvpn import charm
host, port, server_tun = sys.argv[1], int(sys.argv[2]), sys.argv[3]
peers = [line.split() for line in open(sys.argv[4])]  # key file, address
rounds = int(sys.argv[5])

def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF

def echo(src, dst, ident, seq):
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"dsvpn" * 4
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + icmp

class Peer:
    def __init__(self, key, address):
        self.address = address
        self.sock = socket.create_connection((host, port), timeout=30)
        kx = charm.Charm(key, b"VPN Key Exchange")
        body = os.urandom(32) + struct.pack("<Q", int(time.time()))
        self.sock.sendall(body + kx.hash(body))
        self.kx, self.buf = kx, b""

    def finish(self):
        pkt2 = b""
        while len(pkt2) < 64:
            chunk = self.sock.recv(64 - len(pkt2))
            if not chunk:
                raise SystemExit(f"{self.address}: refused")
            pkt2 += chunk
        assert self.kx.hash(pkt2[:32]) == pkt2[32:], "the server's reply does not authenticate"
        k = self.kx.hash(b"")
        self.tx, self.rx = charm.Charm(k, bytes(16)), charm.Charm(k, b"\1" + bytes(15))
        self.sock.setblocking(False)

    def send(self, pkt):
        ct, tag = self.tx.encrypt(pkt)
        self.sock.setblocking(True)
        self.sock.sendall(struct.pack("<H", len(pkt)) + tag[:6] + ct)
        self.sock.setblocking(False)

    def frames(self):
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        if not data:
            raise SystemExit(f"{self.address}: closed")
        self.buf += data
        out = []
        while len(self.buf) >= 8:
            n = struct.unpack("<H", self.buf[:2])[0]
            if len(self.buf) < 8 + n:
                break
            out.append(self.rx.decrypt(self.buf[8:8 + n], self.buf[2:8], 6))
            self.buf = self.buf[8 + n:]
        return out

conns = [Peer(open(k, "rb").read(), a) for k, a in peers]
for c in conns:
    c.finish()
print("up", len(conns), flush=True)
answers = 0
for r in range(rounds):
    for i, c in enumerate(conns):
        c.send(echo(c.address, server_tun, i, r))
    pending = {i for i in range(len(conns))}
    deadline = time.monotonic() + 20
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select([conns[i].sock for i in pending], [], [], 1)
        for i in list(pending):
            if conns[i].sock in ready:
                for pkt in conns[i].frames():
                    if len(pkt) >= 28 and pkt[9] == 1 and pkt[20] == 0 \
                            and socket.inet_ntoa(pkt[16:20]) == conns[i].address:
                        pending.discard(i)
                        answers += 1
print(json.dumps({"peers": len(conns), "rounds": rounds, "answers": answers}), flush=True)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_200_peers_50_sessions(tb: testbed.Testbed, ours: testbed.Impl) -> None:
    lines = ["pool 192.168.192.0/24 192.168.192.254"]
    for i in range(200):
        key = tb.write_key(f"p{i}.key")
        lines.append(f"p{i} {key.name} {POOL}.{i + 1}")
    peers_file = tb.workdir / "peers"
    peers_file.write_text("\n".join(lines) + "\n")
    peers_file.chmod(0o600)
    server = tb.start_server(ours, peers_file)
    # 50 of them at once, spread over the file (the last one included)
    chosen = [*range(0, 196, 4), 199]
    listing = tb.workdir / "many"
    listing.write_text("".join(f"{tb.workdir / f'p{i}.key'} {POOL}.{i + 1}\n" for i in chosen))
    proc = tb.run_in(tb.client, [sys.executable, "-c", MANY, tb.server.ip or "", "443",
                                 SERVER_TUN, str(listing), "5"], timeout=240)  # fmt: skip
    result = testbed.json.loads(proc.stdout.splitlines()[-1])
    assert result == {"peers": 50, "rounds": 5, "answers": 250}, proc.stdout
    assert server.log().count("session up: peer") == 50
    # Python and the loop's buffers included (sessions' buffers are touched only as used).
    assert rss_kib(server.pid) < 64 * 1024
