"""Cascade: a node serves a room whose pipeline lives elsewhere by pulling the origin's encoded rungs.

An edge (another worker process, another machine) opens one WebRTC connection to the room's origin
per rung its own viewers watch, plus one for the audio, as an ordinary WHEP client with a ``relay``
token. What arrives is forwarded *as it is*: the receiver's reassembled frames bypass aiortc's
decoder and become ``av.Packet`` s published into the edge's local fan-outs, which its viewers'
tracks read exactly as they read an encoder's output. One copy per edge, not per viewer, and no
decode or encode on the edge. Keyframe requests from the edge's viewers go back to the origin as
PLIs, coalesced; the origin's rung encoder coalesces again across all its consumers.

If the origin goes away, each pull keeps asking where the origin is now and reconnects; the edge's
viewers stay connected meanwhile and resume on the next keyframe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription

from .aiortc_private import decoder_error, install_decoder_queue, install_jitter_buffer
from .decodequeue import EncodedFrameQueue
from .fanout import FanOut
from .forward import EveryPacketIsAFrame, Forwarder, ForwardStats
from .ice import NO_ICE_SERVERS, IceServers, rtc_configuration
from .jitter import MarkerJitterBuffer

log = logging.getLogger("shelfcast.cascade")

RECONNECT_DELAYS_S = (0.2, 0.5, 1.0, 2.0)  # then every 2 s while someone still watches
AUDIO = -1  # the "rung" of the audio pull

# Where the origin of a room is right now: the base URL of its WHEP endpoint, or None (no origin).
Locate = Callable[[], Awaitable[str | None]]
# A relay token for the origin (fresh per connection: tokens expire).
IssueToken = Callable[[], str]


@dataclass
class PullStats(ForwardStats):
    connects: int = 0


class UpstreamPull:
    """One rung (or the audio) of a room, pulled from its origin into a local fan-out."""

    def __init__(
        self,
        room_id: str,
        rung: int,
        fanout: FanOut,
        locate: Locate,
        issue_token: IssueToken,
        http: aiohttp.ClientSession,
        ice_servers: IceServers = NO_ICE_SERVERS,
        epoch: float | None = None,
    ) -> None:
        self.room_id = room_id
        self.rung = rung
        self.kind = "audio" if rung == AUDIO else "video"
        self._fanout = fanout
        self.stats = PullStats()
        # Rungs arrive over separate connections with unrelated RTP clocks: each is anchored on the
        # edge's one media clock (``epoch``, shared by the room's pulls) so viewers can switch.
        self._forward = Forwarder(self.kind, fanout, time.monotonic() if epoch is None else epoch, stats=self.stats)
        self._locate = locate
        self._issue_token = issue_token
        self._http = http
        self._ice_servers = ice_servers
        self._pc: RTCPeerConnection | None = None
        self._session_url: str | None = None
        self._closed = False
        self._connected = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    @property
    def connected(self) -> bool:
        return self._pc is not None and self._pc.connectionState == "connected"

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    def request_keyframe(self) -> None:
        """Ask the origin's rung encoder for a keyframe (coalesced; PLI on the next packet)."""
        self._forward.request_keyframe()

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                origin = await self._locate()
                if origin is not None:
                    await self._connect(origin)
                    attempt = 0
                    await self._until_lost()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the origin moved, restarted or refused: find it again
                log.info("pull of %s rung %s: %s", self.room_id, self.rung, exc, extra={"room": self.room_id})
            await self._disconnect()
            if self._closed:
                return
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1

    async def _connect(self, origin_whep: str) -> None:
        pc = RTCPeerConnection(rtc_configuration(self._ice_servers.mint()))
        self._pc = pc
        transceiver = pc.addTransceiver(self.kind, direction="recvonly")
        receiver = transceiver.receiver
        # Before anything arrives: our buffers, and no decoder (the frames are forwarded as they are).
        forward = self._forward
        install_jitter_buffer(receiver, MarkerJitterBuffer(on_skip=forward.hole_skipped) if self.kind == "video" else EveryPacketIsAFrame())
        install_decoder_queue(receiver, EncodedFrameQueue(forward.on_frame, decode=False))
        forward.attach(decoder_error(receiver))
        await pc.setLocalDescription(await pc.createOffer())
        relay = "audio" if self.rung == AUDIO else str(self.rung)
        url = f"{origin_whep}?relay={relay}"
        headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {self._issue_token()}"}
        async with self._http.post(url, data=pc.localDescription.sdp, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise ConnectionError(f"origin answered {resp.status}: {body[:200]}")
            self._session_url = urljoin(url, resp.headers["Location"])
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        self.stats.connects += 1

    async def _until_lost(self) -> None:
        pc = self._pc
        assert pc is not None
        lost = asyncio.Event()

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "connected":
                self._connected.set()
                self._fanout.request_keyframe()  # viewers waiting on this rung need one now
            elif pc.connectionState in ("failed", "closed"):
                lost.set()

        await lost.wait()

    async def _disconnect(self) -> None:
        pc, url = self._pc, self._session_url
        self._pc, self._session_url = None, None
        self._forward.attach(None)
        self._connected.clear()
        if url is not None:
            try:
                async with self._http.delete(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # the origin is gone: its watchdog releases our session
        if pc is not None:
            try:
                await asyncio.wait_for(pc.close(), 5)
            except Exception:
                log.debug("closing a cascade connection failed", exc_info=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._disconnect()


class Upstream:
    """A room's pulls from its origin on this node: started when the first local viewer of a rung
    (or of the audio) arrives, closed when the last one leaves."""

    def __init__(self, room_id: str, locate: Locate, issue_token: IssueToken, ice_servers: IceServers = NO_ICE_SERVERS,
                 epoch: float | None = None) -> None:
        self.room_id = room_id
        self.epoch = time.monotonic() if epoch is None else epoch  # every pull's packets on one clock
        self._locate = locate
        self._issue_token = issue_token
        self._ice_servers = ice_servers
        self._http: aiohttp.ClientSession | None = None
        self.pulls: dict[int, UpstreamPull] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def pull(self, rung: int, fanout: FanOut) -> None:
        if rung in self.pulls:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self.pulls[rung] = UpstreamPull(self.room_id, rung, fanout, self._locate, self._issue_token, self._http,
                                        self._ice_servers, self.epoch)

    def release(self, rung: int) -> None:
        pull = self.pulls.pop(rung, None)
        if pull is not None:
            task = asyncio.ensure_future(pull.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def request_keyframe(self, rung: int) -> None:
        pull = self.pulls.get(rung)
        if pull is not None:
            pull.request_keyframe()

    async def close(self) -> None:
        for rung in list(self.pulls):
            self.release(rung)
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
