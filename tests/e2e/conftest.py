"""End-to-end fixtures: a namespace testbed per test (see dsvpn.testbed).

Skipped with a reason unless running as root with ip, iptables and /dev/net/tun.

The implementation under test is ours (``python -m dsvpn``) unless DSVPN_E2E_IMPL names a C
DSVPN binary: the same tests then run against the reference, which proves the tests themselves
(tests that need our extensions, such as ``dsvpn cleanup``, skip for the reference).

DSVPN_KEEP_LOGS=1 keeps each test's work directory (logs, keys) for inspection.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsvpn import testbed

_MISSING = testbed.missing_prerequisites()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            if _MISSING:
                item.add_marker(pytest.mark.skip(reason=f"e2e: {_MISSING}"))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # Remember each phase's outcome so the testbed fixture can print logs on failure.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session", autouse=True)
def _stale_namespaces() -> None:
    if not _MISSING:
        testbed.remove_stale_namespaces()


@pytest.fixture(scope="session")
def impl() -> testbed.Impl:
    """The implementation under test."""
    path = os.environ.get("DSVPN_E2E_IMPL")
    return testbed.reference(path) if path else testbed.ours()


@pytest.fixture(scope="session")
def reference_impl() -> testbed.Impl:
    path = os.environ.get("DSVPN_REFERENCE")
    if not path:
        pytest.skip("DSVPN_REFERENCE is not set (path to a C DSVPN binary)")
    return testbed.reference(path)


def _testbed(request: pytest.FixtureRequest, clients: int) -> Iterator[testbed.Testbed]:
    tb = testbed.Testbed(clients=clients)
    try:
        yield tb
    finally:
        failed = any(
            getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
            for w in ("setup", "call")
        )
        if failed:
            # Shown in the failing test's report: what each process printed.
            print(f"\n===== testbed {tb.tag} logs ({tb.workdir})\n{tb.logs()}")
        tb.close()


@pytest.fixture
def tb(request: pytest.FixtureRequest) -> Iterator[testbed.Testbed]:
    """Client, server and far host."""
    yield from _testbed(request, clients=1)


@pytest.fixture
def tb2(request: pytest.FixtureRequest) -> Iterator[testbed.Testbed]:
    """Two client hosts (10.X.1.2 and 10.X.1.3), server and far host."""
    yield from _testbed(request, clients=2)


@pytest.fixture
def key(tb: testbed.Testbed) -> Path:
    return tb.write_key()
