"""The one async batching writer: the language server's writes never wait on the disk.

`submit(op)` queues a write and returns at once with a future. A single background task takes everything
queued (up to `max_batch`), applies it in ONE transaction and commits; then every future of the batch is
resolved. A write is *acknowledged* when its future has a result: its transaction has committed (on
SQLite with `synchronous=FULL`, the WAL is on disk), so it survives the process being killed.

Failures never drop a write silently:
- a write the database refuses (unknown session, constraint, bad value) fails alone: the batch is
  re-run one write per transaction, and only the bad write's future gets the error;
- a transient failure (database locked, disk full, connection lost) keeps the whole batch and retries
  it with backoff, logging each failure; nothing is acknowledged until it is committed;
- a full queue or a closed writer refuses `submit` with `StoreError` (back-pressure, never a drop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import Database, StoreError

log = logging.getLogger(__name__)


class WriteOp(Protocol):
    """One write: applied inside the writer's transaction; returns what the submitter's future gets
    (or a no-argument callable producing it, called after the batch is flushed and committed)."""

    def describe(self) -> str: ...

    async def apply(self, session: AsyncSession) -> Any: ...


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower()
        return any(s in text for s in ("locked", "busy", "disk", "full", "i/o", "readonly", "read-only", "connection"))
    return isinstance(exc, ConnectionError | OSError)


class BatchingWriter:
    def __init__(
        self,
        db: Database,
        *,
        max_batch: int = 512,
        max_queue: int = 100_000,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        self._db = db
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[WriteOp, asyncio.Future[Any]]] = asyncio.Queue(maxsize=max_queue)
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = {"batches": 0, "writes": 0, "failed": 0, "retries": 0, "max_batch_seen": 0}
        self.last_error: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="heedful-batching-writer")

    def submit(self, op: WriteOp) -> asyncio.Future[Any]:
        """Queue `op`; the future resolves when it is committed (or fails alone)."""
        if self._closing:
            raise StoreError(f"the store is closing: {op.describe()} was not accepted")
        if self._task is None:
            self.start()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((op, future))
        except asyncio.QueueFull:
            raise StoreError(
                f"the write queue is full ({self._queue.maxsize} writes waiting; the database is not keeping "
                f"up: {self.last_error or 'slow disk'}): {op.describe()} was not accepted"
            ) from None
        return future

    async def write(self, op: WriteOp) -> Any:
        """Submit and wait for the acknowledgement."""
        return await self.submit(op)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed or failed."""
        await self._queue.join()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop accepting writes, commit what is queued, stop the task."""
        self._closing = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            left = self._queue.qsize()
            raise StoreError(
                f"{left} writes could not be committed within {timeout_s:.0f} s ({self.last_error}); they were "
                "never acknowledged"
            ) from None
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            # Group commit: take what queued up while the last commit ran, without waiting for more.
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit_batch(self, batch: list[tuple[WriteOp, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._apply_retrying([op for op, _ in batch])
        except Exception:
            # Something in the batch was refused: run each write alone so only the bad one fails.
            for op, fut in batch:
                try:
                    (result,) = await self._apply_retrying([op])
                except Exception as exc:
                    self.stats["failed"] += 1
                    error = (
                        exc
                        if isinstance(exc, StoreError)
                        else StoreError(f"{op.describe()} was refused by the database: {getattr(exc, 'orig', exc)}")
                    )
                    log.warning("store write refused: %s", error)
                    if not fut.done():
                        fut.set_exception(error)
                    continue
                self._resolve([fut], [result])
            return
        self._resolve([fut for _, fut in batch], results)

    async def _apply_retrying(self, ops: list[WriteOp]) -> list[Any]:
        """Apply `ops` in one transaction; retry transient failures with backoff, raise the others."""
        delay = self._retry_initial_s
        while True:
            try:
                return await self._apply_all(ops)
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                self.stats["retries"] += 1
                self.last_error = f"{type(exc).__name__}: {getattr(exc, 'orig', exc)}"
                log.error("store write of %d items failed, retrying in %.2f s: %s", len(ops), delay, self.last_error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)

    async def _apply_all(self, ops: list[WriteOp]) -> list[Any]:
        async with self._db.sessions() as session, session.begin():
            results = [await op.apply(session) for op in ops]
            await session.flush()
        # An op may return a thunk for what only exists after the flush (an autoincrement id).
        return [r() if callable(r) else r for r in results]

    def _resolve(self, futures: list[asyncio.Future[Any]], results: list[Any]) -> None:
        self.stats["batches"] += 1
        self.stats["writes"] += len(futures)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(futures))
        for fut, result in zip(futures, results, strict=True):
            if not fut.done():
                fut.set_result(result)
