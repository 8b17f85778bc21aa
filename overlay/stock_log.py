"""The command log of the stock side: how a stock write reaches the ledger(s).

Every stock write (catalog, feeds, orders, flash sales, expiry) is a serialisable ``Command``: an op,
JSON arguments that hold everything its outcome depends on (including ids and the hold time the
requester chose), the requesting node's clock ``now`` and a unique id. ``StockService.apply`` is the
one state transition of both modes: it runs a command against the in-memory ledger and returns an
``Applied`` (the result or the ``LedgerError`` it produced, plus the ledger's change set).

How commands reach ``apply`` is the log's business:

- ``LocalLog`` (embedded, one process; the default): applies a command at once on the caller's loop
  and answers once its change set is committed to the SQLite store (one writer thread, group commit).
  This is exactly the single-process behaviour the stock side always had.
- ``RedisLog`` (``--redis URL``, several nodes): a replicated state machine over one Redis Stream.
  ``submit`` XADDs the command; every node runs one consumer that XREADs the stream from its last
  applied id and applies each entry, in stream order, to its own ledger. Redis gives the total order,
  so every node applies the same commands in the same order and, the ledger being deterministic,
  reaches the same state and the same outcome for every command. The submitter is answered with the
  outcome its own consumer computed for that entry, i.e. the outcome in the global order: two orders
  taken on two nodes for the last unit are decided one after the other, never both.

Durability in Redis mode: the stream *is* the log. A node keeps no SQLite copy (a local copy could
only be used on restart together with the stream id it reflects, which is what snapshot + trim will
be); a node starting later replays the stream from the beginning. Run Redis with AOF on
(``appendonly yes``; ``appendfsync always`` if an acknowledged order must survive a power cut, the
default ``everysec`` may lose the last second). Next step: a periodic snapshot of the ledger stored
with the stream id it covers, then XTRIM MINID below the oldest snapshot any node may need.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from .ledger import Changes
from .store import StockStore, StoredState

log = logging.getLogger("shelfcast.stock")

DEFAULT_STREAM_KEY = "sc:stock:log"


class StoreUnavailable(Exception):
    """The store could not record a change; the caller must not assume it happened."""


_NODE = secrets.token_hex(6)  # command ids: unique per process and counter
_COUNTER = itertools.count(1)


@dataclass(frozen=True)
class Command:
    op: str
    args: dict[str, Any]  # JSON values only
    now: float  # the requesting node's clock: the only time the command's outcome depends on
    id: str

    @classmethod
    def new(cls, op: str, args: dict[str, Any], now: float) -> "Command":
        return cls(op, args, now, f"{_NODE}-{next(_COUNTER)}")

    def to_json(self) -> str:
        return json.dumps({"op": self.op, "args": self.args, "now": self.now, "id": self.id},
                          ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Command":
        obj = json.loads(text)
        return cls(str(obj["op"]), dict(obj["args"]), float(obj["now"]), str(obj["id"]))


@dataclass
class Applied:
    """What applying one command did: its result or its error, and what the ledger changed."""

    value: Any
    error: BaseException | None
    changes: Changes

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class LogNode(Protocol):
    """The state machine a log drives (``StockService``)."""

    def apply(self, cmd: Command) -> Applied: ...
    def restore(self, state: StoredState) -> None: ...


class CommandLog(Protocol):
    async def open(self, node: LogNode) -> None:
        """Bring ``node`` up to date (load or replay); return when it may serve."""

    async def submit(self, cmd: Command) -> Applied:
        """Append ``cmd`` and return the outcome of applying it on this node, in log order."""

    async def close(self) -> None:
        """Finish (or fail) in-flight submissions and release connections, threads and files."""


class LocalLog:
    """One process: apply at once, answer when the change set is durable in SQLite."""

    def __init__(self, store: StockStore) -> None:
        self._store = store
        self._apply: Callable[[Command], Applied] | None = None
        self._pending: list[tuple[Changes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stock-writer")
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def open(self, node: LogNode) -> None:
        loop = asyncio.get_running_loop()
        node.restore(await loop.run_in_executor(self._executor, self._store.load))
        self._apply = node.apply
        self._writer = asyncio.create_task(self._writer_loop(), name="stock-writer")

    async def submit(self, cmd: Command) -> Applied:
        if self._closed or self._apply is None:
            raise StoreUnavailable("stock service is shutting down")
        applied = self._apply(cmd)
        if not applied.changes.empty():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pending.append((applied.changes, fut))
            self._wake.set()
            await fut
        return applied

    async def _writer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await loop.run_in_executor(self._executor, self._store.write, [c for c, _ in batch])
                except Exception as exc:  # disk full, I/O error: callers get a 503, not a silent loss
                    log.exception("stock store write failed")
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(StoreUnavailable(str(exc)))
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while self._pending:  # let the writer drain what callers are waiting for
            self._wake.set()
            await asyncio.sleep(0.005)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=True)


def _entries(resp: Any) -> list[tuple[str, dict[str, str]]]:
    """XREAD's answer as [(entry id, fields)] for RESP2 ([[key, entries]]) and RESP3 ({key: entries})."""
    if not resp:
        return []
    streams = resp.values() if isinstance(resp, dict) else (entries for _key, entries in resp)
    out: list[tuple[str, dict[str, str]]] = []
    for entries in streams:
        for entry in entries:
            out.append((entry[0], entry[1]))
    return out


class RedisLog:
    """Several nodes: one Redis Stream is the log; each node applies every entry in stream order.

    Two connections per node: one consumer (XREAD BLOCK from the last applied id, replaying the whole
    stream on ``open``) and one sender that XADDs queued commands in pipelined batches (group submit).
    """

    def __init__(self, url: str, *, key: str = DEFAULT_STREAM_KEY, submit_timeout_s: float = 10.0,
                 block_ms: int = 5000, read_count: int = 500) -> None:
        self.url = url
        self.key = key
        self.submit_timeout_s = submit_timeout_s
        self.block_ms = block_ms
        self.read_count = read_count
        self.last_id = "0-0"  # last stream entry applied here
        self.applied = 0  # entries applied here (replay included)
        self._node: LogNode | None = None
        self._reader: Any = None
        self._writer: Any = None
        self._outbox: list[Command] = []
        self._waiting: dict[str, asyncio.Future[Applied]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def open(self, node: LogNode) -> None:
        import redis.asyncio as redis  # only cluster mode needs the client

        self._node = node
        # Each client is used by one task at a time, so each holds exactly one connection.
        self._reader = redis.Redis.from_url(self.url, decode_responses=True, max_connections=1)
        self._writer = redis.Redis.from_url(self.url, decode_responses=True, max_connections=1)
        try:
            while True:  # replay everything appended so far, then serve
                batch = _entries(await self._reader.xread({self.key: self.last_id}, count=self.read_count))
                if not batch:
                    break
                self._consume(batch)
        except BaseException:
            await self._release()
            raise
        if self.applied:
            log.info("stock log %s replayed: %d commands up to %s", self.key, self.applied, self.last_id)
        self._tasks = [asyncio.create_task(self._tail(), name="stock-log-consumer"),
                       asyncio.create_task(self._send_loop(), name="stock-log-sender")]

    async def submit(self, cmd: Command) -> Applied:
        if self._closed:
            raise StoreUnavailable("stock service is shutting down")
        fut: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        self._waiting[cmd.id] = fut
        self._outbox.append(cmd)
        self._wake.set()
        try:
            return await asyncio.wait_for(fut, self.submit_timeout_s)
        except asyncio.TimeoutError:
            # Possibly appended and applied later: an order retried with its idempotency key finds out.
            raise StoreUnavailable("the shared stock log did not answer in time") from None
        finally:
            self._waiting.pop(cmd.id, None)

    def _consume(self, batch: list[tuple[str, dict[str, str]]]) -> None:
        assert self._node is not None
        for entry_id, fields in batch:
            self.last_id = entry_id
            self.applied += 1
            try:
                cmd = Command.from_json(fields["c"])
            except (KeyError, ValueError, TypeError):
                log.error("stock log entry %s is not a command; skipped", entry_id)
                continue
            applied = self._node.apply(cmd)  # never raises: errors are part of the outcome
            fut = self._waiting.get(cmd.id)
            if fut is not None and not fut.done():
                fut.set_result(applied)

    async def _tail(self) -> None:
        assert self._reader is not None
        backoff, failing = 0.05, False
        while True:
            try:
                resp = await self._reader.xread({self.key: self.last_id}, count=self.read_count,
                                                block=self.block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting, network blip: retry from the last applied id
                if not failing:
                    log.warning("stock log read failed (%s); retrying", exc)
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if failing:
                log.info("stock log read resumed at %s", self.last_id)
            backoff, failing = 0.05, False
            self._consume(_entries(resp))

    async def _send_loop(self) -> None:
        assert self._writer is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    pipe = self._writer.pipeline(transaction=False)
                    for cmd in batch:
                        pipe.xadd(self.key, {"c": cmd.to_json()})
                    await pipe.execute()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("stock log append failed: %s", exc)
                    for cmd in batch:
                        fut = self._waiting.get(cmd.id)
                        if fut is not None and not fut.done():
                            fut.set_exception(StoreUnavailable(f"shared stock log unavailable: {exc}"))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while self._waiting and loop.time() < deadline:  # let in-flight commands come back applied
            await asyncio.sleep(0.005)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(StoreUnavailable("stock service is shutting down"))
        await self._release()

    async def _release(self) -> None:
        for client in (self._reader, self._writer):
            if client is not None:
                await client.aclose()
        self._reader = self._writer = None


__all__ = ["Applied", "Command", "CommandLog", "DEFAULT_STREAM_KEY", "LocalLog", "LogNode", "RedisLog",
           "StoreUnavailable"]
