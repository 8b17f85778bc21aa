"""Keyframe waits (pure logic, exact values, a fake clock)."""

from __future__ import annotations

import pytest

from relay.keyframes import KeyframeWait


@pytest.mark.parametrize(
    "frames, passed, requests",
    [
        # (arrival time, is a keyframe) after start() at t=0, retry_s=1
        ([(0.5, False), (0.9, False), (1.0, False), (1.5, False), (2.0, False)], [False] * 5, [1.0, 2.0]),
        ([(0.5, False), (0.6, True), (5.0, False)], [False, True, True], []),
        # no frames for a while: one request when they come back, not one per missed second
        ([(3.0, False), (3.5, False), (4.0, False)], [False, False, False], [3.0, 4.0]),
        ([(0.1, True)], [True], []),
    ],
)
def test_keyframe_wait(frames: list[tuple[float, bool]], passed: list[bool], requests: list[float]) -> None:
    now = [0.0]
    asked: list[float] = []
    wait = KeyframeWait(lambda: asked.append(now[0]), retry_s=1.0, clock=lambda: now[0])
    assert wait.admit(False)  # not waiting: everything passes
    wait.start()
    got = []
    for at, keyframe in frames:
        now[0] = at
        got.append(wait.admit(keyframe))
    assert got == passed
    assert asked == requests and wait.retries == len(requests)
