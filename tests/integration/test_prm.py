"""The PRM judge on the real small model (SmolLM2-135M-Instruct).

The PRM task is synthetic but real text, shaped like a developer preference: completions of Python
functions whose signatures carry type hints are labelled +1, the same kind of functions without hints -1.
Names, parameters, types, bodies and module docstrings are drawn at random from pools, so the head has to
pick up the style, not memorise functions.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from personalization.prm import PRMExample, PRMJudge

VERBS = [
    "load", "parse", "compute", "merge", "render", "fetch", "validate", "split", "count", "normalize",
    "encode", "resolve", "format", "collect", "filter", "build", "scale", "sort", "hash", "read", "write",
    "find", "group", "convert", "apply", "summarize", "clean", "export",
]  # fmt: skip
NOUNS = [
    "user", "config", "records", "path", "token", "matrix", "invoice", "event", "payload", "header", "cache",
    "score", "image", "column", "message", "order", "session", "budget", "route", "sample", "report", "queue",
    "ledger", "metric", "profile", "batch",
]  # fmt: skip
# (name, type, default or None)
PARAMS = [
    ("path", "str", None), ("count", "int", None), ("items", "list[str]", None), ("ratio", "float", None),
    ("verbose", "bool", "False"), ("data", "bytes", None), ("mapping", "dict[str, int]", None),
    ("limit", "int | None", "None"), ("timeout", "float", "1.0"), ("strict", "bool", "True"),
    ("name", "str", None), ("values", "list[float]", None), ("key", "str", '"id"'), ("depth", "int", "3"),
    ("rows", "list[dict[str, Any]]", None), ("prefix", "str", '""'), ("weights", "tuple[float, ...]", None),
    ("encoding", "str", '"utf-8"'), ("index", "int", "0"), ("options", "dict[str, str] | None", "None"),
]  # fmt: skip
RETURNS = ["str", "int", "list[str]", "dict[str, Any]", "bool", "float", "None", "bytes", "tuple[int, int]"]
TOPICS = [
    "billing", "the search index", "user accounts", "image thumbnails", "log shipping", "the job scheduler",
    "CSV exports", "feature flags", "rate limiting", "email templates", "the metrics pipeline", "geocoding",
]  # fmt: skip
IMPORTS = ["import os", "import json", "import re", "import logging", "import math", "from pathlib import Path"]


def make_example(rng: random.Random, hinted: bool) -> PRMExample:
    topic = rng.choice(TOPICS)
    imports = "\n".join(sorted(rng.sample(IMPORTS, rng.randint(1, 3))))
    prompt = (
        f'"""Helpers for {topic}."""\n\nfrom __future__ import annotations\n\n{imports}\nfrom typing import Any\n\n'
        f"{rng.choice(['LIMIT', 'MAX_ITEMS', 'RETRIES', 'BATCH'])} = {rng.randint(2, 500)}\n\n\n"
    )
    name = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    params = rng.sample(PARAMS, rng.randint(1, 4))
    params.sort(key=lambda p: p[2] is not None)  # defaults last
    rendered = []
    for pname, ptype, default in params:
        if hinted:
            rendered.append(f"{pname}: {ptype}" + (f" = {default}" if default is not None else ""))
        else:
            rendered.append(pname + (f"={default}" if default is not None else ""))
    ret = f" -> {rng.choice(RETURNS)}" if hinted else ""
    first = params[0][0]
    body = rng.choice(
        [
            f"    return {first}",
            f"    result = {first}\n    return result",
            "    raise NotImplementedError",
            f"    if not {first}:\n        return None\n    return {first}",
            f'    log.debug("{name} %s", {first})\n    return {first}',
        ]
    )
    doc = f'    """{name.replace("_", " ").capitalize()}."""\n' if rng.random() < 0.5 else ""
    completion = f"def {name}({', '.join(rendered)}){ret}:\n{doc}{body}\n"
    return PRMExample(prompt=prompt, completion=completion, label=1 if hinted else -1)


def make_dataset(n: int, seed: int) -> list[PRMExample]:
    rng = random.Random(seed)
    return [make_example(rng, hinted=i % 2 == 0) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(small_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(small_model))


def test_prm_learns_type_hint_preference_and_round_trips(
    hf_model: Any, tokenizer: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = make_dataset(120, seed=7)
    started = time.perf_counter()
    judge = PRMJudge(model=hf_model, tokenizer=tokenizer, hidden_dropout=0.1, seed=0)
    report = judge.fit(examples, epochs=60, lr=1e-3, weight_decay=0.01, val_fraction=0.2)
    with capsys.disabled():
        print(f"\nPRM fit: {report} ({time.perf_counter() - started:.1f}s incl. features)")
    assert report.examples == 120
    assert report.positives == report.negatives == 60
    assert report.held_out_count == 24 and report.train_count == 96
    assert report.held_out_accuracy is not None
    assert report.held_out_accuracy > 0.75  # thresholds.prm_min_accuracy's default, with m=5 majority votes
    assert report.train_accuracy >= report.held_out_accuracy - 0.1

    # Fresh examples drawn from the same distribution, never seen in training.
    fresh = make_dataset(24, seed=99)
    fresh_accuracy = judge.accuracy(fresh, m=5)
    with capsys.disabled():
        print(f"PRM accuracy on 24 fresh examples: {fresh_accuracy:.3f}")
    assert fresh_accuracy > 0.75

    verdict, votes = judge.judge(fresh[0].prompt, fresh[0].completion, m=5)
    assert verdict in (-1, 0, 1)
    assert len(votes) == 5 and all(v in (-1, 1, None) for v in votes)

    # Save / load: same head, same features -> identical deterministic votes and, with the same dropout
    # masks (same RNG state), identical MC-dropout accuracy.
    judge.save(tmp_path / "prm")
    loaded = PRMJudge.load(tmp_path / "prm", model=hf_model, tokenizer=tokenizer)
    assert loaded.trained_on == 96 and loaded.held_out_accuracy == report.held_out_accuracy
    torch.manual_seed(123)
    a = judge.accuracy(fresh, m=5)
    torch.manual_seed(123)
    b = loaded.accuracy(fresh, m=5)
    assert a == b
    for ex in fresh:
        assert loaded.logit(ex.prompt, ex.completion) == pytest.approx(judge.logit(ex.prompt, ex.completion), abs=1e-5)
        assert loaded.votes(ex.prompt, ex.completion, mc_dropout=False) == judge.votes(
            ex.prompt, ex.completion, mc_dropout=False
        )


def test_prm_refuses_bad_training_sets_and_foreign_heads(hf_model: Any, tokenizer: Any, tmp_path: Path) -> None:
    judge = PRMJudge(model=hf_model, tokenizer=tokenizer)
    examples = make_dataset(40, seed=3)
    with pytest.raises(ValueError, match="at least 16"):
        judge.fit(examples[:10], epochs=1)
    with pytest.raises(ValueError, match="each class"):
        judge.fit([e for e in examples if e.label == 1], epochs=1)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        judge.fit([PRMExample(e.prompt, e.completion, 0) for e in examples], epochs=1)

    # A head saved for another hidden size is refused with the reason.
    judge.save(tmp_path / "prm")
    config_file = tmp_path / "prm" / "prm_head.json"
    config_file.write_text(config_file.read_text().replace('"hidden_size": 576', '"hidden_size": 960'))
    with pytest.raises(ValueError, match="hidden size 960.*hidden size 576"):
        PRMJudge.load(tmp_path / "prm", model=hf_model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="holds no PRM head"):
        PRMJudge.load(tmp_path / "nothing", model=hf_model, tokenizer=tokenizer)

    # An empty completion has nothing to judge: all votes fail, the verdict is 0.
    assert judge.judge("def f(", "", m=5) == (0, [None] * 5)
