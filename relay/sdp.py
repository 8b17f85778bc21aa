"""Pure checks of SDP offers, before any peer connection is created.

aiortc either raises deep inside negotiation or silently answers with rejected m-lines when an offer
is unusable; checking up front lets the API answer with a precise 4xx and create nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

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


SETUP_VALUES = ("actpass", "active", "passive")


@dataclass(frozen=True)
class MediaSection:
    kind: str
    port: int
    direction: str
    codecs: frozenset[str]
    mid: str | None = None
    bundle_only: bool = False
    setup: str | None = None  # its a=setup, else the session's


@dataclass(frozen=True)
class OfferSummary:
    media: tuple[MediaSection, ...]
    bundle: tuple[str, ...] | None = None  # the mids of the offer's BUNDLE group, None without one

    def kinds(self) -> set[str]:
        return {m.kind for m in self.media}

    def rejected(self, section: MediaSection) -> bool:
        """Port 0 rejects an m-line, except a bundle-only one in the BUNDLE group (RFC 8843 §6):
        that one is media on the group's transport, which the offer declares only on its first
        (offerer-tagged) m-line."""
        return section.port == 0 and not (section.bundle_only and section.mid in (self.bundle or ()))

    def section(self, mid: str | None) -> MediaSection | None:
        return next((m for m in self.media if m.mid == mid), None)


def parse_offer(text: str) -> OfferSummary:
    """Parse the parts of an offer the relay relies on; raise SdpError if it is not an SDP offer."""
    if not text or not text.strip():
        raise SdpError("bad_sdp", "the request body is empty; expected an SDP offer")
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if lines[0] != "v=0":
        raise SdpError("bad_sdp", "not an SDP document: it must start with 'v=0'")
    sections: list[MediaSection] = []
    session_direction = "sendrecv"
    session_setup: str | None = None
    bundle: tuple[str, ...] | None = None
    kind: str | None = None
    port = 0
    direction = ""
    codecs: set[str] = set()
    mid: str | None = None
    bundle_only = False
    setup: str | None = None

    def flush() -> None:
        if kind is not None:
            sections.append(MediaSection(kind, port, direction or session_direction, frozenset(codecs), mid,
                                         bundle_only, setup))

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
            mid, bundle_only, setup = None, False, None
        elif line.startswith("a=group:BUNDLE") and kind is None:
            if bundle is None:  # aiortc bundles the first group only; the answer keeps that one
                bundle = tuple(line[len("a=group:BUNDLE"):].split())
        elif line.startswith("a=setup:"):
            value = line[len("a=setup:"):].strip()
            if value not in SETUP_VALUES:
                raise SdpError("bad_sdp", f"a=setup must be one of {', '.join(SETUP_VALUES)}; got {value[:20]!r}")
            if kind is None:
                session_setup = value
            else:
                setup = value
        elif line.startswith("a=mid:") and kind is not None:
            mid = line[len("a=mid:"):].strip()
        elif line == "a=bundle-only" and kind is not None:
            bundle_only = True
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
    tagged = next((m for m in sections if bundle and m.mid == bundle[0]), None)
    # A bundled m-line without its own a=setup takes the session's, or else the tagged m-line's
    # (RFC 8843 §7.1.3: bundle-only m-lines need not repeat transport attributes).
    sections = [
        replace(m, setup=m.setup or session_setup or (tagged.setup if tagged and bundle and m.mid in bundle else None))
        for m in sections
    ]
    return OfferSummary(tuple(sections), bundle)


def _usable(offer: OfferSummary, supported: dict[str, set[str]], directions: set[str]) -> list[MediaSection]:
    return [
        m
        for m in offer.media
        if m.kind in supported and not offer.rejected(m) and m.direction in directions and m.codecs & supported[m.kind]
    ]


def _one_track_per_kind(offer: OfferSummary) -> None:
    """A session carries one audio and one video track. aiortc would negotiate every m-line (it
    ignores port 0), and the relay would use the first of a kind and leave the rest dangling."""
    for kind in ("audio", "video"):
        count = sum(1 for m in offer.media if m.kind == kind)
        if count > 1:
            raise SdpError(
                "too_many_tracks",
                f"the offer has {count} {kind} media sections; a session takes one audio and one video track",
            )


def check_ingest_offer(offer: OfferSummary) -> OfferSummary:
    """A publisher must send video in VP8 or H.264 (audio in Opus is optional)."""
    _one_track_per_kind(offer)
    usable = _usable(offer, INGEST_CODECS, SENDING)
    if not any(m.kind == "video" for m in usable):
        offered = sorted({c for m in offer.media if m.kind == "video" for c in m.codecs})
        raise SdpError(
            "unsupported_codec",
            "the offer sends no video in a codec the relay accepts (VP8 or H.264); "
            f"video codecs offered: {', '.join(offered) or 'none'}",
        )
    return replace(offer, media=tuple(usable))


def check_playback_offer(offer: OfferSummary) -> OfferSummary:
    """A viewer must be able to receive VP8 video or Opus audio."""
    _one_track_per_kind(offer)
    usable = _usable(offer, EGRESS_CODECS, RECEIVING)
    if not usable:
        raise SdpError(
            "unsupported_codec",
            "the offer receives nothing the relay sends (VP8 video, Opus audio)",
        )
    return replace(offer, media=tuple(usable))


# -- the offer aiortc is given, and the answer it writes --------------------------------------------

# What a bundled m-line may leave to the group's offerer-tagged one (RFC 8843 §7.1.3; RFC 8859's
# TRANSPORT and IDENTICAL categories) and aiortc nevertheless requires on every m-line.
BUNDLE_TRANSPORT_ATTRIBUTES = ("ice-ufrag", "ice-pwd", "fingerprint", "setup", "rtcp-mux")
# Ingest decodes H.264 Main and High (profile_idc 77, 100; Constrained High included) as well, which
# aiortc's codec table does not list: it matches H.264 by profile alone, Constrained Baseline and
# Baseline only. Such a payload type is shown to aiortc as Constrained Baseline, and the answer then
# given the profile-level-id the offer had (see Publisher).
INGEST_H264_PROFILES = {0x4D: "Main", 0x64: "High"}
AIORTC_H264_PROFILE_LEVEL_ID = "42e01f"
_PROFILE_LEVEL_ID = re.compile(r"(profile-level-id=)([0-9a-fA-F]{6})")


@dataclass(frozen=True)
class PreparedOffer:
    sdp: str
    # payload type -> the profile-level-id the offer gave it, where aiortc was shown another one
    h264_profiles: dict[int, str]


def _attribute_name(line: str) -> str | None:
    if not line.startswith("a="):
        return None
    return line[2:].split(":", 1)[0]


def prepare_offer(text: str, *, ingest: bool) -> PreparedOffer:
    """The offer as aiortc can take it: bundle-only m-lines completed with the transport attributes
    of the m-line they are bundled with, and (``ingest``) H.264 Main/High payload types matched."""
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    session: list[str] = []
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            session.append(line)
    bundle = next((line[len("a=group:BUNDLE"):].split() for line in session if line.startswith("a=group:BUNDLE")), [])

    def mid_of(section: list[str]) -> str | None:
        return next((line[len("a=mid:"):] for line in section if line.startswith("a=mid:")), None)

    tagged = next((s for s in sections if bundle and mid_of(s) == bundle[0]), None)
    session_attributes = {_attribute_name(line) for line in session}
    for section in sections:
        if tagged is None or section is tagged or "a=bundle-only" not in section or mid_of(section) not in bundle:
            continue
        present = {_attribute_name(line) for line in section}
        for name in BUNDLE_TRANSPORT_ATTRIBUTES:
            if name in present or (name in session_attributes and name != "rtcp-mux"):
                continue
            section.extend(line for line in tagged if _attribute_name(line) == name)

    h264_profiles: dict[int, str] = {}
    if ingest:
        for section in sections:
            if not section[0].startswith("m=video"):
                continue
            h264 = {
                line.split(":", 1)[1].split()[0]
                for line in section
                if line.startswith("a=rtpmap:") and " h264/" in line.lower()
            }
            for i, line in enumerate(section):
                if not line.startswith("a=fmtp:"):
                    continue
                pt = line[len("a=fmtp:"):].split(" ", 1)[0]
                found = _PROFILE_LEVEL_ID.search(line)
                if pt in h264 and pt.isdigit() and found and int(found.group(2)[:2], 16) in INGEST_H264_PROFILES:
                    h264_profiles[int(pt)] = found.group(2)
                    section[i] = _PROFILE_LEVEL_ID.sub(rf"\g<1>{AIORTC_H264_PROFILE_LEVEL_ID}", line)
    out = session + [line for section in sections for line in section]
    return PreparedOffer("\r\n".join(out) + "\r\n", h264_profiles)


def keep_offered_bundle(answer: str, bundle: tuple[str, ...] | None) -> str:
    """aiortc's answer puts every m-line in one BUNDLE group whatever the offer asked; an answer may
    only keep m-lines the offer bundled (RFC 8843 §7.3), and none without a group in the offer."""
    lines = answer.replace("\r\n", "\n").rstrip("\n").split("\n")
    mids = {line[len("a=mid:"):] for line in lines if line.startswith("a=mid:")}
    kept = [mid for mid in bundle or () if mid in mids]
    out = []
    for line in lines:
        if line.startswith("a=group:BUNDLE"):
            if kept:
                out.append("a=group:BUNDLE " + " ".join(kept))
            continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"
