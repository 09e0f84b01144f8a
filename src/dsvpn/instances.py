"""Instance records under /run/dsvpn: what each running dsvpn changed on the host.

One JSON file per instance, ``<pid>.json``, rewritten atomically before every change, so that
what a crashed instance left behind is undone by the next start or by ``dsvpn cleanup``. The
records also let live instances see each other: `claim` refuses an instance that would
collide with a live one, and a sysctl that several instances need is restored by the last one
to leave (`Instance.hand_over`).

Everything in a record may end up run as root, so a record is trusted only as far as it could
only have been written by dsvpn:
- the directory belongs to the effective user and nobody else may write to it (else refused);
- a record is a regular file named ``<pid>.json`` (its pid field must agree), owned by the
  effective user, not writable by group or others, opened without following symbolic links,
  with a start stamp (without one, a live PID cannot be told from a reused one);
- each undo must be the backend's own undo of the recorded apply step (`Dialect.undo_of`),
  with the stdin the backend feeds it (`Dialect.undo_input_fits`); a sysctl is restored with an
  argv built from one of the backend's keys and a plain value; a file step names one of
  plan.WRITABLE_FILES.
A record that fails any of these is reported and left alone: nothing of it runs.

Records carry their network namespace: rules and sysctls are per namespace, so instances in
different namespaces share /run/dsvpn without ever undoing, handing over to or conflicting
with each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsvpn.config import ROUTING_TABLE, Config
from dsvpn.errors import ConflictError, DsvpnError, PermissionDenied
from dsvpn.plan import WRITABLE_FILES, Dialect, Step, is_sysctl_value
from dsvpn.runner import Applied, RunFn, Runner, execute

__all__ = [
    "RUN_DIR",
    "Identity",
    "Instance",
    "Record",
    "RunDir",
    "claim",
    "cleanup",
    "kept_by_dead",
    "undo_kept",
]

RUN_DIR = Path("/run/dsvpn")
FORMAT_VERSION = 2
LOCK_NAME = ".lock"
MAX_RECORD_BYTES = 1 << 20
_RECORD_NAME = re.compile(r"([1-9][0-9]{0,9})\.json")
_TMP_NAME = re.compile(r"\.[0-9]+\.[0-9]+\.tmp")  # .<record pid>.<writer pid>.tmp
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux >= 5.14

LogFn = Callable[[str], None]


# -- processes and namespaces ------------------------------------------------------------------


def current_netns() -> str | None:
    """Linux network namespace of this process, None elsewhere: "net:[4026531840]", followed
    by the namespace's cookie where the kernel has one. Inode numbers are reused once a
    namespace is gone; cookies never are (until reboot, which also empties /run)."""
    try:
        link = os.readlink("/proc/self/ns/net")
    except OSError:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:
        return link
    return f"{link} cookie {int.from_bytes(raw, sys.byteorder)}"


def process_start(pid: int) -> str | None:
    """An opaque start stamp of a process, to tell a live instance from a reused PID."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if sys.platform.startswith("linux"):
            return None
    except OSError:
        return None
    else:
        # Field 22 (starttime); the command name in field 2 may contain spaces and ")".
        return text.rsplit(")", 1)[1].split()[19]
    try:
        out = execute(["ps", "-o", "lstart=", "-p", str(pid)])
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def is_alive(pid: int, start: str) -> bool:
    """True if `pid` runs and is the process that recorded `start`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OverflowError:
        return False
    now = process_start(pid)
    # A process we cannot read the stamp of counts as alive: never undo a live one's rules.
    return now is None or now == start


# -- the record format -------------------------------------------------------------------------


class Untrusted(Exception):
    """A record that dsvpn will not act on; str() says why."""


@dataclass(frozen=True)
class Identity:
    """What makes an instance collide with another on the same host (and namespace)."""

    mode: str
    tun: str | None  # None while the OS has not picked the name yet
    port: int
    local_tun_ip: str
    remote_tun_ip: str
    # A client takes over all routing (table 42069 on Linux, 0/1 + 128/1 elsewhere):
    # two at once cannot both work.
    table: int | None = None
    # Instances in other namespaces neither conflict nor share.
    netns: str | None = dataclasses.field(default_factory=current_netns)

    @classmethod
    def of(cls, cfg: Config, tun: str | None) -> Identity:
        return cls(
            mode=cfg.mode,
            tun=tun,
            port=cfg.port,
            local_tun_ip=cfg.local_tun_ip,
            remote_tun_ip=cfg.remote_tun_ip,
            table=None if cfg.is_server else ROUTING_TABLE,
        )

    @classmethod
    def from_json(cls, data: Any) -> Identity:
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(cls)}:
            raise Untrusted("malformed identity")
        if data["mode"] not in ("server", "client"):
            raise Untrusted("unknown mode")
        for name in ("local_tun_ip", "remote_tun_ip"):
            if not isinstance(data[name], str) or not _is_ipv4(data[name]):
                raise Untrusted(f"malformed {name}")
        if not _is_int(data["port"]) or not 0 < data["port"] < 65536:
            raise Untrusted("malformed port")
        if data["table"] is not None and not _is_int(data["table"]):
            raise Untrusted("malformed table")
        for name in ("tun", "netns"):
            if data[name] is not None and not isinstance(data[name], str):
                raise Untrusted(f"malformed {name}")
        return cls(**data)


@dataclass
class Record:
    """One instance's record: who it is and the steps it applied, in order."""

    pid: int
    start: str
    identity: Identity
    applied: list[Applied]

    @property
    def name(self) -> str:
        return f"{self.pid}.json"

    def alive(self) -> bool:
        return is_alive(self.pid, self.start)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "pid": self.pid,
            "start": self.start,
            "identity": dataclasses.asdict(self.identity),
            "steps": [
                {
                    "apply": list(a.step.apply),
                    "undo": list(a.step.undo) if a.step.undo is not None else None,
                    "sysctl": list(a.step.sysctl) if a.step.sysctl else None,
                    "gateway": a.step.gateway,
                    "previous": a.previous,
                    "keep": a.step.keep,
                    "file": list(a.step.file) if a.step.file else None,
                    "undo_input": a.step.undo_input,
                }
                for a in self.applied
            ],
        }

    @classmethod
    def from_json(cls, data: Any, pid: int, dialect: Dialect) -> Record:
        """The record of file `<pid>.json`, checked field by field; Untrusted if any field is
        not what dsvpn writes or any step is not one `dialect` plans."""
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise Untrusted("not a dsvpn record of this version")
        if data.get("pid") != pid or not _is_int(data.get("pid")):
            raise Untrusted(f"its pid field {data.get('pid')!r} does not match its name")
        start = data.get("start")
        if not isinstance(start, str) or not 0 < len(start) <= 64:
            # Without a stamp a live PID cannot be told from a reused one, so the record can
            # be neither undone nor trusted as live.
            raise Untrusted("no process start stamp")
        steps = data.get("steps")
        if not isinstance(steps, list):
            raise Untrusted("malformed steps")
        identity = Identity.from_json(data.get("identity"))
        return cls(pid, start, identity, [_applied_from_json(s, dialect) for s in steps])


_STEP_KEYS = frozenset({"apply", "undo", "sysctl", "gateway", "previous"})
# Written by every dsvpn that knows them; a record without them has none of those steps.
_NEWER_STEP_KEYS = frozenset({"keep", "file", "undo_input"})


def _applied_from_json(data: Any, dialect: Dialect) -> Applied:
    if not isinstance(data, dict) or not _STEP_KEYS <= set(data) <= _STEP_KEYS | _NEWER_STEP_KEYS:
        raise Untrusted("malformed step")
    apply, undo, sysctl, previous = data["apply"], data["undo"], data["sysctl"], data["previous"]
    keep, file, undo_input = data.get("keep", False), data.get("file"), data.get("undo_input")
    if not _is_argv(apply) or not (undo is None or _is_argv(undo)):
        raise Untrusted("malformed step")
    if not isinstance(data["gateway"], bool) or not (previous is None or isinstance(previous, str)):
        raise Untrusted("malformed step")
    if not isinstance(keep, bool):
        raise Untrusted("malformed step")
    if file is not None:
        if not (
            isinstance(file, list)
            and len(file) == 2
            and all(isinstance(x, str) for x in file)
            and undo is None
            and sysctl is None
        ):
            raise Untrusted("malformed file step")
        if file[0] not in WRITABLE_FILES:
            raise Untrusted(f"{file[0]!r} is not a file dsvpn writes")
        file = (file[0], file[1])
    if undo_input is not None and not (
        isinstance(undo_input, str)
        and undo is not None
        and dialect.undo_input_fits(undo, undo_input)
    ):
        raise Untrusted(f"the input of `{' '.join(undo or ())}` is not what dsvpn feeds it")
    if sysctl is not None:
        if not (
            isinstance(sysctl, list)
            and len(sysctl) == 2
            and all(isinstance(x, str) for x in sysctl)
            and undo is None
        ):
            raise Untrusted("malformed sysctl step")
        key, wanted = sysctl
        if not dialect.is_sysctl_key(key):
            raise Untrusted(f"sysctl {key!r} is not one dsvpn sets")
        for value in (wanted, previous):
            if value is not None and not is_sysctl_value(value):
                raise Untrusted(f"sysctl {key} has an unexpected value {value!r}")
        sysctl = (key, wanted)
    elif undo is not None and dialect.undo_of(apply) != tuple(undo):
        raise Untrusted(f"`{' '.join(undo)}` is not dsvpn's undo of `{' '.join(apply)}`")
    step = Step(
        tuple(apply),
        tuple(undo) if undo is not None else None,
        sysctl=sysctl,
        gateway=data["gateway"],
        keep=keep,
        file=file,
        undo_input=undo_input,
    )
    return Applied(step, previous)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_argv(value: object) -> bool:
    return (
        isinstance(value, list)
        and 0 < len(value) <= 64
        and all(isinstance(a, str) and a for a in value)
    )


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


# -- the directory -----------------------------------------------------------------------------


class RunDir:
    """The run directory, checked every time it is locked; every access goes through the
    directory's file descriptor while it is locked, so a path swapped meanwhile changes
    nothing. The lock (flock on .lock) is re-entrant within one RunDir object."""

    def __init__(self, path: str | os.PathLike[str] = RUN_DIR) -> None:
        self.path = Path(path)
        self._mutex = threading.RLock()
        self._depth = 0
        self._fd = -1
        self._lock_fd = -1

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    @contextlib.contextmanager
    def lock(self, create: bool = False) -> Iterator[None]:
        """Hold the directory's lock: nothing below is done without it. `create` makes the
        directory (0700) when it does not exist."""
        with self._mutex:
            if self._depth == 0:
                self._open(create)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    os.close(self._lock_fd)  # releases the flock
                    os.close(self._fd)
                    self._fd = self._lock_fd = -1

    def _refuse(self, why: str) -> DsvpnError:
        return DsvpnError(f"refusing to use {self.path}: {why}")

    def _open(self, create: bool) -> None:
        created = False
        if create:
            try:
                os.mkdir(self.path, 0o700)
                created = True
            except FileExistsError:
                pass
            except PermissionError as exc:
                raise PermissionDenied(
                    f"cannot create {self.path}: permission denied (run as root)"
                ) from exc
            except OSError as exc:
                raise DsvpnError(f"cannot create {self.path}: {exc.strerror}") from exc
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except PermissionError as exc:
            raise PermissionDenied(
                f"cannot use {self.path}: permission denied (run as root)"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
                raise self._refuse("not a directory (a symbolic link?)") from exc
            raise DsvpnError(f"cannot use {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise self._refuse(f"it belongs to uid {st.st_uid}, not {os.geteuid()}")
            if created:
                os.fchmod(fd, 0o700)  # whatever the umask made of it
            elif st.st_mode & 0o022:
                mode = stat.S_IMODE(st.st_mode)
                raise self._refuse(f"group or others may write to it (mode {mode:04o})")
            lock_flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                lock_fd = os.open(LOCK_NAME, lock_flags, 0o600, dir_fd=fd)
            except OSError as exc:
                raise self._refuse(f"cannot open its {LOCK_NAME}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(lock_fd)
            os.close(fd)
            raise
        self._fd, self._lock_fd = fd, lock_fd

    def _held(self) -> int:
        assert self._depth > 0, "the run directory must be locked"
        return self._fd

    # -- records -------------------------------------------------------------------------------

    def records(self, dialect: Dialect, report: LogFn | None = None) -> list[Record]:
        """Every trusted record, by PID. The others are reported through `report`."""
        fd = self._held()
        found = []
        for name in sorted(os.listdir(fd)):
            if name == LOCK_NAME:
                continue
            if _TMP_NAME.fullmatch(name):
                # Writes happen only under the lock we hold: this one's writer died mid-way.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
                continue
            match = _RECORD_NAME.fullmatch(name)
            try:
                if match is None:
                    raise Untrusted("not named <pid>.json")
                found.append(self.load(int(match[1]), dialect))
            except FileNotFoundError:
                continue  # removed meanwhile (by a writer that did not take the lock)
            except Untrusted as exc:
                if report is not None:
                    report(f"warning: ignoring {self.path / name}: {exc}")
        return sorted(found, key=lambda r: r.pid)

    def load(self, pid: int, dialect: Dialect) -> Record:
        """The record `<pid>.json`; Untrusted (or FileNotFoundError) if it cannot be used."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(f"{pid}.json", flags, dir_fd=self._held())
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise Untrusted("a symbolic link") from exc
            raise Untrusted(exc.strerror or str(exc)) from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Untrusted("not a regular file")
            if st.st_uid != os.geteuid():
                raise Untrusted(f"owned by uid {st.st_uid}")
            if st.st_mode & 0o022:
                raise Untrusted("writable by group or others")
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            raise Untrusted("too large")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise Untrusted("not valid JSON") from exc
        return Record.from_json(data, pid, dialect)

    def write(self, record: Record) -> None:
        """Replace `<pid>.json` atomically with a file of mode 0600."""
        fd = self._held()
        tmp = f".{record.pid}.{os.getpid()}.tmp"
        data = json.dumps(record.to_json(), indent=1).encode()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            out = os.open(tmp, flags, 0o600, dir_fd=fd)
            try:
                os.fchmod(out, 0o600)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view) :]
                os.fsync(out)
            finally:
                os.close(out)
            os.replace(tmp, record.name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise DsvpnError(f"cannot write {self.path / record.name}: {exc.strerror}") from exc

    def remove(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{pid}.json", dir_fd=self._held())


# -- one instance ------------------------------------------------------------------------------


class Instance:
    """A record and the directory it lives in: what the runner writes through."""

    def __init__(self, run_dir: RunDir, record: Record, dialect: Dialect) -> None:
        self.run_dir = run_dir
        self.record = record
        self._dialect = dialect

    @property
    def pid(self) -> int:
        return self.record.pid

    def set_tun(self, tun: str) -> None:
        """The tun name the OS picked, for the conflict checks of later instances."""
        with self.run_dir.lock():
            self.record.identity = dataclasses.replace(self.record.identity, tun=tun)
            self._write(self.record.applied)

    def save(self, applied: list[Applied]) -> None:
        with self.run_dir.lock():
            self._write(applied)

    def _write(self, applied: list[Applied]) -> None:
        # A sysctl's saved value already on disk wins: another instance may have handed its
        # original value over to this record (see hand_over).
        self._adopt(applied)
        self.record.applied = list(applied)
        self.run_dir.write(self.record)

    def adopt(self, applied: list[Applied]) -> None:
        with self.run_dir.lock():
            self._adopt(applied)

    def _adopt(self, applied: list[Applied]) -> None:
        try:
            on_disk = self.run_dir.load(self.pid, self._dialect)
        except (FileNotFoundError, Untrusted):
            return
        saved = {a.step.sysctl[0]: a.previous for a in on_disk.applied if a.step.sysctl}
        for a in applied:
            if a.step.sysctl and a.step.sysctl[0] in saved:
                a.previous = saved[a.step.sysctl[0]]

    def hand_over(
        self, key: str, wanted: str, previous: str | None, restore: Callable[[], None]
    ) -> int | None:
        """Give our saved original value of sysctl `key` to a live instance of this namespace
        that still needs it and return its PID; with none, call `restore` and return None.

        Under the lock, so that two instances leaving together cannot both decide that the
        other one still needs the value. Only an instance that saw the value already changed
        (its saved value == wanted) takes the original: one that saved another value itself
        holds an original already.
        """
        with self.run_dir.lock():
            holders = [
                (r, a)
                for r in self._live_peers()
                for a in r.applied
                if a.step.sysctl and a.step.sysctl[0] == key
            ]
            if not holders:
                restore()
                return None
            if previous is not None and previous != wanted:
                for r, a in holders:
                    if a.previous == wanted:
                        a.previous = previous
                        self.run_dir.write(r)
                        return r.pid
            return holders[0][0].pid

    def _live_peers(self) -> list[Record]:
        netns = self.record.identity.netns
        return [
            r
            for r in self.run_dir.records(self._dialect)
            if r.pid != self.pid and r.identity.netns == netns and r.alive()
        ]

    def release(self) -> None:
        """Remove the record once the runner has undone everything. A record that still holds
        steps (an undo cut short) stays for the next start or `dsvpn cleanup`."""
        with self.run_dir.lock():
            if not self.record.applied:
                self.run_dir.remove(self.pid)


# -- claim and cleanup -------------------------------------------------------------------------


def claim(
    identity: Identity,
    dialect: Dialect,
    log: LogFn,
    *,
    run_dir: str | os.PathLike[str] = RUN_DIR,
    run: RunFn = execute,
    keep: bool = False,
) -> Instance:
    """Start an instance: under one lock, undo what dead instances of this namespace left
    behind, refuse (ConflictError) if a live one owns what `identity` needs, and write this
    process's first record. Two instances started at the same instant cannot both pass.
    With `keep`, their kept steps (a kill switch) stay until `undo_kept`."""
    start = process_start(os.getpid())
    if start is None:
        raise DsvpnError("cannot read this process's start time (from /proc or ps)")
    directory = RunDir(run_dir)
    with directory.lock(create=True):
        _undo_dead(directory, dialect, log, run, keep)
        for other in directory.records(dialect):
            if other.identity.netns != identity.netns or not other.alive():
                continue
            if other.pid == os.getpid():
                raise ConflictError(f"this process (PID {other.pid}) already runs an instance")
            why = _collision(identity, other.identity)
            if why:
                raise ConflictError(
                    f"{why} already used by dsvpn PID {other.pid} ({other.identity.mode})"
                )
        record = Record(os.getpid(), start, identity, [])
        directory.write(record)
    return Instance(directory, record, dialect)


def _collision(me: Identity, them: Identity) -> str | None:
    if me.tun is not None and me.tun == them.tun:
        return f"tun device {me.tun} is"
    if me.mode == "server" and them.mode == "server" and me.port == them.port:
        return f"port {me.port} is"
    for mine in (me.local_tun_ip, me.remote_tun_ip):
        if mine in (them.local_tun_ip, them.remote_tun_ip):
            return f"tunnel address {mine} is"
    if me.table is not None and me.table == them.table:
        return f"routing table {me.table} (all traffic through the tunnel) is"
    return None


def cleanup(
    dialect: Dialect,
    log: LogFn,
    *,
    run_dir: str | os.PathLike[str] = RUN_DIR,
    run: RunFn = execute,
    keep: bool = False,
) -> int:
    """`dsvpn cleanup`: undo what dead instances of this namespace left behind and drop their
    records. Returns how many were cleaned; records it cannot trust are reported. With
    `keep` (a plain `dsvpn cleanup`, which a service may run after a crash), kept steps and
    their records stay: see kept_by_dead."""
    directory = RunDir(run_dir)
    if not directory.exists():
        return 0
    with directory.lock():
        cleaned = _undo_dead(directory, dialect, log, run, keep)
        netns = current_netns()
        elsewhere = [
            r for r in directory.records(dialect) if r.identity.netns != netns and not r.alive()
        ]
    if elsewhere:
        log(
            f"left {len(elsewhere)} record(s) of dead instances in other network namespaces "
            "alone: only a cleanup inside a namespace undoes what was done there"
        )
    return cleaned


def undo_kept(
    dialect: Dialect,
    log: LogFn,
    *,
    run_dir: str | os.PathLike[str] = RUN_DIR,
    run: RunFn = execute,
) -> int:
    """Undo the steps that dead instances of this namespace kept (see claim): a start calls it
    once its own routes are in place. Returns how many records went."""
    directory = RunDir(run_dir)
    if not directory.exists():
        return 0
    with directory.lock():
        return _undo_dead(directory, dialect, log, run, keep=False)


def kept_by_dead(dialect: Dialect, *, run_dir: str | os.PathLike[str] = RUN_DIR) -> list[int]:
    """PIDs of dead instances of this namespace whose kept steps (a kill switch) are still in
    place."""
    directory = RunDir(run_dir)
    if not directory.exists():
        return []
    netns = current_netns()
    with directory.lock():
        return [
            r.pid
            for r in directory.records(dialect)
            if r.identity.netns == netns and not r.alive() and any(a.step.keep for a in r.applied)
        ]


def _undo_dead(
    directory: RunDir, dialect: Dialect, log: LogFn, run: RunFn, keep: bool = False
) -> int:
    netns = current_netns()
    cleaned = 0
    for record in directory.records(dialect, report=log):
        if record.identity.netns != netns or record.alive():
            continue  # another namespace's rules can only be undone from inside it
        if any(not (keep and a.step.keep) for a in record.applied):
            log(f"undoing what dsvpn PID {record.pid} left behind")
        holder = Instance(directory, record, dialect)
        runner = Runner(dialect, log, run=run, record=holder, applied=record.applied)
        runner.undo(keep=keep)
        if runner.kept:
            continue  # the record now holds them alone (the runner saved it)
        directory.remove(record.pid)
        cleaned += 1
    return cleaned
