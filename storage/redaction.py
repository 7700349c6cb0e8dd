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

# (kind, pattern). Patterns that match an assignment keep the name and replace only the value.
BUILTIN_PATTERNS: list[tuple[str, str]] = [
    ("private-key", r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"),
    ("aws-access-key", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"),
    (
        "aws-secret-key",
        r"(?i)(?<=aws_secret_access_key)(\s*[:=]\s*[\"']?)[A-Za-z0-9/+=]{40}",
    ),
    ("gcp-api-key", r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    ("github-token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
    ("slack-token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
    ("openai-key", r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_\-]{20,}\b"),
    ("stripe-key", r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b"),
    ("azure-key", r"(?i)(?<=AccountKey=)[A-Za-z0-9+/=]{40,}"),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\b"),
    ("bearer-token", r"(?i)(?<=\bbearer\s)[A-Za-z0-9\-._~+/]{16,}=*"),
    (
        "password",
        r"(?i)(?<![A-Za-z0-9])((?:password|passwd|pwd|passphrase|secret|api_key|apikey|auth_token|access_token)"
        r"[\"']?\s*[:=]\s*)([\"'])(?!\2)[^\"'\n]{3,}\2",
    ),
    ("url-password", r"(?<=://)([^/\s:@]+):([^/\s@]{3,})(?=@)"),
]


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
            text, n = pattern.subn(functools.partial(_replacement, kind=kind), text)
            changed = changed or n > 0
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


_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")


def _replacement(match: re.Match[str], kind: str) -> str:
    if kind == "password":
        return f"{match.group(1)}{match.group(2)}[REDACTED:password]{match.group(2)}"
    if kind == "url-password":
        return f"{match.group(1)}:[REDACTED:password]"
    if kind == "aws-secret-key":
        return f"{match.group(1)}[REDACTED:{kind}]"
    return f"[REDACTED:{kind}]"
