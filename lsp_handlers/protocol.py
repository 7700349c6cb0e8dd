"""The wire contract Heedful adds to LSP, and a protocol class that keeps serving whatever arrives.

Method and command names follow DESIGN.md ("The life of one completion"); editor clients and checks
rely on them, so they live here once.

`HeedfulProtocol` changes three things in pygls' protocol:

- every message gets a JSON-RPC answer it is owed: malformed JSON gets a Parse error (-32700, id null),
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
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest, JsonRpcParseError
from pygls.protocol import LanguageServerProtocol, lsp_method

log = logging.getLogger(__name__)

INLINE_COMPLETION = types.TEXT_DOCUMENT_INLINE_COMPLETION
DID_SHOW_COMPLETION = "textDocument/didShowCompletion"
DID_PARTIALLY_ACCEPT_COMPLETION = "textDocument/didPartiallyAcceptCompletion"
DID_REJECT_COMPLETION = "heedful/didRejectCompletion"
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


CUSTOM_MESSAGES: dict[str, type[Any]] = {
    DID_SHOW_COMPLETION: DidShowCompletionNotification,
    DID_PARTIALLY_ACCEPT_COMPLETION: DidPartiallyAcceptCompletionNotification,
    DID_REJECT_COMPLETION: DidRejectCompletionNotification,
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

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if "jsonrpc" in data and "id" in data and "method" in data:
                log.warning(
                    "request %r (%s) has params that do not fit the method: %s", data["id"], data["method"], exc
                )
                detail = JsonRpcInvalidParams(f"params of {data['method']!r} do not fit the method: {exc.__cause__}")
                self._send_response(data["id"], error=detail.to_response_error())
            else:
                log.warning("notification %s has params that do not fit the method; ignored", data.get("method"))
            return ANSWERED

    def handle_message(self, message: Any) -> None:
        if message is ANSWERED:
            return
        if not attrs.has(type(message)):
            # Not a JSON-RPC 2.0 object (no "jsonrpc", a bare value, a batch array...).
            msg_id = message.get("id") if isinstance(message, dict) else None
            if msg_id is not None and not isinstance(msg_id, str | int):
                msg_id = None
            error = JsonRpcInvalidRequest("expected a JSON-RPC 2.0 object with 'jsonrpc': '2.0' and a 'method'")
            self._send_error(msg_id, error)
            return
        if getattr(message, "jsonrpc", None) != self.VERSION:
            msg_id = getattr(message, "id", None)
            error = JsonRpcInvalidRequest(f"'jsonrpc' must be '2.0', not {getattr(message, 'jsonrpc', None)!r}")
            if msg_id is not None:
                self._send_error(msg_id, error)
            return
        super().handle_message(message)

    def _send_error(self, msg_id: str | int | None, error: JsonRpcException) -> None:
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": error.code, "message": error.message}})

    def answer_parse_error(self, exc: Exception) -> None:
        error = JsonRpcParseError(f"the message body is not valid JSON: {exc}")
        self._send_error(None, error)

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


def is_parse_error(exc: BaseException) -> bool:
    return isinstance(exc, json.JSONDecodeError | UnicodeDecodeError)
