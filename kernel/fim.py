"""Fill-in-the-middle prompt formats and token healing: how a code model is asked for the text between a
prefix and a suffix, shared by serving (`lsp_handlers.context`) and by learning's ability gate and
trainer, which must ask the model exactly the way serving does. Pure functions, no Heedful imports."""

from __future__ import annotations

import re
from collections.abc import Collection

# Template -> the special tokens that must all be in the tokenizer's vocabulary for "auto" to pick it.
# Order matters: "auto" takes the first whose tokens are all present.
KNOWN_FIM_TEMPLATES: dict[str, tuple[str, ...]] = {
    # StarCoder, StarCoder2, StableCode, Granite-Code (and other BigCode-tokenizer models).
    "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    # SantaCoder spells its FIM tokens with hyphens.
    "<fim-prefix>{prefix}<fim-suffix>{suffix}<fim-middle>": ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    # Qwen2.5-Coder (and CodeGemma, which uses the same three tokens).
    "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>": (
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
    ),
    # CodeLlama: Meta's prompt layout; its vocabulary holds the pieces "▁<PRE>", "▁<SUF>", "▁<MID>" (ids
    # 32007-32009, with U+2581 in front), not "<PRE>".
    "<PRE> {prefix} <SUF>{suffix} <MID>": ("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>"),
    # DeepSeek-Coder: full-width bars (U+FF5C) and U+2581 inside the token names.
    "<\uff5cfim\u2581begin\uff5c>{prefix}<\uff5cfim\u2581hole\uff5c>{suffix}<\uff5cfim\u2581end\uff5c>": (
        "<\uff5cfim\u2581begin\uff5c>",
        "<\uff5cfim\u2581hole\uff5c>",
        "<\uff5cfim\u2581end\uff5c>",
    ),
}

_PLACEHOLDER = re.compile(r"\{prefix\}|\{suffix\}")


def check_template(template: str) -> None:
    """Raise ValueError unless `template` holds {prefix} and {suffix} exactly once each."""
    if template.count("{prefix}") != 1 or template.count("{suffix}") != 1:
        raise ValueError(
            f"fill-in-the-middle template {template!r} is not valid: it must contain {{prefix}} and {{suffix}} "
            "exactly once each"
        )


def split_blanks(text: str) -> tuple[str, str]:
    """`text` without the spaces and tabs it ends in, and those blanks."""
    kept = text.rstrip(" \t")
    return kept, text[len(kept) :]


def unheal(text: str, healed: str, *, blank_line: bool) -> tuple[str, str]:
    """What the model wrote after a healed prompt, split into (what stands for the blanks taken off the
    prompt, the suggestion at the cursor). On a cursor line of blanks only (`blank_line`) a model that starts
    with a line break means the code after it, which belongs on the cursor's line: leading line breaks go
    first. Then the healed blanks when the text starts with them, else whatever blanks it starts with (a
    model that indents less than the cursor still writes its code at the cursor).
    """
    rest = text.lstrip("\r\n") if healed and blank_line else text
    blanks = healed if rest.startswith(healed) else rest[: len(rest) - len(rest.lstrip(" \t"))]
    cut = len(text) - len(rest) + len(blanks)
    return text[:cut], text[cut:]


def fill_template(template: str, prefix: str, suffix: str) -> str:
    """The template with its two placeholders replaced, in one pass (text inside prefix is never re-scanned)."""
    return _PLACEHOLDER.sub(lambda m: prefix if m.group(0) == "{prefix}" else suffix, template)


def fim_template_for(setting: str, vocabulary: Collection[str]) -> str | None:
    """The FIM template to use for `model.fim_template` = `setting`, or None for prefix-only prompts.

    - "none": None.
    - "auto": the first of `KNOWN_FIM_TEMPLATES` whose special tokens are all in `vocabulary` (e.g. the keys
      of `tokenizer.get_vocab()`), else None (SmolLM2 has no FIM tokens, so it runs prefix-only).
    - a template containing {prefix} and {suffix} (once each): the template itself.

    Anything else raises ValueError naming the value and the allowed forms.
    """
    keyword = setting.strip().lower()
    if keyword == "none":
        return None
    if keyword == "auto":
        for template, tokens in KNOWN_FIM_TEMPLATES.items():
            if all(token in vocabulary for token in tokens):
                return template
        return None
    if "{prefix}" in setting and "{suffix}" in setting:
        check_template(setting)
        return setting
    raise ValueError(
        f"model.fim_template = {setting!r} is not valid: use 'auto', 'none', or a template containing "
        "{prefix} and {suffix}"
    )


# Repository formats: the token a model puts before each file's path when it reads several files of one
# repository (Qwen2.5-Coder; StarCoder2 spells it without bars).
KNOWN_FILE_SEPARATORS = ("<|file_sep|>", "<file_sep>")


def file_separator_for(vocabulary: Collection[str]) -> str | None:
    """The first of `KNOWN_FILE_SEPARATORS` in the model's `vocabulary`, or None (no repository format)."""
    return next((token for token in KNOWN_FILE_SEPARATORS if token in vocabulary), None)


# Line-comment syntax by LSP languageId (plus a few ids editors send that the LSP list lacks): (open, close).
