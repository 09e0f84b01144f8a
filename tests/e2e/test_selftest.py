"""`dsvpn selftest` end to end, and the testbed's rule: remove only what it created."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e


def _namespaces() -> set[str]:
    out = testbed.run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_selftest_passes_and_leaves_nothing() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsvpn", "selftest"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=testbed.python_env(),
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    for check in ("tunnel up", "ping the far host", "sha256 matches", "throughput",
                  "every rule removed", "removed the namespaces", "selftest passed"):  # fmt: skip
        assert check in out, out
    assert "FAIL" not in out
    # It named its namespaces after its own PID; none is left, nor its record of them.
    created = set(re.findall(rf"{testbed.NS_PREFIX}-{proc.pid}-[0-9a-f]+-\w+", out))
    assert len(created) == 3, out
    assert not created & _namespaces()
    assert not list(testbed.RECORD_DIR.glob(f"{proc.pid}-*.json"))


HOLDER = textwrap.dedent(
    """
    import sys, time
    from dsvpn import testbed
    record = testbed._record()
    for name in sys.argv[1:]:
        record.set(name, None)
        testbed.run(["ip", "netns", "add", name])
        record.set(name, testbed.netns_inode(name))
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_sweeper_removes_only_what_a_dead_testbed_recorded() -> None:
    # The names must carry the creator's PID, which is known once it runs: a shell execs
    # python, so the PID is the same.
    mine: list[str] = []
    procs = []
    try:
        for role in ("dead", "live"):
            p = subprocess.Popen(
                ["sh", "-c", f'exec "$0" -c "$1" dsvt-$$-beef-{role}a dsvt-$$-beef-{role}b',
                 sys.executable, HOLDER],
                stdout=subprocess.PIPE, text=True, env=testbed.python_env(),
            )  # fmt: skip
            procs.append(p)
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
            mine += [f"dsvt-{p.pid}-beef-{role}a", f"dsvt-{p.pid}-beef-{role}b"]
        dead, live = procs
        assert set(mine) <= _namespaces()

        # Looks like a dead testbed's by name, but no record names it: never touched.
        foreign = f"dsvt-{dead.pid}-cafe-foreign"
        testbed.run(["ip", "netns", "add", foreign])
        mine.append(foreign)
        # Recorded by the dead process, then deleted and made again by someone else.
        recreated = f"dsvt-{dead.pid}-beef-deadb"
        testbed.run(["ip", "netns", "del", recreated])
        testbed.run(["ip", "netns", "add", recreated])

        # A record of the live process's PID with another start time: a process that had
        # that PID before, now dead.
        reused = f"dsvt-{live.pid}-abcd-reused"
        testbed.run(["ip", "netns", "add", reused])
        mine.append(reused)
        old = testbed.RECORD_DIR / f"{live.pid}-1.json"
        old.write_text(json.dumps({"pid": live.pid, "start": "1", "namespaces": {reused: None}}))
        old.chmod(0o600)

        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        removed = testbed.remove_stale_namespaces()
        assert reused in removed and not old.exists()
        assert f"dsvt-{dead.pid}-beef-deada" in removed
        assert foreign not in removed and recreated not in removed
        assert [n for n in removed if n.startswith(f"dsvt-{live.pid}-")] == [reused]
        left = _namespaces()
        assert f"dsvt-{dead.pid}-beef-deada" not in left
        assert {foreign, recreated, f"dsvt-{live.pid}-beef-livea"} <= left
        assert not list(testbed.RECORD_DIR.glob(f"{dead.pid}-*.json"))  # done with
        assert (testbed.RECORD_DIR / f"{live.pid}-{testbed.start_stamp(live.pid)}.json").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        testbed.remove_stale_namespaces()
        for name in mine:
            if testbed.netns_inode(name) is not None:
                testbed.run(["ip", "netns", "del", name], check=False)
    assert not set(mine) & _namespaces()


def test_records_directory_must_be_private(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    shared = Path(tmp_path) / "records"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(testbed.TestbedError, match="private"):
        testbed.remove_stale_namespaces(shared)
