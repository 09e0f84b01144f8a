"""Shared fixtures for the unit tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/vectors.py and tests/unit/loop_rig.py are helper modules, importable as `vectors` and
# `loop_rig` from every test file (whatever pytest's import mode)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vectors as _vectors


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    """The parsed known-answer file of the C reference. It is part of the project, so a missing
    or altered file fails every test that uses it rather than skipping them."""
    path = _vectors.path()
    if not path.is_file():
        pytest.fail(f"known-answer vectors not found at {path}", pytrace=False)
    try:
        return _vectors.load()
    except ValueError as exc:  # bad JSON (JSONDecodeError) or an altered project copy
        pytest.fail(f"known-answer vectors at {path} unusable: {exc}", pytrace=False)


def _charm_kernels() -> tuple[str, ...]:
    try:
        from dsvpn import charm
    except ImportError:  # the test module's own import then reports the real error
        return ("portable",)
    return tuple(charm._available_kernels())


@pytest.fixture(params=_charm_kernels())
def charm_kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test once per Xoodoo kernel this CPU supports (the portable one included)."""
    from dsvpn import charm

    previous = charm._use_kernel(request.param)
    try:
        yield request.param
    finally:
        charm._use_kernel(previous)
