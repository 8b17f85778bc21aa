"""STUN/TURN servers: one typed setting in two forms checked at start-up, coturn REST credentials
minted per session, the same servers in the server's peer connections, the answers' Link headers and
the pages; a real coturn relaying a Chromium viewer that may use relayed candidates only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Route

from relay.client import WebRtcClient, whep_play, whip_publish
from relay.ice import IceConfigError, IceServer, IceServers, TurnRest, parse_ice_servers, rtc_configuration, turn_rest_credentials
from relay.synthetic import PatternTrack
from signaling.config import Config, config_from_env

from .conftest import FrameCollector, RunningServer, start_server, until
from .test_browser import frames_decoded
from tests.tools.coturn import Coturn

LINK = re.compile(r'<(?P<url>[^>]+)>; rel="ice-server"'
                  r'(?:; username="(?P<username>[^"]*)"; credential="(?P<credential>[^"]*)"; credential-type="password")?')


# -- the setting ------------------------------------------------------------------------------------

def test_rest_credentials_exact_value() -> None:
    # The same as `printf %s 1700003600:alice | openssl dgst -sha1 -hmac SECRET -binary | base64`.
    assert turn_rest_credentials("s3cret-shared-with-coturn", 3600, 1_700_000_000.9, "alice") == (
        "1700003600:alice", "8XE7buAVZvZjXD89kItpV2/McBY=")
    rest = TurnRest(("turn:turn.example:3478?transport=udp", "turns:turn.example:5349"), "s3cret-shared-with-coturn")
    minted = rest.mint(1_700_000_000.9, "alice")
    assert minted == IceServer(rest.urls, "1700003600:alice", "8XE7buAVZvZjXD89kItpV2/McBY=")
    servers = IceServers((IceServer(("stun:stun.example:3478",)),), rest)
    first, second = servers.mint(), servers.mint()
    assert first[0] == second[0] == IceServer(("stun:stun.example:3478",))
    assert first[1].username != second[1].username  # fresh for every session, also within one second


def test_both_forms_give_the_same_servers() -> None:
    shorthand = "stun:stun.example:3478, turn:alice:p%40ss%3Aword@turn.example:3478?transport=udp,turns:bob:pw@turn.example"
    as_json = json.dumps([
        {"urls": "stun:stun.example:3478"},
        {"urls": ["turn:turn.example:3478?transport=udp"], "username": "alice", "credential": "p@ss:word"},
        {"urls": "turns:turn.example", "username": "bob", "credential": "pw", "credentialType": "password"},
    ])
    expected = (
        IceServer(("stun:stun.example:3478",)),
        IceServer(("turn:turn.example:3478?transport=udp",), "alice", "p@ss:word"),
        IceServer(("turns:turn.example",), "bob", "pw"),
    )
    assert parse_ice_servers(shorthand) == parse_ice_servers(as_json) == expected
    # The env var takes both forms, and bare STUN URLs as before.
    for text in (shorthand, as_json):
        assert config_from_env(Config(), {"SHELFCAST_ICE_SERVERS": text}).ice_servers == expected
    assert config_from_env(Config(), {"SHELFCAST_ICE_SERVERS": "stun:a:3478,stun:b"}).ice_servers == (
        IceServer(("stun:a:3478",)), IceServer(("stun:b",)))
    env = {"SHELFCAST_TURN_URLS": "turn:t:3478, turn:t:3478?transport=tcp", "SHELFCAST_TURN_SECRET": "s", "SHELFCAST_TURN_TTL": "600"}
    config = config_from_env(Config(), env)
    assert (config.turn_urls, config.turn_secret, config.turn_ttl_s) == (("turn:t:3478", "turn:t:3478?transport=tcp"), "s", 600.0)
    minted = config.ice.mint(now=1000.0)[0]
    assert minted.username is not None and minted.username.startswith("1600:")
    assert "'s'" not in repr(config) and "credential=" not in repr(minted)  # a repr may reach a log
    # What the browser gets, and what aiortc gets, from one entry.
    assert expected[1].to_json() == {"urls": ["turn:turn.example:3478?transport=udp"], "username": "alice",
                                     "credential": "p@ss:word", "credentialType": "password"}
    [rtc] = rtc_configuration(expected[1:2]).iceServers
    assert (rtc.urls, rtc.username, rtc.credential) == (["turn:turn.example:3478?transport=udp"], "alice", "p@ss:word")
    assert IceServer(("turn:h",), 'a"b', "c\\d").link_headers() == [
        '<turn:h>; rel="ice-server"; username="a\\"b"; credential="c\\\\d"; credential-type="password"']


BAD_SETTINGS = [
    ("http://turn.example:3478", "entry 1: 'http://turn.example:3478': scheme 'http' is not stun, turn or turns"),
    ("stun:ok, TURN:u:c@h", "entry 2: 'TURN:h': scheme 'TURN' is not stun, turn or turns"),
    ("turn:turn.example:3478", "entry 1: 'turn:turn.example:3478': a TURN server needs a username and a credential"),
    ("turn:alice@turn.example", "entry 1: 'turn:alice:***@turn.example': expected USER:CREDENTIAL before the '@'"),
    ('[{"urls": "turn:h"}]', "entry 1: 'turn:h': a TURN server needs a username and a credential"),
    ("[{oops", "SHELFCAST_ICE_SERVERS: not valid JSON"),
    ('{"urls": "stun:h"}', "expected a JSON list of RTCIceServer objects"),
    ('[{"urls": "turn:h", "username": "u", "password": "p"}]', "entry 1: unknown key 'password'"),
    ('[{"urls": []}]', "entry 1: 'urls' must be a URL or a non-empty list of URLs"),
    ('[{"urls": "turn:h", "username": "u", "credential": 5}]', "entry 1: 'credential' must be a string"),
    ('[{"urls": "turn:h", "username": "u", "credential": "c", "credentialType": "oauth"}]', "only credentialType 'password'"),
    ('[{"urls": "turn:u:c@h"}]', "'turn:u:***@h': credentials do not go inside the URL here"),
    ("turn:u:c@", "entry 1: 'turn:': missing host"),
    ("stun:", "entry 1: 'stun:': missing host"),
    ("stun::3478", "entry 1: 'stun::3478': missing host"),
    ("stun://stun.example", "write stun:host:port, without '//'"),
    ("stun:h:99999", "port '99999' is not a number from 1 to 65535"),
    ("stun:h?transport=udp", "a stun: URL takes no ?transport"),
    ("turn:u:c@h?transport=sctp", "the only query is ?transport=udp or ?transport=tcp"),
    ("turns:u:c@h?transport=udp", "turns: runs over TLS, so its transport is tcp"),
    ("turn:u:c@[::1]:3478", "IPv6 literals are not supported"),
    ("stun:u:c@h", "a STUN server takes no username or credential"),
    ('[{"urls": "turn:h", "username": "u", "credential": "line\\r\\nInjected: 1"}]', "the credential must be non-empty printable ASCII"),
]


@pytest.mark.parametrize("text, message", BAD_SETTINGS)
def test_each_bad_setting_is_refused_with_its_message(text: str, message: str) -> None:
    with pytest.raises(IceConfigError) as refused:
        config_from_env(Config(), {"SHELFCAST_ICE_SERVERS": text})
    assert message in str(refused.value)
    assert str(refused.value).startswith("SHELFCAST_ICE_SERVERS")
    assert "c@" not in str(refused.value) and "p%40" not in str(refused.value)  # credentials masked


@pytest.mark.parametrize("changes, message", [
    ({"ice_servers": ("stun:h",)}, "ice_servers must hold IceServer entries"),
    ({"turn_urls": ("turn:h:3478",)}, "need turn_secret (SHELFCAST_TURN_SECRET)"),
    ({"turn_urls": ("stun:h:3478",), "turn_secret": "s"}, "turn_urls: 'stun:h:3478' is a STUN server"),
    ({"turn_urls": ("turn:u:c@h",), "turn_secret": "s"}, "turn_urls: 'turn:u:***@h': credentials do not go inside the URL"),
    ({"turn_urls": ("turn:",), "turn_secret": "s"}, "turn_urls: 'turn:': missing host"),
    ({"turn_urls": ("turn:h",), "turn_secret": "s", "turn_ttl_s": 0.0}, "turn_ttl must be a positive number of seconds"),
])
def test_config_construction_refuses_a_bad_ice_setting(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(IceConfigError) as refused:
        Config(**changes)
    assert message in str(refused.value)
    with pytest.raises(IceConfigError):
        IceServer(("turn:h",))  # and the entry type itself: no TURN without credentials


@pytest.mark.parametrize("args, env, message", [
    (["--ice-server", "turn:turn.example:3478"], {}, "a TURN server needs a username and a credential"),
    ([], {"SHELFCAST_ICE_SERVERS": '[{"urls": "turn:h"'}, "SHELFCAST_ICE_SERVERS: not valid JSON"),
    (["--turn-url", "turn:h:3478"], {}, "need turn_secret (SHELFCAST_TURN_SECRET)"),
    ([], {"SHELFCAST_TURN_SECRET": "s"}, "SHELFCAST_TURN_SECRET is set but there is no TURN server to use it"),
    (["--turn-url", "turn:h", "--turn-ttl", "-5"], {"SHELFCAST_TURN_SECRET": "s"}, "must be a positive number of seconds"),
])
def test_the_cli_refuses_a_bad_ice_setting(args: list[str], env: dict[str, str], message: str) -> None:
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SHELFCAST_")}
    done = subprocess.run([sys.executable, "-m", "signaling.cli", "serve", "--port", "1", *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "listening" not in done.stdout  # refused before it served anything


# -- the servers reach the server's peer connections, the answers and the pages ------------------

@pytest.fixture
async def turn_server(config: Config, coturn: Coturn) -> AsyncIterator[RunningServer]:
    """shelfcast with coturn's REST scheme and a STUN server (coturn answers STUN too), loopback only."""
    runner, app = await start_server(replace(
        config, ice_hosts=("127.0.0.1",), ice_servers=(IceServer((f"stun:127.0.0.1:{coturn.port}",)),),
        turn_urls=(coturn.url,), turn_secret=coturn.secret, turn_ttl_s=600.0,
    ))
    async with aiohttp.ClientSession() as http:
        yield RunningServer(app, config.base_url, http)
    await runner.cleanup()


def check_minted(entries: list[dict[str, str | None]], coturn: Coturn, before: float, after: float) -> str:
    """The STUN entry as configured, and the TURN entry with credentials coturn accepts: returns its username."""
    [stun] = [e for e in entries if e["url"] == f"stun:127.0.0.1:{coturn.port}"]
    assert stun["username"] is None
    [turn] = [e for e in entries if e["url"] == coturn.url]
    username, credential = turn["username"], turn["credential"]
    assert username is not None and credential is not None
    expiry, _, suffix = username.partition(":")
    assert int(before + 600) <= int(expiry) <= int(after + 600) and re.fullmatch(r"[0-9a-f]{16}", suffix)
    assert credential == base64.b64encode(hmac.new(coturn.secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username


def link_entries(client: WebRtcClient) -> list[dict[str, str | None]]:
    entries = []
    for value in client.links:
        match = LINK.fullmatch(value)
        assert match is not None, value
        entries.append(match.groupdict())
    return entries


def allocations(coturn: Coturn) -> set[str]:
    """The usernames of the TURN allocations coturn granted."""
    return set(re.findall(r"user <([^>]*)>: incoming packet ALLOCATE processed, success", coturn.log()))


def relay_candidates(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line.startswith("a=candidate:") and " typ relay" in line]


async def test_answers_carry_fresh_turn_credentials_the_server_uses_too(
    turn_server: RunningServer, coturn: Coturn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    room = await turn_server.create_room()
    before = time.time()
    pub = await whip_publish(turn_server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    collector = FrameCollector()
    viewer = await whep_play(turn_server.http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))
    try:
        await collector.wait_for("video", 5)
        after = time.time()
        names = [check_minted(link_entries(client), coturn, before, after) for client in (pub, viewer)]
        assert len(set(names)) == 2  # each session its own
        for client in (pub, viewer):
            # The server's own peer connection allocated a relay on coturn with its session's credentials.
            assert relay_candidates(client.pc.remoteDescription.sdp)
        await until(lambda: set(names) <= allocations(coturn), 10)  # coturn took the minted credentials

        # The pages' endpoint: the same servers, fresh credentials for each request, never cached.
        url = f"{turn_server.base}/api/rooms/{room['id']}/ice-servers"
        bodies = []
        for _ in range(2):
            async with turn_server.http.get(url) as resp:
                assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
                bodies.append(await resp.json())
        asked = [[{"url": s["urls"][0], "username": s.get("username"), "credential": s.get("credential")}
                  for s in body["iceServers"]] for body in bodies]
        assert len({check_minted(entries, coturn, before, time.time()) for entries in asked}) == 2
        assert all(s.get("credentialType", "password") == "password" for s in bodies[0]["iceServers"])
    finally:
        await viewer.close()
        await collector.stop()
        await pub.close()
    credentials = [e["credential"] for c in (pub, viewer) for e in link_entries(c) if e["credential"]]
    for record in caplog.records:
        text = record.getMessage() + json.dumps({k: str(v) for k, v in record.__dict__.items()})
        assert not [s for s in (coturn.secret, *credentials) if s in text], f"secret in log record {record.name}"


async def test_fixed_turn_credentials_in_the_url_shorthand_work(config: Config, coturn: Coturn) -> None:
    # Used to start, then fail every offer with "400 negotiation_failed: malformed uri".
    username, credential = turn_rest_credentials(coturn.secret, 24 * 3600, time.time(), "fixed")
    shorthand = f"turn:{username.replace(':', '%3A')}:{credential}@127.0.0.1:{coturn.port}?transport=udp"
    servers = config_from_env(config, {"SHELFCAST_ICE_SERVERS": shorthand}).ice_servers
    runner, app = await start_server(replace(config, ice_hosts=("127.0.0.1",), ice_servers=servers))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{config.base_url}/api/rooms", json={}, headers={"Authorization": f"Bearer {config.admin_key}"}) as resp:
                room = await resp.json()
            pub = await whip_publish(http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
            collector = FrameCollector()
            viewer = await whep_play(http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))
            try:
                await collector.wait_for("video", 5)
                for client in (pub, viewer):
                    assert link_entries(client) == [{"url": f"turn:127.0.0.1:{coturn.port}?transport=udp",
                                                     "username": username, "credential": credential}]
                    assert relay_candidates(client.pc.remoteDescription.sdp)
            finally:
                await viewer.close()
                await collector.stop()
                await pub.close()
    finally:
        await runner.cleanup()


async def test_who_gets_ice_servers(server: RunningServer) -> None:
    """Only who could open a session anyway; nothing configured: an empty list (the pages go on)."""
    public = await server.create_room()
    private = await server.create_room(access="token")
    call = await server.create_room(mode="call")

    async def ask(room: str, token: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with server.http.get(f"{server.base}/api/rooms/{room}/ice-servers", headers=headers) as resp:
            return resp.status, await resp.json()

    assert await ask(public["id"], None) == (200, {"iceServers": []})
    assert await ask(private["id"], private["tokens"]["viewer"]) == (200, {"iceServers": []})
    assert await ask(private["id"], private["tokens"]["host"]) == (200, {"iceServers": []})
    assert await ask(call["id"], call["tokens"]["buyer"]) == (200, {"iceServers": []})
    for room, token, status, code in (
        (private["id"], None, 401, "unauthorized"),
        (private["id"], public["tokens"]["viewer"], 403, "forbidden"),
        (call["id"], None, 401, "unauthorized"),
        (call["id"], "forged.token", 401, "invalid_token"),
        ("no-such-room", None, 404, "room_not_found"),
    ):
        got, body = await ask(room, token)
        assert (got, body["error"]["code"]) == (status, code), body
    # Without servers the answers carry no Link header.
    pub = await whip_publish(server.http, public["links"]["whip"], public["tokens"]["host"], [PatternTrack(160, 90)])
    try:
        assert pub.links == []
    finally:
        await pub.close()


# -- a real Chromium through a real coturn -------------------------------------------------------

async def selected_local_candidate(page: Page) -> dict[str, Any] | None:
    return await page.evaluate(
        """async () => {
            const pc = window.player.pc;
            if (!pc || pc.connectionState !== 'connected') return null;
            const stats = await pc.getStats(), byId = new Map();
            let pairId = null;
            stats.forEach((s) => { byId.set(s.id, s); if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId; });
            const pair = byId.get(pairId);
            const local = pair && byId.get(pair.localCandidateId);
            const types = [];
            stats.forEach((s) => { if (s.type === 'local-candidate') types.push(s.candidateType); });
            return local ? { type: local.candidateType, allTypes: types, policy: pc.getConfiguration().iceTransportPolicy } : null;
        }"""
    )


@pytest.mark.browser
async def test_chromium_watches_through_coturn_with_relay_only(turn_server: RunningServer, coturn: Coturn, browser: Browser) -> None:
    room = await turn_server.create_room(title="Through TURN")
    pub = await whip_publish(turn_server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(room["links"]["watch"] + "?ice=relay")
        await page.wait_for_function("window.player && window.player.status === 'playing'", timeout=20000)
        await until(lambda: _frames_over(page, 30), 30)
        local = await selected_local_candidate(page)
        assert local is not None and local["type"] == "relay" and local["policy"] == "relay"
        assert set(local["allTypes"]) == {"relay"}  # the page gathered nothing else
        # The page allocated with credentials of its own (from /api/rooms/{room}/ice-servers), not
        # with those of the server's sessions (which allocate on the same coturn).
        live = turn_server.rooms.get(room["id"])
        sessions = [live.publisher, *live.viewers.values()]
        server_side = {s.username for session in sessions for s in session.ice_servers if s.username}
        assert len(server_side) == 2
        pages = allocations(coturn) - server_side
        assert len(pages) == 1 and re.fullmatch(r"\d+:[0-9a-f]{16}", pages.pop())
        assert errors == []
    finally:
        await context.close()
        await pub.close()


async def _frames_over(page: Page, count: int) -> bool:
    return await frames_decoded(page) > count


@pytest.mark.browser
async def test_pages_play_when_the_ice_servers_request_fails(server: RunningServer, browser: Browser) -> None:
    room = await server.create_room()
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
    context = await browser.new_context()
    page = await context.new_page()
    asked: list[str] = []

    async def refuse(route: Route) -> None:
        asked.append(route.request.url)
        await route.abort()

    await page.route("**/ice-servers", refuse)
    try:
        await page.goto(room["links"]["watch"])
        await until(lambda: _frames_over(page, 10), 30)
        assert asked  # it did ask, and went on without servers
    finally:
        await context.close()
        await pub.close()


async def test_an_answer_forwarded_to_the_origin_keeps_its_link_headers(
    config: Config, coturn: Coturn, redis_url: str, tmp_path: Path
) -> None:
    from .test_cluster import start_nodes

    turn_config = replace(config, ice_hosts=("127.0.0.1",), turn_urls=(coturn.url,), turn_secret=coturn.secret)
    nodes = await start_nodes(turn_config, redis_url, tmp_path, 2)
    (_, a), (_, b) = nodes
    try:
        room = await a.create_room(mode="call")
        await until(lambda: b.rooms.get(room["id"]) is not None, 5, 0.05)
        seller = await whip_publish(a.http, f"{a.base}/whip/{room['id']}", room["tokens"]["seller"], [PatternTrack(160, 90)])
        collector = FrameCollector()
        # A call's sessions live at its origin (a, where the seller publishes): b passes this on.
        buyer = await whep_play(b.http, f"{b.base}/whep/{room['id']}", token=room["tokens"]["buyer"],
                                on_track=collector.on_track, kinds=("video",))
        try:
            await collector.wait_for("video", 5)
            assert b.rooms.get(room["id"]).viewers == {}  # it was answered by a
            [entry] = link_entries(buyer)
            assert entry["url"] == coturn.url and entry["username"] and entry["credential"]
            assert relay_candidates(buyer.pc.remoteDescription.sdp)
        finally:
            await buyer.close()
            await collector.stop()
            await seller.close()
    finally:
        for runner, node in nodes:
            await node.http.close()
            await runner.cleanup()
