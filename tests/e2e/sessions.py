"""Scripted editor sessions, played by the end-to-end client, that make up the session library.

Each session is what an editor of one flavour does in a few seconds of editing. The replay tests record
them with `heedful serve --record`; `tests/sessions/*.jsonl` holds recordings of them and of the Node
client's accept flow (`tests/e2e/node/accept_flow.mjs`), made with

    HEEDFUL_TEST_VLLM_URL=http://127.0.0.1:8000 python -m tests.e2e.sessions tests/sessions

against a `vllm serve` of the small model, and `make test` replays every file there.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsprotocol import types

from tests.e2e.client import HeedfulClient, running_client

# A secret the developer pastes into a correction: recordings must hold it redacted. (A secret in a
# document would reach a replayed server redacted, change its prompt, and so its completions.)
SECRET = "AKIAIOSFODNN7EXAMPLE"
CORRECTION = f"Always add type hints; the deploy key {SECRET} goes in the vault"
EDITING_SOURCE = '''"""Order file helpers."""
import os


def read_lines(path):
    """Return the lines of a text file without their line endings."""
    '''


def _completion_id(item: Any) -> str:
    return str(item.command.arguments[0]["completionId"])


async def _inline_item(client: HeedfulClient, uri: str, line: int, character: int) -> types.InlineCompletionItem:
    result = await client.inline(uri, line, character)
    assert result is not None and result.items, "the server answered no completion"
    return result.items[0]


async def editing_session(client: HeedfulClient) -> None:
    """VS Code: a shown and accepted suggestion, a rejected one, and an explicit correction."""
    await client.wait_status("ready")
    uri = "file:///work/shop/orders.py"
    client.open(uri, EDITING_SOURCE)
    item = await _inline_item(client, uri, 5, 4)
    client.notify("textDocument/didShowCompletion", {"item": client.lc.protocol._converter.unstructure(item)})
    text = str(item.insert_text)
    client.change(uri, [((6, 4), (6, 4), text)])
    await client.command("heedful.acceptCompletion", {"completionId": _completion_id(item)})
    client.change(uri, [((6, 4), (6, 4), "\n\n\ndef count_words(text):\n    ")])
    second = await _inline_item(client, uri, 10, 4)
    client.notify("heedful/didRejectCompletion", {"completionId": _completion_id(second)})
    await client.command("heedful.feedback", {"text": CORRECTION})


async def completion_items_session(client: HeedfulClient) -> str:
    """A client without inline completion: a completion item, accepted; its completion id."""
    await client.wait_status("ready")
    uri = "file:///work/shop/stats.py"
    client.open(uri, "def mean(values):\n    total = sum(")
    result = await client.completion(uri, 1, 16)
    assert result is not None and result.items
    item = result.items[0]
    assert item.text_edit is not None and item.text_edit.new_text.strip()
    assert item.command is not None and item.command.command == "heedful.acceptCompletion"
    cid = str(item.command.arguments[0]["completionId"])
    client.change(uri, [((1, 16), (1, 16), item.text_edit.new_text)])
    answer = await client.command("heedful.acceptCompletion", {"completionId": cid})
    assert answer["recorded"] is True
    return cid


async def partial_accept_session(client: HeedfulClient) -> None:
    """Neovim (UTF-8 positions): a suggestion after non-ASCII text, its first characters accepted."""
    await client.wait_status("ready")
    uri = "file:///work/café/menu.py"
    client.open(uri, '"""Menu ☕."""\n\n\ndef price_of(item):\n    ')
    item = await _inline_item(client, uri, 4, 4)
    partial = str(item.insert_text)[:3]
    client.change(uri, [((4, 4), (4, 4), partial)])
    client.notify(
        "textDocument/didPartiallyAcceptCompletion",
        {
            "item": client.lc.protocol._converter.unstructure(item),
            "acceptedLength": len(partial.encode("utf-16-le")) // 2,
        },
    )
    await client.command("heedful.feedback", {"text": "use Decimal for prices"})


@dataclass(frozen=True, slots=True)
class ScriptedSession:
    flavour: str
    options: dict[str, Any]
    play: Callable[[HeedfulClient], Awaitable[object]]


SESSIONS: dict[str, ScriptedSession] = {
    "vscode-accept-reject-correct": ScriptedSession(
        "vscode", {"developerId": "qa-vscode", "sessionId": "qa-vscode-1", "team": "backend"}, editing_session
    ),
    "vim-completion-items": ScriptedSession(
        "no-inline", {"developerId": "qa-vim", "sessionId": "qa-vim-1"}, completion_items_session
    ),
    "neovim-partial-accept": ScriptedSession(
        "neovim", {"developerId": "qa-neovim", "sessionId": "qa-neovim-1"}, partial_accept_session
    ),
}


async def record_session(name: str, config: Path, log: Path, out: Path) -> None:
    """Play one scripted session against `heedful serve --record OUT`."""
    session = SESSIONS[name]
    async with running_client(
        session.flavour, config, log, session.options, args=["serve", "--record", str(out)]
    ) as client:
        await session.play(client)


NODE_SESSION = "node-vscode-languageserver-protocol-accept"


async def _record_library(target: Path) -> None:
    from tests.conftest import SMALL_MODEL, prepared
    from tests.e2e.conftest import write_config
    from tests.e2e.test_node_client import run_node_client

    url = os.environ.get("HEEDFUL_TEST_VLLM_URL")
    if not url:
        sys.exit("set HEEDFUL_TEST_VLLM_URL to a `vllm serve` of the small model")
    target.mkdir(parents=True, exist_ok=True)
    for name in SESSIONS:
        with tempfile.TemporaryDirectory() as tmp:
            setup = write_config(Path(tmp), prepared(SMALL_MODEL), url)
            await record_session(name, setup.config, setup.log, target / f"{name}.jsonl")
        print(f"recorded {target / f'{name}.jsonl'}")
    # The Node client (the libraries VS Code's language client is built on) plays its accept flow.
    out = target / f"{NODE_SESSION}.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        setup = write_config(Path(tmp), prepared(SMALL_MODEL), url)
        run_node_client(setup, ("--record", str(out)))
    print(f"recorded {out}")


if __name__ == "__main__":
    asyncio.run(_record_library(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/sessions")))
