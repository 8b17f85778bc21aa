"""ICE: the server announces exactly the configured host addresses and never needs STUN."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

import aiohttp
import aioice
import aioice.ice
from aioice.stun import RETRY_RTO
import pytest

from relay import aiortc_private
from relay.aiortc_private import consent_while_receiving, gather_only
from relay.client import whep_play, whip_publish
from relay.ice import default_host_addresses
from relay.synthetic import PatternTrack

from .conftest import FrameCollector, start_server
from signaling.config import Config


def candidate_addresses(sdp: str) -> set[str]:
    return {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}


async def test_loopback_only_server(config: Config) -> None:
    runner, app = await start_server(replace(config, ice_hosts=("127.0.0.1",)))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{config.base_url}/api/rooms", json={}, headers={"Authorization": f"Bearer {config.admin_key}"}
            ) as resp:
                room = await resp.json()
            pub = await whip_publish(http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
            await pub.wait_connected()
            assert candidate_addresses(pub.pc.remoteDescription.sdp) == {"127.0.0.1"}
            collector = FrameCollector()
            viewer = await whep_play(http, room["links"]["whep"], on_track=collector.on_track)
            await viewer.wait_connected()
            assert candidate_addresses(viewer.pc.remoteDescription.sdp) == {"127.0.0.1"}
            await collector.wait_for("video", 5)
            await viewer.close()
            await collector.stop()
            await pub.close()
    finally:
        await runner.cleanup()


def test_default_addresses_are_real_interfaces_or_loopback() -> None:
    addresses = default_host_addresses()
    assert addresses
    assert all(a != "127.0.0.1" for a in addresses) or addresses == ("127.0.0.1",)



async def connected_pair(last_media_at: Callable[[], float]) -> tuple[aioice.Connection, aioice.Connection]:
    """Two aioice connections on loopback; the first keeps consent while ``last_media_at`` moves."""
    a = aioice.Connection(ice_controlling=True, components=1)
    b = aioice.Connection(ice_controlling=False, components=1)
    consent_while_receiving(a, last_media_at)
    for one in (a, b):
        gather_only(one, ("127.0.0.1",))
        await one.gather_candidates()
    for one, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            await one.add_remote_candidate(candidate)
        await one.add_remote_candidate(None)
        one.remote_username, one.remote_password = other.local_username, other.local_password
    await asyncio.gather(a.connect(), b.connect())
    return a, b


@pytest.mark.parametrize("media_arrives", [True, False])
async def test_ingest_consent_outlives_a_peer_that_stops_answering_stun_only_while_media_arrives(
    monkeypatch: pytest.MonkeyPatch, media_arrives: bool
) -> None:
    # FFmpeg's WHIP muxer answers STUN only while connecting: its media must keep the ingest alive,
    # and without media the six unanswered checks still end it.
    monkeypatch.setattr(aiortc_private, "CONSENT_INTERVAL", 0.1)
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.1)  # so that aioice's own checks would end it too
    media_at = time.monotonic()
    a, b = await connected_pair(lambda: media_at)
    try:
        b.request_received = lambda *args: None  # type: ignore[method-assign]  # b goes deaf to STUN
        # Six failed checks take up to 6 x (1.2 x 0.1 s + aioice's 0.5 s transaction timeout): 3.7 s.
        deadline = time.monotonic() + 2 * 6 * (1.2 * 0.1 + RETRY_RTO)
        while time.monotonic() < deadline and a._query_consent_task is not None:
            if media_arrives:
                media_at = time.monotonic()
            await asyncio.sleep(0.02)
        assert (a._query_consent_task is not None) == media_arrives
    finally:
        await asyncio.gather(a.close(), b.close())
