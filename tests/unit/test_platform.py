"""Backend selection, tun opening (fake devices and sockets), host checks, discovery, config
checks shared by real and dry runs, and what platform/ may import."""

from __future__ import annotations

import ast
import dataclasses
import errno
import fcntl
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from dsvpn import platform
from dsvpn.config import ClientConfig, Config, ServerConfig
from dsvpn.errors import (
    CommandError,
    DsvpnError,
    NetworkError,
    PermissionDenied,
    PrerequisiteError,
    UsageError,
)
from dsvpn.platform import _common, darwin, linux
from dsvpn.platform._common import NetInfo, discover
from dsvpn.platform._ifconfig import open_dev_tun, parse_tun_name
from dsvpn.platform.bsd import FreeBSDBackend, NetBSDBackend
from dsvpn.platform.openbsd import OpenBSDBackend


class Commands:
    """Stands in for Runner.command: records each argv, raises what `fail` holds."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> None:
        self.calls.append(list(argv))
        if self.fail is not None:
            raise self.fail


# -- selection ------------------------------------------------------------------------------------


def test_names_and_by_name() -> None:
    assert platform.NAMES == ("linux", "macos", "openbsd", "freebsd", "netbsd", "dragonfly")
    for name in platform.NAMES:
        assert platform.by_name(name).name == name


def test_unknown_name() -> None:
    with pytest.raises(UsageError, match="choose one of linux, macos, openbsd"):
        platform.by_name("windows")


@pytest.mark.parametrize(
    ("sysplat", "name"),
    [("linux", "linux"), ("darwin", "macos"), ("openbsd7", "openbsd"), ("freebsd14", "freebsd"),
     ("netbsd10", "netbsd"), ("dragonfly6", "dragonfly"), ("win32", None), ("sunos5", None)],
)  # fmt: skip
def test_name_for(sysplat: str, name: str | None) -> None:
    assert platform.name_for(sysplat) == name


def test_current_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    platform.current.cache_clear()
    monkeypatch.setattr(sys, "platform", "win32")
    try:
        with pytest.raises(DsvpnError, match="runs on linux, macos"):
            platform.current()
    finally:
        platform.current.cache_clear()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux host only")
def test_current_linux() -> None:
    assert platform.current() is platform.current()
    assert platform.current().name == "linux"


def test_framing_and_mtu() -> None:
    assert platform.by_name("macos").framing == (True, 2, 30, False)
    assert platform.by_name("openbsd").framing == (True, 2, 24, False)
    assert platform.by_name("linux").framing.vnet_hdr
    for name in ("linux", "freebsd", "netbsd", "dragonfly"):
        assert not platform.by_name(name).framing.header
    assert platform.by_name("netbsd").default_mtu == 1500
    assert platform.by_name("linux").default_mtu == 9000


# -- /dev/tunN ------------------------------------------------------------------------------------


def test_parse_tun_name() -> None:
    assert parse_tun_name("tun0") == 0
    assert parse_tun_name("tun255") == 255
    for bad in ("tun", "tun256", "utun1", "tun-1", "eth0", "tun01x"):
        with pytest.raises(UsageError):
            parse_tun_name(bad)


def test_dev_tun_first_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in (0, 1, 3):
        (tmp_path / f"tun{n}").touch()
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any) -> int:
        if Path(path).name in ("tun0", "tun1"):  # in use
            raise OSError(errno.EBUSY, "Device busy")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", fake_open)
    fd, name = open_dev_tun(tmp_path, None)
    os.close(fd)
    assert name == "tun3"  # tun2 does not exist


def test_dev_tun_wanted(tmp_path: Path) -> None:
    (tmp_path / "tun7").touch()
    fd, name = open_dev_tun(tmp_path, "tun7")
    os.close(fd)
    assert name == "tun7"
    with pytest.raises(DsvpnError, match="does not exist"):
        open_dev_tun(tmp_path, "tun8")
    with pytest.raises(UsageError):
        open_dev_tun(tmp_path, "wg0")


def test_dev_tun_none_free(tmp_path: Path) -> None:
    with pytest.raises(DsvpnError, match="no free tun device"):
        open_dev_tun(tmp_path, None)


def test_dev_tun_busy_and_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tun0").touch()

    def busy(*_: Any) -> int:
        raise OSError(errno.EBUSY, "Device busy")

    monkeypatch.setattr(os, "open", busy)
    with pytest.raises(DsvpnError, match="tun device tun0 is busy"):
        open_dev_tun(tmp_path, "tun0")

    def denied(*_: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionDenied):
        open_dev_tun(tmp_path, None)


def test_bsd_open_tun_sets_mtu(tmp_path: Path) -> None:
    (tmp_path / "tun0").touch()
    run = Commands()
    backend = NetBSDBackend(dev_dir=tmp_path)
    fd, name = backend.open_tun(None, backend.default_mtu, run)
    os.close(fd)
    assert (name, run.calls) == ("tun0", [["ifconfig", "tun0", "mtu", "1500"]])


def test_bsd_open_tun_mtu_failure_closes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tun0").touch()
    closed: list[int] = []
    real_close = os.close
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    failure = CommandError("`ifconfig tun0 mtu 99999` failed: ifconfig: SIOCSIFMTU: Invalid")
    with pytest.raises(CommandError, match="SIOCSIFMTU"):
        OpenBSDBackend(dev_dir=tmp_path).open_tun("tun0", 99999, Commands(failure))
    assert len(closed) == 1


# -- utun -----------------------------------------------------------------------------------------


class FakeUtun:
    """A kernel-control socket: units in `busy` refuse with EBUSY."""

    busy: ClassVar[set[int]] = set()
    made: ClassVar[list[FakeUtun]] = []

    def __init__(self, family: int, kind: int, proto: int) -> None:
        assert (family, proto) == (darwin.PF_SYSTEM, darwin.SYSPROTO_CONTROL)
        self.unit = 0
        self.closed = False
        FakeUtun.made.append(self)

    def fileno(self) -> int:
        return 42

    def connect(self, addr: tuple[int, int]) -> None:
        assert addr[0] == 7  # the id fake_ctliocginfo returned
        if addr[1] in self.busy:
            raise OSError(errno.EBUSY, "Resource busy")
        self.unit = addr[1]

    def getsockopt(self, level: int, opt: int, size: int) -> bytes:
        assert (level, opt, size) == (darwin.SYSPROTO_CONTROL, darwin.UTUN_OPT_IFNAME, 16)
        return f"utun{self.unit - 1}".encode() + b"\0"

    def close(self) -> None:
        self.closed = True

    def detach(self) -> int:
        return 100 + self.unit


def fake_ctliocginfo(fd: int, request: int, arg: bytes) -> bytes:
    assert (fd, request) == (42, darwin.CTLIOCGINFO)
    assert len(arg) == 100 and arg[4:].rstrip(b"\0") == b"com.apple.net.utun_control"
    return (7).to_bytes(4, sys.byteorder) + arg[4:]


def macos(sockets: Any = FakeUtun) -> darwin.DarwinBackend:
    return darwin.DarwinBackend(socket_factory=sockets, ioctl=fake_ctliocginfo)


@pytest.fixture
def utun() -> type[FakeUtun]:
    FakeUtun.busy = set()
    FakeUtun.made = []
    return FakeUtun


def test_parse_utun_name() -> None:
    assert darwin.parse_utun_name("utun0") == 0
    assert darwin.parse_utun_name("utun12") == 12
    for bad in ("tun0", "utun", "utunx", "utun255", "en0"):
        with pytest.raises(UsageError, match="utunN"):
            darwin.parse_utun_name(bad)


def test_utun_auto_picks_first_free(utun: type[FakeUtun]) -> None:
    utun.busy = {1, 2}  # utun0 and utun1 taken
    run = Commands()
    fd, name = macos().open_tun(None, 9000, run)
    assert (fd, name) == (103, "utun2")
    assert [s.closed for s in utun.made] == [True, True, False]
    assert run.calls == [["ifconfig", "utun2", "mtu", "9000"]]


def test_utun_wanted(utun: type[FakeUtun]) -> None:
    backend = macos()
    assert backend.open_tun("utun5", 9000, Commands()) == (106, "utun5")
    utun.busy = {6}
    with pytest.raises(DsvpnError, match="tun device utun5 is busy"):
        backend.open_tun("utun5", 9000, Commands())
    with pytest.raises(UsageError):
        backend.open_tun("tun0", 9000, Commands())


def test_utun_none_free(utun: type[FakeUtun]) -> None:
    utun.busy = set(range(1, 33))
    with pytest.raises(DsvpnError, match="no free utun"):
        macos().open_tun(None, 9000, Commands())


# -- Linux ----------------------------------------------------------------------------------------


def test_linux_check_host(tmp_path: Path) -> None:
    cfg = make_cfg("server")
    dev = tmp_path / "tun"
    everything = linux.LinuxBackend(which=lambda t: f"/sbin/{t}", clone_dev=str(dev))
    with pytest.raises(PrerequisiteError, match=r"does not exist \(try: modprobe tun\)"):
        everything.check_host(cfg)
    dev.touch()
    everything.check_host(cfg)

    # auto: iptables when installed, else nft; neither is a one-line error (exit 69).
    def without(*tools: str) -> linux.LinuxBackend:
        return linux.LinuxBackend(which=lambda t: None if t in tools else t, clone_dev=str(dev))

    without("iptables").check_host(cfg)
    without("nft").check_host(cfg)
    with pytest.raises(
        PrerequisiteError,
        match=r"^neither iptables nor nft found \(install iptables or nftables\)$",
    ) as exc:
        without("iptables", "nft").check_host(cfg)
    assert exc.value.exit_code == 69
    with pytest.raises(PrerequisiteError, match=r"`iptables` not found \(install iptables\)"):
        without("iptables").check_host(dataclasses.replace(cfg, firewall="iptables"))
    with pytest.raises(PrerequisiteError, match=r"`nft` not found \(install nftables\)"):
        without("nft").check_host(dataclasses.replace(cfg, firewall="nft"))
    no_ip = linux.LinuxBackend(which=lambda t: None if t == "ip" else t, clone_dev=str(dev))
    with pytest.raises(PrerequisiteError, match="install iproute2"):
        no_ip.check_host(cfg)


def test_bsd_check_host() -> None:
    with pytest.raises(PrerequisiteError, match="`route` not found"):
        FreeBSDBackend(which=lambda t: None if t == "route" else t).check_host(make_cfg("client"))


def test_linux_open_tun_missing_clone_device(tmp_path: Path) -> None:
    backend = linux.LinuxBackend(clone_dev=str(tmp_path / "nope"))
    with pytest.raises(PrerequisiteError, match="modprobe tun"):
        backend.open_tun(None, 9000, Commands())


def test_linux_open_tun_bad_name() -> None:
    with pytest.raises(UsageError):
        linux.LinuxBackend().open_tun("a-name-that-is-too-long", 9000, Commands())


def test_linux_open_tun_ioctls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = tmp_path / "tun"
    dev.touch()
    seen: list[tuple[int, bytes]] = []

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        seen.append((request, arg))
        if request == linux.TUNSETIFF:
            return b"tun4".ljust(16, b"\0") + arg[16:]
        return arg

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    run = Commands()
    fd, name = linux.LinuxBackend(clone_dev=str(dev)).open_tun(None, 9000, run)
    os.close(fd)
    assert name == "tun4"
    (req1, ifr1), (req2, offloads) = seen
    assert req2 == linux.TUNSETOFFLOAD and offloads == linux.TUN_OFFLOADS | linux.TUN_USO
    assert req1 == linux.TUNSETIFF and len(ifr1) == 40
    assert ifr1[:16] == b"\0" * 16
    assert int.from_bytes(ifr1[16:18], sys.byteorder) == (
        linux.IFF_TUN | linux.IFF_NO_PI | linux.IFF_VNET_HDR
    )
    # The MTU goes through the runner, which prints it as it runs.
    assert run.calls == [["ip", "link", "set", "dev", "tun4", "mtu", "9000"]]


def test_linux_open_tun_without_uso(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel before 6.2 refuses the USO flags: the tun gets TCP offloads only."""
    dev = tmp_path / "tun"
    dev.touch()
    offloads: list[int] = []

    def ioctl(fd: int, request: int, arg: Any) -> Any:
        if request == linux.TUNSETIFF:
            return b"tun4".ljust(16, b"\0") + arg[16:]
        offloads.append(arg)
        if arg & linux.TUN_USO:
            raise OSError(errno.EINVAL, "Invalid argument")
        return 0

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    fd, _ = linux.LinuxBackend(clone_dev=str(dev)).open_tun(None, 9000, Commands())
    os.close(fd)
    assert offloads == [linux.TUN_OFFLOADS | linux.TUN_USO, linux.TUN_OFFLOADS]


def test_linux_open_tun_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = tmp_path / "tun"
    dev.touch()

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    with pytest.raises(DsvpnError, match="tun device tun0 is busy"):
        linux.LinuxBackend(clone_dev=str(dev)).open_tun("tun0", 9000, Commands())

    def eperm(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fcntl, "ioctl", eperm)
    with pytest.raises(PermissionDenied):
        linux.LinuxBackend(clone_dev=str(dev)).open_tun(None, 9000, Commands())


# -- discovery ------------------------------------------------------------------------------------


def make_cfg(mode: str, ext_ip: str | None = None, server_ip: str | None = None) -> Config:
    if mode == "server":
        return ServerConfig(key_file="k", external_ip=ext_ip)
    return ClientConfig(key_file="k", server=server_ip or "h", server_ip=server_ip,
                        gateway_ip=ext_ip)  # fmt: skip


class FakeNetifaces:
    AF_INET = 2
    AF_INET6 = 10

    def __init__(self, default: dict[int, tuple[str, str]] | None = None) -> None:
        self.default = {} if default is None else default

    def gateways(self) -> dict[Any, Any]:
        return {"default": self.default}

    def interfaces(self) -> list[str]:
        return ["lo", "eth0", "eth1"]

    def ifaddresses(self, name: str) -> dict[int, list[dict[str, str]]]:
        return {
            "lo": {2: [{"addr": "127.0.0.1", "netmask": "255.0.0.0"}]},
            "eth0": {2: [{"addr": "192.0.2.2", "netmask": "255.255.255.0"}],
                     10: [{"addr": "2001:db8::2", "netmask": "ffff:ffff:ffff:ffff::/64"}]},
            "eth1": {2: [{"addr": "10.0.0.5", "netmask": "255.255.0.0"}]},
        }[name]  # fmt: skip


DEFAULTS = {2: ("192.0.2.1", "eth0"), 10: ("2001:db8::1", "eth0")}


def test_discover_server_default() -> None:
    assert discover(make_cfg("server"), FakeNetifaces(DEFAULTS)) == NetInfo(
        "eth0", "192.0.2.1", ext_if6="eth0"
    )
    # The IPv6 route out may leave through another interface, or there may be none.
    ni = FakeNetifaces({2: ("192.0.2.1", "eth0"), 10: ("fe80::1", "eth1")})
    assert discover(make_cfg("server"), ni) == NetInfo("eth0", "192.0.2.1", ext_if6="eth1")
    ni = FakeNetifaces({2: ("192.0.2.1", "eth0")})
    assert discover(make_cfg("server"), ni) == NetInfo("eth0", "192.0.2.1", ext_if6=None)


def test_discover_server_ext_ip() -> None:
    ni = FakeNetifaces(DEFAULTS)
    assert discover(make_cfg("server", ext_ip="10.0.0.5"), ni) == NetInfo(
        "eth1", "192.0.2.1", ext_if6="eth0"
    )
    # An external IPv6 address names the interface of both families.
    assert discover(make_cfg("server", ext_ip="2001:db8::2"), ni) == NetInfo(
        "eth0", "2001:db8::1", ext_if6="eth0"
    )
    with pytest.raises(NetworkError, match=r"no interface has the external address 10\.9\.9\.9"):
        discover(make_cfg("server", ext_ip="10.9.9.9"), ni)


def test_discover_no_default_route() -> None:
    with pytest.raises(NetworkError, match=r"no default route \(IPv4 or IPv6\)"):
        discover(make_cfg("server"), FakeNetifaces())
    with pytest.raises(
        NetworkError, match=r"no default IPv4 route towards the server 203\.0\.113\.5"
    ):
        discover(make_cfg("client", server_ip="203.0.113.5"), FakeNetifaces())


def test_discover_client() -> None:
    # The other family's default gateway comes along (macOS/BSD route --exclude through it).
    ni = FakeNetifaces(DEFAULTS)
    assert discover(make_cfg("client", server_ip="203.0.113.5"), ni) == NetInfo(
        "eth0", "192.0.2.1", other_gateway="2001:db8::1"
    )
    assert discover(make_cfg("client", server_ip="2001:db8:5::5"), ni) == NetInfo(
        "eth0", "2001:db8::1", other_gateway="192.0.2.1"
    )
    # An explicit gateway: the interface whose subnet holds it.
    assert discover(make_cfg("client", "10.0.200.1", "203.0.113.5"), ni) == NetInfo(
        "eth1", "10.0.200.1", other_gateway="2001:db8::1"
    )
    only4 = FakeNetifaces({2: DEFAULTS[2]})
    assert discover(make_cfg("client", server_ip="203.0.113.5"), only4).other_gateway == ""


def test_discover_via_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "_netifaces", lambda: FakeNetifaces(DEFAULTS))
    backend = platform.by_name("linux")
    assert backend.discover(make_cfg("server")) == NetInfo("eth0", "192.0.2.1", "eth0")
    assert backend.placeholder_net() == NetInfo(
        "<ext-if>", "<gateway>", other_gateway="<other-gateway>"
    )
    # The client has no use for the IPv6 route out (its other family's gateway it has).
    assert backend.discover(make_cfg("client", server_ip="203.0.113.5")) == NetInfo(
        "eth0", "192.0.2.1", other_gateway="2001:db8::1"
    )


@pytest.mark.parametrize(("accept_ra", "keeps"), [("1", True), ("0", False), ("2", True)])
def test_linux_discover_reads_accept_ra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accept_ra: str, keeps: bool
) -> None:
    monkeypatch.setattr(_common, "_netifaces", lambda: FakeNetifaces(DEFAULTS))
    conf = tmp_path / "net" / "ipv6" / "conf" / "eth0"
    conf.mkdir(parents=True)
    (conf / "accept_ra").write_text(accept_ra + "\n")
    backend = linux.LinuxBackend(proc_sys=str(tmp_path))
    assert backend.discover(make_cfg("server")) == NetInfo("eth0", "192.0.2.1", "eth0", keeps)
    # An interface without the file (IPv6 off on it) counts as not taking advertisements.
    (conf / "accept_ra").unlink()
    assert not backend.discover(make_cfg("server")).ext6_accepts_ra


def test_local_networks() -> None:
    # Loopback is left out; IPv4 sorted before IPv6.
    assert _common.local_networks(FakeNetifaces()) == (
        "10.0.0.0/16",
        "192.0.2.0/24",
        "2001:db8::/64",
    )


# -- the config as each OS runs it ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("linux", "a-fifteen-chars", "-looks-like-opt"),
        ("macos", "utun3", "tun0"),
        ("openbsd", "tun3", "utun3"),
        ("freebsd", "tun255", "tun256"),
    ],
)
def test_prepare_checks_the_tun_name_and_sets_the_mtu(name: str, good: str, bad: str) -> None:
    backend = platform.by_name(name)
    cfg = backend.prepare(ServerConfig(key_file="k", tun_name=good, mtu=1))
    assert cfg.mtu == backend.default_mtu and cfg.tun_name == good
    with pytest.raises(UsageError, match="invalid tun device name"):
        backend.prepare(ServerConfig(key_file="k", tun_name=bad))
    assert backend.prepare(ClientConfig(key_file="k", server="h")).mtu == backend.default_mtu


def test_linux_prepare_checks_the_tun_name_for_the_nft_table() -> None:
    def backend(*installed: str) -> linux.LinuxBackend:
        return linux.LinuxBackend(which=lambda t: f"/sbin/{t}" if t in installed else None)

    cfg = ServerConfig(key_file="k", tun_name="vpn@1")  # a tun name, but no nft identifier
    backend("iptables", "nft").prepare(cfg)
    for nft, with_cfg in (
        (backend("nft"), cfg),
        (backend(), dataclasses.replace(cfg, firewall="nft")),
    ):
        with pytest.raises(UsageError, match=r"tun name 'vpn@1' cannot name an nft table"):
            nft.prepare(with_cfg)
    backend("nft").prepare(dataclasses.replace(cfg, tun_name="vpn-1"))


def test_linux_tun_name_error_says_fifteen() -> None:
    with pytest.raises(UsageError, match="at most 15 characters"):
        linux.LinuxBackend().check_tun_name("x" * 16)


# -- platform/ depends on nothing of dsvpn but the plan, the config and the errors ----------------

ALLOWED = {"dsvpn.plan", "dsvpn.config", "dsvpn.errors"}


def test_platform_imports_only_plan_config_and_errors() -> None:
    package = Path(platform.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 6
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                names = [node.module or ""]
                if node.module == "dsvpn":
                    names = [f"dsvpn.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name == "dsvpn" or name.startswith("dsvpn."):
                    ok = name in ALLOWED or name.startswith("dsvpn.platform")
                    assert ok, f"{path.name} imports {name}"
