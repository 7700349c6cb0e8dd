"""The wire contract Heedful adds to LSP, and a protocol class that keeps serving whatever arrives.

Method and command names are the wire contract with the editor clients (docs/language-server.md); editor
clients and checks rely on them, so they live here once.

`HeedfulProtocol` changes three things in pygls' protocol:

- every message gets a JSON-RPC answer it is owed: malformed JSON gets a Parse error (-32700, id null),
  bytes that are not a frame (see `lsp_handlers.framing`) an error saying what was wrong with them,
  a message that is not a JSON-RPC object gets Invalid Request (-32600), and a request whose params do
  not fit its method gets Invalid Params (-32602) *with its id*, where pygls would drop it silently;
- Heedful's own notifications are typed (attrs classes), so bad params are reported, not guessed at;
- document sync is left to the server's `DocumentStore` (it needs each edit's offsets), and `exit`
  ends the connection through the server instead of calling `sys.exit` inside the event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator
from typing import Any

import attrs
from lsprotocol import types
from lsprotocol.types import ResponseErrorMessage
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest, JsonRpcParseError
from pygls.protocol import LanguageServerProtocol, lsp_method
from pygls.protocol.json_rpc import JsonRPCNotification, JsonRPCRequestMessage, JsonRPCResponseMessage

from lsp_handlers.framing import FramingError
from server.logs import clip

log = logging.getLogger(__name__)

INLINE_COMPLETION = types.TEXT_DOCUMENT_INLINE_COMPLETION
DID_SHOW_COMPLETION = "textDocument/didShowCompletion"
DID_PARTIALLY_ACCEPT_COMPLETION = "textDocument/didPartiallyAcceptCompletion"
DID_REJECT_COMPLETION = "heedful/didRejectCompletion"
DID_MOVE_CURSOR = "heedful/didMoveCursor"
STATUS = "heedful/status"
ACCEPT_COMMAND = "heedful.acceptCompletion"
FEEDBACK_COMMAND = "heedful.feedback"


@attrs.define
class DidShowCompletionParams:
    """The editor showed `item` (as it was served, command included)."""

    item: types.InlineCompletionItem


@attrs.define
class DidPartiallyAcceptCompletionParams:
    """The editor accepted the first `accepted_length` UTF-16 units of `item.insertText`."""

    item: types.InlineCompletionItem
    accepted_length: int


@attrs.define
class DidRejectCompletionParams:
    """The developer dismissed the suggestion with this id."""

    completion_id: str


@attrs.define
class DidMoveCursorParams:
    """The developer's cursor came to rest at `position` in the open document `text_document` (sent when it
    comes to rest on another line or in another document)."""

    text_document: types.TextDocumentIdentifier
    position: types.Position


@attrs.define
class DidShowCompletionNotification:
    params: DidShowCompletionParams
    method: str = DID_SHOW_COMPLETION
    jsonrpc: str = "2.0"


@attrs.define
class DidPartiallyAcceptCompletionNotification:
    params: DidPartiallyAcceptCompletionParams
    method: str = DID_PARTIALLY_ACCEPT_COMPLETION
    jsonrpc: str = "2.0"


@attrs.define
class DidRejectCompletionNotification:
    params: DidRejectCompletionParams
    method: str = DID_REJECT_COMPLETION
    jsonrpc: str = "2.0"


@attrs.define
class DidMoveCursorNotification:
    params: DidMoveCursorParams
    method: str = DID_MOVE_CURSOR
    jsonrpc: str = "2.0"


CUSTOM_MESSAGES: dict[str, type[Any]] = {
    DID_SHOW_COMPLETION: DidShowCompletionNotification,
    DID_PARTIALLY_ACCEPT_COMPLETION: DidPartiallyAcceptCompletionNotification,
    DID_REJECT_COMPLETION: DidRejectCompletionNotification,
    DID_MOVE_CURSOR: DidMoveCursorNotification,
}


class _Answered:
    """Stands in for a message that was already answered with an error while it was parsed."""


ANSWERED = _Answered()


def completion_id_of(item: types.InlineCompletionItem) -> str:
    """The completion id an item carries in its accept command, or a JsonRpcInvalidParams naming the fix."""
    args = item.command.arguments if item.command is not None else None
    if args:
        first = args[0]
        if isinstance(first, dict) and isinstance(first.get("completionId"), str):
            return str(first["completionId"])
        if isinstance(first, str):
            return first
    raise JsonRpcInvalidParams(
        "item.command.arguments[0].completionId is missing: send the item back as the server served it "
        f'(command {ACCEPT_COMMAND!r} with arguments [{{"completionId": ...}}])'
    )


class HeedfulProtocol(LanguageServerProtocol):
    def get_message_type(self, method: str) -> type[Any] | None:  # type: ignore[override]
        custom = CUSTOM_MESSAGES.get(method)
        if custom is not None:
            return custom
        return super().get_message_type(method)

    def receive(self, body: bytes) -> None:
        """Handle one message body from the client (`lsp_handlers.framing` cut it from the stream).

        Only the top-level object is structured: pygls' reader structures every nested object that has
        a "jsonrpc" key as a message of its own.
        """
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past the parser's depth
            log.warning("a message body that is not JSON (%d bytes): %s", len(body), exc)
            self.answer_parse_error(exc)
            return
        try:
            self.handle_message(self.structure_message(data) if isinstance(data, dict) else data)
        except RecursionError:
            log.warning("a message nested too deeply to handle (%d bytes); ignored", len(body))
            self._send_error(_request_id(data), JsonRpcInvalidRequest("the message is nested too deeply"))

    def structure_message(self, data: dict[str, Any]) -> Any:
        """The typed message for `data`, as pygls' `structure_message` builds it; params that do not fit
        the method are answered with Invalid Params (requests) or logged (notifications), in one line."""
        if "jsonrpc" not in data:
            return data
        method: Any = data.get("method")
        try:
            kind: Any
            if "id" in data and "error" in data:
                kind = ResponseErrorMessage
            elif "id" in data and "method" in data:
                kind = self.get_message_type(method) or JsonRPCRequestMessage
            elif "id" in data:
                kind = self._result_types.pop(data["id"], None) or JsonRPCResponseMessage
            else:
                kind = self.get_message_type(method or "") or JsonRPCNotification
            return self._converter.structure(data, kind)
        except Exception as exc:  # cattrs' validation errors, an unhashable method or id, ...
            reason = exc.__cause__ or exc
            if "id" in data and "method" in data:
                msg_id = _request_id(data)
                log.warning("request %r (%s) has params that do not fit the method: %s", msg_id, method, reason)
                detail = JsonRpcInvalidParams(
                    f"params of {clip(str(method))!r} do not fit the method: {clip(str(reason))}"
                )
                self._send_response(msg_id, error=detail.to_response_error())  # type: ignore[arg-type]
            else:
                log.warning("message %s does not fit JSON-RPC or its method; ignored: %s", method, reason)
            return ANSWERED

    def handle_message(self, message: Any) -> None:
        if message is ANSWERED:
            return
        if not attrs.has(type(message)):
            # Not a JSON-RPC 2.0 object (no "jsonrpc", a bare value, a batch array...).
            error = JsonRpcInvalidRequest("expected a JSON-RPC 2.0 object with 'jsonrpc': '2.0' and a 'method'")
            self._send_error(_request_id(message), error)
            return
        if hasattr(message, "id") and _request_id({"id": message.id}) is None:
            # An id that is not a string or an integer (a list, an object, a float, null, a boolean).
            if getattr(message, "method", None) is not None:
                error = JsonRpcInvalidRequest("'id' must be a string or an integer")
                self._send_error(None, error)
            log.warning("a message whose id is not a string or an integer (%s); ignored", type(message.id).__name__)
            return
        if hasattr(message, "method") and not isinstance(message.method, str):
            log.warning("a message whose method is not a string (%s); ignored", type(message.method).__name__)
            if hasattr(message, "id"):
                self._send_error(message.id, JsonRpcInvalidRequest("'method' must be a string"))
            return
        if getattr(message, "jsonrpc", None) != self.VERSION:
            msg_id = getattr(message, "id", None)
            error = JsonRpcInvalidRequest(
                f"'jsonrpc' must be '2.0', not {clip(repr(getattr(message, 'jsonrpc', None)))}"
            )
            if msg_id is not None:
                self._send_error(msg_id, error)
            return
        super().handle_message(message)

    def _send_error(self, msg_id: str | int | None, error: JsonRpcException) -> None:
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": error.code, "message": error.message}})

    def answer_parse_error(self, exc: Exception) -> None:
        error = JsonRpcParseError(f"the message body is not valid JSON: {clip(str(exc))}")
        self._send_error(None, error)

    def answer_framing_error(self, error: FramingError) -> None:
        """Tell the client what was wrong with its bytes (the reader has already skipped them)."""
        self._send_data({"jsonrpc": "2.0", "id": error.msg_id, "error": {"code": error.code, "message": error.message}})

    # -- documents: the server's DocumentStore applies them; pygls' workspace stays unused --------

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(types.EXIT)) is not None:
            yield handler, args, None


def _request_id(data: Any) -> str | int | None:
    """The id to answer a message with: its own when it is a valid JSON-RPC id, else null."""
    msg_id = data.get("id") if isinstance(data, dict) else None
    return msg_id if isinstance(msg_id, str | int) and not isinstance(msg_id, bool) else None


def is_parse_error(exc: BaseException) -> bool:
    return isinstance(exc, json.JSONDecodeError | UnicodeDecodeError)
