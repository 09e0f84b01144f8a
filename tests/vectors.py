"""Known-answer vectors of the C reference (../shared/vectors/charm.json) and their generators.

Shared by the unit tests: `load()` finds and parses the file, `data()` expands a message entry
that stores its bytes as hex, as an xorshift32 generator description, or both.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "vectors" / "charm.json"


def path() -> Path:
    """$DSVPN_VECTORS if set, else <repo root>/../shared/vectors/charm.json."""
    return Path(os.environ.get("DSVPN_VECTORS") or DEFAULT_PATH)


def load() -> dict[str, Any]:
    with path().open(encoding="utf-8") as f:
        result: dict[str, Any] = json.load(f)
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
