"""The served model's tokenizer, loaded from the model folder on disk (never from a hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LocalTokenizer:
    """Thin wrapper over the Hugging Face tokenizer that encodes without special tokens."""

    def __init__(self, model_path: Path) -> None:
        from transformers import AutoTokenizer

        self._tok: Any = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))

    def special_token(self, text: str) -> int | None:
        """The id of a special token such as `<fim_prefix>`, or None when the vocabulary lacks it."""
        tid = self._tok.convert_tokens_to_ids(text)
        return tid if isinstance(tid, int) and tid != self._tok.unk_token_id else None

    def vocabulary(self) -> set[str]:
        """Every token string the tokenizer knows, added special tokens included (for FIM detection)."""
        return set(self._tok.get_vocab())

    @property
    def eos_token_id(self) -> int | None:
        eid = self._tok.eos_token_id
        return int(eid) if eid is not None else None
