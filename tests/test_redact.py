"""Secrets stay out of memory: redaction patterns, and a real file change end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memory.service import EmbedQueue, Memory
from self_mutation_watcher.redact import NEEDLES, Redactor, _replace
from self_mutation_watcher.watcher import Watcher
from tests.conftest import wait_for

AWS_KEY = "AKIA" + "Q3EXAMPLE7ZZYYXXW"[:16]
GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\nq9Zz+abc\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize("text, kind, kept", [
    (f"aws_key = '{AWS_KEY}'", "aws_access_key", "aws_key = '"),
    (f"token: {GITHUB}", "github_token", "token: "),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9abcdefghij.payload", "bearer_token", "Authorization: Bearer "),
    ('DB_PASSWORD="hunter2hunter2"', "assignment", 'DB_PASSWORD="'),
    ("api_key=sk_live_0123456789", "assignment", "api_key="),
    ("postgres://app:s3cr3tpw@db:5432/app", "url_password", "postgres://app:"),
    (PRIVATE_KEY, "private_key", ""),
])
def test_each_kind_of_secret_is_redacted(text: str, kind: str, kept: str):
    out, counts = Redactor.build().redact(text)
    assert counts.get(kind) == 1, (out, counts)
    assert f"[REDACTED:{kind}]" in out and out.startswith(kept)
    assert not re.search(r"hunter2|s3cr3t|sk_live|AKIA|ghp_|MIIEow|eyJhbGci", out)


def test_ordinary_code_is_left_alone():
    code = "def password_strength(pw):\n    return len(pw) >= 12  # keys are checked elsewhere\n"
    assert Redactor.build().redact(code) == (code, {})


@pytest.mark.parametrize("text", [
    f"aws_key = '{AWS_KEY}'", f"token: {GITHUB}", PRIVATE_KEY, "postgres://app:s3cr3tpw@db:5432/app",
    "Authorization: BEARER abcdefghijklmnopqrstuvwx", "x = 'xoxb-1234567890-abcdef'", "k = AIza" + "B" * 35,
    "OPENAI = 'sk-proj-abcdefghijklmnopqrstuvwxyz'", "t = eyJhbGciOiJIUzI1.eyJzdWIiOiIx.abcdefghijkl",
    "\u017fecret = 'hunter2hunter2'", "API_\u212aEY=abcdefgh1234", "To\u212aen abcdefghijklmnopqrstuv",
    "Passwd: 'hunter2hunter2'", "client-Secret = 'abcd1234'", "def key_of(x):\n    return x  # no secret\n",
])
def test_skipping_patterns_by_their_needles_never_changes_the_result(text: str):
    redactor = Redactor.build()
    expected, counts = text, {}
    for kind, pattern, group in redactor.patterns:  # every pattern, none skipped
        expected, n = pattern.subn(lambda m, k=kind, g=group: _replace(m, k, g), expected)
        if n:
            counts[kind] = counts.get(kind, 0) + n
    assert redactor.redact(text) == (expected, counts)
    assert set(NEEDLES) <= {kind for kind, _, _ in redactor.patterns}


def test_extra_patterns_and_switching_off():
    assert Redactor.build(extra=[r"ACME-\d{6}"]).redact("id ACME-123456")[0] == "id [REDACTED:custom]"
    assert Redactor.build(enabled=False).redact(f"k = {AWS_KEY}") == (f"k = {AWS_KEY}", {})


def test_a_secret_in_a_change_never_reaches_the_database_or_the_index(settings, store, embedder, watched: Path):
    memory = Memory(settings, store, embedder)
    queue = EmbedQueue(memory)
    queue.start()
    watcher = Watcher(settings, store, queue.submit)
    watcher.start()
    try:
        assert watcher.wait_idle(20)
        (watched / "deploy.py").write_text(f"AWS_ACCESS_KEY_ID = '{AWS_KEY}'\nGITHUB_TOKEN = '{GITHUB}'\n"
                                           f"REGION = 'eu-west-1'\n")
        wait_for(lambda: store.vector_count(embedder.model_id) == 1, 30, what="the change to be embedded")
    finally:
        watcher.stop()
        queue.stop()
    event = store.events_for_path(str(watched / "deploy.py"))[0]
    assert event["meta"]["redacted"] == {"aws_access_key": 1, "github_token": 1}
    assert "REGION = 'eu-west-1'" in event["diff"]
    memory.save_index(force=True)
    store.close()
    for path in [settings.memory.db, *settings.memory.db.parent.glob("gremlin.db-*"),
                 *settings.memory.index_dir.iterdir()]:
        raw = path.read_bytes()
        assert AWS_KEY.encode() not in raw and GITHUB.encode() not in raw, path


def test_huge_lines_do_not_make_redaction_quadratic():
    import time

    redactor = Redactor.build()
    for text in ("+" + "x" * 1_000_000, "+" + "ab:" * 300_000, "-----BEGIN RSA PRIVATE KEY-----\n" * 2000):
        start = time.perf_counter()
        redactor.redact(text)
        assert time.perf_counter() - start < 2.0  # was minutes with an unbounded [a-z]* before '://'
