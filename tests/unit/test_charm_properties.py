"""Property tests of the Charm duplex, on every kernel this CPU supports."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsvpn.charm import AuthenticationError, Charm

# the kernel fixture only switches a global, so reusing it across examples is fine
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
keys = st.binary(min_size=32, max_size=32)
ivs = st.none() | st.binary(min_size=16, max_size=16)


def message(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


@SETTINGS
@given(
    key=keys,
    iv=ivs,
    lengths=st.lists(st.integers(0, 65535) | st.integers(0, 40), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
)
def test_roundtrip_on_twin_states(
    charm_kernel: str, key: bytes, iv: bytes | None, lengths: list[int], seed: int
) -> None:
    sender, receiver = Charm(key, iv), Charm(key, iv)
    for i, length in enumerate(lengths):
        msg = message(length, seed + i)
        ct, tag = sender.encrypt(msg)
        assert len(ct) == length and len(tag) == 16
        assert receiver.decrypt(ct, tag, 16) == msg
        assert receiver.state == sender.state


@SETTINGS
@given(
    key=keys,
    length=st.integers(0, 300),
    tag_len=st.sampled_from([6, 16]),
    data=st.data(),
)
def test_any_flipped_bit_is_rejected(
    charm_kernel: str, key: bytes, length: int, tag_len: int, data: st.DataObject
) -> None:
    sender = Charm(key)
    ct, tag = sender.encrypt(message(length, length))
    wire = bytearray(ct + tag[:tag_len])
    bit = data.draw(st.integers(0, 8 * len(wire) - 1), label="bit")
    wire[bit // 8] ^= 1 << (bit % 8)
    receiver = Charm(key)
    with pytest.raises(AuthenticationError):
        receiver.decrypt(bytes(wire[:length]), bytes(wire[length:]), tag_len)
    # a damaged tag leaves the receiver in step; a damaged ciphertext does not
    assert (receiver.state == sender.state) == (bit >= 8 * length)


@SETTINGS
@given(key=keys, msg=st.binary(max_size=200))
def test_hash_chains_and_is_deterministic(charm_kernel: str, key: bytes, msg: bytes) -> None:
    a, b = Charm(key), Charm(key)
    first = a.hash(msg)
    assert first == b.hash(msg) and len(first) == 32
    assert a.hash(msg) != first  # the state advanced: the same message hashes differently
