# Declarations of flowq.h: flow queuing of the packets read from the tun device.
from libc.stddef cimport ptrdiff_t
from libc.stdint cimport int32_t, uint8_t, uint32_t


cdef extern from "flowq.h" nogil:
    enum:
        DSVPN_FQ_HDR_MAX
    struct dsvpn_fq_pkt:
        size_t off
        uint32_t len
        uint8_t hdr[DSVPN_FQ_HDR_MAX]
    struct dsvpn_fq:
        uint8_t* ring
        dsvpn_fq_pkt* pkts
        size_t bytes
        uint32_t packets, seed
    int dsvpn_fq_init(dsvpn_fq* q, size_t cap, int32_t npkts, size_t limit, uint32_t seed)
    void dsvpn_fq_destroy(dsvpn_fq* q)
    void dsvpn_fq_reset(dsvpn_fq* q)
    ptrdiff_t dsvpn_fq_slot(const dsvpn_fq* q, size_t maxlen)
    bint dsvpn_fq_room(const dsvpn_fq* q, size_t maxlen)
    void dsvpn_fq_commit(dsvpn_fq* q, size_t off, size_t len, const uint8_t* hdr, size_t hdr_len)
    int32_t dsvpn_fq_dequeue(dsvpn_fq* q)
    void dsvpn_fq_release(dsvpn_fq* q, int32_t pi)
