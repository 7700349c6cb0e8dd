"""The admin's commands on a real settings directory and a real store (SQLite file and PostgreSQL):
`heedful config check DIR`, `heedful team list|show`, `heedful audit [--since]`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernel.settings import Settings
from server.stores import open_store
from storage.adapter_files import scope_dir
from storage.repositories import AdapterRepository, Scope
from storage.store import SessionStart
from tests.procs import run_heedful

heedful = run_heedful


def settings_dir(tmp_path: Path, database_url: str) -> Path:
    root = tmp_path / "settings"
    (root / "teams").mkdir(parents=True)
    (root / "heedful.toml").write_text(f'[database]\nurl = "{database_url}"\n\n[completion]\nmax_tokens = 48\n')
    (root / "teams" / "backend.toml").write_text(
        '[completion]\nmax_tokens = 32\ntemperature = 0.1\n\n[developers."alice".completion]\nmax_tokens = 8\n'
    )
    (root / "teams" / "frontend.toml").write_text("[feedback]\nsurvival_rewrite_threshold = 0.7\n")
    return root


def test_config_check_on_a_settings_directory_reports_every_file(tmp_path: Path) -> None:
    root = settings_dir(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    config = root / "heedful.toml"
    result = heedful(config, "config", "check", str(root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"ok: {config}",
        f"ok: {root / 'teams' / 'backend.toml'}",
        f"ok: {root / 'teams' / 'frontend.toml'}",
    ]
    assert "all 3 settings files" in result.stderr

    (root / "teams" / "mobile.toml").write_text("[completion]\nmax_tokens = -1\n")
    (root / "teams" / "data.toml").write_text("[completion\nmax_tokens = 1\n")
    result = heedful(config, "config", "check", str(root))
    assert result.returncode == 1
    assert f"invalid: {root / 'teams' / 'mobile.toml'}: completion.max_tokens = -1 is not valid" in result.stdout
    assert f"invalid: {root / 'teams' / 'data.toml'}: (syntax)" in result.stdout
    assert f"ok: {root / 'teams' / 'backend.toml'}" in result.stdout
    assert "2 of 5 settings files" in result.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    result = heedful(config, "config", "check", str(empty))
    assert result.returncode == 2 and f"{empty} is a directory without heedful.toml" in result.stderr


async def test_team_list_show_and_the_audit_log(tmp_path: Path, database_url: str) -> None:
    root = settings_dir(tmp_path, database_url)
    config = root / "heedful.toml"
    settings = Settings()
    settings.database.url = database_url
    store = await open_store(settings)
    try:
        for session, developer, team in (("s1", "alice", "backend"), ("s2", "bob", "backend"), ("s3", "carol", "ops")):
            await store.start_session(SessionStart(session_id=session, developer_id=developer, team_id=team))
        async with store.unit() as s:
            adapters = AdapterRepository(s)
            row = await adapters.add_candidate(Scope.team("backend"), path="/nowhere/v1", step=50, kl=0.4, metrics={})
            await adapters.activate(Scope.team("backend"), row.id)
            version = row.id
        await store.purge_developer("carol", actor="cli:admin", reason="left the company")
    finally:
        await store.close()

    result = heedful(config, "team", "list", "--json")
    assert result.returncode == 0, result.stderr
    teams = {t["team"]: t for t in json.loads(result.stdout)}
    assert set(teams) == {"backend", "frontend", "ops"}
    assert teams["backend"]["developers"] == 2 and teams["backend"]["active_adapter"] == version
    assert teams["backend"]["settings_file"] == str(root / "teams" / "backend.toml")
    assert teams["frontend"]["developers"] == 0 and teams["ops"]["settings_file"] is None
    text = heedful(config, "team", "list").stdout
    assert "backend" in text and version in text and "- (global settings only)" in text

    result = heedful(config, "team", "show", "backend", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["overrides"] == {"completion.max_tokens": 32, "completion.temperature": 0.1}
    assert shown["developers"] == ["alice", "bob"]
    assert [(a["id"], a["status"], a["step"]) for a in shown["adapters"]] == [(version, "active", 50)]
    text = heedful(config, "team", "show", "backend").stdout
    assert "completion.max_tokens = 32" in text and "developers (2): alice, bob" in text

    result = heedful(config, "team", "show", "nobody")
    assert result.returncode == 1
    assert (
        "team 'nobody' has no settings file" in result.stderr and "known teams: backend, frontend, ops" in result.stderr
    )

    result = heedful(config, "audit", "--json")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    purge = [e for e in entries if e["action"] == "purge"]
    assert len(purge) == 1 and purge[0]["actor"] == "cli:admin" and purge[0]["reason"] == "left the company"
    assert purge[0]["detail"]["developer"] == "carol"
    assert "left the company" in heedful(config, "audit", "--since", "1h").stdout
    later = heedful(config, "audit", "--since", "2999-01-01")
    assert later.returncode == 0 and later.stdout == "" and "no audit entries since 2999-01-01" in later.stderr
    bad = heedful(config, "audit", "--since", "last tuesday")
    assert bad.returncode == 2 and "--since 'last tuesday' is not a time" in bad.stderr


@pytest.mark.parametrize("since", ["7d", "2026-01-02", "2026-01-02T03:04:05+02:00"])
def test_since_accepts_ages_dates_and_times(since: str) -> None:
    from datetime import UTC, datetime

    from server.admin import parse_since

    now = datetime(2026, 1, 10, tzinfo=UTC)
    got = parse_since(since, now)
    assert got.tzinfo is not None and got < now


async def test_purge_names_the_paths_it_refuses_and_deletes_the_developers_folder(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`heedful purge` on a store whose row for dave points outside the adapters root: the folder is left
    in place and named on stdout (`refused`) and stderr; dave's folder under the root is gone."""
    data = tmp_path / "data"
    monkeypatch.setenv("HEEDFUL_DATA_DIR", str(data))  # the CLI child finds the adapters root there
    root = data / "adapters"
    mine = scope_dir(root, Scope.developer("dave")) / ("c" * 32)
    mine.mkdir(parents=True)
    (mine / "adapter_model.safetensors").write_bytes(b"dave's weights")
    outside = tmp_path / "shared" / "keep-me"
    outside.mkdir(parents=True)
    (outside / "notes.txt").write_text("someone else's")
    config = settings_dir(tmp_path, database_url) / "heedful.toml"
    settings = Settings()
    settings.database.url = database_url
    store = await open_store(settings)
    try:
        await store.start_session(SessionStart(session_id="s1", developer_id="dave", team_id=None))
        async with store.unit() as s:
            adapters = AdapterRepository(s)
            for path in (mine, outside):
                await adapters.add_candidate(Scope.developer("dave"), path=str(path), step=1, kl=0.0, metrics={})
    finally:
        await store.close()

    result = heedful(config, "purge", "--developer", "dave", "--reason", "left")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["adapter_dirs_removed"] == [str(mine)] and not mine.parent.exists()
    (refused,) = out["refused"]
    assert refused.startswith(f"adapter folder {outside} of developer:dave") and "left in place" in refused
    assert str(outside) in result.stderr
    assert (outside / "notes.txt").read_text() == "someone else's"
