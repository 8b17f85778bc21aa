"""Token-only shows and calls: only holders of a token of the room watch it or read its events."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser

from relay.client import WhipError, whep_play, whip_publish
from relay.synthetic import PatternTrack

from .conftest import FrameCollector, RunningServer, until
from .test_browser import frames_decoded


async def first_event(server: RunningServer, room_id: str, auth: Any) -> tuple[dict[str, Any] | None, int | None]:
    """Open a room's event channel, send ``auth`` first (unless None); (first message, close code)."""
    url = f"{server.base.replace('http', 'ws')}/api/rooms/{room_id}/events"
    async with server.http.ws_connect(url) as ws:
        if auth is not None:
            await ws.send_str(auth if isinstance(auth, str) else json.dumps(auth))
        msg = await ws.receive(timeout=8)
        event = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else None
        if event is not None and event.get("type") == "error":
            await ws.receive(timeout=2)  # the close that follows
        return event, ws.close_code


async def test_token_only_show(server: RunningServer) -> None:
    room = await server.create_room(access="token")
    other = await server.create_room()
    assert room["access"] == "token"
    assert room["links"]["watch"].endswith(f"#token={room['tokens']['viewer']}")  # the link carries the token
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    live = server.rooms.get(room["id"])
    try:
        for token, status in ((None, 401), (other["tokens"]["viewer"], 403), ("forged.token", 401)):
            with pytest.raises(WhipError) as refused:
                await whep_play(server.http, room["links"]["whep"], token=token)
            assert refused.value.status == status
        assert not live.viewers  # nothing was created by a refused join
        collector = FrameCollector()
        viewer = await whep_play(server.http, room["links"]["whep"], token=room["tokens"]["viewer"], on_track=collector.on_track, kinds=("video",))
        await collector.wait_for("video", 3)
        await viewer.close()
        await collector.stop()
    finally:
        await pub.close()


@pytest.mark.parametrize("mode, role", [("show", "viewer"), ("call", "buyer")])
async def test_private_room_events_need_a_token(server: RunningServer, mode: str, role: str) -> None:
    room = await server.create_room(mode=mode, access="token")
    other = await server.create_room(mode=mode, access="token")
    cases = [
        (None, None, 4401),  # says nothing: closed after the wait, no event
        ("not json", None, 4401),
        ({"type": "auth"}, "unauthorized", 4401),
        ({"type": "auth", "token": "forged.token"}, "invalid_token", 4401),
        ({"type": "auth", "token": other["tokens"][role]}, "forbidden", 4403),  # another room's token
    ]
    for auth, code, close_code in cases:
        event, closed_with = await first_event(server, room["id"], auth)
        assert (event["error"]["code"] if event else None, closed_with) == (code, close_code), auth
    event, _ = await first_event(server, room["id"], {"type": "auth", "token": room["tokens"][role]})
    assert event is not None and event["type"] == "room" and event["id"] == room["id"]


async def test_public_show_events_need_nothing(server: RunningServer) -> None:
    room = await server.create_room()
    event, _ = await first_event(server, room["id"], None)
    assert event is not None and event["type"] == "room"


@pytest.mark.parametrize("body, field", [({"access": "secret"}, "access"), ({"mode": "call", "access": "public"}, "access")])
async def test_bad_access_setting_is_refused(server: RunningServer, body: dict[str, Any], field: str) -> None:
    async with server.http.post(f"{server.base}/api/rooms", json=body, headers={"Authorization": "Bearer test-admin-key"}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_room" and [d["field"] for d in error["details"]] == [field]
    assert not list(server.rooms)  # nothing created


@pytest.mark.browser
async def test_watch_page_of_a_token_only_show(server: RunningServer, browser: Browser) -> None:
    room = await server.create_room(access="token", title="Members only")
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
    context = await browser.new_context()
    try:
        without = await context.new_page()
        await without.goto(room["links"]["watch"].split("#")[0])
        await without.wait_for_function("window.player.status === 'private'", timeout=15000)
        assert "invited viewers" in await without.locator("#banner").inner_text()
        await without.close()

        watch = await context.new_page()
        await watch.goto(room["links"]["watch"])
        await watch.wait_for_function("window.player.hostLive === true", timeout=15000)  # events: authenticated
        await until(lambda: _decoding(watch))
        assert await watch.locator("#title").inner_text() == "Members only"
    finally:
        await context.close()
        await pub.close()


async def _decoding(page: Any) -> bool:
    return await frames_decoded(page) > 10
