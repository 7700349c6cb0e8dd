"""The session library: every recording in `tests/sessions/` replays cleanly against this build.

The recordings come from the scripted editor sessions in `tests/e2e/sessions.py` and the Node client's
accept flow; a change that alters what the server answers to an editor shows up here as a diff naming
the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.client import ROOT
from tests.e2e.conftest import write_config
from tests.e2e.sessions import NODE_SESSION, SESSIONS
from tests.procs import run_heedful

pytestmark = [pytest.mark.engine, pytest.mark.remote]

LIBRARY = ROOT / "tests" / "sessions"
RECORDINGS = sorted(LIBRARY.glob("*.jsonl"))


def test_the_library_holds_a_recording_of_every_scripted_session() -> None:
    assert {p.stem for p in RECORDINGS} >= {*SESSIONS, NODE_SESSION}


@pytest.mark.parametrize("recording", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_recorded_session_replays(recording: Path, tmp_path: Path, small_model: Path, vllm_server: str) -> None:
    config = write_config(tmp_path, small_model, vllm_server).config
    result = run_heedful(config, "replay", str(recording), "--no-timing")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: " in result.stdout


def test_a_library_recording_replays_with_the_settings_it_was_made_with(
    tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    """The server replaying it has the default edit snapshot delays (30 s, 120 s); the recording was made
    with 1 s and 2 s, which its header carries and the replay gives the session."""
    config = write_config(tmp_path, small_model, vllm_server, snapshot_delays=(30.0, 120.0)).config
    result = run_heedful(config, "replay", str(LIBRARY / "neovim-partial-accept.jsonl"), "--no-timing")
    assert result.returncode == 0, result.stdout + result.stderr
