"""The optional forward-secret handshake (``--pfs``): the classic DSVPN handshake extended with
ephemeral X25519 keys (docs/protocol.md, Extensions).

::

    client -> server   R_c (32) || T (8) || E_c (32) || H1 (32)      104 bytes
    server -> client   R_s (32) || E_s (32) || H2 (32)                96 bytes

    st = Charm(shared key, PFS_IV)           a domain of its own: never the classic IV
    H1 = st.hash(R_c || T || E_c)
    H2 = st.hash(R_s || E_s)                 same running state: covers the whole transcript
    st.hash(X25519(e, E_peer))               absorbs the shared secret (output unused)
    k  = st.hash("")                         the session key; direction states as classic

Whoever later learns the shared key still lacks the ephemeral secrets, so a recording cannot be
decrypted. X25519 and the random bytes come from libsodium through PyNaCl, into buffers that
are wiped once used; the Charm states are wiped too. The session key is handed over as a
bytearray, which whoever gives it to the loop wipes afterwards (wipe()). What cannot be wiped:
the immutable bytes object Charm.hash() returns for k (copied into that bytearray, then freed
without being zeroed), and the discarded output of the hash that absorbs z.
"""

from __future__ import annotations

import errno
import hmac
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from nacl._sodium import ffi, lib  # type: ignore[import-not-found]  # PyNaCl's libsodium

from dsvpn.charm import Charm

log = logging.getLogger("dsvpn")

PFS_IV = b"DSVPN PFS X25519"  # 16 bytes
RANDOM_LEN = 32
TS_LEN = 8
PUBLIC_LEN = 32
HASH_LEN = 32
HELLO_LEN = RANDOM_LEN + TS_LEN + PUBLIC_LEN + HASH_LEN  # 104
REPLY_LEN = RANDOM_LEN + PUBLIC_LEN + HASH_LEN  # 96
CLASSIC_HELLO_LEN = 72  # the prefix a server tries as a classic handshake first
TS_TOLERANCE = 7200  # seconds, as the classic handshake

assert len(PFS_IV) == 16


class HandshakeError(Exception):
    """The peer's packet does not verify, or the key agreement failed."""


class NotAcceptedError(HandshakeError):
    """The server closed or reset the connection before its reply was complete: it does not
    know the extension (C DSVPN, an older dsvpn), or its key differs."""


class _Ephemeral:
    """An X25519 key pair whose secret lives in a libsodium-owned buffer, wiped by wipe()."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._sk: Any = ffi.new("unsigned char[]", 32)
        if secret is None:
            lib.randombytes(self._sk, 32)
        else:  # known-answer tests only
            ffi.memmove(self._sk, secret, 32)
        pk = ffi.new("unsigned char[]", 32)
        if lib.crypto_scalarmult_base(pk, self._sk) != 0:
            raise HandshakeError("X25519 key generation failed")
        self.public = bytes(ffi.buffer(pk, 32))

    def shared(self, peer_public: bytes) -> Any:
        """X25519(secret, peer_public) in a wipeable buffer; HandshakeError for a low-order
        point (libsodium refuses an all-zero result, and we check it again)."""
        if len(peer_public) != PUBLIC_LEN:
            raise HandshakeError("bad public key length")
        out = ffi.new("unsigned char[]", 32)
        failed = lib.crypto_scalarmult(out, self._sk, peer_public) != 0
        acc = 0
        for i in range(32):  # read in place: no copy of the secret outside `out`
            acc |= out[i]
        if failed or acc == 0:
            lib.sodium_memzero(out, 32)
            raise HandshakeError("the peer's public key is a low-order point")
        return out

    def wipe(self) -> None:
        lib.sodium_memzero(self._sk, 32)


def _random(n: int) -> bytes:
    buf = ffi.new("unsigned char[]", n)
    lib.randombytes(buf, n)
    return bytes(ffi.buffer(buf, n))


def _session_key(st: Charm, eph: _Ephemeral, peer_public: bytes) -> bytearray:
    """Absorb the X25519 secret into the transcript state and squeeze the session key (a
    bytearray, for wipe())."""
    try:
        ss = eph.shared(peer_public)
        try:
            st.hash(ffi.buffer(ss, 32))
        finally:
            lib.sodium_memzero(ss, 32)
        return bytearray(st.hash(b""))
    finally:
        eph.wipe()
        st.wipe()


def wipe(key: bytearray) -> None:
    """Zero a session key once the loop has it (the loop keeps no reference to it)."""
    key[:] = bytes(len(key))


def timestamp(now: int) -> bytes:
    return struct.pack("<Q", now)


def check_timestamp(ts: bytes, now: int) -> None:
    (value,) = struct.unpack("<Q", ts)
    if abs(value - now) > TS_TOLERANCE:
        raise HandshakeError(f"clock difference of {value - now} s is too large")


class ClientHandshake:
    """Client side: hello() once, then finish(reply) gives the session key."""

    def __init__(
        self,
        key: bytes,
        now: int,
        *,
        random: bytes | None = None,
        secret: bytes | None = None,
    ) -> None:
        self._st = Charm(key, PFS_IV)
        self._eph = _Ephemeral(secret)
        r_c = random if random is not None else _random(RANDOM_LEN)
        body = r_c + timestamp(now) + self._eph.public
        self.hello = body + self._st.hash(body)

    def finish(self, reply: bytes) -> bytearray:
        """The session key, or HandshakeError (the state and the secret are wiped either way)."""
        try:
            if len(reply) != REPLY_LEN:
                raise HandshakeError("short reply")
            body, tag = reply[: RANDOM_LEN + PUBLIC_LEN], reply[RANDOM_LEN + PUBLIC_LEN :]
            if not hmac.compare_digest(self._st.hash(body), tag):
                raise HandshakeError("the server's reply failed authentication: wrong key?")
            return _session_key(self._st, self._eph, body[RANDOM_LEN:])
        finally:
            self.abort()

    def abort(self) -> None:
        self._eph.wipe()
        self._st.wipe()


def verify_hello(key: bytes, hello: bytes, now: int) -> Charm:
    """Server side, all in Python (tests and tools): the transcript state after H1."""
    if len(hello) != HELLO_LEN:
        raise HandshakeError("short hello")
    st = Charm(key, PFS_IV)
    body = hello[: HELLO_LEN - HASH_LEN]
    if not hmac.compare_digest(st.hash(body), hello[HELLO_LEN - HASH_LEN :]):
        st.wipe()
        raise HandshakeError("authentication failed: wrong key or garbage")
    try:
        check_timestamp(body[RANDOM_LEN : RANDOM_LEN + TS_LEN], now)
    except HandshakeError:
        st.wipe()
        raise
    return st


def server_reply(
    st: Charm,
    client_public: bytes,
    *,
    random: bytes | None = None,
    secret: bytes | None = None,
) -> tuple[bytes, bytearray]:
    """Server side, given the transcript state after a verified hello: (reply, session key).
    The state is consumed (wiped)."""
    try:
        eph = _Ephemeral(secret)
    except BaseException:
        st.wipe()
        raise
    r_s = random if random is not None else _random(RANDOM_LEN)
    body = r_s + eph.public
    reply = body + st.hash(body)
    return reply, _session_key(st, eph, client_public)


def client_public(hello: bytes) -> bytes:
    return hello[RANDOM_LEN + TS_LEN : RANDOM_LEN + TS_LEN + PUBLIC_LEN]


# ------------------------------------------------------------------------- on the wire

Wait = Callable[[float, bool], bool]
"""wait(seconds, readable): block until the socket is readable (readable=True) or writable, at
most `seconds`; False if the time ran out or something else (a signal) needs attention."""


def client_exchange(sock: socket.socket, key: bytes, wait: Wait, timeout: float) -> bytearray:
    """Client: the forward-secret handshake on a connected non-blocking socket, within
    `timeout` seconds; returns the session key (wipe() it once the loop has it). Reads exactly
    the reply: frames that follow stay in the socket for the loop.

    Raises NotAcceptedError (closed or reset before the whole reply), HandshakeError (a reply
    that does not verify, a low-order key), TimeoutError, InterruptedError (wait() returned
    False early), OSError (network)."""
    deadline = time.monotonic() + timeout
    hs = ClientHandshake(key, int(time.time()))

    def ready(readable: bool) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not wait(left, readable):
            if time.monotonic() >= deadline:
                raise TimeoutError(errno.ETIMEDOUT, "the handshake timed out")
            raise InterruptedError(errno.EINTR, "interrupted")

    try:
        sent = 0
        while sent < HELLO_LEN:
            try:
                sent += sock.send(hs.hello[sent:])
            except BlockingIOError:
                ready(False)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise NotAcceptedError(str(exc)) from None
        reply = b""
        while len(reply) < REPLY_LEN:
            try:
                chunk = sock.recv(REPLY_LEN - len(reply))
            except BlockingIOError:
                ready(True)
                continue
            except ConnectionResetError as exc:
                raise NotAcceptedError(str(exc)) from None
            if not chunk:
                raise NotAcceptedError("connection closed")
            reply += chunk
    except BaseException:
        hs.abort()
        raise
    return hs.finish(reply)


class HelloSource(Protocol):
    """A server loop holding verified extended hellos: dsvpn._loop.Loop (one client) or
    dsvpn._multi.MultiLoop (a peers file)."""

    def take_pfs_hello(self) -> tuple[int, bytearray, bytes, str] | None: ...
    def pfs_reply(self, token: int, reply: bytes, key: bytes | bytearray) -> bool: ...
    def pfs_abort(self, token: int, why: str) -> bool: ...


def answer_hellos(loop: HelloSource) -> int:
    """Server: answer every verified extended hello the loop holds (EV_PFS_HELLO): X25519 and
    the reply here, the rest in the loop. A failure (a low-order key) closes that connection
    with a log line naming the client. Returns how many were answered."""
    answered = 0
    while (hello := loop.take_pfs_hello()) is not None:
        token, state, peer_public, peer = hello
        st = Charm.from_state(state)
        wipe(state)
        try:
            reply, key = server_reply(st, peer_public)
        except HandshakeError as exc:
            loop.pfs_abort(token, str(exc))
            continue
        # Each connection's client key is fresh: showing a prefix lets one see it change.
        log.info("forward-secret handshake from %s (client key %s...)", peer, peer_public[:8].hex())
        try:
            if loop.pfs_reply(token, reply, key):
                answered += 1
        finally:
            wipe(key)
    return answered
