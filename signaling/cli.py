"""``shelfcast serve`` / ``shelfcast demo``: build one Config, then run()."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from typing import TYPE_CHECKING
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web

from . import logs
from .app import create_app
from relay.ice import IceConfigError, IceServer, parse_ice_servers

from .config import EGRESS_PATHS, Config, RateLimit, config_from_env, parse_rate_limit, parse_seconds
from .demo import DEMO_SKUS, REGION, DemoShop, run_demo_shop
from .keys import CONFIG, PLACEMENT, ROOMS
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
        p.add_argument("--public-url", help="base URL used in printed links")
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
        p.add_argument("--node-url", help="URL other nodes reach this one at (default: http://host:port)")
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
    if args.egress is not None:
        config = replace(config, media=replace(config.media, egress=args.egress))
    flags = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "ice_hosts": tuple(args.ice_host) or None,
        "public_url": args.public_url,
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
    logs.configure(verbose=args.verbose, json_lines=config.log_json)
    return args.command, config


def _limit_text(limit: RateLimit) -> str:
    return f"{limit.per_minute:g}/{limit.burst}" if limit.enabled else "0"


def _private_socket() -> socket.socket:
    """A worker's own loopback port: how the other workers reach it (pulls, forwarded requests)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve(config: Config, *, demo: bool) -> None:
    key_generated = not config.admin_key
    private = _private_socket() if config.worker >= 0 else None
    if private is not None and not config.node_url:
        config = replace(config, node_url=f"http://127.0.0.1:{private.getsockname()[1]}")
    app = create_app(config)
    config = app[CONFIG]  # with the generated admin key, if there was none
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    # Workers share the public port; the kernel spreads connections over them.
    await web.TCPSite(runner, config.host, config.port, reuse_port=private is not None).start()
    if private is not None:
        await web.SockSite(runner, private).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config.worker > 0:  # the first worker prints the links and runs the demo; the others serve
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        return

    http = aiohttp.ClientSession()
    local_base = f"http://127.0.0.1:{config.port}"
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
    print(f"shelfcast listening on {config.base_url}", flush=True)
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
        if buyers is not None:
            buyers.cancel()
            await asyncio.gather(buyers, return_exceptions=True)
        if publisher is not None:
            await publisher.close()
        await http.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, config = parse_args(argv)
    if config.workers > 1 and config.worker < 0:
        return supervise(argv, config.workers)
    try:
        asyncio.run(serve(config, demo=command == "demo"))
    except OSError as exc:
        print(f"shelfcast: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
