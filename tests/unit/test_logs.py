"""The log a client cannot flood or forge: clipped arguments, escaped control characters, one line per
client error, and a bounded number of identical records per connection. Records go through a real
FileHandler with Heedful's filter and formatter."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pygls.exceptions import JsonRpcInvalidParams

from server.logs import (
    CLIENT_TEXT_CHARS,
    FORMAT,
    RATE_BURST,
    ClientSafeFilter,
    ClientSafeFormatter,
    clip,
    connection,
    escape,
)

FORGED = "2031-01-01 00:00:00,000 ERROR server.admin: forged"


def test_clip_and_escape_by_hand() -> None:
    assert escape("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert escape("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert escape("\x85 \u2028 \ud800 é 🎉") == "\\x85 \\u2028 \\ud800 é 🎉"  # C1, line separator, lone surrogate
    assert clip("abc", 5) == "abc"
    assert clip("x" * 300) == "x" * 200 + "...[100 more characters]"
    assert clip("\n" * 3, 2) == "\\n\\n...[1 more characters]"


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[tuple[logging.Logger, Path, ClientSafeFilter]]:
    path = tmp_path / "server.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(ClientSafeFormatter(FORMAT))
    rate = ClientSafeFilter(window_s=0.2)
    handler.addFilter(rate)
    logger = logging.getLogger("heedful-test-logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, path, rate
    handler.close()


def test_client_text_is_clipped_escaped_and_kept_on_one_line(
    logged: tuple[logging.Logger, Path, ClientSafeFilter],
) -> None:
    logger, path, _ = logged
    uri = f"file:///\n{FORGED}\n\x1b[2J" + "u" * 100_000
    logger.warning("didChange for %s, which is not open; ignored", uri)
    logger.warning("request %r (%s): %s", uri, 7, ValueError(uri))
    try:
        json.loads("{" + "x" * 50_000)
    except ValueError:
        logger.exception("a message body that is not JSON")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3  # one line per record: no newline, no traceback of a client's bad message
    assert not any(line.startswith(FORGED) for line in lines) and "\x1b" not in path.read_text()
    assert f"file:///\\n{FORGED}\\n\\x1b[2J" in lines[0]
    assert lines[0].endswith(f"...[{len(uri) - CLIENT_TEXT_CHARS} more characters], which is not open; ignored")
    assert all(len(line) < 2500 for line in lines)
    assert "JSONDecodeError" in lines[2]


def test_a_json_rpc_error_is_one_line_and_our_own_error_keeps_an_indented_traceback(
    logged: tuple[logging.Logger, Path, ClientSafeFilter],
) -> None:
    logger, path, _ = logged
    try:
        raise JsonRpcInvalidParams("completion 'c-1' was not served\nFORGED")
    except JsonRpcInvalidParams:
        logger.exception('Exception occurred for message "%s"', 5)
    try:
        raise KeyError(f"\n{FORGED}")
    except KeyError:
        logger.exception("our own bug")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].endswith("JsonRpcInvalidParams: completion 'c-1' was not served\\nFORGED")
    assert "our own bug" in lines[1]
    traceback = lines[2:]
    assert traceback[0] == "  | Traceback (most recent call last):"
    assert all(line.startswith("  | ") for line in traceback)  # a forged line in a message cannot pass for a record
    assert not any(line.startswith(FORGED) for line in lines)


def test_identical_records_are_bounded_per_connection_and_counted(
    logged: tuple[logging.Logger, Path, ClientSafeFilter],
) -> None:
    logger, path, rate = logged
    token = connection.set("c1")
    try:
        for i in range(100):
            logger.warning("heedful/didRejectCompletion for completion %r, which this session did not serve", f"c-{i}")
        other = connection.set("c2")  # another client has its own budget
        logger.warning("heedful/didRejectCompletion for completion %r, which this session did not serve", "c-x")
        connection.reset(other)
        time.sleep(rate.window_s * 1.5)  # the window is over: the next one is logged and says what was left out
        logger.warning("heedful/didRejectCompletion for completion %r, which this session did not serve", "c-100")
    finally:
        connection.reset(token)
    for i in range(30):  # outside a connection (the worker, the CLI) nothing is left out
        logger.info("training step %d", i)
    lines = path.read_text(encoding="utf-8").splitlines()
    rejects = [line for line in lines if "didRejectCompletion" in line]
    assert len(rejects) == RATE_BURST + 1 + 1
    assert rejects[-1].endswith(f"(and {100 - RATE_BURST} more like this were not logged)")
    assert sum("training step" in line for line in lines) == 30
