"""The stock HTTP surface on a bare app: auth, the error contract, orders under contention, freshness."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from overlay.stock.model import RoomInfo
from signaling.config import Config, StockConfig
from signaling.errors import error_middleware
from signaling.events import EventHub
from signaling.keys import CONFIG, EVENTS
from signaling.keys import STOCK
from signaling.stock_api import setup_stock

ADMIN = {"Authorization": "Bearer admin-key"}
FEED = {"Authorization": "Bearer feed-key"}


def make_app(data_dir: Path, rooms: dict[str, RoomInfo], **stock: Any) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = Config(data_dir=data_dir, admin_key="admin-key", feed_key="feed-key",
                         stock=replace(StockConfig(), **stock))
    app[EVENTS] = EventHub()
    setup_stock(app, rooms.get)
    return app


class Harness:
    def __init__(self, tmp: Path, **stock: Any) -> None:
        self.tmp = tmp
        self.rooms: dict[str, RoomInfo] = {
            "r1": RoomInfo("r1", "US-West", ("tee-red-m", "tee-blue-m", "mug"), time.time() + 3600)}
        self.stock = stock
        self.client: TestClient | None = None

    async def start(self) -> TestClient:
        self.app = make_app(self.tmp, self.rooms, **self.stock)
        self.client = TestClient(TestServer(self.app))
        await self.client.start_server()
        return self.client

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


async def seed(c: TestClient, on_hand: dict[str, int] | None = None) -> None:
    for wh, regions in (("LAX", ["US-West"]), ("NJ", ["US-East", "US-West"]), ("LON", ["UK"])):
        r = await c.put(f"/api/warehouses/{wh}", json={"name": wh, "regions": regions}, headers=ADMIN)
        assert r.status == 200, await r.text()
    skus = {"tee-red-m": ("T-shirt 红色 M", {"colour": "red", "size": "M"}),
            "tee-blue-m": ("T-shirt blau M", {"colour": "blue", "size": "M"}),
            "mug": ("Кружка", {})}
    for sku, (name, attrs) in skus.items():
        group = "tee" if sku.startswith("tee") else "mug"
        r = await c.put(f"/api/skus/{sku}", json={"name": name, "price": "19.90", "currency": "USD",
                                                  "group": group, "attributes": attrs}, headers=ADMIN)
        assert r.status == 200, await r.text()
    levels = on_hand or {"tee-red-m": 10, "tee-blue-m": 50, "mug": 5}
    for wh in ("LAX", "NJ", "LON"):
        r = await c.put(f"/api/warehouses/{wh}/snapshot", headers=FEED, json={
            "as_of": time.time(), "levels": [{"sku": s, "on_hand": q} for s, q in levels.items()]})
        assert r.status == 200, await r.text()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    await h.start()
    yield h
    await h.stop()


def order(key: str, sku: str = "tee-red-m", quantity: int = 1, **extra: Any) -> dict[str, Any]:
    return {"sku": sku, "quantity": quantity, "idempotency_key": key, **extra}


async def test_catalog_feed_and_region_sums(harness: Harness) -> None:
    c = harness.client
    assert c is not None
    await seed(c)
    body = await (await c.get("/api/stock/tee-red-m")).json()
    regions = {r["region"]: r for r in body["regions"]}
    assert regions["US-West"]["sellable"] == 20  # LAX + NJ
    assert regions["US-East"]["sellable"] == 10
    assert regions["UK"]["sellable"] == 10
    assert body["name"] == "T-shirt 红色 M"
    r = await c.post("/api/stock/events", headers=FEED, json={"events": [
        {"id": "e1", "warehouse": "LAX", "sku": "tee-red-m", "delta": -3, "seq": 1},
        {"id": "e2", "warehouse": "NJ", "sku": "tee-red-m", "delta": 5, "seq": 1}]})
    assert r.status == 200
    assert (await r.json())["applied"] == 2
    r = await c.post("/api/stock/events", headers=FEED, json={"events": [
        {"id": "e1", "warehouse": "LAX", "sku": "tee-red-m", "delta": -3, "seq": 1}]})
    assert (await r.json())["duplicates"] == ["e1"]  # a resend is harmless
    body = await (await c.get("/api/stock/tee-red-m")).json()
    assert {r["region"]: r["sellable"] for r in body["regions"]} == {"UK": 10, "US-East": 15, "US-West": 22}


async def test_auth_and_error_contract(harness: Harness) -> None:
    c = harness.client
    assert c is not None
    await seed(c)
    r = await c.put("/api/skus/x", json={"name": "x", "price": 1, "currency": "USD"})
    assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
    r = await c.put("/api/skus/x", json={"name": "x", "price": 1, "currency": "USD"}, headers=FEED)
    assert r.status == 403  # the feed key may only post feeds
    r = await c.post("/api/stock/events", data=b"{nope", headers={**FEED, "Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["error"]["code"] == "bad_json"
    before = await (await c.get("/api/stock/mug")).json()
    r = await c.post("/api/stock/events", headers=FEED, json={"events": [
        {"id": "ok", "warehouse": "LAX", "sku": "mug", "delta": 1, "seq": 1},
        {"id": "bad1", "warehouse": "LAX", "sku": "mug", "delta": 1.5, "seq": 2},
        {"id": "bad2", "warehouse": "NOPE", "sku": "mug", "delta": 1, "seq": 3},
        {"id": "bad3", "warehouse": "LAX", "sku": "ghost", "delta": 1, "seq": 4},
        {"id": "bad4", "warehouse": "LAX", "sku": "mug", "delta": "7", "seq": -1}]})
    assert r.status == 422
    err = (await r.json())["error"]
    assert err["code"] == "invalid_payload"
    assert sorted((d["index"], d["field"]) for d in err["details"]) == [
        (1, "delta"), (4, "delta"), (4, "seq")]  # shape errors reported first, per item
    r = await c.post("/api/stock/events", headers=FEED, json={"events": [
        {"id": "ok", "warehouse": "LAX", "sku": "mug", "delta": 1, "seq": 1},
        {"id": "bad2", "warehouse": "NOPE", "sku": "mug", "delta": 1, "seq": 3},
        {"id": "bad3", "warehouse": "LAX", "sku": "ghost", "delta": 1, "seq": 4}]})
    assert r.status == 422
    assert [(d["index"], d["field"]) for d in (await r.json())["error"]["details"]] == [
        (1, "warehouse"), (2, "sku")]
    assert await (await c.get("/api/stock/mug")).json() == before  # nothing of either batch applied
    big = {"events": [{"id": f"b{i}", "warehouse": "LAX", "sku": "mug", "delta": 1, "seq": i + 1}
                      for i in range(1001)]}
    r = await c.post("/api/stock/events", headers=FEED, json=big)
    assert r.status == 413 and (await r.json())["error"]["code"] == "batch_too_large"
    r = await c.put("/api/warehouses/LAX/snapshot", headers=FEED,
                    json={"as_of": "yesterday", "levels": [{"sku": "mug", "on_hand": -1}]})
    assert r.status == 422
    assert {d["field"] for d in (await r.json())["error"]["details"]} == {"as_of", "on_hand"}
    r = await c.post("/api/rooms/nope/orders", json=order("k"))
    assert r.status == 404 and (await r.json())["error"]["code"] == "room_not_found"
    r = await c.post("/api/rooms/r1/orders", json={"sku": "mug", "quantity": 0})
    assert r.status == 422
    assert {d["field"] for d in (await r.json())["error"]["details"]} == {"quantity", "idempotency_key"}


async def test_orders_idempotency_confirm_and_flash(harness: Harness) -> None:
    c = harness.client
    assert c is not None
    await seed(c)
    r = await c.post("/api/rooms/r1/orders", json=order("k1", quantity=15))
    assert r.status == 201
    first = await r.json()
    assert sum(a["quantity"] for a in first["order"]["allocations"]) == 15
    again = await c.post("/api/rooms/r1/orders", json=order("k1", quantity=15))
    assert again.status == 201 and await again.json() == first
    r = await c.post("/api/rooms/r1/orders", json=order("k2", quantity=6))
    assert r.status == 409 and (await r.json())["error"]["code"] == "insufficient_stock"
    r = await c.post("/api/rooms/r1/orders", json=order("k1", quantity=2))
    assert r.status == 422 and (await r.json())["error"]["code"] == "idempotency_key_reused"
    r = await c.post("/api/rooms/r1/orders", json=order("k3", region="UK"))
    assert r.status == 422 and (await r.json())["error"]["code"] == "wrong_region"
    oid = first["order"]["id"]
    assert (await c.post(f"/api/rooms/r1/orders/{oid}/confirm")).status == 401
    r = await c.post(f"/api/rooms/r1/orders/{oid}/confirm", headers=ADMIN)
    assert r.status == 200 and (await r.json())["order"]["status"] == "confirmed"
    stock = await (await c.get("/api/stock/tee-red-m")).json()
    us_west = next(r for r in stock["regions"] if r["region"] == "US-West")
    assert (us_west["on_hand"], us_west["reserved"], us_west["sellable"]) == (5, 0, 5)
    # flash sale: cap 3, at most 2 per buyer
    r = await c.post("/api/rooms/r1/flash-sales", headers=ADMIN,
                     json={"sku": "tee-blue-m", "cap": 3, "per_buyer": 2, "duration_s": 60, "price": "9.90"})
    assert r.status == 201
    assert (await c.post("/api/rooms/r1/orders", json=order("f0", "tee-blue-m"))).status == 422  # buyer needed
    assert (await c.post("/api/rooms/r1/orders", json=order("f1", "tee-blue-m", 2, buyer="ann"))).status == 201
    r = await c.post("/api/rooms/r1/orders", json=order("f2", "tee-blue-m", 1, buyer="ann"))
    assert r.status == 409 and (await r.json())["error"]["code"] == "per_buyer_limit"
    assert (await c.post("/api/rooms/r1/orders", json=order("f3", "tee-blue-m", 1, buyer="bob"))).status == 201
    r = await c.post("/api/rooms/r1/orders", json=order("f4", "tee-blue-m", 1, buyer="cy"))
    assert r.status == 409 and (await r.json())["error"]["code"] == "flash_sale_cap"
    view = await (await c.get("/api/rooms/r1/stock")).json()
    blue = next(s for s in view["skus"] if s["sku"] == "tee-blue-m")
    assert blue["flash_sale"]["sold"] == 3 and blue["flash_sale"]["remaining"] == 0
    assert (await c.delete("/api/rooms/r1/flash-sales/tee-blue-m", headers=ADMIN)).status == 200
    assert (await c.post("/api/rooms/r1/orders", json=order("f4b", "tee-blue-m", 1, buyer="cy"))).status == 201


async def test_500_concurrent_buyers_for_100_units(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    c = await h.start()
    try:
        await seed(c, {"tee-red-m": 50, "tee-blue-m": 0, "mug": 0})  # 50 in LAX + 50 in NJ serve US-West
        results = await asyncio.gather(*(
            c.post("/api/rooms/r1/orders", json=order(f"buyer-{i}", buyer=f"b{i}")) for i in range(500)))
        statuses = [r.status for r in results]
        for r in results:
            r.release()
        assert statuses.count(201) == 100 and statuses.count(409) == 400
        stock = await (await c.get("/api/stock/tee-red-m")).json()
        us_west = next(r for r in stock["regions"] if r["region"] == "US-West")
        assert (us_west["reserved"], us_west["sellable"]) == (100, 0)
    finally:
        await h.stop()
    # the reservations are durable: a restarted app sees exactly the same
    h2 = Harness(tmp_path)
    await h2.start()
    try:
        svc = h2.app[STOCK]
        assert sum(1 for o in svc.ledger.orders.values() if o.status == "reserved") == 100
        assert svc.ledger.sellable("US-West", "tee-red-m") == 0
    finally:
        await h2.stop()


async def test_reservations_expire_and_stale_feed_shows_syncing(tmp_path: Path) -> None:
    h = Harness(tmp_path, reservation_hold_s=0.2, stale_after_s=0.6, tick_s=0.05)
    c = await h.start()
    try:
        sub = h.app[EVENTS].subscribe("r1")
        await seed(c)
        r = await c.post("/api/rooms/r1/orders", json=order("k", quantity=20))
        assert r.status == 201
        oid = (await r.json())["order"]["id"]
        await asyncio.sleep(0.35)
        r = await c.post(f"/api/rooms/r1/orders/{oid}/confirm", headers=ADMIN)
        assert r.status == 409 and (await r.json())["error"]["code"] == "order_expired"
        view = await (await c.get("/api/rooms/r1/stock")).json()
        red = next(s for s in view["skus"] if s["sku"] == "tee-red-m")
        assert red["sellable"] == 20 and red["status"] != "syncing"
        await asyncio.sleep(0.5)  # nothing heard from LAX/NJ for longer than stale_after_s
        view = await (await c.get("/api/rooms/r1/stock")).json()
        assert {s["status"] for s in view["skus"]} == {"syncing"}
        assert {s["sellable"] for s in view["skus"]} == {None}
        events = []
        while not sub._queue.empty():
            events.append(await sub.get())
        kinds = [(e["type"], e.get("kind")) for e in events]
        assert ("stock", None) in kinds
        assert ("alert", "stale_feed") in kinds
        stale_alerts = [e for e in events if e.get("kind") == "stale_feed"]
        assert len({e["warehouse"] for e in stale_alerts}) == len(stale_alerts)  # once per warehouse
        assert any(a["action"] == "presale" for a in stale_alerts[0]["actions"])
        r = await c.post("/api/warehouses/LAX/heartbeat", headers=FEED)
        assert r.status == 200
        await c.post("/api/warehouses/NJ/heartbeat", headers=FEED)
        view = await (await c.get("/api/rooms/r1/stock")).json()
        assert "syncing" not in {s["status"] for s in view["skus"]}
    finally:
        await h.stop()


async def test_listener_and_snapshot_for_room(harness: Harness) -> None:
    c = harness.client
    assert c is not None
    await seed(c)
    svc = harness.app[STOCK]
    seen: list[set[str]] = []
    svc.add_listener(seen.append)
    r = await c.post("/api/rooms/r1/orders", json=order("k", "mug", 9))  # 5 in LAX + 5 in NJ
    assert r.status == 201
    await asyncio.sleep(0)
    assert {"mug"} in seen
    views = svc.snapshot_for_room("r1", time.time())
    assert views is not None
    mug = next(v for v in views if v.sku == "mug")
    assert (mug.sellable, mug.status, mug.name) == (1, "critical", "Кружка")
    assert mug.velocity_per_min > 0 and mug.seconds_to_sellout is not None
    assert svc.snapshot_for_room("nope") is None


async def test_preshow_and_replenishment_csv(harness: Harness) -> None:
    c = harness.client
    assert c is not None
    await seed(c)
    r = await c.put("/api/skus/mug", headers=ADMIN, json={
        "name": "Кружка", "price": "5", "currency": "USD", "demand": {"daily_mean": 4, "daily_sigma": 2}})
    assert r.status == 200
    eta = time.time() + 600
    r = await c.put("/api/warehouses/LAX/incoming/mug", headers=FEED, json={"quantity": 7, "eta": eta})
    assert r.status == 200
    r = await c.get("/api/rooms/r1/preshow?expected.mug=30&expected.tee-red-m=5", headers=ADMIN)
    body = await r.json()
    lines = {line["sku"]: line for line in body["skus"]}
    assert lines["mug"]["verdict"] == "short" and lines["mug"]["shortfall"] == 30 - 10 - 7
    assert lines["tee-red-m"]["verdict"] == "covered"
    assert lines["tee-blue-m"]["verdict"] == "unknown_demand"
    assert body["move_to_presale"] == ["mug"] and body["ok"] is False
    r = await c.get("/api/rooms/r1/preshow?expected.mug=abc", headers=ADMIN)
    assert r.status == 400
    r = await c.get("/api/rooms/r1/replenishment", headers=ADMIN)
    plan = {(p["sku"], p["warehouse"]): p for p in (await r.json())["lines"]}
    assert set(plan) == {(s, w) for s in ("tee-red-m", "tee-blue-m", "mug") for w in ("LAX", "NJ")}
    # mug at LAX: d=4/day, L=7 d, z=1.65, sigma 2 -> ROP = 28 + 1.65*2*sqrt(7)
    assert plan[("mug", "LAX")]["reorder_point"] == pytest.approx(28 + 1.65 * 2 * 7 ** 0.5, abs=1e-3)
    r = await c.get("/api/rooms/r1/replenishment.csv", headers=ADMIN)
    assert r.status == 200 and r.content_type == "text/csv"
    rows = (await r.text()).strip().split("\n")
    assert rows[0].startswith("sku,warehouse,on_hand") and len(rows) == 7
    assert (await c.get("/api/replenishment.csv")).status == 401


async def test_orders_are_refused_while_stock_is_syncing(tmp_path: Path) -> None:
    """A stale feed means the numbers may be wrong: no order may be taken against them."""
    h = Harness(tmp_path, stale_after_s=0.3)
    c = await h.start()
    try:
        await seed(c)
        body = {"sku": "mug", "quantity": 1, "region": "US-West", "idempotency_key": "k-fresh"}
        r = await c.post("/api/rooms/r1/orders", json=body)
        assert r.status == 201, await r.text()
        await asyncio.sleep(0.5)  # no feed update: every warehouse goes stale
        r = await c.post("/api/rooms/r1/orders", json={**body, "idempotency_key": "k-stale"})
        assert r.status == 409 and (await r.json())["error"]["code"] == "stock_syncing"
        # The earlier order's key still gets its original answer.
        r = await c.post("/api/rooms/r1/orders", json=body)
        assert r.status == 201
    finally:
        await h.stop()
