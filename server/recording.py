"""Recordings of LSP sessions: every JSON-RPC message in both directions, one JSON object per line.

A recording starts with a header line and then holds one line per message:

    {"heedful_recording": 1, "started": "2026-01-01T00:00:00+00:00", "source": "serve", "settings": {...}}
    {"t": 0.0031, "direction": "client-to-server", "message": {"jsonrpc": "2.0", "id": 1, ...}}
    {"t": 0.0402, "direction": "server-to-client", "message": {...}}

`settings` (from `heedful serve --record`) holds the server's `completion` and `feedback` settings: they
shape its answers and what it stores (the edit snapshots' delays), so `heedful replay` gives them to the
replayed session as its editor settings.

`t` is seconds since the recording started. A body that is not JSON (a broken client) is kept as
`"raw": "<text>"` instead of `"message"`, so a replay sends the same bytes. A recording made by
`heedful serve --record` ends with a `"direction": "store"` line: the events the session stored
(`RolloutStore.session_events`), which a replay compares too. Every string in a message
passes through the store's `Redactor` first (built-in secret patterns plus `privacy.redact_patterns`):
a recording is meant to be shared with QA and checked into a repository, so a secret typed in an editor
must not reach it.

`heedful serve --record FILE` taps its own streams (each body its reader frames, `RecordingWriter`);
`heedful record --out FILE -- CMD...` (`run_proxy`) sits between an editor and any language server.
This module only records; `tools.replay` reads recordings back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from storage.redaction import Redactor

FORMAT_VERSION = 1
CLIENT_TO_SERVER = "client-to-server"
SERVER_TO_CLIENT = "server-to-client"
STORE = "store"  # the last line of a `heedful serve --record` recording: the events the session stored
DIRECTIONS = (CLIENT_TO_SERVER, SERVER_TO_CLIENT, STORE)


def redact_value(value: Any, redactor: Redactor) -> Any:
    """`value` with every string in it (not the keys) redacted."""
    if isinstance(value, str):
        return redactor.redact(value)[0]
    if isinstance(value, list):
        return [redact_value(v, redactor) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v, redactor) for k, v in value.items()}
    return value


class Recorder:
    """Appends messages to a recording file; safe to call from several threads (the proxy's pumps)."""

    def __init__(
        self, path: Path, redactor: Redactor, *, source: str, settings: dict[str, dict[str, Any]] | None = None
    ) -> None:
        self.path = path
        self.redactor = redactor
        self._lock = threading.Lock()
        self._started = time.monotonic()
        try:
            self._out: IO[str] = path.open("w", encoding="utf-8")
        except OSError as exc:
            raise OSError(f"cannot write the recording {path} ({exc.strerror}); pick a writable path") from None
        header: dict[str, Any] = {
            "heedful_recording": FORMAT_VERSION,
            "started": datetime.now(UTC).isoformat(),
            "source": source,
        }
        if settings is not None:
            header["settings"] = settings
        self._write(header)

    def _write(self, entry: dict[str, Any]) -> None:
        with self._lock:
            if self._out.closed:
                return
            self._out.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._out.flush()  # a session cut short still leaves every message seen so far

    def record(self, direction: str, body: bytes) -> None:
        entry: dict[str, Any] = {"t": round(time.monotonic() - self._started, 4), "direction": direction}
        try:
            entry["message"] = redact_value(json.loads(body), self.redactor)
        except (json.JSONDecodeError, UnicodeDecodeError):
            entry["raw"] = self.redactor.redact(body.decode("utf-8", errors="replace"))[0]
        self._write(entry)

    def record_store(self, session_id: str, events: list[dict[str, Any]]) -> None:
        """The events the session left in the store (`RolloutStore.session_events`), for replays to compare."""
        t = round(time.monotonic() - self._started, 4)
        self._write({"t": t, "direction": STORE, "session": session_id, "events": events})

    def close(self) -> None:
        with self._lock:
            self._out.close()


class FrameParser:
    """Cuts a byte stream of LSP frames (`Content-Length` header, blank line, body) into bodies."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = _content_length(self._buffer[:end])
            if length is None:  # not a frame header: drop it, as a server would
                self._buffer = self._buffer[end + 4 :]
                continue
            start = end + 4
            if len(self._buffer) < start + length:
                return
            body = self._buffer[start : start + length]
            self._buffer = self._buffer[start + length :]
            yield body


def _content_length(header: bytes) -> int | None:
    for line in header.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


class RecordingWriter:
    """pygls' writer with every frame it writes recorded (`heedful serve --record`)."""

    def __init__(self, writer: Any, recorder: Recorder) -> None:
        self._writer = writer
        self._recorder = recorder
        self._frames = FrameParser()

    def write(self, data: bytes) -> None:
        for body in self._frames.feed(data):
            self._recorder.record(SERVER_TO_CLIENT, body)
        self._writer.write(data)

    def close(self) -> None:
        self._writer.close()


async def run_proxy(command: Sequence[str], recorder: Recorder) -> int:
    """Run `command` as a language server between our stdin/stdout and the editor; record both ways.

    Returns the server's exit status. The server's standard error passes through to ours.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise OSError(f"cannot start the language server {command[0]!r} ({exc.strerror}); check the command") from None
    assert proc.stdin is not None and proc.stdout is not None
    server_in, server_out = proc.stdin, proc.stdout
    stdout: BinaryIO = sys.stdout.buffer
    loop = asyncio.get_running_loop()
    editor = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(editor), sys.stdin.buffer)

    async def to_server(chunk: bytes) -> None:
        server_in.write(chunk)
        await server_in.drain()

    async def to_editor(chunk: bytes) -> None:
        stdout.write(chunk)
        stdout.flush()

    async def editor_to_server() -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await _pump(editor, to_server, CLIENT_TO_SERVER, recorder)
            server_in.close()  # the editor is gone: the server sees the end of its input

    to_server_task = asyncio.create_task(editor_to_server())
    await _pump(server_out, to_editor, SERVER_TO_CLIENT, recorder)
    status = await proc.wait()
    to_server_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await to_server_task
    return status


async def _pump(
    source: asyncio.StreamReader, sink: Callable[[bytes], Awaitable[None]], direction: str, recorder: Recorder
) -> None:
    """Copy `source` to `sink` until it ends, recording each message that passes."""
    frames = FrameParser()
    while chunk := await source.read(65536):
        for body in frames.feed(chunk):
            recorder.record(direction, body)
        await sink(chunk)
