"""FanOut: which lean viewer gets which packet (keyframe waits, rung cut-overs, restarts, pauses,
the end), and what each one was sent, exactly."""

from __future__ import annotations

from typing import Any

import av
import pytest

from relay import fanout as fanout_module
from relay.fanout import FanOut, PacketTrack


class Sent:
    """What publish handed to the native sender: per packet, the streams it went to."""

    def __init__(self) -> None:
        self.calls: list[set[str]] = []

    def __call__(self, streams: list[Any], frame: object, timestamp: int) -> None:
        assert len(streams) == len(set(map(id, streams))), "a stream listed twice"
        self.calls.append({s.name for s in streams})


class Stream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.waiting_for_keyframe = False
        self.closed = False
        self.params = type("Params", (), {"clock_rate": 90000})()

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    record = Sent()
    monkeypatch.setattr(fanout_module, "send_frame_soon", record)
    monkeypatch.setattr(fanout_module, "native_frame", lambda packet, kind: None)
    return record


def packet(size: int, keyframe: bool, pts: int) -> av.Packet:
    p = av.Packet(bytes(size))
    p.is_keyframe = keyframe
    p.pts = pts
    return p


def lean_track(fanout: FanOut, name: str) -> PacketTrack:
    track = fanout.add_track()
    track.lean = True
    track.start_egress(Stream(name))  # type: ignore[arg-type]
    return track


def test_lean_viewers_get_every_packet_and_exact_counts_across_a_switch_restart_and_stop(sent: Sent) -> None:
    high, low = FanOut("video", name="high"), FanOut("video", name="low")
    a, b = lean_track(high, "a"), lean_track(high, "b")
    high.publish(packet(100, False, 1))  # both wait for a keyframe
    high.publish(packet(500, True, 2))
    high.publish(packet(80, False, 3))
    assert sent.calls == [{"a", "b"}, {"a", "b"}]

    a.switch_to(low)  # a keeps taking high until low has a keyframe, then only low
    low.publish(packet(60, False, 3))
    high.publish(packet(90, False, 4))
    low.publish(packet(300, True, 4))
    high.publish(packet(70, False, 5))
    low.publish(packet(50, False, 5))
    assert sent.calls[2:] == [{"a", "b"}, {"a"}, {"b"}, {"a"}]
    assert (a.packets_sent, a.bytes_sent, a.switches) == (5, 500 + 80 + 90 + 300 + 50, 1)
    assert (b.packets_sent, b.bytes_sent) == (4, 500 + 80 + 90 + 70)
    assert a.source is low and a not in high._tracks

    high.restart()  # a new encoder behind high: b waits for its keyframe again
    high.publish(packet(40, False, 6))
    high.publish(packet(400, True, 7))
    assert sent.calls[6:] == [{"b"}]
    assert (b.packets_sent, b.bytes_sent) == (5, 500 + 80 + 90 + 70 + 400)

    b.stop()
    high.publish(packet(30, False, 8))
    low.publish(packet(20, False, 6))
    assert sent.calls[7:] == [{"a"}]
    assert b.egress is not None and b.egress.closed and not high._tracks
    assert (a.packets_sent, a.bytes_sent) == (6, 500 + 80 + 90 + 300 + 50 + 20)


def test_a_viewer_paused_and_resumed_starts_again_at_a_keyframe(sent: Sent) -> None:
    rung = FanOut("video", name="rung")
    a = lean_track(rung, "a")
    rung.publish(packet(500, True, 1))
    a.switch_to(None)  # paused below the lowest rung
    rung.publish(packet(80, False, 2))
    a.switch_to(rung)
    rung.publish(packet(80, False, 3))
    rung.publish(packet(600, True, 4))
    assert sent.calls == [{"a"}, {"a"}]
    assert (a.packets_sent, a.bytes_sent) == (2, 1100)


def test_audio_viewers_need_no_keyframe_and_a_viewer_on_aiortcs_sender_queues(sent: Sent) -> None:
    audio = FanOut("audio")
    lean = lean_track(audio, "lean")
    queued = audio.add_track()  # no native stream: its packets queue for aiortc's sender
    for pts in range(3):
        audio.publish(packet(120, False, pts))
    assert sent.calls == [{"lean"}] * 3
    assert len(queued._queue) == 3 and queued.packets_sent == 0 and lean.bytes_sent == 360
