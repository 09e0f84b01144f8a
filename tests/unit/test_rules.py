"""Runner, journal, stale cleanup, sysctl hand-over and conflicts, all through a fake host."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from dsvpn.errors import CommandError, ConflictError, PrerequisiteError
from dsvpn.journal import Entry, Identity, Journal, current_netns
from dsvpn.rules import Plan, Runner, Step, check_conflicts, cleanup_stale


class FakeHost:
    """Stands in for subprocess.run: records argv, keeps sysctl values, fails on request."""

    def __init__(self, sysctls: dict[str, str] | None = None) -> None:
        self.calls: list[str] = []
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


FWD = Step(("sysctl", "net.ipv4.ip_forward=1"), None, sysctl=("net.ipv4.ip_forward", "1"))
A = Step(("cmd", "a"), ("uncmd", "a"))
B = Step(("cmd", "b"), None)
C = Step(("cmd", "c"), ("uncmd", "c"))
D = Step(("cmd", "d"), ("uncmd", "d"))


def ident(
    mode: str = "server", tun: str | None = "tun0", port: int = 443,
    local: str = "192.168.192.254", remote: str = "192.168.192.1", table: int | None = None,
) -> Identity:  # fmt: skip
    return Identity(mode, tun, port, local, remote, table, current_netns())


def dead_pid() -> int:
    """The PID of a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def make(run_dir: Path, host: FakeHost, pid: int | None = None, **kw: object):  # type: ignore[no-untyped-def]
    journal = Journal(ident(**kw), run_dir=run_dir, pid=pid or os.getpid())  # type: ignore[arg-type]
    log: list[str] = []
    return Runner(journal, log.append, host), journal, log


# -- apply and undo --------------------------------------------------------------------------


def test_apply_order_logging_and_undo(run_dir: Path) -> None:
    host = FakeHost()
    runner, journal, log = make(run_dir, host)
    runner.apply(Plan([FWD, A, B, C]))
    assert host.calls == ["sysctl net.ipv4.ip_forward=1", "cmd a", "cmd b", "cmd c"]
    assert log == ["[#] sysctl net.ipv4.ip_forward=1", "[#] cmd a", "[#] cmd b", "[#] cmd c"]
    assert journal.path.exists()
    host.calls.clear()
    log.clear()
    runner.undo()
    assert host.calls == ["uncmd c", "uncmd a", "sysctl net.ipv4.ip_forward=0"]
    assert log == ["[#] uncmd c", "[#] uncmd a", "[#] sysctl net.ipv4.ip_forward=0"]
    assert host.sysctls["net.ipv4.ip_forward"] == "0"
    assert not journal.path.exists()
    runner.undo()  # idempotent
    assert len(host.calls) == 3


def test_sysctl_already_set_is_not_restored(run_dir: Path) -> None:
    host = FakeHost({"net.ipv4.ip_forward": "1"})
    runner, _, _ = make(run_dir, host)
    runner.apply(Plan([FWD]))
    host.calls.clear()
    runner.undo()
    assert host.calls == []


def test_bsd_sysctl_restore_keeps_syntax() -> None:
    host = FakeHost({"net.inet.ip.forwarding": "0"})
    step = Step(("sysctl", "-w", "net.inet.ip.forwarding=1"), None, ("net.inet.ip.forwarding", "1"))
    runner = Runner(None, lambda _: None, host)
    runner.apply(Plan([step]))
    runner.undo()
    assert host.calls[-1] == "sysctl -w net.inet.ip.forwarding=0"


def test_failure_rolls_back_in_reverse(run_dir: Path) -> None:
    host = FakeHost()
    host.fail["cmd c"] = "iptables: No chain/target/match by that name."
    runner, journal, log = make(run_dir, host)
    with pytest.raises(CommandError) as err:
        runner.apply(Plan([FWD, A, B, C, D]))
    assert str(err.value) == "`cmd c` failed: iptables: No chain/target/match by that name."
    assert host.calls[-2:] == ["uncmd a", "sysctl net.ipv4.ip_forward=0"]
    assert "cmd d" not in host.calls
    assert log[-2:] == ["[#] uncmd a", "[#] sysctl net.ipv4.ip_forward=0"]
    assert not journal.path.exists()
    assert runner.applied == []


def test_failure_without_stderr_names_exit_status() -> None:
    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 3, "", "")

    with pytest.raises(CommandError, match=r"^`cmd a` failed: exit status 3$"):
        Runner(None, lambda _: None, run).apply(Plan([A]))


def test_missing_tool_names_package() -> None:
    host = FakeHost()
    host.missing.add("iptables")
    step = Step(("iptables", "-t", "raw", "-I", "X"), ("iptables", "-t", "raw", "-D", "X"))
    with pytest.raises(PrerequisiteError, match=r"`iptables` not found \(install iptables\)"):
        Runner(None, lambda _: None, host).apply(Plan([A, step]))
    assert host.calls == ["cmd a", "uncmd a"]


def test_undo_failures_are_logged_and_skipped(run_dir: Path) -> None:
    host = FakeHost()
    runner, journal, log = make(run_dir, host)
    runner.apply(Plan([A, C]))
    host.fail["uncmd c"] = "gone"
    runner.undo()
    assert host.calls[-2:] == ["uncmd c", "uncmd a"]
    assert "warning: `uncmd c` failed: gone" in log
    assert not journal.path.exists()


def test_best_effort_step_is_skipped() -> None:
    host = FakeHost({})  # no such sysctl key
    bbr = Step(("sysctl", "k=bbr"), None, sysctl=("k", "bbr"), best_effort=True)
    log: list[str] = []
    runner = Runner(None, log.append, host)
    runner.apply(Plan([bbr, A]))
    assert host.calls == ["cmd a"]
    assert log[0].startswith("warning: `sysctl -n k` failed")
    assert [e.apply for e in runner.applied] == [A.apply]


def test_journal_written_before_each_apply(run_dir: Path) -> None:
    host = FakeHost()
    runner, journal, _ = make(run_dir, host)
    seen: list[list[str]] = []

    def inspect(argv: list[str]) -> None:
        if argv[:2] == ["sysctl", "-n"]:
            return
        data = json.loads(journal.path.read_text())
        assert data["entries"][-1]["apply"] == argv
        seen.append(argv)

    host.on_call = inspect
    runner.apply(Plan([FWD, A, C]))
    assert len(seen) == 3
    data = json.loads(journal.path.read_text())
    assert data["pid"] == os.getpid()
    assert data["identity"]["tun"] == "tun0"
    assert data["entries"][0]["previous"] == "0"
    assert data["entries"][0]["sysctl"] == ["net.ipv4.ip_forward", "1"]


def test_reapply_gateway(run_dir: Path) -> None:
    host = FakeHost()
    runner, journal, _ = make(run_dir, host)
    old = Plan([A, Step(("route", "add", "s", "gw1"), ("route", "delete", "s"), gateway=True), C])
    new = Plan([A, Step(("route", "add", "s", "gw2"), ("route", "delete", "s"), gateway=True), C])
    runner.apply(old)
    host.calls.clear()
    runner.reapply_gateway(old, old)
    assert host.calls == []
    runner.reapply_gateway(old, new)
    assert host.calls == ["route delete s", "route add s gw2"]
    recorded = [e["apply"] for e in json.loads(journal.path.read_text())["entries"]]
    assert recorded == [["cmd", "a"], ["cmd", "c"], ["route", "add", "s", "gw2"]]
    host.calls.clear()
    runner.undo()
    assert host.calls == ["route delete s", "uncmd c", "uncmd a"]


# -- stale instances and hand-over -----------------------------------------------------------------


def write_journal(run_dir: Path, pid: int, entries: list[Entry], **kw: object) -> Journal:
    j = Journal(ident(**kw), run_dir=run_dir, pid=pid, start="1")  # type: ignore[arg-type]
    j.save(entries)
    return j


def test_cleanup_stale_undoes_dead_instance(run_dir: Path) -> None:
    host = FakeHost({"net.ipv4.ip_forward": "1"})
    pid = dead_pid()
    stale = write_journal(
        run_dir, pid,
        [Entry(FWD.apply, None, FWD.sysctl, previous="0"), Entry(A.apply, A.undo),
         Entry(B.apply, None), Entry(C.apply, C.undo)],
    )  # fmt: skip
    log: list[str] = []
    assert cleanup_stale(log.append, run_dir, host) == 1
    assert host.calls == ["uncmd c", "uncmd a", "sysctl net.ipv4.ip_forward=0"]
    assert log[0] == f"undoing what dsvpn PID {pid} left behind"
    assert not stale.path.exists()
    assert cleanup_stale(log.append, run_dir, host) == 0


def test_cleanup_stale_keeps_live_and_reused_pids(run_dir: Path) -> None:
    host = FakeHost()
    live = Journal(ident(), run_dir=run_dir)  # this process: live, real start stamp
    live.save([Entry(A.apply, A.undo)])
    reused = Journal(ident(tun="tun1"), run_dir=run_dir, pid=os.getppid(), start="not-it")
    reused.save([Entry(C.apply, C.undo)])
    assert cleanup_stale(lambda _: None, run_dir, host) == 1
    assert host.calls == ["uncmd c"]
    assert live.path.exists() and not reused.path.exists()


def test_cleanup_stale_without_run_dir(tmp_path: Path) -> None:
    assert cleanup_stale(lambda _: None, tmp_path / "none", FakeHost()) == 0


def test_sysctl_handover_between_live_instances(run_dir: Path) -> None:
    host = FakeHost({"net.ipv4.ip_forward": "0"})
    # First server: changes 0 -> 1.
    first, first_j, first_log = make(run_dir, host, tun="tun0")
    first.apply(Plan([FWD, A]))
    # A second live server (the parent process stands in for it) sees 1 already.
    second = Runner(
        Journal(ident(tun="tun1", port=444, local="10.9.0.1", remote="10.9.0.2"),
                run_dir=run_dir, pid=os.getppid()),
        lambda _: None, host,
    )  # fmt: skip
    second.apply(Plan([FWD, C]))
    assert second.applied[0].previous == "1"
    # The first leaves: forwarding stays on and the second inherits the original 0.
    host.calls.clear()
    first.undo()
    assert host.calls == ["uncmd a"]
    assert host.sysctls["net.ipv4.ip_forward"] == "1"
    assert any("stays 1" in line and str(os.getppid()) in line for line in first_log)
    on_disk = json.loads((run_dir / f"{os.getppid()}.json").read_text())
    assert on_disk["entries"][0]["previous"] == "0"
    # A later save by the second must not lose the handed-over value.
    second.apply(Plan([D]))
    on_disk = json.loads((run_dir / f"{os.getppid()}.json").read_text())
    assert on_disk["entries"][0]["previous"] == "0"
    # The last one leaving restores the original.
    host.calls.clear()
    second.undo()
    assert host.calls == ["uncmd d", "uncmd c", "sysctl net.ipv4.ip_forward=0"]
    assert not first_j.path.exists()


def test_stale_instance_hands_over_to_live_one(run_dir: Path) -> None:
    host = FakeHost({"net.ipv4.ip_forward": "1"})
    write_journal(run_dir, dead_pid(), [Entry(FWD.apply, None, FWD.sysctl, previous="0")])
    live = Journal(ident(tun="tun1", port=444, local="10.9.0.1", remote="10.9.0.2"),
                   run_dir=run_dir)  # fmt: skip
    live.save([Entry(FWD.apply, None, FWD.sysctl, previous="1")])
    assert cleanup_stale(lambda _: None, run_dir, host) == 1
    assert host.calls == []
    assert Journal.load(live.path).entries[0].previous == "0"


def test_unreadable_record_is_reported_and_kept(run_dir: Path) -> None:
    run_dir.mkdir()
    (run_dir / "123.json").write_text("{not json")
    log: list[str] = []
    assert cleanup_stale(log.append, run_dir, FakeHost()) == 0
    assert log and "unreadable" in log[0]


# -- conflicts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mine", "message"),
    [
        (ident(tun="tun0", port=1, local="10.1.0.1", remote="10.1.0.2"), "tun device tun0"),
        (ident(tun="tun9", port=443, local="10.1.0.1", remote="10.1.0.2"), "port 443"),
        (ident(tun="tun9", port=1, local="192.168.192.254", remote="10.1.0.2"),
         "tunnel address 192.168.192.254"),
        (ident(tun="tun9", port=1, local="10.1.0.1", remote="192.168.192.1"),
         "tunnel address 192.168.192.1"),
    ],
)  # fmt: skip
def test_conflicts_with_live_server(run_dir: Path, mine: Identity, message: str) -> None:
    other = Journal(ident(), run_dir=run_dir, pid=os.getppid())
    other.save([])
    with pytest.raises(
        ConflictError, match=f"{message} is already used by dsvpn PID {os.getppid()}"
    ):
        check_conflicts(mine, run_dir)


def test_client_table_conflict(run_dir: Path) -> None:
    other = Journal(ident(mode="client", tun="tun0", local="192.168.192.1",
                          remote="192.168.192.254", table=42069),
                    run_dir=run_dir, pid=os.getppid())  # fmt: skip
    other.save([])
    mine = ident(mode="client", tun="tun5", local="10.1.0.1", remote="10.1.0.2", table=42069)
    with pytest.raises(ConflictError, match="routing table 42069"):
        check_conflicts(mine, run_dir)


def test_no_conflict(run_dir: Path) -> None:
    Journal(ident(), run_dir=run_dir, pid=os.getppid()).save([])
    # Different everything; a client port equal to a server's port is fine.
    check_conflicts(ident(mode="client", tun=None, local="10.1.0.1", remote="10.1.0.2"), run_dir)
    check_conflicts(ident(tun="tun1", port=444, local="10.2.0.1", remote="10.2.0.2"), run_dir)
    # Dead instances and other namespaces never conflict.
    Journal(ident(tun="tun7"), run_dir=run_dir, pid=dead_pid(), start="1").save([])
    check_conflicts(ident(tun="tun7", port=1, local="10.3.0.1", remote="10.3.0.2"), run_dir)
    foreign = Identity("server", "tun8", 8, "10.4.0.1", "10.4.0.2", None, "net:[1]")
    Journal(foreign, run_dir=run_dir, pid=os.getppid(), start=None).save([])
    check_conflicts(ident(tun="tun8", port=2, local="10.5.0.1", remote="10.5.0.2"), run_dir)
    check_conflicts(ident(), tmp_path_missing(run_dir))


def tmp_path_missing(run_dir: Path) -> Path:
    return run_dir / "does-not-exist"


def test_run_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSVPN_RUN_DIR", str(tmp_path / "env"))
    j = Journal(ident())
    assert j.path == tmp_path / "env" / f"{os.getpid()}.json"


def test_interrupted_command_stays_recorded(run_dir: Path) -> None:
    host = FakeHost()
    runner, journal, _ = make(run_dir, host)

    def interrupt(argv: list[str]) -> None:
        if argv == ["cmd", "c"]:
            raise KeyboardInterrupt

    host.on_call = interrupt
    with pytest.raises(KeyboardInterrupt):
        runner.apply(Plan([A, C]))
    # It may have taken effect: the undo that follows tries it too.
    assert [e.apply for e in runner.applied] == [A.apply, C.apply]
    host.on_call = None
    runner.undo()
    assert host.calls[-2:] == ["uncmd c", "uncmd a"]
    assert not journal.path.exists()


def test_identity_defaults_and_self(run_dir: Path) -> None:
    me = Identity(mode="server", tun="tun0", port=443, local_tun_ip="192.168.192.254",
                  remote_tun_ip="192.168.192.1", pid=os.getppid())  # fmt: skip
    assert me.netns == current_netns()
    # A record under our own PID is ourselves, not a conflict.
    Journal(me, run_dir=run_dir, pid=os.getppid()).save([])
    check_conflicts(me, run_dir)
