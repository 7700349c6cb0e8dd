"""bench.latency's typing-server options: which built-in variants run and the servers `--set` adds."""

from __future__ import annotations

import argparse

import pytest

from bench.latency import TYPING_VARIANTS, _variants, set_variant


def test_typing_variants_are_named_from_the_built_in_ones() -> None:
    assert _variants("default, extended") == ["default", "extended"]
    assert _variants("") == []  # only the --set servers
    with pytest.raises(argparse.ArgumentTypeError, match="unknown typing variant nope: choose among default"):
        _variants("default,nope")


def test_a_set_group_is_a_base_typing_server_with_its_settings() -> None:
    variant = set_variant(1, "completion.warm_context=true,engine.block_size=16")
    assert variant.server == "typing-set-1"
    assert variant.label == "base typing, completion.warm_context=true,engine.block_size=16 x1"
    assert variant.sections == {"completion": {"warm_context": True}, "engine": {"block_size": 16}}
    assert TYPING_VARIANTS["unanchored"].sections == {"completion": {"prefix_anchor_lines": 1}}
