"""Adapter swaps and training beside serving, measured through `heedful serve`, in one run.

One `heedful serve --tcp` process (embedded engine) serves N sessions of one team; every session
requests inline completions back-to-back (stdlib function starts, as in bench.lsp) during three phases
of equal length:

Requests are greedy, 16 new tokens, no training groups (their sampling would weigh on every phase alike).

1. steady: the team's adapter is active and stays;
2. swaps: a new adapter is published for the team every `--swap-every` seconds (the way the training
   worker publishes); for each, the time from its publish committing to the first completion served by
   it (the completion's record says which version served it);
3. training: `heedful train --once --force` trains the team's scope in a separate process (its
   default niceness and thread cap) on the feedback recorded for phases 1-2, while serving goes on.

Prints p50/p99 per phase, the ratios to steady state, and the publish-to-serve times.

    .venv/bin/python -m bench.swap [--sessions 2] [--phase-s 40] [--swap-every 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.engine import percentiles
from bench.lsp import (
    ROOT,
    BenchClient,
    BenchError,
    Request,
    bench_config,
    cursor_requests,
    log_tail,
    report_or_exit,
    server_command,
    wait_or_exit,
)
from server.stores import open_store

TEAM = "bench"


def write_config(tmp: Path, model: Path) -> tuple[Path, Path]:
    return bench_config(
        tmp,
        "swap",
        model,
        {
            "completion": {"max_tokens": 16, "timeout_ms": 120000},
            "training": {"steps_per_round": 20, "min_new_rollouts": 1},
            "feedback": {"edit_snapshot_delays_s": [1.0]},
        },
    )


def make_adapter(model: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # small B: the model still writes code, only different code
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(out))
    return out


async def publish(db: Path, source: Path, adapters: Path) -> tuple[str, float]:
    """Publish `source` as the team's active adapter, as the training worker does; (version, commit time)."""
    from adapters.lifecycle import publish_adapter
    from kernel.settings import Settings
    from storage.repositories import Scope

    settings = Settings()
    settings.database.url = f"sqlite+aiosqlite:///{db}"
    store = await open_store(settings)
    try:
        result = await publish_adapter(
            store,
            Scope.team(TEAM),
            source,
            step=1,
            kl=0.0,
            metrics={},
            adapters_root=adapters,
            gate=None,
            actor="bench",
        )
        return result.version_id, time.time()
    finally:
        await store.close()


async def load(clients: list[BenchClient], shares: list[list[Request]], seconds: float) -> list[float]:
    """Every session requests back-to-back (cycling over its share) for `seconds`; the latencies."""
    times: list[float] = []
    stop_at = time.monotonic() + seconds

    async def session(client: BenchClient, share: list[Request]) -> None:
        i = 0
        while time.monotonic() < stop_at:
            elapsed, _ = await client.inline(share[i % len(share)])
            times.append(elapsed)
            i += 1

    await asyncio.gather(*(session(c, s) for c, s in zip(clients, shares, strict=True)))
    return times


def give_feedback(db: Path) -> int:
    """Accept every completion with an even row id, reject and correct the others (so training has work)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT rowid, id, session_id FROM completions").fetchall()
        now = datetime.now(UTC).isoformat(sep=" ")
        conn.executemany(
            "INSERT INTO events (session_id, completion_id, kind, inferred, truncated, created_at, text) "
            "VALUES (?, ?, ?, 0, 0, ?, ?)",
            [(sid, cid, "accepted" if rowid % 2 == 0 else "rejected", now, None) for rowid, cid, sid in rows]
            # Corrections give the round OPD samples to train on (single candidates make no GRPO group).
            + [(sid, cid, "correction", now, "add type hints") for rowid, cid, sid in rows if rowid % 2],
        )
        conn.execute("UPDATE sessions SET ended_at = ? WHERE ended_at IS NULL", (now,))
    return len(rows)


def first_served(db: Path, version: str) -> float | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT MIN(created_at) FROM completions WHERE adapter_version = ?", (version,)).fetchone()
    if row is None or row[0] is None:
        return None
    return datetime.fromisoformat(row[0]).replace(tzinfo=UTC).timestamp()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernel import paths

    model = paths.default_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="heedful-bench-swap-"))
    config, db = write_config(tmp, model)
    adapters = tmp / "adapters"
    sources = [make_adapter(model, tmp / f"lora-{i}", seed=i) for i in range(1 + args.swaps)]
    log = tmp / "server.log"
    env = dict(os.environ, HEEDFUL_DATA_DIR=str(tmp / "data"))
    # An adapter is active from the start, so steady state is a personalized developer's.
    await publish_db_ready(config, db)
    first, _ = await publish(db, sources[0], adapters)
    proc = await asyncio.create_subprocess_exec(
        *server_command(config, "--tcp", "--host", "127.0.0.1", "--port", "0"),
        cwd=str(ROOT), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("ab"), env=env,
    )  # fmt: skip
    clients: list[BenchClient] = []
    report: dict[str, Any] = {"sessions": args.sessions, "phase_s": args.phase_s}
    try:
        port = await wait_or_exit(proc, listening_port(log), log, 120)
        requests = cursor_requests(args.sessions * 5)
        shares = [requests[i :: args.sessions] for i in range(args.sessions)]
        for k in range(args.sessions):
            client = BenchClient(f"bench-dev-{k}", TEAM)
            await client.lc.start_tcp("127.0.0.1", port)
            await wait_or_exit(proc, client.initialize(), log, 120)
            clients.append(client)
        await wait_or_exit(proc, clients[0].wait_ready(900), log, 900)
        for c, share in zip(clients, shares, strict=True):
            for r in share:
                c.open(r)
        await load(clients, shares, 5)  # warm-up, not measured

        steady = await load(clients, shares, args.phase_s)

        swap_times: list[float] = []
        published: list[tuple[str, float]] = []

        async def swapper() -> None:
            for src in sources[1:]:
                await asyncio.sleep(args.swap_every)
                published.append(await publish(db, src, adapters))

        swapping, _ = await asyncio.gather(load(clients, shares, args.phase_s), swapper())
        await asyncio.sleep(1)
        for version, at in published:
            served_at = first_served(db, version)
            if served_at is not None:
                swap_times.append(served_at - at)

        feedback = give_feedback(db)
        trainer = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "--config", str(config), "train", "--once", "--force",
            "--scope", f"team:{TEAM}", "--adapters-dir", str(adapters),
            cwd=str(ROOT), stdout=asyncio.subprocess.DEVNULL, stderr=(tmp / "train.log").open("ab"), env=env,
        )  # fmt: skip
        await asyncio.sleep(3)  # model load; then serve while it trains
        training = await load(clients, shares, args.phase_s)
        training_alive = trainer.returncode is None
        if trainer.returncode is None:
            trainer.terminate()
        await trainer.wait()
        report.update(
            steady=percentiles(steady) | {"n": len(steady)},
            swaps=percentiles(swapping) | {"n": len(swapping), "published": len(published)},
            training=percentiles(training) | {"n": len(training), "worker_ran_whole_phase": training_alive},
            publish_to_serve_s=swap_times,
            feedback_events=feedback,
            first_adapter=first,
        )
    finally:
        for c in clients:
            await c.close()
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
    if not report.get("steady"):
        raise BenchError(f"no measurements; the server's log:\n{log_tail(log)}")
    return report


async def publish_db_ready(config: Path, db: Path) -> None:
    """Create the store's schema (the server would on start; publishing comes first here)."""
    from kernel.settings import Settings

    settings = Settings()
    settings.database.url = f"sqlite+aiosqlite:///{db}"
    store = await open_store(settings)
    await store.close()


async def listening_port(log: Path) -> int:
    import re

    while True:
        found = re.search(r"heedful: listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        await asyncio.sleep(0.1)


def print_table(r: dict[str, Any]) -> None:
    steady = r["steady"]
    print(f"adapter swaps and training beside serving: {r['sessions']} sessions, {r['phase_s']} s per phase")
    print(f"{'phase':<34} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'p99 / steady':>13}")
    for key, label in (
        ("steady", "steady (team adapter active)"),
        ("swaps", f"swaps ({r['swaps']['published']} published)"),
        ("training", "training worker running"),
    ):
        row = r[key]
        print(
            f"{label:<34} {row['n']:>5} {row['p50'] * 1000:>8.0f} {row['p99'] * 1000:>8.0f} "
            f"{row['p99'] / steady['p99']:>13.2f}"
        )
    swaps = r["publish_to_serve_s"]
    if swaps:
        print(
            f"publish -> first completion served by it: mean {statistics.fmean(swaps):.2f} s, "
            f"max {max(swaps):.2f} s over {len(swaps)} swaps"
        )
    if not r["training"]["worker_ran_whole_phase"]:
        print("note: the training worker finished before the phase ended")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2, help="concurrent editor sessions (default 2)")
    parser.add_argument("--phase-s", type=float, default=40.0, help="seconds of load per phase (default 40)")
    parser.add_argument("--swap-every", type=float, default=8.0, help="seconds between publishes (default 8)")
    parser.add_argument("--swaps", type=int, default=4, help="adapters published in the swap phase (default 4)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.sessions < 1 or args.phase_s <= 0 or args.swap_every <= 0 or args.swaps < 1:
        parser.error("--sessions, --swaps must be >= 1 and --phase-s, --swap-every > 0")
    await report_or_exit("bench.swap", run(args), args.json, print_table)


if __name__ == "__main__":
    asyncio.run(main())
