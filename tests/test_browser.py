"""A real Chromium: the studio page publishes its fake camera, the watch page plays it."""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Browser, Page

from .conftest import RunningServer

pytestmark = pytest.mark.browser


async def frames_decoded(page: Page) -> int:
    return await page.evaluate(
        """async () => {
            if (!window.player.pc) return 0;
            const stats = await window.player.pc.getStats();
            let n = 0;
            stats.forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0; });
            return n;
        }"""
    )


async def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.2)

    await asyncio.wait_for(poll(), timeout)


async def test_studio_publishes_and_watch_page_plays(server: RunningServer, browser: Browser) -> None:
    room = await server.create_room(title="Browser show")
    context = await browser.new_context()
    watch = await context.new_page()
    studio = await context.new_page()
    errors: list[str] = []
    for page in (watch, studio):
        page.on("pageerror", lambda exc: errors.append(str(exc)))

    await watch.goto(room["links"]["watch"])
    # Before the host: connected to the room, told to wait.
    await watch.wait_for_function("window.player && window.player.status === 'playing'", timeout=15000)
    assert await watch.locator("#banner").inner_text() == "Waiting for the host..."
    assert await watch.locator("#title").inner_text() == "Browser show"

    await studio.goto(room["links"]["studio"])
    await studio.wait_for_function("window.studio.state === 'ready'", timeout=15000)
    await studio.click("#golive")
    await studio.wait_for_function("window.studio.state === 'connected'", timeout=15000)
    live_room = server.rooms.get(room["id"])
    assert live_room.live

    # The watch page notices the host by itself and decodes the host's frames.
    await watch.wait_for_function("window.player.hostLive === true", timeout=10000)
    await wait_for(lambda: watch.locator("#banner").is_hidden())
    first = await frames_decoded(watch)
    await wait_for(lambda: _more_frames(watch, first + 30))
    assert await studio.locator("#viewers").inner_text() == "1"
    assert live_room.publisher.frames_received > 10  # the host's camera frames, decoded at ingest

    # Host stops: the viewer stays connected and is told the host is away.
    await studio.click("#stop")
    await watch.wait_for_function("window.player.hostLive === false", timeout=10000)
    assert await watch.locator("#banner").inner_text() == "Waiting for the host..."
    assert len(live_room.viewers) == 1
    assert errors == []
    await context.close()
    await asyncio.wait_for(_until(lambda: not live_room.viewers), 10)


async def _more_frames(page: Page, target: int) -> bool:
    return await frames_decoded(page) >= target


async def _until(predicate) -> None:  # type: ignore[no-untyped-def]
    while not predicate():
        await asyncio.sleep(0.1)


async def test_watch_page_stock_ui_and_buy_button(server: RunningServer, browser: Browser) -> None:
    from .test_overlay_e2e import ADMIN, seed_catalogue

    skus = {"tee-s": "S", "tee-m": "M"}
    await seed_catalogue(server, skus, on_hand=10)
    room = await server.create_room(title="Shop", region="US-West", skus=list(skus))
    context = await browser.new_context()
    watch = await context.new_page()
    studio = await context.new_page()
    errors: list[str] = []
    for page in (watch, studio):
        page.on("pageerror", lambda exc: errors.append(str(exc)))
    await watch.goto(room["links"]["watch"])
    await watch.wait_for_selector("#tiles .tile[data-sku='tee-m']")
    assert await watch.locator("#headline").inner_text() == "10 in stock"
    assert await watch.locator("#product-name").inner_text() == "Hoodie 连帽衫"

    # The warehouse ships 8 size-M units elsewhere: the tile turns "low" without a reload.
    async with server.http.post(
        f"{server.base}/api/stock/events",
        json={"events": [{"id": "e1", "warehouse": "LAX", "sku": "tee-m", "delta": -8, "seq": 1}]},
        headers=ADMIN,
    ) as resp:
        assert resp.status == 200
    await watch.wait_for_selector("#tiles .tile[data-sku='tee-m'][data-status='critical'], #tiles .tile[data-sku='tee-m'][data-status='low']")

    # The viewer picks size M and buys one: a real reservation in the ledger, shown on the page.
    await watch.click("#tiles .tile[data-sku='tee-m']")
    assert await watch.locator("#headline").inner_text() == "Only 2 left"
    await watch.click("#buy")
    await watch.wait_for_function("document.getElementById('order-msg').textContent.includes('Reserved 1')")
    async with server.http.get(f"{server.base}/api/stock/tee-m") as resp:
        stock = await resp.json()
    us_west = next(r for r in stock["regions"] if r["region"] == "US-West")
    assert (us_west["sellable"], us_west["reserved"]) == (1, 1), stock
    await watch.wait_for_function("document.getElementById('headline').textContent === 'Only 1 left'")

    # The host features size M from the studio console; the watch page follows.
    await studio.goto(room["links"]["studio"])
    await studio.wait_for_selector("#skus tr[data-sku='tee-m'] button.feature")
    await studio.click("#skus tr[data-sku='tee-m'] button.feature")
    await watch.wait_for_function("window.player.stock.featured === 'tee-m'")
    compositor = server.rooms.get(room["id"]).media.compositor
    assert compositor.scene is not None and compositor.scene.card.headline == "Only 1 left"
    assert errors == []
    await context.close()
