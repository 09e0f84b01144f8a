"""Lifecycle of one dsvpn instance: claim, apply, loop, release.

Control flows one way: Config -> backend -> Plan -> Runner (recorded under /run/dsvpn), then
the compiled loop runs until a signal or a fatal error, and the plan is undone in reverse
whatever happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from dsvpn import dns, instances, logs, peers, peers_server, platform, status
from dsvpn.config import ClientConfig, Config, ServerConfig
from dsvpn.errors import DsvpnError, NetworkError, PermissionDenied
from dsvpn.instances import Identity
from dsvpn.keys import load_key
from dsvpn.notify import Notifier
from dsvpn.plan import Plan, show
from dsvpn.platform._common import PLACEHOLDER_SERVER, Backend, NetInfo, is_ipv6, local_networks
from dsvpn.runner import RunFn, Runner, execute

if TYPE_CHECKING:  # the compiled module is imported lazily, so --help never needs it
    from dsvpn._loop import Loop
    from dsvpn._multi import MultiLoop
    from dsvpn.status import StatusServer
    from dsvpn.workers import Workers

log = logging.getLogger("dsvpn")

RECONNECT_ATTEMPTS = 100  # as the reference: then the client gives up
CONNECT_TIMEOUT = 60.0  # TIMEOUT in the reference
# How often a client with --kill-switch looks at its local subnets while a session is up (and
# before each attempt): a new network's LAN is let through within this time.
LOCAL_NETS_EVERY = 2.0
LOCAL_NETS_RETRY = 30.0  # after a failed swap (the next attempt tries at once all the same)
TICK_MS = 1000  # how often the loop hands control back to Python when nothing happens
CAP_NET_ADMIN = 12
LISTEN_BACKLOG = 16  # handshakes run concurrently in the loop, unlike the reference's backlog of 1
NEEDS_ROOT = "needs root (CAP_NET_ADMIN): run it as root"
PFS_NOT_ACCEPTED = "the server did not accept the --pfs handshake: is it C DSVPN or an older dsvpn?"


def _has_net_admin() -> bool:
    if os.geteuid() == 0:
        return True
    # A non-root process can still hold CAP_NET_ADMIN (setcap, ambient capabilities).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def _resolve(host: str, port: int) -> str:
    """The server's address, resolved once at start as the reference does."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NetworkError(f"cannot resolve server name {host!r}: {exc.strerror}") from None
    # Prefer IPv4 when both exist: the tunnel itself is IPv4-addressed and so are most servers.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def _listener(cfg: ServerConfig) -> socket.socket:
    """Bound, listening, non-blocking socket; bind errors surface before anything is changed."""
    if cfg.listen_ip is None:
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        family = socket.AF_INET6 if is_ipv6(cfg.listen_ip) else socket.AF_INET
        candidates = [(family, cfg.listen_ip)]
    last: OSError | None = None
    for family, address in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # no IPv6 on this host: fall back to IPv4 only
            last = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Dual stack where the OS allows it (OpenBSD does not: it falls back to IPv4).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if hasattr(socket, "TCP_DEFER_ACCEPT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 10)
            sock.bind((address, cfg.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                break
    assert last is not None
    where = f"{cfg.listen_ip or '*'}:{cfg.port}"
    if last.errno == errno.EADDRINUSE:
        raise NetworkError(f"port {cfg.port} is already in use ({where})")
    if last.errno == errno.EADDRNOTAVAIL:
        raise NetworkError(f"cannot listen on {where}: that address is not on this host")
    raise NetworkError(f"cannot listen on {where}: {last.strerror}")


class Signals:
    """SIGINT/SIGTERM/SIGHUP set a flag and wake the loop through a pipe; nothing is raised,
    so an undo in progress is never cut short by a second signal. With `reload_on_hup` (a
    server of a peers file), SIGHUP sets `reload` instead of stopping. Every wait() ticks
    `watchdog` as the event loop's tick does, so that a client waiting up to a minute for a
    connect or a handshake is not taken for a wedged one."""

    def __init__(self, reload_on_hup: bool = False, watchdog: Notifier | None = None) -> None:
        self.received: int | None = None
        self.reload = False
        self._reload_on_hup = reload_on_hup
        self._watchdog = watchdog
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old: dict[int, object] = {}
        self._old_fd = -1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP and self._reload_on_hup:
            self.reload = True
        else:
            self.received = signum

    @property
    def fd(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        """Wake the loop from another thread (a worker that failed)."""
        with contextlib.suppress(OSError):  # full: it is awake already
            self._w.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._r.recv(4096):
                pass

    def wait(
        self, seconds: float, sock: socket.socket | None = None, readable: bool = False
    ) -> bool:
        """Sleep up to `seconds`, waking early on a signal (or when `sock` becomes writable, or
        readable with `readable`). Returns True if `sock` became ready."""
        deadline = time.monotonic() + seconds
        while self.received is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._watchdog is not None:
                self._watchdog.tick()
                until = self._watchdog.until_due()
                if until is not None:
                    # Wake up to tick again in time (not before a millisecond: no busy loop).
                    left = min(left, max(until, 0.001))
            watched: list[socket.socket] = [sock] if sock is not None else []
            if readable:
                r, _, _ = select.select([self._r, *watched], [], [], left)
                if sock is not None and sock in r:
                    return True
            else:
                r, w, _ = select.select([self._r], watched, [], left)
                if w:
                    return True
            if self._r in r:
                self.drain()
        return False

    def __enter__(self) -> Signals:
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._old_fd)
        self._r.close()
        self._w.close()


class Tunnel:
    """One running instance. `run()` returns the exit status; everything it changed on the host
    is undone before it returns, whatever happened."""

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        *,
        name: str | None = None,
        run_dir: str | os.PathLike[str] = instances.RUN_DIR,
        run: RunFn = execute,
    ) -> None:
        self.name = name  # the service's instance name, shown by `dsvpn status`
        self.backend = backend
        self.cfg = backend.prepare(cfg)  # a bad tun name is refused before the key is read
        # A server of several clients reads its peers file (and their keys) instead.
        self.peers = _load_peers(self.cfg)
        self.key = load_key(cfg.key_file) if self.peers is None else b""
        self._run_dir = run_dir
        self._run = run  # how commands are run (a fake host in tests)
        self.runner: Runner | None = None
        self.plan: Plan | None = None
        self.net: NetInfo | None = None
        self.follow_gateway = True  # whether the plan has routes that follow the gateway
        self.nets_due = 0.0  # when to look at the local subnets again (monotonic)
        self.fully_up = False  # the whole plan is applied
        self.started = int(time.time())
        self.live: status.Live | None = None  # what `dsvpn status` and the logs say of us
        self.loop: Loop | MultiLoop | Workers | None = None
        self.status_server: StatusServer | None = None
        self.sessions = logs.SessionLog(self.cfg.mode)
        self.stats = logs.SessionStats()
        self.notifier = Notifier(None)  # the service manager's, once run() starts

    def run(self) -> int:
        """claim, apply, loop, release."""
        cfg, backend = self.cfg, self.backend
        # Taken out of the environment: the commands dsvpn runs must not report for it.
        self.notifier = Notifier.from_env(unset=True)
        backend.check_host(cfg)
        with contextlib.ExitStack() as stack:
            stack.callback(self.notifier.close)
            identity = Identity.of(cfg, cfg.tun_name)
            # A kill switch that a crashed client left stays until our routes are in place.
            instance = instances.claim(
                identity, backend, log.info, run_dir=self._run_dir, run=self._run, keep=True
            )
            stack.callback(instance.release)  # the very last: once everything is undone
            for pid in instances.kept_by_dead(backend, run_dir=self._run_dir):
                log.info("the kill switch of dsvpn PID %d stays until our routes are in", pid)
            if isinstance(cfg, ClientConfig):
                # After the claim: a crashed client's fail-closed routes (or its resolv.conf)
                # would have kept the name from resolving.
                cfg = dataclasses.replace(cfg, server_ip=self._resolve_server(cfg))
                cfg = self.cfg = host_facts(cfg, backend)
            listener = None
            if isinstance(cfg, ServerConfig):
                listener = stack.enter_context(_listener(cfg))
            self.runner = Runner(backend, log.info, run=self._run, record=instance)
            # A plan that never names the gateway must not fail for the lack of one.
            self.follow_gateway = isinstance(cfg, ServerConfig) or backend.needs_gateway(cfg)
            self.net = backend.discover(cfg) if self.follow_gateway else NetInfo("", "")
            # A server of several clients on several cores: a multi-queue tun, one per worker.
            nworkers = 1
            if self.peers is not None and isinstance(cfg, ServerConfig):
                from dsvpn import workers  # (threads and futures: a peers file's server only)

                nworkers = workers.count(cfg.workers, backend)
            tun_fd, tun = backend.open_tun(
                cfg.tun_name, cfg.mtu, self.runner.command, queues=nworkers
            )
            stack.callback(os.close, tun_fd)
            instance.set_tun(tun)
            log.info("opened tun device %s", tun)
            signals = stack.enter_context(
                Signals(reload_on_hup=self.peers is not None, watchdog=self.notifier)
            )
            stack.callback(self._undo, signals)  # runs before the tun is closed (LIFO)
            self.plan = backend.plan(cfg, tun, self.net)
            self._apply(self.plan)
            if signals.received is not None:
                return 0
            for line in backend.notes(cfg, tun, self.net):
                log.warning("%s", line)
            self.live = self._live(tun)
            self.status_server = self._status_server(instance)
            control_fd = self.status_server.fileno() if self.status_server else -1
            loop = self.loop = self._make_loop(
                tun_fd, signals, listener, control_fd, tun=tun, nworkers=nworkers
            )
            stack.callback(self._log_ended, loop)  # the session the stop ended, once closed
            stack.callback(loop.close)
            if self.status_server is not None:
                # Gone first when stopping: `dsvpn status` then says so rather than waiting.
                stack.callback(self.status_server.close)
            stack.callback(self.notifier.stopping, "stopping")
            if listener is None:
                return self._connect_forever(cast("Loop", loop), signals, tun)
            # A stopping server closes its listener first (a second close at the end does
            # nothing): no client gets in while the rules are being removed.
            stack.callback(listener.close)
            self._serve(loop, signals)
            return 0
        return 0  # pragma: no cover - the with block always returns

    def _resolve_server(self, cfg: ClientConfig) -> str:
        try:
            return _resolve(cfg.server, cfg.port)
        except NetworkError as exc:
            kept = instances.kept_by_dead(self.backend, run_dir=self._run_dir)
            if not kept:
                raise
            raise NetworkError(
                f"{exc}; the kill switch of dsvpn PID {kept[0]} may block the lookup: give the "
                "server's address instead of its name, or run `dsvpn cleanup --all` first"
            ) from None

    def _apply(self, plan: Plan) -> None:
        """Apply the plan: a kill switch a crashed client kept goes only once our routes are
        in place, just before ours (the same chain or anchor) takes its place."""
        assert self.runner is not None
        self.runner.apply(Plan([s for s in plan.steps if not s.keep]))
        instances.undo_kept(self.backend, log.info, run_dir=self._run_dir, run=self._run)
        self.runner.apply(Plan([s for s in plan.steps if s.keep]))
        self.fully_up = True

    def _undo(self, signals: Signals) -> None:
        """Undo the plan. A kill switch stays when we stop on an error rather than a signal:
        the user asked for traffic to stop when the tunnel does."""
        assert self.runner is not None
        self.runner.undo(keep=self.fully_up and signals.received is None)
        if self.runner.kept:
            log.warning(
                "the kill switch stays: traffic outside the tunnel is blocked until "
                "`dsvpn cleanup --all` or the next start"
            )

    def _live(self, tun: str) -> status.Live:
        cfg = self.cfg
        common: dict[str, Any] = {
            "tun": tun,
            "mtu": cfg.mtu,
            "name": self.name,
            "started": self.started,
            "netns": instances.current_netns(),
        }
        if isinstance(cfg, ServerConfig):
            return status.Live(mode="server", listen=_endpoint(cfg.listen_ip, cfg.port), **common)
        assert cfg.server_ip is not None
        name = cfg.server if cfg.server != cfg.server_ip else None
        self.sessions.peer_name = name
        return status.Live(
            mode="client",
            server=_endpoint(cfg.server_ip, cfg.port),
            server_name=name,
            max_attempts=RECONNECT_ATTEMPTS,
            **common,
        )

    def _status_server(self, instance: instances.Instance) -> StatusServer | None:
        """The socket `dsvpn status` asks; without it (an error) the tunnel runs all the same."""
        path = status.socket_path(instance.run_dir.path, instance.pid)
        try:
            return status.StatusServer(path, self._answer)
        except OSError as exc:
            log.warning("`dsvpn status` cannot ask this instance: %s: %s", path, exc.strerror)
            return None

    def _answer(self) -> dict[str, Any]:
        assert self.live is not None
        return self.live.answer(self.loop)

    def _make_loop(
        self, tun_fd: int, signals: Signals, listener: socket.socket | None, control_fd: int = -1,
        *, tun: str = "", nworkers: int = 1,
    ) -> Loop | MultiLoop | Workers:  # fmt: skip
        from dsvpn._loop import Loop
        from dsvpn.config import ROUTING_TABLE

        framing = self.backend.framing
        if self.peers is not None:
            assert isinstance(self.cfg, ServerConfig) and listener is not None
            return peers_server.make_loop(
                tun_fd, listener.fileno(), self.cfg, self.peers, signals.fd,
                framing=framing, control_fd=control_fd,
                queues=self._more_queues(tun_fd, tun, nworkers),
                on_event=self._peer_event, wake_main=signals.wake,
            )  # fmt: skip
        return Loop(
            tun_fd,
            self.key,
            is_server=self.cfg.is_server,
            wake_fd=signals.fd,
            listen_fd=listener.fileno() if listener is not None else -1,
            control_fd=control_fd,
            tun_header=framing.header,
            af_inet=framing.af_inet,
            af_inet6=framing.af_inet6,
            mtu=self.cfg.mtu,
            vnet_hdr=framing.vnet_hdr,
            # A server forwards only what its client sends as itself (IPv4 and IPv6 twin).
            client_ip4=self.cfg.remote_tun_ip if self.cfg.is_server else None,
            # As the reference, accepted sockets carry the mark too (ignored if refused).
            mark=ROUTING_TABLE,
            require_pfs=isinstance(self.cfg, ServerConfig) and self.cfg.require_pfs,
        )

    # -- server -----------------------------------------------------------------------------

    def _more_queues(self, tun_fd: int, tun: str, nworkers: int) -> list[int]:
        """The tun's other queues, one per worker but the first, their packets steered by peer;
        none (one worker, said why) if the kernel refuses."""
        from dsvpn._multi import steer

        queues: list[int] = []
        if nworkers == 1:
            return queues
        assert isinstance(self.cfg, ServerConfig) and self.cfg.pool is not None
        try:
            while len(queues) < nworkers - 1:
                queues.append(self.backend.open_tun_queue(tun))
            steer(tun_fd, self.cfg.pool, nworkers)
        except (OSError, DsvpnError) as exc:
            for fd in queues:
                os.close(fd)
            why = str(exc)
            if isinstance(exc, PermissionError):
                why = "loading its eBPF program needs CAP_BPF"
            log.warning("one worker instead of %d: cannot steer the tun's queues: %s",
                        nworkers, why)  # fmt: skip
            return []
        return queues

    def _peer_event(self, event: int, message: str) -> None:
        """A session event of a peers file's server, from any worker's loop (in its thread)."""
        from dsvpn._loop import EV_SESSION_UP

        if event == EV_SESSION_UP and self.live is not None:
            self.live.session_up()
        peers_server.log_event(event, message)

    def _serve(self, loop: Loop | MultiLoop | Workers, signals: Signals) -> None:
        from dsvpn import pfs
        from dsvpn._loop import EV_PFS_HELLO

        cfg = self.cfg
        assert isinstance(cfg, ServerConfig) and self.live is not None
        self.live.state = "listening"
        log.info(
            "listening on %s port %d%s",
            cfg.listen_ip or "all addresses",
            cfg.port,
            " (forward-secret handshakes only)" if cfg.require_pfs else "",
        )
        # The tun is up, every rule applied, the listener bound: the service works.
        self.notifier.ready(self.live.summary(0))
        if self.peers is not None:
            self._serve_peers(cast("MultiLoop | Workers", loop), signals)
            return
        loop = cast("Loop", loop)
        while signals.received is None:
            event, message = loop.run(TICK_MS)
            if event == EV_PFS_HELLO:
                pfs.answer_hellos(loop)
            else:
                self._on_event(loop, event, message)
            self._tick(loop)
        log.info("stopping (signal %d)", signals.received)

    def _serve_peers(self, loop: MultiLoop | Workers, signals: Signals) -> None:
        """A server of a peers file: its events, and a reload of the file on SIGHUP."""
        from dsvpn import pfs
        from dsvpn._loop import EV_CONTROL, EV_PFS_HELLO

        assert self.live is not None and self.peers is not None
        while signals.received is None:
            event, message = loop.run(TICK_MS)
            if event == EV_CONTROL:
                if self.status_server is not None:
                    self.status_server.handle()
            elif event == EV_PFS_HELLO:
                pfs.answer_hellos(loop)
            else:
                self._peer_event(event, message)
            # (set by the signal handler, which runs once the loop has returned on the wake-up)
            if signals.reload:
                signals.reload = False
                self.peers = peers_server.reload(loop, self.peers)
            self._tick(loop)
        log.info("stopping (signal %d)", signals.received)

    # -- both ends --------------------------------------------------------------------------

    def _on_event(self, loop: Loop, event: int, message: str) -> None:
        """What the loop reported, but a client's session down and failed handshakes (see
        _connect_forever)."""
        from dsvpn._loop import EV_CONTROL, EV_LOG, EV_SESSION_DOWN, EV_SESSION_UP, EV_TUN_ERROR

        assert self.live is not None
        if event == EV_CONTROL:
            if self.status_server is not None:
                self.status_server.handle()
        elif event == EV_SESSION_UP:
            self._log_ended(loop)  # one the new session replaced, without an event of its own
            self.live.session_up()
            log.info("%s", self.sessions.up(loop.session(), message))
            # A client works once its first session is up (a server is ready before).
            self.notifier.ready(self._summary(loop))
        elif event == EV_SESSION_DOWN:
            self._log_ended(loop)
        elif event == EV_LOG:
            log.warning("%s", message)
        elif event == EV_TUN_ERROR:
            raise DsvpnError(f"tun device failed: {message}")

    def _log_ended(self, loop: Loop | MultiLoop | Workers) -> None:
        if self.peers is not None:
            return  # a server of a peers file logs each session's end as it happens
        line = self.sessions.ended(cast("Loop", loop).ended_session())
        if line is not None:
            log.info("%s", line)

    def _summary(self, loop: Loop | MultiLoop | Workers | None) -> str:
        assert self.live is not None
        return self.live.summary(len(status.sessions_of(loop)))

    def _tick(self, loop: Loop | MultiLoop | Workers) -> None:
        """After every turn of the loop (at least every TICK_MS): never per packet."""
        self.notifier.status(self._summary(loop))  # sent only when it changed
        self.notifier.tick()  # WATCHDOG=1: the loop is alive
        if self.status_server is not None:
            self.status_server.expire()
        if self.stats.due():
            for line in self.stats.lines(status.sessions_of(loop)):
                log.debug("%s", line)

    # -- client -----------------------------------------------------------------------------

    def _connect_forever(self, loop: Loop, signals: Signals, tun: str) -> int:
        from dsvpn import pfs
        from dsvpn._loop import EV_HANDSHAKE_FAILED, EV_SESSION_DOWN, EV_SESSION_UP

        cfg = self.cfg
        assert isinstance(cfg, ClientConfig) and self.live is not None
        live = self.live
        attempt = 0
        why: str | None = None  # what ended the last attempt or session
        live.state = "connecting"
        where = f"{cfg.server_ip} port {cfg.port}"
        log.info("connecting to %s", f"{live.server_name} ({where})" if live.server_name else where)
        while signals.received is None:
            if attempt >= RECONNECT_ATTEMPTS:
                raise NetworkError(
                    f"gave up after {RECONNECT_ATTEMPTS} attempts to reach "
                    f"{cfg.server_ip} port {cfg.port} (the last: {why})"
                )
            # Sleeps of 0, 1, 2, 3, 3, ... s as the reference; the routes stay in place
            # meanwhile, so traffic waits in the tunnel instead of leaking around it.
            delay = min(attempt, 3)
            live.attempt = attempt + 1
            if why is not None:
                live.state = "reconnecting"
                log.warning("%s; %s", why, logs.retry(attempt + 1, RECONNECT_ATTEMPTS, delay))
            self.notifier.status(self._summary(None))
            self.notifier.tick()
            signals.wait(delay)
            if signals.received is not None:
                break
            attempt += 1
            self._follow_gateway(tun)
            self._follow_local_nets(tun, now=True)
            sock, why = self._dial(signals)
            if sock is None:
                continue
            if cfg.pfs:
                key, why = self._pfs_handshake(sock, signals)
                if key is None:
                    continue
                try:
                    loop.adopt(sock.detach(), key)
                finally:
                    pfs.wipe(key)  # the loop has its direction states now
            else:
                loop.connect(sock.detach())
            while signals.received is None:
                event, message = loop.run(TICK_MS)
                if event == EV_SESSION_UP:
                    attempt, why = 0, None
                    self._on_event(loop, event, message)
                elif event == EV_HANDSHAKE_FAILED:
                    why = logs.handshake_failed(message)
                    break
                elif event == EV_SESSION_DOWN:
                    why = self.sessions.ended(loop.ended_session()) or f"session down: {message}"
                    break
                else:
                    self._on_event(loop, event, message)
                self._tick(loop)
                self._follow_local_nets(tun)
        log.info("stopping (signal %d)", signals.received)
        return 0

    def _pfs_handshake(
        self, sock: socket.socket, signals: Signals
    ) -> tuple[bytearray | None, str | None]:
        """The forward-secret handshake on a fresh connection, in Python (X25519 from
        libsodium), with fresh ephemeral keys: the session key; else None and why (the caller
        reconnects; None too when a signal came). A server that closes the connection instead
        of answering does not know the extension: that ends the client, since it never falls
        back."""
        from dsvpn import pfs
        from dsvpn._loop import Timeout

        cfg = self.cfg
        assert isinstance(cfg, ClientConfig)
        try:
            key = pfs.client_exchange(
                sock,
                self.key,
                lambda seconds, readable: signals.wait(seconds, sock, readable),
                Timeout.TIMEOUT_MS / 1000,
            )
            return key, None
        except pfs.NotAcceptedError:
            sock.close()
            raise NetworkError(PFS_NOT_ACCEPTED) from None
        except InterruptedError:
            sock.close()
            return None, None  # a signal: the caller stops
        except (pfs.HandshakeError, OSError) as exc:
            sock.close()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return None, f"forward-secret handshake with {cfg.server_ip} failed: {why}"

    def _dial(self, signals: Signals) -> tuple[socket.socket | None, str | None]:
        """A connected TCP socket to the server (options set before connect, so SO_MARK keeps
        the tunnel's own connection out of the tunnel); else None and why (None too when a
        signal came)."""
        from dsvpn._loop import Timeout, tcp_options
        from dsvpn.config import ROUTING_TABLE

        cfg = self.cfg
        assert isinstance(cfg, ClientConfig) and cfg.server_ip is not None
        family = socket.AF_INET6 if is_ipv6(cfg.server_ip) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # The routing table's number is also the mark its rules exempt (Linux).
            tcp_options(sock.fileno(), mark=ROUTING_TABLE)
            sock.setblocking(False)
            err = sock.connect_ex((cfg.server_ip, cfg.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            if err == errno.EINPROGRESS:
                if not signals.wait(Timeout.TIMEOUT_MS / 1000, sock):
                    if signals.received is None:
                        raise OSError(errno.ETIMEDOUT, "connection timed out")
                    sock.close()
                    return None, None
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
            return sock, None
        except OSError as exc:
            sock.close()
            return None, f"cannot connect to {cfg.server_ip} port {cfg.port}: {exc.strerror or exc}"

    def _follow_gateway(self, tun: str) -> None:
        """Before each attempt: if the default gateway moved (laptop changed networks), move the
        routes that point at it, so the tunnel's own connection can get out again."""
        assert self.runner is not None and self.plan is not None and self.net is not None
        if not self.follow_gateway:
            return
        try:
            net = self.backend.discover(self.cfg)
        except DsvpnError as exc:
            log.warning("cannot find the default gateway: %s", exc)
            return
        if net == self.net:
            return
        log.info(
            "gateway changed: %s via %s -> %s via %s",
            self.net.gateway,
            self.net.ext_if,
            net.gateway,
            net.ext_if,
        )
        plan = self.backend.plan(self.cfg, tun, net)
        # On a failure the old routes stay (or are put back) and the next attempt tries again.
        if self.runner.reapply_gateway(self.plan, plan):
            self.plan, self.net = plan, net

    def _follow_local_nets(self, tun: str, now: bool = False) -> None:
        """With --kill-switch, every LOCAL_NETS_EVERY seconds (or `now`): if the local subnets
        changed (laptop changed networks, a dock was plugged in), let the new LAN through and
        no longer the old one, as the gateway's routes follow the gateway."""
        cfg = self.cfg
        if not (isinstance(cfg, ClientConfig) and cfg.network.kill_switch):
            return
        assert self.runner is not None and self.plan is not None and self.net is not None
        if not now and time.monotonic() < self.nets_due:
            return
        self.nets_due = time.monotonic() + LOCAL_NETS_EVERY
        try:
            # Not the tun: its own addresses are the tunnel's, which passes anyway.
            nets = local_networks(skip=(tun,))
        except DsvpnError as exc:
            log.warning("cannot list the local subnets: %s", exc)
            return
        if nets == cfg.network.local_nets:
            return
        log.info(
            "local subnets changed: %s -> %s; the kill switch follows",
            ", ".join(cfg.network.local_nets or ()) or "none",
            ", ".join(nets) or "none",
        )
        new_cfg = dataclasses.replace(
            cfg, network=dataclasses.replace(cfg.network, local_nets=nets)
        )
        plan = self.backend.plan(new_cfg, tun, self.net)
        # On a failure the old subnets stay (or are put back) and the next look tries again.
        if self.runner.reapply_local(self.plan, plan):
            self.cfg, self.plan = new_cfg, plan
        else:
            self.nets_due = time.monotonic() + LOCAL_NETS_RETRY  # not a warning every 2 s


def _endpoint(host: str | None, port: int) -> str:
    """ "*:443", "192.0.2.1:443", "[2001:db8::1]:443"."""
    if host is None:
        return f"*:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _load_peers(cfg: Config) -> peers.Peers | None:
    if isinstance(cfg, ServerConfig) and cfg.peers_file is not None:
        return peers.load(cfg.peers_file)
    return None


def run(cfg: Config, name: str | None = None) -> int:
    """`dsvpn server|client`: needs root; returns the exit status. `name`: the service
    instance's name, for `dsvpn status` (`dsvpn service run NAME` gives it)."""
    tunnel = Tunnel(cfg, platform.current(), name=name)  # checks the config, reads the key

    if not _has_net_admin():
        raise PermissionDenied(NEEDS_ROOT)
    return tunnel.run()


def host_facts(cfg: ClientConfig, backend: Backend) -> ClientConfig:
    """What the client's options need from this host, looked up once at start: the local
    subnets (--kill-switch) and who manages DNS (--dns)."""
    net = cfg.network
    if net.kill_switch and net.local_nets is None:
        net = dataclasses.replace(net, local_nets=local_networks())
    if net.dns and not net.dns_via:
        via, service = dns.detect(backend.name)
        net = dataclasses.replace(net, dns_via=via, dns_service=service)
    return dataclasses.replace(cfg, network=net)


def cleanup(everything: bool = False) -> int:
    """`dsvpn cleanup`: undo what dead instances of this network namespace left behind; their
    kill switch only with `everything` (`--all`)."""
    if not _has_net_admin():
        raise PermissionDenied(NEEDS_ROOT)
    backend = platform.current()
    count = instances.cleanup(backend, log.info, keep=not everything)
    if count:
        log.info("cleaned up after %d dead instance(s)", count)
    else:
        log.info("nothing to clean up")
    for pid in instances.kept_by_dead(backend):
        log.info(
            "kept the kill switch of dsvpn PID %d: traffic outside the tunnel stays blocked "
            "until `dsvpn cleanup --all` or the next start",
            pid,
        )
    return 0


def dry_run(cfg: Config, platform_name: str | None) -> int:
    """Print the plan without root and without changing anything. The config is checked as a
    real run checks it (Backend.prepare)."""
    backend = platform.by_name(platform_name) if platform_name else platform.current()
    cfg = backend.prepare(cfg)
    here = platform_name is None
    if not here:
        with contextlib.suppress(DsvpnError):
            here = platform.current().name == backend.name
    if isinstance(cfg, ClientConfig):
        server_ip = PLACEHOLDER_SERVER
        with contextlib.suppress(DsvpnError):
            server_ip = _resolve(cfg.server, cfg.port)
        cfg = dataclasses.replace(cfg, server_ip=server_ip)
    net = backend.placeholder_net()
    notes = []
    if here:
        with contextlib.suppress(DsvpnError):
            net = backend.discover(cfg)
        if isinstance(cfg, ClientConfig):
            try:
                cfg = host_facts(cfg, backend)
            except DsvpnError as exc:
                notes.append(f"warning: {exc}")
    tun = cfg.tun_name or "<tun>"
    plan = backend.plan(cfg, tun, net)
    print(f"# dsvpn {cfg.mode} on {backend.name}: dry run, nothing is changed")
    print(f"# open tun device {tun}")
    print(show(backend.mtu_argv(tun, cfg.mtu)))
    for line in plan.render(backend):
        print(line)
    for line in [*backend.notes(cfg, tun, net), *notes]:
        print(f"# {line}")
    return 0
