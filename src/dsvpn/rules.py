"""Plans of host changes (firewall, addresses, routes, sysctls) and the runner that applies
them, records them in the journal first, and undoes them in reverse.

Commands run as argv lists, never through a shell. Each is logged before it runs, the way
wg-quick shows its work: ``[#] ip link set dev tun0 up``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dsvpn.errors import CommandError, ConflictError, PrerequisiteError
from dsvpn.journal import (
    Entry,
    Identity,
    Journal,
    all_journals,
    current_netns,
    run_dir_lock,
    run_dir_path,
)

__all__ = [
    "Identity",
    "Journal",
    "Plan",
    "Runner",
    "Step",
    "check_conflicts",
    "cleanup_stale",
]

RunFn = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]
LogFn = Callable[[str], None]

COMMAND_TIMEOUT = 30  # seconds; none of these tools should ever take this long

# Which package provides a tool, for the "not found" message. The BSDs and macOS ship
# ifconfig, route and sysctl in the base system.
PACKAGES = {
    "ip": "iproute2",
    "iptables": "iptables",
    "ip6tables": "iptables",
    "nft": "nftables",
    "sysctl": "procps",
    "ifconfig": "the base system's ifconfig",
    "route": "the base system's route",
}


@dataclass(frozen=True)
class Step:
    apply: tuple[str, ...]
    undo: tuple[str, ...] | None
    # (key, wanted value): the runner saves the current value first and restores it on undo.
    sysctl: tuple[str, str] | None = None
    # Depends on the gateway (client host route to the server): redone when it changes.
    gateway: bool = False
    # A failure is reported and skipped (client bbr: the tunnel works without it).
    best_effort: bool = False


def show(argv: Sequence[str]) -> str:
    """An argv as the user would type it (these arguments never need shell quoting,
    except empty or spaced ones; "!" stays bare so the line reads like the reference's).
    A multi-line argument (an nft ruleset) is shown as it is, in single quotes."""
    return " ".join(_shown(a) for a in argv)


def _shown(arg: str) -> str:
    if arg and not any(c.isspace() for c in arg):
        return arg
    if "\n" in arg and "'" not in arg:
        return f"'{arg}'"
    return repr(arg)


def restore_argv(apply: Sequence[str], key: str, value: str) -> tuple[str, ...]:
    """The step's own syntax with the old value: `sysctl k=v` on Linux, `sysctl -w k=v` on BSD."""
    return (*apply[:-1], f"{key}={value}")


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)

    def gateway_steps(self) -> list[Step]:
        return [s for s in self.steps if s.gateway]

    def render(self) -> list[str]:
        """--dry-run text: the set-up commands in order, then the undo in the order it runs."""
        lines = ["# set up"]
        lines += [show(s.apply) for s in self.steps]
        lines.append("# on exit")
        for s in reversed(self.steps):
            if s.sysctl:
                key, _ = s.sysctl
                lines.append(show(restore_argv(s.apply, key, "<saved>")))
            elif s.undo:
                lines.append(show(s.undo))
        return lines


def _default_run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT
    )


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


class Runner:
    """Applies plans, keeping the journal one step ahead of the host; undoes in reverse."""

    def __init__(self, journal: Journal | None, log: LogFn, run: RunFn | None = None) -> None:
        self._journal = journal
        self._log = log
        self._run = run or _default_run
        # Applied steps in order; resumed from the journal when undoing a dead instance.
        self._entries: list[Entry] = list(journal.entries) if journal else []

    @property
    def applied(self) -> list[Entry]:
        return list(self._entries)

    # -- running one command -------------------------------------------------------------

    def _exec(self, argv: Sequence[str]) -> None:
        """Run argv; CommandError naming the command and the tool's error on failure."""
        try:
            done = self._run(argv)
        except FileNotFoundError as exc:
            tool = argv[0]
            where = PACKAGES.get(tool)
            hint = f" (install {where})" if where else ""
            raise PrerequisiteError(f"`{tool}` not found{hint}") from exc
        except subprocess.TimeoutExpired as exc:
            raise CommandError(f"`{show(argv)}` failed: timed out") from exc
        except OSError as exc:
            raise CommandError(f"`{show(argv)}` failed: {exc.strerror or exc}") from exc
        if done.returncode != 0:
            why = (
                _first_line(done.stderr)
                or _first_line(done.stdout)
                or f"exit status {done.returncode}"
            )
            raise CommandError(f"`{show(argv)}` failed: {why}")

    def _read_sysctl(self, key: str) -> str:
        argv = ("sysctl", "-n", key)
        try:
            done = self._run(argv)
        except FileNotFoundError as exc:
            raise PrerequisiteError(f"`sysctl` not found (install {PACKAGES['sysctl']})") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise CommandError(f"`{show(argv)}` failed: {exc}") from exc
        if done.returncode != 0:
            why = _first_line(done.stderr) or f"exit status {done.returncode}"
            raise CommandError(f"`{show(argv)}` failed: {why}")
        # Multi-valued keys come back tab-separated; we only compare and write them back.
        return " ".join(done.stdout.split())

    def _save(self) -> None:
        if self._journal is not None:
            self._journal.save(list(self._entries))

    # -- apply -----------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """Apply every step in order. On a failure, undo this call's steps and raise."""
        self._apply_steps(plan.steps)

    def _apply_steps(self, steps: Sequence[Step]) -> None:
        done: list[Entry] = []
        for step in steps:
            try:
                entry = self._apply_one(step)
            except (CommandError, PrerequisiteError) as exc:
                if step.best_effort:
                    self._log(f"warning: {exc}; continuing without it")
                    continue
                self._rollback(done)
                raise
            done.append(entry)

    def _apply_one(self, step: Step) -> Entry:
        entry = Entry(apply=step.apply, undo=step.undo, sysctl=step.sysctl, gateway=step.gateway)
        if step.sysctl:
            entry.previous = self._read_sysctl(step.sysctl[0])
        # Journal first: if we die between recording and running, the next start merely
        # tries an undo that fails harmlessly; the other order could leak a rule.
        self._entries.append(entry)
        self._save()
        self._log(f"[#] {show(step.apply)}")
        try:
            self._exec(step.apply)
        except (CommandError, PrerequisiteError):
            _drop(self._entries, entry)
            self._save_or_remove()
            raise
        # Anything else (a signal mid-command) leaves the entry recorded: it may have taken
        # effect, and undoing a step that did not is harmless.
        return entry

    def _rollback(self, done: list[Entry]) -> None:
        for entry in reversed(done):
            self._undo_one(entry)
        self._save_or_remove()

    # -- undo ------------------------------------------------------------------------------

    def undo(self) -> None:
        """Undo everything applied, newest first. Failures are logged and skipped.
        Calling it again does nothing."""
        if self._journal is not None and self._entries:
            self._journal.refresh()  # sysctl values handed to us by instances that left
        while self._entries:
            self._undo_one(self._entries[-1])
        if self._journal is not None:
            self._journal.remove()

    def _undo_one(self, entry: Entry) -> None:
        if entry.sysctl:
            self._restore_sysctl(entry)
        elif entry.undo:
            self._log(f"[#] {show(entry.undo)}")
            try:
                self._exec(entry.undo)
            except (CommandError, PrerequisiteError) as exc:
                self._log(f"warning: {exc}")
        if _drop(self._entries, entry) and self._entries:
            self._save()

    def _restore_sysctl(self, entry: Entry) -> None:
        assert entry.sysctl is not None
        key, wanted = entry.sysctl
        previous = entry.previous
        if self._journal is None:
            self._write_back(entry, key, previous, wanted)
            return
        # Under the lock, so that two instances leaving together cannot both decide that
        # the other one still needs the value.
        with run_dir_lock(self._journal.run_dir):
            heir = self._journal.handover(key, wanted, previous)
            if heir is not None:
                self._log(f"{key} stays {wanted}: dsvpn PID {heir} still needs it")
                return
            self._write_back(entry, key, previous, wanted)

    def _write_back(self, entry: Entry, key: str, previous: str | None, wanted: str) -> None:
        if previous is None or previous == wanted:
            return  # we did not change it
        argv = restore_argv(entry.apply, key, previous)
        self._log(f"[#] {show(argv)}")
        try:
            self._exec(argv)
        except (CommandError, PrerequisiteError) as exc:
            self._log(f"warning: {exc}")

    def _save_or_remove(self) -> None:
        if self._journal is None:
            return
        if self._entries:
            self._save()
        else:
            self._journal.remove()

    # -- gateway changes (client) -------------------------------------------------------------

    def reapply_gateway(self, old: Plan, new: Plan) -> None:
        """Swap the gateway-dependent steps of `old` for those of `new`."""
        old_steps, new_steps = old.gateway_steps(), new.gateway_steps()
        if old_steps == new_steps:
            return
        for step in reversed(old_steps):
            for entry in reversed(self._entries):
                if entry.apply == step.apply:
                    self._undo_one(entry)
                    break
        self._apply_steps(new_steps)


def _drop(entries: list[Entry], entry: Entry) -> bool:
    """Remove this very entry (not an equal one) from the list; False if absent."""
    for i, e in enumerate(entries):
        if e is entry:
            del entries[i]
            return True
    return False


# -- other instances ------------------------------------------------------------------------


def cleanup_stale(
    log: LogFn,
    run_dir: str | Path | None = None,
    run: RunFn | None = None,
) -> int:
    """Undo what dead instances left behind (in this network namespace) and drop their
    records. Returns how many were cleaned. Runs at every start, before anything is added,
    so that a restart after a crash never adds a rule twice."""
    directory = run_dir_path(run_dir)
    if not directory.is_dir():
        return 0
    netns = current_netns()
    cleaned = 0
    with run_dir_lock(directory):
        for journal in all_journals(directory, log):
            if journal.identity.netns != netns or journal.alive():
                continue  # another namespace's rules can only be undone from inside it
            log(f"undoing what dsvpn PID {journal.pid} left behind")
            Runner(journal, log, run).undo()
            journal.remove()
            cleaned += 1
    return cleaned


def check_conflicts(identity: Identity, run_dir: str | Path | None = None) -> None:
    """ConflictError if a live instance in this namespace owns what `identity` needs."""
    directory = run_dir_path(run_dir)
    if not directory.is_dir():
        return
    me = identity
    for other in all_journals(directory):
        them = other.identity
        if other.pid in (os.getpid(), me.pid) or them.netns != me.netns or not other.alive():
            continue
        why = _collision(me, them)
        if why:
            raise ConflictError(f"{why} already used by dsvpn PID {other.pid} ({them.mode})")


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
