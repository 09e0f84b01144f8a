"""Run a command under the sandbox a systemd unit's [Service] section describes, without systemd.

    unshare --mount --uts --propagation private python sandbox.py [options] UNIT -- COMMAND...

The tests cannot run systemd here (it is not PID 1, and booting one in a namespace would touch
the host's cgroups), so this applies each hardening directive of the unit the way systemd
does, with the same kernel mechanisms: the capability bounding set and no_new_privs (prctl),
the file system view (a private mount namespace: read-only remounts, tmpfs, inaccessible
paths), the device policy (a devices cgroup of its own, cgroup v1), and the seccomp filter
(system call allow and deny lists, address families, personality, W^X, namespaces, realtime,
set-user-ID bits) built from `systemd-analyze syscall-filter` and the kernel's system call
numbers. A directive it does not know makes it fail, so that no line of the unit goes
untested; supervision settings (Restart=, WatchdogSec=, ...) are listed and left to systemd.

Options: --provide SRC:DST puts a copy of file SRC at DST (DST's directory becomes a tmpfs
first), as a key in /etc/dsvpn would be; --cgroup NAME names the devices cgroup;
--report FILE writes the directives applied and skipped (JSON).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

# Supervision, not confinement: systemd's business, not the process's view of the host.
SUPERVISION = {
    "Type",
    "NotifyAccess",
    "TimeoutStartSec",
    "WatchdogSec",
    "ExecStartPre",
    "ExecStart",
    "ExecStopPost",
    "Restart",
    "RestartSec",
    "RestartPreventExitStatus",
    "KillMode",
    "SyslogIdentifier",
    "RuntimeDirectoryMode",
    "RuntimeDirectoryPreserve",
}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
SCRATCH = "/mnt"  # an empty directory of the host, covered by a private tmpfs
CAPS = {
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_BPF": 39,
}


def fail(message: str) -> None:
    print(f"sandbox: {message}", file=sys.stderr)
    sys.exit(99)


def parse_unit(path: str) -> list[tuple[str, str]]:
    directives, section = [], ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            directives.append((key, value))
    return directives


# -- mounts -------------------------------------------------------------------------------------


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = [None if x is None else x.encode() for x in (src, target, fstype)]
    opts = data.encode() if data else None
    if libc.mount(enc[0], enc[1], enc[2], flags, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def mounts() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) from /proc/self/mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        out.append((point, set(fields[5].split(","))))
    return out


def remount_ro(point: str, options: set[str]) -> bool:
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for name, bit in MOUNT_FLAGS.items():
        if name in options:
            flags |= bit
    try:
        mount(None, point, None, flags)
    except OSError:
        return False  # a mount point shadowed by a later mount, or a special one
    return True


def under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def inaccessible_dir(path: str) -> None:
    if os.path.isdir(path):
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=000")
        mount(None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def inaccessible_file(path: str, empty: str) -> None:
    if os.path.exists(path):
        mount(empty, path, None, MS_BIND)


def provide_files(provide: list[tuple[str, str]]) -> None:
    """Copies of files at paths of the host's tree, visible in this mount namespace only: each
    target directory becomes a tmpfs; one that does not exist is made in an overlay of its
    nearest existing parent (nothing is written to the host's file systems)."""
    by_dir: dict[str, list[tuple[str, str]]] = {}
    for src, dst in provide:
        by_dir.setdefault(os.path.dirname(dst), []).append((src, dst))
    scratch = SCRATCH
    for n, (parent, files) in enumerate(by_dir.items()):
        if not os.path.isdir(parent):
            lower = parent
            while not os.path.isdir(lower):
                lower = os.path.dirname(lower)
            upper, work = f"{scratch}/{n}/upper", f"{scratch}/{n}/work"
            os.makedirs(upper)
            os.makedirs(work)
            layers = f"lowerdir={lower},upperdir={upper},workdir={work}"
            mount("overlay", lower, "overlay", 0, layers)
            os.makedirs(parent, mode=0o755)
        mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        for src, dst in files:
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)


# -- the devices cgroup ---------------------------------------------------------------------


def device_rule(spec: str, access: str) -> str:
    if spec.startswith("char-"):
        major = next(
            (
                line.split()[0]
                for line in Path("/proc/devices").read_text().splitlines()
                if line.split()[1:] == [spec[5:]]
            ),
            None,
        )
        return f"c {major}:* {access}" if major else ""
    st = os.stat(spec)
    kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
    return f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} {access}"


def join_devices_cgroup(name: str, allow: list[str]) -> str:
    base = Path("/sys/fs/cgroup/devices")
    if not (base / "devices.allow").exists():
        # `ip netns exec` mounts a fresh /sys without the cgroup file systems: mount the
        # devices hierarchy again (the same hierarchy) in this private mount namespace.
        if "devices" not in Path("/proc/cgroups").read_text():
            return "no cgroup v1 devices controller"
        mount("tmpfs", "/sys/fs/cgroup", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755")
        base.mkdir()
        try:
            mount("cgroup", str(base), "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, "devices")
        except OSError as exc:
            return f"no cgroup v1 devices controller ({exc})"
    group = base / name
    group.mkdir()
    (group / "devices.deny").write_text("a\n")
    # DevicePolicy=closed: the standard pseudo devices, then DeviceAllow= and what implies it.
    closed = [
        "c 1:3 rwm",
        "c 1:5 rwm",
        "c 1:7 rwm",
        "c 1:8 rwm",
        "c 1:9 rwm",
        "c 5:0 rwm",
        "c 5:2 rwm",
        "c 136:* rw",
    ]
    for rule in closed + [r for r in allow if r]:
        (group / "devices.allow").write_text(rule + "\n")
    (group / "cgroup.procs").write_text(str(os.getpid()))
    return ""


# -- seccomp ------------------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
LD_W_ABS, ALU_AND_K, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x54, 0x15, 0x35, 0x45, 0x06
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def syscall_numbers() -> dict[str, int]:
    text = UNISTD.read_text()
    return {m[0]: int(m[1]) for m in re.findall(r"#define __NR_(\w+)\s+(\d+)", text)}


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if line.startswith("@"):
            current = word
            groups[current] = []
        elif current is not None:
            groups[current].append(word)
    return groups


def expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for item in items:
        out |= expand(groups[item], groups) if item.startswith("@") else {item}
    return out


class Program:
    """Classic BPF with forward jumps to labels."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def bytes(self) -> bytes:
        out = b""
        for i, (code, jt, jf, k) in enumerate(self.code):

            def rel(target: object, i: int = i) -> int:
                if isinstance(target, str):
                    off = self.labels[target] - i - 1
                    assert 0 <= off < 256, (target, off)
                    return off
                assert isinstance(target, int)
                return target

            out += struct.pack("=HBBI", code, rel(jt), rel(jf), k & 0xFFFFFFFF)
        return out


def arg(i: int) -> int:
    return 16 + 8 * i  # low 32 bits of seccomp_data.args[i] (little endian)


def seccomp_program(d: dict[str, list[str]], applied: list[str]) -> bytes:
    nr = syscall_numbers()
    groups = syscall_groups()
    errno_default = getattr(errno, d.get("SystemCallErrorNumber", ["EPERM"])[-1])
    # As systemd reads the lines, in order: the first makes the list an allow list (or, with
    # "~", a deny list); each later line adds to that list, or with the other sign takes away.
    listed: set[str] = set()
    allow_list: bool | None = None
    for value in d.get("SystemCallFilter", []):
        invert = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        if allow_list is None:
            allow_list = not invert
        if allow_list != invert:
            listed |= names
        else:
            listed -= names
    allowed: set[str] | None = listed if allow_list else None
    denied: set[str] = set() if allow_list or allow_list is None else listed
    if "SystemCallFilter" in d:
        applied.append("SystemCallFilter")
    # What other directives add to the deny list, as systemd does.
    implied = {
        "ProtectClock": ["@clock"],
        "ProtectKernelModules": ["@module"],
        "ProtectHostname": ["sethostname", "setdomainname"],
        "ProtectKernelLogs": ["syslog"],
    }
    for key, items in implied.items():
        if d.get(key, ["no"])[-1] == "yes":
            denied |= expand(items, groups)

    p = Program()
    p.op(LD_W_ABS, 4)  # arch
    if d.get("SystemCallArchitectures", [""])[-1] == "native":
        p.op(JEQ_K, AUDIT_ARCH_X86_64, 1, 0)
        p.op(RET_K, RET_KILL_PROCESS)
        applied.append("SystemCallArchitectures")
    p.op(LD_W_ABS, 0)
    p.op(JGE_K, 0x40000000, 0, 1)  # x32 system calls
    p.op(RET_K, RET_ERRNO | errno_default)

    def block(name: str, body: list[tuple[int, int, object, object]], label: str) -> None:
        """if nr == name: run body (which returns or falls through to `label`)."""
        if name not in nr:
            return
        p.op(LD_W_ABS, 0)
        p.op(JEQ_K, nr[name], 0, label)
        for code, k, jt, jf in body:
            p.op(code, k, jt, jf)
        p.label(label)

    def deny_bits(name: str, index: int, mask: int, err: int, tag: str) -> None:
        block(
            name,
            [
                (LD_W_ABS, arg(index), 0, 0),
                (JSET_K, mask, 0, tag + "-ok"),
                (RET_K, RET_ERRNO | err, 0, 0),
            ],
            tag + "-ok",
        )

    if "RestrictAddressFamilies" in d:
        families = [getattr(socket, f) for f in d["RestrictAddressFamilies"][-1].split()]
        body: list[tuple[int, int, object, object]] = [(LD_W_ABS, arg(0), 0, 0)]
        body += [(JEQ_K, int(f), "socket-ok", 0) for f in families]
        body += [(RET_K, RET_ERRNO | errno.EAFNOSUPPORT, 0, 0)]
        block("socket", body, "socket-ok")
        applied.append("RestrictAddressFamilies")
    if d.get("LockPersonality", ["no"])[-1] == "yes":
        block(
            "personality",
            [
                (LD_W_ABS, arg(0), 0, 0),
                (JEQ_K, 0, "pers-ok", 0),
                (JEQ_K, 0xFFFFFFFF, "pers-ok", 0),
                (RET_K, RET_ERRNO | errno.EPERM, 0, 0),
            ],
            "pers-ok",
        )
        applied.append("LockPersonality")
    if d.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        wx = 0x2 | 0x4  # PROT_WRITE | PROT_EXEC
        block(
            "mmap",
            [
                (LD_W_ABS, arg(2), 0, 0),
                (ALU_AND_K, wx, 0, 0),
                (JEQ_K, wx, 0, "mmap-ok"),
                (RET_K, RET_ERRNO | errno.EPERM, 0, 0),
            ],
            "mmap-ok",
        )
        deny_bits("mprotect", 2, 0x4, errno.EPERM, "mprotect")
        deny_bits("pkey_mprotect", 2, 0x4, errno.EPERM, "pkey")
        deny_bits("shmat", 2, 0o100000, errno.EPERM, "shmat")  # SHM_EXEC
        applied.append("MemoryDenyWriteExecute")
    if d.get("RestrictNamespaces", ["no"])[-1] == "yes":
        new_ns = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
        new_ns |= 0x40000000 | 0x80
        deny_bits("clone", 0, new_ns, errno.EPERM, "clone")
        for name in ("unshare", "setns"):
            block(name, [(RET_K, RET_ERRNO | errno.EPERM, 0, 0)], name + "-ok")
        # systemd cannot look into clone3's flags: it makes glibc fall back to clone.
        block("clone3", [(RET_K, RET_ERRNO | errno.ENOSYS, 0, 0)], "clone3-ok")
        applied.append("RestrictNamespaces")
    if d.get("RestrictRealtime", ["no"])[-1] == "yes":
        # sched_setscheduler(pid, policy, ...) with SCHED_FIFO (1), SCHED_RR (2), SCHED_DEADLINE (6)
        body = [
            (LD_W_ABS, arg(1), 0, 0),
            (JEQ_K, 1, 2, 0),
            (JEQ_K, 2, 1, 0),
            (JEQ_K, 6, 0, 1),
            (RET_K, RET_ERRNO | errno.EPERM, 0, 0),
        ]
        block("sched_setscheduler", body, "rt-ok")
        block("sched_setattr", [(RET_K, RET_ERRNO | errno.EPERM, 0, 0)], "rt2-ok")
        applied.append("RestrictRealtime")
    if d.get("RestrictSUIDSGID", ["no"])[-1] == "yes":
        suid = 0o6000
        for name, index in (
            ("chmod", 1),
            ("fchmod", 1),
            ("fchmodat", 2),
            ("open", 2),
            ("openat", 3),
            ("creat", 1),
            ("mkdir", 1),
            ("mkdirat", 2),
            ("mknod", 1),
            ("mknodat", 2),
        ):
            deny_bits(name, index, suid, errno.EPERM, "suid-" + name)
        applied.append("RestrictSUIDSGID")

    p.op(LD_W_ABS, 0)
    for name in sorted(denied):
        if name in nr:
            p.op(JEQ_K, nr[name], 0, 1)
            p.op(RET_K, RET_ERRNO | errno_default)
    if allowed is None:
        p.op(RET_K, RET_ALLOW)
    else:
        for name in sorted(allowed - denied):
            if name in nr:
                p.op(JEQ_K, nr[name], 0, 1)
                p.op(RET_K, RET_ALLOW)
        p.op(RET_K, RET_ERRNO | errno_default)
    return p.bytes()


def install_seccomp(program: bytes) -> None:
    n = len(program) // 8
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxQ", n, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf), 0, 0) != 0:
        fail(f"seccomp: {os.strerror(ctypes.get_errno())}")


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--")
    opts, command = argv[:cut], argv[cut + 1 :]
    provide: list[tuple[str, str]] = []
    cgroup_name = f"dsvpn-sandbox-{os.getpid()}"
    report_path = None
    unit = None
    it = iter(opts)
    for o in it:
        if o == "--provide":
            src, dst = next(it).split(":", 1)
            provide.append((src, dst))
        elif o == "--cgroup":
            cgroup_name = next(it)
        elif o == "--report":
            report_path = next(it)
        else:
            unit = o
    assert unit and command
    # Opened now: PrivateTmp= hides where it is. (Not on the root file system: an open file
    # would keep it from becoming read-only.)
    report = open(report_path, "w") if report_path else None  # noqa: SIM115
    entries = parse_unit(unit)
    d: dict[str, list[str]] = {}
    for key, value in entries:
        d.setdefault(key, []).append(value)
    applied: list[str] = []
    skipped: dict[str, str] = {}
    yes = {k for k, v in d.items() if v[-1] == "yes"}

    # Devices first: the cgroup file system becomes read-only below.
    if "DevicePolicy" in d:
        if d["DevicePolicy"][-1] != "closed":
            fail("only DevicePolicy=closed is emulated")
        rules = [device_rule(*v.split()) for v in d.get("DeviceAllow", [])]
        if "ProtectClock" in yes:
            rules.append(device_rule("char-rtc", "r"))
        why = join_devices_cgroup(cgroup_name, rules)
        if why:
            skipped["DevicePolicy"] = skipped["DeviceAllow"] = why
        else:
            applied += ["DevicePolicy", "DeviceAllow"]

    # Scratch space of this mount namespace only: nothing is written to the host's files.
    mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    empty = f"{SCRATCH}/empty"
    Path(empty).write_text("")
    os.chmod(empty, 0)

    # RuntimeDirectory= and ReadWritePaths= stay writable under ProtectSystem=strict.
    writable = []
    for name in d.get("RuntimeDirectory", []):
        path = f"/run/{name}"
        os.makedirs(path, mode=0o700, exist_ok=True)
        writable.append(path)
        applied.append("RuntimeDirectory")
    for value in d.get("ReadWritePaths", []):
        for path in value.split():
            optional = path.startswith("-")
            path = path.lstrip("-")
            if os.path.exists(path):
                writable.append(path)
            elif not optional:
                fail(f"ReadWritePaths: {path} does not exist")
        applied.append("ReadWritePaths")
    for path in writable:
        mount(path, path, None, MS_BIND)

    provide_files(provide)
    if "ProtectProc" in d:
        mount(
            "proc",
            "/proc",
            "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            f"hidepid={d['ProtectProc'][-1]}",
        )
        applied.append("ProtectProc")
    if d.get("ProtectSystem", [""])[-1] == "strict":
        keep = ("/proc", "/sys", "/dev", *writable)
        for point, options in mounts():
            if not under(point, keep):
                remount_ro(point, options)
        # A file open for writing on a mount keeps it writable (EBUSY): fail, not pretend.
        for path in ("/", "/usr", "/etc", "/var", "/run"):
            if not os.statvfs(path).f_flag & os.ST_RDONLY:
                fail(f"ProtectSystem: {path} is still writable (a file open for writing there?)")
        applied.append("ProtectSystem")
    if "ProtectControlGroups" in yes:
        for point, options in mounts():
            if under(point, ("/sys/fs/cgroup",)):
                remount_ro(point, options)
        applied.append("ProtectControlGroups")
    home = d.get("ProtectHome", ["no"])[-1]
    if home == "yes":
        for path in ("/home", "/root", "/run/user"):
            inaccessible_dir(path)
        applied.append("ProtectHome")
    elif home == "read-only":
        for point, options in mounts():
            if under(point, ("/home", "/root", "/run/user")):
                remount_ro(point, options)
        applied.append("ProtectHome")
    if "PrivateTmp" in yes:
        for path in ("/tmp", "/var/tmp"):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        applied.append("PrivateTmp")
    if "PrivateMounts" in yes:
        applied.append("PrivateMounts")  # this very mount namespace
    if "ProtectKernelModules" in yes:
        for path in ("/usr/lib/modules", "/lib/modules"):
            inaccessible_dir(path)
        applied.append("ProtectKernelModules")
    if "ProtectKernelLogs" in yes:
        for path in ("/proc/kmsg", "/dev/kmsg"):
            inaccessible_file(path, empty)
        applied.append("ProtectKernelLogs")
    if "ProtectClock" in yes:
        applied.append("ProtectClock")  # CAP_SYS_TIME is outside the bounding set; seccomp
    if "ProtectHostname" in yes:
        applied.append("ProtectHostname")  # `unshare --uts`, and seccomp
    if "UMask" in d:
        os.umask(int(d["UMask"][-1], 8))
        applied.append("UMask")
    if "CapabilityBoundingSet" in d:
        keep_caps = {CAPS[c] for c in d["CapabilityBoundingSet"][-1].split()}
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        for cap in range(last + 1):
            if cap not in keep_caps and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                fail(f"cannot drop capability {cap}")
        applied.append("CapabilityBoundingSet")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        fail("no_new_privs")
    if "NoNewPrivileges" in yes:
        applied.append("NoNewPrivileges")
    if UNISTD.exists() and shutil.which("systemd-analyze"):
        program = seccomp_program(d, applied)
        applied.append("SystemCallErrorNumber")
    else:
        program = b""
        for key in (
            "SystemCallFilter",
            "SystemCallArchitectures",
            "RestrictAddressFamilies",
            "LockPersonality",
            "MemoryDenyWriteExecute",
            "RestrictNamespaces",
            "RestrictRealtime",
            "RestrictSUIDSGID",
            "SystemCallErrorNumber",
        ):
            if key in d:
                skipped[key] = "no syscall table or systemd-analyze here"

    unknown = sorted(set(d) - set(applied) - set(skipped) - SUPERVISION)
    if unknown:
        fail(f"not emulated: {', '.join(unknown)}")
    if report is not None:
        json.dump(
            {
                "applied": sorted(set(applied)),
                "skipped": skipped,
                "supervision": sorted(set(d) & SUPERVISION),
            },
            report,
        )
        report.close()
    if program:
        install_seccomp(program)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
