"""The compiled data plane of a server of several clients (src/dsvpn/_multi.pyx).

Events returned by ``MultiLoop.run`` as ``(code, message)`` (the Event enum of dsvpn._loop):

EV_TIMEOUT       timeout_ms elapsed with no event (message "").
EV_WAKE          wake_fd became readable (drained), or a signal interrupted the wait without
                 a wake_fd: run Python's signal handlers.
EV_SESSION_UP    a peer's session came up: "<name> <client ip>" (a new connection, or one on
                 probation that replaced the old session).
EV_SESSION_DOWN  a peer's session ended: "<name> <why>", why one of "connection closed by
                 peer", "corrupted stream", "send timeout", "read error: ...", "write error:
                 ...", "replaced by a new connection from <ip>", "removed from the peers file".
EV_LOG           one log line: refused or failed handshakes (wrong key, clock, replay,
                 timeout, too many pending, a base hello with require_pfs), a connection on
                 probation and how it ended.
EV_PFS_HELLO     a verified extended hello (docs/protocol.md, Extensions) waits for its reply:
                 "<client ip>". Answer every one from take_pfs_hello() (dsvpn.pfs.answer_hellos
                 does it all).
EV_TUN_ERROR     fatal tun read error (strerror, or "end of file on the tun device").
EV_CONTROL       control_fd is readable (not read by the loop; returned until Python does).
"""

from collections.abc import Iterable
from typing import TypedDict

from dsvpn._loop import Drops, Event

def steer(tun_fd: int, pool: str, workers: int) -> None:
    """Attach to the multi-queue tun of tun_fd the program that gives queue owner(address) the
    packets for each pool address (and its 64:ff9b:: twin); OSError if the kernel refuses."""

def owner(address: str, pool: str, workers: int) -> int:
    """The worker (tun queue) of the peer with this tunnel address."""

class PeerSession(TypedDict):
    """A peer's live session. Times are wall-clock Unix seconds; bytes are those of its
    socket (framing included, the handshake not); packets are frames."""

    endpoint: str  # the client's "ip:port", or "[ip6]:port"
    address: str  # the peer's tunnel IPv4 address
    since: int
    latest_handshake: int
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    drops: Drops
    replacement: str | None  # the endpoint of a new connection on probation, if any
    pfs: bool  # keyed by the forward-secret handshake

class MultiLoop:
    """One tun, one listener, one session per peer (see the module docstring of _multi.pyx).

    The loop never closes tun_fd, listen_fd, wake_fd or control_fd, but sets O_NONBLOCK on
    tun_fd and listen_fd. It owns every accepted socket. At most 64 handshakes are pending
    at once (the oldest is dropped), each with Timeout.ACCEPT_TIMEOUT_MS, which is also the
    time a connection on probation has for its first frame to authenticate. tun_header,
    af_inet, af_inet6 and vnet_hdr as for _loop.Loop.
    Not thread-safe: call every method from one thread (run() releases the GIL inside).
    """

    def __init__(
        self,
        tun_fd: int,
        *,
        listen_fd: int,
        pool: str,
        wake_fd: int = -1,
        control_fd: int = -1,
        mtu: int = 9000,
        vnet_hdr: bool = False,
        tun_header: bool = False,
        af_inet: int = 2,
        af_inet6: int = 10,
        mark: int = 0,
        require_pfs: bool = False,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        """pool: the peers' addresses, "192.168.192.0/24" (a /16 to a /30); mark: SO_MARK of
        accepted sockets (0: none; errors ignored); require_pfs: refuse base hellos (logged,
        naming the client and its peer). No peer is served until set_peers().
        worker of workers (dsvpn.workers): this loop serves the peers owner() gives it; one
        that completes a handshake for another worker's peer reports EV_HANDOFF instead of
        starting the session. listen_fd -1: a loop that only adopt()s sessions."""
    def set_peers(self, peers: Iterable[tuple[str, bytes, str]]) -> list[str]:
        """Serve exactly these (name, 32-byte key, IPv4 address in the pool) from now on.
        A peer whose name, key and address are unchanged keeps its session; the sessions of
        the others end (EV_SESSION_DOWN "<name> removed from the peers file"): their names
        are returned. ValueError (nothing changed) for a duplicate name or address, an
        address outside the pool, a key that is not 32 bytes."""
    def run(self, timeout_ms: int) -> tuple[Event, str]:
        """Forward packets without the GIL until the first event, or until timeout_ms has
        passed (EV_TIMEOUT, ""); a negative timeout waits for an event."""
    def take_pfs_hello(self) -> tuple[int, bytearray, bytes, str] | None:
        """The next verified extended hello waiting for its reply, as (token, state,
        client_public, who), or None. state: the 48-byte transcript state after h1 under the
        peer's key (for Charm.from_state; wipe it after use); client_public: E_c; who: "<client
        ip>, peer <name>", for log lines. Answer each with pfs_reply() or pfs_abort() before
        its handshake deadline."""
    def pfs_reply(self, token: int, reply: bytes, key: bytes | bytearray) -> bool:
        """Send the 96-byte extended reply and start the peer's session with the 32-byte
        session key (direction states, probation as for a base handshake). False if the
        handshake is gone (deadline, dropped, its peer removed) or failed here (logged). The
        loop keeps no reference to key: the caller may wipe it afterwards."""
    def pfs_abort(self, token: int, why: str) -> bool:
        """Close that handshake's connection without a reply and log why (naming the
        client); False if it was gone already."""
    def take_handoffs(self) -> list[tuple[int, int, str, bytearray, bool]]:
        """The sessions authenticated here for peers other workers own (EV_HANDOFF), as
        (worker, socket fd, peer name, 32-byte session key, forward-secret): the fds are the
        caller's from now on. Give each to its worker's adopt(); wipe the keys after."""
    def adopt(self, fd: int, name: str, key: bytes | bytearray, pfs: bool = False) -> bool:
        """Start peer name's session on fd (a socket another worker accepted and answered),
        keyed with the session key (probation as for its own handshakes). The loop owns fd
        from now on: if the peer is gone or not this worker's, fd is closed (logged) and False
        returned. The loop keeps no reference to key."""
    def disconnect(self, name: str | None = None) -> bool:
        """End peer name's session (every session and handshake with None), no event."""
    def close(self) -> None:
        """Close every owned socket; run() raises RuntimeError afterwards."""
    def sessions(self) -> dict[str, PeerSession]:
        """The live sessions, by peer name."""
    def stats(self) -> dict[str, int]:
        """Counters since the loop began: those of _loop.Loop.stats() (tun_*, sock_*,
        frames_*, "<name>_drops", handshakes_ok, handshakes_failed, handshakes_pfs,
        pending_handshakes), and
        peers, sessions, sessions_full (taking no more packets until their socket drains),
        probation (connections waiting for their first frame), probation_closed, replays
        (hellos refused as replayed)."""
    def _set_test_random(self, data: bytes | None) -> None:
        """Test hook: the next handshakes take their 32 random bytes from data."""
    def _set_test_clock(self, t: int | None) -> None:
        """Test hook: fixed wall-clock seconds for the handshake timestamp check."""
    def _set_test_timeouts(self, accept_ms: int | None = None, send_ms: int | None = None) -> None:
        """Test hook: shorten the handshake and send deadlines; None restores the default."""
