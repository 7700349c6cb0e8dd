"""A real LSP client (pygls' `LanguageClient`) driving `heedful serve` in a subprocess over stdio.

Capability sets imitate the editors we ship clients for: VS Code (UTF-16, inline completion), Neovim
(offers UTF-8 first, inline completion since 0.12) and a client without inline completion that gets
`textDocument/completion` items instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.client import LanguageClient

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


def plain(value: Any) -> Any:
    """pygls hands unknown notifications over as namedtuples; turn them back into dicts and lists."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


class HeedfulClient:
    """One editor session against one `heedful serve` process."""

    def __init__(self, flavour: str) -> None:
        self.flavour = flavour
        self.encoding = types.PositionEncodingKind.Utf8 if flavour == "neovim" else types.PositionEncodingKind.Utf16
        self.lc = LanguageClient("heedful-tests", "1")
        self.statuses: list[dict[str, Any]] = []
        self.messages: list[str] = []
        self._status_changed = asyncio.Event()
        self.versions: dict[str, int] = {}
        self.capabilities: types.ServerCapabilities | None = None

        @self.lc.feature("heedful/status")  # type: ignore[untyped-decorator]
        def on_status(params: Any) -> None:
            self.statuses.append(plain(params))
            self._status_changed.set()

        @self.lc.feature(types.WINDOW_SHOW_MESSAGE)  # type: ignore[untyped-decorator]
        def on_message(params: types.ShowMessageParams) -> None:
            self.messages.append(params.message)

        @self.lc.feature(types.WINDOW_LOG_MESSAGE)  # type: ignore[untyped-decorator]
        def on_log(params: types.LogMessageParams) -> None:
            pass

    async def start(
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
        await self.lc.start_io(*command, cwd=str(ROOT), env=dict(os.environ, **(env or {})))
        proc = self.lc._server
        assert proc is not None and proc.stderr is not None
        self._stderr_task = asyncio.create_task(_drain(proc.stderr, stderr_log))

    async def initialize(self, options: dict[str, Any] | None) -> types.InitializeResult:
        name, version = CLIENT_INFO[self.flavour]
        result = await self.lc.initialize_async(
            types.InitializeParams(
                capabilities=CAPABILITIES[self.flavour],
                client_info=types.ClientInfo(name=name, version=version),
                initialization_options=options,
                process_id=os.getpid(),
            )
        )
        self.lc.initialized(types.InitializedParams())
        self.capabilities = result.capabilities
        return result

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

    def open(self, uri: str, text: str, language: str = "python") -> None:
        self.versions[uri] = 1
        self.lc.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(uri=uri, language_id=language, version=1, text=text)
            )
        )

    def change(self, uri: str, edits: list[tuple[tuple[int, int], tuple[int, int], str]]) -> None:
        """Incremental edits, each ((line, char), (line, char), new text) in this client's position units."""
        self.versions[uri] += 1
        changes: list[types.TextDocumentContentChangeEvent] = [
            types.TextDocumentContentChangePartial(
                range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text
            )
            for start, end, text in edits
        ]
        self.lc.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
                content_changes=changes,
            )
        )

    async def inline(self, uri: str, line: int, character: int) -> types.InlineCompletionList | None:
        result = await self.lc.text_document_inline_completion_async(
            types.InlineCompletionParams(
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(line=line, character=character),
            )
        )
        if result is None or isinstance(result, types.InlineCompletionList):
            return result
        return types.InlineCompletionList(items=list(result))

    async def completion(self, uri: str, line: int, character: int) -> Any:
        return await self.lc.text_document_completion_async(
            types.CompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(line=line, character=character),
            )
        )

    async def command(self, name: str, *arguments: Any) -> Any:
        result = await self.lc.workspace_execute_command_async(
            types.ExecuteCommandParams(command=name, arguments=list(arguments))
        )
        return plain(result)

    def notify(self, method: str, params: Any) -> None:
        self.lc.protocol.notify(method, params)

    async def stop(self) -> int | None:
        """shutdown + exit, as an editor does; the server's exit status."""
        proc = self.lc._server
        try:
            if proc is not None and proc.returncode is None:
                await asyncio.wait_for(self.lc.shutdown_async(None), 60)
                self.lc.exit(None)
                await asyncio.wait_for(proc.wait(), 60)
        finally:
            await self.lc.stop()  # type: ignore[no-untyped-call]
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            await asyncio.sleep(0)
        return proc.returncode if proc is not None else None


async def _drain(stream: asyncio.StreamReader, path: Path) -> None:
    with path.open("ab") as out:
        while chunk := await stream.read(65536):
            out.write(chunk)
            out.flush()


@asynccontextmanager
async def tcp_server(config: Path, log: Path) -> Any:
    """`heedful serve --tcp --port 0` in a subprocess: yields (port, process); stopped with SIGTERM after."""
    import re

    with log.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "--config", str(config), "serve", "--tcp", "--port", "0",
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
) -> Any:
    client = HeedfulClient(flavour)
    await client.start(config, log, env, command, args)
    try:
        await client.initialize(options)
        yield client
    finally:
        await client.stop()
