"""`LocalTokenizer` reads `tokenizer.json` with the `tokenizers` library instead of loading transformers'
AutoTokenizer: on both prepared models it must encode and decode exactly as transformers does, on code
nobody on the project wrote (standard-library modules), on text with special tokens and non-ASCII, and on
random token sequences."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest

from server.engine.tokens import LocalTokenizer, TokenizerError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap.py", "json/decoder.py", "argparse.py", "email/utils.py", "difflib.py", "locale.py"]
ODD = [
    "",
    " ",
    "\n\n   \t",
    "héllo wörld ∑ 😀 \u2018quotes\u2019 \u00a0nbsp",
    "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>",
    "<|endoftext|>x<|im_end|><|im_start|>",
]


@pytest.mark.parametrize("fixture", ["default_model", "small_model"])
def test_encodes_and_decodes_as_transformers_does(fixture: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoTokenizer

    model: Path = request.getfixturevalue(fixture)
    ours = LocalTokenizer(model)
    theirs = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    texts = list(ODD)
    for name in MODULES:
        source = (STDLIB / name).read_text(encoding="utf-8")
        texts += [source[i : i + 3000] for i in range(0, len(source), 3000)]
    for text in texts:
        ids = ours.encode(text)
        assert ids == list(theirs(text, add_special_tokens=False)["input_ids"]), text[:80]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text[:80]
    rng = random.Random(0)
    size = len(theirs.get_vocab())
    for _ in range(300):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 30))]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), ids
    assert ours.vocabulary() == set(theirs.get_vocab())
    assert ours.eos_token_id == theirs.eos_token_id is not None
    for token in ("<|fim_prefix|>", "<|fim_middle|>", "<|im_end|>", "<fim_prefix>"):
        expected = theirs.convert_tokens_to_ids(token)
        assert ours.special_token(token) == (None if expected in (None, theirs.unk_token_id) else expected)
    print(f"{model.name}: {len(texts)} texts, 300 random sequences: the same ids and text")


def test_a_missing_tokenizer_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer.json.*run `heedful model prepare`"):
        LocalTokenizer(tmp_path)
