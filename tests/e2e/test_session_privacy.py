"""What `heedful serve` keeps of an editor session, by the session's own team settings: a real LSP client,
the real server, the small model behind it, the SQLite file read back byte by byte.

A team with `privacy.store_prompts = false` and a pattern of its own types secrets into a file; a team whose
file is broken when its developer connects gets completions, but nothing of the session is recorded until
the file is fixed.
"""

from __future__ import annotations

import pytest

from tests.e2e.client import running_client
from tests.e2e.conftest import ServerSetup

pytestmark = [pytest.mark.engine, pytest.mark.remote]

SECRETS = {
    "github token": "ghp_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0FeDcBa",
    "env-style password": "Tr0ub4dor-and-3",
    "token literal": "tok-5f9c2e71aa",
    "team pattern": "PRV-577215",
}
S = SECRETS
URI = "file:///w/shop/settings.py"
SOURCE = (
    f'GH = "{S["github token"]}"\n'
    f"# run: MYSQL_PASSWORD={S['env-style password']} ./migrate.sh\n"
    f'token = "{S["token literal"]}"\n'
    f'TICKET = "{S["team pattern"]}"\n'
    "\n"
    "\n"
    "def add(a, b):\n"
    "    "
)
PRIVATE_TEAM = "[privacy]\nstore_prompts = false\nredact_patterns = ['PRV-[0-9]{6}']\n"


def raw_database(setup: ServerSetup) -> bytes:
    files = (setup.db, setup.db.with_name(setup.db.name + "-wal"))
    return b"".join(p.read_bytes() for p in files if p.exists())


async def test_a_store_prompts_false_team_keeps_no_prompt_and_no_secret(lsp_setup: ServerSetup) -> None:
    teams = lsp_setup.config.parent / "teams"
    teams.mkdir()
    (teams / "private.toml").write_text(PRIVATE_TEAM)
    options = {"developerId": "dev-private", "sessionId": "session-private", "team": "private"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready")
        client.open(URI, SOURCE)
        answer = await client.inline(URI, 7, 4)
        assert answer is not None and answer.items
        completion_id = answer.items[0].command.arguments[0]["completionId"]
        await client.command("heedful.acceptCompletion", {"completionId": completion_id})
        await client.command("heedful.feedback", {"text": f"never commit {S['team pattern']}"})
    rows = lsp_setup.rows("SELECT prompt, prompt_token_ids FROM completions WHERE session_id = 'session-private'")
    assert [(r["prompt"], r["prompt_token_ids"]) for r in rows] == [("", "[]")]
    kinds = {r["kind"] for r in lsp_setup.rows("SELECT kind FROM events WHERE session_id = 'session-private'")}
    assert {"accepted", "correction"} <= kinds
    raw = raw_database(lsp_setup)
    assert b"session-private" in raw  # the bytes searched are the session's
    stored = {name: raw.count(value.encode()) for name, value in SECRETS.items() if value.encode() in raw}
    print(f"planted {len(SECRETS) + 1} secrets through the editor; found in the database files: {stored}")
    assert stored == {}


async def test_a_session_starting_while_its_team_file_is_broken_is_served_but_not_recorded(
    lsp_setup: ServerSetup,
) -> None:
    teams = lsp_setup.config.parent / "teams"
    teams.mkdir()
    team_file = teams / "private.toml"
    team_file.write_text(PRIVATE_TEAM.replace("false", "'no'"))  # the admin's typo
    options = {"developerId": "dev-broken", "sessionId": "session-broken", "team": "private"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready")
        client.open(URI, SOURCE)
        served = await client.inline(URI, 7, 4)
        assert served is not None and served.items  # the developer keeps working
        completion_id = served.items[0].command.arguments[0]["completionId"]
        await client.command("heedful.acceptCompletion", {"completionId": completion_id})
        (message,) = [m for m in client.messages if "privacy.store_prompts" in m]
        assert str(team_file) in message and "is not valid: expected true or false" in message
        assert "nothing of the new sessions of developer 'dev-broken', team 'private' is recorded" in message
        for table in ("completions", "documents", "events"):
            assert lsp_setup.rows(f"SELECT * FROM {table} WHERE session_id = 'session-broken'") == [], table

        team_file.write_text(PRIVATE_TEAM)  # fixed: the next request reads it and recording resumes
        again = await client.inline(URI, 7, 4)
        assert again is not None and again.items
    rows = lsp_setup.rows("SELECT id, prompt FROM completions WHERE session_id = 'session-broken'")
    assert [r["id"] for r in rows] == [again.items[0].command.arguments[0]["completionId"]]
    assert rows[0]["prompt"] == ""  # under the fixed file's store_prompts = false
    assert lsp_setup.rows("SELECT * FROM sessions WHERE id = 'session-broken'")  # who connected, no text
