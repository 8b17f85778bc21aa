"""ICE: the server announces exactly the configured host addresses and never needs STUN."""

from __future__ import annotations

from dataclasses import replace

import aiohttp

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
