"""The whole loop through the real server: feedback in, `heedful train --once`, the developer's next
completions come from the new adapter, another team's developer keeps the base model, and a rollback
takes the adapter out of serving within seconds.

The developer wants type hints: a signature completion with them is accepted; one without is, turn by
turn, accepted and rewritten into a hinted one, or rejected with the correction "add type hints".
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.client import HeedfulClient, running_client
from tests.e2e.conftest import write_config
from tests.e2e.test_lsp_flow import completion_id, serve_item
from tests.integration.test_training import HELD_OUT as TYPE_HINT_HELD_OUT
from tests.integration.test_training import TRAIN as TYPE_HINT_TRAIN
from tests.integration.test_training import hinted
from tests.procs import run_heedful

pytestmark = [pytest.mark.engine, pytest.mark.remote]

HEADER = '"""Helpers for the billing service."""\n\n\n'
TRAIN = TYPE_HINT_TRAIN[:16]
HELD_OUT = TYPE_HINT_HELD_OUT[:8]
TRAINING = """
[training]
steps_per_round = 16
batch_size = 8
min_new_rollouts = 8
threads = 2
nice = 0

[thresholds]
humaneval_cases = 0  # this test is about who is served what; the ability gate: tests/integration/test_ability_gate.py
"""


def signature(name: str, param: str) -> str:
    return f"{HEADER}def {name}({param}"


async def give_feedback(client: HeedfulClient) -> dict[str, int]:
    """The developer's session: one signature per file, reacted to as a type-hint lover would."""
    counts = {"accepted": 0, "rewritten": 0, "corrected": 0}
    for i, (name, param, ptype, ret) in enumerate(TRAIN):
        uri = f"file:///work/billing/{name}.py"
        text = signature(name, param)
        client.open(uri, text)
        line, col = text.count("\n"), len(text.rsplit("\n", 1)[-1])
        item = await serve_item(client, uri, line, col)
        shown = str(item.insert_text)
        cid = completion_id(item)
        client.notify("textDocument/didShowCompletion", {"item": client.lc.protocol._converter.unstructure(item)})
        if not hinted(shown) and i % 2:
            client.notify("heedful/didRejectCompletion", {"completionId": cid})
            await client.command("heedful.feedback", {"text": "add type hints", "completionId": cid})
            counts["corrected"] += 1
            continue
        client.change(uri, [((line, col), (line, col), shown)])
        await client.command("heedful.acceptCompletion", {"completionId": cid})
        if hinted(shown):
            counts["accepted"] += 1
        else:  # accepted, then rewritten into what the developer wanted
            end = (line, col + len(shown))
            client.change(uri, [((line, col), end, f": {ptype}) -> {ret}:")])
            counts["rewritten"] += 1
    await asyncio.sleep(2.5)  # the edit snapshots (1 s and 2 s here) record what was kept
    return counts


async def held_out(client: HeedfulClient, tag: str) -> list[str]:
    texts = []
    for name, param in HELD_OUT:
        uri = f"file:///work/{tag}/billing/{name}.py"  # the prompt names the file "billing/<name>.py" for every tag
        text = signature(name, param)
        client.open(uri, text)
        item = await serve_item(client, uri, text.count("\n"), len(text.rsplit("\n", 1)[-1]))
        texts.append(str(item.insert_text))
    return texts


async def wait_adapter(client: HeedfulClient, version: str | None, timeout: float = 15.0) -> float:
    """Seconds until the server's status says `version` serves this developer."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if client.statuses and client.statuses[-1].get("adapter") == version:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"the status never said adapter {version!r}: {client.statuses[-3:]}")


async def test_feedback_trains_an_adapter_that_serves_its_developer_only(
    tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    adapters = tmp_path / "adapters"
    setup = write_config(tmp_path, small_model, vllm_server, TRAINING)
    hinter = {"developerId": "hinter", "sessionId": "hinter-1", "team": "alpha"}
    async with running_client("vscode", setup.config, setup.log, hinter) as client:
        await client.wait_status("ready")
        counts = await give_feedback(client)

    proc = run_heedful(
        setup.config, "train", "--once", "--scope", "developer:hinter", "--adapters-dir", str(adapters), timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print("feedback:", counts, "round:", json.dumps(result["metrics"], default=str)[:1500])
    assert result["status"] == "published", result
    version = result["version"]
    assert result["metrics"]["opd_samples"] == counts["corrected"]

    other = {"developerId": "other", "sessionId": "other-1", "team": "beta"}
    hinter2 = {**hinter, "sessionId": "hinter-2"}
    async with (
        running_client("vscode", setup.config, setup.log, hinter2) as mine,
        running_client("neovim", setup.config, setup.log, other) as theirs,
    ):
        await mine.wait_status("ready")
        await theirs.wait_status("ready")
        await wait_adapter(mine, version)
        tuned = await held_out(mine, "mine")
        base = await held_out(theirs, "theirs")
        print(
            "held-out with hints: adapter", sum(map(hinted, tuned)), "base", sum(map(hinted, base)), "of", len(HELD_OUT)
        )
        # One short round on 16 turns: the served output changes. How far it moves toward what the developer
        # wants is measured where there is enough training to say so: tests/integration/test_training.py
        # (2/12 -> 12/12 held-out) and `heedful eval`. Eight held-out prompts after 16 steps are too few to
        # assert a direction without flakiness (one CI run saw 0 vs 1).
        assert tuned != base
        assert theirs.statuses[-1]["adapter"] is None

        # An admin rolls the adapter back: within seconds the developer is served by the base model again.
        rolled = run_heedful(setup.config, "adapters", "rollback", "--scope", "developer:hinter", "--reason", "test")
        assert rolled.returncode == 0, rolled.stderr
        assert json.loads(rolled.stdout) == {"scope": "developer:hinter", "rolled_back": version, "active": None}
        took = await wait_adapter(mine, None)
        assert took < 5.0
        after = await held_out(mine, "after")
        # Greedy, same prompts: the base model's answers, type hints exactly where the base put them. vLLM on
        # CPU is not batch-invariant (a prompt run in another batch or from a cached prefix can flip a
        # near-tie token), so a text or two may differ in wording; the stored versions below say None.
        assert [hinted(t) for t in after] == [hinted(t) for t in base]
        assert sum(a == b for a, b in zip(after, base, strict=True)) >= len(base) - 2, (after, base)

    rows = setup.rows("SELECT developer_id, adapter_version, arm, uri FROM completions WHERE session_id != 'hinter-1'")
    served: dict[str, set[Any]] = {}
    for r in rows:
        served.setdefault(f"{r['developer_id']}/{r['uri'].split('/')[4]}", set()).add(r["adapter_version"])
        assert r["arm"] == "rl"
    assert served == {"hinter/mine": {version}, "other/theirs": {None}, "hinter/after": {None}}
    listing = run_heedful(setup.config, "adapters", "list", "--scope", "developer:hinter", "--json")
    (row,) = [json.loads(line) for line in listing.stdout.splitlines()]
    assert row["version"] == version and row["status"] == "rolled_back" and row["reason"] == "test"
    (audit,) = setup.rows("SELECT actor, reason, detail FROM audit_log WHERE action = 'rollback'")
    assert audit["actor"].startswith("cli:") and json.loads(audit["detail"])["from"] == version


async def test_the_baseline_arm_puts_the_developers_corrections_into_the_prompt(
    tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    setup = write_config(tmp_path, small_model, vllm_server, '[experiment]\narms = ["baseline"]\n')
    options = {"developerId": "corrector", "sessionId": "corrector-1", "team": "alpha"}
    async with running_client("vscode", setup.config, setup.log, options) as client:
        ready = await client.wait_status("ready")
        assert ready["arm"] == "baseline" and ready["adapter"] is None
        uri = "file:///work/tools/files.py"
        text = "import os\n\n\ndef list_files(folder):\n    "
        client.open(uri, text)
        await serve_item(client, uri, 4, 4)
        await client.command("heedful.feedback", {"text": "use pathlib, not os.path"})
        await serve_item(client, uri, 4, 4)
    first, second = setup.rows("SELECT prompt, arm, adapter_version FROM completions ORDER BY created_at")
    assert first["arm"] == second["arm"] == "baseline"
    assert first["adapter_version"] is None and second["adapter_version"] is None
    assert "corrections to earlier suggestions" not in first["prompt"]
    assert second["prompt"].startswith(
        "# file: tools/files.py\n"
        "# The developer's corrections to earlier suggestions:\n"
        "# - use pathlib, not os.path\n"
        "import os\n"
    )
