"""URLs in messages and logs show no credentials, valid URLs or not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator._urls import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:hunter2@host/v1", "http://user:***@host/v1"),
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("https://hunter2@host", "https://***@host"),  # a lone user name is often a token
        ("http://user:hun@ter2@host/v1", "http://user:***@host/v1"),
        ("http://user:hun/ter2@host:abc/v1", "http://user:***@host:abc/v1"),
        ("user:hunter2@host:8080", "user:***@host:8080"),  # the scheme forgotten
        ("unix:///tmp/r.sock?db=1&PASSWORD=hunter2", "unix:///tmp/r.sock?db=1&PASSWORD=***"),
        ("http://localhost:8080/v1", "http://localhost:8080/v1"),
        ("not a url", "not a url"),
    ],
)
def test_credentials_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown


_part = st.text(st.characters(blacklist_characters="@", blacklist_categories=["Cs"]))


@given(
    user=_part.filter(lambda s: ":" not in s),
    password=st.text(st.characters(blacklist_categories=["Cs"])),
    host=_part,
)
def test_no_password_shows_whatever_it_holds(user: str, password: str, host: str) -> None:
    assert redact_url(f"http://{user}:{password}@{host}") == f"http://{user}:***@{host}"
