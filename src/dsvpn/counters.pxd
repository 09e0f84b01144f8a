# The counters both loops keep, and the part of stats() they share (_loop.pyi, Loop.stats).
from libc.stdint cimport uint64_t

from dsvpn.tun_io cimport Tun


cdef enum:
    # the members of Drop (_loop.pxd; not computed from them here, as _loop's own C code
    # declares them after this file's): both loops check it when they are imported
    N_DROPS = 7


cdef struct Traffic:
    # session socket bytes and frames, and drops by reason (the part a session reports)
    uint64_t rx_bytes, tx_bytes, rx_packets, tx_packets
    uint64_t drops[N_DROPS]


cdef struct Counters:
    uint64_t handshakes_ok, handshakes_failed, handshakes_pfs, replays, probation_closed
    Traffic t


cdef inline dict loop_stats(const Tun* tun, const Counters* c, dict drop_names):
    """The counters of stats() that both loops have; drop_names: Drop value -> name."""
    out = {
        "tun_rx_packets": tun.rx_packets,
        "tun_rx_bytes": tun.rx_bytes,
        "tun_tx_packets": tun.tx_packets,
        "tun_tx_errors": tun.tx_errors + tun.gro.errors,
        "tun_writes": tun.gro.writes if tun.vnet_hdr else tun.tx_packets,
        "tun_merged": tun.gro.merged,
        "sock_rx_bytes": c.t.rx_bytes,
        "sock_tx_bytes": c.t.tx_bytes,
        "frames_rx": c.t.rx_packets,
        "frames_tx": c.t.tx_packets,
        "short_drops": tun.short_drops,
        "handshakes_ok": c.handshakes_ok,
        "handshakes_failed": c.handshakes_failed,
        "handshakes_pfs": c.handshakes_pfs,
        "probation_closed": c.probation_closed,
    }
    for i, name in drop_names.items():
        out[f"{name}_drops"] = c.t.drops[i]
    return out
