"""Where adapters live on disk, and what purging a scope may delete there.

Layout (``root`` is ``<data dir>/adapters`` unless the worker is told another)::

    <root>/<scope kind>/<safe scope id>/<version id>/    a published version (adapters/lifecycle.py)
    <root>/<scope kind>/<safe scope id>/.tmp-<uuid>/     a version being written, or left by a publish that died
    <root>/<scope kind>/<safe scope id>/.train-<uuid>/   a training round's output, until it is published

``<safe scope id>`` is the scope id with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_``
(at most 64 characters) followed by ``-`` and 12 hex digits of the id's sha256, so two ids never share a
folder, whatever their case or punctuation. Version ids are ``uuid4().hex``.

A scope's folder holds that scope's data and nothing else, so purging a scope removes every version,
temp and trainer folder in it, whether a row names it or not (a publish that died after its rename leaves a
complete adapter no row points to). A row's path is trusted only as far as it resolves into that folder:
a row naming anything else (another directory, a path climbing out with ``..``, a symlink leading out,
another scope's version) is refused and named, never deleted, because the database is not proof that a
path is ours.

What it must not do: follow a symlink (a link in a scope's folder is removed, its target never), delete
outside the scope's folder, or delete an entry of that folder it did not write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kernel import paths
from storage.repositories import Scope

TMP_PREFIX = ".tmp-"
TRAIN_PREFIX = ".train-"
VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def resolve_adapters_root(root: Path | None = None) -> Path:
    """``root``, else ``<data dir>/adapters``."""
    return Path(root).expanduser() if root is not None else paths.data_dir() / "adapters"


def scope_dirname(scope_id: str) -> str:
    """A file-system-safe, collision-free folder name for a scope id."""
    digest = hashlib.sha256(scope_id.encode("utf-8")).hexdigest()[:12]
    readable = _UNSAFE.sub("_", scope_id)[:64].lstrip(".") or "_"
    return f"{readable}-{digest}"


def scope_dir(root: Path, scope: Scope) -> Path:
    """``<root>/<scope kind>/<safe scope id>``."""
    return root / scope.kind.value / scope_dirname(scope.id)


def is_ours(name: str) -> bool:
    """Whether an entry of a scope's folder is one Heedful writes there (a version, temp or trainer folder)."""
    return bool(VERSION_RE.match(name)) or name.startswith((TMP_PREFIX, TRAIN_PREFIX))


def remove_empty_scope_dir(root: Path, scope: Scope) -> None:
    """Remove the scope's folder if nothing is left in it (its name carries the scope id)."""
    with contextlib.suppress(OSError):
        scope_dir(root, scope).rmdir()


@dataclass(slots=True)
class ScopeFiles:
    """What purging a scope does on disk: the entries of its folder to delete, and the rows' paths refused."""

    folder: Path
    doomed: list[Path] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def plan_scope_purge(root: Path, scope: Scope, row_paths: Iterable[str]) -> ScopeFiles:
    """Decide, without deleting anything, what purging ``scope`` removes under ``root``.

    Every path the scope's rows name is resolved (symlinks and ``..`` included) and must be a version
    folder directly in the scope's own folder; any other is refused with a message naming it, where it
    leads, and the fix. The scope's folder must itself resolve to where it belongs under the root.
    """
    folder = scope_dir(root, scope)
    expected = Path(os.path.realpath(root)) / scope.kind.value / scope_dirname(scope.id)
    plan = ScopeFiles(folder)
    for path in row_paths:
        real = Path(os.path.realpath(path))
        if real.parent == expected and VERSION_RE.match(real.name):
            continue  # in the scope's folder: removed with it below (if it is still there)
        plan.refused.append(
            f"adapter folder {path} of {scope} resolves to {real}, which is not a version folder in {folder}: "
            f"left in place, because Heedful deletes only what it wrote under the adapters root {root}; if it "
            "holds this developer's adapter, delete it by hand"
        )
    if os.path.realpath(folder) != str(expected):
        plan.refused.append(
            f"{folder} leads to {os.path.realpath(folder)} (a symlink), outside the adapters root {root}: left in "
            "place; remove the link and the folder it leads to by hand"
        )
        return plan
    if folder.is_dir():
        plan.doomed = sorted(entry for entry in folder.iterdir() if is_ours(entry.name))
    return plan


def remove_scope_files(plan: ScopeFiles, root: Path, scope: Scope) -> tuple[list[Path], list[str]]:
    """Delete what :func:`plan_scope_purge` decided; return (removed, errors). Goes on past errors."""
    removed: list[Path] = []
    errors: list[str] = []
    for path in plan.doomed:
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink()  # a link is removed, never followed
            else:
                shutil.rmtree(path)
        except FileNotFoundError:
            continue  # removed meanwhile (a publish cleaning up after itself)
        except OSError as exc:
            errors.append(f"cannot delete {path}: {exc.strerror or exc}; delete it by hand")
            continue
        removed.append(path)
    remove_empty_scope_dir(root, scope)
    return removed, errors
