"""An independent WHIP publisher: FFmpeg's own ``whip`` muxer (through PyAV), H.264 + Opus.

Run as a separate process (PyAV holds the GIL during the WHIP exchange):
    python -m tests.tools.ffmpeg_whip URL TOKEN --seconds 8
FFmpeg's GnuTLS build makes a P-224 DTLS key by default, which OpenSSL (aiortc) rejects, so we hand
it a P-256 certificate.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write_p256_cert(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ffmpeg-whip")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    )
    return cert_path, key_path


def publish(url: str, token: str, seconds: float, width: int = 320, height: int = 240, fps: int = 30,
            profile: str = "baseline", own_key: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        options = {"authorization": token, "handshake_timeout": "10000"}
        if not own_key:
            cert, key = write_p256_cert(Path(tmp))
            options |= {"cert_file": str(cert), "key_file": str(key)}
        out = av.open(url, mode="w", format="whip", options=options)
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": profile, "g": str(fps), "bf": "0"}
        if profile != "baseline":
            # x264 signals the lowest profile its tools need, and ultrafast's are all Baseline: CABAC
            # makes the stream Main, 8x8 transforms make it High.
            video.options["x264-params"] = "cabac=1" + (":8x8dct=1" if profile == "high" else "")
        audio = out.add_stream("libopus", rate=48000)
        audio.layout = "stereo"
        start = time.monotonic()
        bars = np.zeros((height, width, 3), np.uint8)
        bars[:, : width // 2] = (230, 40, 40)
        bars[:, width // 2 :] = (40, 230, 40)
        frame_index = sample = 0
        while time.monotonic() - start < seconds:
            img = np.roll(bars, frame_index * 2, axis=1)
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts = frame_index
            vf.time_base = Fraction(1, fps)
            out.mux(video.encode(vf))
            frame_index += 1
            while sample < frame_index * 48000 // fps:
                tone = (np.sin(2 * np.pi * 440 * (np.arange(960) + sample) / 48000) * 6000).astype(np.int16)
                af = av.AudioFrame.from_ndarray(np.repeat(tone, 2).reshape(1, -1), format="s16", layout="stereo")
                af.sample_rate = 48000
                af.pts = sample
                af.time_base = Fraction(1, 48000)
                out.mux(audio.encode(af))
                sample += 960
            delay = start + frame_index / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        out.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--profile", default="baseline", choices=("baseline", "main", "high"), help="H.264 profile")
    parser.add_argument("--own-key", action="store_true", help="let FFmpeg make its own DTLS key (P-224)")
    args = parser.parse_args()
    publish(args.url, args.token, args.seconds, profile=args.profile, own_key=args.own_key)


if __name__ == "__main__":
    main()
