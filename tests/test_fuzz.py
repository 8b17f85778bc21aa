"""Fuzzing: SDP bodies, tokens and feed payloads never crash anything, and rejections change nothing.

The pure parsers are fuzzed with hypothesis; the HTTP surface with seeded mutations of valid
requests (many per test, one server), asserting no 5xx and unchanged state. Longer runs:
SHELFCAST_FUZZ_SEED=7 SHELFCAST_FUZZ_REQUESTS=5000 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.stock.validation import ValidationFailed, parse_events, parse_snapshot
from relay.sdp import SdpError, check_ingest_offer, check_playback_offer, keep_offered_bundle, parse_offer, prepare_offer
from signaling.auth import TokenSigner

from .conftest import ADMIN_KEY, RunningServer, until
from .test_api_errors import offer_sdp
from .test_overlay_e2e import seed_catalogue

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SDP_LINE = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["v=0", "m=video 9 UDP/TLS/RTP/SAVPF 96", "m=audio 0 RTP 111", "a=sendonly", "a=recvonly", "a=rtpmap:96 VP8/90000", "a=rtpmap:", "m=", "a=inactive",
                     "a=group:BUNDLE 0 1", "a=mid:0", "a=mid:1", "a=bundle-only", "a=setup:actpass", "a=setup:x", "a=ice-ufrag:u",
                     "a=rtpmap:96 H264/90000", "a=fmtp:96 profile-level-id=64001f", "a=fmtp:"]),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.lists(SDP_LINE, max_size=20))
def test_sdp_checks_only_raise_sdp_errors(lines: list[str]) -> None:
    text = "\r\n".join(lines)
    for check in (check_ingest_offer, check_playback_offer):
        try:
            check(parse_offer(text))
        except SdpError as err:
            assert err.code in ("bad_sdp", "unsupported_codec", "too_many_tracks") and err.message
        else:  # what the checks let through is rewritten for aiortc without an error of its own
            offer = prepare_offer(text, ingest=check is check_ingest_offer)
            assert parse_offer(offer.sdp).kinds() == parse_offer(text).kinds()
            keep_offered_bundle(offer.sdp, parse_offer(text).bundle)


@FUZZ
@given(st.text(max_size=200), st.floats(allow_nan=False))
def test_tokens_never_raise(token: str, now: float) -> None:
    signer = TokenSigner(b"s" * 32)
    assert signer.verify(token, now) is None or token.count(".") == 1


@FUZZ
@given(JSON)
def test_feed_payloads_only_raise_validation_errors(body: Any) -> None:
    for parse in (lambda b: parse_events(b, 100), lambda b: parse_snapshot(b, 100)):
        try:
            parse(body)
        except ValidationFailed as err:
            assert 400 <= err.status < 500


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One of: truncate, flip bytes, duplicate or drop lines, insert junk."""
    choice = rng.randrange(5)
    if choice == 0:
        return data[: rng.randrange(len(data) + 1)]
    if choice == 1:
        out = bytearray(data)
        for _ in range(rng.randrange(1, 20)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    lines = data.split(b"\r\n")
    if choice == 2:
        rng.shuffle(lines)
    elif choice == 3:
        del lines[rng.randrange(len(lines))]
    else:
        lines.insert(rng.randrange(len(lines) + 1), bytes(rng.randrange(256) for _ in range(rng.randrange(60))))
    return b"\r\n".join(lines)


async def test_http_fuzz_never_5xx_and_never_changes_state(server: RunningServer) -> None:
    rng = random.Random(int(os.environ.get("SHELFCAST_FUZZ_SEED", "1234")))
    await seed_catalogue(server, {"tee-a": "S"}, on_hand=10)
    room = await server.create_room(region="US-West", skus=["tee-a"])
    live = server.rooms.get(room["id"])
    ingest = (await offer_sdp("video", "audio")).encode()
    playback = (await offer_sdp("video", "audio", direction="recvonly")).encode()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    stock_before = await (await server.http.get(f"{server.base}/api/stock/tee-a")).json()
    statuses: dict[int, int] = {}
    for i in range(int(os.environ.get("SHELFCAST_FUZZ_REQUESTS", "150"))):
        path, body, headers = rng.choice(
            [
                (f"/whip/{room['id']}", mutate(rng, ingest), {"Authorization": f"Bearer {mutate(rng, room['tokens']['host'].encode()).decode('latin-1')}"}),
                (f"/whep/{room['id']}", mutate(rng, playback), {}),
                ("/api/stock/events", mutate(rng, json.dumps({"events": [{"id": f"e{i}", "warehouse": "LAX", "sku": "tee-a", "delta": -1, "seq": 1}]}).encode()), admin),
                (f"/api/rooms/{room['id']}/orders", mutate(rng, json.dumps({"sku": "tee-a", "quantity": 1, "region": "US-West", "idempotency_key": f"o{i}"}).encode()), {}),
            ]
        )
        content_type = "application/sdp" if path.startswith(("/whip", "/whep")) else "application/json"
        try:
            async with server.http.post(server.base + path, data=body, headers={"Content-Type": content_type, **headers}) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                assert resp.status < 500, (path, body[:200], resp.status)
                if resp.status >= 400:
                    assert resp.content_type == "application/json"
                accepted = resp.status < 400
        except (UnicodeEncodeError, ValueError):
            continue  # a mutated token the HTTP client refuses to put in a header at all
        if accepted and path.startswith(("/whip", "/whep")):
            # A mutation that still makes a valid offer is a real session: end it, it is not a rejection.
            for session in [live.publisher, *live.viewers.values()]:
                if session is not None:
                    await session.close()
            await until(lambda: live.publisher is None and not live.viewers, 6)  # a close may be under way
        if accepted and path.startswith(("/api/stock", "/api/rooms")):
            stock_before = await (await server.http.get(f"{server.base}/api/stock/tee-a")).json()
        else:
            assert live.publisher is None and not live.viewers, (path, statuses)
    stock_after = await (await server.http.get(f"{server.base}/api/stock/tee-a")).json()
    assert stock_after["warehouses"][0]["on_hand"] == stock_before["warehouses"][0]["on_hand"]
    assert sum(count for status, count in statuses.items() if status >= 400) > 100  # mostly rejected
