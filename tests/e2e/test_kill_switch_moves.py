"""--kill-switch on a client host that moves to another LAN while the client runs: the kill
switch lets the new LAN through and no longer the old one, and a stop leaves the host as it
was (issue 11, the kill switch's local subnets).

The move: the client host's address 10.X.1.2/24 goes, 10.X.5.2/24 comes (the server host
answers on that LAN too, as 10.X.5.1, and becomes the default router); the old LAN 10.X.1.0/24
is now reached through that router, outside the tunnel: what the kill switch must block.
"""

from __future__ import annotations

import errno
import json
import re
import signal
import sys

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

REJECTED = errno.errorcode[errno.ENETUNREACH]  # the kill switch's REJECT, as connect() sees it

# One TCP connect; prints {"errno": null} on success or the errno name.
CONNECT = r"""
import errno, json, socket, sys
s = socket.socket(); s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print(json.dumps({"errno": None}))
except OSError as e:
    print(json.dumps({"errno": errno.errorcode.get(e.errno, str(e))}))
"""


def _connect(tb: testbed.Testbed, host: str, port: int) -> str | None:
    out = tb.client.run([sys.executable, "-c", CONNECT, host, str(port)], timeout=30)
    return json.loads(out.stdout)["errno"]


def _holes(tb: testbed.Testbed, firewall: str) -> set[str]:
    """The IPv4 subnets the client's kill switch lets through (link-local ranges aside)."""
    if firewall == "nft":
        out = tb.client.run(["nft", "list", "table", "inet", "dsvpn-kill-switch"]).stdout
        found = re.findall(r"ip daddr (\S+) accept", out)
    else:
        out = tb.client.run(["iptables", "-t", "filter", "-S", "dsvpn-kill-switch"]).stdout
        found = re.findall(r"-A dsvpn-kill-switch -d (\S+) -j RETURN", out)
    link = {"169.254.0.0/16", "224.0.0.0/24", "255.255.255.255/32", "255.255.255.255"}
    return {f for f in found if f not in link}


def _kill_switch_gone(tb: testbed.Testbed) -> bool:
    chains = [
        tb.client.run([tool, "-t", "filter", "-S"]).stdout for tool in ("iptables", "ip6tables")
    ]
    return not any("dsvpn-kill-switch" in c for c in chains) and not any(
        "dsvpn-kill-switch" in t for t in testbed.nft_tables(tb.client)
    )


@pytest.mark.parametrize("firewall", ["iptables", "nft"])
def test_kill_switch_follows_the_host_to_another_lan(tb, impl, key, firewall):
    if impl.reference:
        pytest.skip("an extension of ours: the C reference has no kill switch")
    x = tb.octet
    old_lan, new_lan = f"10.{x}.1.0/24", f"10.{x}.5.0/24"
    router, new_ip, old_ip = f"10.{x}.5.1", f"10.{x}.5.2", tb.client.ip
    before = tb.snapshots()

    server = tb.start_server(impl, key)
    client = tb.start_client(impl, key, extra=("-v", "--kill-switch", "--firewall", firewall))
    tb.wait_log(client, testbed.SESSION_UP, 30)
    procs = (server, client)
    tb.client.wait_ping(testbed.SERVER_TUN_IP, 30, procs=procs, what="ping through the tunnel")
    assert _holes(tb, firewall) == {old_lan}
    # The LAN is excepted: the server host's port (its dsvpn listener) answers outside the tunnel.
    assert _connect(tb, tb.server.ip, testbed.DEFAULT_PORT) is None

    # The move.
    tb.server.run(["ip", "addr", "add", f"{router}/24", "dev", "lan0"])
    tb.client.run(["ip", "addr", "add", f"{new_ip}/24", "dev", "eth0"])
    tb.client.run(["ip", "addr", "del", f"{old_ip}/24", "dev", "eth0"])
    tb.client.run(["ip", "route", "replace", "default", "via", router])
    tb.client.run(["ip", "route", "add", old_lan, "via", router])

    said = tb.wait_log(client, "local subnets changed", 15)
    assert f"-> {new_lan}" in said, said
    testbed.wait_until(lambda: _holes(tb, firewall) == {new_lan}, 10, "the new LAN's hole")
    testbed.wait_until(lambda: tb.client.reaches(router), 10, "the new LAN through the kill switch")
    # The old LAN is now reached outside the tunnel and is no local subnet: blocked.
    assert _connect(tb, tb.server.ip, testbed.DEFAULT_PORT) == REJECTED
    # Each change shown as it runs, after the line that announced it.
    after = client.log().split("local subnets changed", 1)[1]
    if firewall == "nft":
        assert "[#] nft 'add table inet dsvpn-kill-switch" in after
        assert "[#] nft delete table" not in after  # replaced in one transaction, no gap
    else:
        assert f"[#] iptables -t filter -D dsvpn-kill-switch -d {old_lan} -j RETURN" in after
        assert f"[#] iptables -t filter -I dsvpn-kill-switch -d {new_lan} -j RETURN" in after
    # The session of the old address is dead: once it is found so (here at once, as if the
    # peer had reset it), the client reconnects from the new LAN, its kill switch in place.
    # (the server, which takes one client at a time, would refuse it until then)
    tb.client.run(["ss", "-K", "dst", tb.server.ip, "dport", "=", str(testbed.DEFAULT_PORT)])
    for dst in (old_ip, f"[::ffff:{old_ip}]"):
        tb.server.run(["ss", "-K", "dst", dst, "sport", "=", str(testbed.DEFAULT_PORT)])
    tb.client.wait_ping(testbed.SERVER_TUN_IP, 30, procs=procs, what="the tunnel, reconnected")
    assert _holes(tb, firewall) == {new_lan}

    assert client.stop(signal.SIGTERM) == 0
    assert _kill_switch_gone(tb)
    if firewall == "iptables":  # the stop removed the new hole, and never touched the old one
        stop = client.log().rsplit("stopping", 1)[1]
        assert f"-D dsvpn-kill-switch -d {new_lan} -j RETURN" in stop
        assert old_lan not in stop
    assert "Traceback" not in client.log()

    # The host moves back; then everything is as before the client started.
    tb.client.run(["ip", "route", "del", old_lan, "via", router])
    tb.client.run(["ip", "addr", "add", f"{old_ip}/24", "dev", "eth0"])
    tb.client.run(["ip", "route", "replace", "default", "via", tb.server.ip])
    tb.client.run(["ip", "addr", "del", f"{new_ip}/24", "dev", "eth0"])
    tb.server.run(["ip", "addr", "del", f"{router}/24", "dev", "lan0"])
    assert server.stop() == 0
    assert not tb.changes(before)
