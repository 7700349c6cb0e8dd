"""What the admin's commands read: the teams of a settings directory and the store, and the audit log.

`heedful config check DIR`, `heedful team list|show` and `heedful audit` print what these functions
return. Nothing here writes settings or rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kernel.settings import SettingsError, check_directory_team_files, read_settings_file, resolve
from storage.models import as_utc

GLOBAL_FILE_NAME = "heedful.toml"


class AdminError(ValueError):
    """Bad input to an admin command; the message names the value and the fix."""


def global_file_of(path: Path) -> Path:
    """The global settings file named by `path`: the file itself, or `<dir>/heedful.toml` for a directory."""
    if path.is_dir():
        candidate = path / GLOBAL_FILE_NAME
        if not candidate.is_file():
            raise AdminError(
                f"{path} is a directory without {GLOBAL_FILE_NAME}: put the global settings there, or name the "
                "global settings file itself"
            )
        return candidate
    return path


@dataclass(frozen=True, slots=True)
class FileCheck:
    path: Path
    error: str | None


def check_settings_directory(global_file: Path) -> list[FileCheck]:
    """Validate the global file and every team file beside it: one result per file, global first."""
    try:
        resolve(global_file)
    except SettingsError as exc:
        return [FileCheck(global_file, str(exc))]
    checks = [FileCheck(global_file, None)]
    checks += [FileCheck(path, str(err) if err else None) for path, err in check_directory_team_files(global_file)]
    return checks


def team_files(global_file: Path | None) -> dict[str, Path]:
    """Team name -> its settings file, for every `<teams.dir>/*.toml` of the global file."""
    if global_file is None:
        return {}
    teams_dir = read_settings_file(global_file, is_global=True).teams_dir
    if teams_dir is None or not teams_dir.is_dir():
        return {}
    return {path.stem: path for path in sorted(teams_dir.glob("*.toml"))}


def team_overrides(global_file: Path, team: str) -> dict[str, Any]:
    """The settings a team's file changes, `section.key` -> value (developer tables left out)."""
    resolved = resolve(global_file, team=team)
    team_path = str(team_files(global_file).get(team, ""))
    values = resolved.settings.to_dict()
    return {
        key: values[key.split(".")[0]][key.split(".")[1]]
        for key, source in sorted(resolved.sources.items())
        if source == team_path
    }


_AGE = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO date or date-time (UTC unless it says otherwise), or an age like 30m, 24h, 7d, 2w."""
    now = now or datetime.now(UTC)
    age = _AGE.match(text.strip().lower())
    if age:
        return now - timedelta(**{_UNITS[age.group(2)]: int(age.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise AdminError(
            f"--since {text!r} is not a time: use a date (2026-11-01), a date and time (2026-11-01T12:00) or an "
            "age such as 30m, 24h, 7d, 2w"
        ) from None
    return as_utc(when)
