"""The command log of the stock side: how a stock write reaches the ledger(s).

Every stock write (catalog, feeds, orders, flash sales, expiry) is a serialisable ``Command``: an op,
JSON arguments that hold everything its outcome depends on (including ids and the hold time the
requester chose), the requesting node's clock ``now`` and a unique id. ``StockService.apply`` is the
one state transition of both modes: it runs a command against the in-memory ledger and returns an
``Applied`` (the result or the ``LedgerError`` it produced, plus the ledger's change set).

How commands reach ``apply`` is the log's business:

- ``LocalLog`` (embedded, one process; the default): applies a command at once on the caller's loop
  (its outcome decides the next command's), commits its change set to the SQLite store (one writer
  thread, group commit), and only then shows it (pages, overlay, listeners) and answers. Durable,
  then visible: when a write fails (disk full, I/O error) the ledger goes back to what the store
  holds and the commands of that write and every command decided on top of them get a 503. They
  were never announced; a page that read them in the milliseconds of their write (showing an
  earlier change reads the whole ledger) is sent the recorded numbers with the 503.
- ``RedisLog`` (``--redis URL``, several nodes): a replicated state machine over one Redis Stream.
  ``submit`` XADDs the command; every node runs one consumer that XREADs the stream from its last
  applied id and applies each entry, in stream order, to its own ledger. Redis gives the total order,
  so every node applies the same commands in the same order and, the ledger being deterministic,
  reaches the same state and the same outcome for every command. The submitter is answered with the
  outcome its own consumer computed for that entry, i.e. the outcome in the global order: two orders
  taken on two nodes for the last unit are decided one after the other, never both.

Durability in Redis mode: the stream *is* the log. A node keeps no SQLite copy; it starts from the
newest snapshot of the ledger stored in Redis next to the stream (the state after entry X, tagged X)
and replays the entries after X (everything, when there is no snapshot yet). One node at a time
writes a snapshot every ``snapshot_every`` commands and trims the stream below the previous snapshot
(see ``RedisLog``). Run Redis with AOF on (``appendonly yes``; ``appendfsync always`` if an
acknowledged order must survive a power cut, the default ``everysec`` may lose the last second).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import secrets
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from relay.errors import ShelfcastError

from .config import StockConfig
from .ledger import Changes
from .store import StockStore, StoredState

log = logging.getLogger("shelfcast.stock")

DEFAULT_STREAM_KEY = "sc:stock:log"
DEFAULT_SNAPSHOT_KEY = "sc:stock:snapshot"
_DEFAULTS = StockConfig()


class StoreUnavailable(ShelfcastError):
    """The store could not record a change; the caller must not assume it happened."""

    def __init__(self, reason: str = "") -> None:
        # The caller hears only that nothing was recorded; why (a Redis error text) is for logs.
        super().__init__(503, "store_unavailable", "stock store unavailable; nothing was recorded",
                         headers={"Retry-After": "1"})
        self.reason = reason


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

    def apply(self, cmd: Command, *, announce: bool = True) -> Applied:
        """Run ``cmd``; with ``announce`` its changes are shown at once (see ``announce``)."""

    def announce(self, changes: Changes) -> None:
        """Show changes (pages, overlay, listeners): once they are durable."""

    def checkpoint(self) -> Any:
        """What ``rollback`` needs besides the store's state to return to this very moment."""

    def rollback(self, state: StoredState, checkpoint: Any) -> None:
        """Return to the moment of ``checkpoint``, whose ledger is ``state`` (the store's)."""

    def restore(self, state: StoredState) -> None: ...
    def snapshot_state(self) -> dict[str, Any]: ...
    def restore_snapshot(self, snap: dict[str, Any]) -> None: ...


class CommandLog(Protocol):
    async def open(self, node: LogNode) -> None:
        """Bring ``node`` up to date (load or replay); return when it may serve."""

    async def submit(self, cmd: Command) -> Applied:
        """Append ``cmd`` and return the outcome of applying it on this node, in log order."""

    async def close(self) -> None:
        """Finish (or fail) in-flight submissions and release connections, threads and files."""

    @property
    def problem(self) -> str | None:
        """Why commands cannot be recorded right now (a readiness check shows it); None: they can."""


class LocalLog:
    """One process: apply at once, show and answer when the change set is durable in SQLite."""

    def __init__(self, store: StockStore) -> None:
        self._store = store
        self._node: LogNode | None = None
        self._pending: list[tuple[Changes, asyncio.Future[None]]] = []
        self._checkpoint: Any = None  # the node right before the first pending command
        self._unwritten: asyncio.Future[None] | None = None  # the newest change not yet durable
        self._rolling_back = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stock-writer")
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def open(self, node: LogNode) -> None:
        loop = asyncio.get_running_loop()
        node.restore(await loop.run_in_executor(self._executor, self._store.load))
        self._node = node
        self._writer = asyncio.create_task(self._writer_loop(), name="stock-writer")

    async def submit(self, cmd: Command) -> Applied:
        if self._closed or self._node is None:
            raise StoreUnavailable("stock service is shutting down")
        if self._rolling_back:
            raise StoreUnavailable("stock store failed a write; the ledger is being reloaded")
        if not self._pending:
            self._checkpoint = self._node.checkpoint()
        applied = self._node.apply(cmd, announce=False)
        if not applied.changes.empty():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pending.append((applied.changes, fut))
            self._unwritten = fut
            self._wake.set()
            await fut
        elif self._unwritten is not None and not self._unwritten.done():
            # Decided on changes not yet durable (say, "sold out" by an order being written): it
            # holds only if they do.
            try:
                await asyncio.shield(self._unwritten)
            except StoreUnavailable as exc:
                raise StoreUnavailable(exc.reason) from None
        return applied

    async def _writer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, checkpoint, self._pending = self._pending, self._checkpoint, []
                try:
                    await loop.run_in_executor(self._executor, self._store.write, [c for c, _ in batch])
                except Exception as exc:  # disk full, I/O error: callers get a 503, not a silent loss
                    log.exception("stock store write failed; the ledger goes back to what the store holds")
                    await self._roll_back(batch, checkpoint, str(exc))
                    continue
                assert self._node is not None
                for changes, fut in batch:
                    self._node.announce(changes)
                    if not fut.done():
                        fut.set_result(None)

    async def _roll_back(self, batch: list[tuple[Changes, asyncio.Future[None]]], checkpoint: Any,
                         reason: str) -> None:
        """Reload the ledger from the store (retrying while the store cannot be read; meanwhile every
        new command gets a 503), then fail ``batch`` and everything decided after it: a caller hears
        "nothing was recorded" only once nothing of it is left."""
        assert self._node is not None
        failed, self._pending = batch + self._pending, []
        self._rolling_back = True
        loop = asyncio.get_running_loop()
        delay = 0.05
        try:
            while True:
                try:
                    state = await loop.run_in_executor(self._executor, self._store.load)
                    break
                except Exception:
                    log.exception("stock store cannot be read back; retrying")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self._node.rollback(state, checkpoint)
            # Showing an earlier write reads the whole ledger, undone changes included: whoever saw
            # those numbers is told again, now with the recorded ones.
            for changes, _ in failed:
                self._node.announce(changes)
        finally:
            self._rolling_back = False
            for _, fut in failed:
                if not fut.done():
                    fut.set_exception(StoreUnavailable(reason))

    @property
    def problem(self) -> str | None:
        if self._closed or self._node is None:
            return "stock store closed"
        if self._rolling_back:
            return "stock store failed a write; reloading the ledger from it"
        return None

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


def _sid(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("ms-seq") as a comparable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


SNAPSHOT_FORMAT = "json+zlib"


def _json_pieces(obj: Any, chunk: int = 2000) -> Iterator[str]:
    """Compact JSON text of ``obj`` in pieces: long lists are encoded ``chunk`` items at a time, so
    the loop can run between pieces (the C encoder holds the GIL for a whole call, even in a thread)."""
    if isinstance(obj, dict):
        yield "{"
        for i, (key, value) in enumerate(obj.items()):
            yield ("," if i else "") + json.dumps(str(key), ensure_ascii=False) + ":"
            yield from _json_pieces(value, chunk)
        yield "}"
    elif isinstance(obj, list) and len(obj) > chunk:
        yield "["
        for i in range(0, len(obj), chunk):
            yield ("," if i else "") + json.dumps(obj[i:i + chunk], ensure_ascii=False, separators=(",", ":"))[1:-1]
        yield "]"
    else:
        yield json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _encode_snapshot(payload: dict[str, Any]) -> bytes:
    return zlib.compress("".join(_json_pieces(payload)).encode(), 6)


async def _encode_snapshot_async(payload: dict[str, Any], executor: ThreadPoolExecutor) -> bytes:
    """``_encode_snapshot`` without stalling the loop: JSON in pieces on the loop, zlib (which releases
    the GIL) in ``executor``."""
    pieces = []
    for piece in _json_pieces(payload):
        pieces.append(piece)
        if len(piece) > 4096:
            await asyncio.sleep(0)
    text = "".join(pieces).encode()
    return await asyncio.get_running_loop().run_in_executor(executor, zlib.compress, text, 6)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Building or restoring a large state allocates a container per record; with the collector on,
    the full collections this triggers cost more than the work (about 5x at 100k orders)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _decode_snapshot(data: bytes) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(zlib.decompress(data))
    return payload


# Compare-and-set of the snapshot hash, and the trim it allows, in one atomic step.
# KEYS: snapshot hash, stream. ARGV: entry id, count, data, trim ("1"/"0"), format.
_STORE_SNAPSHOT = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local cur = redis.call('HGET', KEYS[1], 'id')
if cur then
  local cm, cs = parse(cur)
  local nm, ns = parse(ARGV[1])
  if nm < cm or (nm == cm and ns <= cs) then return 0 end
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'count', ARGV[2], 'data', ARGV[3], 'format', ARGV[5])
if cur and ARGV[4] == '1' then
  redis.call('XTRIM', KEYS[2], 'MINID', cur)
  redis.call('HSET', KEYS[1], 'trimmed', cur)
end
return 1
"""

_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel and wait for ``tasks``. Cancel again while one still runs: on Python 3.11, the
    ``asyncio.wait_for`` redis-py sends with swallows a cancel that lands as the send completes, and
    the task would go on to block in its next read (close hung for good)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    await asyncio.gather(*tasks, return_exceptions=True)


class RedisLog:
    """Several nodes: one Redis Stream is the log; each node applies every entry in stream order.

    Three connections per node: one consumer (XREAD BLOCK from the last applied id), one sender that
    XADDs queued commands in pipelined batches (group submit), and one for snapshots (binary values).

    Snapshot + trim (the stream would otherwise grow forever and a starting node replay all of it):

    - Who and when: every node counts the entries it has applied (``applied``, absolute: a snapshot
      carries the count it covers). When that count crosses a multiple of ``snapshot_every`` (or
      ``snapshot_every_s`` passed without a snapshot of this node's position), a node takes the lock
      ``<snapshot key>:lock`` (SET NX PX); the one that gets it snapshots, the others go on. The state
      is taken synchronously right after the batch it just applied (no command can be applied while the
      consumer is between two reads), so it is the state after entry X, tagged X (a copy in plain JSON
      values: ~15 ms on the loop for 10k orders). Encoding (JSON in pieces with the loop running
      between them, zlib in a thread) and the write run in a task while the consumer goes on.
    - Where: the hash ``sc:stock:snapshot`` (fields ``id`` = X, ``count``, ``data``, ``format`` and
      ``trimmed``), written by a Lua compare-and-set that refuses an id not newer than the stored one,
      so an older snapshot never overwrites a newer one whatever the timing.
    - Trim: the same script, replacing snapshot P by X, runs XTRIM MINID P and records ``trimmed`` = P.
      The stream so keeps one snapshot interval of history behind the newest snapshot (about
      ``snapshot_every`` to twice that many entries): a running node a little behind X (normal: every
      node is a batch or so behind the fastest) never loses an entry.
    - Start: load the newest snapshot (if any), then XREAD from its id; with none, replay from the start.
    - A node further behind than that (paused, partitioned, or starting while two snapshots were
      written): every read is pipelined with HGET ``trimmed``; if this node's last id is below it,
      entries it never applied may be gone, and it reloads the newest snapshot (always ahead of
      ``trimmed``) instead of applying the rest. Its submitters whose command is covered by that
      snapshot get ``StoreUnavailable`` (a retry with the same idempotency key returns the outcome).
    """

    def __init__(self, url: str, *, key: str = DEFAULT_STREAM_KEY, submit_timeout_s: float = 10.0,
                 block_ms: int = 5000, read_count: int = 500, snapshot_key: str | None = None,
                 snapshot_every: int = _DEFAULTS.snapshot_every, snapshot_every_s: float = _DEFAULTS.snapshot_every_s,
                 trim: bool = True, start_from_snapshot: bool = True, lock_ms: int = 30_000) -> None:
        self.url = url
        self.key = key
        self.snapshot_key = snapshot_key or (DEFAULT_SNAPSHOT_KEY if key == DEFAULT_STREAM_KEY else f"{key}:snapshot")
        self.lock_key = f"{self.snapshot_key}:lock"
        self.submit_timeout_s = submit_timeout_s
        self.block_ms = block_ms
        self.read_count = read_count
        self.snapshot_every = snapshot_every  # 0 turns a trigger off
        self.snapshot_every_s = snapshot_every_s
        self.trim = trim  # False: keep the whole stream (audit, tests)
        self.start_from_snapshot = start_from_snapshot  # False: replay from the start while nothing is trimmed
        self.lock_ms = lock_ms
        self.last_id = "0-0"  # last stream entry applied here
        self.applied = 0  # entries up to last_id (those before a loaded snapshot included)
        self.restored_from: str | None = None  # the snapshot this node started from
        self.reloads = 0  # snapshots reloaded because the stream was trimmed past this node
        self.snapshot_id: str | None = None  # the newest snapshot this node knows of
        self.snapshots_written = 0
        self.last_snapshot: dict[str, Any] | None = None  # sizes and times of the last one written here
        self.open_s = 0.0
        self._snapshot_count = 0
        self._epoch = 0
        self._snap_due = False
        self._snap_tried = 0.0
        self._snap_task: asyncio.Task[None] | None = None
        self._node: LogNode | None = None
        self._reader: Any = None
        self._writer: Any = None
        self._snap: Any = None
        self._store_script: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._outbox: list[Command] = []
        self._waiting: dict[str, asyncio.Future[Applied]] = {}
        self._entry_ids: dict[str, str] = {}  # waiting command -> its stream id, once appended
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._failing: str | None = None  # the last read or append error, until one succeeds again

    @property
    def problem(self) -> str | None:
        if self._closed or self._node is None:
            return "shared stock log closed"
        return None if self._failing is None else f"shared stock log unreachable: {self._failing}"

    async def open(self, node: LogNode) -> None:
        import redis.asyncio as redis  # only cluster mode needs the client

        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._node = node
        # Each client is used by one task at a time, so each holds exactly one connection. The snapshot
        # client (binary values) serves the consumer loading one and the task writing one: two, and
        # callers of ``store_snapshot`` beyond that wait for one.
        # The consumer's socket timeout outlasts its XREAD BLOCK (redis-py's default, 5 s, equals the
        # default block: an idle node would time out, reconnect and log a failed read every 5 s).
        self._reader = redis.Redis.from_url(self.url, decode_responses=True, max_connections=1,
                                            socket_timeout=self.block_ms / 1000 + 5)
        self._writer = redis.Redis.from_url(self.url, decode_responses=True, max_connections=1)
        self._snap = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(self.url, max_connections=2))
        self._store_script = self._snap.register_script(_STORE_SNAPSHOT)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stock-snapshot")
        try:
            if self.start_from_snapshot:
                await self._load_snapshot(at_start=True)
            while True:  # replay everything appended since, then serve
                batch = await self._read(None)
                if batch is None:
                    continue  # trimmed past us while replaying: reloaded a newer snapshot
                if not batch:
                    break
                self._consume(batch)
        except BaseException:
            await self._release()
            raise
        self.open_s = time.perf_counter() - started
        if self.applied:
            log.info("stock log %s: %s, then %d commands, up to %s in %.3f s", self.key,
                     f"snapshot {self.restored_from}" if self.restored_from else "no snapshot",
                     self.applied - self._snapshot_count, self.last_id, self.open_s)
        if self.snapshot_every > 0:
            self._epoch = self.applied // self.snapshot_every
            # A long tail behind the newest snapshot (or none yet): snapshot now rather than in N commands.
            self._snap_due = self.applied - self._snapshot_count >= self.snapshot_every
        self._snap_tried = loop.time()
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
            self._entry_ids.pop(cmd.id, None)

    async def _read(self, block: int | None) -> list[tuple[str, dict[str, str]]] | None:
        """The next entries after ``last_id``; None if the stream was trimmed past this node (then a
        newer snapshot has been loaded instead: read again)."""
        assert self._reader is not None
        pipe = self._reader.pipeline(transaction=False)
        pipe.xread({self.key: self.last_id}, count=self.read_count, block=block)
        pipe.hget(self.snapshot_key, "trimmed")  # read after the entries: a trim before them shows here
        resp, trimmed = await pipe.execute()
        if trimmed is not None and _sid(self.last_id) < _sid(trimmed):
            # Entries below ``trimmed`` are gone; some of them may come after our last id. Applying what
            # is left would skip them: take the newest snapshot (always past ``trimmed``) instead.
            await self._load_snapshot(at_start=False)
            if _sid(self.last_id) < _sid(trimmed):  # cannot happen: ``trimmed`` is an older snapshot's id
                raise RuntimeError(f"snapshot {self.last_id} is older than the trim point {trimmed}")
            return None
        return _entries(resp)

    async def _load_snapshot(self, *, at_start: bool) -> None:
        assert self._snap is not None and self._node is not None and self._executor is not None
        fields = await self._snap.hgetall(self.snapshot_key)
        if not fields or b"data" not in fields:
            if at_start:
                return
            raise RuntimeError(f"stream {self.key} was trimmed past this node but {self.snapshot_key} is missing")
        entry_id, count = fields[b"id"].decode(), int(fields[b"count"])
        started = time.perf_counter()
        payload = await asyncio.get_running_loop().run_in_executor(self._executor, _decode_snapshot, fields[b"data"])
        behind = self.last_id
        with _no_gc():
            self._node.restore_snapshot(payload)
        self.last_id, self.applied = entry_id, count
        self.snapshot_id, self._snapshot_count = entry_id, count
        if at_start:
            self.restored_from = entry_id
            log.info("stock log %s: loaded snapshot %s (%d commands, %d bytes) in %.3f s", self.key, entry_id,
                     count, len(fields[b"data"]), time.perf_counter() - started)
            return
        self.reloads += 1
        log.warning("stock log %s was trimmed past this node (at %s): reloaded snapshot %s", self.key, behind,
                    entry_id)
        for cmd_id, eid in list(self._entry_ids.items()):  # their outcome is inside the snapshot, unknown here
            fut = self._waiting.get(cmd_id)
            if fut is not None and not fut.done() and _sid(eid) <= _sid(entry_id):
                fut.set_exception(StoreUnavailable("the outcome was decided while this node was catching up; "
                                                   "retry (with the same idempotency key) to learn it"))

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
        backoff, failing = 0.05, False
        while not self._closed:
            try:
                batch = await self._read(self.block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting, network blip: retry from the last applied id
                if not failing:
                    log.warning("stock log read failed (%s); retrying", exc)
                failing, self._failing = True, str(exc) or type(exc).__name__
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if failing:
                log.info("stock log read resumed at %s", self.last_id)
            backoff, failing, self._failing = 0.05, False, None
            if batch:
                self._consume(batch)
            try:
                await self._maybe_snapshot()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next trigger tries again
                log.warning("stock snapshot not taken: %s", exc)

    async def _maybe_snapshot(self) -> None:
        """Between two reads (no command can be applied meanwhile): snapshot if due and ours to take."""
        if self._node is None or (self._snap_task is not None and not self._snap_task.done()):
            return
        loop = asyncio.get_running_loop()
        by_count = by_time = False
        if self.snapshot_every > 0:
            epoch = self.applied // self.snapshot_every
            by_count, self._epoch = epoch > self._epoch, epoch
        if self.snapshot_every_s > 0 and loop.time() - self._snap_tried >= self.snapshot_every_s:
            by_time = self.last_id != self.snapshot_id and self.applied > 0
        due, self._snap_due = self._snap_due, False
        if not (by_count or by_time or due):
            return
        self._snap_tried = loop.time()
        token = secrets.token_hex(8)
        pipe = self._reader.pipeline(transaction=False)
        pipe.set(self.lock_key, token, nx=True, px=self.lock_ms)
        pipe.hmget(self.snapshot_key, ["id", "count"])
        locked, (cur_id, cur_count) = await pipe.execute()
        if not locked:
            return  # another node is writing one
        if cur_id is not None:
            if self.snapshot_id is None or _sid(cur_id) > _sid(self.snapshot_id):
                self.snapshot_id, self._snapshot_count = cur_id, int(cur_count)
            # Skip if not past the stored one (by enough, when several nodes crossed the same multiple).
            min_gap = max(1, self.snapshot_every // 2) if by_count and not (by_time or due) else 1
            if _sid(cur_id) >= _sid(self.last_id) or self.applied - int(cur_count) < min_gap:
                await self._reader.eval(_UNLOCK, 1, self.lock_key, token)
                return
        started = time.perf_counter()
        try:
            with _no_gc():
                payload = self._node.snapshot_state()  # the state right after entry last_id
        except Exception:
            await self._reader.eval(_UNLOCK, 1, self.lock_key, token)
            raise
        dump_s = time.perf_counter() - started
        self._snap_task = asyncio.create_task(
            self._write_snapshot(self.last_id, self.applied, payload, token, dump_s), name="stock-snapshot")

    async def _write_snapshot(self, entry_id: str, count: int, payload: dict[str, Any], token: str,
                              dump_s: float) -> None:
        assert self._executor is not None and self._snap is not None
        try:
            started = time.perf_counter()
            data = await _encode_snapshot_async(payload, self._executor)
            encoded = time.perf_counter()
            stored = await self._store(entry_id, count, data)
            self.last_snapshot = {"id": entry_id, "count": count, "bytes": len(data), "stored": stored,
                                  "dump_s": dump_s, "encode_s": encoded - started,
                                  "write_s": time.perf_counter() - encoded}
            if stored:
                self.snapshots_written += 1
                log.info("stock snapshot at %s (%d commands): %d bytes; state %.3f s, encode %.3f s, "
                         "write + trim %.3f s", entry_id, count, len(data), dump_s, encoded - started,
                         time.perf_counter() - encoded)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("stock snapshot at %s failed: %s", entry_id, exc)
        finally:
            try:
                await self._snap.eval(_UNLOCK, 1, self.lock_key, token)
            except Exception:
                pass  # expires after lock_ms

    async def store_snapshot(self, entry_id: str, count: int, payload: dict[str, Any]) -> bool:
        """Store ``payload`` as the state after entry ``entry_id`` (``count`` entries) unless the stored
        snapshot is as new or newer; trims the stream below the one it replaces. Returns whether stored."""
        assert self._executor is not None
        return await self._store(entry_id, count, await _encode_snapshot_async(payload, self._executor))

    async def _store(self, entry_id: str, count: int, data: bytes) -> bool:
        stored = bool(await self._store_script(keys=[self.snapshot_key, self.key],
                                               args=[entry_id, count, data, "1" if self.trim else "0",
                                                     SNAPSHOT_FORMAT]))
        if stored and (self.snapshot_id is None or _sid(entry_id) > _sid(self.snapshot_id)):
            self.snapshot_id, self._snapshot_count = entry_id, count
        return stored

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
                    ids = await pipe.execute()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("stock log append failed: %s", exc)
                    self._failing = str(exc) or type(exc).__name__
                    for cmd in batch:
                        fut = self._waiting.get(cmd.id)
                        if fut is not None and not fut.done():
                            fut.set_exception(StoreUnavailable(f"shared stock log unavailable: {exc}"))
                    continue
                for cmd, entry_id in zip(batch, ids):
                    if cmd.id in self._waiting:
                        self._entry_ids[cmd.id] = entry_id

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while self._waiting and loop.time() < deadline:  # let in-flight commands come back applied
            await asyncio.sleep(0.005)
        await _cancel(self._tasks)
        if self._snap_task is not None:  # a snapshot being written: let it finish (it is atomic anyway)
            await asyncio.wait({self._snap_task}, timeout=5.0)
            await _cancel([self._snap_task])
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(StoreUnavailable("stock service is shutting down"))
        await self._release()

    async def _release(self) -> None:
        for client in (self._reader, self._writer, self._snap):
            if client is not None:
                await client.aclose()
        self._reader = self._writer = self._snap = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


__all__ = ["Applied", "Command", "CommandLog", "DEFAULT_SNAPSHOT_KEY", "DEFAULT_STREAM_KEY", "LocalLog", "LogNode",
           "RedisLog", "StoreUnavailable"]
