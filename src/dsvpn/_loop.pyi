"""The compiled data plane (src/dsvpn/_loop.pyx): poll loop, framing, handshakes, no GIL.

The enums are declared once, in _loop.pxd; their values are not repeated here.

Events returned by ``Loop.run`` as ``(code, message)``:

EV_TIMEOUT           timeout_ms elapsed with no event (message "").
EV_WAKE              wake_fd became readable (the loop drained it) or, without a wake_fd, a
                     signal interrupted poll(): run Python's signal handlers.
EV_SESSION_UP        a session authenticated; message: the peer IP (IPv4-mapped shown as IPv4).
EV_SESSION_DOWN      the active session ended; message: "connection closed by peer",
                     "corrupted stream" (a bad tag), "send timeout", "read error: ...",
                     "write error: ...".
EV_LOG               one log line (server: refused connection from another IP, failed or
                     timed-out handshake, pending handshake dropped because the table is full,
                     the system's random source failed).
EV_HANDSHAKE_FAILED  client: the handshake on the socket given to connect() failed (also when
                     the system's random source fails: "the system's random source failed: ...").
EV_TUN_ERROR         fatal tun read error; message: strerror, or "end of file on the tun device".
EV_CONTROL           control_fd is readable (message ""). The loop does not read it: until
                     Python does, every run() returns EV_CONTROL again at once.
EV_PFS_HELLO         server: a verified extended hello (docs/protocol.md, Extensions) waits for
                     its reply; message: the peer IP. Take every waiting one with
                     take_pfs_hello() (dsvpn.pfs.answer_hellos does it all).
EV_HANDOFF           MultiLoop of several workers: a session authenticated for a peer another
                     worker owns; take it with take_handoffs() (dsvpn.workers does).
"""

from enum import IntEnum
from typing import Final, TypedDict

class Event(IntEnum):
    EV_TIMEOUT = ...
    EV_WAKE = ...
    EV_SESSION_UP = ...
    EV_SESSION_DOWN = ...
    EV_LOG = ...
    EV_HANDSHAKE_FAILED = ...
    EV_TUN_ERROR = ...
    EV_CONTROL = ...
    EV_PFS_HELLO = ...
    EV_HANDOFF = ...

class Drop(IntEnum):
    """Why a packet was dropped; the counter is named after the member ("DROP_NON_IP":
    "non_ip" in session() drops, "non_ip_drops" in stats())."""

    DROP_BAD_TAG = ...
    DROP_OVERSIZE = ...
    DROP_NO_SESSION = ...
    DROP_SPOOFED = ...
    DROP_CONGESTION = ...
    DROP_NON_IP = ...
    DROP_LINK_LOCAL = ...

class Timeout(IntEnum):
    """Milliseconds (docs/protocol.md, Timeouts and limits)."""

    TIMEOUT_MS = ...
    ACCEPT_TIMEOUT_MS = ...

# The members of Event, also as module attributes.
EV_TIMEOUT: Final[Event]
EV_WAKE: Final[Event]
EV_SESSION_UP: Final[Event]
EV_SESSION_DOWN: Final[Event]
EV_LOG: Final[Event]
EV_HANDSHAKE_FAILED: Final[Event]
EV_TUN_ERROR: Final[Event]
EV_CONTROL: Final[Event]
EV_PFS_HELLO: Final[Event]
EV_HANDOFF: Final[Event]

class Drops(TypedDict):
    """Dropped packets by reason (Drop):
    bad_tag     frames with a wrong tag (each one ends its session)
    oversize    frames larger than the MTU; tun packets over 65535 bytes, or TSO packets
                that cannot be cut
    no_session  tun packets dropped for want of a session in the gap before this one
    spoofed     (client_ip4 set) packets whose source is not the client's tunnel address
    congestion  tun packets dropped by the bufferbloat control
    non_ip      (client_ip4 set) payloads that are not an IPv4/IPv6 packet
    link_local  (client_ip4 set) IPv6 packets that only the client's own link may see: from
                a link-local, unspecified or multicast source to a link-local address or a
                link-scope multicast group (router solicitations, MLD reports); not spoofed
    """

    bad_tag: int
    oversize: int
    no_session: int
    spoofed: int
    congestion: int
    non_ip: int
    link_local: int

class Session(TypedDict):
    """One session's counters. Times are wall-clock Unix seconds; bytes are those of the
    session socket (framing included, the handshake not); packets are frames (received ones
    authenticated, empty frames included)."""

    endpoint: str  # the peer's "ip:port", or "[ip6]:port"
    since: int  # when the session came up
    latest_handshake: int  # its latest handshake (today always its only one)
    pfs: bool  # keyed by the forward-secret handshake
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    drops: Drops

class EndedSession(Session):
    """An ended session's totals. reason: the EV_SESSION_DOWN message, or "replaced by a new
    session from the same address", "replaced by a new connection", "disconnected locally",
    "loop closed"."""

    ended: int
    reason: str

def tcp_options(fd: int, mark: int = 0) -> None:
    """The TCP options of docs/protocol.md, TCP options, plus TCP_NODELAY. mark != 0 also sets
    SO_MARK (Linux; ignored elsewhere), so that routing rules can keep the tunnel's own
    connection out of the tunnel: failing to set it raises OSError. Other errors are ignored
    (those options only tune)."""

class Loop:
    """One tunnel endpoint.

    The loop never closes tun_fd, listen_fd, wake_fd or control_fd, but it sets O_NONBLOCK on
    tun_fd (it drains the tun until EAGAIN). It owns every accepted or connected session socket.
    Server: at most 8 handshakes are pending at once (the oldest is dropped), each with
    Timeout.ACCEPT_TIMEOUT_MS for the whole handshake, classic or extended (a hello whose first
    72 bytes are no classic hello is read on as an extended one). Another IP is refused while
    a session is active. A handshake from the active client's IP puts its connection on
    probation: it replaces the session once its first frame authenticates, or when the session
    ends; one connection at most is on probation (a newer one takes its place), and it is closed
    (logged) if no frame has authenticated within Timeout.ACCEPT_TIMEOUT_MS of its handshake.

    Frames from the peer: a bad tag ends the session ("corrupted stream"); an empty frame is
    accepted and writes nothing (as the reference: it works as a keepalive); a payload larger
    than mtu is dropped; with client_ip4, a payload that is not an IPv4/IPv6 packet from the
    client's tunnel address is dropped. Every drop is counted (Drop).
    Not thread-safe: call every method from one thread (run() releases the GIL inside).
    """

    def __init__(
        self,
        tun_fd: int,
        key: bytes,
        *,
        is_server: bool,
        wake_fd: int = -1,
        listen_fd: int = -1,
        control_fd: int = -1,
        tun_header: bool = False,
        af_inet: int = 2,
        af_inet6: int = 10,
        mtu: int = 9000,
        vnet_hdr: bool = False,
        client_ip4: str | None = None,
        client_ip6: str | None = None,
        mark: int = 0,
        require_pfs: bool = False,
    ) -> None:
        """vnet_hdr: the tun was opened with IFF_VNET_HDR (Linux; excludes tun_header). TCP
        segments are then merged into GSO packets on the way into the tun, and TSO packets
        from the tun are cut into ordinary packets before framing (tun_vnet.h).
        mtu: the tun's MTU (68..65535); larger packets from the peer are dropped.
        client_ip4 (server): the client's tunnel IPv4 address; client_ip6 defaults to its
        IPv6 twin (config.tun_ip6). None: packets from the peer may have any source.
        control_fd: run() returns EV_CONTROL while it is readable.
        mark: SO_MARK of the sockets the loop accepts (0: none); errors are ignored there.
        require_pfs (server): refuse classic handshakes (logged, naming the client)."""
    def connect(self, fd: int) -> None:
        """Client: start the handshake on a connected TCP socket.

        The loop takes ownership of fd (pass ``sock.detach()``) and closes it when the session
        or handshake ends, or at once if connect() raises. pkt1 is sent at once; pkt2 is
        awaited inside run() until Timeout.TIMEOUT_MS. Any previous session or handshake is
        dropped first.
        """
    def adopt(self, fd: int, key: bytes | bytearray) -> None:
        """Client: fd has completed the forward-secret handshake (dsvpn.pfs) and key is its
        32-byte session key: make it the session, as connect() does after a classic handshake
        (EV_SESSION_UP). One empty frame is sent at once, so that the server takes the
        connection off probation without waiting for traffic. The loop owns fd from now on,
        also when this raises. Any previous session or handshake is dropped first."""
    def take_pfs_hello(self) -> tuple[int, bytearray, bytes, str] | None:
        """Server: the next verified extended hello waiting for its reply, as (token, state,
        client_public, peer_ip), or None. state: the 48-byte transcript state after H1 (for
        Charm.from_state; wipe it after use); client_public: E_c. Answer each with
        pfs_reply() or pfs_abort() before its handshake deadline."""
    def pfs_reply(self, token: int, reply: bytes, key: bytes | bytearray) -> bool:
        """Server: send the 96-byte extended reply and complete that handshake with the 32-byte
        session key (direction states as classic). False if the handshake is gone (deadline,
        dropped) or failed here (logged)."""
    def pfs_abort(self, token: int, why: str) -> bool:
        """Server: close that handshake's connection without a reply and log why (naming the
        client); False if it was gone already."""
    def run(self, timeout_ms: int) -> tuple[Event, str]:
        """Forward packets without the GIL until the first event, or until timeout_ms has
        passed (EV_TIMEOUT, ""); a negative timeout waits for an event. Returns promptly even
        under full load."""
    def disconnect(self) -> None:
        """Drop the session and every handshake in progress (no event is reported)."""
    def close(self) -> None:
        """Close every owned socket; run() raises RuntimeError afterwards."""
    @property
    def session_active(self) -> bool: ...
    @property
    def peer(self) -> str | None: ...
    def session(self) -> Session | None:
        """The active session's counters (since it came up), or None without a session."""
    def ended_session(self) -> EndedSession | None:
        """The last session that ended, with its totals and why; None if none has ended."""
    def stats(self) -> dict[str, int]:
        """Counters since the loop began: tun_rx_packets, tun_rx_bytes, tun_tx_packets,
        tun_tx_errors, sock_rx_bytes, sock_tx_bytes (session bytes, handshakes not counted),
        frames_rx, frames_tx, "<name>_drops" for each Drop (see Drops), tun_writes (write
        calls to the tun; fewer than tun_tx_packets when segments were merged), tun_merged
        (packets written as part of a merged GSO packet), short_drops (tun_header mode:
        packets < 20 bytes not written), handshakes_ok, handshakes_failed, handshakes_pfs
        (completed forward-secret handshakes, also in handshakes_ok), probation (1 while a
        connection is on probation), probation_closed (connections closed on probation: bad
        first frame, closed, superseded, or past its deadline), pending_handshakes,
        rx_buffered, tx_queued (framed bytes not yet sent), tun_queued (bytes read from the tun
        waiting in the flow queue to be framed)."""
    def _set_test_random(self, data: bytes | None) -> None:
        """Test hook: the next handshakes take their 32 random bytes from data, 32 at a time
        (then the OS again)."""
    def _set_test_random_failure(self, fail: bool) -> None:
        """Test hook: the system's random source fails (EIO) while fail is True."""
    def _set_test_clock(self, t: int | None) -> None:
        """Test hook: fixed wall-clock seconds for the client timestamp and the server check."""
    def _set_test_queue(self, ring: int, pkts: int, limit: int) -> None:
        """Test hook: a flow queue of ring bytes, pkts packets, read up to limit bytes (set
        before the session: what is queued is lost)."""
    def _test_fq_push(self, data: bytes, room: int = 0) -> bool:
        """Test hook: queue data in the flow queue as a tun read of up to room bytes (default:
        its length) would; False if the queue has no place for such a read."""
    def _test_fq_pop(self) -> bytes | None:
        """Test hook: the next packet the flow queue gives out (and frees), or None."""
    def _set_test_rx_queue_us(self, us: int | None = None) -> None:
        """Test hook: how much of our own reading (microseconds at the rate we read) the
        receive budget allows beyond the path's part; None restores the default."""
    def _set_test_refuse_uso(self, refuse: bool) -> None:
        """Test hook: writing a merged UDP packet to the tun fails as on a kernel without UDP
        segmentation offload (the datagrams then go one by one, and UDP is not merged again)."""
    def _set_test_timeouts(
        self,
        accept_ms: int | None = None,
        connect_ms: int | None = None,
        send_ms: int | None = None,
    ) -> None:
        """Test hook: shorten the server handshake (ACCEPT_TIMEOUT_MS), client handshake and
        send progress (TIMEOUT_MS) deadlines; None restores the default."""
