"""WHIP/WHEP clients built on aiortc: the demo's synthetic host, tests and benchmarks use them."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcrtpsender import RTCRtpSender

from .ice import rtc_configuration

if TYPE_CHECKING:  # the link emulator is a test tool: loaded only when a caller asks for a link
    from .linkemu import LinkEmulator, LinkProfile


# Rewrites the offer on its way to the server: how tests send what other clients would send
# (another DTLS setup, no BUNDLE group) from a real aiortc peer.
EditOffer = Callable[[str], str]


class WhipError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class WebRtcClient:
    """One client peer connection and its session resource on the server."""

    def __init__(self, http: aiohttp.ClientSession, pc: RTCPeerConnection) -> None:
        self.http = http
        self.pc = pc
        self.location: str | None = None
        self.links: list[str] = []  # the answer's Link headers
        self.link: LinkEmulator | None = None  # set when the media path runs through an emulated link
        self._closed = False

    async def _exchange(self, url: str, token: str | None, link: LinkProfile | None = None,
                        edit_offer: EditOffer | None = None) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription.sdp
        if edit_offer is not None:
            offer = edit_offer(offer)
        if link is not None:
            from .linkemu import emulate_for, strip_candidates

            # Without our own candidates the server can reach us only through the emulator.
            offer = strip_candidates(offer)
        headers = {"Content-Type": "application/sdp"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.post(url, data=offer, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 201:
                await self.pc.close()
                raise WhipError(resp.status, body)
            self.location = urljoin(url, resp.headers["Location"])
            self.links = resp.headers.getall("Link", [])  # the STUN/TURN servers offered (RFC 9725 4.6)
        if link is not None:
            self.link, body = await emulate_for(body, downstream_profile=link)
        await self.pc.setRemoteDescription(RTCSessionDescription(body, "answer"))

    async def wait_connected(self, timeout: float = 10.0) -> None:
        async def connected() -> None:
            while self.pc.connectionState != "connected":
                if self.pc.connectionState in ("failed", "closed"):
                    raise ConnectionError(f"peer connection {self.pc.connectionState}")
                await asyncio.sleep(0.02)

        await asyncio.wait_for(connected(), timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.location is not None:
            try:
                async with self.http.delete(self.location) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass
        await self.pc.close()
        if self.link is not None:
            await self.link.close()


async def whip_publish(
    http: aiohttp.ClientSession,
    url: str,
    token: str,
    tracks: list[MediaStreamTrack],
    *,
    video_codec: str | None = None,
    link: LinkProfile | None = None,
    edit_offer: EditOffer | None = None,
    pc: RTCPeerConnection | None = None,
) -> WebRtcClient:
    """Publish ``tracks`` to a WHIP endpoint; ``video_codec`` ('video/H264', 'video/VP8') forces one;
    with ``link``, all media crosses a userspace emulated link (which a test can cut); ``pc``, a
    fresh peer connection set up by the caller (its certificate, say)."""
    pc = pc or RTCPeerConnection(rtc_configuration())
    for track in tracks:
        transceiver = pc.addTransceiver(track, direction="sendonly")
        if video_codec and track.kind == "video":
            caps = RTCRtpSender.getCapabilities("video")
            transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType.lower() == video_codec.lower()])
    client = WebRtcClient(http, pc)
    await client._exchange(url, token, link, edit_offer)
    return client


async def whep_play(
    http: aiohttp.ClientSession,
    url: str,
    *,
    token: str | None = None,
    kinds: tuple[str, ...] = ("video", "audio"),
    on_track: Callable[[MediaStreamTrack], None] | None = None,
    link: LinkProfile | None = None,
    edit_offer: EditOffer | None = None,
    pc: RTCPeerConnection | None = None,
) -> WebRtcClient:
    """Watch a WHEP endpoint; with ``link``, all media crosses a userspace emulated link."""
    pc = pc or RTCPeerConnection(rtc_configuration())
    for kind in kinds:
        pc.addTransceiver(kind, direction="recvonly")
    if on_track is not None:
        pc.on("track", on_track)
    client = WebRtcClient(http, pc)
    await client._exchange(url, token, link, edit_offer)
    return client
