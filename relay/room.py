"""A room and everything it owns: its publisher, its viewers and its media pipeline.

Ownership is a tree (Room -> Publisher / Viewers / RoomMedia); ``Room.close()`` closes them all and
is idempotent. The encoders run only while at least one viewer watches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable

import av

from .errors import ShelfcastError
from .abr import DEFAULT_LADDER, PAUSED, AbrConfig, Rung
from .cascade import AUDIO, Upstream
from .fanout import VIDEO_QUEUE, FanOut, PacketTrack
from .forward import Forwarder, Forwarding
from .frames import FrameFilter
from .ice import IceServers
from .listeners import emit
from .compose import side_by_side
from .pipeline import AudioPipeline, VideoPipeline
from .sessions import VIEWER_TIMEOUT_S, Publisher, Session, Viewer

log = logging.getLogger("shelfcast.room")

MODES = ("show", "call")


PUBLISHER_TAKEOVER_S = 3.0  # a publisher with no media this long may be replaced by a new one


class RoomError(ShelfcastError):
    """The room refuses a session (ended, full, a host already live)."""


@dataclass(frozen=True)
class MediaSettings:
    ice_hosts: tuple[str, ...]
    ice_servers: IceServers  # each session mints its own (TURN REST credentials)
    keyframe_min_interval_s: float
    slate_fps: float
    slate_size: tuple[int, int]
    audio_bitrate: int
    max_viewers: int
    ladder: tuple[Rung, ...] = DEFAULT_LADDER
    abr: AbrConfig | None = AbrConfig()  # None: every viewer stays on the top rung
    viewer_timeout_s: float = VIEWER_TIMEOUT_S  # a viewer silent (no RTCP) this long is gone: release it
    # Whether this server is short of CPU right now (relay.load): new viewers go elsewhere and
    # nobody's rung moves on evidence that only measures us. None: never.
    server_busy: Callable[[], bool] | None = None
    # "native": packetized once per rung, sent natively (relay.egress); "aiortc": every viewer's
    # RTCRtpSender packetizes and encrypts for itself (the previous path, kept as the baseline).
    egress: str = "native"
    # Media nothing is drawn on is forwarded as it arrives (relay.forward); False: decoded and
    # re-encoded like the rest (the previous path, kept as the benchmarks' baseline).
    forward: bool = True


class RungOutput:
    """One rung of the ladder: a fan-out that always exists, an encoder only while someone watches.

    A ``raw`` output carries the host's picture as it is (no PK composition, no overlay): what the
    other host of a PK battle sees in their studio, and what a call's seller sees of the buyer. While
    the publisher sends VP8 its frames are forwarded into it (relay.forward: no decode, no encode);
    otherwise, and for the slate while nobody publishes, an encoder of its own feeds it."""

    def __init__(self, media: "RoomMedia", index: int, rung: Rung, raw: bool = False) -> None:
        self._media = media
        self.index = index
        self.rung = rung
        self.raw = raw
        self.fanout = FanOut("video", self.request_keyframe, name=rung.name)
        self.fanout.on_first = self._start
        self.fanout.on_empty = self._stop
        self.pipeline: VideoPipeline | None = None
        self.pulling = False  # fed by a pull from the origin (edge) instead of an encoder

    def _start(self) -> None:
        if self.pipeline is not None or self.pulling or (self.raw and "video" in self._media.forwarded):
            return
        if self._media.upstream is not None:  # an edge: the origin encodes, we forward
            self.pulling = True
            self._media.upstream.pull(self.index, self.fanout)
            return
        media, s = self._media, self._media.settings
        self.pipeline = VideoPipeline(
            asyncio.get_running_loop(),
            self.fanout,
            bitrate=self.rung.bitrate,
            max_height=self.rung.height,
            epoch=media.epoch,
            keyframe_min_interval_s=s.keyframe_min_interval_s,
            slate_fps=s.slate_fps,
            slate_size=s.slate_size,
            slate_title=media.title,
            frame_filter=None if self.raw else media.frame_filter,
            composer=None if self.raw else media.compose,
            name=self.rung.name,
        )
        self.pipeline.source_live = media.source_live
        self.pipeline.start()

    def _stop(self) -> None:
        # Detach synchronously so a viewer arriving while the old encoder winds down gets a new one.
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            self._media.retire(pipeline)
        if self.pulling:
            self.pulling = False
            if self._media.upstream is not None:
                self._media.upstream.release(self.index)

    def request_keyframe(self) -> None:
        if self.raw and "video" in self._media.forwarded:
            self._media.forwarders.video.request_keyframe()
        elif self.pipeline is not None:
            self.pipeline.request_keyframe()
        elif self.pulling and self._media.upstream is not None:
            self._media.upstream.request_keyframe(self.index)


class RoomMedia:
    """The room's encoder ladder (one encoder per watched rung) and its one audio encoder."""

    def __init__(self, settings: MediaSettings, title: str) -> None:
        self.settings = settings
        self.title = title
        self.upstream: Upstream | None = None  # on an edge: rungs and audio come from the room's origin
        self.epoch = time.monotonic()  # one clock for every rung: seamless switches between them
        # What draws into our pictures (the stock overlay); outlives pipeline restarts.
        self.frame_filter: FrameFilter | None = None
        self.rungs = [RungOutput(self, i, rung) for i, rung in enumerate(settings.ladder)]
        top = settings.ladder[0]
        self.raw = RungOutput(self, 0, Rung("raw", top.width, top.height, top.bitrate), raw=True)
        self.audio_out = FanOut("audio")
        self.audio_out.on_first = self._start_audio
        self.audio_out.on_empty = self._stop_audio
        self.audio: AudioPipeline | None = None
        self.raw_audio_out = FanOut("audio", name="raw")
        self.raw_audio_out.on_first = self._start_raw_audio
        self.raw_audio_out.on_empty = self._stop_raw_audio
        self.raw_audio: AudioPipeline | None = None
        self.forwarders = Forwarding(Forwarder("video", self.raw.fanout, self.epoch),
                                     Forwarder("audio", self.raw_audio_out, self.epoch))
        self.forwarded: frozenset[str] = frozenset()  # kinds the live publisher feeds raw viewers as they arrive
        # PK: the other room's media while linked (see link_pk). Read from encoder threads.
        self.pk_partner: RoomMedia | None = None
        self.latest_frame: av.VideoFrame | None = None
        self.source_live = False
        self.source_size: tuple[int, int] | None = None
        self.encoders_opened = 0
        self.on_ladder_change: Callable[[], None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        return self.audio is not None or any(r.pipeline is not None for r in self.rungs)

    @property
    def settled(self) -> bool:
        """No encoder running and none still winding down (its thread joined)."""
        return not self.running and not self._retiring

    def set_frame_filter(self, frame_filter: FrameFilter | None) -> None:
        """Draw with ``frame_filter`` from the next frame on, in every rung but the raw one."""
        self.frame_filter = frame_filter
        for rung in self.rungs:
            if rung.pipeline is not None:
                rung.pipeline.frame_filter = frame_filter

    def link_pk(self, partner: "RoomMedia | None") -> None:
        """Start (or, with None, end) a PK layout: the partner's host fills the right half of our
        picture and its voice is mixed into ours. A plain reference swap the encoder threads read."""
        self.pk_partner = partner
        self.request_keyframe()  # a new layout: start it with a clean picture

    def compose(self, frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame | None:
        """PK layout at one rung's size (encoder thread), or None outside a battle."""
        partner = self.pk_partner
        if partner is None:
            return None
        return side_by_side(frame, partner.latest_frame, width, height)

    def new_raw_tracks(self) -> tuple[PacketTrack, PacketTrack]:
        """Video and audio of the host as they are (PK host-to-host view)."""
        video = PacketTrack("video", VIDEO_QUEUE)
        video.switch_to(self.raw.fanout)
        return video, self.raw_audio_out.add_track()

    def served_rung(self, wanted: int) -> int:
        """Rungs taller than the source are skipped: serve the best one the source can fill."""
        if self.source_size is None:
            return wanted
        height = self.source_size[1]
        fitting = [r.index for r in self.rungs if r.rung.height <= height]
        if not fitting:
            return len(self.rungs) - 1
        return max(wanted, fitting[0])

    def new_video_track(self, wanted: int) -> PacketTrack:
        track = PacketTrack("video", VIDEO_QUEUE)
        self.switch(track, wanted)
        return track

    def switch(self, track: PacketTrack, wanted: int) -> None:
        track.switch_to(None if wanted == PAUSED else self.rungs[self.served_rung(wanted)].fanout)

    def retire(self, pipeline: VideoPipeline | AudioPipeline) -> None:
        async def close() -> None:
            await pipeline.close()
            if isinstance(pipeline, VideoPipeline):
                self.encoders_opened += pipeline.encoders_opened

        task = asyncio.get_running_loop().create_task(close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _start_audio(self) -> None:
        if self.upstream is not None:
            self.upstream.pull(AUDIO, self.audio_out)
            return
        if self.audio is None:
            self.audio = AudioPipeline(asyncio.get_running_loop(), self.audio_out, bitrate=self.settings.audio_bitrate)
            self.audio.start()

    def _stop_audio(self) -> None:
        if self.upstream is not None:
            self.upstream.release(AUDIO)
        audio, self.audio = self.audio, None
        if audio is not None:
            self.retire(audio)

    def _start_raw_audio(self) -> None:
        if self.raw_audio is None and "audio" not in self.forwarded:
            loop = asyncio.get_running_loop()
            self.raw_audio = AudioPipeline(loop, self.raw_audio_out, bitrate=self.settings.audio_bitrate, name="raw-audio")
            self.raw_audio.start()

    def _stop_raw_audio(self) -> None:
        audio, self.raw_audio = self.raw_audio, None
        if audio is not None:
            self.retire(audio)

    def set_forwarded(self, kinds: frozenset[str]) -> None:
        """The live publisher's media of ``kinds`` now reaches the raw viewers as it arrives (an empty
        set: the publisher left): the raw encoder stops, or starts again for the slate, and every
        raw viewer cuts over at the next keyframe of what feeds it now."""
        before, self.forwarded = self.forwarded, kinds
        if "video" in kinds and "video" not in before:
            self.raw._stop()
        elif "video" in before and "video" not in kinds and len(self.raw.fanout):
            self.raw._start()
        if kinds != before:
            self.raw.fanout.restart()
        if "audio" in kinds and "audio" not in before:
            self._stop_raw_audio()
        elif "audio" in before and "audio" not in kinds and len(self.raw_audio_out):
            self._start_raw_audio()

    async def stop(self) -> None:
        """Stop every encoder and wait for their threads (room end)."""
        for rung in (*self.rungs, self.raw):
            rung._stop()
        self._stop_audio()
        self._stop_raw_audio()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.upstream is not None:
            await self.upstream.close()

    async def become_origin(self) -> None:
        """An edge whose origin is gone takes over: encoders replace the pulls under the viewers
        already watching (they see the slate until the host publishes here)."""
        upstream = self.upstream
        if upstream is not None:
            self._refeed(None)
            await upstream.close()

    def become_edge(self, upstream: Upstream) -> None:
        """This node hands the room to another origin: pulls from it replace our encoders under the
        viewers already watching (they keep their sessions)."""
        self._refeed(upstream)

    def _refeed(self, upstream: Upstream | None) -> None:
        watched = [rung for rung in self.rungs if len(rung.fanout)]
        audio_watched = bool(len(self.audio_out))
        for rung in watched:
            rung._stop()  # detaches what fed it (encoder or pull) under the old regime
        if audio_watched:
            self._stop_audio()
        self.upstream = upstream
        for rung in watched:
            rung._start()
        if audio_watched:
            self._start_audio()

    def set_source_live(self, live: bool) -> None:
        self.source_live = live
        if not live:
            self.latest_frame = None
        for rung in (*self.rungs, self.raw):
            if rung.pipeline is not None:
                rung.pipeline.source_live = live
                if live:
                    rung.pipeline.request_keyframe()

    def submit_video(self, frame: av.VideoFrame) -> None:
        size = (frame.width, frame.height)
        if size != self.source_size:
            self.source_size = size
            if self.on_ladder_change is not None:
                self.on_ladder_change()
        self.latest_frame = frame
        captured = time.monotonic()
        for rung in (*self.rungs, self.raw):
            if rung.pipeline is not None:
                rung.pipeline.submit(frame, captured)

    def submit_audio(self, frame: av.AudioFrame) -> None:
        if self.audio is not None:
            self.audio.submit(frame)
        if self.raw_audio is not None:
            self.raw_audio.submit(frame)
        partner = self.pk_partner
        if partner is not None and partner.audio is not None:
            partner.audio.submit_mix(frame)  # our host is heard in the other room too

    def request_keyframe(self) -> None:
        for rung in self.rungs:
            rung.request_keyframe()

    def pipelines(self) -> list[VideoPipeline]:
        return [r.pipeline for r in self.rungs if r.pipeline is not None]

    @property
    def video_encoders(self) -> int:
        """Video encoders open right now: at most one per rung, never per viewer."""
        return sum(1 for r in self.rungs if r.pipeline is not None and r.pipeline.encoder_open)

    @property
    def audio_encoders(self) -> int:
        return int(self.audio is not None and self.audio.encoder_open)

    def rung_viewers(self) -> dict[str, int]:
        return {r.rung.name: len(r.fanout) for r in self.rungs}


# Who publishes in each mode, and whose picture each role receives (default: the first source).
SOURCES = {"show": ("host",), "call": ("seller", "buyer")}
RECEIVES = {"call": {"seller": "buyer", "buyer": "seller"}}
# Sources nothing is drawn on: their viewers get the picture as it is (forwarded, relay.forward)
# and the source is never decoded when it can be forwarded.
FORWARDED = {"call": ("buyer",)}
PK_HOST_FEED = "pk_host"  # viewer role of the other host in a PK battle
RELAY_FEED = "relay"  # viewer role of another node pulling one rung (or the audio) as it is


@dataclass
class Source:
    """One publisher slot of a room and the media pipeline its picture goes through."""

    name: str
    media: RoomMedia
    publisher: Publisher | None = None

    @property
    def live(self) -> bool:
        return self.publisher is not None and self.publisher.connection_state == "connected"


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
    access: str = "public"  # "token": watching needs a token of this room (calls always do)
    # Other nodes' share of this room (node -> (host live there, audience there)), for describe().
    elsewhere: dict[str, tuple[bool, int]] = field(default_factory=dict)
    on_change: Callable[["Room"], None] | None = None
    on_viewer_joined: Callable[[float], None] | None = None  # seconds from offer to connection up
    viewers: dict[str, Viewer] = field(default_factory=dict)
    closed: bool = False
    # Closers of what other layers attached to the room (its overlay feed); run on close().
    _attachments: list[Callable[[], Awaitable[None]]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode == "call":
            self.access = "token"  # a call is between its two parties, always
        self.sources: dict[str, Source] = {}
        for name in SOURCES[self.mode]:
            media = RoomMedia(self.settings, self.title)
            media.on_ladder_change = lambda name=name: self._reapply_rungs(name)
            self.sources[name] = Source(name, media)
        self._watching: dict[str, str] = {}  # viewer id -> source name

    def attach(self, close: Callable[[], Awaitable[None]]) -> None:
        """Another layer hooked something onto the room (its overlay feed): ``close`` runs when the room does."""
        self._attachments.append(close)

    @property
    def audience(self) -> int:
        """People watching here (other nodes pulling the room are not people)."""
        return sum(1 for v in self.viewers.values() if v.role != RELAY_FEED)

    @property
    def private(self) -> bool:
        return self.access == "token"

    @property
    def primary(self) -> Source:
        """The source the overlay goes on: the show's host, the call's seller."""
        return next(iter(self.sources.values()))

    @property
    def media(self) -> RoomMedia:
        return self.primary.media

    @property
    def publisher(self) -> Publisher | None:
        return self.primary.publisher

    @property
    def live(self) -> bool:
        return self.primary.live

    def _changed(self) -> None:
        emit(self.on_change, self, what="a room change")

    def _publishing_source(self, role: str) -> Source:
        return self.sources.get(role) or self.primary

    def _watched_source(self, role: str | None) -> Source:
        name = RECEIVES.get(self.mode, {}).get(role or "")
        return self.sources[name] if name else self.primary

    async def add_publisher(self, offer_sdp: str, role: str = "host") -> tuple[Publisher, str]:
        if self.closed:
            raise RoomError(410, "room_ended", "this room has ended")
        source = self._publishing_source(role)
        stale = source.publisher
        if stale is not None and stale.silent_for(time.monotonic()) > PUBLISHER_TAKEOVER_S:
            # The host's network dropped and it is publishing again before ICE has noticed the old
            # session is dead: the silent session gives way, viewers stay on and see the new one.
            log.info("a silent %s session gives way to a new one", role, extra=stale.log_ids)
            await stale.close()
        if source.publisher is not None:
            what = "this show already has a live host" if self.mode != "call" else f"the {role} is already connected"
            raise RoomError(409, "host_already_live", f"{what}; stop it first")
        s = self.settings
        media = source.media
        forwarding = replace(media.forwarders, decode=source.name not in FORWARDED.get(self.mode, ())) if s.forward else None
        publisher = Publisher(self.id, s.ice_hosts, s.ice_servers.mint(), media.submit_video, media.submit_audio, forwarding)
        source.publisher = publisher

        async def closed(session: Session) -> None:
            if source.publisher is session:
                source.publisher = None
                media.set_source_live(False)
                media.set_forwarded(frozenset())
                self._changed()

        publisher.on_closed(closed)

        @publisher.pc.on("connectionstatechange")
        def _state() -> None:
            if publisher.connection_state == "connected" and source.publisher is publisher:
                media.set_source_live(True)
                media.set_forwarded(frozenset(publisher.forwarded))
                self._changed()

        try:
            answer = await publisher.accept(offer_sdp)
        except Exception:
            if source.publisher is publisher:
                source.publisher = None
            raise
        return publisher, answer

    async def add_viewer(
        self, offer_sdp: str, kinds: set[str], role: str | None = None, rung: int = 0
    ) -> tuple[Viewer, str]:
        """A viewer (``role`` None), a call party, the other PK host (raw feed), or another node
        (``RELAY_FEED``: pinned to ``rung``, no ABR: the edge's own viewers adapt there)."""
        if self.closed:
            raise RoomError(410, "room_ended", "this room has ended")
        if role is None and self.settings.server_busy is not None and self.settings.server_busy():
            raise RoomError(503, "node_busy", "this server is at capacity right now; try again shortly",
                            headers={"Retry-After": "2"})
        if len(self.viewers) >= self.settings.max_viewers:
            raise RoomError(503, "room_full", f"this room is at its limit of {self.settings.max_viewers} viewers",
                            headers={"Retry-After": "5"})
        s = self.settings
        source = self._watched_source(role)
        media = source.media
        # The other PK host, or a call's seller watching the buyer: the picture as it is (no layout,
        # no overlay, no ladder).
        raw = role == PK_HOST_FEED or source.name in FORWARDED.get(self.mode, ())
        if raw:
            video, audio = media.new_raw_tracks()
            tracks = (video if "video" in kinds else None, audio if "audio" in kinds else None)
            for track, kind in ((video, "video"), (audio, "audio")):
                if kind not in kinds:
                    track.stop()
            abr = None
        else:
            tracks = (
                media.new_video_track(rung) if "video" in kinds else None,
                media.audio_out.add_track() if "audio" in kinds else None,
            )
            abr = None if role == RELAY_FEED else s.abr
        viewer = Viewer(
            self.id,
            s.ice_hosts,
            s.ice_servers.mint(),
            *tracks,
            switch=None if raw else media.switch,
            ladder=s.ladder,
            abr=abr,
            timeout_s=s.viewer_timeout_s,
            rung=rung,
            server_busy=s.server_busy,
            egress=s.egress,
        )
        viewer.role = role
        self.viewers[viewer.id] = viewer
        self._watching[viewer.id] = source.name
        viewer.on_closed(self._viewer_closed)

        @viewer.pc.on("connectionstatechange")
        def _joined() -> None:
            if viewer.connection_state == "connected" and role != RELAY_FEED:
                emit(self.on_viewer_joined, time.monotonic() - viewer.created_at, what="a viewer joining")
        try:
            answer = await viewer.accept(offer_sdp)
        except Exception:
            await viewer.close()
            raise
        self._changed()
        return viewer, answer

    async def _viewer_closed(self, session: Session) -> None:
        self._watching.pop(session.id, None)
        if self.viewers.pop(session.id, None) is not None:
            self._changed()

    def _reapply_rungs(self, source: str) -> None:
        """A source changed size: rungs it can now fill (or no longer fill) change for its viewers."""
        for viewer_id, watched in list(self._watching.items()):
            viewer = self.viewers.get(viewer_id)
            if watched == source and viewer is not None:
                viewer.reapply_rung()

    def session(self, session_id: str) -> Session | None:
        for source in self.sources.values():
            if source.publisher is not None and source.publisher.id == session_id:
                return source.publisher
        return self.viewers.get(session_id)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        sessions: list[Session] = list(self.viewers.values())
        sessions += [src.publisher for src in self.sources.values() if src.publisher is not None]
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        await asyncio.gather(*(close() for close in self._attachments), return_exceptions=True)
        await asyncio.gather(*(src.media.stop() for src in self.sources.values()))
        self._changed()

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "mode": self.mode,
            "title": self.title,
            "region": self.region,
            "skus": list(self.sku_ids),
            "access": self.access,
            "live": self.live or any(live for live, _ in self.elsewhere.values()),
            "parties": {name: src.live for name, src in self.sources.items()},
            "viewers": self.audience + sum(n for _, n in self.elsewhere.values()),
            "ended": self.closed,
            "created_at": self.created_at,
        }
