# Declarations of poller.h: readiness of many descriptors (epoll on Linux, kqueue on macOS and the
# BSDs, poll elsewhere).
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "poller.h" nogil:
    enum:
        DSVPN_PIN
        DSVPN_POUT
        DSVPN_PERR
    struct dsvpn_pev:
        uint64_t data
        uint32_t events
    struct dsvpn_poller:
        pass
    dsvpn_poller* dsvpn_poller_new(int max_events)
    void dsvpn_poller_free(dsvpn_poller* p)
    int dsvpn_poller_add(dsvpn_poller* p, int fd, uint32_t events, uint64_t data)
    int dsvpn_poller_mod(dsvpn_poller* p, int fd, uint32_t events, uint64_t data)
    int dsvpn_poller_del(dsvpn_poller* p, int fd)
    int dsvpn_poller_wait(dsvpn_poller* p, dsvpn_pev* out, int timeout_ms)
