"""LSP framing: a client's byte stream cut into message bodies, whatever bytes arrive.

An LSP message is a header block (`Content-Length: N`, maybe `Content-Type`, then a blank line) and N
bytes of body. Every connection of `heedful serve` reads through `FrameReader`, which holds only
bounded amounts of a client's bytes and never gives up on a stream:

- a header line is at most `MAX_HEADER_LINE` bytes and a header block `MAX_HEADER_BLOCK`;
- a body is at most `max_body()` bytes (`server.max_message_bytes`, and `MAX_UNINITIALIZED_BYTES`
  until the connection is initialized, so a TCP client that has not shown its token cannot make the
  server hold more); a longer one is reported and its bytes are read and dropped in chunks;
- bytes that are not a header (a Content-Length that understated its body leaves the rest of the body
  where the next header should be; a header without a number; no blank line) are reported once and
  skipped up to the next `Content-Length: N` line;
- a Content-Length that overstated its body: the body is cut where the next `Content-Length: N` line
  starts inside it. Valid JSON never contains one (JSON has no raw line break inside a string, and no
  bare word outside one), so only a body that is broken anyway is cut.

Each problem comes back as a `FramingError` for the connection to answer and log; each body as a
`Body` for the protocol (`HeedfulProtocol.receive`). This module knows bytes only, not JSON-RPC.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

MAX_HEADER_LINE = 8 * 1024
MAX_HEADER_BLOCK = 16 * 1024
MAX_UNINITIALIZED_BYTES = 1024 * 1024  # an `initialize` is a few KiB; nothing larger comes before it
CHUNK = 64 * 1024  # bytes read from the stream at a time

PARSE_ERROR = -32700
INVALID_REQUEST = -32600

# A header that starts a frame, where the stream is found out of step (see the module docstring).
_HEADER = re.compile(rb"Content-Length:[ \t]*\d+[ \t]*\r?\n")
_KEEP = 64  # bytes kept between reads while looking for a header: one may straddle two reads
_NAME = re.compile(rb"[A-Za-z0-9-]+")
# The id of a request, when the body opens with it (after "jsonrpc" and "method", as editors write them).
_ID = re.compile(
    rb'\s*\{\s*(?:"(?:jsonrpc|method)"\s*:\s*"[^"\\]{0,200}"\s*,\s*){0,2}"id"\s*:\s*(-?\d{1,18}|"[^"\\]{0,200}")'
)


class Source(Protocol):
    """Where the bytes come from (asyncio.StreamReader)."""

    async def read(self, n: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Body:
    """One message body, as the client framed it."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FramingError:
    """Bytes that are not a message, or a message the server will not take; what happened and the fix.

    `code` is the JSON-RPC error to answer with; `msg_id` the request's id when it could be read (an
    over-limit request), else None.
    """

    message: str
    code: int = PARSE_ERROR
    msg_id: int | str | None = None

    def __str__(self) -> str:
        return self.message


def request_id(head: bytes) -> int | str | None:
    """The id of the request whose body starts with `head`, if it opens with one; else None."""
    found = _ID.match(head)
    if found is None:
        return None
    raw = found.group(1)
    return raw[1:-1].decode("utf-8", errors="replace") if raw.startswith(b'"') else int(raw)


class FrameReader:
    """Reads frames from `source`; `next()` gives the next `Body` or `FramingError`, None at the end."""

    def __init__(self, source: Source, max_body: Callable[[], int]) -> None:
        self._source = source
        self._max_body = max_body
        self._buf = bytearray()
        self._eof = False
        self._hunt_from: int | None = None  # out of step: look for a header from this offset on
        self._skip = 0  # bytes of an over-limit body still to drop
        self.dropped = 0  # bytes dropped so far: over-limit bodies and what was not a frame

    async def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = await self._source.read(CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    def _drop(self, n: int) -> None:
        del self._buf[:n]
        self.dropped += n

    async def next(self) -> Body | FramingError | None:
        """The next frame; a problem is reported once, and the reader then finds its way to the next frame."""
        while True:
            if self._skip and not await self._skip_body():
                return None
            if self._hunt_from is not None and not await self._hunt():
                return None
            length = await self._headers()
            if length is None:
                return None
            if isinstance(length, FramingError):
                return length
            return await self._body(length)

    async def _headers(self) -> int | FramingError | None:
        """The Content-Length of the header block at the start of the buffer (consumed); None at the end."""
        pos = 0
        length: int | None = None
        seen = False
        while True:
            end = self._buf.find(b"\n", pos, pos + MAX_HEADER_LINE + 1)
            if end < 0:
                if len(self._buf) - pos > MAX_HEADER_LINE:
                    return self._lost(f"a header line longer than {MAX_HEADER_LINE} bytes")
                if not await self._fill():
                    return None
                continue
            line = bytes(self._buf[pos:end]).rstrip(b"\r")
            pos = end + 1
            if pos > MAX_HEADER_BLOCK:
                return self._lost(f"a header block longer than {MAX_HEADER_BLOCK} bytes")
            if not line:
                if not seen:  # a stray blank line between messages: harmless
                    self._drop(pos)
                    pos = 0
                    continue
                del self._buf[:pos]
                if length is None:
                    self._hunt_from = 0
                    return FramingError(
                        "a header block without Content-Length; the message that follows was skipped "
                        "(frame each message with 'Content-Length: <bytes>' and a blank line)"
                    )
                return length
            seen = True
            name, colon, value = line.partition(b":")
            if not colon or not _NAME.fullmatch(name.strip()):
                return self._lost(f"bytes that are not a header line ({len(line)} bytes)")
            if name.strip().lower() == b"content-length":
                number = value.strip()
                if not number.isdigit():
                    return self._lost(f"a Content-Length that is not a number of bytes ({len(number)} bytes)")
                # A number too long for int() is over any limit anyway.
                length = int(number) if len(number) <= 20 else 10**20

    def _lost(self, what: str) -> FramingError:
        """The stream is out of step at the buffer's start: skip to the next header after it."""
        self._hunt_from = 1
        return FramingError(
            f"{what} where a message header should be; skipped up to the next 'Content-Length:' header "
            "(frame each message with 'Content-Length: <bytes of the body>' and a blank line)"
        )

    async def _hunt(self) -> bool:
        """Drop bytes up to the next frame header; False if the stream ends first."""
        start = self._hunt_from or 0
        while True:
            found = _HEADER.search(self._buf, start)
            if found is not None:
                self._drop(found.start())
                self._hunt_from = None
                return True
            self._drop(max(start, len(self._buf) - _KEEP))
            start = 0
            if not await self._fill():
                return False

    async def _body(self, length: int) -> Body | FramingError | None:
        limit = self._max_body()
        if length > limit:
            self._skip = length
            return FramingError(
                f"a message of {length} bytes is over this server's limit of {limit} bytes; it was skipped "
                "(a larger file cannot be synchronized: the admin can raise server.max_message_bytes; before "
                f"'initialize' the limit is {MAX_UNINITIALIZED_BYTES} bytes)",
                INVALID_REQUEST,
                request_id(bytes(self._buf[:1024])),
            )
        scanned = 0
        while True:
            found = _HEADER.search(self._buf, max(0, scanned - _KEEP), min(len(self._buf), length))
            if found is not None:  # the next message starts inside this one: its length overstated it
                self._drop(found.start())
                return FramingError(
                    f"a Content-Length of {length} bytes, but the next message's header came after "
                    f"{found.start()}; that message was dropped (Content-Length counts the body's bytes)"
                )
            if len(self._buf) >= length:
                body = bytes(self._buf[:length])
                del self._buf[:length]
                return Body(body)
            scanned = len(self._buf)
            if not await self._fill():
                return None  # the stream ended inside the body

    async def _skip_body(self) -> bool:
        """Drop the rest of an over-limit body, in chunks; stop early at a header inside it. False at the end."""
        while self._skip:
            if not self._buf and not await self._fill():
                return False
            window = min(len(self._buf), self._skip)
            found = _HEADER.search(self._buf, 0, window)
            if found is not None:  # it was not as long as it said: the next message is here
                self._drop(found.start())
                self._skip = 0
                break
            n = window if window == self._skip else max(0, window - _KEEP)
            if n == 0 and not await self._fill():
                return False
            self._drop(n)
            self._skip -= n
        return True
