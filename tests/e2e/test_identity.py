"""Who a TCP connection is served as: developer tokens decide it, claims that contradict them are refused.

A real `heedful serve --tcp` on loopback; tokens made with the real `heedful token add`; an adapter published
for alice. Every spoofing attempt (a claim of alice without her token, another developer's token claiming
alice or her team, a wrong or revoked token) is answered with error -32001 and the connection closed; none
gets a session. The connections that present a token are served as the token's developer, with that
developer's adapter and nobody else's. Ids longer than the schema holds are refused at `initialize`, on
PostgreSQL too (where a longer one used to be accepted and its session then failed to be written).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from adapters.lifecycle import publish_adapter
from kernel.settings import Settings
from server.recording import FrameParser
from server.stores import open_store
from storage.repositories import Scope, SessionRepository
from tests.conftest import make_lora_adapter
from tests.e2e.client import HeedfulClient, tcp_server
from tests.e2e.conftest import ServerSetup, write_config
from tests.procs import run_heedful

pytestmark = [pytest.mark.engine, pytest.mark.remote]


def add_token(setup: ServerSetup, developer: str, team: str | None = None) -> str:
    args = ["token", "add", "--developer", developer, "--json"] + (["--team", team] if team else [])
    result = run_heedful(setup.config, *args, timeout=120)
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    assert made["developer"] == developer and made["team"] == team
    assert str(made["token"]).startswith(made["prefix"])
    return str(made["token"])


async def answer_to_initialize(port: int, options: dict[str, Any], client_info: Any = None) -> dict[str, Any]:
    """Send `initialize` over a bare TCP connection and read until the server answers (and, if it refused,
    hangs up): the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        params: dict[str, Any] = {"capabilities": {}, "processId": None, "initializationOptions": options}
        if client_info is not None:
            params["clientInfo"] = client_info
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}).encode()
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        parser = FrameParser()
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 60)
            assert chunk, "the server hung up without answering initialize"
            for frame in parser.feed(chunk):
                message = json.loads(frame)
                if message.get("id") == 1:
                    if "error" in message and message["error"]["code"] == -32001:
                        await asyncio.wait_for(reader.read(), 60)  # a refusal closes the connection: the stream ends
                    return dict(message)
    finally:
        writer.close()


async def refused(port: int, options: dict[str, Any]) -> str:
    answer = await answer_to_initialize(port, options)
    assert "result" not in answer and answer["error"]["code"] == -32001, answer
    return str(answer["error"]["message"])


async def served_as(port: int, options: dict[str, Any], uri: str) -> dict[str, Any]:
    """Connect with `options`, complete once, and return the last `heedful/status` (developer, adapter)."""
    client = HeedfulClient("vscode")
    await client.lc.start_tcp("127.0.0.1", port)
    try:
        await asyncio.wait_for(client.initialize(options), 60)
        status = await client.wait_status("ready", timeout=120)
        client.open(uri, "def cube(x):\n    return ")
        result = await client.inline(uri, 1, 11)
        assert result is not None and result.items
        status = client.statuses[-1]
        await client.lc.shutdown_async(None)
        client.lc.exit(None)
        return status
    finally:
        await client.lc.stop()  # type: ignore[no-untyped-call]


async def test_tokens_decide_who_a_connection_is_and_spoofing_is_refused(
    tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    setup = write_config(tmp_path, small_model, vllm_server)
    alice = add_token(setup, "alice", "red")
    bob = add_token(setup, "bob")
    old_alice = add_token(setup, "alice", "red")
    revoke = run_heedful(setup.config, "token", "revoke", old_alice[:14], timeout=120)
    assert revoke.returncode == 0 and "revoked 1 token" in revoke.stdout, revoke.stderr
    listing = run_heedful(setup.config, "token", "list", "--json", timeout=120)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert sorted((r["developer"], r["revoked"] is None) for r in rows) == [
        ("alice", False), ("alice", True), ("bob", True)]  # fmt: skip
    assert alice not in listing.stdout and bob not in listing.stdout  # only prefixes are ever shown

    settings = Settings()
    settings.database.url = f"sqlite+aiosqlite:///{setup.db}"
    store = await open_store(settings)
    try:
        source = make_lora_adapter(small_model, tmp_path / "lora-alice", seed=3, b_std=0.02)
        published = await publish_adapter(
            store, Scope.developer("alice"), source, step=1, kl=0.1, metrics={},
            adapters_root=tmp_path / "adapters", gate=None, actor="test",
        )  # fmt: skip
    finally:
        await store.close()

    async with tcp_server(setup.config, setup.log) as (port, _proc):
        spoofs: list[dict[str, Any]] = [
            {"developerId": "alice", "sessionId": "spoof-no-token"},
            {"developerId": "alice", "sessionId": "spoof-shared-claim", "team": "red"},
            {"developerId": "alice", "sessionId": "spoof-bob-token", "token": bob},
            {"sessionId": "spoof-bob-team", "team": "red", "token": bob},
            {"developerId": "alice", "sessionId": "spoof-wrong-token", "token": alice + "x"},
            {"developerId": "alice", "sessionId": "spoof-revoked-token", "token": old_alice},
            {"developerId": "alice", "sessionId": "spoof-odd-token", "token": 12345},
        ]
        messages = [await refused(port, options) for options in spoofs]
        assert "has a token of their own" in messages[0] and "has a token of their own" in messages[1]
        assert "belongs to another developer" in messages[2]
        assert "the token's team is None" in messages[3]
        assert "is wrong" in messages[4] and "is wrong" in messages[5]
        assert "not a string" in messages[6]

        as_alice = await served_as(port, {"sessionId": "alice-1", "token": alice}, "file:///w/a.py")
        as_bob = await served_as(port, {"sessionId": "bob-1", "token": bob}, "file:///w/b.py")
        # Without tokens of their own, a developer on a loopback server may still say who they are.
        as_carol = await served_as(port, {"developerId": "carol", "sessionId": "carol-1"}, "file:///w/c.py")

    assert (as_alice["developerId"], as_alice["adapter"]) == ("alice", published.version_id)
    assert (as_bob["developerId"], as_bob["adapter"]) == ("bob", None)
    assert (as_carol["developerId"], as_carol["adapter"]) == ("carol", None)
    sessions = {r["id"]: (r["developer_id"], r["team_id"]) for r in setup.rows("SELECT * FROM sessions")}
    assert sessions == {"alice-1": ("alice", "red"), "bob-1": ("bob", None), "carol-1": ("carol", None)}
    served = setup.rows("SELECT developer_id, adapter_version FROM completions")
    assert {(r["developer_id"], r["adapter_version"]) for r in served} == {
        ("alice", published.version_id), ("bob", None), ("carol", None)}  # fmt: skip
    log = setup.log.read_text(errors="replace")
    assert alice not in log and bob not in log and old_alice not in log  # tokens are never logged
    print(f"identity: {len(spoofs)} spoofing attempts, 0 admitted, 0 served someone else's adapter")


async def test_require_tokens_refuses_loopback_claims(tmp_path: Path, small_model: Path, vllm_server: str) -> None:
    setup = write_config(
        tmp_path, small_model, vllm_server, extra='\n[server]\nrequire_tokens = true\ntcp_token = "shared-1"\n'
    )
    dana = add_token(setup, "dana", "blue")
    async with tcp_server(setup.config, setup.log) as (port, _proc):
        message = await refused(port, {"developerId": "erin", "sessionId": "no-token"})
        assert "your developer token" in message
        assert "is wrong" in await refused(port, {"developerId": "erin", "sessionId": "shared", "token": "shared-1"})
        as_dana = await served_as(port, {"sessionId": "dana-1", "token": dana}, "file:///w/d.py")
    assert as_dana["developerId"] == "dana"
    assert {r["id"] for r in setup.rows("SELECT id FROM sessions")} == {"dana-1"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_ids_longer_than_the_store_holds_are_refused_at_initialize(
    backend: str, tmp_path: Path, small_model: Path, vllm_server: str, request: pytest.FixtureRequest
) -> None:
    setup = write_config(tmp_path, small_model, vllm_server)
    if backend == "postgresql":
        from tests.pgserver import create_database

        url = create_database(request.getfixturevalue("postgres_server"), f"t_ids_{tmp_path.name[-8:].lower()}")
        setup.config.write_text(setup.config.read_text().replace(f"sqlite+aiosqlite:///{setup.db}", url))
    async with tcp_server(setup.config, setup.log) as (port, _proc):
        too_long = [
            ({"developerId": "d" * 201}, "initializationOptions.developerId"),
            ({"developerId": "dev", "team": "t" * 65}, "initializationOptions.team"),
            ({"developerId": "dev", "sessionId": "s" * 65}, "initializationOptions.sessionId"),
            ({"developerId": "dev", "team": "line\nbreak"}, "initializationOptions.team"),
        ]
        for options, key in too_long:
            answer = await answer_to_initialize(port, options)
            assert answer["error"]["code"] == -32602 and key in answer["error"]["message"], answer
        answer = await answer_to_initialize(port, {"developerId": "dev"}, {"name": "ed", "version": "v" * 101})
        assert answer["error"]["code"] == -32602 and "clientInfo.version" in answer["error"]["message"]
        longest = {"developerId": "d" * 200, "team": "t" * 64, "sessionId": "s" * 64}
        status = await served_as(port, longest, "file:///w/long.py")
    assert status["developerId"] == "d" * 200
    if backend == "sqlite":
        rows = setup.rows("SELECT id, team_id FROM sessions")
        assert [(r["id"], r["team_id"]) for r in rows] == [("s" * 64, "t" * 64)]
    else:
        settings = Settings()
        settings.database.url = url
        store = await open_store(settings)
        try:
            async with store.unit() as s:
                row = await SessionRepository(s).get("s" * 64)
                assert row is not None and (row.developer_id, row.team_id) == ("d" * 200, "t" * 64)
        finally:
            await store.close()
