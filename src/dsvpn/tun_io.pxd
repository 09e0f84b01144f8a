# The tun side of both loops: a packet read apart from the tun's own header (a vnet header on
# Linux, tun_vnet.h; a 4-byte address-family header on macOS utun and the OpenBSD tun), and
# written back the same way, with the counters of both directions.
from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport strerror

from dsvpn.loop_sys cimport DSVPN_IO_AGAIN, dsvpn_readv, dsvpn_write, iovec
from dsvpn.tun_vnet cimport DSVPN_VNET_HDR_LEN, dsvpn_gro, dsvpn_gro_add
from dsvpn.wire cimport FRAME_HDR_LEN, MAX_PAYLOAD


cdef enum:
    AF_HDR_LEN = 4              # the address-family header (Tun.header)
    TUN_READ_MAX = MAX_PAYLOAD + 1  # one more, so that an oversized tun packet is detectable
    TUN_SHORT = -3              # tun_read: no packet after the tun's own header (counted)
    MIN_MTU = 68                # the smallest MTU of IPv4


cdef struct Tun:
    int fd
    bint vnet_hdr               # Linux IFF_VNET_HDR (tun_vnet.h)
    bint header                 # an address-family header, big-endian, before each packet
    uint32_t af_inet, af_inet6  # its values for IPv4 and IPv6
    dsvpn_gro gro               # vnet_hdr: segments merged on their way to the tun
    uint64_t rx_packets, rx_bytes, tx_packets, tx_errors, short_drops


cdef inline int tun_setup(Tun* t, int mtu, bint header, int af_inet, int af_inet6,
                          bint vnet_hdr) except -1:
    """The loops' tun arguments, checked (ValueError) and kept in t (but for its fd)."""
    if header and vnet_hdr:
        raise ValueError("tun_header and vnet_hdr exclude each other")
    if not MIN_MTU <= mtu <= MAX_PAYLOAD:
        raise ValueError(f"the MTU must be {MIN_MTU}..{MAX_PAYLOAD}, not {mtu}")
    t.header = header
    t.vnet_hdr = vnet_hdr
    t.af_inet = <uint32_t> af_inet
    t.af_inet6 = <uint32_t> af_inet6
    return 0


cdef inline size_t tun_hdr_len(const Tun* t) noexcept nogil:
    """The tun's own header before each packet: a vnet header, an AF header, or none."""
    if t.vnet_hdr:
        return DSVPN_VNET_HDR_LEN
    return AF_HDR_LEN if t.header else 0


cdef inline ssize_t tun_read(Tun* t, void* hdr, uint8_t* pkt) noexcept nogil:
    """Read one tun packet: its header (tun_hdr_len bytes) to hdr, the packet to pkt (room for
    TUN_READ_MAX bytes). Returns the packet's length, TUN_SHORT, or what the read returned
    (0: end of file, -1: an error in errno, DSVPN_IO_AGAIN)."""
    cdef size_t hoff = tun_hdr_len(t)
    cdef iovec iov[2]
    cdef ssize_t n
    iov[0].iov_base = hdr
    iov[0].iov_len = hoff
    iov[1].iov_base = pkt
    iov[1].iov_len = TUN_READ_MAX
    n = dsvpn_readv(t.fd, &iov[0] if hoff else &iov[1], 2 if hoff else 1)
    if n <= 0:
        return n
    t.rx_packets += 1
    if <size_t> n <= hoff:  # (then an empty packet must not read as the end of the file)
        t.short_drops += 1
        return TUN_SHORT
    n -= <ssize_t> hoff
    t.rx_bytes += <uint64_t> n
    return n


cdef inline const char* tun_error(ssize_t n) noexcept nogil:
    """What a tun read that returned n <= 0 means for the loop: NULL (nothing more to read), or
    the fatal error to report."""
    if n == 0:
        return b"end of file on the tun device"
    if n != DSVPN_IO_AGAIN:
        return strerror(errno)
    return NULL


cdef inline uint8_t* af_header(Tun* t, uint8_t* frame, size_t plen) noexcept nogil:
    """Put the address family of the packet at frame + 8 in the 4 bytes before it; returns
    where the tun packet starts, or NULL if it is not IPv4/IPv6 (counted)."""
    cdef uint8_t* out = frame + FRAME_HDR_LEN - AF_HDR_LEN
    cdef uint32_t af
    cdef int version
    if plen < 20:
        t.short_drops += 1
        return NULL
    version = frame[FRAME_HDR_LEN] >> 4
    if version == 4:
        af = t.af_inet
    elif version == 6:
        af = t.af_inet6
    else:
        t.tx_errors += 1
        return NULL
    out[0] = <uint8_t> (af >> 24)
    out[1] = <uint8_t> (af >> 16)
    out[2] = <uint8_t> (af >> 8)
    out[3] = <uint8_t> af
    return out


cdef inline void tun_write(Tun* t, uint8_t* frame, size_t plen) noexcept nogil:
    """Write the packet at frame + 8 to the tun (with vnet_hdr: merged with its neighbours,
    until dsvpn_gro_flush); frame[0..8] is free scratch space."""
    cdef uint8_t* out = frame + FRAME_HDR_LEN
    cdef size_t olen = plen
    if t.vnet_hdr:
        dsvpn_gro_add(t.fd, &t.gro, out, olen)
        t.tx_packets += 1
        return
    if t.header:
        out = af_header(t, frame, plen)
        if out == NULL:
            return
        olen = plen + AF_HDR_LEN
    if dsvpn_write(t.fd, out, olen) < 0:
        t.tx_errors += 1
    else:
        t.tx_packets += 1
