"""A fake host for the runner and the instance records: records each command, keeps sysctl
values, fails on request; plus a small dialect for plans made of `cmd x` / `uncmd x` steps."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence

from dsvpn.plan import Argv, Step


class FakeHost:
    """Stands in for runner.execute: records argv, keeps sysctl values, fails on request."""

    def __init__(self, sysctls: dict[str, str] | None = None) -> None:
        self.calls: list[str] = []
        self.reads: list[str] = []
        self.sysctls = dict(sysctls or {"net.ipv4.ip_forward": "0"})
        self.fail: dict[str, str] = {}  # command line -> stderr
        self.missing: set[str] = set()  # tools that are not installed
        self.on_call: Callable[[list[str]], None] | None = None  # runs before each command

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        line = " ".join(argv)
        if argv[0] in self.missing:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        if self.on_call:
            self.on_call(list(argv))
        if list(argv[:2]) == ["sysctl", "-n"]:
            self.reads.append(argv[2])
            value = self.sysctls.get(argv[2])
            if value is None:
                return subprocess.CompletedProcess(argv, 255, "", f"unknown key {argv[2]}\n")
            return subprocess.CompletedProcess(argv, 0, value + "\n", "")
        self.calls.append(line)
        if line in self.fail:
            return subprocess.CompletedProcess(argv, 1, "", self.fail[line] + "\nmore\n")
        if argv[0] == "sysctl":
            key, value = argv[-1].split("=", 1)
            self.sysctls[key] = value
        return subprocess.CompletedProcess(argv, 0, "", "")


class CmdDialect:
    """`cmd x` is undone by `uncmd x`, `route add s g` by `route delete s`; Linux sysctls."""

    sysctl_keys = frozenset({"net.ipv4.ip_forward", "k"})

    def is_sysctl_key(self, key: str) -> bool:
        return key in self.sysctl_keys

    def sysctl_read(self, key: str) -> Argv:
        return ("sysctl", "-n", key)

    def sysctl_write(self, key: str, value: str) -> Argv:
        return ("sysctl", f"{key}={value}")

    def undo_of(self, apply: Sequence[str]) -> Argv | None:
        if len(apply) == 2 and apply[0] == "cmd":
            return ("uncmd", apply[1])
        if len(apply) == 4 and tuple(apply[:2]) == ("route", "add"):
            return ("route", "delete", apply[2])
        return None


DIALECT = CmdDialect()

FWD = Step(("sysctl", "net.ipv4.ip_forward=1"), None, sysctl=("net.ipv4.ip_forward", "1"))
A = Step(("cmd", "a"), ("uncmd", "a"))
B = Step(("cmd", "b"), None)
C = Step(("cmd", "c"), ("uncmd", "c"))
D = Step(("cmd", "d"), ("uncmd", "d"))


def route(gateway: str) -> Step:
    return Step(("route", "add", "s", gateway), ("route", "delete", "s"), gateway=True)


def dead_pid() -> int:
    """The PID of a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
