"""Access tokens: who a connection to a shared `heedful serve --tcp` is.

An admin creates a token for a developer (`heedful token add --developer alice --team backend`); the
developer's editor sends it as `initializationOptions.token`, and the server takes the developer and team
from the token, not from what the client claims. Only the token's sha256 is stored, so the database (or a
copy of it) does not admit anyone; the token itself is shown once, when it is created. Its first
characters (`prefix`) name it in listings and revocations.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select

from storage.db import StoreError
from storage.models import DEVELOPER_ID_CHARS, TEAM_ID_CHARS, AccessToken, as_utc, utcnow

if TYPE_CHECKING:
    from storage.store import RolloutStore

TOKEN_MARK = "heedful_"
PREFIX_CHARS = 14  # "heedful_" and six characters of the secret: enough to tell a developer's tokens apart
LABEL_CHARS = 200


def new_token() -> str:
    """A fresh token: the mark, then 32 random bytes in URL-safe base64 (256 bits)."""
    return TOKEN_MARK + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_id(key: str, value: object, limit: int, *, required: bool = True) -> str | None:
    """`value` as an identity string (developer, team, session id) or a ValueError naming `key` and the fix."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit or not value.isprintable():
        shown = value if not isinstance(value, str) or len(value) <= 80 else f"{value[:80]}... ({len(value)} chars)"
        raise ValueError(
            f"{key} = {shown!r} is not valid: expected a non-empty string of at most {limit} printable characters"
        )
    return value


@dataclass(frozen=True, slots=True)
class TokenInfo:
    prefix: str
    developer_id: str
    team_id: str | None
    label: str | None
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: AccessToken) -> TokenInfo:
        revoked = None if row.revoked_at is None else as_utc(row.revoked_at)
        return cls(row.prefix, row.developer_id, row.team_id, row.label, as_utc(row.created_at), revoked)


async def create_token(
    store: RolloutStore, developer_id: str, team_id: str | None = None, label: str | None = None
) -> tuple[str, TokenInfo]:
    """A new token for `developer_id` (and `team_id`): (the token, shown only now; what is stored of it)."""
    try:
        check_id("--developer", developer_id, DEVELOPER_ID_CHARS)
        check_id("--team", team_id, TEAM_ID_CHARS, required=False)
        if label is not None and len(label) > LABEL_CHARS:
            raise ValueError(f"--label is {len(label)} characters long: keep it to {LABEL_CHARS}")
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    token = new_token()
    row = AccessToken(
        sha256=token_digest(token),
        prefix=token[:PREFIX_CHARS],
        developer_id=developer_id,
        team_id=team_id,
        label=label,
        created_at=utcnow(),
    )
    async with store.unit() as s:
        s.add(row)
        await s.flush()
        info = TokenInfo.of(row)
    return token, info


async def identity_of(store: RolloutStore, token: str) -> TokenInfo | None:
    """The live (not revoked) token `token` is, or None."""
    async with store.unit() as s:
        row = await s.get(AccessToken, token_digest(token))
        if row is None or row.revoked_at is not None:
            return None
        return TokenInfo.of(row)


async def has_tokens(store: RolloutStore, developer_id: str) -> bool:
    """Whether `developer_id` has a live token: then only a connection presenting one may be them."""
    async with store.unit() as s:
        found = await s.scalar(
            select(AccessToken.sha256)
            .where(AccessToken.developer_id == developer_id, AccessToken.revoked_at.is_(None))
            .limit(1)
        )
    return found is not None


async def list_tokens(store: RolloutStore, developer_id: str | None = None) -> list[TokenInfo]:
    query = select(AccessToken).order_by(AccessToken.developer_id, AccessToken.created_at)
    if developer_id is not None:
        query = query.where(AccessToken.developer_id == developer_id)
    async with store.unit() as s:
        return [TokenInfo.of(row) for row in await s.scalars(query)]


async def revoke_tokens(store: RolloutStore, *, prefix: str | None = None, developer_id: str | None = None) -> int:
    """Revoke the live tokens whose prefix starts with `prefix` or that belong to `developer_id`; how many."""
    if (prefix is None) == (developer_id is None):
        raise StoreError("name the tokens to revoke: a token prefix (as `heedful token list` shows) or --developer ID")
    if prefix is not None and len(prefix) < PREFIX_CHARS:
        raise StoreError(
            f"token prefix {prefix!r} is too short: give its first {PREFIX_CHARS} characters, as `heedful token "
            "list` shows them (or the whole token)"
        )
    query = select(AccessToken).where(AccessToken.revoked_at.is_(None))
    if prefix is not None:
        query = query.where(AccessToken.prefix == prefix[:PREFIX_CHARS])
    else:
        query = query.where(AccessToken.developer_id == developer_id)
    now = utcnow()
    async with store.unit() as s:
        rows = list(await s.scalars(query))
        for row in rows:
            row.revoked_at = now
    return len(rows)
