"""The whole loop through the real server, as a developer meets it: `heedful serve` with the default
training settings learns from the session by itself (its in-server training worker collects the
feedback, trains a round and publishes), and without a restart the same session is served the new
adapter, which `heedful/status` reports with the learning state along the way; another team's
developer keeps the base model, and a rollback takes the adapter out of serving within seconds.

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
TRAIN = TYPE_HINT_TRAIN[:20]  # training.min_new_rollouts (16) and a few more
HELD_OUT = TYPE_HINT_HELD_OUT[:8]
# Every training setting at its default. The ability gate is off: this test is about who is served what,
# and the small model passes too few HumanEval cases (about 3 of 40) for the gate to be more than noise
# here; it is tested, on the default model, in tests/integration/test_ability_gate.py.
THRESHOLDS = "\n[thresholds]\nhumaneval_cases = 0\n"


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


async def test_the_servers_own_worker_learns_and_the_session_is_served_the_adapter_only_its_developer_gets(
    tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    setup = write_config(tmp_path, small_model, vllm_server, THRESHOLDS, training="")
    env = {"HEEDFUL_DATA_DIR": str(tmp_path / "data")}  # the worker's log and lock
    hinter = {"developerId": "hinter", "sessionId": "hinter-1", "team": "alpha"}
    async with running_client("vscode", setup.config, setup.log, hinter, env=env) as mine:
        ready = await mine.wait_status("ready")
        assert ready["learning"] in (None, {"state": "collecting", "trainer": "in-server", "feedback": 0, "needed": 16})
        counts = await give_feedback(mine)

        # No worker started by hand: the server's child collects the settled turns, trains, gates, publishes.
        version = await wait_published(mine, timeout=1500.0, log=tmp_path / "data" / "logs" / "train.log")
        learning = [s["learning"] for s in mine.statuses if s.get("learning")]
        print("feedback:", counts, "learning states:", [(x["state"], x.get("phase"), x.get("step")) for x in learning])
        # Collecting toward the next round, then the round (the pass that collects 16 starts it at once).
        assert learning[0] == {"state": "collecting", "trainer": "in-server", "feedback": 0, "needed": 16}
        training = [x for x in learning if x["state"] == "training"]
        assert any(x["phase"] == "training" and x["steps"] == 24 for x in training)
        assert all(16 <= x["rollouts"] <= len(TRAIN) for x in training)
        last = await wait_last_round(mine)  # the learning state is read every 2 s, the adapters every 0.5 s
        assert last["status"] == "published" and last["version"] == version, last
        (round_row,) = setup.rows("SELECT metrics FROM adapter_versions WHERE id = ?", version)
        metrics = json.loads(round_row["metrics"])
        # The worker's pass may come while the last turns settle: a round starts at 16 collected rollouts.
        assert 16 <= metrics["rollouts"] <= len(TRAIN) and 0 < metrics["opd_samples"] <= counts["corrected"]
        assert metrics["steps_done"] <= 24 and mine.statuses[-1]["adapter"] == version

        other = {"developerId": "other", "sessionId": "other-1", "team": "beta"}
        async with running_client("neovim", setup.config, setup.log, other, env=env) as theirs:
            await theirs.wait_status("ready")
            tuned = await held_out(mine, "mine")
            base = await held_out(theirs, "theirs")
            print("held-out hinted: adapter", sum(map(hinted, tuned)), "base", sum(map(hinted, base)), "/", len(base))
            # One short round on 20 turns: the served output changes. How far it moves toward what the
            # developer wants is measured where there is enough training to say so:
            # tests/integration/test_training.py (2/12 -> 12/12 held-out) and `heedful eval`. Eight held-out
            # prompts are too few to assert a direction without flakiness (one CI run saw 0 vs 1).
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

    rows = setup.rows("SELECT developer_id, adapter_version, arm, uri FROM completions")
    served: dict[str, set[Any]] = {}
    for r in rows:
        tag = r["uri"].split("/")[4]
        if tag in ("mine", "theirs", "after"):
            served.setdefault(f"{r['developer_id']}/{tag}", set()).add(r["adapter_version"])
        assert r["arm"] == "rl"
    assert served == {"hinter/mine": {version}, "other/theirs": {None}, "hinter/after": {None}}
    listing = run_heedful(setup.config, "adapters", "list", "--scope", "developer:hinter", "--json")
    (row,) = [json.loads(line) for line in listing.stdout.splitlines()]
    assert row["version"] == version and row["status"] == "rolled_back" and row["reason"] == "test"
    (audit,) = setup.rows("SELECT actor, reason, detail FROM audit_log WHERE action = 'rollback'")
    assert audit["actor"].startswith("cli:") and json.loads(audit["detail"])["from"] == version


async def wait_last_round(client: HeedfulClient, timeout: float = 15.0) -> dict[str, Any]:
    """The status's account of the last training round, once it has one."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        last = (client.statuses[-1].get("learning") or {}).get("lastRound") if client.statuses else None
        if last:
            return dict(last)
        await asyncio.sleep(0.2)
    raise AssertionError(f"the status never told of a finished round: {client.statuses[-2:]}")


async def wait_published(client: HeedfulClient, timeout: float, log: Path) -> str:
    """The adapter version the status says serves this developer, once one does."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if client.statuses and client.statuses[-1].get("adapter"):
            return str(client.statuses[-1]["adapter"])
        await asyncio.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no training log)"
    raise AssertionError(f"no adapter served after {timeout:.0f} s: {client.statuses[-2:]}\n{tail}")


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
