"""Files a plan may replace while dsvpn runs (plan.WRITABLE_FILES: /etc/resolv.conf), and how.

A file step (``Step(file=(path, content))``) is run by the runner itself, not by a command:
it records the file's current content in the instance's record first (root-only, like every
record), then replaces the file; the undo puts the recorded content back. Records are read
back as root by ``dsvpn cleanup``, so a path is checked against WRITABLE both when written
and when restored: a record can never make dsvpn write any other file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dsvpn.errors import DsvpnError
from dsvpn.plan import WRITABLE_FILES

WRITABLE = WRITABLE_FILES
MAX_SIZE = 64 * 1024  # resolv.conf is a few lines; anything bigger is not what we think it is
MODE = 0o644
MOUNTINFO = "/proc/self/mountinfo"


def check(path: str) -> None:
    if path not in WRITABLE:
        raise DsvpnError(f"refusing to write {path}: dsvpn only ever writes {', '.join(WRITABLE)}")


def read(path: str) -> str | None:
    """The file's current content, None if it does not exist."""
    check(path)
    if os.path.islink(path):
        raise DsvpnError(f"{path} is a symbolic link to {os.readlink(path)}: not replacing it")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DsvpnError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_SIZE:
        raise DsvpnError(f"{path} is larger than {MAX_SIZE} bytes: not replacing it")
    return data.decode("utf-8", errors="surrogateescape")


def write(path: str, content: str) -> None:
    """Replace the file's content: atomically (a new file renamed over it) unless it is a
    mount point (`ip netns exec` and containers bind-mount resolv.conf), where only writing
    in place works."""
    check(path)
    data = content.encode("utf-8", errors="surrogateescape")
    try:
        if is_mount_point(path):
            _write_in_place(path, data)
        else:
            _write_atomically(path, data)
    except OSError as exc:
        raise DsvpnError(f"cannot write {path}: {exc.strerror or exc}") from exc


def remove(path: str) -> None:
    check(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def restore(path: str, previous: str | None, written: str) -> str | None:
    """Put `previous` back (None: the file did not exist) if the file still holds what we
    wrote. Returns why it was left alone, or None when restored."""
    current = read(path)
    if current != written:
        return f"{path} was changed by another program meanwhile; left as it is"
    if previous is None:
        remove(path)
    else:
        write(path, previous)
    return None


def _write_atomically(path: str, data: bytes) -> None:
    target = Path(path)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = MODE
    tmp = target.with_name(f".{target.name}.dsvpn-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_in_place(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def is_mount_point(path: str, mountinfo: str | None = None) -> bool:
    """True if `path` is itself a mount point (Linux; False where there is no mountinfo)."""
    try:
        text = Path(mountinfo or MOUNTINFO).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        fields = line.split()
        # Field 5 is the mount point, with spaces and the like written as octal escapes.
        if len(fields) > 4 and _unescape(fields[4]) == path:
            return True
    return False


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
