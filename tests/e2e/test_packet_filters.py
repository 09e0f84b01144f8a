"""--firewall iptables|nft|auto: the rules are in place while dsvpn runs, and none are left
after SIGTERM, nor after kill -9 and `dsvpn cleanup`."""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from dsvpn import testbed

pytestmark = pytest.mark.e2e

FIREWALLS = ["iptables", "nft"]


@pytest.fixture(autouse=True)
def _ours_with_nft(impl):
    if impl.reference:
        pytest.skip("the C reference has no --firewall")
    if shutil.which("nft") is None:
        pytest.skip("needs nft (nftables)")


def _iptables_rules(ns: testbed.Netns, tool: str) -> list[str]:
    out = ns.run([f"{tool}-save"]).stdout
    return [line for line in out.splitlines() if line.startswith("-A")]


def _rules(ns: testbed.Netns) -> dict[str, object]:
    """What dsvpn keeps in ns: its nft tables and their text, and the iptables rules."""
    tables = testbed.nft_tables(ns)
    return {
        "tables": tables,
        "nft": "\n".join(ns.run(["nft", "list", *t.split()]).stdout for t in tables),
        "iptables": _iptables_rules(ns, "iptables"),
        "ip6tables": _iptables_rules(ns, "ip6tables"),
    }


def _check_in_place(tb: testbed.Testbed, firewall: str) -> None:
    """One instance's rules in each namespace, with the tool asked for, and nothing more."""
    (stun,) = tb.server.tun_links()
    (ctun,) = tb.client.tun_links()
    server, client = _rules(tb.server), _rules(tb.client)
    if firewall == "nft":
        assert server["tables"] == [f"table inet dsvpn-{stun}"], server
        assert client["tables"] == [f"table inet dsvpn-{ctun}"], client
        text = str(server["nft"])
        for family, source in (("ip", "192.168.192.1"), ("ip6", "64:ff9b::c0a8:c001")):
            line = f'oifname "wan0" {family} saddr {source} masquerade'
            assert text.count(line) == 1, text
        assert text.count("fib saddr type != local drop") == 2, text
        assert text.count("ct state established,related accept") == 2, text
        assert str(client["nft"]).count("fib saddr type != local drop") == 1, client
        for rules in (server, client):
            assert rules["iptables"] == rules["ip6tables"] == [], rules
    else:
        for tool in ("iptables", "ip6tables"):
            rules = server[tool]
            assert isinstance(rules, list)
            assert sum("MASQUERADE" in r for r in rules) == 1, rules
            assert sum("-j DROP" in r for r in rules) == 1, rules
            assert sum("RELATED,ESTABLISHED" in r for r in rules) == 1, rules
        assert len(client["iptables"]) == 1, client  # type: ignore[arg-type]
        assert server["tables"] == client["tables"] == [], (server, client)


@pytest.mark.parametrize("firewall", FIREWALLS)
def test_rules_in_place_while_running_none_after_sigterm(tb, impl, key, firewall):
    before = tb.snapshots()
    server, client = tb.tunnel_up(impl, key, extra=("-v", "--firewall", firewall))
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))
    tb.check_transfer_through_vpn(tb.client, 5_000_000)
    tb.client.wait_ping(tb.inet.ip6 or "", 15, procs=(server, client))
    _check_in_place(tb, firewall)
    assert client.stop(signal.SIGTERM) == 0, client.log_tail()
    assert server.stop(signal.SIGTERM) == 0, server.log_tail()
    assert not tb.changes(before), tb.changes(before)


@pytest.mark.parametrize("firewall", FIREWALLS)
def test_sigkill_restart_and_cleanup(tb, impl, key, firewall):
    before = tb.snapshots()
    extra = ("-v", "--firewall", firewall)
    server, client = tb.tunnel_up(impl, key, extra=extra)
    server.kill()
    client.kill()
    # The server's rules outlive it (the client's go on with its tun device's name).
    assert _rules(tb.server)["tables" if firewall == "nft" else "iptables"]

    # A restart replaces what the dead instance left instead of adding to it.
    server, client = tb.tunnel_up(impl, key, extra=extra, suffix="-again")
    tb.client.wait_ping(tb.inet.ip, 15, procs=(server, client))
    tb.client.wait_ping(tb.inet.ip6 or "", 15, procs=(server, client))
    _check_in_place(tb, firewall)

    server.kill()
    client.kill()
    for ns in (tb.server, tb.client):
        proc = tb.run_in(ns, impl.cleanup_argv(), check=False, timeout=60)
        assert proc.returncode == 0, f"cleanup in {ns.role}: {proc.stderr}"
        if firewall == "nft":
            assert re.search(r"nft delete table inet dsvpn-\S+", proc.stderr), proc.stderr
    assert not tb.changes(before), tb.changes(before)


def _path_with(tb: testbed.Testbed, name: str, tools: tuple[str, ...]) -> str:
    """A directory holding only `tools` (links to the installed ones), to stand for a host
    where the others are not installed."""
    path = tb.workdir / name
    path.mkdir(mode=0o700)
    for tool in tools:
        found = shutil.which(tool)
        assert found, tool
        os.symlink(found, path / tool)
    return str(path)


def test_auto_uses_nft_without_iptables_and_neither_is_an_error(tb, impl, key):
    before = tb.snapshots()
    nothing = _path_with(tb, "bin-none", ("ip", "sysctl"))
    proc = tb.run_in(
        tb.server, ["env", f"PATH={nothing}", *impl.server_argv(key)], check=False, timeout=30
    )
    assert proc.returncode == 69, proc.stderr
    assert proc.stderr == "dsvpn: neither iptables nor nft found (install iptables or nftables)\n"
    assert not tb.changes(before), tb.changes(before)

    nft_only = _path_with(tb, "bin-nft", ("ip", "sysctl", "nft"))
    argv = ["env", f"PATH={nft_only}", *impl.server_argv(key, extra=("-v",))]
    server = tb.start(tb.server, argv, "server")
    tb.wait_listening(server, testbed.DEFAULT_PORT)
    client = tb.start_client(impl, key, extra=("-v", "--firewall", "auto"))
    tb.client.wait_ping(tb.inet.ip, 20, procs=(server, client))
    tb.client.wait_ping(tb.inet.ip6 or "", 15, procs=(server, client))
    (stun,) = tb.server.tun_links()
    assert testbed.nft_tables(tb.server) == [f"table inet dsvpn-{stun}"]
    assert _iptables_rules(tb.server, "iptables") == []
    # The client has iptables, so auto chose it there.
    assert testbed.nft_tables(tb.client) == []
    assert len(_iptables_rules(tb.client, "iptables")) == 1
    assert client.stop(signal.SIGTERM) == 0, client.log_tail()
    assert server.stop(signal.SIGTERM) == 0, server.log_tail()
    assert not tb.changes(before), tb.changes(before)
