"""The client's network: fail closed after kill -9, --kill-switch, --route/--exclude/--no-routes
and --dns, each in its own namespace testbed (issue 11).

Besides the far host (reachable only through the tunnel), these tests give the server host an
"outside" address on its loopback (10.X.3.1): the client reaches it through its default route,
with or without the tunnel, so it shows whether traffic that would leave outside the tunnel
does. The server's IPv6 address on its far side plays the same part for IPv6.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

PROBE_PORT = 7000
# What a program sees when it hits an `unreachable` route, or the kill switch's REJECT.
NO_ROUTE = errno.errorcode[errno.EHOSTUNREACH]
REJECTED = errno.errorcode[errno.ENETUNREACH]
DNS_NAME = "probe.dsvpn.test"
DNS_ANSWER = "198.51.100.7"

# Accepts TCP connections forever and closes each at once.
ACCEPTOR = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""

# One TCP connect (optionally bound to a device, as an application pinning its traffic to the
# LAN interface would be); prints {"errno": null} on success or the errno name.
CONNECT = r"""
import errno, json, socket, sys
host, port, dev = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.settimeout(5)
if dev != "-":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
try:
    s.connect((host, port)); print(json.dumps({"errno": None}))
except OSError as e:
    print(json.dumps({"errno": errno.errorcode.get(e.errno, str(e))}))
"""

# A tiny DNS server: answers every A question for DNS_NAME with DNS_ANSWER, NXDOMAIN otherwise.
DNS_SERVER = r"""
import socket, struct, sys
addr, name, answer = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, 53))
print("listening", flush=True)
while True:
    q, peer = s.recvfrom(512)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode()); i += 1 + q[i]
    question = q[12:i + 5]
    hit = ".".join(labels).lower() == name
    head = struct.pack("!HHHHHH", struct.unpack("!H", q[:2])[0], 0x8180 if hit else 0x8183,
                       1, 1 if hit else 0, 0, 0)
    rr = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(answer) if hit else b""
    s.sendto(head + question + rr, peer)
    print("answered", ".".join(labels), flush=True)
"""

# Ask the first nameserver of /etc/resolv.conf (as this namespace sees it) for an A record.
DNS_QUERY = r"""
import json, random, socket, struct, sys
name = sys.argv[1]
servers = [l.split()[1] for l in open("/etc/resolv.conf") if l.split()[:1] == ["nameserver"]]
qid = random.randrange(65536)
q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
q += struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
try:
    s.sendto(q, (servers[0], 53)); r = s.recv(512)
    ok = r[:2] == q[:2] and r[3] & 15 == 0 and struct.unpack("!H", r[6:8])[0] == 1
    print(json.dumps({"server": servers[0], "answer": socket.inet_ntoa(r[-4:]) if ok else None}))
except OSError as e:
    print(json.dumps({"server": servers[0], "answer": None, "error": str(e)}))
"""


def _skip_reference(impl: testbed.Impl) -> None:
    if impl.reference:
        pytest.skip("an extension of ours: the C reference has none of these options")


def _outside(tb: testbed.Testbed) -> str:
    """Give the server host an address that is not on the client's LAN (see module doc)."""
    ip = f"10.{tb.octet}.3.1"
    tb.server.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])
    return ip


def _up(
    tb: testbed.Testbed, impl: testbed.Impl, key, *options: str, server=None, name="client"
) -> tuple[testbed.Proc, testbed.Proc]:
    """A server (unless given) and a client with options; returns once the client's whole plan
    is applied (it says "session up" only then) and the tunnel pings."""
    server = server or tb.start_server(impl, key)
    client = tb.start_client(impl, key, name=name, extra=("-v", *options))
    tb.wait_log(client, testbed.SESSION_UP, 30)
    tb.client.wait_ping(
        testbed.SERVER_TUN_IP, 30, procs=(server, client), what="ping through the tunnel"
    )
    return server, client


def _connect(tb: testbed.Testbed, host: str, dev: str = "-") -> str | None:
    out = tb.client.run([sys.executable, "-c", CONNECT, host, str(PROBE_PORT), dev], timeout=30)
    return json.loads(out.stdout)["errno"]


def _route_get(tb: testbed.Testbed, dest: str) -> str:
    """`ip route get` in the client namespace: the route, or the error ("unreachable")."""
    ip = ["ip", "-6"] if ":" in dest else ["ip"]
    proc = tb.client.run([*ip, "route", "get", dest], check=False)
    return (proc.stdout + proc.stderr).strip()


def _no_route(tb: testbed.Testbed, dest: str) -> bool:
    """The client's kernel finds no way out for dest (an `unreachable` route)."""
    return any(why.lower() in _route_get(tb, dest).lower() for why in testbed.UNREACHABLE)


def _cleanup(tb: testbed.Testbed, impl: testbed.Impl, *args: str) -> str:
    proc = tb.run_in(tb.client, [*impl.cleanup_argv(), *args], check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def _rule_lines(tb: testbed.Testbed, tool: str, pattern: str) -> list[str]:
    out = tb.client.run([f"{tool}-save"]).stdout
    return [ln for ln in out.splitlines() if ln.startswith("-A") and pattern in ln]


def test_kill9_fails_closed_until_cleanup_and_restart(tb, impl, key):
    _skip_reference(impl)
    outside, outside6 = _outside(tb), tb.server_ext_ip6
    tb.start_script(tb.server, ACCEPTOR, [PROBE_PORT], "acceptor")
    tb.client.wait_ping(outside, 10, what="the outside host without the VPN")
    tb.client.wait_ping(outside6, 10, what="the outside IPv6 host without the VPN")
    before = tb.snapshots()

    server, client = _up(tb, impl, key)
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))
    # Mid-transfer: a large send to the far host is running when the client dies.
    rx = tb.start_script(tb.inet, testbed.RECEIVER, [5201], "receiver")
    tb.wait_log(rx, "listening")
    tx = tb.start_script(tb.client, testbed.SENDER, [tb.inet.ip, 5201, 10**10], "sender")
    tun = tb.server.tun_links()[0]
    testbed.wait_until(
        lambda: tb.server.link_stats(tun)["rx_bytes"] > 5_000_000, 30, "transfer under way"
    )
    client.kill()

    # Fail closed: what the tunnel carried is unreachable, it does not leave around it.
    assert not tb.client.reaches(tb.inet.ip)
    assert not tb.client.reaches(outside)
    assert not tb.client.reaches(outside6)
    assert _no_route(tb, outside)
    assert _no_route(tb, outside6)
    assert _connect(tb, outside) == NO_ROUTE
    # The LAN still works (and so reconnecting does).
    assert tb.client.ping_ok(tb.server.ip)
    tx.kill()
    rx.kill()

    # A restart replaces the dead client's routes and the tunnel comes back.
    client = tb.start_client(impl, key, name="client-again")
    tb.wait_log(client, testbed.SESSION_UP, 30)
    tb.client.wait_ping(tb.inet.ip, 30, procs=(server, client))
    routes = tb.client.run(["ip", "route", "show", "table", "42069"]).stdout
    assert routes.count("unreachable default") == 1, routes
    assert tb.client.run(["ip", "rule"]).stdout.count("lookup 42069") == 1

    # After `dsvpn cleanup` the network is back as it was.
    client.kill()
    assert not tb.client.reaches(outside)
    _cleanup(tb, impl)
    tb.client.wait_ping(outside, 10, what="the outside host after cleanup")
    assert _connect(tb, outside) is None
    assert server.stop() == 0
    assert not tb.changes(before)


def test_route_fails_closed_only_for_what_it_carries(tb, impl, key):
    _skip_reference(impl)
    outside = _outside(tb)
    before = tb.snapshots()
    far_net = f"{tb.wan}.0/24"
    server, client = _up(tb, impl, key, "--route", far_net)
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))
    tun = tb.client.tun_links()[0]
    assert f"dev {tun} table 42069" in _route_get(tb, tb.inet.ip)
    assert "dev eth0" in _route_get(tb, outside)
    tb.client.wait_ping(outside, 10)

    client.kill()
    assert not tb.client.reaches(tb.inet.ip)
    assert _no_route(tb, tb.inet.ip)
    # Everything else keeps its normal path.
    assert tb.client.ping_ok(outside)
    assert tb.client.ping_ok(tb.server_ext_ip6)
    _cleanup(tb, impl)
    assert server.stop() == 0
    assert not tb.changes(before)


def test_exclude_and_no_routes(tb, impl, key):
    _skip_reference(impl)
    outside = _outside(tb)
    before = tb.snapshots()
    server, client = _up(tb, impl, key, "--exclude", f"10.{tb.octet}.3.0/24")
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))
    tun = tb.client.tun_links()[0]
    assert f"dev {tun} table 42069" in _route_get(tb, tb.inet.ip)
    assert "dev eth0" in _route_get(tb, outside)
    tb.client.wait_ping(outside, 10)
    assert client.stop() == 0

    # --no-routes: the tunnel is up and carries nothing; no policy rules at all.
    _, client = _up(tb, impl, key, "--no-routes", server=server, name="client-no-routes")
    assert "42069" not in tb.client.run(["ip", "rule"]).stdout
    assert "dev eth0" in _route_get(tb, tb.inet.ip)
    assert not tb.client.ping_ok(tb.inet.ip)  # the far host answers only through the tunnel
    assert client.stop() == 0
    assert server.stop() == 0
    assert not tb.changes(before)


def _kill_switches(tb: testbed.Testbed, firewall: str) -> int:
    """How many kill switches are in place in the client namespace (hooks or tables)."""
    if firewall == "nft":
        return testbed.nft_tables(tb.client).count("table inet dsvpn-kill-switch")
    hooks = [_rule_lines(tb, tool, "-A OUTPUT -j dsvpn-kill-switch") for tool in TOOLS]
    assert len(hooks[0]) == len(hooks[1]), hooks  # IPv4 and IPv6 alike
    return len(hooks[0])


TOOLS = ("iptables", "ip6tables")


@pytest.mark.parametrize("firewall", ["iptables", "nft"])
def test_kill_switch(tb, impl, key, firewall):
    _skip_reference(impl)
    outside = _outside(tb)
    tb.start_script(tb.server, ACCEPTOR, [PROBE_PORT], "acceptor")
    testbed.wait_until(lambda: _connect(tb, outside, "eth0") is None, 10, "the acceptor")
    before = tb.snapshots()
    options = ("--kill-switch", "--firewall", firewall)

    server, client = _up(tb, impl, key, *options)
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))
    # An application pinned to the LAN interface would go around the tunnel: blocked.
    assert _connect(tb, outside, "eth0") == REJECTED
    assert tb.client.ping_ok(tb.server.ip)  # the LAN is excepted
    assert _kill_switches(tb, firewall) == 1

    # A crash, then the crash handler's plain cleanup: the kill switch stays, the rest goes.
    client.kill()
    said = _cleanup(tb, impl)
    assert "kept the kill switch" in said, said
    assert "42069" not in tb.client.run(["ip", "rule"]).stdout
    assert _connect(tb, outside) == REJECTED
    assert _connect(tb, outside, "eth0") == REJECTED
    assert tb.client.ping_ok(tb.server.ip)
    assert "kept the kill switch" in _cleanup(tb, impl)  # and again
    assert _kill_switches(tb, firewall) == 1

    # The next start takes over: one kill switch, the tunnel works; a clean stop removes it.
    _, client = _up(tb, impl, key, *options, server=server, name="client-2")
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))
    assert _kill_switches(tb, firewall) == 1
    assert client.stop(signal.SIGTERM) == 0
    assert _kill_switches(tb, firewall) == 0
    assert _connect(tb, outside, "eth0") is None

    # Crash again: `dsvpn cleanup --all` removes the kill switch too.
    _, client = _up(tb, impl, key, *options, server=server, name="client-3")
    client.kill()
    _cleanup(tb, impl, "--all")
    assert _kill_switches(tb, firewall) == 0
    assert _connect(tb, outside, "eth0") is None
    said = _cleanup(tb, impl)  # /run/dsvpn is shared: other namespaces' records may be there
    assert re.fullmatch(r"(\S+ \S+ )?nothing to clean up", said.splitlines()[-1]), said
    assert "kill switch" not in said and "Traceback" not in said and "Logging error" not in said
    assert server.stop() == 0
    assert not tb.changes(before)


def test_dns_through_the_tunnel(tb, impl, key):
    _skip_reference(impl)
    host_resolv = os.stat("/etc/resolv.conf")
    conf = tb.client.resolv_conf
    original = conf.read_text()
    dns = tb.start_script(tb.inet, DNS_SERVER, [tb.inet.ip, DNS_NAME, DNS_ANSWER], "dns")
    tb.wait_log(dns, "listening")

    def lookup() -> dict:
        out = tb.client.run([sys.executable, "-c", DNS_QUERY, DNS_NAME], timeout=20).stdout
        return json.loads(out)

    before = tb.snapshots()
    server, client = _up(tb, impl, key, "--dns", tb.inet.ip)
    assert conf.read_text() != original
    assert f"nameserver {tb.inet.ip}" in conf.read_text().splitlines()
    # The resolver is reachable only through the tunnel: an answer proves the path.
    answer = lookup()
    assert answer == {"server": tb.inet.ip, "answer": DNS_ANSWER}, answer
    assert client.stop() == 0
    assert conf.read_text() == original

    # After kill -9 the file stays ours until cleanup (or the next start) puts it back.
    _, client = _up(tb, impl, key, "--dns", tb.inet.ip, server=server, name="client-2")
    client.kill()
    assert f"nameserver {tb.inet.ip}" in conf.read_text()
    _cleanup(tb, impl)
    assert conf.read_text() == original
    assert server.stop() == 0
    assert not tb.changes(before)
    after = os.stat("/etc/resolv.conf")
    assert (after.st_ino, after.st_mtime_ns) == (host_resolv.st_ino, host_resolv.st_mtime_ns)
