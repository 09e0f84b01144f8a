"""Known-answer vectors of C DSVPN 0.1.5 (tests/data/charm.json) and their generators.

Shared by the unit tests: `load()` finds and parses the file, `data()` expands a message entry
that stores its bytes as hex, as an xorshift32 generator description, or both. The file's
layout is described in docs/protocol.md, Vectors; where it comes from in tests/data/README.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "charm.json"
# The values are facts about the reference implementation, not ours to edit: a changed byte
# fails the tests instead of quietly moving the target (tests/data/README.md says how to update).
DEFAULT_SHA256 = "2e01e53870959e24377aed0104085599a8f74d6226e268a75bfb369c3f4d81f0"


def path() -> Path:
    """$DSVPN_VECTORS if set (another copy, e.g. a regenerated one), else tests/data/charm.json."""
    return Path(os.environ.get("DSVPN_VECTORS") or DEFAULT_PATH)


def load() -> dict[str, Any]:
    raw = path().read_bytes()
    if path() == DEFAULT_PATH and hashlib.sha256(raw).hexdigest() != DEFAULT_SHA256:
        raise ValueError(f"{DEFAULT_PATH} differs from the recorded copy (sha256 mismatch)")
    result: dict[str, Any] = json.loads(raw)
    return result


@functools.lru_cache(maxsize=64)
def xorshift32(seed: int, length: int) -> bytes:
    """The file's `generators.xorshift32`: 32-bit xorshift, low byte of each state."""
    x = seed
    out = bytearray(length)
    for i in range(length):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)


def expand(gen: dict[str, Any]) -> bytes:
    """Bytes of a `plaintext_gen` / `message_gen` entry."""
    if gen["kind"] != "xorshift32":
        raise ValueError(f"unknown generator {gen['kind']!r}")
    return xorshift32(gen["seed"], gen["len"])


def data(entry: dict[str, Any], field: str) -> bytes:
    """entry[field] as bytes (field: "plaintext" or "message"), from hex or from the generator.

    When both are stored they must agree, so a generator bug cannot hide."""
    gen = entry.get(f"{field}_gen")
    if field in entry:
        raw = bytes.fromhex(entry[field])
        if gen is not None and expand(gen) != raw:
            raise ValueError(f"{field}_gen does not reproduce {field}")
        return raw
    if gen is None:
        raise KeyError(f"entry has neither {field} nor {field}_gen")
    return expand(gen)


def iv(value: str | None) -> bytes | None:
    """An `iv` field: hex, or null for the reference's NULL iv."""
    return None if value is None else bytes.fromhex(value)
