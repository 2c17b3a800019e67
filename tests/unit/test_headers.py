"""
The header rules of every hop (http/headers.py), as pure functions: C{Connection} tokens,
the headers they nominate (never the framing or routing ones), removing them, and the
C{timeout} parameter of an origin's C{Keep-Alive}.
"""

from __future__ import annotations

import pytest

from persistproxy.http.headers import (
    HOP_BY_HOP,
    NEVER_NOMINATED,
    connection_tokens,
    keepalive_timeout_param,
    nominated_headers,
    remove_nominated,
)


def test_connection_tokens_are_lower_cased_trimmed_and_accumulated() -> None:
    tokens: set[bytes] = set()
    connection_tokens(b"Keep-Alive, X-Secret ,,  ", tokens)
    connection_tokens(b"CLOSE", tokens)  # a second Connection header adds to the first
    assert tokens == {b"keep-alive", b"x-secret", b"close"}
    empty: set[bytes] = set()
    connection_tokens(b" , ", empty)
    assert empty == set()


def test_nominated_headers_leave_out_the_options_and_the_protected_headers() -> None:
    tokens = {b"close", b"keep-alive", b"x-secret", b"content-length", b"transfer-encoding",
              b"host", b"te"}  # fmt: skip
    assert nominated_headers(tokens) == {b"x-secret", b"te"}
    assert nominated_headers(None) == set() and nominated_headers(set()) == set()
    assert {b"content-length", b"transfer-encoding", b"host"} == NEVER_NOMINATED


def test_remove_nominated_keeps_order_case_and_repeats_of_the_others() -> None:
    headers = [
        (b"Host", b"x"),
        (b"X-Secret", b"1"),
        (b"Set-Cookie", b"a=1"),
        (b"x-secret", b"2"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert remove_nominated(headers, {b"x-secret"}) == [
        (b"Host", b"x"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert remove_nominated(headers, set()) is headers, "nothing nominated: no copy"


def test_hop_by_hop_names_are_lower_case_and_include_the_rfc_9110_list() -> None:
    assert all(name == name.lower() for name in HOP_BY_HOP)
    assert {b"connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade",
            b"proxy-connection"} <= HOP_BY_HOP  # fmt: skip
    assert b"content-length" not in HOP_BY_HOP


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"timeout=5", 5.0),
        (b"timeout=5, max=100", 5.0),
        (b"max=100, Timeout = 2.5", 2.5),
        (b'timeout="30"', 30.0),
        (b"timeout=0", 0.0),
        (b"max=100", None),
        (b"timeout", None),
        (b"timeout=soon", None),
        (b"timeout=-1", None),
        (b"", None),
    ],
)
def test_keepalive_timeout_param(value: bytes, seconds: float | None) -> None:
    assert keepalive_timeout_param(value) == seconds
