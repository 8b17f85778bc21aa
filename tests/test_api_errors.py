"""Every bad request gets a clear 4xx JSON error and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from aiortc import RTCPeerConnection

from relay.client import whip_publish
from relay.ice import rtc_configuration
from relay.synthetic import PatternTrack

from .conftest import ADMIN_KEY, RunningServer


async def offer_sdp(*kinds: str, direction: str = "sendonly") -> str:
    pc = RTCPeerConnection(rtc_configuration())
    for kind in kinds:
        pc.addTransceiver(kind, direction=direction)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def only_codec(sdp: str, keep: str) -> str:
    """Strip every video codec except ``keep`` (by rtpmap name) from an offer."""
    lines = sdp.splitlines()
    drop = {
        line.split(":")[1].split()[0]
        for line in lines
        if line.startswith("a=rtpmap:") and keep.lower() not in line.lower() and "opus" not in line.lower()
        and any(v in line for v in ("VP8", "H264", "rtx"))
    }
    out = []
    for line in lines:
        if line.startswith("m=video"):
            parts = line.split()
            line = " ".join(parts[:3] + [p for p in parts[3:] if p not in drop])
        if any(line.startswith(f"a={attr}:{pt} ") or line == f"a={attr}:{pt}" for pt in drop for attr in ("rtpmap", "fmtp", "rtcp-fb")):
            continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"


def state(server: RunningServer, room_id: str) -> tuple[Any, ...]:
    room = server.rooms.get(room_id)
    return (room.publisher is None, len(room.viewers), room.media.running, len(list(server.rooms)))


async def post(server: RunningServer, path: str, body: bytes | str, headers: dict[str, str]) -> tuple[int, Any]:
    async with server.http.post(server.base + path, data=body, headers=headers) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


SDP = {"Content-Type": "application/sdp"}


@pytest.mark.parametrize(
    "case, body, extra_headers, status, code",
    [
        ("empty body", "", {}, 400, "bad_sdp"),
        ("not sdp", "hello world", {}, 400, "bad_sdp"),
        ("truncated", "v=0\r\nm=video\r\n", {}, 400, "bad_sdp"),
        ("garbage line", "v=0\r\nthis is not sdp\r\n", {}, 400, "bad_sdp"),
        ("binary", b"\xff\xfe\x00v=0", {}, 400, "bad_sdp"),
        ("wrong content type", "v=0", {"Content-Type": "application/json"}, 415, "unsupported_media_type"),
        ("oversized", "v=0\r\n" + "a=x:" + "y" * 70_000 + "\r\n", {}, 413, "payload_too_large"),
    ],
)
async def test_whip_rejects_malformed_offers(
    server: RunningServer, case: str, body: str | bytes, extra_headers: dict[str, str], status: int, code: str
) -> None:
    room = await server.create_room()
    before = state(server, room["id"])
    headers = {**SDP, "Authorization": f"Bearer {room['tokens']['host']}", **extra_headers}
    got_status, got = await post(server, f"/whip/{room['id']}", body, headers)
    assert (got_status, got["error"]["code"]) == (status, code), case
    assert got["error"]["message"]
    assert state(server, room["id"]) == before


async def test_whip_token_checks(server: RunningServer) -> None:
    room = await server.create_room()
    other = await server.create_room()
    offer = await offer_sdp("video", "audio")
    before = state(server, room["id"])
    cases = [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer nonsense"}, 401, "invalid_token"),
        ({"Authorization": "Basic abc"}, 401, "unauthorized"),
        ({"Authorization": f"Bearer {room['tokens']['viewer']}"}, 403, "forbidden"),  # viewers cannot publish
        ({"Authorization": f"Bearer {other['tokens']['host']}"}, 403, "forbidden"),  # room B's host
        ({"Authorization": f"Bearer {room['tokens']['host'][:-2]}xx"}, 401, "invalid_token"),
    ]
    for headers, status, code in cases:
        got_status, got = await post(server, f"/whip/{room['id']}", offer, {**SDP, **headers})
        assert (got_status, got["error"]["code"]) == (status, code), headers
    assert state(server, room["id"]) == before


async def test_unknown_room(server: RunningServer) -> None:
    offer = await offer_sdp("video")
    for path in ("/whip/nope", "/whep/nope"):
        status, body = await post(server, path, offer, SDP)
        assert (status, body["error"]["code"]) == (404, "room_not_found")
    async with server.http.delete(server.base + "/whep/nope/abc") as resp:
        assert resp.status == 404
    assert list(server.rooms) == []


async def test_offer_without_usable_codec(server: RunningServer) -> None:
    room = await server.create_room()
    before = state(server, room["id"])
    audio_only = await offer_sdp("audio")
    status, body = await post(
        server, f"/whip/{room['id']}", audio_only, {**SDP, "Authorization": f"Bearer {room['tokens']['host']}"}
    )
    assert (status, body["error"]["code"]) == (400, "unsupported_codec")
    # A viewer that can only take H.264 video (we send VP8) and no audio.
    h264_only = only_codec(await offer_sdp("video", direction="recvonly"), "H264")
    assert "VP8" not in h264_only and "H264" in h264_only
    status, body = await post(server, f"/whep/{room['id']}", h264_only, SDP)
    assert (status, body["error"]["code"]) == (400, "unsupported_codec")
    # A publisher offering only recvonly media sends nothing.
    status, body = await post(
        server,
        f"/whip/{room['id']}",
        await offer_sdp("video", direction="recvonly"),
        {**SDP, "Authorization": f"Bearer {room['tokens']['host']}"},
    )
    assert (status, body["error"]["code"]) == (400, "unsupported_codec")
    assert state(server, room["id"]) == before


async def test_second_host_is_refused(server: RunningServer) -> None:
    room = await server.create_room()
    first = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    try:
        await first.wait_connected()
        live_room = server.rooms.get(room["id"])
        publisher = live_room.publisher
        status, body = await post(
            server,
            f"/whip/{room['id']}",
            await offer_sdp("video"),
            {**SDP, "Authorization": f"Bearer {room['tokens']['host']}"},
        )
        assert (status, body["error"]["code"]) == (409, "host_already_live")
        assert live_room.publisher is publisher and publisher.connection_state == "connected"
    finally:
        await first.close()


async def test_trickle_patch_and_unknown_session(server: RunningServer) -> None:
    room = await server.create_room()
    # An unknown session resource is a 404 whatever the method (tests/test_whip_standard.py has the
    # PATCH of a live session: 415 for anything but an ICE fragment, 405 trickle_not_supported).
    async with server.http.patch(f"{server.base}/whep/{room['id']}/xyz", data="a=candidate") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "session_not_found"
    async with server.http.delete(f"{server.base}/whip/{room['id']}/xyz") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "session_not_found"


@pytest.mark.parametrize(
    "body, code",
    [
        ("not json", "bad_json"),
        ("[]", "bad_request"),
        ('{"mode": "party"}', "invalid_room"),
        ('{"title": 5}', "invalid_room"),
        ('{"skus": "abc"}', "invalid_room"),
        ('{"id": "../etc"}', "invalid_room"),
    ],
)
async def test_room_creation_validation(server: RunningServer, body: str, code: str) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    status, got = await post(server, "/api/rooms", body, headers)
    assert (status, got["error"]["code"]) == (400, code)
    assert list(server.rooms) == []


async def test_room_api_needs_the_admin_key(server: RunningServer) -> None:
    room = await server.create_room()
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": f"Bearer {room['tokens']['host']}"}, 403)):
        got_status, _ = await post(server, "/api/rooms", '{"mode": "show"}', {"Content-Type": "application/json", **headers})
        assert got_status == status
        async with server.http.delete(f"{server.base}/api/rooms/{room['id']}", headers=headers) as resp:
            assert resp.status == status
    assert len(list(server.rooms)) == 1


async def test_end_room_closes_everything(server: RunningServer) -> None:
    room = await server.create_room()
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    await pub.wait_connected()
    live_room = server.rooms.get(room["id"])
    publisher = live_room.publisher
    async with server.http.delete(
        f"{server.base}/api/rooms/{room['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as resp:
        assert resp.status == 204
    assert live_room.closed and publisher.closed and publisher.pc.connectionState == "closed"
    async with server.http.get(f"{server.base}/api/rooms/{room['id']}") as resp:
        assert resp.status == 404
    await pub.close()


async def test_room_links_and_tokens_for_the_admin_only(server: RunningServer) -> None:
    room = await server.create_room(title="links")
    async with server.http.get(f"{server.base}/api/rooms/{room['id']}") as resp:
        public = await resp.json()
    assert resp.status == 200 and "tokens" not in public and public["title"] == "links"
    async with server.http.get(
        f"{server.base}/api/rooms/{room['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as resp:
        private = await resp.json()
    assert set(private["tokens"]) == {"host", "assistant", "viewer"}
    assert private["links"]["watch"] == room["links"]["watch"]
    async with server.http.get(
        f"{server.base}/api/rooms/{room['id']}", headers={"Authorization": f"Bearer {room['tokens']['host']}"}
    ) as resp:
        assert resp.status == 403
