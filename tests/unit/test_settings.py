"""Settings: layering (defaults < global < team < developer), every validation error path, config check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.settings import Settings, SettingsError, reference_markdown, render_toml, resolve


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write(
        tmp_path / "heedful.toml",
        """
[completion]
temperature = 0.4
group_size = 6

[training]
learning_rate = 2e-5
lora_rank = 8

[developers."carol".completion]
max_tokens = 32
""",
    )
    write(
        tmp_path / "teams" / "payments.toml",
        """
[completion]
group_size = 8

[training]
batch_size = 4

[developers."alice".completion]
temperature = 0.0

[developers."carol".completion]
max_tokens = 40
""",
    )
    return tmp_path


def test_defaults_without_any_file() -> None:
    resolved = resolve(None)
    assert resolved.settings == Settings()
    assert resolved.sources == {}
    assert resolved.files == []
    # The training defaults.
    t = resolved.settings.training
    assert (t.learning_rate, t.weight_decay, t.grad_clip, t.batch_size, t.beta_kl) == (3e-4, 0.01, 1.0, 4, 0.01)
    # Learning on where developers are: the server trains, a round of at most 24 steps and 10 minutes.
    assert (t.in_server, t.steps_per_round, t.round_budget_s, t.threads) == (True, 24, 600.0, 0)
    assert resolved.settings.completion.group_size == 4
    assert resolved.settings.thresholds.kl_max == 5.0


def test_global_file_overrides_defaults(config_dir: Path) -> None:
    resolved = resolve(config_dir / "heedful.toml")
    s = resolved.settings
    assert s.completion.temperature == 0.4
    assert s.completion.group_size == 6
    assert s.training.learning_rate == 2e-5
    assert s.completion.max_tokens == 64  # untouched default
    assert resolved.sources["completion.temperature"] == str(config_dir / "heedful.toml")
    assert "completion.max_tokens" not in resolved.sources


def test_team_file_overrides_global_key_by_key(config_dir: Path) -> None:
    resolved = resolve(config_dir / "heedful.toml", team="payments")
    s = resolved.settings
    assert s.completion.group_size == 8  # team wins
    assert s.completion.temperature == 0.4  # global kept where the team says nothing
    assert s.training.batch_size == 4
    assert s.training.learning_rate == 2e-5
    assert resolved.files == [config_dir / "heedful.toml", config_dir / "teams" / "payments.toml"]
    assert resolved.sources["completion.group_size"] == str(config_dir / "teams" / "payments.toml")


def test_developer_overrides_win_over_team(config_dir: Path) -> None:
    alice = resolve(config_dir / "heedful.toml", developer="alice", team="payments").settings
    assert alice.completion.temperature == 0.0
    assert alice.completion.group_size == 8
    # carol has overrides in both files: the team file's developer table is applied last.
    carol = resolve(config_dir / "heedful.toml", developer="carol", team="payments")
    assert carol.settings.completion.max_tokens == 40
    assert carol.sources["completion.max_tokens"].endswith("payments.toml [developers.carol]")
    carol_no_team = resolve(config_dir / "heedful.toml", developer="carol").settings
    assert carol_no_team.completion.max_tokens == 32
    # alice's team-file override does not leak to another team or no team.
    assert resolve(config_dir / "heedful.toml", developer="alice").settings.completion.temperature == 0.4


def test_team_without_file_gets_global(config_dir: Path) -> None:
    s = resolve(config_dir / "heedful.toml", team="newcomers").settings
    assert s.completion.group_size == 6


def test_teams_dir_setting(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "heedful.toml", '[teams]\ndir = "../team-settings"\n')
    write(tmp_path / "team-settings" / "web.toml", "[completion]\nmax_tokens = 99\n")
    s = resolve(tmp_path / "etc" / "heedful.toml", team="web").settings
    assert s.completion.max_tokens == 99


def test_int_accepted_for_float_key(tmp_path: Path) -> None:
    f = write(tmp_path / "h.toml", "[completion]\ntemperature = 1\n")
    s = resolve(f).settings
    assert s.completion.temperature == 1.0
    assert isinstance(s.completion.temperature, float)


ERROR_CASES = [
    # (file text, key named in the error, fragment of what is allowed)
    ("[completoin]\nmax_tokens = 3\n", "completoin", "did you mean 'completion'"),
    ("[completion]\nmax_token = 3\n", "completion.max_token", "did you mean 'max_tokens'"),
    ("completion = 3\n", "completion", "expected a table [completion]"),
    ('[completion]\nmax_tokens = "64"\n', "completion.max_tokens", "an integer >= 1 and <= 4096"),
    ("[completion]\nmax_tokens = 1.5\n", "completion.max_tokens", "an integer"),
    ("[completion]\nmax_tokens = true\n", "completion.max_tokens", "an integer"),
    ("[completion]\nmax_tokens = 0\n", "completion.max_tokens", ">= 1"),
    ("[completion]\nmax_tokens = 5000\n", "completion.max_tokens", "<= 4096"),
    ('[completion]\ntemperature = "hot"\n', "completion.temperature", "a number"),
    ("[completion]\ngroup_temperature = 0\n", "completion.group_temperature", "> 0.0"),
    ("[engine]\nmode = 'cloud'\n", "engine.mode", "one of 'embedded', 'remote'"),
    ("[engine]\nenforce_eager = 1\n", "engine.enforce_eager", "true or false"),
    ("[engine]\nmax_loras = 1\n", "engine.max_loras", ">= 2"),
    ("[engine]\nmax_lora_rank = 12\n", "engine.max_lora_rank", "one of 8, 16"),
    ("[completion]\nstop = 'x'\n", "completion.stop", "a list of strings"),
    ("[completion]\nstop = ['x', 3]\n", "completion.stop", "a list of strings"),
    ("[feedback]\nedit_snapshot_delays_s = [30, 'later']\n", "feedback.edit_snapshot_delays_s", "a list of numbers"),
    ("[logging]\nlevel = 'LOUD'\n", "logging.level", "one of 'DEBUG'"),
    ("[developers]\nalice = 3\n", "developers.alice", "expected tables of settings sections"),
    ("developers = 3\n", "developers", "expected tables"),
    ("[developers.alice.completion]\nmax_tokens = -1\n", "developers.alice.completion.max_tokens", ">= 1"),
    ("[developers.alice.nope]\nx = 1\n", "developers.alice.nope", "unknown section"),
    ("[teams]\ndir = 3\n", "teams.dir", "a string"),
    ("[teams]\npath = 'x'\n", "teams", "the one key `dir`"),
]


def assert_refused(tmp_path: Path, text: str, key: str, allowed: str) -> None:
    """The file is refused with an error naming the file, the key and what is allowed."""
    f = write(tmp_path / "heedful.toml", text)
    with pytest.raises(SettingsError) as info:
        resolve(f)
    err = info.value
    assert err.source == str(f)
    assert err.key == key
    assert str(f) in str(err)
    assert key in str(err)
    assert allowed in str(err)


@pytest.mark.parametrize(("text", "key", "allowed"), ERROR_CASES)
def test_bad_values_name_file_key_value_and_allowed(tmp_path: Path, text: str, key: str, allowed: str) -> None:
    assert_refused(tmp_path, text, key, allowed)


CONSISTENCY_CASES = [
    ("[engine]\nmode = 'remote'\n", "engine.url", "needs the server's base URL"),
    ("[engine]\nmode = 'remote'\nurl = 'gpu-host:8000'\n", "engine.url", "needs the server's base URL"),
    ("[engine]\nmax_loras = 8\nmax_cpu_loras = 4\n", "engine.max_cpu_loras", ">= engine.max_loras (8)"),
    ("[training]\nlora_rank = 32\n", "training.lora_rank", "<= engine.max_lora_rank (16)"),
    ("[training]\nl_max = 100\nl_cache = 100\n", "training.l_cache", "< training.l_max (100)"),
    ("[completion]\nmax_tokens = 8\n", "completion.single_line_max_tokens", "<= completion.max_tokens (8)"),
    ("[completion]\ncontext_tokens = 4000\n", "completion.context_tokens", "model.max_model_len (2048)"),
    ("[engine]\ncpu_threads_bind = 'all'\n", "engine.cpu_threads_bind", "'auto', 'off' or a core list"),
    ("[model]\nfim_template = '<fim>{prefix}'\n", "model.fim_template", "{prefix} and {suffix}"),
    ("[feedback]\nedit_snapshot_delays_s = [30, 0]\n", "feedback.edit_snapshot_delays_s", "positive numbers"),
    ("[privacy]\nredact_patterns = ['(unclosed']\n", "privacy.redact_patterns", "valid regular expressions"),
]


@pytest.mark.parametrize(("text", "key", "allowed"), CONSISTENCY_CASES)
def test_inconsistent_settings_are_refused(tmp_path: Path, text: str, key: str, allowed: str) -> None:
    assert_refused(tmp_path, text, key, allowed)


def test_consistency_error_names_the_team_file_that_set_the_value(config_dir: Path) -> None:
    write(config_dir / "teams" / "ml.toml", "[training]\nlora_rank = 64\n")
    with pytest.raises(SettingsError) as info:
        resolve(config_dir / "heedful.toml", team="ml")
    assert info.value.source == str(config_dir / "teams" / "ml.toml")


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        resolve(tmp_path / "missing.toml")
    syntax = write(tmp_path / "syntax.toml", "[completion\nmax_tokens = 3\n")
    with pytest.raises(SettingsError, match="must be valid TOML"):
        resolve(syntax)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[completion]\n")
    with pytest.raises(SettingsError, match="must be UTF-8"):
        resolve(binary)


def test_team_file_may_not_move_the_teams_dir(config_dir: Path) -> None:
    write(config_dir / "teams" / "rogue.toml", "[teams]\ndir = '/etc'\n")
    with pytest.raises(SettingsError, match=r"\[teams\] is only allowed in the global file"):
        resolve(config_dir / "heedful.toml", team="rogue")


@pytest.mark.parametrize("team", ["../etc/passwd", ".hidden", "a b", ""])
def test_bad_team_names_are_refused(config_dir: Path, team: str) -> None:
    with pytest.raises(SettingsError, match="team name of letters"):
        resolve(config_dir / "heedful.toml", team=team or "x/y")


def test_render_toml_marks_sources(config_dir: Path) -> None:
    text = render_toml(resolve(config_dir / "heedful.toml", team="payments"))
    assert "group_size = 8  # " + str(config_dir / "teams" / "payments.toml") in text
    assert "max_tokens = 64  # default" in text


def test_reference_documents_every_key() -> None:
    doc = reference_markdown()
    for section, values in Settings().to_dict().items():
        assert f"### `[{section}]`" in doc
        for key in values:
            assert f"| `{key}` |" in doc


def test_settings_page_carries_the_current_reference() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text(encoding="utf-8")
    assert reference_markdown().strip() in page, "docs/settings.md settings reference is stale: run `make readme`"


def heedful(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, env=env, check=False
    )


def test_config_check_prints_resolved_settings(config_dir: Path) -> None:
    proc = heedful("config", "check", str(config_dir / "heedful.toml"), "--team", "payments", "--developer", "alice")
    assert proc.returncode == 0, proc.stderr
    assert "temperature = 0.0  # " + str(config_dir / "teams" / "payments.toml") + " [developers.alice]" in proc.stdout
    assert "group_size = 8" in proc.stdout
    assert "is valid" in proc.stderr


def test_config_check_json_masks_the_api_key(tmp_path: Path) -> None:
    f = write(tmp_path / "h.toml", "[engine]\nmode = 'remote'\nurl = 'http://gpu:8000'\napi_key = 'sk-secret'\n")
    proc = heedful("config", "check", str(f), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["settings"]["engine"]["api_key"] == "***"
    assert data["settings"]["engine"]["url"] == "http://gpu:8000"
    assert data["sources"]["engine.mode"] == str(f)
    assert "sk-secret" not in proc.stdout


def test_config_check_reports_a_bad_value(tmp_path: Path) -> None:
    f = write(tmp_path / "h.toml", "[completion]\ngroup_size = 1\n")
    proc = heedful("config", "check", str(f))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"{f}: completion.group_size = 1 is not valid: expected an integer >= 2 and <= 64" in proc.stderr


def test_config_check_validates_every_team_file(config_dir: Path) -> None:
    write(config_dir / "teams" / "broken.toml", "[training]\nbatch_size = 0\n")
    proc = heedful("config", "check", str(config_dir / "heedful.toml"))
    assert proc.returncode == 1
    assert "broken.toml: training.batch_size = 0 is not valid" in proc.stderr


def test_kv_cache_takes_whole_gib(tmp_path: Path) -> None:
    # vLLM on CPU reads VLLM_CPU_KVCACHE_SPACE as an integer: 0.5 would only fail at engine start.
    f = write(tmp_path / "h.toml", "[engine]\nkv_cache_gib = 0.5\n")
    with pytest.raises(SettingsError, match=r"engine.kv_cache_gib = 0.5 is not valid: expected an integer >= 1"):
        resolve(f)


def test_client_settings_layer_over_the_admins_and_refuse_other_sections(tmp_path: Path) -> None:
    from kernel.settings import apply_client_settings

    base = resolve(write(tmp_path / "h.toml", "[completion]\nmax_tokens = 40\n"))
    layered = apply_client_settings(base, {"completion": {"temperature": 0.0}}, "editor")
    assert layered.settings.completion.temperature == 0.0 and layered.settings.completion.max_tokens == 40
    assert layered.sources["completion.temperature"] == "editor"
    assert base.settings.completion.temperature == 0.2  # the admin's resolution is untouched
    with pytest.raises(SettingsError, match=r"editor: engine = .* editors may set only completion, feedback"):
        apply_client_settings(base, {"engine": {"mode": "remote"}}, "editor")
    with pytest.raises(
        SettingsError, match=r"completion.single_line_max_tokens = 16 .* <= completion.max_tokens \(8\)"
    ):
        apply_client_settings(base, {"completion": {"max_tokens": 8}}, "editor")


def test_redact_patterns_add_up_across_global_team_and_developer_layers(tmp_path: Path) -> None:
    """A team or developer adds patterns; it cannot drop the global ones by setting its own."""
    write(
        tmp_path / "heedful.toml",
        "[privacy]\nredact_patterns = ['G-[0-9]+']\n\n"
        "[developers.\"alice\".privacy]\nredact_patterns = ['GA-[0-9]+']\n",
    )
    write(
        tmp_path / "teams" / "web.toml",
        "[privacy]\nredact_patterns = ['T-[0-9]+', 'G-[0-9]+']\n\n"
        "[developers.\"alice\".privacy]\nredact_patterns = ['A-[0-9]+']\n",
    )
    alice = resolve(tmp_path / "heedful.toml", developer="alice", team="web")
    assert alice.settings.privacy.redact_patterns == ["G-[0-9]+", "T-[0-9]+", "GA-[0-9]+", "A-[0-9]+"]
    bob = resolve(tmp_path / "heedful.toml", developer="bob", team="web")
    assert bob.settings.privacy.redact_patterns == ["G-[0-9]+", "T-[0-9]+"]
    assert resolve(tmp_path / "heedful.toml", developer="bob").settings.privacy.redact_patterns == ["G-[0-9]+"]
    assert str(tmp_path / "teams" / "web.toml") in bob.sources["privacy.redact_patterns"]


@pytest.mark.parametrize(
    ("team_text", "key"),
    [
        ("[privacy]\nredact_patterns = ['ok-[0-9]+', '(unclosed']\n", "privacy.redact_patterns"),
        (
            "[developers.\"alice\".privacy]\nredact_patterns = ['(unclosed']\n",
            "developers.alice.privacy.redact_patterns",
        ),
    ],
)
def test_an_invalid_pattern_names_its_file_the_pattern_and_the_fix(tmp_path: Path, team_text: str, key: str) -> None:
    write(tmp_path / "heedful.toml", "[privacy]\nredact_patterns = ['fine-[0-9]+']\n")
    team = write(tmp_path / "teams" / "web.toml", team_text)
    with pytest.raises(SettingsError) as info:
        resolve(tmp_path / "heedful.toml", developer="bob", team="web")  # the whole file is refused
    err = info.value
    assert (err.source, err.key, err.value) == (str(team), key, "(unclosed")
    assert "missing ), unterminated subpattern at position 0" in str(err)
    assert "fix the pattern or remove it" in str(err)
