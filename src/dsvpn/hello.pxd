# The checks of a hello (docs/protocol.md, Handshake and Extensions), for both loops: its
# proof of the key, its timestamp, and the random bytes of the answers (fixed ones in tests).
from libc.errno cimport EIO, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from dsvpn.charm cimport CHARM_HASH_LEN, CHARM_KEY_LEN, CHARM_STATE_LEN, charm_hash, charm_state
from dsvpn.loop_sys cimport dsvpn_random
from dsvpn.wire cimport HS_RANDOM_LEN, HS_TIMESTAMP_LEN, PFS_REPLY_LEN, TS_TOLERANCE_S


cdef inline bint ct_eq(const uint8_t* a, const uint8_t* b, size_t n) noexcept nogil:
    cdef uint8_t d = 0
    cdef size_t i
    for i in range(n):
        d |= a[i] ^ b[i]
    return d == 0


cdef inline bint hello_verifies(charm_state* st, const uint8_t* hello, size_t n) noexcept nogil:
    """Whether the CHARM_HASH_LEN bytes after hello[0..n) are the keyed hash of those n bytes
    under st (a copy of a key's KX or PX state), which the hash advances as the session key
    derivation expects: n is 40 for a classic hello, 72 for an extended one (and 32 for the
    server's classic reply, checked by the client)."""
    cdef uint8_t h[CHARM_HASH_LEN]
    charm_hash(st, hello, n, h)
    return ct_eq(h, hello + n, CHARM_HASH_LEN)


cdef inline int64_t hello_ts(const uint8_t* hello) noexcept nogil:
    """The (authenticated) timestamp of a hello, or -1 if it is out of range."""
    cdef uint64_t ts = 0
    cdef int j
    for j in range(HS_TIMESTAMP_LEN):
        ts |= (<uint64_t> hello[HS_RANDOM_LEN + j]) << (8 * j)
    if ts > <uint64_t> 0x7fffffffffffffff:
        return -1
    return <int64_t> ts


cdef inline bint ts_in_window(int64_t diff) noexcept nogil:
    """Whether clocks diff seconds apart are close enough for a hello."""
    return -TS_TOLERANCE_S <= diff <= TS_TOLERANCE_S


cdef struct TestRandom:
    # the tests' fixed random bytes (_set_test_random), and a random source that fails
    uint8_t* buf
    size_t len, pos
    bint fail


cdef inline int take_random(TestRandom* t, uint8_t* out, size_t n) noexcept nogil:
    """Fill out with n random bytes (the tests' while they last): 0, or the errno of the
    failure (the handshake must then fail: weak bytes would make the session key
    predictable)."""
    if t.fail:
        return EIO
    if t.buf != NULL and t.pos + n <= t.len:
        memcpy(out, t.buf + t.pos, n)
        t.pos += n
        return 0
    if dsvpn_random(out, n) != 0:
        return errno if errno != 0 else EIO
    return 0


cdef inline int set_test_random(TestRandom* t, data) except -1:
    """The next handshakes take their random bytes from data (None: the system's again)."""
    cdef const uint8_t[:] d
    free(t.buf)
    t.buf = NULL
    t.len = t.pos = 0
    if data is None or len(data) == 0:
        return 0
    d = bytes(data)
    t.buf = <uint8_t*> malloc(d.shape[0])
    if t.buf == NULL:
        raise MemoryError()
    memcpy(t.buf, &d[0], d.shape[0])
    t.len = d.shape[0]
    return 0


cdef inline bytearray state_bytes(charm_state* st):
    """A duplex state as the 48 bytes Python's Charm.from_state takes; st is wiped."""
    cdef bytearray out = bytearray(CHARM_STATE_LEN)
    cdef int j
    for j in range(CHARM_STATE_LEN):
        out[j] = <uint8_t> (st.w[j >> 2] >> (8 * (j & 3)))
    memset(st, 0, sizeof(charm_state))
    return out


cdef inline int check_reply(Py_ssize_t reply_len, Py_ssize_t key_len) except -1:
    """pfs_reply()'s arguments: the extended reply and the session key."""
    if reply_len != PFS_REPLY_LEN or key_len != CHARM_KEY_LEN:
        raise ValueError(f"the reply must be {PFS_REPLY_LEN} bytes and the key {CHARM_KEY_LEN}")
    return 0
