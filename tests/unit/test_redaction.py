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


# Secrets in assignments and env-style lines: each with the text the store must keep instead.
HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"  # 34 letters
GITLAB_TOKEN = "glpat-" + "z_sxgtrfAxKr8q1TPY8Y"  # 20 characters
GITLAB_ROUTABLE = "glpat-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0" + ".01.0p1q2r3s4"
NPM_TOKEN = "npm_" + "TCllNwh2WLQlMWVhybM1iQrsTj6rMQ0BOh6d"  # 36 alphanumerics

ASSIGNMENTS = [
    ("MYSQL_PASSWORD=x", "MYSQL_PASSWORD=[REDACTED:password]"),
    ("export FOO_SECRET=s3cr3t-v@lue\n", "export FOO_SECRET=[REDACTED:password]\n"),
    ("DB_PASS=hunter2 ./run.sh", "DB_PASS=[REDACTED:password] ./run.sh"),
    ("mysql -u root --password=hunter2 shop", "mysql -u root --password=[REDACTED:password] shop"),
    ("SECRET_KEY='django-insecure-abc123'", "SECRET_KEY='[REDACTED:password]'"),
    ('SECRET_KEY = "abc"', 'SECRET_KEY = "[REDACTED:password]"'),
    ('token = "abc123def456"', 'token = "[REDACTED:password]"'),
    ("self.api_token = 'xyz789'", "self.api_token = '[REDACTED:password]'"),
    ('const opts = { accessToken: "abc.def" };', 'const opts = { accessToken: "[REDACTED:password]" };'),
    ('clientSecret := "abc"', 'clientSecret := "[REDACTED:password]"'),
    ('os.environ["API_KEY"] = "k-123"', 'os.environ["API_KEY"] = "[REDACTED:password]"'),
    ('password: str = "changeme"', 'password: str = "[REDACTED:password]"'),
    ('password = "it\'s-a-secret"', 'password = "[REDACTED:password]"'),
    ('config["api_key"] = "abc123xyz"', 'config["api_key"] = "[REDACTED:password]"'),
    ("SECRET_KEY_BASE=0a1b2c", "SECRET_KEY_BASE=[REDACTED:password]"),
    (
        'curl "https://x.example/api?access_token=abc123&page=2"',
        'curl "https://x.example/api?access_token=[REDACTED:password]&page=2"',
    ),
    (f'HF = "{HF_TOKEN}"', 'HF = "[REDACTED:huggingface-token]"'),
    (f'hf_token = "{HF_TOKEN}"', 'hf_token = "[REDACTED:huggingface-token]"'),  # named once, not twice
    (
        f"git clone https://oauth2:{GITLAB_TOKEN}@gitlab.com/x.git",
        "git clone https://oauth2:[REDACTED:gitlab-token]@gitlab.com/x.git",
    ),
    (f"GL = '{GITLAB_TOKEN}'", "GL = '[REDACTED:gitlab-token]'"),
    (f"GL = '{GITLAB_ROUTABLE}'", "GL = '[REDACTED:gitlab-token]'"),
    (f"//registry.npmjs.org/:_authToken={NPM_TOKEN}\n", "//registry.npmjs.org/:_authToken=[REDACTED:npm-token]\n"),
    (f"NPM_TOKEN={NPM_TOKEN}", "NPM_TOKEN=[REDACTED:npm-token]"),
]


@pytest.mark.parametrize(("text", "expected"), ASSIGNMENTS)
def test_secret_assignments_and_tokens(text: str, expected: str) -> None:
    cleaned = Redactor().clean(text)
    assert cleaned.text == expected
    assert cleaned.redacted


# Ordinary code: a value that is an expression (a name, a call, an index, a variable reference) is not a
# secret, and names that merely contain a secret word are not secret names.
KEPT = [
    "token = tokens[0]",
    "password = getpass()",
    'secret_key = os.environ["X"]',
    'SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]',
    "PASSWORD=getpass()",
    "TOKEN=${GITHUB_TOKEN}",
    "connect(host=h, password=pw, port=5432)",
    "login(user, password=password)",
    'if token == "":',
    'if password == "admin":',
    "password = ''",
    "max_tokens = 64",
    "MAX_TOKENS=64",
    'token_count = "3"',
    "PASSWORD_FILE=/run/secrets/db",
    "def login(user: str, password: str) -> bool:",
    'hf_hub_download(repo_id="x", filename="model.safetensors")',
    'npm_config_cache = "/tmp/npm"',
    'tokenizer = "gpt2"',
    'author = "Ann"',
    'bypass = "yes"',
    "glpat-short",
    "hf_" + "a" * 33,
]


@pytest.mark.parametrize("text", KEPT)
def test_ordinary_code_is_kept(text: str) -> None:
    cleaned = Redactor().clean(text)
    assert cleaned.text == text
    assert not cleaned.redacted
