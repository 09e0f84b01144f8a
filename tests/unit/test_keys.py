"""Key files: the reference's loading rule, our warnings, and safe generation."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from dsvpn.errors import KeyFileError
from dsvpn.keys import generate_key_file, load_key


def write(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def test_first_32_bytes_are_the_key(tmp_path: Path) -> None:
    data = bytes(range(200, 256)) + bytes(10)
    assert load_key(write(tmp_path / "k", data)) == data[:32]


@pytest.mark.parametrize("size", [0, 1, 31])
def test_short_file_is_a_clear_error(tmp_path: Path, size: int) -> None:
    with pytest.raises(KeyFileError, match=f"holds {size} bytes"):
        load_key(write(tmp_path / "k", b"\x80" * size))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_key(str(tmp_path / "nope"))


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="is a directory"):
        load_key(str(tmp_path))


def test_warns_when_readable_by_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dsvpn"):
        load_key(write(tmp_path / "k", b"\xff" * 32, 0o644))
    assert "readable by group or others" in caplog.text


def test_no_warning_for_a_private_binary_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dsvpn"):
        load_key(write(tmp_path / "k", bytes(range(128, 160))))
    assert caplog.text == ""


def test_warns_about_base64_text_but_uses_it_as_the_reference(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = b"q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq8M=\n"
    with caplog.at_level(logging.WARNING, logger="dsvpn"):
        assert load_key(write(tmp_path / "k", text)) == text[:32]
    assert "looks like base64" in caplog.text


def test_keygen_writes_32_private_random_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    generate_key_file(str(a))
    generate_key_file(str(b))
    assert len(a.read_bytes()) == 32 and a.read_bytes() != b.read_bytes()
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path = write(tmp_path / "k", b"keep me")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_key_file(path)
    assert Path(path).read_bytes() == b"keep me"
