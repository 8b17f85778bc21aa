"""The baseline: a naive aiortc relay, the way aiortc's examples do it.

One publisher per room over WHIP; every WHEP viewer gets ``MediaRelay().subscribe(track)`` of the
publisher's decoded tracks, so aiortc runs one VP8 (and one Opus) encoder per viewer, and the relay
keeps aiortc's default buffered (unbounded) queue per subscriber. Same WHIP/WHEP shapes as shelfcast
(POST offer -> 201 answer + Location; DELETE ends the session); no auth.

    python -m benchmarks.naive_relay --port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole, MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from relay.ice import rtc_configuration

from .harness import PUBLISHER_BITRATE, pin_aiortc_vp8_bitrate


class Room:
    def __init__(self) -> None:
        self.relay = MediaRelay()
        self.tracks: dict[str, MediaStreamTrack] = {}
        self.publisher: RTCPeerConnection | None = None
        self.drains: list[MediaBlackhole] = []

    async def add_source(self, track: MediaStreamTrack) -> None:
        """Keep the publisher's decoded track drained while nobody watches.

        aiortc's receiver queues every decoded frame without bound until someone reads the track;
        without a reader, the first viewer would start seconds behind live. An unbuffered relay
        subscription into a MediaBlackhole (aiortc's own sink) reads it at no encoding cost.
        """
        self.tracks[track.kind] = track
        drain = MediaBlackhole()
        drain.addTrack(self.relay.subscribe(track, buffered=False))
        await drain.start()
        self.drains.append(drain)

    async def close(self) -> None:
        for drain in self.drains:
            await drain.stop()


ROOMS = web.AppKey("rooms", dict)
SESSIONS = web.AppKey("sessions", dict)


async def _offer(request: web.Request) -> str:
    if request.content_type != "application/sdp":
        raise web.HTTPUnsupportedMediaType(text="application/sdp expected")
    return await request.text()


def _answer(pc: RTCPeerConnection, kind: str, room: str, session: str) -> web.Response:
    return web.Response(
        status=201,
        text=pc.localDescription.sdp,
        content_type="application/sdp",
        headers={"Location": f"/{kind}/{room}/{session}"},
    )


def _track_session(request: web.Request, pc: RTCPeerConnection) -> str:
    session = secrets.token_urlsafe(8)
    request.app[SESSIONS][session] = pc

    @pc.on("connectionstatechange")
    async def _state() -> None:
        if pc.connectionState in ("failed", "closed"):
            request.app[SESSIONS].pop(session, None)
            await pc.close()

    return session


async def whip(request: web.Request) -> web.Response:
    name = request.match_info["room"]
    room = request.app[ROOMS].setdefault(name, Room())
    offer = await _offer(request)
    pc = RTCPeerConnection(rtc_configuration())

    @pc.on("track")
    async def _on_track(track: MediaStreamTrack) -> None:
        await room.add_source(track)

    await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    room.publisher = pc
    return _answer(pc, "whip", name, _track_session(request, pc))


async def whep(request: web.Request) -> web.Response:
    name = request.match_info["room"]
    room = request.app[ROOMS].get(name)
    if room is None or not room.tracks:
        raise web.HTTPNotFound(text="no live publisher")
    offer = await _offer(request)
    pc = RTCPeerConnection(rtc_configuration())
    await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    for transceiver in pc.getTransceivers():
        track = room.tracks.get(transceiver.kind)
        if track is not None:
            pc.addTrack(room.relay.subscribe(track))
    await pc.setLocalDescription(await pc.createAnswer())
    return _answer(pc, "whep", name, _track_session(request, pc))


async def delete(request: web.Request) -> web.Response:
    pc = request.app[SESSIONS].pop(request.match_info["session"], None)
    if pc is None:
        raise web.HTTPNotFound()
    await pc.close()
    return web.Response(status=200)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "sessions": len(request.app[SESSIONS])})


def create_app() -> web.Application:
    app = web.Application()
    app[ROOMS] = {}
    app[SESSIONS] = {}

    async def close_all(app: web.Application) -> None:
        await asyncio.gather(*(pc.close() for pc in app[SESSIONS].values()), return_exceptions=True)
        await asyncio.gather(*(room.close() for room in app[ROOMS].values()), return_exceptions=True)

    app.on_shutdown.append(close_all)
    app.router.add_post("/whip/{room}", whip)
    app.router.add_post("/whep/{room}", whep)
    app.router.add_delete("/whip/{room}/{session}", delete)
    app.router.add_delete("/whep/{room}/{session}", delete)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"naive relay listening on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.naive_relay")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument(
        "--bitrate", type=int, default=PUBLISHER_BITRATE,
        help="pin aiortc's per-viewer VP8 encoders to this bitrate (same output as shelfcast); 0 = aiortc default",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.bitrate:
        pin_aiortc_vp8_bitrate(args.bitrate)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
