"""Scrub secrets and unstorable characters from text before it reaches the store.

Every text field (prompts, candidates, kept text, corrections, rollout context) passes through
`Redactor.clean` before it is written: secrets are replaced by `[REDACTED:<kind>]`, lone UTF-16
surrogates and NUL characters (which neither SQLite's UTF-8 nor PostgreSQL's text can hold) become
U+FFFD, and texts longer than `MAX_TEXT_CHARS` are cut with a visible marker. This module never logs
the text it scrubs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_TEXT_CHARS = 256 * 1024
REPLACEMENT = "\ufffd"

# (kind, pattern). Token formats by their documented shape (prefix, alphabet, length); patterns that
# match an assignment keep the name and replace only the value.
BUILTIN_PATTERNS: list[tuple[str, str]] = [
    ("private-key", r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"),
    ("aws-access-key", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"),
    (
        "aws-secret-key",
        r"(?i)(?<=aws_secret_access_key)(\s*[:=]\s*[\"']?)[A-Za-z0-9/+=]{40}",
    ),
    ("gcp-api-key", r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    ("github-token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
    # Hugging Face user (`hf_`) and organization (`api_org_`) tokens: 34 letters (digits tolerated).
    ("huggingface-token", r"\b(?:hf|api_org)_[A-Za-z0-9]{34}\b"),
    # GitLab personal access tokens: 20 characters, or a longer routable token with dot-separated parts.
    ("gitlab-token", r"\bglpat-[0-9A-Za-z_\-]{20,}(?:\.[0-9A-Za-z_\-]+)*"),
    # npm access tokens: 36 alphanumerics (30 random, 6 of checksum).
    ("npm-token", r"\bnpm_[A-Za-z0-9]{36}\b"),
    ("slack-token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
    ("openai-key", r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_\-]{20,}\b"),
    ("stripe-key", r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b"),
    ("azure-key", r"(?i)(?<=AccountKey=)[A-Za-z0-9+/=]{40,}"),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\b"),
    ("bearer-token", r"(?i)(?<=\bbearer\s)(?!\[REDACTED:)[A-Za-z0-9\-._~+/]{16,}=*"),
    # A secret name given a string literal: `token = "..."`, `SECRET_KEY='...'`, `"password": "..."`,
    # `os.environ["API_KEY"] = "..."`, `password: str = "..."`, `secret := "..."`. Whether the name is a
    # secret's is decided by `is_secret_name` (this pattern finds every assignment of a literal).
    (
        "password",
        r"(?<![\w.])(?P<name>[A-Za-z_][\w.\-]{0,100})(?P<sep>[\"']?\]?(?:\s*:\s*[A-Za-z_][\w.\[\], |]{0,80}?)?"
        r"\s*(?::=|=>|[:=])\s*)(?P<quote>[\"'`])(?!\[REDACTED:)(?:\\.|(?!(?P=quote))[^\\\n])+(?P=quote)",
    ),
    # Env-style, unquoted: `MYSQL_PASSWORD=x`, `export FOO_SECRET=...`, `--password=...`, `?access_token=...&`.
    # The value must be a literal: it ends at a blank, `;`, `&` or `|`, and a value holding a call, an
    # index, a variable reference or a quote (`getpass()`, `tokens[0]`, `${X}`) is an expression and kept.
    (
        "password",
        r"(?<![\w.])(?P<name>[A-Za-z_][\w.\-]{0,100})(?P<sep>=)(?P<quote>)"
        r"[^\s\"'`$(){}\[\]<>;,&|=\\]+(?=$|[\s;&|])",
    ),
    ("url-password", r"(?<=://)([^/\s:@]+):(?!\[REDACTED:)([^/\s@]{3,})(?=@)"),
]

# Words that make a name a secret's when they end it (`MYSQL_PASSWORD`, `apiToken`), optionally followed
# by one of `_SECRET_SUFFIXES` (`SECRET_KEY`, `SECRET_KEY_BASE`). `key` alone is not one (`key = "id"`).
_SECRET_WORDS = frozenset(
    {"password", "passwd", "pwd", "pass", "passphrase", "secret", "token", "credential", "credentials", "apikey"}
)
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret", "signing", "encryption", "master", "client"})
_SECRET_SUFFIXES = frozenset({"key", "base", "value"})
_NAME_PARTS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def is_secret_name(name: str) -> bool:
    """Whether an assigned name holds a secret: its last word (after `_`, `.`, `-` or camelCase splits,
    past a trailing `key`/`base`/`value`) is a secret word, or it ends in `<qualifier> key` (`api_key`,
    `privateKey`). `token_count`, `max_tokens`, `PASSWORD_FILE` and `tokenizer` are not secret names."""
    parts = [p.lower() for p in _NAME_PARTS.findall(name)]
    if parts[-2:-1] and parts[-1] == "key" and parts[-2] in _KEY_QUALIFIERS:
        return True
    while len(parts) > 1 and parts[-1] in _SECRET_SUFFIXES:
        parts.pop()
    return bool(parts) and parts[-1] in _SECRET_WORDS


@dataclass(slots=True)
class Cleaned:
    text: str
    redacted: bool  # a secret was replaced
    truncated: bool  # the text was cut to MAX_TEXT_CHARS
    repaired: bool  # surrogates or NULs were replaced


class Redactor:
    """Applies the built-in patterns plus an admin's `privacy.redact_patterns`."""

    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        compiled = [(kind, re.compile(p)) for kind, p in BUILTIN_PATTERNS]
        compiled += [("custom", re.compile(p)) for p in extra_patterns]
        self._patterns = compiled

    def redact(self, text: str) -> tuple[str, bool]:
        changed = False
        for kind, pattern in self._patterns:
            # Compared, not counted: an assignment whose name is not a secret's matches and stays as it was.
            replaced = pattern.sub(functools.partial(_replacement, kind=kind), text)
            changed = changed or replaced != text
            text = replaced
        return text, changed

    def clean(self, text: str | bytes | None, *, limit: int = MAX_TEXT_CHARS) -> Cleaned:
        if text is None:
            return Cleaned("", False, False, False)
        repaired = False
        if isinstance(text, bytes):
            decoded = text.decode("utf-8", errors="replace")
            repaired = decoded.encode("utf-8") != text
            text = decoded
        fixed = _UNSTORABLE.sub(REPLACEMENT, text)
        repaired = repaired or fixed != text
        redacted_text, redacted = self.redact(fixed)
        truncated = len(redacted_text) > limit
        if truncated:
            marker = f"\n[TRUNCATED: {len(redacted_text) - limit} more characters not stored]"
            redacted_text = redacted_text[: max(0, limit - len(marker))] + marker
        return Cleaned(redacted_text, redacted, truncated, repaired)


@functools.lru_cache(maxsize=256)
def redactor_for(patterns: tuple[str, ...]) -> Redactor:
    """One `Redactor` per pattern set: sessions of the same team share it instead of compiling the
    patterns again for every session (the set is small: global + team + developer patterns)."""
    return Redactor(patterns)


_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")


def _replacement(match: re.Match[str], kind: str) -> str:
    if kind == "password":
        if not is_secret_name(match["name"]):
            return match.group(0)
        return f"{match['name']}{match['sep']}{match['quote']}[REDACTED:password]{match['quote']}"
    if kind == "url-password":
        return f"{match.group(1)}:[REDACTED:password]"
    if kind == "aws-secret-key":
        return f"{match.group(1)}[REDACTED:{kind}]"
    return f"[REDACTED:{kind}]"
