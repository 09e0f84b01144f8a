"""A server of several clients on several cores: one worker per core, each a nogil
dsvpn._multi.MultiLoop in a thread of its own, with its own queue of one multi-queue tun and
the sessions of its own peers.

Who owns a peer: the host part of its tunnel address modulo the number of workers. The kernel
gives each queue the packets of the peers its worker owns (a steering program, tun_steer.h),
so a worker never needs another's session and packets never cross threads. The first worker
(run by the tunnel's thread, as a single loop would be) also accepts every connection and does
every handshake (they are rare and cheap next to the packets); a session for a peer another
worker owns is handed over once authenticated: its socket and session key, nothing else.

Everything else a worker does for the tunnel (peers changed by a reload, status, stop) runs in
the worker's own thread, between two turns of its loop: the tunnel queues a call and wakes the
worker through an eventfd. A loop is thus only ever touched by one thread, and the packet path
has no lock at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from dsvpn.config import MAX_WORKERS
from dsvpn.errors import DsvpnError

if TYPE_CHECKING:
    from dsvpn._multi import MultiLoop, PeerSession
    from dsvpn.platform import Backend

log = logging.getLogger("dsvpn")

CALL_TIMEOUT_S = 10.0  # a worker answers between two turns: far less, unless it is wedged
STOP_TIMEOUT_S = 5.0

T = TypeVar("T")
OnEvent = Callable[[int, str], None]


def count(wanted: int | None, backend: Backend) -> int:
    """How many workers: as asked, else one per CPU this process may run on; one where the
    OS has no multi-queue tun."""
    if not backend.multi_queue_tun:
        return 1
    if wanted is not None:
        return wanted
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


class _Worker:
    """One loop and its thread."""

    def __init__(self, index: int, loop: MultiLoop, wake_fd: int, on_event: OnEvent,
                 on_failure: Callable[[], None]) -> None:  # fmt: skip
        self.index = index
        self.loop = loop
        self._wake_fd = wake_fd
        self._on_event = on_event
        self._on_failure = on_failure
        self._calls: queue.SimpleQueue[tuple[Callable[[MultiLoop], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._stopping = False
        self.error: BaseException | None = None
        # (a daemon: a wedged worker must not keep a stopping server alive)
        self.thread = threading.Thread(
            target=self._serve, name=f"dsvpn-worker-{index}", daemon=True
        )

    def _serve(self) -> None:
        from dsvpn._loop import EV_WAKE

        try:
            while not self._stopping:
                event, message = self.loop.run(-1)
                if event == EV_WAKE:
                    self._answer()
                else:
                    self._on_event(event, message)
        except BaseException as exc:  # reported by the tunnel's thread (Workers.check)
            self.error = exc
            self._on_failure()
        finally:
            self._answer(failed=True)

    def _answer(self, failed: bool = False) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            if failed:
                done.set_exception(DsvpnError(f"worker {self.index} has stopped"))
                continue
            try:
                done.set_result(fn(self.loop))
            except Exception as exc:  # the caller's to report
                done.set_exception(exc)

    def post(self, fn: Callable[[MultiLoop], T]) -> Future[T]:
        """Run fn(loop) in the worker's thread between two turns of its loop."""
        done: Future[T] = Future()
        if self.error is not None or not self.thread.is_alive():
            done.set_exception(DsvpnError(f"worker {self.index} has stopped"))
            return done
        self._calls.put((fn, done))
        self._wake()
        return done

    def wait(self, done: Future[T]) -> T:
        """The result of a call post() made (DsvpnError if the worker does not answer)."""
        try:
            return done.result(timeout=CALL_TIMEOUT_S)
        except TimeoutError:
            raise DsvpnError(f"worker {self.index} does not answer") from None

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closed: the worker has stopped anyway
            os.eventfd_write(self._wake_fd, 1)

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def join(self) -> None:
        self.thread.join(STOP_TIMEOUT_S)
        if self.thread.is_alive():
            log.error("worker %d did not stop within %.0f s", self.index, STOP_TIMEOUT_S)


class Workers:
    """The loops of a server of several clients, as one MultiLoop to the tunnel: run() runs
    the first worker's loop (in the caller's thread) and hands over the sessions it accepted
    for the others; the rest of MultiLoop's API covers every worker.

    `others` are the loops of the other workers with their wake eventfds; `close_fds` (their
    tun queues and eventfds) are closed by close(), after the loops."""

    def __init__(self, first: MultiLoop, others: list[tuple[MultiLoop, int]],
                 on_event: OnEvent, wake_main: Callable[[], None],
                 close_fds: Iterable[int] = ()) -> None:  # fmt: skip
        self.first = first
        self._wake_main = wake_main
        self._failed = False
        self._close_fds = list(close_fds)
        self.others = [
            _Worker(i, loop, fd, on_event, self._failure)
            for i, (loop, fd) in enumerate(others, start=1)
        ]
        for worker in self.others:
            worker.thread.start()

    @property
    def count(self) -> int:
        return 1 + len(self.others)

    def _failure(self) -> None:
        self._failed = True
        self._wake_main()

    def check(self) -> None:
        """DsvpnError if a worker has stopped on an error (a tun error: as the first worker's
        own EV_TUN_ERROR would)."""
        if not self._failed:
            return
        for worker in self.others:
            if worker.error is not None:
                why = worker.error
                if isinstance(why, DsvpnError):
                    raise DsvpnError(f"worker {worker.index}: {why}") from None
                raise DsvpnError(f"worker {worker.index} failed: {why!r}") from None

    def run(self, timeout_ms: int) -> tuple[int, str]:
        from dsvpn._loop import EV_HANDOFF

        event, message = self.first.run(timeout_ms)
        if event == EV_HANDOFF:
            self._hand_over()
        self.check()
        return event, message

    def _hand_over(self) -> None:
        for owner, fd, name, key, pfs in self.first.take_handoffs():
            worker = self.others[owner - 1]

            def adopt(loop: MultiLoop, fd: int = fd, name: str = name,
                      key: bytearray = key, pfs: bool = pfs) -> bool:  # fmt: skip
                try:
                    return bool(loop.adopt(fd, name, key, pfs))
                finally:
                    key[:] = bytes(len(key))  # the loop has its direction states now

            done = worker.post(adopt)
            if done.done() and done.exception() is not None:
                os.close(fd)  # never adopted: the worker has stopped

    # -- MultiLoop's API over every worker -------------------------------------------------------

    def _each(self, fn: Callable[[MultiLoop], T]) -> list[T]:
        """fn on every loop, each in its own thread; the first worker's result first."""
        pending = [worker.post(fn) for worker in self.others]
        results = [fn(self.first)]
        return results + self._results(pending)

    def _results(self, pending: list[Future[T]]) -> list[T]:
        """The results of one call posted to each of the other workers, in their order."""
        return [w.wait(done) for w, done in zip(self.others, pending, strict=True)]

    def set_peers(self, peers: Iterable[tuple[str, bytes, str]]) -> list[str]:
        wanted = list(peers)
        ended = self.first.set_peers(wanted)  # a ValueError here leaves every worker as it was
        posted = [w.post(lambda loop: loop.set_peers(wanted)) for w in self.others]
        for more in self._results(posted):
            ended.extend(more)
        return ended

    def sessions(self) -> dict[str, PeerSession]:
        out: dict[str, PeerSession] = {}
        for index, found in enumerate(self._each(lambda loop: loop.sessions())):
            for name, session in found.items():
                out[name] = {**session, "worker": index}  # type: ignore[typeddict-unknown-key]
        return out

    def stats(self) -> dict[str, int]:
        each = self._each(lambda loop: loop.stats())
        total = dict(each[0])
        for more in each[1:]:
            for key, value in more.items():
                if key != "peers":  # every worker serves the same peers
                    total[key] += value
        total["workers"] = self.count
        return total

    def disconnect(self, name: str | None = None) -> bool:
        return any(self._each(lambda loop: loop.disconnect(name)))

    def take_pfs_hello(self) -> Any:
        return self.first.take_pfs_hello()

    def pfs_reply(self, token: int, reply: bytes, key: bytes | bytearray) -> bool:
        return self.first.pfs_reply(token, reply, key)

    def pfs_abort(self, token: int, why: str) -> bool:
        return self.first.pfs_abort(token, why)

    def close(self) -> None:
        """Stop every worker (their sessions end) and close the first loop; then the fds."""
        for worker in self.others:
            worker.stop()
        for worker in self.others:
            worker.join()
            if not worker.thread.is_alive():
                worker.loop.close()
        self.first.close()
        for fd in self._close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._close_fds = []
