"""The forward-secret handshake end to end (docs/protocol.md, Extensions): dsvpn --pfs client to
dsvpn server, a reconnect with new ephemeral keys, and the C DSVPN cases (DSVPN_REFERENCE)."""

from __future__ import annotations

import re
import signal
import time

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

NOT_ACCEPTED = "the server did not accept the --pfs handshake: is it C DSVPN or an older dsvpn?"
CLIENT_KEY = re.compile(r"forward-secret handshake from (\S+) \(client key ([0-9a-f]{16})\.\.\.\)")


def client_keys(server: testbed.Proc) -> list[str]:
    """The prefixes of the clients' ephemeral keys, one per forward-secret handshake."""
    return [m.group(2) for m in CLIENT_KEY.finditer(server.log())]


def test_pfs_client_to_dsvpn_server_then_reconnect_with_new_keys(tb, impl, key):
    if impl.reference:
        pytest.skip("--pfs is dsvpn's extension")
    server = tb.start_server(impl, key)
    client = tb.start_client(impl, key, extra=("-v", "--pfs"))
    tb.client.wait_ping("192.168.192.254", 30, procs=(server, client))
    tb.wait_log(server, r"session up: client \S+ \(forward secret\)")
    tb.wait_log(client, r"session up with \S+ port \d+ \(forward secret\)")
    assert len(client_keys(server)) == 1
    stats = tb.client.ping(tb.inet.ip, count=10, interval=0.1, size=1400)
    assert stats["received"] >= 9, stats
    tb.check_transfer_through_vpn(tb.client, 5_000_000)

    # Cut the client's TCP connection, and keep its reset from the server, whose session thus
    # stays up as after a silent network failure: the same client process reconnects with a
    # fresh ephemeral key, and the new connection replaces the old session once its first frame
    # (the empty frame --pfs sends at once) authenticates.
    drop_rst = ["INPUT", "-p", "tcp", "--dport", "443", "--tcp-flags", "RST", "RST", "-j", "DROP"]
    tb.server.run(["iptables", "-I", *drop_rst])
    try:
        killed = tb.client.run(["ss", "-K", "-tn", "dport", "=", ":443"], check=False)
        assert killed.returncode == 0, killed.stderr
        tb.wait_log(client, r"session down")
        testbed.wait_until(
            lambda: len(client_keys(server)) == 2, 30, "a second forward-secret handshake"
        )
        tb.wait_log(server, r"new connection from \S+: it replaces the active session")
        testbed.wait_until(
            lambda: server.log().count("session up: client") == 2, 15, "the session replaced"
        )
        tb.client.wait_ping("192.168.192.254", 30, procs=(server, client))
    finally:
        tb.server.run(["iptables", "-D", *drop_rst])
    keys = client_keys(server)
    assert keys[0] != keys[1], keys
    assert client.alive() and server.alive()
    assert len(re.findall(r"session up with .*\(forward secret\)", client.log())) == 2
    tb.check_transfer_through_vpn(tb.client, 2_000_000)
    assert client.stop(signal.SIGTERM) == 0
    assert server.stop(signal.SIGTERM) == 0


def test_require_pfs_server_refuses_a_classic_client_and_takes_a_pfs_one(tb, impl, key):
    if impl.reference:
        pytest.skip("--require-pfs is dsvpn's extension")
    server = tb.start_server(impl, key, extra=("-v", "--require-pfs"))
    classic = tb.start_client(impl, key, name="client-classic")
    tb.wait_log(server, r"classic handshake from \S+ refused \(--require-pfs\)", 20)
    assert not tb.client.ping_ok("192.168.192.254", wait=2)
    assert classic.stop(signal.SIGTERM) == 0
    client = tb.start_client(impl, key, name="client-pfs", extra=("-v", "--pfs"))
    tb.client.wait_ping("192.168.192.254", 30, procs=(server, client))
    assert client.stop(signal.SIGTERM) == 0
    assert server.stop(signal.SIGTERM) == 0


# --------------------------------------------------------------------- C DSVPN (interop)


@pytest.mark.interop
def test_pfs_client_against_the_c_server_fails_clearly_and_promptly(tb, impl, reference_impl, key):
    if impl.reference:
        pytest.skip("DSVPN_E2E_IMPL already selects the reference for both roles")
    before = testbed.snapshot(tb.client)
    server = tb.start_server(reference_impl, key)
    t0 = time.monotonic()
    client = tb.start_client(impl, key, extra=("-v", "--pfs"))
    rc = client.wait(15)
    elapsed = time.monotonic() - t0
    assert rc != 0
    assert elapsed < 15
    log = client.log()
    assert f"dsvpn: {NOT_ACCEPTED}" in log, log
    assert log.count(NOT_ACCEPTED) == 1
    assert "gave up" not in log
    # One attempt only, and everything the client set up is gone again.
    assert testbed.diff_snapshots(before, testbed.snapshot(tb.client)) == ""
    assert server.alive()
    # The C server is unharmed: a classic client still gets in.
    classic = tb.start_client(impl, key, name="client-classic")
    tb.client.wait_ping("192.168.192.254", 30, procs=(server, classic))
    assert classic.stop(signal.SIGTERM) == 0


@pytest.mark.interop
def test_c_client_against_a_require_pfs_server_is_refused(tb, impl, reference_impl, key):
    if impl.reference:
        pytest.skip("DSVPN_E2E_IMPL already selects the reference for both roles")
    server = tb.start_server(impl, key, extra=("-v", "--require-pfs"))
    client = tb.start_client(reference_impl, key)
    tb.wait_log(server, r"classic handshake from \S+ refused \(--require-pfs\)", 20)
    assert not tb.client.ping_ok("192.168.192.254", wait=2)
    assert server.alive()
    assert "session up" not in server.log()
    client.stop(signal.SIGTERM)
    assert server.stop(signal.SIGTERM) == 0
