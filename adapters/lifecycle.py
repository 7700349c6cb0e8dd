"""The adapter lifecycle, one entry point per step: :func:`publish_adapter` (a versioned folder written
crash-safely with its manifest, then activated, or rejected when its gates failed, in one transaction, and
the scope's old versions pruned), :func:`verify_published` (what serving runs before it routes to or loads a
version, through :class:`PublishedFolders`), :func:`rollback_scope` (back to the previous or a named
version), :func:`clean_partial` (what a crash left behind); each writes its audit entry. The state machine of
the version rows (active, retired, rejected, rolled back) is `storage.repositories.AdapterRepository`'s.

Layout (``root`` is ``<data dir>/adapters`` unless the caller names another; see
:mod:`storage.adapter_files`, which also says what a purge deletes there)::

    <root>/<scope kind>/<safe scope id>/<version id>/     one published version, never changed afterwards
        adapter_config.json, adapter_model.safetensors    the peft adapter (every top-level file of the
        ...                                               trained folder is copied)
        heedful-adapter.json                              the manifest, written last: version id, scope,
                                                          step, KL, metrics, gate verdict, created time,
                                                          sha256 and size of every other file
    <root>/<scope kind>/<safe scope id>/.tmp-<uuid>/      a version being written (or left by a crash)
    <root>/<scope kind>/<safe scope id>/.train-<uuid>/    a training round's output (:func:`trainer_workdir`)

:func:`publish_adapter` copies the trained folder into ``.tmp-<uuid>``, fsyncs every file, writes the
manifest last, fsyncs it and the folder, renames the folder to ``<version id>`` (atomic on one file system)
and fsyncs the scope folder. Only then, in one transaction, it adds the version row, and either activates it
(the previous active version is retired) with a ``publish`` audit entry, or, when the gate failed, marks it
``rejected`` with the gate's reasons and a ``reject`` audit entry: the previous active version stays
active. After that commit it keeps the newest ``KEEP_ADAPTERS`` (10) versions of the scope and deletes the
folders of the others (never the active one), with a ``prune`` audit entry.

Rejected adapters keep their files, for inspection (``heedful adapters list`` shows the reason); they count
toward the 10 kept versions like any other, so they age out the same way.

A purge wins over a round already running: the round takes a :func:`purge_mark` when it starts, and the
transaction that would record its version first takes the purge lock and refuses (:class:`ScopePurgedError`,
the version folder removed) if a purge that concerns the scope committed since; see
:class:`storage.repositories.PurgeRepository`.

A crash at any point leaves either the old state (no row; a ``.tmp-*`` folder or a complete but
unreferenced version folder on disk) or the new one (row committed). :func:`clean_partial` removes the
leftovers and never touches a folder a version row points to. :func:`verify_published` is what the server
runs before routing to or loading a version (through :class:`PublishedFolders`, once per folder state):
manifest present, checksums match, a valid LoRA folder; so a half-written or altered adapter is never served.

What it must not do: train, judge or gate (the caller passes the gates' verdict in, a :class:`GateVerdict`),
load adapters into an engine, write anywhere but under ``root``, delete a folder a version row points
to, or change a published version folder in place.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from kernel.files import CHUNK, fsync_dir, sha256_file
from server.engine.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir
from server.engine.base import AdapterError
from storage.adapter_files import (
    TMP_PREFIX,
    TRAIN_PREFIX,
    VERSION_RE,
    remove_empty_scope_dir,
    resolve_adapters_root,
    scope_dir,
    scope_dirname,
)
from storage.db import StoreError
from storage.models import AdapterStatus, ScopeKind
from storage.repositories import (
    KEEP_ADAPTERS,
    AdapterRepository,
    AuditRepository,
    PurgeMark,
    PurgeRepository,
    Scope,
)

if TYPE_CHECKING:
    from storage.store import RolloutStore

__all__ = [
    "DEFAULT_GRACE_S",
    "MANIFEST",
    "CorruptAdapterError",
    "PublishError",
    "PublishResult",
    "PublishStage",
    "PublishedFolders",
    "PurgeMark",
    "RollbackResult",
    "ScopePurgedError",
    "clean_partial",
    "publish_adapter",
    "purge_mark",
    "read_manifest",
    "resolve_adapters_root",
    "rollback_scope",
    "scope_dir",
    "scope_dirname",
    "trainer_workdir",
    "verify_published",
]

log = logging.getLogger("heedful.publish")

MANIFEST = "heedful-adapter.json"
MANIFEST_FORMAT = 1
# How old a `.tmp-*` folder or a complete but unreferenced version folder must be before clean_partial
# removes it: another worker sharing the adapter folder may be between its rename and its commit.
DEFAULT_GRACE_S = 600.0

# Points inside publish_adapter where `on_stage` is called (tests kill the process there):
# "partial": half of the adapter's bytes are in the temp folder; "before_rename": every file and the
# manifest are written and fsynced; "after_rename": the version folder exists, its row is not committed;
# "committed": the row is committed, old versions are not pruned yet.
PublishStage = Literal["partial", "before_rename", "after_rename", "committed"]
StageHook = Callable[[PublishStage], None]


class GateVerdict(Protocol):
    """What publishing reads of the gates' verdict on a candidate (`personalization.gates.GateResult`)."""

    @property
    def passed(self) -> bool: ...

    @property
    def reasons(self) -> list[str]: ...

    @property
    def metrics(self) -> Mapping[str, Any]: ...


class PublishError(RuntimeError):
    """An adapter could not be published; the active adapter is unchanged. The message says why and the fix."""


class ScopePurgedError(PublishError):
    """A purge that concerns the scope committed after its round started: the adapter is not published."""


class CorruptAdapterError(AdapterError):
    """A published adapter folder is incomplete or does not match its manifest: it must not be served."""


@dataclass(slots=True)
class PublishResult:
    """What :func:`publish_adapter` did."""

    version_id: str
    path: Path
    status: AdapterStatus  # ACTIVE, or REJECTED when the gate failed
    previous_active: str | None  # the version that was active before (retired if this one became active)
    reasons: list[str] = field(default_factory=list)  # the gate's reasons when rejected
    pruned: list[Path] = field(default_factory=list)  # folders of versions pruned beyond the newest 10
    prune_errors: list[str] = field(default_factory=list)  # pruning problems (the publish itself succeeded)


# --------------------------------------------------------------------------------------------------
# Paths


def trainer_workdir(root: Path, scope: Scope) -> Path:
    """A new folder (not created yet) for a training round's output: in the scope's folder, so it is on
    the adapters' file system (publishing copies from it) and a purge of the scope finds it."""
    return scope_dir(root, scope) / f"{TRAIN_PREFIX}{uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------------
# Files


def _json_safe(value: Any, where: str) -> Any:
    """JSON that PostgreSQL accepts: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise PublishError(f"{where} has the key {k!r}: metric names must be strings")
            out[k] = _json_safe(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    try:
        as_float = float(value)  # numpy and torch scalars
    except (TypeError, ValueError):
        raise PublishError(
            f"{where} = {value!r} ({type(value).__name__}) cannot be stored: use numbers, strings, lists or dicts"
        ) from None
    return _json_safe(as_float, where)


def _source_files(source: Path) -> list[Path]:
    try:
        check_adapter_dir(source)
    except AdapterError as exc:
        raise PublishError(f"the trained adapter cannot be published: {exc}") from None
    files: list[Path] = []
    for entry in sorted(source.iterdir()):
        if entry.name == MANIFEST:
            continue  # re-publishing a published folder: a new manifest is written
        if entry.is_dir():
            raise PublishError(
                f"{source} contains the folder {entry.name!r}: publish one adapter folder as written by peft "
                "save_pretrained of a single adapter (files only)"
            )
        if entry.is_file():
            files.append(entry)
    return files


def _write_version(
    source: Path, parent: Path, version_id: str, manifest: dict[str, Any], on_stage: StageHook | None
) -> Path:
    """Write the version folder (temp folder, fsync, manifest last, rename); return its final path."""
    files = _source_files(source)
    total = sum(f.stat().st_size for f in files)
    half = total // 2
    final = parent / version_id
    tmp = parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    created: list[Path] = []
    try:
        # Create the scope folder and make its (new) entries durable.
        for d in (parent.parent.parent, parent.parent, parent):
            if not d.exists():
                d.mkdir(parents=True, exist_ok=True)
                created.append(d)
        for d in created:
            fsync_dir(d.parent)
        tmp.mkdir()
        written = 0
        fired = False
        entries: dict[str, dict[str, Any]] = {}
        for src in files:
            h = hashlib.sha256()
            size = 0
            with src.open("rb") as fin, (tmp / src.name).open("xb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    if on_stage is not None and not fired and written + len(chunk) >= half:
                        cut = max(half - written, 0)
                        fout.write(chunk[:cut])
                        fout.flush()
                        fired = True
                        on_stage("partial")
                        fout.write(chunk[cut:])
                    else:
                        fout.write(chunk)
                    written += len(chunk)
                    size += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            entries[src.name] = {"sha256": h.hexdigest(), "size": size}
        check_adapter_dir(tmp)  # what was written is a loadable folder
        manifest = {**manifest, "files": entries}
        data = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
        with (tmp / MANIFEST).open("xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if on_stage is not None:
            on_stage("before_rename")
        os.rename(tmp, final)
        fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise PublishError(
                    f"no space left on the device while writing adapter version {version_id} under {parent}: "
                    "free disk space (or move the data dir) and train again; the active adapter is unchanged"
                ) from exc
            raise PublishError(
                f"cannot write adapter version {version_id} under {parent}: {exc.strerror or exc}; fix the "
                "folder's permissions or free space and train again; the active adapter is unchanged"
            ) from exc
        if isinstance(exc, AdapterError):
            raise PublishError(f"the copied adapter is not valid ({exc}); the active adapter is unchanged") from exc
        raise
    return final


# --------------------------------------------------------------------------------------------------
# Publish


async def publish_adapter(
    store: RolloutStore,
    scope: Scope,
    source_dir: Path,
    *,
    step: int,
    kl: float,
    metrics: Mapping[str, Any],
    adapters_root: Path | None = None,
    parent_id: str | None = None,
    gate: GateVerdict | None,
    actor: str = "trainer",
    keep: int = KEEP_ADAPTERS,
    on_stage: StageHook | None = None,
    purge_mark: PurgeMark | None = None,
) -> PublishResult:
    """Publish the trained adapter in ``source_dir`` as a new version of ``scope``.

    ``gate`` is the verdict of :func:`personalization.gates.check_gates`: passed -> the version becomes the
    scope's active adapter (the previous one is retired); failed -> it is recorded ``rejected`` with the
    reasons and the previous active version stays. ``gate=None`` means no gate was run (an adapter vouched
    for by an admin): it is activated and the audit entry says so. ``parent_id`` names the version training
    started from, if any. ``on_stage`` is called at each :data:`PublishStage` (crash tests use it).
    ``purge_mark`` is the :func:`purge_mark` the training round took when it started (taken here when
    None): if a purge that concerns ``scope`` committed since, :class:`ScopePurgedError` is raised and
    nothing of the version stays, on disk or in the database.

    Raises :class:`PublishError` (nothing recorded, active adapter unchanged) when the files cannot be
    written or the row cannot be committed. Pruning problems after the commit do not raise: they are in
    ``PublishResult.prune_errors`` and pruning is retried at the next publish.
    """
    if step < 0:
        raise PublishError(f"step = {step} is negative: pass the number of optimisation steps trained")
    if keep < 1:
        raise PublishError(f"keep = {keep}: at least the active version must be kept (keep >= 1)")
    source = Path(source_dir)
    root = resolve_adapters_root(adapters_root)
    parent = scope_dir(root, scope)
    version_id = uuid.uuid4().hex
    created_at = datetime.now(UTC)
    row_metrics: dict[str, Any] = _json_safe(dict(metrics), "metrics")
    if gate is not None:
        row_metrics["gate"] = _json_safe(
            {"passed": gate.passed, "reasons": list(gate.reasons), **gate.metrics}, "gate.metrics"
        )
    kl_value = float(kl)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version_id": version_id,
        "scope": str(scope),
        "scope_kind": scope.kind.value,
        "scope_id": scope.id,
        "step": int(step),
        "kl": _json_safe(kl_value, "kl"),
        "metrics": row_metrics,
        "parent_id": parent_id,
        "created_at": created_at.isoformat(),
    }

    # Both checked again in the transaction; here to fail before writing anything.
    try:
        async with store.unit() as s:
            if purge_mark is None:
                purge_mark = await PurgeRepository(s).mark(scope)
            else:
                _raise_if_purged(scope, await PurgeRepository(s).purged_since(scope, purge_mark))
            if parent_id is not None:
                await AdapterRepository(s).require(scope, parent_id)
    except StoreError as exc:
        raise PublishError(f"cannot publish a new version of {scope}: {exc}") from exc

    try:
        final = await asyncio.to_thread(_write_version, source, parent, version_id, manifest, on_stage)
    except PublishError:
        # A purge during the writing may have taken the trained folder or the scope's folder away.
        async with store.unit() as s:
            purged = await PurgeRepository(s).purged_since(scope, purge_mark)
        if purged:
            await asyncio.to_thread(remove_empty_scope_dir, root, scope)
        _raise_if_purged(scope, purged)
        raise
    if on_stage is not None:
        on_stage("after_rename")

    rejected = gate is not None and not gate.passed
    reason = ("; ".join(gate.reasons) or "the gates failed") if gate is not None and rejected else None
    try:
        async with store.unit() as s:
            purges = PurgeRepository(s)
            await purges.lock()  # until this commits, no purge can; one that committed before is seen here
            _raise_if_purged(scope, await purges.purged_since(scope, purge_mark))
            repo = AdapterRepository(s)
            if parent_id is not None:
                await repo.require(scope, parent_id)
            previous = await repo.active(scope)
            previous_id = previous.id if previous is not None else None
            await repo.add_candidate(
                scope,
                path=str(final),
                step=int(step),
                kl=kl_value if math.isfinite(kl_value) else None,
                metrics=row_metrics,
                version_id=version_id,
                parent_id=parent_id,
            )
            detail: dict[str, Any] = {
                "version": version_id,
                "path": str(final),
                "step": int(step),
                "kl": _json_safe(kl_value, "kl"),
                "previous": previous_id,
            }
            if rejected:
                assert reason is not None
                await repo.reject(scope, version_id, reason)
                await AuditRepository(s).add(actor=actor, action="reject", scope=scope, reason=reason, detail=detail)
            else:
                await repo.activate(scope, version_id)
                await AuditRepository(s).add(
                    actor=actor,
                    action="publish",
                    scope=scope,
                    reason="gates passed" if gate is not None else "published without gates",
                    detail=detail,
                )
    except Exception as exc:
        await _forget_unrecorded(store, final, version_id)
        if isinstance(exc, ScopePurgedError):
            await asyncio.to_thread(remove_empty_scope_dir, root, scope)
            raise
        if isinstance(exc, StoreError):
            raise PublishError(f"adapter version {version_id} of {scope} was not recorded: {exc}") from exc
        raise PublishError(
            f"adapter version {version_id} of {scope} was not recorded ({type(exc).__name__}: {exc}): check "
            "database.url and that the database is reachable, then train again; the active adapter is unchanged"
        ) from exc
    if on_stage is not None:
        on_stage("committed")
    status = AdapterStatus.REJECTED if rejected else AdapterStatus.ACTIVE
    if rejected:
        log.warning("adapter %s of %s rejected: %s", version_id, scope, reason)
    else:
        log.info("adapter %s of %s published at %s (previous %s)", version_id, scope, final, previous_id)
    pruned, errors = await _prune(store, scope, keep=keep, actor=actor)
    return PublishResult(
        version_id=version_id,
        path=final,
        status=status,
        previous_active=previous_id,
        reasons=list(gate.reasons) if gate is not None and rejected else [],
        pruned=pruned,
        prune_errors=errors,
    )


async def purge_mark(store: RolloutStore, scope: Scope) -> PurgeMark:
    """What a training round takes when it starts and hands to :func:`publish_adapter`: a purge that
    concerns ``scope`` after this moment keeps the round's adapter from being published."""
    async with store.unit() as s:
        return await PurgeRepository(s).mark(scope)


def _raise_if_purged(scope: Scope, purged: list[str]) -> None:
    if not purged:
        return
    if scope.kind == ScopeKind.DEVELOPER:
        raise ScopePurgedError(
            f"{scope} was purged after this round started: its adapter is not published, and its files are "
            "removed (nothing to fix)"
        )
    raise ScopePurgedError(
        f"{scope}: developer {', '.join(purged)} was purged after this round started, and the round may have "
        "trained on their rollouts: its adapter is not published, and its files are removed; the next round "
        "trains on the rollouts that remain"
    )


async def _forget_unrecorded(store: RolloutStore, final: Path, version_id: str) -> None:
    """After a failed commit, remove the version folder only when its row is certainly absent.

    A commit whose acknowledgement was lost may still have landed; then the folder stays (the row points
    to it). When the database cannot even be asked, the folder stays too and clean_partial removes it later.
    """
    try:
        async with store.unit() as s:
            exists = await AdapterRepository(s).get(version_id) is not None
    except Exception:
        log.warning("cannot tell whether adapter version %s was recorded; %s left for clean_partial", version_id, final)
        return
    if not exists:
        await asyncio.to_thread(shutil.rmtree, final, True)


def _remove_version_dirs(doomed: list[Path], keep_path: Path | None) -> list[str]:
    errors: list[str] = []
    for path in doomed:
        if keep_path is not None and _same_path(path, keep_path):
            errors.append(f"{path} is the active adapter's folder: left in place")
            continue
        if not VERSION_RE.match(path.name):
            errors.append(f"{path} does not look like a published version folder (<uuid hex>): left in place")
            continue
        if not path.exists():
            continue
        try:
            shutil.rmtree(path)
        except OSError as exc:
            errors.append(f"cannot delete pruned adapter folder {path}: {exc.strerror or exc}; delete it by hand")
    return errors


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return str(a) == str(b)


async def _prune(store: RolloutStore, scope: Scope, *, keep: int, actor: str) -> tuple[list[Path], list[str]]:
    try:
        async with store.unit() as s:
            repo = AdapterRepository(s)
            active = await repo.active(scope)
            doomed = [Path(p) for p in await repo.prune(scope, keep)]
            if doomed:
                await AuditRepository(s).add(
                    actor=actor,
                    action="prune",
                    scope=scope,
                    reason=f"keep the newest {keep} versions",
                    detail={"paths": [str(p) for p in doomed]},
                )
    except Exception as exc:
        log.warning("pruning old adapters of %s failed: %s", scope, exc)
        return [], [f"pruning old adapters of {scope} failed ({exc}); it is retried at the next publish"]
    if not doomed:
        return [], []
    errors = await asyncio.to_thread(_remove_version_dirs, doomed, Path(active.path) if active else None)
    for e in errors:
        log.warning("%s", e)
    return doomed, errors


# --------------------------------------------------------------------------------------------------
# Verify and clean


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a published version folder; raise :class:`CorruptAdapterError` if absent or unreadable."""
    path = Path(path)
    fix = "roll back to the previous version (heedful adapters rollback) or train again"
    if not path.is_dir():
        raise CorruptAdapterError(f"adapter folder {path} does not exist: {fix}")
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptAdapterError(
            f"{path} has no {MANIFEST}: the adapter was not published completely; {fix}"
        ) from None
    except (OSError, ValueError) as exc:
        raise CorruptAdapterError(f"{file} is not readable JSON ({exc}): the adapter is corrupt; {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorruptAdapterError(f"{file} has format {found!r}, expected {MANIFEST_FORMAT}: {fix}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptAdapterError(f"{file} lists no files: the manifest is incomplete; {fix}")
    return manifest


def _check_checksums(path: Path, manifest: dict[str, Any]) -> None:
    fix = "roll back to the previous version (heedful adapters rollback) or train again"
    files: dict[str, Any] = manifest["files"]
    if manifest.get("version_id") != path.name:
        raise CorruptAdapterError(
            f"{path / MANIFEST} belongs to version {manifest.get('version_id')!r}, not to folder {path.name!r}: "
            f"the folder was copied or renamed by hand; {fix}"
        )
    required = [ADAPTER_CONFIG, *(w for w in ADAPTER_WEIGHTS if (path / w).exists())]
    for name in required:
        if name not in files:
            raise CorruptAdapterError(f"{path / name} is not listed in {MANIFEST}: it was added after publishing")
    for name, entry in files.items():
        target = path / name
        if "/" in name or name in ("", ".", "..") or not isinstance(entry, dict):
            raise CorruptAdapterError(f"{path / MANIFEST} has an invalid entry {name!r}: {fix}")
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            raise CorruptAdapterError(f"{target} is missing (listed in {MANIFEST}): {fix}") from None
        if size != entry.get("size"):
            raise CorruptAdapterError(
                f"{target} has {size} bytes, the manifest says {entry.get('size')}: the file is truncated or "
                f"changed; {fix}"
            )
        digest = sha256_file(target)
        if digest != entry.get("sha256"):
            raise CorruptAdapterError(
                f"{target} does not match its sha256 in {MANIFEST} ({digest[:12]} != "
                f"{str(entry.get('sha256'))[:12]}): the file is corrupt; {fix}"
            )


def verify_published(path: Path, *, max_rank: int | None = None) -> None:
    """Check a published version folder before serving it; raise :class:`AdapterError` naming the problem.

    The manifest must be present and complete, every file it lists must have its recorded size and sha256,
    and the folder must pass :func:`server.engine.adapters.check_adapter_dir` (``max_rank``:
    ``engine.max_lora_rank``). Reads every file: run it off the event loop (``asyncio.to_thread``).
    """
    path = Path(path)
    manifest = read_manifest(path)
    _check_checksums(path, manifest)
    check_adapter_dir(path, max_rank=max_rank)


FolderState = tuple[tuple[str, int, int], ...]  # (name, size, mtime in ns) of the folder and each entry


def _folder_state(path: Path) -> FolderState:
    """What changes when any file of a version folder is written, replaced, added or removed."""
    try:
        st = path.stat()
        entries = sorted(
            (e.name, e.stat(follow_symlinks=True).st_size, e.stat(follow_symlinks=True).st_mtime_ns)
            for e in os.scandir(path)
        )
    except OSError:
        return ()  # missing or unreadable: verify_published says which
    return (("", st.st_size, st.st_mtime_ns), *entries)


class PublishedFolders:
    """:func:`verify_published` for the serving path, hashing each version folder once.

    Serving checks a folder every time it would route to it (each poll of the registry while a version is
    refused, each load into an engine); hashing megabytes of weights that often would cost CPU that
    completions need. So the verdict is kept per folder with the size and modification time of the folder
    and of every file in it, and the folder is read again only when one of them changed (a file was
    rewritten, restored, added or removed). A failure is kept too, so it is reported once, not every poll.
    """

    def __init__(self, *, max_rank: int | None = None) -> None:
        self.max_rank = max_rank
        self.hashed = 0  # folders read in full so far (the cache's misses)
        self._verdicts: dict[Path, tuple[FolderState, AdapterError | None]] = {}

    def check(self, path: Path) -> tuple[AdapterError | None, bool]:
        """(the error that makes the folder unservable or None, whether this verdict is new).

        Reads every file on a miss: run it off the event loop (``asyncio.to_thread``).
        """
        path = Path(path)
        state = _folder_state(path)
        known = self._verdicts.get(path)
        if known is not None and known[0] == state:
            return known[1], False
        self.hashed += 1
        error: AdapterError | None = None
        try:
            verify_published(path, max_rank=self.max_rank)
        except AdapterError as exc:
            error = exc
        except OSError as exc:  # a file vanished or became unreadable between the stat and the read
            error = CorruptAdapterError(
                f"{path} cannot be read ({exc.strerror or exc}): fix its permissions, or roll back to the previous "
                "version (heedful adapters rollback) or train again"
            )
        self._verdicts[path] = (state, error)
        return error, True

    def forget(self, keep: set[Path]) -> None:
        """Drop the verdicts of folders no longer in ``keep`` (versions pruned or purged)."""
        for path in [p for p in self._verdicts if p not in keep]:
            del self._verdicts[path]


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    try:
        for entry in os.scandir(path):
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        pass
    return newest


def _complete(path: Path) -> bool:
    try:
        _check_checksums(path, read_manifest(path))
    except (AdapterError, OSError):
        return False
    return True


@dataclass(slots=True)
class _Leftover:
    path: Path
    kind: Literal["tmp", "version"]
    age_s: float


def _scan(root: Path) -> list[_Leftover]:
    """Every `.tmp-*`, `.train-*` and version folder under root (whether a row points to it is decided later)."""
    found: list[_Leftover] = []
    now = time.time()
    for kind_dir in sorted(root.iterdir()):
        if not kind_dir.is_dir() or kind_dir.is_symlink():
            continue
        for sdir in sorted(kind_dir.iterdir()):
            if not sdir.is_dir() or sdir.is_symlink():
                continue
            for entry in sorted(sdir.iterdir()):
                if not entry.is_dir() or entry.is_symlink():
                    continue
                try:
                    age = now - _newest_mtime(entry)
                except FileNotFoundError:
                    continue  # removed meanwhile (a prune or a rename)
                if entry.name.startswith((TMP_PREFIX, TRAIN_PREFIX)):
                    found.append(_Leftover(entry, "tmp", age))
                elif VERSION_RE.match(entry.name):
                    found.append(_Leftover(entry, "version", age))
    return found


async def clean_partial(
    store: RolloutStore, adapters_root: Path | None = None, *, grace_s: float = DEFAULT_GRACE_S
) -> list[Path]:
    """Remove what crashed publishes left under the adapter folder; return the folders removed.

    Removed: ``.tmp-*`` folders (a publish that died), ``.train-*`` folders (a round that died before its
    output was published), and version folders that no version row points to (by id or path) and
    whose manifest is missing, incomplete or does not match the files. Complete version folders that no row
    points to (a crash between the rename and the commit, or between a prune's commit and its deletion) are
    removed too. Temp and trainer folders and complete unreferenced ones are removed only once nothing in
    them changed for ``grace_s`` seconds, because another worker sharing the folder may be publishing right now.
    Folders a row points to are never touched, so this is safe while a server is serving.
    """
    if grace_s < 0 or not math.isfinite(grace_s):
        raise ValueError(f"grace_s = {grace_s!r} must be a finite number of seconds >= 0")
    root = resolve_adapters_root(adapters_root)
    if not root.is_dir():
        return []
    leftovers = await asyncio.to_thread(_scan, root)
    if not leftovers:
        return []
    # Rows are read after the scan: a folder renamed later is not in the scan; one renamed before the scan
    # whose row is committed after this read is complete and young, and the grace period protects it.
    async with store.unit() as s:
        rows = await AdapterRepository(s).versions()
    ids = {r.id for r in rows}
    row_paths = {os.path.realpath(r.path) for r in rows}

    def remove() -> list[Path]:
        removed: list[Path] = []
        for item in leftovers:
            if item.path.name in ids or os.path.realpath(item.path) in row_paths:
                continue  # a row points to it: never touched (verify_published guards serving it)
            # Only unreferenced folders are hashed: referenced ones may be large and are not ours to judge.
            what = "temp folder" if item.kind == "tmp" else "complete" if _complete(item.path) else "incomplete"
            if what != "incomplete" and item.age_s < grace_s:
                continue
            try:
                shutil.rmtree(item.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove leftover adapter folder %s: %s", item.path, exc)
                continue
            log.info("removed leftover adapter folder %s (%s, no version row)", item.path, what)
            removed.append(item.path)
        return removed

    return await asyncio.to_thread(remove)


# --------------------------------------------------------------------------------------------------
# Roll back


@dataclass(slots=True)
class RollbackResult:
    scope: Scope
    taken_out: str | None
    active: str | None


async def rollback_scope(
    session: AsyncSession,
    scope: Scope,
    *,
    actor: str,
    reason: str,
    to: str | None = None,
    expect: str | None = None,
    detail: dict[str, Any] | None = None,
) -> RollbackResult | None:
    """Roll the scope back (to `to`, else its previous version) and audit it, in the caller's transaction.

    With `expect`, nothing happens (None) unless `expect` is still the active version: a guard's finding
    is about one version, and another server may have acted on it already.
    """
    repo = AdapterRepository(session)
    current = await repo.active(scope)
    if expect is not None and (current is None or current.id != expect):
        return None
    now = await repo.rollback(scope, to=to, reason=reason)
    result = RollbackResult(scope, current.id if current else None, now.id if now else None)
    await AuditRepository(session).add(
        actor=actor,
        action="rollback",
        scope=scope,
        reason=reason,
        detail={"from": result.taken_out, "to": result.active, **(detail or {})},
    )
    return result
