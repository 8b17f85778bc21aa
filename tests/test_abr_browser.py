"""Adaptive bitrate with a real Chromium viewer behind the userspace link emulator.

Playwright intercepts the watch page's WHEP request: the offer goes out without the browser's own
candidates and the answer comes back pointing at the emulator, so every media packet crosses the
emulated link (the same trick relay.client uses for aiortc viewers).
"""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Browser, Page, Route

from relay.client import whip_publish
from relay.linkemu import LinkEmulator, LinkProfile, emulate_for, strip_candidates
from relay.synthetic import PatternTrack

from .conftest import RunningServer, until

pytestmark = pytest.mark.browser

OPEN = LinkProfile(delay_ms=20)
CAPPED = LinkProfile(rate_bps=400_000, delay_ms=20)


async def inbound_video(page: Page) -> dict[str, float]:
    return await page.evaluate(
        """async () => {
            const out = {framesDecoded: 0, frameHeight: 0};
            if (!window.player.pc) return out;
            (await window.player.pc.getStats()).forEach((s) => {
                if (s.type === 'inbound-rtp' && s.kind === 'video') {
                    out.framesDecoded = s.framesDecoded || 0; out.frameHeight = s.frameHeight || 0;
                }
            });
            return out;
        }"""
    )


async def test_chromium_viewer_moves_down_at_a_cap_and_back_up(server: RunningServer, browser: Browser) -> None:
    room = await server.create_room(title="abr browser")
    pub = await whip_publish(
        server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(640, 360, grain=True)]
    )
    links: list[LinkEmulator] = []

    async def through_emulator(route: Route) -> None:
        request = route.request
        if request.method != "POST":
            await route.continue_()
            return
        response = await route.fetch(post_data=strip_candidates(request.post_data or ""))
        body = await response.text()
        if response.status == 201:
            emulator, body = await emulate_for(body, downstream_profile=OPEN)
            links.append(emulator)
        await route.fulfill(response=response, body=body)

    page = await browser.new_page()
    await page.route("**/whep/**", through_emulator)
    live_room = server.rooms.get(room["id"])
    try:
        await pub.wait_connected()
        await page.goto(room["links"]["watch"])
        await until(lambda: len(links) == 1 and len(live_room.viewers) == 1, 15)
        viewer = next(iter(live_room.viewers.values()))

        async def on(rung: str, height: int) -> bool:
            stats = await inbound_video(page)
            return viewer.describe()["rung"] == rung and stats["frameHeight"] == height

        await until(lambda: on("360p", 360), 20)
        await until(lambda: viewer.abr.estimate_bps is not None, 10)  # Chrome sends REMB

        links[0].set_downstream(CAPPED)
        await until(lambda: on("180p", 180), 20)
        before = (await inbound_video(page))["framesDecoded"]
        await asyncio.sleep(2)
        assert (await inbound_video(page))["framesDecoded"] > before + 20  # still playing, smaller

        links[0].set_downstream(OPEN)
        await until(lambda: on("360p", 360), 45)
        # All of it went through the emulator: at least a packet per frame the page decoded.
        decoded = (await inbound_video(page))["framesDecoded"]
        assert decoded > 100 and links[0].stats().downstream.packets >= decoded
    finally:
        await page.close()
        for emulator in links:
            await emulator.close()
        await pub.close()

