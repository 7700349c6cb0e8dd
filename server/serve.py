"""`heedful serve`: run the language server over stdio (one editor) or TCP (any number of editors).

stdio: the protocol gets a private copy of the real stdout, and file descriptor 1 is pointed at stderr,
so a stray print (ours, a library's, or a vLLM worker process's) can never corrupt the protocol stream.

TCP binds 127.0.0.1 unless told otherwise; a non-local bind needs tokens (`server.tcp_token` or developer
tokens with `server.require_tokens`), and a client whose `initialize` does not prove who it is is refused and
disconnected (`lsp_handlers.auth`). Every connection gets its own `HeedfulLanguageServer`
(its own session), and they all share one engine, one store and one tokenizer. One client's `exit`
ends its connection, not the process.

On the way out every session records its end and pending snapshots, the store's writer is drained,
and the engine's worker processes are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pygls.io_ import StdoutWriter

from kernel.settings import client_sections
from lsp_handlers.auth import AuthPolicy
from lsp_handlers.completion import CompletionService
from lsp_handlers.framing import CHUNK, MAX_UNINITIALIZED_BYTES, FrameReader, FramingError, Source
from lsp_handlers.protocol import HeedfulProtocol
from lsp_handlers.server import HeedfulLanguageServer, create_server
from server.logs import connection
from server.recording import CLIENT_TO_SERVER, Recorder, RecordingWriter
from server.runtime import Services
from server.shared import peer_pid, peer_uid
from storage.redaction import Redactor
from tools.report import developer_report_html

log = logging.getLogger(__name__)

_connection_numbers = itertools.count(1)


class _StreamWriter:
    """pygls writer over an asyncio StreamWriter (TCP)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    def close(self) -> None:
        self._writer.close()


async def run_connection(
    reader: Source,
    writer: Any,
    services: Services,
    completions: CompletionService,
    auth: AuthPolicy | None = None,
    *,
    tap: Callable[[bytes], None] | None = None,
) -> HeedfulLanguageServer:
    """Serve one connection until the client sends `exit` or closes the stream; then close its session.

    `auth`: how the client proves who it is (`lsp_handlers.auth`; default: stdio, one OS user).
    `tap` sees every message body the client sent (`heedful serve --record`).
    """
    connection.set(f"c{next(_connection_numbers)}")  # the log's rate limits count per connection
    ls = create_server(services, completions, report_html=developer_report_html, auth=auth)
    ls.protocol.set_writer(writer)
    limit = services.base.settings.server.max_message_bytes

    def max_body() -> int:
        # Until the connection is initialized (a TCP client has shown its token), an initialize is all
        # that may come, and it is small: a client that is not let in cannot make the server hold more.
        return limit if ls.identity is not None else min(limit, MAX_UNINITIALIZED_BYTES)

    assert isinstance(ls.protocol, HeedfulProtocol)
    frames = FrameReader(reader, max_body)
    loop_task = asyncio.create_task(_read_messages(frames, ls.protocol, tap), name="lsp-read-loop")
    exit_task = asyncio.create_task(ls.exit_requested.wait(), name="lsp-exit")
    try:
        await asyncio.wait({loop_task, exit_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (loop_task, exit_task):
            task.cancel()
        for task in (loop_task, exit_task):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await ls.close_session()
    return ls


async def _read_messages(frames: FrameReader, protocol: HeedfulProtocol, tap: Callable[[bytes], None] | None) -> None:
    """Hand each message to the protocol until the stream ends; bytes that are not one are answered and logged."""
    while (frame := await frames.next()) is not None:
        if isinstance(frame, FramingError):
            log.warning("from the client: %s", frame)  # its own text, which quotes nothing the client sent
            protocol.answer_framing_error(frame)
            continue
        if tap is not None:
            tap(frame.data)
        try:
            protocol.receive(frame.data)
        except Exception:
            log.exception("a message could not be handled; the connection goes on")


async def _stdio_reader(stdin: BinaryIO) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK)  # a flow-control mark: FrameReader reads in chunks, not lines
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    return reader


def _protect_stdout() -> BinaryIO:
    """A private handle on the real stdout for the protocol; fd 1 now leads to stderr."""
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "wb", buffering=0)


async def serve_stdio(services: Services, record: Path | None = None) -> int:
    out = _protect_stdout()
    try:
        reader = await _stdio_reader(sys.stdin.buffer)
    except (ValueError, OSError) as exc:
        log.error("standard input must be a pipe or socket for `heedful serve` (%s); use --tcp otherwise", exc)
        return 2
    writer: Any = StdoutWriter(out)
    recorder = None
    tap = None
    if record is not None:
        settings = services.base.settings
        redactor = Redactor(settings.privacy.redact_patterns)
        recorder = Recorder(record, redactor, source="serve", settings=client_sections(settings))
        writer = RecordingWriter(writer, recorder)
        tap = functools.partial(recorder.record, CLIENT_TO_SERVER)
    completions = CompletionService(services)
    try:
        ls = await run_connection(reader, writer, services, completions, tap=tap)
        if recorder is not None and ls.identity is not None:
            session_id = ls.identity.session_id
            recorder.record_store(session_id, await services.store.session_events(session_id))
    finally:
        if recorder is not None:
            recorder.close()
    # LSP: exit after shutdown is a clean stop (0); exit (or a closed stream) without it is not (1).
    return 0 if ls.shutdown_requested else 1


class _Listener:
    """The connections of a listening server (TCP or the shared server's socket), each its own session."""

    def __init__(
        self, services: Services, auth: AuthPolicy, *, check_peer: Callable[[Any], str | None] | None = None
    ) -> None:
        self.services = services
        self.auth = auth
        self.completions = CompletionService(services)
        self.connections: set[asyncio.Task[Any]] = set()
        self.check_peer = check_peer  # why a connection may not be served (None: it may)
        self.changed = asyncio.Event()  # a connection came or went

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or "the local socket"
        refused = self.check_peer(writer.get_extra_info("socket")) if self.check_peer is not None else None
        if refused is not None:
            log.warning("connection refused: %s", refused)
            writer.close()
            return
        log.info("client connected from %s", peer)
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        self.changed.set()
        try:
            await run_connection(reader, _StreamWriter(writer), self.services, self.completions, self.auth)
        finally:
            writer.close()
            if task is not None:
                self.connections.discard(task)
            self.changed.set()
            log.info("client %s disconnected", peer)

    async def run(self, server: asyncio.base_events.Server, idle_exit_s: float = 0.0) -> int:
        """Serve until SIGINT/SIGTERM (or, with `idle_exit_s`, that long without a connection); then close."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stopping.set)
        idle = asyncio.create_task(self._exit_when_idle(idle_exit_s, stopping)) if idle_exit_s > 0 else None
        async with server:
            await stopping.wait()
            if idle is not None:
                idle.cancel()
            log.info("stopping: closing %d connection(s)", len(self.connections))
            server.close()
            for task in list(self.connections):
                task.cancel()
            if self.connections:
                await asyncio.gather(*self.connections, return_exceptions=True)
        return 0

    async def _exit_when_idle(self, idle_exit_s: float, stopping: asyncio.Event) -> None:
        """Set `stopping` once no connection has been open for `idle_exit_s` and no training round runs."""
        while True:
            self.changed.clear()
            if self.connections:
                await self.changed.wait()
                continue
            try:
                await asyncio.wait_for(self.changed.wait(), idle_exit_s)
                continue  # someone connected (or came and went): count again from now
            except TimeoutError:
                pass
            if await self.services.training_round_running():
                log.info("no editor connected for %.0f s; waiting for the training round to end", idle_exit_s)
                await asyncio.sleep(min(idle_exit_s, 30.0))
                continue
            log.info("no editor connected for %.0f s: stopping (the next editor starts the server again)", idle_exit_s)
            stopping.set()
            return


def _announce(line: str) -> None:
    """Write `line` to stderr in one write: `print` writes the text and the line end apart, and a log record from
    another thread (the engine starting) written between them would run on after the port on the same line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


async def serve_tcp(services: Services, host: str, port: int, auth: AuthPolicy) -> int:
    listener = _Listener(services, auth)
    server = await asyncio.start_server(listener.on_connect, host, port, limit=CHUNK)
    bound = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)
    # The one line a supervisor (or a test) reads to learn the port when --port 0 was given.
    _announce(f"heedful: listening on {bound}")
    return await listener.run(server)


def _other_user(sock: Any) -> str | None:
    uid = peer_uid(sock) if sock is not None else None
    if uid is None or uid == os.getuid():
        return None
    return f"a process of user id {uid} connected to the shared server of user id {os.getuid()}"


async def serve_socket(services: Services, path: Path, idle_exit_s: float) -> int:
    """This user's shared server (what `heedful serve --shared` starts): every editor window's connection
    on the Unix socket `path`, served as over stdio (the socket's folder and a peer check keep other users
    out)."""
    listener = _Listener(services, AuthPolicy(), check_peer=_other_user)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if peer_pid(path) is None:
            path.unlink()  # left by a server that was killed
    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        server = await asyncio.start_unix_server(listener.on_connect, str(path), limit=CHUNK)
    finally:
        os.umask(old_umask)
    _announce(f"heedful: listening on {path}")
    try:
        return await listener.run(server, idle_exit_s)
    finally:
        with contextlib.suppress(OSError):
            if path.exists() and peer_pid(path) is None:
                path.unlink()


async def serve(
    config_path: Any,
    *,
    tcp: bool,
    host: str,
    port: int,
    socket_path: Path | None = None,
    record: Path | None = None,
    auth: AuthPolicy | None = None,
    metrics: tuple[str, int] | None = None,
) -> int:
    """Serve until the editor leaves (stdio), a signal arrives (TCP), or no editor is left (`socket_path`).

    `auth`: how TCP clients prove who they are; `metrics`: (host, port) of the Prometheus endpoint, None: off.
    """
    services = await Services.open(config_path)
    try:
        if metrics is not None:
            services.metrics.expose(services.store, asyncio.get_running_loop(), *metrics)
        if tcp:
            return await serve_tcp(services, host, port, auth or AuthPolicy(tcp=True))
        if socket_path is not None:
            return await serve_socket(services, socket_path, services.base.settings.server.idle_exit_s)
        return await serve_stdio(services, record)
    finally:
        await services.close()
