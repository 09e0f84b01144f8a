"""The peers file: parsing, every error as one line naming the file and the line, telling it
from a key file, and editing it (add, remove) without losing what a person wrote."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from dsvpn import peers
from dsvpn.errors import KeyFileError
from dsvpn.peers import PeersError


def key(tmp: Path, name: str, data: bytes | None = None) -> str:
    path = tmp / name
    path.write_bytes(os.urandom(32) if data is None else data)
    path.chmod(0o600)
    return name


def write(tmp: Path, text: str, name: str = "peers", mode: int = 0o600) -> Path:
    path = tmp / name
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for name in ("a.key", "b.key", "c.key"):
        key(tmp_path, name)
    return tmp_path


def test_a_file_with_comments_and_a_pool(keys: Path) -> None:
    path = write(
        keys,
        "# clients of the office\n"
        "\n"
        "pool 10.8.0.0/24 10.8.0.1   # the server\n"
        "alice a.key 10.8.0.2\n"
        "  bob\tb.key   10.8.0.3  # laptop\n",
    )
    loaded = peers.load(path)
    assert loaded.path == str(path)
    assert str(loaded.pool) == "10.8.0.0/24" and loaded.server == "10.8.0.1"
    assert [(p.name, p.key_file, p.address, p.line) for p in loaded.peers] == [
        ("alice", "a.key", "10.8.0.2", 4),
        ("bob", "b.key", "10.8.0.3", 5),
    ]
    assert loaded.peers[0].key == (keys / "a.key").read_bytes()
    assert loaded.peers[1].address6 == "64:ff9b::10.8.0.3"
    assert str(loaded.pool6) == "64:ff9b::a08:0/120"
    assert loaded.next_free() == "10.8.0.4"


def test_defaults_without_a_pool_line(keys: Path) -> None:
    loaded = peers.load(write(keys, "alice a.key 192.168.192.1\n"))
    assert (str(loaded.pool), loaded.server) == ("192.168.192.0/24", "192.168.192.254")
    assert loaded.next_free() == "192.168.192.2"
    # The server's default is the last host address of any pool.
    assert peers.load(write(keys, "pool 10.1.0.0/16\n")).server == "10.1.255.254"


def test_absolute_key_paths(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    key(elsewhere, "x.key")
    loaded = peers.load(write(keys, f"x {elsewhere / 'x.key'} 192.168.192.9\n"))
    assert loaded.key_path(loaded.peers[0]) == str(elsewhere / "x.key")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("alice a.key 192.168.192.1\nalice b.key 192.168.192.2\n", 2,
         "duplicate peer name alice (also on line 1)"),
        ("alice a.key 192.168.192.1\n# x\nbob b.key 192.168.192.1\n", 3,
         "duplicate address 192.168.192.1 (also on line 1)"),
        ("alice a.key 10.0.0.1\n", 1, "address 10.0.0.1 is not a host address of the pool"),
        ("alice a.key 192.168.192.254\n", 1, "is the server's own tunnel address"),
        ("pool 10.8.0.0/24 10.8.0.1\nalice a.key 10.8.0.1\n", 2, "server's own tunnel address"),
        ("alice a.key 192.168.192.0\n", 1, "not a host address"),
        ("alice a.key 192.168.192.255\n", 1, "not a host address"),
        ("alice a.key 192.168.192.300\n", 1, "invalid address '192.168.192.300'"),
        ("alice nothere.key 192.168.192.1\n", 1, "nothere.key does not exist"),
        ("alice . 192.168.192.1\n", 1, "is a directory"),
        ("alice short.key 192.168.192.1\n", 1, "is not a key: a key file is exactly 32"),
        ("alice long.key 192.168.192.1\n", 1, "is not a key: a key file is exactly 32"),
        ("alice peers 192.168.192.1\n", 1, "is not a key"),  # the peers file itself
        ("alice a.key 192.168.192.1\nbob same.key 192.168.192.2\n", 2,
         "holds the same key as peer alice (line 1)"),
        ("al ice a.key 192.168.192.1\n", 1, "too many words"),
        ("alice a.key\n", 1, "found 2 word(s)"),
        ("-alice a.key 192.168.192.1\n", 1, "invalid peer name '-alice'"),
        ("pool\n", 1, "expected: pool"),
        ("pool a.key 192.168.192.1\n", 1, "invalid pool 'a.key'"),
        ("al/ice a.key 192.168.192.1\n", 1, "invalid peer name"),
        ("pool 10.0.0.0/24\npool 10.0.0.0/24\n", 2, "a second pool line (the first is line 1)"),
        ("alice a.key 192.168.192.1\npool 10.0.0.0/24\n", 2, "must come before the peers"),
        ("pool 10.0.0.0/8\n", 1, "prefix length from 16 to 30"),
        ("pool 10.0.0.0/31\n", 1, "prefix length from 16 to 30"),
        ("pool 10.0.0.1\n", 1, "prefix length from 16 to 30"),
        ("pool 10.0.0.1/24\n", 1, "invalid pool '10.0.0.1/24'"),
        ("pool 10.0.0.0/24 10.0.1.1\n", 1, "server address 10.0.1.1 is not a host address"),
        ("pool 10.0.0.0/24 10.0.0.255\n", 1, "is not a host address"),
    ],
)  # fmt: skip
def test_every_error_is_one_line_naming_file_and_line(
    keys: Path, text: str, line: int, message: str
) -> None:
    key(keys, "short.key", os.urandom(31))
    key(keys, "long.key", os.urandom(33))
    (keys / "same.key").write_bytes((keys / "a.key").read_bytes())
    path = write(keys, text)
    with pytest.raises(PeersError) as info:
        peers.load(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:{line}: "), text
    assert message in text


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PeersError, match="does not exist"):
        peers.load(tmp_path / "nope")
    with pytest.raises(PeersError, match="is a directory"):
        peers.load(tmp_path)
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe alice")
    with pytest.raises(PeersError, match="is not UTF-8 text"):
        peers.load(binary)


def test_writable_by_others_is_refused(keys: Path) -> None:
    path = write(keys, "alice a.key 192.168.192.1\n", mode=0o666)
    with pytest.raises(PeersError, match=r"writable by group or others; run: chmod go-w"):
        peers.load(path)


def test_readable_key_is_a_warning(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    (keys / "a.key").chmod(0o644)
    peers.load(write(keys, "alice a.key 192.168.192.1\n"))
    assert "a.key is readable by group or others" in caplog.text


def test_keys_need_not_be_read(tmp_path: Path) -> None:
    loaded = peers.load(write(tmp_path, "alice gone.key 192.168.192.1\n"), keys=False)
    assert loaded.peers[0].key == b""


# -- a peers file or a key file ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "is_peers"),
    [
        (bytes(range(32)), False),
        (b"alice a.key 192.168.192.1\n"[:32].ljust(32), False),  # 32 bytes: always a key
        (os.urandom(32) + b"\n", False),
        (b"0123456789abcdef0123456789abcdef0123456789A=\n", False),  # base64 text
        (b"", False),
        (b"\n\n\n", False),
        (b"alice a.key 192.168.192.1\n", True),
        (b"# nobody yet\n", True),
        (b"pool 10.0.0.0/24\n", True),
        (b"alice a.key 192.168.192.1\x00\n", False),
        (b"\xff" * 40, False),
    ],
)
def test_peers_file_or_key_file(tmp_path: Path, data: bytes, is_peers: bool) -> None:
    (tmp_path / "f").write_bytes(data)
    assert peers.looks_like_peers_file(str(tmp_path / "f")) is is_peers
    assert not peers.looks_like_peers_file(str(tmp_path / "missing"))


# -- editing -------------------------------------------------------------------------------------


def test_add_creates_the_file_and_a_key(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    loaded, alice = peers.add(path, "alice")
    assert alice.address == "192.168.192.1" and alice.key_file == "alice.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key_file = tmp_path / "alice.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32 and alice.key == key_file.read_bytes()
    text = path.read_text()
    assert text.startswith("# dsvpn peers file")
    assert "pool 192.168.192.0/24 192.168.192.254\n" in text
    assert text.endswith("alice alice.key 192.168.192.1\n")
    _, bob = peers.add(path, "bob")
    assert bob.address == "192.168.192.2"
    assert peers.load(path).peers == (alice, bob)
    assert peers.client_command(loaded, alice) == (
        "dsvpn client alice.key <server> 443 auto 192.168.192.1 192.168.192.254"
    )
    assert peers.client_command(loaded, alice, 8443).split()[4] == "8443"


def test_add_keeps_what_a_person_wrote(keys: Path) -> None:
    text = "# mine\npool 10.8.0.0/29 10.8.0.1  # small\nalice a.key 10.8.0.3 # kept\n"
    path = write(keys, text, mode=0o640)
    _, bob = peers.add(path, "bob")
    assert bob.address == "10.8.0.2"  # the lowest free one, the server's excepted
    peers.add(path, "carol", "10.8.0.6")
    assert path.read_text() == text + "bob bob.key 10.8.0.2\ncarol carol.key 10.8.0.6\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    peers.add(path, "dave")
    peers.add(path, "erin")
    with pytest.raises(PeersError, match=r"no free address left in the pool 10\.8\.0\.0/29"):
        peers.add(path, "frank")
    assert not (keys / "frank.key").exists()


@pytest.mark.parametrize(
    ("name", "address", "message"),
    [
        ("alice", None, "peer alice already exists (line 1)"),
        ("bob", "192.168.192.1", "address 192.168.192.1 belongs to peer alice"),
        ("bob", "10.0.0.1", "not a host address of the pool"),
        ("bob", "192.168.192.254", "the server's own tunnel address"),
        ("bob", "nope", "invalid address 'nope'"),
        ("b b", None, "invalid peer name 'b b'"),
        ("pool", None, "invalid peer name 'pool'"),
        ("../x", None, "invalid peer name"),
    ],
)
def test_add_refuses(keys: Path, name: str, address: str | None, message: str) -> None:
    path = write(keys, "alice a.key 192.168.192.1\n")
    before = sorted(os.listdir(keys))
    with pytest.raises(PeersError, match=re.escape(message)):
        peers.add(path, name, address)
    assert path.read_text() == "alice a.key 192.168.192.1\n"
    assert sorted(os.listdir(keys)) == before


def test_add_never_overwrites_a_key(keys: Path) -> None:
    path = write(keys, "alice a.key 192.168.192.1\n")
    key(keys, "bob.key", b"k" * 32)
    with pytest.raises(KeyFileError, match=r"bob\.key already exists; refusing to overwrite"):
        peers.add(path, "bob")
    assert (keys / "bob.key").read_bytes() == b"k" * 32
    assert path.read_text() == "alice a.key 192.168.192.1\n"


def test_add_refuses_a_broken_file(keys: Path) -> None:
    path = write(keys, "alice gone.key 192.168.192.1\n")
    with pytest.raises(PeersError, match=r":1: key file .*gone.key does not exist"):
        peers.add(path, "bob")
    assert not (keys / "bob.key").exists()


def test_remove(keys: Path) -> None:
    text = "# mine\nalice a.key 192.168.192.1 # a\nbob b.key 192.168.192.2\n"
    path = write(keys, text)
    _, carol = peers.add(path, "carol")
    peer, removed = peers.remove(path, "carol")
    assert peer == carol and removed == str(keys / "carol.key")
    assert not (keys / "carol.key").exists()
    # A key file that add did not write stays.
    peer, removed = peers.remove(path, "alice")
    assert peer.name == "alice" and removed is None
    assert (keys / "a.key").exists()
    assert path.read_text() == "# mine\nbob b.key 192.168.192.2\n"
    with pytest.raises(PeersError, match="no peer named alice"):
        peers.remove(path, "alice")
    # Removing works even when another peer's key file is gone.
    (keys / "b.key").unlink()
    peers.remove(path, "bob")
    assert path.read_text() == "# mine\n"
