"""The show policy's pure parts against hand-computed values: the break-even probability, what kind a
suggestion's first line is, its features, the logistic regression's steps, and when it holds back."""

from __future__ import annotations

import math

import pytest

from lsp_handlers.show_policy import (
    L2,
    LEARNING_RATE,
    ShowPolicy,
    break_even,
    first_line_kind,
    suggestion_features,
)


def test_break_even_is_where_showing_pays() -> None:
    # p * 0.75 - (1 - p) * 0.25 = 0  ->  p = 0.25 (the default threshold).
    assert break_even() == pytest.approx(0.25)
    assert break_even(1.0, -1.0) == pytest.approx(0.5)
    assert break_even(0.5, -1.5) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="above 0"):
        break_even(0.0, -1.0)
    with pytest.raises(ValueError, match="below 0"):
        break_even(1.0, 0.0)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("# read the file", "comment"),
        ("    // TODO later", "comment"),
        ('"""Return the sum."""', "docstring"),
        ("r'''Raw.'''", "docstring"),
        ("pass", "stub"),
        ("...", "stub"),
        ("x = 1  # TODO", "stub"),
        ("raise NotImplementedError", "stub"),
        ("return a + b", "keyword:return"),
        ("raise ValueError(name) from exc", "keyword:raise"),
        ("print(x)", "keyword:print"),
        ("returned = 3", "assign"),
        ("os.path.join(a, b)", "call"),
        ("self.items[key] += 1", "assign"),
        ("x == 1", "code"),
        ("a, b = b, a", "assign"),
        ("}", "code"),
    ],
)
def test_first_line_kind(line: str, kind: str) -> None:
    assert first_line_kind(line) == kind


def test_suggestion_features_by_hand() -> None:
    half = 1 / math.sqrt(2)
    assert suggestion_features("return x\n") == {
        "bias": 1.0,
        "kind:keyword:return": 1.0,
        "lines:<2": 1.0,
        "chars:<24": 1.0,  # "return x" is 8 characters
        "word:return": half,
        "word:x": half,
    }
    # Blank lines do not count; words count once each; the kind is the first non-blank line's.
    assert suggestion_features("\n# a comment\n\nfoo(a)\nfoo(b)\n") == {
        "bias": 1.0,
        "kind:comment": 1.0,
        "lines:<4": 1.0,  # 3 lines that are not blank
        "chars:<64": 1.0,
        "word:a": 0.5,  # 4 distinct words: a, comment, foo, b
        "word:comment": 0.5,
        "word:foo": 0.5,
        "word:b": 0.5,
    }
    assert suggestion_features("   ") == {"bias": 1.0, "kind:blank": 1.0, "lines:<2": 1.0, "chars:<8": 1.0}
    long = "\n".join(f"value_{i} = {i}" for i in range(60))
    features = suggestion_features(long)
    assert features["lines:>=4"] == 1.0 and features["chars:>=160"] == 1.0
    words = [k for k in features if k.startswith("word:")]
    assert len(words) == 48  # MAX_WORDS, the first ones
    assert sum(features[k] ** 2 for k in words) == pytest.approx(1.0)


def test_logistic_regression_steps_by_hand() -> None:
    policy = ShowPolicy()
    x = {"bias": 1.0, "a": 1.0}
    assert policy.p_kept(x) == 0.5
    policy.observe(x, 0.0)
    # error = 0 - 0.5; w = 0 + 0.5 * (-0.5 * 1 - L2 * 0) = -0.25 for both features
    assert policy.weights == {"bias": -0.25, "a": -0.25}
    assert policy.p_kept(x) == pytest.approx(1 / (1 + math.exp(0.5)))  # 0.3775
    policy.observe(x, 0.0)
    p = 1 / (1 + math.exp(0.5))
    expected = -0.25 + LEARNING_RATE * (-p - L2 * -0.25)  # -0.438645...
    assert policy.weights["bias"] == pytest.approx(expected)
    assert policy.weights["bias"] == pytest.approx(-0.438645, abs=1e-5)
    policy.observe({"bias": 1.0, "b": 1.0}, 1.0)
    # p = sigmoid(-0.438645) = 0.392066; error = 0.607934; bias += 0.5 * (0.607934 + 0.001 * 0.438645)
    assert policy.weights["b"] == pytest.approx(0.5 * 0.607934, abs=1e-5)
    assert policy.weights["bias"] == pytest.approx(-0.438645 + 0.5 * (0.607934 + 0.000438645), abs=1e-5)
    assert (policy.outcomes, policy.kept) == (3, 1.0)


def test_a_share_kept_is_a_soft_target() -> None:
    policy = ShowPolicy()
    x = {"bias": 1.0}
    policy.observe(x, 0.3)  # error = 0.3 - 0.5 = -0.2; w = 0.5 * -0.2 = -0.1
    assert policy.weights == {"bias": pytest.approx(-0.1)}
    for _ in range(400):  # it settles where the share kept is: sigmoid(w) -> 0.3, a little less for L2
        policy.observe(x, 0.3)
    assert policy.p_kept(x) == pytest.approx(0.3, abs=0.02)
    assert policy.holds_back(x, 0.25, min_outcomes=1) is None  # a third kept on average: worth showing
    with pytest.raises(ValueError, match="between 0 and 1, got 1.5"):
        policy.observe(x, 1.5)


def test_holds_back_only_with_evidence_below_the_threshold() -> None:
    policy = ShowPolicy()
    comment, code = suggestion_features("# the comment\n"), suggestion_features("total += value\n")
    for _ in range(12):  # a developer who turns down every comment and keeps the code
        policy.observe(comment, 0.0)
        policy.observe(code, 1.0)
    assert policy.p_kept(comment) < 0.1 < 0.9 < policy.p_kept(code)
    p = policy.holds_back(comment, 0.25, min_outcomes=24)
    assert p is not None and p == policy.p_kept(comment)
    assert policy.holds_back(code, 0.25, min_outcomes=24) is None
    assert policy.holds_back(comment, 0.25, min_outcomes=25) is None  # not enough outcomes yet
    assert policy.holds_back(comment, 0.0, min_outcomes=1) is None  # the policy is off
    # Another comment, never seen, is held back too: its kind and length carry the weight.
    assert policy.holds_back(suggestion_features("# another remark\n"), 0.25, min_outcomes=24) is not None
