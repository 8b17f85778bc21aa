"""One typed configuration for the whole server; the CLI and env vars map onto it."""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from overlay.stock.config import StockConfig
from relay.abr import AUDIO_BITRATE, DEFAULT_LADDER, Rung
from relay.ice import DEFAULT_TURN_TTL_S, IceConfigError, IceServer, IceServers, TurnRest, parse_ice_servers
from relay.keyframes import KEYFRAME_MIN_INTERVAL_S
from relay.sessions import VIEWER_TIMEOUT_S


EGRESS_PATHS = ("native", "aiortc")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")

ProxyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_proxy_networks(items: tuple[str, ...] | list[str]) -> tuple[ProxyNetwork, ...]:
    """``"10.0.0.5"``, ``"10.0.0.0/8"``, ``"::1"``; each item may itself be a comma-separated list."""
    networks: list[ProxyNetwork] = []
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"trusted proxy {part!r}: expected an IP address or a CIDR such as 10.0.0.0/8") from None
    return tuple(networks)


def url_host(address: str) -> str:
    """An address as the host part of a URL (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


@dataclass(frozen=True)
class MediaConfig:
    """Settings of the media path."""

    # The encoder ladder (name, size, video bits/s); rungs taller than the source are skipped.
    ladder: tuple[Rung, ...] = DEFAULT_LADDER
    abr: bool = True  # False: every viewer stays on the top rung
    viewer_timeout_s: float = VIEWER_TIMEOUT_S  # a viewer that sends no RTCP this long has vanished: release it
    keyframe_min_interval_s: float = KEYFRAME_MIN_INTERVAL_S  # coalesce forced keyframes to at most this often
    slate_fps: float = 5.0  # frame rate of the "host offline" picture
    slate_size: tuple[int, int] = (640, 360)
    audio_bitrate: int = AUDIO_BITRATE
    egress: str = "native"  # "aiortc": the previous per-viewer aiortc senders (a baseline for benchmarks)
    # Media nothing is drawn on (a call's buyer, the PK host feed) goes out as it arrives (relay.forward);
    # False decodes and re-encodes it as before (a baseline for benchmarks; SHELFCAST_FORWARD=0).
    forward: bool = True
    # A process short of CPU holds every viewer's rung and sends new viewers elsewhere (relay.load).
    shed_load: bool = True


@dataclass(frozen=True)
class RateLimit:
    """``per_minute`` sustained, ``burst`` at once, per client address; 0 turns the limit off."""

    per_minute: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0 and self.burst > 0


NO_LIMIT = RateLimit(0, 0)


def parse_rate_limit(text: str) -> RateLimit:
    """``"60/30"``: 60 per minute with bursts of 30; ``"60"``: burst = per minute; ``"0"``: off."""
    per_minute, _, burst = text.strip().partition("/")
    try:
        rate = float(per_minute)
        size = int(burst) if burst else max(1, int(rate))
    except ValueError:
        raise ValueError(f"rate limit {text!r}: expected PER_MINUTE[/BURST], e.g. 60/30, or 0 for none") from None
    if rate < 0 or size < 0:
        raise ValueError(f"rate limit {text!r}: must not be negative")
    return NO_LIMIT if rate == 0 else RateLimit(rate, size)


def parse_seconds(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r}: expected a number of seconds") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} {text!r}: must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("shelfcast-data")
    admin_key: str = ""  # empty: generated at start and printed
    feed_key: str = ""  # optional second key that may only post stock feeds
    # Base of printed and API links; default scheme://host:port (https with TLS; a wildcard host
    # becomes this machine's first reachable address, see create_app).
    public_url: str = ""
    tls_cert: Path | None = None  # PEM certificate chain (fullchain.pem); serve HTTPS with tls_key
    tls_key: Path | None = None  # PEM private key (privkey.pem)
    # TCP peers whose X-Forwarded-For/-Proto/-Host are believed (a reverse proxy in front); nobody else's.
    trusted_proxies: tuple[ProxyNetwork, ...] = ()
    ice_hosts: tuple[str, ...] = ()  # announced host candidates; empty: machine's interfaces
    # STUN/TURN for the server's peer connections and for clients (pages, Link headers of WHIP/WHEP
    # answers); none unless configured. Fixed servers here, coturn's shared-secret TURN below.
    ice_servers: tuple[IceServer, ...] = ()
    turn_urls: tuple[str, ...] = ()  # TURN servers whose credentials are minted per session from turn_secret
    turn_secret: str = field(default="", repr=False)  # coturn's static-auth-secret (--use-auth-secret)
    turn_ttl_s: float = DEFAULT_TURN_TTL_S  # how long minted TURN credentials stay valid
    max_sdp_bytes: int = 64 * 1024
    max_viewers_per_room: int = 500
    # A person joins a show a few times a minute at most; a page reconnecting after a restart or a
    # household behind one address still fits in the burst. Orders: a buyer taps Buy, not 100x/min.
    join_limit: RateLimit = RateLimit(per_minute=60, burst=30)
    order_limit: RateLimit = RateLimit(per_minute=60, burst=20)
    token_ttl_s: float = 7 * 24 * 3600.0
    # Several processes (workers, nodes) share rooms, stock and events through this Redis; empty:
    # one process on its own data directory (SQLite), as always.
    redis_url: str = ""
    node_url: str = ""  # how other nodes reach this one (cascade, forwarding); default: base_url
    workers: int = 1  # processes behind the public port (several need redis_url)
    worker: int = -1  # this process's index under a supervisor (-1: not a worker)
    log_json: bool = False  # one JSON object per log line instead of text
    stock: StockConfig = field(default_factory=StockConfig)
    media: MediaConfig = field(default_factory=MediaConfig)

    def __post_init__(self) -> None:
        # A bad ICE setting is refused here, when the server starts, not by every offer later.
        if any(not isinstance(server, IceServer) for server in self.ice_servers):
            raise IceConfigError("ice_servers must hold IceServer entries (relay.ice.parse_ice_servers reads text)")
        if self.turn_urls:
            TurnRest(self.turn_urls, self.turn_secret, self.turn_ttl_s)  # raises IceConfigError on a bad one

    @property
    def ice(self) -> IceServers:
        """Every STUN/TURN server, with per-session credentials for the shared-secret ones."""
        rest = TurnRest(self.turn_urls, self.turn_secret, self.turn_ttl_s) if self.turn_urls else None
        return IceServers(self.ice_servers, rest)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return self.url_for(self.local_host if self.host in WILDCARD_HOSTS else self.host)

    @property
    def local_host(self) -> str:
        """Where a client on this machine reaches the listening socket (a wildcard listens on loopback too)."""
        if self.host == "::":
            return "::1"
        return "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host

    def url_for(self, address: str) -> str:
        return f"{self.scheme}://{url_host(address)}:{self.port}"

    def with_reachable_url(self, addresses: tuple[str, ...]) -> "Config":
        """Listening on every interface without a public URL: links name the first of ``addresses``
        (this machine's reachable ones), never loopback, which is nobody else's machine."""
        if self.public_url or self.host not in WILDCARD_HOSTS or not addresses:
            return self
        return replace(self, public_url=self.url_for(addresses[0]))

    def check(self) -> None:
        """Settings that only make sense together; ValueError says what to change."""
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("--tls-cert", "--tls-key") if self.tls_cert is not None else ("--tls-key", "--tls-cert")
            raise ValueError(f"{given} needs {missing} too (SHELFCAST_TLS_CERT / SHELFCAST_TLS_KEY): "
                             "HTTPS needs both the certificate and its private key")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ValueError(f"public URL {self.public_url!r} must start with http:// or https://")

    def with_generated_secrets(self) -> "Config":
        """Fill in an admin key when none was given (printed by the CLI)."""
        if self.admin_key:
            return self
        return replace(self, admin_key=secrets.token_urlsafe(24))


def config_from_env(base: Config | None = None, env: dict[str, str] | None = None) -> Config:
    """Apply SHELFCAST_* environment variables onto a config."""
    env = dict(os.environ if env is None else env)
    cfg = base or Config()
    changes: dict[str, object] = {}
    if env.get("SHELFCAST_ADMIN_KEY"):
        changes["admin_key"] = env["SHELFCAST_ADMIN_KEY"]
    if env.get("SHELFCAST_FEED_KEY"):
        changes["feed_key"] = env["SHELFCAST_FEED_KEY"]
    if env.get("SHELFCAST_ICE_HOSTS"):
        changes["ice_hosts"] = tuple(h.strip() for h in env["SHELFCAST_ICE_HOSTS"].split(",") if h.strip())
    if env.get("SHELFCAST_ICE_SERVERS"):  # a JSON list of RTCIceServer objects, or comma-separated URLs
        changes["ice_servers"] = parse_ice_servers(env["SHELFCAST_ICE_SERVERS"], "SHELFCAST_ICE_SERVERS")
    if env.get("SHELFCAST_TURN_URLS"):
        changes["turn_urls"] = tuple(u.strip() for u in env["SHELFCAST_TURN_URLS"].split(",") if u.strip())
    if env.get("SHELFCAST_TURN_SECRET"):
        changes["turn_secret"] = env["SHELFCAST_TURN_SECRET"]
    if env.get("SHELFCAST_TURN_TTL"):
        changes["turn_ttl_s"] = parse_seconds(env["SHELFCAST_TURN_TTL"], "SHELFCAST_TURN_TTL")
    if env.get("SHELFCAST_DATA_DIR"):
        changes["data_dir"] = Path(env["SHELFCAST_DATA_DIR"])
    for name, key in (("SHELFCAST_JOIN_LIMIT", "join_limit"), ("SHELFCAST_ORDER_LIMIT", "order_limit")):
        if env.get(name):
            changes[key] = parse_rate_limit(env[name])
    if env.get("SHELFCAST_REDIS_URL"):
        changes["redis_url"] = env["SHELFCAST_REDIS_URL"]
    if env.get("SHELFCAST_PUBLIC_URL"):
        changes["public_url"] = env["SHELFCAST_PUBLIC_URL"]
    for name, key in (("SHELFCAST_TLS_CERT", "tls_cert"), ("SHELFCAST_TLS_KEY", "tls_key")):
        if env.get(name):
            changes[key] = Path(env[name])
    if env.get("SHELFCAST_TRUSTED_PROXIES"):
        changes["trusted_proxies"] = parse_proxy_networks([env["SHELFCAST_TRUSTED_PROXIES"]])
    stock: dict[str, object] = {}
    if env.get("SHELFCAST_STOCK_SNAPSHOT_EVERY"):
        stock["snapshot_every"] = int(env["SHELFCAST_STOCK_SNAPSHOT_EVERY"])
    if env.get("SHELFCAST_STOCK_SNAPSHOT_EVERY_S"):
        stock["snapshot_every_s"] = float(env["SHELFCAST_STOCK_SNAPSHOT_EVERY_S"])
    if stock:
        changes["stock"] = replace(cfg.stock, **stock)  # type: ignore[arg-type]
    media = cfg.media
    if env.get("SHELFCAST_EGRESS"):
        if env["SHELFCAST_EGRESS"] not in EGRESS_PATHS:
            raise ValueError(f"SHELFCAST_EGRESS must be one of {', '.join(EGRESS_PATHS)}")
        media = replace(media, egress=env["SHELFCAST_EGRESS"])
    if env.get("SHELFCAST_FORWARD"):
        if env["SHELFCAST_FORWARD"] not in ("0", "1"):
            raise ValueError("SHELFCAST_FORWARD must be 0 or 1")
        media = replace(media, forward=env["SHELFCAST_FORWARD"] == "1")
    if media is not cfg.media:
        changes["media"] = media
    if env.get("SHELFCAST_LOG_FORMAT"):
        changes["log_json"] = env["SHELFCAST_LOG_FORMAT"].strip().lower() == "json"
    return replace(cfg, **changes)  # type: ignore[arg-type]
