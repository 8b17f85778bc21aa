"""Durable, then visible: a stock change the store failed to record is never shown, and is undone.

The store is the real SQLite file made full for real (``PRAGMA max_page_count``: SQLite then fails
the write with "database or disk is full", as on a full disk).
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from overlay.stock.ledger import Changes
from overlay.stock.service import StockService
from overlay.stock.store import SqliteStockStore, state_to_json, stored_state_of
from signaling.keys import EVENTS, STOCK

from .conftest import until
from .test_stock_http import Harness, order, seed


def _store(svc: StockService) -> SqliteStockStore:
    store = svc.log._store  # type: ignore[attr-defined]
    assert isinstance(store, SqliteStockStore)
    return store


def _fill_disk(svc: StockService) -> None:
    """No page may be added to the database any more (until ``_free_disk``)."""
    db = _store(svc)._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")


def _free_disk(svc: StockService) -> None:
    _store(svc)._db.execute("PRAGMA max_page_count = 1073741823")


def _canonical(state: dict[str, Any]) -> dict[str, Any]:
    """A stored state's JSON with its records in one order (dict order differs after a reload)."""
    plain = json.loads(json.dumps(state))
    return {k: sorted(v, key=json.dumps) if isinstance(v, list) else v for k, v in plain.items()}


def _visible(svc: StockService) -> dict[str, Any]:
    """Everything a page, the overlay or a decision can see of the stock side."""
    views = svc.snapshot_for_room("r1", 0.0) or []
    return {
        "ledger": _canonical(state_to_json(stored_state_of(svc.ledger))),
        "room": [v.to_json() for v in views],
        "units": dict(svc._room_units), "velocity": dict(svc._room_velocity), "region": dict(svc._region_velocity),
    }


def _on_disk(svc: StockService) -> dict[str, Any]:
    """What a restart would load (read through a second connection to the same file)."""
    path = _store(svc)._db.execute("PRAGMA database_list").fetchone()[2]
    other = SqliteStockStore(Path(path))
    try:
        return _canonical(state_to_json(other.load()))
    finally:
        other.close()


SHOWN = ("sellable", "status", "flash_sale")  # what a page shows of a SKU (velocity decays by itself)


class Pages:
    """The stock events pushed to room r1's pages, and the overlay's change notices."""

    def __init__(self, h: Harness) -> None:
        self.sub = h.app[EVENTS].subscribe("r1")
        self.notices: list[set[str]] = []
        h.app[STOCK].add_listener(lambda skus: self.notices.append(set(skus)))

    async def pushed(self) -> list[dict[str, Any]]:
        await asyncio.sleep(0.05)  # changes fan out once per loop iteration
        got = []
        while not self.sub._queue.empty():
            got.append(self.sub._queue.get_nowait())
        return got


@pytest.fixture
async def seeded(tmp_path: Path) -> AsyncIterator[tuple[Harness, TestClient]]:
    h = Harness(tmp_path)
    client = await h.start()
    await seed(client)
    yield h, client
    await h.stop()


async def test_an_order_the_store_cannot_record_is_never_shown(seeded: tuple[Harness, TestClient]) -> None:
    h, c = seeded
    svc: StockService = h.app[STOCK]
    pages = Pages(h)
    r = await c.post("/api/rooms/r1/orders", json=order("first", "tee-blue-m"))
    assert r.status == 201
    assert await pages.pushed() and pages.notices  # a recorded order is shown
    _fill_disk(svc)
    for i in range(200):  # until a write needs a new page
        before, pages.notices = _visible(svc), []
        await pages.pushed()
        r = await c.post("/api/rooms/r1/orders", json=order(f"k{i}", "tee-blue-m"))
        if r.status != 201:
            break
    else:
        pytest.fail("the full database never refused a write")
    assert r.status == 503 and (await r.json())["error"]["code"] == "store_unavailable"
    assert _visible(svc) == before  # the ledger, the room's numbers, units and velocity: as before
    # Pages are told again (one may have read the order during its write), with the same numbers.
    shown = {v["sku"]: {k: v[k] for k in SHOWN} for v in before["room"]}
    assert all({k: s[k] for k in SHOWN} == shown[s["sku"]] for e in await pages.pushed() for s in e["skus"])
    assert _on_disk(svc)["orders"] == before["ledger"]["orders"]
    failed_key = f"k{i}"
    assert not any(o[2] == failed_key for o in before["ledger"]["orders"])

    # The disk has room again: the same order (same key) goes through and is shown.
    _free_disk(svc)
    r = await c.post("/api/rooms/r1/orders", json=order(failed_key, "tee-blue-m"))
    assert r.status == 201, await r.text()
    assert [e["type"] for e in await pages.pushed()] == ["stock"] and pages.notices
    assert _on_disk(svc) == _visible(svc)["ledger"]


async def test_a_failed_write_mid_burst_fails_what_was_decided_on_it(seeded: tuple[Harness, TestClient]) -> None:
    """Concurrent buyers: a failed group commit fails its orders and those decided after them; every
    order answered 201 is on disk, none answered 503 is anywhere, and pages saw only recorded ones."""
    h, c = seeded
    svc: StockService = h.app[STOCK]
    pages = Pages(h)
    _fill_disk(svc)
    statuses: dict[str, int] = {}
    for round_ in range(10):
        keys = [f"b{round_}-{i}" for i in range(20)]
        answers = await asyncio.gather(*(c.post("/api/rooms/r1/orders", json=order(k, "tee-blue-m")) for k in keys))
        statuses.update({k: r.status for k, r in zip(keys, answers)})
        if 503 in statuses.values():
            break
    assert set(statuses.values()) <= {201, 409, 503} and 503 in statuses.values()
    visible = _visible(svc)
    assert _on_disk(svc) == visible["ledger"]  # memory is exactly what a restart would load
    kept = {o[2] for o in visible["ledger"]["orders"] if o[7] == "reserved"}
    assert kept == {k for k, s in statuses.items() if s == 201}
    assert sum(visible["units"].values()) == len(kept)
    # The last numbers pages were sent are the recorded ones.
    tee = [s for e in await pages.pushed() if e["type"] == "stock" for s in e["skus"] if s["sku"] == "tee-blue-m"]
    now = next(v for v in visible["room"] if v["sku"] == "tee-blue-m")
    assert tee and tee[-1]["sellable"] == now["sellable"]


async def test_a_failed_write_puts_back_what_showing_an_earlier_one_let_out(seeded: tuple[Harness, TestClient]) -> None:
    """Group commit: order B is decided while order A is being written. A is recorded and shown, and
    showing it reads the ledger, which already holds B. B's write then fails (the database has turned
    read-only, as a file system does after an I/O error): pages and the overlay are told again, and
    the last numbers they got are the recorded ones."""
    h, c = seeded
    svc: StockService = h.app[STOCK]
    store = _store(svc)
    pages = Pages(h)
    overlay_saw: list[int | None] = []  # tee-blue-m's sellable whenever the overlay is told to redraw

    def redraw(skus: set[str]) -> None:
        if "tee-blue-m" in skus:
            overlay_saw.append(next(v.sellable for v in svc.snapshot_for_room("r1", 0.0) or [] if v.sku == "tee-blue-m"))

    h.app[STOCK].add_listener(redraw)
    real_write, writing, go_on, calls = store.write, threading.Event(), threading.Event(), [0]

    def write(changes: list[Changes]) -> None:  # runs on the writer thread
        calls[0] += 1
        if calls[0] == 1:
            writing.set()
            go_on.wait(5)
        else:
            store._db.execute("PRAGMA query_only = 1")  # SQLite itself refuses the write
        real_write(changes)

    store.write = write  # type: ignore[method-assign]
    first = asyncio.create_task(c.post("/api/rooms/r1/orders", json=order("a", "tee-blue-m")))
    await until(writing.is_set, 5, 0.01)
    second = asyncio.create_task(c.post("/api/rooms/r1/orders", json=order("b", "tee-blue-m")))
    await until(lambda: svc.log._pending, 5, 0.01)  # type: ignore[attr-defined]  # B decided, not written
    go_on.set()
    a, b = await first, await second
    assert (a.status, b.status) == (201, 503), (await a.text(), await b.text())
    store._db.execute("PRAGMA query_only = 0")
    visible = _visible(svc)
    assert _on_disk(svc) == visible["ledger"] and [o[2] for o in visible["ledger"]["orders"]] == ["a"]
    now = next(v["sellable"] for v in visible["room"] if v["sku"] == "tee-blue-m")
    tee = [s for e in await pages.pushed() if e["type"] == "stock" for s in e["skus"] if s["sku"] == "tee-blue-m"]
    assert [s["sellable"] for s in tee][-1] == now
    assert overlay_saw and overlay_saw[-1] == now
