"""`heedful serve --tcp` on a non-local address: a token from the settings is required of every editor.

A real server listens on 0.0.0.0 and real LSP clients connect over TCP: without the token, or with a
wrong one, `initialize` is answered with an error and the connection is closed; with it, the editor is
served. Without a token in the settings, a non-local bind is refused before anything listens.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.recording import FrameParser
from tests.e2e.client import ROOT, HeedfulClient
from tests.e2e.conftest import ServerSetup, write_config
from tests.procs import run_heedful

pytestmark = [pytest.mark.engine, pytest.mark.remote]

TOKEN = "team-secret-7f3a9c"


@pytest.fixture
async def network_server(tmp_path: Path, small_model: Path, vllm_server: str) -> AsyncIterator[tuple[ServerSetup, int]]:
    """`heedful serve --tcp --host 0.0.0.0 --port 0` with server.tcp_token set; (setup, port)."""
    setup = write_config(tmp_path, small_model, vllm_server, extra=f'\n[server]\ntcp_token = "{TOKEN}"\n')
    with setup.log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "--config", str(setup.config),
            "serve", "--tcp", "--host", "0.0.0.0", "--port", "0",
            stderr=stderr, cwd=str(ROOT),
        )  # fmt: skip
    try:
        port = None
        for _ in range(600):
            found = re.search(r"listening on 0\.0\.0\.0:(\d+)", setup.log.read_text())
            if found:
                port = int(found.group(1))
                break
            assert proc.returncode is None, setup.log.read_text()
            await asyncio.sleep(0.1)
        assert port is not None, setup.log.read_text()
        yield setup, port
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def connect(port: int, options: dict[str, Any]) -> HeedfulClient:
    client = HeedfulClient("vscode")
    await client.lc.start_tcp("127.0.0.1", port)
    await asyncio.wait_for(client.initialize(options), 60)
    return client


async def refused(port: int, options: dict[str, Any]) -> str:
    """Send `initialize` with `options` over a bare TCP connection; the error it got. The server must then
    close the connection (a bare connection sees the end of the stream, which pygls' client hides)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"capabilities": {}, "processId": None, "initializationOptions": options}}
        ).encode()  # fmt: skip
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 60)  # everything until the server hangs up
        bodies = list(FrameParser().feed(rest))
        assert len(bodies) == 1, rest
        answer = json.loads(bodies[0])
        assert answer["id"] == 1 and "result" not in answer and answer["error"]["code"] == -32001
        return str(answer["error"]["message"])
    finally:
        writer.close()


async def test_a_network_bind_refuses_editors_without_the_token(network_server: tuple[ServerSetup, int]) -> None:
    setup, port = network_server
    message = await refused(port, {"developerId": "mallory", "sessionId": "no-token"})
    assert "initializationOptions.token" in message and "server.tcp_token" in message
    await refused(port, {"developerId": "mallory", "sessionId": "wrong-token", "token": TOKEN + "x"})
    await refused(port, {"developerId": "mallory", "sessionId": "odd-token", "token": 12345})

    client = await connect(port, {"developerId": "alice", "sessionId": "with-token", "token": TOKEN})
    try:
        await client.wait_status("ready", timeout=120)
        client.open("file:///w/net.py", "def cube(x):\n    return ")
        result = await client.inline("file:///w/net.py", 1, 11)
        assert result is not None and result.items
        await client.lc.shutdown_async(None)
        client.lc.exit(None)
    finally:
        await client.lc.stop()  # type: ignore[no-untyped-call]
    # Refused editors never got a session; the one with the token did.
    await asyncio.sleep(0.5)
    sessions = {r["id"] for r in setup.rows("SELECT id FROM sessions")}
    assert sessions == {"with-token"}
    assert "connection refused: initializationOptions.token is missing" in setup.log.read_text()
    assert "metrics on" not in setup.log.read_text()  # the metrics endpoint is off unless asked for
    assert TOKEN not in setup.log.read_text()


def test_a_network_bind_without_a_token_in_the_settings_does_not_start(lsp_setup: ServerSetup) -> None:
    result = run_heedful(lsp_setup.config, "serve", "--tcp", "--host", "0.0.0.0", timeout=120)
    assert result.returncode == 2
    assert "--host 0.0.0.0 lets other machines connect" in result.stderr and "server.tcp_token" in result.stderr
