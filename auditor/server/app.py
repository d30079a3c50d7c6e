"""The FastAPI application: ``create_app(settings)``.

Nothing is loaded at import or in ``create_app``: the lifespan starts loading
the model, SAE, library and policies in a background thread, so ``/healthz``
answers at once and ``/readyz`` turns 200 when everything is in place. Routes
that need the model answer 503 ``not_ready`` until then.

Cross-cutting concerns are pure ASGI middleware (so streaming responses pass
through untouched): request size limit (413), bearer auth (401), and request
metrics by route template and outcome.

Example::

    app = create_app(Settings.load(env=os.environ))
    uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auditor.errors import AuditorError
from auditor.metrics import AuditorMetrics
from auditor.server.auth import LOGIN_PATH, check_bearer, needs_token, session_allows
from auditor.server.errors import NotReadyError, ServerError, TooLargeError
from auditor.workers import ModelWorkers
from auditor.server.runtime import Runtime, load_runtime
from auditor.server.settings import Settings

__all__ = ["create_app", "get_runtime", "error_body", "outcome_for", "begin_shutdown"]

_log = logging.getLogger("auditor.server")

NESTED_TOO_DEEPLY = "the body is JSON nested too deeply to parse; send a request object of ordinary depth"


def error_body(message: str, type_: str, code: str, **extra: Any) -> dict[str, Any]:
    """The OpenAI-style error object every error response uses."""
    return {"error": {"message": message, "type": type_, "code": code, "param": None, **extra}}


class _State:
    """Mutable app state: the runtime once loaded, or the load error."""

    def __init__(self, settings: Settings, metrics: AuditorMetrics, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.load_task: asyncio.Task[None] | None = None


def get_runtime(request: Request) -> Runtime:
    """The loaded runtime, or 503 ``not_ready`` while loading."""
    state: _State = request.app.state.auditor
    if state.runtime is None:
        if state.load_error is not None:
            raise NotReadyError(f"the auditor failed to load: {state.load_error}")
        raise NotReadyError("the model and policies are still loading; retry shortly")
    return state.runtime


def begin_shutdown(app: Any) -> None:
    """The server stopped accepting connections and is about to wait for the open ones: end the
    responses that never end by themselves (alert event streams), so it can shut down. Call it
    on the app's event loop (:class:`~auditor.server.background.AuditorServer` does)."""
    state = getattr(getattr(app, "state", None), "auditor", None)
    if isinstance(state, _State) and state.runtime is not None:
        state.runtime.alerts.close()


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    env: Mapping[str, str] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
    on_ready: Callable[[Runtime], None] | None = None,
) -> FastAPI:
    """Build the sidecar app; the lifespan loads everything (see the module docstring).

    ``registry``: where metrics are registered (a fresh one by default).
    ``env``: environment for default paths (data dir). ``on_load_error``: called
    when loading fails (the CLI uses it to stop the server with an error). ``on_ready``:
    called with the :class:`Runtime` once everything is loaded, before ``/readyz`` turns 200
    (the CLI freezes the process's heap there, :attr:`Settings.gc_freeze`).
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = AuditorMetrics(registry)
    state = _State(settings, metrics, registry)

    async def load() -> None:
        loop = asyncio.get_running_loop()
        workers = ModelWorkers()
        try:
            runtime = await loop.run_in_executor(workers.executor(0), load_runtime, settings, metrics, env, workers)
            await runtime.batcher.start()
            if settings.upstream is not None:
                import httpx

                runtime.http = httpx.AsyncClient(
                    base_url=settings.upstream,
                    timeout=httpx.Timeout(settings.upstream_timeout_s, connect=10.0),
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                )
        except Exception as exc:
            workers.shutdown(wait=False)
            state.load_error = exc.message if isinstance(exc, AuditorError) else f"{type(exc).__name__}: {exc}"
            _log.error("loading failed: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(exc)
            return
        state.runtime = runtime
        if on_ready is not None:
            on_ready(runtime)
        metrics.ready.set(1)
        policies = runtime.store.names if runtime.store is not None else []
        _log.info(
            "ready: model %s, SAE %s, policies %s, upstream %s",
            runtime.auditor.model.name,
            runtime.sae_name,
            ", ".join(policies) or "none",
            settings.upstream or "none (serve mode)",
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.load_task = asyncio.create_task(load(), name="auditor-load")
        try:
            yield
        finally:
            if not state.load_task.done():
                state.load_task.cancel()
            if state.runtime is not None:
                await state.runtime.close()
            metrics.ready.set(0)

    app = FastAPI(
        title="sae-auditor",
        description="Safety-auditing sidecar: SAE features, policies, proxy and alerts.",
        lifespan=lifespan,
    )
    app.state.auditor = state

    from auditor.server import proxy, routes
    from auditor.viewer.web import mount_viewer

    app.include_router(routes.router)
    app.include_router(proxy.router)
    viewer = mount_viewer(app, index_path=settings.viewer_index)  # /ui/: feature browser, playground, live alerts
    # Route templates by path, to label requests the guard answers before routing (401, 413).
    templates = [(r.path_regex, r.path) for rr in (routes.router, proxy.router, viewer) for r in rr.routes if hasattr(r, "path_regex")]

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        _set_outcome(request, outcome_for(exc))
        return JSONResponse(
            error_body(exc.message, exc.type, exc.code), status_code=exc.status, headers=exc.headers or None
        )

    @app.exception_handler(AuditorError)
    async def _auditor_error(request: Request, exc: AuditorError) -> JSONResponse:
        _set_outcome(request, "client_error")
        return JSONResponse(error_body(exc.message, "invalid_request_error", "invalid_request"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own answers (an unknown path, a wrong method, a body its parser gave up on)
        # in the error object every other error uses, not {"detail": ...}.
        if isinstance(exc.__cause__, RecursionError):  # as the routes that parse their own body answer
            _set_outcome(request, "client_error")
            return JSONResponse(error_body(NESTED_TOO_DEEPLY, "invalid_request_error", "invalid_request"), status_code=422)
        code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind, code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        _set_outcome(request, "client_error")
        message = invalid_request(exc.errors())
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request"), status_code=422)

    # Added last = outermost: metrics see every response, the guard runs before routing.
    app.add_middleware(_Guard, state=state)
    app.add_middleware(_Metrics, metrics=metrics, templates=templates)
    return app


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}

_NOT_AN_OBJECT = frozenset({"model_attributes_type", "dict_type", "model_type", "missing"})


def invalid_request(errors: Iterable[Mapping[str, Any]]) -> str:
    """The message of a request that failed validation: ``invalid request: where: what; ...``."""
    return "invalid request: " + "; ".join(_problem(err) for err in errors)


def _problem(err: Mapping[str, Any]) -> str:
    """One request validation problem as ``where: what``, with how to mend a body that is not
    a JSON object at all."""
    loc = tuple(err.get("loc", ()))
    kind = err.get("type")
    if kind == "json_invalid":
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        reason = (err.get("ctx") or {}).get("error") or err.get("msg", "invalid")
        return f"body: not valid JSON{at} ({reason})"
    where = ".".join(str(p) for p in loc if p != "body") or "body"
    message = f"{where}: {err.get('msg', 'invalid')}"
    if loc == ("body",) and kind in _NOT_AN_OBJECT:
        message += "; send a JSON object with Content-Type: application/json"
    return message


def _set_outcome(request: Request, outcome: str) -> None:
    request.state.outcome = outcome


_OUTCOME_BY_STATUS = {401: "unauthorized", 413: "too_large", 502: "upstream_error", 504: "timeout"}


def outcome_for(exc: ServerError) -> str:
    """The ``outcome`` label of a request that ended in ``exc``."""
    if exc.status in _OUTCOME_BY_STATUS:
        return _OUTCOME_BY_STATUS[exc.status]
    if exc.code in ("overloaded", "not_ready"):
        return exc.code
    return "auditor_error" if exc.status >= 500 else "client_error"


class _Guard:
    """Auth and the body size limit, before any route runs."""

    def __init__(self, app: ASGIApp, state: _State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.state.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        if needs_token(settings, method, path) and not session_allows(settings, method, path, headers):
            try:
                check_bearer(settings, headers)
            except ServerError as exc:
                scope.setdefault("state", {})["outcome"] = "unauthorized"
                if method in ("GET", "HEAD") and path.startswith("/ui") and "authorization" not in headers:
                    await _redirect_to_login(send, path, scope.get("query_string", b""))
                else:
                    await _send_error(send, exc)
                return
        limit = settings.max_body_bytes
        declared = headers.get("content-length")
        too_large = TooLargeError(f"the request body is over the limit of {limit} bytes (max_body_bytes)")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            scope.setdefault("state", {})["outcome"] = "too_large"
            await _send_error(send, too_large)
            return
        seen = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not started:
                    # Answer 413 now and tell the app the client went away, so no
                    # body parser turns the cut-off body into some other error.
                    rejected = True
                    scope.setdefault("state", {})["outcome"] = "too_large"
                    await _send_error(send, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not rejected:
                raise


async def _redirect_to_login(send: Send, path: str, query: bytes) -> None:
    """A viewer page without a session: send the browser to the sign-in page, then back."""
    from urllib.parse import quote

    target = path + ("?" + query.decode("latin-1") if query else "")
    location = f"{LOGIN_PATH}?next={quote(target, safe='')}"
    await send({"type": "http.response.start", "status": 303, "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _send_error(send: Send, exc: ServerError) -> None:
    body = json.dumps(error_body(exc.message, exc.type, exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Metrics:
    """``auditor_requests_total`` and ``auditor_request_duration_seconds`` by route template."""

    def __init__(self, app: ASGIApp, metrics: AuditorMetrics, templates: list[tuple[Any, str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = self._template(scope)
            outcome = scope.get("state", {}).get("outcome") or _status_outcome(status)
            self.metrics.requests.labels(route=template, outcome=outcome).inc()
            self.metrics.request_duration.labels(route=template).observe(time.perf_counter() - t0)

    def _template(self, scope: Scope) -> str:
        """The route template that served the request or, for one the guard answered before
        routing, that would have; ``unmatched`` for paths no route serves."""
        route = scope.get("route")
        if route is not None:
            return getattr(route, "path", None) or "unmatched"
        path = scope.get("path", "")
        return next((template for regex, template in self.templates if regex.match(path)), "unmatched")


def _status_outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 401:
        return "unauthorized"
    if status == 413:
        return "too_large"
    if status < 500:
        return "client_error"
    return "server_error"
