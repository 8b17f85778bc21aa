"""Show -> private call invitations: pure rules (table) and the HTTP flow with a real viewer."""

from __future__ import annotations

import asyncio

import pytest

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack
from signaling.errors import ApiError
from signaling.invitations import Invitation

from .conftest import RunningServer

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
        ids = [v.location.rsplit("/", 1)[-1] for v in viewers]  # type: ignore[union-attr]
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
        async with server.http.post(f"{answer}/accept", json={"viewer": ids[1]}) as resp:
            assert resp.status == 403  # the other viewer cannot take the seat
        async with server.http.post(f"{answer}/accept", json={"viewer": ids[0]}) as resp:
            accepted = await resp.json()
        assert accepted["invitation"]["state"] == "accepted"
        assert f"/call/{call_id}#token=" in accepted["call"]["buyer"]
        assert len(server.rooms.get(show["id"]).viewers) == 2  # the show goes on

        # An unanswered invitation times out and its call room is freed.
        async with server.http.post(url, json={"viewer": ids[1], "timeout_s": 1}, headers=host) as resp:
            second = await resp.json()
        await asyncio.sleep(1.3)
        async with server.http.post(f"{server.base}/api/invitations/{second['invitation']['id']}/accept", json={"viewer": ids[1]}) as resp:
            assert resp.status == 410
        assert server.rooms.get(second["call"]["id"]) is None
    finally:
        for viewer in viewers:
            await viewer.close()
        await pub.close()
