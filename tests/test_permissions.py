"""Who may do what: every role against every API endpoint, asserting the exact status."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest

from signaling.config import Config

from .conftest import ADMIN_KEY, RunningServer, start_server
from .test_overlay_e2e import seed_catalogue

FEED_KEY = "test-feed-key"
ROLES = ("admin", "feed", "host_a", "assistant_a", "viewer_a", "host_b", "seller_c", "viewer_p", "none")
_ids = itertools.count()


@pytest.fixture
async def server(config: Config) -> AsyncIterator[RunningServer]:  # the feed key is set here
    runner, app = await start_server(replace(config, feed_key=FEED_KEY))
    async with aiohttp.ClientSession() as http:
        yield RunningServer(app, config.base_url, http)
    await runner.cleanup()


def _unique() -> str:
    return f"k{next(_ids)}"


# (method, path, body, {role: status}); {A} is a show room, {B} another show, {C} a call, {P} a
# token-only show. A str body is sent as an SDP offer (a broken one: whoever may join gets 400 bad_sdp
# and nothing is created).
NOT_A = {"viewer_a": 403, "host_b": 403, "seller_c": 403, "viewer_p": 403}
STAFF_OF_A = {"admin": 200, "host_a": 200, "assistant_a": 200, "feed": 403, "none": 401, **NOT_A}
ADMIN_ONLY = {"admin": 200, "feed": 403, "host_a": 403, "assistant_a": 403, "none": 401, **NOT_A}
PUBLIC = {role: 200 for role in ROLES}
ROOM_TOKEN_ONLY = {role: 403 for role in ROLES} | {"admin": 401, "feed": 401, "none": 401}  # the admin key is no room token
BAD_SDP = "v=0\r\n"


def statuses(base: dict[str, int], **changes: int) -> dict[str, int]:
    return {**base, **changes}


MATRIX: list[tuple[str, str, Callable[[], Any], dict[str, int]]] = [
    ("POST", "/api/rooms", lambda: {"mode": "show"}, statuses(ADMIN_ONLY, admin=201)),
    ("GET", "/api/rooms", lambda: None, ADMIN_ONLY),
    ("GET", "/api/rooms/{A}", lambda: None, statuses(STAFF_OF_A, feed=403, viewer_a=403, host_a=403, assistant_a=403, host_b=403, seller_c=403, none=200)),
    ("GET", "/api/rooms/{A}/viewers", lambda: None, STAFF_OF_A),
    ("PUT", "/api/rooms/{A}/overlay", lambda: {"position": "top-right"}, STAFF_OF_A),
    ("GET", "/api/rooms/{A}/overlay", lambda: None, PUBLIC),
    ("GET", "/api/rooms/{A}/alerts", lambda: None, STAFF_OF_A),
    ("POST", "/api/rooms/{A}/flash-sales", lambda: {"sku": "tee-a", "cap": 5, "duration_s": 60}, statuses(STAFF_OF_A, admin=409, host_a=201, assistant_a=409)),  # the host starts it; then it is running
    # Auth comes before validation: staff get the validation error, others the auth error.
    ("POST", "/api/rooms/{A}/invitations", lambda: {"viewer": "nobody"}, statuses(STAFF_OF_A, admin=400, host_a=400, assistant_a=400)),
    ("POST", "/api/rooms/{A}/pk", lambda: {"room": "{B}", "duration_s": 7}, statuses(STAFF_OF_A, admin=400, host_a=400, assistant_a=400)),
    ("POST", "/api/rooms/{A}/orders", lambda: {"sku": "tee-a", "quantity": 1, "region": "US-West", "idempotency_key": _unique()}, {role: 201 for role in ROLES}),
    ("GET", "/api/rooms/{A}/stock", lambda: None, PUBLIC),
    ("GET", "/api/stock/tee-a", lambda: None, PUBLIC),
    ("PUT", "/api/warehouses/LAX", lambda: {"name": "Los Angeles", "regions": ["US-West"]}, ADMIN_ONLY),
    ("PUT", "/api/skus/tee-a", lambda: {"name": "Tee", "price": "9.00", "currency": "USD"}, ADMIN_ONLY),
    ("POST", "/api/stock/events", lambda: {"events": [{"id": _unique(), "warehouse": "LAX", "sku": "tee-a", "delta": 1, "seq": next(_ids)}]}, statuses(ADMIN_ONLY, feed=200)),
    ("GET", "/api/replenishment", lambda: None, ADMIN_ONLY),
    ("POST", "/whip/{A}", lambda: BAD_SDP, statuses(ROOM_TOKEN_ONLY, host_a=400)),
    ("POST", "/whep/{A}", lambda: BAD_SDP, {role: 400 for role in ROLES}),  # a public show
    ("POST", "/whep/{P}", lambda: BAD_SDP, statuses(ROOM_TOKEN_ONLY, viewer_p=400)),
    ("POST", "/whep/{C}", lambda: BAD_SDP, statuses(ROOM_TOKEN_ONLY, seller_c=400)),
    ("POST", "/whip/{C}", lambda: BAD_SDP, statuses(ROOM_TOKEN_ONLY, seller_c=400)),
    ("DELETE", "/api/rooms/{B}", lambda: None, statuses(ADMIN_ONLY, admin=204)),
]


def _fill(value: Any, rooms: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, room_id in rooms.items():
            value = value.replace("{" + name + "}", room_id)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, rooms) for k, v in value.items()}
    return value


@pytest.mark.parametrize("method, path, body, expected", MATRIX, ids=[f"{m} {p}" for m, p, _, _ in MATRIX])
async def test_permission_matrix(server: RunningServer, method: str, path: str, body: Callable[[], Any], expected: dict[str, int]) -> None:
    await seed_catalogue(server, {"tee-a": "S"}, on_hand=1000)
    a = await server.create_room(region="US-West", skus=["tee-a"])
    b = await server.create_room(region="US-West")
    c = await server.create_room(mode="call")
    p = await server.create_room(access="token")
    rooms = {"A": a["id"], "B": b["id"], "C": c["id"], "P": p["id"]}
    credentials = {
        "admin": ADMIN_KEY,
        "feed": FEED_KEY,
        "host_a": a["tokens"]["host"],
        "assistant_a": a["tokens"]["assistant"],
        "viewer_p": p["tokens"]["viewer"],
        "viewer_a": a["tokens"]["viewer"],
        "host_b": b["tokens"]["host"],
        "seller_c": c["tokens"]["seller"],
        "none": None,
    }
    # The admin goes last: on DELETE it succeeds and the room is gone.
    for role in sorted(ROLES, key=lambda r: r == "admin"):
        headers = {"Authorization": f"Bearer {credentials[role]}"} if credentials[role] else {}
        payload = _fill(body(), rooms)
        if isinstance(payload, str):
            request = {"data": payload, "headers": {**headers, "Content-Type": "application/sdp"}}
        else:
            request = {"json": payload, "headers": headers}
        async with server.http.request(method, server.base + _fill(path, rooms), **request) as resp:
            text = await resp.text()
            assert resp.status == expected[role], f"{role}: {resp.status} {text[:200]}"
            if resp.status >= 400:
                assert resp.content_type == "application/json"
