"""Command-line parsing: DSVPN's positional syntax with auto and trailing omission, our options."""

from __future__ import annotations

import itertools

import pytest

from dsvpn import cli, instances
from dsvpn.config import ClientConfig, Config, ServerConfig
from dsvpn.errors import UsageError

SERVER_VALUES = ["10.0.0.1", "7443", "tun5", "10.9.0.254", "10.9.0.1", "10.0.0.1"]
CLIENT_VALUES = ["vpn.example", "7443", "tun5", "10.9.0.1", "10.9.0.254", "10.0.0.254"]


def expected(mode: str, values: list[str | None]) -> Config:
    address, port, tun, local, remote, last = values
    if mode == "server":
        return ServerConfig(
            key_file="vpn.key",
            listen_ip=address,
            port=int(port) if port else 443,
            tun_name=tun,
            local_tun_ip=local or "192.168.192.254",
            remote_tun_ip=remote or "192.168.192.1",
            external_ip=last,
        )
    assert address is not None
    return ClientConfig(
        key_file="vpn.key",
        server=address,
        port=int(port) if port else 443,
        tun_name=tun,
        local_tun_ip=local or "192.168.192.1",
        remote_tun_ip=remote or "192.168.192.254",
        gateway_ip=last,
    )


@pytest.mark.parametrize("mode", ["server", "client"])
def test_every_combination_of_auto_and_omission(mode: str) -> None:
    values = SERVER_VALUES if mode == "server" else CLIENT_VALUES
    # Each of the six optional positions is given, "auto", or (when all later ones are also
    # left out) omitted: every pattern is checked against the Config it must produce.
    for pattern in itertools.product(("value", "auto", "omit"), repeat=6):
        if "omit" in pattern and any(p != "omit" for p in pattern[pattern.index("omit") :]):
            continue
        if mode == "client" and pattern[0] != "value":
            continue  # the client needs its server
        argv = [mode, "vpn.key"]
        want: list[str | None] = []
        for p, v in zip(pattern, values, strict=True):
            if p == "value":
                argv.append(v)
            elif p == "auto":
                argv.append("auto")
            want.append(v if p == "value" else None)
        inv = cli.parse_args(argv)
        assert inv.command == mode
        assert inv.config == expected(mode, want), argv


def test_options_anywhere_after_the_mode_word() -> None:
    inv = cli.parse_args(["client", "-v", "vpn.key", "--dry-run", "h", "--platform", "macos"])
    assert (inv.verbosity, inv.dry_run, inv.platform) == (1, True, "macos")
    assert isinstance(inv.config, ClientConfig) and inv.config.server == "h"
    assert cli.parse_args(["server", "k", "--quiet"]).verbosity == -1
    assert cli.parse_args(["server", "k", "--dry-run", "--platform=openbsd"]).platform == "openbsd"


def test_forward_secrecy_options() -> None:
    inv = cli.parse_args(["client", "vpn.key", "--pfs", "h"])
    assert isinstance(inv.config, ClientConfig) and inv.config.pfs
    assert inv.config.server == "h"
    inv = cli.parse_args(["client", "vpn.key", "h"])
    assert isinstance(inv.config, ClientConfig) and not inv.config.pfs
    inv = cli.parse_args(["server", "vpn.key", "--require-pfs"])
    assert isinstance(inv.config, ServerConfig) and inv.config.require_pfs
    inv = cli.parse_args(["server", "vpn.key"])
    assert isinstance(inv.config, ServerConfig) and not inv.config.require_pfs
    assert "--pfs" in cli.USAGE and "--require-pfs" in cli.USAGE


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bogus"], "unknown mode"),
        (["client", "vpn.key"], "needs the server"),
        (["client", "vpn.key", "auto"], "needs the server"),
        (["server"], "usage"),
        (["server", "k", "auto", "0"], "invalid port"),
        (["server", "k", "auto", "65536"], "invalid port"),
        (["server", "k", "auto", "https"], "invalid port"),
        (["server", "k", "not-an-ip"], "invalid listen ip 'not-an-ip': expected an IP address"),
        (["server", "k", "vpn.example.com"], "invalid listen ip"),
        (["server", "k", "auto", "auto", "a/b"], "invalid tun name"),
        (["server", "k", "auto", "auto", "x" * 16], "invalid tun name .*at most 15 characters"),
        (["server", "k", "auto", "auto", "auto", "fd00::1"], "expected an IPv4"),
        (["server", "k", "auto", "auto", "auto", "10.0.0.1", "10.0.0.1"], "both 10.0.0.1"),
        (["client", "k", "h", "auto", "auto", "auto", "auto", "gw"], "invalid gateway ip"),
        (["server", "k", "1", "2", "3", "4", "5", "6", "7"], "too many arguments"),
        (["server", "k", "--frobnicate"], "unknown option"),
        (["server", "k", "--platform", "macos"], "only goes with --dry-run"),
        (["keygen"], "usage"),
        (["cleanup", "extra"], "no arguments"),
        (["server", "k", "--pfs"], "--pfs is a client option .*--require-pfs"),
        (["client", "k", "h", "--require-pfs"], "--require-pfs is a server option .*--pfs"),
        (["keygen", "k", "--pfs"], "--pfs is a client option"),
    ],
)
def test_bad_input_is_a_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        cli.parse_args(argv)


def test_main_prints_one_line_and_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["server", "k", "auto", "99999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsvpn: invalid port")


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "dsvpn server <key file> [<listen ip>|auto]" in out
    assert "[<server ip or name>|auto]" not in out  # the server binds an address, not a name
    for code in (2, 69, 75, 77, 130):
        assert f" {code} " in out
    assert cli.main(["--version"]) == 0
    assert "0.1.5" in capsys.readouterr().out
    assert cli.main([]) == 0


def test_missing_key_file_fails_before_root_check(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsvpn import tunnel

    monkeypatch.setattr(tunnel, "_has_net_admin", lambda: pytest.fail("checked root first"))
    assert cli.main(["client", "/nonexistent/vpn.key", "192.0.2.1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_not_root_is_refused_before_anything(
    tmp_path: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dsvpn import tunnel

    key = tmp_path / "vpn.key"  # type: ignore[operator]
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    monkeypatch.setattr(tunnel, "_has_net_admin", lambda: False)
    monkeypatch.setattr(tunnel.Tunnel, "run", lambda self: pytest.fail("touched the host"))
    assert cli.main(["server", str(key)]) == 77
    assert capsys.readouterr().err == "dsvpn: needs root (CAP_NET_ADMIN): run it as root\n"


@pytest.mark.parametrize("name", ["linux", "macos", "openbsd", "freebsd", "netbsd", "dragonfly"])
@pytest.mark.parametrize("mode", ["server", "client"])
def test_dry_run_prints_the_plan_of_any_platform_without_root(
    name: str, mode: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsvpn import tunnel

    monkeypatch.setattr(tunnel, "_has_net_admin", lambda: pytest.fail("dry run needs no root"))
    argv = [mode, "/nonexistent/key", *(["192.0.2.7"] if mode == "client" else [])]
    assert cli.main([*argv, "--dry-run", "--platform", name]) == 0
    out = capsys.readouterr().out
    assert f"dsvpn {mode} on {name}: dry run" in out
    assert "# set up" in out and "# on exit" in out
    assert f" mtu {1500 if name == 'netbsd' else 9000}\n" in out
    if name == "openbsd" and mode == "server":
        assert "pass out from 192.168.192.1 nat-to egress" in out
    if mode == "client" and name != "linux":
        assert "route add 192.0.2.7 <gateway>" in out and "route delete 192.0.2.7" in out


def test_unknown_platform_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["server", "k", "--dry-run", "--platform", "plan9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "linux" in err and "openbsd" in err


def test_cleanup_needs_root(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsvpn import tunnel

    monkeypatch.setattr(tunnel, "_has_net_admin", lambda: False)
    monkeypatch.setattr(instances, "cleanup", lambda *a, **k: pytest.fail("cleaned without root"))
    assert cli.main(["cleanup"]) == 77
    assert "needs root" in capsys.readouterr().err


@pytest.mark.parametrize("count", [0, 2])
def test_cleanup_says_what_it_did(
    count: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsvpn import tunnel

    monkeypatch.setattr(tunnel, "_has_net_admin", lambda: True)
    monkeypatch.setattr(instances, "cleanup", lambda dialect, log, keep: count)
    monkeypatch.setattr(instances, "kept_by_dead", lambda dialect: [])
    assert cli.main(["cleanup"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    want = "nothing to clean up" if count == 0 else "cleaned up after 2 dead instance(s)"
    assert err == want + "\n"


@pytest.mark.parametrize(
    ("name", "tun", "message"),
    [
        ("macos", "tun0", "on macOS it must be utunN"),
        ("openbsd", "utun0", "expected tun0 .. tun255"),
        ("linux", "!x", "at most 15 characters"),
    ],
)
def test_dry_run_refuses_what_a_real_run_refuses(
    name: str, tun: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["server", "k", "auto", "auto", tun, "--dry-run", "--platform", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_keygen_from_the_command_line(
    tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vpn.key"  # type: ignore[operator]
    assert cli.main(["keygen", str(path)]) == 0
    assert len(path.read_bytes()) == 32
    assert cli.main(["keygen", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


# -- --firewall ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "firewall"),
    [([], None), (["--firewall", "auto"], None), (["--firewall", "nft"], "nft"),
     (["--firewall=iptables"], "iptables"), (["--firewall", "nft", "--firewall=auto"], None)],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["server", "client"])
def test_firewall_option(mode: str, given: list[str], firewall: str | None) -> None:
    # Anywhere after the mode word, like every option; it leaves the positionals alone.
    inv = cli.parse_args([mode, *given, "vpn.key", "h" if mode == "client" else "auto", "7443"])
    assert inv.config is not None
    assert inv.config.firewall == firewall
    assert inv.config.port == 7443


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["server", "k", "--firewall"], "--firewall needs iptables, nft or auto"),
        (["server", "k", "--firewall", "pf"], "invalid --firewall 'pf'"),
        (["server", "k", "--firewall="], "invalid --firewall ''"),
        (["cleanup", "--firewall", "nft"], "--firewall only goes with server or client"),
        (["keygen", "k", "--firewall=nft"], "--firewall only goes with server or client"),
    ],
)
def test_bad_firewall_option(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        cli.parse_args(argv)


@pytest.mark.parametrize("mode", ["server", "client"])
def test_dry_run_shows_the_nft_table(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    # <server address> <port> <tun> for either mode.
    argv = [mode, "/nonexistent/key", "192.0.2.7" if mode == "client" else "auto", "auto", "tun9"]
    assert cli.main([*argv, "--firewall", "nft", "--dry-run", "--platform", "linux"]) == 0
    out = capsys.readouterr().out
    assert "iptables" not in out
    assert "nft 'add table inet dsvpn-tun9\ndelete table inet dsvpn-tun9\n" in out
    assert "\tchain prerouting {\n\t\ttype filter hook prerouting priority raw;" in out
    assert ("masquerade" in out) == (mode == "server")
    assert "\n# on exit\n" in out and "\nnft delete table inet dsvpn-tun9\n" in out


def test_firewall_elsewhere_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["server", "k", "--firewall=nft", "--dry-run", "--platform", "macos"]) == 2
    err = capsys.readouterr().err
    assert err == "dsvpn: --firewall has no effect on macos: it sets no packet filter\n"
