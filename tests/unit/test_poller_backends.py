"""poller.h's three backends (epoll, kqueue, poll) answer alike: poller_harness.c is built
against each and must print the same reports. On Linux the kqueue one is built against
libkqueue, found through pkg-config (PKG_CONFIG_PATH for one built by hand) or
/usr/include/kqueue, and everywhere against kqueue_model/ (kqueue over poll), so that its
bookkeeping is checked where there is neither libkqueue nor a BSD."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
HEADER_DIR = HERE.parent.parent / "src" / "dsvpn"
HARNESS = HERE / "poller_harness.c"
MODEL = HERE / "kqueue_model"
BSD = sys.platform.startswith(("darwin", "freebsd", "openbsd", "netbsd", "dragonfly"))

EXPECTED = """\
empty: n=0
empty 100 ms: n=0
waited at least 90 ms: 1
pipe idle: n=0
pipe written: n=1 [0x100000001 in]
pipe still unread: n=1 [0x100000001 in]
pipe drained: n=0
pipe writer closed: n=1 data=0x100000001 err=1
sock read, idle: n=0
sock read+write, idle: n=1 [0xa1 out]
sock read+write, written: n=1 [0xa1 in out]
sock back to read: n=1 [0xa2 in]
sock write only, unread: n=1 [0xa3 out]
sock no events, unread: n=0
sock read again: n=1 [0xa5 in]
sock removed: n=0
del again: -1 ENOENT
mod removed: -1 ENOENT
add again: 0
add twice: -1 EEXIST
sock re-added: n=1 [0xa6 in]
sock drained: n=0
peer closed: n=1 data=0xb0 err=1
many: 100 watched, 75 reported, 100 as expected, 2 waits, at most 64 per wait
all removed: n=0
done
"""


def _compiler() -> str:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip("no C compiler (cc, gcc or clang) on PATH")


def _libkqueue() -> list[str]:
    """Compiler and linker flags for libkqueue (Linux); skips when it is not installed."""
    if shutil.which("pkg-config") is not None:
        found = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "libkqueue"], capture_output=True, text=True
        )
        if found.returncode == 0:
            libdir = subprocess.run(
                ["pkg-config", "--variable=libdir", "libkqueue"], capture_output=True, text=True
            ).stdout.strip()
            rpath = [f"-Wl,-rpath,{libdir}"] if libdir else []
            return [*found.stdout.split(), *rpath]
    if Path("/usr/include/kqueue/sys/event.h").is_file():
        return ["-I/usr/include/kqueue", "-lkqueue"]
    pytest.skip(
        "libkqueue is not installed (no pkg-config libkqueue, no /usr/include/kqueue): "
        "the kqueue backend is checked on kqueue_model here, on a real kqueue where libkqueue "
        "or a BSD is"
    )


def _build_and_run(tmp_path: Path, macro: str, extra: list[str]) -> str:
    exe = tmp_path / f"harness-{macro.lower()}"
    build = subprocess.run(
        [
            _compiler(),
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-D{macro}",
            f"-I{HEADER_DIR}",
            str(HARNESS),
            "-o",
            str(exe),
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll is Linux's")
def test_epoll_backend(tmp_path: Path) -> None:
    assert _build_and_run(tmp_path, "DSVPN_POLLER_EPOLL", []) == EXPECTED


def test_kqueue_backend(tmp_path: Path) -> None:
    extra = [] if BSD else _libkqueue()
    assert _build_and_run(tmp_path, "DSVPN_POLLER_KQUEUE", extra) == EXPECTED


def test_kqueue_backend_on_a_model(tmp_path: Path) -> None:
    assert _build_and_run(tmp_path, "DSVPN_POLLER_KQUEUE", [f"-I{MODEL}"]) == EXPECTED


def test_poll_backend(tmp_path: Path) -> None:
    assert _build_and_run(tmp_path, "DSVPN_POLLER_POLL", []) == EXPECTED
