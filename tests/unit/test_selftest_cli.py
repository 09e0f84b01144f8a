"""`dsvpn selftest` without root: its command line, its refusals and its report lines."""

from __future__ import annotations

import io

import pytest

from dsvpn import cli, selftest, testbed


@pytest.mark.parametrize(
    ("missing", "code"),
    [("needs root (network namespaces, tun, iptables)", 77), ("needs iptables", 69)],
)
def test_refuses_without_prerequisites(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str, code: int
) -> None:
    monkeypatch.setattr(testbed, "missing_prerequisites", lambda: missing)
    assert cli.main(["selftest"]) == code
    err = capsys.readouterr().err
    assert err == f"dsvpn: selftest {missing}\n"


def test_help_and_bad_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["selftest", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: dsvpn selftest")
    assert cli.main(["selftest", "--frob"]) == 2
    assert capsys.readouterr().err == (
        "dsvpn: unknown argument '--frob' for selftest (see dsvpn selftest --help)\n"
    )


def test_report_lines() -> None:
    out = io.StringIO()
    report = selftest.Report(out)
    assert report.check(True, "held")
    assert not report.check(False, "did not hold", "why\nand more")
    assert report.failed == 1
    assert out.getvalue().splitlines() == [
        "  ok    held",
        "  FAIL  did not hold",
        "          why",
        "          and more",
    ]


@pytest.mark.parametrize(
    ("bits", "shown"),
    [(2.5e9, "2.50 Gbit/s"), (940e6, "940.00 Mbit/s"), (12e3, "12.00 kbit/s"), (5, "5 bit/s")],
)
def test_rate(bits: float, shown: str) -> None:
    assert selftest._rate(bits) == shown
