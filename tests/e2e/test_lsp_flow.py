"""`heedful serve` driven over stdio by a real LSP client, as VS Code and Neovim drive it.

Every test starts the server as a subprocess (engine: the session's real vLLM server, store: a real
SQLite file), plays an editor session, and then reads what the store recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types

from lsp_handlers.documents import client_length
from tests.e2e.client import ROOT, HeedfulClient, running_client, tcp_server
from tests.e2e.conftest import ServerSetup, write_config
from tests.e2e.sessions import completion_items_session
from tests.procs import free_port, in_session

pytestmark = [pytest.mark.engine, pytest.mark.remote]

SOURCE = '''"""Small helpers for the café's order files ☕ 🎉."""
import os


def read_lines(path):
    """Return the lines of a text file without their line endings."""
    '''


def end_of(start: tuple[int, int], text: str, encoding: str) -> tuple[int, int]:
    """The position after inserting `text` at `start`, in the client's units."""
    lines = text.split("\n")
    if len(lines) == 1:
        return start[0], start[1] + client_length(text, encoding)
    return start[0] + len(lines) - 1, client_length(lines[-1], encoding)


def completion_id(item: Any) -> str:
    return str(item.command.arguments[0]["completionId"])


async def serve_item(client: HeedfulClient, uri: str, line: int, character: int) -> types.InlineCompletionItem:
    result = await client.inline(uri, line, character)
    assert result is not None and result.items, "the server answered no completion"
    item = result.items[0]
    assert isinstance(item.insert_text, str) and item.insert_text.strip()
    assert item.command is not None and item.command.command == "heedful.acceptCompletion"
    assert item.range is not None and item.range.start == types.Position(line=line, character=character)
    return item


@pytest.mark.parametrize("flavour", ["vscode", "neovim"])
async def test_completion_and_every_kind_of_feedback_reach_the_store(flavour: str, lsp_setup: ServerSetup) -> None:
    options = {"developerId": f"dev-{flavour}", "sessionId": f"session-{flavour}", "team": "backend"}
    async with running_client(flavour, lsp_setup.config, lsp_setup.log, options) as client:
        ready = await client.wait_status("ready")
        assert ready["developerId"] == f"dev-{flavour}" and ready["engine"] == "remote"
        assert ready["adapterServing"] == "multi-lora"  # a remote vLLM server names the adapter per request
        caps = client.capabilities
        assert caps is not None and caps.inline_completion_provider is not None
        assert caps.completion_provider is not None and caps.execute_command_provider is not None
        assert set(caps.execute_command_provider.commands) >= {"heedful.acceptCompletion", "heedful.feedback"}
        assert caps.position_encoding == client.encoding
        enc = client.encoding
        uri = "file:///work/shop/orders.py"
        client.open(uri, SOURCE)
        cursor = (6, 4)

        # 1. Accept: the editor inserts the item, then runs its command.
        item = await serve_item(client, uri, *cursor)
        accepted_id = completion_id(item)
        accepted_text = str(item.insert_text)
        client.notify("textDocument/didShowCompletion", {"item": client.lc.protocol._converter.unstructure(item)})
        client.change(uri, [(cursor, cursor, accepted_text)])
        answer = await client.command("heedful.acceptCompletion", {"completionId": accepted_id})
        assert answer["recorded"] is True and answer["completionId"] == accepted_id

        # 2. The developer rewrites the accepted text: everything after its first 6 characters goes.
        keep = accepted_text[:6]
        cut_from = end_of(cursor, keep, enc)
        cut_to = end_of(cursor, accepted_text, enc)
        client.change(uri, [(cut_from, cut_to, "pass")])
        after_edit = (cut_from[0], cut_from[1] + 4)

        # 3. Partial accept of the next suggestion: its first word only (acceptedLength in UTF-16 units).
        client.change(uri, [(after_edit, after_edit, "\n\n\ndef count_words(text):\n    ")])
        cursor2 = (after_edit[0] + 4, 4)
        item2 = await serve_item(client, uri, *cursor2)
        partial = str(item2.insert_text)[:3]
        client.change(uri, [(cursor2, cursor2, partial)])
        client.notify(
            "textDocument/didPartiallyAcceptCompletion",
            {
                "item": client.lc.protocol._converter.unstructure(item2),
                "acceptedLength": client_length(partial, types.PositionEncodingKind.Utf16),
            },
        )

        # 4. Explicit reject of a third suggestion.
        line3 = cursor2[0] + 1
        client.change(uri, [(end_of(cursor2, partial, enc), end_of(cursor2, partial, enc), "\n    ")])
        item3 = await serve_item(client, uri, line3, 4)
        client.notify("heedful/didRejectCompletion", {"completionId": completion_id(item3)})
        rejected_at = time.monotonic()

        # 5. Inferred reject: the developer types something the fourth suggestion does not start with.
        item4 = await serve_item(client, uri, line3, 4)
        divergent = "zq_" if not str(item4.insert_text).startswith("zq_") else "qz_"
        client.change(uri, [((line3, 4), (line3, 4), divergent)])
        typed_after_s = time.monotonic() - rejected_at  # item 4 is served in between

        # 6. An explicit correction, defaulting to the latest completion.
        answer = await client.command("heedful.feedback", {"text": "Always add type hints"})
        assert answer["recorded"] is True and answer["completionId"] == completion_id(item4)

        await asyncio.sleep(2.5)  # both snapshot delays (1 s, 2 s) pass while the session is open
        # The pygls client leaves the partial-accept/reject notifications queued in order; a request
        # after them proves they were handled before the session ends.
        await client.command("heedful.feedback", {"text": "prefer pathlib", "completionId": accepted_id})
        exit_status = await client.stop()
    assert exit_status == 0

    session = lsp_setup.rows("SELECT * FROM sessions WHERE id = ?", f"session-{flavour}")
    assert len(session) == 1
    assert session[0]["developer_id"] == f"dev-{flavour}" and session[0]["team_id"] == "backend"
    assert session[0]["ended_at"] is not None

    completions = {r["id"]: r for r in lsp_setup.rows("SELECT * FROM completions")}
    for it in (item, item2, item3, item4):
        row = completions[completion_id(it)]
        assert row["session_id"] == f"session-{flavour}" and row["uri"] == uri and row["document_id"] is not None
    assert completions[accepted_id]["prompt"].endswith('without their line endings."""\n')

    # The shown candidate plus a sampled group of G-1 (group_sample_rate = 1 in this config).
    candidates = lsp_setup.rows('SELECT * FROM candidates WHERE completion_id = ? ORDER BY "index"', accepted_id)
    assert candidates[0]["text"].lstrip(" ").startswith(accepted_text.lstrip(" "))
    assert len(candidates) in (1, 4)

    events = lsp_setup.rows("SELECT * FROM events ORDER BY id")
    by_kind: dict[str, list[Any]] = {}
    for e in events:
        assert e["session_id"] == f"session-{flavour}"
        by_kind.setdefault(e["kind"], []).append(e)

    (shown,) = by_kind["shown"]
    assert shown["completion_id"] == accepted_id
    (acc,) = by_kind["accepted"]
    assert acc["completion_id"] == accepted_id and acc["accepted_length"] == len(accepted_text)
    (part,) = by_kind["partial_accept"]
    assert part["completion_id"] == completion_id(item2) and part["accepted_length"] == len(partial)
    assert part["kept_text"] == partial
    rejected = {(e["completion_id"], bool(e["inferred"])) for e in by_kind["rejected"]}
    assert rejected == {(completion_id(item3), False), (completion_id(item4), True)}
    corrections = [(e["completion_id"], e["text"]) for e in by_kind["correction"]]
    assert corrections == [(completion_id(item4), "Always add type hints"), (accepted_id, "prefer pathlib")]

    snaps = [e for e in by_kind["edit_snapshot"] if e["completion_id"] == accepted_id]
    assert sorted(e["delay_s"] for e in snaps) == [1.0, 2.0]
    for snap in snaps:
        assert snap["kept_text"] == keep + "pass"
        assert 0.0 < snap["survival_ratio"] < 1.0
    partial_snaps = [e for e in by_kind["edit_snapshot"] if e["completion_id"] == completion_id(item2)]
    assert {e["kept_text"] for e in partial_snaps} == {partial}
    # Rejects teach too: what the developer wrote where both rejected suggestions would have gone (step 5).
    # Item 3's 1 s snapshot may come before anything was written (item 4 is served first): nothing is
    # recorded then; where serving item 4 took longer than about 2 s (a slow machine), neither snapshot
    # of item 3 saw anything written.
    item3_delays = [[2.0], [1.0, 2.0]] + ([[]] if typed_after_s > 1.5 else [])
    for rejected_item, delays in ((item4, [[1.0, 2.0]]), (item3, item3_delays)):
        written = [e for e in by_kind["edit_snapshot"] if e["completion_id"] == completion_id(rejected_item)]
        assert sorted(e["delay_s"] for e in written) in delays
        assert all(e["kept_text"] == divergent for e in written)


async def test_typing_through_a_suggestion_is_answered_with_its_rest_under_the_same_id(lsp_setup: ServerSetup) -> None:
    options = {"developerId": "dev-typist", "sessionId": "session-typist"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready")
        enc = client.encoding
        uri = "file:///work/typist.py"
        client.open(uri, SOURCE)
        item = await serve_item(client, uri, 6, 4)
        text = str(item.insert_text)
        assert len(text.rstrip()) > 4, f"the model's suggestion is too short for this test: {text!r}"

        # Two keystrokes that type what the suggestion shows; the editor asks again at the new cursor.
        cursor = (6, 4)
        for char in text[:2]:
            client.change(uri, [(cursor, cursor, char)])
            cursor = end_of(cursor, char, enc)
        again = await serve_item(client, uri, *cursor)
        assert completion_id(again) == completion_id(item) and again.insert_text == text[2:]

        # Accept-word on the item served again: its acceptedLength counts from that item, the kept text
        # runs from the suggestion's start.
        word = text[2:4]
        client.change(uri, [(cursor, cursor, word)])
        client.notify(
            "textDocument/didPartiallyAcceptCompletion",
            {
                "item": client.lc.protocol._converter.unstructure(again),
                "acceptedLength": client_length(word, types.PositionEncodingKind.Utf16),
            },
        )
        cursor = end_of(cursor, word, enc)

        # Switched off, the same cursor goes to the engine: a completion of its own (or none).
        client.lc.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(settings={"heedful": {"completion": {"type_through": False}}})
        )
        fresh = await client.inline(uri, *cursor)
        fresh_ids = [completion_id(i) for i in fresh.items] if fresh is not None else []
        assert completion_id(item) not in fresh_ids
        exit_status = await client.stop()
    assert exit_status == 0

    rows = lsp_setup.rows("SELECT id FROM completions WHERE session_id = ?", "session-typist")
    assert sorted(r["id"] for r in rows) == sorted([completion_id(item), *fresh_ids])  # nothing recorded twice
    events = lsp_setup.rows("SELECT * FROM events WHERE completion_id = ? ORDER BY id", completion_id(item))
    (part,) = [e for e in events if e["kind"] == "partial_accept"]
    assert part["kept_text"] == text[:4] and part["accepted_length"] == 4
    assert not [e for e in events if e["kind"] == "rejected"]  # typing what it showed is no reject


async def test_client_without_inline_completion_gets_completion_items(lsp_setup: ServerSetup) -> None:
    options = {"developerId": "dev-vim", "sessionId": "session-vim"}
    async with running_client("no-inline", lsp_setup.config, lsp_setup.log, options) as client:
        cid = await completion_items_session(client)
    kinds = [r["kind"] for r in lsp_setup.rows("SELECT kind FROM events WHERE completion_id = ?", cid)]
    assert "accepted" in kinds


async def test_configuration_changes_apply_and_bad_values_are_reported(lsp_setup: ServerSetup) -> None:
    options = {"developerId": "dev-cfg", "sessionId": "session-cfg"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready")
        client.lc.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(settings={"heedful": {"completion": {"max_tokens": -5}}})
        )
        client.lc.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(
                settings={"heedful": {"completion": {"max_tokens": 3, "single_line_max_tokens": 3}}}
            )
        )
        uri = "file:///work/cfg.py"
        client.open(uri, "def area(radius):\n    return ")
        item = await serve_item(client, uri, 1, 11)
        cid = completion_id(item)
        assert any("completion.max_tokens" in m and "-5" in m for m in client.messages), client.messages
    (cand,) = lsp_setup.rows('SELECT token_ids FROM candidates WHERE completion_id = ? AND "index" = 0', cid)
    assert 1 <= len(json.loads(cand["token_ids"])) <= 3


async def test_a_failing_engine_is_reported_and_answers_nothing(tmp_path: Any, small_model: Any) -> None:
    setup = write_config(tmp_path, small_model, f"http://127.0.0.1:{free_port()}", "")
    setup.config.write_text(setup.config.read_text().replace("request_timeout_s = 120", "startup_timeout_s = 2"))
    async with running_client("vscode", setup.config, setup.log, {"developerId": "dev-down"}) as client:
        failing = await client.wait_status("failing", timeout=120)
        assert failing["message"]
        uri = "file:///work/down.py"
        client.open(uri, "def f():\n    ")
        assert await client.inline(uri, 1, 4) is None
        # Still serving: feedback is recorded even while the engine is down.
        answer = await client.command("heedful.feedback", {"text": "use Flask, not Django"})
        assert answer["recorded"] is True and answer["completionId"] is None


async def test_the_default_embedded_engine_reports_loading_then_serves(tmp_path: Any, small_model: Any) -> None:
    config = tmp_path / "heedful.toml"
    db = tmp_path / "h.db"
    config.write_text(
        f'[model]\npath = "{small_model}"\n\n[engine]\nkv_cache_gib = 1\n\n'
        f'[completion]\ntimeout_ms = 120000\ntemperature = 0.0\n\n[database]\nurl = "sqlite+aiosqlite:///{db}"\n'
    )
    log = tmp_path / "server.log"
    async with running_client("neovim", config, log, {"developerId": "dev-embedded"}) as client:
        ready = await client.wait_status("ready", timeout=600)
        assert client.statuses[0]["state"] == "loading"
        # The editor was answered while vLLM was still starting (it starts in a thread, not in the loop
        # that answers editors): the session began before the engine core was up.
        lines = log.read_text(errors="replace").splitlines()
        session = next(i for i, line in enumerate(lines) if "session " in line and "'dev-embedded'" in line)
        core = next(i for i, line in enumerate(lines) if "vLLM's engine core started in" in line)
        assert session < core, (lines[session], lines[core])
        assert ready["engine"] == "embedded"
        # Both kinds of x86 CPU can merge (AMX-packed weights, oneDNN handlers): a developer alone is
        # served from merged weights, and nothing says otherwise.
        assert ready["adapterServing"] == "merged" and ready["adapterServingReason"] is None, ready
        uri = "file:///work/embedded.py"
        client.open(uri, "def square(x):\n    ")
        item = await serve_item(client, uri, 1, 4)
        assert "x" in str(item.insert_text)


async def test_a_server_stopped_while_its_engine_starts_exits_and_leaves_no_engine_process(
    tmp_path: Path, small_model: Path
) -> None:
    """An editor (or a supervisor) stops `heedful serve` with SIGTERM while vLLM is still starting: the
    server exits cleanly without waiting for the engine to finish starting (it stops the engine core's
    process, which loads the model), and none of the engine's processes outlives it (they hold gigabytes)."""
    config = tmp_path / "heedful.toml"
    config.write_text(
        f'[model]\npath = "{small_model}"\n\n[engine]\nkv_cache_gib = 1\n\n'
        f'[database]\nurl = "sqlite+aiosqlite:///{tmp_path / "h.db"}"\n'
    )
    log = tmp_path / "server.log"
    with log.open("ab") as stderr:  # a session of its own: its processes are found even once orphaned
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "--config", str(config), "serve", "--tcp", "--port", "0",
            stderr=stderr, cwd=str(ROOT), start_new_session=True,
        )  # fmt: skip
    try:
        for _ in range(3000):  # vLLM's engine core is a process of its own, started after vLLM is imported
            if len(in_session(proc.pid)) > 1:
                break
            await asyncio.sleep(0.1)
        assert len(in_session(proc.pid)) > 1, log.read_text(errors="replace")[-3000:]
        assert "vLLM's engine core started in" not in log.read_text(errors="replace")  # still starting
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 300) == 0, log.read_text(errors="replace")[-3000:]
        for _ in range(300):
            if not in_session(proc.pid):
                break
            await asyncio.sleep(0.1)
        assert not in_session(proc.pid), log.read_text(errors="replace")[-3000:]
        text = log.read_text(errors="replace")
        assert "stopped vLLM's engine core (pid" in text and "vLLM's engine core started in" not in text, text[-3000:]
    finally:
        for pid in in_session(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_prompts_are_sized_to_the_engines_speed_and_a_late_answer_keeps_its_finished_lines(
    tmp_path: Any, small_model: Any
) -> None:
    """The embedded engine times itself reading a prompt; a 1 ms prefill target leaves the smallest budget
    (256 tokens), so a long real file's prompt is cut to it. A developer whose timeout falls in the middle
    of a long multi-line answer is shown the lines finished by then: the start of the whole answer, as
    it would have been shown. On the float weights: the small model's int8 copy answers `walk_tree` with
    one line, which leaves nothing to cut."""
    config = tmp_path / "heedful.toml"
    db = tmp_path / "h.db"
    config.write_text(
        f'[model]\npath = "{small_model}"\n\n[engine]\nkv_cache_gib = 1\nquantization = "none"\n\n'
        "[completion]\ntimeout_ms = 120000\ntemperature = 0.0\ngroup_sample_rate = 0.0\nprefill_target_ms = 1\n"
        f'max_tokens = 160\n\n[database]\nurl = "sqlite+aiosqlite:///{db}"\n'
    )
    log = tmp_path / "server.log"
    source = Path(textwrap.__file__).read_text(encoding="utf-8") + "\n\ndef square(x):\n    return "
    walk = "import os\n\n\ndef walk_tree(root):\n    \n"
    async with running_client("neovim", config, log, {"developerId": "dev-budget"}) as client:
        await client.wait_status("ready", timeout=600)
        uri = "file:///work/textwrap_copy.py"
        client.open(uri, source)
        last = source.count("\n")
        item = await serve_item(client, uri, last, len("    return "))
        assert "context budget 256 tokens: the engine reads" in log.read_text()
        ids = await prompt_token_ids(db, completion_id(item))
        # The budget holds the file's text; the model's fill-in-the-middle markers come on top.
        assert 100 < len(ids) <= 256 + 8
        client.open("file:///work/walk.py", walk)
        started = time.perf_counter()
        whole = await serve_item(client, "file:///work/walk.py", 4, 4)
        seconds = time.perf_counter() - started
        lines = str(whole.insert_text).splitlines()
        if len(lines) < 2:
            pytest.skip(f"the model answered {len(lines)} line: nothing to cut in the middle")
        # The developer's timeout now falls in the middle of that answer (an editor may set it).
        client.configure({"heedful": {"completion": {"timeout_ms": max(50, int(seconds * 500))}}})
        cut = await client.inline("file:///work/walk.py", 4, 4)
    text = log.read_text()
    if cut is None:  # not even the first line was finished in time: said so in the log
        assert "the engine took longer than" in text
        return
    shown = str(cut.items[0].insert_text)
    # Cut at the deadline: the lines finished by then, post-processed as any answer (which may cut the
    # whole answer's tail anyway, so the two can be equal).
    assert "finished lines shown" in text
    assert str(whole.insert_text).startswith(shown) and shown.strip()


async def prompt_token_ids(db: Path, completion: str) -> list[int]:
    """The stored prompt of a completion (the store's writer commits it shortly after the answer)."""
    for _ in range(100):
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT prompt_token_ids FROM completions WHERE id = ?", (completion,)).fetchone()
        if row is not None:
            return list(json.loads(row[0]))
        await asyncio.sleep(0.1)
    raise AssertionError(f"completion {completion} was not stored within 10 s")


async def test_team_and_developer_settings_apply_to_the_session(lsp_setup: ServerSetup) -> None:
    teams = lsp_setup.config.parent / "teams"
    teams.mkdir()
    # The team keeps completions to 2 tokens; one of its developers gets a 50 ms budget the engine cannot meet.
    (teams / "terse.toml").write_text(
        "[completion]\nmax_tokens = 2\nsingle_line_max_tokens = 2\n\n"
        '[developers."dev-impatient".completion]\ntimeout_ms = 50\n'
    )
    async with running_client(
        "vscode", lsp_setup.config, lsp_setup.log, {"developerId": "dev-a", "team": "terse"}
    ) as a:
        await a.wait_status("ready")
        a.open("file:///w/t.py", "def area(radius):\n    return ")
        item = await serve_item(a, "file:///w/t.py", 1, 11)
    options = {"developerId": "dev-impatient", "team": "terse"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as b:
        await b.wait_status("ready")
        b.open("file:///w/t.py", "def area(radius):\n    return ")
        assert await b.inline("file:///w/t.py", 1, 11) is None
    (cand,) = lsp_setup.rows(
        'SELECT token_ids FROM candidates WHERE completion_id = ? AND "index" = 0', completion_id(item)
    )
    assert 1 <= len(json.loads(cand["token_ids"])) <= 2
    assert "the engine took longer than 50 ms" in lsp_setup.log.read_text()


async def test_tcp_serves_several_editors_and_one_exit_ends_only_its_session(
    lsp_setup: ServerSetup, tmp_path: Any
) -> None:
    async with tcp_server(lsp_setup.config, tmp_path / "tcp.log") as (port, proc):
        clients = [HeedfulClient("vscode"), HeedfulClient("neovim")]
        for i, c in enumerate(clients):
            await c.lc.start_tcp("127.0.0.1", port)
            await c.initialize({"developerId": f"dev-tcp-{i}", "sessionId": f"session-tcp-{i}"})
            await c.wait_status("ready")
            c.open("file:///w/tcp.py", "def cube(x):\n    return ")
        items = await asyncio.gather(*(serve_item(c, "file:///w/tcp.py", 1, 11) for c in clients))
        assert all(str(i.insert_text).strip() for i in items)
        # The first editor leaves; the second keeps being served by the same process.
        await clients[0].lc.shutdown_async(None)
        clients[0].lc.exit(None)
        await asyncio.sleep(0.5)
        assert proc.returncode is None
        await serve_item(clients[1], "file:///w/tcp.py", 1, 11)
        await clients[1].lc.shutdown_async(None)
        clients[1].lc.exit(None)
        for c in clients:
            await c.lc.stop()  # type: ignore[no-untyped-call]
    assert proc.returncode == 0
    sessions = {r["id"]: r for r in lsp_setup.rows("SELECT * FROM sessions")}
    assert set(sessions) == {"session-tcp-0", "session-tcp-1"}
    assert all(s["ended_at"] is not None for s in sessions.values())


async def test_a_completion_carries_what_its_imports_say_read_only_inside_the_workspace(
    tmp_path: Any, lsp_setup: ServerSetup
) -> None:
    import os

    folder, outside = tmp_path / "ws", tmp_path / "secret.py"
    (folder / "billing").mkdir(parents=True)
    (folder / "billing" / "__init__.py").write_text("")
    (folder / "billing" / "tax.py").write_text(
        "RATES = {'fr': 0.2}\n\n\ndef tax_rate(region):\n    return RATES[region]\n"
    )
    outside.write_text("def tax_rate(region):\n    return SECRET_TOKEN\n")
    os.symlink(outside, folder / "billing" / "leak.py")  # listed in the folder, but it leads out of it
    text = (
        "from billing.tax import tax_rate\nfrom billing import leak\nimport secret\n\n\n"
        "def with_tax(net, region):\n    rate = tax_rate(region)\n    "
    )
    # The debug log names the files a prompt's snippets came from (paths only, never their text).
    log_debug(lsp_setup)
    uri = (folder / "billing" / "invoice.py").as_uri()
    options = {"developerId": "dev-x", "sessionId": "dev-x-1"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options, folders=[folder]) as client:
        await client.wait_status("ready")
        client.open(uri, text)
        off = await serve_item(client, uri, 7, 4)  # completion.crossfile_share is 0 by default
        client.configure({"heedful": {"completion": {"crossfile_share": 0.3}}})
        await asyncio.sleep(0.5)
        client.close(uri)  # an open document would be a source too
        other = (folder / "billing" / "orders.py").as_uri()  # another file: no typing through the first one
        client.open(other, text)
        await client.inline(other, 7, 4)  # what the model answers may be nothing: the log says what was sent
    (prompt,) = [r["prompt"] for r in lsp_setup.rows("SELECT prompt FROM completions WHERE id = ?", completion_id(off))]
    assert "snippet from" not in prompt
    used = [line for line in lsp_setup.log.read_text().splitlines() if "cross-file context for" in line]
    # Only the second request had the share; its snippets came from the one imported file inside the folder
    # (leak.py leads out of it, secret.py is not in it), and the snippet was put in the prompt.
    assert len(used) == 1 and used[0].endswith(
        f"cross-file context for {other}: {len(SNIPPET)} characters, from billing/tax.py (import)"
    )


# SmolLM2's tokenizer is StarCoder2's: it has the `<file_sep>` token, so the snippet comes in the
# repository format, then the current file's path; tax.py is short enough to be one window.
SNIPPET = (
    "<file_sep>billing/tax.py\nRATES = {'fr': 0.2}\n\n\ndef tax_rate(region):\n    return RATES[region]\n"
    "<file_sep>billing/orders.py\n"
)


async def test_a_short_prompt_keeps_the_signature_and_its_start_while_typing(lsp_setup: ServerSetup) -> None:
    # A function body longer than a 64-token budget: the cold prompt keeps every body line that fits and
    # the signature the budget cut off above them; a long piece typed pushes its start out, so the next
    # prompt starts on a line that is a multiple of 4; the same cursor asked again starts there again (the
    # engine's prefix cache reuses it).
    text = "def total(values):\n" + "".join(f"    x{i} = values[{i}] * {i}\n" for i in range(1, 40)) + "    "
    log_debug(lsp_setup)
    uri = "file:///work/anchored.py"
    settings = {
        "context_tokens": 64,
        "prefill_target_ms": 0,
        "prefix_anchor_lines": 4,
        "outline_lines": 4,
        "type_through": False,
    }
    options = {"developerId": "dev-anchor", "sessionId": "dev-anchor-1", "settings": {"completion": settings}}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready")
        client.open(uri, text)
        await client.inline(uri, 40, 4)  # what the model answers may be nothing: the log says what was sent
        typed = "total = x1 + x2 + x3 + x4 + x5"
        client.change(uri, [((40, 4), (40, 4), typed)])
        await client.inline(uri, 40, 4 + len(typed))
        await client.inline(uri, 40, 4 + len(typed))
    starts = [
        line.split("prompt for ", 1)[1] for line in lsp_setup.log.read_text().splitlines() if "prompt for " in line
    ]
    assert len(starts) == 3, starts
    pattern = re.compile(r"(\d+) tokens from line (\d+) \(the previous prompt's start: (\w+)\), (\d+) scope lines")
    found = [pattern.search(s) for s in starts]
    assert all(found), starts
    (t1, s1, p1, o1), (_, s2, p2, _), (_, s3, p3, _) = [m.groups() for m in found if m]
    assert p1 == "None" and o1 == "1" and int(t1) <= 64  # cold: the signature above the body lines that fit
    assert int(s1) % 4 != 0, "the cold prompt should not have been moved to a multiple of 4 on this text"
    assert p2 == s1 and int(s2) > int(s1) and int(s2) % 4 == 0  # typing pushed the start out: anchored
    assert (p3, s3) == (s2, s2)  # asked again: the same start


# SmolLM2 has no fill-in-the-middle tokens of its own: any template with both places does.
ANY_FIM_TEMPLATE = "{prefix}<|im_end|>{suffix}"


def log_debug(setup: ServerSetup, *, fim_template: str | None = None) -> None:
    """Have the test's server log at debug level (what the prompts were built from), with `fim_template` as
    `model.fim_template` when given."""
    config = setup.config.read_text()
    if fim_template is not None:
        config = config.replace("[model]\n", f"[model]\nfim_template = {json.dumps(fim_template)}\n", 1)
    setup.config.write_text(config + '\n[logging]\nlevel = "DEBUG"\n')


def table_source(rows: int) -> str:
    """A function of `rows` assignment lines (about 22 SmolLM2 tokens each: it reads each digit alone)."""
    return "def table(rows):\n" + "".join(f"    cell_{i} = rows[{i}] * {i} + {i % 7}\n" for i in range(rows))


def prompts_logged(log: Path, uri: str) -> list[str]:
    """What the server's debug log says of each prompt it built for `uri`, in order."""
    marker = f"prompt for {uri}: "
    return [line.split(marker, 1)[1] for line in log.read_text().splitlines() if marker in line]


def warm_start_prompt(prompt: str) -> tuple[int, int, int, int]:
    """What the debug log says of a prompt from a warm start (one of `prompts_logged`): its tokens, the line it
    starts on, about how many of them the engine was to read and the characters after the cursor. The test fails
    on any other prompt."""
    found = re.search(
        r"^(\d+) tokens from the warm start on line (\d+), about (\d+) of them to read, (\d+) characters after", prompt
    )
    assert found, prompt
    tokens, first_line, read, after = (int(group) for group in found.groups())
    return tokens, first_line, read, after


# A budget of 256 tokens under a context of 1,024, the document read on opening (16,384 tokens: about twice a
# 300-line `table_source`), no type-through (every request reaches the engine).
WARM_ON_OPENING = {
    "context_tokens": 1024,
    "prefill_tokens": 256,
    "warm_context": True,
    "warm_open_tokens": 16384,
    "type_through": False,
}


async def logged(log: Path, needle: str, count: int = 1, *, seconds: float = 120) -> None:
    """Wait until the server's log holds `needle` `count` times (background work such as a warm says it is done
    there), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while log.read_text().count(needle) < count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the server log did not say {needle!r} {count} time(s) within {seconds:g} s:\n"
                + log.read_text()[-3000:]
            )
        await asyncio.sleep(0.1)


async def test_a_warm_start_gives_the_next_requests_the_whole_context_at_the_learned_cost(
    lsp_setup: ServerSetup,
) -> None:
    # A function of 150 lines and a prompt budget of 256 tokens under a context of 1,024: the first request
    # is cold, at 256; the engine then reads the text before that cursor in the background; the request after
    # a few characters typed there gets a prompt of far more than 256 tokens, of which the text the warm did
    # not cover (the typed characters, the text after the cursor) is within the budget; an edit 26 lines above
    # the cursor (some 570 tokens: below the warm start, above the budget's reach) changes the text the engine
    # holds, so the next request is at the budget again, and the warm after it gives the request after that
    # the whole context again. (That the engine's prefix cache then holds
    # what was warmed is tests/integration/test_embedded_engine.py's.)
    text = table_source(150)
    text += "    "
    log_debug(lsp_setup)
    uri = "file:///work/warm.py"
    settings = {
        "context_tokens": 1024,
        "prefill_tokens": 256,
        "warm_context": True,
        "warm_open_tokens": 0,  # no warm on opening: the first request is cold
        "type_through": False,
    }
    options = {"developerId": "dev-warm", "sessionId": "dev-warm-1", "settings": {"completion": settings}}
    log = lsp_setup.log

    async with running_client("vscode", lsp_setup.config, log, options) as client:
        await client.wait_status("ready")
        client.open(uri, text)
        await client.inline(uri, 151, 4)  # cold: the learned budget
        await logged(log, "warmed ", 1, seconds=60)
        client.change(uri, [((151, 4), (151, 4), "tot")])
        await client.inline(uri, 151, 7)  # from the warm start
        client.change(uri, [((125, 4), (125, 8), "item")])
        await client.inline(uri, 151, 7)  # the text before the cursor changed at its start: the budget again
        await logged(log, "warmed ", 2, seconds=60)  # ... and a warm after it, of the text as it is now
        client.change(uri, [((151, 7), (151, 7), "al")])
        await client.inline(uri, 151, 9)  # from the warm start again
    lines = log.read_text().splitlines()
    prompts = prompts_logged(log, uri)
    assert len(prompts) == 4, prompts
    cold = re.search(r"^(\d+) tokens from line (\d+)", prompts[0])
    assert cold and int(cold.group(1)) <= 256, prompts[0]
    tokens, first_line, read, _ = warm_start_prompt(prompts[1])
    assert 512 < tokens <= 1024 and read <= 256, prompts[1]
    assert first_line < int(cold.group(2))  # it reaches farther up than the cold prompt
    again = re.search(r"^(\d+) tokens from line", prompts[2])
    assert again and int(again.group(1)) <= 256, prompts[2]
    assert any(line.endswith("past its cached text, over the budget") for line in lines)
    warm_start_prompt(prompts[3])


async def test_a_document_warmed_on_opening_gives_the_first_request_anywhere_in_it_a_long_prompt(
    lsp_setup: ServerSetup,
) -> None:
    # 300 lines (about 4,500 tokens), a budget of 256 tokens under a context of 1,024: once the document is
    # opened the engine reads it from the top as prompts of 1,024 tokens starting half a prompt apart, so the
    # first request at a cursor deep in it, and one at its end, each get a prompt of more than half the
    # context from one of those starts, of which the engine reads no more than the budget; after a line is
    # added at the top the starts below it move down a line with their text, and a request gets such a prompt
    # still.
    text = table_source(300)
    text += "    "
    log_debug(lsp_setup)
    uri = "file:///work/opened.py"
    options = {"developerId": "dev-open", "sessionId": "dev-open-1", "settings": {"completion": WARM_ON_OPENING}}
    log = lsp_setup.log
    async with running_client("vscode", lsp_setup.config, log, options) as client:
        await client.wait_status("ready")
        client.open(uri, text)
        await logged(log, f"{uri} warmed on opening")
        await client.inline(uri, 160, 4)  # the middle of a line: a cursor none of the starts ended at
        await client.inline(uri, 301, 4)  # the end of the document
        client.change(uri, [((0, 0), (0, 0), "# tables\n")])
        await client.inline(uri, 302, 4)
    lines = log.read_text().splitlines()
    done = next(line for line in lines if "file:///work/opened.py warmed on opening" in line)
    found = re.search(r"warmed on opening: (\d+) starts, down to line (\d+) of (\d+)", done)
    assert found and int(found.group(1)) >= 4 and found.group(2) == found.group(3) == "301", done
    prompts = prompts_logged(log, uri)
    assert len(prompts) == 3, prompts
    for prompt, cursor_line in zip(prompts[:2], (160, 301), strict=True):
        tokens, first_line, read, _ = warm_start_prompt(prompt)
        assert 512 < tokens <= 1024 and read <= 256, prompt
        assert first_line < cursor_line - 30, prompt  # far above what 256 tokens reach (about 17 lines)
    tokens, first_line, read, _ = warm_start_prompt(prompts[2])
    assert 512 < tokens <= 1024 and read <= 256, prompts[2]
    assert first_line > 0, prompts[2]  # not the start at the top: its first line is now another


@pytest.mark.parametrize("signal", ["didMoveCursor", "documentHighlight"])
async def test_a_cursor_that_comes_to_rest_is_warmed_before_the_first_request_there(
    signal: str, lsp_setup: ServerSetup
) -> None:
    # 300 lines (about 6,600 tokens), a fill-in-the-middle template (SmolLM2 has no FIM tokens of its own: any
    # template with both places does), a budget of 256 tokens under a context of 1,024, nothing read on opening:
    # the editor says the cursor came to rest on line 250 (heedful/didMoveCursor from a client that says it sends
    # it; else the standard textDocument/documentHighlight the server then asks for, answered with no
    # highlights), the engine reads the whole prompt a request there gets at 1,024 tokens while the developer
    # thinks, and the first request there gets it, its text after the cursor the whole share of such a prompt (256
    # tokens, not the budget's 64), of which the engine reads next to nothing. The same place said again is not
    # read again; a cursor in a document that is not open is ignored (heedful/didMoveCursor: a warning), and the
    # server serves on.
    text = table_source(300)
    log_debug(lsp_setup, fim_template=ANY_FIM_TEMPLATE)
    uri = "file:///work/cursor.py"
    settings = WARM_ON_OPENING | {"warm_open_tokens": 0}
    options: dict[str, Any] = {"developerId": "dev-cursor", "sessionId": f"dev-cursor-{signal}"}
    options["settings"] = {"completion": settings}
    if signal == "didMoveCursor":
        options["cursorRest"] = signal
    log = lsp_setup.log
    async with running_client("vscode", lsp_setup.config, log, options) as client:
        caps = client.capabilities
        assert caps is not None
        assert bool(caps.document_highlight_provider) is (signal == "documentHighlight")
        await client.wait_status("ready")
        client.open(uri, text)

        async def rests(where: str, line: int, character: int) -> None:
            place = {"textDocument": {"uri": where}, "position": {"line": line, "character": character}}
            if signal == "didMoveCursor":
                client.notify("heedful/didMoveCursor", place)
                return
            params = types.DocumentHighlightParams(
                text_document=types.TextDocumentIdentifier(uri=where),
                position=types.Position(line=line, character=character),
            )
            assert await client.lc.text_document_document_highlight_async(params) is None

        await rests("file:///work/closed.py", 1, 0)
        for character in (4, 2):  # the same line again: not read again
            await rests(uri, 250, character)
        await logged(log, f"tokens of {uri} from line")
        await client.inline(uri, 250, 4)
    lines = log.read_text().splitlines()
    closed = "heedful/didMoveCursor for file:///work/closed.py, which is not open"
    assert any(closed in line for line in lines) is (signal == "didMoveCursor")
    # Both notifications are taken (the warm skips the place said again); a documentHighlight on the line of
    # the last one is not even taken as a rest.
    via, taken = ("heedful/didMoveCursor", 2) if signal == "didMoveCursor" else ("textDocument/documentHighlight", 1)
    assert sum(f"the cursor rests on line 250 of {uri} ({via})" in line for line in lines) == taken
    warmed = [line for line in lines if f"tokens of {uri} from line" in line]
    assert len(warmed) == 1, warmed
    (prompt,) = prompts_logged(log, uri)
    tokens, first_line, read, after = warm_start_prompt(prompt)
    assert 768 < tokens <= 1024 and read <= 16, prompt
    assert first_line < 250 - 30, prompt  # far above what 256 tokens reach (about 11 lines)
    # Each of these lines is some 22 tokens (SmolLM2 reads each digit alone): 256 tokens after the cursor are
    # about 11 lines, the budget's 64 about 3.
    assert after > 8 * len(text.splitlines()[251]), prompt


async def test_the_first_request_where_the_cursor_rests_reads_up_to_twice_the_budget_for_the_whole_prompt(
    lsp_setup: ServerSetup,
) -> None:
    # As above (a budget of 256 tokens under a context of 1,024), the whole prompt at line 250 warmed where the
    # cursor rested; then the developer changes a digit five lines above the cursor and the cursor rests there
    # again. The new warm starts on the same line, and the engine still holds the old prompt up to the changed
    # digit, so the first request there, sent at once, has some 370 tokens to read for the whole prompt (the five
    # lines and the whole text after the cursor): more than the budget, less than twice it. It gets that prompt,
    # not one at the budget with a narrower text after the cursor.
    text = table_source(300)
    log_debug(lsp_setup, fim_template=ANY_FIM_TEMPLATE)
    uri = "file:///work/rested-again.py"
    options: dict[str, Any] = {"developerId": "dev-rest-again", "sessionId": "dev-rest-again-1"}
    options["settings"] = {"completion": WARM_ON_OPENING | {"warm_open_tokens": 0}}
    options["cursorRest"] = "didMoveCursor"
    log = lsp_setup.log
    place = {"textDocument": {"uri": uri}, "position": {"line": 250, "character": 4}}
    changed = text.splitlines()[245]
    async with running_client("vscode", lsp_setup.config, log, options) as client:
        await client.wait_status("ready")
        client.open(uri, text)
        client.notify("heedful/didMoveCursor", place)
        await logged(log, f"tokens of {uri} from line")
        digit = str((int(changed[-1]) + 1) % 7)  # one digit for another: the prompt's start stays on its line
        client.change(uri, [((245, len(changed) - 1), (245, len(changed)), digit)])
        client.notify("heedful/didMoveCursor", place)
        await client.inline(uri, 250, 4)
    (prompt,) = prompts_logged(log, uri)
    tokens, first_line, read, after = warm_start_prompt(prompt)
    assert 768 < tokens <= 1024 and 256 < read <= 512, prompt
    assert first_line < 245, prompt
    # The whole share of a prompt at 1,024 tokens after the cursor (256 tokens, about 11 lines), not the 190 or
    # so a prompt at the budget widens to (about 8).
    assert after > 9 * len(text.splitlines()[251]), prompt


async def test_a_prompt_from_a_warm_start_widens_the_text_after_the_cursor_at_a_new_line_only(
    lsp_setup: ServerSetup,
) -> None:
    # A fill-in-the-middle template (SmolLM2 has no FIM tokens of its own: any template with both places does),
    # a budget of 256 tokens under a context of 1,024 (64 and 256 tokens after the cursor) and a document
    # warmed on opening: the first request on a line gets the text after the cursor that the budget leaves
    # unread; a keystroke on that line gets the budget's narrow share again (the engine reads the text after
    # the cursor whole at each request); the next line is new again.
    text = table_source(300)
    log_debug(lsp_setup, fim_template=ANY_FIM_TEMPLATE)
    uri = "file:///work/widened.py"
    options = {"developerId": "dev-wide", "sessionId": "dev-wide-1", "settings": {"completion": WARM_ON_OPENING}}
    log = lsp_setup.log
    async with running_client("vscode", lsp_setup.config, log, options) as client:
        await client.wait_status("ready")
        client.open(uri, text)
        await logged(log, f"{uri} warmed on opening")
        # Near the top: the prompt from the start on line 0 leaves room for a wide text after the cursor.
        await client.inline(uri, 10, 4)
        client.change(uri, [((10, 4), (10, 4), "c")])
        await client.inline(uri, 10, 5)
        await client.inline(uri, 12, 4)
    prompts = prompts_logged(log, uri)
    assert len(prompts) == 3, prompts
    found = [warm_start_prompt(p) for p in prompts]
    read = [r for _, _, r, _ in found]
    after = [a for _, _, _, a in found]
    assert max(read) <= 256, prompts
    # Each of these lines is some 22 tokens (SmolLM2 reads each digit alone): 64 tokens after the cursor are
    # about 3 lines, the 190 or so the budget leaves unread about 8 more.
    assert after[0] > 2 * after[1] and after[2] > 2 * after[1], prompts


async def test_keystrokes_at_the_cursor_extend_the_last_prompt_until_something_else_changes(
    lsp_setup: ServerSetup,
) -> None:
    text = "def area(width, height):\n    "
    log_debug(lsp_setup)
    uri = "file:///work/extended.py"
    settings = {"extend_prompt": True, "type_through": False}
    options = {"developerId": "dev-extend", "sessionId": "dev-extend-1", "settings": {"completion": settings}}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready")
        client.open(uri, text)
        await client.inline(uri, 1, 4)  # a new prompt
        client.change(uri, [((1, 4), (1, 4), "ret")])
        await client.inline(uri, 1, 7)  # extended by "ret"
        client.change(uri, [((1, 7), (1, 7), "urn ")])
        await client.inline(uri, 1, 11)  # extended by "return " (the last prompt's, not the one before)
        client.change(uri, [((0, 0), (0, 0), "# areas\n")])  # a change above the cursor
        await client.inline(uri, 2, 11)  # a new prompt
    lines = [line for line in lsp_setup.log.read_text().splitlines() if "prompt for file:///work/extended.py" in line]
    kinds = ["extended" if "characters typed at its cursor" in line else "new" for line in lines]
    assert kinds == ["new", "extended", "extended", "new"], lines
    assert lines[1].endswith("the last one and 3 characters typed at its cursor")
    assert lines[2].endswith("the last one and 7 characters typed at its cursor")
    prompts = [
        r["prompt"] for r in lsp_setup.rows("SELECT prompt FROM completions WHERE session_id = ?", "dev-extend-1")
    ]
    # What the engine read, for the answers shown (the model may answer nothing): the first prompt healed of
    # the line's indentation, then it with what was typed after it, healed of the space after `return`.
    assert prompts, "the model answered none of the four requests"
    for prompt in prompts:
        assert prompt.split("def area(width, height):\n", 1)[1] in {"", "    ret", "    return"}, prompt
