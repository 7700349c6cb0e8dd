"""One server per machine and user: editor windows that start `heedful serve --shared` share one server
process (one engine, one store, one training worker), which outlives a window, stops once no window has
been connected for `server.idle_exit_s`, and is started again by the next window, even over the socket a
killed server left behind. `heedful serve --connect` reaches a `heedful serve --tcp` the same way.

Real LSP clients over stdio, the real `heedful serve` processes, the suite's engine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.shared import peer_pid, socket_path
from tests.e2e.client import ROOT, HeedfulClient, tcp_server
from tests.e2e.conftest import write_config

pytestmark = [pytest.mark.engine, pytest.mark.remote]

SOURCE = "import os\n\n\ndef list_python_files(folder):\n    "
IDLE_EXIT_S = 3


@pytest.fixture
def shared_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A runtime dir of the test's own (short: a socket path has at most 107 bytes) and a data dir in tmp."""
    run = Path(tempfile.mkdtemp(prefix="hf-run-"))
    env = {"XDG_RUNTIME_DIR": str(run), "HEEDFUL_DATA_DIR": str(tmp_path / "data")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # so socket_path() here names the servers' socket
    yield env
    shutil.rmtree(run, ignore_errors=True)


def shared_socket(config: Path, env: dict[str, str]) -> Path:
    """The shared server's socket for `config` as a `heedful serve --shared` with `env` (runtime and data dir)
    computes it, in a process of its own (socket_path reads the environment)."""
    code = "import sys; from pathlib import Path; from kernel import paths; from server.shared import socket_path; "
    code += "print(socket_path(Path(sys.argv[1]), paths.data_dir()))"
    found = subprocess.run(
        [sys.executable, "-c", code, str(config)], env=dict(os.environ, **env), cwd=ROOT, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    return Path(found.stdout.strip())


def servers_on(sock: Path) -> list[int]:
    """Pids of the processes running `heedful serve --socket SOCK`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--socket" in argv and os.fsencode(sock) in argv:
            found.append(int(entry.name))
    return found


async def window(
    name: str, config: Path, tmp_path: Path, env: dict[str, str], flavour: str = "vscode"
) -> HeedfulClient:
    client = HeedfulClient(flavour)
    await client.start(config, tmp_path / f"{name}.log", env, args=["serve", "--shared"])
    return client


async def complete(client: HeedfulClient, name: str) -> list[str]:
    uri = f"file:///w/shared/{name}.py"
    client.open(uri, SOURCE)
    result = await asyncio.wait_for(client.inline(uri, 4, 4), 120)
    assert result is not None
    return [i.insert_text if isinstance(i.insert_text, str) else i.insert_text.value for i in result.items]


async def gone(pid: int, timeout: float) -> bool:
    for _ in range(int(timeout * 10)):
        if not Path(f"/proc/{pid}").exists() or b"zombie" in _state(pid):
            return True
        await asyncio.sleep(0.1)
    return False


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b""


async def test_two_windows_share_one_server_that_stops_when_idle_and_starts_again(
    tmp_path: Path, small_model: Path, vllm_server: str, shared_env: dict[str, str]
) -> None:
    setup = write_config(tmp_path, small_model, vllm_server, extra=f"[server]\nidle_exit_s = {IDLE_EXIT_S}\n")
    sock = socket_path(setup.config, tmp_path / "data")
    assert peer_pid(sock) is None

    # Two windows open at once: one starts the server, the other waits for it (the lock) and connects.
    a, b = await asyncio.gather(
        window("a", setup.config, tmp_path, shared_env), window("b", setup.config, tmp_path, shared_env, "neovim")
    )
    try:
        await asyncio.gather(
            a.initialize({"developerId": "alice", "sessionId": "shared-a"}),
            b.initialize({"developerId": "bob", "sessionId": "shared-b"}),
        )
        ready_a, ready_b = await a.wait_status("ready", 300), await b.wait_status("ready", 300)
        server = ready_a["serverPid"]
        assert ready_b["serverPid"] == server
        assert server not in {a.lc._server.pid, b.lc._server.pid}  # type: ignore[union-attr]
        assert servers_on(sock) == [server] and peer_pid(sock) == server
        assert sock.stat().st_mode & 0o777 == 0o600 and sock.parent.stat().st_mode & 0o777 == 0o700
        assert any(t.strip() for t in await complete(a, "a")) and any(t.strip() for t in await complete(b, "b"))
        assert await a.stop() == 0
        # The server outlives the window that started it; the other window goes on being served.
        assert any(t.strip() for t in await complete(b, "b2"))
        assert servers_on(sock) == [server]
    finally:
        await b.stop()
    rows = setup.rows("SELECT id, developer_id, ended_at FROM sessions ORDER BY id")
    assert [(r["id"], r["developer_id"]) for r in rows] == [("shared-a", "alice"), ("shared-b", "bob")]
    assert all(r["ended_at"] is not None for r in rows)  # each window's exit ended its own session

    # No window left: the server stops after idle_exit_s, and takes its socket with it.
    assert await gone(server, IDLE_EXIT_S + 60), f"the shared server {server} still runs with no window"
    assert not sock.exists()
    log = (tmp_path / "data" / "logs" / f"{sock.stem}.log").read_text(errors="replace")
    assert f"no editor connected for {IDLE_EXIT_S} s: stopping" in log

    # The next window starts it again; a server killed outright leaves its socket behind, and the window
    # after that replaces it.
    c = await window("c", setup.config, tmp_path, shared_env)
    try:
        await c.initialize({"developerId": "carol"})
        second = (await c.wait_status("ready", 300))["serverPid"]
        assert second != server and servers_on(sock) == [second]
        os.kill(second, signal.SIGKILL)
        assert await gone(second, 30)
        assert sock.exists()
        proc = c.lc._server
        assert proc is not None
        await asyncio.wait_for(proc.wait(), 30)  # the window's pipe ends with its server
    finally:
        await c.stop()
    d = await window("d", setup.config, tmp_path, shared_env)
    try:
        await d.initialize({"developerId": "dave"})
        third = (await d.wait_status("ready", 300))["serverPid"]
        assert third not in {server, second} and servers_on(sock) == [third]
        assert any(t.strip() for t in await complete(d, "d"))
    finally:
        await d.stop()
    assert await gone(third, IDLE_EXIT_S + 60)


async def test_other_settings_get_their_own_shared_server(
    tmp_path: Path, small_model: Path, vllm_server: str, shared_env: dict[str, str]
) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = write_config(tmp_path / "one", small_model, vllm_server, extra=f"[server]\nidle_exit_s = {IDLE_EXIT_S}\n")
    two = write_config(tmp_path / "two", small_model, vllm_server, extra=f"[server]\nidle_exit_s = {IDLE_EXIT_S}\n")
    assert socket_path(one.config, tmp_path / "data") != socket_path(two.config, tmp_path / "data")
    a, b = await window("a", one.config, tmp_path, shared_env), await window("b", two.config, tmp_path, shared_env)
    try:
        await asyncio.gather(a.initialize({"developerId": "alice"}), b.initialize({"developerId": "alice"}))
        pids = {(await a.wait_status("ready", 300))["serverPid"], (await b.wait_status("ready", 300))["serverPid"]}
        assert len(pids) == 2
    finally:
        await a.stop()
        await b.stop()
    assert len(one.rows("SELECT id FROM sessions")) == 1 and len(two.rows("SELECT id FROM sessions")) == 1
    for pid in pids:
        assert await gone(pid, IDLE_EXIT_S + 60)


async def test_connect_reaches_a_tcp_server_and_a_bad_address_is_named(
    tmp_path: Path, small_model: Path, vllm_server: str
) -> None:
    setup = write_config(tmp_path, small_model, vllm_server)
    async with tcp_server(setup.config, tmp_path / "server.log") as (port, proc):
        client = HeedfulClient("vscode")
        await client.start(setup.config, tmp_path / "pipe.log", args=["serve", "--connect", f"127.0.0.1:{port}"])
        try:
            await client.initialize({"developerId": "erin", "sessionId": "through-tcp"})
            ready = await client.wait_status("ready", 300)
            assert ready["serverPid"] == proc.pid
            assert any(t.strip() for t in await complete(client, "e"))
        finally:
            assert await client.stop() == 0
    assert [r["id"] for r in setup.rows("SELECT id FROM sessions")] == ["through-tcp"]

    refusals = [
        ("nowhere", "give the server's address as HOST:PORT"),
        (f"127.0.0.1:{port}", "no Heedful server answers there"),  # the server above has stopped
    ]
    for address, says in refusals:
        run: Any = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "--config", str(setup.config), "serve", "--connect", address,
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(run.communicate(b""), 60)
        assert run.returncode != 0 and says in err.decode(), err.decode()


async def test_shared_with_another_mode_is_refused(tmp_path: Path, small_model: Path, vllm_server: str) -> None:
    setup = write_config(tmp_path, small_model, vllm_server)
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "--config", str(setup.config), "serve", "--shared", "--tcp",
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 2 and "--tcp and --shared do not go together" in err.decode(), err.decode()
