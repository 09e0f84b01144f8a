# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Charm: the Xoodoo[12] duplex cipher of DSVPN (docs/protocol.md, Permutation and Duplex).

The C-level API (charm.pxd) is for the event loop: nogil, in place, no allocation. The Python API
below wraps it for the handshake, the tools and the tests. The permutation kernel (AVX-512,
SSSE3 or portable C) is chosen once at import, from what this CPU supports.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset, strcmp
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cimport dsvpn.xoodoo_kernels as xk
from dsvpn.wire cimport WIRE_TAG_LEN
from dsvpn.xoodoo_kernels cimport xoo_best, xoo_kernel, xoo_kernels

cdef enum:
    BENCH_BATCH = 32  # frames encrypted ahead, untimed, for the decryption benchmark


class AuthenticationError(ValueError):
    """The tag does not match: the message was forged, corrupted or is out of sequence."""


# ---- C-level API (charm.pxd) ------------------------------------------------------------------

cdef void charm_init(charm_state* st, const uint8_t* key, const uint8_t* iv) noexcept nogil:
    cdef uint8_t raw[CHARM_STATE_LEN]
    if iv == NULL:
        memset(raw, 0, CHARM_IV_LEN)
    else:
        memcpy(raw, iv, CHARM_IV_LEN)
    memcpy(raw + CHARM_IV_LEN, key, CHARM_KEY_LEN)
    _state_from_bytes(st, raw)
    xk.xoo_active.permute(st.w)


cdef void charm_encrypt(charm_state* st, uint8_t* buf, size_t n, uint8_t* tag) noexcept nogil:
    xk.xoo_active.encrypt(st.w, buf, n, tag)


cdef int charm_decrypt(charm_state* st, uint8_t* buf, size_t n,
                       const uint8_t* tag, size_t tag_len) noexcept nogil:
    cdef uint8_t computed[CHARM_TAG_LEN]
    cdef uint8_t diff = 0
    cdef size_t i
    xk.xoo_active.decrypt(st.w, buf, n, computed)
    # exactly tag_len bytes, not the reference's tag_len & 15 (which accepts any 16-byte tag)
    if tag_len == 0 or tag_len > CHARM_TAG_LEN:
        diff = 1
    else:
        for i in range(tag_len):  # no early exit: constant time in the tag's contents
            diff |= computed[i] ^ tag[i]
    if diff != 0:
        if n:
            memset(buf, 0, n)
        return -1
    return 0


cdef void charm_hash(charm_state* st, const uint8_t* msg, size_t n, uint8_t* out) noexcept nogil:
    xk.xoo_active.hash(st.w, msg, n, out)


cdef void charm_permute(charm_state* st) noexcept nogil:
    xk.xoo_active.permute(st.w)


# ---- state <-> bytes (word i is bytes 4i..4i+3, little-endian, on every host) ----------------

cdef void _state_from_bytes(charm_state* st, const uint8_t* raw) noexcept nogil:
    cdef int i
    for i in range(12):
        st.w[i] = (<uint32_t>raw[4 * i] | (<uint32_t>raw[4 * i + 1] << 8)
                   | (<uint32_t>raw[4 * i + 2] << 16) | (<uint32_t>raw[4 * i + 3] << 24))


cdef bytes _state_to_bytes(const charm_state* st):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, CHARM_STATE_LEN)
    cdef uint8_t* raw = <uint8_t*>PyBytes_AS_STRING(out)
    cdef int i
    for i in range(12):
        raw[4 * i] = <uint8_t>st.w[i]
        raw[4 * i + 1] = <uint8_t>(st.w[i] >> 8)
        raw[4 * i + 2] = <uint8_t>(st.w[i] >> 16)
        raw[4 * i + 3] = <uint8_t>(st.w[i] >> 24)
    return out


cdef int _get(Py_buffer* view, object data, Py_ssize_t size, str what) except -1:
    """Borrow the bytes of a bytes-like object; size >= 0 demands exactly that many."""
    PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    if size >= 0 and view.len != size:
        PyBuffer_Release(view)
        raise ValueError(f"{what} must be {size} bytes, got {view.len}")
    return 0


cdef bytes _copy_of(object data):
    """A new bytes object with the contents of data, ours to modify in place."""
    cdef Py_buffer view
    cdef Py_ssize_t n
    if PyBytes_CheckExact(data):  # the common case, without the buffer protocol's cost
        n = PyBytes_GET_SIZE(data)
        out = PyBytes_FromStringAndSize(NULL, n)
        memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(data), n)
        return out
    _get(&view, data, -1, "")
    # never PyBytes_FromStringAndSize(data, 1): CPython shares 1-byte objects
    out = PyBytes_FromStringAndSize(NULL, view.len)
    memcpy(PyBytes_AS_STRING(out), view.buf, view.len)
    PyBuffer_Release(&view)
    return out


# ---- Python API -------------------------------------------------------------------------------

def permute(state) -> bytes:
    """Xoodoo[12] of a 48-byte state."""
    cdef charm_state st
    cdef Py_buffer view
    _get(&view, state, CHARM_STATE_LEN, "state")
    _state_from_bytes(&st, <const uint8_t*>view.buf)
    PyBuffer_Release(&view)
    charm_permute(&st)
    return _state_to_bytes(&st)


cdef class Charm:
    """One Charm duplex state. Every operation advances it, so a sender and a receiver stay in
    step only if they process the same messages in the same order."""

    cdef charm_state st

    def __init__(self, key, iv=None):
        cdef Py_buffer kv, ivv
        _get(&kv, key, CHARM_KEY_LEN, "key")
        try:
            if iv is None:
                charm_init(&self.st, <const uint8_t*>kv.buf, NULL)
            else:
                _get(&ivv, iv, CHARM_IV_LEN, "iv")
                charm_init(&self.st, <const uint8_t*>kv.buf, <const uint8_t*>ivv.buf)
                PyBuffer_Release(&ivv)
        finally:
            PyBuffer_Release(&kv)

    def __dealloc__(self):
        memset(&self.st, 0, sizeof(self.st))

    @classmethod
    def from_state(cls, state):
        """A Charm whose state is the given 48 bytes (as returned by .state)."""
        cdef Py_buffer view
        _get(&view, state, CHARM_STATE_LEN, "state")
        cdef Charm c = cls.__new__(cls)
        _state_from_bytes(&c.st, <const uint8_t*>view.buf)
        PyBuffer_Release(&view)
        return c

    @property
    def state(self) -> bytes:
        return _state_to_bytes(&self.st)

    def wipe(self):
        """Zero the state (keys derived from it must not linger in memory)."""
        memset(&self.st, 0, sizeof(self.st))

    def copy(self):
        cdef Charm c = type(self).__new__(type(self))
        c.st = self.st
        return c

    def encrypt(self, msg):
        """(ciphertext, 16-byte tag); a frame carries only the first 6 tag bytes."""
        cdef bytes out = _copy_of(msg)
        cdef bytes tag = PyBytes_FromStringAndSize(NULL, CHARM_TAG_LEN)
        charm_encrypt(&self.st, <uint8_t*>PyBytes_AS_STRING(out), len(out),
                      <uint8_t*>PyBytes_AS_STRING(tag))
        return out, tag

    def decrypt(self, ciphertext, tag, Py_ssize_t tag_len=WIRE_TAG_LEN):
        """The plaintext, if the first tag_len (1..16) bytes of tag match.

        Raises AuthenticationError otherwise. The state has then absorbed the (wrong) plaintext,
        as in the reference: it is out of step with the sender unless only the tag was damaged.
        """
        if not 1 <= tag_len <= CHARM_TAG_LEN:
            raise ValueError(f"tag_len must be 1..{CHARM_TAG_LEN}, got {tag_len}")
        cdef Py_buffer tv
        cdef uint8_t expected[CHARM_TAG_LEN]
        _get(&tv, tag, -1, "tag")
        if tv.len < tag_len:
            PyBuffer_Release(&tv)
            raise ValueError(f"tag has {tv.len} bytes, fewer than tag_len={tag_len}")
        memcpy(expected, tv.buf, tag_len)
        PyBuffer_Release(&tv)
        cdef bytes out = _copy_of(ciphertext)
        if charm_decrypt(&self.st, <uint8_t*>PyBytes_AS_STRING(out), len(out),
                         expected, tag_len) != 0:
            raise AuthenticationError("Charm tag mismatch")
        return out

    def hash(self, msg) -> bytes:
        """32-byte hash of msg keyed by, and chained through, this state."""
        cdef Py_buffer view
        _get(&view, msg, -1, "msg")
        cdef bytes out = PyBytes_FromStringAndSize(NULL, CHARM_HASH_LEN)
        charm_hash(&self.st, <const uint8_t*>view.buf, view.len,
                   <uint8_t*>PyBytes_AS_STRING(out))
        PyBuffer_Release(&view)
        return out


def _c_decrypt(Charm c, ciphertext, tag, size_t tag_len) -> tuple:
    """(charm_decrypt's result, the buffer after it): the C API as the event loop sees it,
    for tests. Any tag_len is passed through, even those the Python API refuses."""
    cdef uint8_t expected[CHARM_TAG_LEN]
    cdef bytes out = _copy_of(ciphertext)
    cdef bytes tag_bytes = _copy_of(tag)
    memset(expected, 0, CHARM_TAG_LEN)
    memcpy(expected, PyBytes_AS_STRING(tag_bytes), min(len(tag_bytes), CHARM_TAG_LEN))
    result = charm_decrypt(&c.st, <uint8_t*>PyBytes_AS_STRING(out), len(out), expected, tag_len)
    return result, out


# ---- kernel selection and benchmark hooks -----------------------------------------------------

cdef const xoo_kernel* _kernel(str name) except NULL:
    cdef int i = 0
    cdef bytes wanted = name.encode()
    while xoo_kernels[i] != NULL:
        if strcmp(xoo_kernels[i].name, wanted) == 0:
            if not xoo_kernels[i].supported():
                raise ValueError(f"kernel {name!r} is not supported by this CPU")
            return xoo_kernels[i]
        i += 1
    raise ValueError(f"unknown kernel {name!r}")


def _available_kernels() -> tuple:
    """Names of the kernels this CPU can run, fastest first ('portable' is always there)."""
    cdef int i = 0
    names = []
    while xoo_kernels[i] != NULL:
        if xoo_kernels[i].supported():
            names.append(xoo_kernels[i].name.decode())
        i += 1
    return tuple(names)


def _use_kernel(str name) -> str:
    """Route the whole API through the named kernel (for tests); returns the previous name."""
    global KERNEL
    cdef const xoo_kernel* k = _kernel(name)
    previous = KERNEL
    xk.xoo_active = k
    KERNEL = name
    return previous


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def _bench(str kernel, str op, Py_ssize_t size, Py_ssize_t iterations) -> float:
    """Seconds spent in `iterations` calls of charm_encrypt or charm_decrypt (op) on
    `size`-byte messages with the named kernel, timed without the GIL or Python in the loop.
    Decryption runs on genuine frames, encrypted in untimed batches by a twin sender state."""
    if op not in ("encrypt", "decrypt") or size < 0 or iterations < 1:
        raise ValueError("op must be 'encrypt' or 'decrypt', size >= 0, iterations >= 1")
    previous = _use_kernel(kernel)
    cdef charm_state sender, receiver
    cdef uint8_t key[CHARM_KEY_LEN]
    cdef uint8_t* bufs = <uint8_t*>malloc(BENCH_BATCH * (size + CHARM_TAG_LEN) + 1)
    cdef uint8_t* tags
    cdef Py_ssize_t done = 0, batch, j, _j
    cdef double elapsed = 0.0, t0
    cdef int failures = 0
    cdef bint decrypt = op == "decrypt"
    if bufs == NULL:
        _use_kernel(previous)
        raise MemoryError()
    tags = bufs + BENCH_BATCH * size
    memset(key, 0x42, CHARM_KEY_LEN)
    memset(bufs, 0x5a, BENCH_BATCH * size)
    charm_init(&sender, key, NULL)
    receiver = sender
    with nogil:
        if not decrypt:
            t0 = _now()
            for _j in range(iterations):
                charm_encrypt(&sender, bufs, size, tags)
            elapsed = _now() - t0
        while decrypt and done < iterations:
            batch = min(BENCH_BATCH, iterations - done)
            for j in range(batch):
                charm_encrypt(&sender, bufs + j * size, size, tags + j * CHARM_TAG_LEN)
            t0 = _now()
            for j in range(batch):
                failures += charm_decrypt(&receiver, bufs + j * size, size,
                                          tags + j * CHARM_TAG_LEN, WIRE_TAG_LEN) != 0
            elapsed += _now() - t0
            done += batch
    free(bufs)
    _use_kernel(previous)
    if failures:
        raise AssertionError(f"{failures} genuine frames failed to decrypt")
    return elapsed


xk.xoo_active = xoo_best()
KERNEL = xk.xoo_active.name.decode()
