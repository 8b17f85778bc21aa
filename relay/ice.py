"""ICE set-up for server-side peer connections, and the STUN/TURN servers clients are given.

aiortc adds a public STUN server when no ``iceServers`` are given, which costs join time on a closed
network; we always pass an explicit list. aioice gathers host candidates from every non-loopback
interface and has no per-connection setting for that, so the announced host addresses are applied
per connection by replacing its gathering step (no process-wide patching).

STUN/TURN servers are one typed setting, checked when the server starts (a bad entry used to let it
start and then fail every offer with aiortc's "malformed uri"). They come in two forms: fixed
servers (:class:`IceServer`, written as RTCIceServer JSON or the ``turn:USER:CREDENTIAL@host`` URL
shorthand) and coturn's REST scheme (:class:`TurnRest`: a secret shared with coturn's
``static-auth-secret``, from which every session gets credentials of its own that expire).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Iterable
from urllib.parse import unquote

import ifaddr
from aioice import Connection
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

from .aiortc_private import consent_while_receiving, gather_only, ice_connection

SCHEMES = ("stun", "turn", "turns")
DEFAULT_TURN_TTL_S = 3600.0
JSON_KEYS = ("urls", "username", "credential", "credentialType")

_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<rest>.*)", re.DOTALL)
# What aiortc's STUN/TURN URI parser accepts (RFC 7064/7065 without IPv6 literals).
_HOST_PORT = re.compile(r"(?P<host>[^?:@/\[\]\s]*)(?::(?P<port>[^?]*))?(?:\?(?P<query>.*))?", re.DOTALL)
_PRINTABLE = re.compile(r"[\x20-\x7e]+")


class IceConfigError(ValueError):
    """A STUN/TURN setting the server cannot use, found when it starts; the message names the entry
    (credentials masked) and what is wrong with it. A ValueError, so the CLI reports it like any
    other bad setting."""


def mask_credentials(url: str) -> str:
    """``turn:user:secret@host`` -> ``turn:user:***@host``: error messages name entries, not secrets."""
    scheme, colon, rest = url.partition(":")
    if "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    return f"{scheme}{colon}{userinfo.partition(':')[0]}:***@{host}"


def check_ice_url(url: str) -> str:
    """Refuse a URL that browsers or aiortc would refuse, saying why; returns its scheme."""
    shown = mask_credentials(url)
    match = _SCHEME.fullmatch(url)
    if match is None:
        raise IceConfigError(f"{shown!r} is not a stun:, turn: or turns: URL")
    scheme, rest = match["scheme"], match["rest"]
    if scheme not in SCHEMES:  # case included: aiortc's parser takes lower case only
        raise IceConfigError(f"{shown!r}: scheme {scheme!r} is not stun, turn or turns")
    if rest.startswith("//"):
        raise IceConfigError(f"{shown!r}: write {scheme}:host:port, without '//'")
    if "@" in rest:
        raise IceConfigError(f"{shown!r}: credentials do not go inside the URL here: give username and credential beside it")
    if rest.startswith("["):
        raise IceConfigError(f"{shown!r}: IPv6 literals are not supported by the server's ICE agent (aiortc): use a host name")
    parts = _HOST_PORT.fullmatch(rest)
    if parts is None or not parts["host"]:
        raise IceConfigError(f"{shown!r}: missing host")
    port = parts["port"]
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise IceConfigError(f"{shown!r}: port {port!r} is not a number from 1 to 65535")
    query = parts["query"]
    if query is not None:
        key, _, transport = query.partition("=")
        if scheme == "stun":
            raise IceConfigError(f"{shown!r}: a stun: URL takes no ?transport")
        if key != "transport" or transport not in ("udp", "tcp"):
            raise IceConfigError(f"{shown!r}: the only query is ?transport=udp or ?transport=tcp")
        if scheme == "turns" and transport != "tcp":
            raise IceConfigError(f"{shown!r}: turns: runs over TLS, so its transport is tcp")
    return scheme


def _check_printable(value: str | None, what: str, where: str) -> None:
    # Both go into Link headers and JSON for pages: no control characters (header injection), ASCII.
    if value is not None and not _PRINTABLE.fullmatch(value):
        raise IceConfigError(f"{where}: the {what} must be non-empty printable ASCII")


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server (an RTCIceServer): its URLs and, for TURN, a username and credential."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = field(default=None, repr=False)  # a repr may end up in a log

    def __post_init__(self) -> None:
        if isinstance(self.urls, str) or not self.urls or not all(isinstance(u, str) for u in self.urls):
            raise IceConfigError(f"an ICE server needs a tuple of URLs, got {self.urls!r}")
        where = ", ".join(repr(mask_credentials(u)) for u in self.urls)
        schemes = {check_ice_url(url) for url in self.urls}
        _check_printable(self.username, "username", where)
        _check_printable(self.credential, "credential", where)
        if schemes & {"turn", "turns"}:
            if not self.username or not self.credential:
                raise IceConfigError(
                    f"{where}: a TURN server needs a username and a credential (turn:USER:CREDENTIAL@host:port, "
                    "the JSON form, or turn_urls + turn_secret for coturn's shared secret)"
                )
        elif self.username is not None or self.credential is not None:
            raise IceConfigError(f"{where}: a STUN server takes no username or credential")

    def to_json(self) -> dict[str, Any]:
        """The RTCIceServer dictionary a browser's RTCPeerConnection takes."""
        entry: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None:
            entry.update(username=self.username, credential=self.credential, credentialType="password")
        return entry

    def to_rtc(self) -> RTCIceServer:
        return RTCIceServer(urls=list(self.urls), username=self.username, credential=self.credential)

    def link_headers(self) -> list[str]:
        """One ``Link`` header value per URL (RFC 9725 section 4.6)."""
        values = []
        for url in self.urls:
            value = f'<{url}>; rel="ice-server"'
            if self.username is not None and self.credential is not None:
                value += (f'; username="{_quoted(self.username)}"; credential="{_quoted(self.credential)}"'
                          '; credential-type="password"')
            values.append(value)
        return values


def _quoted(value: str) -> str:
    """The inside of an HTTP quoted-string (RFC 9110 section 5.6.4)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def turn_rest_credentials(secret: str, ttl_s: float, now: float, suffix: str) -> tuple[str, str]:
    """coturn's REST scheme (``use-auth-secret``): the username is ``"<expiry unix time>:<suffix>"``
    and the credential base64(HMAC-SHA1(secret, username)); coturn recomputes it from the shared
    secret and refuses the username once its time has passed."""
    username = f"{int(now + ttl_s)}:{suffix}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class TurnRest:
    """TURN servers sharing a secret with this server (coturn ``--use-auth-secret
    --static-auth-secret=SECRET``): each session gets its own credentials, valid ``ttl_s``."""

    urls: tuple[str, ...]
    secret: str = field(repr=False)
    ttl_s: float = DEFAULT_TURN_TTL_S

    def __post_init__(self) -> None:
        if isinstance(self.urls, str) or not self.urls:
            raise IceConfigError(f"turn_urls must be a tuple of turn: URLs, got {self.urls!r}")
        for url in self.urls:
            try:
                scheme = check_ice_url(url)
            except IceConfigError as exc:
                raise IceConfigError(f"turn_urls: {exc}") from None
            if scheme == "stun":
                raise IceConfigError(f"turn_urls: {url!r} is a STUN server: put it in ice_servers")
        if not self.secret:
            raise IceConfigError("turn_urls (--turn-url, SHELFCAST_TURN_URLS) need turn_secret (SHELFCAST_TURN_SECRET), "
                                 "the secret shared with coturn's --static-auth-secret")
        if not 0 < self.ttl_s < float("inf"):
            raise IceConfigError(f"turn_ttl must be a positive number of seconds, got {self.ttl_s!r}")

    def mint(self, now: float, suffix: str) -> IceServer:
        username, credential = turn_rest_credentials(self.secret, self.ttl_s, now, suffix)
        return IceServer(self.urls, username, credential)


@dataclass(frozen=True)
class IceServers:
    """Every STUN/TURN server of this deployment: fixed ones and, with a shared secret, TURN whose
    credentials are minted for each session (:meth:`mint`: each peer connection, each answer, each
    page's request gets fresh ones)."""

    static: tuple[IceServer, ...] = ()
    rest: TurnRest | None = None

    def mint(self, now: float | None = None) -> tuple[IceServer, ...]:
        if self.rest is None:
            return self.static
        # A random suffix: two sessions in the same second still get different credentials.
        return (*self.static, self.rest.mint(time.time() if now is None else now, secrets.token_hex(8)))


NO_ICE_SERVERS = IceServers()


def parse_ice_servers(text: str, source: str = "ice_servers") -> tuple[IceServer, ...]:
    """A setting's text: a JSON list of RTCIceServer objects, or comma-separated URLs in the
    shorthand ``stun:host:port`` / ``turn:USER:CREDENTIAL@host:port?transport=udp`` (percent-encode
    a ``:`` or ``@`` in the username or credential). ``source`` names the setting in errors."""
    text = text.strip()
    if not text:
        return ()
    if text[0] in "[{":
        return _parse_json(text, source)
    entries = [part.strip() for part in text.split(",")]
    return tuple(parse_ice_url(entry, f"{source} entry {n}") for n, entry in enumerate(entries, 1) if entry)


def parse_ice_url(entry: str, where: str = "ice server") -> IceServer:
    """One URL of the shorthand, credentials (if any) before the ``@``."""
    scheme, colon, rest = entry.partition(":")
    username = credential = None
    url = entry
    if colon and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, sep, cred = userinfo.partition(":")
        if not sep or not user or not cred:
            raise IceConfigError(f"{where}: {mask_credentials(entry)!r}: expected USER:CREDENTIAL before the '@'")
        username, credential, url = unquote(user), unquote(cred), f"{scheme}:{host}"
    try:
        return IceServer((url,), username, credential)
    except IceConfigError as exc:
        raise IceConfigError(f"{where}: {exc}") from None


def _parse_json(text: str, source: str) -> tuple[IceServer, ...]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise IceConfigError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise IceConfigError(f'{source}: expected a JSON list of RTCIceServer objects, like [{{"urls": "stun:host:3478"}}]')
    return tuple(_json_server(entry, f"{source} entry {n}") for n, entry in enumerate(data, 1))


def _json_server(entry: object, where: str) -> IceServer:
    if not isinstance(entry, dict):
        raise IceConfigError(f"{where}: expected an object with urls (and username, credential for TURN)")
    unknown = sorted(set(entry) - set(JSON_KEYS))
    if unknown:
        raise IceConfigError(f"{where}: unknown key {unknown[0]!r} (an RTCIceServer has {', '.join(JSON_KEYS)})")
    urls = entry.get("urls")
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise IceConfigError(f"{where}: 'urls' must be a URL or a non-empty list of URLs")
    for key in ("username", "credential"):
        if key in entry and not isinstance(entry[key], str):
            raise IceConfigError(f"{where}: {key!r} must be a string")
    if entry.get("credentialType", "password") != "password":
        raise IceConfigError(f"{where}: only credentialType 'password' is supported")
    try:
        return IceServer(tuple(urls), entry.get("username"), entry.get("credential"))
    except IceConfigError as exc:
        raise IceConfigError(f"{where}: {exc}") from None


def default_host_addresses(ipv6: bool = False) -> tuple[str, ...]:
    """Non-loopback IPv4 addresses of this machine, else loopback. ``ipv6``: its IPv6 addresses
    other hosts can reach instead (not loopback, not link-local, which needs a zone to be used)."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not ipv6 and isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
            elif ipv6 and isinstance(ip.ip, tuple):
                address = ipaddress.ip_address(ip.ip[0])
                if not (address.is_loopback or address.is_link_local):
                    found.append(str(address))
    return tuple(dict.fromkeys(found)) or (("::1",) if ipv6 else ("127.0.0.1",))


def rtc_configuration(ice_servers: Iterable[IceServer] = ()) -> RTCConfiguration:
    """aiortc uses the first STUN and the first TURN server it can (UDP/TCP, password credentials)."""
    return RTCConfiguration(iceServers=[server.to_rtc() for server in ice_servers])


def announce_host_addresses(pc: RTCPeerConnection, addresses: tuple[str, ...]) -> None:
    """Make every ICE transport of ``pc`` gather exactly ``addresses``.

    Call after setRemoteDescription (which creates the transports) and before
    setLocalDescription (which gathers).
    """
    for connection in ice_connections(pc):
        gather_only(connection, addresses)


def keep_consent_while_receiving(pc: RTCPeerConnection, last_media_at: Callable[[], float]) -> None:
    """Keep an ingest whose media keeps arriving although its peer stops answering consent checks
    (FFmpeg's WHIP muxer). Call where announce_host_addresses is called."""
    for connection in ice_connections(pc):
        consent_while_receiving(connection, last_media_at)


def ice_connections(pc: RTCPeerConnection) -> list[Connection]:
    """The aioice connections of ``pc``'s transports (one when bundled)."""
    transports = [t.sender.transport for t in pc.getTransceivers() if t.sender.transport]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    found: list[Connection] = []
    for dtls in transports:
        ice = getattr(dtls, "transport", None)  # absent on a rejected or half-built m-line
        if ice is not None and ice_connection(ice) not in found:
            found.append(ice_connection(ice))
    return found
