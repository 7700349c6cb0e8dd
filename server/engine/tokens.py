"""The served model's tokenizer, loaded from the model folder on disk (never from a hub).

It reads the folder's `tokenizer.json` with the `tokenizers` library directly: the same encoding and
decoding as Hugging Face's fast tokenizer for the models Heedful prepares (a test compares them on real
code), without importing transformers and torch, which took seconds and hundreds of MB in every
`heedful serve` and every waiting training worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    """The model folder's tokenizer files are missing or unreadable."""


class LocalTokenizer:
    """The model's tokenizer: encodes without special tokens, decodes skipping them."""

    def __init__(self, model_path: Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(model_path)
        path = folder / "tokenizer.json"
        try:
            self._tok: Any = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises its own Exception type for a missing or bad file
            raise TokenizerError(
                f"cannot read the tokenizer {path}: {exc}; run `heedful model prepare` to prepare the model again"
            ) from None
        eos = _config_token(folder / "tokenizer_config.json", "eos_token")
        self._eos_token_id: int | None = self._tok.token_to_id(eos) if eos else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        """`encode(text)`, and where each token ends in `text` (a character offset)."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return list(encoding.ids), [end for _, end in encoding.offsets]

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))

    def special_token(self, text: str) -> int | None:
        """The id of a special token such as `<fim_prefix>`, or None when the vocabulary lacks it."""
        tid = self._tok.token_to_id(text)
        return int(tid) if tid is not None else None

    def vocabulary(self) -> set[str]:
        """Every token string the tokenizer knows, added special tokens included (for FIM detection)."""
        return set(self._tok.get_vocab(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id


def _config_token(path: Path, key: str) -> str | None:
    """A special token named in `tokenizer_config.json` (a string, or an object with its `content`)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise TokenizerError(
            f"cannot read {path}: {exc}; run `heedful model prepare` to prepare the model again"
        ) from None
    value = config.get(key) if isinstance(config, dict) else None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
