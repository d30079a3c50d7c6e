"""Audit, guardrail, policy, alert, feature, health and metrics routes."""

from __future__ import annotations

import asyncio
import inspect
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from auditor.errors import AuditorError
from auditor.metrics import CONTENT_TYPE_LATEST, render
from auditor.server.app import get_runtime, invalid_request
from auditor.server.errors import BadRequestError, NotFoundError
from auditor.server.proxy import blocked_reason, guarded_audit
from auditor.server.sse import SSE_HEADERS
from auditor.text import AuditInput, parse_input

__all__ = ["router", "result_json"]

router = APIRouter()


# ---------------------------------------------------------------- health and metrics


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Liveness: the process answers (503 only when loading failed for good)."""
    state = request.app.state.auditor
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 once the model and policies are loaded."""
    state = request.app.state.auditor
    if state.runtime is None:
        status = "failed" if state.load_error is not None else "loading"
        body: dict[str, Any] = {"status": status}
        if state.load_error is not None:
            body["error"] = state.load_error
        request.state.outcome = "not_ready"  # an answer, not a failure of the server
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    rt = state.runtime
    return JSONResponse(
        {
            "status": "ready",
            "model": rt.auditor.model.name,
            "policies": rt.store.names if rt.store is not None else [],
            "upstream": rt.settings.upstream,
        }
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    state = request.app.state.auditor
    if state.runtime is not None:
        state.metrics.queue_depth.set(state.runtime.batcher.depth)
    return Response(render(state.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------- audit


class AuditRequest(BaseModel):
    """``POST /v1/audit``: one of ``text``, ``messages`` or ``prompt`` (+ ``completion``)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    """Plain text (seen by prompt- and completion-scoped rules)."""
    messages: list[dict[str, Any]] | None = None
    """A chat: ``[{"role", "content"}, ...]``."""
    prompt: str | None = None
    """A prompt, optionally with its ``completion``."""
    completion: str | None = None
    """Model output audited as completion (with ``prompt`` or ``messages``)."""
    id: str | None = None
    """Caller's request id (kept on alerts)."""
    policy: str | None = None
    """Policy name (default: the server's default policy)."""
    explain: bool = False
    """Also return each token's strongest features."""


def result_json(rt: Any, result: Any, engine: Any, *, top_k: int) -> dict[str, Any]:
    """The audit response body (the CLI's ``--json`` shape plus policy fields)."""
    from auditor._cli_audit import result_to_json

    out = result_to_json(result, model=rt.auditor.model.name, sae=rt.sae_name, top_k=top_k)
    out["policy"] = engine.name if engine is not None else None
    out["policy_hash"] = engine.hash if engine is not None else None
    if result.verdict is None:
        out.update({"verdict": "allow", "matches": [], "scores": {}, "category_scores": {}, "note": rt.policy_note})
    return out


@router.post("/v1/audit")
async def audit(body: AuditRequest, request: Request) -> JSONResponse:
    """Audit one input: verdict, matched rules with explanations, category scores, optional token features."""
    rt = get_runtime(request)
    raw = body.model_dump(exclude={"policy", "explain"}, exclude_none=True)
    try:
        item = parse_input(raw, where="body")
    except AuditorError as exc:
        raise BadRequestError(exc.message) from None
    top_k = rt.settings.explain_top_k if body.explain else 0
    source = "completion" if item.completion else ("prompt" if item.prompt is not None or item.messages else "any")
    [result], engine = await rt.audit([item], policy=body.policy, top_k=top_k, source=source, request_id=body.id)
    out = result_json(rt, result, engine, top_k=top_k)
    if out["verdict"] == "block":
        request.state.outcome = "blocked"
    return JSONResponse(out, headers={"X-Auditor-Verdict": out["verdict"]})


# ---------------------------------------------------------------- LiteLLM guardrail


class GuardrailRequest(BaseModel):
    """LiteLLM generic guardrail request (``POST /beta/litellm_basic_guardrail_api``).

    LiteLLM's contract (docs "Generic Guardrail API", and its request type
    ``GenericGuardrailAPIRequest``) sends ``texts`` (extracted strings),
    ``images``, ``tools``, ``structured_messages``, ``request_data`` (the
    virtual key's ``user_api_key_hash``, ``..._alias``, ``..._user_id``,
    ``..._team_id``, ``..._end_user_id``, ``..._org_id``), ``input_type``
    (``"request"`` before the call, ``"response"`` after), ``litellm_call_id``,
    ``litellm_trace_id`` and ``additional_provider_specific_params`` (from the
    guardrail's config; here ``policy`` picks the policy). It expects
    ``{"action": "BLOCKED" | "NONE" | "GUARDRAIL_INTERVENED", "blocked_reason",
    "texts"}``: ``BLOCKED`` makes LiteLLM raise, ``NONE`` lets the call proceed,
    ``GUARDRAIL_INTERVENED`` proceeds with the returned (modified) ``texts``.
    The auditor never rewrites text, so it answers ``BLOCKED`` or ``NONE``.
    """

    model_config = ConfigDict(extra="allow")

    texts: list[str] | None = None
    images: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    structured_messages: list[dict[str, Any]] | None = None
    request_data: dict[str, Any] = Field(default_factory=dict)
    input_type: Literal["request", "response"] = "request"
    litellm_call_id: str | None = None
    litellm_trace_id: str | None = None
    additional_provider_specific_params: dict[str, Any] | None = None


@router.post("/beta/litellm_basic_guardrail_api")
async def litellm_guardrail(body: GuardrailRequest, request: Request) -> JSONResponse:
    """Audit LiteLLM's extracted texts: any blocking verdict blocks the call."""
    rt = get_runtime(request)
    texts = body.texts or []
    chat = body.structured_messages if body.input_type == "request" else None
    if not texts and not chat:
        return JSONResponse({"action": "NONE", "blocked_reason": None, "texts": None})
    params = body.additional_provider_specific_params or {}
    policy = params.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise BadRequestError("additional_provider_specific_params.policy must be a policy name (string)")
    if chat:
        # The request's chat itself, roles, content parts and tool calls included, is audited
        # as one conversation (texts holds the same strings, extracted).
        try:
            items = [parse_input({"messages": chat}, where="structured_messages")]
        except AuditorError as exc:
            raise BadRequestError(exc.message) from None
        source = "prompt"
    elif body.input_type == "request":
        items = [AuditInput(prompt=t) for t in texts]
        source = "prompt"
    else:
        items = [AuditInput(prompt="", completion=t) for t in texts]
        source = "completion"
    outcome = await guarded_audit(rt, request, items, policy=policy, source=source, request_id=body.litellm_call_id)
    if outcome.error is not None:  # fail-open: let LiteLLM proceed, say why in the headers only
        return JSONResponse({"action": "NONE", "blocked_reason": None, "texts": None}, headers=outcome.headers())
    for result in outcome.results:
        if result.verdict is not None and result.verdict.action == "block":
            request.state.outcome = "blocked"
            return JSONResponse(
                {"action": "BLOCKED", "blocked_reason": blocked_reason(outcome.engine, result.verdict), "texts": None},
                headers=outcome.headers(),
            )
    return JSONResponse({"action": "NONE", "blocked_reason": None, "texts": None}, headers=outcome.headers())


# ---------------------------------------------------------------- policies


def _policy_json(engine: Any, default: bool) -> dict[str, Any]:
    return {
        "name": engine.name,
        "description": getattr(engine.policy.metadata, "description", None) or "",
        "hash": engine.hash,
        "path": engine.path,
        "library": engine.library.id,
        "default": default,
        "rules": [
            {
                "id": r.id,
                "description": r.description,
                "severity": r.severity,
                "category": r.category,
                "scope": r.scope,
                "enabled": r.enabled,
                "actions": list(r.actions),
            }
            for r in engine.rules
        ],
    }


@router.get("/v1/policies")
async def list_policies(request: Request) -> JSONResponse:
    """The policy set in service, its hash and the last reload's problems."""
    rt = get_runtime(request)
    if rt.store is None:
        return JSONResponse({"policies": [], "hash": None, "default": None, "note": rt.policy_note})
    status = rt.store.status()  # one reload's view: a reload meanwhile does not mix two sets
    last = status.last_error
    return JSONResponse(
        {
            "policies": [_policy_json(e, e.name == status.default) for e in status.engines.values()],
            "hash": status.hash,
            "default": status.default,
            "reloads": dict(status.reloads),
            "last_reload_ok": status.last_reload_ok,
            "last_reload_errors": [_error_json(e) for e in last.errors] if last is not None else [],
            "note": None,
        }
    )


def _error_json(err: Any) -> dict[str, Any]:
    return {"path": err.path, "line": err.line, "column": err.column, "rule": err.rule, "message": err.reason}


class ValidateRequest(BaseModel):
    """``POST /v1/policies/validate``: a policy as YAML text, or a path on the server."""

    model_config = ConfigDict(extra="forbid")

    content: str | None = None
    """Policy YAML."""
    path: str | None = None
    """A policy file or folder readable by the server."""
    base_dir: str | None = None
    """With ``content``: the folder its relative paths (``library``, probe files) resolve
    against, as if the policy were saved there; by default the server's policy folder."""


_YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
_VALIDATE_HOW = (
    'send {"content": "<policy YAML>"} or {"path": "<policy file on the server>"} as JSON, '
    "or the policy YAML itself with Content-Type: application/yaml"
)


async def _validate_request(request: Request) -> ValidateRequest:
    """The body of ``POST /v1/policies/validate``: JSON (:class:`ValidateRequest`), or the policy
    YAML itself when the content type says YAML."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if ctype in _YAML_TYPES:
        try:
            return ValidateRequest(content=raw.decode("utf-8"), base_dir=request.query_params.get("base_dir"))
        except UnicodeDecodeError as exc:
            raise BadRequestError(f"the policy YAML is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return ValidateRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise BadRequestError(f"{invalid_request(exc.errors())}; {_VALIDATE_HOW}") from None


@router.post(
    "/v1/policies/validate",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ValidateRequest.model_json_schema()},
                "application/yaml": {"schema": {"type": "string", "description": "the policy YAML"}},
            },
        }
    },
)
async def validate_policy(request: Request) -> JSONResponse:
    """Validate without loading: every problem with file, line and column."""
    rt = get_runtime(request)
    body = await _validate_request(request)
    if (body.content is None) == (body.path is None):
        raise BadRequestError(
            "give exactly one of 'content' (policy YAML text) or 'path' (a policy file on the server), "
            "or send the policy YAML itself with Content-Type: application/yaml"
        )
    if body.base_dir is not None and body.content is None:
        raise BadRequestError("base_dir goes with 'content' (a file sent by 'path' resolves against its own folder)")
    from auditor.errors import PolicyErrors
    from auditor.policy import load_policy, validate_files
    from auditor.policy.store import policy_files

    base = _content_base(rt.settings, body.base_dir) if body.content is not None else None
    if base is not None and not base.is_dir():
        raise NotFoundError(f"base_dir {base}: no such folder on the server")

    def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="auditor-validate-") as tmp:
            if body.content is not None:
                target = Path(tmp) / "policy.yaml"
                target.write_text(body.content, encoding="utf-8")
                files = [target]
            else:
                try:
                    files = policy_files([body.path or ""])
                except PolicyErrors as exc:  # a folder the server cannot list
                    return {"valid": False, "errors": [_error_json(e) for e in exc.errors], "policies": []}
                if not files or not all(f.is_file() for f in files):
                    raise NotFoundError(f"{body.path}: no policy file or folder of *.yaml there")
            errors = validate_files(files, base_dir=base)
            policies = []
            if not errors:
                for f in files:
                    engine = load_policy(f, base_dir=base)
                    policies.append({"name": engine.name, "hash": engine.hash, "rules": [r.id for r in engine.rules]})
            found = [_error_json(e) for e in errors]
            if body.content is not None:  # the temporary file is the request's content to the caller
                for e in found:
                    if e["path"] == str(target):
                        e["path"] = "<content>"
                    e["message"] = str(e["message"]).replace(str(target), "<content>")
            out = {"valid": not errors, "errors": found, "policies": policies}
            if base is not None:
                out["base_dir"] = str(base)
                if errors:
                    out["note"] = (
                        f"relative paths in the content resolve against {base}; send base_dir (a JSON field, "
                        "or ?base_dir= with a YAML body) to resolve them in the folder the policy will live in"
                    )
            return out

    return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, run))


def _content_base(settings: Any, base_dir: str | None) -> Path:
    """Where relative paths in sent policy content resolve: ``base_dir`` (relative to the server's
    working folder), else the folder the server loads policies from (where the policy would go)."""
    if base_dir is not None:
        return Path(base_dir).resolve()
    from auditor.pipeline import default_policy_path

    first = Path(settings.policies[0]) if settings.policies else default_policy_path()
    return (first if first.is_dir() else first.parent).resolve()


@router.post("/v1/policies/reload")
async def reload_policies(request: Request) -> JSONResponse:
    """Reload every policy file; on any problem the previous set stays in service (422)."""
    rt = get_runtime(request)
    if rt.store is None:
        raise NotFoundError(f"nothing to reload: {rt.policy_note}")
    result = await asyncio.get_running_loop().run_in_executor(None, rt.store.reload)
    body = {
        "ok": result.ok,
        "hash": result.hash,
        "changed": result.changed,
        "policies": list(result.names),  # the set whose hash this is, even if another reload followed
        "errors": [_error_json(e) for e in result.errors],
    }
    return JSONResponse(body, status_code=200 if result.ok else 422)


# ---------------------------------------------------------------- alerts


Severity = Literal["info", "low", "medium", "high", "critical"]


_TIME_HELP = "an ISO time (2026-11-26T04:00:00Z; without a zone, UTC), Unix seconds, or a duration back from now: 15m, 2h, 7d"


@router.get("/v1/alerts")
async def list_alerts(
    request: Request,
    since: str | None = Query(default=None, description=_TIME_HELP),
    until: str | None = Query(default=None, description=_TIME_HELP),
    rule_id: list[str] | None = Query(default=None),
    severity: list[Severity] | None = Query(default=None),
    min_severity: Severity | None = None,
    category: list[str] | None = Query(default=None),
    request_id: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    after: str | None = Query(default=None, description="cursor: the 'next' of the previous page"),
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    """Alerts from the durable audit log, newest first by default; page with ``after=<next>``."""
    unknown = sorted(set(request.query_params) - _ALERT_PARAMS)
    if unknown:  # a misspelt filter would otherwise answer every alert, as if it had matched
        raise BadRequestError(
            f"unknown query parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_ALERT_PARAMS))} "
            "(page with after=<the previous page's next>)"
        )
    rt = get_runtime(request)
    now = datetime.now(timezone.utc)  # one "now" for both bounds
    filters: dict[str, Any] = {
        "since": _time_filter("since", since, now),
        "until": _time_filter("until", until, now),
        "rule_id": rule_id,
        "severity": severity,
        "min_severity": min_severity,
        "category": category,
        "request_id": request_id,
    }
    log = rt.dispatcher.log

    def run() -> dict[str, Any]:
        page = log.query(**filters, limit=limit + 1, after=after, descending=order == "desc")
        more = len(page) > limit
        page = page[:limit]
        return {
            "alerts": [json.loads(a.model_dump_json()) for a in page],
            "next": page[-1].id if more and page else None,
            "total": log.count(**filters),
        }

    try:
        body = await asyncio.get_running_loop().run_in_executor(None, run)
    except AuditorError as exc:  # the log's own checks, a reversed since/until among them
        raise BadRequestError(exc.message) from None
    return JSONResponse(body)


# The query parameters the route takes, from its signature (a misspelt one is refused).
_ALERT_PARAMS = frozenset(inspect.signature(list_alerts).parameters) - {"request"}


def _time_filter(name: str, value: str | None, now: datetime) -> datetime | None:
    """A ``since`` / ``until`` query value as an aware time (see :func:`auditor.alerts.log.parse_time`)."""
    if value is None:
        return None
    from auditor.alerts.log import parse_time

    try:
        return parse_time(value, now=now)
    except ValueError as exc:
        raise BadRequestError(invalid_request([{"loc": ("query", name), "msg": str(exc)}])) from None


@router.get("/v1/alerts/stream")
async def stream_alerts(
    request: Request,
    min_severity: Severity | None = None,
    rule_id: list[str] | None = Query(default=None),
    category: list[str] | None = Query(default=None),
) -> StreamingResponse:
    """New alerts as server-sent events (``event: alert``, one JSON alert per event)."""
    rt = get_runtime(request)
    from auditor.alerts import severity_rank

    floor = severity_rank(min_severity) if min_severity is not None else -1
    rules = set(rule_id or ())
    cats = set(category or ())

    def accept(alert: dict[str, Any]) -> bool:
        return (
            severity_rank(alert["severity"]) >= floor
            and (not rules or alert["rule_id"] in rules)
            and (not cats or alert["category"] in cats)
        )

    return StreamingResponse(rt.alerts.subscribe(accept), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/v1/alerts/{alert_id}")
async def get_alert(alert_id: str, request: Request) -> JSONResponse:
    """One alert of the audit log by id (Alertmanager's ``generatorURL`` links here), with its
    delivery state per sink."""
    rt = get_runtime(request)
    log = rt.dispatcher.log

    def run() -> dict[str, Any] | None:
        alert = log.get(alert_id)
        if alert is None:
            return None
        out: dict[str, Any] = json.loads(alert.model_dump_json())
        states = {sink: log.delivery_state(alert_id, sink) for sink in rt.dispatcher.sink_names}
        out["deliveries"] = {sink: state for sink, state in states.items() if state is not None}
        return out

    body = await asyncio.get_running_loop().run_in_executor(None, run)
    if body is None:
        raise NotFoundError(f"no alert {alert_id!r} in the audit log (it may have been pruned); list them with GET /v1/alerts")
    return JSONResponse(body)


# ---------------------------------------------------------------- features


@router.get("/v1/features")
async def features(
    request: Request,
    q: str | None = Query(default=None, description="substring of name or description"),
    category: str | None = None,
    name: str | None = None,
) -> JSONResponse:
    """The feature library: search by text and category, or one feature by exact name."""
    rt = get_runtime(request)
    lib = rt.auditor.library
    if lib is None:
        raise NotFoundError("no feature library is loaded (start with --library or a policy)")
    if name is not None:
        if not lib.has(name):
            raise NotFoundError(lib.unknown_feature_message(name))
        found = [lib.feature(name)]
    else:
        found = lib.search(q, category)
    return JSONResponse(
        {
            "library": lib.id,
            "sae": json.loads(lib.sae.model_dump_json()),
            "categories": lib.categories,
            "count": len(found),
            "features": [json.loads(f.model_dump_json()) for f in found],
        }
    )

