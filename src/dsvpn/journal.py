"""The on-disk record of what each running dsvpn instance changed on the host.

One JSON file per instance, ``<run dir>/<pid>.json``, rewritten atomically (tmp + rename)
before every change, so that a crashed instance can be undone by the next start or by
``dsvpn cleanup``. It also lets live instances see each other: conflicts (same tun, port,
address or routing table) and sysctls that several instances need at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsvpn.config import ROUTING_TABLE, Config
from dsvpn.errors import DsvpnError, PermissionDenied

DEFAULT_RUN_DIR = "/run/dsvpn"
RUN_DIR_ENV = "DSVPN_RUN_DIR"
FORMAT_VERSION = 1


def run_dir_path(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the journals: argument, then $DSVPN_RUN_DIR, then /run/dsvpn."""
    if run_dir is not None:
        return Path(run_dir)
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def current_netns() -> str | None:
    """Linux network namespace of this process ("net:[4026531840]"), None elsewhere.

    /run is shared between namespaces, but rules and sysctls are per namespace: instances
    in different namespaces must neither conflict nor undo or inherit each other's changes.
    """
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """An opaque start stamp of a process, to tell a live instance from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if sys.platform.startswith("linux"):
            return None
    except OSError:
        return None
    else:
        # Field 22 (starttime); the command name in field 2 may contain spaces and ")".
        return stat.rsplit(")", 1)[1].split()[19]
    try:
        out = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def is_alive(pid: int, start: str | None) -> bool:
    """True if `pid` runs and, when a start stamp was recorded, is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OverflowError:
        return False
    if start is None:
        return True
    now = process_start(pid)
    return now is None or now == start


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
    # Filled in for the caller: instances in other namespaces neither conflict nor share.
    netns: str | None = field(default_factory=current_netns)
    pid: int | None = None  # the instance's own PID: it never conflicts with itself

    @classmethod
    def of(cls, cfg: Config, tun: str | None) -> Identity:
        return cls(
            mode=cfg.mode,
            tun=tun,
            port=cfg.port,
            local_tun_ip=cfg.local_tun_ip,
            remote_tun_ip=cfg.remote_tun_ip,
            table=None if cfg.is_server else ROUTING_TABLE,
            pid=os.getpid(),
        )


@dataclass
class Entry:
    """One applied step as recorded: its argv, how to undo it, and a sysctl's saved value."""

    apply: tuple[str, ...]
    undo: tuple[str, ...] | None = None
    sysctl: tuple[str, str] | None = None
    gateway: bool = False
    previous: str | None = None  # the sysctl's value before this instance (or a handed-over one)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        sysctl = data.get("sysctl")
        undo = data.get("undo")
        return cls(
            apply=tuple(data["apply"]),
            undo=tuple(undo) if undo is not None else None,
            sysctl=(str(sysctl[0]), str(sysctl[1])) if sysctl else None,
            gateway=bool(data.get("gateway", False)),
            previous=data.get("previous"),
        )


# flock() locks belong to an open file, so a second open in the same process would block
# on itself: count nesting per directory and lock the file only at the outermost level.
_lock_guard = threading.RLock()
_held: dict[Path, tuple[int, int]] = {}


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of journals between processes (and nested calls)."""
    with _lock_guard:
        key = run_dir.resolve()
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            ensure_dir(run_dir)
            try:
                fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except PermissionError as exc:
                raise PermissionDenied(
                    f"cannot use {run_dir}: permission denied (run as root)"
                ) from exc
            except OSError as exc:
                raise DsvpnError(f"cannot use {run_dir}: {exc.strerror}") from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
            _held[key] = (fd, 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            if depth == 1:
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            else:
                _held[key] = (fd, depth - 1)


def ensure_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except PermissionError as exc:
        raise PermissionDenied(f"cannot create {run_dir}: permission denied (run as root)") from exc
    except OSError as exc:
        raise DsvpnError(f"cannot create the state directory {run_dir}: {exc.strerror}") from exc


@dataclass
class Journal:
    """The record of one instance. `entries` is replaced wholesale by save()."""

    identity: Identity
    run_dir: Path = field(default_factory=run_dir_path)
    pid: int = field(default_factory=os.getpid)
    start: str | None = None
    entries: list[Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.start is None and self.pid == os.getpid():
            self.start = process_start(self.pid)

    @property
    def path(self) -> Path:
        return self.run_dir / f"{self.pid}.json"

    def alive(self) -> bool:
        return is_alive(self.pid, self.start)

    # -- reading and writing -------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "pid": self.pid,
            "start": self.start,
            "identity": asdict(self.identity),
            "entries": [e.to_json() for e in self.entries],
        }

    @classmethod
    def load(cls, path: Path) -> Journal:
        data = json.loads(path.read_text())
        return cls(
            identity=Identity(**data["identity"]),
            run_dir=path.parent,
            pid=int(data["pid"]),
            start=data.get("start"),
            entries=[Entry.from_json(e) for e in data.get("entries", [])],
        )

    def save(self, entries: list[Entry]) -> None:
        """Record `entries` atomically. A sysctl's saved value already in the file wins:
        another instance may have handed its original value over to us (see handover)."""
        with run_dir_lock(self.run_dir):
            self._adopt_previous(entries)
            self.entries = entries
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self.to_json(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def refresh(self) -> None:
        """Pick up sysctl values handed over by other instances since the last save."""
        with run_dir_lock(self.run_dir):
            self._adopt_previous(self.entries)

    def _adopt_previous(self, entries: list[Entry]) -> None:
        try:
            on_disk = Journal.load(self.path).entries
        except (OSError, ValueError, KeyError, TypeError):
            return
        saved = {e.sysctl[0]: e.previous for e in on_disk if e.sysctl}
        for e in entries:
            if e.sysctl and e.sysctl[0] in saved:
                e.previous = saved[e.sysctl[0]]

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- other instances -----------------------------------------------------------------

    def live_peers(self) -> list[Journal]:
        """Other live instances in the same network namespace, by PID."""
        return [
            j
            for j in all_journals(self.run_dir)
            if j.pid != self.pid and j.identity.netns == self.identity.netns and j.alive()
        ]

    def handover(self, key: str, wanted: str, previous: str | None) -> int | None:
        """Give our saved original value of sysctl `key` to a live instance that still needs
        it; return that instance's PID, or None if no live instance records `key`.

        The caller must hold run_dir_lock. Only an instance that saw the value already
        changed (its saved value == wanted) takes the original: one that saved another value
        itself holds an original already.
        """
        holders = [
            (j, e) for j in self.live_peers() for e in j.entries if e.sysctl and e.sysctl[0] == key
        ]
        if not holders:
            return None
        if previous is not None and previous != wanted:
            for j, e in holders:
                if e.previous == wanted:
                    e.previous = previous
                    j._write_raw()
                    return j.pid
        return holders[0][0].pid

    def _write_raw(self) -> None:
        # Rewrites another instance's record as loaded (no adopt: we hold the newer value).
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, self.path)


def all_journals(run_dir: Path, log: Any = None) -> list[Journal]:
    """Every readable record in `run_dir`, sorted by PID. Unreadable ones are skipped
    (and reported through `log` if given): they hold nothing we could undo safely."""
    found = []
    try:
        paths = sorted(run_dir.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            found.append(Journal.load(path))
        except FileNotFoundError:
            continue  # removed by its owner meanwhile
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if log is not None:
                log(f"ignoring unreadable state file {path}: {exc}")
    return sorted(found, key=lambda j: j.pid)
