# Declarations of tun_steer.h: which tun queue (worker) gets a packet for which peer.
from libc.stdint cimport uint32_t


cdef extern from "tun_steer.h" nogil:
    uint32_t dsvpn_steer_queue(uint32_t dst, uint32_t net, uint32_t queues)
    int dsvpn_tun_steer(int fd, uint32_t net, uint32_t queues)
