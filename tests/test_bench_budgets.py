"""The budget check's verdicts (pure)."""

from __future__ import annotations

import pytest

from benchmarks.check_budgets import judge


@pytest.mark.parametrize(
    "value, budget, expected",
    [
        (10.0, {"max": 15}, ("OK", "max", 15.0, 45.0)),
        (40.0, {"max": 15}, ("WARN", "max", 15.0, 45.0)),
        (50.0, {"max": 15}, ("FAIL", "max", 15.0, 45.0)),
        (50.0, {"max": 15, "fail_above": 150}, ("WARN", "max", 15.0, 150.0)),
        (151.0, {"max": 15, "fail_above": 150}, ("FAIL", "max", 15.0, 150.0)),
        (None, {"max": 15}, ("FAIL", "max", 15.0, 45.0)),
        (120.0, {"min": 100}, ("OK", "min", 100.0, 100 / 3)),
        (52.0, {"min": 100, "fail_below": 15}, ("WARN", "min", 100.0, 15.0)),
        (10.0, {"min": 100, "fail_below": 15}, ("FAIL", "min", 100.0, 15.0)),
        (0.975, {"min": 0.99, "miss_tolerance": 30}, ("WARN", "min", 0.99, pytest.approx(0.7))),
        (0.5, {"min": 0.99, "miss_tolerance": 30}, ("FAIL", "min", 0.99, pytest.approx(0.7))),
    ],
)
def test_judge(value, budget, expected) -> None:  # type: ignore[no-untyped-def]
    assert judge(value, budget, 3.0) == expected
