"""``shelfcast serve`` / ``shelfcast demo``: build one Config, then run()."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import ssl
import sys
from typing import TYPE_CHECKING
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web

from . import logs
from . import tls
from .app import create_app, reachable_addresses
from relay.ice import IceConfigError, IceServer, parse_ice_servers

from .config import (EGRESS_PATHS, WILDCARD_HOSTS, Config, RateLimit, config_from_env, parse_proxy_networks,
                     parse_rate_limit, parse_seconds)
from .demo import DEMO_SKUS, REGION, DemoShop, run_demo_shop
from .health import mark_shutting_down
from .keys import CONFIG, PLACEMENT, ROOMS
from .proxy import ClientAccessLogger
from .workers import default_workers, supervise

if TYPE_CHECKING:
    from relay.client import WebRtcClient

log = logging.getLogger("shelfcast")


def _rate_limit(text: str) -> RateLimit:
    try:
        return parse_rate_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ice_servers(text: str) -> tuple[IceServer, ...]:
    try:
        return parse_ice_servers(text, "--ice-server")
    except IceConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        return parse_seconds(text, "--turn-ttl")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> tuple[str, Config]:
    defaults = Config()
    parser = argparse.ArgumentParser(prog="shelfcast", description="Live-commerce media server")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the server and print the links of a ready room"),
        ("demo", "like serve, plus a synthetic host (test pattern + tone) live in the ready room"),
    ):
        # Unset flags stay None: the Config (and the environment on top of it) holds every default.
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--host", help=f"address to listen on (default {defaults.host})")
        p.add_argument("--port", type=int, help=f"port to listen on (default {defaults.port})")
        p.add_argument("--data-dir", type=Path, help=f"where state is kept (default {defaults.data_dir})")
        p.add_argument(
            "--ice-host",
            action="append",
            default=[],
            help="host candidate address to announce (repeatable; default: this machine's interfaces)",
        )
        p.add_argument("--public-url", help="base URL of printed and API links, e.g. https://shop.example.com "
                       "(default: http(s)://host:port; a wildcard host: this machine's first reachable address)")
        p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate chain (e.g. Let's Encrypt's "
                       "fullchain.pem); needs --tls-key. Browsers allow the camera only on HTTPS (or localhost)")
        p.add_argument("--tls-key", type=Path, help="the certificate's PEM private key (e.g. privkey.pem), unencrypted")
        p.add_argument("--trusted-proxy", action="append", default=[], metavar="IP_OR_CIDR",
                       help="a reverse proxy whose X-Forwarded-For/-Proto/-Host headers are believed (repeatable, "
                       "or comma-separated); nobody else's are")
        p.add_argument("--ice-server", type=_ice_servers, action="append", default=[],
                       help="STUN/TURN server for the server and the pages (repeatable): stun:host:port, "
                       "turn:USER:CREDENTIAL@host:port?transport=udp, or a JSON list of RTCIceServer objects "
                       "(default: SHELFCAST_ICE_SERVERS, else none)")
        p.add_argument("--turn-url", action="append", default=[],
                       help="TURN server sharing SHELFCAST_TURN_SECRET with this server (coturn --use-auth-secret): "
                       "credentials are minted per session (repeatable; default: SHELFCAST_TURN_URLS)")
        p.add_argument("--turn-ttl", type=_seconds, help=f"seconds minted TURN credentials stay valid "
                       f"(default {defaults.turn_ttl_s:g})")
        p.add_argument("--join-limit", type=_rate_limit, help="WHIP/WHEP joins per client address: PER_MINUTE[/BURST], 0 = off "
                       f"(default {_limit_text(defaults.join_limit)})")
        p.add_argument("--order-limit", type=_rate_limit, help="orders per client address: PER_MINUTE[/BURST], 0 = off "
                       f"(default {_limit_text(defaults.order_limit)})")
        p.add_argument("--redis", help="Redis URL: several processes share rooms, stock and events (default: none)")
        p.add_argument("--node-url", help="URL other nodes reach this one at (default: the base URL of links)")
        p.add_argument("--workers", type=int, help="worker processes behind the port (default: cores with --redis, else 1)")
        p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
        p.add_argument("--egress", choices=EGRESS_PATHS, help="how packets leave: native (packetized once per "
                       "rung, the default) or aiortc (each viewer's own sender: the old path, for comparison)")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        p.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line (room, session fields)")
    args = parser.parse_args(argv)
    try:
        config = config_from_env(defaults)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        proxies = parse_proxy_networks(args.trusted_proxy) if args.trusted_proxy else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.egress is not None:
        config = replace(config, media=replace(config.media, egress=args.egress))
    flags = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "ice_hosts": tuple(args.ice_host) or None,
        "public_url": args.public_url,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "trusted_proxies": proxies,
        "redis_url": args.redis,
        "node_url": args.node_url,
        "worker": args.worker,
        "join_limit": args.join_limit,
        "order_limit": args.order_limit,
        "log_json": args.log_json,
        "ice_servers": tuple(s for given in args.ice_server for s in given) or None,
        "turn_urls": tuple(args.turn_url) or None,
        "turn_ttl_s": args.turn_ttl,
    }
    try:
        config = replace(config, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as exc:  # IceConfigError: a bad --turn-url, a TURN URL without its secret
        parser.error(str(exc))
    if config.turn_secret and not config.turn_urls:
        parser.error("SHELFCAST_TURN_SECRET is set but there is no TURN server to use it: add --turn-url or SHELFCAST_TURN_URLS")
    workers = args.workers if args.workers is not None else (default_workers() if config.redis_url else 1)
    if workers < 1:
        parser.error("--workers must be at least 1")
    if workers > 1 and not config.redis_url:
        parser.error("several workers share rooms, stock and events through Redis: add --redis URL")
    config = replace(config, workers=workers)
    try:
        config.check()
    except ValueError as exc:
        parser.error(str(exc))
    logs.configure(verbose=args.verbose, json_lines=config.log_json)
    return args.command, config


def _limit_text(limit: RateLimit) -> str:
    return f"{limit.per_minute:g}/{limit.burst}" if limit.enabled else "0"


def _private_socket() -> socket.socket:
    """A worker's own loopback port: how the other workers reach it (pulls, forwarded requests)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def server_ssl(config: Config) -> ssl.SSLContext | None:
    """The HTTPS context of ``config`` (None: plain HTTP); tls.TlsError says what is wrong."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    return tls.server_context(config.tls_cert, config.tls_key)


def _local_client(config: Config) -> tuple[str, bool]:
    """How this process reaches its own port (the demo's host and shop): the listening address,
    TLS unverified (the certificate names the public host, not this address). (base, verify)."""
    return config.url_for(config.local_host), not config.tls


def reachable_urls(config: Config) -> list[str]:
    """The base URLs to print: the public URL first, then every other address the server answers on."""
    urls = [config.base_url]
    if config.host in WILDCARD_HOSTS:
        urls += [config.url_for(a) for a in reachable_addresses(config)]
    return list(dict.fromkeys(urls))


async def serve(config: Config, *, demo: bool, ssl_context: ssl.SSLContext | None = None) -> None:
    key_generated = not config.admin_key
    private = _private_socket() if config.worker >= 0 else None
    if private is not None and not config.node_url:
        config = replace(config, node_url=f"http://127.0.0.1:{private.getsockname()[1]}")
    app = create_app(config)
    config = app[CONFIG]  # with the generated admin key, if there was none
    runner = web.AppRunner(app, handle_signals=False, access_log_class=ClientAccessLogger)
    await runner.setup()
    # Workers share the public port; the kernel spreads connections over them.
    await web.TCPSite(runner, config.host, config.port, reuse_port=private is not None, ssl_context=ssl_context).start()
    if private is not None:
        await web.SockSite(runner, private).start()  # other workers only, on loopback: plain HTTP
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Always handled (never the default, which ends the process): a supervisor passes it on to every worker.
    loop.add_signal_handler(signal.SIGHUP, _reload_tls, config, ssl_context)
    if config.worker > 0:  # the first worker prints the links and runs the demo; the others serve
        try:
            await stop.wait()
        finally:
            mark_shutting_down(app)  # /readyz: 503 before the listening socket closes
            await runner.cleanup()
        return

    local_base, verify = _local_client(config)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=verify))
    shop: DemoShop | None = None
    if demo:
        shop = DemoShop(http, local_base, config.admin_key, "demo")
        await shop.seed()  # stock first, so the room's sell-through baseline is the seeded stock
    registry = app[ROOMS]
    # A restart brings the saved rooms back: reuse one rather than piling up a new room per start.
    existing = registry.get("demo") if demo else next((r for r in registry if not r.closed and r.mode == "show"), None)
    room = existing or registry.create(
        "show",
        "shelfcast demo" if demo else "My show",
        region=REGION if demo else "",
        sku_ids=DEMO_SKUS if demo else (),
        room_id="demo" if demo else None,
    )
    if existing is None and PLACEMENT in app:
        await app[PLACEMENT].share(room)
    tokens = registry.tokens(room)
    links = registry.links(room, tokens)
    first, *others = reachable_urls(config)
    print(f"shelfcast listening on {first}" + (f" (also {', '.join(others)})" if others else ""), flush=True)
    if key_generated:
        print(f"  admin key (generated; set SHELFCAST_ADMIN_KEY to fix it): {config.admin_key}")
    print(f"  studio (host):  {links['studio']}")
    print(f"  watch (viewer): {links['watch']}")
    print(f"  WHIP ingest:    {links['whip']}   (Bearer {tokens['host']})")
    print(f"  WHEP playback:  {links['whep']}", flush=True)

    publisher: WebRtcClient | None = None
    buyers: asyncio.Task[None] | None = None
    try:
        if shop is not None:
            # The demo's synthetic host is a WHIP client like any encoder: only `demo` loads it.
            from relay.client import whip_publish
            from relay.synthetic import PatternTrack, ToneTrack

            publisher = await whip_publish(
                http, f"{local_base}/whip/{room.id}", tokens["host"], [PatternTrack(1280, 720, "shelfcast demo"), ToneTrack()]
            )
            buyers = asyncio.create_task(run_demo_shop(shop))
            print("  synthetic host is live and demo buyers are shopping: open the watch link", flush=True)
        await stop.wait()
    finally:
        log.info("shutting down")
        mark_shutting_down(app)  # /readyz: 503 before the listening socket closes
        if buyers is not None:
            buyers.cancel()
            await asyncio.gather(buyers, return_exceptions=True)
        if publisher is not None:
            await publisher.close()
        await http.close()
        await runner.cleanup()


def _reload_tls(config: Config, context: ssl.SSLContext | None) -> None:
    """SIGHUP: take a renewed certificate (certbot's deploy hook) without dropping anyone."""
    if context is None or config.tls_cert is None or config.tls_key is None:
        log.info("SIGHUP: no TLS certificate to reload")
        return
    try:
        tls.load(context, config.tls_cert, config.tls_key)
    except tls.TlsError as exc:
        log.error("TLS certificate not reloaded (still serving the previous one): %s", exc)
    else:
        log.info("TLS certificate reloaded from %s", config.tls_cert)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, config = parse_args(argv)
    try:
        ssl_context = server_ssl(config)  # before any worker starts: one clear message, not one per worker
    except tls.TlsError as exc:
        print(f"shelfcast: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1 and config.worker < 0:
        return supervise(argv, config.workers)
    try:
        asyncio.run(serve(config, demo=command == "demo", ssl_context=ssl_context))
    except OSError as exc:
        print(f"shelfcast: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
