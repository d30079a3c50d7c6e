"""Server-sent event encoding and fan-out; bearer-token rules."""

from __future__ import annotations

import asyncio
import json

import pytest

from auditor.server.auth import SESSION_COOKIE, SESSION_TTL_S, UI_HEADER, check_bearer, needs_token, session_allows, session_value
from auditor.server.errors import UnauthorizedError
from auditor.server.settings import Settings
from auditor.server.sse import Broadcaster, sse_comment, sse_event


def test_sse_event_wire_format() -> None:
    assert sse_event({"a": 1}, event="alert", id="x1") == b'event: alert\nid: x1\ndata: {"a":1}\n\n'
    assert sse_event("line1\nline2") == b"data: line1\ndata: line2\n\n"
    assert sse_comment() == b": keepalive\n\n"


def test_broadcaster_filters_and_drops_oldest_for_slow_subscribers() -> None:
    async def scenario() -> tuple[list[bytes], list[bytes]]:
        hub = Broadcaster(maxsize=2)
        high = hub.subscribe(lambda a: a["severity"] == "high", keepalive_s=5)
        every = hub.subscribe(keepalive_s=5)
        assert await high.__anext__() == sse_comment("subscribed")
        assert await every.__anext__() == sse_comment("subscribed")
        for i, sev in enumerate(["low", "high", "high", "high"]):
            hub.publish({"id": str(i), "severity": sev})
        got_high = [await high.__anext__(), await high.__anext__()]
        got_every = [await every.__anext__(), await every.__anext__()]
        await high.aclose()
        await every.aclose()
        assert hub.subscribers == 0
        return got_high, got_every

    got_high, got_every = asyncio.run(scenario())
    decode = [json.loads(e.decode().split("data: ", 1)[1]) for e in got_high]
    # The queue held 2: event 1 was dropped for the "high" subscriber, which is told so.
    assert [d["id"] for d in decode] == ["2", "3"] and decode[0]["dropped_before"] == 1
    assert [json.loads(e.decode().split("data: ", 1)[1])["id"] for e in got_every] == ["2", "3"]


def test_broadcaster_close_ends_every_stream_even_a_full_one() -> None:
    async def scenario() -> list[bytes]:
        hub = Broadcaster(maxsize=1)
        sub = hub.subscribe(keepalive_s=60)
        assert await sub.__anext__() == sse_comment("subscribed")
        hub.publish({"id": "0", "severity": "high"})  # its queue is full
        hub.close()
        rest = [e async for e in sub]  # ends instead of waiting for the next alert
        assert hub.subscribers == 0
        assert [e async for e in hub.subscribe()] == []  # a subscription after close ends at once
        return rest

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == []


def _settings(**flags: object) -> Settings:
    return Settings.load(flags=flags, env={"AUDITOR_API_TOKEN": "s3cret"})


@pytest.mark.parametrize(
    ("auth_all", "method", "path", "expected"),
    [
        (False, "POST", "/v1/policies/reload", True),
        (False, "POST", "/v1/policies/validate", True),
        (False, "POST", "/v1/generate", True),
        (False, "POST", "/v1/audit", False),
        (False, "GET", "/v1/policies", False),
        (True, "POST", "/v1/audit", True),
        (True, "GET", "/metrics", True),
        (True, "GET", "/healthz", False),
        (True, "GET", "/readyz", False),
    ],
)
def test_which_routes_need_the_token(auth_all: bool, method: str, path: str, expected: bool) -> None:
    assert needs_token(_settings(auth_all_routes=auth_all), method, path) is expected


def test_no_token_configured_means_no_checks() -> None:
    s = Settings.load(env={})
    assert not needs_token(s, "POST", "/v1/policies/reload")
    check_bearer(s, {})


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "s3cret"}, {"authorization": "Basic s3cret"}, {"authorization": "Bearer nope"}, {"authorization": "Bearer "}],
)
def test_bad_credentials_are_401_without_echoing_the_token(headers: dict[str, str]) -> None:
    with pytest.raises(UnauthorizedError) as info:
        check_bearer(_settings(), headers)
    assert "s3cret" not in info.value.message and info.value.status == 401


def test_good_credentials_pass() -> None:
    check_bearer(_settings(), {"authorization": "Bearer s3cret"})
    check_bearer(_settings(), {"authorization": "bearer s3cret"})


@pytest.mark.parametrize("path", ["/ui/login", "/ui/logout", "/ui/static/viewer.css", "/ui/static/viewer.js"])
def test_sign_in_page_and_static_files_are_open(path: str) -> None:
    assert not needs_token(_settings(auth_all_routes=True), "GET", path)
    assert needs_token(_settings(auth_all_routes=True), "GET", "/ui/features")


def _cookie(value: str | None = None) -> dict[str, str]:
    s = _settings()
    return {"cookie": f"other=1; {SESSION_COOKIE}={value if value is not None else session_value(s)}"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "allowed"),
    [
        ("GET", "/ui/features", {}, True),
        ("HEAD", "/v1/policies", {}, True),
        ("GET", "/v1/alerts/stream", {}, True),
        ("POST", "/v1/audit", {}, False),  # a write without the viewer header (a cross-site form could send the cookie)
        ("POST", "/v1/audit", {UI_HEADER: "1"}, True),  # the viewer's own script
        ("POST", "/ui/api/activations", {UI_HEADER: "1"}, True),
        ("POST", "/v1/generate", {UI_HEADER: "1"}, False),  # mutating: bearer token only
        ("POST", "/v1/policies/reload", {UI_HEADER: "1"}, False),
    ],
)
def test_session_cookie_stands_in_for_reads_and_viewer_scripts(method: str, path: str, headers: dict[str, str], allowed: bool) -> None:
    assert session_allows(_settings(), method, path, {**_cookie(), **headers}) is allowed


@pytest.mark.parametrize("headers", [{}, {"cookie": "auditor_session="}, _cookie("0" * 64), {"cookie": "garbage;;;=\x00"}])
def test_missing_or_forged_session_is_refused(headers: dict[str, str]) -> None:
    assert not session_allows(_settings(), "GET", "/ui/features", headers)


def test_session_value_is_not_the_token_and_follows_it() -> None:
    a = session_value(_settings(), now=1000.0)
    assert a is not None and "s3cret" not in a and a.startswith(f"{1000 + SESSION_TTL_S}.")
    other = Settings.load(env={"AUDITOR_API_TOKEN": "another"})
    assert session_value(other, now=1000.0) != a
    assert session_value(Settings.load(env={})) is None
    # A session from another token does not open this server.
    assert not session_allows(_settings(), "GET", "/ui/features", {"cookie": f"{SESSION_COOKIE}={session_value(other)}"})


def test_expired_or_tampered_sessions_are_refused() -> None:
    import time

    expired = session_value(_settings(), now=time.time() - SESSION_TTL_S - 1)
    assert not session_allows(_settings(), "GET", "/ui/features", {"cookie": f"{SESSION_COOKIE}={expired}"})
    fresh = session_value(_settings())
    assert fresh is not None
    stamp, sig = fresh.split(".")
    longer = f"{int(stamp) + 10**6}.{sig}"  # a later expiry under the same signature
    assert not session_allows(_settings(), "GET", "/ui/features", {"cookie": f"{SESSION_COOKIE}={longer}"})


def test_a_session_stamp_of_non_ascii_digits_is_refused_not_an_error() -> None:
    """"²9999999999" passes str.isdigit() but int() rejects it (a 500 before)."""
    from auditor.server.auth import _session_valid

    assert not _session_valid(_settings(), "\u00b29999999999.abc")
