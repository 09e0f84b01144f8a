"""Numbers and times as people read them: sizes in binary units, counts with separators,
durations and ages in words. Used by `dsvpn status` and the log lines."""

from __future__ import annotations

_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
# (seconds, singular, plural), largest first
_TIME_UNITS = (
    (86400, "day", "days"),
    (3600, "hour", "hours"),
    (60, "minute", "minutes"),
    (1, "second", "seconds"),
)


def size(n: int) -> str:
    """Bytes: "512 B", "1.50 KiB", "12.34 MiB", "2.00 GiB" (powers of 1024)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _SIZE_UNITS:
        value /= 1024
        if value < 1024 or unit == _SIZE_UNITS[-1]:
            break
    return f"{value:.2f} {unit}"


def count(n: int) -> str:
    """An integer with thousands separators: 1234567 -> "1,234,567"."""
    return f"{n:,}"


def plural(n: int, one: str, many: str) -> str:
    """ "1 client", "2 clients"."""
    return f"{n} {one if n == 1 else many}"


def duration(seconds: float) -> str:
    """A length of time in its two largest units: "45 seconds", "3 minutes, 12 seconds",
    "2 days, 1 hour" (a zero second unit is left out: "1 hour"). Under a second: "0 seconds"."""
    total = max(0, int(seconds))
    for i, (unit, one, many) in enumerate(_TIME_UNITS):
        if total < unit and unit != 1:
            continue
        n, rest = divmod(total, unit)
        text = plural(n, one, many)
        if i + 1 < len(_TIME_UNITS):
            sub, sub_one, sub_many = _TIME_UNITS[i + 1]
            if rest // sub:
                text += ", " + plural(rest // sub, sub_one, sub_many)
        return text
    raise AssertionError("unreachable: the last unit is one second")


def age(then: float, now: float) -> str:
    """How long ago `then` was, seen at `now` (both Unix seconds): "just now", "3 minutes
    ago". A time in the future (clocks stepped) reads "just now" too."""
    if now - then < 1:
        return "just now"
    return f"{duration(now - then)} ago"
