"""The forward-secret handshake (dsvpn.pfs): known answers, tampering, replay, low-order keys."""

from __future__ import annotations

import nacl.bindings
import pytest

from dsvpn import pfs
from dsvpn.charm import Charm

# The known-answer set of docs/protocol.md, Extensions.
KEY = bytes(range(32))
R_C = bytes(0xC0 + i % 16 for i in range(32))
R_S = bytes(0x50 + i % 16 for i in range(32))
E_C_SECRET = bytes([0x11] * 32)
E_S_SECRET = bytes([0x22] * 32)
T = 1700000000
HELLO = bytes.fromhex(
    "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf"
    "00f1536500000000"
    "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13"
    "25596e64d5809bbdf26bbacc5a962a447169656c1611cba078157a378d9f4877"
)
REPLY = bytes.fromhex(
    "505152535455565758595a5b5c5d5e5f505152535455565758595a5b5c5d5e5f"
    "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20"
    "bc6e71a613ac9ef0361936148d06aa1673f948696565122f99946b22c35cf9ac"
)
SESSION_KEY = bytes.fromhex("f0dadbaafd55e0eb518187b12c06ba0b35917bbcf631e201241a4943e4cdcbbb")

# A point of order 8 on Curve25519 (and the all-zero point): X25519 with it gives all zeros.
LOW_ORDER = [
    bytes(32),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


def _client() -> pfs.ClientHandshake:
    return pfs.ClientHandshake(KEY, T, random=R_C, secret=E_C_SECRET)


def _server(hello: bytes, now: int = T) -> tuple[bytes, bytes]:
    st = pfs.verify_hello(KEY, hello, now)
    return pfs.server_reply(st, pfs.client_public(hello), random=R_S, secret=E_S_SECRET)


def test_known_answers() -> None:
    client = _client()
    assert client.hello == HELLO
    reply, server_key = _server(client.hello)
    assert reply == REPLY
    assert server_key == SESSION_KEY
    assert client.finish(reply) == SESSION_KEY


def test_known_answers_recomputed_from_the_definition() -> None:
    # Independent of dsvpn.pfs: Charm and PyNaCl's public bindings, step by step.
    e_c = nacl.bindings.crypto_scalarmult_base(E_C_SECRET)
    e_s = nacl.bindings.crypto_scalarmult_base(E_S_SECRET)
    st = Charm(KEY, b"DSVPN PFS X25519")
    body1 = R_C + T.to_bytes(8, "little") + e_c
    h1 = st.hash(body1)
    h2 = st.hash(R_S + e_s)
    st.hash(nacl.bindings.crypto_scalarmult(E_C_SECRET, e_s))
    assert body1 + h1 == HELLO
    assert R_S + e_s + h2 == REPLY
    assert st.hash(b"") == SESSION_KEY


def test_sizes_and_domain_separation() -> None:
    assert len(HELLO) == pfs.HELLO_LEN == 104
    assert len(REPLY) == pfs.REPLY_LEN == 96
    # The classic handshake's first 72 bytes never verify as classic under the same key.
    classic = Charm(KEY, b"VPN Key Exchange")
    assert classic.hash(HELLO[:40]) != HELLO[40:72]


def test_fresh_ephemeral_keys_each_time() -> None:
    a = pfs.ClientHandshake(KEY, T)
    b = pfs.ClientHandshake(KEY, T)
    assert pfs.client_public(a.hello) != pfs.client_public(b.hello)
    assert a.hello[:32] != b.hello[:32]
    ra, ka = pfs.server_reply(pfs.verify_hello(KEY, a.hello, T), pfs.client_public(a.hello))
    rb, kb = pfs.server_reply(pfs.verify_hello(KEY, b.hello, T), pfs.client_public(b.hello))
    assert a.finish(ra) == ka and b.finish(rb) == kb
    assert ka != kb


def test_wrong_key_is_refused_by_both_sides() -> None:
    other = bytes(32)
    with pytest.raises(pfs.HandshakeError, match="wrong key"):
        pfs.verify_hello(other, HELLO, T)
    client = pfs.ClientHandshake(other, T, random=R_C, secret=E_C_SECRET)
    with pytest.raises(pfs.HandshakeError, match="wrong key"):
        client.finish(REPLY)


@pytest.mark.parametrize(
    ("field", "offset"),
    [("R_c", 0), ("T", 32), ("E_c", 40), ("H1", 72), ("H1 last byte", 103)],
)
def test_each_hello_field_tampered(field: str, offset: int) -> None:
    bad = bytearray(HELLO)
    bad[offset] ^= 0x01
    with pytest.raises(pfs.HandshakeError):
        pfs.verify_hello(KEY, bytes(bad), T)


@pytest.mark.parametrize(
    ("field", "offset"), [("R_s", 0), ("E_s", 32), ("H2", 64), ("H2 last byte", 95)]
)
def test_each_reply_field_tampered(field: str, offset: int) -> None:
    bad = bytearray(REPLY)
    bad[offset] ^= 0x80
    with pytest.raises(pfs.HandshakeError):
        _client().finish(bytes(bad))


def test_truncated_packets() -> None:
    with pytest.raises(pfs.HandshakeError):
        pfs.verify_hello(KEY, HELLO[:-1], T)
    with pytest.raises(pfs.HandshakeError):
        _client().finish(REPLY[:-1])


@pytest.mark.parametrize("skew", [7200, -7200])
def test_timestamp_window_accepted(skew: int) -> None:
    pfs.verify_hello(KEY, HELLO, T + skew)


@pytest.mark.parametrize("skew", [7201, -7201])
def test_timestamp_window_refused(skew: int) -> None:
    with pytest.raises(pfs.HandshakeError, match="clock difference"):
        pfs.verify_hello(KEY, HELLO, T + skew)


def test_replayed_hello_gives_the_replayer_nothing() -> None:
    # A recorded hello verifies again, but the server answers with a fresh ephemeral key: the
    # session key differs from the recorded session's, and computing it needs e_c, which the
    # replayer lacks (a client with the same R_c and another secret cannot finish).
    reply, replayed_key = pfs.server_reply(
        pfs.verify_hello(KEY, HELLO, T), pfs.client_public(HELLO)
    )
    assert replayed_key != SESSION_KEY
    impostor = pfs.ClientHandshake(KEY, T, random=R_C, secret=bytes([0x33] * 32))
    with pytest.raises(pfs.HandshakeError):
        impostor.finish(reply)  # its hello differs, so its transcript state does too


@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "order-8"])
def test_low_order_client_key_is_refused(point: bytes) -> None:
    body = R_C + T.to_bytes(8, "little") + point
    hello = body + Charm(KEY, pfs.PFS_IV).hash(body)
    st = pfs.verify_hello(KEY, hello, T)  # authentic (the key holder chose a bad point)
    with pytest.raises(pfs.HandshakeError, match="low-order"):
        pfs.server_reply(st, point)


@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "order-8"])
def test_low_order_server_key_is_refused(point: bytes) -> None:
    client = _client()
    st = Charm(KEY, pfs.PFS_IV)
    st.hash(HELLO[:72])
    body = R_S + point
    with pytest.raises(pfs.HandshakeError, match="low-order"):
        client.finish(body + st.hash(body))


def test_states_are_wiped_after_use() -> None:
    st = pfs.verify_hello(KEY, HELLO, T)
    pfs.server_reply(st, pfs.client_public(HELLO), random=R_S, secret=E_S_SECRET)
    assert st.state == bytes(48)
