"""Bearer-token checks.

With ``api_token`` set, mutating routes (policy reload and validate, steering)
need ``Authorization: Bearer <token>``; with ``auth_all_routes`` every route
does except the probes. The comparison is constant-time and the token is never
echoed: errors say only that it was missing or wrong.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from auditor.server.errors import UnauthorizedError
from auditor.server.settings import Settings

__all__ = ["MUTATING_ROUTES", "OPEN_ROUTES", "check_bearer", "needs_token"]

#: (method, path) pairs that change server state or steer the model.
MUTATING_ROUTES = frozenset(
    {
        ("POST", "/v1/policies/reload"),
        ("POST", "/v1/policies/validate"),
        ("POST", "/v1/generate"),
    }
)
#: Routes that never need a token (liveness and readiness probes).
OPEN_ROUTES = frozenset({"/healthz", "/readyz"})


def needs_token(settings: Settings, method: str, path: str) -> bool:
    """Whether a request to ``method path`` must carry the bearer token."""
    if settings.api_token is None or path in OPEN_ROUTES:
        return False
    return settings.auth_all_routes or (method, path) in MUTATING_ROUTES


def check_bearer(settings: Settings, headers: Mapping[str, str]) -> None:
    """Raise :class:`UnauthorizedError` unless ``headers`` carry the configured token."""
    if settings.api_token is None:
        return
    value = headers.get("authorization", "")
    scheme, _, given = value.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise UnauthorizedError("this route needs 'Authorization: Bearer <token>' (the server's AUDITOR_API_TOKEN)")
    expected = settings.api_token.get_secret_value()
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise UnauthorizedError("the bearer token is not valid for this server")
