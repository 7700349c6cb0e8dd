"""The show policy through the real server and the suite's real engine: a developer who turns down one kind of
suggestion stops being shown it (the server answers nothing and records that it stayed silent), keeps being
shown the kind they keep, and a new server process starts from what the store holds of them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.e2e.client import HeedfulClient, running_client
from tests.e2e.conftest import ServerSetup
from tests.e2e.test_lsp_flow import completion_id, end_of, serve_item

pytestmark = [pytest.mark.engine, pytest.mark.remote]

# Where the developer turns every suggestion down: the model's answer after the opening of a class.
REJECTED_SOURCE = "class Inventory:\n    "
REJECTED_URI = "file:///work/inventory.py"
# Where they keep every suggestion: the body of a function that reads a file.
KEPT_SOURCE = "import json\n\n\ndef load_config(path):\n    with open(path) as handle:\n        "
ROUNDS = 5  # 5 rejected and 5 kept suggestions: 10 outcomes, as many as the policy is told to need
# No training groups: a group sampled after one answer runs in the engine beside the next request, and on a
# CPU a batch of other shapes can change a greedy token (a fresh-clone run served `config` instead of
# `config_dict` at one of the kept places); alone in the engine, each place gets its one answer.
POLICY = {"show_min_outcomes": 2 * ROUNDS, "show_explore": 0.0, "show_threshold": 0.25, "group_sample_rate": 0.0}


def kept_uri(i: int) -> str:
    # Distinct documents whose prompt header (the last two parts of the path) is the same.
    return f"file:///work/kept-{i}/app/settings.py"


async def keep(client: HeedfulClient, uri: str) -> str:
    """Open `uri` with KEPT_SOURCE, take its suggestion as it is (Tab), and leave it in place."""
    client.open(uri, KEPT_SOURCE)
    line, character = KEPT_SOURCE.count("\n"), len(KEPT_SOURCE.rsplit("\n", 1)[-1])
    item = await serve_item(client, uri, line, character)
    text = str(item.insert_text)
    client.change(uri, [((line, character), (line, character), text)])
    await client.command("heedful.acceptCompletion", {"completionId": completion_id(item)})
    return text


async def turn_down(client: HeedfulClient, uri: str) -> str | None:
    """Ask at the end of REJECTED_SOURCE and turn the suggestion down (Esc); None when nothing was shown."""
    line, character = end_of((0, 0), REJECTED_SOURCE, client.encoding)
    result = await client.inline(uri, line, character)
    if result is None or not result.items:
        return None
    item = result.items[0]
    client.notify("heedful/didRejectCompletion", {"completionId": completion_id(item)})
    return str(item.insert_text)


@contextlib.asynccontextmanager
async def policy_session(setup: ServerSetup, developer: str, session: str) -> AsyncIterator[HeedfulClient]:
    """A new server process with a session of `developer`, the show policy on (POLICY), REJECTED_URI open."""
    options = {"developerId": developer, "sessionId": session}
    async with running_client("vscode", setup.config, setup.log, options) as client:
        await client.wait_status("ready")
        client.configure({"heedful": {"completion": POLICY}})
        client.open(REJECTED_URI, REJECTED_SOURCE)
        yield client
        assert await client.stop() == 0


@pytest.mark.snapshot_delays(0.5)
async def test_a_developer_who_turns_down_one_kind_of_suggestion_stops_being_shown_it(lsp_setup: ServerSetup) -> None:
    async with policy_session(lsp_setup, "dev-picky", "session-picky-1") as client:
        turned_down: set[str] = set()
        kept: set[str] = set()
        for i in range(ROUNDS):
            text = await turn_down(client, REJECTED_URI)
            assert text is not None, f"round {i}: the suggestion was held back before the policy had its outcomes"
            turned_down.add(text)
            kept.add(await keep(client, kept_uri(i)))
        assert len(turned_down) == 1 and len(kept) == 1, "greedy decoding gives one suggestion per place"
        assert turned_down != kept, f"the model wrote the same suggestion in both places: {kept}"
        (rejected_text,), (kept_text,) = turned_down, kept
        await asyncio.sleep(1.0)  # the last accept's snapshot (0.5 s) says it was kept

        # The kind turned down is held back now; the kind kept is still shown.
        assert await turn_down(client, REJECTED_URI) is None
        assert await keep(client, kept_uri(ROUNDS)) == kept_text
        # Off, the same place is shown again.
        client.configure({"heedful": {"completion": {**POLICY, "show_threshold": 0.0}}})
        assert await turn_down(client, REJECTED_URI) == rejected_text

    # A new server process starts the developer's policy from the store.
    async with policy_session(lsp_setup, "dev-picky", "session-picky-2") as client:
        assert await turn_down(client, REJECTED_URI) is None
        assert await keep(client, kept_uri(ROUNDS + 1)) == kept_text
    # Another developer at the same place is shown the suggestion: the policy is the developer's own.
    async with policy_session(lsp_setup, "dev-other", "session-other") as client:
        assert await turn_down(client, REJECTED_URI) == rejected_text

    # Each silent turn is a record with no candidate shown, and no event.
    silent = lsp_setup.rows(
        "SELECT c.id, c.session_id, k.text FROM completions c JOIN candidates k ON k.completion_id = c.id "
        "WHERE c.shown_index IS NULL ORDER BY c.created_at"
    )
    assert [(r["session_id"], r["text"].strip()) for r in silent] == [
        ("session-picky-1", rejected_text.strip()),
        ("session-picky-2", rejected_text.strip()),
    ]
    assert not lsp_setup.rows("SELECT id FROM events WHERE completion_id IN (?, ?)", *(r["id"] for r in silent))
