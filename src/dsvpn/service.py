"""dsvpn as a service: ``dsvpn service install | remove | run``.

Linux: the systemd template unit dsvpn@.service (package data), written once and shared by every
instance, and one arguments file per instance, /etc/dsvpn/NAME.args. macOS: a launchd daemon
per instance. OpenBSD and FreeBSD: ``--print`` gives an rc.d script and the commands that
enable it. ``--print`` on any platform writes the files to stdout and changes nothing.

Every instance runs ``dsvpn service run NAME``, which reads the arguments file and refuses it
unless root owns it and every directory above it, and no one else can write any of them:
whoever could change those arguments would choose what root runs. (An EnvironmentFile= would
be read by systemd as root too, but nothing checks who may write it, and ExecStart= could not
carry an argument with a space through it.)
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TextIO

from dsvpn.errors import DsvpnError, PermissionDenied, PrerequisiteError, UsageError

if TYPE_CHECKING:
    from dsvpn.arguments import Invocation

ETC_DIR = PurePosixPath("/etc/dsvpn")
SYSTEMD_DIR = PurePosixPath("/etc/systemd/system")
UNIT = "dsvpn@.service"
UNIT_MARK = "# dsvpn@.service:"  # first line of the unit: install and remove touch only ours
LAUNCHD_DIR = PurePosixPath("/Library/LaunchDaemons")
OPENBSD_RC_DIR = PurePosixPath("/etc/rc.d")
FREEBSD_RC_DIR = PurePosixPath("/usr/local/etc/rc.d")
# Directories that ProtectHome=yes hides from the service, and those PrivateTmp=yes replaces.
HOME_DIRS = (PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user"))
TMP_DIRS = (PurePosixPath("/tmp"), PurePosixPath("/var/tmp"))
PLATFORMS = ("linux", "macos", "openbsd", "freebsd")
# Safe as a systemd instance name, a file name, a launchd label and (without '-') an rc.d name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
# Words that need no quoting in a shell or a unit.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./+:,=@-]+")

USAGE = """\
usage:
  dsvpn service install <name> [--print] [--platform NAME] -- server|client <arguments>
  dsvpn service remove <name> [--print] [--platform NAME]
  dsvpn service run <name>     what the service runs: dsvpn with /etc/dsvpn/<name>.args

install (as root) writes the systemd unit dsvpn@.service (once) and /etc/dsvpn/<name>.args,
then runs `systemctl daemon-reload` and `systemctl enable --now dsvpn@<name>`, which returns
once dsvpn is ready (a server listens; a client's first session is up). On macOS it writes
and loads a launchd daemon. remove stops, disables and deletes what install wrote.
--print writes the files and the commands to stdout instead and changes nothing; with
--platform (linux, macos, openbsd, freebsd) those of another system. On OpenBSD and FreeBSD
only --print is offered: an rc.d script and the rcctl/sysrc commands to enable it.

example:
  dsvpn service install home -- server /etc/dsvpn/vpn.key auto 443
"""


class ConfigFileError(DsvpnError):
    """An instance's arguments file is missing, unsafe or holds bad arguments."""

    exit_code = 78  # EX_CONFIG; the unit does not restart on it (RestartPreventExitStatus)


CommandRunner = Callable[[Sequence[str]], int]


def run_command(argv: Sequence[str]) -> int:
    """Run a command with this terminal (systemctl's own messages show); its exit status."""
    try:
        return subprocess.run(list(argv), check=False).returncode
    except FileNotFoundError:
        raise PrerequisiteError(f"`{argv[0]}` not found") from None


def systemd_booted() -> bool:
    """Whether systemd manages this host (what sd_booted() checks)."""
    return os.path.isdir("/run/systemd/system")


@dataclass
class Host:
    """Where install, remove and run act. Tests give another root, runner and owner."""

    root: Path = Path("/")
    run: CommandRunner = run_command
    booted: Callable[[], bool] = systemd_booted
    # Who must own what a root service reads or runs (root; the tests' own uid in tests).
    owner: int = 0
    euid: int = field(default_factory=os.geteuid)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def path(self, path: PurePosixPath) -> Path:
        return self.root / path.relative_to("/")


@dataclass(frozen=True)
class File:
    path: PurePosixPath
    data: bytes
    mode: int


@dataclass(frozen=True)
class Plan:
    """What install writes and then runs, or what remove runs and deletes, on one platform."""

    files: tuple[File, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()
    removes: tuple[PurePosixPath, ...] = ()


def show(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# -- validation ---------------------------------------------------------------------------------


def check_name(name: str, platform: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid service name {name!r}: 1 to 32 letters, digits, '_' or '-',"
            " starting with a letter or digit"
        )
    if platform in ("openbsd", "freebsd") and "-" in name:
        raise UsageError(f"invalid service name {name!r}: rc.d names take no '-' (use '_')")
    return name


def check_args(args: Sequence[str]) -> Invocation:
    """The parsed arguments of a service instance; UsageError as dsvpn itself would give."""
    from dsvpn.arguments import parse_args

    if not args:
        raise UsageError("the dsvpn arguments are missing: ... -- server|client <arguments>")
    for arg in args:
        if not arg or arg.startswith("#") or any(c in arg for c in "\n\r\0"):
            raise UsageError(
                f"invalid argument {arg!r} for a service: empty, starting with '#',"
                " or with a line break"
            )
    if args[0] not in ("server", "client"):
        raise UsageError(
            f"a service runs `dsvpn server ...` or `dsvpn client ...`, not {args[0]!r}"
        )
    inv = parse_args(args)
    if inv.command not in ("server", "client") or inv.config is None:
        raise UsageError("a service runs `dsvpn server ...` or `dsvpn client ...`")
    if inv.dry_run:
        raise UsageError("--dry-run makes no sense for a service")
    return inv


def _absolute_key(args: Sequence[str], inv: Invocation) -> list[str]:
    """args with the key file as an absolute path: the service does not run in this directory."""
    assert inv.config is not None
    out = list(args)
    if os.path.isabs(inv.config.key_file):
        return out
    from dsvpn.arguments import VALUED_OPTIONS

    for i in range(1, len(out)):
        # The key file as parse_args found it (an option's value is never taken for it).
        if out[i] == inv.config.key_file and out[i - 1] not in VALUED_OPTIONS:
            out[i] = os.path.abspath(out[i])
            break
    return out


def _key_file(args: Sequence[str]) -> str:
    inv = check_args(args)
    assert inv.config is not None
    return inv.config.key_file


def _secret_files(key: str) -> list[str]:
    """The key file, or a server's peers file and every key it names (checked as the server
    checks them: parse_args has loaded it already)."""
    from dsvpn import peers

    if not peers.looks_like_peers_file(key):
        return [key]
    loaded = peers.load(key, keys=False)
    return [key, *(loaded.key_path(p) for p in loaded.peers)]


def _under(path: str | PurePosixPath, dirs: Sequence[PurePosixPath]) -> bool:
    p = PurePosixPath(os.path.abspath(path))
    return any(p == d or d in p.parents for d in dirs)


def _check_owned(path: Path, owner: int, what: str, stop: Path = Path("/")) -> None:
    """DsvpnError unless `path` and every directory above it (up to `stop`), following
    symbolic links, belong to `owner` and no one else can write them."""
    real = Path(os.path.realpath(path))
    top = Path(os.path.realpath(stop))
    for part in [real, *real.parents]:
        try:
            st = os.stat(part)
        except OSError as exc:
            raise DsvpnError(f"cannot check {part}: {exc.strerror}") from None
        if st.st_uid != owner or st.st_mode & 0o022:
            who = "root" if owner == 0 else f"uid {owner}"
            raise DsvpnError(
                f"{what} {path} is not safe for a root service: {part} must belong to {who}"
                " and be writable by no one else"
            )
        if part == top:
            break


# -- locating this installation ----------------------------------------------------------------


def _is_script_of_this_python(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    if not first.startswith(b"#!"):
        return False
    words = first[2:].split()
    if not words:
        return False
    try:
        return os.path.samefile(os.fsdecode(words[0]), sys.executable)
    except OSError:
        return False


def dsvpn_command() -> list[str]:
    """How a service starts this installation of dsvpn: the `dsvpn` script that belongs to this
    Python (pip, venv and pipx put it in different places), else `<this python> -m dsvpn`."""
    candidates = []
    if Path(sys.argv[0]).name == "dsvpn":
        candidates.append(sys.argv[0])
    # Not resolved: a venv's python is a symbolic link that must keep its own path.
    candidates.append(str(Path(sys.executable).parent / "dsvpn"))
    found = shutil.which("dsvpn")
    if found:
        candidates.append(found)
    for candidate in candidates:
        path = os.path.abspath(candidate)
        if _is_script_of_this_python(path):
            return [path]
    return [os.path.abspath(sys.executable), "-m", "dsvpn"]


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def protect_home() -> str:
    """ProtectHome= for this installation: "yes", or "read-only" when dsvpn or its Python lives
    in a home directory, which "yes" would hide from the service."""
    return "read-only" if any(_under(p, HOME_DIRS) for p in _installation()) else "yes"


def _installation() -> list[str]:
    """Where this installation lives: the dsvpn script or python, the interpreter itself, its
    standard library and the dsvpn package (pyenv puts Python under /root, pipx in ~/.local)."""
    return [
        dsvpn_command()[0],
        os.path.realpath(sys.executable),
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.prefix),
        str(_package_dir()),
    ]


# -- the texts ---------------------------------------------------------------------------------


def _template(name: str) -> bytes:
    return resources.files("dsvpn").joinpath("units").joinpath(name).read_bytes()


def _systemd_word(word: str) -> str:
    if any(ord(c) < 32 for c in word):
        raise DsvpnError(f"cannot put {word!r} in a unit file")
    word = word.replace("%", "%%")  # specifiers
    if _PLAIN_WORD.fullmatch(word.replace("%%", "")):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'


def _rc_words(command: Sequence[str]) -> str:
    for word in command:
        if not _PLAIN_WORD.fullmatch(word):
            raise DsvpnError(f"cannot put {word!r} in an rc.d script: move dsvpn to a plain path")
    return " ".join(command)


def systemd_unit(command: Sequence[str], protect_home: str = "yes") -> str:
    """dsvpn@.service for this installation. ProtectHome=read-only when dsvpn itself lives in
    a home directory (pipx as root), where ProtectHome=yes would hide it."""
    text = _template(UNIT).decode()
    run = " ".join(_systemd_word(w) for w in command)
    return text.replace("@DSVPN@", run).replace("@PROTECT_HOME@", protect_home)


def args_text(name: str, args: Sequence[str]) -> str:
    header = (
        f"# Arguments of the dsvpn service {name}, one per line, read by"
        f" `dsvpn service run {name}`.\n"
        "# Lines starting with '#' are comments. Keep this file root's alone (0600).\n"
    )
    return header + "".join(f"{a}\n" for a in args)


def launchd_plist(name: str, command: Sequence[str]) -> bytes:
    data = plistlib.loads(_template("org.dsvpn.plist"))
    data["Label"] = launchd_label(name)
    data["ProgramArguments"] = [*command, "service", "run", name]
    data["StandardOutPath"] = data["StandardErrorPath"] = f"/var/log/dsvpn-{name}.log"
    return plistlib.dumps(data, sort_keys=False)


def launchd_label(name: str) -> str:
    return f"org.dsvpn.{name}"


def rc_script(platform: str, name: str, command: Sequence[str]) -> str:
    text = _template(f"rc.{platform}").decode()
    dsvpn = _rc_words(command)
    flags = " ".join([*command[1:], "service", "run", name])
    text = text.replace("@DAEMON@", shlex.quote(command[0])).replace("@FLAGS@", shlex.quote(flags))
    return text.replace("@DSVPN@", dsvpn).replace("@NAME@", name)


def rc_name(name: str) -> str:
    return f"dsvpn_{name}"


# -- plans ---------------------------------------------------------------------------------------


def install_plan(
    platform: str, name: str, args: Sequence[str], command: Sequence[str], protect_home: str
) -> Plan:
    args_file = File(ETC_DIR / f"{name}.args", args_text(name, args).encode(), 0o600)
    if platform == "linux":
        unit = File(SYSTEMD_DIR / UNIT, systemd_unit(command, protect_home).encode(), 0o644)
        enable = ("systemctl", "enable", "--now", f"dsvpn@{name}")
        return Plan((unit, args_file), (("systemctl", "daemon-reload"), enable))
    if platform == "macos":
        path = LAUNCHD_DIR / f"{launchd_label(name)}.plist"
        plist = File(path, launchd_plist(name, command), 0o644)
        return Plan((plist, args_file), (("launchctl", "bootstrap", "system", str(path)),))
    rc = rc_name(name)
    if platform == "openbsd":
        script = File(OPENBSD_RC_DIR / rc, rc_script(platform, name, command).encode(), 0o555)
        return Plan((script, args_file), (("rcctl", "enable", rc), ("rcctl", "start", rc)))
    assert platform == "freebsd"
    script = File(FREEBSD_RC_DIR / rc, rc_script(platform, name, command).encode(), 0o555)
    return Plan((script, args_file), (("sysrc", f"{rc}_enable=YES"), ("service", rc, "start")))


def remove_plan(platform: str, name: str, last: bool) -> Plan:
    """`last`: no other instance is left, so the shared systemd unit goes too."""
    args_path = ETC_DIR / f"{name}.args"
    if platform == "linux":
        commands: tuple[tuple[str, ...], ...] = (
            ("systemctl", "disable", "--now", f"dsvpn@{name}"),
        )
        if last:
            commands += (("systemctl", "daemon-reload"),)
        removes = (args_path, SYSTEMD_DIR / UNIT) if last else (args_path,)
        return Plan(commands=commands, removes=removes)
    if platform == "macos":
        plist = LAUNCHD_DIR / f"{launchd_label(name)}.plist"
        commands = (("launchctl", "bootout", f"system/{launchd_label(name)}"),)
        return Plan(commands=commands, removes=(plist, args_path))
    rc = rc_name(name)
    if platform == "openbsd":
        commands = (("rcctl", "stop", rc), ("rcctl", "disable", rc))
        return Plan(commands=commands, removes=(OPENBSD_RC_DIR / rc, args_path))
    assert platform == "freebsd"
    commands = (("service", rc, "stop"), ("sysrc", "-x", f"{rc}_enable"))
    return Plan(commands=commands, removes=(FREEBSD_RC_DIR / rc, args_path))


def print_plan(plan: Plan, out: TextIO, removal: bool = False) -> None:
    """The files to write (or delete) and the commands, for a packager or by hand."""
    if removal:
        print("#### as root:", file=out)
        for cmd in plan.commands:
            print(show(cmd), file=out)
        if plan.removes:
            print(show(["rm", "-f", *map(str, plan.removes)]), file=out)
        return
    for f in plan.files:
        print(f"#### {f.path} (mode {f.mode:04o})", file=out)
        text = f.data.decode()
        out.write(text if text.endswith("\n") else text + "\n")
    print("#### then, as root:", file=out)
    for cmd in plan.commands:
        print(show(cmd), file=out)


# -- acting on the host ------------------------------------------------------------------------


def current_platform() -> str:
    from dsvpn.platform import name_for

    name = name_for(sys.platform)
    if name not in PLATFORMS:
        raise UsageError(f"dsvpn service has no support for {sys.platform} (only --print)")
    return name


def _platform(name: str | None) -> str:
    if name is None:
        return current_platform()
    if name not in PLATFORMS:
        raise UsageError(f"no service support for {name!r}: choose one of {', '.join(PLATFORMS)}")
    return name


def _announce(host: Host, text: str) -> None:
    print(f"[#] {text}", file=host.err, flush=True)


def _write(host: Host, f: File) -> None:
    path = host.path(f.path)
    if f.path.parent == ETC_DIR and not path.parent.exists():
        _announce(host, f"mkdir -m 0700 {f.path.parent}")
        path.parent.mkdir(mode=0o700, parents=True)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _announce(host, f"write {f.path} (mode {f.mode:04o})")
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(f.data)
        out.flush()
        os.fchmod(out.fileno(), f.mode)
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _require_root(host: Host) -> None:
    if host.euid != 0:
        raise PermissionDenied("needs root: run it as root (or add --print to see the files)")


def _is_our_unit(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(UNIT_MARK)
    except FileNotFoundError:
        return False


def install(
    name: str,
    args: Sequence[str],
    *,
    platform: str | None = None,
    print_only: bool = False,
    host: Host | None = None,
) -> int:
    """`dsvpn service install NAME [--print] -- ARGS`. Bad arguments are refused here, with the
    error dsvpn itself would give, before anything is written."""
    host = host or Host()
    plat = _platform(platform)
    check_name(name, plat)
    args = _absolute_key(args, check_args(args))
    key = _key_file(args)
    for secret in _secret_files(key):
        if plat == "linux" and _under(secret, HOME_DIRS + TMP_DIRS):
            raise DsvpnError(
                f"the service cannot see the key file {secret} (its home and temporary"
                " directories are its own): move the key to /etc/dsvpn/"
            )
    command = dsvpn_command()
    plan = install_plan(plat, name, args, command, protect_home())
    if print_only:
        print_plan(plan, host.out)
        return 0

    if plat in ("openbsd", "freebsd"):
        raise UsageError(
            f"on {plat}, `dsvpn service install --print {name} -- ...` gives the rc.d script"
            " and the commands that enable it"
        )
    _require_root(host)
    if plat == "linux" and not host.booted():
        raise PrerequisiteError(
            "systemd is not running on this host: `dsvpn service install --print ...` gives"
            " the unit and the arguments file to install by hand"
        )
    from dsvpn.keys import load_key

    load_key(str(host.path(PurePosixPath(key))))
    # A root service runs this installation: no one but root may be able to change it.
    for part in _installation():
        _check_owned(Path(part), host.owner, "this installation of dsvpn:")
    etc = host.path(ETC_DIR)
    if etc.exists():
        _check_owned(etc, host.owner, "the directory", stop=host.root)
    args_path = host.path(ETC_DIR / f"{name}.args")
    if args_path.exists():
        raise DsvpnError(
            f"a dsvpn service named {name} exists already ({ETC_DIR / (name + '.args')}):"
            f" `dsvpn service remove {name}` first"
        )
    for f in plan.files:
        path = host.path(f.path)
        if f.path.name == UNIT and path.exists() and not _is_our_unit(path):
            raise DsvpnError(f"{f.path} exists and was not written by dsvpn: remove it first")

    for f in plan.files:
        path = host.path(f.path)
        if f.path.name == UNIT and path.exists() and path.read_bytes() == f.data:
            continue  # written once, shared by every instance
        _write(host, f)
    for cmd in plan.commands:
        _announce(host, show(cmd))
        status = host.run(cmd)
        if status != 0:
            log = f"/var/log/dsvpn-{name}.log"
            where = f"journalctl -u dsvpn@{name}" if plat == "linux" else log
            raise DsvpnError(
                f"`{show(cmd)}` failed (exit {status}); see {where};"
                f" `dsvpn service remove {name}` undoes the install"
            )
    if plat == "linux":
        print(
            f"dsvpn@{name} is enabled and running: `systemctl status dsvpn@{name}`,"
            f" `journalctl -u dsvpn@{name}`",
            file=host.err,
        )
    else:
        print(f"{launchd_label(name)} is loaded; its log: /var/log/dsvpn-{name}.log", file=host.err)
    return 0


def remove(
    name: str,
    *,
    platform: str | None = None,
    print_only: bool = False,
    host: Host | None = None,
) -> int:
    """`dsvpn service remove NAME`: stop, disable, delete what install wrote (the shared unit
    only with the last instance). Goes on after a failed command; exit 1 if one failed."""
    host = host or Host()
    plat = _platform(platform)
    check_name(name, plat)
    if print_only:
        print_plan(remove_plan(plat, name, last=True), host.out, removal=True)
        return 0
    if plat in ("openbsd", "freebsd"):
        raise UsageError(f"on {plat}, `dsvpn service remove --print {name}` gives the commands")
    _require_root(host)
    if plat == "linux" and not host.booted():
        raise PrerequisiteError("systemd is not running on this host")
    args_path = host.path(ETC_DIR / f"{name}.args")
    if not args_path.exists():
        raise DsvpnError(
            f"no dsvpn service named {name} ({ETC_DIR / (name + '.args')} does not exist)"
        )
    others = [p for p in host.path(ETC_DIR).glob("*.args") if p.name != args_path.name]
    unit = host.path(SYSTEMD_DIR / UNIT)
    last = not others and _is_our_unit(unit)
    plan = remove_plan(plat, name, last)
    failed = False
    commands = list(plan.commands)
    # The daemon-reload (linux, last instance) comes after the unit is gone.
    reload = commands.pop() if last and plat == "linux" else None
    for cmd in commands:
        _announce(host, show(cmd))
        if host.run(cmd) != 0:
            failed = True
    for path in plan.removes:
        real = host.path(path)
        if real.exists() or real.is_symlink():
            _announce(host, f"rm {path}")
            real.unlink()
    if reload is not None:
        _announce(host, show(reload))
        if host.run(reload) != 0:
            failed = True
    if not last and plat == "linux" and others:
        print(f"{SYSTEMD_DIR / UNIT} stays: {len(others)} other instance(s)", file=host.err)
    return 1 if failed else 0


# -- the instance itself -----------------------------------------------------------------------


def read_args(name: str, host: Host | None = None) -> list[str]:
    """The arguments in /etc/dsvpn/NAME.args; ConfigFileError if the file is missing, is not a
    regular file, or it or a directory above it is not root's alone."""
    host = host or Host()
    shown = ETC_DIR / f"{name}.args"
    path = host.path(shown)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigFileError(
            f"{shown} does not exist: `dsvpn service install {name} -- ...` writes it"
        ) from None
    except OSError as exc:
        why = "it is a symbolic link" if path.is_symlink() else exc.strerror
        raise ConfigFileError(f"cannot use {shown}: {why}") from None
    try:
        st = os.fstat(fd)
        who = "root" if host.owner == 0 else f"uid {host.owner}"
        if not stat.S_ISREG(st.st_mode):
            raise ConfigFileError(f"{shown} is not a regular file")
        if st.st_uid != host.owner or st.st_mode & 0o022:
            raise ConfigFileError(
                f"{shown} must belong to {who} and be writable by no one else"
                f" (chown {who} {shown}; chmod 0600 {shown})"
            )
        try:
            _check_owned(path.parent, host.owner, "the directory of", stop=host.root)
        except DsvpnError as exc:
            raise ConfigFileError(str(exc)) from None
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigFileError(f"{shown} is not UTF-8 text") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    return [line for line in lines if line and not line.startswith("#")]


def run_instance(name: str, host: Host | None = None) -> int:
    """`dsvpn service run NAME`: dsvpn with the instance's arguments, as if typed, under the
    instance's name (which `dsvpn status` shows)."""
    check_name(name, "linux")
    args = read_args(name, host)
    try:
        inv = check_args(args)
    except UsageError as exc:
        raise ConfigFileError(f"{ETC_DIR / (name + '.args')}: {exc}") from None
    from dsvpn import logs, tunnel

    assert inv.config is not None
    logs.setup(inv.verbosity)
    return tunnel.run(inv.config, name=name)


# -- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """`dsvpn service ...` (argv without `dsvpn service`)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    action, rest = argv[0], list(argv[1:])
    if action not in ("install", "remove", "run"):
        raise UsageError(f"unknown service action {action!r}: expected install, remove or run")
    dsvpn_args: list[str] = []
    if "--" in rest:
        cut = rest.index("--")
        rest, dsvpn_args = rest[:cut], rest[cut + 1 :]
    print_only, platform, names = False, None, []
    it = iter(rest)
    for arg in it:
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if arg == "--print":
            print_only = True
        elif arg == "--platform":
            platform = next(it, None)
            if platform is None:
                raise UsageError("--platform needs a name")
        elif arg.startswith("--platform="):
            platform = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r} for dsvpn service {action}")
        else:
            names.append(arg)
    if len(names) != 1:
        tail = " -- server|client <arguments>" if action == "install" else ""
        raise UsageError(f"usage: dsvpn service {action} <name>{tail}")
    name = names[0]
    if platform is not None and not print_only:
        raise UsageError("--platform only goes with --print")
    if action == "install":
        if not dsvpn_args:
            raise UsageError(
                f"usage: dsvpn service install {name} -- server|client <arguments>"
                " (the arguments after --)"
            )
        return install(name, dsvpn_args, platform=platform, print_only=print_only)
    if dsvpn_args:
        raise UsageError(f"dsvpn service {action} takes no dsvpn arguments")
    if action == "remove":
        return remove(name, platform=platform, print_only=print_only)
    if print_only:
        raise UsageError("dsvpn service run takes no --print")
    return run_instance(name)
