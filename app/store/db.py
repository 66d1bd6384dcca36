"""The database: one write connection fed by a group-commit queue, and reader connections.

Every write is a plain function `fn(conn) -> T`. Writes that queue up while a commit is in flight are
run together in one `BEGIN IMMEDIATE` transaction, each in its own savepoint (one failing write never
undoes another), and the batch pays for a single fsync.

Where each part runs matters more than anything else on the write path. The blocking parts (taking
the write lock, which can wait for another process, and COMMIT, which writes the WAL and fsyncs) run
on the writer connection's thread. The writes themselves are point statements of a few microseconds
each, and run on the event loop's thread: run on the writer's thread, every statement released the
GIL and then queued to take it back from the busy event loop, a hand-off per statement that cost a
quarter of a create's CPU time. A write that can touch many rows (purges, start-up syncs) passes
`long=True` and runs wholly on the writer's thread instead, so it never stalls the event loop.

Checkpoints (copying committed WAL pages back into the database file) run on their own connection
and thread, CHECKPOINT_SECONDS after a write (none while idle), in PASSIVE mode, which never blocks a
writer. Left to SQLite's default (every 1,000 pages, inside whichever COMMIT crosses the mark), they
sat on the commit path: a create wrote ~20 % more bytes, and create throughput was ~8 % lower in
back-to-back runs. Small, frequent checkpoints keep each one's fsync short, so commits queued behind
it on the disk do not stall (0.5 s between them raised create p99 from 28 to 39 ms). The writer
keeps SQLite's automatic checkpoint only as a safety net, at WAL_AUTOCHECKPOINT_PAGES, should the
background checkpoints fall behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from app.store.migrate import migrate

T = TypeVar("T")
log = logging.getLogger("parley.db")

MAX_BATCH = 64
BUSY_TIMEOUT_MS = 10_000
CHECKPOINT_SECONDS = 0.1
WAL_AUTOCHECKPOINT_PAGES = 20_000  # ~80 MB of WAL
# The WAL file is reused from its start after a checkpoint, but never shrinks by itself: one burst (a large
# delete, a backlog) would keep its size on disk for the life of the process. Past this it is cut back to it.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# Autocommit (transactions are explicit), usable from the connection's thread and the loop's, and room
# in the prepared-statement cache for every distinct statement Parley runs (~170; sqlite3 keeps 128), so
# a server with varied traffic (webhooks, the assistant, the API) never prepares one again.
CONNECT: dict[str, Any] = {"isolation_level": None, "check_same_thread": False, "cached_statements": 512}


def configure(conn: sqlite3.Connection, *, writer: bool) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    # Savepoint journals and temporary tables in memory: they never need to survive a crash (committed data
    # is durable through the WAL), and on disk they cost the writer a temp-file write per batch (~15 %).
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    if writer:
        _switch_to_wal(conn)
    else:
        conn.execute("PRAGMA query_only = ON")


def create_private(path: str) -> None:
    """Create the database file, readable by its owner only, unless it exists: it holds signing secrets, phone
    numbers and message bodies. SQLite gives its WAL and shared-memory files the database file's mode. An
    existing file keeps the mode its operator gave it. SQLite's own names (`:memory:`, `file:` URIs) are left to
    SQLite."""
    if path == ":memory:" or path.startswith("file:"):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        made = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.fchmod(made, 0o600)  # exactly: a umask such as 0277 would have narrowed it further
        os.close(made)


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` is SQLite saying the database is locked by another connection (any kind of busy: a lock, a
    recovery, a snapshot)."""
    return isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


UNWRITABLE = frozenset(
    {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR}
)


def is_unwritable(exc: BaseException) -> bool:
    """Whether `exc` is SQLite refusing to write the file itself: opened read-only (no write permission, an immutable
    file, a read-only mount), a full disk, an I/O error."""
    return isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF in UNWRITABLE


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """WAL mode, set once per file. A brand-new file's switch needs it to itself for a moment, and SQLite does not
    wait for that (no busy handler): another process opening the same new file at that instant gets SQLITE_BUSY.
    Tried again for up to BUSY_TIMEOUT_MS, as a lock would be waited for."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def connect_sync(path: str) -> sqlite3.Connection:
    """A plain connection for commands and start-up work (autocommit; transactions are explicit)."""
    create_private(path)
    conn = sqlite3.connect(path, **CONNECT)
    configure(conn, writer=True)
    return conn


Job = Callable[[sqlite3.Connection], Any]


def run_jobs(conn: sqlite3.Connection, jobs: list[Job]) -> list[tuple[bool, Any]]:
    """Run write jobs inside the open transaction, each isolated by a savepoint: (ok, value or exception)."""
    results: list[tuple[bool, Any]] = []
    for job in jobs:
        conn.execute("SAVEPOINT job")
        try:
            value = job(conn)
        except Exception as exc:  # the job's own failure: undo it alone
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            results.append((False, exc))
        else:
            conn.execute("RELEASE job")
            results.append((True, value))
    return results


def begin(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")


def begin_waiting(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE on the writer connection (busy_timeout 0), waiting up to BUSY_TIMEOUT_MS for the lock."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        begin(conn)
    finally:
        conn.execute("PRAGMA busy_timeout = 0")


def commit(conn: sqlite3.Connection) -> None:
    conn.execute("COMMIT")


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def run_batch(
    conn: sqlite3.Connection, jobs: list[Job], start: Callable[[sqlite3.Connection], None] = begin
) -> list[tuple[bool, Any]]:
    """Run several write jobs in one transaction, each isolated by a savepoint."""
    start(conn)
    try:
        results = run_jobs(conn, jobs)
        commit(conn)
    except BaseException:
        rollback(conn)
        raise
    return results


def write_sync(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """One write transaction on a plain connection (commands, start-up)."""
    ok, value = run_batch(conn, [fn])[0]
    if not ok:
        raise value
    return value


@dataclasses.dataclass
class WriteStats:
    """Where the write path's time goes (exported at /metrics; `make bench` reads it).

    A batch's cycle is: run its jobs on the event loop (`run_seconds`), then hand COMMIT to the writer
    thread and wait for it (`commit_wait_seconds`), of which `commit_seconds` is COMMIT itself (WAL
    write and fsync) and the rest is the two thread hand-offs. Long writes are counted in `batches`
    and `jobs` only."""

    batches: int = 0
    jobs: int = 0
    run_seconds: float = 0.0
    commit_seconds: float = 0.0
    commit_wait_seconds: float = 0.0


class Database:
    def __init__(self, path: str, readers: int = 2) -> None:
        self.path = path
        self._reader_count = readers
        self._writer: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._inline: sqlite3.Connection | None = None
        self._next_reader = itertools.cycle(range(readers))
        self._queue: list[tuple[Job, bool, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._closing = False
        self._written = asyncio.Event()  # a batch committed since the last checkpoint
        self.stats = WriteStats()

    async def open(self) -> None:
        create_private(self.path)
        self._writer = await aiosqlite.connect(self.path, **CONNECT)
        await self._call(self._writer, lambda c: configure(c, writer=True))
        await self._call(self._writer, migrate)
        # The event loop must never wait for the write lock: see `_run_batch`.
        await self._call(self._writer, lambda c: c.execute("PRAGMA busy_timeout = 0"))
        await self._call(self._writer, lambda c: c.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}"))
        for _ in range(self._reader_count):
            reader = await aiosqlite.connect(self.path, **CONNECT)
            await self._call(reader, lambda c: configure(c, writer=False))
            self._readers.append(reader)
        self._inline = sqlite3.connect(self.path, **CONNECT)
        configure(self._inline, writer=False)
        self._writer_task = asyncio.create_task(self._write_loop(), name="parley-db-writer")
        self._checkpointer = await aiosqlite.connect(self.path, **CONNECT)
        await self._call(self._checkpointer, lambda c: configure(c, writer=False))
        self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(), name="parley-db-checkpoint")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        connections = [conn for conn in [*self._readers, self._checkpointer, self._writer] if conn is not None]
        try:
            if self._checkpoint_task is not None:
                self._checkpoint_task.cancel()
                await asyncio.gather(self._checkpoint_task, return_exceptions=True)
            if self._writer_task is not None:
                await self._writer_task
            while connections:
                await connections[0].close()
                connections.pop(0)
        finally:
            # A close cut off (a cancelled shutdown: plain uvicorn cancels it on a second Ctrl-C, which `parley serve`
            # answers by ending at once instead) still tells every connection's thread to stop once its queued work
            # is done: a thread left waiting keeps the process alive for ever.
            for conn in connections:
                conn.stop()
            if self._inline is not None:
                self._inline.close()
                self._inline = None
            self._readers.clear()
            self._checkpointer = None
            self._writer = None

    @property
    def queued_writes(self) -> int:
        """Writes waiting for the next batch (they wait while a batch commits)."""
        return len(self._queue)

    @property
    def writer_connection(self) -> sqlite3.Connection:
        """The connection every write runs on (for per-connection registries; never query it directly)."""
        assert self._writer is not None, "database is not open"
        return self._writer._conn

    async def checkpoint(self) -> tuple[int, int, int]:
        """One PASSIVE checkpoint: (busy, WAL frames, frames now in the database file)."""
        assert self._checkpointer is not None
        return await self._call(
            self._checkpointer, lambda c: tuple(c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
        )

    async def _checkpoint_loop(self) -> None:
        while True:
            await self._written.wait()  # an idle server does no checkpoint work, not even a timer
            await asyncio.sleep(CHECKPOINT_SECONDS)
            self._written.clear()
            try:
                await self.checkpoint()
            except Exception:  # the writer's own automatic checkpoint is the safety net
                log.warning("background WAL checkpoint failed", exc_info=True)

    @staticmethod
    async def _call(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        # aiosqlite runs each queued callable on the connection's own thread; handing it a whole
        # function keeps a transaction to one hop instead of one per statement.
        return await conn._execute(lambda: fn(conn._conn))

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only function on a reader connection (never blocked by the writer)."""
        reader = self._readers[next(self._next_reader)]
        return await self._call(reader, fn)

    def read_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a point lookup synchronously on the event loop's own read-only connection.

        Only for reads by key that touch a handful of rows, or one bounded page (at most 100 rows) walked
        on an index (microseconds in SQLite): a hop to a reader thread costs more than such a query, in
        latency and in GIL hand-offs. Filtered scans and anything that can take long go through `read`.
        WAL readers never wait for the writer.
        """
        assert self._inline is not None, "database is not open"
        return fn(self._inline)

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, long: bool = False) -> T:
        """Run `fn` in a write transaction; return once it is durably committed.

        `fn` runs on the event loop's thread unless `long` is set (see the module's docstring)."""
        if self._closing:
            raise RuntimeError("database is closing")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((fn, long, future))
        self._wake.set()
        return await future

    def _next_batch(self) -> tuple[list[Job], bool, list[asyncio.Future[Any]]]:
        """The queue's head: up to MAX_BATCH short writes, or one long write alone."""
        if self._queue[0][1]:
            fn, _, future = self._queue.pop(0)
            return [fn], True, [future]
        size = 1
        while size < min(MAX_BATCH, len(self._queue)) and not self._queue[size][1]:
            size += 1
        batch, self._queue = self._queue[:size], self._queue[size:]
        return [fn for fn, _, _ in batch], False, [future for _, _, future in batch]

    async def _run_batch(self, jobs: list[Job], long: bool) -> list[tuple[bool, Any]]:
        writer = self._writer
        assert writer is not None
        if long:
            return await self._call(writer, lambda c: run_batch(c, jobs, begin_waiting))
        conn = writer._conn
        stats = self.stats
        started = time.perf_counter()
        try:
            begin(conn)  # the lock is free unless another process holds it: then wait for it off the loop
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):  # any busy (recovery, snapshot...) waits
                raise
            await self._call(writer, begin_waiting)
            started = time.perf_counter()
        try:
            results = run_jobs(conn, jobs)
            ran = time.perf_counter()
            await self._call(writer, self._commit)
        except BaseException:
            await asyncio.shield(self._call(writer, rollback))
            raise
        stats.run_seconds += ran - started
        stats.commit_wait_seconds += time.perf_counter() - ran
        return results

    def _commit(self, conn: sqlite3.Connection) -> None:
        started = time.perf_counter()
        commit(conn)
        self.stats.commit_seconds += time.perf_counter() - started

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                jobs, long, futures = self._next_batch()
                self.stats.batches += 1
                self.stats.jobs += len(jobs)
                try:
                    results = await self._run_batch(jobs, long)
                except Exception as exc:  # the commit itself failed: nothing in the batch is durable
                    log.exception("write batch failed")
                    results = [(False, exc)] * len(jobs)
                self._written.set()
                for future, (ok, value) in zip(futures, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
            if self._closing and not self._queue:
                return

    async def backup(self, target: str) -> None:
        """Online, consistent copy of the database into `target`."""
        assert self._writer is not None

        def copy(conn: sqlite3.Connection) -> None:
            dest = sqlite3.connect(target)
            try:
                conn.backup(dest)
            finally:
                dest.close()

        await self.read(copy)
