"""Debian's coturn (`turnserver`) on a free loopback port, with the TURN REST scheme (a secret shared
with shelfcast: `--use-auth-secret --static-auth-secret`), for the TURN tests.

Missing coturn is an error, not a skip: CI must install it (`apt-get install coturn`)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

REALM = "shelfcast"
STUN_BINDING_REQUEST = 0x0001
STUN_BINDING_SUCCESS = 0x0101
STUN_MAGIC_COOKIE = 0x2112A442


def _free_port() -> int:
    """A port free for both UDP and TCP on loopback (coturn listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def command_line(binary: str, port: int, secret: str, workdir: Path) -> list[str]:
    """The coturn command line the README documents (plus where its files go)."""
    return [
        binary,
        "-n",  # no /etc/turnserver.conf: only these options
        f"--listening-port={port}",
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        "--use-auth-secret",
        f"--static-auth-secret={secret}",
        f"--realm={REALM}",
        "--allow-loopback-peers",  # the peers here (shelfcast, Chromium) are all on loopback
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--log-file=stdout",
        "--verbose",  # a line per allocation, naming its username: what the tests check
        f"--userdb={workdir / 'turndb'}",
        f"--pidfile={workdir / 'turnserver.pid'}",
    ]


class Coturn:
    def __init__(self, workdir: Path, secret: str | None = None) -> None:
        binary = shutil.which("turnserver")
        if binary is None:
            raise RuntimeError("coturn is not installed (apt-get install coturn): the TURN tests need its turnserver")
        self.secret = secret or secrets.token_urlsafe(16)
        self.port = _free_port()
        self.url = f"turn:127.0.0.1:{self.port}?transport=udp"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "turnserver.log"
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(command_line(binary, self.port, self.secret, workdir),
                                      stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "LC_ALL": "C"})
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until coturn answers a STUN Binding request on its UDP port."""
        deadline = time.monotonic() + 15
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                transaction = secrets.token_bytes(12)
                sock.sendto(struct.pack("!HHI", STUN_BINDING_REQUEST, 0, STUN_MAGIC_COOKIE) + transaction,
                            ("127.0.0.1", self.port))
                try:
                    data = sock.recv(2048)
                except OSError:  # a timeout, or "connection refused" before coturn listens
                    continue
                if len(data) >= 20 and struct.unpack("!H", data[:2])[0] == STUN_BINDING_SUCCESS and data[8:20] == transaction:
                    return
        self.stop()
        raise RuntimeError(f"turnserver did not start; its log:\n{self.log()[-4000:]}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "Coturn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
