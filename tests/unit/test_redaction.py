"""Each redaction pattern, and the repairs of text no database can store."""

from __future__ import annotations

import pytest

from storage.redaction import MAX_TEXT_CHARS, Redactor

CASES = [
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "[REDACTED:private-key]"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn (cut off)", "[REDACTED:private-key]"),
    ("key = 'AKIAIOSFODNN7EXAMPLE'", "key = '[REDACTED:aws-access-key]'"),
    (
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "aws_secret_access_key = [REDACTED:aws-secret-key]",
    ),
    ("g = 'AIzaSyA1234567890abcdefghijklmnopqrstuv'", "g = '[REDACTED:gcp-api-key]'"),
    ("t = 'ghp_" + "a" * 36 + "'", "t = '[REDACTED:github-token]'"),
    ("t = 'github_pat_" + "B" * 30 + "'", "t = '[REDACTED:github-token]'"),
    ("SLACK = 'xoxb-1234567890-abcdefghij'", "SLACK = '[REDACTED:slack-token]'"),
    ("OPENAI = 'sk-proj-abcdefghijklmnopqrstuvwx'", "OPENAI = '[REDACTED:openai-key]'"),
    ("stripe = 'sk_live_abcdefghijklmnop'", "stripe = '[REDACTED:stripe-key]'"),
    ("DefaultEndpointsProtocol=https;AccountKey=" + "a" * 44 + ";", "AccountKey=[REDACTED:azure-key];"),
    ("jwt = 'eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.SflKxwRJSMeKKF2QT4'", "jwt = '[REDACTED:jwt]'"),
    ('headers = {"Authorization": "Bearer abcdef1234567890XYZ"}', '"Authorization": "Bearer [REDACTED:bearer-token]"'),
    ('password = "hunter22"', 'password = "[REDACTED:password]"'),
    ("DB_PASSWD: 'opensesame'", "DB_PASSWD: '[REDACTED:password]'"),
    ('config["api_key"] = "abc123xyz"', '"api_key"] = "abc123xyz"'),  # an index, not an assignment: kept
    ("api_key='abc123xyz'", "api_key='[REDACTED:password]'"),
    ("postgresql://admin:s3cretpw@db/prod", "postgresql://admin:[REDACTED:password]@db/prod"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_each_pattern(text: str, expected: str) -> None:
    cleaned = Redactor().clean(text)
    assert expected in cleaned.text
    secret_gone = expected != text and "[REDACTED" in expected
    assert cleaned.redacted is secret_gone


def test_plain_code_is_untouched() -> None:
    code = "def login(user, password):\n    return check(user, password)  # password = input()\n"
    cleaned = Redactor().clean(code)
    assert cleaned.text == code and not cleaned.redacted


def test_admin_patterns() -> None:
    r = Redactor([r"INTERNAL-\d{4}"])
    assert r.clean("ticket INTERNAL-1234").text == "ticket [REDACTED:custom]"


def test_surrogates_nul_and_bytes_are_repaired() -> None:
    r = Redactor()
    out = r.clean("a\ud83db\x00c")
    assert out.text == "a\ufffdb\ufffdc" and out.repaired
    out = r.clean(b"ok \xff\xfe end")
    assert out.text == "ok \ufffd\ufffd end" and out.repaired
    assert r.clean(None).text == ""


def test_oversized_text_is_cut_with_a_marker() -> None:
    out = Redactor().clean("x" * (MAX_TEXT_CHARS + 10))
    assert out.truncated and len(out.text) == MAX_TEXT_CHARS
    assert out.text.endswith("[TRUNCATED: 10 more characters not stored]")
