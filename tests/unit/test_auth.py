"""Identity claims at `initialize`: limits from the schema, and when a TCP connection needs a token."""

from __future__ import annotations

import pytest
from pygls.exceptions import JsonRpcInvalidParams

from lsp_handlers.auth import AuthPolicy, check_client_info, parse_claim
from storage.tokens import PREFIX_CHARS, TOKEN_MARK, check_id, new_token, token_digest


def test_a_claim_within_the_schema_limits_is_taken_as_is() -> None:
    claim = parse_claim({"developerId": "d" * 200, "team": "t" * 64, "sessionId": "s" * 64, "token": "x"})
    assert (claim.developer_id, claim.team_id, claim.session_id, claim.token) == ("d" * 200, "t" * 64, "s" * 64, "x")
    assert claim.developer_given


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"developerId": "d" * 201}, "developerId"),
        ({"developerId": "a", "team": "t" * 65}, "team"),
        ({"developerId": "a", "sessionId": "s" * 65}, "sessionId"),
        ({"developerId": "a", "team": "red\x1b[31m"}, "team"),
        ({"developerId": " "}, "developerId"),
        ({"developerId": 7}, "developerId"),
    ],
)
def test_ids_the_store_cannot_hold_are_invalid_params(options: dict[str, object], key: str) -> None:
    with pytest.raises(JsonRpcInvalidParams, match=f"initializationOptions.{key}"):
        parse_claim(options)


def test_the_cursor_rest_signal_is_documenthighlight_unless_the_client_says_it_sends_its_own() -> None:
    assert parse_claim({"developerId": "a"}).cursor_rest == "documentHighlight"
    assert parse_claim({"developerId": "a", "cursorRest": "didMoveCursor"}).cursor_rest == "didMoveCursor"
    assert parse_claim({"developerId": "a", "cursorRest": "documentHighlight"}).cursor_rest == "documentHighlight"
    for wrong, shown in (("didmovecursor", "'didmovecursor'"), (1, "1"), ("x" * 500, "'xxxx")):
        with pytest.raises(JsonRpcInvalidParams) as info:
            parse_claim({"developerId": "a", "cursorRest": wrong})
        message = str(info.value)
        assert f"initializationOptions.cursorRest is {shown}" in message and '"didMoveCursor"' in message
        assert len(message) < 400


def test_long_values_are_shortened_in_the_error() -> None:
    with pytest.raises(ValueError) as info:
        check_id("team", "x" * 5000, 64)
    assert len(str(info.value)) < 300 and "(5000 chars)" in str(info.value)


def test_client_info_over_the_schema_limit_is_refused() -> None:
    check_client_info("n" * 200, "v" * 100)
    with pytest.raises(JsonRpcInvalidParams, match=r"clientInfo.version is 101 characters long; .* at most 100"):
        check_client_info("ed", "v" * 101)


def test_which_connections_need_a_token() -> None:
    assert not AuthPolicy().needs_token  # stdio
    assert not AuthPolicy(tcp=True, loopback=True).needs_token
    assert AuthPolicy(tcp=True, loopback=False, shared_token="s").needs_token
    assert AuthPolicy(tcp=True, loopback=True, require_tokens=True).needs_token


def test_tokens_are_random_and_kept_as_sha256() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith(TOKEN_MARK) and len(a) == len(TOKEN_MARK) + 43  # 32 bytes in base64url
    assert token_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert len(a) > PREFIX_CHARS
