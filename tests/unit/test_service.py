"""`dsvpn service`: the unit, plist and rc.d texts, the commands install and remove would run
(through a recording runner, in a scratch root), and the checks of `dsvpn service run`."""

from __future__ import annotations

import io
import os
import plistlib
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from dsvpn import cli, runner, service, tunnel
from dsvpn.config import Config
from dsvpn.errors import DsvpnError, PermissionDenied, PrerequisiteError, UsageError
from dsvpn.service import ConfigFileError, Host

SERVER_ARGS = ["server", "/etc/dsvpn/vpn.key", "auto", "443"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="install checks that root owns this installation"
)


class Recorder:
    """The command runner of a Host: records every command, answers with `status`."""

    def __init__(self, status: int = 0) -> None:
        self.commands: list[list[str]] = []
        self.status = status

    def __call__(self, argv: Sequence[str]) -> int:
        self.commands.append(list(argv))
        return self.status


def make_host(root: Path, runner: Recorder | None = None, **kw: object) -> Host:
    host = Host(
        root=root,
        run=runner or Recorder(),
        booted=lambda: True,
        owner=os.geteuid(),
        euid=0,
        out=io.StringIO(),
        err=io.StringIO(),
    )
    for key, value in kw.items():
        setattr(host, key, value)
    return host


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch file system root with a key at /etc/dsvpn/vpn.key. The installation that
    install checks is a root-owned system program, wherever this checkout lives (a clone under
    /tmp would be refused, rightly: see test_install_refuses_an_installation_others_can_change)."""
    shell = os.path.realpath(shutil.which("sh") or "/bin/sh")
    monkeypatch.setattr(service, "_installation", lambda: [shell])
    r = tmp_path / "root"
    (r / "etc" / "dsvpn").mkdir(parents=True, mode=0o700)
    (r / "etc" / "dsvpn" / "vpn.key").write_bytes(os.urandom(32))
    return r


def sections(text: str) -> dict[str, str]:
    """--print output -> {header: body}."""
    out: dict[str, str] = {}
    head = None
    for line in text.splitlines(keepends=True):
        if line.startswith("#### "):
            head = line[5:].strip()
            out[head] = ""
        else:
            assert head is not None, line
            out[head] += line
    return out


def directives(unit: str) -> dict[str, list[str]]:
    """Unit text -> {"Section.Key": [values...]} (repeated keys accumulate)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in unit.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


# -- the unit ---------------------------------------------------------------------------------


def test_unit_text_is_package_data() -> None:
    raw = service._template(service.UNIT).decode()
    assert raw.startswith(service.UNIT_MARK)
    assert "@DSVPN@ service run %i" in raw
    unit = service.systemd_unit(["/opt/dsvpn/bin/dsvpn"])
    assert "@" + "DSVPN@" not in unit and "@PROTECT_HOME@" not in unit
    d = directives(unit)
    assert d["Service.ExecStart"] == ["/opt/dsvpn/bin/dsvpn service run %i"]
    assert d["Service.ExecStopPost"] == ["/opt/dsvpn/bin/dsvpn cleanup"]


def test_unit_directives() -> None:
    d = directives(service.systemd_unit(["/usr/bin/dsvpn"]))
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    assert one["Service.Restart"] == "on-failure"
    # Longer than one command may take (the waits for a connect or a handshake tick it).
    assert int(one["Service.WatchdogSec"]) > runner.COMMAND_TIMEOUT
    assert set(one["Service.CapabilityBoundingSet"].split()) == {
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_NET_BIND_SERVICE",
        "CAP_BPF",  # the tun's queue steering (dsvpn.workers)
    }
    # bpf() back in after "~@privileged" (the first filter is an allow list: later lines add)
    assert d["Service.SystemCallFilter"][-1] == "bpf"
    assert "Service.AmbientCapabilities" not in d  # runs as root
    assert "Service.User" not in d
    assert one["Service.DevicePolicy"] == "closed"
    assert one["Service.DeviceAllow"] == "/dev/net/tun rw"
    assert one["Service.ProtectSystem"] == "strict"
    assert one["Service.RuntimeDirectory"] == "dsvpn"
    assert one["Service.RuntimeDirectoryPreserve"] == "yes"  # records outlive a crash
    assert one["Service.ProtectHome"] == "yes"
    assert set(one["Service.RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "LockPersonality",
        "ProtectControlGroups",
        "ProtectKernelModules",
        "MemoryDenyWriteExecute",
    ):
        assert one[f"Service.{key}"] == "yes", key
    assert one["Service.SystemCallArchitectures"] == "native"
    assert "Service.ProtectKernelTunables" not in d  # dsvpn writes sysctls
    assert "Service.PrivateDevices" not in d  # would hide /dev/net/tun
    assert one["Install.WantedBy"] == "multi-user.target"


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["/usr/bin/dsvpn"], "/usr/bin/dsvpn"),
        (["/opt/py 3/bin/python", "-m", "dsvpn"], '"/opt/py 3/bin/python" -m dsvpn'),
        (["/opt/100%/dsvpn"], "/opt/100%%/dsvpn"),
        (['/opt/a"b$c/dsvpn'], '"/opt/a\\"b$$c/dsvpn"'),
    ],
)
def test_unit_command_quoting(words: list[str], expected: str) -> None:
    d = directives(service.systemd_unit(words))
    assert d["Service.ExecStart"] == [f"{expected} service run %i"]


def test_unit_refuses_control_characters() -> None:
    with pytest.raises(DsvpnError):
        service.systemd_unit(["/opt/a\nb/dsvpn"])


def _verify(tmp_path: Path, command: list[str], protect_home: str = "yes") -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    (unit_dir / service.UNIT).write_text(service.systemd_unit(command, protect_home))
    done = subprocess.run(
        [SYSTEMD_ANALYZE or "", "verify", str(unit_dir / "dsvpn@home.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # verify reports unknown or misspelt directives on stderr, yet still exits 0
    assert service.UNIT not in done.stderr and "dsvpn@home" not in done.stderr, done.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("protect_home", ["yes", "read-only"])
def test_systemd_analyze_verify(tmp_path: Path, protect_home: str) -> None:
    _verify(tmp_path, service.dsvpn_command(), protect_home)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_quoted_path(tmp_path: Path) -> None:
    exe = tmp_path / "with space" / "dsvpn"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    _verify(tmp_path, [str(exe)])


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / service.UNIT).write_text(service.systemd_unit(service.dsvpn_command()))
    done = subprocess.run(
        [SYSTEMD_ANALYZE or "", "security", "--offline=true", str(unit_dir / "dsvpn@x.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0 and "offline" in done.stderr:
        pytest.skip(f"systemd-analyze security has no --offline here: {done.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert m, done.stdout + done.stderr
    # 2.3 when written, 2.4 with bpf() and CAP_BPF for the workers' tun steering; a weakened
    # unit would raise it. (An unhardened service scores 9.6.)
    assert float(m.group(1)) <= 2.5, done.stdout


# -- finding this installation ----------------------------------------------------------------


def test_dsvpn_command_is_this_installation() -> None:
    command = service.dsvpn_command()
    if len(command) == 1:
        with open(command[0], "rb") as f:
            shebang = f.readline()[2:].split()[0].decode()
        assert os.path.samefile(shebang, sys.executable)
    else:
        assert command == [os.path.abspath(sys.executable), "-m", "dsvpn"]
    assert os.path.isabs(command[0])


def test_dsvpn_command_falls_back_to_python_m(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "bin" / "dsvpn"
    other.parent.mkdir()
    other.write_text("#!/usr/bin/some-other-python\n")
    other.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(other)])
    monkeypatch.setenv("PATH", str(other.parent))
    python = tmp_path / "bin" / "python3"
    python.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(python))
    # The script next to the python is someone else's: python -m dsvpn, by its own path.
    assert service.dsvpn_command() == [str(python), "-m", "dsvpn"]


# -- --print ----------------------------------------------------------------------------------


def test_print_linux(root: Path) -> None:
    host = make_host(root)
    args = [*SERVER_ARGS, "-v"]
    assert service.install("home", args, platform="linux", print_only=True, host=host) == 0
    assert isinstance(host.out, io.StringIO)
    parts = sections(host.out.getvalue())
    assert list(parts) == [
        "/etc/systemd/system/dsvpn@.service (mode 0644)",
        "/etc/dsvpn/home.args (mode 0600)",
        "then, as root:",
    ]
    unit = parts["/etc/systemd/system/dsvpn@.service (mode 0644)"]
    assert unit == service.systemd_unit(service.dsvpn_command(), service.protect_home())
    lines = parts["/etc/dsvpn/home.args (mode 0600)"].splitlines()
    assert [x for x in lines if not x.startswith("#")] == args
    assert parts["then, as root:"].splitlines() == [
        "systemctl daemon-reload",
        "systemctl enable --now dsvpn@home",
    ]
    assert host.run.commands == []  # type: ignore[attr-defined]
    assert not (root / "etc" / "systemd").exists()
    assert sorted(p.name for p in (root / "etc" / "dsvpn").iterdir()) == ["vpn.key"]


def test_print_makes_the_key_path_absolute(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/etc")  # --print reads nothing: the key need not exist
    host = make_host(root)
    service.install("home", ["client", "-v", "dsvpn/vpn.key", "vpn.example.com"],
                    platform="linux", print_only=True, host=host)  # fmt: skip
    assert isinstance(host.out, io.StringIO)
    body = sections(host.out.getvalue())["/etc/dsvpn/home.args (mode 0600)"]
    args = [x for x in body.splitlines() if not x.startswith("#")]
    assert args == ["client", "-v", "/etc/dsvpn/vpn.key", "vpn.example.com"]


def test_print_keeps_the_forward_secrecy_options(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/etc")
    host = make_host(root)
    service.install("home", ["client", "--pfs", "dsvpn/vpn.key", "vpn.example.com"],
                    platform="linux", print_only=True, host=host)  # fmt: skip
    assert isinstance(host.out, io.StringIO)
    body = sections(host.out.getvalue())["/etc/dsvpn/home.args (mode 0600)"]
    args = [x for x in body.splitlines() if not x.startswith("#")]
    assert args == ["client", "--pfs", "/etc/dsvpn/vpn.key", "vpn.example.com"]


def test_print_macos_plist(root: Path) -> None:
    host = make_host(root)
    service.install("home", SERVER_ARGS, platform="macos", print_only=True, host=host)
    assert isinstance(host.out, io.StringIO)
    parts = sections(host.out.getvalue())
    plist_head = "/Library/LaunchDaemons/org.dsvpn.home.plist (mode 0644)"
    data = plistlib.loads(parts[plist_head].encode())
    assert data["Label"] == "org.dsvpn.home"
    assert data["ProgramArguments"] == [*service.dsvpn_command(), "service", "run", "home"]
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}  # restarted when it fails
    assert data["StandardErrorPath"] == "/var/log/dsvpn-home.log"
    assert parts["then, as root:"].splitlines() == [
        "launchctl bootstrap system /Library/LaunchDaemons/org.dsvpn.home.plist"
    ]


@pytest.mark.parametrize(
    ("platform", "script", "commands"),
    [
        ("openbsd", "/etc/rc.d/dsvpn_home", ["rcctl enable dsvpn_home", "rcctl start dsvpn_home"]),
        (
            "freebsd",
            "/usr/local/etc/rc.d/dsvpn_home",
            ["sysrc dsvpn_home_enable=YES", "service dsvpn_home start"],
        ),
    ],
)
def test_print_bsd_rc_script(
    root: Path, tmp_path: Path, platform: str, script: str, commands: list[str]
) -> None:
    host = make_host(root)
    service.install("home", SERVER_ARGS, platform=platform, print_only=True, host=host)
    assert isinstance(host.out, io.StringIO)
    parts = sections(host.out.getvalue())
    text = parts[f"{script} (mode 0555)"]
    assert "@" not in text.replace("dsvpn@", "")  # every placeholder filled in
    assert "service run home" in text and "cleanup" in text
    path = tmp_path / "rc"
    path.write_text(text)
    done = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert parts["then, as root:"].splitlines() == commands
    removal = io.StringIO()
    host.out = removal
    service.remove("home", platform=platform, print_only=True, host=host)
    assert script in removal.getvalue()


def test_bsd_install_without_print_is_refused(root: Path) -> None:
    for platform in ("openbsd", "freebsd"):
        with pytest.raises(UsageError, match="--print"):
            service.install("home", SERVER_ARGS, platform=platform, host=make_host(root))


# -- refused at install time, before anything is written --------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("bad/name", SERVER_ARGS, "invalid service name"),
        ("-x", SERVER_ARGS, "invalid service name"),
        ("a" * 33, SERVER_ARGS, "invalid service name"),
        ("home", ["server", "/etc/dsvpn/vpn.key", "auto", "99999"], "invalid port '99999'"),
        ("home", ["client", "/etc/dsvpn/vpn.key"], "the client needs the server"),
        ("home", ["keygen", "/etc/dsvpn/vpn.key"], "a service runs"),
        ("home", ["cleanup"], "a service runs"),
        ("home", [*SERVER_ARGS, "--dry-run"], "--dry-run"),
        ("home", ["server", "/etc/dsvpn/vpn.key", "#x"], "starting with '#'"),
        ("home", ["server", "/etc/dsvpn/vpn.key", "a\nb"], "line break"),
        ("home", ["server", "/tmp/vpn.key"], "cannot see the key file /tmp/vpn.key"),
        ("home", ["server", "/root/vpn.key"], "cannot see the key file /root/vpn.key"),
    ],
)
def test_install_refuses(root: Path, name: str, args: list[str], message: str) -> None:
    host = make_host(root)
    with pytest.raises(DsvpnError, match=re.escape(message)):
        service.install(name, args, platform="linux", host=host)
    assert host.run.commands == []  # type: ignore[attr-defined]
    assert not (root / "etc" / "systemd").exists()


def test_bsd_names_take_no_dash(root: Path) -> None:
    with pytest.raises(UsageError, match=r"rc\.d"):
        service.install("my-vpn", SERVER_ARGS, platform="openbsd", print_only=True)
    service.install("my-vpn", SERVER_ARGS, platform="linux", print_only=True, host=make_host(root))


def test_install_needs_root_and_systemd(root: Path) -> None:
    with pytest.raises(PermissionDenied):
        service.install("home", SERVER_ARGS, platform="linux", host=make_host(root, euid=1000))
    with pytest.raises(PrerequisiteError, match="--print"):
        host = make_host(root, booted=lambda: False)
        service.install("home", SERVER_ARGS, platform="linux", host=host)


def test_install_checks_the_key(root: Path) -> None:
    (root / "etc" / "dsvpn" / "vpn.key").write_bytes(b"short")
    host = make_host(root)
    with pytest.raises(DsvpnError, match="key"):
        service.install("home", SERVER_ARGS, platform="linux", host=host)
    assert host.run.commands == []  # type: ignore[attr-defined]


# -- install and remove, in a scratch root ----------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@needs_root
def test_install_and_remove_two_instances(root: Path) -> None:
    runner = Recorder()
    host = make_host(root, runner)
    unit = root / "etc" / "systemd" / "system" / "dsvpn@.service"
    assert service.install("home", SERVER_ARGS, platform="linux", host=host) == 0
    assert runner.commands == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "dsvpn@home"],
    ]
    assert unit.read_text() == service.systemd_unit(service.dsvpn_command(), service.protect_home())
    assert _mode(unit) == 0o644
    args = root / "etc" / "dsvpn" / "home.args"
    assert _mode(args) == 0o600
    assert service.read_args("home", host) == SERVER_ARGS
    assert isinstance(host.err, io.StringIO)
    shown = [x for x in host.err.getvalue().splitlines() if x.startswith("[#] ")]
    assert shown == [
        "[#] write /etc/systemd/system/dsvpn@.service (mode 0644)",
        "[#] write /etc/dsvpn/home.args (mode 0600)",
        "[#] systemctl daemon-reload",
        "[#] systemctl enable --now dsvpn@home",
    ]

    # The same name again is refused; another name shares the unit (written once).
    with pytest.raises(DsvpnError, match="exists already"):
        service.install("home", SERVER_ARGS, platform="linux", host=host)
    host.err = io.StringIO()
    office = ["client", "/etc/dsvpn/vpn.key", "203.0.113.7"]
    service.install("office", office, platform="linux", host=host)
    assert "write /etc/systemd/system" not in host.err.getvalue()
    assert runner.commands[-1] == ["systemctl", "enable", "--now", "dsvpn@office"]

    # Removing one instance keeps the unit for the other.
    runner.commands.clear()
    assert service.remove("home", platform="linux", host=host) == 0
    assert runner.commands == [["systemctl", "disable", "--now", "dsvpn@home"]]
    assert not args.exists() and unit.exists()
    # The last one takes the unit along, then reloads.
    runner.commands.clear()
    host.err = io.StringIO()
    assert service.remove("office", platform="linux", host=host) == 0
    assert runner.commands == [
        ["systemctl", "disable", "--now", "dsvpn@office"],
        ["systemctl", "daemon-reload"],
    ]
    assert not unit.exists()
    assert sorted(p.name for p in (root / "etc" / "dsvpn").iterdir()) == ["vpn.key"]
    shown = [x for x in host.err.getvalue().splitlines() if x.startswith("[#] ")]
    assert shown == [
        "[#] systemctl disable --now dsvpn@office",
        "[#] rm /etc/dsvpn/office.args",
        "[#] rm /etc/systemd/system/dsvpn@.service",
        "[#] systemctl daemon-reload",
    ]
    with pytest.raises(DsvpnError, match="no dsvpn service named office"):
        service.remove("office", platform="linux", host=host)


@needs_root
def test_install_refuses_an_installation_others_can_change(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    (shared / "bin").mkdir(parents=True)
    shared.chmod(0o777)
    script = shared / "bin" / "dsvpn"
    script.write_text("#!/bin/sh\n")
    monkeypatch.setattr(service, "_installation", lambda: [str(script)])
    runner = Recorder()
    with pytest.raises(DsvpnError, match=f"{shared} must belong to root"):
        service.install("home", SERVER_ARGS, platform="linux", host=make_host(root, runner))
    assert runner.commands == []
    assert not (root / "etc" / "systemd" / "system" / "dsvpn@.service").exists()


@needs_root
def test_install_keeps_a_unit_it_did_not_write(root: Path) -> None:
    unit = root / "etc" / "systemd" / "system" / "dsvpn@.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    host = make_host(root)
    with pytest.raises(DsvpnError, match="not written by dsvpn"):
        service.install("home", SERVER_ARGS, platform="linux", host=host)
    assert unit.read_text() == "[Service]\nExecStart=/bin/true\n"
    assert not (root / "etc" / "dsvpn" / "home.args").exists()


@needs_root
def test_install_reports_a_failed_start(root: Path) -> None:
    host = make_host(root, Recorder(status=1))
    with pytest.raises(DsvpnError, match=r"journalctl -u dsvpn@home.*dsvpn service remove home"):
        service.install("home", SERVER_ARGS, platform="linux", host=host)


@needs_root
def test_install_and_remove_macos(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "current_platform", lambda: "macos")
    runner = Recorder()
    host = make_host(root, runner, booted=lambda: False)  # no systemd on macOS
    service.install("home", SERVER_ARGS, host=host)
    plist = root / "Library" / "LaunchDaemons" / "org.dsvpn.home.plist"
    assert plistlib.loads(plist.read_bytes())["Label"] == "org.dsvpn.home"
    assert _mode(plist) == 0o644
    assert runner.commands == [
        ["launchctl", "bootstrap", "system", "/Library/LaunchDaemons/org.dsvpn.home.plist"]
    ]
    runner.commands.clear()
    service.remove("home", host=host)
    assert runner.commands == [["launchctl", "bootout", "system/org.dsvpn.home"]]
    assert not plist.exists()
    assert not (root / "etc" / "dsvpn" / "home.args").exists()


# -- dsvpn service run: the arguments file ----------------------------------------------------


def _args_file(root: Path, text: str, mode: int = 0o600) -> Path:
    path = root / "etc" / "dsvpn" / "home.args"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_read_args(root: Path) -> None:
    _args_file(root, "# comment\nserver\n\n/etc/dsvpn/vpn.key\r\nauto\n443\n")
    assert service.read_args("home", make_host(root)) == SERVER_ARGS


def test_read_args_missing(root: Path) -> None:
    with pytest.raises(ConfigFileError, match="does not exist") as exc:
        service.read_args("home", make_host(root))
    assert exc.value.exit_code == 78


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_read_args_writable_by_others(root: Path, mode: int) -> None:
    _args_file(root, "server\n", mode)
    with pytest.raises(ConfigFileError, match="writable by no one else"):
        service.read_args("home", make_host(root))


def test_read_args_directory_writable_by_others(root: Path) -> None:
    _args_file(root, "server\n")
    (root / "etc").chmod(0o777)
    try:
        with pytest.raises(ConfigFileError, match=re.escape(f"{root / 'etc'} must belong")):
            service.read_args("home", make_host(root))
    finally:
        (root / "etc").chmod(0o755)


def test_read_args_owned_by_someone_else(root: Path) -> None:
    _args_file(root, "server\n")
    with pytest.raises(ConfigFileError, match="must belong to uid 4242"):
        service.read_args("home", make_host(root, owner=4242))


def test_read_args_symlink_and_directory(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("server\n")
    link = root / "etc" / "dsvpn" / "home.args"
    link.symlink_to(target)
    with pytest.raises(ConfigFileError, match="symbolic link"):
        service.read_args("home", make_host(root))
    link.unlink()
    link.mkdir()
    with pytest.raises(ConfigFileError, match="not a regular file"):
        service.read_args("home", make_host(root))


def test_run_instance(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str | None]] = []

    def fake_run(cfg: Config, name: str | None = None) -> int:
        seen.append((cfg.key_file, name))
        return 0

    monkeypatch.setattr(tunnel, "run", fake_run)
    _args_file(root, "\n".join(SERVER_ARGS) + "\n")
    assert service.run_instance("home", make_host(root)) == 0
    # The tunnel runs the instance's arguments under the instance's name (`dsvpn status`).
    assert seen == [(SERVER_ARGS[1], "home")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the dsvpn arguments are missing"),
        ("server\n/k\nauto\nnot-a-port\n", "invalid port"),
        ("keygen\n/k\n", "a service runs"),
    ],
)
def test_run_instance_bad_arguments(root: Path, text: str, message: str) -> None:
    _args_file(root, text)
    with pytest.raises(ConfigFileError, match=message) as exc:
        service.run_instance("home", make_host(root))
    assert exc.value.exit_code == 78


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["service"], 0, ""),
        (["service", "--help"], 0, ""),
        (["service", "frob", "x"], 2, "unknown service action 'frob'"),
        (["service", "install", "home"], 2, "the arguments after --"),
        (["service", "install", "--", *SERVER_ARGS], 2, "usage: dsvpn service install <name>"),
        (["service", "install", "home", "--platform", "linux", "--", *SERVER_ARGS], 2,
         "--platform only goes with --print"),
        (["service", "install", "home", "--print", "--platform", "hurd", "--", *SERVER_ARGS], 2,
         "no service support for 'hurd'"),
        (["service", "install", "home", "--bogus", "--", *SERVER_ARGS], 2, "unknown option"),
        (["service", "remove", "home", "--", "x"], 2, "takes no dsvpn arguments"),
        (["service", "run", "bad/name"], 2, "invalid service name"),
    ],
)  # fmt: skip
def test_cli(argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    if code == 0:
        assert captured.out.startswith("usage:")
    else:
        assert message in captured.err
        assert captured.err.count("\n") == 1  # one line, no traceback


def test_cli_print(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["service", "install", "home", "--print", "--platform=linux", "--", *SERVER_ARGS]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "#### /etc/systemd/system/dsvpn@.service (mode 0644)" in out
    assert "systemctl enable --now dsvpn@home" in out
    assert "dsvpn service install" in cli.USAGE and "dsvpn selftest" in cli.USAGE


@pytest.mark.parametrize(
    ("paths", "setting"),
    [
        (["/usr/local/bin/dsvpn", "/usr/bin/python3.11", "/usr"], "yes"),
        (["/opt/venv/bin/dsvpn", "/root/.pyenv/versions/3.11.7/bin/python3.11"], "read-only"),
        (["/home/ops/.local/bin/dsvpn"], "read-only"),
        (["/homestead/bin/dsvpn"], "yes"),
    ],
)
def test_protect_home_follows_the_installation(
    monkeypatch: pytest.MonkeyPatch, paths: list[str], setting: str
) -> None:
    # ProtectHome=yes would hide a Python or a dsvpn that lives in a home directory.
    monkeypatch.setattr(service, "_installation", lambda: paths)
    assert service.protect_home() == setting
