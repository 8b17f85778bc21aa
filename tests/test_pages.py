"""What a shopper or a seller sees on the pages, in a real Chromium: each test here is a bug that
was on screen once (a stray "null", doubled variants, hidden things showing, a page that needed a
secure context, a studio that retried forever or said "offline" while viewers watched)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright

from relay.client import whip_publish
from relay.synthetic import PatternTrack, ToneTrack
from signaling.config import Config

from .conftest import ADMIN_KEY, RunningServer, start_server, until
from .test_browser import frames_decoded
from .test_overlay_e2e import seed_catalogue
from tests.tools.chromium import CHROMIUM, CHROMIUM_FLAGS

pytestmark = pytest.mark.browser

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PLAIN_HTTP_NAME = "shop.test"  # resolved to loopback by Chromium: an http:// origin that is not secure
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}


@pytest.fixture
async def insecure_browser() -> AsyncIterator[Browser]:
    """Chromium that reaches the test server as http://shop.test: not localhost, so not a secure
    context (no crypto.randomUUID, no camera), as a viewer reaching a server by its address sees it."""
    async with async_playwright() as p:
        rules = f"--host-resolver-rules=MAP {PLAIN_HTTP_NAME} 127.0.0.1"
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_FLAGS, rules], headless=True)
        yield browser
        await browser.close()


def on_plain_http_name(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{PLAIN_HTTP_NAME}:{parts.port}"))


def collect_errors(page: Page) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


async def publish(server: RunningServer, room: dict) -> object:  # type: ignore[type-arg]
    return await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"],
                              [PatternTrack(640, 360), ToneTrack()])


async def test_each_variant_once_and_no_null_on_the_card(server: RunningServer, browser: Browser) -> None:
    skus = {"tee-s": "S", "tee-m": "M", "tee-l": "L", "tee-xl": "XL"}
    await seed_catalogue(server, skus, on_hand=10)
    room = await server.create_room(title="Shop", region="US-West", skus=list(skus))
    context = await browser.new_context(**PHONE)
    watch, studio = await context.new_page(), await context.new_page()
    errors = collect_errors(watch) + collect_errors(studio)
    await watch.goto(room["links"]["watch"])
    await watch.wait_for_selector("#tiles .tile[data-sku='tee-xl']")
    assert await watch.locator("#tiles .tile").count() == 4  # was 8: S M L XL S M L XL
    card = await watch.locator("#product").inner_text()
    assert "null" not in card and "undefined" not in card, card
    assert await watch.locator("#product-variant").inner_text() == "S"  # which variant the card is about
    await studio.goto(room["links"]["studio"])
    await studio.wait_for_selector("#skus tr[data-sku='tee-xl']")
    assert await studio.locator("#skus tbody tr").count() == 4
    assert await studio.locator("#flash-sku option").count() == 4
    assert errors == []
    await context.close()


async def test_hidden_things_stay_hidden(server: RunningServer, browser: Browser) -> None:
    room = await server.create_room(title="No products yet")
    context = await browser.new_context()
    watch, studio = await context.new_page(), await context.new_page()
    await watch.goto(room["links"]["watch"])
    await studio.goto(room["links"]["studio"])
    await studio.wait_for_function("document.getElementById('pk-state').textContent === 'No battle.'")
    await watch.wait_for_timeout(500)  # the stock load has answered (an empty list)
    assert not await watch.locator("#shop").is_visible()  # an empty shop strip
    assert not await watch.locator("#invitation").is_visible()
    assert not await studio.locator("#console").is_visible()  # an empty products table
    assert not await studio.locator("#pk-answer").is_visible()  # Accept/Decline with no battle
    assert not await studio.locator("#pk-end").is_visible()
    await context.close()


async def test_the_watch_page_plays_and_sells_over_plain_http(server: RunningServer, insecure_browser: Browser) -> None:
    skus = {"tee-s": "S", "tee-m": "M"}
    await seed_catalogue(server, skus, on_hand=10)
    room = await server.create_room(title="Plain HTTP", region="US-West", skus=list(skus))
    pub = await publish(server, room)
    context = await insecure_browser.new_context(**PHONE)
    watch = await context.new_page()
    errors = collect_errors(watch)
    try:
        await watch.goto(on_plain_http_name(room["links"]["watch"]))
        assert await watch.evaluate("window.isSecureContext") is False
        await until(lambda: _more_than(watch, 20), 20, 0.3)
        await watch.wait_for_selector("#buy:not([disabled])")
        await watch.click("#buy")
        await watch.wait_for_function("document.getElementById('order-msg').textContent.includes('Reserved 1')")
        assert errors == []
    finally:
        await context.close()
        await pub.close()  # type: ignore[attr-defined]


async def _more_than(page: Page, frames: int) -> bool:
    return await frames_decoded(page) > frames


async def test_the_studio_over_plain_http_explains_https(server: RunningServer, insecure_browser: Browser) -> None:
    room = await server.create_room(title="Needs HTTPS")
    context = await insecure_browser.new_context()
    studio = await context.new_page()
    errors = collect_errors(studio)
    await studio.goto(on_plain_http_name(room["links"]["studio"]))
    await studio.wait_for_function("document.getElementById('banner').textContent.includes('needs HTTPS')")
    assert "--tls-cert" in await studio.locator("#banner").inner_text()
    assert not await studio.locator("#golive").is_visible()
    assert errors == []
    await context.close()


async def test_the_studio_without_a_token_shows_no_controls(server: RunningServer, browser: Browser) -> None:
    room = await server.create_room(title="No token")
    context = await browser.new_context()
    studio = await context.new_page()
    errors = collect_errors(studio)
    await studio.goto(room["links"]["studio"].split("#")[0])
    await studio.wait_for_function("document.getElementById('banner').textContent.includes('no host token')")
    for hidden in ("#golive", "#stop", "#console", "#pk", "#viewer-list", "#flash-form"):
        assert not await studio.locator(hidden).is_visible(), hidden
    assert errors == []
    await context.close()


async def test_the_studio_says_live_when_another_source_is_on_air(server: RunningServer, browser: Browser) -> None:
    """The demo's host (or OBS) publishes: the studio says LIVE, and Go live explains instead of
    retrying for ever against the source that is on air."""
    room = await server.create_room(title="OBS is live")
    pub = await publish(server, room)
    context = await browser.new_context()
    studio = await context.new_page()
    try:
        await studio.goto(room["links"]["studio"])
        await studio.wait_for_function("document.getElementById('live').textContent === 'LIVE (another source)'")
        await studio.wait_for_selector("#golive:not([disabled])")
        await studio.click("#golive")
        await studio.wait_for_function("window.studio.state === 'error'")
        assert "another source" in await studio.locator("#message").inner_text()
        await studio.wait_for_timeout(2500)  # no retry loop: still the same answer, no new attempt
        assert await studio.evaluate("window.studio.state") == "error"
    finally:
        await context.close()
        await pub.close()  # type: ignore[attr-defined]


async def test_a_paused_viewer_is_told_why_the_picture_stands_still(server: RunningServer, browser: Browser) -> None:
    room = await server.create_room(title="Thin link")
    pub = await publish(server, room)
    context = await browser.new_context(**PHONE)
    watch = await context.new_page()
    try:
        await watch.goto(room["links"]["watch"])
        await until(lambda: _more_than(watch, 10), 20, 0.3)
        assert not await watch.locator("#paused").is_visible()
        viewer = next(iter(server.rooms.get(room["id"]).viewers.values()))
        viewer.video.switch_to(None)  # what the ABR does below the lowest rung: no video, audio goes on
        await watch.wait_for_selector("#paused", state="visible", timeout=10000)
        assert "too slow" in await watch.locator("#paused").inner_text()
    finally:
        await context.close()
        await pub.close()  # type: ignore[attr-defined]


async def test_the_featured_product_survives_a_restart(config: Config) -> None:
    runner, app = await start_server(config)
    async with aiohttp.ClientSession() as http:
        server = RunningServer(app, config.base_url, http)
        skus = {"tee-s": "S", "tee-m": "M"}
        await seed_catalogue(server, skus, on_hand=10)
        room = await server.create_room(title="Featured", region="US-West", skus=list(skus))
        url = f"{config.base_url}/api/rooms/{room['id']}/overlay"
        async with http.put(url, json={"featured_sku": "tee-m"}, headers=ADMIN) as resp:
            assert resp.status == 200
    await runner.cleanup()
    runner, app = await start_server(config)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                assert (await resp.json())["featured_sku"] == "tee-m"
    finally:
        await runner.cleanup()


async def test_the_hosts_alerts_and_the_overlay_name_the_variant(server: RunningServer) -> None:
    """"Only 5 left" of which size, and a pivot that names another variant, not the same product."""
    skus = {"tee-s": "S", "tee-m": "M"}
    await seed_catalogue(server, skus, on_hand=100)
    room = await server.create_room(title="Alerts", region="US-West", skus=list(skus))
    async with server.http.post(
        f"{server.base}/api/stock/events",
        json={"events": [{"id": "m-out", "warehouse": "LAX", "sku": "tee-m", "delta": -95, "seq": 1}]}, headers=ADMIN,
    ) as resp:
        assert resp.status == 200

    async def low_alert() -> dict | None:  # type: ignore[type-arg]
        async with server.http.get(f"{server.base}/api/rooms/{room['id']}/alerts", headers=ADMIN) as resp:
            alerts = (await resp.json())["alerts"]
        return next((a for a in alerts if a["kind"] == "low_stock"), None)

    await until(low_alert, 10, 0.2)
    alert = await low_alert()
    assert alert is not None and alert["message"].startswith("Hoodie 连帽衫 · M: 5 left"), alert
    pivot = next(a for a in alert["actions"] if a["action"] == "pivot")
    assert pivot["label"] == "Pivot to Hoodie 连帽衫 · S, which has stock"
    async with server.http.put(f"{server.base}/api/rooms/{room['id']}/overlay", json={"featured_sku": "tee-m"},
                               headers=ADMIN) as resp:
        assert resp.status == 200
    scene = server.rooms.get(room["id"]).media.frame_filter.scene
    assert scene is not None and scene.card.name == "Hoodie 连帽衫 · M" and scene.card.headline == "Only 5 left"
