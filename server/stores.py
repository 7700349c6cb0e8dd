"""The store opened from settings: the one place where `database` and `privacy` settings become the plain
values storage takes (storage imports nothing of the settings)."""

from __future__ import annotations

from kernel.settings import Settings
from storage.store import RolloutStore, StoreOptions, Tokenize, WritePolicy


def store_options(settings: Settings) -> StoreOptions:
    return StoreOptions(
        url=settings.database.url,
        busy_timeout_s=settings.database.busy_timeout_s,
        redact_patterns=tuple(settings.privacy.redact_patterns),
        store_prompts=settings.privacy.store_prompts,
        retention_days=settings.privacy.retention_days,
    )


def write_policy(settings: Settings) -> WritePolicy:
    """What the store keeps of a session whose resolved settings are `settings`."""
    return store_options(settings).policy()


async def open_store(
    settings: Settings, *, tokenize: Tokenize | None = None, apply_retention: bool = True
) -> RolloutStore:
    """Open (and upgrade) the database of `settings`; delete rows older than `privacy.retention_days`."""
    return await RolloutStore.open(store_options(settings), tokenize=tokenize, apply_retention=apply_retention)
