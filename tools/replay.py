"""Replay a recorded LSP session against a fresh server and compare what it answers with the recording.

The replayer plays the client's side of a recording (`server.recording`) to a new server process:

- request ids are remapped to fresh ones, and a response the client sends to a server request gets the
  id the live server used;
- it waits where the client did: every server message that precedes a client message in the recording
  must arrive from the live server before that client message is sent (a response, by its request; a
  notification, by method and content; a server request, by method and order);
- ids the server invented (`completionId`) are learned from each answer and substituted into the
  client's later messages, so an accept names the completion the live server served.

Answers are compared exactly for deterministic methods, and structurally for completions: the shape of
the answer, its ranges and commands must match; the suggested text may differ. Fields that vary between
runs of the same build (event ids, the model's path and how adapters are served in `heedful/status`, the
server version) are left out.
Log and progress notifications are not compared, nor is the transient `loading` status. A replay is a
session of its own (its sessionId gets a suffix); when the recording ends with the events the session
stored, the replayed session's stored events are compared with them (kinds, which completion,
corrections); an inferred event of a completion whose text differed from the recording's is left out,
since it follows from that text.

This module drives a server and judges it; it never changes a recording.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.settings import CLIENT_SECTIONS, Settings, SettingsError, validate_sections
from server.recording import CLIENT_TO_SERVER, DIRECTIONS, FORMAT_VERSION, STORE, FrameParser
from server.stores import open_store

STRUCTURAL_METHODS = frozenset({"textDocument/inlineCompletion", "textDocument/completion"})
# Keys holding the suggestion's text in completion answers: compared by type, not by value.
FREE_TEXT_KEYS = frozenset({"insertText", "label", "filterText", "newText"})
# Ids the server invents and the client sends back.
LEARNED_ID_KEYS = frozenset({"completionId"})
VOLATILE_KEYS: dict[str | None, frozenset[str]] = {
    None: frozenset({"eventId"}),
    "initialize": frozenset({"version"}),
    # adapterServing depends on the machine's CPU kernels (merged or multi-LoRA), not on the build; learning
    # on the store's state when the server first read it (null before, the feedback collected so far after).
    "heedful/status": frozenset(
        {"model", "engine", "sessionId", "adapterServing", "adapterServingReason", "learning", "serverPid"}
    ),
}
IGNORED_NOTIFICATIONS = frozenset({"window/logMessage", "$/logTrace", "$/progress", "telemetry/event"})
# Lists a newer server may add to: a replay passes while it still offers everything recorded (a recording
# made before the server gained a command still replays), in any order.
GROWING_LISTS = frozenset({"capabilities.executeCommandProvider.commands"})
# Objects a newer server may add keys to: a replay passes while every recorded key answers as recorded (a
# recording made before the server offered a capability, such as textDocument/documentHighlight, still replays).
GROWING_OBJECTS = frozenset({"result.capabilities"})


class RecordingError(ValueError):
    """A recording that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Entry:
    line: int
    t: float
    direction: str
    message: dict[str, Any] | None  # None: the body was not JSON (see `raw`), or a store line
    raw: str | None = None
    events: list[dict[str, Any]] | None = None  # the store line: the events the session stored


@dataclass(frozen=True, slots=True)
class Recording:
    settings: dict[str, Any] | None  # the server's completion and feedback settings, when the header has them
    entries: list[Entry]


def load_recording(path: Path) -> list[Entry]:
    """The messages of a recording (see `read_recording`)."""
    return read_recording(path).entries


def read_recording(path: Path) -> Recording:
    """Read and check a recording; a broken one raises `RecordingError` naming the line and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordingError(f"{path}: the recording does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordingError(f"{path}: the recording cannot be read ({exc})") from None
    lines = text.split("\n")
    last_complete = len(lines) - 1  # text after the final newline is a cut-off line (or empty)
    entries: list[Entry] = []
    header_seen = False
    settings: dict[str, Any] | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if number > last_complete:
                raise RecordingError(
                    f"{path}:{number}: the last line is cut off ({exc.msg}): the recording is truncated; "
                    "delete that line or record the session again"
                ) from None
            raise RecordingError(
                f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}): the recording is corrupt; "
                "record the session again"
            ) from None
        if not header_seen:
            settings = _check_header(path, number, obj)
            header_seen = True
            continue
        entries.append(_entry(path, number, obj))
    if not header_seen:
        raise RecordingError(f"{path}:1: the recording is empty; record a session with `heedful serve --record`")
    return Recording(settings, entries)


def _check_header(path: Path, number: int, obj: Any) -> dict[str, Any] | None:
    """Check the header line; the settings it carries (None: none)."""
    if not isinstance(obj, dict) or "heedful_recording" not in obj:
        raise RecordingError(
            f"{path}:{number}: not a Heedful recording (the first line must be the header "
            '{"heedful_recording": 1, ...}); record with `heedful serve --record` or `heedful record`'
        )
    if obj["heedful_recording"] != FORMAT_VERSION:
        raise RecordingError(
            f"{path}:{number}: recording format {obj['heedful_recording']!r} is not supported: this Heedful "
            f"reads format {FORMAT_VERSION}; record the session again"
        )
    settings = obj.get("settings")
    if settings is None:
        return None
    if not isinstance(settings, dict) or not set(settings) <= set(CLIENT_SECTIONS):
        raise RecordingError(
            f"{path}:{number}: the header's settings = {json.dumps(settings)[:80]} is not valid: expected an object "
            f"with the sections {' and '.join(CLIENT_SECTIONS)}; remove it or record the session again"
        )
    try:
        validate_sections(f"{path}:{number} (the header's settings)", settings)
    except SettingsError as exc:
        raise RecordingError(f"{exc}; fix the header or record the session again") from None
    return settings


def _entry(path: Path, number: int, obj: Any) -> Entry:
    where = f"{path}:{number}"
    if not isinstance(obj, dict):
        raise RecordingError(f"{where}: expected an object with direction, t and message, got {type(obj).__name__}")
    direction = obj.get("direction")
    if direction not in DIRECTIONS:
        raise RecordingError(
            f"{where}: direction = {direction!r} is not valid: expected one of {', '.join(DIRECTIONS)}"
        )
    t = obj.get("t")
    if not isinstance(t, int | float) or isinstance(t, bool) or t < 0:
        raise RecordingError(f"{where}: t = {t!r} is not valid: expected seconds since the start (a number >= 0)")
    if direction == STORE:
        events = obj.get("events")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise RecordingError(f"{where}: a store line needs 'events', a list of objects; got {events!r:.80}")
        return Entry(number, float(t), direction, None, events=events)
    message = obj.get("message")
    raw = obj.get("raw")
    if message is None and not isinstance(raw, str):
        raise RecordingError(f"{where}: the line has neither a JSON-RPC 'message' object nor a 'raw' body")
    if message is not None and not isinstance(message, dict):
        raise RecordingError(f"{where}: message = {message!r:.80} is not valid: expected a JSON-RPC object")
    return Entry(number, float(t), direction, message, raw)


# ---------------------------------------------------------------------------------------------
# Comparison


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 100 else text[:97] + "..."


def diff_values(recorded: Any, live: Any, *, structural: bool, volatile: frozenset[str], path: str = "") -> list[str]:
    """Differences between a recorded and a live value, one line per difference, each naming its path."""
    out: list[str] = []

    def walk(rec: Any, got: Any, where: str) -> None:
        if isinstance(rec, dict) and isinstance(got, dict):
            for key in sorted(set(rec) | set(got)):
                sub = f"{where}.{key}" if where else key
                if key in volatile:  # neither its value nor whether it is there says anything
                    continue
                if key not in got:
                    out.append(f"{sub}: recorded {_show(rec[key])}, missing in the replay")
                elif key not in rec:
                    if not _grows(where, GROWING_OBJECTS):
                        out.append(f"{sub}: not recorded, replayed {_show(got[key])}")
                elif not _free_text(key, rec[key], got[key], structural):
                    walk(rec[key], got[key], sub)
            return
        if isinstance(rec, list) and isinstance(got, list):
            if _grows(where, GROWING_LISTS):
                missing = [r for r in rec if r not in got]
                if missing:
                    out.append(f"{where}: recorded {_show(missing)}, missing in the replay")
                return
            if len(rec) != len(got):
                out.append(f"{where or '(value)'}: recorded {len(rec)} items, replayed {len(got)}")
            for i, (r, g) in enumerate(zip(rec, got, strict=False)):
                walk(r, g, f"{where}[{i}]")
            return
        if type(rec) is not type(got) or rec != got:
            out.append(f"{where or '(value)'}: recorded {_show(rec)}, replayed {_show(got)}")

    walk(recorded, live, path)
    return out


def _grows(where: str, paths: frozenset[str]) -> bool:
    return any(where == g or where.endswith("." + g) for g in paths)


def _free_text(key: str, rec: Any, got: Any, structural: bool) -> bool:
    return structural and key in FREE_TEXT_KEYS and isinstance(rec, str) and isinstance(got, str)


def learn_ids(recorded: Any, live: Any, into: dict[str, str]) -> None:
    """Pair the ids the server invented in a recorded answer with those of the live answer."""
    if isinstance(recorded, dict) and isinstance(live, dict):
        for key, value in recorded.items():
            if key in LEARNED_ID_KEYS and isinstance(value, str) and isinstance(live.get(key), str):
                into[value] = live[key]
            elif key in live:
                learn_ids(value, live[key], into)
    elif isinstance(recorded, list) and isinstance(live, list):
        for r, g in zip(recorded, live, strict=False):
            learn_ids(r, g, into)


def completion_ids(value: Any) -> set[str]:
    """Every completionId in a (live) answer."""
    if isinstance(value, dict):
        found = {v for k, v in value.items() if k in LEARNED_ID_KEYS and isinstance(v, str)}
        for v in value.values():
            found |= completion_ids(v)
        return found
    if isinstance(value, list):
        return {cid for v in value for cid in completion_ids(v)}
    return set()


def model_dependent_event(event: dict[str, Any], diverged: frozenset[int]) -> bool:
    """An inferred event, or an edit snapshot, of a completion whose suggested text differed from the
    recording's: whether typing departed from the suggestion (an inferred reject, then the snapshots of
    what was written in its place) follows from the model's exact text."""
    if event.get("completion") not in diverged:
        return False
    return bool(event.get("inferred")) or event.get("kind") == "edit_snapshot"


def substitute(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, list):
        return [substitute(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, ids) for k, v in value.items()}
    return value


def _volatile(method: str | None) -> frozenset[str]:
    return VOLATILE_KEYS[None] | VOLATILE_KEYS.get(method, frozenset())


def _skipped_notification(message: dict[str, Any]) -> bool:
    method = message.get("method")
    if method in IGNORED_NOTIFICATIONS:
        return True
    # The engine may already be ready when a session starts: `loading` is a passing state, not an answer.
    params = message.get("params")
    return method == "heedful/status" and isinstance(params, dict) and params.get("state") == "loading"


# ---------------------------------------------------------------------------------------------
# The live server


class LiveServer:
    """A language server subprocess spoken to over stdio, its messages sorted as they arrive."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.responses: dict[str, dict[str, Any]] = {}
        self.null_id_responses: list[dict[str, Any]] = []
        self.notifications: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._drain_stderr())]

    @classmethod
    async def start(cls, command: Sequence[str], cwd: Path | None = None) -> LiveServer:
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(cwd) if cwd else None,
            )
        except OSError as exc:
            raise RecordingError(
                f"cannot start the server {' '.join(command)!r} ({exc.strerror}); check --server-cmd"
            ) from None
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        frames = FrameParser()
        while chunk := await self.proc.stdout.read(65536):
            for body in frames.feed(chunk):
                try:
                    message = json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.stderr_tail.append(f"(the server sent a body that is not JSON: {body[:200]!r})")
                    continue
                if isinstance(message, dict):
                    self._sort(message)
            self._changed.set()
        self._changed.set()

    def _sort(self, message: dict[str, Any]) -> None:
        if "method" in message and "id" in message:
            self.requests.append(message)
        elif "method" in message:
            self.notifications.append(message)
        elif message.get("id") is None:
            self.null_id_responses.append(message)
        else:
            self.responses[json.dumps(message["id"])] = message

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_tail.append(line.decode("utf-8", errors="replace").rstrip())

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None or self._tasks[0].done()

    async def wait_for(self, find: Callable[[], Any], timeout: float) -> Any:
        """The first non-None `find()`; None when the timeout passes or the server's output ends."""
        deadline = time.monotonic() + timeout
        while True:
            found = find()
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._tasks[0].done():
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def send(self, message: dict[str, Any]) -> None:
        self.send_body(json.dumps(message, ensure_ascii=False).encode("utf-8"))

    def send_body(self, body: bytes) -> None:
        assert self.proc.stdin is not None
        if self.proc.stdin.is_closing():
            return
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    async def stop(self, grace: float) -> int | None:
        """Wait `grace` seconds for the server to exit by itself, then end it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), grace)
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in self._tasks:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------
# The replay


@dataclass(slots=True)
class Check:
    """One compared server message."""

    line: int
    name: str
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(slots=True)
class ReplayResult:
    recording: Path
    checks: list[Check]
    seconds: float
    server_status: int | None
    server_log: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def report(self) -> str:
        lines: list[str] = []
        for check in self.checks:
            if check.ok:
                continue
            lines.append(f"{self.recording}:{check.line}: {check.name} differs:")
            lines.extend(f"    {f}" for f in check.failures)
        failed = sum(not c.ok for c in self.checks)
        verdict = "FAILED" if failed else "ok"
        lines.append(
            f"{verdict}: {self.recording}: {len(self.checks) - failed} of {len(self.checks)} server messages match "
            f"({self.seconds:.1f} s)"
        )
        if failed and self.server_log:
            lines.append("the replayed server's last log lines:")
            lines.extend(f"    {line}" for line in self.server_log[-15:])
        return "\n".join(lines)


class Replayer:
    def __init__(
        self,
        entries: list[Entry],
        server: LiveServer,
        *,
        speed: float | None,
        timeout: float,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.entries = entries
        self.settings = settings  # the recorded server's settings, given to the session as its editor's
        self.server = server
        self.speed = speed
        self.timeout = timeout
        self.checks: list[Check] = []
        self._next_id = 0
        self._request_ids: dict[str, tuple[Any, str]] = {}  # recorded client request id -> (live id, method)
        self._server_request_ids: dict[str, Any] = {}  # recorded server request id -> live id
        self._ids: dict[str, str] = {}  # recorded completionId -> live
        # Live completionIds whose suggested text differs from the recording's (a structural match).
        self.diverged_completions: set[str] = set()
        self._taken_notifications: set[int] = set()
        self._taken_requests: set[int] = set()
        self._taken_null = 0
        self.sent_exit = False
        self.stored_events: Entry | None = None  # the recording's store line, compared after the server exits
        self.session_suffix = f"-replay-{uuid.uuid4().hex[:8]}"

    async def run(self) -> None:
        started = time.monotonic()
        for entry in self.entries:
            if entry.direction == CLIENT_TO_SERVER:
                if self.speed is not None:
                    delay = started + entry.t / self.speed - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                self._send(entry)
            elif entry.direction == STORE:
                self.stored_events = entry
            elif entry.message is not None:
                await self._expect(entry, entry.message)

    @property
    def live_session_id(self) -> str | None:
        """The session id the live server reports in `heedful/status`."""
        for message in self.server.notifications:
            params = message.get("params")
            if message.get("method") == "heedful/status" and isinstance(params, dict):
                session = params.get("sessionId")
                if isinstance(session, str):
                    return session
        return None

    def compare_events(self, live: list[dict[str, Any]], diverged: frozenset[int] = frozenset()) -> None:
        """Compare the events the live session stored with the recording's store line.

        `diverged`: the places (0, 1, ...) of the session's completions whose suggested text differed
        from the recording's. Their inferred events and edit snapshots are left out on both sides: an
        inferred reject follows from what the developer typed departing from what the model suggested,
        and the server then follows what was written in its place (snapshots the store line cannot tell
        from an accepted text's), so they depend on the model's exact text (a greedy tie-break can go the
        other way on another CPU), just as the text itself does. Everything else is compared exactly.
        """
        entry = self.stored_events
        assert entry is not None and entry.events is not None

        def kept(events: list[dict[str, Any]]) -> collections.Counter[str]:
            return collections.Counter(
                json.dumps(e, sort_keys=True) for e in events if not model_dependent_event(e, diverged)
            )

        expected, got = kept(entry.events), kept(live)
        failures = [f"stored in the recording, not in the replay: {e}" for e in sorted((expected - got).elements())]
        failures += [f"stored in the replay, not in the recording: {e}" for e in sorted((got - expected).elements())]
        self.checks.append(Check(entry.line, "events the session stored", failures))

    def _send(self, entry: Entry) -> None:
        if entry.message is None:
            self.server.send_body((entry.raw or "").encode("utf-8"))
            return
        message = substitute(entry.message, self._ids)
        method = message.get("method")
        if method == "initialize":
            self._fresh_session(message)
        if method is not None and "id" in message:
            self._next_id += 1
            self._request_ids[json.dumps(message["id"])] = (self._next_id, str(method))
            message["id"] = self._next_id
        elif method == "$/cancelRequest" and isinstance(message.get("params"), dict):
            live = self._request_ids.get(json.dumps(message["params"].get("id")))
            if live is not None:
                message["params"] = dict(message["params"], id=live[0])
        elif method is None and "id" in message:
            live_id = self._server_request_ids.get(json.dumps(message["id"]))
            if live_id is None:
                return  # it answers a server request the live server never made (reported there)
            message["id"] = live_id
        if method == "exit":
            self.sent_exit = True
        self.server.send(message)

    def _fresh_session(self, initialize: dict[str, Any]) -> None:
        """A replay is a new session: a recorded sessionId gets a suffix, so the store keeps both apart.

        The recorded server's settings become the session's editor settings, under those the recorded
        client sent itself (which it sends again), so the live server serves and stores as that one did.
        """
        params = initialize.get("params")
        if not isinstance(params, dict):
            return
        options = params.get("initializationOptions")
        if isinstance(options, dict) and isinstance(options.get("sessionId"), str):
            options = dict(options, sessionId=options["sessionId"] + self.session_suffix)
        if self.settings is not None:
            options = dict(options) if isinstance(options, dict) else {}
            own = options.get("settings")
            own = own if isinstance(own, dict) else {}
            merged = {section: dict(values) for section, values in self.settings.items()}
            for section, values in own.items():
                merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
            options["settings"] = merged
        if options is not None:
            params["initializationOptions"] = options

    async def _expect(self, entry: Entry, recorded: dict[str, Any]) -> None:
        method = recorded.get("method")
        if method is not None and "id" in recorded:
            await self._expect_request(entry, recorded)
        elif method is not None:
            if not _skipped_notification(recorded):
                await self._expect_notification(entry, recorded)
        else:
            await self._expect_response(entry, recorded)

    def _check(self, entry: Entry, name: str, started: float, failures: list[str]) -> None:
        self.checks.append(Check(entry.line, name, failures, time.monotonic() - started))

    def _missing(self, what: str) -> str:
        if self.server.exited:
            return f"{what}: the server exited (status {self.server.proc.returncode}) before sending it"
        return f"{what}: nothing arrived within {self.timeout:g} s"

    async def _expect_response(self, entry: Entry, recorded: dict[str, Any]) -> None:
        started = time.monotonic()
        rec_id = recorded.get("id")
        if rec_id is None:
            name = "error response without an id (to a malformed message)"
            live = await self.server.wait_for(self._next_null_response, self.timeout)
            method: str | None = None
        else:
            known = self._request_ids.get(json.dumps(rec_id))
            if known is None:
                return  # answers a request the recording does not hold
            live_id, method = known
            name = f"response to {method} (request {rec_id})"
            live = await self.server.wait_for(lambda: self.server.responses.get(json.dumps(live_id)), self.timeout)
        if live is None:
            self._check(entry, name, started, [self._missing("the response")])
            return
        got = {k: v for k, v in live.items() if k != "id"}
        learn_ids(recorded, got, self._ids)
        expected = substitute({k: v for k, v in recorded.items() if k != "id"}, self._ids)
        failures = diff_values(expected, got, structural=method in STRUCTURAL_METHODS, volatile=_volatile(method))
        if method in STRUCTURAL_METHODS and diff_values(expected, got, structural=False, volatile=_volatile(method)):
            self.diverged_completions.update(completion_ids(got))
        self._check(entry, name, started, failures)

    def _next_null_response(self) -> dict[str, Any] | None:
        if self._taken_null < len(self.server.null_id_responses):
            self._taken_null += 1
            return self.server.null_id_responses[self._taken_null - 1]
        return None

    async def _expect_request(self, entry: Entry, recorded: dict[str, Any]) -> None:
        started = time.monotonic()
        method = str(recorded["method"])
        name = f"server request {method}"

        def find() -> tuple[int, dict[str, Any]] | None:
            for i, message in enumerate(self.server.requests):
                if i not in self._taken_requests and message.get("method") == method:
                    return i, message
            return None

        found = await self.server.wait_for(find, self.timeout)
        if found is None:
            self._check(entry, name, started, [self._missing(f"the request {method}")])
            return
        index, live = found
        self._taken_requests.add(index)
        self._server_request_ids[json.dumps(recorded["id"])] = live["id"]
        failures = diff_values(
            substitute(recorded.get("params"), self._ids),
            live.get("params"),
            structural=False,
            volatile=_volatile(method),
            path="params",
        )
        self._check(entry, name, started, failures)

    async def _expect_notification(self, entry: Entry, recorded: dict[str, Any]) -> None:
        started = time.monotonic()
        method = str(recorded["method"])
        expected = substitute(recorded.get("params"), self._ids)
        volatile = _volatile(method)

        def find() -> int | None:
            for i, message in enumerate(self.server.notifications):
                if i in self._taken_notifications or message.get("method") != method:
                    continue
                if not diff_values(expected, message.get("params"), structural=False, volatile=volatile):
                    return i
            return None

        index = await self.server.wait_for(find, self.timeout)
        name = f"notification {method}"
        if index is not None:
            self._taken_notifications.add(index)
            self._check(entry, name, started, [])
            return
        candidates = [
            m
            for i, m in enumerate(self.server.notifications)
            if i not in self._taken_notifications and m.get("method") == method
        ]
        if not candidates:
            self._check(entry, name, started, [self._missing(f"the notification {method}")])
            return
        failures = diff_values(
            expected, candidates[0].get("params"), structural=False, volatile=volatile, path="params"
        )
        self._check(entry, name, started, failures)


async def replay(
    recording: Path,
    server_command: Sequence[str],
    *,
    speed: float | None = 1.0,
    timeout: float = 120.0,
    cwd: Path | None = None,
    store: Settings | None = None,
    recorded_settings: bool = True,
) -> ReplayResult:
    """Replay one recording against a server started with `server_command`; the comparison's result.

    With `store` (the settings of the store the server writes to), the events the replayed session
    stored are compared with the recording's store line, when it has one. With `recorded_settings`, the
    settings the recording's header carries are given to the session (see `Replayer._fresh_session`).
    """
    loaded = read_recording(recording)
    started = time.monotonic()
    server = await LiveServer.start(server_command, cwd)
    settings = loaded.settings if recorded_settings else None
    replayer = Replayer(loaded.entries, server, speed=speed, timeout=timeout, settings=settings)
    try:
        await replayer.run()
    finally:
        status = await server.stop(grace=30.0 if replayer.sent_exit else 0.0)
    if store is not None and replayer.stored_events is not None:
        session = replayer.live_session_id
        live, order = await _stored_events(store, session) if session is not None else ([], [])
        diverged = frozenset(i for i, cid in enumerate(order) if cid in replayer.diverged_completions)
        replayer.compare_events(live, diverged)
    return ReplayResult(recording, replayer.checks, time.monotonic() - started, status, list(server.stderr_tail))


async def _stored_events(settings: Settings, session_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The session's stored events, and its completion ids in the order the events number them."""

    store = await open_store(settings)
    try:
        return await store.session_events(session_id), await store.session_completion_ids(session_id)
    finally:
        await store.close()


def junit_xml(results: Sequence[ReplayResult]) -> bytes:
    """A JUnit XML report: one test suite per recording, one test case per compared server message."""
    suites = ET.Element("testsuites", name="heedful replay")
    for result in results:
        failures = sum(not c.ok for c in result.checks)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=str(result.recording),
            tests=str(len(result.checks)),
            failures=str(failures),
            errors="0",
            time=f"{result.seconds:.3f}",
        )
        for check in result.checks:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"replay.{result.recording.stem}",
                name=f"line {check.line}: {check.name}",
                time=f"{check.seconds:.3f}",
            )
            if not check.ok:
                failure = ET.SubElement(case, "failure", message=check.failures[0])
                failure.text = "\n".join(check.failures)
    report: bytes = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    return report
