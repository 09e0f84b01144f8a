"""Our dsvpn against the C DSVPN named by DSVPN_REFERENCE, in both roles."""

from __future__ import annotations

import signal

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.interop]


@pytest.mark.parametrize("roles", ["ours-client/c-server", "c-client/ours-server"])
def test_interop(tb, impl, reference_impl, key, roles):
    if impl.reference:
        pytest.skip("DSVPN_E2E_IMPL already selects the reference for both roles")
    server_impl, client_impl = (
        (reference_impl, impl) if roles.endswith("c-server") else (impl, reference_impl)
    )
    server, client = tb.tunnel_up(server_impl, key, client_impl=client_impl)
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))
    stats = tb.client.ping(tb.inet.ip, count=10, interval=0.1, size=1400)
    assert stats["received"] >= 9, stats
    result = tb.transfer(tb.client, tb.inet, tb.inet.ip, 10_000_000)
    assert result["received"]["sha256"] == result["sent"]["sha256"] == result["sent"]["echo"]
    assert result["received"]["peer"] == tb.server_ext_ip
    # And back: the server host sends to the client's tun address (server -> client frames).
    back = tb.transfer(tb.server, tb.client, "192.168.192.1", 10_000_000, port=5202)
    assert back["received"]["sha256"] == back["sent"]["sha256"]
    assert client.stop(signal.SIGTERM) == 0
    assert server.stop(signal.SIGTERM) == 0
