"""Session handling: reconnects, a second client, wrong key, server restart."""

from __future__ import annotations

import signal

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

# What a client may print when the server turns it away (wrong key or busy server).
REFUSED_CLIENT = r"key|authenticat|busy|refus|already|reject|denied|handshake"


@pytest.mark.parametrize("how", ["cleanup", "automatic"])
def test_same_ip_reconnect_after_sigkill(tb, impl, key, how):
    server, client = tb.tunnel_up(impl, key)
    client.kill()
    if how == "cleanup":
        if impl.reference:
            pytest.skip("the C reference has no cleanup command")
        proc = tb.run_in(tb.client, impl.cleanup_argv(), check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
    again = tb.start_client(impl, key, name="client-again")
    tb.client.wait_ping("192.168.192.254", 30, procs=(server, again))
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, again))
    if not impl.reference:
        # Stale rules of the killed instance were replaced, not duplicated.
        rules = tb.client.run(["ip", "rule"]).stdout
        assert rules.count("lookup 42069") == 1, rules
        assert testbed.count_rules(tb.client, r"-j DROP") == 1


def test_other_ip_client_refused(tb2, impl):
    tb = tb2
    key = tb.write_key()
    first, second = tb.clients
    server, client = tb.tunnel_up(impl, key, ns=first)
    intruder = tb.start_client(impl, key, ns=second, name="client2")
    # The server names the refusal; the second client never gets a session.
    tb.wait_log(server, r"already|busy|refus|reject", 20)
    assert not second.ping_ok("192.168.192.254", wait=2)
    # Meanwhile the first client keeps working without interruption.
    stats = first.ping(tb.inet.ip, count=25, interval=0.2, wait=1.0)
    assert stats["received"] >= 24, stats
    assert server.alive() and client.alive()
    assert not second.ping_ok("192.168.192.254", wait=2)
    intruder.stop()


def test_wrong_key(tb, impl, key):
    server = tb.start_server(impl, key)
    before = {ns.role: testbed.snapshot(ns) for ns in (tb.inet,)}
    wrong = tb.write_key("wrong")
    client = tb.start_client(impl, wrong)
    tb.wait_log(server, r"authenticat", 20)
    tb.wait_log(client, REFUSED_CLIENT, 20)
    assert not tb.client.ping_ok("192.168.192.254", wait=2)
    assert server.alive()
    # The server still serves a client with the right key once the wrong one is gone.
    client.stop()
    good = tb.start_client(impl, key, name="client-good")
    tb.client.wait_ping("192.168.192.254", 30, procs=(server, good))
    assert testbed.diff_snapshots(before["inet"], testbed.snapshot(tb.inet)) == ""


def test_server_restart_client_reconnects(tb, impl, key):
    server, client = tb.tunnel_up(impl, key)
    assert server.stop(signal.SIGTERM) == 0
    assert not tb.client.ping_ok(tb.inet.ip)
    server2 = tb.start_server(impl, key, name="server-again")
    # The client notices and reconnects by itself (the reference backs off up to 3 s).
    tb.client.wait_ping("192.168.192.254", 40, procs=(server2, client))
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server2, client))
