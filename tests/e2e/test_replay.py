"""Recording LSP sessions and replaying them against a fresh server (`heedful serve --record`,
`heedful record`, `heedful replay`).

A session is played by the end-to-end client against `heedful serve --record`; the recording is then
replayed by `heedful replay` against this build (it must pass), against a copy of this build whose
completion items carry a different command title (it must fail, naming the message), and in broken
forms (a clear error naming the line).
"""

from __future__ import annotations

import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.client import ROOT, running_client
from tests.e2e.conftest import write_config
from tests.e2e.sessions import SECRET, SESSIONS, record_session
from tests.procs import run_heedful

pytestmark = [pytest.mark.engine, pytest.mark.remote]


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def compared(recording: Path) -> int:
    """What a replay checks: each message the server sent, and the events the session stored."""
    return sum(e.get("direction") in ("server-to-client", "store") for e in lines_of(recording))


@pytest.fixture(scope="module")
async def recording(tmp_path_factory: pytest.TempPathFactory, small_model: Path, vllm_server: str) -> Path:
    """The VS Code editing session, recorded once by `heedful serve --record`."""
    tmp = tmp_path_factory.mktemp("recorded")
    setup = write_config(tmp, small_model, vllm_server)
    out = tmp / "session.jsonl"
    await record_session("vscode-accept-reject-correct", setup.config, setup.log, out)
    return out


@pytest.fixture
def replay_config(tmp_path: Path, small_model: Path, vllm_server: str) -> Path:
    """Settings for a replayed server: the same engine, an empty store of its own."""
    return write_config(tmp_path, small_model, vllm_server).config


def test_serve_record_writes_every_message_both_ways_with_secrets_redacted(recording: Path) -> None:
    header, *entries, store = lines_of(recording)
    assert header["heedful_recording"] == 1 and header["source"] == "serve"
    assert store["direction"] == "store" and store["session"] == "qa-vscode-1"
    directions = {e["direction"] for e in entries}
    assert directions == {"client-to-server", "server-to-client"}
    offsets = [e["t"] for e in entries]
    assert offsets == sorted(offsets) and offsets[0] >= 0
    sent = [e["message"].get("method") for e in entries if e["direction"] == "client-to-server"]
    assert sent[:2] == ["initialize", "initialized"] and sent[-2:] == ["shutdown", "exit"]
    assert sent.count("textDocument/inlineCompletion") == 2 and "heedful/didRejectCompletion" in sent
    answers = [e["message"] for e in entries if e["direction"] == "server-to-client" and "result" in e["message"]]
    inline = [a["result"] for a in answers if isinstance(a["result"], dict) and "items" in a["result"]]
    assert len(inline) == 2 and inline[0]["items"][0]["command"]["command"] == "heedful.acceptCompletion"
    text = recording.read_text(encoding="utf-8")
    assert SECRET not in text and "[REDACTED:aws-access-key]" in text


def test_replay_against_the_same_build_passes(recording: Path, replay_config: Path, tmp_path: Path) -> None:
    junit = tmp_path / "replay.xml"
    # Paced as recorded, twice as fast: the client's messages keep their order and the waits still hold.
    result = run_heedful(replay_config, "replay", str(recording), "--speed", "2", "--junit", str(junit))
    assert result.returncode == 0, result.stdout + result.stderr
    n = compared(recording)  # 8 unless a learning status came mid-session
    assert f"{n} of {n} server messages match" in result.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and suite.get("tests") == str(n)
    names = [case.get("name", "") for case in suite.iter("testcase")]
    assert sum("textDocument/inlineCompletion" in n for n in names) == 2
    assert names[-1] == f"line {len(lines_of(recording))}: events the session stored"


def test_replay_compares_the_events_the_session_stored(recording: Path, replay_config: Path, tmp_path: Path) -> None:
    *head, store_line = lines_of(recording)
    assert store_line["direction"] == "store"
    kinds = sorted(e["kind"] for e in store_line["events"])
    assert kinds == ["accepted", "correction", "edit_snapshot", "edit_snapshot", "rejected", "shown"]
    (correction,) = [e for e in store_line["events"] if e["kind"] == "correction"]
    assert correction["completion"] == 1 and "[REDACTED:aws-access-key]" in correction["text"]
    # The recording says the session stored no reject: the replayed session stores one, and that is named.
    store_line["events"] = [e for e in store_line["events"] if e["kind"] != "rejected"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(line) + "\n" for line in [*head, store_line]), encoding="utf-8")
    result = run_heedful(replay_config, "replay", str(edited), "--no-timing")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{edited}:{len(head) + 1}: events the session stored differs:" in result.stdout
    assert (
        'stored in the replay, not in the recording: {"completion": 1, "delay_s": null, "inferred": false, '
        '"kind": "rejected", "text": null}' in result.stdout
    ), result.stdout
    assert "7 of 8 server messages match" in result.stdout


def test_the_recording_carries_the_settings_that_shaped_what_the_session_stored(
    recording: Path, tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    header = lines_of(recording)[0]
    assert header["settings"]["feedback"]["edit_snapshot_delays_s"] == [1.0, 2.0]
    settings = header["settings"]
    assert set(settings) == {"completion", "feedback"} and settings["completion"]["max_tokens"] == 24
    # A server whose own settings say 30 s and 120 s: the replay gives the session the recorded 1 s and 2 s ...
    config = write_config(tmp_path, small_model, vllm_server, snapshot_delays=(30.0, 120.0)).config
    result = run_heedful(config, "replay", str(recording), "--no-timing")
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and without them, the snapshots the session takes at its end stand for 30 s and 120 s.
    ignored = run_heedful(config, "replay", str(recording), "--no-timing", "--ignore-recorded-settings")
    assert ignored.returncode == 1, ignored.stdout + ignored.stderr
    assert 'stored in the replay, not in the recording: {"completion": 0, "delay_s": 30.0' in ignored.stdout


def test_replay_against_a_changed_build_fails_with_a_diff_naming_the_message(
    recording: Path, replay_config: Path, tmp_path: Path
) -> None:
    build = tmp_path / "changed-build"
    for package in ("server", "lsp_handlers", "storage", "personalization"):
        shutil.copytree(ROOT / package, build / package, ignore=shutil.ignore_patterns("__pycache__"))
    handlers = build / "lsp_handlers" / "server.py"
    source = handlers.read_text(encoding="utf-8")
    assert 'title="Accept Heedful completion"' in source
    handlers.write_text(source.replace('title="Accept Heedful completion"', 'title="Take it"'), encoding="utf-8")

    junit = tmp_path / "replay.xml"
    result = run_heedful(replay_config, "replay", str(recording), "--no-timing", "--junit", str(junit), cwd=build)
    assert result.returncode == 1, result.stdout + result.stderr
    inline_lines = [
        i + 2  # the header is line 1
        for i, e in enumerate(lines_of(recording)[1:])
        if e["direction"] == "server-to-client"
        and isinstance(e["message"].get("result"), dict)
        and "items" in e["message"]["result"]
    ]
    for line in inline_lines:
        assert f"{recording}:{line}: response to textDocument/inlineCompletion" in result.stdout, result.stdout
    assert 'result.items[0].command.title: recorded "Accept Heedful completion", replayed "Take it"' in result.stdout, (
        result.stdout
    )
    assert "FAILED" in result.stdout and "6 of 8 server messages match" in result.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "2"


def test_truncated_and_corrupt_recordings_are_refused_with_their_line(
    recording: Path, replay_config: Path, tmp_path: Path
) -> None:
    lines = recording.read_text(encoding="utf-8").splitlines(keepends=True)
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")
    result = run_heedful(replay_config, "replay", str(truncated), "--no-timing")
    assert result.returncode == 2
    assert f"{truncated}:{len(lines)}: the last line is cut off" in result.stderr and "truncated" in result.stderr

    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(
        "".join(lines[:4]) + '{"t": 1.0, "direction": "client-to\n' + "".join(lines[5:]), encoding="utf-8"
    )
    result = run_heedful(replay_config, "replay", str(corrupt), "--no-timing")
    assert result.returncode == 2
    assert f"{corrupt}:5: not valid JSON" in result.stderr and "corrupt" in result.stderr

    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(lines[:2]) + '{"t": 1.0, "direction": "sideways", "message": {}}\n', encoding="utf-8")
    result = run_heedful(replay_config, "replay", str(wrong), "--no-timing")
    assert result.returncode == 2 and f"{wrong}:3: direction = 'sideways' is not valid" in result.stderr

    headless = tmp_path / "headless.jsonl"
    headless.write_text("".join(lines[1:]), encoding="utf-8")
    result = run_heedful(replay_config, "replay", str(headless), "--no-timing")
    assert result.returncode == 2 and f"{headless}:1: not a Heedful recording" in result.stderr


async def test_the_record_proxy_records_a_server_it_runs(tmp_path: Path, small_model: Path, vllm_server: str) -> None:
    setup = write_config(tmp_path, small_model, vllm_server, extra='\n[privacy]\nredact_patterns = ["total"]\n')
    out = tmp_path / "proxied.jsonl"
    server = [sys.executable, "-m", "server.cli", "--config", str(setup.config), "serve"]
    session = SESSIONS["vim-completion-items"]
    command = ["record", "--out", str(out), "--", *server]
    async with running_client(session.flavour, setup.config, setup.log, session.options, args=command) as client:
        await session.play(client)
    header, *entries = lines_of(out)
    assert header["source"] == "proxy"
    received = [e["message"] for e in entries if e["direction"] == "server-to-client"]
    assert any(m.get("method") == "heedful/status" and m["params"]["state"] == "ready" for m in received)
    items = [m["result"]["items"] for m in received if isinstance(m.get("result"), dict) and "items" in m["result"]]
    assert len(items) == 1 and items[0][0]["command"]["command"] == "heedful.acceptCompletion"
    sent = [e["message"].get("method") for e in entries if e["direction"] == "client-to-server"]
    assert sent[0] == "initialize" and sent[-1] == "exit" and "textDocument/completion" in sent
    # The admin's own pattern applies too: the document's "total = sum(" is scrubbed.
    opened = next(e["message"] for e in entries if e["message"].get("method") == "textDocument/didOpen")
    assert "total" not in opened["params"]["textDocument"]["text"]
    assert "[REDACTED:custom]" in opened["params"]["textDocument"]["text"]
