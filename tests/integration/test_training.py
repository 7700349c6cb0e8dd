"""One `heedful train --once` on the real model teaches a simulated developer's preference: type hints.

The simulated developer accepts signature completions that carry type hints. One without them is,
turn by turn, either accepted and then rewritten into a hinted signature (the kept text is the next
state: hindsight judging and a demonstration) or rejected with the correction "add type hints"
(on-policy distillation). Candidates come from the real engine; the store is a real SQLite file;
training runs in the real CLI subprocess. Then the published adapter is loaded into the engine and
compared with the base model on held-out functions: greedy (what serving shows) and sampled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kernel.settings import Settings
from lsp_handlers.feedback import survival_ratio
from server.engine import AdapterRef
from server.engine.embedded import EmbeddedEngine
from server.stores import open_store
from storage.repositories import AdapterRepository, Scope
from storage.store import CandidateRecord, CompletionRecord, EventRecord, SessionStart

pytestmark = [pytest.mark.engine]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = '"""Helpers for the billing service."""\n\n\ndef {name}({param}'
# (function, first parameter, the parameter's type, the return type) the developer would write.
TRAIN = [
    ("load_users", "path", "str", "list[str]"),
    ("parse_config", "text", "str", "dict"),
    ("read_rows", "filename", "str", "list[dict]"),
    ("send_invoice", "invoice", "dict", "None"),
    ("count_words", "text", "str", "int"),
    ("merge_totals", "totals", "list[float]", "float"),
    ("fetch_rate", "currency", "str", "float"),
    ("save_report", "report", "dict", "None"),
    ("split_lines", "data", "str", "list[str]"),
    ("build_index", "items", "list[str]", "dict"),
    ("find_largest", "values", "list[int]", "int"),
    ("to_snake_case", "name", "str", "str"),
    ("round_amount", "amount", "float", "float"),
    ("is_overdue", "days", "int", "bool"),
    ("format_date", "stamp", "float", "str"),
    ("apply_discount", "price", "float", "float"),
    ("load_prices", "path", "str", "list[float]"),
    ("validate_email", "address", "str", "bool"),
    ("group_orders", "orders", "list[dict]", "dict"),
    ("strip_tags", "html", "str", "str"),
    ("average_score", "scores", "list[float]", "float"),
    ("open_session", "url", "str", "None"),
    ("pad_number", "number", "int", "str"),
    ("hash_password", "password", "str", "str"),
]
HELD_OUT = [
    ("compute_tax", "amount"),
    ("load_accounts", "path"),
    ("normalise_name", "name"),
    ("sum_payments", "payments"),
    ("parse_amount", "text"),
    ("close_ledger", "ledger"),
    ("count_invoices", "invoices"),
    ("render_receipt", "receipt"),
    ("read_settings", "filename"),
    ("convert_currency", "amount"),
    ("list_customers", "database"),
    ("check_balance", "account"),
]


def hinted(completion: str) -> bool:
    """A signature completion with a parameter annotation or a return annotation."""
    first = completion.split("\n", 1)[0]
    return bool(re.match(r"\s*:\s*[A-Za-z_]", first)) or "->" in first


async def record_sessions(settings: Settings, engine: EmbeddedEngine) -> dict[str, int]:
    store = await open_store(settings, tokenize=engine.tokenize)
    counts = {"shown_hinted": 0, "rewritten": 0, "corrected": 0}
    try:
        await store.start_session(SessionStart("train-session", "hinter"))
        for i, (name, param, ptype, ret) in enumerate(TRAIN):
            prompt = PREFIX.format(name=name, param=param)
            gen = await engine.generate(prompt, n=4, max_tokens=12, temperature=1.0, stop=["\n"], seed=100 + i)
            cands = [CandidateRecord(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in gen.candidates]
            cid = f"c-{uuid.uuid4().hex}"
            await store.record_completion(
                CompletionRecord(cid, "train-session", "hinter", prompt, gen.prompt_token_ids, cands, shown_index=0)
            )
            shown = cands[0].text
            if not hinted(shown) and i % 2:
                counts["corrected"] += 1
                await store.record_event(EventRecord("train-session", "rejected", cid))
                await store.record_event(EventRecord("train-session", "correction", cid, text="add type hints"))
                continue
            await store.record_event(EventRecord("train-session", "accepted", cid, accepted_length=len(shown)))
            if hinted(shown):
                counts["shown_hinted"] += 1
                kept, ratio = shown, 1.0
            else:
                counts["rewritten"] += 1
                kept = f": {ptype}) -> {ret}:"
                ratio = survival_ratio(shown, kept)
            for delay in (30.0, 120.0):
                await store.record_event(
                    EventRecord(
                        "train-session", "edit_snapshot", cid, delay_s=delay, survival_ratio=ratio, kept_text=kept
                    )
                )
        await store.end_session("train-session")
    finally:
        await store.close()
    return counts


SAMPLES = 4


async def count_hinted(engine: EmbeddedEngine, adapter: AdapterRef | None) -> tuple[int, int]:
    """Held-out completions with type hints: (greedy, out of len(HELD_OUT); sampled, out of SAMPLES times that)."""
    greedy = sampled = 0
    for i, (name, param) in enumerate(HELD_OUT):
        prompt = PREFIX.format(name=name, param=param)
        gen = await engine.generate(prompt, max_tokens=12, temperature=0.0, stop=["\n"], adapter=adapter)
        greedy += hinted(gen.candidates[0].text)
        gen = await engine.generate(
            prompt, n=SAMPLES, max_tokens=12, temperature=1.0, stop=["\n"], seed=500 + i, adapter=adapter
        )
        sampled += sum(hinted(c.text) for c in gen.candidates)
    return greedy, sampled


async def test_one_round_teaches_type_hints(embedded_engine: EmbeddedEngine, small_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "heedful.db"
    adapters = tmp_path / "adapters"
    config = tmp_path / "heedful.toml"
    config.write_text(
        f'[model]\npath = "{small_model}"\n\n[database]\nurl = "sqlite+aiosqlite:///{db}"\n\n'
        "[training]\nsteps_per_round = 24\nbatch_size = 8\nmin_new_rollouts = 8\nthreads = 2\nnice = 0\n"
        "[thresholds]\nhumaneval_cases = 0\n"  # about what a round teaches; the gate: test_ability_gate.py
    )
    settings = Settings()
    settings.model.path = str(small_model)
    settings.database.url = f"sqlite+aiosqlite:///{db}"
    counts = await record_sessions(settings, embedded_engine)

    proc = subprocess.run(
        [
            *(sys.executable, "-m", "server.cli", "--config", str(config)),
            *("train", "--once", "--scope", "developer:hinter", "--adapters-dir", str(adapters)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print("training round:", json.dumps(result, indent=1), "collected:", counts)
    assert result["status"] == "published", result
    metrics = result["metrics"]
    assert metrics["base_weights_unchanged"] is True
    assert metrics["gate_kl"] <= 5.0
    # A rewritten turn whose group has no positive member gets the kept text as a demonstration.
    assert metrics["demonstrations"] <= counts["rewritten"]
    assert metrics["judged"].get("hindsight", 0) > 0
    assert metrics["opd_samples"] == counts["corrected"] and metrics["opd_dropped"] == 0
    # The PRM was fitted on this developer's outcomes; its held-out accuracy is stored with the round.
    assert metrics["prm"]["examples"] >= counts["shown_hinted"] + counts["corrected"]

    store = await open_store(settings)
    try:
        async with store.unit() as s:
            active = await AdapterRepository(s).active(Scope.developer("hinter"))
    finally:
        await store.close()
    assert active is not None and active.id == result["version"]
    weights = load_file(str(Path(active.path) / "adapter_model.safetensors"))
    moved = [k for k, v in weights.items() if "lora_B" in k and float(v.abs().max()) > 0]
    assert moved, "the LoRA B matrices are still zero: the adapter did not move"

    base_greedy, base_sampled = await count_hinted(embedded_engine, None)
    ref = AdapterRef(f"hinter-{active.id}", 901, Path(active.path))
    await embedded_engine.load_adapter(ref)
    try:
        tuned_greedy, tuned_sampled = await count_hinted(embedded_engine, ref)
    finally:
        await embedded_engine.unload_adapter(ref)
    n, m = len(HELD_OUT), len(HELD_OUT) * SAMPLES
    print(
        f"held-out completions with type hints: greedy base {base_greedy}/{n} adapter {tuned_greedy}/{n}; "
        f"sampled base {base_sampled}/{m} adapter {tuned_sampled}/{m}"
    )
    assert tuned_sampled > base_sampled
    assert tuned_greedy > base_greedy
