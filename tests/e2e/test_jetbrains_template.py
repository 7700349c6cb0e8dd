"""The LSP4IJ template for JetBrains IDEs (editor-clients/jetbrains/heedful) starts a working server.

LSP4IJ runs the template's `programArgs` command as a shell would and sends `initializationOptions.json` in
`initialize`. This test does the same with the command as written (`heedful` found on PATH, from this
installation's environment), then checks what a JetBrains IDE relies on: the capabilities, an empty answer
to the documentHighlight LSP4IJ asks where the caret settles, a completion popup item whose command records
the accept, and the status notification.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types

from lsp_handlers.protocol import ACCEPT_COMMAND, FEEDBACK_COMMAND
from server.shared import peer_pid, socket_path
from tests.e2e.client import running_client
from tests.e2e.conftest import ServerSetup

pytestmark = [pytest.mark.engine, pytest.mark.remote]

TEMPLATE = Path(__file__).resolve().parents[2] / "editor-clients" / "jetbrains" / "heedful"
URI = "file:///work/shop/orders_jetbrains.py"
SOURCE = 'def read_lines(path):\n    """Return the lines of a text file without their line endings."""\n    '


def load(name: str) -> Any:
    path = TEMPLATE / name
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        pytest.fail(f"{path} is not valid JSON: {exc}")


# What LSP4IJ's template readers take from a template.json: a key outside these is silently ignored by the
# IDE, so a misspelt one would go unnoticed. Its older reader requires "name" and programArgs' "default".
LSP4IJ_TEMPLATE_KEYS = {
    "id",
    "name",
    "url",
    "dev",
    "programArgs",
    "env",
    "workingDir",
    "fileTypeMappings",
    "languageMappings",
}
LSP4IJ_OS_KEYS = {"default", "windows", "mac", "unix"}  # programArgs: the IDE's OS key, else "default"


def unix_command(template: dict[str, Any]) -> list[str]:
    """The command LSP4IJ runs on Linux: programArgs' "unix" entry, else its "default" one."""
    args = template["programArgs"]
    return shlex.split(args.get("unix", args["default"]))


def test_template_files_are_what_lsp4ij_reads() -> None:
    template = load("template.json")
    assert set(template) <= LSP4IJ_TEMPLATE_KEYS, set(template) - LSP4IJ_TEMPLATE_KEYS
    assert template["id"] == "heedful" and template["name"] == "Heedful"
    assert set(template["programArgs"]) <= LSP4IJ_OS_KEYS and all(
        isinstance(v, str) and v for v in template["programArgs"].values()
    )
    assert unix_command(template) == ["heedful", "serve", "--shared"]
    mappings = template["fileTypeMappings"]
    assert {"fileType": {"name": "Python", "patterns": ["*.py", "*.pyi"]}, "languageId": "python"} in mappings
    for mapping in mappings:
        # LSP4IJ maps a file by its IDE file type's name and by its name patterns, each to the languageId
        # sent in didOpen.
        assert set(mapping) == {"fileType", "languageId"} and set(mapping["fileType"]) == {"name", "patterns"}
        assert mapping["fileType"]["name"] and mapping["languageId"]
        assert mapping["fileType"]["patterns"] and all(p.startswith("*.") for p in mapping["fileType"]["patterns"])
    options = load("initializationOptions.json")
    assert set(options) <= {"developerId", "sessionId", "team", "token", "settings"}
    assert isinstance(options["developerId"], str)


async def test_template_command_starts_the_server_and_answers_initialize(
    lsp_setup: ServerSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = unix_command(load("template.json"))
    # `heedful` as LSP4IJ finds it: on PATH, here the console script of the environment running the tests.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    options = dict(load("initializationOptions.json"), developerId="dev-jetbrains", team="ide")
    # The command starts the user's shared server: give it a runtime and data dir of the test's own.
    run = Path(tempfile.mkdtemp(prefix="hf-run-"))
    env = {"PATH": path, "XDG_RUNTIME_DIR": str(run), "HEEDFUL_DATA_DIR": str(tmp_path / "data")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sock = socket_path(lsp_setup.config, tmp_path / "data")
    try:
        await _drive_template(command, options, lsp_setup, env)
    finally:
        pid = peer_pid(sock)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)  # its last window closed; it would otherwise wait idle_exit_s
            for _ in range(300):
                if peer_pid(sock) is None:
                    break
                await asyncio.sleep(0.1)
        shutil.rmtree(run, ignore_errors=True)
    assert pid is not None, "the template's command did not start a shared server"


async def _drive_template(
    command: list[str], options: dict[str, Any], lsp_setup: ServerSetup, env: dict[str, str]
) -> None:
    config, log = lsp_setup.config, lsp_setup.log
    async with running_client("jetbrains", config, log, options, env=env, command=command) as client:
        caps = client.capabilities
        assert caps is not None
        assert caps.inline_completion_provider not in (None, False)
        assert caps.completion_provider is not None
        assert caps.execute_command_provider is not None
        assert {ACCEPT_COMMAND, FEEDBACK_COMMAND} <= set(caps.execute_command_provider.commands)
        # LSP4IJ asks documentHighlight where the caret settles (to highlight the usages of the symbol there):
        # Heedful takes it as where the cursor rests and answers no highlights, which leaves the IDE's own.
        assert caps.document_highlight_provider is True
        status = await client.wait_status("ready", timeout=120)
        assert status["developerId"] == "dev-jetbrains"

        # LSP4IJ versions without inline completion show Heedful in the completion popup; choosing the
        # item applies its edit and runs its command.
        client.open(URI, SOURCE)
        highlight = types.DocumentHighlightParams(
            text_document=types.TextDocumentIdentifier(uri=URI), position=types.Position(line=2, character=4)
        )
        assert await client.lc.text_document_document_highlight_async(highlight) is None
        result = await client.completion(URI, 2, 4)
        assert isinstance(result, types.CompletionList) and result.items
        item = result.items[0]
        assert item.command is not None and item.command.command == ACCEPT_COMMAND
        assert isinstance(item.text_edit, types.TextEdit)
        edit = item.text_edit
        client.change(URI, [((edit.range.start.line, edit.range.start.character), (2, 4), edit.new_text)])
        accepted = await client.command(item.command.command, *(item.command.arguments or []))
        assert accepted["recorded"] is True

    (session,) = lsp_setup.rows("SELECT * FROM sessions")
    assert session["developer_id"] == "dev-jetbrains" and session["team_id"] == "ide"
    (event,) = lsp_setup.rows("SELECT * FROM events WHERE kind = 'accepted'")
    assert event["completion_id"] == accepted["completionId"]
