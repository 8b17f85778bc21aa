"""Show -> private call invitations: pure rules (table) and the HTTP flow with a real viewer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack
from signaling.errors import ApiError
from signaling.events import public_id
from signaling.invitations import Invitation

from .conftest import RunningServer, until

INVITE = Invitation("i1", "show", "viewer-a", "call", created_at=0.0, expires_at=30.0)


@pytest.mark.parametrize(
    "state, action, viewer, now, expected",
    [
        ("pending", "accept", "viewer-a", 10.0, "accepted"),
        ("pending", "decline", "viewer-a", 10.0, "declined"),
        ("accepted", "accept", "viewer-a", 10.0, "accepted"),  # repeated answer: same result
        ("pending", "accept", "viewer-b", 10.0, 403),  # somebody else
        ("pending", "accept", "viewer-a", 30.0, 410),  # too late
        ("declined", "accept", "viewer-a", 10.0, 409),
    ],
)
def test_answer_rules(state: str, action: str, viewer: str, now: float, expected: str | int) -> None:
    invitation = Invitation(**{**INVITE.__dict__, "state": state})
    if isinstance(expected, int):
        with pytest.raises(ApiError) as info:
            invitation.answer(action, viewer, now)
        assert info.value.status == expected
    else:
        assert invitation.answer(action, viewer, now).state == expected


async def test_invite_accept_and_expire_over_http(server: RunningServer) -> None:
    show = await server.create_room(title="show")
    host = {"Authorization": f"Bearer {show['tokens']['host']}"}
    pub = await whip_publish(server.http, show["links"]["whip"], show["tokens"]["host"], [PatternTrack(160, 90)])
    viewers = [await whep_play(server.http, show["links"]["whep"], kinds=("video",)) for _ in range(2)]
    try:
        sessions = [v.location.rsplit("/", 1)[-1] for v in viewers]  # type: ignore[union-attr]
        ids = [public_id(s) for s in sessions]  # as the host's viewer list names them
        url = f"{server.base}/api/rooms/{show['id']}/invitations"
        # Viewers cannot invite; unknown viewers cannot be invited.
        async with server.http.post(url, json={"viewer": ids[0]}, headers={"Authorization": f"Bearer {show['tokens']['viewer']}"}) as resp:
            assert resp.status == 403
        async with server.http.post(url, json={"viewer": "nobody"}, headers=host) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_invitation"

        async with server.http.post(url, json={"viewer": ids[0], "timeout_s": 20}, headers=host) as resp:
            assert resp.status == 201, await resp.text()
            invited = await resp.json()
        call_id = invited["call"]["id"]
        assert server.rooms.get(call_id).mode == "call"
        answer = f"{server.base}/api/invitations/{invited['invitation']['id']}"
        async with server.http.post(f"{answer}/accept", json={"session": sessions[1]}) as resp:
            assert resp.status == 403  # the other viewer cannot take the seat
        async with server.http.post(f"{answer}/accept", json={"session": sessions[0]}) as resp:
            accepted = await resp.json()
        assert accepted["invitation"]["state"] == "accepted"
        assert f"/call/{call_id}#token=" in accepted["call"]["buyer"]
        assert len(server.rooms.get(show["id"]).viewers) == 2  # the show goes on

        # An unanswered invitation times out and its call room is freed.
        async with server.http.post(url, json={"viewer": ids[1], "timeout_s": 1}, headers=host) as resp:
            second = await resp.json()
        await asyncio.sleep(1.3)
        async with server.http.post(f"{server.base}/api/invitations/{second['invitation']['id']}/accept", json={"session": sessions[1]}) as resp:
            assert resp.status == 410
        assert server.rooms.get(second["call"]["id"]) is None
    finally:
        for viewer in viewers:
            await viewer.close()
        await pub.close()


async def _drain(ws: aiohttp.ClientWebSocketResponse, quiet_s: float = 0.5) -> list[str]:
    """Every message the page has been sent so far (until it has been quiet for ``quiet_s``)."""
    got = []
    while True:
        try:
            msg = await ws.receive(timeout=quiet_s)
        except asyncio.TimeoutError:
            return got
        if msg.type != aiohttp.WSMsgType.TEXT:
            return got
        got.append(msg.data)


async def _next_invitation(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    while True:
        event = await ws.receive_json(timeout=5)
        if event["type"] == "invitation":
            return dict(event)


async def test_a_stranger_on_the_public_channel_can_take_nothing(server: RunningServer) -> None:
    """Everything a stranger's page can see (the show's event channel, ids it hears of) neither
    answers the invitation, nor gets the call's link, nor ends the invited viewer's session."""
    show = await server.create_room(title="show")
    host_token = show["tokens"]["host"]
    pub = await whip_publish(server.http, show["links"]["whip"], host_token, [PatternTrack(160, 90)])
    viewer = await whep_play(server.http, show["links"]["whep"], kinds=("video",))
    events_url = f"{server.base.replace('http', 'ws')}/api/rooms/{show['id']}/events"
    stranger = await server.http.ws_connect(events_url)
    own_page = await server.http.ws_connect(events_url)
    studio = await server.http.ws_connect(events_url)
    room = server.rooms.get(show["id"])
    try:
        assert viewer.location is not None
        session = viewer.location.rsplit("/", 1)[-1]
        await own_page.send_json({"type": "viewer", "session": session})
        await studio.send_json({"type": "auth", "token": host_token})
        async with server.http.get(f"{server.base}/api/rooms/{show['id']}/viewers", headers={"Authorization": f"Bearer {host_token}"}) as resp:
            listing = await resp.text()
        assert session not in listing  # even the host console cannot end a viewer's session
        listed = [v["id"] for v in json.loads(listing)["viewers"]]
        assert listed == [public_id(session)]
        # The stranger learnt the public id somehow, and claims to be that viewer with it.
        await stranger.send_json({"type": "viewer", "session": listed[0]})
        await stranger.send_json({"type": "auth", "token": show["tokens"]["viewer"]})  # not staff

        async with server.http.post(
            f"{server.base}/api/rooms/{show['id']}/invitations", json={"viewer": listed[0]}, headers={"Authorization": f"Bearer {host_token}"}
        ) as resp:
            assert resp.status == 201, await resp.text()
            invitation = (await resp.json())["invitation"]
        assert (await _next_invitation(own_page))["id"] == invitation["id"]
        assert (await _next_invitation(studio))["state"] == "pending"
        heard = await _drain(stranger)
        assert heard and not any(invitation["id"] in m or session in m or '"invitation"' in m for m in heard)

        # Even knowing the invitation's id and the viewer's public id, the stranger gets nowhere.
        answer = f"{server.base}/api/invitations/{invitation['id']}"
        for body in ({"session": listed[0]}, {"session": "guess"}):
            async with server.http.post(f"{answer}/accept", json=body) as resp:
                assert resp.status == 403 and "call" not in await resp.text()
        async with server.http.post(f"{answer}/accept", json={"viewer": listed[0]}) as resp:
            assert resp.status == 400  # the old form, which named the viewer, proves nothing
        async with server.http.post(f"{answer}/decline", json={"session": listed[0]}) as resp:
            assert resp.status == 403
        async with server.http.delete(f"{server.base}/whep/{show['id']}/{listed[0]}") as resp:
            assert resp.status == 404
        assert list(room.viewers) == [session] and not room.viewers[session].closed

        # The invited viewer's own page answers with its session and gets the seat.
        async with server.http.post(f"{answer}/accept", json={"session": session}) as resp:
            assert resp.status == 200, await resp.text()
            accepted = await resp.json()
        assert accepted["invitation"]["state"] == "accepted" and "#token=" in accepted["call"]["buyer"]
        assert (await _next_invitation(studio))["state"] == "accepted"
        assert not any('"invitation"' in m for m in await _drain(stranger))
        # And its Location, which only it holds, ends its session.
        async with server.http.delete(viewer.location) as resp:
            assert resp.status == 200
        await until(lambda: not room.viewers, 5, 0.05)
    finally:
        for ws in (stranger, own_page, studio):
            await ws.close()
        await viewer.close()
        await pub.close()


async def test_a_page_reconnecting_hears_its_pending_invitation(server: RunningServer) -> None:
    show = await server.create_room(title="show")
    host = {"Authorization": f"Bearer {show['tokens']['host']}"}
    pub = await whip_publish(server.http, show["links"]["whip"], show["tokens"]["host"], [PatternTrack(160, 90)])
    viewer = await whep_play(server.http, show["links"]["whep"], kinds=("video",))
    page = None
    try:
        assert viewer.location is not None
        session = viewer.location.rsplit("/", 1)[-1]
        async with server.http.post(f"{server.base}/api/rooms/{show['id']}/invitations", json={"viewer": public_id(session)}, headers=host) as resp:
            invitation = (await resp.json())["invitation"]
        page = await server.http.ws_connect(f"{server.base.replace('http', 'ws')}/api/rooms/{show['id']}/events")
        await page.send_json({"type": "viewer", "session": session})
        assert (await _next_invitation(page))["id"] == invitation["id"]
    finally:
        if page is not None:
            await page.close()
        await viewer.close()
        await pub.close()
