"""The soak benchmark's arithmetic (pure, exact values)."""

from __future__ import annotations

import pytest

from benchmarks.soak import on_time_share, slope_per_min


@pytest.mark.parametrize(
    "points, expected",
    [
        ([], 0.0),
        ([(0.0, 5.0)], 0.0),
        ([(10.0, 5.0), (10.0, 9.0)], 0.0),  # no time between them: no slope
        ([(0.0, 100.0), (30.0, 101.0), (60.0, 102.0)], 2.0),  # 1 MB per 30 s
        ([(0.0, 100.0), (60.0, 100.0), (120.0, 100.0)], 0.0),
        ([(0.0, 0.0), (60.0, 2.0), (120.0, 1.0)], 0.5),  # least squares, not end minus start
    ],
)
def test_slope_per_min(points: list[tuple[float, float]], expected: float) -> None:
    assert slope_per_min(points) == pytest.approx(expected)


def test_on_time_share_adds_up_every_worker_over_the_window() -> None:
    before = [{"frames_on_time": 10, "frames_late": 1, "frames_incomplete": 0},
              {"frames_on_time": 0, "frames_late": 0, "frames_incomplete": 0}]
    after = [{"frames_on_time": 100, "frames_late": 4, "frames_incomplete": 2},
             {"frames_on_time": 45, "frames_late": 0, "frames_incomplete": 0}]
    assert on_time_share(before, after) == round(135 / 140, 4)
    assert on_time_share(before, before) == 0.0
