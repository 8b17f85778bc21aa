"""Persistence of the stock side behind a small interface (SQLite in WAL mode here).

The ledger decides in memory; the store only records the outcome. ``write`` takes the ledger's
change sets in the order they happened and commits them in one transaction (group commit), with
absolute row values, so replaying or merging them is harmless. A shared store for several nodes can
implement the same ``StockStore`` protocol. Blocking: call it from one writer thread.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .ledger import Changes, Ledger
from .model import FeedState, FlashSale, Level, Order, Sku, StockEvent, Warehouse


@dataclass
class StoredState:
    warehouses: list[tuple[Warehouse, FeedState]] = field(default_factory=list)
    skus: list[Sku] = field(default_factory=list)
    levels: list[tuple[str, str, Level]] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    recent_events: list[StockEvent] = field(default_factory=list)  # applied after the last snapshot
    orders: list[Order] = field(default_factory=list)
    flash: list[FlashSale] = field(default_factory=list)


def stored_state_of(ledger: Ledger) -> StoredState:
    """The ledger's persistent state as the store would load it (``Ledger.load`` rebuilds the rest:
    reserved counts from live reservations, flash sale counters, the region index, the key index).

    Holds the ledger's own objects: turn it into JSON (``state_to_json``) before the ledger changes.
    ``recent_events`` carry no id (the ledger keeps none for them, ``load`` needs none).
    """
    return StoredState(
        warehouses=[(wh, ledger.feeds[w]) for w, wh in ledger.warehouses.items()],
        skus=list(ledger.skus.values()),
        levels=[(w, s, lv) for (w, s), lv in ledger.levels.items()],
        event_ids=sorted(ledger.event_ids),
        recent_events=[StockEvent("", w, sku, delta, seq)
                       for w, entries in ledger.recent.items() for seq, sku, delta in entries],
        orders=list(ledger.orders.values()),
        flash=list(ledger.flash.values()),
    )


# JSON form of a StoredState (the Redis snapshot of the replicated ledger). Records are positional
# arrays in dataclass field order (compact: a snapshot holds every order ever taken); bump
# STATE_FORMAT if a field is added, removed or reordered.
STATE_FORMAT = 1


def state_to_json(state: StoredState) -> dict[str, Any]:
    """Fresh JSON values (lists, dicts, str, int, float, bool, None): nothing shared with ``state``."""
    return {
        "format": STATE_FORMAT,
        "warehouses": [[w.id, w.name, list(w.regions), w.lead_time_days, f.last_seq, sorted(f.missing),
                        f.last_update, f.snapshot_as_of, f.snapshot_seq] for w, f in state.warehouses],
        "skus": [[s.id, s.name, s.price, s.currency, s.group, dict(s.attributes), s.daily_mean, s.daily_sigma]
                 for s in state.skus],
        "levels": [[w, s, lv.on_hand, lv.incoming_qty, lv.incoming_eta, lv.anomaly] for w, s, lv in state.levels],
        "event_ids": list(state.event_ids),
        "recent_events": [[e.id, e.warehouse, e.sku, e.delta, e.seq] for e in state.recent_events],
        "orders": [[o.id, o.room_id, o.idempotency_key, o.sku, o.quantity, o.region, o.buyer, o.status,
                    o.created_at, [[w, q] for w, q in o.allocations], o.expires_at, o.confirmed_at, o.flash_id,
                    o.reason] for o in state.orders],
        "flash": [[f.id, f.room_id, f.sku, f.cap, f.per_buyer, f.ends_at, f.price, f.started_at, f.stopped_at]
                  for f in state.flash],
    }


def state_from_json(obj: dict[str, Any]) -> StoredState:
    if obj.get("format") != STATE_FORMAT:
        raise ValueError(f"unknown stock state format {obj.get('format')!r} (this version reads {STATE_FORMAT})")
    state = StoredState()
    for wid, name, regions, lead, last_seq, missing, last_update, snap_as_of, snap_seq in obj["warehouses"]:
        state.warehouses.append((Warehouse(wid, name, tuple(regions), lead),
                                 FeedState(last_seq, set(missing), last_update, snap_as_of, snap_seq)))
    state.skus = [Sku(i, n, p, c, g, dict(a), m, sg) for i, n, p, c, g, a, m, sg in obj["skus"]]
    state.levels = [(w, s, Level(on_hand, 0, qty, eta, bool(anomaly))) for w, s, on_hand, qty, eta, anomaly in obj["levels"]]
    state.event_ids = list(obj["event_ids"])
    state.recent_events = [StockEvent(*e) for e in obj["recent_events"]]
    for (oid, room, key, sku, qty, region, buyer, status, created, allocations, expires, confirmed, flash_id,
         reason) in obj["orders"]:
        state.orders.append(Order(oid, room, key, sku, qty, region, buyer, status, created,
                                  tuple((w, q) for w, q in allocations), expires, confirmed, flash_id, reason))
    state.flash = [FlashSale(*f) for f in obj["flash"]]
    return state


class StockStore(Protocol):
    def load(self) -> StoredState: ...
    def write(self, changes: list[Changes]) -> None: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS warehouses (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, regions TEXT NOT NULL, lead_time_days REAL,
    last_seq INTEGER NOT NULL, missing TEXT NOT NULL, last_update REAL, snapshot_as_of REAL,
    snapshot_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS skus (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, price TEXT NOT NULL, currency TEXT NOT NULL, grp TEXT NOT NULL,
    attributes TEXT NOT NULL, daily_mean REAL, daily_sigma REAL);
CREATE TABLE IF NOT EXISTS levels (
    warehouse TEXT NOT NULL, sku TEXT NOT NULL, on_hand INTEGER NOT NULL CHECK (on_hand >= 0),
    incoming_qty INTEGER NOT NULL, incoming_eta REAL, anomaly INTEGER NOT NULL,
    PRIMARY KEY (warehouse, sku));
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, warehouse TEXT NOT NULL, seq INTEGER NOT NULL, sku TEXT NOT NULL,
    delta INTEGER NOT NULL, received_at REAL NOT NULL, applied INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_seq ON events (warehouse, seq);
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY, room_id TEXT NOT NULL, idem_key TEXT NOT NULL, sku TEXT NOT NULL,
    quantity INTEGER NOT NULL, region TEXT NOT NULL, buyer TEXT, status TEXT NOT NULL,
    created_at REAL NOT NULL, allocations TEXT NOT NULL, expires_at REAL, confirmed_at REAL,
    flash_id TEXT, reason TEXT, UNIQUE (room_id, idem_key));
CREATE TABLE IF NOT EXISTS flash_sales (
    room_id TEXT NOT NULL, sku TEXT NOT NULL, id TEXT NOT NULL, cap INTEGER NOT NULL, per_buyer INTEGER,
    ends_at REAL NOT NULL, price TEXT, started_at REAL NOT NULL, stopped_at REAL,
    PRIMARY KEY (room_id, sku));
"""


class SqliteStockStore:
    def __init__(self, path: Path, *, durable: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection used by one writer thread at a time (the service serialises calls).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def load(self) -> StoredState:
        db = self._db
        state = StoredState()
        for row in db.execute("SELECT id, name, regions, lead_time_days, last_seq, missing, last_update, "
                              "snapshot_as_of, snapshot_seq FROM warehouses"):
            wh = Warehouse(row[0], row[1], tuple(json.loads(row[2])), row[3])
            state.warehouses.append((wh, FeedState(row[4], set(json.loads(row[5])), row[6], row[7], row[8])))
        for row in db.execute("SELECT id, name, price, currency, grp, attributes, daily_mean, daily_sigma FROM skus"):
            state.skus.append(Sku(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7]))
        for row in db.execute("SELECT warehouse, sku, on_hand, incoming_qty, incoming_eta, anomaly FROM levels"):
            state.levels.append((row[0], row[1], Level(row[2], 0, row[3], row[4], bool(row[5]))))
        state.event_ids = [r[0] for r in db.execute("SELECT id FROM events")]
        state.recent_events = [
            StockEvent(*r) for r in db.execute(
                "SELECT e.id, e.warehouse, e.sku, e.delta, e.seq FROM events e JOIN warehouses w "
                "ON e.warehouse = w.id WHERE e.applied = 1 AND e.seq > w.snapshot_seq")
        ]
        for row in db.execute("SELECT id, room_id, idem_key, sku, quantity, region, buyer, status, created_at, "
                              "allocations, expires_at, confirmed_at, flash_id, reason FROM orders"):
            allocations = tuple((w, q) for w, q in json.loads(row[9]))
            state.orders.append(Order(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                                      allocations, row[10], row[11], row[12], row[13]))
        for row in db.execute("SELECT id, room_id, sku, cap, per_buyer, ends_at, price, started_at, stopped_at "
                              "FROM flash_sales"):
            state.flash.append(FlashSale(*row))
        return state

    def write(self, changes: list[Changes]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for ch in changes:
                self._write_one(ch)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back by itself on some errors (disk full)
                db.execute("ROLLBACK")
            raise

    def _write_one(self, ch: Changes) -> None:
        db = self._db
        db.executemany(
            "INSERT OR REPLACE INTO warehouses VALUES (?,?,?,?,?,?,?,?,?)",
            [(w.id, w.name, json.dumps(list(w.regions)), w.lead_time_days, f.last_seq, json.dumps(sorted(f.missing)),
              f.last_update, f.snapshot_as_of, f.snapshot_seq) for w, f in ch.warehouses])
        db.executemany(
            "INSERT OR REPLACE INTO skus VALUES (?,?,?,?,?,?,?,?)",
            [(s.id, s.name, s.price, s.currency, s.group, json.dumps(s.attributes, ensure_ascii=False),
              s.daily_mean, s.daily_sigma) for s in ch.skus])
        db.executemany(
            "INSERT OR REPLACE INTO levels VALUES (?,?,?,?,?,?)",
            [(w, s, lv.on_hand, lv.incoming_qty, lv.incoming_eta, int(lv.anomaly)) for w, s, lv in ch.levels])
        db.executemany(
            "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?)",
            [(e.id, e.warehouse, e.seq, e.sku, e.delta, t, int(applied)) for e, t, applied in ch.events])
        db.executemany(
            "INSERT OR REPLACE INTO orders VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(o.id, o.room_id, o.idempotency_key, o.sku, o.quantity, o.region, o.buyer, o.status, o.created_at,
              json.dumps([list(a) for a in o.allocations]), o.expires_at, o.confirmed_at, o.flash_id, o.reason)
             for o in ch.orders])
        db.executemany(
            "INSERT OR REPLACE INTO flash_sales VALUES (?,?,?,?,?,?,?,?,?)",
            [(f.room_id, f.sku, f.id, f.cap, f.per_buyer, f.ends_at, f.price, f.started_at, f.stopped_at)
             for f in ch.flash])

    def close(self) -> None:
        self._db.close()
