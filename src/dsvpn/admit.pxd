# What a server forwards of the packets a client sends (docs/protocol.md, Framing): an IP packet
# from the client's own tunnel address, for both loops.
from libc.stdint cimport uint8_t
from libc.string cimport memcmp

from dsvpn._loop cimport DROP_LINK_LOCAL, DROP_NON_IP, DROP_SPOOFED


cdef inline bint link_scope6(const uint8_t* pkt) noexcept nogil:
    """An IPv6 packet (40 bytes or more) that only its own link may see: from a source that
    names no one (link-local fe80::/10, unspecified, multicast) to a link-scope destination
    (link-local, or a multicast group of interface or link scope). A client's kernel sends
    these by itself (router and neighbour solicitations, MLD reports); no router forwards
    them."""
    cdef const uint8_t* src = pkt + 8
    cdef const uint8_t* dst = pkt + 24
    cdef uint8_t any_src = 0
    cdef int j
    for j in range(16):
        any_src |= src[j]
    if not ((src[0] == 0xfe and (src[1] & 0xc0) == 0x80) or src[0] == 0xff or any_src == 0):
        return False
    if dst[0] == 0xfe and (dst[1] & 0xc0) == 0x80:
        return True
    return dst[0] == 0xff and (dst[1] & 0x0f) <= 2


cdef inline int admit_source(const uint8_t* pkt, size_t plen, const uint8_t* src4,
                             const uint8_t* src6) noexcept nogil:
    """-1 if pkt (plen bytes) is an IP packet from src4 (IPv4) or src6 (IPv6), else the Drop
    reason: not IP, a link-scope IPv6 packet (link_scope6), or a spoofed source."""
    cdef int version = pkt[0] >> 4
    if version == 4:
        if plen < 20:
            return DROP_NON_IP
        return -1 if memcmp(pkt + 12, src4, 4) == 0 else DROP_SPOOFED
    if version == 6:
        if plen < 40:
            return DROP_NON_IP
        if memcmp(pkt + 8, src6, 16) == 0:
            return -1
        return DROP_LINK_LOCAL if link_scope6(pkt) else DROP_SPOOFED
    return DROP_NON_IP
