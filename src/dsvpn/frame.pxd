# One frame of the session stream (docs/protocol.md, Framing): LEN (2 bytes, little-endian) ||
# TAG (WIRE_TAG_LEN bytes of the tag) || the packet, encrypted in place by the direction's
# duplex state.
from libc.stdint cimport uint8_t
from libc.string cimport memcpy, memmove

from dsvpn.charm cimport CHARM_TAG_LEN, charm_decrypt, charm_encrypt, charm_state
from dsvpn.wire cimport FRAME_HDR_LEN, WIRE_TAG_LEN


cdef inline size_t frame_len(const uint8_t* f) noexcept nogil:
    """The payload length a frame header announces."""
    return <size_t> f[0] | (<size_t> f[1] << 8)


cdef inline void frame_seal(charm_state* st, uint8_t* f, size_t plen) noexcept nogil:
    """Encrypt the plen bytes at f + 8 in place and write the frame header before them."""
    cdef uint8_t tag[CHARM_TAG_LEN]
    charm_encrypt(st, f + FRAME_HDR_LEN, plen, tag)
    f[0] = <uint8_t> (plen & 0xff)
    f[1] = <uint8_t> (plen >> 8)
    memcpy(f + 2, tag, WIRE_TAG_LEN)


cdef inline int frame_open(charm_state* st, uint8_t* f, size_t plen) noexcept nogil:
    """Decrypt the frame's payload in place: 0, or -1 if its tag does not verify."""
    return charm_decrypt(st, f + FRAME_HDR_LEN, plen, f + 2, WIRE_TAG_LEN)


cdef inline void rx_consume(uint8_t* buf, size_t* length, size_t used) noexcept nogil:
    """The frames in buf[0..used) are done: the partial frame after them moves to the front."""
    if used > 0:
        if used < length[0]:
            memmove(buf, buf + used, length[0] - used)
        length[0] -= used
