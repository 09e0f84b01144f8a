# The receive budget of a session, shared by both loops: its socket's receive buffer sized as
# BQL sizes a NIC's queue, to what the path needs and little more. When we read slower than
# the peer sends, the excess then waits in the peer's flow queue, where a sparse flow passes
# it, instead of in our socket's receive queue, which every packet crosses in order. The path's
# part (twice the bytes read per smallest round trip) keeps a long or fast path at full speed,
# growing as TCP's slow start does; the rest is queue_us of our own reading.
from libc.stdint cimport int64_t, uint64_t

from dsvpn.loop_sys cimport dsvpn_set_rcvbuf, dsvpn_tcp_min_rtt_us, dsvpn_unread


cdef enum:
    RXW_EVERY_MS = 20           # how often the budget is set again
    RXW_QUEUE_US = 1000
    RXW_MIN = 65536
    RXW_MAX = 33554432


cdef struct RxBudget:
    int64_t since               # the start of the interval
    uint64_t bytes              # bytes read by then
    uint64_t window             # the budget set (0: none yet)
    int64_t queue_us            # the allowance for our own reading
    bint off                    # the platform does not let us set it


cdef inline void rx_budget_start(RxBudget* b, int64_t now, uint64_t rx_bytes) noexcept nogil:
    """A new session: no budget yet (the kernel's autotuning until the first interval)."""
    b.since = now
    b.bytes = rx_bytes
    b.window = 0
    b.off = False


cdef inline bint rx_budget_due(const RxBudget* b, int64_t now) noexcept nogil:
    return now - b.since >= RXW_EVERY_MS


cdef inline void rx_budget_set(RxBudget* b, int sock, int64_t now,
                               uint64_t rx_bytes) noexcept nogil:
    """Size sock's receive buffer from what was read since the last time (rx_bytes in all)."""
    cdef int64_t rtt_us
    cdef uint64_t got = rx_bytes - b.bytes
    cdef int64_t dt = now - b.since
    cdef uint64_t window
    b.since = now
    b.bytes = rx_bytes
    if b.off or dt <= 0:
        return
    rtt_us = dsvpn_tcp_min_rtt_us(sock)
    if rtt_us < 0:
        b.off = True
        return
    # bytes per ms x (2 round trips + the queue allowance) in ms
    window = got * <uint64_t> (2 * rtt_us + b.queue_us) / <uint64_t> (1000 * dt)
    # Below what the peer may already send (the window it was given, which TCP never takes
    # back), the kernel would have to drop some of it: shrink by an eighth at a time, and only
    # while little waits unread.
    if window < b.window:
        if dsvpn_unread(sock) > <ssize_t> (b.window / 4):
            window = b.window
        elif window < b.window - b.window / 8:
            window = b.window - b.window / 8
    if window < RXW_MIN:
        window = RXW_MIN
    elif window > RXW_MAX:
        window = RXW_MAX
    if window == b.window:
        return
    if dsvpn_set_rcvbuf(sock, <int> window) != 0:
        b.off = True            # not allowed here: the kernel's autotuning stays
        return
    b.window = window
