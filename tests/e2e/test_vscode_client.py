"""The VS Code extension (editor-clients/vscode), built and packaged, then used in a real VS Code.

`make setup` installs, outside the clone, the extension's build tools and a real VS Code: code-server 4.139
(VS Code 1.139) with the Node 24 it runs on, and playwright-core. The build runs in a copy of the extension
(type check, esbuild bundle, `.vsix` by @vscode/vsce), so the clone gets no build output. The `.vsix` is
installed into code-server, which serves on 127.0.0.1 with auth off; tests/e2e/vscode/drive.mjs opens it
in Debian's headless Chromium, opens a Python file, types, waits for Heedful's ghost text, keeps a
screenshot of it, presses Tab, runs "Heedful: Correct last suggestion", dismisses the next suggestion with
Escape, takes one word of another with Ctrl+Right and opens the report. The store must then hold the
shown, accepted, correction, rejected and partial-accept events of that session.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernel import paths
from tests.e2e.conftest import EDITOR_SOURCE, ServerSetup
from tests.e2e.test_neovim_client import Neovim, nvim_binary, ready_status, write_init
from tests.e2e.test_shared_server import servers_on, shared_socket
from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = ROOT / "editor-clients" / "vscode"
HARNESS = Path(__file__).resolve().parent / "vscode"
CHROMIUM = Path("/usr/bin/chromium")
CORRECTION = "Always add type hints"
COMMANDS = {
    "heedful.correctLastSuggestion": "Correct last suggestion",
    "heedful.showStatus": "Show status",
    "heedful.openReport": "Open report",
    "heedful.showMenu": "Show menu",
    "heedful.enable": "Enable suggestions",
    "heedful.disable": "Disable suggestions",
    "heedful.toggleLanguage": "Enable or disable suggestions for this language",
    "heedful.snooze": "Snooze suggestions for 30 minutes",
    "heedful.resume": "Resume suggestions",
    "heedful.showLearned": "What Heedful learned",
    "heedful.pauseLearning": "Pause learning",
    "heedful.resumeLearning": "Resume learning",
    "heedful.undoAdapter": "Undo the adapter serving you",
}


def installed(kind: str, lock: Path, probe: str) -> Path:
    """<cache dir>/<kind>/<first 16 hex of sha256(lock)>/node_modules, as scripts/setup.sh installs it."""
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    modules = paths.cache_dir() / kind / digest / "node_modules"
    if not (modules / probe).exists():
        pytest.fail(f"{modules / probe} is missing: run `make setup` (it installs the packages of {lock})")
    return modules


def drive_chromium(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`node SCRIPT ARGS...` with playwright-core and Debian's headless Chromium (both from `make setup`):
    the environment tells the script where they are."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (it installs the Debian package chromium)")
    modules = installed("vscode-e2e", HARNESS / "package-lock.json", "playwright-core")
    return subprocess.run(
        [str(modules / "node" / "bin" / "node"), str(script), *args],
        env=dict(os.environ, HEEDFUL_NODE_MODULES=str(modules), HEEDFUL_CHROMIUM=str(CHROMIUM)),
        capture_output=True,
        text=True,
        timeout=600,
    )


def keep_artifact(path: Path) -> None:
    """Copy a test's screenshot to HEEDFUL_TEST_ARTIFACTS when that is set."""
    if artifacts := os.environ.get("HEEDFUL_TEST_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)


@pytest.fixture(scope="module")
def vsix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    modules = installed("vscode", EXTENSION / "package-lock.json", "vscode-languageclient")
    build = tmp_path_factory.mktemp("vscode-build") / "vscode"
    shutil.copytree(EXTENSION, build, ignore=shutil.ignore_patterns("node_modules", "dist"))
    (build / "node_modules").symlink_to(modules, target_is_directory=True)
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("`npm` is not on PATH: run `make setup` (it installs Node.js and npm)")
    proc = subprocess.run([npm, "run", "package"], cwd=build, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"`npm run package` failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return build / "dist" / "heedful.vsix"


def test_vscode_extension_type_checks_bundles_and_packages(vsix: Path) -> None:
    with zipfile.ZipFile(vsix) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("extension/package.json"))
    assert {"extension/dist/extension.js", "extension/package.json", "extension/readme.md"} <= names
    assert not [n for n in names if "node_modules" in n or n.endswith(".ts")], sorted(names)
    contributed = {c["command"]: c["title"] for c in manifest["contributes"]["commands"]}
    assert {k: contributed.get(k) for k in COMMANDS} == COMMANDS
    settings = manifest["contributes"]["configuration"]["properties"]
    assert {"heedful.serverCommand", "heedful.developerId", "heedful.team", "heedful.enable"} <= set(settings)
    assert settings["heedful.enable"]["default"] == {"*": True}
    # A workspace (a cloned repository's .vscode/settings.json) cannot change the command that runs, nor
    # read the developer's token into a server of its choosing.
    assert settings["heedful.serverCommand"]["scope"] == "machine" and settings["heedful.token"]["scope"] == "machine"
    assert settings["heedful.serverCommand"]["default"] == ["heedful", "serve", "--shared"]
    untrusted = manifest["capabilities"]["untrustedWorkspaces"]
    assert untrusted["supported"] == "limited"
    assert untrusted["restrictedConfigurations"] == ["heedful.serverCommand", "heedful.token"]


class CodeServer:
    """code-server with the extension installed, serving one project folder on 127.0.0.1 without auth."""

    def __init__(
        self, modules: Path, workdir: Path, vsix: Path, server_command: list[str], env: dict[str, str]
    ) -> None:
        self.node_bin = modules / "node" / "bin"
        self.binary = modules / ".bin" / "code-server"
        self.workdir = workdir
        self.project = workdir / "project"
        self.project.mkdir(parents=True)
        (self.project / "orders.py").write_text(EDITOR_SOURCE)
        user = workdir / "data" / "User"
        user.mkdir(parents=True)
        settings = {
            "heedful.serverCommand": server_command,
            "heedful.developerId": "dev-vscode",
            "heedful.team": "vscode",
            "security.workspace.trust.enabled": False,
            "workbench.startupEditor": "none",
            "telemetry.telemetryLevel": "off",
            "extensions.autoCheckUpdates": False,
            "extensions.autoUpdate": False,
            "chat.disableAIFeatures": True,
            # VS Code hides ghost text that disagrees with an open suggest widget (here: word-based
            # "without" for "with"); the test is about the ghost text, so the widget stays closed.
            "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
        }
        (user / "settings.json").write_text(json.dumps(settings, indent=2))
        # heedful.serverCommand is machine-scoped (no workspace may change the command that runs): code-server
        # is a remote window, whose machine settings live beside the user's, as a code-server user sets them.
        machine = workdir / "data" / "Machine"
        machine.mkdir(parents=True)
        (machine / "settings.json").write_text(json.dumps({"heedful.serverCommand": server_command}, indent=2))
        self.env = dict(
            os.environ,
            PATH=os.pathsep.join([str(self.node_bin), os.environ.get("PATH", "")]),
            XDG_CONFIG_HOME=str(workdir / "config"),  # code-server writes its default config there
            PYTHONPATH=str(ROOT),  # the server command runs this checkout's `server.cli`
            **env,
        )
        self.common = ["--config", str(workdir / "code-server.yaml"), "--extensions-dir", str(workdir / "ext")]
        self.common += ["--user-data-dir", str(workdir / "data")]
        proc = subprocess.run(
            [str(self.binary), *self.common, "--install-extension", str(vsix)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0 and "successfully installed" in proc.stdout, proc.stdout + proc.stderr
        self.port = free_port()
        self.log = workdir / "code-server.log"
        serve = ["--auth", "none", "--bind-addr", f"127.0.0.1:{self.port}", "--disable-telemetry"]
        serve += ["--disable-update-check", "--disable-workspace-trust", str(self.project)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(self.binary), *self.common, *serve],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self.port}/?folder={self.project}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"code-server did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)

    def extension_log(self) -> str:
        logs = sorted((self.workdir / "data" / "logs").glob("*/exthost*/heedful.heedful/Heedful.log"))
        return logs[-1].read_text(errors="replace") if logs else "(no extension log)"

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Shared:
    """The shared server the editors of a test start: its settings file, dirs and socket."""

    config: Path
    env: dict[str, str]
    socket: Path


@pytest.fixture
def shared(lsp_setup: ServerSetup, tmp_path: Path) -> Iterator[Shared]:
    """`heedful serve --shared` (the extension's default command) on the suite's settings, with a runtime dir
    (short: a socket path has at most 107 bytes) and a data dir of the test's own; it stops 2 s after the
    last editor leaves; its log says where the editors' cursors came to rest (debug)."""
    run = Path(tempfile.mkdtemp(prefix="hf-run-"))
    config = tmp_path / "shared.toml"
    config.write_text(lsp_setup.config.read_text() + '\n[server]\nidle_exit_s = 2\n\n[logging]\nlevel = "DEBUG"\n')
    env = {"XDG_RUNTIME_DIR": str(run), "HEEDFUL_DATA_DIR": str(tmp_path / "data")}
    yield Shared(config, env, shared_socket(config, env))
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def code_server(vsix: Path, lsp_setup: ServerSetup, shared: Shared, tmp_path: Path) -> Iterator[CodeServer]:
    modules = installed("vscode-e2e", HARNESS / "package-lock.json", ".bin/code-server")
    server = [sys.executable, "-m", "server.cli", "--config", str(shared.config)]
    server += ["--log-file", str(lsp_setup.log), "serve", "--shared"]
    cs = CodeServer(modules, tmp_path / "code-server", vsix, server, shared.env)
    try:
        yield cs
    finally:
        cs.close()
        print(f"--- Heedful extension log ---\n{cs.extension_log()[-4000:]}")  # shown when the test failed


def test_vscode_shows_ghost_text_accepts_with_tab_and_sends_a_correction(
    code_server: CodeServer, lsp_setup: ServerSetup, shared: Shared, tmp_path: Path
) -> None:
    screenshot = tmp_path / "vscode-ghost-text.png"
    proc = drive_chromium(HARNESS / "drive.mjs", code_server.url, "orders.py", str(screenshot), CORRECTION)
    print(f"screenshot of the ghost text: {screenshot}")
    assert proc.returncode == 0, f"the browser run failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ghostText"].strip(), "the ghost text was empty"
    assert screenshot.stat().st_size > 0
    keep_artifact(screenshot)

    (session,) = lsp_setup.rows("SELECT * FROM sessions")
    assert session["developer_id"] == "dev-vscode" and session["team_id"] == "vscode"
    assert session["client_name"] == "code-server"
    events = lsp_setup.rows("SELECT * FROM events ORDER BY id")
    shown = {e["completion_id"] for e in events if e["kind"] == "shown"}
    (accepted,) = [e for e in events if e["kind"] == "accepted"]
    assert accepted["completion_id"] in shown and accepted["accepted_length"] > 0
    (completion,) = lsp_setup.rows("SELECT * FROM completions WHERE id = ?", accepted["completion_id"])
    assert completion["line"] == 6 and completion["character"] >= 4  # where the test typed
    # The cursor came to rest there (Ctrl+End, then typing along the line): the server was told, once the
    # extension's 300 ms passed, and read the text before it.
    rests = re.findall(r"the cursor rests on line (\d+) of (\S+)", lsp_setup.log.read_text(errors="replace"))
    assert ("6", completion["uri"]) in rests, rests
    # The accepted text is in the editor: the server follows it there (edit snapshots), and the page shows
    # it (the DOM renders spaces as no-break spaces).
    document = result["documentText"].replace("\u00a0", " ")
    snapshots = [e for e in events if e["kind"] == "edit_snapshot" and e["completion_id"] == accepted["completion_id"]]
    assert snapshots and snapshots[0]["kept_text"].strip()
    assert snapshots[0]["kept_text"].strip().splitlines()[0] in document
    (correction,) = [e for e in events if e["kind"] == "correction"]
    assert correction["text"] == CORRECTION
    # "Last suggestion": the one shown or accepted most recently before the correction.
    before = [e for e in events if e["id"] < correction["id"] and e["kind"] in ("shown", "accepted")]
    assert correction["completion_id"] == before[-1]["completion_id"]

    # Escape on a shown suggestion is an explicit reject; Ctrl+Right on the next one a partial accept.
    later = [e for e in events if e["id"] > correction["id"]]
    dismissed = [e for e in later if e["kind"] == "rejected" and not e["inferred"]]
    assert dismissed and dismissed[0]["completion_id"] in shown
    (partial,) = [e for e in later if e["kind"] == "partial_accept"]
    assert partial["completion_id"] in shown and partial["completion_id"] != dismissed[0]["completion_id"]
    # VS Code's next word may be just the blank before it.
    assert partial["accepted_length"] == len(partial["kept_text"]) > 0
    assert partial["kept_text"].strip() in document

    # Snoozed from the status bar's menu: the bar says until when, and no suggestion comes, even asked for.
    assert "Heedful: snoozed until" in result["snoozedStatus"] and result["ghostWhileSnoozed"] == 0

    # Learning from the editor: paused (the status bar said so, from the server's status), resumed; undo with
    # no adapter of the developer's says there is nothing to undo. The audit log names the editor.
    assert "learning paused" in result["pausedStatus"] and "nothing to undo" in result["undoMessage"]
    assert "recording paused" in result["recordingStatus"]
    audit = lsp_setup.rows("SELECT action FROM audit_log WHERE actor = 'editor:dev-vscode' ORDER BY id")
    assert [r["action"] for r in audit] == ["pause_training", "resume_training", "pause_recording", "resume_recording"]
    assert not lsp_setup.rows("SELECT * FROM scope_controls WHERE training_paused OR recording_paused")

    # "Heedful: Open report" shows the server's report of this developer: the store's own figures.
    report = result["reportHtml"]
    assert "Heedful report" in report and "dev-vscode" in report and "<script" not in report
    stat = re.search(r'data-stat="completions">(\d+)<', report)
    assert stat is not None, report[:2000]
    assert int(stat.group(1)) == len(lsp_setup.rows("SELECT id FROM completions WHERE developer_id = 'dev-vscode'"))

    # One server for every window: VS Code's window started the shared server; a Neovim window with the same
    # command and settings is served by that very process, and the server stops once both are gone.
    (pid,) = servers_on(shared.socket)
    work = tmp_path / "neovim"
    work.mkdir()
    file = work / "orders.py"
    file.write_text(EDITOR_SOURCE + "\n")
    command = ["/usr/bin/env", *(f"{k}={v}" for k, v in shared.env.items()), sys.executable, "-m", "server.cli"]
    command += ["--config", str(shared.config), "serve", "--shared"]
    nvim = Neovim(nvim_binary(), work, write_init(work / "init.lua", command, "dev-nvim", "nvim-1", "builtin"), file)
    try:
        status = nvim.wait_for(functools.partial(ready_status, nvim), "Neovim's heedful/status to say ready")
        assert status["serverPid"] == pid and servers_on(shared.socket) == [pid]
    finally:
        nvim.close()
    code_server.close()
    deadline = time.monotonic() + 60
    while servers_on(shared.socket) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not servers_on(shared.socket), "the shared server still runs with no editor left"
    rows = lsp_setup.rows("SELECT developer_id, client_name FROM sessions ORDER BY started_at")
    assert [(r["developer_id"], r["client_name"]) for r in rows] == [
        ("dev-vscode", "code-server"),
        ("dev-nvim", "Neovim"),
    ]
