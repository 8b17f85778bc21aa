"""Running on a real server: HTTPS built in, links that name a reachable address, a reverse proxy
(Debian's nginx, with the README's configuration) whose X-Forwarded-For is believed and nobody
else's, and /livez vs /readyz.

A non-loopback address of our own (10.213.0.0/24) on a dummy interface, or a veth pair where the
kernel has no dummy driver, created and removed by the tests.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import logging
import re
import shutil
import signal
import ssl
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Iterator

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from playwright.async_api import Browser, Page

from relay.client import whip_publish
from relay.ice import default_host_addresses
from relay.synthetic import PatternTrack
from signaling.app import reachable_addresses
from signaling.cli import main, parse_args, reachable_urls
from signaling.health import mark_shutting_down
from signaling.config import Config, RateLimit, config_from_env, parse_proxy_networks
from signaling.keys import CONFIG
from signaling.proxy import client_of, origin_of
from tests.tools.coturn import Coturn
from tests.tools.redis_server import RedisServer

from .conftest import ADMIN_KEY, RunningServer, free_port, start_server, until
from .test_browser import frames_decoded

from multidict import CIMultiDict, CIMultiDictProxy

REPO = Path(__file__).resolve().parent.parent
DUMMY_IF = "shelfcastdummy0"
VETH_IF, VETH_PEER = "shelfcastveth0", "shelfcastveth1"  # where the kernel has no dummy driver
SERVER_IP = "10.213.0.1"  # the server (and nginx) listen here
CLIENT_A, CLIENT_B, PUBLISHER_IP = "10.213.0.2", "10.213.0.3", "10.213.0.4"  # clients' own source addresses


# -- fixtures: our own network address, a certificate for it ---------------------------------------

def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _remove_interfaces() -> None:
    for name in (DUMMY_IF, VETH_IF):  # deleting one end of a veth pair deletes both
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def dummy_net() -> Iterator[str]:
    """An interface of our own with the server's and the clients' addresses; gone afterwards. A
    dummy interface, or a veth pair on a kernel built without the dummy driver (both ends up: a
    down interface's addresses are not local)."""
    _remove_interfaces()  # a crashed run's leftover
    added = subprocess.run(["ip", "link", "add", DUMMY_IF, "type", "dummy"], capture_output=True)
    name = DUMMY_IF
    if added.returncode != 0:
        _ip("link", "add", VETH_IF, "type", "veth", "peer", "name", VETH_PEER)
        _ip("link", "set", VETH_PEER, "up")
        name = VETH_IF
    try:
        for address in (SERVER_IP, CLIENT_A, CLIENT_B, PUBLISHER_IP):
            _ip("addr", "add", f"{address}/24", "dev", name)
        _ip("link", "set", name, "up")
        yield SERVER_IP
    finally:
        _remove_interfaces()


def write_certificate(directory: Path, addresses: list[str], name: str = "shelfcast test") -> tuple[Path, Path]:
    """A self-signed certificate (P-256) for ``addresses``; (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_certificate(tmp_path_factory.mktemp("tls"), [SERVER_IP, "127.0.0.1"])


def _unverified(local_addr: str | None = None) -> aiohttp.ClientSession:
    """A client that accepts the self-signed certificate, from its own source address."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=False, local_addr=(local_addr, 0) if local_addr else None))


# -- the client address behind proxies: one pure function, in tables --------------------------------

TRUSTED = parse_proxy_networks(["127.0.0.1", "10.0.0.0/8", "::1"])

CLIENT_CASES = [
    # (TCP peer, X-Forwarded-For values, client)
    ("198.51.100.7", [], "198.51.100.7"),  # no proxy
    ("198.51.100.7", ["203.0.113.1"], "198.51.100.7"),  # a stranger's header proves nothing
    ("127.0.0.1", [], "127.0.0.1"),  # the proxy's own request (a health check)
    ("127.0.0.1", ["203.0.113.1"], "203.0.113.1"),  # nginx: $proxy_add_x_forwarded_for
    ("127.0.0.1", ["6.6.6.6, 203.0.113.1"], "203.0.113.1"),  # the client's own XFF sits left: ignored
    ("127.0.0.1", ["6.6.6.6, 203.0.113.1, 10.1.2.3"], "203.0.113.1"),  # two trusted hops
    ("127.0.0.1", ["6.6.6.6", "203.0.113.1"], "203.0.113.1"),  # repeated header lines read as one list
    ("127.0.0.1", ["10.1.2.3, 10.4.5.6"], "10.1.2.3"),  # all trusted: the farthest one vouched for
    ("127.0.0.1", ["garbage, 203.0.113.1"], "203.0.113.1"),
    ("127.0.0.1", ["203.0.113.1, garbage"], "127.0.0.1"),  # a trusted hop never writes garbage: stop there
    ("127.0.0.1", ["203.0.113.1:4711"], "203.0.113.1"),
    ("127.0.0.1", ["[2001:db8::1]:4711"], "2001:db8::1"),
    ("::1", ["2001:db8::1"], "2001:db8::1"),
    ("::ffff:127.0.0.1", ["203.0.113.1"], "203.0.113.1"),  # a dual-stack socket's view of the proxy
    ("127.0.0.2", ["203.0.113.1"], "127.0.0.2"),  # only the listed proxy, not all of loopback
    (None, ["203.0.113.1"], None),  # a Unix socket peer has no address
]


@pytest.mark.parametrize("peer, forwarded_for, client", CLIENT_CASES)
def test_client_address_behind_proxies(peer: str | None, forwarded_for: list[str], client: str | None) -> None:
    assert client_of(peer, forwarded_for, TRUSTED) == client


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


ORIGIN_CASES = [
    # (peer, headers, (remote, scheme, host))
    ("127.0.0.1", _headers(X_Forwarded_For="203.0.113.1", X_Forwarded_Proto="https", X_Forwarded_Host="shop.example.com"),
     ("203.0.113.1", "https", "shop.example.com")),
    ("198.51.100.7", _headers(X_Forwarded_For="203.0.113.1", X_Forwarded_Proto="https", X_Forwarded_Host="evil.example"),
     ("198.51.100.7", "http", "10.213.0.1:8080")),  # untrusted: nothing believed
    ("127.0.0.1", _headers(X_Forwarded_Proto="gopher", X_Forwarded_Host="bad host/x"), ("127.0.0.1", "http", "10.213.0.1:8080")),
    ("127.0.0.1", _headers(X_Forwarded_Proto="http, HTTPS", X_Forwarded_Host="a.example, shop.example.com:8443"),
     ("127.0.0.1", "https", "shop.example.com:8443")),  # the nearest proxy's value
]


@pytest.mark.parametrize("peer, headers, expected", ORIGIN_CASES)
def test_forwarded_scheme_and_host_only_from_a_trusted_proxy(peer: str, headers: CIMultiDictProxy[str],
                                                              expected: tuple[str, str, str]) -> None:
    origin = origin_of(peer, "http", "10.213.0.1:8080", headers, TRUSTED)
    assert (origin.remote, origin.scheme, origin.host) == expected


# -- configuration and the CLI ----------------------------------------------------------------------

def test_tls_and_proxy_settings_from_flags_and_env(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    _, config = parse_args(["serve", "--tls-cert", str(cert), "--tls-key", str(key), "--trusted-proxy", "127.0.0.1",
                            "--trusted-proxy", "10.0.0.0/8,::1", "--port", "8443"])
    assert (config.tls_cert, config.tls_key) == (cert, key)
    assert [str(n) for n in config.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert config.base_url == "https://127.0.0.1:8443"  # TLS: links are https without a --public-url
    env = config_from_env(Config(), {"SHELFCAST_TLS_CERT": str(cert), "SHELFCAST_TLS_KEY": str(key),
                                     "SHELFCAST_TRUSTED_PROXIES": "192.168.0.0/16, 127.0.0.1"})
    assert env.tls and [str(n) for n in env.trusted_proxies] == ["192.168.0.0/16", "127.0.0.1/32"]
    with pytest.raises(ValueError, match="trusted proxy 'nginx'"):
        config_from_env(Config(), {"SHELFCAST_TRUSTED_PROXIES": "nginx"})
    _, public = parse_args(["serve", "--tls-cert", str(cert), "--tls-key", str(key), "--public-url", "https://shop.example.com/"])
    assert public.base_url == "https://shop.example.com"


def _other_key_pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_certificate(tmp_path / "other", ["127.0.0.1"])


def _encrypted_key(tmp_path: Path) -> Path:
    path = tmp_path / "encrypted.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return path


START_ERRORS = [
    # (flags: cert/key placeholders, message)
    (["--tls-cert", "CERT"], "--tls-cert needs --tls-key too"),
    (["--tls-key", "KEY"], "--tls-key needs --tls-cert too"),
    (["--tls-cert", "MISSING", "--tls-key", "KEY"], "cannot read the TLS certificate MISSING: No such file or directory"),
    (["--tls-cert", "CERT", "--tls-key", "DIR"], "cannot read the TLS key DIR: Is a directory"),
    (["--tls-cert", "KEY", "--tls-key", "CERT"], "the TLS certificate KEY is a PEM file of another kind"),
    (["--tls-cert", "CERT", "--tls-key", "JUNK"], "the TLS key JUNK is not PEM"),
    (["--tls-cert", "CERT", "--tls-key", "OTHER_KEY"], "the TLS key OTHER_KEY does not belong to the certificate CERT"),
    (["--tls-cert", "CERT", "--tls-key", "ENCRYPTED"], "the TLS key ENCRYPTED is encrypted with a passphrase"),
    (["--trusted-proxy", "10.0.0.0/33"], "trusted proxy '10.0.0.0/33'"),
    (["--public-url", "shop.example.com"], "public URL 'shop.example.com' must start with http:// or https://"),
]


@pytest.mark.parametrize("flags, message", START_ERRORS)
def test_bad_tls_or_proxy_settings_stop_the_start_with_a_message(
    flags: list[str], message: str, tls_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tls_files
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    names = {"CERT": cert, "KEY": key, "MISSING": tmp_path / "missing.pem", "DIR": tmp_path, "JUNK": junk,
             "OTHER_KEY": _other_key_pair(tmp_path)[1], "ENCRYPTED": _encrypted_key(tmp_path)}
    argv = ["serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
            *[str(names.get(f, f)) for f in flags]]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    expected = message
    for placeholder in sorted(names, key=len, reverse=True):  # OTHER_KEY before KEY
        expected = expected.replace(placeholder, str(names[placeholder]))
    assert code == 2 and expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()  # nothing started, nothing written


def test_a_wildcard_host_links_a_reachable_address_never_loopback(dummy_net: str) -> None:
    config = Config(host="0.0.0.0", port=8443, tls_cert=Path("c.pem"), tls_key=Path("k.pem"))
    config = config.with_reachable_url(reachable_addresses(config))
    urls = reachable_urls(config)
    assert f"https://{SERVER_IP}:8443" in urls  # the dummy interface is one of this machine's
    assert all(u.startswith("https://") and "127.0.0.1" not in u for u in urls), urls
    assert urls[0] == config.base_url  # what the API's links use
    # "::" listens on IPv6 only (asyncio sets IPV6_V6ONLY): links name IPv6 addresses, bracketed.
    v6 = Config(host="::", port=8443)
    assert reachable_urls(v6.with_reachable_url(reachable_addresses(v6))) == \
        [f"http://[{a}]:8443" for a in default_host_addresses(ipv6=True)]
    announced = Config(host="0.0.0.0", port=80, ice_hosts=("203.0.113.5",))
    assert announced.with_reachable_url(reachable_addresses(announced)).base_url == "http://203.0.113.5:80"
    assert Config(host="0.0.0.0", public_url="https://shop.example.com").with_reachable_url(("10.0.0.1",)).base_url == \
        "https://shop.example.com"


# -- HTTPS with a real Chromium on a non-loopback address -------------------------------------------

async def _start_cli(args: list[str], tmp_path: Path, env: dict[str, str] | None = None
                     ) -> tuple[asyncio.subprocess.Process, list[str]]:
    """``shelfcast serve ARGS`` as its own process; (process, the lines it printed up to the links)."""
    with (tmp_path / "stderr.txt").open("wb") as stderr:  # the child keeps its own copy of the file
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "signaling.cli", "serve", "--data-dir", str(tmp_path / "data"), *args,
            cwd=tmp_path, env={**os.environ, "SHELFCAST_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    lines: list[str] = []
    assert proc.stdout is not None
    while not lines or not lines[-1].lstrip().startswith("WHEP playback"):
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, (tmp_path / "stderr.txt").read_text()
        lines.append(line.decode().rstrip())
    return proc, lines


async def _stop_cli(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 20)


def _link(lines: list[str], label: str) -> str:
    line = next(l for l in lines if l.lstrip().startswith(label))
    match = re.search(r"https?://\S+", line)
    assert match, line
    return match.group(0)


async def _selected_pair(page: Page, pc: str) -> dict[str, str] | None:
    """The page's selected candidate pair: its local candidate's type and the remote address."""
    return await page.evaluate(
        """async (name) => {
            const pc = eval(name);
            const stats = await pc.getStats();
            let pair = null;
            stats.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId); });
            if (!pair) stats.forEach((s) => { if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s; });
            if (!pair) return null;
            const local = stats.get(pair.localCandidateId), remote = stats.get(pair.remoteCandidateId);
            return { localType: local.candidateType, remote: remote.address || remote.ip };
        }""",
        pc,
    )


@pytest.mark.parametrize("through_turn", [False, True], ids=["direct", "turn-relay-only"])
async def test_https_studio_publishes_and_watch_plays_on_a_non_loopback_address(
    dummy_net: str, tls_files: tuple[Path, Path], browser: Browser, tmp_path: Path, through_turn: bool
) -> None:
    """The printed links are https on the machine's address; Chromium gets the camera there (a
    secure context), the watch page on the same origin decodes the host, media over that address;
    and the same with both pages on relay-only ICE through coturn, credentials minted by the server."""
    cert, key = tls_files
    port = free_port()
    turn = Coturn(tmp_path / "coturn") if through_turn else None
    turn_args, turn_env = (["--turn-url", turn.url], {"SHELFCAST_TURN_SECRET": turn.secret}) if turn else ([], {})
    proc, lines = await _start_cli(["--host", "0.0.0.0", "--port", str(port), "--tls-cert", str(cert),
                                    "--tls-key", str(key), "--ice-host", SERVER_IP, "--join-limit", "0", *turn_args],
                                   tmp_path, turn_env)
    context = await browser.new_context(ignore_https_errors=True)  # self-signed: nobody's CA signed it
    query = "?ice=relay" if turn else ""
    try:
        printed = "\n".join(lines)
        assert lines[0] == f"shelfcast listening on https://{SERVER_IP}:{port}", printed
        assert "127.0.0.1" not in printed and "http://" not in printed, printed
        studio_link, watch_link = _link(lines, "studio"), _link(lines, "watch")
        assert studio_link.startswith(f"https://{SERVER_IP}:{port}/studio/") and "#token=" in studio_link
        assert watch_link.startswith(f"https://{SERVER_IP}:{port}/watch/")

        errors: list[str] = []
        watch, studio = await context.new_page(), await context.new_page()
        for page in (watch, studio):
            page.on("pageerror", lambda exc: errors.append(str(exc)))
        await watch.goto(watch_link + query)
        await watch.wait_for_function("window.player && window.player.status === 'playing'", timeout=15000)
        await studio.goto(studio_link.replace("#", query + "#", 1))
        assert await studio.evaluate("window.isSecureContext && !!navigator.mediaDevices")
        await studio.wait_for_function("window.studio.state === 'ready'", timeout=15000)
        await studio.click("#golive")
        await studio.wait_for_function("window.studio.state === 'connected'", timeout=15000)
        await watch.wait_for_function("window.player.hostLive === true", timeout=10000)
        first = await frames_decoded(watch)

        async def more_frames() -> bool:
            return await frames_decoded(watch) >= first + 30

        await until(more_frames)
        # The server offered exactly the announced host address, and media flows over it (relayed
        # by coturn, both pages gathering nothing but relay candidates, when through TURN).
        answer = await watch.evaluate("window.player.pc.remoteDescription.sdp")
        host = [l for l in answer.splitlines() if l.startswith("a=candidate:") and " typ host" in l]
        assert host and all(f" {SERVER_IP} " in c for c in host), host
        watched = await _selected_pair(watch, "window.player.pc")
        assert watched is not None and watched["localType"] == ("relay" if turn else "host"), watched
        if turn is None:
            assert watched["remote"] == SERVER_IP
        else:
            published = await _selected_pair(studio, "window.studio.pc")
            assert published is not None and published["localType"] == "relay", published
        room_id = watch_link.rsplit("/", 1)[1]
        async with _unverified() as http, http.get(f"https://{SERVER_IP}:{port}/api/rooms/{room_id}") as resp:
            assert (await resp.json())["live"] is True
        assert errors == []
    finally:
        await context.close()
        code = await _stop_cli(proc)
        if turn is not None:
            turn.stop()
    assert code == 0, (tmp_path / "stderr.txt").read_text()


async def test_plain_http_is_refused_on_the_https_port_and_sighup_reloads_the_certificate(
    dummy_net: str, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Let's Encrypt renews every couple of months: SIGHUP takes the new files, no restart."""
    cert, key = write_certificate(tmp_path / "live", [SERVER_IP], name="before renewal")
    port = free_port()
    proc, _ = await _start_cli(["--host", SERVER_IP, "--port", str(port), "--tls-cert", str(cert),
                                "--tls-key", str(key)], tmp_path)
    try:
        async def served_name() -> str:
            reader, writer = await asyncio.open_connection(SERVER_IP, port, ssl=_no_verify(), server_hostname=SERVER_IP)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            await writer.wait_closed()
            return x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

        assert await served_name() == "before renewal"
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):  # plain HTTP on the TLS port gets no page
                async with http.get(f"http://{SERVER_IP}:{port}/livez") as resp:
                    await resp.read()
        write_certificate(tmp_path / "live", [SERVER_IP], name="after renewal")  # certbot writes new files
        proc.send_signal(signal.SIGHUP)

        async def renewed() -> bool:
            return await served_name() == "after renewal"

        await until(renewed, 10)
        async with _unverified() as http, http.get(f"https://{SERVER_IP}:{port}/livez") as resp:
            assert resp.status == 200
    finally:
        code = await _stop_cli(proc)
    assert code == 0


def _no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- behind Debian's nginx, with the README's configuration ------------------------------------------

README_PLACEHOLDERS = ("listen 80;", "listen 443 ssl;", "http://127.0.0.1:8080",
                       "/etc/letsencrypt/live/shop.example.com/fullchain.pem",
                       "/etc/letsencrypt/live/shop.example.com/privkey.pem")


def readme_nginx_config() -> str:
    """The README's nginx example, exactly (the test must run what the documentation says)."""
    blocks = re.findall(r"```nginx\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    assert len(blocks) == 1, "README.md should hold one ```nginx block: the tested example"
    return blocks[0]


class Nginx:
    """A private nginx (its own prefix, pid and logs) running the README's server blocks."""

    def __init__(self, workdir: Path, *, upstream_port: int, cert: Path, key: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        assert Path(binary).exists(), "nginx is not installed (apt-get install nginx)"
        self.http_port, self.https_port = free_port(), free_port()
        site = readme_nginx_config()
        for placeholder, value in zip(README_PLACEHOLDERS, (
            f"listen {SERVER_IP}:{self.http_port};", f"listen {SERVER_IP}:{self.https_port} ssl;",
            f"http://127.0.0.1:{upstream_port}", str(cert), str(key),
        )):
            assert site.count(placeholder) == 1, f"the README's nginx example no longer has {placeholder!r}"
            site = site.replace(placeholder, value)
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        temp = " ".join(f"{kind}_temp_path {workdir}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (workdir / "nginx.conf").write_text(
            f"worker_processes 1;\npid {workdir}/nginx.pid;\nuser root;\nerror_log {workdir}/error.log info;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n access_log {workdir}/access.log;\n {temp}\n{site}\n}}\n"
        )
        self._proc = subprocess.Popen(
            [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log"),
             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    async def wait_ready(self) -> None:
        async def accepting() -> bool:
            assert self._proc.poll() is None, (self.workdir / "error.log").read_text()
            try:
                _, writer = await asyncio.open_connection(SERVER_IP, self.https_port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await until(accepting, 10, 0.05)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


@pytest.fixture
async def behind_nginx(dummy_net: str, tls_files: tuple[Path, Path], config: Config,
                       tmp_path: Path) -> AsyncIterator[tuple[RunningServer, Nginx]]:
    """shelfcast on every interface (nginx reaches it on loopback; a stranger on 10.213.0.1), trusting
    only loopback's forwarded headers, links naming nginx's https address."""
    cert, key = tls_files
    port = free_port()
    nginx = Nginx(tmp_path / "nginx", upstream_port=port, cert=cert, key=key)
    try:
        await nginx.wait_ready()
        server_config = replace(
            config, host="0.0.0.0", port=port, trusted_proxies=parse_proxy_networks(["127.0.0.1"]),
            public_url=f"https://{SERVER_IP}:{nginx.https_port}", ice_hosts=(SERVER_IP,),
            join_limit=RateLimit(60, 3),
        )
        runner, app = await start_server(server_config)
        async with _unverified() as http:
            yield RunningServer(app, server_config.public_url, http), nginx
        await runner.cleanup()
    finally:
        nginx.stop()


async def _join_attempt(http: aiohttp.ClientSession, url: str, forwarded_for: str | None = None) -> int:
    """A WHEP join with a bad offer: a join token is taken, then 400 (or 429 with none left)."""
    headers = {"Content-Type": "application/sdp"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    async with http.post(url, data="v=0\r\n", headers=headers) as resp:
        body = await resp.json()
        assert body["error"]["code"] == {400: "bad_sdp", 429: "rate_limited"}[resp.status], body
        return resp.status


async def test_through_nginx_pages_events_whip_whep_and_limits_see_the_forwarded_client(
    behind_nginx: tuple[RunningServer, Nginx], browser: Browser, caplog: pytest.LogCaptureFixture
) -> None:
    server, nginx = behind_nginx
    caplog.set_level(logging.INFO, logger="shelfcast.webrtc")
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    public = f"https://{SERVER_IP}:{nginx.https_port}"
    async with aiohttp.ClientSession() as plain, plain.get(f"http://{SERVER_IP}:{nginx.http_port}/watch/x",
                                                          allow_redirects=False) as resp:
        assert resp.status == 301 and resp.headers["Location"] == f"https://{SERVER_IP}/watch/x"

    room = await server.create_room(title="Behind nginx")  # through nginx: the admin API
    assert room["links"]["watch"] == f"{public}/watch/{room['id']}"  # links name the proxy, not the server
    async with server.http.ws_connect(f"wss://{SERVER_IP}:{nginx.https_port}/api/rooms/{room['id']}/events") as ws:
        first = await ws.receive_json(timeout=5)
        assert (first["type"], first["title"]) == ("room", "Behind nginx")

    async with _unverified(PUBLISHER_IP) as publisher_http:
        pub = await whip_publish(publisher_http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
        context = await browser.new_context(ignore_https_errors=True)
        try:
            watch = await context.new_page()
            errors: list[str] = []
            watch.on("pageerror", lambda exc: errors.append(str(exc)))
            await watch.goto(room["links"]["watch"])
            await watch.wait_for_function("document.getElementById('title').textContent === 'Behind nginx'", timeout=15000)
            await watch.wait_for_function("window.player.hostLive === true", timeout=15000)

            async def decoding() -> bool:
                return await frames_decoded(watch) >= 30

            await until(decoding)
            assert errors == []
        finally:
            await context.close()
            await pub.close()
    joined = [r for r in caplog.records if r.getMessage() == "publisher joined"]
    assert [getattr(r, "client", None) for r in joined] == [PUBLISHER_IP]  # not nginx's 127.0.0.1
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(m.startswith(f'{PUBLISHER_IP} "POST /whip/{room["id"]}"') for m in access), access

    # The join limit (3 at once per client) keys on each forwarded client, not on nginx.
    whep_via_nginx = room["links"]["whep"]
    whep_direct = f"http://{SERVER_IP}:{server.app[CONFIG].port}/whep/{room['id']}"
    async with _unverified(CLIENT_A) as a, _unverified(CLIENT_B) as b:
        # A's own X-Forwarded-For arrives left of the address nginx appends: it changes nothing.
        assert [await _join_attempt(a, whep_via_nginx, f"203.0.113.{i}") for i in range(4)] == [400, 400, 400, 429]
        assert await _join_attempt(b, whep_via_nginx) == 400  # B is somebody else, through the same nginx
        # Straight to shelfcast, not through a trusted proxy: the header is ignored both ways.
        assert await _join_attempt(b, whep_direct, forwarded_for=CLIENT_A) == 400  # not A's empty bucket
        assert await _join_attempt(a, whep_direct, forwarded_for="198.51.100.1") == 429  # nor a fresh one


# -- /livez vs /readyz ------------------------------------------------------------------------------

async def _health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def test_readiness_follows_redis_and_liveness_does_not(config: Config, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    runner, _ = await start_server(replace(config, redis_url=redis.url))
    base = config.base_url
    try:
        async with aiohttp.ClientSession() as http:
            assert await _health(http, f"{base}/livez") == (200, {"status": "alive"})
            assert await _health(http, f"{base}/readyz") == (200, {"status": "ready"})
            assert await _health(http, f"{base}/healthz") == (200, {"status": "ok"})
            port = redis.port
            redis.stop()

            async def not_ready() -> bool:
                status, body = await _health(http, f"{base}/readyz")
                return status == 503 and {"redis", "stock"} <= set(body["problems"])  # type: ignore[arg-type]

            await until(not_ready, 15)
            status, body = await _health(http, f"{base}/readyz")
            assert body["status"] == "not_ready" and "redis: unreachable" in str(body["reason"]), body
            assert "shared stock log unreachable" in str(body["problems"]["stock"]), body  # type: ignore[index]
            assert await _health(http, f"{base}/livez") == (200, {"status": "alive"})  # no restart for this
            status, old = await _health(http, f"{base}/healthz")
            assert (status, old["status"], old["cluster"]) == (503, "degraded", "redis unreachable")

            redis = RedisServer(tmp_path / "redis", port=port)  # Redis is back at the same address

            async def ready() -> bool:
                return (await _health(http, f"{base}/readyz"))[0] == 200

            await until(ready, 15)
            assert await _health(http, f"{base}/healthz") == (200, {"status": "ok"})
    finally:
        await runner.cleanup()
        redis.stop()


async def test_a_server_shutting_down_is_alive_but_not_ready(server: RunningServer) -> None:
    """From SIGTERM until the listening socket closes, a load balancer polling on a kept-alive
    connection hears "not ready" (the CLI marks it so as soon as the signal arrives)."""
    assert (await _health(server.http, f"{server.base}/readyz"))[0] == 200
    mark_shutting_down(server.app)
    status, body = await _health(server.http, f"{server.base}/readyz")
    assert (status, body["problems"]) == (503, {"server": "shutting down"})
    assert (await _health(server.http, f"{server.base}/livez"))[0] == 200
