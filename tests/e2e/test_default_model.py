"""The whole loop on the model a developer gets by default (Qwen2.5-Coder-0.5B-Instruct), in one editor
session: `heedful serve` with its embedded engine completes code, the developer accepts, rewrites and
corrects, `heedful train --once` trains a round and publishes an adapter, and the running server swaps
it in: the same session's next completions come from it, folded into the weights (the developer is
alone on the engine), without a restart.

The mechanics of each step are tested on the small model elsewhere; this is what a developer meets.
"""

from __future__ import annotations

import ast
import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from personalization.rollouts import settle_seconds
from tests.e2e.client import HeedfulClient, running_client
from tests.e2e.test_lsp_flow import completion_id, serve_item
from tests.e2e.test_personalization import wait_adapter
from tests.integration.test_training import TRAIN
from tests.procs import run_heedful

pytestmark = pytest.mark.engine

HEADER = '"""Helpers for the billing service."""\n\n\n'


def config_for(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    db = tmp_path / "heedful.db"
    config = tmp_path / "heedful.toml"
    config.write_text(
        f"""
[model]
path = "{model}"

[engine]
kv_cache_gib = 1
merge_window_s = 2.0

[completion]
timeout_ms = 120000
temperature = 0.0
group_sample_rate = 1.0
max_tokens = 24

[feedback]
edit_snapshot_delays_s = [1.0, 2.0]

[training]
in_server = false
steps_per_round = 2
batch_size = 4
min_new_rollouts = 4
threads = 2
nice = 0

# About the loop; the HumanEval gate of a round on this model: tests/integration/test_ability_gate.py.
[thresholds]
humaneval_cases = 0

[database]
url = "sqlite+aiosqlite:///{db}"
"""
    )
    return config, db


async def react(client: HeedfulClient, turns: int) -> dict[str, int]:
    """Signatures completed and reacted to as a developer who wants type hints does."""
    counts = {"accepted": 0, "rewritten": 0, "corrected": 0}
    for i, (name, param, ptype, ret) in enumerate(TRAIN[:turns]):
        uri = f"file:///work/billing/{name}.py"
        text = f"{HEADER}def {name}({param}"
        client.open(uri, text)
        line, col = text.count("\n"), len(text.rsplit("\n", 1)[-1])
        item = await serve_item(client, uri, line, col)
        shown, cid = str(item.insert_text), completion_id(item)
        client.notify("textDocument/didShowCompletion", {"item": client.lc.protocol._converter.unstructure(item)})
        if i % 3 == 2:
            client.notify("heedful/didRejectCompletion", {"completionId": cid})
            await client.command("heedful.feedback", {"text": "add type hints", "completionId": cid})
            counts["corrected"] += 1
            continue
        client.change(uri, [((line, col), (line, col), shown)])
        await client.command("heedful.acceptCompletion", {"completionId": cid})
        client.change(uri, [((line, col), (line, col + len(shown)), f": {ptype}) -> {ret}:")])
        counts["rewritten"] += 1
    await asyncio.sleep(2.5)  # the edit snapshots (1 s and 2 s) record what the developer kept
    return counts


async def test_the_default_model_completes_code_learns_and_swaps_in_one_session(
    tmp_path: Path, default_model: Path
) -> None:
    config, db = config_for(tmp_path, default_model)
    log = tmp_path / "server.log"
    options = {"developerId": "coder", "sessionId": "coder-1", "team": "alpha"}
    async with running_client("vscode", config, log, options) as client:
        ready = await client.wait_status("ready", timeout=900)
        assert ready["engine"] == "embedded" and ready["adapter"] is None
        assert ready["adapterServing"] == "merged"

        # A function body: the suggestion is Python that parses as the body's start.
        uri = "file:///work/billing/discount.py"
        signature = "def apply_discount(price: float, percent: float) -> float:\n"
        text = f'{HEADER}{signature}    """Return price reduced by percent."""\n    '
        client.open(uri, text)
        item = await serve_item(client, uri, text.count("\n"), 4)
        body = str(item.insert_text)
        print("default model's body:", repr(body))
        first = body.split("\n", 1)[0]
        assert first.strip() and not first.lstrip().startswith(("#", '"""', "def ")), body
        ast.parse(text + first + ("\n        pass" if first.rstrip().endswith(":") else ""))

        counts = await react(client, 6)
        # The session goes on: the training worker takes a live session's completions once their last edit
        # snapshot is due, with its margin (the worker's own rule).
        await asyncio.sleep(settle_seconds([1.0, 2.0]) + 1.0)
        proc = run_heedful(config, "train", "--once", "--scope", "developer:coder", timeout=1800)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (result,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        print("feedback:", counts, "round:", json.dumps(result["metrics"], default=str)[:1500])
        assert result["status"] == "published", result
        assert result["metrics"]["opd_samples"] == counts["corrected"]
        version = result["version"]

        # The running server swaps the new adapter in for this developer; the next completion uses it.
        await wait_adapter(client, version, timeout=30.0)
        again = "file:///work/billing/fees.py"
        client.open(again, f"{HEADER}def total_fees(items")
        after = await serve_item(client, again, 3, len("def total_fees(items"))
        assert str(after.insert_text)
    with sqlite3.connect(db) as conn:
        (last,) = conn.execute("SELECT adapter_version FROM completions ORDER BY created_at DESC LIMIT 1").fetchone()
    assert last == version
    assert "merged with adapter" in log.read_text(errors="replace")  # served from folded weights
