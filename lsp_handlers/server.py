"""The language server of one LSP connection: handlers for documents, completions and feedback.

One `HeedfulLanguageServer` serves one connection (one editor session) and holds that session's state:
identity, resolved settings, open documents, the suggestion currently given per document, and the
accepted texts it follows. Everything shared between connections (engine, store, tokenizer) lives in
`server.runtime.Services`. `create_server` registers the handlers on a fresh server object, so a TCP
listener can serve many editors at once.

Writes go through the store's batching writer. Commands (accept, feedback) answer after their event is
committed, so an acknowledged event is never lost; notifications cannot be acknowledged, so their
writes are queued and the writer's own durability applies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer

from kernel.settings import (
    ADAPTER_ARMS,
    FileStamp,
    ResolvedSettings,
    SettingsError,
    apply_client_settings,
    files_stamp,
    watched_files,
)
from lsp_handlers.auth import AuthPolicy, ConnectionRefused, admit, check_client_info, parse_claim
from lsp_handlers.completion import CompletionService, Identity, Served
from lsp_handlers.crossfile import Neighbours
from lsp_handlers.documents import DocumentError, DocumentStore, StaleVersion, TextDocument, code_points_for_units
from lsp_handlers.followup import Followup, nothing_recorded
from lsp_handlers.learning import LEARNING_COMMAND, REPORT_COMMAND, ReportHtml, learning_command, report_command
from lsp_handlers.protocol import (
    ACCEPT_COMMAND,
    DID_MOVE_CURSOR,
    DID_PARTIALLY_ACCEPT_COMPLETION,
    DID_REJECT_COMPLETION,
    DID_SHOW_COMPLETION,
    FEEDBACK_COMMAND,
    STATUS,
    DidMoveCursorParams,
    DidPartiallyAcceptCompletionParams,
    DidRejectCompletionParams,
    DidShowCompletionParams,
    HeedfulProtocol,
    completion_id_of,
    is_parse_error,
)
from lsp_handlers.workspace import Workspace
from server import __version__
from server.learning import learning_state
from server.logs import clip
from server.runtime import EngineState, EngineStatus, Services, arm_of
from storage.models import EventKind
from storage.repositories import Scope
from storage.store import DocumentSeen, EventRecord, SessionStart

log = logging.getLogger(__name__)

NOT_RECORDING = "recording is paused (heedful.learning resume_recording), or was when the completion was served"


@dataclass(slots=True)
class OpenDocument:
    doc: TextDocument
    seen: DocumentSeen | None = None  # the queued document write; completions link to its row


class HeedfulLanguageServer(LanguageServer):
    """One connection's server and its session state."""

    def __init__(self, services: Services, completions: CompletionService, report_html: ReportHtml) -> None:
        super().__init__("heedful", __version__, protocol_cls=HeedfulProtocol)
        self.services = services
        self.completions = completions
        self.report_html = report_html  # `heedful.report`: given by whoever serves (the report is a tool)
        self.auth_policy = AuthPolicy()  # how a connection proves who it is (set by `create_server`)
        self.identity: Identity | None = None
        self.resolved: ResolvedSettings = services.base
        self.client_settings: dict[str, Any] = {}
        self.documents = DocumentStore()
        self.folders = Workspace()  # the folders `initialize` named (cross-file context reads only there)
        self.open_docs: dict[str, OpenDocument] = {}
        self.followup = Followup(self)  # what the developer does with what this session served
        self.inflight: dict[str, asyncio.Task[Any]] = {}
        self.exit_requested = asyncio.Event()
        self.shutdown_requested = False
        self.closed = False
        self.last_status: dict[str, Any] | None = None
        self.highlight_place: tuple[str, int] | None = None  # (uri, line) of the last textDocument/documentHighlight
        self.status_started = False  # statuses go out from `initialized` on, the first with the learning state
        self._settings_files: list[Path] = []
        self._settings_stamp: FileStamp = ()
        self._unsubscribe = services.engine.subscribe(self.send_status)
        self._unsubscribe_adapters = services.adapters.subscribe(self._adapter_changed)
        self._unsubscribe_learning = services.learning.subscribe(self._learning_changed)
        self._unwatch_learning: Callable[[], None] | None = None

    # -- identity, settings, status --------------------------------------------------------------

    @property
    def settings(self) -> Any:
        return self.resolved.settings

    def require_identity(self) -> Identity:
        if self.identity is None:
            raise JsonRpcInvalidParams("the server is not initialized: send 'initialize' first")
        return self.identity

    def send_status(self, status: EngineStatus | None = None) -> None:
        status = status or self.services.engine.status
        if status.state is EngineState.READY and not self.closed:
            self.completions.calibrate_soon()  # once per process: size prompts to this machine's engine
        if self.closed or self.protocol.writer is None or self.identity is None or not self.status_started:
            return
        arm = self.arm
        adapter = None
        if arm in ADAPTER_ARMS:
            adapter = self.services.adapters.active_version(self.identity.developer_id, self.identity.team_id)
        params = {
            "state": status.state.value,
            "message": status.message,
            "engine": status.kind,
            "model": status.model,
            "adapter": adapter.version_id if adapter else None,
            "arm": arm,
            "developerId": self.identity.developer_id,
            "sessionId": self.identity.session_id,
            "adapterServing": status.adapter_serving,
            "adapterServingReason": status.adapter_serving_reason,
            "learning": self.learning_state(arm),
            "serverPid": os.getpid(),  # windows of one shared server all see the same process
        }
        if params != self.last_status:  # the editor hears about changes, not repeats
            self.last_status = params
            self.protocol.notify(STATUS, params)

    @property
    def arm(self) -> str:
        """This developer's experiment arm under the settings that apply to them now."""
        identity = self.require_identity()
        return arm_of(identity.developer_id, self.settings.experiment.arms)

    def learning_state(self, arm: str) -> dict[str, Any] | None:
        """What learning does for this developer (`server.learning`); None until the store was first read."""
        identity = self.require_identity()
        if arm not in ADAPTER_ARMS:
            return {"state": "off", "reason": f"experiment arm {arm!r} is served without an adapter"}
        facts = self.services.learning.facts(Scope.developer(identity.developer_id))
        if facts is None:
            return None
        t = self.settings.training
        return learning_state(facts, needed=t.min_new_rollouts, in_server=t.in_server)

    def watch_learning(self) -> None:
        identity = self.require_identity()
        self._unwatch_learning = self.services.learning.watch(Scope.developer(identity.developer_id))

    def _learning_changed(self, scope: Scope) -> None:
        identity = self.identity
        if identity is not None and scope == Scope.developer(identity.developer_id):
            self.send_status()

    def _adapter_changed(self, scope: Scope, version: str | None) -> None:
        identity = self.identity
        if identity is None:
            return
        mine = [Scope.developer(identity.developer_id), *([Scope.team(identity.team_id)] if identity.team_id else [])]
        if scope in mine:
            self.send_status()

    def show_message(self, message: str, kind: types.MessageType = types.MessageType.Warning) -> None:
        self.window_show_message(types.ShowMessageParams(type=kind, message=message))

    def apply_settings(self, table: Any, source: str) -> None:
        """Layer the editor's settings over the admin's; a bad value is reported and the old ones kept."""
        if table is None:
            return
        if not isinstance(table, dict):
            self.show_message(f"Heedful: {source} must be an object like {{'completion': {{'max_tokens': 32}}}}")
            return
        try:
            self.resolved = apply_client_settings(self.resolved, table, source)
            self.client_settings = table
        except SettingsError as exc:
            log.warning("%s", exc)
            self.show_message(f"Heedful: {exc}; the previous settings stay in force")

    def watch_settings(self) -> None:
        """Remember the settings files this session's settings came from, to notice when they change."""
        team = self.identity.team_id if self.identity else None
        self._settings_files = watched_files(self.services.config_path, team)
        self._settings_stamp = files_stamp(self._settings_files)

    def reload_settings_if_changed(self) -> None:
        """Hot reload: when the global or team file changed, resolve again for the next requests.

        A file that no longer validates is reported (log and editor) and the settings in force stay.
        Engine and store settings are read once at start; the per-request ones (completion, feedback,
        privacy patterns of new sessions) follow the files.
        """
        identity = self.identity
        if identity is None or not self._settings_files:
            return
        stamp = files_stamp(self._settings_files)
        if stamp == self._settings_stamp:
            return
        self._settings_stamp = stamp  # a broken file is reported once, not on every request
        try:
            resolved = self.services.resolve(identity.developer_id, identity.team_id)
            if self.client_settings:
                resolved = apply_client_settings(resolved, self.client_settings, "editor settings")
        except SettingsError as exc:
            log.error("the settings changed but cannot be used: %s; the previous settings stay in force", exc)
            self.show_message(f"Heedful: {exc}; the previous settings stay in force", types.MessageType.Error)
            return
        self.resolved = resolved
        self.watch_settings()
        log.info("settings reloaded for developer %r, team %r", identity.developer_id, identity.team_id)

    def report_server_error(self, error: Exception, source: Any) -> None:
        if is_parse_error(error):
            log.warning("malformed message from the client: %s", error)
            assert isinstance(self.protocol, HeedfulProtocol)
            self.protocol.answer_parse_error(error)
            return
        log.error("server error (%s): %s", getattr(source, "__name__", source), error)

    # -- session end -------------------------------------------------------------------------------

    async def close_session(self) -> None:
        """Take the pending snapshots now, record the session's end and wait until it is all written."""
        if self.closed:
            return
        self.closed = True
        self._unsubscribe()
        self._unsubscribe_adapters()
        self._unsubscribe_learning()
        if self._unwatch_learning is not None:
            self._unwatch_learning()
        for task in list(self.inflight.values()):
            task.cancel()
        await self.completions.drain()
        identity = self.identity
        if identity is None:
            return
        futures = self.followup.finish()
        futures.append(self.services.store.end_session(identity.session_id))
        for fut in futures:
            try:
                await fut
            except Exception as exc:
                log.error("a write at the end of session %s failed: %s", identity.session_id, exc)

    # -- feedback bookkeeping ------------------------------------------------------------------------

    @property
    def recording_paused(self) -> bool:
        """The developer paused recording (`heedful.learning pause_recording`): nothing is stored for them."""
        identity = self.require_identity()
        return self.services.learning.recording_paused(Scope.developer(identity.developer_id))

    def record_event(self, kind: EventKind, completion_id: str | None, **fields: Any) -> asyncio.Future[Any]:
        """Store the event (its future gives the event id), unless recording is paused now or the completion
        it is about was served while it was (then the future gives None)."""
        identity = self.require_identity()
        state = self.followup.served.get(completion_id) if completion_id is not None else None
        if state is not None:
            if kind == EventKind.REJECTED and not state.resolved and state.served.recorded:
                # Not kept: the show policy learns it now (a kept one, at its accept's last snapshot).
                self.completions.policies.observe(identity.developer_id, state.served.text, 0.0)
            state.outcomes.add(kind)
        self.services.metrics.count_event(identity.team_id, self.arm, kind)
        if self.recording_paused or (state is not None and not state.served.recorded):
            return nothing_recorded()
        fut: asyncio.Future[Any] = self.services.store.record_event(
            EventRecord(session_id=identity.session_id, kind=kind, completion_id=completion_id, **fields)
        )
        fut.add_done_callback(_log_failed_write)
        return fut

    def accepted_outcome(self, completion_id: str, chars: int, ratio: float) -> None:
        """An accepted text's last snapshot: how much of it the developer kept, for the metrics and their show
        policy."""
        identity = self.require_identity()
        self.services.metrics.count_kept(identity.team_id, self.arm, chars)
        state = self.followup.served.get(completion_id)
        if state is not None and state.served.recorded and state.served.text:
            # The share of the whole suggestion kept: a partial accept kept only what it took.
            share = min(1.0, chars / len(state.served.text))
            self.completions.policies.observe(identity.developer_id, state.served.text, share)

    def document(self, uri: str) -> TextDocument | None:
        open_doc = self.open_docs.get(uri)
        return open_doc.doc if open_doc is not None else None

    @property
    def snapshot_delays(self) -> list[float]:
        return list(self.settings.feedback.edit_snapshot_delays_s)


def _log_failed_write(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("an event was not recorded: %s", fut.exception())


async def initialize(ls: HeedfulLanguageServer, params: types.InitializeParams) -> None:
    info = params.client_info
    try:
        claim = parse_claim(params.initialization_options)
        check_client_info(info.name if info else None, info.version if info else None)
        admitted = await admit(ls.auth_policy, claim, ls.services.store)
    except ConnectionRefused:
        asyncio.get_running_loop().call_soon(ls.exit_requested.set)  # after the error answer is written
        raise
    if not claim.developer_given and admitted.via == "os-user":
        log.warning("initializationOptions.developerId is missing; using the OS user %r", admitted.developer_id)
    developer, session_id, team = admitted.developer_id, admitted.session_id, admitted.team_id
    try:
        ls.resolved = ls.services.resolve(developer, team)
    except SettingsError as exc:
        log.error("settings for developer %r, team %r: %s", developer, team, exc)
        ls.show_message(f"Heedful: {exc}; serving with the global settings until it is fixed")
        ls.resolved = ls.services.base
    ls.apply_settings(claim.settings, "initializationOptions.settings")
    highlight = types.TEXT_DOCUMENT_DOCUMENT_HIGHLIGHT
    if claim.cursor_rest == "documentHighlight" and highlight not in ls.protocol.fm.features:
        # pygls computes the capabilities after this handler: the editor is told of documentHighlight only here.
        ls.feature(highlight)(document_highlight)
    ls.identity = Identity(developer, session_id, team)
    ls.watch_settings()
    ls.watch_learning()
    ls.documents = DocumentStore(ServerCapabilitiesBuilder.choose_position_encoding(params.capabilities))
    ls.folders = Workspace.from_initialize(params)
    fut = ls.services.store.start_session(
        SessionStart(
            session_id=session_id,
            developer_id=developer,
            team_id=team,
            client_name=info.name if info else None,
            client_version=info.version if info else None,
        )
    )
    fut.add_done_callback(_log_failed_write)
    log.info(
        "session %s: developer %r, team %r, client %s, admitted by %s",
        session_id,
        developer,
        team,
        info.name if info else "?",
        admitted.via,
    )


async def initialized(ls: HeedfulLanguageServer, params: types.InitializedParams) -> None:
    identity = ls.require_identity()
    try:  # the first status carries the learning state, rather than a second one a poll later
        await ls.services.learning.first_read(Scope.developer(identity.developer_id))
    except Exception as exc:  # the status says "not known yet" until the next poll reads it
        log.warning("reading the learning state of %r failed: %s", identity.developer_id, exc)
    ls.status_started = True
    ls.send_status()
    # The developer's show policy starts from their stored outcomes (once per process, in the background).
    ls.completions.policies.load(ls.services.store, identity.developer_id)


async def shutdown(ls: HeedfulLanguageServer, params: Any) -> None:
    ls.shutdown_requested = True
    await ls.close_session()


def exit_(ls: HeedfulLanguageServer, params: Any) -> None:
    ls.exit_requested.set()


def did_change_configuration(ls: HeedfulLanguageServer, params: types.DidChangeConfigurationParams) -> None:
    table = params.settings
    if isinstance(table, dict) and "heedful" in table:
        table = table["heedful"]
    ls.apply_settings(table, "workspace/didChangeConfiguration")


# -- documents -----------------------------------------------------------------------------------


def did_open(ls: HeedfulLanguageServer, params: types.DidOpenTextDocumentParams) -> None:
    doc = ls.documents.open(params.text_document)
    seen = None
    if ls.identity is not None and not ls.recording_paused:
        seen = DocumentSeen(ls.identity.session_id, doc.uri, doc.language_id, doc.version or 0)
        ls.services.store.record_document(seen).add_done_callback(_log_failed_write)
    ls.open_docs[doc.uri] = OpenDocument(doc, seen)
    if ls.identity is not None:
        ls.completions.warm_open_soon(doc, ls.identity, ls.settings)


def did_change(ls: HeedfulLanguageServer, params: types.DidChangeTextDocumentParams) -> None:
    uri = params.text_document.uri
    doc = ls.documents.find(uri)
    if doc is None:
        log.warning("didChange for %s, which is not open; ignored (send didOpen first)", uri)
        return
    try:
        edits = doc.apply(params.content_changes, params.text_document.version)
    except StaleVersion as exc:
        log.warning("%s", exc)
        return
    except DocumentError as exc:
        log.warning("didChange for %s ignored: %s", uri, exc)
        return
    ls.followup.observe(uri, edits)
    if ls.identity is not None:
        ls.completions.edited(ls.identity.developer_id, uri, params.content_changes)


def did_move_cursor(ls: HeedfulLanguageServer, params: DidMoveCursorParams) -> None:
    """The developer's cursor came to rest: the engine reads the text before it while they think (warm context)."""
    uri = params.text_document.uri
    doc = ls.documents.find(uri)
    if doc is None:
        log.warning("%s for %s, which is not open; ignored (send didOpen first)", DID_MOVE_CURSOR, clip(uri))
        return
    _cursor_rests(ls, doc, params.position, DID_MOVE_CURSOR)


def document_highlight(ls: HeedfulLanguageServer, params: types.DocumentHighlightParams) -> None:
    """Which text to highlight at the cursor: none from Heedful (the editor's own highlighting of the symbol there
    stays). Registered where `initializationOptions.cursorRest` is "documentHighlight" (the default): editors ask
    it where the cursor settles (JetBrains IDEs through LSP4IJ, to highlight the usages of the symbol at the
    caret), so it says where the cursor rests, as `heedful/didMoveCursor` does, when it is on another line or in
    another document than the last time it was asked."""
    uri = params.text_document.uri
    doc = ls.documents.find(uri)
    place = (uri, params.position.line)
    if doc is None or place == ls.highlight_place:
        return None
    ls.highlight_place = place
    _cursor_rests(ls, doc, params.position, types.TEXT_DOCUMENT_DOCUMENT_HIGHLIGHT)
    return None


def _cursor_rests(ls: HeedfulLanguageServer, doc: TextDocument, position: types.Position, via: str) -> None:
    log.debug("the cursor rests on line %d of %s (%s)", position.line, doc.uri, via)
    if ls.identity is None:
        return
    try:
        ls.completions.warm_cursor_soon(doc, position, ls.identity, ls.settings)
    except DocumentError as exc:
        log.warning("%s ignored: %s", via, exc)


def did_close(ls: HeedfulLanguageServer, params: types.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.documents.close(uri)
    ls.open_docs.pop(uri, None)
    ls.followup.closed(uri)
    task = ls.inflight.pop(uri, None)
    if task is not None:
        task.cancel()


# -- completions ---------------------------------------------------------------------------------


async def complete(
    ls: HeedfulLanguageServer, uri: str, position: types.Position, method: str
) -> tuple[TextDocument, Served] | None:
    identity = ls.require_identity()
    started = time.monotonic()
    result = await serve_completion(ls, identity, uri, position)
    ls.services.metrics.observe_completion(
        identity.team_id, ls.arm, method, time.monotonic() - started, result is not None
    )
    return result


async def serve_completion(
    ls: HeedfulLanguageServer, identity: Identity, uri: str, position: types.Position
) -> tuple[TextDocument, Served] | None:
    ls.reload_settings_if_changed()
    try:
        doc = ls.documents.get(uri)
    except DocumentError as exc:
        raise JsonRpcInvalidParams(str(exc)) from None
    # A newer request for the same document makes the older one pointless: cancel it.
    current = asyncio.current_task()
    previous = ls.inflight.get(uri)
    if previous is not None and previous is not current and not previous.done():
        previous.cancel()
    if current is not None:
        ls.inflight[uri] = current
    try:
        try:
            offset = doc.offset_at(position)
        except DocumentError as exc:
            raise JsonRpcInvalidParams(str(exc)) from None
        rest = ls.followup.typed_through(doc, offset) if ls.settings.completion.type_through else None
        if rest is not None:
            log.debug("completion %s typed through: the rest served again at %d", rest.completion_id, offset)
            return doc, rest
        open_doc = ls.open_docs.get(uri)
        served = await ls.completions.complete(
            doc,
            position,
            identity=identity,
            settings=ls.settings,
            document=open_doc.seen if open_doc else None,
            neighbours=await neighbours(ls, doc),
        )
    finally:
        if ls.inflight.get(uri) is current:
            del ls.inflight[uri]
    if served is None:
        return None
    ls.followup.serve(doc, served)
    return doc, served


async def neighbours(ls: HeedfulLanguageServer, doc: TextDocument) -> Neighbours | None:
    """The other files a completion in `doc` may take snippets from (`completion.crossfile_share`), or None.
    The workspace is listed and read in a thread: a large folder's walk must not hold up other requests."""
    c = ls.settings.completion
    if c.crossfile_share <= 0:
        return None
    open_docs = ls.documents.texts() if "open" in c.crossfile_sources else []
    imports = "import" in c.crossfile_sources
    return await asyncio.to_thread(
        ls.folders.neighbours, doc.uri, doc.text, doc.language_id, open_docs, imports=imports
    )


def accept_command(served: Served) -> types.Command:
    return types.Command(
        title="Accept Heedful completion",
        command=ACCEPT_COMMAND,
        arguments=[{"completionId": served.completion_id}],
    )


async def inline_completion(
    ls: HeedfulLanguageServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList | None:
    result = await complete(ls, params.text_document.uri, params.position, types.TEXT_DOCUMENT_INLINE_COMPLETION)
    if result is None:
        return None
    doc, served = result
    cursor = doc.position_at(served.offset)
    item = types.InlineCompletionItem(
        insert_text=served.text,
        range=types.Range(start=cursor, end=cursor),
        command=accept_command(served),
    )
    return types.InlineCompletionList(items=[item])


async def completion(ls: HeedfulLanguageServer, params: types.CompletionParams) -> types.CompletionList | None:
    result = await complete(ls, params.text_document.uri, params.position, types.TEXT_DOCUMENT_COMPLETION)
    if result is None:
        return None
    doc, served = result
    # The editor filters items by the word before the cursor, so the item replaces that word.
    word = _trailing_word(served.line_prefix)
    start = doc.position_at(served.offset - len(word))
    cursor = doc.position_at(served.offset)
    first_line = served.text.split("\n", 1)[0]
    item = types.CompletionItem(
        label=(word + first_line).strip()[:80] or served.text.strip()[:80],
        kind=types.CompletionItemKind.Text,
        detail="Heedful",
        filter_text=word + first_line,
        insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(range=types.Range(start=start, end=cursor), new_text=word + served.text),
        command=accept_command(served),
        sort_text="0",
        preselect=True,
    )
    return types.CompletionList(is_incomplete=True, items=[item])


# -- feedback ------------------------------------------------------------------------------------


async def accept(ls: HeedfulLanguageServer, *args: Any) -> dict[str, Any]:
    completion_id = _completion_id_argument(args, ACCEPT_COMMAND)
    state = ls.followup.state_of(completion_id)
    if EventKind.ACCEPTED in state.outcomes:
        return {"recorded": False, "completionId": completion_id, "reason": "already accepted"}
    fut = ls.record_event(EventKind.ACCEPTED, completion_id, accepted_length=len(state.served.text))
    ls.followup.track_accept(state, state.served.text)
    event_id = await fut
    if event_id is None:
        return {"recorded": False, "completionId": completion_id, "reason": NOT_RECORDING}
    return {"recorded": True, "completionId": completion_id, "eventId": event_id}


def did_show(ls: HeedfulLanguageServer, params: DidShowCompletionParams) -> None:
    completion_id = completion_id_of(params.item)
    state = ls.followup.known(completion_id, "didShowCompletion")
    if state is None:
        return
    if EventKind.SHOWN not in state.outcomes:
        ls.record_event(EventKind.SHOWN, completion_id)


def did_partially_accept(ls: HeedfulLanguageServer, params: DidPartiallyAcceptCompletionParams) -> None:
    completion_id = completion_id_of(params.item)
    state = ls.followup.known(completion_id, "didPartiallyAcceptCompletion")
    if state is None:
        return
    if params.accepted_length < 0:
        log.warning("didPartiallyAcceptCompletion with acceptedLength %d < 0; ignored", params.accepted_length)
        return
    # acceptedLength counts UTF-16 units of the item's insertText (the contract); the store keeps characters.
    # The item may be the rest of the suggestion served again after the developer typed its start
    # (`Followup.typed_through`): then the accepted text runs from the suggestion's own start.
    text = state.served.text
    item_text = params.item.insert_text if isinstance(params.item.insert_text, str) else text
    skip = len(text) - len(item_text) if item_text and text.endswith(item_text) else 0
    chars = code_points_for_units(text[skip:], params.accepted_length, types.PositionEncodingKind.Utf16)
    accepted = text[: skip + chars]
    ls.record_event(EventKind.PARTIAL_ACCEPT, completion_id, accepted_length=len(accepted), kept_text=accepted)
    if accepted:
        ls.followup.track_accept(state, accepted)


def did_reject(ls: HeedfulLanguageServer, params: DidRejectCompletionParams) -> None:
    state = ls.followup.known(params.completion_id, DID_REJECT_COMPLETION)
    if state is None:
        return
    if EventKind.ACCEPTED in state.outcomes or EventKind.REJECTED in state.outcomes:
        log.info("reject of completion %s ignored: it is already %s", params.completion_id, state.outcomes)
        return
    ls.record_event(EventKind.REJECTED, params.completion_id)
    ls.followup.rejected(state)


async def feedback(ls: HeedfulLanguageServer, *args: Any) -> dict[str, Any]:
    identity = ls.require_identity()
    if len(args) != 1 or not isinstance(args[0], dict):
        raise JsonRpcInvalidParams(
            f'{FEEDBACK_COMMAND} takes one argument {{"text": "...", "completionId"?: "..."}}, got {list(args)!r}'
        )
    body = args[0]
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise JsonRpcInvalidParams(
            f'{FEEDBACK_COMMAND}: "text" must be the correction, e.g. "use Flask, not Django"; got {text!r}'
        )
    completion_id = body.get("completionId", ls.followup.latest_completion)
    if completion_id is not None:
        if not isinstance(completion_id, str):
            raise JsonRpcInvalidParams(f'{FEEDBACK_COMMAND}: "completionId" must be a string, got {completion_id!r}')
        ls.followup.state_of(completion_id)
    event_id = await ls.record_event(EventKind.CORRECTION, completion_id, text=text)
    if event_id is None:
        return {"recorded": False, "completionId": completion_id, "reason": NOT_RECORDING}
    ls.services.forget_corrections(identity.developer_id)
    return {"recorded": True, "completionId": completion_id, "eventId": event_id}


# The two learning commands are registered through these, not directly: pygls reads a command's type hints
# to convert its arguments, and this module is where `HeedfulLanguageServer` is a name at run time.
async def learning(ls: HeedfulLanguageServer, *args: Any) -> dict[str, Any]:
    return await learning_command(ls, *args)


async def report(ls: HeedfulLanguageServer, *args: Any) -> dict[str, Any]:
    return await report_command(ls, *args)


def create_server(
    services: Services,
    completions: CompletionService | None = None,
    *,
    report_html: ReportHtml,
    auth: AuthPolicy | None = None,
) -> HeedfulLanguageServer:
    """A server for one connection, with every Heedful handler registered.

    `report_html` renders a developer's report for `heedful.report`. `auth` says how the connection
    proves who it is (`lsp_handlers.auth`; default: stdio, one OS user). A refused `initialize` is
    answered with an error and the connection closes.
    """
    ls = HeedfulLanguageServer(services, completions or CompletionService(services), report_html)
    ls.auth_policy = auth or AuthPolicy()
    ls.feature(types.INITIALIZE)(initialize)
    ls.feature(types.INITIALIZED)(initialized)
    ls.feature(types.SHUTDOWN)(shutdown)
    ls.feature(types.EXIT)(exit_)
    ls.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)(did_change_configuration)
    ls.feature(types.TEXT_DOCUMENT_DID_OPEN)(did_open)
    ls.feature(types.TEXT_DOCUMENT_DID_CHANGE)(did_change)
    ls.feature(types.TEXT_DOCUMENT_DID_CLOSE)(did_close)
    # Registered with options: without them pygls leaves inlineCompletionProvider out of the
    # capabilities, and VS Code's client then never asks for inline completions.
    ls.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())(inline_completion)
    ls.feature(
        types.TEXT_DOCUMENT_COMPLETION,
        types.CompletionOptions(trigger_characters=[".", "(", " ", "\n"], resolve_provider=False),
    )(completion)
    ls.command(ACCEPT_COMMAND)(accept)
    ls.feature(DID_SHOW_COMPLETION)(did_show)
    ls.feature(DID_PARTIALLY_ACCEPT_COMPLETION)(did_partially_accept)
    ls.feature(DID_REJECT_COMPLETION)(did_reject)
    ls.feature(DID_MOVE_CURSOR)(did_move_cursor)
    ls.command(FEEDBACK_COMMAND)(feedback)
    ls.command(LEARNING_COMMAND)(learning)
    ls.command(REPORT_COMMAND)(report)
    return ls


def _completion_id_argument(args: tuple[Any, ...], command: str) -> str:
    if len(args) == 1:
        arg = args[0]
        if isinstance(arg, dict) and isinstance(arg.get("completionId"), str):
            return str(arg["completionId"])
        if isinstance(arg, str):
            return arg
    raise JsonRpcInvalidParams(f'{command} takes one argument {{"completionId": "..."}}, got {list(args)!r}')


def _trailing_word(text: str) -> str:
    i = len(text)
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_"):
        i -= 1
    return text[i:]
