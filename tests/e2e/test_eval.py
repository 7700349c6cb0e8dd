"""A short `heedful eval` end to end: personas through the real LSP server, the worker, the swap.

It proves the evaluation does not go around the server: every completion it scored is the one the
server stored for that developer's session (id, shown text, adapter version, arm), held-out
completions never became training data, and the report renders from the evaluation's store.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.procs import ROOT, run_heedful

pytestmark = [pytest.mark.engine, pytest.mark.remote]

CONTRACT = {"correction_rate_before", "correction_rate_after", "crr", "kl", "accept_rate", "perplexity_delta"}


def rows(db: Path, sql: str, *params: object) -> list[sqlite3.Row]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql, params))


def test_a_short_eval_scores_what_the_server_served(tmp_path: Path, small_model: Path, vllm_server: str) -> None:
    config = tmp_path / "heedful.toml"
    config.write_text(
        f'[model]\npath = "{small_model}"\n\n[engine]\nmode = "remote"\nurl = "{vllm_server}"\n\n'
        "[completion]\nmax_tokens = 24\n\n[training]\nthreads = 2\nnice = 0\nbatch_size = 4\n"
        "[thresholds]\nhumaneval_cases = 0\n"  # about what the evaluation scores; the gate: test_ability_gate.py
    )
    out = tmp_path / "eval"
    persona = f"{ROOT}/personalization/personas.py:TypeHints"  # loaded from a file, as a user's own would be
    proc = run_heedful(
        config, "eval", "--persona", persona, "--arm", "rl", "--arm", "baseline", "--rounds", "1",
        "--train-prompts", "6", "--held-out", "4", "--steps", "4", "--out", str(out), timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["arm"]: r for r in json.loads(proc.stdout)["results"]}
    assert set(results) == {"rl", "baseline"}
    for r in results.values():
        assert set(r) >= CONTRACT, r
        assert r["persona"] == "type-hints" and r["held_out_prompts"] == 4 and r["train_prompts"] == 6
        assert sum(r["feedback_events"].values()) == 6
    assert "type-hints/rl round 1/1: train corrections" in proc.stderr  # per-round summary on stderr
    rl, baseline = results["rl"], results["baseline"]
    assert rl["adapter"] is not None and 0.0 <= rl["kl"] <= 5.0, rl
    assert rl["perplexity_base"] > 0 and rl["perplexity_adapter"] > 0
    assert baseline["adapter"] is None and baseline["kl"] == 0.0

    details = {r["arm"]: r for r in json.loads((out / "eval.json").read_text())["results"]}
    db = out / "heedful.db"
    for arm, result in details.items():
        developer = result["developer"]
        stored = {
            r["id"]: r
            for r in rows(
                db,
                "SELECT c.id, c.arm, c.adapter_version, c.session_id, c.prompt, k.text FROM completions c "
                'JOIN candidates k ON k.completion_id = c.id AND k."index" = c.shown_index WHERE c.developer_id = ?',
                developer,
            )
        }
        turns = result["turns"]
        assert len(turns) == 4 + 6 + 4
        # Every scored suggestion is the server's, for this developer's session, with the text it showed; a
        # request the server answered with nothing (the model had nothing to add) is scored as empty.
        served = [t for t in turns if t["completion_id"] is not None]
        assert all(t["text"] == "" and not t["accepted"] and not t["corrected"] for t in turns if t not in served)
        assert {t["completion_id"] for t in served} == set(stored) and len(served) == len(stored)
        for t in served:
            row = stored[t["completion_id"]]
            assert row["text"] == t["text"] and row["arm"] == arm and row["session_id"] == f"{developer}-1"
            assert row["adapter_version"] == t["adapter"]
        held = [t for t in served if t["phase"] in ("before", "round-1")]
        after = [t for t in served if t["phase"] == "round-1"]
        if arm == "rl":
            assert {t["adapter"] for t in after} == {result["adapter"]}
            assert {t["adapter"] for t in served if t["phase"] != "round-1"} == {None}
        # Held-out suggestions were shown and never acted on: none of them is training data.
        statuses = {
            r["completion_id"]: (r["status"], r["reason"])
            for r in rows(db, "SELECT completion_id, status, reason FROM rollouts WHERE developer_id = ?", developer)
        }
        assert {statuses[t["completion_id"]] for t in held if t["completion_id"] in statuses} <= {
            ("discarded", "no feedback signal")
        }
        # A training group (the shown candidate and G-1 more) was sampled for the train turns only.
        candidates = {
            r["completion_id"]: r["n"]
            for r in rows(
                db,
                "SELECT k.completion_id, COUNT(*) AS n FROM candidates k JOIN completions c ON c.id = k.completion_id "
                "WHERE c.developer_id = ? GROUP BY k.completion_id",
                developer,
            )
        }
        assert {candidates[t["completion_id"]] for t in held} == {1}
        assert {candidates[t["completion_id"]] for t in served if t["phase"] == "train-1"} == {4}
        if arm == "baseline" and result["feedback_events"]["corrected"]:
            # The baseline arm's after pass carries the developer's corrections in the prompt.
            assert all("# - Always add type hints" in stored[t["completion_id"]]["prompt"] for t in after)

    report = tmp_path / "report.html"
    shown = run_heedful(out / "config-rl.toml", "report", "--out", str(report))
    assert shown.returncode == 0, shown.stderr
    html = report.read_text()
    assert details["rl"]["developer"] in html and details["baseline"]["developer"] in html
