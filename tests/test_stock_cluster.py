"""Several nodes share one stock ledger through Redis (a replicated command log over a Redis Stream).

Each node is a stock-only aiohttp app (as in test_stock_http) with its own StockService, ledger and
data dir, on its own port, talking to the others only through a real redis-server. Checked: writes
on one node are seen on every node; 500 buyers spread over three nodes never oversell 100 units;
a feed batch applies exactly once whichever nodes it is posted to; listeners and pages of a node
hear about writes taken elsewhere; a node started later replays the log to the same state;
reservations expire everywhere; the "syncing" refusal follows replicated feed freshness. Snapshot +
trim: restoring a snapshot taken after any entry and applying the rest decides exactly like a full
replay; with a small interval the stream stays short and a new node starts from the snapshot with the
same numbers and answers; concurrent snapshotters never move the snapshot back; idempotency (feed
event ids, order keys) holds across a trim; a node left behind by a trim reloads the snapshot.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from overlay.stock.ledger import EventsResult, LedgerError, SnapshotResult
from overlay.stock.model import FlashSale, Order, RoomInfo, StockEvent
from overlay.stock.log import (DEFAULT_SNAPSHOT_KEY, DEFAULT_STREAM_KEY, Command, RedisLog, _decode_snapshot,
                               _encode_snapshot)
from overlay.stock.service import _OPS, StockService
from overlay.stock.store import SqliteStockStore
from overlay.stock.validation import FlashInput, IncomingInput, OrderInput, SkuInput, SnapshotInput, WarehouseInput
from signaling.config import Config, StockConfig
from signaling.errors import error_middleware
from signaling.events import EventHub
from signaling.keys import CONFIG, EVENTS
from signaling.keys import STOCK
from signaling.stock_api import setup_stock

from tests.tools.redis_server import RedisServer
from .test_stock_http import ADMIN, FEED, order, seed


class Node:
    """One shelfcast node: its own app, service, ledger and data dir; the same Redis as the others."""

    def __init__(self, tmp: Path, name: str, redis_url: str, **stock: Any) -> None:
        self.name = name
        self.rooms = {"r1": RoomInfo("r1", "US-West", ("tee-red-m", "tee-blue-m", "mug"), time.time() + 3600)}
        self.app = web.Application(middlewares=[error_middleware])
        self.app[CONFIG] = Config(data_dir=tmp / name, admin_key="admin-key", feed_key="feed-key",
                                  redis_url=redis_url, stock=replace(StockConfig(), **stock))
        self.app[EVENTS] = EventHub()
        setup_stock(self.app, self.rooms.get)
        self.client = TestClient(TestServer(self.app))

    async def start(self) -> "Node":
        await self.client.start_server()
        return self

    async def stop(self) -> None:
        await self.client.close()

    @property
    def svc(self) -> StockService:
        return self.app[STOCK]

    async def us_west(self, sku: str = "tee-red-m") -> dict[str, Any]:
        body = await (await self.client.get(f"/api/stock/{sku}")).json()
        return next(r for r in body["regions"] if r["region"] == "US-West")


async def start_nodes(tmp: Path, redis_url: str, names: str = "abc", **stock: Any) -> list[Node]:
    nodes = [Node(tmp, n, redis_url, **stock) for n in names]
    for node in nodes:
        await node.start()
    return nodes


async def stop_nodes(nodes: list[Node]) -> None:
    for node in nodes:
        await node.stop()


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def digest(svc: StockService) -> dict[str, Any]:
    """Everything a node decides with: the ledger plus the sales the service derives from it."""
    led = svc.ledger
    return {
        "warehouses": {w: (wh.name, wh.regions, wh.lead_time_days) for w, wh in led.warehouses.items()},
        "skus": {s: (k.name, k.price, k.currency, k.group, k.attributes) for s, k in led.skus.items()},
        "levels": {f"{w}/{s}": (lv.on_hand, lv.reserved, lv.incoming_qty, lv.incoming_eta, lv.anomaly)
                   for (w, s), lv in led.levels.items()},
        "feeds": {w: (f.last_seq, sorted(f.missing), f.last_update, f.snapshot_as_of, f.snapshot_seq)
                  for w, f in led.feeds.items()},
        "events": sorted(led.event_ids),
        "orders": {o.id: (o.room_id, o.idempotency_key, o.sku, o.quantity, o.status, o.allocations,
                          o.created_at, o.expires_at, o.confirmed_at, o.flash_id, o.reason)
                   for o in led.orders.values()},
        "active": sorted(led.active),
        "flash": {f"{r}/{s}": sale for (r, s), sale in led.flash.items()},
        "units": {k: v for k, v in svc._room_units.items() if v},
        "velocity": dict(svc._room_velocity),
        "region_velocity": dict(svc._region_velocity),
    }


async def all_agree(nodes: list[Node]) -> bool:
    first = digest(nodes[0].svc)
    return all(digest(n.svc) == first for n in nodes[1:])


async def stream_commands(redis_url: str) -> list[dict[str, Any]]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [json.loads(fields["c"]) for _id, fields in await client.xrange(DEFAULT_STREAM_KEY)]
    finally:
        await client.aclose()


async def test_setup_on_one_node_is_visible_on_every_node(tmp_path: Path, redis_url: str) -> None:
    a, b, c = nodes = await start_nodes(tmp_path, redis_url)
    try:
        assert isinstance(a.svc.log, RedisLog)
        await seed(a.client)
        for node in (b, c):
            async def visible(node: Node = node) -> bool:
                r = await node.client.get("/api/stock/tee-red-m")
                return r.status == 200 and (await node.us_west())["sellable"] == 20
            await eventually(visible)
            body = await (await node.client.get("/api/stock/tee-red-m")).json()
            assert body["name"] == "T-shirt 红色 M"
            assert await (await node.client.get("/api/stock/mug")).json() == \
                await (await a.client.get("/api/stock/mug")).json()
        await eventually(lambda: all_agree(nodes))
        # A refusal decided in the log is the same refusal whichever node was asked.
        r = await b.client.post("/api/stock/events", headers=FEED, json={"events": [
            {"id": "x", "warehouse": "NOPE", "sku": "mug", "delta": 1, "seq": 1}]})
        assert r.status == 422 and (await r.json())["error"]["details"][0]["field"] == "warehouse"
        # Shape errors never reach the log.
        before = len(await stream_commands(redis_url))
        r = await c.client.post("/api/stock/events", headers=FEED, json={"events": [{"id": "y", "delta": 1.5}]})
        assert r.status == 422
        assert len(await stream_commands(redis_url)) == before
    finally:
        await stop_nodes(nodes)


async def test_500_buyers_on_three_nodes_never_oversell(tmp_path: Path, redis_url: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    nodes = await start_nodes(tmp_path, redis_url)
    try:
        await seed(nodes[0].client, {"tee-red-m": 50, "tee-blue-m": 0, "mug": 0})  # 50 LAX + 50 NJ
        await eventually(lambda: all_agree(nodes))
        started = time.perf_counter()
        results = await asyncio.gather(*(
            nodes[i % 3].client.post("/api/rooms/r1/orders", json=order(f"buyer-{i}", buyer=f"b{i}"))
            for i in range(500)))
        elapsed = time.perf_counter() - started
        answers = [(r.status, await r.json()) for r in results]
        with capsys.disabled():
            print(f"\n[stock cluster] 500 orders over 3 nodes in {elapsed:.3f} s: {500 / elapsed:.0f} orders/s")
        statuses = [s for s, _ in answers]
        assert statuses.count(201) == 100 and statuses.count(409) == 400
        assert {body["error"]["code"] for s, body in answers if s == 409} == {"insufficient_stock"}
        accepted = [body["order"] for s, body in answers if s == 201]
        assert sum(o["quantity"] for o in accepted) == 100
        assert len({o["id"] for o in accepted}) == 100
        for node in nodes:  # every node: sold out, the same 100 reserved
            async def settled(node: Node = node) -> bool:
                west = await node.us_west()
                return (west["reserved"], west["sellable"]) == (100, 0)
            await eventually(settled)
        await eventually(lambda: all_agree(nodes))
        assert nodes[2].svc.room_sales("r1")[0] == 100
        # A retry with the same key on another node gets the same order (same id), accepted or not.
        i = next(i for i, (s, _) in enumerate(answers) if s == 201)
        retry = await nodes[(i + 1) % 3].client.post("/api/rooms/r1/orders", json=order(f"buyer-{i}", buyer=f"b{i}"))
        assert retry.status == 201 and (await retry.json())["order"]["id"] == answers[i][1]["order"]["id"]
        j = next(j for j, (s, _) in enumerate(answers) if s == 409)
        retry = await nodes[(j + 2) % 3].client.post("/api/rooms/r1/orders", json=order(f"buyer-{j}", buyer=f"b{j}"))
        assert retry.status == 409
        assert (await retry.json())["error"]["details"]["order"]["id"] == answers[j][1]["error"]["details"]["order"]["id"]
        # Confirm on a node other than the one that took the order.
        oid = answers[i][1]["order"]["id"]
        r = await nodes[(i + 2) % 3].client.post(f"/api/rooms/r1/orders/{oid}/confirm", headers=ADMIN)
        assert r.status == 200 and (await r.json())["order"]["status"] == "confirmed"
        await eventually(lambda: all_agree(nodes))
        assert nodes[i % 3].svc.ledger.orders[oid].status == "confirmed"
    finally:
        await stop_nodes(nodes)


async def test_feed_batch_applies_exactly_once_across_nodes(tmp_path: Path, redis_url: str) -> None:
    a, b, c = nodes = await start_nodes(tmp_path, redis_url)
    try:
        await seed(a.client)
        batch = {"events": [{"id": f"ev-{i}", "warehouse": "LAX", "sku": "mug", "delta": 2, "seq": i + 1}
                            for i in range(20)]}
        r = await c.client.post("/api/stock/events", headers=FEED, json=batch)
        assert r.status == 200 and (await r.json())["applied"] == 20
        r = await a.client.post("/api/stock/events", headers=FEED, json=batch)
        assert r.status == 200
        again = await r.json()
        assert again["applied"] == 0 and len(again["duplicates"]) == 20
        # The same new batch posted to two nodes at the same moment: one of them applies it.
        batch2 = {"events": [{"id": f"ev2-{i}", "warehouse": "LAX", "sku": "mug", "delta": -1, "seq": 21 + i}
                             for i in range(10)]}
        answers = await asyncio.gather(*(n.client.post("/api/stock/events", headers=FEED, json=batch2)
                                         for n in (a, b)))
        bodies = [await r.json() for r in answers]
        assert sorted(body["applied"] for body in bodies) == [0, 10]
        for node in nodes:
            async def on_hand(node: Node = node) -> bool:
                body = await (await node.client.get("/api/stock/mug")).json()
                lax = next(w for w in body["warehouses"] if w["warehouse"] == "LAX")
                return bool(lax["on_hand"] == 5 + 40 - 10)
            await eventually(on_hand)
        await eventually(lambda: all_agree(nodes))
    finally:
        await stop_nodes(nodes)


async def test_listeners_and_pages_hear_writes_taken_on_other_nodes(tmp_path: Path, redis_url: str) -> None:
    a, b, c = nodes = await start_nodes(tmp_path, redis_url)
    try:
        await seed(c.client)
        await eventually(lambda: all_agree(nodes))
        heard: list[tuple[float, set[str]]] = []
        a.svc.add_listener(lambda skus: heard.append((time.monotonic(), skus)))
        a.svc.watch_room("r1")  # as a page or an overlay of the room on node A does
        page = a.app[EVENTS].subscribe("r1")
        sent = time.monotonic()
        r = await b.client.post("/api/stock/events", headers=FEED, json={"events": [
            {"id": "restock", "warehouse": "LAX", "sku": "mug", "delta": 7, "seq": 1}]})
        assert r.status == 200
        await eventually(lambda: any("mug" in skus for _, skus in heard), timeout=2.0)
        latency = next(t for t, skus in heard if "mug" in skus) - sent
        assert latency < 1.0
        event = await asyncio.wait_for(page.get(), 2.0)  # the page's first push lists every SKU
        assert event["type"] == "stock"
        assert {s["sku"]: s["sellable"] for s in event["skus"]}["mug"] == 5 + 7 + 5
        # An order taken on C moves A's room view: velocity and units sold come from the log too.
        r = await c.client.post("/api/rooms/r1/orders", json=order("k", "mug", 3))
        assert r.status == 201
        await eventually(lambda: a.svc.room_sales("r1")[0] == 3, timeout=2.0)
        views = {v.sku: v for v in a.svc.snapshot_for_room("r1") or []}
        assert views["mug"].sellable == 14 and views["mug"].velocity_per_min > 0
        page.close()
    finally:
        await stop_nodes(nodes)


async def test_a_node_started_later_replays_the_log(tmp_path: Path, redis_url: str) -> None:
    a, b = nodes = await start_nodes(tmp_path, redis_url, "ab")
    late: Node | None = None
    try:
        await seed(a.client)
        await b.client.post("/api/stock/events", headers=FEED, json={"events": [
            {"id": "e1", "warehouse": "LON", "sku": "tee-blue-m", "delta": -4, "seq": 1},
            {"id": "e3", "warehouse": "LON", "sku": "tee-blue-m", "delta": 1, "seq": 3}]})  # UK: gap at seq 2
        r = await a.client.post("/api/rooms/r1/flash-sales", headers=ADMIN,
                                json={"sku": "tee-red-m", "cap": 5, "per_buyer": 2, "duration_s": 600})
        assert r.status == 201
        ids = []
        for i, node in enumerate((a, b, a)):
            r = await node.client.post("/api/rooms/r1/orders", json=order(f"k{i}", buyer=f"b{i}"))
            assert r.status == 201
            ids.append((await r.json())["order"]["id"])
        assert (await b.client.post(f"/api/rooms/r1/orders/{ids[0]}/confirm", headers=ADMIN)).status == 200
        await a.client.put("/api/warehouses/LAX/incoming/mug", headers=FEED, json={"quantity": 9, "eta": time.time() + 60})
        await eventually(lambda: all_agree(nodes))
        late = await Node(tmp_path, "late", redis_url).start()
        assert late.svc.log.applied == len(await stream_commands(redis_url))  # caught up before serving
        assert digest(late.svc) == digest(a.svc)
        for sku in ("tee-red-m", "tee-blue-m", "mug"):
            mine = await (await late.client.get(f"/api/stock/{sku}")).json()
            theirs = await (await a.client.get(f"/api/stock/{sku}")).json()
            assert mine == theirs
        view = await (await late.client.get("/api/rooms/r1/stock")).json()
        red = next(s for s in view["skus"] if s["sku"] == "tee-red-m")
        assert red["flash_sale"]["sold"] == 3
        # ...and takes part from then on.
        r = await late.client.post("/api/rooms/r1/orders", json=order("k-late", buyer="b-late"))
        assert r.status == 201
        await eventually(lambda: all_agree([*nodes, late]))
    finally:
        if late is not None:
            await late.stop()
        await stop_nodes(nodes)


async def test_reservations_expire_on_every_node(tmp_path: Path, redis_url: str) -> None:
    a, b = await start_nodes(tmp_path, redis_url, "ab", reservation_hold_s=0.3, tick_s=0.05)
    # Node C has another hold time: the requester's hold travels with the order, so nodes still agree.
    c = await Node(tmp_path, "c", redis_url, reservation_hold_s=600.0, tick_s=0.05).start()
    nodes = [a, b, c]
    try:
        await seed(a.client)
        quiet = len(await stream_commands(redis_url))
        await asyncio.sleep(0.3)  # nothing due: idle ticks append nothing
        assert len(await stream_commands(redis_url)) == quiet
        r = await a.client.post("/api/rooms/r1/orders", json=order("k", quantity=20))
        assert r.status == 201
        oid = (await r.json())["order"]["id"]
        for node in nodes:
            assert (await node.us_west())["sellable"] in (0, 20)  # 0 once this node applied it
        await eventually(lambda: all(n.svc.ledger.orders.get(oid) is not None and
                                     n.svc.ledger.orders[oid].status == "expired" for n in nodes), timeout=3.0)
        for node in nodes:
            west = await node.us_west()
            assert (west["reserved"], west["sellable"]) == (0, 20)
        await eventually(lambda: all_agree(nodes))
        assert c.svc.room_sales("r1")[0] == 0
        r = await c.client.post(f"/api/rooms/r1/orders/{oid}/confirm", headers=ADMIN)
        assert r.status == 409 and (await r.json())["error"]["code"] == "order_expired"
        await asyncio.sleep(0.2)
        expiries = [cmd for cmd in await stream_commands(redis_url) if cmd["op"] == "expire"]
        assert 1 <= len(expiries) <= 6  # at most a tick or two per node, not one per tick forever
    finally:
        await stop_nodes(nodes)


async def test_syncing_rule_follows_replicated_freshness(tmp_path: Path, redis_url: str) -> None:
    a, b = nodes = await start_nodes(tmp_path, redis_url, "ab", stale_after_s=0.4)
    try:
        await seed(a.client)
        await asyncio.sleep(0.5)  # no feed heard for longer than stale_after_s, on any node
        r = await b.client.post("/api/rooms/r1/orders", json=order("k1", "mug"))
        assert r.status == 409 and (await r.json())["error"]["code"] == "stock_syncing"
        before = len(await stream_commands(redis_url))
        r = await a.client.post("/api/rooms/r1/orders", json=order("k1", "mug"))
        assert r.status == 409  # refused before the log: costs no entry
        assert len(await stream_commands(redis_url)) == before
        for wh in ("LAX", "NJ"):  # heartbeats reach node A, orders on node B go through again
            assert (await a.client.post(f"/api/warehouses/{wh}/heartbeat", headers=FEED)).status == 200
        await eventually(lambda: all_agree(nodes))
        r = await b.client.post("/api/rooms/r1/orders", json=order("k1", "mug"))
        assert r.status == 201
    finally:
        await stop_nodes(nodes)


class ManualClock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


async def run_script(svc: StockService, clock: ManualClock) -> list[Any]:
    """One scripted session of every kind of write; returns every outcome (ids left out)."""
    out: list[Any] = []
    room = RoomInfo("r1", "US-West", ("a", "b"), None)

    async def do(coro: Any) -> None:
        try:
            result = await coro
        except LedgerError as exc:
            out.append(("refused", exc.code))
            return
        if isinstance(result, Order):
            out.append(("order", result.idempotency_key, result.status, result.allocations, result.expires_at,
                        result.reason))
        elif isinstance(result, EventsResult):
            out.append(("events", result.to_json()))
        elif isinstance(result, SnapshotResult):
            out.append(("snapshot", result.drift, result.anomalies))
        elif isinstance(result, FlashSale):
            out.append(("flash", replace(result, id="?")))
        else:
            out.append(("ok", result))

    def tick(seconds: float = 0.5) -> None:
        clock.t += seconds

    await do(svc.put_warehouse("W1", WarehouseInput("West", ("US-West",), None)))
    await do(svc.put_warehouse("W2", WarehouseInput("East", ("US-West", "US-East"), 3.0)))
    await do(svc.put_warehouse("W3", WarehouseInput("UK", ("UK",), None)))
    for sku in ("a", "b"):
        await do(svc.put_sku(sku, SkuInput(sku.upper(), "9.50", "EUR", None, {"size": "M"}, 2.0, 1.0)))
    tick()
    await do(svc.apply_snapshot("W1", SnapshotInput(clock.t - 1, {"a": 5, "b": 3}, None)))
    await do(svc.apply_snapshot("W2", SnapshotInput(clock.t - 1, {"a": 4}, 0)))
    await do(svc.apply_snapshot("W3", SnapshotInput(clock.t - 1, {"a": 1}, None)))
    await do(svc.apply_snapshot("W9", SnapshotInput(clock.t - 1, {"a": 1}, None)))  # unknown warehouse
    tick()
    await do(svc.apply_events([StockEvent("e1", "W1", "a", -1, 1), StockEvent("e2", "W3", "a", 5, 3)]))
    await do(svc.apply_events([StockEvent("e1", "W1", "a", -1, 1)]))  # duplicate
    for key, sku, qty, extra in (("k1", "a", 3, {}), ("k2", "a", 7, {}), ("k3", "b", 1, {}), ("k1", "a", 3, {}),
                                 ("k1", "a", 2, {}), ("k4", "z", 1, {}), ("k5", "a", 1, {"region": "UK"})):
        tick(0.1)
        await do(svc.reserve(room, OrderInput(sku, qty, extra.get("region"), key, None)))
    await do(svc.start_flash(room, FlashInput("b", 2, 1, clock.t + 60, "5")))
    for key, buyer in (("f1", "x"), ("f2", "x"), ("f3", None), ("f4", "y"), ("f5", "z")):
        tick(0.1)
        await do(svc.reserve(room, OrderInput("b", 1, None, key, buyer)))
    k1 = svc.ledger.orders[svc.ledger.by_key[("r1", "k1")]].id
    await do(svc.confirm("r1", k1))
    await do(svc.confirm("r1", "nope"))
    await do(svc.set_incoming("W1", "a", IncomingInput(12, clock.t + 3600)))
    await do(svc.stop_flash("r1", "b"))
    await do(svc.stop_flash("r1", "b"))
    tick(1.0)
    await do(svc.apply_events([StockEvent("e3", "W2", "a", -4, 1)]))  # to zero from 4: anomaly
    await do(svc.reserve(room, OrderInput("a", 1, None, "k6", None)))  # syncing
    await do(svc.ack_anomaly("W2", "a"))
    await do(svc.reserve(room, OrderInput("a", 1, None, "k6", None)))
    tick(svc.cfg.reservation_hold_s + 1)  # holds lapse
    await svc._expire()
    await do(svc.heartbeat("W1"))
    await do(svc.heartbeat("W2"))
    await do(svc.reserve(room, OrderInput("a", 1, None, "k7", "buyer")))  # W1's last unit
    k7 = svc.ledger.orders[svc.ledger.by_key[("r1", "k7")]].id
    await do(svc.apply_events([StockEvent("e4", "W1", "a", -1, 2), StockEvent("e5", "W2", "a", 0, 2)]))
    await do(svc.confirm("r1", k7))  # the reserved units were lost under it: stock_lost
    tick(svc.cfg.stale_after_s + 1)
    await do(svc.reserve(room, OrderInput("b", 1, None, "k8", None)))  # every feed silent: syncing
    out.append(("sales", svc.room_sales("r1")))
    return out


def by_key(svc: StockService) -> dict[str, Any]:
    """``digest`` with random ids replaced by idempotency keys."""
    d = digest(svc)
    d["orders"] = sorted((v[1], *v[2:9], v[9] is not None, v[10]) for v in d["orders"].values())
    d["active"] = sorted(svc.ledger.orders[o].idempotency_key for o in svc.ledger.active)
    d["flash"] = {k: replace(v, id="?") for k, v in d["flash"].items()}
    return d


async def test_embedded_and_clustered_modes_decide_alike(tmp_path: Path, redis_url: str) -> None:
    """One apply function: the SQLite path and the Redis path reach the same state and answers."""
    cfg = replace(StockConfig(), reservation_hold_s=30.0, tick_s=3600.0)
    rooms = {"r1": RoomInfo("r1", "US-West", ("a", "b"), None)}
    results = []
    for log in (None, RedisLog(redis_url)):
        clock = ManualClock()
        store = SqliteStockStore(tmp_path / "stock.sqlite3") if log is None else None
        svc = StockService(cfg, store, rooms.get, lambda room, event: None, clock, log=log)
        await svc.start()
        try:
            results.append((await run_script(svc, clock), by_key(svc)))
        finally:
            await svc.close()
    (embedded, embedded_state), (clustered, clustered_state) = results
    for code in ("stock_syncing", "stock_lost", "idempotency_key_reused", "buyer_required", "unknown_warehouse"):
        assert ("refused", code) in embedded
    assert {o[-1] for o in embedded if o[0] == "order"} >= {"insufficient_stock", "per_buyer_limit", "flash_sale_cap"}
    assert clustered == embedded
    assert clustered_state == embedded_state


async def test_without_redis_writes_fail_fast_and_reads_go_on(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    node = await Node(tmp_path, "a", server.url).start()
    try:
        await seed(node.client)
        server.stop()
        started = time.monotonic()
        r = await node.client.post("/api/rooms/r1/orders", json=order("k"))
        assert r.status == 503 and (await r.json())["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 12
        assert (await node.us_west())["sellable"] == 20  # nothing was decided; reads still served
    finally:
        await node.stop()
        server.stop()


# ---------------------------------------------------------------------------------- snapshot + trim
def full_dump(svc: StockService) -> dict[str, Any]:
    """``digest`` plus every derived structure of the ledger ``apply`` reads (the list order of
    ``recent`` is not compared: only its per-SKU sums are ever used)."""
    led = svc.ledger
    return {
        **digest(svc),
        "by_key": dict(led.by_key),
        "active_order": list(led.active),
        "orders_order": list(led.orders),
        "recent": {w: sorted(entries) for w, entries in led.recent.items() if entries},
        "flash_used": {k: v for k, v in led._flash_used.items() if v},
        "flash_buyer": {k: v for k, v in led._flash_buyer.items() if v},
        "by_region": dict(led._by_region),
        "units_all": dict(svc._room_units),
    }


def outcome(applied: Any) -> Any:
    """What a command answered, frozen (the ledger's objects change later)."""
    if applied.error is not None:
        err = applied.error
        return ("error", getattr(err, "code", type(err).__name__), getattr(err, "details", None))
    return ("ok", copy.deepcopy(applied.value))


async def snapshot_keys(redis_url: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        snap = await client.hmget(DEFAULT_SNAPSHOT_KEY, ["id", "count", "trimmed"])
        first = await client.xrange(DEFAULT_STREAM_KEY, count=1)
        return {"id": snap[0], "count": None if snap[1] is None else int(snap[1]), "trimmed": snap[2],
                "xlen": await client.xlen(DEFAULT_STREAM_KEY), "first": first[0][0] if first else None}
    finally:
        await client.aclose()


def sid(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


async def test_snapshot_at_any_entry_restores_the_same_state_and_answers(tmp_path: Path, redis_url: str) -> None:
    """Determinism: for every cut X of a log exercising every op, restoring the snapshot taken after X
    (through its real encoding) and applying the rest gives the full replay's state and answers."""
    cfg = replace(StockConfig(), reservation_hold_s=30.0, tick_s=3600.0)
    rooms = {"r1": RoomInfo("r1", "US-West", ("a", "b"), None)}
    clock = ManualClock()
    svc = StockService(cfg, None, rooms.get, lambda room, event: None, clock,
                       log=RedisLog(redis_url, snapshot_every=0, snapshot_every_s=0))
    await svc.start()
    try:
        await run_script(svc, clock)
    finally:
        await svc.close()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        cmds = [Command.from_json(f["c"]) for _id, f in await client.xrange(DEFAULT_STREAM_KEY)]
    finally:
        await client.aclose()
    assert {c.op for c in cmds} == set(_OPS)  # every kind of write is in the log

    def fresh() -> StockService:
        return StockService(cfg, None, rooms.get, lambda room, event: None, clock, log=RedisLog(redis_url))

    full = fresh()
    answers = [outcome(full.apply(c)) for c in cmds]
    want = full_dump(full)
    assert want["orders"] and want["events"] and want["flash"] and want["velocity"] and want["units"]
    assert any(f[1] for f in want["feeds"].values())  # a seq gap is part of the state
    for cut in range(len(cmds) + 1):
        before = fresh()
        for c in cmds[:cut]:
            before.apply(c)
        data = _encode_snapshot(before.snapshot_state())
        restored = fresh()
        restored.restore_snapshot(_decode_snapshot(data))
        assert full_dump(restored) == full_dump(before), f"restore after entry {cut}"
        rest = [outcome(restored.apply(c)) for c in cmds[cut:]]
        assert rest == answers[cut:], f"answers after a snapshot at entry {cut}"
        assert full_dump(restored) == want, f"state after a snapshot at entry {cut}"


async def test_snapshot_and_trim_keep_the_stream_short_and_new_nodes_agree(
        tmp_path: Path, redis_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    every = 25
    a, b, c = nodes = await start_nodes(tmp_path, redis_url, snapshot_every=every)
    late: Node | None = None
    seen: list[str] = []
    stop = asyncio.Event()

    async def watch_snapshot_id() -> None:  # the stored snapshot never goes back
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            while not stop.is_set():
                current = await client.hget(DEFAULT_SNAPSHOT_KEY, "id")
                if current is not None and (not seen or current != seen[-1]):
                    seen.append(current)
                await asyncio.sleep(0.002)
        finally:
            await client.aclose()

    watcher = asyncio.create_task(watch_snapshot_id())
    try:
        await seed(a.client, {"tee-red-m": 100, "tee-blue-m": 40, "mug": 10})
        answers: dict[str, tuple[int, Any]] = {}
        for wave in range(8):  # concurrent writes on every node: orders, feed events, confirms
            keys = [f"w{wave}-{i}" for i in range(60)]
            rs = await asyncio.gather(*(
                nodes[i % 3].client.post("/api/rooms/r1/orders", json=order(k, ("tee-red-m", "mug")[i % 2],
                                                                          buyer=f"b{i}"))
                for i, k in enumerate(keys)))
            for k, r in zip(keys, rs):
                answers[k] = (r.status, await r.json())
            r = await nodes[wave % 3].client.post("/api/stock/events", headers=FEED, json={"events": [
                {"id": f"ev{wave}-{i}", "warehouse": "LAX", "sku": "tee-blue-m", "delta": 1,
                 "seq": wave * 10 + i + 1} for i in range(10)]})
            assert r.status == 200
            confirmed = [body["order"]["id"] for s, body in list(answers.values())[-60:] if s == 201][:5]
            for i, oid in enumerate(confirmed):
                r = await nodes[i % 3].client.post(f"/api/rooms/r1/orders/{oid}/confirm", headers=ADMIN)
                assert r.status == 200
        await eventually(lambda: all_agree(nodes))
        await eventually(lambda: all(n.svc.log._snap_task is None or n.svc.log._snap_task.done() for n in nodes))
        total = a.svc.log.applied
        info = await snapshot_keys(redis_url)
        written = sum(n.svc.log.snapshots_written for n in nodes)
        with capsys.disabled():
            print(f"\n[stock snapshot] {total} commands, snapshot every {every}: {written} snapshots written, "
                  f"stream now {info['xlen']} entries")
        assert total > 500 and written >= 5
        assert info["trimmed"] is not None and info["first"] is not None
        assert sid(info["first"]) >= sid(info["trimmed"])
        # Bounded: from the previous snapshot on, i.e. at most two intervals plus a read batch or two
        # (a batch of 60 concurrent orders crosses two multiples of 25 at once and yields one snapshot).
        assert info["xlen"] <= 2 * (every + 60)
        assert info["count"] <= total < info["count"] + info["xlen"]  # the stream still holds the tail
        # Every written snapshot id went up, never down.
        assert [sid(s) for s in seen] == sorted({sid(s) for s in seen})
        late = await Node(tmp_path, "late", redis_url, snapshot_every=every).start()
        assert late.svc.log.restored_from == info["id"]
        assert late.svc.log.applied == total
        assert digest(late.svc) == digest(a.svc)
        for sku in ("tee-red-m", "tee-blue-m", "mug"):
            mine = await (await late.client.get(f"/api/stock/{sku}")).json()
            theirs = await (await b.client.get(f"/api/stock/{sku}")).json()
            assert mine == theirs
        # Orders by idempotency key, taken long before the snapshot (their entries are trimmed away).
        def order_id(body: dict[str, Any]) -> str:
            return str(body["order"]["id"] if "order" in body else body["error"]["details"]["order"]["id"])

        assert {s for s, _ in answers.values()} == {201, 409}  # accepted and refused ones
        for k in ("w0-0", "w0-1", "w0-59", "w3-58", "w7-0", "w7-59"):
            i = int(k.split("-")[1])
            r = await late.client.post("/api/rooms/r1/orders", json=order(k, ("tee-red-m", "mug")[i % 2],
                                                                        buyer=f"b{i}"))
            status, body = answers[k]
            assert r.status == status and order_id(await r.json()) == order_id(body)
        r = await late.client.post("/api/rooms/r1/orders", json=order("k-late", "tee-blue-m", buyer="x"))
        assert r.status == 201
        await eventually(lambda: all_agree([*nodes, late]))
    finally:
        stop.set()
        await watcher
        if late is not None:
            await late.stop()
        await stop_nodes(nodes)


async def test_concurrent_snapshotters_never_regress_the_snapshot(tmp_path: Path, redis_url: str) -> None:
    """Whatever the timing, the stored snapshot only moves forward, and the stream is trimmed only
    below the snapshot being replaced."""
    cfg = replace(StockConfig(), tick_s=3600.0)
    rooms = {"r1": RoomInfo("r1", "US-West", ("a", "b"), None)}
    services = [StockService(cfg, None, rooms.get, lambda room, event: None,
                             log=RedisLog(redis_url, snapshot_every=0, snapshot_every_s=0)) for _ in range(4)]
    for svc in services:
        await svc.start()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for i in range(40):
            await services[i % 4].put_warehouse(f"W{i}", WarehouseInput(f"w{i}", ("US-West",), None))
        await eventually(lambda: all(s.log.applied == 40 for s in services))  # type: ignore[attr-defined]
        ids = [entry_id for entry_id, _ in await client.xrange(DEFAULT_STREAM_KEY)]
        payload = services[0].snapshot_state()
        logs: list[RedisLog] = [s.log for s in services]  # type: ignore[misc]
        # 4 writers race over 30 ids in scrambled order: the newest wins, whoever came last.
        order_of = [ids[(7 * k) % 30] for k in range(30)]
        results = await asyncio.gather(*(logs[k % 4].store_snapshot(eid, ids.index(eid) + 1, payload)
                                         for k, eid in enumerate(order_of)))
        assert any(results)
        snap = dict(zip(("id", "count", "trimmed"),
                        await client.hmget(DEFAULT_SNAPSHOT_KEY, ["id", "count", "trimmed"])))
        assert snap["id"] == max(order_of, key=sid) == ids[29] and snap["count"] == "30"
        # An older (or the same) snapshot is refused and changes nothing, trim included.
        before = await client.xlen(DEFAULT_STREAM_KEY)
        assert not await logs[1].store_snapshot(ids[10], 11, payload)
        assert not await logs[2].store_snapshot(ids[29], 30, payload)
        assert await client.hget(DEFAULT_SNAPSHOT_KEY, "id") == ids[29]
        assert await client.xlen(DEFAULT_STREAM_KEY) == before
        # Entries from the replaced snapshot on stay; everything below ``trimmed`` is gone.
        first = (await client.xrange(DEFAULT_STREAM_KEY, count=1))[0][0]
        assert first == snap["trimmed"] and sid(first) < sid(snap["id"])
        assert await logs[3].store_snapshot(ids[39], 40, payload)
        assert (await client.xrange(DEFAULT_STREAM_KEY, count=1))[0][0] == ids[29]
        assert await client.xlen(DEFAULT_STREAM_KEY) == 11
        # The lock: while one node holds it, the others' triggers pass (and never wait on it).
        await client.set(f"{DEFAULT_SNAPSHOT_KEY}:lock", "someone", px=10_000)
        for log_ in logs:
            log_._snap_due = True  # consumed by each consumer after its next read
        await services[0].put_warehouse("W40", WarehouseInput("w40", ("US-West",), None))
        await eventually(lambda: all(log_.applied == 41 and not log_._snap_due for log_ in logs))
        assert all(log_._snap_task is None for log_ in logs)
        assert await client.hget(DEFAULT_SNAPSHOT_KEY, "id") == ids[39]
        # Lock free: the nodes race for it; the snapshot ends at the newest entry, taken once or twice.
        await client.delete(f"{DEFAULT_SNAPSHOT_KEY}:lock")
        for log_ in logs:
            log_._snap_due = True
        await services[1].put_warehouse("W41", WarehouseInput("w41", ("US-West",), None))
        head = (await client.xrevrange(DEFAULT_STREAM_KEY, count=1))[0][0]

        async def settled() -> bool:
            return await client.hget(DEFAULT_SNAPSHOT_KEY, "id") == head and \
                await client.get(f"{DEFAULT_SNAPSHOT_KEY}:lock") is None
        await eventually(settled)
        await asyncio.sleep(0.1)
        assert 1 <= sum(log_.snapshots_written for log_ in logs) <= 2  # (store_snapshot does not count)
        assert await client.get(f"{DEFAULT_SNAPSHOT_KEY}:lock") is None  # released
    finally:
        await client.aclose()
        for svc in services:
            await svc.close()


async def test_idempotency_survives_snapshot_and_trim(tmp_path: Path, redis_url: str) -> None:
    """A feed event id or an order key first seen before a snapshot, whose log entries are trimmed
    away, still gets its original answer: from running nodes and from a node started afterwards."""
    a, b = nodes = await start_nodes(tmp_path, redis_url, "ab", snapshot_every=10)
    late: Node | None = None
    try:
        await seed(a.client)
        early_event = {"events": [{"id": "ev-early", "warehouse": "LAX", "sku": "mug", "delta": 3, "seq": 1}]}
        r = await a.client.post("/api/stock/events", headers=FEED, json=early_event)
        assert r.status == 200 and (await r.json())["applied"] == 1
        r = await a.client.post("/api/rooms/r1/orders", json=order("k-early", "mug", 2, buyer="ann"))
        assert r.status == 201
        early_order = (await r.json())["order"]
        r = await a.client.post("/api/rooms/r1/orders", json=order("k-refused", "mug", 500))
        assert r.status == 409
        refused_id = (await r.json())["error"]["details"]["order"]["id"]
        early_entry = (await snapshot_keys(redis_url))["first"]
        for i in range(60):  # a few snapshot intervals of heartbeats and orders
            node = nodes[i % 2]
            if i % 3:
                assert (await node.client.post("/api/warehouses/NJ/heartbeat", headers=FEED)).status == 200
            else:
                r = await node.client.post("/api/rooms/r1/orders", json=order(f"k{i}", "tee-blue-m"))
                assert r.status == 201
        await eventually(lambda: all_agree(nodes))

        async def trimmed_past_early() -> bool:
            info = await snapshot_keys(redis_url)
            return info["first"] is not None and sid(info["first"]) > sid(early_entry)
        await eventually(trimmed_past_early)
        late = await Node(tmp_path, "late", redis_url, snapshot_every=10).start()
        assert late.svc.log.restored_from is not None
        for node in (b, late, a):
            r = await node.client.post("/api/stock/events", headers=FEED, json=early_event)
            body = await r.json()
            assert r.status == 200 and body["applied"] == 0 and body["duplicates"] == ["ev-early"]
            r = await node.client.post("/api/rooms/r1/orders", json=order("k-early", "mug", 2, buyer="ann"))
            assert r.status == 201
            again = (await r.json())["order"]
            assert (again["id"], again["status"], again["created_at"]) == \
                (early_order["id"], early_order["status"], early_order["created_at"])
            r = await node.client.post("/api/rooms/r1/orders", json=order("k-early", "mug", 3, buyer="ann"))
            assert r.status == 422 and (await r.json())["error"]["code"] == "idempotency_key_reused"
            r = await node.client.post("/api/rooms/r1/orders", json=order("k-refused", "mug", 500))
            assert r.status == 409 and (await r.json())["error"]["details"]["order"]["id"] == refused_id
        mug = await (await late.client.get("/api/stock/mug")).json()
        lax = next(w for w in mug["warehouses"] if w["warehouse"] == "LAX")
        assert lax["on_hand"] == 5 + 3  # the event counted once
        await eventually(lambda: all_agree([*nodes, late]))
    finally:
        if late is not None:
            await late.stop()
        await stop_nodes(nodes)


async def test_a_node_left_behind_by_a_trim_reloads_the_snapshot(tmp_path: Path, redis_url: str) -> None:
    """A running node whose position falls below the trim (here: its consumer paused while the others
    write several snapshot intervals) must not apply the rest of the stream over a gap: it reloads the
    newest snapshot. Its own request decided meanwhile gets a 503 at once; the retry gets the answer."""
    a, b, lag = nodes = await start_nodes(tmp_path, redis_url, snapshot_every=10)
    try:
        await seed(a.client)
        await eventually(lambda: all_agree(nodes))
        consumer = lag.svc.log._tasks[0]
        consumer.cancel()  # paused: the node still appends, it no longer applies
        await asyncio.gather(consumer, return_exceptions=True)
        behind = lag.svc.log.last_id
        pending = asyncio.create_task(lag.client.post("/api/rooms/r1/orders", json=order("k-lag", "mug", 2)))
        await eventually(lambda: bool(lag.svc.log._entry_ids))  # appended, waiting to be applied here
        for i in range(40):
            node = (a, b)[i % 2]
            if i % 4:
                assert (await node.client.post("/api/warehouses/LAX/heartbeat", headers=FEED)).status == 200
            else:
                assert (await node.client.post("/api/rooms/r1/orders", json=order(f"k{i}"))).status == 201

        async def trimmed_past_lag() -> bool:
            info = await snapshot_keys(redis_url)
            return info["trimmed"] is not None and sid(info["trimmed"]) > sid(behind)
        await eventually(trimmed_past_lag)
        assert not pending.done()
        started = time.monotonic()
        lag.svc.log._tasks[0] = asyncio.create_task(lag.svc.log._tail())  # resumes
        r = await pending
        assert r.status == 503 and (await r.json())["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 5  # not the 10 s submit timeout
        assert lag.svc.log.reloads == 1
        await eventually(lambda: all_agree(nodes))
        r = await lag.client.post("/api/rooms/r1/orders", json=order("k-lag", "mug", 2))
        assert r.status == 201
        assert (await r.json())["order"]["id"] == a.svc.ledger.orders[a.svc.ledger.by_key[("r1", "k-lag")]].id
        for sku in ("tee-red-m", "mug"):
            assert await (await lag.client.get(f"/api/stock/{sku}")).json() == \
                await (await a.client.get(f"/api/stock/{sku}")).json()
    finally:
        await stop_nodes(nodes)
