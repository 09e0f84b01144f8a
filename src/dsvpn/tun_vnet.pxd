# Declarations of tun_vnet.h: Linux tun with IFF_VNET_HDR (GSO writes, TSO reads).
from libc.stdint cimport uint8_t, uint64_t


cdef extern from "tun_vnet.h" nogil:
    enum:
        DSVPN_VNET_HDR_LEN
    struct dsvpn_vnet_hdr:
        uint8_t flags
        uint8_t gso_type
    struct dsvpn_gro:
        int segs
        int no_uso, test_refuse_uso
        uint64_t writes, errors, merged
    void dsvpn_gro_add(int fd, dsvpn_gro* g, uint8_t* pkt, size_t len)
    void dsvpn_gro_flush(int fd, dsvpn_gro* g)
    int dsvpn_vnet_finish_csum(const dsvpn_vnet_hdr* h, uint8_t* pkt, size_t len)
    size_t dsvpn_gso_count(const dsvpn_vnet_hdr* h, const uint8_t* pkt, size_t len,
                           size_t frame_hdr, size_t* room)
    size_t dsvpn_gso_segment(const dsvpn_vnet_hdr* h, const uint8_t* src, size_t len,
                             size_t i, size_t nseg, uint8_t* out)
