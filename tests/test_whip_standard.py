"""Standard WHIP (RFC 9725) / WHEP negotiation: what other clients offer gets the answer the RFCs ask.

Real aiortc peers on loopback wherever media must flow; SDP text where the negotiation is the point
(RFC 9725's own example offer carries no candidates, so it never connects anywhere).
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

import pytest
from aiortc import RTCCertificate, RTCPeerConnection
from aiortc.rtcdtlstransport import generate_certificate
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.aiortc_private import use_certificate
from relay.client import EditOffer, WebRtcClient, whep_play, whip_publish
from relay.ice import rtc_configuration
from relay.sdp import keep_offered_bundle
from relay.synthetic import PatternTrack, ToneTrack

from .conftest import FrameCollector, RunningServer
from .test_api_errors import SDP, offer_sdp, only_codec, post, state

# RFC 9725 §4.2's example offer (Figure 3), as the RFC prints it: the audio m-line carries the
# transport, the video one is bundle-only on port 0 and repeats none of it (not even rtcp-mux).
RFC9725_OFFER = """v=0
o=- 5228595038118931041 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=ice-options:trickle ice2
m=audio 9 UDP/TLS/RTP/SAVPF 111
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:EsAw
a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y
a=fingerprint:sha-256 DA:7B:57:DC:28:CE:04:4F:31:79:85:C4:31:67:EB:27:58:29:ED:77:2A:0D:24:AE:ED:AD:30:BC:BD:F1:9C:02
a=setup:actpass
a=mid:0
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=sendonly
a=msid:d46fb922-d52a-4e9c-aa87-444eadc1521b ce326ecf-a081-453a-8f9f-0605d5ef4128
a=rtcp-mux
a=rtcp-mux-only
a=rtpmap:111 opus/48000/2
a=fmtp:111 minptime=10;useinbandfec=1
m=video 0 UDP/TLS/RTP/SAVPF 96 97
a=mid:1
a=bundle-only
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id
a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id
a=sendonly
a=msid:d46fb922-d52a-4e9c-aa87-444eadc1521b 3956b460-40f4-4d05-acef-03abcdd8c6fd
a=rtpmap:96 VP8/90000
a=rtcp-fb:96 ccm fir
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
""".replace("\n", "\r\n")
# The same shape from a WHEP player: it receives, and has no tracks of its own to name.
WHEP_BUNDLE_ONLY_OFFER = re.sub(r"a=msid:[^\r]*\r\n", "", RFC9725_OFFER.replace("a=sendonly", "a=recvonly"))

TRANSPORT_ATTRIBUTES = ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=setup:", "a=rtcp-mux",
                        "a=candidate:", "a=end-of-candidates")


def sections(sdp: str) -> list[list[str]]:
    """The m-sections of an SDP, each a list of its lines (the m= line first)."""
    out: list[list[str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            out.append([line])
        elif out:
            out[-1].append(line)
    return out


def session_lines(sdp: str) -> list[str]:
    return sdp.split("\r\nm=", 1)[0].splitlines()


def setups(sdp: str) -> set[str]:
    return {line for line in sdp.splitlines() if line.startswith("a=setup:")}


def directions(sdp: str) -> list[str]:
    return [next(line for line in s if line in ("a=sendonly", "a=recvonly", "a=sendrecv", "a=inactive"))
            for s in sections(sdp)]


def with_setup(value: str) -> EditOffer:
    return lambda sdp: sdp.replace("a=setup:actpass", f"a=setup:{value}")


def without_bundle(sdp: str) -> str:
    return "".join(line + "\r\n" for line in sdp.splitlines() if not line.startswith("a=group:BUNDLE"))


def second_bundle_only(sdp: str) -> str:
    """An aiortc offer as RFC 9725's example writes it: the second m-line on port 0, bundle-only,
    with neither transport attributes nor candidates of its own."""
    head, first, second = sdp.split("\r\nm=")
    lines = ("m=" + second).splitlines()
    parts = lines[0].split()
    lines[0] = " ".join([parts[0], "0", *parts[2:]])
    lines = [lines[0], "a=bundle-only"] + [line for line in lines[1:] if not line.startswith(TRANSPORT_ATTRIBUTES)]
    return head + "\r\nm=" + first + "\r\n" + "\r\n".join(lines) + "\r\n"


async def exchange(server: RunningServer, path: str, offer: str, token: str | None = None) -> tuple[int, str, Any]:
    headers = dict(SDP)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with server.http.post(server.base + path, data=offer, headers=headers) as resp:
        return resp.status, await resp.text(), resp.headers


async def delete(server: RunningServer, location: str) -> None:
    async with server.http.delete(server.base + location) as resp:
        assert resp.status == 200


async def publish(server: RunningServer, room: dict[str, Any], **kw: Any) -> WebRtcClient:
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"],
                             [PatternTrack(320, 180), ToneTrack()], **kw)
    await pub.wait_connected()
    return pub


async def answer_of(client: WebRtcClient) -> str:
    return client.pc.remoteDescription.sdp


async def sees_the_host(server: RunningServer, room: dict[str, Any], **kw: Any) -> tuple[WebRtcClient, FrameCollector]:
    """A viewer that has decoded the host's picture (bright bars, not the dark slate) and audio."""
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track, **kw)
    await viewer.wait_connected()
    await collector.wait_until(lambda: collector.last_video is not None and collector.mean_colour().max() > 90, 20)
    await collector.wait_for("audio", collector.frames["audio"] + 10)
    return viewer, collector


async def host_frames_arrive(server: RunningServer, room: dict[str, Any], count: int = 10) -> None:
    publisher = server.rooms.get(room["id"]).publisher
    start = publisher.frames_received
    await FrameCollector().wait_until(lambda: publisher.frames_received >= start + count, 20)


# -- 1. DTLS roles ----------------------------------------------------------------------------------

async def test_actpass_offers_are_answered_as_dtls_server(server: RunningServer) -> None:
    room = await server.create_room(title="setup")
    pub = await publish(server, room)
    viewer: WebRtcClient | None = None
    collector: FrameCollector | None = None
    try:
        assert "a=setup:actpass" in pub.pc.localDescription.sdp
        assert setups(await answer_of(pub)) == {"a=setup:passive"}
        viewer, collector = await sees_the_host(server, room)
        assert setups(await answer_of(viewer)) == {"a=setup:passive"}
        await host_frames_arrive(server, room)
    finally:
        if viewer is not None:
            await viewer.close()
        if collector is not None:
            await collector.stop()
        await pub.close()


@pytest.mark.parametrize("offered, answered", [("active", "passive"), ("passive", "active")])
async def test_active_and_passive_offers_get_the_other_role(server: RunningServer, offered: str, answered: str) -> None:
    room = await server.create_room(title=f"setup {offered}")
    pub = await publish(server, room, edit_offer=with_setup(offered))
    viewer, collector = await sees_the_host(server, room, edit_offer=with_setup(offered))
    try:
        assert setups(await answer_of(pub)) == {f"a=setup:{answered}"}
        assert setups(await answer_of(viewer)) == {f"a=setup:{answered}"}
        await host_frames_arrive(server, room)
    finally:
        await viewer.close()
        await collector.stop()
        await pub.close()


async def test_a_setup_that_is_no_role_is_refused(server: RunningServer) -> None:
    room = await server.create_room(title="holdconn")
    before = state(server, room["id"])
    offer = with_setup("holdconn")(await offer_sdp("video", "audio"))
    status, body = await post(server, f"/whip/{room['id']}", offer,
                              {**SDP, "Authorization": f"Bearer {room['tokens']['host']}"})
    assert (status, body["error"]["code"]) == (400, "bad_sdp") and "a=setup" in body["error"]["message"]
    assert state(server, room["id"]) == before


def rsa_peer() -> RTCPeerConnection:
    """A peer whose DTLS certificate is RSA, as GStreamer's webrtcbin makes it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pc = RTCPeerConnection(rtc_configuration())
    use_certificate(pc, RTCCertificate(key=key, cert=generate_certificate(key)))  # type: ignore[arg-type]
    return pc


async def test_a_peer_with_an_rsa_certificate_publishes_and_watches(server: RunningServer) -> None:
    """As DTLS client aiortc offers ECDSA suites only, which a DTLS server with an RSA certificate
    cannot use; answering actpass as the server leaves the suite to our own certificate."""
    room = await server.create_room(title="rsa")
    pub = await publish(server, room, pc=rsa_peer())
    viewer, collector = await sees_the_host(server, room, pc=rsa_peer())
    try:
        await host_frames_arrive(server, room)
    finally:
        await viewer.close()
        await collector.stop()
        await pub.close()


# -- 2. bundle-only ---------------------------------------------------------------------------------

async def test_rfc9725_example_offer_is_accepted(server: RunningServer) -> None:
    room = await server.create_room(title="rfc 9725")
    status, answer, headers = await exchange(server, f"/whip/{room['id']}", RFC9725_OFFER, room["tokens"]["host"])
    assert status == 201, answer
    try:
        assert [s[0].split()[0] for s in sections(answer)] == ["m=audio", "m=video"]
        assert directions(answer) == ["a=recvonly", "a=recvonly"]
        assert "a=group:BUNDLE 0 1" in session_lines(answer)
        video = sections(answer)[1]
        assert any("VP8/90000" in line for line in video) and "a=mid:1" in video
        assert setups(answer) == {"a=setup:passive"}
    finally:
        await delete(server, headers["Location"])


async def test_whep_bundle_only_video_is_sent_not_inactive(server: RunningServer) -> None:
    room = await server.create_room(title="whep bundle-only")
    status, answer, headers = await exchange(server, f"/whep/{room['id']}", WHEP_BUNDLE_ONLY_OFFER)
    assert status == 201, answer
    try:
        assert directions(answer) == ["a=sendonly", "a=sendonly"]
        assert "a=group:BUNDLE 0 1" in session_lines(answer)
        viewer = server.rooms.get(room["id"]).viewers[headers["Location"].rsplit("/", 1)[-1]]
        assert viewer.video is not None and viewer.audio is not None
    finally:
        await delete(server, headers["Location"])


async def test_bundle_only_media_flows_both_ways(server: RunningServer) -> None:
    """A real peer whose video m-line is bundle-only: the host's video arrives, and a viewer asking
    the same way decodes it."""
    room = await server.create_room(title="bundle-only media")
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"],
                             [ToneTrack(), PatternTrack(320, 180)], edit_offer=second_bundle_only)
    viewer: WebRtcClient | None = None
    collector: FrameCollector | None = None
    try:
        await pub.wait_connected()
        await host_frames_arrive(server, room)
        viewer, collector = await sees_the_host(server, room, kinds=("audio", "video"), edit_offer=second_bundle_only)
        assert directions(await answer_of(viewer)) == ["a=sendonly", "a=sendonly"]
    finally:
        if viewer is not None:
            await viewer.close()
        if collector is not None:
            await collector.stop()
        await pub.close()


# -- 3. H.264 profiles ------------------------------------------------------------------------------

@pytest.mark.parametrize("profile_level_id", ["4d001f", "4d001e", "64001f", "64001e"])
async def test_h264_main_and_high_ingest_is_answered(server: RunningServer, profile_level_id: str) -> None:
    room = await server.create_room(title=f"h264 {profile_level_id}")
    offer = only_codec(await offer_sdp("video"), "H264")
    offer = re.sub(r"profile-level-id=[0-9a-f]{6}", f"profile-level-id={profile_level_id}", offer)
    assert "VP8" not in offer and "42e01f" not in offer and "42001f" not in offer
    status, answer, headers = await exchange(server, f"/whip/{room['id']}", offer, room["tokens"]["host"])
    assert status == 201, answer
    try:
        assert any("H264/90000" in line for line in sections(answer)[0])
        fmtps = [line for line in answer.splitlines() if "profile-level-id" in line]
        assert fmtps and all(f"profile-level-id={profile_level_id}" in line for line in fmtps)
    finally:
        await delete(server, headers["Location"])


@pytest.mark.interop
async def test_ffmpeg_high_profile_stream_reaches_viewers(server: RunningServer) -> None:
    room = await server.create_room(title="ffmpeg high")
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track)
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.tools.ffmpeg_whip", room["links"]["whip"], room["tokens"]["host"],
        "--seconds", "10", "--profile", "high",
    )
    live_room = server.rooms.get(room["id"])
    try:
        await viewer.wait_connected()
        await collector.wait_until(lambda: live_room.live, timeout=20)
        assert live_room.publisher.video_codec == "video/H264"
        # FFmpeg's bars are strongly red and green, unlike the dark slate.
        def ffmpeg_picture() -> bool:
            r, g, b = collector.mean_colour()
            return r > 60 and g > 60 and b < 80

        await collector.wait_until(ffmpeg_picture, timeout=15)
    finally:
        if publisher.returncode is None:
            publisher.kill()
        await publisher.wait()
        await viewer.close()
        await collector.stop()


# -- 4. one track per kind --------------------------------------------------------------------------

async def test_two_video_tracks_are_refused(server: RunningServer) -> None:
    room = await server.create_room(title="two cameras")
    before = state(server, room["id"])
    cases = [
        (f"/whip/{room['id']}", await offer_sdp("video", "video", "audio"), room["tokens"]["host"]),
        (f"/whep/{room['id']}", await offer_sdp("video", "video", direction="recvonly"), None),
    ]
    for path, offer, token in cases:
        headers = {**SDP, **({"Authorization": f"Bearer {token}"} if token else {})}
        status, body = await post(server, path, offer, headers)
        assert (status, body["error"]["code"]) == (400, "too_many_tracks"), path
        assert "2 video" in body["error"]["message"] and "one audio and one video" in body["error"]["message"]
    assert state(server, room["id"]) == before


# -- 5. the HTTP surface ----------------------------------------------------------------------------

async def test_options_answers_accept_post(server: RunningServer) -> None:
    room = await server.create_room(title="options")
    for path in (f"/whip/{room['id']}", f"/whep/{room['id']}"):
        async with server.http.options(server.base + path, headers={
            "Origin": "https://player.example", "Access-Control-Request-Method": "POST"}) as resp:
            assert resp.status == 204, path
            assert resp.headers["Accept-Post"] == "application/sdp"
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]


async def test_session_resources_patch_and_delete(server: RunningServer) -> None:
    room = await server.create_room(title="resources")
    pub = await publish(server, room)
    try:
        for prefix in ("/whip", "/whep"):
            for method in ("PATCH", "DELETE"):
                async with server.http.request(method, f"{server.base}{prefix}/{room['id']}/nope",
                                               data="a=end-of-candidates",
                                               headers={"Content-Type": "application/trickle-ice-sdpfrag"}) as resp:
                    assert resp.status == 404, (method, prefix)
                    assert (await resp.json())["error"]["code"] == "session_not_found"
        # The publisher's id is not a WHEP session.
        session_id = pub.location.rsplit("/", 1)[-1] if pub.location else ""
        async with server.http.patch(f"{server.base}/whep/{room['id']}/{session_id}", data="a=end-of-candidates",
                                     headers={"Content-Type": "application/trickle-ice-sdpfrag"}) as resp:
            assert resp.status == 404
        assert pub.location is not None
        async with server.http.patch(pub.location, data="a=end-of-candidates", headers=SDP) as resp:
            assert resp.status == 415
            assert (await resp.json())["error"]["code"] == "unsupported_media_type"
        async with server.http.patch(pub.location, data="a=end-of-candidates", headers={
                "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": '"whatever"'}) as resp:
            # No entity-tag is ever given out, so none can mismatch: the request fails on what it asks.
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "trickle_not_supported"
        assert server.rooms.get(room["id"]).publisher.connection_state == "connected"
    finally:
        await pub.close()


async def test_created_sessions_carry_no_etag(server: RunningServer) -> None:
    room = await server.create_room(title="etag")
    for path, offer, token in (
        (f"/whip/{room['id']}", await offer_sdp("video", "audio"), room["tokens"]["host"]),
        (f"/whep/{room['id']}", await offer_sdp("video", "audio", direction="recvonly"), None),
    ):
        status, answer, headers = await exchange(server, path, offer, token)
        assert status == 201, answer
        assert "ETag" not in headers and "ETag" not in headers["Access-Control-Expose-Headers"]
        await delete(server, headers["Location"])


# -- 6. BUNDLE only when offered --------------------------------------------------------------------

async def test_no_bundle_group_unless_offered(server: RunningServer) -> None:
    room = await server.create_room(title="no bundle")
    pub = await publish(server, room, edit_offer=without_bundle)
    viewer, collector = await sees_the_host(server, room, edit_offer=without_bundle)
    try:
        for client in (pub, viewer):
            answer = await answer_of(client)
            assert not any(line.startswith("a=group:") for line in answer.splitlines())
            assert len(sections(answer)) == 2
        await host_frames_arrive(server, room)
    finally:
        await viewer.close()
        await collector.stop()
        await pub.close()


async def test_bundle_group_as_offered(server: RunningServer) -> None:
    room = await server.create_room(title="bundle")
    pub = await publish(server, room)
    try:
        offered = [line for line in pub.pc.localDescription.sdp.splitlines() if line.startswith("a=group:BUNDLE")]
        answered = [line for line in (await answer_of(pub)).splitlines() if line.startswith("a=group:BUNDLE")]
        assert offered == answered == ["a=group:BUNDLE 0 1"]
    finally:
        await pub.close()


def test_answer_keeps_only_what_the_offer_bundled() -> None:
    answer = "v=0\r\na=group:BUNDLE 0 1\r\nm=audio 9 X 111\r\na=mid:0\r\nm=video 9 X 96\r\na=mid:1\r\n"
    assert "a=group:BUNDLE 1\r\n" in keep_offered_bundle(answer, ("1", "7"))
    assert "a=group" not in keep_offered_bundle(answer, None)
    assert keep_offered_bundle(answer, ("0", "1")) == answer
