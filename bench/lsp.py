"""End-to-end inlineCompletion latency through `heedful serve` next to the raw embedded engine, same run.

Cursor positions are the first body line of functions in the standard library's own sources: the
document is the whole file with that line emptied to its indentation and the cursor at the end of it
(a multi-line completion, like starting to write a function body). The same prompts are then given to
the bare `EmbeddedEngine` in this process, so the ratio LSP / raw is the cost of the language server:
JSON-RPC over a pipe or socket, pygls dispatch, prompt building, post-processing, the store.

- 1 session: a real LSP client drives `heedful serve` over stdio (one server process, one engine);
  the raw peer is `engine.generate` called back-to-back.
- N sessions (default 8): one `heedful serve --tcp` process (one engine shared, as in production), N
  client connections each issuing its share of the requests back-to-back, all at once; the raw peer is
  N tasks calling `engine.generate` on the same split. (Over stdio every session would start its own
  engine: 8 engines on 2 cores measures contention, not the server.)

One engine runs at a time; each case starts from an empty prefix cache and 3 unmeasured warm-up
requests. The raw engine runs before and after the LSP phases and its two passes are pooled, so a load
that drifts during the run (other jobs on the machine) weighs on both sides; the table shows the drift.
The server runs greedy, one generation per request (no training group), so it does exactly the engine
work the raw peer does. Prompts are computed here with the server's own `prompt_for` and
token healing, and checked against the token ids the server recorded in its store.

    .venv/bin/python -m bench.lsp [--requests 40] [--sessions 8] [--max-tokens 32] [--raw-passes 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import sqlite3
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from bench.engine import percentiles

if TYPE_CHECKING:
    from kernel.settings import Settings
    from server.engine.embedded import EmbeddedEngine
    from server.engine.tokens import LocalTokenizer

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3
STDLIB_FILES = [
    "json/encoder.py",
    "textwrap.py",
    "argparse.py",
    "csv.py",
    "shlex.py",
    "fractions.py",
    "difflib.py",
    "configparser.py",
    "ipaddress.py",
    "statistics.py",
]
DEF_RE = re.compile(r"^([ \t]*)def \w+\(.*\)(?:\s*->\s*[^:]+)?:\s*$")


class BenchError(RuntimeError):
    """The benchmark cannot run; the message says why and what to do."""


def parse_overrides(group: str, option: str = "--set") -> dict[str, dict[str, Any]]:
    """`option`'s "section.key=value,..." as settings sections; values are TOML. Raises ValueError, naming the
    part."""
    import tomllib

    sections: dict[str, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in group.split(","))):
        name, sep, value = part.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise ValueError(f"{option} part {part!r} is not section.key=value (e.g. completion.suffix_share=0.1)")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError as exc:
            problem = f"{option} part {part!r}: {value.strip()!r} is not a TOML value ({exc}); quote text"
            raise ValueError(problem) from None
        sections.setdefault(section, {})[key] = parsed
    return sections


def overrides_arg(value: str) -> str:
    """argparse `type=` for a `--set` group: the group itself, once `parse_overrides` has read it."""
    try:
        parse_overrides(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


async def report_or_exit(
    name: str, report: Awaitable[dict[str, Any]], as_json: bool, print_table: Callable[[dict[str, Any]], None]
) -> None:
    """Await a bench's report and print it (JSON or table); a `BenchError` exits 1 with its message."""
    try:
        result = await report
    except BenchError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


# ---------------------------------------------------------------------------------------------
# Requests and the prompts the server will send for them


@dataclass(slots=True)
class Request:
    uri: str
    text: str  # the document: the whole file, the cursor line emptied to its indentation
    line: int
    character: int
    prompt: str = ""  # what the server sends the engine for this cursor (prompt_for + token healing)
    typed: str = ""  # what the developer goes on typing at the cursor (bench.latency's typing case)


def cursor_requests(count: int) -> list[Request]:
    """`count` cursors at the first body line of functions spread over STDLIB_FILES, files interleaved."""
    root = Path(sysconfig.get_paths()["stdlib"])
    per_file = math.ceil(count / len(STDLIB_FILES))
    picked: list[list[tuple[str, str, int, int]]] = []
    for rel in STDLIB_FILES:
        lines = (root / rel).read_text(encoding="utf-8").splitlines(keepends=True)
        found: list[tuple[str, int, int]] = []
        for i in range(len(lines) - 1):
            m = DEF_RE.match(lines[i])
            body = lines[i + 1]
            indent = body[: len(body) - len(body.lstrip(" \t"))]
            if not m or not body.strip() or len(indent) <= len(m.group(1)):
                continue
            text = "".join(lines[: i + 1]) + indent + "\n" + "".join(lines[i + 2 :])
            found.append((text, i + 1, len(indent)))
        # Evenly spaced through the file: short prefixes near the top, full context budgets further down.
        step = max(1, len(found) // per_file)
        picked.append([(rel, *f) for f in found[step // 2 :: step][:per_file]])
    requests: list[Request] = []
    for k in range(per_file):
        for chosen in picked:
            if k < len(chosen) and len(requests) < count:
                rel, text, line, character = chosen[k]
                requests.append(Request(f"file:///bench/{len(requests):03d}/lib/{rel}", text, line, character))
    if len(requests) < count:
        raise BenchError(f"found only {len(requests)} functions in {STDLIB_FILES}; ask for fewer --requests")
    return requests


class _PromptServices:
    """What `CompletionService.prompt_for` reads of `Services`: the tokenizer and its vocabulary."""

    def __init__(self, tokenizer: LocalTokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocabulary = tokenizer.vocabulary()


def fill_prompts(
    requests: list[Request], settings: Settings, tokenizer: LocalTokenizer, *, single_line: bool = False
) -> list[float]:
    """Set each request's prompt exactly as `CompletionService.complete` builds it (token healing too).

    `single_line` says which kind of cursor every request must be. Returns the seconds `prompt_for` took
    per request here: a share of the server's own latency.
    """
    from lsp_handlers.completion import CompletionService
    from lsp_handlers.context import heal
    from lsp_handlers.documents import TextDocument
    from lsp_handlers.postprocess import is_single_line
    from server.runtime import Services

    service = CompletionService(cast(Services, _PromptServices(tokenizer)))
    seconds: list[float] = []
    for r in requests:
        doc = TextDocument(r.uri, r.text, 1, "python", types.PositionEncodingKind.Utf16)
        offset = doc.offset_at(types.Position(line=r.line, character=r.character))
        if is_single_line(*doc.line_at(offset)) != single_line:
            kind = "multi-line" if single_line else "single-line"
            raise BenchError(f"{r.uri}:{r.line} is a {kind} cursor; this bench measures the other kind")
        start = time.perf_counter()
        prompt = service.prompt_for(doc, offset, settings)
        seconds.append(time.perf_counter() - start)
        r.prompt = heal(prompt)[0]
    return seconds


# ---------------------------------------------------------------------------------------------
# The server and its clients


def bench_config(
    tmp: Path, name: str, model: Path, sections: dict[str, dict[str, Any]] | None = None
) -> tuple[Path, Path]:
    """A settings file for a bench's `heedful serve`: (config, its SQLite db) in `tmp`.

    Every bench runs the embedded engine on `model` with a 1 GiB KV cache, greedy completions, no
    training groups, no show policy (a bench's developer turns suggestions down or types past them by
    the dozen: after 20 the policy would answer some with nothing, and a bench times every completion
    the engine makes), no in-server training worker (a bench that measures training runs its own) and no
    latency guard (8 sessions at once on two cores take 10-20 s a completion with the code model: the
    guard rolled the measured adapter back in the middle of its case); `sections` adds or overrides keys
    per section.
    """
    from kernel.settings import toml_value

    db = tmp / f"{name}.db"
    config = tmp / f"{name}.toml"
    merged: dict[str, dict[str, Any]] = {
        "model": {"path": str(model)},
        "engine": {"mode": "embedded", "kv_cache_gib": 1},
        "completion": {"temperature": 0.0, "group_sample_rate": 0.0, "show_threshold": 0.0},
        "training": {"in_server": False},
        "thresholds": {"p99_latency_ms": 1e9},
    }
    for section, values in (sections or {}).items():
        merged.setdefault(section, {}).update(values)
    merged["database"] = {"url": f"sqlite+aiosqlite:///{db}"}
    text = "".join(
        f"[{section}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()) + "\n"
        for section, values in merged.items()
    )
    config.write_text(text, encoding="utf-8")
    return config, db


def write_config(tmp: Path, name: str, model: Path, max_tokens: int) -> tuple[Path, Path]:
    return bench_config(tmp, name, model, {"completion": {"max_tokens": max_tokens, "timeout_ms": 60000}})


def learned_budgets(log: Path) -> list[int]:
    """Every context budget a server learned from its engine's speed, in order (its log's "context budget"
    lines: the budget moves when the engine's speed crosses a step)."""
    found = re.findall(r"context budget (\d+) tokens", log.read_text(encoding="utf-8", errors="replace"))
    return [int(n) for n in found]


def learned_budget(log: Path) -> int | None:
    """The context budget a server learned last, or None."""
    found = learned_budgets(log)
    return found[-1] if found else None


def server_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "--config", str(config), "serve", *extra]


async def drain(stream: asyncio.StreamReader, log: Path) -> None:
    with log.open("ab") as out:
        while chunk := await stream.read(65536):
            out.write(chunk)
            out.flush()


def log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


CAPABILITIES = types.ClientCapabilities(
    general=types.GeneralClientCapabilities(position_encodings=[types.PositionEncodingKind.Utf16]),
    text_document=types.TextDocumentClientCapabilities(
        synchronization=types.TextDocumentSyncClientCapabilities(did_save=True),
        inline_completion=types.InlineCompletionClientCapabilities(),
    ),
)


class BenchClient:
    """One editor session: initialize, open documents, time inline completions."""

    def __init__(
        self, developer: str, team: str | None = None, *, workspace: Path | None = None, cursor_rest: str | None = None
    ) -> None:
        self.developer = developer
        self.team = team
        self.workspace = workspace  # the folder `initialize` names (cross-file context reads only there)
        # How `cursor` says where the cursor rests (`CURSOR_REST_SIGNALS`: heedful/didMoveCursor as the Heedful
        # clients send it, or textDocument/documentHighlight as LSP4IJ asks it); None: it is never said.
        self.cursor_rest = cursor_rest
        self.lc = LanguageClient("heedful-bench", "1")
        self.states: list[tuple[str, str | None]] = []
        self._changed = asyncio.Event()

        @self.lc.feature("heedful/status")  # type: ignore[untyped-decorator]
        def on_status(params: Any) -> None:
            # pygls hands unknown notifications over as namedtuples.
            fields: dict[str, Any] = params if isinstance(params, dict) else params._asdict()
            self.states.append((str(fields.get("state")), fields.get("message")))
            self._changed.set()

        @self.lc.feature(types.WINDOW_SHOW_MESSAGE)  # type: ignore[untyped-decorator]
        def on_message(params: types.ShowMessageParams) -> None:
            print(f"server says: {params.message}", file=sys.stderr)

        @self.lc.feature(types.WINDOW_LOG_MESSAGE)  # type: ignore[untyped-decorator]
        def on_log(params: types.LogMessageParams) -> None:
            pass

    async def initialize(self) -> None:
        await self.lc.initialize_async(
            types.InitializeParams(
                capabilities=CAPABILITIES,
                client_info=types.ClientInfo(name="heedful-bench", version="1"),
                initialization_options={"developerId": self.developer, "team": self.team}
                | ({"cursorRest": self.cursor_rest} if self.cursor_rest else {}),
                process_id=os.getpid(),
                workspace_folders=[types.WorkspaceFolder(uri=self.workspace.as_uri(), name=self.workspace.name)]
                if self.workspace
                else None,
            )
        )
        self.lc.initialized(types.InitializedParams())

    async def wait_ready(self, timeout: float) -> None:
        async def wait() -> None:
            while True:
                for state, message in self.states:
                    if state == "ready":
                        return
                    if state == "failing":
                        raise BenchError(f"the server's engine is failing: {message}")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def close_document(self, uri: str) -> None:
        self.lc.text_document_did_close(
            types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))
        )

    def open(self, request: Request) -> None:
        self.lc.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=request.uri, language_id="python", version=1, text=request.text
                )
            )
        )

    async def cursor(self, request: Request) -> None:
        """The developer's cursor came to rest at the request's place, said the client's way (`cursor_rest`):
        `heedful/didMoveCursor` as the Heedful editor clients send it, or the `textDocument/documentHighlight`
        LSP4IJ asks where the caret settles (its answer awaited)."""
        if self.cursor_rest == "documentHighlight":
            document = types.TextDocumentIdentifier(uri=request.uri)
            position = types.Position(line=request.line, character=request.character)
            params = types.DocumentHighlightParams(text_document=document, position=position)
            await self.lc.text_document_document_highlight_async(params)
            return
        if self.cursor_rest != "didMoveCursor":
            raise BenchError(f"this client does not say where the cursor rests (cursor_rest={self.cursor_rest!r})")
        self.lc.protocol.notify(
            "heedful/didMoveCursor",
            {"textDocument": {"uri": request.uri}, "position": {"line": request.line, "character": request.character}},
        )

    def insert(self, uri: str, version: int, line: int, character: int, text: str) -> None:
        """A keystroke: `text` inserted at (line, character) of the open document, its new `version`."""
        self.lc.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[
                    types.TextDocumentContentChangePartial(
                        range=types.Range(
                            start=types.Position(line=line, character=character),
                            end=types.Position(line=line, character=character),
                        ),
                        text=text,
                    )
                ],
            )
        )

    async def inline(self, request: Request) -> tuple[float, bool]:
        """(seconds, whether a completion came back) for one textDocument/inlineCompletion."""
        elapsed, answer = await self.inline_answer(request)
        return elapsed, answer is not None

    async def inline_answer(self, request: Request) -> tuple[float, str | None]:
        """(seconds, the completion id of the item that came back, or None) for one inlineCompletion."""
        params = types.InlineCompletionParams(
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
            text_document=types.TextDocumentIdentifier(uri=request.uri),
            position=types.Position(line=request.line, character=request.character),
        )
        start = time.perf_counter()
        result = await self.lc.text_document_inline_completion_async(params)
        elapsed = time.perf_counter() - start
        items = result.items if isinstance(result, types.InlineCompletionList) else (result or [])
        command = items[0].command if items else None
        arguments = command.arguments if command is not None else None
        first = arguments[0] if arguments else None
        if not items or not items[0].insert_text or not isinstance(first, dict):
            return elapsed, None
        return elapsed, str(first["completionId"])

    async def close(self) -> None:
        """shutdown + exit, as an editor does; then wait for the connection to end."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.lc.shutdown_async(None), 60)
            self.lc.exit(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.lc.stop(), 60)  # type: ignore[no-untyped-call]


async def wait_or_exit(proc: asyncio.subprocess.Process, what: Awaitable[Any], log: Path, timeout: float) -> Any:
    """Await `what`, failing with the server's log when the server process ends first."""
    task = asyncio.ensure_future(what)
    died = asyncio.ensure_future(proc.wait())
    try:
        done, _ = await asyncio.wait({task, died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if died in done:
            raise BenchError(f"`heedful serve` exited with status {proc.returncode}; its log:\n{log_tail(log)}")
        raise BenchError(f"`heedful serve` was not ready after {timeout:.0f} s; its log:\n{log_tail(log)}")
    finally:
        for t in (task, died):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


async def close_stdio_server(
    client: BenchClient, proc: asyncio.subprocess.Process, drainer: asyncio.Task[None]
) -> None:
    """End a stdio session as an editor does, wait for the server to exit (killed after 60 s), drain its log."""
    await client.close()
    try:
        await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
    await drainer


async def timed_session(client: BenchClient, requests: list[Request]) -> list[tuple[Request, float, bool]]:
    out = []
    for r in requests:
        seconds, served = await client.inline(r)
        out.append((r, seconds, served))
    return out


@dataclass(slots=True)
class CaseResult:
    times: list[float]
    nulls: int
    tokens: float | None  # mean tokens of the shown (LSP) or generated (raw) candidate
    server_ms: list[float]  # the server's own latency_ms per served request (LSP only)
    mismatched_prompts: int = 0  # served requests whose recorded prompt ids differ from ours
    engine_start_s: float = 0.0


def split(requests: list[Request], sessions: int) -> list[list[Request]]:
    return [requests[i::sessions] for i in range(sessions)]


async def run_lsp_stdio(
    config: Path, db: Path, log: Path, warmup: list[Request], measured: list[Request]
) -> CaseResult:
    client = BenchClient("bench-stdio")
    await client.lc.start_io(*server_command(config), cwd=str(ROOT), env=dict(os.environ))
    proc = cast(asyncio.subprocess.Process, client.lc._server)
    assert proc.stderr is not None
    drainer = asyncio.create_task(drain(proc.stderr, log))
    try:
        started = time.perf_counter()
        await wait_or_exit(proc, client.initialize(), log, 120)
        await wait_or_exit(proc, client.wait_ready(900), log, 900)
        engine_start = time.perf_counter() - started
        for r in warmup + measured:
            client.open(r)
        await timed_session(client, warmup)
        results = await timed_session(client, measured)
    finally:
        await close_stdio_server(client, proc, drainer)
    result = collect(results, db)
    result.engine_start_s = engine_start
    return result


async def run_lsp_tcp(
    config: Path, db: Path, log: Path, warmup: list[Request], measured: list[Request], sessions: int
) -> CaseResult:
    proc = await asyncio.create_subprocess_exec(
        *server_command(config, "--tcp", "--host", "127.0.0.1", "--port", "0"),
        cwd=str(ROOT),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    drainer: asyncio.Task[None] | None = None
    clients: list[BenchClient] = []
    try:
        started = time.perf_counter()

        async def listening() -> tuple[str, int]:
            with log.open("ab") as out:
                while line := await stderr.readline():
                    out.write(line)
                    m = re.search(rb"heedful: listening on (\S+):(\d+)", line)
                    if m:
                        return m.group(1).decode(), int(m.group(2))
            raise BenchError("`heedful serve --tcp` closed its standard error before listening")

        host, port = await wait_or_exit(proc, listening(), log, 120)
        drainer = asyncio.create_task(drain(stderr, log))
        shares = split(measured, sessions)
        for k in range(sessions):
            client = BenchClient(f"bench-tcp-{k}")
            await client.lc.start_tcp(host, port)
            await wait_or_exit(proc, client.initialize(), log, 120)
            clients.append(client)
        await wait_or_exit(proc, clients[0].wait_ready(900), log, 900)
        engine_start = time.perf_counter() - started
        for k, client in enumerate(clients):
            for r in shares[k] + [w for j, w in enumerate(warmup) if j % sessions == k]:
                client.open(r)
        for j, w in enumerate(warmup):
            await clients[j % sessions].inline(w)
        per_session = await asyncio.gather(*(timed_session(c, share) for c, share in zip(clients, shares, strict=True)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # serve_tcp drains the store and stops the engine on SIGTERM
            try:
                await asyncio.wait_for(proc.wait(), 120)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drainer is not None:
            await drainer
    result = collect([x for session in per_session for x in session], db)
    result.engine_start_s = engine_start
    return result


def collect(results: list[tuple[Request, float, bool]], db: Path) -> CaseResult:
    """Client-side times, plus what the server recorded for each served request (by its unique uri)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT c.uri, c.prompt_token_ids, c.latency_ms, k.token_ids FROM completions c "
            'JOIN candidates k ON k.completion_id = c.id AND k."index" = 0'
        ).fetchall()
    recorded = {uri: (json.loads(ids), latency, json.loads(tokens)) for uri, ids, latency, tokens in rows}
    tokens: list[int] = []
    server_ms: list[float] = []
    for r, _, served in results:
        if served and r.uri in recorded:
            _, latency, cand = recorded[r.uri]
            tokens.append(len(cand))
            server_ms.append(float(latency))
    return CaseResult(
        times=[t for _, t, _ in results],
        nulls=sum(1 for _, _, served in results if not served),
        tokens=statistics.fmean(tokens) if tokens else None,
        server_ms=server_ms,
    )


def recorded_prompts(db: Path) -> dict[str, list[int] | None]:
    """The prompt token ids a server's store recorded, by document URI (None where it kept no prompt)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT uri, prompt_token_ids FROM completions").fetchall()
    return {uri: json.loads(ids) if ids is not None else None for uri, ids in rows}


def check_prompts(requests: list[Request], db: Path, tokenizer: LocalTokenizer) -> int:
    """Served requests whose prompt token ids, as the server recorded them, differ from ours."""
    rows = recorded_prompts(db)
    return sum(1 for r in requests if r.uri in rows and rows[r.uri] != tokenizer.encode(r.prompt))


# ---------------------------------------------------------------------------------------------
# The raw engine


async def raw_case(
    engine: EmbeddedEngine, settings: Settings, warmup: list[Request], measured: list[Request], streams: int
) -> CaseResult:
    await engine._require().reset_prefix_cache()  # the LSP case ran on a fresh engine: start as cold
    stop = list(settings.completion.stop)
    max_tokens = settings.completion.max_tokens

    async def one(r: Request) -> tuple[float, int]:
        start = time.perf_counter()
        gen = await engine.generate(r.prompt, n=1, max_tokens=max_tokens, temperature=0.0, stop=stop)
        return time.perf_counter() - start, len(gen.candidates[0].token_ids)

    for w in warmup:
        await one(w)

    async def stream(share: list[Request]) -> list[tuple[float, int]]:
        return [await one(r) for r in share]

    per_stream = await asyncio.gather(*(stream(share) for share in split(measured, streams)))
    flat = [x for s in per_stream for x in s]
    return CaseResult(
        times=[t for t, _ in flat],
        nulls=sum(1 for _, n in flat if n == 0),
        tokens=statistics.fmean(n for _, n in flat),
        server_ms=[],
    )


# ---------------------------------------------------------------------------------------------


async def raw_phase(
    settings: Settings, warmup: list[Request], measured: list[Request], sessions: int
) -> tuple[CaseResult, CaseResult]:
    """Start the embedded engine in this process, run both raw cases on it, stop it."""
    from server.engine.embedded import EmbeddedEngine

    print("[bench.lsp] raw engine: starting EmbeddedEngine in this process ...", file=sys.stderr, flush=True)
    engine = EmbeddedEngine(settings)
    started = time.perf_counter()
    await engine.start()
    engine_start = time.perf_counter() - started
    try:
        one = await raw_case(engine, settings, warmup, measured, 1)
        many = await raw_case(engine, settings, warmup, measured, sessions)
    finally:
        await engine.close()
    one.engine_start_s = engine_start
    return one, many


def pooled(results: list[CaseResult]) -> CaseResult:
    tokens = [r.tokens for r in results if r.tokens is not None]
    return CaseResult(
        times=[t for r in results for t in r.times],
        nulls=sum(r.nulls for r in results),
        tokens=statistics.fmean(tokens) if tokens else None,
        server_ms=[],
    )


def figures(r: CaseResult) -> dict[str, Any]:
    out: dict[str, Any] = {k: v * 1000 for k, v in percentiles(r.times).items()}
    out |= {"requests": len(r.times), "nulls": r.nulls, "tokens": r.tokens}
    if r.server_ms:
        out["server_latency_ms"] = percentiles(r.server_ms)
        out["mismatched_prompts"] = r.mismatched_prompts
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernel import paths
    from kernel.settings import resolve
    from server.engine.tokens import LocalTokenizer

    model = paths.default_model_dir()
    if not (model / "config.json").exists():
        raise BenchError(f"the default model is not at {model}: run `heedful model prepare` (or `make setup`) first")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # as `heedful serve` sets it
    requests = cursor_requests(args.requests + WARMUP)
    n = args.sessions
    raw_passes: list[tuple[CaseResult, CaseResult]] = []
    with tempfile.TemporaryDirectory(prefix="heedful-bench-lsp-") as tmp_name:
        tmp = Path(tmp_name)
        stdio_config, stdio_db = write_config(tmp, "stdio", model, args.max_tokens)
        tcp_config, tcp_db = write_config(tmp, "tcp", model, args.max_tokens)
        settings = resolve(stdio_config).settings
        tokenizer = LocalTokenizer(model)
        prompt_for_s = fill_prompts(requests, settings, tokenizer)[WARMUP:]
        warmup, measured = requests[:WARMUP], requests[WARMUP:]

        # Raw passes before and after the LSP phases: a load that drifts during the run (other jobs on the
        # machine) then weighs on both sides alike, and the two raw passes show how much it drifted.
        if args.raw_passes == 2:
            raw_passes.append(await raw_phase(settings, warmup, measured, n))
        print("[bench.lsp] LSP over stdio, 1 session: starting `heedful serve` ...", file=sys.stderr, flush=True)
        log = tmp / "serve-stdio.log"
        try:
            lsp1 = await run_lsp_stdio(stdio_config, stdio_db, log, warmup, measured)
            print(f"[bench.lsp] LSP over TCP, {n} sessions: starting `heedful serve --tcp` ...", file=sys.stderr)
            log = tmp / "serve-tcp.log"
            lspn = await run_lsp_tcp(tcp_config, tcp_db, log, warmup, measured, n)
        except BaseException:
            print(f"[bench.lsp] server log ({log}):\n{log_tail(log)}", file=sys.stderr)
            raise
        for result, db in ((lsp1, stdio_db), (lspn, tcp_db)):
            result.mismatched_prompts = check_prompts(measured, db, tokenizer)
        raw_passes.append(await raw_phase(settings, warmup, measured, n))

    raw1 = pooled([one for one, _ in raw_passes])
    rawn = pooled([many for _, many in raw_passes])
    results = {
        "raw engine (1 stream)": figures(raw1),
        "LSP over stdio (1 session)": figures(lsp1),
        f"raw engine ({n} concurrent)": figures(rawn),
        f"LSP over TCP ({n} sessions)": figures(lspn),
    }
    return {
        "requests": len(measured),
        "sessions": n,
        "max_tokens": args.max_tokens,
        "cores": len(os.sched_getaffinity(0)),
        "prompt_for_ms": {k: v * 1000 for k, v in percentiles(prompt_for_s).items()},
        "engine_start_s": {
            "stdio": lsp1.engine_start_s,
            "tcp": lspn.engine_start_s,
            "raw": [one.engine_start_s for one, _ in raw_passes],
        },
        "raw_passes": [{"1 stream": figures(one), f"{n} concurrent": figures(many)} for one, many in raw_passes],
        "results": results,
        "ratios": {
            "1 session": ratios(results["LSP over stdio (1 session)"], results["raw engine (1 stream)"]),
            f"{n} sessions": ratios(results[f"LSP over TCP ({n} sessions)"], results[f"raw engine ({n} concurrent)"]),
        },
    }


def ratios(lsp: dict[str, Any], raw: dict[str, Any]) -> dict[str, float]:
    return {k: lsp[k] / raw[k] for k in ("p50", "p95", "p99", "mean")}


def print_table(report: dict[str, Any]) -> None:
    n = report["sessions"]
    print(
        f"inlineCompletion latency end to end vs the raw engine: {report['requests']} stdlib cursors (multi-line), "
        f"max {report['max_tokens']} new tokens, greedy, {report['cores']} cores"
    )
    print(f"{'peer':<30}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'tokens':>8}{'null':>6}")
    res, rat = report["results"], report["ratios"]
    starts = dict(report["engine_start_s"])
    raw_starts = "/".join(f"{x:.0f}" for x in starts.pop("raw"))

    def row(label: str) -> None:
        r = res[label]
        tokens = f"{r['tokens']:.1f}" if r["tokens"] is not None else "-"
        print(
            f"{label:<30}{r['p50']:>9.0f}{r['p95']:>9.0f}{r['p99']:>9.0f}{r['mean']:>9.0f}{tokens:>8}"
            f"{r['nulls']:>4}/{r['requests']}"
        )
        if "server_latency_ms" in r:
            s = r["server_latency_ms"]
            print(f"{'  server-side latency_ms':<30}{s['p50']:>9.0f}{s['p95']:>9.0f}{s['p99']:>9.0f}{s['mean']:>9.0f}")

    def ratio(key: str) -> None:
        q = rat[key]
        print(f"{'  LSP / raw':<30}{q['p50']:>9.2f}{q['p95']:>9.2f}{q['p99']:>9.2f}{q['mean']:>9.2f}")

    row("raw engine (1 stream)")
    row("LSP over stdio (1 session)")
    ratio("1 session")
    row(f"raw engine ({n} concurrent)")
    row(f"LSP over TCP ({n} sessions)")
    ratio(f"{n} sessions")
    mismatched = [f"{k}: {v['mismatched_prompts']}" for k, v in res.items() if v.get("mismatched_prompts")]
    notes = [
        "tokens: raw = generated; LSP = the shown candidate's tokens as recorded (post-processing may cut the end)",
        "null: requests answered with no completion (they still count: the engine ran)",
        "prompt_for (prompt building) timed in this process, ms: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["prompt_for_ms"].items()),
        "engine start s: " + ", ".join(f"{k} {v:.0f}" for k, v in starts.items()) + f", raw {raw_starts}",
    ]
    passes = report["raw_passes"]
    if len(passes) == 2:
        for case in passes[0]:
            before, after = passes[0][case]["p50"], passes[1][case]["p50"]
            drifted = abs(after / before - 1) > 0.1
            warn = "  WARNING: the load changed during the run; ratios are unreliable" if drifted else ""
            notes.append(f"raw {case} p50 before / after the LSP phases: {before:.0f} / {after:.0f} ms{warn}")
    if mismatched:
        notes.append("WARNING prompts differing from the server's recorded ones: " + ", ".join(mismatched))
    for note in notes:
        print(note)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="measured requests per case (default 40)")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions of the second case (default 8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion.max_tokens (default 32)")
    parser.add_argument(
        "--raw-passes",
        type=int,
        choices=(1, 2),
        default=2,
        help="2 (default): raw engine before and after the LSP phases, pooled; 1: after only (faster)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.requests < 1 or args.sessions < 1 or args.max_tokens < 1:
        parser.error("--requests, --sessions and --max-tokens must be at least 1")
    await report_or_exit("bench.lsp", run(args), args.json, print_table)


if __name__ == "__main__":
    asyncio.run(main())
