"""Sizes, counts, durations and ages as `dsvpn status` and the logs show them."""

from __future__ import annotations

import pytest

from dsvpn import human


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (1_269_000, "1.21 MiB"),
        (5 * 2**30, "5.00 GiB"),
        (3 * 2**40 + 2**39, "3.50 TiB"),
        (2**70, "1024.00 EiB"),  # the largest unit grows instead of running out
    ],
)
def test_size(n: int, text: str) -> None:
    assert human.size(n) == text


def test_count() -> None:
    assert human.count(4_567_890) == "4,567,890"
    assert human.count(7) == "7"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "0 seconds"),
        (0.9, "0 seconds"),
        (1, "1 second"),
        (59, "59 seconds"),
        (60, "1 minute"),
        (61, "1 minute, 1 second"),
        (192, "3 minutes, 12 seconds"),
        (3600, "1 hour"),
        (3600 + 59, "1 hour"),  # seconds are below the two largest units
        (7260, "2 hours, 1 minute"),
        (86400 + 3600, "1 day, 1 hour"),
        (3 * 86400 + 59, "3 days"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert human.duration(seconds) == text


def test_age() -> None:
    assert human.age(1000, 1000.5) == "just now"
    assert human.age(1000, 900) == "just now"  # clocks stepped back
    assert human.age(1000, 1180) == "3 minutes ago"
    assert human.age(0, 86400 * 2) == "2 days ago"


def test_plural() -> None:
    assert human.plural(1, "client", "clients") == "1 client"
    assert human.plural(0, "client", "clients") == "0 clients"
