"""LSP framing: whatever bytes arrive, the reader reports what was wrong once and finds the next message.

The reader reads a real asyncio StreamReader fed with the bytes a client would send.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from lsp_handlers.framing import (
    INVALID_REQUEST,
    MAX_HEADER_LINE,
    PARSE_ERROR,
    Body,
    FrameReader,
    FramingError,
    request_id,
)

OK = b'{"jsonrpc": "2.0", "method": "ok"}'


def frame(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


async def read_all(data: bytes, max_body: int = 10**9, pieces: int = 1) -> tuple[list[Body | FramingError], int]:
    """Every frame of `data` (fed in `pieces` parts), and the bytes the reader dropped."""
    source = asyncio.StreamReader()
    reader = FrameReader(source, lambda: max_body)
    step = max(1, len(data) // pieces)

    async def feed() -> None:
        for i in range(0, len(data), step):
            source.feed_data(data[i : i + step])
            await asyncio.sleep(0)
        source.feed_eof()

    feeder = asyncio.create_task(feed())
    out = []
    while (item := await reader.next()) is not None:
        out.append(item)
    await feeder
    return out, reader.dropped


async def test_good_frames_whole_or_byte_by_byte() -> None:
    data = frame(OK) + b"Content-Length: 2\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n{}"
    for pieces in (1, len(data)):
        frames, dropped = await read_all(data, pieces=pieces)
        assert frames == [Body(OK), Body(b"{}")] and dropped == 0


async def test_stray_blank_lines_bare_newlines_and_an_empty_body() -> None:
    frames, _ = await read_all(b"\r\n\r\n" + b"Content-Length: 2\n\n{}" + b"Content-Length: 0\r\n\r\n" + frame(OK))
    assert frames == [Body(b"{}"), Body(b""), Body(OK)]


async def test_a_header_line_over_the_limit_is_skipped_up_to_the_next_header() -> None:
    junk = b"X-Padding: " + b"p" * (1024 * 1024) + b"\r\n\r\n" + OK  # over 1 MiB: killed pygls' reader
    frames, dropped = await read_all(junk + frame(OK), pieces=40)
    assert len(frames) == 2
    assert isinstance(frames[0], FramingError) and f"longer than {MAX_HEADER_LINE} bytes" in frames[0].message
    assert frames[0].code == PARSE_ERROR and frames[0].msg_id is None
    assert frames[1] == Body(OK)
    assert dropped == len(junk)


async def test_a_content_length_that_understates_a_2_mib_body() -> None:
    big = json.dumps({"jsonrpc": "2.0", "method": "x", "params": {"text": "y = 1\n" * 350_000}}).encode()
    assert len(big) > 2 * 1024 * 1024
    third = len(big) // 3
    frames, dropped = await read_all(b"Content-Length: %d\r\n\r\n" % third + big + frame(OK), pieces=64)
    # The first third is handed on (the protocol answers it with a parse error), the rest is not a
    # header: one error, then the next message.
    assert frames[0] == Body(big[:third])
    assert isinstance(frames[1], FramingError) and "where a message header should be" in frames[1].message
    assert frames[2:] == [Body(OK)]
    assert dropped == len(big) - third


async def test_a_content_length_that_overstates_its_body() -> None:
    lie = b"Content-Length: 5000\r\n\r\n" + OK
    frames, dropped = await read_all(lie + frame(b"{}"))
    assert isinstance(frames[0], FramingError)
    assert f"the next message's header came after {len(OK)}" in frames[0].message
    assert frames[1:] == [Body(b"{}")] and dropped == len(OK)


@pytest.mark.parametrize(
    "header",
    [b"Content-Length: -5", b"Content-Length: twelve", b"Content-Length: 1e3", b"Content-Length:"],
)
async def test_a_content_length_that_is_not_a_number(header: bytes) -> None:
    frames, _ = await read_all(header + b"\r\n\r\n" + OK + frame(OK))
    assert isinstance(frames[0], FramingError) and "not a number of bytes" in frames[0].message
    assert frames[1:] == [Body(OK)]


async def test_a_missing_blank_line_and_a_header_block_without_content_length() -> None:
    frames, _ = await read_all(b"Content-Length: %d\r\n" % len(OK) + OK + frame(OK))
    assert isinstance(frames[0], FramingError) and frames[1:] == [Body(OK)]
    frames, _ = await read_all(b"Content-Type: x\r\n\r\n" + OK + frame(b"{}"))
    assert isinstance(frames[0], FramingError) and "without Content-Length" in frames[0].message
    assert frames[1:] == [Body(b"{}")]


async def test_an_over_limit_message_is_answered_and_dropped_in_chunks() -> None:
    body = b'{"jsonrpc": "2.0", "id": 41, "method": "textDocument/didOpen", "params": "' + b"z" * 300_000 + b'"}'
    frames, dropped = await read_all(frame(body) + frame(OK), max_body=65_536, pieces=50)
    error = frames[0]
    assert isinstance(error, FramingError)
    assert error.code == INVALID_REQUEST and error.msg_id == 41
    assert f"a message of {len(body)} bytes is over this server's limit of 65536 bytes" in error.message
    assert frames[1:] == [Body(OK)] and dropped == len(body)


async def test_a_content_length_of_10_to_the_11_does_not_swallow_the_next_message() -> None:
    for number in (b"100000000000", b"9" * 40):
        frames, dropped = await read_all(b"Content-Length: " + number + b"\r\n\r\n" + OK + frame(b"{}"))
        assert isinstance(frames[0], FramingError) and frames[0].code == INVALID_REQUEST
        assert frames[1:] == [Body(b"{}")] and dropped == len(OK)


async def test_the_stream_ending_inside_a_body_or_a_header_ends_the_frames() -> None:
    assert (await read_all(b"Content-Length: 10\r\n\r\n{}"))[0] == []
    assert (await read_all(frame(OK) + b"Content-Len"))[0] == [Body(OK)]


def test_request_id_reads_only_an_id_the_body_opens_with() -> None:
    assert request_id(b'{"jsonrpc": "2.0", "id": 7, "method": "x", "params": {}}') == 7
    assert request_id(b'{"id": "a-1", "params": {"id": 3}}') == "a-1"
    assert request_id(b'{"method":"x","jsonrpc":"2.0","id":-2}') == -2
    assert request_id(b'{"jsonrpc": "2.0", "method": "x", "params": {"id": 3}}') is None  # a notification
    assert request_id(b'{"params": {"id": 3}, "id": 9}') is None  # not at the start: could be anything's
    assert request_id(b"\xff\xfe") is None
