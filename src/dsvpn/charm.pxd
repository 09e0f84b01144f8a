# C-level API of the Charm duplex (Xoodoo[12]), for the event loop: nogil, in place,
# no allocation, no Python objects. Semantics: docs/protocol.md, Duplex.
from libc.stdint cimport uint8_t, uint32_t

cdef enum:
    CHARM_KEY_LEN = 32
    CHARM_IV_LEN = 16
    CHARM_STATE_LEN = 48
    CHARM_TAG_LEN = 16          # the full tag; the wire carries WIRE_TAG_LEN of it (wire.pxd)
    CHARM_HASH_LEN = 32

cdef struct charm_state:
    uint32_t w[12]  # st[0..11]; as bytes, word i is bytes 4i..4i+3 little-endian

# state = permute(iv || key); iv == NULL means 16 zero bytes
cdef void charm_init(charm_state* st, const uint8_t* key, const uint8_t* iv) noexcept nogil
# encrypt n bytes of buf in place; tag receives the full CHARM_TAG_LEN-byte tag
cdef void charm_encrypt(charm_state* st, uint8_t* buf, size_t n, uint8_t* tag) noexcept nogil
# decrypt n bytes of buf in place and compare exactly tag_len (1..CHARM_TAG_LEN) bytes of the
# tag in constant time; 0 on success, -1 on mismatch (buf is then zeroed, the state is not
# rolled back)
cdef int charm_decrypt(charm_state* st, uint8_t* buf, size_t n,
                       const uint8_t* tag, size_t tag_len) noexcept nogil
# CHARM_HASH_LEN-byte keyed, chaining hash of msg (msg may be NULL when n == 0)
cdef void charm_hash(charm_state* st, const uint8_t* msg, size_t n, uint8_t* out) noexcept nogil
# one Xoodoo[12] permutation of the state (dispatches to the fastest kernel of this CPU)
cdef void charm_permute(charm_state* st) noexcept nogil
