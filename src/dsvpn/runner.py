"""The one place where dsvpn runs a command: plans applied in order with the record kept one
step ahead of the host, undone in reverse; the tun's MTU and sysctl reads go through it too.

Each command is logged before it runs, the way wg-quick shows its work:
``[#] ip link set dev tun0 up``. The runner knows nothing of how records are stored: it is
handed a `RecordWriter` (instances.Instance) and calls it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from typing import Protocol

from dsvpn import files
from dsvpn.errors import CommandError, DsvpnError, PrerequisiteError
from dsvpn.plan import Dialect, Plan, Step, is_sysctl_value, show

__all__ = ["Applied", "RecordWriter", "RunFn", "Runner", "execute"]


class RunFn(Protocol):
    """How a command is run: execute, or a fake host in tests. `input` is its stdin."""

    def __call__(
        self, argv: Sequence[str], input: str | None = None, /
    ) -> subprocess.CompletedProcess[str]: ...


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


def execute(argv: Sequence[str], input: str | None = None, /) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell), feeding it `input`, capturing its output; the only subprocess call
    in dsvpn."""
    if input is None:
        # Never the terminal: a command that reads stdin gets an empty one.
        return subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT,
        )
    return subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        check=False,
        timeout=COMMAND_TIMEOUT,
    )


class Applied:
    """One applied step, with a sysctl's value from before this instance (or handed over to it
    by another). Compared by identity: a plan may hold two equal steps."""

    __slots__ = ("previous", "step")

    def __init__(self, step: Step, previous: str | None = None) -> None:
        self.step = step
        self.previous = previous

    def __repr__(self) -> str:
        return f"Applied({self.step!r}, previous={self.previous!r})"


class RecordWriter(Protocol):
    """Where the runner keeps what it applied (instances.Instance)."""

    def save(self, applied: list[Applied]) -> None:
        """Record `applied` (after adopting values handed over on disk, see adopt)."""

    def adopt(self, applied: list[Applied]) -> None:
        """Take the sysctl values other instances handed over to this record since it was
        last written."""

    def hand_over(
        self, key: str, wanted: str, previous: str | None, restore: Callable[[], None]
    ) -> int | None:
        """Under the run directory's lock: give `previous` (our saved value of sysctl `key`) to
        a live instance that still needs `key` and return its PID, or call `restore` and
        return None when no live instance needs it."""


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


class Runner:
    """Applies plans, keeping the record one step ahead of the host; undoes in reverse."""

    def __init__(
        self,
        dialect: Dialect,
        log: LogFn,
        *,
        run: RunFn = execute,
        record: RecordWriter | None = None,
        applied: Sequence[Applied] = (),
    ) -> None:
        self._dialect = dialect
        self._log = log
        self._run = run
        self._record = record
        # Applied steps in order; handed in from a record when undoing a dead instance.
        self._applied: list[Applied] = list(applied)

    @property
    def applied(self) -> list[Applied]:
        return list(self._applied)

    # -- running one command -------------------------------------------------------------

    def command(self, argv: Sequence[str], input: str | None = None) -> None:
        """Log and run argv (its stdin shown indented below it); CommandError
        (PrerequisiteError for a missing tool) on failure. Backends are handed this to set
        the tun's MTU."""
        self._log(f"[#] {show(argv)}")
        for line in (input or "").splitlines():
            self._log(f"    {line}")
        self._exec(argv, input)

    def _exec(
        self, argv: Sequence[str], input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            done = self._run(argv) if input is None else self._run(argv, input)
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
        return done

    def read_sysctl(self, key: str) -> str:
        argv = self._dialect.sysctl_read(key)
        self._log(f"[#] {show(argv)}")
        # Multi-valued keys come back tab-separated; we only compare and write them back.
        value = " ".join(self._exec(argv).stdout.split())
        if not is_sysctl_value(value):
            raise CommandError(f"`{show(argv)}` gave an unexpected value: {value!r}")
        return value

    def _save(self) -> None:
        if self._record is not None:
            self._record.save(list(self._applied))

    # -- apply -----------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """Apply every step in order. On a failure, undo this call's steps and raise."""
        self._apply_steps(plan.steps)

    def _apply_steps(self, steps: Sequence[Step]) -> None:
        done: list[Applied] = []
        for step in steps:
            try:
                applied = self._apply_one(step)
            except (CommandError, PrerequisiteError) as exc:
                if step.best_effort:
                    self._log(f"warning: {exc}; continuing without it")
                    continue
                for entry in reversed(done):
                    self._undo_one(entry)
                raise
            done.append(applied)

    def _apply_one(self, step: Step) -> Applied:
        applied = Applied(step)
        if step.sysctl:
            applied.previous = self.read_sysctl(step.sysctl[0])
        if step.file:
            applied.previous = _file_call(files.read, step.file[0])
        # Record first: if we die between recording and running, the next start merely
        # tries an undo that fails harmlessly; the other order could leak a rule.
        self._applied.append(applied)
        self._save()
        try:
            if step.file:
                self._log(f"[#] {show(step.apply)}")
                _file_call(files.write, *step.file)
            else:
                self.command(step.apply, step.input)
        except (CommandError, PrerequisiteError):
            _drop(self._applied, applied)
            self._save()
            raise
        # Anything else (a signal mid-command) leaves the step recorded: it may have taken
        # effect, and undoing a step that did not is harmless.
        return applied

    # -- undo ------------------------------------------------------------------------------

    def undo(self, keep: bool = False) -> None:
        """Undo everything applied, newest first. Failures (of a command or of the record)
        are logged and skipped: the host comes first. Calling it again does nothing.
        With `keep`, the steps marked keep stay applied (and recorded)."""
        if self._record is not None and self._applied:
            try:
                self._record.adopt(self._applied)  # values handed to us by instances that left
            except DsvpnError as exc:
                self._log(f"warning: {exc}")
        while todo := [a for a in self._applied if not (keep and a.step.keep)]:
            self._undo_one(todo[-1])

    @property
    def kept(self) -> list[Applied]:
        """What an undo with `keep` left in place."""
        return [a for a in self._applied if a.step.keep]

    def _undo_one(self, applied: Applied) -> None:
        if applied.step.sysctl:
            self._restore_sysctl(applied)
        elif applied.step.file:
            self._restore_file(applied)
        elif applied.step.undo:
            try:
                self.command(applied.step.undo, applied.step.undo_input)
            except (CommandError, PrerequisiteError) as exc:
                self._log(f"warning: {exc}")
        if _drop(self._applied, applied):
            try:
                self._save()
            except DsvpnError as exc:
                self._log(f"warning: {exc}")

    def _restore_file(self, applied: Applied) -> None:
        assert applied.step.file is not None
        path, written = applied.step.file
        self._log(f"[#] restore {path}")
        try:
            why = files.restore(path, applied.previous, written)
        except DsvpnError as exc:
            self._log(f"warning: {exc}")
            return
        if why:
            self._log(f"warning: {why}")

    def _restore_sysctl(self, applied: Applied) -> None:
        assert applied.step.sysctl is not None
        key, wanted = applied.step.sysctl
        previous = applied.previous

        def restore() -> None:
            if previous is None or previous == wanted:
                return  # we did not change it
            try:
                # Built from the key and the saved value, never from a recorded argv.
                self.command(self._dialect.sysctl_write(key, previous))
            except (CommandError, PrerequisiteError) as exc:
                self._log(f"warning: {exc}")

        if self._record is None:
            restore()
            return
        try:
            heir = self._record.hand_over(key, wanted, previous, restore)
        except DsvpnError as exc:
            # Another instance may still need the value: leave it as it is.
            self._log(f"warning: {exc}; {key} stays {wanted}")
            return
        if heir is not None:
            self._log(f"{key} stays {wanted}: dsvpn PID {heir} still needs it")

    # -- gateway changes (client) -------------------------------------------------------------

    def reapply_gateway(self, old: Plan, new: Plan) -> bool:
        """Swap the gateway-dependent steps of `old` for those of `new`. True when the new ones
        are in place. When one of them fails, the old ones are put back (as far as they go),
        a warning is logged and False returned: the caller keeps `old` and tries again later,
        so the tunnel survives a gateway that is not ready yet."""
        old_steps, new_steps = old.gateway_steps(), new.gateway_steps()
        if old_steps == new_steps:
            return True
        self._undo_steps(old_steps)
        try:
            self._apply_steps(new_steps)
        except (CommandError, PrerequisiteError) as exc:
            self._log(f"warning: {exc}; keeping the routes of the previous gateway for now")
            try:
                self._apply_steps(old_steps)
            except (CommandError, PrerequisiteError) as again:
                self._log(f"warning: {again}")
            return False
        return True

    # -- local subnet changes (client kill switch) ----------------------------------------------

    def reapply_local(self, old: Plan, new: Plan) -> bool:
        """Swap the local-subnet steps of `old` for those of `new` (the kill switch's holes for
        the LAN, when the host changed networks). A step that `replaces` one of the same undo
        is swapped in place (an nft table reloaded in one transaction); otherwise the holes
        that went are closed before the new ones open, so nothing passes that should not even
        for a moment. The record follows each step. True when the new steps are in place;
        when one fails, the old ones are put back (as far as they go), a warning is logged and
        False returned: the caller keeps `old` and tries again later."""
        old_steps, new_steps = old.local_steps(), new.local_steps()
        gone = [s for s in old_steps if s not in new_steps]
        added = [s for s in new_steps if s not in old_steps]
        swaps: list[tuple[Step, Step]] = []
        for step in list(added):
            previous = next((s for s in gone if step.replaces and s.undo == step.undo), None)
            if previous is not None:
                swaps.append((previous, step))
                gone.remove(previous)
                added.remove(step)
        if not (gone or added or swaps):
            return True
        swapped: list[tuple[Step, Step]] = []
        try:
            for previous, step in swaps:
                self._replace(previous, step)
                swapped.append((previous, step))
            self._undo_steps(gone)
            self._apply_steps(added)
        except (CommandError, PrerequisiteError) as exc:
            self._log(f"warning: {exc}; keeping the previous local subnets for now")
            try:
                self._apply_steps(gone)
                for previous, step in reversed(swapped):
                    self._replace(step, previous)
            except (CommandError, PrerequisiteError) as again:
                self._log(f"warning: {again}")
            return False
        return True

    def _replace(self, previous: Step, step: Step) -> None:
        """Apply `step` in place of the applied `previous` (same undo, see Step.replaces): the
        record names the new one first, as ever; on a failure it names the old one again (the
        transaction failed, so the old one is still what the host has)."""
        index = next(
            (i for i in reversed(range(len(self._applied))) if self._applied[i].step == previous),
            None,
        )
        if index is None:
            self._apply_steps([step])
            return
        entry = self._applied[index]
        self._applied[index] = Applied(step)
        self._save()
        try:
            self.command(step.apply, step.input)
        except (CommandError, PrerequisiteError):
            self._applied[index] = entry
            self._save()
            raise

    def _undo_steps(self, steps: Sequence[Step]) -> None:
        for step in reversed(steps):
            for applied in reversed(self._applied):
                if applied.step.apply == step.apply:
                    self._undo_one(applied)
                    break


def _file_call(fn: Callable[..., str | None], *args: str) -> str | None:
    """A files function, its failure a CommandError like a failed command's."""
    try:
        return fn(*args)
    except DsvpnError as exc:
        raise CommandError(str(exc)) from exc


def _drop(applied: list[Applied], entry: Applied) -> bool:
    """Remove this very entry (not an equal one) from the list; False if absent."""
    for i, a in enumerate(applied):
        if a is entry:
            del applied[i]
            return True
    return False
