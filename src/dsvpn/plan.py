"""The plan as data: the ordered (apply, undo) steps of a start, how they are shown, and what
a backend says about its own commands. Standard library only: platform/ builds plans with it.

Commands are argv tuples, never shell lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Argv = tuple[str, ...]

# Runs one command for a backend (the runner's `command`): logs it, raises CommandError.
Run = Callable[[Sequence[str]], None]

# The only files a plan may replace (Step.file): a record, read back as root, can name no other.
RESOLV_CONF = "/etc/resolv.conf"
WRITABLE_FILES = frozenset({RESOLV_CONF})

# A sysctl value as dsvpn saves and writes back: words of letters, digits, ".", "_", ":", "-"
# (multi-valued keys are read back space-separated).
_SYSCTL_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,64}( [A-Za-z0-9_.:-]{1,64}){0,15}")


def is_sysctl_value(value: str) -> bool:
    return _SYSCTL_VALUE.fullmatch(value) is not None


@dataclass(frozen=True)
class Step:
    apply: Argv
    undo: Argv | None
    # (key, wanted value): the runner saves the current value first and restores it on undo.
    sysctl: tuple[str, str] | None = None
    # Depends on the gateway (client host route to the server): redone when it changes.
    gateway: bool = False
    # Depends on the local subnets (the kill switch's holes for the LAN): redone when the host
    # changes networks (Runner.reapply_local).
    local: bool = False
    # Its apply replaces, in one transaction, whatever a step of the same undo put in place (an
    # nft table, a pf anchor): a new version is swapped in without undoing the old one first.
    replaces: bool = False
    # A failure is reported and skipped (client bbr: the tunnel works without it).
    best_effort: bool = False
    # Outlives a crash and a plain `dsvpn cleanup` (the kill switch): only a deliberate stop,
    # `dsvpn cleanup --all` or the next start undoes it.
    keep: bool = False
    # (path in WRITABLE_FILES, content): the runner records the file's content, then replaces
    # it; the undo puts the recorded content back (dsvpn.files). `apply` is only shown.
    file: tuple[str, str] | None = None
    # Text fed to the command's stdin (resolvconf -a, pfctl -f -, scutil).
    input: str | None = None
    undo_input: str | None = None


class Dialect(Protocol):
    """What a backend says about its own commands: how it reads and writes a sysctl, which keys
    it sets, and the undo of each apply argv it produces. An undo found in a record runs only
    if it is `undo_of` its own apply, so a record can never make dsvpn run anything else."""

    def is_sysctl_key(self, key: str) -> bool:
        """Whether a plan of this backend may set sysctl `key` (some keys name an interface)."""

    def sysctl_read(self, key: str) -> Argv: ...

    def sysctl_write(self, key: str, value: str) -> Argv: ...

    def undo_of(self, apply: Sequence[str]) -> Argv | None:
        """The undo dsvpn plans for `apply`, or None if `apply` is not a command it plans with
        an undo (in the exact shape it produces)."""

    def undo_input_fits(self, undo: Sequence[str], text: str) -> bool:
        """Whether `text` is stdin dsvpn feeds to `undo` (in the exact shape it produces)."""


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


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)

    def gateway_steps(self) -> list[Step]:
        return [s for s in self.steps if s.gateway]

    def local_steps(self) -> list[Step]:
        return [s for s in self.steps if s.local]

    def render(self, dialect: Dialect) -> list[str]:
        """--dry-run text: the set-up commands in order, then the undo in the order it runs.
        A command's stdin is shown as a here-document; a file step with the content written."""
        lines = ["# set up"]
        for s in self.steps:
            if s.file:
                lines += _heredoc(f"{show(s.apply)} (saved first)", s.file[1])
            else:
                lines += _heredoc(show(s.apply), s.input)
        lines.append("# on exit")
        for s in reversed(self.steps):
            if s.sysctl:
                lines.append(show(dialect.sysctl_write(s.sysctl[0], "<saved>")))
            elif s.file:
                lines.append(f"restore {s.file[0]}")
            elif s.undo:
                lines += _heredoc(show(s.undo), s.undo_input)
        return lines


def _heredoc(command: str, text: str | None) -> list[str]:
    if text is None:
        return [command]
    return [f"{command} <<'EOF'", *text.splitlines(), "EOF"]
