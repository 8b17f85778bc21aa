"""A real Chromium: the studio page publishes its fake camera, the watch page plays it."""

from __future__ import annotations


import pytest
from playwright.async_api import Browser, Page

from signaling.events import public_id

from .conftest import RunningServer, until

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
    await until(lambda: watch.locator("#banner").is_hidden())
    first = await frames_decoded(watch)
    await until(lambda: _more_frames(watch, first + 30))
    assert await studio.locator("#viewers").inner_text() == "1"
    assert live_room.publisher.frames_received > 10  # the host's camera frames, decoded at ingest

    # Host stops: the viewer stays connected and is told the host is away.
    await studio.click("#stop")
    await watch.wait_for_function("window.player.hostLive === false", timeout=10000)
    assert await watch.locator("#banner").inner_text() == "Waiting for the host..."
    assert len(live_room.viewers) == 1
    assert errors == []
    await context.close()
    await until(lambda: not live_room.viewers, 10)


async def _more_frames(page: Page, target: int) -> bool:
    return await frames_decoded(page) >= target


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
    compositor = server.rooms.get(room["id"]).media.frame_filter
    assert compositor.scene is not None and compositor.scene.card.headline == "Only 1 left"
    assert errors == []
    await context.close()


async def test_call_pages_see_each_other(server: RunningServer, browser: Browser) -> None:
    call = await server.create_room(mode="call", title="call")
    context = await browser.new_context()
    pages = {}
    errors: list[str] = []
    for role in ("seller", "buyer"):
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(call["links"][role])
        pages[role] = page

    async def remote_frames(page: Page) -> int:
        return await page.evaluate(
            """async () => {
                if (!window.call.play) return 0;
                let n = 0;
                (await window.call.play.getStats()).forEach((s) => {
                    if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0;
                });
                return n;
            }"""
        )

    live = server.rooms.get(call["id"])
    await until(lambda: live.describe()["parties"] == {"seller": True, "buyer": True})
    for page in pages.values():
        await page.wait_for_function("document.getElementById('them').textContent === 'live'", timeout=10000)
    counts = {role: await remote_frames(page) for role, page in pages.items()}
    await until(lambda: _both_advanced(pages, counts, remote_frames))
    assert errors == []
    await context.close()


async def _both_advanced(pages, counts, remote_frames) -> bool:  # type: ignore[no-untyped-def]
    return all([await remote_frames(page) >= counts[role] + 30 for role, page in pages.items()])


async def test_show_viewer_accepts_a_call_invitation(server: RunningServer, browser: Browser) -> None:
    show = await server.create_room(title="show with calls")
    context = await browser.new_context()
    watch = await context.new_page()
    await watch.goto(show["links"]["watch"])
    await watch.wait_for_function("window.player && window.player.status === 'playing'", timeout=15000)
    viewer_id = await watch.evaluate("window.player.location.split('/').pop()")
    other = await (await browser.new_context()).new_page()  # another viewer of the same show
    await other.goto(show["links"]["watch"])
    await other.wait_for_function("window.player && window.player.status === 'playing'", timeout=15000)

    async with server.http.post(
        f"{server.base}/api/rooms/{show['id']}/invitations",
        json={"viewer": public_id(viewer_id), "timeout_s": 60},
        headers={"Authorization": f"Bearer {show['tokens']['host']}"},
    ) as resp:
        invited = await resp.json()
    await watch.wait_for_selector("#invitation:not([hidden])", timeout=10000)
    assert await other.is_hidden("#invitation")  # the invitation reached the invited page only
    await other.context.close()
    await watch.click("#accept")
    await watch.wait_for_url(f"**/call/{invited['call']['id']}#token=*", timeout=10000)

    seller = await context.new_page()
    await seller.goto(invited["call"]["seller"])
    call_room = server.rooms.get(invited["call"]["id"])
    await until(lambda: call_room.describe()["parties"] == {"seller": True, "buyer": True}, 20)
    for page in (watch, seller):
        await page.wait_for_function("document.getElementById('them').textContent === 'live'", timeout=10000)
    assert await watch.evaluate("window.call.role") == "buyer"
    await context.close()


async def test_pk_from_the_studio_pages(server: RunningServer, browser: Browser) -> None:
    a = await server.create_room(title="Anna")
    b = await server.create_room(title="Bo")
    context = await browser.new_context()
    studios = {}
    for name, room in (("a", a), ("b", b)):
        page = await context.new_page()
        await page.goto(room["links"]["studio"])
        await page.wait_for_function("window.studio.state === 'ready'", timeout=15000)
        await page.click("#golive")
        await page.wait_for_function("window.studio.state === 'connected'", timeout=15000)
        studios[name] = page
    await studios["a"].fill("#pk-room", b["id"])
    await studios["a"].click("#pk-invite")
    await studios["b"].wait_for_selector("#pk-answer:not([hidden])", timeout=10000)
    await studios["b"].click("#pk-accept")
    # Each studio sees the other host directly (not the composed picture).
    for page in studios.values():
        await page.wait_for_function(
            """async () => {
                if (!window.studio.pk.pc) return false;
                let n = 0;
                (await window.studio.pk.pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0; });
                return n > 15;
            }""",
            timeout=15000,
        )
    assert server.rooms.get(a["id"]).media.pk_partner is server.rooms.get(b["id"]).media
    await studios["a"].click("#pk-end")
    await until(lambda: server.rooms.get(a["id"]).media.pk_partner is None, 5)
    await context.close()


async def test_studio_goes_live_again_by_itself_after_losing_the_server(server: RunningServer, browser: Browser) -> None:
    room = await server.create_room(title="Resilient show")
    context = await browser.new_context()
    studio = await context.new_page()
    try:
        await studio.goto(room["links"]["studio"])
        await studio.wait_for_function("window.studio.state === 'ready'", timeout=15000)
        await studio.click("#golive")
        await studio.wait_for_function("window.studio.state === 'connected'", timeout=15000)
        live_room = server.rooms.get(room["id"])
        first = live_room.publisher
        await first.close()  # what a server restart or a dead network looks like from the page
        await until(lambda: live_room.publisher is not None and live_room.publisher is not first and live_room.live, 20)
        await studio.wait_for_function("window.studio.state === 'connected'", timeout=10000)
        await until(lambda: live_room.publisher.frames_received > 10)
        # Stop means stop: no republishing after it.
        await studio.click("#stop")
        await until(lambda: live_room.publisher is None, 5)
        await studio.wait_for_timeout(2000)
        assert live_room.publisher is None and await studio.evaluate("window.studio.state") == "ready"
    finally:
        await context.close()
