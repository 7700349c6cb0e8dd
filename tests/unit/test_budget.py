"""The context budget learned from the engine's prompt-reading speed (`lsp_handlers.budget.PrefillClock`),
against hand-computed values."""

from __future__ import annotations

from lsp_handlers.budget import FLOOR_TOKENS, MIN_SAMPLE_TOKENS, WARM_PIECE_TOKENS, PrefillClock, warm_piece_tokens


def test_without_a_sample_or_a_target_the_budget_is_the_settings_own() -> None:
    clock = PrefillClock()
    assert clock.budget(1536, 600) == 1536
    clock.observe(1000, 2.0)
    assert clock.budget(1536, 0) == 1536


def test_the_budget_is_what_the_engine_reads_in_the_target_time_in_steps_of_64() -> None:
    clock = PrefillClock()
    # 1,445 tokens in 1.95 s: 1.3495 ms a token; 600 ms reads 444.6 tokens -> 384 (6 x 64).
    assert clock.observe(1445, 1.95)
    assert clock.budget(1536, 600) == 384
    # 650 ms: 481.7 tokens -> 448 (7 x 64); 700 ms: 518.7 tokens -> 512.
    assert clock.budget(1536, 650) == 448
    assert clock.budget(1536, 700) == 512


def test_a_fast_engine_keeps_the_whole_context_and_a_very_slow_one_keeps_the_floor() -> None:
    fast = PrefillClock()
    fast.observe(1024, 0.256)  # 0.25 ms a token: 600 ms reads 2,400 tokens
    assert fast.budget(1536, 600) == 1536
    slow = PrefillClock()
    slow.observe(512, 5.12)  # 10 ms a token: 600 ms reads 60 tokens
    assert slow.budget(1536, 600) == FLOOR_TOKENS
    assert slow.budget(200, 600) == 200  # never above the settings' own budget


def test_the_rate_is_the_median_of_the_window_so_one_slow_request_moves_nothing() -> None:
    clock = PrefillClock(window=3)
    clock.observe(1000, 1.0)  # 1 ms a token
    clock.observe(1000, 1.0)
    clock.observe(1000, 9.0)  # slowed by something else on the machine
    assert clock.seconds_per_token() == 0.001
    assert clock.budget(1536, 600) == 576  # 600 tokens -> 576 (9 x 64)
    # The window keeps the last 3: two slow ones make the median slow.
    clock.observe(1000, 3.0)
    assert clock.seconds_per_token() == 0.003
    assert clock.budget(1536, 600) == FLOOR_TOKENS  # 200 tokens -> 192, below the floor


def test_requests_that_read_few_tokens_are_not_samples() -> None:
    clock = PrefillClock()
    assert not clock.observe(MIN_SAMPLE_TOKENS - 1, 0.5)  # a keystroke whose prompt the cache held
    assert not clock.observe(1000, 0.0)
    assert not clock.observe(1000, float("nan"))
    assert clock.samples == 0
    assert clock.seconds_per_token() is None


def test_a_speed_on_a_steps_edge_keeps_one_budget() -> None:
    clock = PrefillClock(window=1)
    clock.observe(1000, 1000 / 852)  # 852 tokens a second: 600 ms reads 511.2 tokens -> 448
    assert clock.budget(1536, 600) == 448
    clock.observe(1000, 1000 / 857)  # 514.2 tokens: over 512, but not by 5 % (537.6): stays 448
    assert clock.budget(1536, 600) == 448
    clock.observe(1000, 1000 / 900)  # 540 tokens >= 537.6: grows to 512
    assert clock.budget(1536, 600) == 512
    clock.observe(1000, 1000 / 852)  # 511.2 tokens < 512: shrinks at once
    assert clock.budget(1536, 600) == 448
    clock.observe(1000, 1000 / 1100)  # 660 tokens: 640 needs 672, 576 needs 604.8 -> 576
    assert clock.budget(1536, 600) == 576
    # Another developer's settings (another target) have a budget of their own: 700 ms reads 770 -> 768.
    assert clock.budget(1536, 700) == 768


def test_once_a_budget_is_given_a_request_that_read_less_than_half_of_it_is_not_a_sample() -> None:
    clock = PrefillClock()
    assert clock.observe(1000, 1.0)  # 1 ms a token: 600 ms reads 600 -> 576
    assert clock.budget(1536, 600) == 576
    # A prompt whose start the cache held: 200 tokens read in 0.3 s (a fixed 0.1 s and 1 ms a token) would
    # be 1.5 ms a token and shrink the budget; it is under 288 (half of 576), so it is no sample.
    assert not clock.observe(200, 0.3)
    assert clock.observe(288, 0.288)
    assert clock.samples == 2
    # Two settings with budgets of their own: the smaller one sets the bar (half of 448 is 224).
    assert clock.budget(1536, 450) == 448  # 450 tokens -> 448
    assert clock.observe(224, 0.224)
    assert not clock.observe(223, 0.223)


def test_a_warm_piece_is_what_the_engine_reads_in_150_ms_in_whole_blocks() -> None:
    # Two AMD EPYC cores read about 480 prompt tokens a second: 150 ms reads 72 -> 64 (2 blocks of 32).
    assert warm_piece_tokens(1 / 480, 32) == 64
    # With blocks of 64 the same 72 tokens make one block; with blocks of 128, one block is the least.
    assert warm_piece_tokens(1 / 480, 64) == 64
    assert warm_piece_tokens(1 / 480, 128) == 128
    # 1,400 tokens a second (AMX units): 210 -> 192, held at WARM_PIECE_TOKENS; 200 a second: 30 -> one block.
    assert warm_piece_tokens(1 / 1400, 32) == WARM_PIECE_TOKENS == 128
    assert warm_piece_tokens(1 / 200, 32) == 32
    # Blocks bigger than the most: one block. Before the speed is known: the most.
    assert warm_piece_tokens(1 / 1400, 256) == 256
    assert warm_piece_tokens(None, 32) == 128
    assert warm_piece_tokens(0.0, 32) == 128
