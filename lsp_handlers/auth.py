"""Who a connection is: the identity a session gets at `initialize`, and when a claim is refused.

Over stdio the server runs for the one OS user who started it (an editor spawned it), so the developer and
team are what `initializationOptions` says. Over TCP anyone who can reach the port could say anything, so:

- a developer token (`heedful token add`) names its developer and team; a claim that contradicts it is
  refused;
- the shared `server.tcp_token` admits a connection whose developer is what it claims, unless that
  developer has a token of their own (then only a connection presenting one may be them);
- on loopback, a connection with no token is admitted on the same terms as the shared token, unless
  `server.require_tokens` is on: then every TCP connection must present a developer token.

A refused `initialize` is answered with `ConnectionRefused` and the connection closes. Ids longer than
the store can hold are refused at `initialize` with the limit, so a session never starts and then fails
to be written.
"""

from __future__ import annotations

import getpass
import hmac
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams

from server.logs import clip
from storage.models import CLIENT_NAME_CHARS, CLIENT_VERSION_CHARS, DEVELOPER_ID_CHARS, SESSION_ID_CHARS, TEAM_ID_CHARS
from storage.store import RolloutStore
from storage.tokens import check_id, has_tokens, identity_of

log = logging.getLogger(__name__)

# `initializationOptions.cursorRest`: how the editor says where the developer's cursor came to rest (the server
# reads the text before it meanwhile). "didMoveCursor": it sends `heedful/didMoveCursor` (the Heedful clients);
# "documentHighlight" (default): the server asks for the standard `textDocument/documentHighlight`, which editors
# send where the cursor rests to highlight the symbol under it (JetBrains IDEs through LSP4IJ), and answers it
# with no highlights.
CURSOR_REST_SIGNALS = ("didMoveCursor", "documentHighlight")
CURSOR_REST_DEFAULT = "documentHighlight"


class ConnectionRefused(JsonRpcException):
    """The connection may not be who it says it is (or did not say it with a token)."""

    CODE = -32001  # implementation-defined server error: not InvalidParams, so clients do not retry as is


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """How one connection proves who it is."""

    tcp: bool = False  # False: stdio, the server runs for one OS user
    loopback: bool = True  # a TCP listener bound to this machine only
    shared_token: str | None = None  # server.tcp_token, if set
    require_tokens: bool = False  # server.require_tokens: every TCP connection presents a developer token

    @property
    def needs_token(self) -> bool:
        return self.tcp and (self.require_tokens or not self.loopback)


@dataclass(frozen=True, slots=True)
class Claim:
    """What `initializationOptions` says, checked against the store's limits."""

    developer_id: str
    session_id: str
    team_id: str | None
    token: object  # a string when given; anything else is refused over TCP (stdio ignores it)
    settings: Any
    developer_given: bool
    cursor_rest: str = CURSOR_REST_DEFAULT  # how the editor says where the cursor rests (`CURSOR_REST_SIGNALS`)


@dataclass(frozen=True, slots=True)
class Admitted:
    developer_id: str
    team_id: str | None
    session_id: str
    via: str  # "os-user" (stdio), "developer-token", "shared-token", "loopback"


def parse_claim(options: Any) -> Claim:
    """The identity `initializationOptions` claims; ids the store cannot hold raise InvalidParams."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise JsonRpcInvalidParams(
            'initializationOptions must be an object like {"developerId": "alice", "team": "backend"}'
        )
    given = options.get("developerId")
    developer = given if given is not None else getpass.getuser()
    session = options.get("sessionId") or f"s-{uuid.uuid4().hex}"
    team = options.get("team")
    try:
        check_id("initializationOptions.developerId", developer, DEVELOPER_ID_CHARS)
        check_id("initializationOptions.sessionId", session, SESSION_ID_CHARS)
        check_id("initializationOptions.team", team, TEAM_ID_CHARS, required=False)
    except ValueError as exc:
        raise JsonRpcInvalidParams(str(exc)) from None
    rest = options.get("cursorRest", CURSOR_REST_DEFAULT)
    if rest not in CURSOR_REST_SIGNALS:
        raise JsonRpcInvalidParams(
            f"initializationOptions.cursorRest is {clip(repr(rest), 80)}: it says how the editor tells where the "
            f'cursor rests, "didMoveCursor" (it sends heedful/didMoveCursor) or "documentHighlight" (the default: '
            f"it asks textDocument/documentHighlight there); give one of them or leave it out"
        )
    return Claim(developer, session, team, options.get("token"), options.get("settings"), given is not None, rest)


def check_client_info(name: str | None, version: str | None) -> None:
    """clientInfo is stored with the session: refuse what the store cannot hold, naming the limit."""
    for key, value, limit in (("name", name, CLIENT_NAME_CHARS), ("version", version, CLIENT_VERSION_CHARS)):
        if value is not None and len(value) > limit:
            raise JsonRpcInvalidParams(
                f"clientInfo.{key} is {len(value)} characters long; the server keeps at most {limit}: shorten it"
            )


def _refuse(message: str) -> ConnectionRefused:
    log.warning("connection refused: %s", message)
    return ConnectionRefused(message)


async def admit(policy: AuthPolicy, claim: Claim, store: RolloutStore) -> Admitted:
    """The identity this connection is served as, or ConnectionRefused saying why and what to do."""
    if not policy.tcp:
        return Admitted(claim.developer_id, claim.team_id, claim.session_id, "os-user")
    token = claim.token
    if token is not None and not isinstance(token, str):
        raise _refuse(
            f"initializationOptions.token is a {type(token).__name__}, not a string: send the token the admin gave "
            "you as a string"
        )
    if token:
        info = await identity_of(store, token)
        if info is not None:
            if claim.developer_given and claim.developer_id != info.developer_id:
                raise _refuse(
                    f"initializationOptions.developerId is {claim.developer_id!r} but the token belongs to another "
                    "developer: send your own token, or leave developerId out"
                )
            if claim.team_id is not None and claim.team_id != info.team_id:
                raise _refuse(
                    f"initializationOptions.team is {claim.team_id!r} but the token's team is {info.team_id!r}: "
                    "leave team out (the token names it), or ask the admin for a token of that team"
                )
            return Admitted(info.developer_id, info.team_id, claim.session_id, "developer-token")
        shared = policy.shared_token
        if not (shared and not policy.require_tokens and hmac.compare_digest(token.encode(), shared.encode())):
            raise _refuse(
                "initializationOptions.token is wrong: not a token this server knows (unknown, revoked or mistyped); "
                "ask the admin for yours (`heedful token add --developer ID`)"
            )
        via = "shared-token"
    elif policy.needs_token:
        what = (
            "your developer token" if policy.require_tokens else "your developer token or the server's server.tcp_token"
        )
        raise _refuse(
            f"initializationOptions.token is missing: this Heedful server needs {what} there (ask the admin; "
            "`heedful token add --developer ID` creates one)"
        )
    else:
        via = "loopback"
    if await has_tokens(store, claim.developer_id):
        raise _refuse(
            f"developer {claim.developer_id!r} has a token of their own: present it as initializationOptions.token"
        )
    return Admitted(claim.developer_id, claim.team_id, claim.session_id, via)
