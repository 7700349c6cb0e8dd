"""`heedful eval`: simulated developers use the real server, and we count how often they still correct it.

For each persona and arm the harness runs, with a fresh developer id, exactly what an editor and the
product would run:

1. `heedful serve` starts over stdio with the evaluation's settings (its own SQLite store in the output
   folder; arm fixed to the one measured) and a scripted editor session connects (`EditorSession`,
   pygls' language client);
2. *before*: the held-out prompts are completed and the persona reviews each suggestion. Held-out
   suggestions are shown and never acted on, so they never become training data;
3. each round: the persona works through fresh train prompts and reacts as it would: accepts; or
   accepts and rewrites to its `kept` text (every other time also typing its correction, as a developer
   who fixes a suggestion and tells the assistant so); or, when it cannot say what it wants, rejects and
   types its correction. For the arms with a trained adapter, the training worker then runs one round
   for the developer's scope (`heedful train --once`: the collector, judges, GRPO-TCR and OPD, the gates,
   publishing), and the session waits until the server's status says the new adapter serves it. The
   held-out prompts are completed again: one point of the per-round curve;
4. *after*: the last round's held-out pass. CRR = 1 - after / before.

The correction rate is the share of held-out prompts whose suggestion the persona would not accept
(an empty suggestion counts as neither accepted nor corrected). Greedy decoding makes before/after
differences come from the adapter or the injected corrections alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.client import LanguageClient

from kernel.settings import ADAPTER_ARMS, BASELINE_ARMS, Settings, resolve, toml_value
from kernel.settings import ARMS as SETTINGS_ARMS
from lsp_handlers import protocol
from lsp_handlers.feedback import surviving_characters
from personalization import corpus
from personalization.corpus import Prompt
from personalization.rollouts import settle_seconds
from server.stores import open_store
from storage.repositories import CompletionRepository, ReportFilter
from storage.round_metrics import RoundMetrics

# The arms in the order runs go, cheapest first: none, baseline, rl, rl+baseline.
ARMS = tuple(sorted(SETTINGS_ARMS, key=lambda arm: (arm in ADAPTER_ARMS, arm in BASELINE_ARMS)))
SWAP_TIMEOUT_S = 120.0


class EvalError(RuntimeError):
    """A bad persona, an arm that does not exist, a server that would not start: named with the fix."""


class Persona(Protocol):
    name: str
    correction: str

    def review(self, prefix: str, completion: str) -> Any: ...


# ---------------------------------------------------------------------------------------------
# Personas


def load_persona(spec: str) -> Persona:
    """`path/to/file.py:ClassName`, or the name of a shipped persona (`type-hints`, `docstrings`, ...)."""
    from personalization import personas

    shipped = {cls.name: cls for cls in personas.SHIPPED}
    if ":" not in spec:
        if spec in shipped:
            return shipped[spec]()
        raise EvalError(
            f"--persona {spec!r}: expected path/to/file.py:ClassName or one of the shipped personas {sorted(shipped)}"
        )
    file_part, _, class_name = spec.rpartition(":")
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise EvalError(f"--persona {spec!r}: the file {path} does not exist")
    module_name = "heedful_persona_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise EvalError(f"--persona {spec!r}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the persona file is the user's code: report whatever it raised
        raise EvalError(f"--persona {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise EvalError(f"--persona {spec!r}: {path} has no {class_name!r}")
    persona = cls() if isinstance(cls, type) else cls
    for attr in ("name", "correction"):
        if not isinstance(getattr(persona, attr, None), str) or not getattr(persona, attr):
            raise EvalError(f"--persona {spec!r}: {class_name}.{attr} must be a non-empty string")
    if not callable(getattr(persona, "review", None)):
        raise EvalError(f"--persona {spec!r}: {class_name} has no review(prefix, completion) method")
    return persona  # type: ignore[no-any-return]


def prompt_kinds(persona: Persona) -> tuple[str, ...]:
    """The prompt kinds where the persona's preference shows (`prompt_kinds`, optional; default signatures,
    bodies and statements)."""
    kinds = getattr(persona, "prompt_kinds", None)
    if kinds is None:
        return corpus.DEFAULT_KINDS
    if isinstance(kinds, str) or not kinds or any(k not in corpus.KINDS for k in kinds):
        raise EvalError(
            f"persona {persona.name!r}: prompt_kinds = {kinds!r}; expected a non-empty tuple of {list(corpus.KINDS)}"
        )
    return tuple(kinds)


def prompt_context(persona: Persona) -> tuple[str, ...]:
    """Strings of which a prompt's text must contain one (`prompt_context`, optional; default any prompt)."""
    context = getattr(persona, "prompt_context", None)
    if context is None:
        return ()
    if isinstance(context, str) or not context or not all(isinstance(c, str) and c for c in context):
        raise EvalError(
            f"persona {persona.name!r}: prompt_context = {context!r}; expected a non-empty tuple of non-empty strings"
        )
    return tuple(context)


def prompt_calls(persona: Persona) -> tuple[str, ...]:
    """The functions at whose calls `call` prompts are cut (`prompt_calls`; needed with that kind only)."""
    calls = getattr(persona, "prompt_calls", None)
    needed = "call" in prompt_kinds(persona)
    if calls is None and not needed:
        return ()
    if isinstance(calls, str) or not calls or not all(isinstance(c, str) and c.strip() for c in calls):
        raise EvalError(
            f"persona {persona.name!r}: prompt_calls = {calls!r}; expected a non-empty tuple of function names "
            "as the code calls them (e.g. ('open', 'warnings.warn'))"
            + ("; prompt kind 'call' needs them" if needed else "")
        )
    return tuple(calls)


def review(persona: Persona, prefix: str, completion: str) -> tuple[bool, str | None]:
    """The persona's verdict as (accept, kept), from a tuple or an object with `accept` and `kept`."""
    verdict = persona.review(prefix, completion)
    if isinstance(verdict, tuple) and len(verdict) == 2:
        accept, kept = verdict
    elif hasattr(verdict, "accept") and hasattr(verdict, "kept"):
        accept, kept = verdict.accept, verdict.kept
    else:
        raise EvalError(
            f"persona {persona.name!r}: review() returned {verdict!r}; return (accept, kept) or an object with "
            "`accept` and `kept` attributes"
        )
    if kept is not None and not isinstance(kept, str):
        raise EvalError(f"persona {persona.name!r}: review() gave kept={kept!r}; kept must be a string or None")
    return bool(accept), (kept if kept and kept != completion else None)


def serving(version: str | None) -> Callable[[dict[str, Any]], bool]:
    """A status check: the server says `version` serves this session."""

    def check(status: dict[str, Any]) -> bool:
        return status.get("adapter") == version

    return check


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "persona"


# ---------------------------------------------------------------------------------------------
# The editor side


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def end_of(line: int, character: int, text: str) -> tuple[int, int]:
    """Where inserting `text` at (line, character) leaves the cursor, in UTF-16 units."""
    parts = text.split("\n")
    if len(parts) == 1:
        return line, character + utf16_len(text)
    return line + len(parts) - 1, utf16_len(parts[-1])


class EditorSession:
    """One editor session on one `heedful serve` over stdio: pygls' language client plus what an editor
    keeps (document versions, the server's `heedful/status` and messages). The evaluation drives it with
    VS Code's capabilities; the end-to-end tests' client builds on it with other editors' capabilities."""

    def __init__(self, name: str = "heedful-eval") -> None:
        self.lc = LanguageClient(name, "1")
        self.statuses: list[dict[str, Any]] = []
        self.messages: list[str] = []
        self._status_changed = asyncio.Event()
        self.versions: dict[str, int] = {}
        self.capabilities: types.ServerCapabilities | None = None
        self._stderr_task: asyncio.Task[None] | None = None

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

    async def start_process(
        self, command: Sequence[str], log_file: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        """Start the server; its standard error goes to `log_file`."""
        await self.lc.start_io(
            *command, cwd=str(cwd) if cwd else None, env=env if env is not None else dict(os.environ)
        )
        proc = self.lc._server
        assert proc is not None and proc.stderr is not None
        self._stderr_task = asyncio.create_task(_drain(proc.stderr, log_file))

    async def initialize_as(
        self,
        capabilities: types.ClientCapabilities,
        client_info: tuple[str, str],
        options: dict[str, Any] | None,
        folders: Sequence[Path] = (),
    ) -> types.InitializeResult:
        result = await self.lc.initialize_async(
            types.InitializeParams(
                capabilities=capabilities,
                client_info=types.ClientInfo(name=client_info[0], version=client_info[1]),
                initialization_options=options,
                process_id=os.getpid(),
                workspace_folders=[types.WorkspaceFolder(uri=f.as_uri(), name=f.name) for f in folders] or None,
            )
        )
        self.lc.initialized(types.InitializedParams())
        self.capabilities = result.capabilities
        return result

    async def start(self, command: Sequence[str], log_file: Path, options: dict[str, Any]) -> None:
        """Start the server and initialize as a VS Code-like editor (UTF-16 positions, inline completion)."""
        await self.start_process(command, log_file)
        await self.initialize_as(VSCODE_LIKE, ("heedful-eval", "1"), options)

    def status(self) -> dict[str, Any]:
        return self.statuses[-1] if self.statuses else {}

    async def wait_for(self, check: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The newest status once `check` accepts it; an EvalError after `timeout` or if the server exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.statuses and check(self.statuses[-1]):
                return self.statuses[-1]
            if self.lc._server is not None and self.lc._server.returncode is not None:
                raise EvalError(f"the server exited (status {self.lc._server.returncode}) while waiting for {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EvalError(f"waited {timeout:.0f} s for {what}; last status {self.status()}")
            self._status_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_changed.wait(), min(remaining, 1.0))

    def open(self, uri: str, text: str, language: str = "python") -> None:
        self.versions[uri] = 1
        self.lc.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(uri=uri, language_id=language, version=1, text=text)
            )
        )

    def close(self, uri: str) -> None:
        self.versions.pop(uri, None)
        self.lc.text_document_did_close(
            types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))
        )

    def change(self, uri: str, edits: Sequence[tuple[tuple[int, int], tuple[int, int], str]]) -> None:
        """Incremental edits, each ((line, char), (line, char), new text) in this client's position units."""
        self.versions[uri] += 1
        self.lc.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
                content_changes=[
                    types.TextDocumentContentChangePartial(
                        range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text
                    )
                    for start, end, text in edits
                ],
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

    def shown(self, item: types.InlineCompletionItem) -> None:
        unstructured = self.lc.protocol._converter.unstructure(item)
        self.lc.protocol.notify("textDocument/didShowCompletion", {"item": unstructured})

    def notify(self, method: str, params: Any) -> None:
        self.lc.protocol.notify(method, params)

    def configure(self, settings: dict[str, Any]) -> None:
        """Change the session's editor settings, as an editor does (`workspace/didChangeConfiguration`)."""
        self.lc.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=settings))

    async def command(self, name: str, *arguments: Any) -> Any:
        result = await self.lc.workspace_execute_command_async(
            types.ExecuteCommandParams(command=name, arguments=list(arguments))
        )
        return plain(result)

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
            if self._stderr_task is not None:
                await asyncio.wait_for(self._stderr_task, 10)
            await asyncio.sleep(0)
        return proc.returncode if proc is not None else None


VSCODE_LIKE = types.ClientCapabilities(
    general=types.GeneralClientCapabilities(position_encodings=[types.PositionEncodingKind.Utf16]),
    text_document=types.TextDocumentClientCapabilities(
        synchronization=types.TextDocumentSyncClientCapabilities(did_save=True),
        inline_completion=types.InlineCompletionClientCapabilities(),
    ),
)


def plain(value: Any) -> Any:
    """pygls hands unknown notifications over as namedtuples; back to dicts and lists."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


async def _drain(stream: asyncio.StreamReader, path: Path) -> None:
    with path.open("ab") as out:
        while chunk := await stream.read(65536):
            out.write(chunk)
            out.flush()


def completion_id_of(item: types.InlineCompletionItem) -> str:
    """The completion id the server put in the item's accept command (`lsp_handlers.protocol`'s rule)."""
    try:
        return protocol.completion_id_of(item)
    except JsonRpcInvalidParams as exc:
        raise EvalError(f"the server served an item without a completion id: {item} ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(slots=True)
class Turn:
    """One completion the persona reviewed."""

    phase: str  # "before", "round-N" (held-out), "train-N"
    prompt: str  # prompt id
    completion_id: str | None
    text: str
    accepted: bool
    corrected: bool  # the persona would not take it (an empty suggestion is neither)
    action: str  # held-out: "shown"; train: "accepted", "rewritten", "corrected", "empty"
    adapter: str | None
    latency_ms: float
    kept_chars: int = 0  # characters of the suggestion the developer keeps (`kept_characters`)
    asked_at: float = 0.0  # when the request went out and its answer came (seconds since the epoch)
    answered_at: float = 0.0
    silent: bool = False  # the show policy held the suggestion back (the store's record says so)
    uri: str = ""


@dataclass(slots=True)
class PassStats:
    correction_rate: float
    accept_rate: float
    empty: int  # prompts answered with nothing (the silent ones among them)
    prompts: int
    kept_chars_per_shown: float = 0.0  # kept characters per shown (non-empty) suggestion
    silent: int = 0  # prompts the show policy answered with nothing, though the model wrote a suggestion
    accept_rate_shown: float = 0.0  # accepted / shown suggestions


def pass_stats(turns: Sequence[Turn]) -> PassStats:
    n = len(turns)
    if n == 0:
        return PassStats(0.0, 0.0, 0, 0)
    shown = [t for t in turns if t.text]
    return PassStats(
        sum(t.corrected for t in turns) / n,
        sum(t.accepted for t in turns) / n,
        n - len(shown),
        n,
        sum(t.kept_chars for t in shown) / len(shown) if shown else 0.0,
        sum(t.silent for t in turns),
        sum(t.accepted for t in shown) / len(shown) if shown else 0.0,
    )


def mark_silent(turns: Sequence[Turn], held_back: Sequence[tuple[str | None, float]]) -> int:
    """Mark the empty turns whose request the server held back: a held-back record (uri, time of its request)
    of the turn's uri made between the turn's request and its answer. The number marked."""
    marked = 0
    for turn in turns:
        if turn.text or turn.silent:
            continue
        if any(u == turn.uri and turn.asked_at <= at <= turn.answered_at for u, at in held_back):
            turn.silent = True
            marked += 1
    return marked


def kept_characters(suggestion: str, accepted: bool, kept: str | None) -> int:
    """Characters of a shown suggestion the developer keeps: all of it when they take it as it is; when
    they take it and rewrite it into `kept`, the characters of the suggestion that survive in the kept
    text (the matching blocks of a character diff); none when they turn it down. The headline figure
    that rewards suggestions developers keep, not short trivial ones that are easy to accept."""
    if accepted:
        return len(suggestion)
    if kept is None or not suggestion:
        return 0
    return surviving_characters(suggestion, kept)


def crr(before: float, after: float) -> float | None:
    """Correction-rate reduction, 1 - after/before; None when there was nothing to correct before."""
    return None if before <= 0 else 1.0 - after / before


@dataclass(slots=True)
class ArmResult:
    persona: str
    arm: str
    developer: str
    correction_rate_before: float
    correction_rate_after: float
    crr: float | None
    accept_rate_before: float
    accept_rate: float
    kept_chars_before: float  # kept characters per shown held-out suggestion
    kept_chars_after: float
    accept_rate_shown_before: float  # accepted / shown held-out suggestions
    accept_rate_shown_after: float
    silent_before: float  # share of held-out prompts the show policy answered with nothing
    silent_after: float
    kl: float
    humaneval_base: float | None  # the ability gate's pass rates (%) of the last round, when it ran
    humaneval_adapter: float | None
    perplexity_base: float | None
    perplexity_adapter: float | None
    perplexity_delta: float
    adapter: str | None
    rounds: list[dict[str, Any]]
    feedback_events: dict[str, int]
    held_out_prompts: int
    train_prompts: int
    seconds: float
    training_seconds: float
    turns: list[Turn] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("turns")
        return out


# ---------------------------------------------------------------------------------------------
# The run


class Progress:
    """Progress on standard error. `update` redraws one status line on a terminal (a progress bar); in a
    log it is written only when a phase completes. `line` (per-round summaries) is always written."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._partial = False

    def update(self, text: str, done: int | None = None, total: int | None = None) -> None:
        if done is not None and total is not None:
            text = f"{text} {bar(done, total)}"
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._partial = True
        elif done is not None and done == total:
            self.line(text)

    def line(self, text: str) -> None:
        if self._partial:
            self.stream.write("\n")
            self._partial = False
        self.stream.write(text + "\n")
        self.stream.flush()


class QuietProgress(Progress):
    def update(self, text: str, done: int | None = None, total: int | None = None) -> None:
        pass

    def line(self, text: str) -> None:
        pass


def bar(done: int, total: int, width: int = 20) -> str:
    filled = width * done // max(total, 1)
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


@dataclass(slots=True)
class EvalPlan:
    personas: list[tuple[str, Persona]]  # (spec, persona)
    arms: list[str]
    rounds: int
    train_per_round: int
    held_out: int
    seed: int
    out_dir: Path
    settings: Settings
    steps_per_round: int | None = None
    training: dict[str, Any] = field(default_factory=dict)  # [training] overrides, e.g. batch_size
    progress: Progress = field(default_factory=QuietProgress)
    # Skip a persona's other arms when its first arm's correction rate before is below this (not at stake).
    at_stake: float | None = None
    # The show policy (`completion.show_threshold`) on: held-back suggestions are silent turns. Off (0), the
    # correction rate measures what the model writes, not what the server chose to keep quiet about.
    show_policy: bool = False


def check_plan(plan: EvalPlan) -> None:
    bad = [a for a in plan.arms if a not in ARMS]
    if bad or not plan.arms:
        raise EvalError(f"--arm {bad or plan.arms}: each arm must be one of {list(ARMS)}")
    if plan.rounds < 1:
        raise EvalError(f"--rounds {plan.rounds}: at least one round is needed to measure an after")
    if plan.train_per_round < 1 or plan.held_out < 1:
        raise EvalError(f"--train-prompts {plan.train_per_round} / --held-out {plan.held_out}: both must be at least 1")
    if plan.steps_per_round is not None and plan.steps_per_round < 1:
        raise EvalError(f"--steps {plan.steps_per_round}: a training round needs at least one step")
    if not plan.personas:
        raise EvalError("no persona: pass --persona path/to/file.py:ClassName or a shipped persona's name")
    if plan.at_stake is not None and not 0.0 < plan.at_stake <= 1.0:
        raise EvalError(f"--at-stake {plan.at_stake}: a correction rate above 0 and at most 1, e.g. 0.5")


def eval_settings_toml(plan: EvalPlan, arm: str) -> str:
    """The server's and worker's settings for one arm: the user's, with the evaluation's own store,
    greedy held-out decoding, a training group for every train prompt (none for held-out prompts: the
    session switches `group_sample_rate` per phase) and short edit snapshots."""
    values = plan.settings.to_dict()
    values["model"]["path"] = str(plan.settings.model_path().resolve())
    values["database"]["url"] = f"sqlite+aiosqlite:///{(plan.out_dir / 'heedful.db').resolve()}"
    values["completion"].update(temperature=0.0, group_sample_rate=1.0)
    # Latency is bench/'s business: a slow CPU answers late, not empty.
    values["completion"]["timeout_ms"] = max(values["completion"]["timeout_ms"], 120_000)
    values["engine"]["request_timeout_s"] = max(values["engine"]["request_timeout_s"], 120.0)
    values["feedback"]["edit_snapshot_delays_s"] = EDIT_SNAPSHOT_DELAYS_S
    # The server is idle while a round trains (the session waits for it), so the round may use every core.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    values["training"].update(in_server=False, min_new_rollouts=1, threads=max(values["training"]["threads"], cores))
    if plan.steps_per_round is not None:
        values["training"]["steps_per_round"] = plan.steps_per_round
    values["training"].update(plan.training)
    values["experiment"]["arms"] = [arm]
    if plan.show_policy:
        values["completion"]["show_explore"] = 0.0  # measured turns are the policy's own choice, not a coin's
    else:
        values["completion"]["show_threshold"] = 0.0
    values["logging"]["file"] = ""
    lines = [f"# Written by heedful eval for the arm {arm!r}; the user's settings with the evaluation's overrides."]
    for section, table in values.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


EDIT_SNAPSHOT_DELAYS_S = [1.0, 2.0]


def config_path(out_dir: Path, arm: str) -> Path:
    """The settings file `eval_settings_toml` writes for one arm (every arm's names the same store)."""
    return out_dir / f"config-{slug(arm)}.toml"


class ArmRun:
    def __init__(self, plan: EvalPlan, persona: Persona, arm: str, train: list[Prompt], held: list[Prompt]) -> None:
        self.plan = plan
        self.persona = persona
        self.arm = arm
        self.train = train
        self.held = held
        self.run_id = uuid.uuid4().hex[:6]
        self.developer = f"{slug(persona.name)}-{slug(arm)}-{self.run_id}"
        self.label = f"{persona.name}/{arm}"
        self.config = config_path(plan.out_dir, arm)
        self.log = plan.out_dir / "logs" / f"{self.developer}.log"
        self.turns: list[Turn] = []
        self.events: dict[str, int] = {"accepted": 0, "rewritten": 0, "corrected": 0, "empty": 0}
        self.last_train_at = 0.0
        self.training_seconds = 0.0

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "server.cli", "--config", str(self.config), *args]

    async def run(self) -> ArmResult:
        started = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(eval_settings_toml(self.plan, self.arm))
        session = EditorSession()
        options = {"developerId": self.developer, "sessionId": f"{self.developer}-1"}
        try:
            await session.start(self.command("serve"), self.log, options)
            ready = await session.wait_for(
                lambda s: s.get("state") in {"ready", "failed"}, self.plan.settings.engine.startup_timeout_s + 600,
                "the engine to be ready",
            )  # fmt: skip
            if ready.get("state") != "ready":
                raise EvalError(f"the engine did not start: {ready}; see {self.log}")
            if ready.get("arm") != self.arm:
                raise EvalError(f"the server put developer {self.developer} in arm {ready.get('arm')}, not {self.arm}")
            before = await self.held_out(session, "before")
            rounds: list[dict[str, Any]] = []
            last_metrics = RoundMetrics()
            adapter: str | None = None
            per = self.plan.train_per_round
            for r in range(1, self.plan.rounds + 1):
                batch = self.train[(r - 1) * per : r * per]
                train_turns = await self.train_batch(session, batch, f"train-{r}")
                info: dict[str, Any] = {"round": r, "train": asdict(pass_stats(train_turns))}
                if self.arm in ADAPTER_ARMS:
                    result = await self.train_round(r)
                    info["training"] = result
                    if result.get("status") == "published":
                        adapter = str(result["version"])
                        last_metrics = RoundMetrics.from_json(result.get("metrics"))
                        await session.wait_for(serving(adapter), SWAP_TIMEOUT_S, f"adapter {adapter} to serve")
                info["adapter"] = adapter
                held = await self.held_out(session, f"round-{r}")
                info["held_out"] = asdict(held)
                rounds.append(info)
                self.plan.progress.line(self.round_line(r, info, before))
        finally:
            await session.stop()
        if await self.mark_silent():
            for info in rounds:
                info["held_out"] = asdict(pass_stats([t for t in self.turns if t.phase == f"round-{info['round']}"]))
        before = pass_stats([t for t in self.turns if t.phase == "before"])
        first, last = before, pass_stats([t for t in self.turns if t.phase == f"round-{self.plan.rounds}"])
        ppl_base, ppl_adapter = last_metrics.perplexity_base, last_metrics.perplexity_adapter
        return ArmResult(
            persona=self.persona.name,
            arm=self.arm,
            developer=self.developer,
            correction_rate_before=first.correction_rate,
            correction_rate_after=last.correction_rate,
            crr=crr(first.correction_rate, last.correction_rate),
            accept_rate_before=first.accept_rate,
            accept_rate=last.accept_rate,
            kept_chars_before=round(first.kept_chars_per_shown, 2),
            kept_chars_after=round(last.kept_chars_per_shown, 2),
            accept_rate_shown_before=round(first.accept_rate_shown, 4),
            accept_rate_shown_after=round(last.accept_rate_shown, 4),
            silent_before=round(first.silent / max(first.prompts, 1), 4),
            silent_after=round(last.silent / max(last.prompts, 1), 4),
            kl=last_metrics.gate_kl or 0.0,
            humaneval_base=last_metrics.humaneval.get("base"),
            humaneval_adapter=last_metrics.humaneval.get("adapter"),
            perplexity_base=ppl_base,
            perplexity_adapter=ppl_adapter,
            perplexity_delta=(ppl_adapter - ppl_base) if ppl_base is not None and ppl_adapter is not None else 0.0,
            adapter=adapter,
            rounds=rounds,
            feedback_events=dict(self.events),
            held_out_prompts=len(self.held),
            train_prompts=min(len(self.train), per * self.plan.rounds),
            seconds=round(time.monotonic() - started, 1),
            training_seconds=round(self.training_seconds, 1),
            turns=self.turns,
        )

    async def mark_silent(self) -> int:
        """Mark the turns the show policy kept quiet about, from the store's records (after the session ended,
        when every record is written). The number marked."""
        store = await open_store(resolve(self.config).settings, apply_retention=False)
        try:
            async with store.unit() as s:
                held = await CompletionRepository(s).silent(self.developer)
        finally:
            await store.close()
        return mark_silent(self.turns, [(uri, at.timestamp()) for uri, at in held])

    def round_line(self, r: int, info: dict[str, Any], before: PassStats) -> str:
        train = info["train"]
        training = info.get("training")
        trained = ""
        if training is not None:
            m = RoundMetrics.from_json(training.get("metrics"))
            kl = m.gate_kl
            steps = "?" if m.steps_done is None else m.steps_done
            trained = (
                f"; trained {steps} steps in {'?' if m.seconds is None else m.seconds} s: {training.get('status')}"
                + (f" (KL {kl:.3f})" if isinstance(kl, float) else "")
                + (f" [{training.get('reason')}]" if training.get("status") != "published" else "")
            )
        return (
            f"{self.label} round {r}/{self.plan.rounds}: train corrections {train['correction_rate']:.2f}{trained}; "
            f"held-out correction rate {before.correction_rate:.2f} -> {info['held_out']['correction_rate']:.2f}"
        )

    def uri(self, prompt: Prompt, phase: str) -> str:
        # One URI per prompt, the same in every phase, so the server builds the very same prompt each time;
        # the prompt's header names the last two parts ("dom/minidom.py", "lib/sysconfig.py").
        where = "train" if phase.startswith("train") else "held-out"
        return f"file:///eval/{where}/{prompt.line}/lib/{prompt.path}"

    async def complete(
        self, session: EditorSession, prompt: Prompt, phase: str
    ) -> tuple[str, Turn, str | None, tuple[int, int]]:
        """Request, show and review one suggestion: (uri, turn, the persona's kept text, where it goes)."""
        uri = self.uri(prompt, phase)
        session.open(uri, prompt.prefix)
        line = prompt.prefix.count("\n")
        character = utf16_len(prompt.prefix.rsplit("\n", 1)[-1])
        t0 = time.monotonic()
        asked_at = time.time()
        served = await session.inline(uri, line, character)
        answered_at = time.time()
        item = served.items[0] if served is not None and served.items else None
        latency = (time.monotonic() - t0) * 1000
        text = str(item.insert_text) if item is not None else ""
        cid = completion_id_of(item) if item is not None else None
        if item is not None:
            session.shown(item)
        accepted, kept = review(self.persona, prompt.prefix, text) if text else (False, None)
        adapter = session.status().get("adapter")
        turn = Turn(
            phase,
            prompt.id,
            cid,
            text,
            accepted,
            bool(text) and not accepted,
            "shown",
            adapter,
            latency,
            kept_characters(text, accepted, kept),
            asked_at,
            answered_at,
            uri=uri,
        )
        if item is not None and item.range is not None:
            character = item.range.start.character
        return uri, turn, kept, (line, character)

    def sample_groups(self, session: EditorSession, rate: float) -> None:
        """Set `completion.group_sample_rate` for the session's next requests, as an editor's settings can:
        held-out turns get no feedback, so a training group sampled for them is engine time for nothing."""
        session.configure({"heedful": {"completion": {"group_sample_rate": rate}}})

    async def held_out(self, session: EditorSession, phase: str) -> PassStats:
        self.sample_groups(session, 0.0)
        for i, prompt in enumerate(self.held, 1):
            uri, turn, _, _ = await self.complete(session, prompt, phase)
            session.close(uri)
            self.turns.append(turn)
            self.plan.progress.update(f"{self.label} held-out {phase}", i, len(self.held))
        return pass_stats([t for t in self.turns if t.phase == phase])

    async def train_batch(self, session: EditorSession, batch: Sequence[Prompt], phase: str) -> list[Turn]:
        self.sample_groups(session, 1.0)
        opened: list[str] = []
        turns: list[Turn] = []
        for i, prompt in enumerate(batch, 1):
            uri, turn, kept, (line, character) = await self.complete(session, prompt, phase)
            opened.append(uri)
            if not turn.text or turn.completion_id is None:
                turn.action = "empty"
            elif turn.accepted or kept is not None:
                # Tab, as an editor does: the text goes in, then the item's accept command.
                session.change(uri, [((line, character), (line, character), turn.text)])
                await session.command("heedful.acceptCompletion", {"completionId": turn.completion_id})
                turn.action = "accepted"
                if not turn.accepted and kept is not None:  # and then rewritten into what they wanted
                    session.change(uri, [((line, character), end_of(line, character, turn.text), kept)])
                    turn.action = "rewritten"
                    if i % 2 == 1:  # every other time they also say what they want from now on
                        await session.command(
                            "heedful.feedback", {"text": self.persona.correction, "completionId": turn.completion_id}
                        )
                        turn.action = "corrected"
            else:
                session.notify("heedful/didRejectCompletion", {"completionId": turn.completion_id})
                await session.command(
                    "heedful.feedback", {"text": self.persona.correction, "completionId": turn.completion_id}
                )
                turn.action = "corrected"
            self.events[turn.action] += 1
            turns.append(turn)
            self.turns.append(turn)
            self.plan.progress.update(f"{self.label} {phase}", i, len(batch))
        await asyncio.sleep(2.5)  # the edit snapshots (1 s and 2 s) record what the developer kept
        for uri in opened:
            session.close(uri)
        self.last_train_at = time.monotonic()
        return turns

    async def train_round(self, r: int) -> dict[str, Any]:
        # The collector takes a live session's completions once their last snapshot is long due.
        wait = settle_seconds(EDIT_SNAPSHOT_DELAYS_S) - (time.monotonic() - self.last_train_at)
        if wait > 0:
            self.plan.progress.update(f"{self.label} round {r}: waiting {wait:.0f} s for the turns to settle")
            await asyncio.sleep(wait)
        self.plan.progress.update(f"{self.label} round {r}: training")
        started = time.monotonic()
        adapters = self.plan.out_dir / "adapters"
        proc = await asyncio.create_subprocess_exec(
            *self.command("train", "--once", "--scope", f"developer:{self.developer}", "--adapters-dir", str(adapters)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        self.training_seconds += time.monotonic() - started
        with self.log.open("ab") as log:
            log.write(err)
        if proc.returncode != 0:
            tail = err.decode(errors="replace")[-2000:]
            raise EvalError(f"heedful train failed for {self.developer} (status {proc.returncode}):\n{tail}")
        results = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
        mine = [r for r in results if r.get("scope") == f"developer:{self.developer}"]
        if not mine:
            return {"status": "skipped", "reason": "the worker found nothing to train", "metrics": {}}
        return dict(mine[-1])


async def run_eval(plan: EvalPlan) -> list[ArmResult]:
    check_plan(plan)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    results: list[ArmResult] = []
    for _spec, persona in plan.personas:
        train, held = corpus.build(
            plan.seed,
            train=plan.train_per_round * plan.rounds,
            held_out=plan.held_out,
            kinds=prompt_kinds(persona),
            context=prompt_context(persona),
            calls=prompt_calls(persona),
        )
        first: ArmResult | None = None
        for i, arm in enumerate(plan.arms):
            if first is not None and not at_stake(first.correction_rate_before, plan.at_stake):
                plan.progress.line(
                    f"{persona.name}: correction rate before {first.correction_rate_before:.2f} is below "
                    f"--at-stake {plan.at_stake}: the model already writes what this developer wants; "
                    f"arms {', '.join(plan.arms[i:])} skipped"
                )
                break
            run = ArmRun(plan, persona, arm, train, held)
            plan.progress.line(f"{run.label}: developer {run.developer}, log {run.log}")
            result = await run.run()
            plan.progress.line(
                f"{run.label}: correction rate {result.correction_rate_before:.2f} -> "
                f"{result.correction_rate_after:.2f}, CRR {_fmt(result.crr)}, kept characters per shown suggestion "
                f"{result.kept_chars_before:.1f} -> {result.kept_chars_after:.1f}, KL {result.kl:.3f}, "
                f"{sum(result.feedback_events.values())} feedback turns, {result.seconds:.0f} s"
                + (
                    f"; show policy: accept rate of shown suggestions {result.accept_rate_shown_before:.2f} -> "
                    f"{result.accept_rate_shown_after:.2f}, silent {result.silent_before:.0%} -> "
                    f"{result.silent_after:.0%} of held-out prompts"
                    if plan.show_policy
                    else ""
                )
            )
            results.append(result)
            first = first or result
    return results


def at_stake(correction_rate_before: float, threshold: float | None) -> bool:
    """Whether a persona has enough to correct for its other arms to say anything (no threshold: always)."""
    return threshold is None or correction_rate_before >= threshold


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


async def write_outputs(plan: EvalPlan, results: Sequence[ArmResult]) -> tuple[Path, Path]:
    """OUT/eval.json (every reviewed completion) and OUT/report.html (`heedful report` of the run's store)."""
    from tools.report import load_report, render_report, write_report

    details = plan.out_dir / "eval.json"
    details.write_text(json.dumps(report_json(results, details=True), indent=1, default=str) + "\n")
    store = await open_store(resolve(config_path(plan.out_dir, plan.arms[0])).settings)
    try:
        data = await load_report(store, ReportFilter((), None, None))
    finally:
        await store.close()
    return details, write_report(plan.out_dir / "report.html", render_report(data))


def report_json(results: Sequence[ArmResult], *, details: bool) -> dict[str, Any]:
    """One arm: its result at the top level (the contract's keys). Several: `results`, one per arm."""
    items = [asdict(r) if details else r.summary() for r in results]
    if len(items) == 1:
        return items[0]
    return {"results": items}
