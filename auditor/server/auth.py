"""Bearer-token checks, and the viewer's sign-in session.

With ``api_token`` set, mutating routes (policy reload and validate, steering)
need ``Authorization: Bearer <token>``; with ``auth_all_routes`` every route
does except the probes, the viewer's sign-in page and its static files. The
comparison is constant-time and the token is never echoed: errors say only
that it was missing or wrong.

A browser cannot add a header to a page load, so the viewer signs in once at
``/ui/login``: the token is checked and the answer sets an ``HttpOnly``,
``SameSite=Strict`` cookie holding an expiry time (12 hours on) and its HMAC
under the token (not the token). That
cookie stands in for the bearer token on reads (GET, HEAD) and on the viewer's
own script requests (``X-Auditor-UI: 1``, a header no other site can send
without a CORS preflight this server never grants); mutating routes always
need the bearer token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie

from auditor.server.errors import UnauthorizedError
from auditor.server.settings import Settings

__all__ = [
    "LOGIN_PATH",
    "MUTATING_ROUTES",
    "OPEN_ROUTES",
    "SESSION_COOKIE",
    "SESSION_TTL_S",
    "UI_HEADER",
    "check_bearer",
    "needs_token",
    "session_allows",
    "session_value",
    "token_matches",
]

LOGIN_PATH = "/ui/login"
SESSION_COOKIE = "auditor_session"
UI_HEADER = "x-auditor-ui"


#: (method, path) pairs that change server state or steer the model.
MUTATING_ROUTES = frozenset(
    {
        ("POST", "/v1/policies/reload"),
        ("POST", "/v1/policies/validate"),
        ("POST", "/v1/generate"),
    }
)
#: Routes that never need a token: liveness and readiness probes, the viewer's sign-in and
#: sign-out (signing out only clears the session cookie).
OPEN_ROUTES = frozenset({"/healthz", "/readyz", LOGIN_PATH, "/ui/logout"})
_OPEN_PREFIXES = ("/ui/static/",)  # the viewer's CSS and scripts (public files)


def needs_token(settings: Settings, method: str, path: str) -> bool:
    """Whether a request to ``method path`` must carry the bearer token (or the viewer session)."""
    if settings.api_token is None or path in OPEN_ROUTES or path.startswith(_OPEN_PREFIXES):
        return False
    return settings.auth_all_routes or (method, path) in MUTATING_ROUTES


SESSION_TTL_S = 12 * 3600
"""How long a viewer sign-in lasts."""


def _session_sig(token: str, expires: int) -> str:
    return hmac.new(token.encode(), f"sae-auditor viewer session v1 {expires}".encode(), hashlib.sha256).hexdigest()


def session_value(settings: Settings, *, now: float | None = None) -> str | None:
    """A new viewer session cookie value, ``<expiry>.<HMAC of it under the token>`` (None without a token)."""
    if settings.api_token is None:
        return None
    expires = int((time.time() if now is None else now) + SESSION_TTL_S)
    return f"{expires}.{_session_sig(settings.api_token.get_secret_value(), expires)}"


def _session_valid(settings: Settings, value: str, now: float | None = None) -> bool:
    if settings.api_token is None:
        return False
    stamp, _, sig = value.partition(".")
    if not (stamp.isascii() and stamp.isdigit()) or int(stamp) < (time.time() if now is None else now):
        return False
    expected = _session_sig(settings.api_token.get_secret_value(), int(stamp))
    return hmac.compare_digest(sig.encode(), expected.encode())


def session_allows(settings: Settings, method: str, path: str, headers: Mapping[str, str]) -> bool:
    """Whether the viewer session cookie in ``headers`` may stand in for the bearer token here."""
    if settings.api_token is None or (method, path) in MUTATING_ROUTES:
        return False
    try:
        jar = SimpleCookie(headers.get("cookie", ""))
    except CookieError:
        return False
    morsel = jar.get(SESSION_COOKIE)
    if morsel is None or not _session_valid(settings, morsel.value):
        return False
    return method in ("GET", "HEAD") or headers.get(UI_HEADER) == "1"


def check_bearer(settings: Settings, headers: Mapping[str, str]) -> None:
    """Raise :class:`UnauthorizedError` unless ``headers`` carry the configured token."""
    if settings.api_token is None:
        return
    value = headers.get("authorization", "")
    scheme, _, given = value.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise UnauthorizedError("this route needs 'Authorization: Bearer <token>' (the server's AUDITOR_API_TOKEN)")
    if not token_matches(settings, given):
        raise UnauthorizedError("the bearer token is not valid for this server")


def token_matches(settings: Settings, given: str) -> bool:
    """Whether ``given`` (surrounding blanks ignored) is the server's API token, compared in constant time."""
    if settings.api_token is None:
        return False
    return hmac.compare_digest(given.strip().encode(), settings.api_token.get_secret_value().encode())
