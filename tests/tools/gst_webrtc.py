"""An independent WebRTC peer: GStreamer's webrtcbin (Debian's packages), publishing over WHIP or playing over WHEP.

Run with Debian's own Python (the only one with ``gi``); stdlib + gi only, no project imports:
    /usr/bin/python3 tests/tools/gst_webrtc.py publish URL TOKEN --seconds 45
    /usr/bin/python3 tests/tools/gst_webrtc.py play URL --seconds 45
GStreamer 1.22 has no WHIP elements, so the HTTP exchange is here (non-trickle: the offer is posted
once ICE gathering is complete). webrtcbin keeps its defaults (bundle policy, no STUN server).
Once a second a JSON line on stdout: states and counts; exit status 1 with an "error" line on an HTTP
error, a GStreamer error on the bus, or no connection within --connect-timeout.
Needs: gstreamer1.0-plugins-bad gstreamer1.0-nice gstreamer1.0-plugins-good gstreamer1.0-libav
python3-gi gir1.2-gst-plugins-bad-1.0.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

PUBLISH = (
    "webrtcbin name=webrtc "
    "videotestsrc is-live=true pattern=smpte ! video/x-raw,width=320,height=240,framerate=30/1 ! videoconvert "
    "! vp8enc deadline=1 keyframe-max-dist=30 name=venc ! rtpvp8pay "
    "! application/x-rtp,media=video,encoding-name=VP8,payload=96 ! webrtc. "
    "audiotestsrc is-live=true wave=sine ! audioconvert ! audioresample ! opusenc name=aenc ! rtpopuspay "
    "! application/x-rtp,media=audio,encoding-name=OPUS,payload=111 ! webrtc. "
)
PLAY_CAPS = {
    "video": "application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000",
    "audio": "application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000",
}


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def nick(value: object) -> str:
    name = getattr(value, "value_nick", None)
    return name if name else str(value)


class Peer:
    def __init__(self, mode: str, url: str, token: str | None, seconds: float, connect_timeout: float) -> None:
        self.mode, self.url, self.token, self.seconds = mode, url, token, seconds
        self.connect_timeout = connect_timeout
        self.loop = GLib.MainLoop()
        self.location: str | None = None
        self.counts = {"video": 0, "audio": 0, "audio_samples": 0}
        self.mean_rgb: list[float] | None = None
        self.errors: list[str] = []
        self.exit_code = 0
        self.started = time.monotonic()
        self.connected_at: float | None = None
        self.offer_posted = False
        self.lock = threading.Lock()
        if mode == "publish":
            self.pipeline = Gst.parse_launch(PUBLISH)
            self.webrtc = self.pipeline.get_by_name("webrtc")
            self._count_buffers(self.pipeline.get_by_name("venc"), "video")
            self._count_buffers(self.pipeline.get_by_name("aenc"), "audio")
        else:
            self.pipeline = Gst.Pipeline.new("play")
            self.webrtc = Gst.ElementFactory.make("webrtcbin", "webrtc")
            self.pipeline.add(self.webrtc)
            for kind in ("video", "audio"):
                self.webrtc.emit(
                    "add-transceiver", GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY, Gst.Caps.from_string(PLAY_CAPS[kind])
                )
            self.webrtc.connect("pad-added", self._on_webrtc_pad)
        self.webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        self.webrtc.connect("notify::ice-gathering-state", self._on_gathering_state)
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self._on_error)
        bus.connect("message::warning", self._on_warning)

    # --- counting ---

    def _count_buffers(self, element: Gst.Element, kind: str) -> None:
        def probe(pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
            with self.lock:
                self.counts[kind] += 1
            return Gst.PadProbeReturn.OK

        element.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, probe)

    def _on_webrtc_pad(self, _webrtc: Gst.Element, pad: Gst.Pad) -> None:
        if pad.get_direction() != Gst.PadDirection.SRC:
            return
        decodebin = Gst.ElementFactory.make("decodebin")
        decodebin.connect("pad-added", self._on_decoded_pad)
        self.pipeline.add(decodebin)
        decodebin.sync_state_with_parent()
        pad.link(decodebin.get_static_pad("sink"))

    def _on_decoded_pad(self, _decodebin: Gst.Element, pad: Gst.Pad) -> None:
        caps = pad.get_current_caps() or pad.query_caps(None)
        name = caps.get_structure(0).get_name()
        if name.startswith("video/"):
            kind, chain = "video", "queue ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink emit-signals=true sync=false"
        elif name.startswith("audio/"):
            kind, chain = "audio", "queue ! audioconvert ! audio/x-raw,format=S16LE ! appsink name=sink emit-signals=true sync=false"
        else:
            return
        bin_ = Gst.parse_bin_from_description(chain, True)
        bin_.get_by_name("sink").connect("new-sample", self._on_sample, kind)
        self.pipeline.add(bin_)
        bin_.sync_state_with_parent()
        pad.link(bin_.get_static_pad("sink"))

    def _on_sample(self, sink: Gst.Element, kind: str) -> Gst.FlowReturn:
        sample = sink.emit("pull-sample")
        buf = sample.get_buffer()
        with self.lock:
            self.counts[kind] += 1
            if kind == "audio":
                s = sample.get_caps().get_structure(0)
                channels = s.get_value("channels") or 1
                self.counts["audio_samples"] += buf.get_size() // (2 * channels)
            elif self.counts["video"] % 15 == 1:
                s = sample.get_caps().get_structure(0)
                width, height = s.get_value("width"), s.get_value("height")
                ok, info = buf.map(Gst.MapFlags.READ)
                if ok:
                    try:
                        data, stride = info.data, (width * 3 + 3) // 4 * 4
                        sums, n = [0, 0, 0], 0
                        for y in range(0, height, 8):
                            row = y * stride
                            for x in range(0, width, 8):
                                p = row + x * 3
                                sums[0] += data[p]
                                sums[1] += data[p + 1]
                                sums[2] += data[p + 2]
                                n += 1
                        self.mean_rgb = [round(v / n, 1) for v in sums]
                    finally:
                        buf.unmap(info)
        return Gst.FlowReturn.OK

    # --- negotiation ---

    def _on_negotiation_needed(self, webrtc: Gst.Element) -> None:
        promise = Gst.Promise.new_with_change_func(self._on_offer_created, None)
        webrtc.emit("create-offer", None, promise)

    def _on_offer_created(self, promise: Gst.Promise, _data: object) -> None:
        promise.wait()
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply is not None else None
        if offer is None:
            self.fail(f"create-offer gave no offer: {reply.to_string() if reply else None}")
            return
        self.webrtc.emit("set-local-description", offer, Gst.Promise.new())

    def _on_gathering_state(self, webrtc: Gst.Element, _pspec: object) -> None:
        state = webrtc.get_property("ice-gathering-state")
        if state == GstWebRTC.WebRTCICEGatheringState.COMPLETE and not self.offer_posted:
            self.offer_posted = True
            sdp = webrtc.get_property("local-description").sdp.as_text()
            threading.Thread(target=self._post_offer, args=(sdp,), daemon=True).start()

    def _request(self, method: str, url: str, body: bytes | None = None) -> tuple[int, dict[str, str], str]:
        headers = {"Content-Type": "application/sdp"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode(errors="replace")

    def _post_offer(self, sdp: str) -> None:
        try:
            status, headers, body = self._request("POST", self.url, sdp.encode())
        except OSError as exc:
            GLib.idle_add(self.fail, f"POST {self.url}: {exc}")
            return
        if status != 201:
            GLib.idle_add(self.fail, f"POST {self.url}: HTTP {status}: {body}")
            return
        location = headers.get("Location") or headers.get("location")
        if location:
            self.location = urllib.parse.urljoin(self.url, location)
        GLib.idle_add(self._set_answer, body)

    def _set_answer(self, text: str) -> bool:
        res, msg = GstSdp.SDPMessage.new_from_text(text)
        if res != GstSdp.SDPResult.OK:
            self.fail(f"answer does not parse: {res}")
            return False
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, msg)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())
        return False

    # --- reporting and lifetime ---

    def _dtls_state(self) -> str | None:
        transceiver = self.webrtc.emit("get-transceiver", 0)
        if transceiver is None:
            return None
        sender_or_receiver = transceiver.get_property("receiver") or transceiver.get_property("sender")
        transport = sender_or_receiver.get_property("transport") if sender_or_receiver else None
        return nick(transport.get_property("state")) if transport is not None else None

    def _tick(self) -> bool:
        connection = self.webrtc.get_property("connection-state")
        if connection == GstWebRTC.WebRTCPeerConnectionState.CONNECTED and self.connected_at is None:
            self.connected_at = time.monotonic()
        with self.lock:
            counts = dict(self.counts)
        line = {
            "t": round(time.monotonic() - self.started, 1),
            "mode": self.mode,
            "connection": nick(connection),
            "ice_connection": nick(self.webrtc.get_property("ice-connection-state")),
            "ice_gathering": nick(self.webrtc.get_property("ice-gathering-state")),
            "dtls": self._dtls_state(),
            "counts": counts,
            "errors": list(self.errors),
        }
        if self.mode == "play":
            line["mean_rgb"] = self.mean_rgb
        emit(line)
        elapsed = time.monotonic() - self.started
        if self.connected_at is None and elapsed > self.connect_timeout:
            self.fail(f"not connected after {self.connect_timeout:.0f} s (connection {nick(connection)})")
            return False
        if connection == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            self.fail("peer connection failed")
            return False
        if elapsed >= self.seconds:
            self.loop.quit()
            return False
        return True

    def _on_error(self, _bus: Gst.Bus, message: Gst.Message) -> None:
        err, debug = message.parse_error()
        self.fail(f"GStreamer error from {message.src.get_name()}: {err.message} ({debug})")

    def _on_warning(self, _bus: Gst.Bus, message: Gst.Message) -> None:
        warning, debug = message.parse_warning()
        self.errors.append(f"warning from {message.src.get_name()}: {warning.message}")

    def fail(self, text: str) -> bool:
        self.errors.append(text)
        emit({"t": round(time.monotonic() - self.started, 1), "mode": self.mode, "error": text})
        self.exit_code = 1
        self.loop.quit()
        return False

    def run(self) -> int:
        if self.pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            emit({"mode": self.mode, "error": "pipeline would not start"})
            return 1
        GLib.timeout_add(1000, self._tick)
        try:
            self.loop.run()
        finally:
            self.pipeline.set_state(Gst.State.NULL)
            if self.location:
                try:
                    status, _headers, body = self._request("DELETE", self.location)
                    if status not in (200, 204):
                        emit({"mode": self.mode, "error": f"DELETE {self.location}: HTTP {status}: {body}"})
                except OSError as exc:
                    emit({"mode": self.mode, "error": f"DELETE {self.location}: {exc}"})
        emit({"mode": self.mode, "done": True, "exit": self.exit_code, "counts": self.counts})
        return self.exit_code


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("url")
    pub.add_argument("token")
    play = sub.add_parser("play")
    play.add_argument("url")
    play.add_argument("--token")
    for p in (pub, play):
        p.add_argument("--seconds", type=float, default=45.0)
        p.add_argument("--connect-timeout", type=float, default=20.0)
    args = parser.parse_args()
    Gst.init(None)
    missing = [name for name in ("webrtcbin", "nicesrc", "vp8enc", "vp8dec", "opusenc", "opusdec", "rtpvp8pay", "dtlssrtpenc")
               if Gst.ElementFactory.find(name) is None]
    if missing:
        emit({"mode": args.mode, "error": f"GStreamer elements missing: {', '.join(missing)}"})
        return 2
    return Peer(args.mode, args.url, args.token, args.seconds, args.connect_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
