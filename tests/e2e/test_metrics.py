"""The Prometheus endpoint of `heedful serve --metrics-port`: scraped over HTTP while an editor works,
parsed with Prometheus' own text parser.

Serving metrics come from the session (latency histogram, completions, feedback events by team and arm);
learning metrics come from adapter versions in the real store (active version and step per scope,
training loss and KL of each scope's latest adapter).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kernel.settings import Settings
from server.stores import open_store
from storage.repositories import AdapterRepository, Scope
from tests.e2e.client import HeedfulClient, running_client
from tests.e2e.conftest import ServerSetup
from tests.e2e.test_lsp_flow import completion_id, end_of

pytestmark = [pytest.mark.engine, pytest.mark.remote]

INLINE = "textDocument/inlineCompletion"


async def seed_adapters(db: Path) -> str:
    """A published team adapter and a newer, rejected developer adapter; the team version's id."""
    settings = Settings()
    settings.database.url = f"sqlite+aiosqlite:///{db}"
    store = await open_store(settings)
    try:
        async with store.unit() as s:
            repo = AdapterRepository(s)
            team = await repo.add_candidate(
                Scope.team("backend"), path="/a/team-v1", step=50, kl=0.4, metrics={"final_loss": 0.125}
            )
            await repo.activate(Scope.team("backend"), team.id)
            dev = await repo.add_candidate(
                Scope.developer("dev-m"), path="/a/dev-v1", step=20, kl=7.5, metrics={"final_loss": 0.25}
            )
            await repo.reject(Scope.developer("dev-m"), dev.id, "gate: KL 7.5 > thresholds.kl_max 5.0")
            return team.id
    finally:
        await store.close()


async def metrics_url(log: Path) -> str:
    for _ in range(300):
        found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", log.read_text() if log.exists() else "")
        if found:
            return found.group(1)
        await asyncio.sleep(0.1)
    raise AssertionError(f"the server never said where its metrics are:\n{log.read_text()}")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def serve_inline(client: HeedfulClient, uri: str) -> str:
    result = await client.inline(uri, 1, 11)
    assert result is not None and result.items and result.items[0].command is not None
    return str(result.items[0].command.arguments[0]["completionId"])  # type: ignore[index]


async def test_metrics_endpoint_counts_serving_and_reads_learning_from_the_store(lsp_setup: ServerSetup) -> None:
    version = await seed_adapters(lsp_setup.db)
    options = {"developerId": "dev-m", "sessionId": "session-metrics", "team": "backend"}
    command = ["serve", "--metrics-port", "0"]
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options, args=command) as client:
        url = await metrics_url(lsp_setup.log)
        await client.wait_status("ready")
        uri = "file:///w/m.py"
        client.open(uri, "def area(radius):\n    return ")
        result = await client.inline(uri, 1, 11)
        assert result is not None and result.items
        first, text = completion_id(result.items[0]), str(result.items[0].insert_text)
        second = await serve_inline(client, uri)
        client.notify("heedful/didRejectCompletion", {"completionId": second})
        await client.command("heedful.feedback", {"text": "Always add type hints"})
        # The first is taken, then cut down to its first 3 characters: 3 are kept at the last snapshot (2 s).
        client.change(uri, [((1, 11), (1, 11), text)])
        await client.command("heedful.acceptCompletion", {"completionId": first})
        client.change(uri, [((1, 11 + min(3, len(text))), end_of((1, 11), text, client.encoding), "")])
        await asyncio.sleep(2.5)
        async with httpx.AsyncClient() as http:
            response = await http.get(url, timeout=30)
        assert response.status_code == 200
        found = samples(response.text)

    team = {"team": "backend", "arm": "rl"}  # the default experiment.arms
    assert value(found, "heedful_completion_latency_seconds_count", method=INLINE, **team) == 2
    latency_sum = value(found, "heedful_completion_latency_seconds_sum", method=INLINE, **team)
    assert latency_sum is not None and latency_sum > 0
    assert value(found, "heedful_completion_latency_seconds_bucket", method=INLINE, le="+Inf", **team) == 2
    assert value(found, "heedful_completions_total", outcome="served", **team) == 2
    assert value(found, "heedful_feedback_events_total", kind="accepted", **team) == 1
    assert value(found, "heedful_feedback_events_total", kind="correction", **team) == 1
    assert value(found, "heedful_feedback_events_total", kind="rejected", **team) == 1
    assert value(found, "heedful_kept_characters_total", **team) == min(3, len(text))

    assert value(found, "heedful_store_up") == 1
    assert value(found, "heedful_adapter_active", scope="team:backend", version=version) == 1
    assert value(found, "heedful_adapter_step", scope="team:backend") == 50
    assert value(found, "heedful_training_loss", scope="team:backend") == 0.125
    assert value(found, "heedful_training_kl", scope="team:backend") == 0.4
    # A rejected adapter never serves, but its training round is still reported.
    assert value(found, "heedful_adapter_step", scope="developer:dev-m") is None
    assert value(found, "heedful_training_loss", scope="developer:dev-m") == 0.25
    assert value(found, "heedful_training_kl", scope="developer:dev-m") == 7.5
