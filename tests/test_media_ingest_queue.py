"""The ingest decoder's input is bounded: behind by too much, it skips to a keyframe and asks for one."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from relay.decodequeue import BoundedDecodeQueue, is_keyframe


@dataclass
class Codec:
    name: str


@dataclass
class Frame:
    data: bytes


VP8_KEY, VP8_DELTA = b"\x10\x02\x00", b"\x31\x02\x00"


@pytest.mark.parametrize(
    "codec, data, expected",
    [
        ("vp8", VP8_KEY, True),
        ("vp8", VP8_DELTA, False),
        ("h264", b"\x00\x00\x00\x01\x67\x42" + b"\x00\x00\x00\x01\x68\xce" + b"\x00\x00\x01\x65\x88", True),  # SPS PPS IDR
        ("h264", b"\x00\x00\x00\x01\x41\x9a", False),  # non-IDR slice
        ("vp8", b"", False),
    ],
)
def test_is_keyframe(codec: str, data: bytes, expected: bool) -> None:
    assert is_keyframe(codec, data) is expected


def test_overflow_drops_queue_asks_for_keyframe_and_resumes_there() -> None:
    error = threading.Event()
    q = BoundedDecodeQueue(error, max_frames=3)
    vp8 = Codec("vp8")
    for _ in range(3):
        q.put((vp8, Frame(VP8_DELTA)))
    assert q.qsize() == 3 and not error.is_set()
    q.put((vp8, Frame(VP8_DELTA)))  # one too many: everything queued goes, a PLI is asked for
    assert q.qsize() == 0 and error.is_set() and q.waiting_for_keyframe
    q.put((vp8, Frame(VP8_DELTA)))  # cannot be decoded without its references: dropped
    assert q.qsize() == 0
    q.put((vp8, Frame(VP8_KEY)))
    assert q.qsize() == 1 and not q.waiting_for_keyframe
    assert q.frames_dropped == 5
    q.put(None)  # aiortc's shutdown sentinel always passes
    assert q.qsize() == 2


def test_waiting_for_a_keyframe_asks_again_until_it_comes() -> None:
    """The host may never answer the first PLI (lost, or a busy host): a browser sends keyframes only
    when asked, so the queue asks again every retry_s while deltas arrive, and stops once one comes."""
    now = [10.0]
    error = threading.Event()
    q = BoundedDecodeQueue(error, max_frames=3, retry_s=1.0, clock=lambda: now[0])
    vp8 = Codec("vp8")
    q.wait_for_keyframe()  # the jitter buffer skipped a hole and sent its own PLI at 10.0
    asked = []
    for step in range(1, 26):  # 2.5 s of deltas at 100 ms
        now[0] = 10.0 + step * 0.1
        q.put((vp8, Frame(VP8_DELTA)))
        if error.is_set():
            asked.append(round(now[0], 1))
            error.clear()
    assert asked == [11.0, 12.0] and q.keyframe_retries == 2
    assert q.qsize() == 0 and q.frames_dropped == 25
    q.put((vp8, Frame(VP8_KEY)))
    now[0] += 3
    q.put((vp8, Frame(VP8_DELTA)))
    assert q.qsize() == 2 and not error.is_set() and q.keyframe_retries == 2


def test_an_overflow_waits_for_its_keyframe_with_retries_too() -> None:
    now = [0.0]
    error = threading.Event()
    q = BoundedDecodeQueue(error, max_frames=1, retry_s=0.5, clock=lambda: now[0])
    vp8 = Codec("vp8")
    q.put((vp8, Frame(VP8_DELTA)))
    q.put((vp8, Frame(VP8_DELTA)))  # overflow at 0.0: PLI asked
    assert error.is_set() and q.waiting_for_keyframe
    error.clear()
    now[0] = 0.4
    q.put((vp8, Frame(VP8_DELTA)))
    assert not error.is_set()
    now[0] = 0.5
    q.put((vp8, Frame(VP8_DELTA)))
    assert error.is_set() and q.keyframe_retries == 1
