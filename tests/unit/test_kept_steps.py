"""The runner's and the records' new step kinds: steps kept after a crash (the kill switch),
file steps (resolv.conf, recorded and put back even after a crash), commands fed on stdin;
and what a record may hold of them."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from host_rig import dead_pid

from dsvpn import files, instances, tunnel
from dsvpn.config import ClientConfig, ClientNetwork
from dsvpn.errors import CommandError
from dsvpn.instances import Identity, Record, RunDir
from dsvpn.plan import Plan, Step
from dsvpn.platform import _dns, _killswitch, by_name
from dsvpn.runner import Applied, Runner

LINUX = by_name("linux")
MACOS = by_name("macos")


class Host:
    """Stands in for runner.execute: records every command with its stdin."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(
        self, argv: Sequence[str], input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.calls.append((" ".join(argv), input))
        return subprocess.CompletedProcess(argv, 0, "", "")

    @property
    def lines(self) -> list[str]:
        return [c for c, _ in self.calls]


def client(**network: Any) -> ClientConfig:
    return ClientConfig(
        key_file="k", server="s", server_ip="203.0.113.5", network=ClientNetwork(**network)
    )


UNREACHABLE = Step(
    ("ip", "route", "add", "unreachable", "default", "metric", "4294967295", "table", "42069"),
    ("ip", "route", "delete", "unreachable", "default", "metric", "4294967295", "table", "42069"),
)
KILL = _killswitch.linux_steps(client(kill_switch=True, local_nets=("192.0.2.0/24",)), "tun0")
IDENT = Identity("client", "tun0", 443, "192.168.192.1", "192.168.192.254", 42069)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def crashed(run_dir: Path, applied: list[Applied]) -> int:
    """A record as dsvpn writes it, of a process that has died since."""
    pid = dead_pid()
    directory = RunDir(run_dir)
    with directory.lock(create=True):
        directory.write(Record(pid, "1", IDENT, applied))
    return pid


def on_disk(run_dir: Path, pid: int) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = json.loads((run_dir / f"{pid}.json").read_text())["steps"]
    return steps


def test_undo_with_keep_leaves_the_kill_switch() -> None:
    host = Host()
    runner = Runner(LINUX, lambda _: None, run=host)
    runner.apply(Plan([UNREACHABLE, *KILL]))
    host.calls.clear()
    runner.undo(keep=True)
    assert host.lines == [" ".join(UNREACHABLE.undo or ())]
    assert [a.step for a in runner.kept] == KILL
    runner.undo()  # a deliberate stop: the rest goes too, in reverse
    assert host.lines[1:] == [" ".join(s.undo or ()) for s in reversed(KILL)]
    assert runner.kept == []


def test_plain_cleanup_keeps_the_kill_switch_cleanup_all_removes_it(run_dir: Path) -> None:
    pid = crashed(run_dir, [Applied(UNREACHABLE), *(Applied(s) for s in KILL)])
    host, log = Host(), []
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=host, keep=True) == 0
    assert host.lines == [" ".join(UNREACHABLE.undo or ())]
    assert log[0] == f"undoing what dsvpn PID {pid} left behind"
    assert [s["apply"] for s in on_disk(run_dir, pid)] == [list(s.apply) for s in KILL]
    assert all(s["keep"] for s in on_disk(run_dir, pid))
    assert instances.kept_by_dead(LINUX, run_dir=run_dir) == [pid]
    # Again: nothing more runs, and nothing is said about undoing.
    log.clear()
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=host, keep=True) == 0
    assert len(host.calls) == 1 and log == []
    # --all
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=host) == 1
    assert host.lines[1:] == [" ".join(s.undo or ()) for s in reversed(KILL)]
    assert instances.kept_by_dead(LINUX, run_dir=run_dir) == []
    assert sorted(os.listdir(run_dir)) == [".lock"]


def test_a_start_keeps_it_until_undo_kept(run_dir: Path) -> None:
    pid = crashed(run_dir, [Applied(UNREACHABLE), *(Applied(s) for s in KILL)])
    host, log = Host(), []
    mine = instances.claim(IDENT, LINUX, log.append, run_dir=run_dir, run=host, keep=True)
    assert host.lines == [" ".join(UNREACHABLE.undo or ())]
    assert instances.kept_by_dead(LINUX, run_dir=run_dir) == [pid]
    assert instances.undo_kept(LINUX, log.append, run_dir=run_dir, run=host) == 1
    assert len(host.calls) == 1 + len(KILL)
    mine.release()
    assert sorted(os.listdir(run_dir)) == [".lock"]


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A resolv.conf of the test's own, the only file dsvpn may write meanwhile."""
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.1\n")
    allowed = frozenset({str(path)})
    monkeypatch.setattr(files, "WRITABLE", allowed)
    monkeypatch.setattr(instances, "WRITABLE_FILES", allowed)
    monkeypatch.setattr(files, "MOUNTINFO", str(tmp_path / "no-mountinfo"))
    return path


def test_file_step_is_recorded_and_restored_after_a_crash(run_dir: Path, conf: Path) -> None:
    step = Step(("write", str(conf)), None, file=(str(conf), "nameserver 10.8.0.1\n"))
    host, log = Host(), []
    runner = Runner(LINUX, log.append, run=host)
    runner.apply(Plan([step]))
    assert conf.read_text() == "nameserver 10.8.0.1\n"
    assert host.calls == []  # no command: the runner writes the file itself
    assert log == [f"[#] write {conf}"]
    (applied,) = runner.applied
    assert applied.previous == "nameserver 192.0.2.1\n"  # the saved copy, for the record
    pid = crashed(run_dir, [applied])
    assert on_disk(run_dir, pid)[0]["file"] == [str(conf), "nameserver 10.8.0.1\n"]
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=host) == 1
    assert conf.read_text() == "nameserver 192.0.2.1\n"
    assert f"[#] restore {conf}" in log


def test_a_record_cannot_name_another_file(run_dir: Path, conf: Path, tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("precious\n")
    step = Step(("write", str(conf)), None, file=(str(conf), "x"))
    pid = crashed(run_dir, [Applied(step, "owned\n")])
    path = run_dir / f"{pid}.json"
    path.write_text(path.read_text().replace(json.dumps(str(conf)), json.dumps(str(victim))))
    log: list[str] = []
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=Host()) == 0
    assert victim.read_text() == "precious\n"
    assert "is not a file dsvpn writes" in log[0]


def test_a_failed_file_write_rolls_back(conf: Path, tmp_path: Path) -> None:
    conf.unlink()
    conf.symlink_to(tmp_path / "managed-elsewhere")
    host = Host()
    runner = Runner(LINUX, lambda _: None, run=host)
    step = Step(("write", str(conf)), None, file=(str(conf), "x"))
    with pytest.raises(CommandError, match="symbolic link"):
        runner.apply(Plan([UNREACHABLE, step]))
    assert host.lines == [" ".join(UNREACHABLE.apply), " ".join(UNREACHABLE.undo or ())]
    assert conf.is_symlink()


def test_stdin_of_apply_and_undo() -> None:
    cfg = client(kill_switch=True, dns=("10.8.0.1",), dns_via="scutil", dns_service="A1-B2")
    plan = MACOS.plan(cfg, "utun3", MACOS.placeholder_net())
    scutil, _, anchor = plan.steps[-3:]
    host, log = Host(), []
    runner = Runner(MACOS, log.append, run=host)
    runner.apply(Plan([scutil, anchor]))
    runner.undo()
    assert host.calls == [
        ("scutil", scutil.input),
        ("pfctl -a com.apple/dsvpn -f -", anchor.input),
        ("pfctl -a com.apple/dsvpn -F rules", None),
        ("scutil", scutil.undo_input),
    ]
    assert log[:2] == ["[#] scutil", "    open"]


def test_scutil_restore_comes_from_the_record_only_as_dsvpn_writes_it(run_dir: Path) -> None:
    cfg = client(dns=("10.8.0.1",), dns_via="scutil", dns_service="A1-B2")
    scutil = _dns.steps("scutil", "utun3", cfg.network.dns, "A1-B2")[0]
    pid = crashed(run_dir, [Applied(scutil)])
    host = Host()
    assert instances.cleanup(MACOS, lambda _: None, run_dir=run_dir, run=host) == 1
    assert host.calls == [("scutil", scutil.undo_input)]
    # The same record with other commands for scutil: refused, nothing runs.
    pid = crashed(run_dir, [Applied(scutil)])
    path = run_dir / f"{pid}.json"
    path.write_text(path.read_text().replace("remove State:", "remove Setup:"))
    log: list[str] = []
    assert instances.cleanup(MACOS, log.append, run_dir=run_dir, run=host) == 0
    assert len(host.calls) == 1 and "not what dsvpn feeds it" in log[0]
    # Nor may a command dsvpn feeds nothing be given stdin.
    raw = json.loads(path.read_text())
    raw["steps"] = [
        {**raw["steps"][0], "apply": list(UNREACHABLE.apply), "undo": list(UNREACHABLE.undo or ())}
    ]
    path.write_text(json.dumps(raw))
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=host) == 0
    assert len(host.calls) == 1


@pytest.mark.parametrize(
    "apply",
    [
        ("ip", "route", "add", "unreachable", "default", "metric", "1", "table", "42069"),
        ("ip", "route", "add", "unreachable", "::/0", "metric", "4294967295", "table", "42069"),
        ("ip", "-6", "route", "add", "throw", "10.0.0.0/8", "table", "42069"),
        ("ip", "route", "add", "throw", "10.0.0.1", "table", "42069"),
        ("iptables", "-t", "filter", "-N", "other-chain"),
        ("iptables", "-t", "filter", "-I", "INPUT", "-j", "dsvpn-kill-switch"),
        ("iptables", "-t", "filter", "-A", "dsvpn-kill-switch", "-j", "ACCEPT"),
        ("iptables", "-t", "filter", "-A", "dsvpn-kill-switch", "-d", "::/0", "-j", "RETURN"),
        ("iptables", "-t", "filter", "-A", "dsvpn-kill-switch", "-o", "-x", "-j", "RETURN"),
        ("iptables", "-t", "filter", "-A", "dsvpn-kill-switch", "-m", "mark", "--mark", "1",
         "-j", "RETURN"),
        ("ip6tables", "-t", "filter", "-A", "dsvpn-kill-switch", "-d", "::/0", "-j", "REJECT",
         "--reject-with", "icmp-net-unreachable"),
        ("resolvectl", "dns", "tun0", "--set=x"),
        ("resolvconf", "-a", "tun0"),
        ("resolvconf", "-a", "-x.dsvpn"),
        ("pfctl", "-a", "other", "-f", "-"),
        ("route", "add", "-net", "10.0.0.1", "192.168.192.254"),
    ],
)  # fmt: skip
def test_nothing_else_is_recognised(apply: tuple[str, ...]) -> None:
    for name in ("linux", "macos", "freebsd"):
        assert by_name(name).undo_of(apply) is None, (name, apply)


def test_each_backend_recognises_only_its_own_tools() -> None:
    resolvectl = ("resolvectl", "dns", "tun0", "10.8.0.1")
    assert LINUX.undo_of(resolvectl) == ("resolvectl", "revert", "tun0")
    assert MACOS.undo_of(resolvectl) is None
    assert LINUX.undo_of(("scutil",)) is None
    assert by_name("openbsd").undo_of(("scutil",)) is None
    assert by_name("openbsd").undo_of(("pfctl", "-a", "com.apple/dsvpn", "-f", "-")) is None


def test_render_shows_stdin_and_files() -> None:
    plan = Plan(
        [
            Step(("write", "/etc/resolv.conf"), None, file=("/etc/resolv.conf", "nameserver x\n")),
            Step(("scutil",), ("scutil",), input="a\nb\n", undo_input="c\n"),
        ]
    )
    assert plan.render(LINUX) == [
        "# set up",
        "write /etc/resolv.conf (saved first) <<'EOF'",
        "nameserver x",
        "EOF",
        "scutil <<'EOF'",
        "a",
        "b",
        "EOF",
        "# on exit",
        "scutil <<'EOF'",
        "c",
        "EOF",
        "restore /etc/resolv.conf",
    ]


# -- the tunnel's side: when the kill switch stays -----------------------------------------------


class FakeRunner:
    def __init__(self) -> None:
        self.keep: bool | None = None
        self.kept: list[object] = []

    def undo(self, keep: bool = False) -> None:
        self.keep = keep


class Stopped:
    def __init__(self, received: int | None) -> None:
        self.received = received


@pytest.mark.parametrize(
    ("fully_up", "signal", "keep"),
    [(True, 15, False), (True, None, True), (False, None, False), (False, 2, False)],
    ids=["clean-stop", "error-exit", "failed-start", "stop-during-start"],
)
def test_kill_switch_stays_only_after_an_error_exit(
    tmp_path: Path, fully_up: bool, signal: int | None, keep: bool
) -> None:
    key = tmp_path / "k"
    key.write_bytes(bytes(32))
    key.chmod(0o600)
    cfg = ClientConfig(key_file=str(key), server="192.0.2.1")
    t = tunnel.Tunnel(cfg, LINUX)
    t.runner = FakeRunner()  # type: ignore[assignment]
    t.fully_up = fully_up
    t._undo(Stopped(signal))  # type: ignore[arg-type]
    assert t.runner.keep is keep  # type: ignore[attr-defined]
