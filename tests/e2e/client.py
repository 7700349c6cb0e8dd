"""A real LSP client (pygls' `LanguageClient`) driving `heedful serve` in a subprocess over stdio.

Capability sets imitate the editors we ship clients for: VS Code (UTF-16, inline completion), Neovim
(offers UTF-8 first, inline completion since 0.12) and a client without inline completion that gets
`textDocument/completion` items instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from lsprotocol import types

from tools.evaluation import EditorSession

ROOT = Path(__file__).resolve().parents[2]


def _sync_caps() -> types.TextDocumentSyncClientCapabilities:
    return types.TextDocumentSyncClientCapabilities(did_save=True)


CAPABILITIES: dict[str, types.ClientCapabilities] = {
    "vscode": types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=[types.PositionEncodingKind.Utf16]),
        text_document=types.TextDocumentClientCapabilities(
            synchronization=_sync_caps(),
            completion=types.CompletionClientCapabilities(
                completion_item=types.ClientCompletionItemOptions(snippet_support=True)
            ),
            inline_completion=types.InlineCompletionClientCapabilities(dynamic_registration=True),
        ),
        workspace=types.WorkspaceClientCapabilities(
            configuration=True,
            did_change_configuration=types.DidChangeConfigurationClientCapabilities(dynamic_registration=True),
        ),
    ),
    "neovim": types.ClientCapabilities(
        general=types.GeneralClientCapabilities(
            position_encodings=[
                types.PositionEncodingKind.Utf8,
                types.PositionEncodingKind.Utf16,
                types.PositionEncodingKind.Utf32,
            ]
        ),
        text_document=types.TextDocumentClientCapabilities(
            synchronization=_sync_caps(),
            completion=types.CompletionClientCapabilities(),
            inline_completion=types.InlineCompletionClientCapabilities(),
        ),
    ),
    "no-inline": types.ClientCapabilities(
        text_document=types.TextDocumentClientCapabilities(
            synchronization=_sync_caps(), completion=types.CompletionClientCapabilities()
        ),
    ),
}

CLIENT_INFO = {"vscode": ("Visual Studio Code", "1.99.0"), "neovim": ("Neovim", "0.12.0"), "no-inline": ("vim", "9")}
CLIENT_INFO["jetbrains"] = ("IntelliJ IDEA (LSP4IJ)", "2026.1")
CAPABILITIES["jetbrains"] = CAPABILITIES["vscode"]  # UTF-16 positions and inline completion, as LSP4IJ asks


class HeedfulClient(EditorSession):
    """One editor session against one `heedful serve` process, with one editor's capabilities."""

    def __init__(self, flavour: str) -> None:
        super().__init__("heedful-tests")
        self.flavour = flavour
        self.encoding = types.PositionEncodingKind.Utf8 if flavour == "neovim" else types.PositionEncodingKind.Utf16

    async def start(  # type: ignore[override]
        self,
        config: Path,
        stderr_log: Path,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        """Start `heedful --config CONFIG ARGS...` (default ARGS: `serve`) as this client's server; `command`
        replaces the whole command line (the config then goes by HEEDFUL_CONFIG), as an editor configured
        by hand would start it."""
        if command is None:
            command = [sys.executable, "-m", "server.cli", "--config", str(config), *(args or ["serve"])]
        else:
            env = dict(env or {}, HEEDFUL_CONFIG=str(config))
        await self.start_process(command, stderr_log, cwd=ROOT, env=dict(os.environ, **(env or {})))

    async def initialize(self, options: dict[str, Any] | None, folders: Sequence[Path] = ()) -> types.InitializeResult:
        return await self.initialize_as(CAPABILITIES[self.flavour], CLIENT_INFO[self.flavour], options, folders)

    async def wait_status(self, state: str, timeout: float = 600.0) -> dict[str, Any]:
        async def wait() -> dict[str, Any]:
            while True:
                for status in reversed(self.statuses):
                    if status["state"] == state:
                        return dict(status)
                self._status_changed.clear()
                await self._status_changed.wait()

        found: dict[str, Any] = await asyncio.wait_for(wait(), timeout)
        return found

    async def completion(self, uri: str, line: int, character: int) -> Any:
        return await self.lc.text_document_completion_async(
            types.CompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(line=line, character=character),
            )
        )


@asynccontextmanager
async def tcp_server(config: Path, log: Path, *args: str) -> Any:
    """`heedful serve --tcp --port 0 ARGS` in a subprocess: yields (port, process); stopped with SIGTERM after."""
    import re

    with log.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "--config", str(config), "serve", "--tcp", "--port", "0", *args,
            stderr=stderr, cwd=str(ROOT),
        )  # fmt: skip
    try:
        port = None
        for _ in range(600):
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if found:
                port = int(found.group(1))
                break
            assert proc.returncode is None, log.read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.1)
        assert port is not None, log.read_text(errors="replace")[-3000:]
        yield port, proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)


@asynccontextmanager
async def running_client(
    flavour: str,
    config: Path,
    log: Path,
    options: dict[str, Any] | None,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    args: list[str] | None = None,
    folders: Sequence[Path] = (),
) -> Any:
    client = HeedfulClient(flavour)
    await client.start(config, log, env, command, args)
    try:
        await client.initialize(options, folders)
        yield client
    finally:
        await client.stop()
