"""Pure checks of SDP offers, before any peer connection is created.

aiortc either raises deep inside negotiation or silently answers with rejected m-lines when an offer
is unusable; checking up front lets the API answer with a precise 4xx and create nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ShelfcastError

# What the relay can take in from a publisher, and what it sends to viewers.
INGEST_CODECS = {"video": {"vp8", "h264"}, "audio": {"opus"}}
EGRESS_CODECS = {"video": {"vp8"}, "audio": {"opus"}}
SENDING = {"sendonly", "sendrecv"}
RECEIVING = {"recvonly", "sendrecv"}


class SdpError(ShelfcastError, ValueError):
    """The offer is not one we can take (malformed, or without a codec we serve)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(400, code, message)


@dataclass(frozen=True)
class MediaSection:
    kind: str
    port: int
    direction: str
    codecs: frozenset[str]


@dataclass(frozen=True)
class OfferSummary:
    media: tuple[MediaSection, ...]

    def kinds(self) -> set[str]:
        return {m.kind for m in self.media}


def parse_offer(text: str) -> OfferSummary:
    """Parse the parts of an offer the relay relies on; raise SdpError if it is not an SDP offer."""
    if not text or not text.strip():
        raise SdpError("bad_sdp", "the request body is empty; expected an SDP offer")
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if lines[0] != "v=0":
        raise SdpError("bad_sdp", "not an SDP document: it must start with 'v=0'")
    sections: list[MediaSection] = []
    session_direction = "sendrecv"
    kind: str | None = None
    port = 0
    direction = ""
    codecs: set[str] = set()

    def flush() -> None:
        if kind is not None:
            sections.append(MediaSection(kind, port, direction or session_direction, frozenset(codecs)))

    for line in lines[1:]:
        if len(line) < 2 or line[1] != "=":
            raise SdpError("bad_sdp", f"malformed SDP line: {line[:60]!r}")
        if line.startswith("m="):
            flush()
            parts = line[2:].split()
            if len(parts) < 4:
                raise SdpError("bad_sdp", f"malformed media line: {line[:60]!r}")
            kind = parts[0]
            try:
                port = int(parts[1].split("/")[0])
            except ValueError:
                raise SdpError("bad_sdp", f"malformed media port: {line[:60]!r}") from None
            direction = ""
            codecs = set()
        elif line in ("a=sendonly", "a=recvonly", "a=sendrecv", "a=inactive"):
            if kind is None:
                session_direction = line[2:]
            else:
                direction = line[2:]
        elif line.startswith("a=rtpmap:") and kind is not None:
            try:
                encoding = line.split(None, 1)[1]
            except IndexError:
                raise SdpError("bad_sdp", f"malformed rtpmap: {line[:60]!r}") from None
            codecs.add(encoding.split("/")[0].lower())
    flush()
    if not sections:
        raise SdpError("bad_sdp", "the offer has no media sections")
    return OfferSummary(tuple(sections))


def _usable(offer: OfferSummary, supported: dict[str, set[str]], directions: set[str]) -> list[MediaSection]:
    return [
        m
        for m in offer.media
        if m.kind in supported and m.port != 0 and m.direction in directions and m.codecs & supported[m.kind]
    ]


def check_ingest_offer(offer: OfferSummary) -> OfferSummary:
    """A publisher must send video in VP8 or H.264 (audio in Opus is optional)."""
    usable = _usable(offer, INGEST_CODECS, SENDING)
    if not any(m.kind == "video" for m in usable):
        offered = sorted({c for m in offer.media if m.kind == "video" for c in m.codecs})
        raise SdpError(
            "unsupported_codec",
            "the offer sends no video in a codec the relay accepts (VP8 or H.264); "
            f"video codecs offered: {', '.join(offered) or 'none'}",
        )
    return OfferSummary(tuple(usable))


def check_playback_offer(offer: OfferSummary) -> OfferSummary:
    """A viewer must be able to receive VP8 video or Opus audio."""
    usable = _usable(offer, EGRESS_CODECS, RECEIVING)
    if not usable:
        raise SdpError(
            "unsupported_codec",
            "the offer receives nothing the relay sends (VP8 video, Opus audio)",
        )
    return OfferSummary(tuple(usable))
