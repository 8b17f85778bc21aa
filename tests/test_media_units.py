"""Pure pieces of the media path, tested with exact values."""

from __future__ import annotations

import math

import pytest

from relay.handoff import Handoff
from relay.keyframes import KeyframeRequests
from relay.sdp import MediaSection, OfferSummary, SdpError, check_ingest_offer, check_playback_offer, parse_offer
from signaling.auth import TokenClaims, TokenSigner

OFFER = """v=0
o=- 1 1 IN IP4 0.0.0.0
s=-
t=0 0
m=video 9 UDP/TLS/RTP/SAVPF 96 97 98
a=sendonly
a=rtpmap:96 VP8/90000
a=rtpmap:97 rtx/90000
a=rtpmap:98 H264/90000
m=audio 9 UDP/TLS/RTP/SAVPF 111
a=rtpmap:111 opus/48000/2
"""


def test_parse_offer_sections() -> None:
    assert parse_offer(OFFER) == OfferSummary(
        (
            MediaSection("video", 9, "sendonly", frozenset({"vp8", "rtx", "h264"})),
            MediaSection("audio", 9, "sendrecv", frozenset({"opus"})),
        )
    )


@pytest.mark.parametrize(
    "offer, check, expected_kinds, error",
    [
        (OFFER, check_ingest_offer, {"video", "audio"}, None),
        (OFFER.replace("a=sendonly", "a=recvonly"), check_ingest_offer, None, "unsupported_codec"),
        (OFFER.replace("VP8", "AV1").replace("H264", "VP9"), check_ingest_offer, None, "unsupported_codec"),
        (OFFER.replace("m=video 9", "m=video 0"), check_ingest_offer, None, "unsupported_codec"),
        (OFFER.replace("a=sendonly", "a=recvonly"), check_playback_offer, {"video", "audio"}, None),
        (OFFER.replace("a=sendonly", "a=recvonly").replace("VP8", "AV1"), check_playback_offer, {"audio"}, None),
        (OFFER.replace("opus", "PCMU").replace("VP8", "AV1"), check_playback_offer, None, "unsupported_codec"),
        ("", check_ingest_offer, None, "bad_sdp"),
        ("v=1\n", check_ingest_offer, None, "bad_sdp"),
        ("v=0\ns=-\n", check_ingest_offer, None, "bad_sdp"),
        ("v=0\nm=video x UDP 96\n", check_ingest_offer, None, "bad_sdp"),
    ],
)
def test_offer_checks(offer, check, expected_kinds, error) -> None:  # type: ignore[no-untyped-def]
    if error is None:
        assert check(parse_offer(offer)).kinds() == expected_kinds
    else:
        with pytest.raises(SdpError) as info:
            check(parse_offer(offer))
        assert info.value.code == error


@pytest.mark.parametrize(
    "steps, expected",
    [
        # (action, time) -> results of should_force at 'frame' steps
        ([("frame", 0.0)], [False]),
        ([("request", 0.0), ("frame", 0.0), ("frame", 0.03)], [True, False]),
        # two requests 0.1 s apart: second one waits for the interval, then fires once
        ([("request", 0.0), ("frame", 0.0), ("request", 0.1), ("frame", 0.1), ("frame", 0.4), ("frame", 0.5), ("frame", 0.6)],
         [True, False, False, True, False]),
        # a natural keyframe satisfies a pending request
        ([("request", 0.0), ("keyframe", 0.0), ("frame", 0.7)], [False]),
        # a request long after the last keyframe fires at once
        ([("keyframe", 0.0), ("request", 5.0), ("frame", 5.0)], [True]),
    ],
)
def test_keyframe_coalescing(steps: list[tuple[str, float]], expected: list[bool]) -> None:
    policy = KeyframeRequests(min_interval_s=0.5)
    results = []
    for action, now in steps:
        if action == "request":
            policy.request()
        elif action == "keyframe":
            policy.saw_keyframe(now)
        else:
            results.append(policy.should_force(now))
    assert results == expected


def test_keyframe_storm_costs_one() -> None:
    policy = KeyframeRequests(min_interval_s=0.5, last_keyframe_at=-math.inf)
    forced = 0
    for i in range(30):  # one second of frames, a request before each
        policy.request()
        forced += policy.should_force(i / 30)
    assert forced == 2 and policy.forced_count == 2


def test_tokens() -> None:
    signer = TokenSigner(b"k" * 32)
    token = signer.issue("room1", "host", expires_at=1000)
    assert signer.verify(token, now=999) == TokenClaims("room1", "host", 1000.0)
    assert signer.verify(token, now=1001) is None  # expired
    assert TokenSigner(b"x" * 32).verify(token, now=0) is None  # other secret
    payload, sig = token.split(".")
    assert signer.verify(payload + "." + sig[:-1] + ("A" if sig[-1] != "A" else "B"), now=0) is None
    for junk in ("", ".", "a.b.c", "!!!.???", "e30.e30"):
        assert signer.verify(junk, now=0) is None


def test_handoff_keeps_newest_and_counts_drops() -> None:
    slot: Handoff[int] = Handoff(1)
    for i in range(5):
        slot.put(i)
    assert slot.take(0) == 4 and slot.dropped == 4
    assert slot.take(0) is None
    queue: Handoff[int] = Handoff(3)
    for i in range(5):
        queue.put(i)
    assert [queue.take(0), queue.take(0), queue.take(0)] == [2, 3, 4]
    queue.put(9)
    queue.close()
    assert queue.take(1.0) is None and queue.closed


def test_pk_audio_mix_sums_and_clips() -> None:
    import av
    import numpy as np

    from relay.pipeline import mix

    def frame(value: int) -> av.AudioFrame:
        f = av.AudioFrame.from_ndarray(np.full((1, 1920), value, np.int16), format="s16", layout="stereo")
        f.sample_rate = 48000
        return f

    assert mix(frame(1000), frame(-300)).to_ndarray().tolist() == [[700] * 1920]
    assert mix(frame(30000), frame(10000)).to_ndarray().max() == 32767  # clipped, not wrapped
    assert mix(frame(5), frame(5)).sample_rate == 48000
