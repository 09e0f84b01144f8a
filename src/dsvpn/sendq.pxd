# The send side of a session, shared by both loops: the tun's packets wait in a flow queue
# (flowq.h) and are framed into a small batch only once the socket has taken the last one, so
# that what waits in FIFO order in front of a new packet (the batch, and the socket's unsent
# bytes, TCP_NOTSENT_LOWAT) stays small, while a bulk flow's backlog waits in its own queue.
from libc.stdint cimport int32_t, uint8_t
from libc.string cimport memcpy

from dsvpn.charm cimport charm_state
from dsvpn.counters cimport Traffic
from dsvpn.flowq cimport dsvpn_fq, dsvpn_fq_dequeue, dsvpn_fq_pkt, dsvpn_fq_release
from dsvpn.frame cimport frame_seal
from dsvpn.tun_io cimport Tun
from dsvpn.tun_vnet cimport (
    DSVPN_VNET_HDR_LEN,
    dsvpn_gso_count,
    dsvpn_gso_segment,
    dsvpn_vnet_finish_csum,
    dsvpn_vnet_hdr,
)
from dsvpn.wire cimport FRAME_HDR_LEN, MAX_PAYLOAD


cdef enum:
    # A batch stops at TX_BATCH_BYTES or TX_BATCH_PKTS: what is in a batch waits in FIFO
    # order, so it is kept small.
    TX_BATCH_BYTES = 65536
    TX_BATCH_PKTS = 128
    # Slack after the batch limit: one 64 KiB TSO packet cut into segments of the smallest
    # MSS (88) with the largest headers (120) still fits (< 160 KiB; see send_gso).
    TX_CAP = TX_BATCH_BYTES + 262144
    QUICK_MAX = 512             # a lone packet up to this size is sent at once (not bulk_ack)


cdef inline bint bulk_ack(const uint8_t* p, size_t n) noexcept nogil:
    """A TCP segment without payload with only ACK set (or ACK|PSH): the reverse stream of
    a bulk transfer, fine to batch. Anything else (SYN, FIN, RST, payload, non-TCP) is not."""
    cdef size_t ipl
    if n >= 40 and (p[0] >> 4) == 4 and p[9] == 6:
        ipl = (p[0] & 15) * 4
    elif n >= 60 and (p[0] >> 4) == 6 and p[6] == 6:
        ipl = 40
    else:
        return False
    if ipl + 20 > n:
        return False
    return ipl + (p[ipl + 12] >> 4) * 4 == n and (p[ipl + 13] & 0xf7) == 0x10


cdef struct Framer:
    # what framing a batch takes besides the queue and the buffer
    charm_state* st             # the session's sending state
    Tun* tun                    # its header kind, and its packet count for cut TSO packets
    Traffic* t                  # counted here (frames, drops) ...
    Traffic* total              # ... and here too (NULL: nowhere else)
    bint* congestion            # set: the next packet is dropped instead (NULL: never)
    int oversize, congested     # the Drop reasons' counters (_loop.pxd)


cdef inline void send_drop(Framer* fr, int why) noexcept nogil:
    fr.t.drops[why] += 1
    if fr.total != NULL:
        fr.total.drops[why] += 1


cdef inline void send_emit(Framer* fr, uint8_t* buf, size_t* end, size_t plen) noexcept nogil:
    """Turn the packet at buf + end + FRAME_HDR_LEN into a frame, appended at buf + end."""
    if fr.congestion != NULL and fr.congestion[0]:
        # The reference's congestion signal: drop one packet, state not advanced.
        fr.congestion[0] = False
        send_drop(fr, fr.congested)
        return
    if plen > MAX_PAYLOAD or plen == 0:
        send_drop(fr, fr.oversize)
        return
    frame_seal(fr.st, buf + end[0], plen)
    end[0] += FRAME_HDR_LEN + plen
    fr.t.tx_packets += 1
    if fr.total != NULL:
        fr.total.tx_packets += 1


cdef inline void send_gso(Framer* fr, const dsvpn_vnet_hdr* vh, const uint8_t* src, size_t plen,
                          uint8_t* buf, size_t* end) noexcept nogil:
    """A TSO super-packet (src): cut into ordinary packets, one frame each (tun_vnet.h)."""
    cdef size_t room = 0, i
    cdef size_t nseg = dsvpn_gso_count(vh, src, plen, FRAME_HDR_LEN, &room)
    if nseg == 0 or end[0] + room > TX_CAP:
        send_drop(fr, fr.oversize)
        return
    fr.tun.rx_packets += nseg - 1
    for i in range(nseg):
        send_emit(fr, buf, end, dsvpn_gso_segment(vh, src, plen, i, nseg,
                                                  buf + end[0] + FRAME_HDR_LEN))


cdef inline int send_batch(Framer* fr, dsvpn_fq* fq, uint8_t* buf, size_t* end) noexcept nogil:
    """Frame packets from the flow queue into buf (TX_CAP bytes) after end, in the queue's
    order (TSO packets cut, partial checksums completed). Returns how many were taken."""
    cdef int count = 0
    cdef int32_t pi
    cdef size_t plen
    cdef uint8_t* p
    cdef const uint8_t* src
    cdef dsvpn_fq_pkt* pkt
    cdef dsvpn_vnet_hdr vh
    vh.flags = vh.gso_type = 0
    while count < TX_BATCH_PKTS and end[0] < TX_BATCH_BYTES:
        pi = dsvpn_fq_dequeue(fq)
        if pi < 0:
            break
        count += 1
        pkt = &fq.pkts[pi]
        plen = pkt.len
        src = fq.ring + pkt.off
        p = buf + end[0]
        if fr.tun.vnet_hdr:
            memcpy(&vh, pkt.hdr, DSVPN_VNET_HDR_LEN)
            if vh.gso_type != 0:
                send_gso(fr, &vh, src, plen, buf, end)
                dsvpn_fq_release(fq, pi)
                continue
        memcpy(p + FRAME_HDR_LEN, src, plen)
        dsvpn_fq_release(fq, pi)
        if fr.tun.vnet_hdr and (vh.flags & 1) and \
                dsvpn_vnet_finish_csum(&vh, p + FRAME_HDR_LEN, plen) != 0:
            send_drop(fr, fr.oversize)
            continue
        send_emit(fr, buf, end, plen)
    return count
