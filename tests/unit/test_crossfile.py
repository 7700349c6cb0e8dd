"""Cross-file context: identifiers, windows, ranking, the budget and the imports of hand-made workspaces,
against values computed by hand."""

from __future__ import annotations

import pytest

from lsp_handlers.crossfile import (
    Snippet,
    Source,
    identifiers,
    imported_files,
    jaccard,
    rank,
    render_comments,
    render_file_sep,
    repository_context,
    select,
    windows,
)


def words(text: str) -> int:
    """A token counter to compute by hand: one token per whitespace-separated word."""
    return len(text.split())


def test_identifiers_leave_out_keywords_common_names_and_one_letter_names() -> None:
    text = "def total_price(self, items, i):\n    return sum(item.price for item in items) if items else None\n"
    assert identifiers(text) == {"total_price", "items", "sum", "item", "price"}


def test_jaccard_is_shared_over_all() -> None:
    assert jaccard(frozenset({"a1", "b1", "c1"}), frozenset({"b1", "c1", "d1"})) == 2 / 4
    assert jaccard(frozenset(), frozenset({"a1"})) == 0.0


def test_windows_step_by_the_stride_and_the_last_ends_at_the_file_end() -> None:
    text = "".join(f"line{n}\n" for n in range(25))
    got = [(start, end) for start, end, _ in windows(text, size=10, stride=5)]
    assert got == [(0, 10), (5, 15), (10, 20), (15, 25)]
    assert [(s, e) for s, e, _ in windows("one\ntwo\n", size=10, stride=5)] == [(0, 2)]
    assert list(windows("", size=10, stride=5)) == []
    with pytest.raises(ValueError, match="stride 0"):
        list(windows(text, size=10, stride=0))


# A workspace of three files: the cursor is in billing/invoice.py writing a call on an invoice's lines.
TAX = "def tax_rate(country):\n    return RATES[country]\n\n\nRATES = {'fr': 0.2, 'de': 0.19}\n"
LINES = (
    "class InvoiceLine:\n"
    "    def __init__(self, quantity, unit_price):\n"
    "        self.quantity = quantity\n"
    "        self.unit_price = unit_price\n"
)
LOG = "import logging\n\nlog = logging.getLogger(__name__)\n"
QUERY = "def invoice_total(lines, country):\n    net = sum(line.quantity * line.unit_price for line in lines)\n    "


def test_windows_are_ranked_by_shared_identifiers_and_unrelated_files_are_left_out() -> None:
    sources = [
        Source("billing/tax.py", TAX, "import"),
        Source("billing/lines.py", LINES, "open"),
        Source("log.py", LOG, "recent"),
    ]
    ranked = rank(QUERY, sources)
    # query identifiers: invoice_total, lines, country, net, sum, line, quantity, unit_price (8)
    # lines.py: InvoiceLine, __init__, quantity, unit_price -> shared 2 of 10 -> 0.2
    # tax.py: tax_rate, country, RATES, fr, de -> shared 1 of 12 -> 1/12
    assert [(s.path, round(s.score, 4)) for s in ranked] == [
        ("billing/lines.py", 0.2),
        ("billing/tax.py", round(1 / 12, 4)),
    ]
    assert ranked[0].text == LINES and (ranked[0].start_line, ranked[0].end_line) == (0, 4)


def test_ties_go_to_open_then_recent_then_imported_files() -> None:
    same = "def unit_price(quantity):\n    pass\n"
    sources = [Source("c.py", same, "import"), Source("b.py", same, "recent"), Source("a.py", same, "open")]
    assert [s.kind for s in rank("quantity unit_price", sources)] == ["open", "recent", "import"]


def test_selection_fits_the_budget_with_each_snippets_path_line_and_skips_overlapping_windows() -> None:
    ranked = [
        Snippet("a.py", 0, 20, "one two three\n", 0.9, "open"),  # "a.py\none two three\n": 4 words
        Snippet("a.py", 10, 30, "overlaps the first\n", 0.8, "open"),  # same file, lines 10-20 overlap: skipped
        Snippet("b.py", 0, 20, "four five six seven eight\n", 0.7, "open"),  # 6 words: over what is left
        Snippet("c.py", 0, 20, "nine\n", 0.6, "open"),  # 2 words: fits
        Snippet("a.py", 20, 40, "ten\n", 0.5, "open"),  # adjacent to the first, not overlapping: 2 words, fits
    ]
    chosen = select(ranked, budget_tokens=9, count_tokens=words)
    assert [(s.path, s.start_line) for s in chosen] == [("a.py", 0), ("c.py", 0), ("a.py", 20)]
    assert select(ranked, budget_tokens=3, count_tokens=words) == [ranked[3]]  # only the 2-word pieces fit
    assert select(ranked, budget_tokens=0, count_tokens=words) == []


def test_snippets_render_best_last_in_the_repository_format_or_as_comments() -> None:
    best = Snippet("a.py", 0, 1, "x = 1\n", 0.9, "open")
    next_ = Snippet("b.py", 0, 1, "y = 2", 0.5, "recent")
    assert render_file_sep([best, next_]) == "<|file_sep|>b.py\ny = 2\n<|file_sep|>a.py\nx = 1\n"
    assert render_comments([best, next_], ("# ", "")) == (
        "# Compare this snippet from b.py:\n# y = 2\n# Compare this snippet from a.py:\n# x = 1\n"
    )
    assert render_comments([best], ("<!-- ", " -->")) == "<!-- Compare this snippet from a.py: -->\n<!-- x = 1 -->\n"


FILES = {
    "billing/__init__.py",
    "billing/tax.py",
    "billing/lines.py",
    "billing/invoice.py",
    "util/log.py",
    "util/__init__.py",
}


def test_imports_map_to_workspace_files_absolute_relative_and_packages() -> None:
    source = (
        "import os\n"  # not in the workspace
        "from billing.tax import tax_rate\n"  # a module of a package
        "from . import lines\n"  # relative: billing/lines.py
        "import util\n"  # a package: util/__init__.py
        "from .invoice import Invoice\n"  # itself: left out
        "from .. import nowhere\n"  # the workspace root has no nowhere.py
    )
    got = imported_files(source, "billing/invoice.py", FILES)
    assert got == ["billing/tax.py", "billing/lines.py", "util/__init__.py"]


def test_a_file_being_typed_still_yields_its_complete_import_lines() -> None:
    source = "from billing import tax\nimport util.log\n\ndef broken(:\n    from billing import lin"
    # `lin` is no module of billing (yet): it would be defined in billing/__init__.py
    assert imported_files(source, "main.py", FILES) == ["billing/tax.py", "util/log.py", "billing/__init__.py"]


def test_absolute_imports_are_also_found_from_the_folders_above_the_file() -> None:
    files = {"src/billing/__init__.py", "src/billing/tax.py", "src/billing/invoice.py", "tax.py"}
    # `billing.tax` is not at the workspace's top but under src/; plain `tax` is at the top.
    got = imported_files("from billing.tax import rate\nimport tax\n", "src/billing/invoice.py", files)
    assert got == ["src/billing/tax.py", "tax.py"]


TAX_SOURCE = Source("billing/tax.py", "def tax_rate(region):\n    return RATES[region]\n", "import")
LOG_SOURCE = Source("util/log.py", "def log(message):\n    print(message)\n", "import")


def test_the_repository_context_holds_the_alike_snippets_then_the_current_files_path() -> None:
    # Query identifiers {rate, tax_rate, region}; tax.py's {tax_rate, region, RATES}: 2/4. log.py shares none.
    # The current file's line "<|file_sep|>billing/invoice.py" is 1 word, tax.py's piece 5 words
    # ("<|file_sep|>billing/tax.py", "def", "tax_rate(region):", "return", "RATES[region]").
    query = "rate = tax_rate(region)\n"
    got = repository_context(
        "billing/invoice.py", query, [LOG_SOURCE, TAX_SOURCE], 6, words, separator="<|file_sep|>", comment=("# ", "")
    )
    assert got == (
        "<|file_sep|>billing/tax.py\ndef tax_rate(region):\n    return RATES[region]\n<|file_sep|>billing/invoice.py\n"
    )
    # One word less and nothing fits: no repository at all (not a lone path line).
    assert (
        repository_context(
            "billing/invoice.py", query, [LOG_SOURCE, TAX_SOURCE], 5, words, separator="<|file_sep|>", comment=None
        )
        == ""
    )


def test_without_a_repository_format_the_snippets_are_comment_lines_counted_as_rendered() -> None:
    # "# Compare this snippet from billing/tax.py:" 6 words, "# def tax_rate(region):" 3, "#     return
    # RATES[region]" 3: 12 in all (select alone would count the bare piece, 5).
    query = "rate = tax_rate(region)\n"
    got = repository_context("billing/invoice.py", query, [TAX_SOURCE], 12, words, separator=None, comment=("# ", ""))
    assert got == "# Compare this snippet from billing/tax.py:\n# def tax_rate(region):\n#     return RATES[region]\n"
    assert (
        repository_context("billing/invoice.py", query, [TAX_SOURCE], 11, words, separator=None, comment=("# ", ""))
        == ""
    )
    assert repository_context("billing/invoice.py", query, [TAX_SOURCE], 12, words, separator=None, comment=None) == ""
