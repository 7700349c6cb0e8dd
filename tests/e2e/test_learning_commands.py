"""What Heedful learned, and the developer's control over it, from the editor: `heedful.learning` (show,
pause, resume, undo) and `heedful.report`, through the real server over stdio, on the suite's engine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pygls.exceptions import JsonRpcException

from adapters.lifecycle import publish_adapter
from kernel.settings import Settings
from lsp_handlers.learning import LEARNING_COMMAND, REPORT_COMMAND
from lsp_handlers.protocol import FEEDBACK_COMMAND
from server.stores import open_store
from storage.repositories import Scope
from tests.conftest import make_lora_adapter
from tests.e2e.client import HeedfulClient, running_client
from tests.e2e.conftest import ServerSetup
from tests.e2e.test_lsp_flow import completion_id, serve_item

pytestmark = [pytest.mark.engine, pytest.mark.remote]

DEVELOPER = "dev-learn"


async def status_where(client: HeedfulClient, check: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
    return await client.wait_for(check, timeout, what)


async def test_the_developer_sees_pauses_resumes_and_undoes_what_was_learned(
    lsp_setup: ServerSetup, small_model: Path, tmp_path: Path
) -> None:
    settings = Settings()
    settings.database.url = f"sqlite+aiosqlite:///{lsp_setup.db}"
    options = {"developerId": DEVELOPER, "sessionId": "learn-1", "team": "learners"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready", 300)
        shown = await client.command(LEARNING_COMMAND, {"action": "show"})
        assert shown == {
            "developerId": DEVELOPER, "paused": None, "recordingPaused": False, "serving": None,
            "corrections": [], "versions": [],
        }  # fmt: skip
        with pytest.raises(JsonRpcException, match="nothing to undo: no adapter of developer 'dev-learn'"):
            await client.command(LEARNING_COMMAND, {"action": "undo"})

        # Two adapters published for the developer, one after the other; the second serves them.
        store = await open_store(settings)
        try:
            versions = []
            for i in range(2):
                source = make_lora_adapter(small_model, tmp_path / f"lora-{i}", seed=30 + i, b_std=0.02)
                published = await publish_adapter(
                    store, Scope.developer(DEVELOPER), source, step=1, kl=0.1, metrics={},
                    adapters_root=tmp_path / "adapters", gate=None, actor="test",
                )  # fmt: skip
                versions.append(published.version_id)
        finally:
            await store.close()
        await status_where(client, lambda s: s.get("adapter") == versions[1], "the second adapter to serve")
        await client.command(FEEDBACK_COMMAND, {"text": "use pathlib, not os.path"})
        await client.command(FEEDBACK_COMMAND, {"text": "add type hints"})
        shown = await client.command(LEARNING_COMMAND, {"action": "show"})
        assert shown["serving"] == versions[1] and shown["paused"] is None
        assert [v["version"] for v in shown["versions"]] == [versions[1], versions[0]]
        assert [v["status"] for v in shown["versions"]] == ["active", "retired"]
        assert shown["corrections"] == ["add type hints", "use pathlib, not os.path"]  # newest first

        # Pause: training stops for them (serving goes on); the status says so, with the reason.
        paused = await client.command(LEARNING_COMMAND, {"action": "pause", "reason": "on holiday"})
        assert paused["paused"] == "on holiday" and paused["serving"] == versions[1]
        status = await status_where(
            client, lambda s: (s.get("learning") or {}).get("state") == "paused", "the learning state to be paused"
        )
        assert status["learning"]["reason"] == "on holiday" and status["adapter"] == versions[1]
        resumed = await client.command(LEARNING_COMMAND, {"action": "resume"})
        assert resumed["paused"] is None
        await status_where(
            client, lambda s: (s.get("learning") or {}).get("state") == "collecting", "learning to collect again"
        )

        # Undo: the adapter serving them goes; the one before serves again, then the base model.
        undone = await client.command(LEARNING_COMMAND, {"action": "undo"})
        assert undone["serving"] == versions[0]
        assert [v["status"] for v in undone["versions"]] == ["rolled_back", "active"]
        await status_where(client, lambda s: s.get("adapter") == versions[0], "the first adapter to serve again")
        undone = await client.command(LEARNING_COMMAND, {"action": "undo", "reason": "not what I write"})
        assert undone["serving"] is None
        await status_where(client, lambda s: s.get("adapter") is None, "the base model to serve")
        with pytest.raises(JsonRpcException, match="nothing to undo"):
            await client.command(LEARNING_COMMAND, {"action": "undo"})

        for bad, says in (
            ([], "takes one argument"),
            ([{"action": "forget"}], "action 'forget' is not one of them"),
            ([{"action": "pause", "reason": 7}], '"reason" must be a string'),
        ):
            with pytest.raises(JsonRpcException, match=says):
                await client.command(LEARNING_COMMAND, *bad)

        report = await client.command(REPORT_COMMAND)
        html = report["html"]
        assert html.startswith("<!DOCTYPE html>") and "Heedful report" in html and DEVELOPER in html
        assert "<script" not in html
        await asyncio.sleep(0)

    audit = lsp_setup.rows(
        "SELECT actor, action, reason FROM audit_log WHERE actor = ? ORDER BY id", f"editor:{DEVELOPER}"
    )
    assert [(r["action"], r["reason"]) for r in audit] == [
        ("pause_training", "on holiday"),
        ("resume_training", "resumed from the editor"),
        ("rollback", "undone from the editor"),
        ("rollback", "not what I write"),
    ]


async def test_a_developer_who_pauses_recording_is_served_and_nothing_of_theirs_is_stored(
    lsp_setup: ServerSetup,
) -> None:
    developer = "dev-private"
    source = "import math\n\n\ndef area(radius):\n    return "
    options = {"developerId": developer, "sessionId": "private-1"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready", 300)
        done = await client.command(LEARNING_COMMAND, {"action": "pause_recording"})
        assert done["recordingPaused"] is True and done["paused"] is None  # training itself is not paused
        status = await status_where(
            client, lambda s: (s.get("learning") or {}).get("recording") == "paused", "the status to say so"
        )
        assert status["learning"]["state"] == "collecting"
        client.open("file:///work/private.py", source)
        item = await serve_item(client, "file:///work/private.py", 4, 11)  # still served
        client.notify("textDocument/didShowCompletion", {"item": client.lc.protocol._converter.unstructure(item)})
        accepted = await client.command("heedful.acceptCompletion", {"completionId": completion_id(item)})
        assert accepted["recorded"] is False and "recording is paused" in accepted["reason"]
        corrected = await client.command(FEEDBACK_COMMAND, {"text": "use math.tau / 2"})
        assert corrected["recorded"] is False

    # A later session of theirs starts paused; resuming records again, from then on.
    options = {"developerId": developer, "sessionId": "private-2"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        ready = await client.wait_status("ready", 300)
        assert ready["learning"]["recording"] == "paused"
        resumed = await client.command(LEARNING_COMMAND, {"action": "resume_recording"})
        assert resumed["recordingPaused"] is False
        await status_where(client, lambda s: "recording" not in (s.get("learning") or {}), "recording again")
        client.open("file:///work/public.py", source)
        item2 = await serve_item(client, "file:///work/public.py", 4, 11)
        accepted = await client.command("heedful.acceptCompletion", {"completionId": completion_id(item2)})
        assert accepted["recorded"] is True
        exit_status = await client.stop()
    assert exit_status == 0

    assert [r["id"] for r in lsp_setup.rows("SELECT id FROM completions WHERE developer_id = ?", developer)] == [
        completion_id(item2)
    ]
    for table in ("documents", "events"):
        assert lsp_setup.rows(f"SELECT * FROM {table} WHERE session_id = ?", "private-1") == []
    recorded = {r["kind"] for r in lsp_setup.rows("SELECT kind FROM events WHERE session_id = ?", "private-2")}
    assert "accepted" in recorded and recorded <= {"accepted", "edit_snapshot"}
    audit = lsp_setup.rows("SELECT action FROM audit_log WHERE actor = ? ORDER BY id", f"editor:{developer}")
    assert [r["action"] for r in audit] == ["pause_recording", "resume_recording"]
