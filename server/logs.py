"""Logging for every Heedful command: to standard error or a file, never to stdout.

In stdio mode stdout carries the LSP protocol, so nothing else may ever write there.

Much of what `heedful serve` logs comes from its clients: method names, document URIs, ids, and
exception messages that quote them. A client must not be able to fill the disk or forge log lines
through them, so every record passes `ClientSafeFilter` on its way out:

- each argument is cut to `CLIENT_TEXT_CHARS` (strings) or `ARGUMENT_CHARS` (anything else), the whole
  message to `MESSAGE_CHARS`, each with a marker saying how much was cut (`clip`);
- control characters (line breaks, ANSI escapes, C1 codes, Unicode line separators) are escaped, so a
  record is one line; a traceback's lines are indented under `  | ` so none can pass for a record;
- an error the client caused (a JSON-RPC error our handler raised, a body that is not JSON) is logged
  as one line with the error, without a traceback;
- within one connection (`connection`, set by the server for each client) the same message template is
  logged at most `RATE_BURST` times per `RATE_WINDOW_S` seconds; the next one logged after a pause says
  how many were left out.

What this module must not do: write anywhere but the configured handler, or drop a record outside a
connection (the worker's and the CLI's own logs are never rate-limited).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from pygls.exceptions import JsonRpcException

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

CLIENT_TEXT_CHARS = 200  # a string argument (a URI, a method name, an id) in a log line
ARGUMENT_CHARS = 1000  # any other argument (an exception, a list) in a log line
MESSAGE_CHARS = 2000  # a whole message, whatever built it
TRACEBACK_CHARS = 8000  # a traceback keeps its first and last half of this
RATE_BURST = 10  # records of one template per connection per window
RATE_WINDOW_S = 60.0

connection: contextvars.ContextVar[str | None] = contextvars.ContextVar("heedful_connection", default=None)
"""The client connection a record belongs to (None: not serving a client); the server sets it per connection."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")  # lone surrogates: no codec writes them
# An error a client's message caused: worth one line, never a traceback.
_CLIENT_ERRORS = (JsonRpcException, json.JSONDecodeError, UnicodeDecodeError)


def escape(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`), so it stays on one line."""
    return _CONTROL.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}.get(code) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def clip(text: str, limit: int = CLIENT_TEXT_CHARS) -> str:
    """`text` escaped and cut to `limit` characters plus a marker of how many were cut: client text for a log."""
    if len(text) <= limit:
        return escape(text)
    return f"{escape(text[:limit])}...[{len(text) - limit} more characters]"


class _Clipped:
    """A log argument that renders clipped, by %s and %r alike."""

    __slots__ = ("limit", "value")

    def __init__(self, value: Any, limit: int) -> None:
        self.value = value
        self.limit = limit

    def __str__(self) -> str:
        return clip(str(self.value), self.limit)

    def __repr__(self) -> str:
        return clip(repr(self.value), self.limit)


def _clipped(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value  # %d and %f need the number itself; a number is short
    return _Clipped(value, CLIENT_TEXT_CHARS if isinstance(value, str) else ARGUMENT_CHARS)


class ClientSafeFilter(logging.Filter):
    """Renders each record bounded, on one line, and rate-limited per connection (see the module docstring)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        # (connection, logger, template, level) -> [window start, logged in window, left out since last logged]
        self._seen: dict[tuple[str, str, str, int], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        conn = connection.get()
        if conn is not None and not self._admit(conn, record):
            return False
        args = record.args
        if isinstance(args, dict):
            args = {k: _clipped(v) for k, v in args.items()}
        elif args:
            args = tuple(_clipped(a) for a in args)
        try:
            message = str(record.msg) % args if args else str(record.msg)
        except (TypeError, ValueError):  # a malformed call: show what there is rather than lose the record
            message = f"{record.msg} {args!r}"
        if record.exc_info and isinstance(record.exc_info[1], _CLIENT_ERRORS):
            exc = record.exc_info[1]
            message = f"{message}: {type(exc).__name__}: {clip(str(exc), ARGUMENT_CHARS)}"
            record.exc_info = None
            record.exc_text = None
        record.msg = clip(message, MESSAGE_CHARS) + getattr(record, "left_out", "")
        record.args = None
        return True

    def _admit(self, conn: str, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = (conn, record.name, str(record.msg)[:200], record.levelno)
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            left_out = int(entry[2]) if entry is not None else 0
            if len(self._seen) > 4096:  # forget windows that are over (ended connections among them)
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
            self._seen[key] = [now, 1, 0]
            if left_out:
                record.left_out = f" (and {left_out} more like this were not logged)"
            return True
        if entry[1] < RATE_BURST:
            entry[1] += 1
            return True
        entry[2] += 1
        return False


class ClientSafeFormatter(logging.Formatter):
    """Tracebacks bounded, with every line indented under `  | ` and escaped, so none can pass for a record."""

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        if len(text) > TRACEBACK_CHARS:
            half = TRACEBACK_CHARS // 2
            text = f"{text[:half]}\n...[{len(text) - TRACEBACK_CHARS} characters of traceback cut]...\n{text[-half:]}"
        return "\n".join("  | " + escape(line) for line in text.split("\n"))


def setup_logging(level: str = "INFO", file: str | Path | None = None) -> None:
    handler: logging.Handler
    if file:
        Path(file).expanduser().parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(file).expanduser(), encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ClientSafeFormatter(FORMAT))
    handler.addFilter(ClientSafeFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # vLLM configures its own logger to stdout unless told otherwise; keep it on our handler.
    for name in ("vllm",):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.propagate = False
