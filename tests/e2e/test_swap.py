"""Adapters swapped under load: 64 editor sessions of one team, through one `heedful serve --tcp`, request
completions without pause while three adapters are published for the team and one is rolled back.

No request may fail and none may be answered with nothing (an empty answer is a failure a user sees as
much as an error); every completion's recorded adapter version must be the one the server routed to
when the request arrived (its log says when it switched); adapters that stopped serving are unloaded
from the engine.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.lifecycle import publish_adapter, rollback_scope
from kernel.settings import Settings
from server.stores import open_store
from storage.repositories import Scope
from tests.conftest import make_lora_adapter
from tests.e2e.client import HeedfulClient, tcp_server
from tests.e2e.conftest import write_config
from tests.e2e.test_metrics import metrics_url, samples, value

pytestmark = [pytest.mark.engine, pytest.mark.remote]

TEAM = Scope.team("alpha")
SESSIONS = 64
# The server logs "<scope> is now served by <version>" right after it routes new requests there; a
# request's arrival is estimated from its record (created_at - latency). Slack for both, either side.
SWITCH_SLACK_S = 2.0
SWITCH = re.compile(r"^(\S+ [\d:]+),(\d{3}) INFO server\.registry: team:alpha is now served by (\w+)", re.MULTILINE)
SOURCE = "import os\n\n\ndef list_python_files(folder):\n    "


def server_switches(log: Path) -> list[tuple[float, str | None]]:
    """(time, version) of each switch the server logged for the team."""
    switches: list[tuple[float, str | None]] = []
    for found in SWITCH.finditer(log.read_text(errors="replace")):
        at = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(found.group(2)) / 1000
        switches.append((at, found.group(3)))
    return switches


async def keep_requesting(
    session: int, client: HeedfulClient, uri: str, stop: asyncio.Event, log: list[dict[str, Any]]
) -> None:
    while not stop.is_set():
        sent = time.time()
        try:
            result = await asyncio.wait_for(client.inline(uri, 4, 4), 120)
            assert result is not None, "no answer"
            texts = [i.insert_text if isinstance(i.insert_text, str) else i.insert_text.value for i in result.items]
            items = [t for t in texts if t.strip()]
            log.append({"session": session, "sent": sent, "done": time.time(), "ok": True, "items": len(items)})
        except Exception as exc:  # a failed request is what this test looks for
            log.append({"session": session, "sent": sent, "done": time.time(), "ok": False, "error": repr(exc)})


async def test_swaps_under_load_fail_no_request_and_mix_no_versions(
    tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    setup = write_config(tmp_path, small_model, vllm_server)
    adapters_root = tmp_path / "adapters"
    sources = [make_lora_adapter(small_model, tmp_path / f"lora-{i}", seed=10 + i, b_std=0.02) for i in range(3)]
    settings = Settings()
    settings.database.url = f"sqlite+aiosqlite:///{setup.db}"
    requests: list[dict[str, Any]] = []
    timeline: list[tuple[float, str | None]] = [(0.0, None)]  # (time it became active, version)
    async with tcp_server(setup.config, tmp_path / "server.log", "--metrics-port", "0") as (port, _proc):
        clients = [HeedfulClient("vscode") for _ in range(SESSIONS)]
        for i, c in enumerate(clients):
            await c.lc.start_tcp("127.0.0.1", port)
            await c.initialize({"developerId": f"dev-{i}", "sessionId": f"swap-{i}", "team": "alpha"})
            await c.wait_status("ready")
            c.open(f"file:///w/swap/s{i}.py", SOURCE)
        stop = asyncio.Event()
        load = [
            asyncio.create_task(keep_requesting(i, c, f"file:///w/swap/s{i}.py", stop, requests))
            for i, c in enumerate(clients)
        ]
        store = await open_store(settings)
        try:
            await asyncio.sleep(3)
            published: list[str] = []
            paths: dict[str, str] = {}
            for src in sources:
                result = await publish_adapter(
                    store, TEAM, src, step=1, kl=0.1, metrics={}, adapters_root=adapters_root, gate=None, actor="test"
                )
                timeline.append((time.time(), result.version_id))
                published.append(result.version_id)
                paths[result.version_id] = str(result.path)
                await asyncio.sleep(6)
            async with store.unit() as s:
                back = await rollback_scope(s, TEAM, actor="test", reason="swap test")
            assert back is not None and back.active == published[1]
            rolled_back = time.time()
            timeline.append((rolled_back, published[1]))
            # Keep the load going until the server has switched back to published[1] and a request that
            # arrived after that switch has been answered: under 64 sessions on 2 cores the engine loads the
            # version behind the queued requests, so a fixed wait may end before any request of its own.
            for _ in range(240):
                back_at = [at for at, v in server_switches(tmp_path / "server.log") if v == published[1]]
                switched = back_at and back_at[-1] >= rolled_back - SWITCH_SLACK_S
                if switched and any(r["ok"] and r["sent"] > back_at[-1] + SWITCH_SLACK_S for r in requests):
                    break
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*load)
            await store.close()
        # Adapters that stopped serving are unloaded once their last request ends (training groups sampled
        # after a request answered hold theirs too); the active one stays loaded.
        loaded: set[str] = set()
        async with httpx.AsyncClient() as http:
            for _ in range(120):
                models = (await http.get(f"{vllm_server}/v1/models")).json()["data"]
                loaded = {m.get("root") for m in models} & set(paths.values())
                if loaded == {paths[published[1]]}:
                    break
                await asyncio.sleep(0.5)
        assert loaded == {paths[published[1]]}, loaded
        async with httpx.AsyncClient() as http:
            scraped = (await http.get(await metrics_url(tmp_path / "server.log"), timeout=30)).text
        groups = samples(scraped)
        sampled = value(groups, "heedful_training_groups_total", team="alpha", outcome="sampled") or 0
        skipped = value(groups, "heedful_training_groups_total", team="alpha", outcome="skipped") or 0
        statuses = [c.statuses[-1] for c in clients]
        for c in clients:
            await c.lc.shutdown_async(None)
            c.lc.exit(None)
            await c.lc.stop()  # type: ignore[no-untyped-call]

    failed = [r for r in requests if not r["ok"]]
    empty = [r for r in requests if r["ok"] and not r["items"]]
    print(f"load: {SESSIONS} sessions, {len(requests)} requests, {len(failed)} failed, {len(empty)} empty")
    assert not failed, failed[:5]
    assert not empty, empty[:5]
    assert {r["session"] for r in requests} == set(range(SESSIONS))  # every session was served
    for t, version in timeline[1:]:  # every swap happened with requests in flight
        assert any(r["sent"] <= t <= r["done"] for r in requests), f"no request in flight when {version} took over"
    assert all(s["adapter"] == published[1] for s in statuses)

    rows = setup.rows("SELECT id, adapter_version, created_at, latency_ms FROM completions ORDER BY created_at")
    # Every served completion asked for a group (group_sample_rate = 1); under 64 sessions most found
    # completion.group_max_pending (8) groups still sampling and sampled none, so that groups never queued
    # in the engine without bound. Those sampled were stored (the last few may end with the server).
    stored = setup.rows('SELECT DISTINCT completion_id FROM candidates WHERE "index" > 0')
    assert sampled + skipped == len(rows) and skipped > 0, (sampled, skipped, len(rows))
    assert sampled - Settings().completion.group_max_pending <= len(stored) <= sampled, (len(stored), sampled)
    # The version that ended active served completions (the load went on until one of its own was answered;
    # under heavy load a version active for only a few seconds may have had none: the check below covers
    # those that did).
    assert published[1] in {r["adapter_version"] for r in rows}
    # When the server itself switched (under 64 sessions on 2 cores a new version takes over several
    # seconds after it is published: the engine loads it behind the queued requests), from its log.
    switches: list[tuple[float, str | None]] = [(0.0, None), *server_switches(tmp_path / "server.log")]
    # (A version published and rolled back while the server was still loading it may never be switched to.)
    assert switches[-1][1] == published[1] and {v for _, v in switches[1:]} <= set(published), switches
    # (start, end) of each time a version served; end is when the next one took over.
    spans = [(t, nxt, v) for (t, v), (nxt, _) in zip(switches, [*switches[1:], (float("inf"), None)], strict=True)]
    # A request takes its adapter after it arrived (the prompt is built first, and under 64 sessions the
    # server's loop may take seconds to get there): its version must have served at some time between
    # its arrival and its answer.
    for r in rows:
        done = datetime.fromisoformat(r["created_at"]).replace(tzinfo=UTC).timestamp()
        arrived = done - r["latency_ms"] / 1000
        allowed = {v for start, end, v in spans if start <= done + SWITCH_SLACK_S and end >= arrived - SWITCH_SLACK_S}
        assert r["adapter_version"] in allowed, (r["id"], r["adapter_version"], arrived, done, switches)
