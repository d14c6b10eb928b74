"""URLs shown in logs, config errors and a task's last_error (daemon/redact.py)."""

from __future__ import annotations

import pytest

from daemon import redact


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("postgresql://app:secret@db/x?sslpassword=y", "postgresql://app:***@db/x"),
        ("postgresql:app:secret@127.0.0.1/db", "postgresql:app:***@127.0.0.1/db"),
        ("postgresql://app:p@ss/w@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("https://hooks.example/h?token=abc#frag", "https://hooks.example/h"),
        ("http://user@example.com/x", "http://user@example.com/x"),
        ("sqlite:var/offload.db", "sqlite:var/offload.db"),
        ("postgresql://[::1/db", "postgresql://[::1/db"),  # unparseable: shown, no raise
        ("", ""),
    ],
)
def test_a_url_is_shown_without_password_query_or_fragment(given: str, shown: str) -> None:
    assert redact.url(given) == shown
