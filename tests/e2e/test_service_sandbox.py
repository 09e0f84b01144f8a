"""dsvpn under the unit's hardening: each line of dsvpn@.service is in force, and dsvpn works.

systemd cannot run here, so tests/e2e/sandbox.py applies the unit's [Service] section with the
kernel mechanisms systemd uses (capability bounding set, no_new_privs, a private mount
namespace, a devices cgroup, seccomp). The server and the client run the unit's own ExecStart
(`dsvpn service run home`, reading /etc/dsvpn/home.args), `dsvpn cleanup` its ExecStopPost.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsvpn import service, testbed

SANDBOX = Path(__file__).with_name("sandbox.py")


def _missing() -> str | None:
    here = os.path.realpath(sys.prefix)
    if any(here == d or here.startswith(d + "/") for d in ("/tmp", "/var/tmp")):
        # PrivateTmp hides it from the service (and `dsvpn service install` refuses it).
        return f"this installation lives under a temporary directory ({here})"
    for tool in ("unshare", "systemd-analyze"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h").exists():
        return "needs the x86-64 system call table (linux-libc-dev) for the seccomp filter"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "needs overlayfs"
    return None


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(_missing() is not None, reason=f"sandbox: {_missing()}"),
]
SHM = Path("/dev/shm")  # logs and reports: an open file on / would keep it writable

# What a process in the sandbox tries, and what it got (ok or the errno name).
PROBE = r"""
import ctypes, errno, json, mmap, os, socket, sys
r = {}
def t(name, f):
    try:
        f()
        r[name] = "ok"
    except OSError as e:
        r[name] = errno.errorcode.get(e.errno, str(e.errno))
libc = ctypes.CDLL(None, use_errno=True)
def c(name, rc):
    r[name] = "ok" if rc != -1 else errno.errorcode.get(ctypes.get_errno(), "?")
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
              if ":\t" in line)
r["CapBnd"] = int(status["CapBnd"], 16)
r["NoNewPrivs"] = status["NoNewPrivs"].strip()
r["Seccomp"] = status["Seccomp"].strip()
t("write /etc", lambda: open("/etc/dsvpn-sandbox-probe", "w"))
t("write /usr", lambda: open("/usr/dsvpn-sandbox-probe", "w"))
t("write /run", lambda: open("/run/dsvpn-sandbox-probe", "w"))
probe = f"/run/dsvpn/sandbox-probe-{os.getpid()}"
t("write /run/dsvpn", lambda: (open(probe, "w").close(), os.unlink(probe)))
t("write /tmp", lambda: open("/tmp/probe", "w").close())
r["/tmp entries"] = len(os.listdir("/tmp")) - 1
t("list /root", lambda: os.listdir("/root"))
t("write /root", lambda: open("/root/dsvpn-sandbox-probe", "w"))
t("mkdir cgroup", lambda: os.mkdir("/sys/fs/cgroup/dsvpn-sandbox-probe"))
t("read /dev/kmsg", lambda: os.close(os.open("/dev/kmsg", os.O_RDONLY)))
t("socket AF_PACKET", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
t("socket AF_NETLINK", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
t("open /dev/net/tun", lambda: os.close(os.open("/dev/net/tun", os.O_RDWR)))
t("open /dev/null", lambda: os.close(os.open("/dev/null", os.O_RDWR)))
t("open /dev/loop-control", lambda: os.close(os.open("/dev/loop-control", os.O_RDWR)))
c("personality", libc.personality(0x0400000))
c("unshare", libc.unshare(0x40000000))
c("sethostname", libc.sethostname(b"x", 1))
t("mmap W+X", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC))
t("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, 0, 0))
t("chmod u+s", lambda: (open("/tmp/s", "w").close(), os.chmod("/tmp/s", 0o4755)))
c("clock_settime", libc.clock_settime(0, (ctypes.c_long * 2)(0, 0)))
c("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
def bpf_load():  # a socket filter "return 0", as the workers' tun steering loads (x86-64 bpf())
    insns = (ctypes.c_uint64 * 2)(0xb7, 0x95)
    license = ctypes.create_string_buffer(b"MIT")
    attr = (ctypes.c_uint64 * 16)()
    attr[0] = 1 | 2 << 32  # BPF_PROG_TYPE_SOCKET_FILTER, two instructions
    attr[1], attr[2] = ctypes.addressof(insns), ctypes.addressof(license)
    fd = libc.syscall(321, 5, ctypes.byref(attr), 128)  # BPF_PROG_LOAD
    if fd >= 0:
        os.close(fd)
    return fd
c("bpf socket filter", bpf_load())
print(json.dumps(r))
"""

EXPECTED = {
    "NoNewPrivs": "1",
    "Seccomp": "2",
    "write /etc": "EROFS",
    "write /usr": "EROFS",
    "write /run": "EROFS",
    "write /run/dsvpn": "ok",
    "write /tmp": "ok",
    "/tmp entries": 0,  # a /tmp of its own
    "mkdir cgroup": "EROFS",
    "read /dev/kmsg": "EACCES",
    "socket AF_PACKET": "EAFNOSUPPORT",
    "socket AF_NETLINK": "ok",
    "open /dev/net/tun": "ok",
    "open /dev/null": "ok",
    "bpf socket filter": "ok",  # CAP_BPF and bpf(): the workers' tun steering
    "personality": "EPERM",
    "unshare": "EPERM",
    "sethostname": "EPERM",
    "mmap W+X": "EPERM",
    "setpriority": "EPERM",
    "chmod u+s": "EPERM",
    "clock_settime": "EPERM",
    "mount": "EPERM",
}


def _exec_argv(value: str, instance: str) -> list[str]:
    """An Exec*= line of the unit as argv, with %i filled in (systemd's own splitting)."""
    words = shlex.split(value.lstrip("+-@:!"))
    return [w.replace("%i", instance).replace("%%", "%") for w in words]


class Sandbox:
    """Starts commands in a testbed namespace under the unit's hardening."""

    def __init__(self, tb: testbed.Testbed, unit: Path, provide: list[tuple[Path, str]]) -> None:
        self.tb = tb
        self.unit = unit
        self.provide = provide
        self.token = f"dsvpn-sandbox-{os.getpid()}-{secrets.token_hex(3)}"
        self.cgroups: list[str] = []
        self.files: list[Path] = []
        self.reports: list[Path] = []

    def argv(self, command: list[str]) -> list[str]:
        n = len(self.cgroups)
        cgroup = f"{self.token}-{n}"
        self.cgroups.append(cgroup)
        report = SHM / f"{cgroup}.json"
        self.files.append(report)
        self.reports.append(report)
        provide = [x for src, dst in self.provide for x in ("--provide", f"{src}:{dst}")]
        return [
            "unshare", "--mount", "--uts", "--propagation", "private",
            sys.executable, str(SANDBOX), "--cgroup", cgroup, "--report", str(report),
            *provide, str(self.unit), "--", *command,
        ]  # fmt: skip

    def start(self, ns: testbed.Netns, command: list[str], name: str) -> testbed.Proc:
        log = SHM / f"{self.token}-{name}.log"
        self.files.append(log)
        proc = testbed.Proc(name, ns, self.argv(command), log, env=testbed.python_env())
        self.tb.procs.append(proc)
        return proc

    def run(self, ns: testbed.Netns, command: list[str]) -> subprocess.CompletedProcess[str]:
        return ns.run(self.argv(command), check=False, timeout=60, env=testbed.python_env())

    def report(self, index: int = -1) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.reports[index].read_text())
        return data

    def close(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
        for name in self.cgroups:
            group = Path("/sys/fs/cgroup/devices") / name
            if group.is_dir():
                group.rmdir()


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    path = tmp_path / "dsvpn@.service"
    path.write_text(service.systemd_unit(service.dsvpn_command(), service.protect_home()))
    return path


@pytest.fixture
def sandbox(tb: testbed.Testbed, unit: Path, tmp_path: Path) -> Iterator[Sandbox]:
    key = tb.write_key()
    args = tmp_path / "args"
    args.write_text(
        service.args_text("home", ["server", "/etc/dsvpn/vpn.key", "auto", "443", "-v"])
    )
    client_args = tmp_path / "client-args"
    assert tb.server.ip
    client_args.write_text(
        service.args_text("home", ["client", "/etc/dsvpn/vpn.key", tb.server.ip, "443", "-v"])
    )
    box = Sandbox(tb, unit, [(key, "/etc/dsvpn/vpn.key"), (args, "/etc/dsvpn/home.args")])
    box.client_provide = [(key, "/etc/dsvpn/vpn.key"), (client_args, "/etc/dsvpn/home.args")]  # type: ignore[attr-defined]
    yield box
    for proc in tb.procs:
        if proc.alive():
            proc.kill()
    box.close()


def _directives(unit: Path) -> dict[str, str]:
    found = {}
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            found[key] = value
    return found


def test_every_directive_is_in_force(tb: testbed.Testbed, sandbox: Sandbox, unit: Path) -> None:
    done = sandbox.run(tb.server, [sys.executable, "-c", PROBE])
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    report = sandbox.report()
    skipped = report["skipped"]
    directives = _directives(unit)
    # Nothing of the unit is left out but supervision, and only for a reason.
    assert set(report["applied"]) | set(skipped) | set(report["supervision"]) == set(directives)
    assert set(skipped) <= {"DevicePolicy", "DeviceAllow"}, skipped

    # NET_BIND_SERVICE, ADMIN, RAW, BPF
    assert got["CapBnd"] == (1 << 10) | (1 << 12) | (1 << 13) | (1 << 39)
    expected = dict(EXPECTED)
    if directives["ProtectHome"] == "yes":
        expected["list /root"] = "EACCES"
    else:  # read-only: this Python lives in a home directory
        expected["write /root"] = "EROFS"
    if not skipped and Path("/dev/loop-control").exists():
        expected["open /dev/loop-control"] = "EPERM"  # DevicePolicy=closed
    wrong = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    assert not wrong, f"(got, expected): {wrong}"


def test_tunnel_works_and_cleans_up_under_the_unit(
    tb: testbed.Testbed, sandbox: Sandbox, unit: Path
) -> None:
    directives = _directives(unit)
    start = _exec_argv(directives["ExecStart"], "home")
    stop_post = _exec_argv(directives["ExecStopPost"], "home")
    assert start[-3:] == ["service", "run", "home"] and stop_post[-1] == "cleanup"
    before = tb.snapshots()

    server = sandbox.start(tb.server, start, "server")
    tb.wait_listening(server, 443)
    client_box = Sandbox(tb, unit, sandbox.client_provide)  # type: ignore[attr-defined]
    try:
        client = client_box.start(tb.client, start, "client")
        assert tb.inet.ip
        tb.client.wait_ping(tb.inet.ip, 30, procs=(server, client))
        tb.check_transfer_through_vpn(tb.client, 20_000_000)
        assert client.stop(signal.SIGTERM) == 0, client.log_tail()
        assert server.stop(signal.SIGTERM) == 0, server.log_tail()
        assert not tb.changes(before), tb.changes(before)

        # A crash: the unit's ExecStopPost undoes what the dead server left.
        server = sandbox.start(tb.server, start, "server-crash")
        tb.wait_listening(server, 443)
        tb.wait_log(server, "listening on")
        server.kill()
        assert testbed.count_rules(tb.server, "MASQUERADE") == 1
        done = sandbox.run(tb.server, stop_post)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "undoing what dsvpn PID" in done.stdout + done.stderr
        assert not tb.changes(before), tb.changes(before)
    finally:
        for proc in tb.procs:
            if proc.alive():
                proc.kill()
        client_box.close()
