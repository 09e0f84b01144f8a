"""The systemd notification protocol (sd_notify), without a dependency.

A service of ``Type=notify`` learns where to report from $NOTIFY_SOCKET: a unix datagram socket,
by path or, with a leading '@', by abstract name. Each report is one datagram of
``KEY=value`` lines: READY=1 once the service works, STATUS=<one line for people>,
WATCHDOG=1 at least once per $WATCHDOG_USEC (if the unit sets WatchdogSec=), STOPPING=1 when
it begins to shut down. Without $NOTIFY_SOCKET every method does nothing.

Meant to be called from the event loop's periodic tick (never per packet)::

    notifier = Notifier.from_env()
    ...                                   # rules applied, listener bound
    notifier.ready("listening on *:443")
    while running:
        loop.run(...)
        notifier.status(current_status())  # sent only when the text changed
        notifier.tick()                     # WATCHDOG=1 when half the interval has passed
    notifier.stopping()

Failures never reach the caller: a report that cannot be sent is logged once and dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger("dsvpn.notify")

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"


def _address(value: str | None) -> str | None:
    """The socket address of a $NOTIFY_SOCKET value; None if unset or of an unknown kind."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace: a leading NUL instead of '@'
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (a VM's manager): not for a service on this host


def _watchdog_interval(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """The watchdog timeout in seconds, if the watchdog is on and meant for this process."""
    if not usec:
        return None
    try:
        value = int(usec)
        if pid and int(pid) != own_pid:
            return None  # set for another process (a parent that exec'd us keeps its own)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Notifier:
    """Reports the service state to the service manager. Every method returns whether a
    datagram was sent; none raises."""

    def __init__(
        self,
        address: str | None,
        watchdog_interval: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval if address else None
        self._clock = clock
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._last_watchdog: float | None = None
        self._is_ready = False
        self._failed = False

    @classmethod
    def from_env(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> Notifier:
        """A notifier for $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID of ``environ``
        (os.environ by default). ``unset`` removes the three variables, so that the commands
        dsvpn runs do not inherit them."""
        env = os.environ if environ is None else environ
        address = _address(env.get(ENV_SOCKET))
        interval = _watchdog_interval(
            env.get(ENV_WATCHDOG_USEC), env.get(ENV_WATCHDOG_PID), os.getpid()
        )
        if unset:
            for key in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(key, None)
        return cls(address, interval, clock=clock)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def is_ready(self) -> bool:
        return self._is_ready

    # -- the messages ---------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (the first time only), with STATUS= if given and changed."""
        fields = [] if self._is_ready else ["READY=1"]
        if status is not None and status != self._last_status:
            fields.append(f"STATUS={_one_line(status)}")
        if not fields:
            return False
        sent = self._send(fields)
        if sent:
            self._is_ready = True
            if status is not None:
                self._last_status = status
        return sent

    def status(self, text: str) -> bool:
        """STATUS=text, only if it differs from the last status sent."""
        if text == self._last_status:
            return False
        sent = self._send([f"STATUS={_one_line(text)}"])
        if sent:
            self._last_status = text
        return sent

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1 (the manager then expects the process to exit), with STATUS= if given."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
            self._last_status = status
        return self._send(fields)

    def watchdog(self) -> bool:
        """WATCHDOG=1 now (the caller's loop is alive)."""
        if self.watchdog_interval is None:
            return False
        sent = self._send(["WATCHDOG=1"])
        self._last_watchdog = self._clock()
        return sent

    def due(self) -> bool:
        """Whether WATCHDOG=1 should be sent now: never sent yet, or half the interval has
        passed (as sd_watchdog_enabled() advises), so a tick of ~1 s never misses it."""
        if self.watchdog_interval is None:
            return False
        if self._last_watchdog is None:
            return True
        return self._clock() - self._last_watchdog >= self.watchdog_interval / 2

    def tick(self) -> bool:
        """For the periodic tick: WATCHDOG=1 if due()."""
        return self.watchdog() if self.due() else False

    def until_due(self) -> float | None:
        """Seconds until WATCHDOG=1 is due (0 if it is), None without a watchdog: how long a
        wait outside the event loop (a connect, a handshake) may block before it ticks."""
        if self.watchdog_interval is None:
            return None
        if self._last_watchdog is None:
            return 0.0
        return max(0.0, self._last_watchdog + self.watchdog_interval / 2 - self._clock())

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- sending --------------------------------------------------------------------------------

    def _send(self, fields: list[str]) -> bool:
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full queue (the manager is busy) must never stall the event loop.
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                shown = "@" + self.address[1:] if self.address.startswith("\0") else self.address
                why = exc.strerror or exc
                log.warning("cannot notify the service manager at %s: %s", shown, why)
            return False
        return True


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value field.
    return " ".join(text.splitlines())
