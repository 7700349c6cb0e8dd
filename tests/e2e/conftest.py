"""Fixtures for end-to-end tests: a settings file pointing `heedful serve` at the session's vLLM server."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The Python file the editor tests open. It ends inside the function, on an indented line without a newline:
# the cursor goes there (row 6, column 4) and the model continues the function.
EDITOR_SOURCE = (
    '"""Small helpers for the shop\'s order files."""\n'
    "import os\n"
    "\n"
    "\n"
    "def read_lines(path):\n"
    '    """Return the lines of a text file without their line endings."""\n'
    "    "
)


@dataclass(frozen=True)
class ServerSetup:
    config: Path
    db: Path
    log: Path

    def rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            return list(conn.execute(sql, args))


SNAPSHOT_DELAYS_S = (1.0, 2.0)  # the suite's edit snapshots: short, so tests wait little for them


def write_config(
    tmp_path: Path,
    model: Path,
    engine_url: str,
    extra: str = "",
    snapshot_delays: tuple[float, ...] = SNAPSHOT_DELAYS_S,
    training: str = "in_server = false",
) -> ServerSetup:
    """A settings file for `heedful serve` on the suite's engine. `training` is the `[training]` table's
    body: no in-server training worker unless a test wants one (those that train run `heedful train`)."""
    db = tmp_path / "heedful.db"
    config = tmp_path / "heedful.toml"
    config.write_text(
        f"""
[model]
path = "{model}"

[engine]
mode = "remote"
url = "{engine_url}"
request_timeout_s = 120

[completion]
timeout_ms = 120000
temperature = 0.0
group_sample_rate = 1.0
max_tokens = 24
# The suite's simulated developers turn down or rewrite most suggestions on purpose, and then expect to be
# served: off here, the show policy is on in its own test (tests/e2e/test_show_policy.py).
show_threshold = 0.0

[feedback]
edit_snapshot_delays_s = [{", ".join(str(d) for d in snapshot_delays)}]

[training]
{training}

[database]
url = "sqlite+aiosqlite:///{db}"
{extra}
"""
    )
    return ServerSetup(config, db, tmp_path / "server.log")


@pytest.fixture
def lsp_setup(
    request: pytest.FixtureRequest, tmp_path: Path, small_model: Path, vllm_server: str
) -> Iterator[ServerSetup]:
    # `@pytest.mark.snapshot_delays(a, b)` on a test: the edit snapshots' delays its server is given.
    marker = request.node.get_closest_marker("snapshot_delays")
    delays = marker.args if marker else SNAPSHOT_DELAYS_S
    setup = write_config(tmp_path, small_model, vllm_server, snapshot_delays=delays)
    yield setup
    if setup.log.exists():
        # Shown by pytest only when the test failed: the server's own account of what happened.
        print(setup.log.read_text(errors="replace")[-6000:])
