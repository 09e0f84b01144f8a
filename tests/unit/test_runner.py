"""The runner through a fake host: order, [#] lines, rollback, undo, records kept one step
ahead, sysctl restore syntax, and following a gateway change without losing the tunnel."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from host_rig import DIALECT, FWD, A, B, C, D, FakeHost, route

from dsvpn import instances
from dsvpn.errors import CommandError, DsvpnError, PrerequisiteError
from dsvpn.instances import Identity, Instance
from dsvpn.plan import Plan, Step
from dsvpn.platform import by_name
from dsvpn.runner import Runner


def ident(tun: str = "tun0") -> Identity:
    return Identity("server", tun, 443, "192.168.192.254", "192.168.192.1")


def recorded(tmp_path: Path, host: FakeHost) -> tuple[Runner, Instance, list[str]]:
    """A runner writing through this process's record in a fresh run directory."""
    log: list[str] = []
    instance = instances.claim(ident(), DIALECT, log.append, run_dir=tmp_path / "run", run=host)
    return Runner(DIALECT, log.append, run=host, record=instance), instance, log


def on_disk(instance: Instance) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (instance.run_dir.path / f"{instance.pid}.json").read_text()
    )
    return data


def test_apply_order_logging_and_undo(tmp_path: Path) -> None:
    host = FakeHost()
    runner, instance, log = recorded(tmp_path, host)
    runner.apply(Plan([FWD, A, B, C]))
    assert host.calls == ["sysctl net.ipv4.ip_forward=1", "cmd a", "cmd b", "cmd c"]
    assert log == [
        "[#] sysctl -n net.ipv4.ip_forward",
        "[#] sysctl net.ipv4.ip_forward=1",
        "[#] cmd a",
        "[#] cmd b",
        "[#] cmd c",
    ]
    host.calls.clear()
    log.clear()
    runner.undo()
    assert host.calls == ["uncmd c", "uncmd a", "sysctl net.ipv4.ip_forward=0"]
    assert log == ["[#] uncmd c", "[#] uncmd a", "[#] sysctl net.ipv4.ip_forward=0"]
    assert host.sysctls["net.ipv4.ip_forward"] == "0"
    assert on_disk(instance)["steps"] == []
    instance.release()
    assert not (tmp_path / "run" / f"{os.getpid()}.json").exists()
    runner.undo()  # idempotent
    assert len(host.calls) == 3


def test_release_keeps_a_record_that_still_holds_steps(tmp_path: Path) -> None:
    runner, instance, _ = recorded(tmp_path, FakeHost())
    runner.apply(Plan([A]))
    instance.release()  # as if the undo had been cut short
    assert (tmp_path / "run" / f"{os.getpid()}.json").exists()
    runner.undo()
    instance.release()
    assert not (tmp_path / "run" / f"{os.getpid()}.json").exists()


def test_sysctl_already_set_is_not_restored() -> None:
    host = FakeHost({"net.ipv4.ip_forward": "1"})
    runner = Runner(DIALECT, lambda _: None, run=host)
    runner.apply(Plan([FWD]))
    host.calls.clear()
    runner.undo()
    assert host.calls == []


def test_sysctl_restore_is_built_by_the_backend() -> None:
    host = FakeHost({"net.inet.ip.forwarding": "0"})
    step = Step(("sysctl", "-w", "net.inet.ip.forwarding=1"), None, ("net.inet.ip.forwarding", "1"))
    runner = Runner(by_name("openbsd"), lambda _: None, run=host)
    runner.apply(Plan([step]))
    runner.undo()
    assert host.calls[-1] == "sysctl -w net.inet.ip.forwarding=0"


def test_unexpected_sysctl_value_is_refused() -> None:
    host = FakeHost({"net.ipv4.ip_forward": "0; reboot"})
    with pytest.raises(CommandError, match="unexpected value"):
        Runner(DIALECT, lambda _: None, run=host).apply(Plan([FWD, A]))
    assert host.calls == []


def test_failure_rolls_back_in_reverse(tmp_path: Path) -> None:
    host = FakeHost()
    host.fail["cmd c"] = "iptables: No chain/target/match by that name."
    runner, instance, log = recorded(tmp_path, host)
    with pytest.raises(CommandError) as err:
        runner.apply(Plan([FWD, A, B, C, D]))
    assert str(err.value) == "`cmd c` failed: iptables: No chain/target/match by that name."
    assert host.calls[-2:] == ["uncmd a", "sysctl net.ipv4.ip_forward=0"]
    assert "cmd d" not in host.calls
    assert log[-2:] == ["[#] uncmd a", "[#] sysctl net.ipv4.ip_forward=0"]
    assert on_disk(instance)["steps"] == []
    assert runner.applied == []


def test_failure_without_stderr_names_exit_status() -> None:
    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 3, "", "")

    with pytest.raises(CommandError, match=r"^`cmd a` failed: exit status 3$"):
        Runner(DIALECT, lambda _: None, run=run).apply(Plan([A]))


def test_missing_tool_names_package() -> None:
    host = FakeHost()
    host.missing.add("iptables")
    step = Step(("iptables", "-t", "raw", "-I", "X"), ("iptables", "-t", "raw", "-D", "X"))
    with pytest.raises(PrerequisiteError, match=r"`iptables` not found \(install iptables\)"):
        Runner(DIALECT, lambda _: None, run=host).apply(Plan([A, step]))
    assert host.calls == ["cmd a", "uncmd a"]


def test_command_logs_and_raises() -> None:
    host = FakeHost()
    host.fail["ip link set dev tun0 mtu 9000"] = "RTNETLINK answers: Invalid argument"
    log: list[str] = []
    with pytest.raises(CommandError, match="Invalid argument"):
        Runner(DIALECT, log.append, run=host).command(
            ("ip", "link", "set", "dev", "tun0", "mtu", "9000")
        )
    assert log == ["[#] ip link set dev tun0 mtu 9000"]


def test_undo_failures_are_logged_and_skipped() -> None:
    host = FakeHost()
    log: list[str] = []
    runner = Runner(DIALECT, log.append, run=host)
    runner.apply(Plan([A, C]))
    host.fail["uncmd c"] = "gone"
    runner.undo()
    assert host.calls[-2:] == ["uncmd c", "uncmd a"]
    assert "warning: `uncmd c` failed: gone" in log
    assert runner.applied == []


def test_best_effort_step_is_skipped() -> None:
    host = FakeHost({})  # no such sysctl key
    bbr = Step(("sysctl", "k=bbr"), None, sysctl=("k", "bbr"), best_effort=True)
    log: list[str] = []
    runner = Runner(DIALECT, log.append, run=host)
    runner.apply(Plan([bbr, A]))
    assert host.calls == ["cmd a"]
    assert log[1].startswith("warning: `sysctl -n k` failed")
    assert [a.step for a in runner.applied] == [A]


def test_record_written_before_each_apply(tmp_path: Path) -> None:
    host = FakeHost()
    runner, instance, _ = recorded(tmp_path, host)
    seen: list[list[str]] = []

    def inspect(argv: list[str]) -> None:
        if argv[:2] == ["sysctl", "-n"]:
            return
        steps = on_disk(instance)["steps"]
        assert isinstance(steps, list) and steps[-1]["apply"] == argv
        seen.append(argv)

    host.on_call = inspect
    runner.apply(Plan([FWD, A, C]))
    assert len(seen) == 3
    data = on_disk(instance)
    assert data["pid"] == os.getpid()
    assert data["identity"]["tun"] == "tun0"  # type: ignore[index]
    step = data["steps"][0]  # type: ignore[index]
    assert step["previous"] == "0" and step["sysctl"] == ["net.ipv4.ip_forward", "1"]


def test_interrupted_command_stays_recorded(tmp_path: Path) -> None:
    host = FakeHost()
    runner, instance, _ = recorded(tmp_path, host)

    def interrupt(argv: list[str]) -> None:
        if argv == ["cmd", "c"]:
            raise KeyboardInterrupt

    host.on_call = interrupt
    with pytest.raises(KeyboardInterrupt):
        runner.apply(Plan([A, C]))
    # It may have taken effect: the undo that follows tries it too.
    assert [a.step for a in runner.applied] == [A, C]
    assert len(on_disk(instance)["steps"]) == 2  # type: ignore[arg-type]
    host.on_call = None
    runner.undo()
    assert host.calls[-2:] == ["uncmd c", "uncmd a"]


# -- following the gateway ---------------------------------------------------------------------


def test_reapply_gateway(tmp_path: Path) -> None:
    host = FakeHost()
    runner, instance, _ = recorded(tmp_path, host)
    old, new = Plan([A, route("gw1"), C]), Plan([A, route("gw2"), C])
    runner.apply(old)
    host.calls.clear()
    assert runner.reapply_gateway(old, old)
    assert host.calls == []
    assert runner.reapply_gateway(old, new)
    assert host.calls == ["route delete s", "route add s gw2"]
    recorded_steps = [s["apply"] for s in on_disk(instance)["steps"]]  # type: ignore[attr-defined]
    assert recorded_steps == [["cmd", "a"], ["cmd", "c"], ["route", "add", "s", "gw2"]]
    host.calls.clear()
    runner.undo()
    assert host.calls == ["route delete s", "uncmd c", "uncmd a"]


def test_failed_route_add_puts_the_old_route_back_and_keeps_going(tmp_path: Path) -> None:
    host = FakeHost()
    runner, instance, log = recorded(tmp_path, host)
    old, new = Plan([A, route("gw1")]), Plan([A, route("gw2")])
    runner.apply(old)
    host.calls.clear()
    host.fail["route add s gw2"] = "route: writing to routing socket: Network is unreachable"
    assert runner.reapply_gateway(old, new) is False  # no exception: the tunnel stays
    assert host.calls == ["route delete s", "route add s gw2", "route add s gw1"]
    assert any("keeping the routes of the previous gateway" in line for line in log)
    assert [a.step for a in runner.applied] == [A, route("gw1")]
    assert [s["apply"][3] for s in on_disk(instance)["steps"][1:]] == ["gw1"]  # type: ignore[index]
    # The next attempt, with the network ready, moves the route.
    del host.fail["route add s gw2"]
    host.calls.clear()
    assert runner.reapply_gateway(old, new)
    assert host.calls == ["route delete s", "route add s gw2"]
    assert [a.step for a in runner.applied] == [A, route("gw2")]


def test_gateway_swap_survives_losing_both_routes() -> None:
    host = FakeHost()
    log: list[str] = []
    runner = Runner(DIALECT, log.append, run=host)
    old, new = Plan([route("gw1")]), Plan([route("gw2")])
    runner.apply(old)
    host.fail["route add s gw2"] = "unreachable"
    host.fail["route add s gw1"] = "unreachable"
    assert runner.reapply_gateway(old, new) is False
    assert runner.applied == []
    # Nothing of the old route is left to undo; the retry just adds the new one.
    host.fail.clear()
    host.calls.clear()
    assert runner.reapply_gateway(old, new)
    assert host.calls == ["route add s gw2"]


class BrokenRecord:
    """A record that can no longer be written (say, /run/dsvpn was made unsafe meanwhile)."""

    def save(self, applied: list[object]) -> None:
        raise DsvpnError("refusing to use /run/dsvpn: group or others may write to it")

    def adopt(self, applied: list[object]) -> None:
        self.save(applied)

    def hand_over(self, *args: object) -> int | None:
        self.save([])
        return None


def test_undo_goes_on_when_the_record_cannot_be_written() -> None:
    host = FakeHost()
    log: list[str] = []
    runner = Runner(DIALECT, log.append, run=host)
    runner.apply(Plan([FWD, A, C]))
    runner._record = BrokenRecord()  # type: ignore[assignment]
    host.calls.clear()
    runner.undo()
    # Every rule is removed; the sysctl stays, since no one could ask the other instances.
    assert host.calls == ["uncmd c", "uncmd a"]
    assert runner.applied == []
    assert any("net.ipv4.ip_forward stays 1" in line for line in log)
