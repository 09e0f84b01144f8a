"""--kill-switch on a client that changes networks: the holes for the local subnets follow the
host's subnets as the gateway routes follow the gateway (planned, applied through the runner,
recorded step by step, rolled back on a failure), with iptables and with nft."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
from host_rig import FakeHost

from dsvpn import instances, tunnel
from dsvpn.config import ClientConfig, ClientNetwork
from dsvpn.instances import Identity, RunDir
from dsvpn.plan import Plan, Step
from dsvpn.platform import _common, by_name
from dsvpn.platform._common import NetInfo
from dsvpn.runner import Runner

LINUX = by_name("linux")
NET = NetInfo("", "")  # a Linux client's plan never names the gateway
OLD_LAN = ("192.0.2.0/24", "2001:db8:1::/64")
NEW_LAN = ("198.51.100.0/24", "2001:db8:1::/64")  # moved to another IPv4 LAN, same IPv6 one
KS = "dsvpn-kill-switch"


def client(lan: tuple[str, ...] | None, firewall: str = "iptables") -> ClientConfig:
    return ClientConfig(
        key_file="k",
        server="203.0.113.5",
        server_ip="203.0.113.5",
        firewall=firewall,  # type: ignore[arg-type]
        network=ClientNetwork(kill_switch=True, local_nets=lan),
    )


def plan(lan: tuple[str, ...], firewall: str = "iptables") -> Plan:
    return LINUX.plan(client(lan, firewall), "tun0", NET)


def line(step: Step) -> str:
    return " ".join(step.apply)


# -- the plans ----------------------------------------------------------------------------------


def test_iptables_local_steps_are_the_subnet_holes_alone() -> None:
    old, new = plan(OLD_LAN), plan(NEW_LAN)
    assert [line(s) for s in old.local_steps()] == [
        f"iptables -t filter -I {KS} -d 192.0.2.0/24 -j RETURN",
        f"ip6tables -t filter -I {KS} -d 2001:db8:1::/64 -j RETURN",
    ]
    assert all(s.keep and not s.replaces for s in old.local_steps())
    # Nothing else of the plan depends on the subnets.
    rest = [s for s in old.steps if not s.local]
    assert rest == [s for s in new.steps if not s.local]
    # Each hole's undo is recognised in a record, and only a hole's.
    for step in old.local_steps():
        assert LINUX.undo_of(step.apply) == step.undo
    forged = [
        ("iptables", "-t", "filter", "-I", KS, "-j", "RETURN"),  # everything
        ("iptables", "-t", "filter", "-I", KS, "-d", "192.0.2.0/24", "-j", "ACCEPT"),
        ("iptables", "-t", "filter", "-I", KS, "-o", "eth0", "-j", "RETURN"),
        ("ip6tables", "-t", "filter", "-I", KS, "-d", "192.0.2.0/24", "-j", "RETURN"),
        ("iptables", "-t", "filter", "-I", KS, "1", "-d", "192.0.2.0/24", "-j", "RETURN"),
    ]
    assert [LINUX.undo_of(f) for f in forged] == [None] * len(forged)


def test_nft_local_step_is_the_whole_table_replaced_in_place() -> None:
    old, new = plan(OLD_LAN, "nft"), plan(NEW_LAN, "nft")
    (a,), (b,) = old.local_steps(), new.local_steps()
    assert a.keep and a.replaces and a.undo == b.undo == ("nft", "delete", "table", "inet", KS)
    assert "ip daddr 192.0.2.0/24 accept" in a.apply[1]
    assert "ip daddr 198.51.100.0/24 accept" in b.apply[1]
    assert "192.0.2.0/24" not in b.apply[1]
    # Its load starts by deleting the table of that name in the same transaction.
    assert b.apply[1].startswith(f"add table inet {KS}\ndelete table inet {KS}\n")


def test_no_local_subnet_at_all_is_no_hole_not_a_placeholder() -> None:
    steps = [line(s) for s in plan(()).steps]
    assert not any("<local-subnets>" in s for s in steps)
    assert plan(()).local_steps() == []


def test_macos_pf_anchor_is_reloaded_in_place() -> None:
    cfg = client(OLD_LAN)
    old = by_name("macos").plan(cfg, "utun4", NetInfo("en0", "192.0.2.1"))
    (load,) = old.local_steps()
    assert load.replaces and load.keep and load.input and "192.0.2.0/24" in load.input


# -- the runner ---------------------------------------------------------------------------------


def recorded(tmp_path: Path, host: FakeHost) -> tuple[Runner, instances.Instance, list[str]]:
    log: list[str] = []
    ident = Identity("client", "tun0", 443, "192.168.192.1", "192.168.192.254", 42069)
    instance = instances.claim(ident, LINUX, log.append, run_dir=tmp_path / "run", run=host)
    return Runner(LINUX, log.append, run=host, record=instance), instance, log


def on_disk(instance: instances.Instance) -> list[tuple[str, ...]]:
    """The applies of the record as `dsvpn cleanup` would read it back (every undo checked)."""
    directory = RunDir(instance.run_dir.path)
    with directory.lock():
        record = directory.load(instance.pid, LINUX)
    return [a.step.apply for a in record.applied]


def test_iptables_holes_follow_closing_before_opening(tmp_path: Path) -> None:
    host = FakeHost({"net.ipv4.tcp_congestion_control": "cubic"})
    runner, instance, log = recorded(tmp_path, host)
    old, new = plan(OLD_LAN), plan(NEW_LAN)
    runner.apply(old)
    host.calls.clear()
    log.clear()
    assert runner.reapply_local(old, old)
    assert host.calls == []
    assert runner.reapply_local(old, new)
    # The old hole closes first: nothing passes that should not, even for a moment.
    assert host.calls == [
        f"iptables -t filter -D {KS} -d 192.0.2.0/24 -j RETURN",
        f"iptables -t filter -I {KS} -d 198.51.100.0/24 -j RETURN",
    ]
    assert log == [f"[#] {c}" for c in host.calls]
    recorded_steps = on_disk(instance)
    assert new.local_steps()[0].apply in recorded_steps
    assert old.local_steps()[0].apply not in recorded_steps
    assert sorted(recorded_steps) == sorted(s.apply for s in new.steps)
    # A stop undoes the new hole (before the chain goes) and never the old one.
    host.calls.clear()
    runner.undo()
    assert f"iptables -t filter -D {KS} -d 198.51.100.0/24 -j RETURN" in host.calls
    assert not any("192.0.2.0/24" in c for c in host.calls)
    assert host.calls.index(
        f"iptables -t filter -D {KS} -d 198.51.100.0/24 -j RETURN"
    ) < host.calls.index(f"iptables -t filter -X {KS}")
    assert on_disk(instance) == []
    instance.release()


def test_iptables_failure_puts_the_old_holes_back(tmp_path: Path) -> None:
    host = FakeHost({"net.ipv4.tcp_congestion_control": "cubic"})
    runner, instance, log = recorded(tmp_path, host)
    old, new = plan(OLD_LAN), plan(NEW_LAN)
    runner.apply(old)
    before = on_disk(instance)
    host.calls.clear()
    host.fail[f"iptables -t filter -I {KS} -d 198.51.100.0/24 -j RETURN"] = "iptables: busy"
    assert runner.reapply_local(old, new) is False
    assert host.calls == [
        f"iptables -t filter -D {KS} -d 192.0.2.0/24 -j RETURN",
        f"iptables -t filter -I {KS} -d 198.51.100.0/24 -j RETURN",
        f"iptables -t filter -I {KS} -d 192.0.2.0/24 -j RETURN",
    ]
    assert any("keeping the previous local subnets" in ln for ln in log)
    assert sorted(on_disk(instance)) == sorted(before)
    instance.release()


def test_nft_table_is_swapped_in_one_transaction(tmp_path: Path) -> None:
    host = FakeHost({"net.ipv4.tcp_congestion_control": "cubic"})
    runner, instance, _ = recorded(tmp_path, host)
    old, new = plan(OLD_LAN, "nft"), plan(NEW_LAN, "nft")
    runner.apply(old)
    before = on_disk(instance)
    host.calls.clear()
    assert runner.reapply_local(old, new)
    # One command, no `delete table` first: the kill switch never has a gap.
    assert host.calls == [line(new.local_steps()[0])]
    after = on_disk(instance)
    position = before.index(old.local_steps()[0].apply)
    assert after[position] == new.local_steps()[0].apply  # in place: undone in the same order
    assert len(after) == len(before)
    # A failed load changes nothing on the host: the record names the old table again.
    newer = plan(("203.0.113.0/24",), "nft")
    host.fail[line(newer.local_steps()[0])] = "Error: Could not process rule"
    host.calls.clear()
    assert runner.reapply_local(new, newer) is False
    assert host.calls == [line(newer.local_steps()[0])]
    assert on_disk(instance) == after
    host.calls.clear()
    runner.undo()
    assert host.calls.count(f"nft delete table inet {KS}") == 1
    instance.release()


# -- the client ---------------------------------------------------------------------------------


class FakeRunner:
    def __init__(self, ok: bool = True) -> None:
        self.swaps: list[tuple[Plan, Plan]] = []
        self.ok = ok

    def reapply_local(self, old: Plan, new: Plan) -> bool:
        self.swaps.append((old, new))
        return self.ok


@pytest.fixture
def follower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[tunnel.Tunnel, list[tuple[str, ...]], list[Any]]:
    key = tmp_path / "k"
    key.write_bytes(bytes(32))
    key.chmod(0o600)
    cfg = dataclasses.replace(client(OLD_LAN), key_file=str(key))
    t = tunnel.Tunnel(cfg, LINUX)
    t.plan, t.net = LINUX.plan(t.cfg, "tun0", NET), NET
    t.runner = FakeRunner()  # type: ignore[assignment]
    answers: list[tuple[str, ...]] = []
    asked: list[Any] = []

    def local_networks(ni: Any = None, skip: Any = ()) -> tuple[str, ...]:
        asked.append(tuple(skip))
        return answers[-1]

    monkeypatch.setattr(tunnel, "local_networks", local_networks)
    return t, answers, asked


def test_client_follows_new_subnets(
    follower: tuple[tunnel.Tunnel, list[tuple[str, ...]], list[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    t, answers, asked = follower
    runner: FakeRunner = t.runner  # type: ignore[assignment]
    answers.append(OLD_LAN)
    t._follow_local_nets("tun0", now=True)
    assert runner.swaps == [] and asked == [("tun0",)]  # the tun's own addresses never count
    answers.append(NEW_LAN)
    t._follow_local_nets("tun0")  # looked at a moment ago: not again yet
    assert runner.swaps == []
    caplog.set_level(logging.INFO, logger="dsvpn")
    t._follow_local_nets("tun0", now=True)
    ((old, new),) = runner.swaps
    assert old.local_steps()[0].apply[-3] == "192.0.2.0/24"
    assert new.local_steps()[0].apply[-3] == "198.51.100.0/24"
    assert t.plan is new
    assert isinstance(t.cfg, ClientConfig) and t.cfg.network.local_nets == NEW_LAN
    assert caplog.records[-1].getMessage() == (
        "local subnets changed: 192.0.2.0/24, 2001:db8:1::/64 -> 198.51.100.0/24, "
        "2001:db8:1::/64; the kill switch follows"
    )


def test_client_keeps_the_old_subnets_when_the_swap_fails(
    follower: tuple[tunnel.Tunnel, list[tuple[str, ...]], list[Any]],
) -> None:
    t, answers, _ = follower
    t.runner = FakeRunner(ok=False)  # type: ignore[assignment]
    first = t.plan
    answers.append(NEW_LAN)
    t._follow_local_nets("tun0", now=True)
    assert t.plan is first
    assert isinstance(t.cfg, ClientConfig) and t.cfg.network.local_nets == OLD_LAN
    t._follow_local_nets("tun0")  # not every 2 s: its warning would flood the log
    assert len(t.runner.swaps) == 1  # type: ignore[attr-defined]
    t._follow_local_nets("tun0", now=True)  # the next attempt tries again
    assert len(t.runner.swaps) == 2  # type: ignore[attr-defined]


def test_client_without_kill_switch_never_looks(
    follower: tuple[tunnel.Tunnel, list[tuple[str, ...]], list[Any]],
) -> None:
    t, answers, asked = follower
    assert isinstance(t.cfg, ClientConfig)
    t.cfg = dataclasses.replace(t.cfg, network=ClientNetwork())
    answers.append(NEW_LAN)
    t._follow_local_nets("tun0", now=True)
    assert asked == []


class FakeNetifaces:
    AF_INET, AF_INET6 = 2, 10

    def interfaces(self) -> list[str]:
        return ["lo", "eth0", "tun0"]

    def ifaddresses(self, name: str) -> dict[int, list[dict[str, str]]]:
        return {
            "lo": {2: [{"addr": "127.0.0.1", "netmask": "255.0.0.0"}]},
            "eth0": {2: [{"addr": "192.0.2.7", "netmask": "255.255.255.0"}]},
            "tun0": {10: [{"addr": "64:ff9b::c0a8:c001", "netmask": "ffff:ffff::/96"}]},
        }[name]


def test_local_networks_skips_the_tun() -> None:
    ni = FakeNetifaces()
    assert _common.local_networks(ni) == ("192.0.2.0/24", "64:ff9b::/96")
    assert _common.local_networks(ni, skip=("tun0",)) == ("192.0.2.0/24",)
