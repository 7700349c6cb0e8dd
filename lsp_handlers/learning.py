"""What Heedful learned for the developer of a connection, and their control over it, from the editor.

`workspace/executeCommand heedful.learning [{"action": A, "reason"?: R}]`, always about the connection's own
developer scope (`developer:<id>`; a team's adapter is the admin's to roll back, with `heedful adapters`):

- `show`: what is learned: the developer's latest corrections, their adapter versions (newest first) and
  which one serves them, whether training is paused and why;
- `pause` / `resume`: stop or restart training their adapter (serving goes on with the one they have),
  audited as `pause_training` / `resume_training` by `editor:<developer>`;
- `undo`: take the adapter serving them out of serving (the version before it serves again, else the base
  model), audited as a rollback; the next rollback never returns to it;
- `pause_recording` / `resume_recording`: while paused, completions are still served but nothing of the
  developer's sessions is stored (no completion, document, event or correction: nothing to train on or to
  report), in every session of theirs on any server of the store, until they resume; audited as
  `pause_recording` / `resume_recording`.

`pause`, `resume`, `undo` and the recording actions answer with what `show` answers afterwards. This
server's sessions see the change at once; other servers' background loops (`server.registry`,
`server.learning`) within a few seconds, and each session's `heedful/status` follows.

`workspace/executeCommand heedful.report` answers `{"html": ...}`: `heedful report` for this developer
alone (a whole HTML document without scripts), which the editor shows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams

from adapters.lifecycle import rollback_scope
from storage.models import AdapterStatus
from storage.repositories import (
    AdapterRepository,
    AuditRepository,
    EventRepository,
    Scope,
    ScopeControlRepository,
)
from storage.store import RolloutStore

if TYPE_CHECKING:
    from lsp_handlers.server import HeedfulLanguageServer

LEARNING_COMMAND = "heedful.learning"
REPORT_COMMAND = "heedful.report"
# (store, developer) -> the HTML of `heedful report` for that developer alone
ReportHtml = Callable[[RolloutStore, str], Awaitable[str]]
ACTIONS = ("show", "pause", "resume", "undo", "pause_recording", "resume_recording")
SHOWN_CORRECTIONS = 20
SHOWN_VERSIONS = 10
REASON_CHARS = 500


class NothingToUndo(JsonRpcException):
    """`undo` with no adapter of the developer's own serving them."""

    CODE = -32002  # implementation-defined server error


def learning_arguments(args: tuple[Any, ...]) -> tuple[str, str | None]:
    """(action, reason) from the command's arguments, or InvalidParams naming what is wrong."""
    usage = f'{LEARNING_COMMAND} takes one argument {{"action": one of {list(ACTIONS)}, "reason"?: "..."}}'
    if len(args) != 1 or not isinstance(args[0], dict):
        raise JsonRpcInvalidParams(f"{usage}, got {list(args)!r}")
    action, reason = args[0].get("action"), args[0].get("reason")
    if action not in ACTIONS:
        raise JsonRpcInvalidParams(f"{usage}; action {action!r} is not one of them")
    if reason is not None and (not isinstance(reason, str) or len(reason) > REASON_CHARS):
        raise JsonRpcInvalidParams(
            f'{LEARNING_COMMAND}: "reason" must be a string of at most {REASON_CHARS} characters, got {reason!r:.80}'
        )
    return str(action), reason


async def learning_command(ls: HeedfulLanguageServer, *args: Any) -> dict[str, Any]:
    action, reason = learning_arguments(args)
    developer = ls.require_identity().developer_id
    scope = Scope.developer(developer)
    actor = f"editor:{developer}"
    store = ls.services.store
    async with store.unit() as s:
        if action == "pause":
            why = reason or "paused from the editor"
            await ScopeControlRepository(s).set_training_paused(scope, True, why)
            await AuditRepository(s).add(actor=actor, action="pause_training", scope=scope, reason=why)
        elif action == "resume":
            await ScopeControlRepository(s).set_training_paused(scope, False, None)
            await AuditRepository(s).add(
                actor=actor, action="resume_training", scope=scope, reason=reason or "resumed from the editor"
            )
        elif action == "undo":
            if await AdapterRepository(s).active(scope) is None:
                raise NothingToUndo(
                    f"nothing to undo: no adapter of developer {developer!r} serves them (a team's adapter is "
                    "rolled back by an admin: heedful adapters rollback --scope team:NAME)"
                )
            await rollback_scope(s, scope, actor=actor, reason=reason or "undone from the editor")
        elif action in ("pause_recording", "resume_recording"):
            await ScopeControlRepository(s).set_recording_paused(scope, action == "pause_recording")
            await AuditRepository(s).add(
                actor=actor, action=action, scope=scope, reason=reason or f"{action.replace('_', ' ')} from the editor"
            )
        learned = await _learned(s, developer, scope)
    if action != "show":
        # This server's sessions (every window of the developer) follow now, not a poll later.
        await ls.services.learning.refresh()
    return learned


async def _learned(s: Any, developer: str, scope: Scope) -> dict[str, Any]:
    control = await ScopeControlRepository(s).get(scope)
    versions = await AdapterRepository(s).versions(scope)
    serving = next((v.id for v in versions if v.status == AdapterStatus.ACTIVE), None)
    corrections = await EventRepository(s).latest_corrections(developer, SHOWN_CORRECTIONS)
    return {
        "developerId": developer,
        "paused": control.reason or "paused" if control is not None and control.training_paused else None,
        "recordingPaused": control is not None and control.recording_paused,
        "serving": serving,
        "corrections": list(reversed(corrections)),  # newest first
        "versions": [
            {
                "version": v.id,
                "status": v.status.value,
                "createdAt": v.created_at.isoformat(),
                "activatedAt": v.activated_at.isoformat() if v.activated_at else None,
                "kl": v.kl,
                "reason": v.reason,
            }
            for v in versions[:SHOWN_VERSIONS]
        ],
    }


async def report_command(ls: HeedfulLanguageServer, *args: Any) -> dict[str, Any]:
    developer = ls.require_identity().developer_id
    return {"html": await ls.report_html(ls.services.store, developer)}
