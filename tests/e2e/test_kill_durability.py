"""SIGKILL `heedful serve` right after it acknowledged feedback, many times: nothing acknowledged is lost.

Each trial starts a real `heedful serve` over stdio on one SQLite file, opens a session, asks for one
completion, and then sends a pipelined burst of commands (`heedful.acceptCompletion` once, then
`heedful.feedback` corrections). After a random number of answers the process is killed with SIGKILL, at
once, while later commands are still in flight. An answer carrying an `eventId` is an acknowledgement:
every such event must be in the database afterwards, and the file must pass SQLite's integrity check.

The trials run in two lanes at once on the same file, as two editor windows of one developer would: each
kill lands while the other lane's server may be writing, so the file's integrity is checked under a
second writer too.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.recording import FrameParser
from tests.e2e.client import ROOT
from tests.e2e.conftest import ServerSetup, write_config

pytestmark = [pytest.mark.engine, pytest.mark.remote]

TRIALS = 30
LANES = 2  # trials at once, on the same SQLite file
BURST = 24
SEED = 20261202


class RawSession:
    """The client's side of one stdio connection, message by message (no LSP library in between)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log  # the server's standard error, quoted when it goes away
        self.parser = FrameParser()
        self.pending: list[dict[str, Any]] = []
        self.next_id = 0

    def send(self, method: str, params: Any, *, request: bool = True) -> int | None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
        msg_id = None
        if request:
            self.next_id += 1
            msg_id = message["id"] = self.next_id
        body = json.dumps(message).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return msg_id

    async def receive(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
        """The first message from the server for which `wanted` is true (the others stay pending)."""
        assert self.proc.stdout is not None
        while True:
            for i, message in enumerate(self.pending):
                if wanted(message):
                    return self.pending.pop(i)
            chunk = await asyncio.wait_for(self.proc.stdout.read(65536), timeout)
            if not chunk:
                code = await asyncio.wait_for(self.proc.wait(), 30)
                tail = self.log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"the server closed its output (exit status {code}); its log:\n{tail}")
            self.pending.extend(json.loads(frame) for frame in self.parser.feed(chunk))

    async def answer(self, msg_id: int) -> dict[str, Any]:
        return await self.receive(lambda m: m.get("id") == msg_id and "method" not in m)


async def one_trial(setup: ServerSetup, trial: int, rng: random.Random) -> tuple[list[str], int]:
    """(event ids acknowledged before the kill, commands sent)."""
    log = setup.log.parent / f"serve-{trial}.log"
    err = log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "--config", str(setup.config), "serve",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=str(ROOT),
    )  # fmt: skip
    acked: list[str] = []
    try:
        rpc = RawSession(proc, log)
        options = {"developerId": "kim", "sessionId": f"k-{trial}"}
        init = rpc.send("initialize", {"processId": None, "capabilities": {}, "initializationOptions": options})
        assert init is not None and "result" in await rpc.answer(init)
        rpc.send("initialized", {}, request=False)
        await rpc.receive(lambda m: m.get("method") == "heedful/status" and m["params"]["state"] == "ready")
        uri = f"file:///w/kill/{trial}.py"
        doc = {"uri": uri, "languageId": "python", "version": 1, "text": "def square(x):\n    return "}
        rpc.send("textDocument/didOpen", {"textDocument": doc}, request=False)
        asked = rpc.send(
            "textDocument/inlineCompletion",
            {"textDocument": {"uri": uri}, "position": {"line": 1, "character": 11}, "context": {"triggerKind": 1}},
        )
        assert asked is not None
        items = (await rpc.answer(asked))["result"]["items"]
        completion_id = items[0]["command"]["arguments"][0]["completionId"]
        commands = [("heedful.acceptCompletion", [{"completionId": completion_id}])]
        commands += [("heedful.feedback", [{"text": f"use pathlib, not os.path ({trial}.{i})"}]) for i in range(BURST)]
        ids = [rpc.send("workspace/executeCommand", {"command": c, "arguments": a}) for c, a in commands]
        kill_after = rng.randint(1, len(ids))  # answers to wait for; the rest are in flight when it dies
        for msg_id in ids[:kill_after]:
            assert msg_id is not None
            answer = await rpc.answer(msg_id)
            assert answer["result"]["recorded"] is True, answer
            acked.append(str(answer["result"]["eventId"]))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        return acked, len(ids)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        err.close()


async def test_sigkill_after_acknowledged_feedback_loses_nothing(
    tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    setup = write_config(tmp_path, small_model, vllm_server)
    lost: list[tuple[int, str]] = []
    acked_total = 0

    async def lane(first: int) -> None:
        nonlocal acked_total, lost
        rng = random.Random(SEED + first)
        for trial in range(first, TRIALS, LANES):
            acked, _sent = await one_trial(setup, trial, rng)
            acked_total += len(acked)
            with sqlite3.connect(setup.db, timeout=30) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                stored = {str(r[0]) for r in conn.execute("SELECT id FROM events")}
            lost += [(trial, event_id) for event_id in acked if event_id not in stored]

    await asyncio.gather(*(lane(first) for first in range(LANES)))
    print(f"durability: {TRIALS} SIGKILL trials in {LANES} lanes, {acked_total} acknowledged events, {len(lost)} lost")
    assert not lost, lost[:10]
    assert acked_total >= TRIALS  # every trial acknowledged at least one event before its kill
