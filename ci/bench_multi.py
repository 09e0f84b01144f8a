"""Figures of ci/bench.py's two-client scenario (``--only multi``), and its table rows.

A server of a peers file with two peers, a client host each: one client alone, then both at
once, each way. Per direction and run: the alone rate, each client's received rate at once,
their total, total / alone, Jain's fairness index between the two, and the server's cores used
while both ran (CPU seconds / wall seconds). The summary is the median of each figure over the
runs, with each goal of issue 10 and whether that median meets it. The handshake-cost table is
ci/bench_handshake.py's own measure(), reused as it is.
"""

from __future__ import annotations

import importlib
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Goals (issue 10): figure -> the least value that meets it.
GOALS = {"alone_gbps": 1.9, "share": 0.90, "jain": 0.95}
HANDSHAKE_PEERS = (1, 100, 10_000)
HANDSHAKE_ROUNDS = 20


def jain(rates: Sequence[float]) -> float:
    """Jain's fairness index, (sum x)^2 / (n * sum x^2): 1 when all are equal, 1/n when one
    takes everything; NaN when there is nothing to share (no rates, or all zero)."""
    squares = sum(x * x for x in rates)
    if not rates or squares == 0:
        return math.nan
    return sum(rates) ** 2 / (len(rates) * squares)


def cores_used(cpu_seconds: float, wall_seconds: float) -> float:
    """CPU seconds a process used over a wall-clock interval, in cores (1.5 = one core and a
    half busy throughout)."""
    if wall_seconds <= 0:
        raise ValueError(f"wall time must be positive, not {wall_seconds}")
    return cpu_seconds / wall_seconds


def figures(
    alone: float,
    at_once: Sequence[float],
    cores: float,
    ping: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """One direction of one run: rates in Gbit/s (one client alone, each client at once);
    ping: the RTTs through the tunnel while one client alone saturates it (bench.py's
    rtt_stats), if measured."""
    total = sum(at_once)
    out = {"alone_gbps": alone}
    if ping is not None:
        out |= {f"ping_{k}": ping[k] for k in ("p50_ms", "p99_ms", "max_ms")}
    out |= {f"client{i + 1}_gbps": rate for i, rate in enumerate(at_once)}
    return out | {
        "total_gbps": total,
        "share": total / alone if alone > 0 else math.nan,
        "jain": jain(at_once),
        "server_cores": cores,
    }


def medians(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The median over runs of each figure (a figure missing from a run is left out there)."""
    keys = sorted({k for run in runs for k in run})
    return {k: statistics.median(run[k] for run in runs if k in run) for k in keys}


def verdicts(figs: Mapping[str, float]) -> dict[str, bool]:
    """Whether each goal is met (NaN, a figure that could not be taken, meets none)."""
    return {k: k in figs and figs[k] >= least for k, least in GOALS.items()}


def summary(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """Per direction (``fwd``, ``rev``): the medians over runs and the verdicts on them."""
    out: dict[str, Any] = {}
    for direction in ("fwd", "rev"):
        meds = medians([run[direction] for run in runs if direction in run])
        out[direction] = meds | {"met": verdicts(meds)}
    return out


# --------------------------------------------------------------------------------------------
# Table


Cell = Callable[[dict[str, Any]], str]


def _goal(figs: Mapping[str, Any], key: str, text: str) -> str:
    return f"{text} {'met' if figs['met'][key] else 'NOT met'}"


def _alone(f: Mapping[str, Any]) -> str:
    return _goal(f, "alone_gbps", f"{f['alone_gbps']:.2f}")


def _each(f: Mapping[str, Any]) -> str:
    return f"{f['client1_gbps']:.2f}+{f['client2_gbps']:.2f} ({f['total_gbps']:.2f})"


def _share(f: Mapping[str, Any]) -> str:
    return _goal(f, "share", f"{f['share']:.0%}")


def _jain(f: Mapping[str, Any]) -> str:
    return _goal(f, "jain", f"{f['jain']:.3f}")


def _cores(f: Mapping[str, Any]) -> str:
    return f"{f['server_cores']:.2f}"


def _ping(f: Mapping[str, Any]) -> str:
    return f"{f['ping_p50_ms']:.2f}/{f['ping_p99_ms']:.2f}/{f['ping_max_ms']:.2f}"


def _cell(direction: str, fmt: Callable[[Mapping[str, Any]], str]) -> Cell:
    return lambda r: fmt(r["multi"][direction])


def rows() -> list[tuple[str, Cell]]:
    """(label, cell of one implementation's summarised results) for bench.py's table."""
    out: list[tuple[str, Cell]] = []
    for d, name in (("fwd", "upload"), ("rev", "download")):
        out += [
            (f"{name}: 1 peer alone Gbit/s (goal >= {GOALS['alone_gbps']})", _cell(d, _alone)),
            ("  ping ms p50/p99/max meanwhile", _cell(d, _ping)),
            ("  both at once Gbit/s, each (total)", _cell(d, _each)),
            (f"  total / alone (goal >= {GOALS['share']:.0%})", _cell(d, _share)),
            (f"  Jain's index (goal >= {GOALS['jain']})", _cell(d, _jain)),
            ("  server cores used, both at once", _cell(d, _cores)),
        ]
    return out


# --------------------------------------------------------------------------------------------
# Handshake cost


def handshakes(peers: Sequence[int] = HANDSHAKE_PEERS) -> dict[str, Any]:
    """ci/bench_handshake.py's measure() for each number of peers (milliseconds), or why not."""
    try:
        measure = importlib.import_module("bench_handshake").measure
        return {str(n): measure(n, HANDSHAKE_ROUNDS) for n in peers}
    except Exception as exc:  # another script, or a build without _multi: report, go on
        return {"error": f"{type(exc).__name__}: {exc}"}


def handshake_lines(result: Mapping[str, Any]) -> list[str]:
    if "error" in result:
        return [f"handshake cost: not measured ({result['error']})"]
    lines = [
        f"handshake cost, ms (median of {HANDSHAKE_ROUNDS}, installed dsvpn, loopback):",
        f"{'peers':>8} {'set_peers':>10} {'first peer':>11} {'last peer':>10} {'unknown':>9}",
    ]
    for n, r in result.items():
        lines.append(
            f"{int(n):>8} {r['set_peers_ms']:>10.2f} {r['first']:>11.3f} {r['last']:>10.3f}"
            f" {r['unknown']:>9.3f}"
        )
    return lines
