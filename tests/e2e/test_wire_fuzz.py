"""A seeded wire fuzzer against a real `heedful serve`: mutated messages and framing lies, over stdio and TCP.

Valid client messages (the client-to-server messages of the recorded sessions in tests/sessions, and
messages built here) are mutated: types flipped, fields dropped, huge strings, deep nesting, wrong ids,
unknown methods (long, with line breaks and ANSI escapes), notifications with ids. Framing lies are
sent as raw bytes: a header line over 1 MiB, a Content-Length that understates a 2 MiB body or
overstates a body, a Content-Length of 10**11, negative or not a number, a missing blank line, a body
that is not JSON. After each batch the server must still be running and answer a completion; at the
end its log must hold a bounded number of bytes per malformed message, on one line each, with nothing
a client can forge.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.client import ROOT, tcp_server
from tests.e2e.conftest import ServerSetup
from tests.e2e.test_lsp_robustness import RawServer

pytestmark = [pytest.mark.engine, pytest.mark.remote]

SEED = 20
BATCHES = 8
MESSAGES_PER_BATCH = 150
SESSIONS = Path(__file__).resolve().parents[1] / "sessions"
FORGED = "2031-01-01 00:00:00,000 ERROR server.admin: forged"
# Methods a mutation must not produce: they would end the session the fuzzer is testing.
ENDING = {"initialize", "shutdown", "exit"}


@dataclass
class Tally:
    sent: int = 0  # every message or framing lie written to the server
    malformed: int = 0  # of which mutated or lies
    alive_checks: int = 0


def recorded_messages() -> list[dict[str, Any]]:
    """The client-to-server messages of the recorded sessions, minus those that start or end a session."""
    messages = []
    for path in sorted(SESSIONS.glob("*.jsonl")):
        for line in path.read_text().splitlines()[1:]:
            entry = json.loads(line)
            message = entry.get("message")
            if entry.get("direction") == "client-to-server" and message and message.get("method") not in ENDING:
                messages.append(message)
    return messages


def built_messages(uri: str) -> list[dict[str, Any]]:
    item = {"insertText": "x", "command": {"title": "t", "command": "heedful.acceptCompletion", "arguments": []}}
    position = {"line": 1, "character": 4}
    return [
        {"jsonrpc": "2.0", "method": "textDocument/didOpen",
         "params": {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "def f():\n    "}}},
        {"jsonrpc": "2.0", "method": "textDocument/didChange",
         "params": {"textDocument": {"uri": uri, "version": 2},
                    "contentChanges": [{"range": {"start": position, "end": position}, "text": "r"}]}},
        {"jsonrpc": "2.0", "id": "fuzz-1", "method": "textDocument/inlineCompletion",
         "params": {"textDocument": {"uri": uri}, "position": position, "context": {"triggerKind": 2}}},
        {"jsonrpc": "2.0", "id": "fuzz-2", "method": "textDocument/completion",
         "params": {"textDocument": {"uri": uri}, "position": position}},
        {"jsonrpc": "2.0", "method": "textDocument/didShowCompletion", "params": {"item": item}},
        {"jsonrpc": "2.0", "method": "textDocument/didPartiallyAcceptCompletion",
         "params": {"item": item, "acceptedLength": 1}},
        {"jsonrpc": "2.0", "method": "heedful/didRejectCompletion", "params": {"completionId": "c-1"}},
        {"jsonrpc": "2.0", "id": "fuzz-3", "method": "workspace/executeCommand",
         "params": {"command": "heedful.feedback", "arguments": [{"text": "use pathlib"}]}},
        {"jsonrpc": "2.0", "id": "fuzz-4", "method": "workspace/executeCommand",
         "params": {"command": "heedful.acceptCompletion", "arguments": [{"completionId": "c-1"}]}},
        {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 1}},
        {"jsonrpc": "2.0", "method": "workspace/didChangeConfiguration",
         "params": {"settings": {"heedful": {"completion": {"max_tokens": 16}}}}},
        {"jsonrpc": "2.0", "method": "textDocument/didClose", "params": {"textDocument": {"uri": uri}}},
    ]  # fmt: skip


def nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every (path, value) inside a JSON value, the root included."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from nodes(v, (*path, i))


def replace(root: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return root


def hostile_text(rng: random.Random) -> str:
    """Text a log must not repeat whole or obey: long, with a forged log line and terminal escapes."""
    return f"\n{FORGED}\n\x1b[31mred\x1b[0m\r" + "ç" * rng.choice([10, 5000, 200_000])


def mutate(message: dict[str, Any], rng: random.Random) -> bytes:
    """One seeded mutation of a valid message, as a body."""
    m = copy.deepcopy(message)
    kind = rng.randrange(10)
    path, _ = rng.choice(list(nodes(m))[1:])
    if kind == 0:  # flip a value's type
        m = replace(m, path, rng.choice([None, 0, -1, 2**63, 1.5, True, "", [], {}, "x" * 300]))
    elif kind == 1:  # drop a field
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    elif kind == 2:  # a huge string
        m = replace(m, path, hostile_text(rng))
    elif kind == 3:  # deep nesting: within the parser's depth, or past it
        depth = rng.choice([50, 900, 100_000])
        return json.dumps({**m, "params": "@"}).replace('"@"', "[" * depth + "]" * depth).encode()
    elif kind == 4:  # a wrong id
        m["id"] = rng.choice([None, 1.5, [1], {"a": 1}, True, "i" * 100_000, -(2**70)])
    elif kind == 5:  # an unknown method
        m["method"] = rng.choice(["heedful/noSuchMethod", "$/x" + hostile_text(rng), "textDocument/" * 2000])
    elif kind == 6:  # a notification with an id, or a request without one
        if "id" in m:
            del m["id"]
        else:
            m["id"] = rng.randrange(10**6, 10**7)
    elif kind == 7:  # the wrong protocol version
        m["jsonrpc"] = rng.choice(["1.0", 2, None])
    elif kind == 8:  # params that are not an object
        m["params"] = rng.choice([None, 7, "params", [m.get("params")]])
    else:  # a URI a log must not repeat whole
        for p, _ in nodes(m):
            if p and p[-1] == "uri":
                m = replace(m, p, "file:///" + hostile_text(rng))
    if isinstance(m.get("method"), str) and m["method"] in ENDING:
        m["method"] = "heedful/renamedByTheFuzzer"
    return json.dumps(m).encode()


def frame(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def framing_lies(rng: random.Random) -> list[tuple[str, bytes]]:
    """(name, raw bytes) of each framing lie; each is followed by a valid message in the stream."""
    big = json.dumps(
        {"jsonrpc": "2.0", "method": "textDocument/didOpen",
         "params": {"textDocument": {"uri": "file:///w/lie.py", "languageId": "python", "version": 1,
                                     "text": "x = 1\n" * (2 * 1024 * 1024 // 6)}}}
    ).encode()  # fmt: skip
    small = json.dumps({"jsonrpc": "2.0", "method": "heedful/lie", "params": {}}).encode()
    return [
        ("header line over 1 MiB", b"X-Padding: " + b"p" * (1024 * 1024 + 17) + b"\r\n\r\n" + small),
        ("Content-Length understating a 2 MiB body", b"Content-Length: %d\r\n\r\n" % (len(big) // 3) + big),
        ("Content-Length 10**11", b"Content-Length: 100000000000\r\n\r\n" + small),
        ("Content-Length of 40 digits", b"Content-Length: " + b"9" * 40 + b"\r\n\r\n" + small),
        ("negative Content-Length", b"Content-Length: -5\r\n\r\n" + small),
        ("non-numeric Content-Length", b"Content-Length: twelve\r\n\r\n" + small),
        ("missing blank line", b"Content-Length: %d\r\n" % len(small) + small),
        ("body that is not JSON", frame(b"\xff\xfe{not json" + bytes(rng.randrange(256) for _ in range(64)))),
        ("body that is not an object", frame(b'"just a string"')),
        ("Content-Length overstating the body", b"Content-Length: %d\r\n\r\n" % (len(small) + 5000) + small),
        ("header without Content-Length", b"Content-Type: application/json\r\n\r\n" + small),
        ("Content-Length 0", b"Content-Length: 0\r\n\r\n"),
        ("bare newlines", b"Content-Length: %d\n\n" % len(small) + small),
    ]


async def alive(server: RawServer, tally: Tally, uri: str) -> None:
    """The server is running and serves a completion on a freshly opened document."""
    server.open(uri, "def add(a, b):\n    ")
    answer = await server.call("textDocument/inlineCompletion", server.inline_params(uri, 1, 4), timeout=300)
    assert "result" in answer and "error" not in answer, answer
    tally.sent += 2
    tally.alive_checks += 1


async def fuzz(server: RawServer, rng: random.Random, tally: Tally, batches: int, label: str) -> None:
    server._next_id = 10**8  # the checks' own ids, apart from any id a fuzzed message carries
    pool = recorded_messages() + built_messages("file:///w/fuzz.py")
    for batch in range(batches):
        for _ in range(MESSAGES_PER_BATCH):
            server.stdin.write(frame(mutate(rng.choice(pool), rng)))
            tally.sent += 1
            tally.malformed += 1
            if rng.random() < 0.2:  # valid traffic in between, as an editor would keep sending
                server.stdin.write(frame(json.dumps(rng.choice(pool)).encode()))
                tally.sent += 1
        await server.stdin.drain()
        await alive(server, tally, f"file:///w/{label}-alive-{batch}.py")
    for name, raw in framing_lies(rng):
        server.stdin.write(raw)
        tally.sent += 1
        tally.malformed += 1
        await server.stdin.drain()
        try:
            await alive(server, tally, f"file:///w/{label}-after-{len(name)}.py")
        except Exception as exc:
            raise AssertionError(f"the server did not answer after the framing lie {name!r}") from exc


def check_log(text: str, malformed: int) -> float:
    """Bytes of log per malformed message; the log holds no forged line, no terminal escape, no long line."""
    size = len(text.encode())
    lines = text.splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert "\x1b" not in text
    assert max(len(line) for line in lines) < 4000
    assert "Traceback" not in text, [line for line in lines if "Traceback" in line][:3]
    return size / malformed


@pytest.fixture
async def stdio_server(lsp_setup: ServerSetup) -> AsyncIterator[tuple[RawServer, asyncio.subprocess.Process]]:
    with lsp_setup.log.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "--config", str(lsp_setup.config), "serve",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=str(ROOT),
        )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    server = RawServer(proc.stdout, proc.stdin)
    try:
        yield server, proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server._reader.cancel()


async def test_seeded_wire_fuzz_over_stdio(
    stdio_server: tuple[RawServer, asyncio.subprocess.Process], lsp_setup: ServerSetup
) -> None:
    server, proc = stdio_server
    await server.start_session()
    started = lsp_setup.log.stat().st_size
    tally = Tally()
    await fuzz(server, random.Random(SEED), tally, BATCHES, "stdio")
    assert proc.returncode is None  # no crash
    log = lsp_setup.log.read_bytes()[started:].decode("utf-8", errors="replace")
    per_message = check_log(log, tally.malformed)
    print(
        f"wire fuzz over stdio: {tally.sent} messages sent, {tally.malformed} malformed, 0 crashes, "
        f"{tally.alive_checks} liveness checks passed, {per_message:.0f} log bytes per malformed message"
    )
    assert per_message < 1024
    server.request("shutdown", None)
    server.notify("exit", None)
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_wire_fuzz_over_tcp_and_the_limit_before_initialize(lsp_setup: ServerSetup) -> None:
    async with tcp_server(lsp_setup.config, lsp_setup.log) as (port, proc):
        # Before initialize a client cannot make the server hold more than 1 MiB: a 5 MiB message is
        # refused at its header, without waiting for (or keeping) its body, and the connection goes on.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        early = RawServer(reader, writer)
        writer.write(b"Content-Length: %d\r\n\r\n" % (5 * 1024 * 1024) + b'{"jsonrpc": "2.0", "id": 77, "method": "x"')
        await writer.drain()
        await early.until(lambda: 77 in early.responses, timeout=60)
        refused = early.responses[77]["error"]
        assert refused["code"] == -32600 and "over this server's limit of 1048576 bytes" in refused["message"]
        await early.start_session()  # the header of initialize ends the skipped body: the session starts
        started = lsp_setup.log.stat().st_size
        tally = Tally()
        await fuzz(early, random.Random(SEED + 1), tally, 2, "tcp")
        assert proc.returncode is None
        per_message = check_log(lsp_setup.log.read_bytes()[started:].decode("utf-8", errors="replace"), tally.malformed)
        print(
            f"wire fuzz over TCP: {tally.sent} messages sent, {tally.malformed} malformed, 0 crashes, "
            f"{per_message:.0f} log bytes per malformed message"
        )
        assert per_message < 1024
        writer.close()
    assert re.search(r"client .* disconnected", lsp_setup.log.read_text(errors="replace"))
