"""Settings hot reload: an admin edits a team file while an editor is connected.

The change applies to the session's next request without a restart; a file that no longer validates is
reported to the editor (and the log) with its error, and the settings in force stay until it is fixed.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.client import running_client
from tests.e2e.conftest import ServerSetup

pytestmark = [pytest.mark.engine, pytest.mark.remote]

URI = "file:///w/area.py"
SOURCE = "def area(radius):\n    return "


def token_count(setup: ServerSetup, completion_id: str) -> int:
    (row,) = setup.rows('SELECT token_ids FROM candidates WHERE completion_id = ? AND "index" = 0', completion_id)
    return len(json.loads(row["token_ids"]))


async def test_a_changed_team_file_applies_to_the_next_request_and_a_broken_one_is_refused(
    lsp_setup: ServerSetup,
) -> None:
    teams = lsp_setup.config.parent / "teams"
    teams.mkdir()
    team_file = teams / "reload.toml"
    team_file.write_text("[completion]\nmax_tokens = 2\nsingle_line_max_tokens = 2\n")
    options = {"developerId": "dev-reload", "sessionId": "session-reload", "team": "reload"}
    async with running_client("vscode", lsp_setup.config, lsp_setup.log, options) as client:
        await client.wait_status("ready")
        client.open(URI, SOURCE)
        first = await client.inline(URI, 1, 11)
        assert first is not None and first.items
        first_id = first.items[0].command.arguments[0]["completionId"]

        # Broken: an out-of-range value. Reported with its file, key and value; the 2-token limit stays.
        team_file.write_text("[completion]\nmax_tokens = 2\nsingle_line_max_tokens = 2\ntemperature = 9\n")
        second = await client.inline(URI, 1, 11)
        assert second is not None and second.items
        second_id = second.items[0].command.arguments[0]["completionId"]
        refused = [m for m in client.messages if "completion.temperature = 9 is not valid" in m]
        assert len(refused) == 1 and str(team_file) in refused[0] and "previous settings stay" in refused[0]

        # Fixed, with a new value: a 50 ms budget the engine cannot meet, so the next request answers nothing.
        team_file.write_text("[completion]\ntimeout_ms = 50\n")
        assert await client.inline(URI, 1, 11) is None
        assert len([m for m in client.messages if "is not valid" in m]) == 1  # reported once, not per request
    for cid in (first_id, second_id):
        assert 1 <= token_count(lsp_setup, cid) <= 2
    log = lsp_setup.log.read_text()
    assert "settings reloaded for developer 'dev-reload', team 'reload'" in log
    assert "the engine took longer than 50 ms" in log
