"""One Heedful server per machine and user, whatever the number of editor windows.

An editor starts its language server as a process it talks to over stdio. With `heedful serve --shared`
(what the shipped editor clients start) that process is only a pipe: it connects to the user's shared
server on a local socket, starting that server first when none runs, and passes bytes both ways until the
editor or the server ends the connection. The shared server (`heedful serve --socket PATH`) gives every
connection its own session, as `heedful serve --tcp` does, with one engine, one store, one adapter
registry and one training worker for all of them, and stops once no editor has been connected for
`server.idle_exit_s` (after a training round that runs then).

Which shared server: one per settings file, data dir and Heedful version (the socket's name is a digest of
the three), so two windows started with the same settings share it, a window started with other settings
gets its own, and after an upgrade new windows start the new version while the old server idles out.
The socket lives in a folder only this user may enter (`$XDG_RUNTIME_DIR/heedful`, else
`/tmp/heedful-<uid>`), and the server also checks each connection's user id (`SO_PEERCRED`): over it a
connection is served as what it says it is, as over stdio.

Starting is serialized by a lock file beside the socket: of two windows opened at once, one starts the
server and the other waits for it and connects. A socket left behind by a server that was killed is
replaced.

`heedful serve --connect HOST:PORT` is the same pipe to a `heedful serve --tcp` elsewhere (a team's
server); the editor sends its token as `initializationOptions.token`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lsp_handlers.framing import CHUNK
from server import __version__

START_TIMEOUT_S = 120.0  # settings, model check, tokenizer and store, before the server listens
SOCKET_PATH_MAX = 107  # sun_path on Linux, without its terminating NUL


class SharedServerError(RuntimeError):
    """The shared server could not be reached or started: the message names what and the fix."""


def runtime_dir() -> Path:
    """The folder of this user's shared-server sockets, created private (0700) and checked to be."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        base = Path(xdg) / "heedful"
    else:
        base = Path(tempfile.gettempdir()) / f"heedful-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = base.lstat()
    except OSError as exc:
        raise SharedServerError(f"the shared server's folder {base} cannot be created: {exc}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SharedServerError(
            f"the shared server's folder {base} is not a private folder of this user (owner uid {info.st_uid}, "
            f"mode {stat.filemode(info.st_mode)}): other users could reach your server through it; remove it "
            f"(or set XDG_RUNTIME_DIR to a folder only you can enter) and start again"
        )
    return base


def socket_path(config: Path | None, data_dir: Path, version: str = __version__) -> Path:
    """The socket of the shared server for this settings file, data dir and Heedful version."""
    config_key = str(config.expanduser().resolve()) if config is not None else ""
    key = f"{config_key}\0{data_dir.expanduser().resolve()}\0{version}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = runtime_dir() / f"serve-{digest}.sock"
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise SharedServerError(
            f"the shared server's socket path {path} is longer than the {SOCKET_PATH_MAX} bytes a Unix socket "
            "may have: set XDG_RUNTIME_DIR to a shorter folder"
        )
    return path


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (Linux: SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (None where the OS does not say)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    return _peer_credentials(sock)[1]


def peer_pid(path: Path) -> int | None:
    """The pid of the server listening on `path`, or None when none listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        return _peer_credentials(sock)[0]


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _try_connect(path: Path) -> Streams | None:
    try:
        return await asyncio.open_unix_connection(str(path), limit=CHUNK)
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return ""


async def connect_shared(path: Path, command: list[str], log_path: Path, timeout_s: float = START_TIMEOUT_S) -> Streams:
    """Connect to the shared server at `path`, starting it with `command` (its output to `log_path`) if
    none listens there. Returns the connection; raises SharedServerError with the server log's tail."""
    found = await _try_connect(path)
    if found is not None:
        return found
    lock_path = path.with_suffix(".lock")
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        # Another window may be starting it right now: wait for its lock, then look again.
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        found = await _try_connect(path)
        if found is not None:
            return found
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a server that was killed: nobody listens on it
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True
            )
        print(
            f"heedful: started the shared server (pid {proc.pid}) at {path}; its log: {log_path}",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + timeout_s
        while (found := await _try_connect(path)) is None:
            code = proc.poll()
            if code is not None:
                raise SharedServerError(
                    f"the shared server exited with status {code} before it listened on {path}; the end of its "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise SharedServerError(
                    f"the shared server (pid {proc.pid}) did not listen on {path} within {timeout_s:.0f} s; "
                    f"see its log {log_path}"
                )
            await asyncio.sleep(0.1)
        return found
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


async def connect_tcp(address: str) -> Streams:
    """Connect to `heedful serve --tcp` at HOST:PORT."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise SharedServerError(f"--connect {address}: give the server's address as HOST:PORT, e.g. 10.0.0.5:2087")
    try:
        return await asyncio.open_connection(host.strip("[]"), int(port_text), limit=CHUNK)
    except OSError as exc:
        raise SharedServerError(
            f"--connect {address}: no Heedful server answers there ({exc}); check that `heedful serve --tcp` runs "
            "on that machine and port and that this machine may reach it"
        ) from None


async def pipe_stdio(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Pass the editor's stdin to the server and the server's answers to stdout until the server closes
    the connection (after the editor's `exit`, or the editor's stdin ended). 0 when it did."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=CHUNK)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin.buffer)
        out_file = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, out_file)
    except (ValueError, OSError) as exc:
        writer.close()
        raise SharedServerError(
            f"the editor's end of `heedful serve` must be a pipe or socket ({exc}); an editor starts it so"
        ) from None
    stdout = asyncio.StreamWriter(transport, protocol, None, loop)

    async def upstream() -> None:
        while chunk := await stdin.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # the server sees the editor leave and ends the session

    async def downstream() -> None:
        while chunk := await reader.read(CHUNK):
            stdout.write(chunk)
            await stdout.drain()

    up = asyncio.create_task(upstream(), name="editor-to-server")
    try:
        await downstream()
    except (ConnectionError, BrokenPipeError):
        return 1
    finally:
        up.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, BrokenPipeError):
            await up
        writer.close()
        stdout.close()
    return 0
