"""`heedful serve` driven by a second, independent LSP client: Node with Microsoft's
vscode-languageserver-protocol and vscode-jsonrpc, the libraries VS Code's language client is built on.

tests/e2e/node/accept_flow.mjs plays the accept flow (initialize, wait for ready, inline completion,
didShowCompletion, the insertion, the accept command, a correction, shutdown/exit) against a server
started on the session's real vLLM server and a SQLite file; this test then reads what the store recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kernel import paths
from tests.e2e.conftest import ServerSetup

pytestmark = [pytest.mark.engine, pytest.mark.remote]

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = Path(__file__).resolve().parent / "node"
CLIENT_NAME = "node-vscode-languageserver-protocol"


def node_modules_dir() -> Path:
    """Where `make setup` installs the Node client's packages, outside the clone.

    scripts/setup.sh runs `npm ci` into <cache dir>/node/<first 16 hex of sha256(package-lock.json)>/
    node_modules, the cache dir being `HEEDFUL_CACHE_DIR`, else `$XDG_CACHE_HOME/heedful`
    (`kernel.paths.cache_dir`); keep the two in step. A changed lock file is a new directory.
    """
    digest = hashlib.sha256((NODE_CLIENT / "package-lock.json").read_bytes()).hexdigest()[:16]
    return paths.cache_dir() / "node" / digest / "node_modules"


def node_and_modules() -> tuple[str, Path]:
    """`node` and the installed packages; missing ones fail the test (`make test` installs them)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: run `make setup` (it installs Node.js and the client's npm packages)")
    modules = node_modules_dir()
    missing = [p for p in ("vscode-languageserver-protocol", "vscode-jsonrpc") if not (modules / p).is_dir()]
    if missing:
        pytest.fail(f"npm packages {missing} are not installed in {modules}: run `make setup`")
    return node, modules


def run_node_client(setup: ServerSetup, serve_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Play accept_flow.mjs against `heedful serve SERVE_ARGS`; the JSON line the client prints."""
    node, modules = node_and_modules()
    server = [sys.executable, "-m", "server.cli", "--config", str(setup.config), "serve", *serve_args]
    env = dict(os.environ, HEEDFUL_NODE_MODULES=str(modules), HEEDFUL_SERVER_STDERR=str(setup.log))
    proc = subprocess.run(
        [node, str(NODE_CLIENT / "accept_flow.mjs"), *server],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"the Node client failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {proc.stdout!r}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


def test_node_client_accepts_a_completion_and_sends_a_correction(lsp_setup: ServerSetup) -> None:
    result = run_node_client(lsp_setup)
    cid = result["completionId"]
    insert_text = result["insertText"]
    assert isinstance(cid, str) and isinstance(insert_text, str) and insert_text.strip()
    assert result["accept"]["recorded"] is True and result["accept"]["completionId"] == cid
    assert isinstance(result["accept"]["eventId"], int)
    assert result["feedback"]["recorded"] is True and result["feedback"]["completionId"] == cid
    assert result["exitCode"] == 0

    (session,) = lsp_setup.rows("SELECT * FROM sessions WHERE id = ?", "session-node")
    assert session["developer_id"] == "dev-node" and session["team_id"] == "node"
    assert session["client_name"] == CLIENT_NAME and session["client_version"] == result["clientVersion"]
    assert session["ended_at"] is not None

    (completion,) = lsp_setup.rows("SELECT * FROM completions WHERE id = ?", cid)
    assert completion["session_id"] == "session-node" and completion["uri"] == "file:///work/shop/orders_node.py"
    assert completion["prompt"].endswith('without their line endings."""\n')

    by_kind: dict[str, list[Any]] = {}
    for e in lsp_setup.rows("SELECT * FROM events ORDER BY id"):
        assert e["session_id"] == "session-node"
        by_kind.setdefault(e["kind"], []).append(e)
    (shown,) = by_kind["shown"]
    assert shown["completion_id"] == cid
    (accepted,) = by_kind["accepted"]
    assert accepted["completion_id"] == cid and accepted["id"] == result["accept"]["eventId"]
    assert accepted["accepted_length"] == len(insert_text)
    (correction,) = by_kind["correction"]
    assert correction["completion_id"] == cid and correction["text"] == "Always add type hints"
    assert correction["id"] == result["feedback"]["eventId"]
    # The client's incremental didChange (UTF-16 positions) put the text where the server follows it.
    snapshots = by_kind["edit_snapshot"]
    assert sorted(e["delay_s"] for e in snapshots) == [1.0, 2.0]
    assert {(e["kept_text"], e["survival_ratio"]) for e in snapshots} == {(insert_text, 1.0)}

    # VS Code's language client only sends textDocument/inlineCompletion to a server that advertises it
    # (`true` or an options object, even `{}`).
    assert result["inlineCompletionProvider"] not in (None, False)
