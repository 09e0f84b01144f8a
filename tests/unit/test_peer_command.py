"""`dsvpn peer add|remove|list`, the server's peers file on the command line, and the SIGHUP
that tells a running server (found through its instance record) to re-read the file."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dsvpn import cli, instances, peer_command
from dsvpn.config import ServerConfig
from dsvpn.errors import DsvpnError, UsageError
from dsvpn.instances import Identity, Record, RunDir, process_start
from dsvpn.peers import PeersError


def run(argv: list[str], run_dir: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = peer_command.main(argv, out=out, err=err, run_dir=run_dir)
    return rc, out.getvalue(), err.getvalue()


def test_add_list_remove(tmp_path: Path) -> None:
    peers_file = tmp_path / "peers"
    run_dir = tmp_path / "run"
    rc, out, err = run(["add", str(peers_file), "alice"], run_dir)
    assert rc == 0
    assert out == "dsvpn client alice.key <server> 443 auto 192.168.192.1 192.168.192.254\n"
    assert "created the peers file" in err and str(tmp_path / "alice.key") in err
    rc, out, _ = run(["add", str(peers_file), "bob", "192.168.192.2"], run_dir)
    assert out.split()[-2:] == ["192.168.192.2", "192.168.192.254"]
    rc, out, _ = run(["list", str(peers_file)], run_dir)
    assert out.splitlines() == [
        f"# {peers_file}: pool 192.168.192.0/24, server 192.168.192.254",
        "NAME   ADDRESS        KEY FILE",
        "alice  192.168.192.1  alice.key",
        "bob    192.168.192.2  bob.key",
    ]
    rc, out, err = run(["remove", str(peers_file), "alice"], run_dir)
    assert rc == 0 and out == ""
    assert err == f"removed peer alice (192.168.192.1) and its key {tmp_path / 'alice.key'}\n"
    assert [ln.split()[0] for ln in run(["list", str(peers_file)], run_dir)[1].splitlines()] == [
        "#", "NAME", "bob",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "p"], "usage: dsvpn peer add"),
        (["add", "p", "a", "1.2.3.4", "x"], "usage: dsvpn peer add"),
        (["remove", "p"], "usage: dsvpn peer remove"),
        (["list"], "usage: dsvpn peer list"),
        (["rename", "p", "a"], "unknown peer action 'rename'"),
        (["add", "p", "a", "--force"], "unknown option '--force'"),
    ],
)
def test_usage_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        run(argv, tmp_path)


def test_help(tmp_path: Path) -> None:
    assert "dsvpn peer add <peers file>" in run(["--help"], tmp_path)[1]
    assert "dsvpn peer add <peers file>" in run([], tmp_path)[1]


def test_errors_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peers_file = tmp_path / "peers"
    assert cli.main(["peer", "add", str(peers_file), "alice", "10.0.0.1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a host address of the pool" in err
    assert not peers_file.exists() and not (tmp_path / "alice.key").exists()
    assert cli.main(["peer", "list", str(peers_file)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["peer", "bogus"]) == 2


# -- the running server ---------------------------------------------------------------------------

HUP_COUNTER = """
import signal, time
signal.signal(signal.SIGHUP, lambda *_: print("hup", flush=True))
print("ready", flush=True)
time.sleep(30)
"""


def _record(run_dir: Path, pid: int, peers_file: str | None, port: int = 443) -> None:
    identity = Identity("server", "tun9", port, "192.168.192.254", "192.168.192.0", None,
                        peers=peers_file, pool="192.168.192.0/24")  # fmt: skip
    directory = RunDir(run_dir)
    with directory.lock(create=True):
        directory.write(Record(pid, process_start(pid) or "", identity, []))


def test_add_and_remove_signal_the_servers_using_the_file(tmp_path: Path) -> None:
    peers_file = tmp_path / "peers"
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen([sys.executable, "-c", HUP_COUNTER], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        _record(run_dir, procs[0].pid, str(peers_file), port=8443)
        _record(run_dir, procs[1].pid, str(tmp_path / "other-peers"))  # not this file
        rc, out, err = run(["add", str(peers_file), "alice"], run_dir)
        assert rc == 0
        # The port of the server using the file goes into the client's command.
        assert out.split()[:5] == ["dsvpn", "client", "alice.key", "<server>", "8443"]
        assert f"told the server (PID {procs[0].pid}) using peers to re-read it" in err
        assert procs[0].stdout is not None and procs[0].stdout.readline() == "hup\n"
        rc, _, err = run(["remove", str(peers_file), "alice"], run_dir)
        assert f"(PID {procs[0].pid})" in err
        assert procs[0].stdout.readline() == "hup\n"
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(5)
    # The other process never got a SIGHUP: it printed nothing more.
    assert procs[1].stdout is not None and procs[1].stdout.read() == ""


def test_no_run_dir_no_signal(tmp_path: Path) -> None:
    rc, _, err = run(["add", str(tmp_path / "peers"), "alice"], tmp_path / "none")
    assert rc == 0 and "told" not in err and "note" not in err


def test_unreadable_run_dir_is_a_note(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o777)
    run_dir.chmod(0o777)  # refused: others may write to it
    rc, _, err = run(["add", str(tmp_path / "peers"), "alice"], run_dir)
    assert rc == 0
    assert "note: cannot look for a server using" in err and "SIGHUP" in err


def test_servers_using_skips_dead_servers(tmp_path: Path) -> None:
    from host_rig import dead_pid

    run_dir = tmp_path / "run"
    _record(run_dir, dead_pid(), "/x/peers")
    _record(run_dir, os.getppid(), "/x/peers", port=1)
    from dsvpn.platform import by_name

    assert instances.servers_using("/x/peers", by_name("linux"), run_dir=run_dir) == [
        (os.getppid(), 1)
    ]
    assert instances.servers_using("/y/peers", by_name("linux"), run_dir=run_dir) == []


def test_servers_using_resolves_links(tmp_path: Path) -> None:
    from dsvpn.platform import by_name

    real = tmp_path / "etc" / "peers"
    real.parent.mkdir()
    real.write_text("")
    (tmp_path / "link").symlink_to(real.parent)
    run_dir = tmp_path / "run"
    _record(run_dir, os.getppid(), str(tmp_path / "link" / "peers"))
    assert instances.servers_using(str(real), by_name("linux"), run_dir=run_dir) == [
        (os.getppid(), 443)
    ]


def test_a_tunnel_of_a_peers_file_reads_the_peers_not_a_key(peers_file: Path) -> None:
    from dsvpn import tunnel
    from dsvpn.platform import by_name

    cfg = cli.parse_args(["server", str(peers_file)]).config
    assert cfg is not None
    t = tunnel.Tunnel(cfg, by_name("linux"))
    assert t.peers is not None and [p.name for p in t.peers.peers] == ["alice"]
    assert t.key == b""
    identity = Identity.of(t.cfg, "tun3")
    assert identity.peers == str(peers_file) and identity.pool == "192.168.192.0/24"
    assert identity.remote_tun_ip == "192.168.192.0"


# -- dsvpn server <peers file> ------------------------------------------------------------------


@pytest.fixture
def peers_file(tmp_path: Path) -> Path:
    path = tmp_path / "peers"
    run(["add", str(path), "alice"], tmp_path / "run")
    return path


def test_server_with_a_peers_file(peers_file: Path) -> None:
    inv = cli.parse_args(["server", str(peers_file), "auto", "8443", "tun7"])
    assert inv.config == ServerConfig(
        key_file=str(peers_file),
        port=8443,
        tun_name="tun7",
        local_tun_ip="192.168.192.254",
        remote_tun_ip="192.168.192.0",
        peers_file=str(peers_file),
        pool="192.168.192.0/24",
    )
    # The server's address may be given if it is the pool's.
    same = cli.parse_args(["server", str(peers_file), "auto", "auto", "auto", "192.168.192.254"])
    assert isinstance(inv.config, ServerConfig)
    assert same.config == dataclasses.replace(inv.config, port=443, tun_name=None)


def test_a_relative_peers_file_is_made_absolute(
    peers_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(peers_file.parent)
    inv = cli.parse_args(["server", "peers"])
    assert isinstance(inv.config, ServerConfig)
    assert inv.config.key_file == "peers" and inv.config.peers_file == str(peers_file)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["auto", "auto", "auto", "10.0.0.1"], "gives the server the tunnel address"),
        (["auto", "auto", "auto", "auto", "192.168.192.9"], "leave <remote tun ip> auto"),
    ],
)
def test_server_addresses_come_from_the_peers_file(
    peers_file: Path, args: list[str], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        cli.parse_args(["server", str(peers_file), *args])


def test_a_broken_peers_file_is_refused_at_once(peers_file: Path) -> None:
    (peers_file.parent / "alice.key").unlink()
    with pytest.raises(PeersError, match=r":6: key file .*alice.key does not exist"):
        cli.parse_args(["server", str(peers_file)])


def test_a_key_file_stays_a_key_file(tmp_path: Path) -> None:
    key = tmp_path / "vpn.key"
    key.write_bytes(os.urandom(32) + b"\n")
    inv = cli.parse_args(["server", str(key)])
    assert isinstance(inv.config, ServerConfig) and inv.config.pool is None
    assert inv.config.peers_file is None and inv.config.remote_tun_ip == "192.168.192.1"


@pytest.mark.parametrize("name", ["freebsd", "netbsd", "dragonfly"])
def test_dry_run_of_a_pool_on_another_os_is_refused(
    peers_file: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert cli.main(["server", str(peers_file), "--dry-run", "--platform", name]) == 2
    err = capsys.readouterr().err
    assert f"runs on Linux, macOS and OpenBSD, not on {name}" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "nat"),
    [
        ("macos", "nat on <ext-if> from 192.168.192.0/24 to any -> (<ext-if>)"),
        ("openbsd", "pass out from 192.168.192.0/24 nat-to egress"),
    ],
)
def test_dry_run_of_a_pool_on_macos_and_openbsd(
    peers_file: Path, capsys: pytest.CaptureFixture[str], name: str, nat: str
) -> None:
    argv = ["server", str(peers_file), "auto", "auto", "auto", "auto", "auto", "10.0.0.1"]
    assert cli.main([*argv, "--dry-run", "--platform", name]) == 0
    lines = capsys.readouterr().out.splitlines()
    start, end = lines.index("# set up"), lines.index("# on exit")
    assert lines[start + 1 : end] == [
        "sysctl -w net.inet.ip.forwarding=1",
        "ifconfig <tun> 192.168.192.254 192.168.192.0 up",
        "ifconfig <tun> inet6 64:ff9b::192.168.192.254 64:ff9b::192.168.192.0 prefixlen 128 up",
        "route add -net 192.168.192.0/24 192.168.192.0",
        "route add -inet6 -net 64:ff9b::c0a8:c000/120 64:ff9b::192.168.192.0",
    ]
    assert lines[end + 1 : end + 4] == [
        "route delete -inet6 -net 64:ff9b::c0a8:c000/120",
        "route delete -net 192.168.192.0/24",
        "sysctl -w net.inet.ip.forwarding=<saved>",
    ]
    assert f"#     {nat}" in lines


@pytest.mark.parametrize(("name", "af_inet6"), [("macos", 30), ("openbsd", 24), ("linux", 10)])
def test_a_pool_server_gets_a_loop_that_reads_its_tun_header(
    peers_file: Path, name: str, af_inet6: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from dsvpn import _multi, tunnel
    from dsvpn.platform import by_name

    cfg = cli.parse_args(["server", str(peers_file)]).config
    assert cfg is not None
    made: list[dict[str, object]] = []

    class FakeLoop:
        def __init__(self, tun_fd: int, **kw: object) -> None:
            made.append(kw)

        def set_peers(self, peers: object) -> list[str]:
            return []

    monkeypatch.setattr(_multi, "MultiLoop", FakeLoop)
    t = tunnel.Tunnel(cfg, by_name(name))
    listener = types.SimpleNamespace(fileno=lambda: 7)
    signals = types.SimpleNamespace(fd=-1, wake=lambda: None)
    t._make_loop(5, signals, listener)  # type: ignore[arg-type]
    [kw] = made
    header = name != "linux"
    assert (kw["tun_header"], kw["vnet_hdr"]) == (header, not header)
    assert (kw["af_inet"], kw["af_inet6"]) == (2, af_inet6)


def test_dry_run_of_a_pool(peers_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["server", str(peers_file), "auto", "auto", "dsv0", "auto", "auto", "10.0.0.1"]
    assert cli.main([*argv, "--dry-run", "--platform", "linux", "--firewall", "nft"]) == 0
    out = capsys.readouterr().out
    assert "ip addr add 192.168.192.254/24 dev dsv0" in out
    assert "ip saddr 192.168.192.0/24" in out


def test_a_service_checks_every_key_of_a_peers_file(peers_file: Path) -> None:
    from dsvpn import service

    assert service._secret_files(str(peers_file)) == [
        str(peers_file),
        str(peers_file.parent / "alice.key"),
    ]
    key = peers_file.parent / "alice.key"
    assert service._secret_files(str(key)) == [str(key)]
    with pytest.raises(DsvpnError, match=r"cannot see the key file /tmp/.*/peers"):
        service.install("office", ["server", str(peers_file)], print_only=True)


def test_workers_option(peers_file: Path, tmp_path: Path) -> None:
    for argv in (["--workers", "3"], ["--workers=3"]):
        inv = cli.parse_args(["server", str(peers_file), *argv])
        assert isinstance(inv.config, ServerConfig) and inv.config.workers == 3
    inv = cli.parse_args(["server", str(peers_file)])
    assert isinstance(inv.config, ServerConfig) and inv.config.workers is None  # one per CPU
    key = tmp_path / "vpn.key"
    key.write_bytes(bytes(32))
    for argv, message in [
        (["server", str(peers_file), "--workers"], "--workers needs a number from 1 to 64"),
        (["server", str(peers_file), "--workers", "0"], "--workers needs a number"),
        (["server", str(peers_file), "--workers=65"], "--workers needs a number"),
        (["server", str(peers_file), "--workers", "two"], "--workers needs a number"),
        (["client", str(key), "h", "--workers", "2"], "--workers is a server option"),
        (["server", str(key), "--workers", "2"], "--workers goes with a peers file; .* is a key"),
    ]:
        with pytest.raises(UsageError, match=message):
            cli.parse_args(argv)


def test_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsvpn import workers
    from dsvpn.platform import by_name

    linux, macos = by_name("linux"), by_name("macos")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert workers.count(None, linux) == 3  # one per CPU it may run on
    assert workers.count(2, linux) == 2
    assert workers.count(None, macos) == workers.count(4, macos) == 1  # no multi-queue tun
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)), raising=False)
    assert workers.count(None, linux) == 64


def test_a_service_finds_the_key_file_after_an_option_value(
    peers_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsvpn import service

    monkeypatch.chdir(peers_file.parent)
    args = ["server", "--workers", "2", "peers", "auto", "443"]
    inv = service.check_args(args)
    absolute = service._absolute_key(args, inv)
    assert absolute == ["server", "--workers", "2", str(peers_file), "auto", "443"]
