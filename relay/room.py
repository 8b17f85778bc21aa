"""A room and everything it owns: its publisher, its viewers and its media pipeline.

Ownership is a tree (Room -> Publisher / Viewers / RoomMedia); ``Room.close()`` closes them all and
is idempotent. The encoders run only while at least one viewer watches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import av

from overlay.compositor import Compositor

from .fanout import FanOut
from .pipeline import AudioPipeline, VideoPipeline
from .sessions import Publisher, Session, Viewer

log = logging.getLogger("shelfcast.room")

MODES = ("show", "pk", "call")


class RoomError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class MediaSettings:
    ice_hosts: tuple[str, ...]
    ice_servers: tuple[str, ...]
    video_bitrate: int
    keyframe_min_interval_s: float
    slate_fps: float
    slate_size: tuple[int, int]
    audio_bitrate: int
    max_viewers: int


class RoomMedia:
    """Encoders and fan-outs of one room; started with the first viewer, stopped with the last."""

    def __init__(self, settings: MediaSettings, title: str) -> None:
        self._settings = settings
        self._title = title
        self.compositor = Compositor()  # outlives pipeline restarts: the overlay stays as set
        self.video_out = FanOut("video", self.request_keyframe)
        self.audio_out = FanOut("audio")
        self.video: VideoPipeline | None = None
        self.audio: AudioPipeline | None = None
        self.source_live = False
        self.encoders_opened = 0

    @property
    def running(self) -> bool:
        return self.video is not None

    def start(self) -> None:
        if self.video is not None:
            return
        loop = asyncio.get_running_loop()
        s = self._settings
        self.video = VideoPipeline(
            loop,
            self.video_out,
            bitrate_at_720p=s.video_bitrate,
            keyframe_min_interval_s=s.keyframe_min_interval_s,
            slate_fps=s.slate_fps,
            slate_size=s.slate_size,
            slate_title=self._title,
            compositor=self.compositor,
        )
        self.video.source_live = self.source_live
        self.audio = AudioPipeline(loop, self.audio_out, bitrate=s.audio_bitrate)
        self.video.start()
        self.audio.start()

    async def stop(self) -> None:
        video, audio = self.video, self.audio
        self.video = self.audio = None
        if video is not None:
            await video.close()
            self.encoders_opened += video.encoders_opened
        if audio is not None:
            await audio.close()

    def set_source_live(self, live: bool) -> None:
        self.source_live = live
        if self.video is not None:
            self.video.source_live = live
            if live:
                self.video.request_keyframe()

    def submit_video(self, frame: av.VideoFrame) -> None:
        if self.video is not None:
            self.video.submit(frame)

    def submit_audio(self, frame: av.AudioFrame) -> None:
        if self.audio is not None:
            self.audio.submit(frame)

    def request_keyframe(self) -> None:
        if self.video is not None:
            self.video.request_keyframe()

    @property
    def video_encoders(self) -> int:
        """Video encoders currently open for this room (must not grow with viewers)."""
        return int(self.video is not None and self.video.encoder_open)

    @property
    def audio_encoders(self) -> int:
        return int(self.audio is not None and self.audio.encoder_open)


@dataclass
class Room:
    id: str
    mode: str
    title: str
    region: str
    sku_ids: tuple[str, ...]
    settings: MediaSettings
    created_at: float = field(default_factory=time.time)
    ends_at: float | None = None
    on_change: Callable[["Room"], None] | None = None
    publisher: Publisher | None = None
    viewers: dict[str, Viewer] = field(default_factory=dict)
    closed: bool = False
    # Closers of what other layers attached to the room (its overlay feed); run on close().
    attachments: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.media = RoomMedia(self.settings, self.title)

    @property
    def live(self) -> bool:
        return self.publisher is not None and self.publisher.connection_state == "connected"

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    async def add_publisher(self, offer_sdp: str) -> tuple[Publisher, str]:
        if self.closed:
            raise RoomError(410, "room_ended", "this room has ended")
        if self.publisher is not None:
            raise RoomError(409, "host_already_live", "this show already has a live host; stop it first")
        s = self.settings
        publisher = Publisher(self.id, s.ice_hosts, s.ice_servers, self.media.submit_video, self.media.submit_audio)
        self.publisher = publisher
        publisher.on_closed(self._publisher_closed)

        @publisher.pc.on("connectionstatechange")
        def _state() -> None:
            if publisher.connection_state == "connected" and self.publisher is publisher:
                self.media.set_source_live(True)
                self._changed()

        try:
            answer = await publisher.accept(offer_sdp)
        except Exception:
            if self.publisher is publisher:
                self.publisher = None
            raise
        return publisher, answer

    async def _publisher_closed(self, session: Session) -> None:
        if self.publisher is session:
            self.publisher = None
            self.media.set_source_live(False)
            self._changed()

    async def add_viewer(self, offer_sdp: str, kinds: set[str]) -> tuple[Viewer, str]:
        if self.closed:
            raise RoomError(410, "room_ended", "this room has ended")
        if len(self.viewers) >= self.settings.max_viewers:
            raise RoomError(503, "room_full", f"this room is at its limit of {self.settings.max_viewers} viewers")
        s = self.settings
        self.media.start()
        viewer = Viewer(
            self.id,
            s.ice_hosts,
            s.ice_servers,
            self.media.video_out.add_track() if "video" in kinds else None,
            self.media.audio_out.add_track() if "audio" in kinds else None,
            self.media.request_keyframe,
        )
        self.viewers[viewer.id] = viewer
        viewer.on_closed(self._viewer_closed)
        try:
            answer = await viewer.accept(offer_sdp)
        except Exception:
            await viewer.close()
            raise
        self._changed()
        return viewer, answer

    async def _viewer_closed(self, session: Session) -> None:
        if self.viewers.pop(session.id, None) is not None:
            if not self.viewers:
                await self.media.stop()
            self._changed()

    def session(self, session_id: str) -> Session | None:
        if self.publisher is not None and self.publisher.id == session_id:
            return self.publisher
        return self.viewers.get(session_id)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        sessions: list[Session] = list(self.viewers.values())
        if self.publisher is not None:
            sessions.append(self.publisher)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        await asyncio.gather(*(close() for close in self.attachments), return_exceptions=True)
        await self.media.stop()
        self.media.video_out.close()
        self.media.audio_out.close()
        self._changed()

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "mode": self.mode,
            "title": self.title,
            "region": self.region,
            "skus": list(self.sku_ids),
            "live": self.live,
            "viewers": len(self.viewers),
            "ended": self.closed,
            "created_at": self.created_at,
        }
