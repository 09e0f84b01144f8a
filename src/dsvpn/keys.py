"""The shared key: read it as the reference does (first 32 raw bytes), write new ones safely."""

from __future__ import annotations

import logging
import os
import re
import stat

from dsvpn.errors import KeyFileError

KEY_BYTES = 32
log = logging.getLogger("dsvpn")

# A key written by `base64` or pasted as text is all printable; 32 random bytes almost never are
# (probability (64/256)^32), so this catches keys the user forgot to decode.
_TEXT_KEY = re.compile(rb"[A-Za-z0-9+/=_\-\s]+")


def load_key(path: str) -> bytes:
    """The first 32 bytes of the file, as C DSVPN reads it; anything after them is ignored."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(KEY_BYTES + 4096)
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist (create one with: dsvpn keygen {path})"
        ) from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) < KEY_BYTES:
        raise KeyFileError(
            f"key file {path} holds {len(data)} bytes; a key is {KEY_BYTES} raw bytes "
            f"(create one with: dsvpn keygen {path})"
        )
    warn_if_exposed(path, st)
    if _TEXT_KEY.fullmatch(data):
        log.warning(
            "warning: key file %s looks like base64 text; its first 32 characters are used as "
            "the raw key, as C DSVPN does. If that is not what the peer uses, decode it: "
            "base64 --decode < %s > vpn.key",
            path,
            path,
        )
    return data[:KEY_BYTES]


def warn_if_exposed(path: str, st: os.stat_result) -> None:
    """A key others can read is not secret any more: say so, and how to fix it."""
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.warning(
            "warning: key file %s is readable by group or others; run: chmod 600 %s", path, path
        )


def generate_key_file(path: str) -> None:
    """32 random bytes from libsodium, created with mode 0600; never overwrites a file."""
    from nacl.utils import random as random_bytes

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
        os.write(fd, random_bytes(KEY_BYTES))
    finally:
        os.close(fd)
