"""A server of several clients (a peers file): its loop (dsvpn._multi), its log lines, and the
reload of the peers file on SIGHUP (the tunnel's Tunnel._serve_peers runs them).

A reload that finds an error in the file logs it (one line, naming the file and the line) and
keeps serving the peers it had; one that succeeds changes only what changed: added peers can
connect at once, the sessions of removed (or re-keyed, or re-addressed) peers end, every other
session carries on untouched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dsvpn import peers
from dsvpn.config import ROUTING_TABLE, ServerConfig
from dsvpn.errors import DsvpnError

if TYPE_CHECKING:  # the compiled module is imported lazily, so --help never needs it
    from dsvpn._multi import MultiLoop
    from dsvpn.platform import TunFraming
    from dsvpn.workers import OnEvent, Workers

log = logging.getLogger("dsvpn")


def make_loop(
    tun_fd: int, listen_fd: int, cfg: ServerConfig, current: peers.Peers, wake_fd: int,
    *, framing: TunFraming, control_fd: int = -1, queues: Sequence[int] = (),
    on_event: OnEvent | None = None, wake_main: Callable[[], None] | None = None,
) -> MultiLoop | Workers:  # fmt: skip
    """The loop of a server of several clients; with `queues` (more queues of the tun, whose
    packets the kernel steers by peer), one worker per queue besides the first (dsvpn.workers):
    its events go to on_event (from the worker's thread), a failure wakes the tunnel through
    wake_main."""
    from dsvpn._multi import MultiLoop
    from dsvpn.workers import Workers

    assert cfg.pool is not None
    nworkers = 1 + len(queues)
    settings: dict[str, Any] = {
        "pool": cfg.pool,
        "mtu": cfg.mtu,
        "vnet_hdr": framing.vnet_hdr,
        "tun_header": framing.header,
        "af_inet": framing.af_inet,
        "af_inet6": framing.af_inet6,
        # As the reference, accepted sockets carry the mark too (ignored if refused).
        "mark": ROUTING_TABLE,
        "require_pfs": cfg.require_pfs,
        "workers": nworkers,
    }
    entries = _entries(current)
    first = MultiLoop(
        tun_fd, listen_fd=listen_fd, wake_fd=wake_fd, control_fd=control_fd, **settings
    )
    first.set_peers(entries)
    log.info(
        "serving %d peer(s) of %s (pool %s, server %s)%s",
        len(current.peers),
        current.path,
        current.pool,
        current.server,
        f" with {nworkers} workers" if queues else "",
    )
    if not queues:
        return first
    assert on_event is not None and wake_main is not None
    others: list[tuple[MultiLoop, int]] = []
    fds = list(queues)
    try:
        for index, queue_fd in enumerate(queues, start=1):
            fds.append(wake := os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            loop = MultiLoop(queue_fd, listen_fd=-1, wake_fd=wake, worker=index, **settings)
            loop.set_peers(entries)
            others.append((loop, wake))
    except BaseException:
        first.close()
        for fd in fds:
            os.close(fd)
        raise
    return Workers(first, others, on_event, wake_main, close_fds=fds)


def _entries(current: peers.Peers) -> list[tuple[str, bytes, str]]:
    return [(p.name, p.key, p.address) for p in current.peers]


def reload(loop: MultiLoop | Workers, current: peers.Peers) -> peers.Peers:
    """Serve what the peers file says now; on an error keep `current` (and say why)."""
    try:
        fresh = peers.load(current.path)
    except DsvpnError as exc:
        log.error("reload failed, still serving the previous peers: %s", exc)
        return current
    if fresh.pool != current.pool or fresh.server != current.server:
        log.error(
            "reload failed, still serving the previous peers: the pool line of %s changed "
            "(pool %s, server %s): restart the server to change it",
            current.path,
            fresh.pool,
            fresh.server,
        )
        return current
    loop.set_peers(_entries(fresh))
    log.info("reloaded %s: %s", current.path, changes(current, fresh))
    return fresh


def changes(old: peers.Peers, new: peers.Peers) -> str:
    """What a reload changed, in words."""
    before = {p.name: p for p in old.peers}
    after = {p.name: p for p in new.peers}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    changed = [
        n
        for n in after
        if n in before and (after[n].key != before[n].key or after[n].address != before[n].address)
    ]
    parts = [
        f"{what} {', '.join(names)}"
        for what, names in (("added", added), ("removed", removed), ("changed", changed))
        if names
    ]
    return f"{'; '.join(parts) or 'no change'} ({len(new.peers)} peer(s))"


def log_event(event: int, message: str) -> None:
    from dsvpn._loop import EV_LOG, EV_SESSION_DOWN, EV_SESSION_UP, EV_TUN_ERROR

    if event == EV_SESSION_UP:
        name, _, ip = message.partition(" ")
        log.info("session up: peer %s from %s", name, ip)
    elif event == EV_SESSION_DOWN:
        name, _, why = message.partition(" ")
        log.info("session down: peer %s: %s", name, why)
    elif event == EV_LOG:
        log.warning("%s", message)
    elif event == EV_TUN_ERROR:
        raise DsvpnError(f"tun device failed: {message}")
