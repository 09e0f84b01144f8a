"""Instance records: what is trusted (and what is refused with nothing run), the claim under
one lock, stale cleanup, conflicts and the sysctl hand-over between live instances."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from host_rig import DIALECT, FWD, A, B, C, D, FakeHost, dead_pid

from dsvpn import instances
from dsvpn.config import ServerConfig
from dsvpn.errors import ConflictError, DsvpnError
from dsvpn.instances import Identity, Instance, Record, RunDir, current_netns, process_start
from dsvpn.plan import Plan
from dsvpn.platform import by_name
from dsvpn.platform._common import NetInfo
from dsvpn.platform.linux import server_plan
from dsvpn.runner import Applied, Runner

LINUX = by_name("linux")


def ident(
    mode: str = "server", tun: str | None = "tun0", port: int = 443,
    local: str = "192.168.192.254", remote: str = "192.168.192.1", table: int | None = None,
) -> Identity:  # fmt: skip
    return Identity(mode, tun, port, local, remote, table)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def put(run_dir: Path, pid: int, applied: list[Applied], start: str = "1", **kw: Any) -> Record:
    """Write a record as dsvpn would (for a dead PID, start "1" never matches)."""
    record = Record(pid, start, ident(**kw), applied)
    directory = RunDir(run_dir)
    with directory.lock(create=True):
        directory.write(record)
    return record


def live_peer(run_dir: Path, applied: list[Applied], **kw: Any) -> Instance:
    """A live instance other than this process: the parent process stands in for it."""
    record = put(run_dir, os.getppid(), applied, start=process_start(os.getppid()) or "", **kw)
    return Instance(RunDir(run_dir), record, DIALECT)


def read(run_dir: Path, pid: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / f"{pid}.json").read_text())
    return data


# -- the directory and the files ------------------------------------------------------------------


def test_claim_creates_a_private_directory_and_record(run_dir: Path) -> None:
    old = os.umask(0)
    try:
        instance = instances.claim(
            ident(), DIALECT, lambda _: None, run_dir=run_dir, run=FakeHost()
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    path = run_dir / f"{os.getpid()}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = read(run_dir, os.getpid())
    assert data["pid"] == os.getpid() and data["start"] == process_start(os.getpid())
    assert data["identity"]["netns"] == current_netns()
    assert data["steps"] == []
    assert sorted(os.listdir(run_dir)) == [".lock", path.name]  # no temporary file left
    instance.set_tun("tun7")
    assert read(run_dir, os.getpid())["identity"]["tun"] == "tun7"
    instance.release()
    assert not path.exists()


def test_writable_run_dir_is_refused(run_dir: Path) -> None:
    run_dir.mkdir()
    run_dir.chmod(0o777)
    host = FakeHost()
    put_raw(run_dir, dead_pid(), good_record_steps())
    with pytest.raises(DsvpnError, match=r"refusing to use .*: group or others may write to it"):
        instances.cleanup(LINUX, lambda _: None, run_dir=run_dir, run=host)
    with pytest.raises(DsvpnError, match="group or others may write"):
        instances.claim(ident(), LINUX, lambda _: None, run_dir=run_dir, run=host)
    assert host.calls == []


def test_run_dir_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(real)
    host = FakeHost()
    with pytest.raises(DsvpnError, match="not a directory"):
        instances.cleanup(LINUX, lambda _: None, run_dir=tmp_path / "run", run=host)
    assert host.calls == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_run_dir_of_another_user_is_refused(run_dir: Path) -> None:
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, 4242, 4242)
    with pytest.raises(DsvpnError, match="belongs to uid 4242"):
        instances.cleanup(LINUX, lambda _: None, run_dir=run_dir, run=FakeHost())


def test_no_run_dir_nothing_to_clean(run_dir: Path) -> None:
    assert instances.cleanup(LINUX, lambda _: None, run_dir=run_dir, run=FakeHost()) == 0
    assert not run_dir.exists()


# -- hostile records: refused, reported, nothing runs ----------------------------------------------

RAW = ("PREROUTING", "!", "-i", "tun0", "-d", "192.168.192.254", "-m", "addrtype", "!",
       "--src-type", "LOCAL", "-j", "DROP")  # fmt: skip


def step(apply: tuple[str, ...], undo: tuple[str, ...] | None, **kw: Any) -> dict[str, Any]:
    return {
        "apply": list(apply),
        "undo": list(undo) if undo is not None else None,
        "sysctl": kw.get("sysctl"),
        "gateway": False,
        "previous": kw.get("previous"),
    }


def good_record_steps() -> list[dict[str, Any]]:
    return [
        step(("sysctl", "net.ipv4.ip_forward=1"), None,
             sysctl=["net.ipv4.ip_forward", "1"], previous="0"),
        step(("iptables", "-t", "raw", "-I", *RAW), ("iptables", "-t", "raw", "-D", *RAW)),
        step(("ip", "rule", "add", "not", "fwmark", "42069", "table", "42069"),
             ("ip", "rule", "delete", "table", "42069")),
    ]  # fmt: skip


def record_json(pid: Any, steps: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    data = Record(1, "1", ident(), []).to_json()
    data.update(pid=pid, steps=steps)
    data.update(over)
    return data


def put_raw(run_dir: Path, pid: Any, steps: list[dict[str, Any]], name: str | None = None,
            mode: int = 0o600, **over: Any) -> Path:  # fmt: skip
    run_dir.mkdir(mode=0o700, exist_ok=True)
    path = run_dir / (name or f"{pid}.json")
    path.write_text(json.dumps(record_json(pid, steps, **over)))
    path.chmod(mode)
    return path


def test_a_good_dead_record_is_undone(run_dir: Path) -> None:
    # The control for the hostile cases below: the same record, well-formed, does run.
    put_raw(run_dir, pid := dead_pid(), good_record_steps())
    host = FakeHost({"net.ipv4.ip_forward": "1"})
    log: list[str] = []
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=host) == 1
    assert host.calls == [
        "ip rule delete table 42069",
        "iptables -t raw -D " + " ".join(RAW),
        "sysctl net.ipv4.ip_forward=0",
    ]
    assert log[0] == f"undoing what dsvpn PID {pid} left behind"
    assert not (run_dir / f"{pid}.json").exists()


# A server with IPv6 NAT out of eth0.7 (accept_ra kept at 2), with either firewall.
NET_RA = NetInfo("eth0", "198.51.100.1", ext_if6="eth0.7", ext6_accepts_ra=True)
ACCEPT_RA = "net/ipv6/conf/eth0.7/accept_ra"
NFT_PLAN = server_plan(ServerConfig(key_file="k"), "tun0", NET_RA, "nft")
(NFT,) = [s for s in NFT_PLAN.steps if s.apply[0] == "nft"]
IP6_MASQ = ("POSTROUTING", "-o", "eth0.7", "-s", "64:ff9b::192.168.192.1", "-j", "MASQUERADE")
IP6_OUT = ("FORWARD", "-i", "tun0", "-o", "eth0.7", "-j", "ACCEPT")


def plan_record_steps(plan: Plan, previous: dict[str, str]) -> list[dict[str, Any]]:
    # As the runner records them: every step, sysctls with the value found before.
    return [
        step(s.apply, s.undo, sysctl=list(s.sysctl) if s.sysctl else None,
             previous=previous[s.sysctl[0]] if s.sysctl else None)
        for s in plan.steps
    ]  # fmt: skip


@pytest.mark.parametrize("firewall", ["iptables", "nft"])
def test_a_dead_record_of_ipv6_nat_is_undone(run_dir: Path, firewall: str) -> None:
    # The control for the nft, ip6tables and accept_ra cases below: dsvpn's own steps run.
    plan = server_plan(ServerConfig(key_file="k"), "tun0", NET_RA, firewall)  # type: ignore[arg-type]
    before = {"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0", ACCEPT_RA: "1"}
    put_raw(run_dir, dead_pid(), plan_record_steps(plan, before))
    sysctls = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1", ACCEPT_RA: "2"}
    host = FakeHost(sysctls)
    assert instances.cleanup(LINUX, lambda _: None, run_dir=run_dir, run=host) == 1
    if firewall == "nft":
        rules = ["nft delete table inet dsvpn-tun0"]
    else:
        rules = [" ".join(s.undo) for s in reversed(plan.steps) if s.undo]
        assert rules[0] == "ip6tables -t filter -D " + " ".join(IP6_OUT)
        assert len(rules) == 8
    assert host.calls == [
        "sysctl net.ipv6.conf.all.forwarding=0",
        f"sysctl {ACCEPT_RA}=1",
        *rules,
        "sysctl net.ipv4.ip_forward=0",
    ]
    assert host.sysctls == before


def _hostile(kind: str, run_dir: Path) -> None:
    pid = dead_pid()
    good = good_record_steps()
    if kind == "symlink":
        target = put_raw(run_dir.parent / "elsewhere", pid, good)
        run_dir.mkdir(mode=0o700)
        (run_dir / f"{pid}.json").symlink_to(target)
    elif kind == "group-writable":
        put_raw(run_dir, pid, good, mode=0o620)
    elif kind == "other-writable":
        put_raw(run_dir, pid, good, mode=0o602)
    elif kind == "fifo":
        run_dir.mkdir(mode=0o700)
        os.mkfifo(run_dir / f"{pid}.json", 0o600)
    elif kind == "misnamed":
        put_raw(run_dir, pid, good, name=f"{dead_pid()}.json")
    elif kind == "not-a-pid-name":
        put_raw(run_dir, pid, good, name="evil.json")
    elif kind == "pid -1":
        put_raw(run_dir, -1, good)
    elif kind == "pid 0":
        put_raw(run_dir, 0, good)
    elif kind == "pid not an int":
        put_raw(run_dir, str(pid), good, name=f"{pid}.json")
    elif kind == "no start stamp":
        put_raw(run_dir, pid, good, start=None)
    elif kind == "other version":
        put_raw(run_dir, pid, good, version=1)
    elif kind == "shell in undo":
        put_raw(run_dir, pid, [step(("true",), ("/bin/sh", "-c", "touch /tmp/pwned"))])
    elif kind == "undo not the apply's twin":
        put_raw(run_dir, pid, [step(("iptables", "-t", "raw", "-I", *RAW), ("iptables", "-F"))])
    elif kind == "iptables shape dsvpn never makes":
        rule = ("POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
        put_raw(run_dir, pid, [step(("iptables", "-t", "nat", "-A", *rule),
                                    ("iptables", "-t", "nat", "-D", *rule))])  # fmt: skip
    elif kind == "option as interface name":
        rule = ("POSTROUTING", "-o", "--modprobe=/tmp/x", "-s", "10.0.0.1", "-j", "MASQUERADE")
        put_raw(run_dir, pid, [step(("iptables", "-t", "nat", "-A", *rule),
                                    ("iptables", "-t", "nat", "-D", *rule))])  # fmt: skip
    elif kind == "sysctl key dsvpn never sets":
        apply = ("sysctl", "kernel.core_pattern=x")
        sysctl = ["kernel.core_pattern", "x"]
        put_raw(run_dir, pid, [step(apply, None, sysctl=sysctl, previous="|/tmp/evil")])
    elif kind == "sysctl crafted value":
        crafted = "0 kernel.modprobe=/tmp/evil"
        put_raw(run_dir, pid, [step(FWD.apply, None, sysctl=list(FWD.sysctl), previous=crafted)])
    elif kind == "sysctl with an undo argv":
        sysctl = list(FWD.sysctl)
        put_raw(run_dir, pid, [step(FWD.apply, ("/bin/sh",), sysctl=sysctl, previous="0")])
    elif kind == "nft undo deletes a table not ours":
        put_raw(run_dir, pid, [step(NFT.apply, ("nft", "delete", "table", "inet",
                                                "other-table-not-ours"))])  # fmt: skip
    elif kind == "nft undo loads a file":
        put_raw(run_dir, pid, [step(NFT.apply, ("nft", "-f", "/tmp/evil"))])
    elif kind == "nft apply loads a file":
        put_raw(run_dir, pid, [step(("nft", "-f", "/tmp/evil"), NFT.undo)])
    elif kind == "nft undo names another dsvpn table":
        put_raw(run_dir, pid, [step(NFT.apply, ("nft", "delete", "table", "inet", "dsvpn-tun1"))])
    elif kind == "nft table not ours, apply and undo":
        ruleset = NFT.apply[1].replace("dsvpn-tun0", "other-table-not-ours")
        put_raw(run_dir, pid, [step(("nft", ruleset), ("nft", "delete", "table", "inet",
                                                        "other-table-not-ours"))])  # fmt: skip
    elif kind == "nft apply whose undo names a different table":
        ruleset = NFT.apply[1].replace("dsvpn-tun0", "dsvpn-tun1", 1)  # the first line only
        put_raw(run_dir, pid, [step(("nft", ruleset), ("nft", "delete", "table", "inet",
                                                        "dsvpn-tun1"))])  # fmt: skip
    elif kind == "nft flush in the undo":
        put_raw(run_dir, pid, [step(NFT.apply, ("nft", "flush", "ruleset"))])
    elif kind == "ip6tables shape dsvpn never makes":
        rule = ("POSTROUTING", "-o", "eth0.7", "-j", "MASQUERADE")
        put_raw(run_dir, pid, [step(("ip6tables", "-t", "nat", "-A", *rule),
                                    ("ip6tables", "-t", "nat", "-D", *rule))])  # fmt: skip
    elif kind == "ip6tables option as interface name":
        rule = tuple("--modprobe=/tmp/x" if w == "eth0.7" else w for w in IP6_MASQ)
        put_raw(run_dir, pid, [step(("ip6tables", "-t", "nat", "-A", *rule),
                                    ("ip6tables", "-t", "nat", "-D", *rule))])  # fmt: skip
    elif kind == "ip6tables undo of another rule":
        put_raw(run_dir, pid, [step(("ip6tables", "-t", "nat", "-A", *IP6_MASQ),
                                    ("ip6tables", "-t", "filter", "-D", *IP6_OUT))])  # fmt: skip
    elif kind == "iptables undo of an ip6tables rule":
        put_raw(run_dir, pid, [step(("ip6tables", "-t", "nat", "-A", *IP6_MASQ),
                                    ("iptables", "-t", "nat", "-D", *IP6_MASQ))])  # fmt: skip
    elif kind == "sysctl accept_ra of every interface":
        key = "net.ipv6.conf.all.accept_ra"
        put_raw(run_dir, pid, [step(("sysctl", f"{key}=2"), None, sysctl=[key, "2"],
                                    previous="0")])  # fmt: skip
    elif kind == "sysctl accept_ra path escape":
        key = "net/ipv6/conf/../../../kernel/accept_ra"
        put_raw(run_dir, pid, [step(("sysctl", f"{key}=2"), None, sysctl=[key, "2"],
                                    previous="0")])  # fmt: skip
    elif kind == "not json":
        run_dir.mkdir(mode=0o700)
        (run_dir / f"{pid}.json").write_text("{not json")
        (run_dir / f"{pid}.json").chmod(0o600)
    else:
        raise AssertionError(kind)


HOSTILE = [
    "symlink", "group-writable", "other-writable", "fifo", "misnamed", "not-a-pid-name",
    "pid -1", "pid 0", "pid not an int", "no start stamp", "other version", "shell in undo",
    "undo not the apply's twin", "iptables shape dsvpn never makes", "option as interface name",
    "sysctl key dsvpn never sets", "sysctl crafted value", "sysctl with an undo argv", "not json",
    "nft undo deletes a table not ours", "nft undo loads a file", "nft apply loads a file",
    "nft undo names another dsvpn table", "nft table not ours, apply and undo",
    "nft apply whose undo names a different table", "nft flush in the undo",
    "ip6tables shape dsvpn never makes", "ip6tables option as interface name",
    "ip6tables undo of another rule", "iptables undo of an ip6tables rule",
    "sysctl accept_ra of every interface", "sysctl accept_ra path escape",
]  # fmt: skip


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_record_is_refused_and_nothing_runs(run_dir: Path, kind: str) -> None:
    _hostile(kind, run_dir)
    files = sorted(os.listdir(run_dir))
    host = FakeHost({"net.ipv4.ip_forward": "1"})
    log: list[str] = []
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=host) == 0
    assert host.calls == [] and host.reads == []
    assert len(log) == 1 and log[0].startswith(f"warning: ignoring {run_dir}/"), log
    assert sorted(os.listdir(run_dir)) == sorted([*files, ".lock"])  # left for the admin
    # A start reports it too, runs nothing of it, and does not count it as a live instance.
    log.clear()
    instance = instances.claim(ident(), LINUX, log.append, run_dir=run_dir, run=host)
    assert host.calls == [] and len(log) == 1
    instance.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_record_of_another_user_is_refused(run_dir: Path) -> None:
    path = put_raw(run_dir, dead_pid(), good_record_steps())
    os.chown(path, 4242, 4242)
    host = FakeHost()
    log: list[str] = []
    assert instances.cleanup(LINUX, log.append, run_dir=run_dir, run=host) == 0
    assert host.calls == [] and "owned by uid 4242" in log[0]


def test_leftover_temporary_files_are_removed(run_dir: Path) -> None:
    put_raw(run_dir, 1, [], name=f".{dead_pid()}.{dead_pid()}.tmp")
    log: list[str] = []
    instances.cleanup(LINUX, log.append, run_dir=run_dir, run=FakeHost())
    assert os.listdir(run_dir) == [".lock"] and log == []


# -- stale instances -------------------------------------------------------------------------


def test_cleanup_undoes_a_dead_instance(run_dir: Path) -> None:
    host = FakeHost({"net.ipv4.ip_forward": "1"})
    pid = dead_pid()
    put(run_dir, pid, [Applied(FWD, "0"), Applied(A), Applied(B), Applied(C)])
    log: list[str] = []
    assert instances.cleanup(DIALECT, log.append, run_dir=run_dir, run=host) == 1
    assert host.calls == ["uncmd c", "uncmd a", "sysctl net.ipv4.ip_forward=0"]
    assert log[0] == f"undoing what dsvpn PID {pid} left behind"
    assert not (run_dir / f"{pid}.json").exists()
    assert instances.cleanup(DIALECT, log.append, run_dir=run_dir, run=host) == 0


def test_live_instances_are_kept_and_reused_pids_cleaned(run_dir: Path) -> None:
    host = FakeHost()
    live_peer(run_dir, [Applied(A)])
    put(run_dir, os.getpid(), [Applied(C)], start="not-it", tun="tun1")  # a reused PID
    assert instances.cleanup(DIALECT, lambda _: None, run_dir=run_dir, run=host) == 1
    assert host.calls == ["uncmd c"]
    assert (run_dir / f"{os.getppid()}.json").exists()
    assert not (run_dir / f"{os.getpid()}.json").exists()


def test_other_namespaces_are_never_touched(run_dir: Path) -> None:
    record = Record(dead_pid(), "1", Identity("server", "tun0", 443, "10.4.0.1", "10.4.0.2",
                                              None, "net:[1] cookie 99"), [Applied(A)])  # fmt: skip
    directory = RunDir(run_dir)
    with directory.lock(create=True):
        directory.write(record)
    host = FakeHost()
    log: list[str] = []
    assert instances.cleanup(DIALECT, log.append, run_dir=run_dir, run=host) == 0
    assert log == [
        "left 1 record(s) of dead instances in other network namespaces alone: only a cleanup "
        "inside a namespace undoes what was done there"
    ]
    instances.claim(ident(), DIALECT, lambda _: None, run_dir=run_dir, run=host).release()
    assert host.calls == []
    assert (run_dir / record.name).exists()


def test_claim_cleans_up_before_it_writes(run_dir: Path) -> None:
    host = FakeHost()
    pid = dead_pid()
    put(run_dir, pid, [Applied(A)])
    log: list[str] = []
    instance = instances.claim(ident(), DIALECT, log.append, run_dir=run_dir, run=host)
    assert host.calls == ["uncmd a"]
    assert sorted(os.listdir(run_dir)) == [".lock", f"{os.getpid()}.json"]
    instance.release()


# -- conflicts and the claim ---------------------------------------------------------------------


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
    live_peer(run_dir, [])
    with pytest.raises(
        ConflictError, match=f"{message} is already used by dsvpn PID {os.getppid()}"
    ):
        instances.claim(mine, DIALECT, lambda _: None, run_dir=run_dir)
    assert not (run_dir / f"{os.getpid()}.json").exists()


def test_client_table_conflict(run_dir: Path) -> None:
    live_peer(run_dir, [], mode="client", local="192.168.192.1", remote="192.168.192.254",
              table=42069)  # fmt: skip
    mine = ident(mode="client", tun="tun5", local="10.1.0.1", remote="10.1.0.2", table=42069)
    with pytest.raises(ConflictError, match="routing table 42069"):
        instances.claim(mine, DIALECT, lambda _: None, run_dir=run_dir)


@pytest.mark.parametrize(
    "mine",
    [
        # Different everything; a client port equal to a server's port is fine.
        ident(mode="client", tun=None, local="10.1.0.1", remote="10.1.0.2"),
        ident(tun="tun1", port=444, local="10.2.0.1", remote="10.2.0.2"),
    ],
)
def test_no_conflict(run_dir: Path, mine: Identity) -> None:
    live_peer(run_dir, [])
    instances.claim(mine, DIALECT, lambda _: None, run_dir=run_dir).release()


def test_dead_instances_and_other_namespaces_never_conflict(run_dir: Path) -> None:
    put(run_dir, dead_pid(), [], tun="tun7")
    foreign = Identity("server", "tun0", 443, "192.168.192.254", "192.168.192.1", None, "net:[1]")
    directory = RunDir(run_dir)
    with directory.lock():
        directory.write(Record(os.getppid(), process_start(os.getppid()) or "", foreign, []))
    instances.claim(ident(), DIALECT, lambda _: None, run_dir=run_dir, run=FakeHost()).release()


def _claim_at_once(run_dir: str, barrier: Any, results: Any) -> None:
    try:
        instances.claim(ident(), DIALECT, lambda _: None, run_dir=run_dir, run=FakeHost())
        results.put("won")
    except ConflictError:
        results.put("refused")
    barrier.wait(30)  # the winner stays alive until both have tried


def test_two_claims_at_the_same_instant_one_wins(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Widen the window between the conflict check and the record write: without one lock
    # around both, each process would pass the check before the other wrote its record.
    real = instances._collision

    def slow(me: Identity, them: Identity) -> str | None:
        time.sleep(0.3)
        return real(me, them)

    real_write = RunDir.write

    def slow_write(self: RunDir, record: Record) -> None:
        time.sleep(0.3)
        real_write(self, record)

    monkeypatch.setattr(instances, "_collision", slow)
    monkeypatch.setattr(RunDir, "write", slow_write)
    ctx = multiprocessing.get_context("fork")
    for _ in range(2):
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_claim_at_once, args=(str(run_dir), barrier, results))
                 for _ in range(2)]  # fmt: skip
        for p in procs:
            p.start()
        outcome = sorted(results.get(timeout=30) for _ in procs)
        barrier.wait(30)
        for p in procs:
            p.join(30)
        assert outcome == ["refused", "won"]


def test_claiming_twice_in_one_process_is_refused(run_dir: Path) -> None:
    instance = instances.claim(ident(), DIALECT, lambda _: None, run_dir=run_dir)
    with pytest.raises(ConflictError, match="this process"):
        instances.claim(ident(tun="tun9", port=1, local="10.0.0.1", remote="10.0.0.2"), DIALECT,
                        lambda _: None, run_dir=run_dir)  # fmt: skip
    instance.release()


# -- sysctl hand-over ----------------------------------------------------------------------------


def test_sysctl_handover_between_live_instances(run_dir: Path) -> None:
    host = FakeHost({"net.ipv4.ip_forward": "0"})
    # First server (this process): changes 0 -> 1.
    first_log: list[str] = []
    first = instances.claim(ident(), DIALECT, first_log.append, run_dir=run_dir, run=host)
    first_runner = Runner(DIALECT, first_log.append, run=host, record=first)
    first_runner.apply(Plan([FWD, A]))
    # A second live server (the parent process stands in for it) sees 1 already.
    second = live_peer(run_dir, [], tun="tun1", port=444, local="10.9.0.1", remote="10.9.0.2")
    second_runner = Runner(DIALECT, lambda _: None, run=host, record=second)
    second_runner.apply(Plan([FWD, C]))
    assert second_runner.applied[0].previous == "1"
    # The first leaves: forwarding stays on and the second inherits the original 0.
    host.calls.clear()
    first_runner.undo()
    first.release()
    assert host.calls == ["uncmd a"]
    assert host.sysctls["net.ipv4.ip_forward"] == "1"
    assert any("stays 1" in line and str(os.getppid()) in line for line in first_log)
    assert read(run_dir, os.getppid())["steps"][0]["previous"] == "0"
    # A later save by the second must not lose the handed-over value.
    second_runner.apply(Plan([D]))
    assert read(run_dir, os.getppid())["steps"][0]["previous"] == "0"
    # The last one leaving restores the original.
    host.calls.clear()
    second_runner.undo()
    assert host.calls == ["uncmd d", "uncmd c", "sysctl net.ipv4.ip_forward=0"]


def test_stale_instance_hands_over_to_live_one(run_dir: Path) -> None:
    host = FakeHost({"net.ipv4.ip_forward": "1"})
    put(run_dir, dead_pid(), [Applied(FWD, "0")])
    live_peer(run_dir, [Applied(FWD, "1")], tun="tun1", port=444, local="10.9.0.1",
              remote="10.9.0.2")  # fmt: skip
    assert instances.cleanup(DIALECT, lambda _: None, run_dir=run_dir, run=host) == 1
    assert host.calls == []
    assert read(run_dir, os.getppid())["steps"][0]["previous"] == "0"


def test_netns_carries_a_cookie_on_linux() -> None:
    netns = current_netns()
    if netns is None:
        pytest.skip("no network namespaces on this OS")
    assert netns.startswith("net:[")
    assert ident().netns == netns
