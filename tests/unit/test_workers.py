"""Several workers of a server of several clients (dsvpn.workers, dsvpn._multi): who owns which
peer, a session handed over from the accepting worker to its owner, and the Workers front that
makes them one loop to the tunnel (threads, calls between turns, counters, a failing worker)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
from loop_rig import MultiRig, ip4_packet, pump, tun_pair

from dsvpn import _loop as L
from dsvpn import peers_server
from dsvpn._multi import MultiLoop, owner
from dsvpn.errors import DsvpnError
from dsvpn.workers import Workers

POOL = "10.8.0.0/24"
KEYS = {name: os.urandom(32) for name in ("alice", "bob", "carol")}
ADDR = {"alice": "10.8.0.1", "bob": "10.8.0.2", "carol": "10.8.0.3"}
PEERS = [(n, KEYS[n], ADDR[n]) for n in ("alice", "bob", "carol")]

# Workers exist where a tun has several queues (Linux), and wake through an eventfd.
needs_eventfd = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="Linux (eventfd)")


def test_the_owner_is_the_host_part_modulo_the_workers() -> None:
    assert [owner(f"10.8.0.{h}", POOL, 2) for h in (1, 2, 3, 4)] == [1, 0, 1, 0]
    assert [owner(f"10.8.0.{h}", POOL, 3) for h in (1, 2, 3, 4)] == [1, 2, 0, 1]
    assert owner("10.8.3.7", "10.8.0.0/16", 4) == (3 * 256 + 7) % 4
    assert {owner(f"10.8.0.{h}", POOL, 1) for h in range(1, 254)} == {0}


class Second:
    """The second of two workers: a loop with a tun stand-in of its own and no listener."""

    def __init__(self) -> None:
        self.tun, self.peer_tun = tun_pair()
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.owns_wake = True  # until a Workers takes it (and closes it)
        self.loop = MultiLoop(
            self.tun.fileno(), listen_fd=-1, pool=POOL, worker=1, workers=2, wake_fd=self.wake
        )
        self.loop.set_peers(PEERS)

    def close(self) -> None:
        self.loop.close()
        self.tun.close()
        self.peer_tun.close()
        if self.owns_wake:
            os.close(self.wake)


@pytest.fixture
def pair() -> Iterator[tuple[MultiRig, Second]]:
    second = Second()
    with MultiRig(PEERS, pool=POOL, workers=2) as first:
        yield first, second
    second.close()


@needs_eventfd
def test_a_session_of_another_workers_peer_is_handed_over(pair: tuple[MultiRig, Second]) -> None:
    first, second = pair
    bob = first.client("bob")  # .2: the first worker's own
    alice = first.connect("alice")  # .1: the second worker's
    pump(first.loop, lambda e: (L.EV_HANDOFF, "") in e)
    alice.finish()  # answered by the first worker
    ((worker, fd, name, key, pfs),) = first.loop.take_handoffs()
    assert (worker, name, pfs) == (1, "alice", False)
    assert bytes(key) == alice.session_key
    assert first.loop.take_handoffs() == []
    assert "alice" not in first.loop.sessions()

    assert second.loop.adopt(fd, name, key, pfs) is True
    pump(second.loop, lambda e: (L.EV_SESSION_UP, "alice 127.0.0.1") in e)
    assert sorted(second.loop.sessions()) == ["alice"]
    assert sorted(first.loop.sessions()) == ["bob"]
    # alice's packets reach the second worker's tun queue, and packets for her leave from it.
    alice.send(ip4_packet(ADDR["alice"], "10.0.0.9"))
    second.peer_tun.setblocking(False)
    deadline = time.monotonic() + 5
    while True:
        second.loop.run(2)
        try:
            assert second.peer_tun.recv(70000) == ip4_packet(ADDR["alice"], "10.0.0.9")
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, "nothing written to the second tun"
    second.peer_tun.send(ip4_packet("10.0.0.9", ADDR["alice"]))
    alice.sock.settimeout(0.01)
    deadline = time.monotonic() + 5
    while True:
        second.loop.run(2)
        try:
            assert alice.recv() == ip4_packet("10.0.0.9", ADDR["alice"])
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "nothing for alice"
    # The first worker counts the handshake it did not keep nowhere: the owner counts it.
    assert first.loop.stats()["handshakes_ok"] == 1
    assert second.loop.stats()["handshakes_ok"] == 1
    bob.send(ip4_packet(ADDR["bob"], "10.0.0.9"))


@needs_eventfd
def test_a_handover_for_a_peer_gone_meanwhile_is_closed(pair: tuple[MultiRig, Second]) -> None:
    first, second = pair
    alice = first.connect("alice")
    pump(first.loop, lambda e: (L.EV_HANDOFF, "") in e)
    alice.finish()
    ((_, fd, name, key, _),) = first.loop.take_handoffs()
    second.loop.set_peers([p for p in PEERS if p[0] != "alice"])  # a reload came first
    assert second.loop.adopt(fd, name, key) is False
    assert second.loop.run(0) == (
        L.EV_LOG,
        "peer alice: session closed before it started: its peer was removed or moved meanwhile",
    )
    alice.sock.settimeout(5)
    assert alice.sock.recv(1) == b""  # closed
    assert second.loop.stats()["handshakes_failed"] == 1
    # Neither can a worker adopt a peer that is not its own.
    bob = first.client("bob")
    other = os.dup(bob.sock.fileno())
    assert second.loop.adopt(other, "bob", bytes(32)) is False


@needs_eventfd
def test_adopt_checks_the_key_length(pair: tuple[MultiRig, Second]) -> None:
    _, second = pair
    with pytest.raises(ValueError, match="32 bytes"):
        second.loop.adopt(-1, "alice", b"short")


class Front:
    """Workers over a MultiRig (the first worker) and a Second run in its own thread."""

    def __init__(self, first: MultiRig, second: Second) -> None:
        self.events: list[tuple[int, str]] = []
        self.woken = threading.Event()
        self.second = second
        second.owns_wake = False
        self.workers = Workers(
            first.loop, [(second.loop, second.wake)], self._event, self.woken.set,
            close_fds=[second.wake],
        )  # fmt: skip

    def _event(self, event: int, message: str) -> None:
        self.events.append((event, message))
        peers_server.log_event(event, message)  # raises on a tun error, as in the tunnel

    def wait_event(self, wanted: tuple[int, str]) -> None:
        """Run the front until wanted came from either worker."""
        deadline = time.monotonic() + 5
        while wanted not in self.events:
            assert time.monotonic() < deadline, f"no {wanted} from the workers: {self.events}"
            event = self.workers.run(5)
            if event[0] not in (L.EV_TIMEOUT, L.EV_HANDOFF):
                self.events.append(event)


@pytest.fixture
def front(pair: tuple[MultiRig, Second]) -> Iterator[tuple[MultiRig, Front]]:
    first, second = pair
    f = Front(first, second)
    yield first, f
    f.workers.close()
    assert not f.workers.others[0].thread.is_alive()


@needs_eventfd
def test_the_front_hands_over_and_answers_for_every_worker(
    front: tuple[MultiRig, Front],
) -> None:
    first, f = front
    alice, carol = first.connect("alice"), first.connect("carol")  # both the second's
    bob = first.connect("bob")
    for name in ("alice", "carol", "bob"):
        f.wait_event((L.EV_SESSION_UP, f"{name} 127.0.0.1"))
    for c in (alice, bob, carol):
        c.finish()
    live = f.workers.sessions()
    assert {n: s["worker"] for n, s in live.items()} == {  # type: ignore[typeddict-item]
        "alice": 1, "bob": 0, "carol": 1,
    }  # fmt: skip
    stats = f.workers.stats()
    assert stats["workers"] == 2 and stats["sessions"] == 3 and stats["peers"] == 3
    assert stats["handshakes_ok"] == 3
    # A reload reaches every worker: alice (second) and bob (first) go, carol stays.
    ended = f.workers.set_peers([p for p in PEERS if p[0] == "carol"])
    assert sorted(ended) == ["alice", "bob"]
    assert (L.EV_SESSION_DOWN, "alice removed from the peers file") in f.events
    assert sorted(f.workers.sessions()) == ["carol"]
    assert f.workers.disconnect("carol") is True
    assert f.workers.sessions() == {}
    assert f.workers.disconnect("carol") is False
    bob.sock.close()


@needs_eventfd
def test_a_failing_worker_stops_the_server(front: tuple[MultiRig, Front]) -> None:
    _, f = front
    f.second.peer_tun.close()  # the second worker's tun ends
    assert f.woken.wait(5)
    with pytest.raises(DsvpnError, match=r"^worker 1: tun device failed: end of file"):
        f.workers.run(0)
    with pytest.raises(DsvpnError, match="worker 1 has stopped"):
        f.workers.sessions()
