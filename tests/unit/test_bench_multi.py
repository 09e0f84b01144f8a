"""The figures of ci/bench.py's two-client scenario (ci/bench_multi.py): Jain's index, cores
used, medians over runs and the goals judged on them."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ci"))

import bench_multi as bm


def test_jain_is_one_for_equal_shares_and_one_over_n_for_a_hog() -> None:
    assert bm.jain([2.0, 2.0]) == pytest.approx(1.0)
    assert bm.jain([1.0, 1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert bm.jain([3.0, 0.0]) == pytest.approx(0.5)
    assert bm.jain([5.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)


def test_jain_of_unequal_shares() -> None:
    # (1 + 2)^2 / (2 * (1 + 4)) = 9 / 10
    assert bm.jain([1.0, 2.0]) == pytest.approx(0.9)
    # scale-free: the same shares at another speed give the same index
    assert bm.jain([10.0, 20.0]) == pytest.approx(bm.jain([1.0, 2.0]))
    assert bm.jain([0.9, 1.1]) == pytest.approx(4.0 / (2 * (0.81 + 1.21)))


def test_jain_of_nothing_is_nan() -> None:
    assert math.isnan(bm.jain([]))
    assert math.isnan(bm.jain([0.0, 0.0]))


def test_cores_used() -> None:
    assert bm.cores_used(3.0, 2.0) == pytest.approx(1.5)
    assert bm.cores_used(0.0, 4.0) == 0.0
    with pytest.raises(ValueError, match="positive"):
        bm.cores_used(1.0, 0.0)


def test_figures_of_one_direction() -> None:
    f = bm.figures(2.0, [0.8, 1.0], 1.25)
    assert f["alone_gbps"] == 2.0
    assert (f["client1_gbps"], f["client2_gbps"]) == (0.8, 1.0)
    assert f["total_gbps"] == pytest.approx(1.8)
    assert f["share"] == pytest.approx(0.9)
    assert f["jain"] == pytest.approx(bm.jain([0.8, 1.0]))
    assert f["server_cores"] == 1.25
    assert math.isnan(bm.figures(0.0, [0.0, 0.0], 0.0)["share"])


def test_medians_per_figure() -> None:
    runs = [{"a": 1.0, "b": 10.0}, {"a": 3.0, "b": 30.0}, {"a": 2.0}]
    assert bm.medians(runs) == {"a": 2.0, "b": 20.0}  # b: median of the two runs that have it
    assert bm.medians([{"a": 4.0}]) == {"a": 4.0}
    assert bm.medians([]) == {}


def test_verdicts_at_and_around_each_goal() -> None:
    at = dict(bm.GOALS)
    assert bm.verdicts(at) == {k: True for k in bm.GOALS}
    below = {k: v - 1e-9 for k, v in bm.GOALS.items()}
    assert bm.verdicts(below) == {k: False for k in bm.GOALS}
    mixed = {"alone_gbps": 2.5, "share": 0.5, "jain": math.nan}
    assert bm.verdicts(mixed) == {"alone_gbps": True, "share": False, "jain": False}
    assert bm.verdicts({}) == {k: False for k in bm.GOALS}


def test_summary_judges_the_medians() -> None:
    def run(alone: float, a: float, b: float) -> dict[str, dict[str, float]]:
        return {d: bm.figures(alone, [a, b], 1.0) for d in ("fwd", "rev")}

    # Medians of alone 1.8/2.0/2.2 and shares 0.95/0.5/0.95: 2.0 and 0.95, both met, though
    # one run (the second) met neither.
    s = bm.summary([run(1.8, 0.9, 0.81), run(2.0, 0.5, 0.5), run(2.2, 1.045, 1.045)])
    fwd = s["fwd"]
    assert fwd["alone_gbps"] == pytest.approx(2.0)
    assert fwd["share"] == pytest.approx(0.95)
    assert fwd["met"] == {"alone_gbps": True, "share": True, "jain": True}
    assert s["rev"]["met"] == fwd["met"]


def test_table_rows_show_each_goal_and_whether_it_is_met() -> None:
    ping = {"p50_ms": 1.25, "p99_ms": 4.5, "max_ms": 6.0}
    s = bm.summary([{d: bm.figures(1.5, [0.9, 0.3], 1.4, ping) for d in ("fwd", "rev")}])
    cells = [(label, cell({"multi": s})) for label, cell in bm.rows()]
    assert len(cells) == 12
    assert all(len(label) <= 44 for label, _ in cells)  # bench.py's label column
    by_label = dict(cells[:6])
    assert by_label["  ping ms p50/p99/max meanwhile"] == "1.25/4.50/6.00"
    assert by_label["upload: 1 peer alone Gbit/s (goal >= 1.9)"] == "1.50 NOT met"
    assert by_label["  both at once Gbit/s, each (total)"] == "0.90+0.30 (1.20)"
    assert by_label["  total / alone (goal >= 90%)"] == "80% NOT met"
    assert by_label["  Jain's index (goal >= 0.95)"] == "0.800 NOT met"
    assert by_label["  server cores used, both at once"] == "1.40"


def test_handshake_lines() -> None:
    row = {"set_peers_ms": 1.0, "first": 0.03, "last": 2.5, "unknown": 2.4}
    lines = bm.handshake_lines({"1": row, "10000": row})
    assert len(lines) == 4 and lines[-1].split()[0] == "10000"
    assert bm.handshake_lines({"error": "ImportError: x"}) == [
        "handshake cost: not measured (ImportError: x)"
    ]
