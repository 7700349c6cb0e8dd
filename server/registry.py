"""Which adapter serves which developer, and the swap of a new version into the running engine.

The store says which version is active per scope (`adapter_versions.status = 'active'`); the registry
polls that every `engine.adapter_poll_s` (one small query, the same on SQLite and PostgreSQL) and keeps
the engine in step:

* A developer is served by their own scope's active version, else their team's, else the base model.
* Swap: a new version is loaded into the engine under a new unique name and LoRA id while requests keep
  going to the old one; only once it is loaded do new requests route to it. Requests in flight keep the
  version they started with (a `Lease` pins it); the old version is unloaded when its last lease ends
  (or, when a request was still loading it, as soon as it is loaded: the requests waiting for it take
  the new one).
  So no request fails, none mixes two versions, and none meets a half-loaded adapter (publishing renames
  a complete folder into place before the version row becomes active).
* Nothing is served that does not match what was published: before a version is routed to or loaded,
  its folder is checked against its manifest (`adapters.lifecycle.verify_published`: every file's
  size and sha256, a valid LoRA folder and safetensors header), once per folder state. A version that
  fails is not served (the scope keeps its previous version, or falls back to its team's or the base
  model), and the failure is logged and written to the audit log (`refuse_adapter`) with the path and
  the fix, once.
* Many scopes share `engine.max_loras` engine slots: an adapter is loaded on first use and the least
  recently used idle one is unloaded to make room; a request waits for a slot when every one is busy.

Names are `<process tag>-<version id>`: unique per version, and per server process, so several
`heedful serve` processes can share one remote vLLM server without unloading each other's adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.lifecycle import PublishedFolders
from server.background import every
from server.engine import AdapterError, AdapterRef, Engine, EngineError
from storage.repositories import AdapterRepository, AuditRepository, Scope
from storage.store import RolloutStore

log = logging.getLogger(__name__)

ChangeListener = Callable[[Scope, str | None], None]  # (scope, new active version or None)


@dataclass(frozen=True, slots=True)
class ActiveVersion:
    """What the store says serves a scope."""

    scope: Scope
    version_id: str
    path: Path


@dataclass(slots=True)
class _Slot:
    version: ActiveVersion
    ref: AdapterRef
    busy: int = 0
    retired: bool = False  # no longer active: unload when the last lease ends


class Lease:
    """One request's hold on the adapter serving it (or on none: the base model). Release it once."""

    def __init__(self, registry: AdapterRegistry | None, slot: _Slot | None) -> None:
        self._registry = registry
        self._slot = slot

    @property
    def ref(self) -> AdapterRef | None:
        return self._slot.ref if self._slot else None

    @property
    def version_id(self) -> str | None:
        return self._slot.version.version_id if self._slot else None

    def share(self) -> Lease:
        """A second lease on the same adapter (for work that outlives this request, e.g. group sampling)."""
        if self._registry is None or self._slot is None:
            return BASE
        self._slot.busy += 1
        return Lease(self._registry, self._slot)

    def release(self) -> None:
        registry, slot = self._registry, self._slot
        self._registry = self._slot = None
        if registry is not None and slot is not None:
            registry._release(slot)


BASE = Lease(None, None)
# LoRA ids are unique in the process (the embedded engine refuses a reused one), across registries too.
_LORA_IDS = itertools.count(1000)


class AdapterRegistry:
    """The serving side of personalization for one server process (see the module docstring)."""

    def __init__(
        self,
        store: RolloutStore,
        engine: Callable[[], Engine | None],
        *,
        capacity: int,
        poll_s: float = 0.5,
        load_timeout_s: float = 60.0,
        max_rank: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"the adapter registry needs capacity >= 1 (engine.max_loras), got {capacity}")
        self._store = store
        self._engine = engine
        self.capacity = capacity
        self.poll_s = poll_s
        self.load_timeout_s = load_timeout_s
        self._tag = secrets.token_hex(3)
        self._folders = PublishedFolders(max_rank=max_rank)
        self._active: dict[Scope, ActiveVersion] = {}
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # by version id, least recently used first
        self._loading: dict[str, asyncio.Task[_Slot]] = {}
        self._retire_on_load: set[str] = set()  # versions retired while a load of theirs was in progress
        self._room = asyncio.Condition()
        self._listeners: set[ChangeListener] = set()
        self._background: set[asyncio.Future[None]] = set()
        self._task: asyncio.Task[None] | None = None

    # --- what the store says -----------------------------------------------------------------------

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def active_version(self, developer: str, team: str | None) -> ActiveVersion | None:
        """The version that would serve this developer now."""
        for scope in (Scope.developer(developer), *((Scope.team(team),) if team else ())):
            found = self._active.get(scope)
            if found is not None:
                return found
        return None

    async def refresh(self) -> list[Scope]:
        """Read the active versions; route changed scopes to their new version; return the scopes changed."""
        async with self._store.unit() as s:
            rows = await AdapterRepository(s).all_active()
        now = {
            Scope(r.scope_kind, r.scope_id): ActiveVersion(Scope(r.scope_kind, r.scope_id), r.id, Path(r.path))
            for r in rows
        }
        self._folders.forget({v.path for v in now.values()} | {s.version.path for s in self._slots.values()})
        changed = []
        for scope in [sc for sc in set(now) | set(self._active) if now.get(sc) != self._active.get(sc)]:
            old, new = self._active.get(scope), now.get(scope)
            if new is not None and await self._refused(new) is not None:
                continue  # the scope keeps what serves it now: its previous version, its team's, or the base
            if new is not None and old is not None and old.version_id in self._slots:
                # The scope is in use: load the new version before routing to it, so no request waits.
                # A rollback to a version a request is still loading (retired when the scope moved on)
                # keeps that load: it is about to serve the scope again, not to be unloaded once loaded.
                self._retire_on_load.discard(new.version_id)
                try:
                    await self._slot_for(new)
                except EngineError as exc:
                    log.error(
                        "adapter %s for %s could not be loaded; %s keeps serving: %s",
                        new.version_id,
                        scope,
                        old.version_id,
                        exc,
                    )
                    continue
                if not await self._still_active(new):
                    # Rolled back (or replaced) while it loaded: routing to it now would serve a version
                    # the store no longer serves until the next poll. That poll routes the scope afresh.
                    await self._retire(new.version_id)
                    log.info("adapter %s of %s stopped being active while it loaded", new.version_id, scope)
                    continue
            changed.append(scope)
            if new is None:
                self._active.pop(scope, None)
            else:
                self._active[scope] = new
                back = self._slots.get(new.version_id)
                if back is not None:
                    back.retired = False  # a rollback to a version still finishing its requests keeps it
                self._retire_on_load.discard(new.version_id)  # (or to one a request is loading)
            # Said the moment new requests route there: retiring the old version below may wait for the engine.
            log.info("%s is now served by %s", scope, new.version_id if new else "the base model")
            for listener in list(self._listeners):
                try:
                    listener(scope, new.version_id if new else None)
                except Exception:
                    log.exception("an adapter change listener failed")
            if old is not None:
                await self._retire(old.version_id)
        return changed

    def start(self) -> None:
        if self._task is None:
            failed = "reading the active adapters failed; serving continues with the last known ones"
            self._task = asyncio.create_task(every(self.poll_s, self.refresh, failed), name="adapter-registry")

    # --- leases --------------------------------------------------------------------------------------

    async def acquire(self, developer: str, team: str | None) -> Lease:
        """Pin the adapter serving this developer now (loading it when needed); BASE when there is none."""
        while True:
            version = self.active_version(developer, team)
            if version is None:
                return BASE
            slot = await self._slot_for(version)
            if self._slots.get(version.version_id) is slot:  # not unloaded while this request waited for it
                slot.busy += 1
                self._slots.move_to_end(version.version_id)
                return Lease(self, slot)

    def _release(self, slot: _Slot) -> None:
        slot.busy -= 1
        if slot.retired:
            log.debug("a request on retired adapter %s ended; %d left", slot.version.version_id, slot.busy)
        if slot.busy == 0:
            self._spawn(self._after_idle(slot))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _after_idle(self, slot: _Slot) -> None:
        if slot.retired and slot.busy == 0:
            await self._unload(slot)
        await self._notify_room()

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def _slot_for(self, version: ActiveVersion) -> _Slot:
        slot = self._slots.get(version.version_id)
        if slot is not None:
            return slot
        task = self._loading.get(version.version_id)
        if task is None:
            task = asyncio.create_task(self._load(version))
            self._loading[version.version_id] = task
            task.add_done_callback(lambda t: self._loaded(version.version_id, t))
        return await asyncio.shield(task)

    def _loaded(self, version_id: str, task: asyncio.Task[_Slot]) -> None:
        self._loading.pop(version_id, None)
        if task.cancelled() or task.exception() is not None:
            self._retire_on_load.discard(version_id)  # nothing loaded, nothing to retire

    async def _still_active(self, version: ActiveVersion) -> bool:
        async with self._store.unit() as s:
            row = await AdapterRepository(s).active(version.scope)
        return row is not None and row.id == version.version_id

    async def _refused(self, version: ActiveVersion) -> AdapterError | None:
        """Why `version` must not be served (its folder does not match its manifest), or None.

        A new verdict of refusal is logged and audited; a known one (the folder unchanged since) is not.
        """
        error, new = await asyncio.to_thread(self._folders.check, version.path)
        if error is None or not new:
            return error
        log.error("adapter %s of %s is not served: %s", version.version_id, version.scope, error)
        try:
            async with self._store.unit() as s:
                await AuditRepository(s).add(
                    actor="server",
                    action="refuse_adapter",
                    scope=version.scope,
                    reason=str(error),
                    detail={"version": version.version_id, "path": str(version.path)},
                )
        except Exception as exc:  # serving goes on; the log line above has it all
            log.warning("the refusal of adapter %s could not be written to the audit log: %s", version.version_id, exc)
        return error

    async def _load(self, version: ActiveVersion) -> _Slot:
        engine = self._engine()
        if engine is None:
            raise EngineError("the engine is not ready, so no adapter can be loaded yet")
        refused = await self._refused(version)  # the folder may have changed since it was routed to
        if refused is not None:
            raise refused
        await self._make_room()
        ref = AdapterRef(f"{self._tag}-{version.version_id}", next(_LORA_IDS), version.path)
        await asyncio.wait_for(engine.load_adapter(ref), timeout=self.load_timeout_s)
        slot = _Slot(version, ref)
        self._slots[version.version_id] = slot
        log.info("loaded adapter %s of %s as %s", version.version_id, version.scope, ref.name)
        if version.version_id in self._retire_on_load:
            # A request loaded the version its scope had then and the scope moved on meanwhile: unloaded
            # before the requests waiting for it resume (they find it gone and take what serves now), or,
            # should one have taken it first, after its last lease.
            self._retire_on_load.discard(version.version_id)
            slot.retired = True
            self._spawn(self._after_idle(slot))
        return slot

    async def _make_room(self) -> None:
        """Unload least recently used idle adapters until one more fits; wait while every slot is busy."""
        async with self._room:
            while len(self._slots) + len(self._loading) > self.capacity:
                idle = next((s for s in self._slots.values() if s.busy == 0), None)
                if idle is not None:
                    await self._unload(idle)
                    continue
                await self._room.wait()

    async def _retire(self, version_id: str) -> None:
        slot = self._slots.get(version_id)
        if slot is None:
            if version_id in self._loading:  # a request is loading it: retired once loaded
                self._retire_on_load.add(version_id)
            return
        slot.retired = True
        log.debug("retiring adapter %s: %d request(s) in flight", version_id, slot.busy)
        if slot.busy == 0:
            await self._unload(slot)

    async def _unload(self, slot: _Slot) -> None:
        if self._slots.get(slot.version.version_id) is not slot:
            return  # already unloaded
        del self._slots[slot.version.version_id]
        engine = self._engine()
        if engine is None:
            return
        try:
            await engine.unload_adapter(slot.ref)
            log.info("unloaded adapter %s (%s)", slot.version.version_id, slot.ref.name)
        except EngineError as exc:
            log.warning("unloading adapter %s failed (the engine frees it on restart): %s", slot.ref.name, exc)

    def forget(self, lease: Lease) -> None:
        """The engine failed a request on this lease's adapter (e.g. a remote server restarted and lost it):
        drop the slot without unloading, so the next request loads the adapter again."""
        slot = lease._slot
        if slot is not None and self._slots.get(slot.version.version_id) is slot:
            del self._slots[slot.version.version_id]
            log.warning("adapter %s will be loaded again on its next request", slot.ref.name)

    def loaded(self) -> dict[str, int]:
        """Version ids loaded in the engine now, with their requests in flight."""
        return {vid: s.busy for vid, s in self._slots.items()}

    async def close(self) -> None:
        """Stop following the store and unload what this process loaded (a shared remote engine keeps
        nothing of ours after we exit)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for slot in list(self._slots.values()):
            await self._unload(slot)
