"""Sustained write rate of the rollout store: the batching writer next to a naive one-commit-per-event
writer, on SQLite (WAL, synchronous=FULL) and on PostgreSQL (a throw-away local server), same run.

For each (backend, writer): N events submitted by C concurrent producers (as many LSP sessions would);
prints events/second until all are acknowledged and the p50/p99 latency of the enqueue call (what an
LSP request pays). The naive writer's "enqueue" is the whole commit.

    .venv/bin/python -m bench.store [--events 5000] [--producers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernel.settings import Settings
from server.stores import open_store
from storage.store import CandidateRecord, CompletionRecord, EventRecord, RolloutStore, SessionStart


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * p))]


async def prepare(url: str) -> RolloutStore:
    s = Settings()
    s.database.url = url
    store = await open_store(s)
    await store.start_session(SessionStart("bench", "bench-dev", "bench-team"))
    await store.record_completion(
        CompletionRecord("bench-c", "bench", "bench-dev", "def f():", [1, 2], [CandidateRecord(" pass", [3], [-0.1])])
    )
    return store


async def run_batching(url: str, events: int, producers: int) -> dict[str, Any]:
    store = await prepare(url)
    enqueue: list[float] = []
    futures: list[Any] = []
    per = events // producers

    async def producer(p: int) -> None:
        for i in range(per):
            t = time.perf_counter()
            futures.append(store.record_event(EventRecord("bench", "partial_accept", "bench-c", accepted_length=i)))
            enqueue.append(time.perf_counter() - t)
            if i % 16 == 0:
                await asyncio.sleep(0)  # other producers (LSP requests) get the loop too

    start = time.perf_counter()
    await asyncio.gather(*(producer(p) for p in range(producers)))
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - start
    stats = dict(store.writer.stats)
    await store.close()
    return {
        "rate": per * producers / elapsed,
        "p50_ms": pct(enqueue, 0.5) * 1000,
        "p99_ms": pct(enqueue, 0.99) * 1000,
        "batches": stats["batches"],
    }


async def run_naive(url: str, events: int, producers: int) -> dict[str, Any]:
    store = await prepare(url)
    await store.writer.flush()
    latencies: list[float] = []
    per = events // producers

    async def producer(p: int) -> None:
        for i in range(per):
            t = time.perf_counter()
            async with store.unit() as s:  # one transaction and commit per event
                await EventRecord("bench", "partial_accept", "bench-c", accepted_length=i).apply(s)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(producer(p) for p in range(producers)))
    elapsed = time.perf_counter() - start
    await store.close()
    return {
        "rate": per * producers / elapsed,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "batches": per * producers,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--producers", type=int, default=8)
    args = parser.parse_args()
    from tests.pgserver import create_database, temporary_postgres

    rows: list[tuple[str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp, temporary_postgres() as pg:
        backends: dict[str, Callable[[], str]] = {
            "sqlite": lambda: f"sqlite+aiosqlite:///{Path(tmp) / (uuid.uuid4().hex + '.db')}",
            "postgresql": lambda: create_database(pg, f"b_{uuid.uuid4().hex[:10]}"),
        }
        for name, make_url in backends.items():
            batching = await run_batching(make_url(), args.events, args.producers)
            naive = await run_naive(make_url(), args.events, args.producers)
            rows += [(name, "batching", batching), (name, "naive", naive)]
    print(f"rollout store writes: {args.events} events from {args.producers} concurrent producers")
    print(
        f"{'backend':<12}{'writer':<10}{'events/s':>10}{'enqueue p50 ms':>16}{'enqueue p99 ms':>16}"
        f"{'commits':>9}{'rate / naive':>14}"
    )
    for name, writer, r in rows:
        naive_rate = next(x for n, w, x in rows if n == name and w == "naive")["rate"]
        print(
            f"{name:<12}{writer:<10}{r['rate']:>10.0f}{r['p50_ms']:>16.3f}{r['p99_ms']:>16.3f}"
            f"{r['batches']:>9}{r['rate'] / naive_rate:>14.1f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
