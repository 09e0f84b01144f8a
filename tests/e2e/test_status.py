"""`dsvpn status` in namespaces: each namespace sees its own instances, their sessions and
counters while traffic flows, answers fast under full load, and a dead instance is shown as
dead until `dsvpn cleanup`."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

IPERF_PORT = 5301
# Times the answers themselves (no interpreter start-up): every live instance of this
# namespace, asked once.
TIMED_QUERY = r"""
import json, time
from dsvpn import instances, status
known = [k for k in status.known_here() if k.alive]
t0 = time.monotonic()
for k in known:
    status.query(status.socket_path(instances.RUN_DIR, k.pid), k.pid)
print(json.dumps({"seconds": time.monotonic() - t0, "asked": len(known)}))
"""


@pytest.fixture
def ours(impl: testbed.Impl) -> testbed.Impl:
    if impl.reference:
        pytest.skip("the C reference has no status command")
    return impl


def status_json(tb: testbed.Testbed, ns: testbed.Netns, impl: testbed.Impl) -> dict[str, Any]:
    proc = tb.run_in(ns, [*impl.base, "status", "--json"], check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def only(data: dict[str, Any], pid: int) -> dict[str, Any]:
    """The one instance listed, which must be process `pid`."""
    pids = [i["pid"] for i in data["instances"]]
    assert pids == [pid], data
    inst: dict[str, Any] = data["instances"][0]
    return inst


def test_status_follows_a_session_under_load(tb, ours, key):
    server, client = tb.tunnel_up(ours, key)  # its client session up
    # Each namespace lists its own instance and nothing of the other's.
    srv = only(status_json(tb, tb.server, ours), server.pid)
    cli = only(status_json(tb, tb.client, ours), client.pid)
    assert (srv["mode"], srv["listen"], srv["tun"]) == ("server", "*:443", srv["tun"])
    assert srv["tun"] and srv["started"] <= time.time()
    assert (cli["mode"], cli["server"], cli["state"]) == (
        "client",
        f"{tb.server.ip}:443",
        "connected",
    )
    assert cli["sessions"][0]["endpoint"] == f"{tb.server.ip}:443"
    wait_session = testbed.wait_until(
        lambda: status_json(tb, tb.server, ours)["instances"][0]["sessions"],
        10,
        "the server's status to show the session",
    )
    assert wait_session[0]["endpoint"].startswith(f"{tb.client.ip}:")

    # Full load through the tunnel while the counters are read.
    iperf_srv = tb.start(tb.inet, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], "iperf-server")
    testbed.wait_until(
        lambda: tb.inet.run(["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout.strip(),
        10,
        "iperf3 listening",
    )
    load = tb.start(
        tb.client,
        ["iperf3", "-c", tb.inet.ip, "-p", str(IPERF_PORT), "-t", "25"],
        "iperf-client",
    )
    try:
        seen: dict[str, list[int]] = {"client tx": [], "server rx": []}

        def grown() -> bool:
            c = status_json(tb, tb.client, ours)["instances"][0]["sessions"][0]
            s = status_json(tb, tb.server, ours)["instances"][0]["sessions"][0]
            seen["client tx"].append(c["tx_bytes"])
            seen["server rx"].append(s["rx_bytes"])
            # three readings in a row that each grew, on both ends
            return all(len(v) >= 3 and v[-3] < v[-2] < v[-1] for v in seen.values())

        testbed.wait_until(grown, 20, "the byte counters to grow", procs=(load,))
        assert seen["client tx"][-1] > 10_000_000, seen

        # Under full load each instance answers at once (the figure is printed).
        for ns, who in ((tb.client, "client"), (tb.server, "server")):
            timed = tb.run_in(ns, [sys.executable, "-c", TIMED_QUERY], timeout=30)
            figure = json.loads(timed.stdout)
            print(f"status answer from the {who} under load: {figure['seconds'] * 1000:.1f} ms")
            assert figure["asked"] == 1 and figure["seconds"] < 1.0, figure
        t0 = time.monotonic()
        text = tb.run_in(tb.server, [*ours.base, "status"], timeout=30).stdout
        print(
            f"`dsvpn status` under load, interpreter start included: "
            f"{(time.monotonic() - t0) * 1000:.0f} ms"
        )
        assert f"server (pid {server.pid})" in text and "session:" in text
        assert "MiB" in text or "GiB" in text
        assert load.alive(), "the transfer ended before the status was read under load"
    finally:
        for p in (load, iperf_srv):
            if p.alive():
                p.kill()

    # Once the client stops, its namespace has no instance and the server no session.
    assert client.stop() == 0
    text = tb.run_in(tb.client, [*ours.base, "status"], timeout=30).stdout
    assert text == "no dsvpn running in this network namespace\n"
    assert status_json(tb, tb.client, ours) == {"instances": []}
    testbed.wait_until(
        lambda: only(status_json(tb, tb.server, ours), server.pid)["sessions"] == [],
        15,
        "the server's status to drop the session",
    )
    # The server logged the session's end with its reason, length and bytes.
    line = tb.wait_log(server, r"session down: client", 10)
    assert re.search(r"the client (closed|reset) the connection \(up \d+ seconds?, received", line)


def test_status_shows_a_dead_instance_until_cleanup(tb, ours, key):
    server, client = tb.tunnel_up(ours, key)  # its client session up
    client.kill()  # no chance to undo its rules
    text = tb.run_in(tb.client, [*ours.base, "status"], timeout=30).stdout
    assert f"client (pid {client.pid}): dead; its routes still hold back traffic" in text
    assert "run `dsvpn cleanup` as root" in text
    dead = only(status_json(tb, tb.client, ours), client.pid)
    assert dead["state"] == "dead" and dead["leftovers"] is True and dead["fail_closed"] is True
    # The server's namespace never shows the client's record.
    assert [i["pid"] for i in status_json(tb, tb.server, ours)["instances"]] == [server.pid]
    cleaned = tb.run_in(tb.client, ours.cleanup_argv(), check=False, timeout=60)
    assert cleaned.returncode == 0, cleaned.stderr
    assert status_json(tb, tb.client, ours) == {"instances": []}


def test_status_names_a_kill_switch_left_behind(tb, ours, key):
    tb.start_server(ours, key)
    client = tb.start_client(ours, key, extra=("-v", "--kill-switch"))
    tb.wait_log(client, testbed.SESSION_UP, 30)
    client.kill()
    # The crash handler's plain cleanup undoes everything but the kill switch.
    cleaned = tb.run_in(tb.client, ours.cleanup_argv(), check=False, timeout=60)
    assert cleaned.returncode == 0, cleaned.stderr
    text = tb.run_in(tb.client, [*ours.base, "status"], timeout=30).stdout
    assert (
        f"client (pid {client.pid}): dead; its kill switch still blocks traffic outside the "
        "tunnel: run `dsvpn cleanup --all` as root to remove it"
    ) in text
    dead = only(status_json(tb, tb.client, ours), client.pid)
    assert dead["kept"] is True and dead["state"] == "dead"
    cleaned = tb.run_in(tb.client, [*ours.cleanup_argv(), "--all"], check=False, timeout=60)
    assert cleaned.returncode == 0, cleaned.stderr
    assert status_json(tb, tb.client, ours) == {"instances": []}
