"""The compiled data plane (src/dsvpn/_loop.pyx): poll loop, framing, handshakes, no GIL.

Events returned by ``Loop.run`` as ``(code, message)``:

EV_TIMEOUT           timeout_ms elapsed with no event (message "").
EV_WAKE              wake_fd became readable (the loop drained it) or, without a wake_fd, a
                     signal interrupted poll(): run Python's signal handlers.
EV_SESSION_UP        a session authenticated; message: the peer IP (IPv4-mapped shown as IPv4).
EV_SESSION_DOWN      the active session ended; message: "connection closed by peer",
                     "corrupted stream", "send timeout", "read error: ...", "write error: ...".
EV_LOG               one log line (server: refused connection from another IP, failed or
                     timed-out handshake, pending handshake dropped because the table is full).
EV_HANDSHAKE_FAILED  client: the handshake on the socket given to connect() failed.
EV_TUN_ERROR         fatal tun read error; message: strerror, or "end of file on the tun device".
"""

from typing import Final

EV_TIMEOUT: Final[int]
EV_WAKE: Final[int]
EV_SESSION_UP: Final[int]
EV_SESSION_DOWN: Final[int]
EV_LOG: Final[int]
EV_HANDSHAKE_FAILED: Final[int]
EV_TUN_ERROR: Final[int]

def tcp_options(fd: int) -> None:
    """protocol.md section 8 options plus TCP_NODELAY; every error is ignored."""

class Loop:
    """One tunnel endpoint.

    The loop never closes tun_fd, listen_fd or wake_fd, but it sets O_NONBLOCK on tun_fd (it
    drains the tun until EAGAIN). It owns every accepted or connected session socket.
    Server: at most 8 handshakes are pending at once (the oldest is dropped), each with a 10 s
    deadline for the whole handshake; a successful handshake from the active client's IP
    replaces the session, another IP is refused while a session is active.
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
        tun_header: bool = False,
        af_inet: int = 2,
        af_inet6: int = 10,
        mtu: int = 9000,
        vnet_hdr: bool = False,
    ) -> None:
        """vnet_hdr: the tun was opened with IFF_VNET_HDR (Linux; excludes tun_header). TCP
        segments are then merged into GSO packets on the way into the tun, and TSO packets
        from the tun are cut into ordinary packets before framing (tun_vnet.h)."""
    def connect(self, fd: int) -> None:
        """Client: start the handshake on a connected TCP socket.

        The loop takes ownership of fd (pass ``sock.detach()``) and closes it when the session
        or handshake ends, or at once if connect() raises. pkt1 is sent at once; pkt2 is
        awaited inside run() with a 60 s deadline. Any previous session or handshake is
        dropped first.
        """
    def run(self, timeout_ms: int) -> tuple[int, str]:
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
    def stats(self) -> dict[str, int]:
        """Counters: tun_rx_packets, tun_rx_bytes, tun_tx_packets, tun_tx_errors,
        sock_rx_bytes, sock_tx_bytes (session bytes, handshakes not counted), frames_rx,
        frames_tx, congestion_drops, no_session_drops, oversize_drops (tun packets > 65535
        bytes, or TSO packets that cannot be cut), tun_writes (write calls to the tun; fewer
        than tun_tx_packets when segments were merged), tun_merged (packets written as part of
        a merged GSO packet), short_drops (tun_header mode: packets < 20 bytes not written),
        handshakes_ok, handshakes_failed, pending_handshakes, rx_buffered, tx_queued."""
    def _set_test_random(self, data: bytes | None) -> None:
        """Test hook: the next handshakes take their 32 random bytes from data, 32 at a time
        (then the OS again)."""
    def _set_test_clock(self, t: int | None) -> None:
        """Test hook: fixed wall-clock seconds for the client timestamp and the server check."""
    def _set_test_timeouts(
        self,
        accept_ms: int | None = None,
        connect_ms: int | None = None,
        send_ms: int | None = None,
    ) -> None:
        """Test hook: shorten the server handshake (10 s), client handshake (60 s) and send
        progress (60 s) deadlines; None restores the default."""
