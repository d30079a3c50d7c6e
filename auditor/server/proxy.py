"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``, and ``/v1/generate``.

With ``upstream`` set the routes proxy: the prompt is audited before the call
(a blocking rule answers 400 ``policy_violation`` and nothing is forwarded), the
completion after. Streaming responses are held back and audited before any
byte is released (``stream_mode: hold``) or audited and released every
``stream_chunk_chars`` characters (``chunked``). A blocked completion ends with
``finish_reason: "content_filter"``. Without an upstream the sidecar's own
model generates (with optional ``steering``), and the same audit applies.

Every answer carries the verdict twice: the ``X-Auditor-Verdict`` header
(``allow`` / ``alert`` / ``block``, or ``error`` when the auditor failed and
``fail_mode`` is open) and an ``auditor`` object in the body (for streams, a
final chunk with ``choices: []`` and the ``auditor`` object, like OpenAI's
usage chunk). When the auditor itself fails, ``fail_mode: closed`` answers 503
with ``type: auditor_error`` (a blocked request is ``type: policy_violation``),
so the two are never confused.

Extension fields, removed before forwarding: ``auditor_policy`` (or the
``X-Auditor-Policy`` header) picks the policy; ``steering`` (serve mode only,
needs the API token when one is set) is a list of ``{feature, mode, value}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from auditor.errors import AuditorError
from auditor.server.app import NESTED_TOO_DEEPLY, error_body, get_runtime, outcome_for
from auditor.server.auth import check_bearer
from auditor.server.errors import (
    AuditFailedError,
    BadRequestError,
    CompletionTooLongError,
    ServerError,
    TooLargeError,
    UpstreamError,
)
from auditor.server.runtime import Runtime
from auditor.server.sse import SSE_HEADERS, sse_event
from auditor.text import AuditInput, message_text, with_tool_calls

if TYPE_CHECKING:
    from auditor.pipeline import AuditStream
    from auditor.policy import PolicyEngine

__all__ = ["router", "guarded_audit", "blocked_reason", "AuditOutcome"]

_log = logging.getLogger("auditor.server")
router = APIRouter()

T = TypeVar("T")
_RANK = {"allow": 0, "alert": 1, "block": 2}
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding", "x-auditor-policy"}


# ---------------------------------------------------------------- the guarded audit


@dataclass
class AuditOutcome:
    """Verdicts of one audit step, or the auditor failure that fail-open let through."""

    results: list[Any] = field(default_factory=list)
    engine: Any = None
    error: str | None = None

    @property
    def action(self) -> str:
        """Worst action of the results; ``error`` when the audit failed open."""
        if self.error is not None:
            return "error"
        actions = [r.verdict.action for r in self.results if r.verdict is not None]
        return max(actions, key=_RANK.__getitem__, default="allow")

    def blocked(self, i: int = 0) -> bool:
        v = self.results[i].verdict if self.error is None and i < len(self.results) else None
        return v is not None and v.action == "block"

    def summary(self, i: int | None = None) -> dict[str, Any]:
        """The ``auditor`` annotation of one result (or the worst of all)."""
        if self.error is not None:
            return {"verdict": "error", "error": self.error, "fail_open": True}
        results = self.results if i is None else self.results[i : i + 1]
        matches = []
        categories: dict[str, float] = {}
        for r in results:
            if r.verdict is None:
                continue
            matches.extend(
                {"rule_id": m.rule_id, "severity": m.severity, "category": m.category, "actions": m.actions, "score": m.score}
                for m in r.verdict.matches
            )
            for k, v in r.verdict.category_scores.items():
                categories[k] = max(categories.get(k, 0.0), v)
        action = AuditOutcome(results, self.engine).action
        return {
            "verdict": action,
            "policy": self.engine.name if self.engine is not None else None,
            "matches": matches,
            "category_scores": categories,
        }

    def headers(self) -> dict[str, str]:
        out = {"X-Auditor-Verdict": self.action}
        if self.engine is not None:
            out["X-Auditor-Policy"] = self.engine.name
        return out


def blocked_reason(engine: Any, verdict: Any) -> str:
    """A one-line reason naming the policy and the blocking rules."""
    rules = [f"{m.rule_id} ({m.severity})" for m in verdict.matches if "block" in m.actions]
    return f"blocked by policy {engine.name!r}: " + ", ".join(rules or [m.rule_id for m in verdict.matches])


def _auditor_failure(exc: BaseException) -> str | None:
    """A description when ``exc`` is the auditor failing (not a client error), else None."""
    if isinstance(exc, ServerError):
        return f"{exc.code}: {exc.message}" if exc.type == "auditor_error" or exc.status >= 500 else None
    if isinstance(exc, AuditorError):
        return None
    return f"internal: {type(exc).__name__}"


async def guarded_audit(
    rt: Runtime,
    request: Request,
    items: Sequence[AuditInput],
    *,
    policy: str | PolicyEngine | None,
    source: str,
    request_id: str | None = None,
) -> AuditOutcome:
    """Audit with the configured fail mode: client errors raise; auditor failures raise
    :class:`AuditFailedError` (closed) or come back as ``AuditOutcome(error=...)`` (open). A
    completion over the auditor's token limit is the auditor's failure, not the client's."""
    try:
        results, engine = await rt.audit(items, policy=policy, source=source, request_id=request_id)
    except TooLargeError as exc:
        if source != "completion":
            raise
        return _failed(rt, request, _too_long(rt, exc.message))
    except Exception as exc:
        return _failed(rt, request, exc)
    return AuditOutcome(list(results), engine)


def _too_long(rt: Runtime, what: str) -> CompletionTooLongError:
    """A completion the auditor cannot read whole: counted, and the fail mode decides."""
    error = CompletionTooLongError(
        f"the upstream's completion is longer than the auditor reads ({what}); "
        f"raise the sidecar's --max-tokens (now {rt.settings.max_tokens}) to audit completions this long"
    )
    rt.count_failure(error)
    return error


async def guarded_stream_feed(
    rt: Runtime,
    request: Request,
    stream: AuditStream,
    text: str,
    seen: _StreamVerdict,
    *,
    source: str,
    request_id: str | None = None,
) -> AuditOutcome:
    """Feed ``text`` to an incremental audit in the next batch (concurrent streams' chunks
    share a forward), with the same fail mode as :func:`guarded_audit`. The verdict covers
    the completion so far; ``seen`` records each rule's alert once per stream (see
    :class:`_StreamVerdict`)."""
    try:
        try:
            result = await rt.batcher.feed(stream, text)
        except Exception as exc:
            rt.count_failure(exc)
            raise
        if result.truncated:
            return _failed(rt, request, _too_long(rt, f"with the prompt, over {rt.settings.max_tokens} tokens so far"))
        fresh = seen.fresh(result.verdict)
        await rt.record([fresh], [stream.item], stream.engine, source=source, request_id=request_id, count_verdicts=False)
    except Exception as exc:
        return _failed(rt, request, exc)
    return AuditOutcome([result], stream.engine)


class _StreamVerdict:
    """What a stream audited chunk by chunk has recorded: each verdict covers the completion so
    far, so a rule's alert is written once (when it first matches), and the stream's verdict is
    counted once, the worst of its chunks, when it ends."""

    def __init__(self) -> None:
        self.rules: set[str] = set()
        self.worst: str | None = None

    def fresh(self, verdict: Any) -> Any:
        """``verdict`` with only the matches of rules not recorded before in this stream."""
        if verdict is None:
            return None
        if self.worst is None or _RANK[verdict.action] > _RANK[self.worst]:
            self.worst = verdict.action
        new = [m for m in verdict.matches if m.rule_id not in self.rules]
        self.rules.update(m.rule_id for m in new)
        return dataclasses.replace(verdict, matches=new)

    def count(self, rt: Runtime, engine: Any) -> None:
        if self.worst is not None and engine is not None:
            rt.metrics.verdicts.labels(policy=engine.name, action=self.worst).inc()


def _failed(rt: Runtime, request: Request, exc: Exception) -> AuditOutcome:
    """Apply the fail mode to an exception raised while auditing (re-raised when it is the client's)."""
    cause = _auditor_failure(exc)
    if cause is None:
        raise exc
    if not isinstance(exc, ServerError):
        _log.exception("audit failed")
    route = getattr(request.scope.get("route"), "path", "unmatched")
    if rt.settings.fail_mode == "open":
        if not getattr(request.state, "failed_open", False):  # a request counts once, however many audits failed
            request.state.failed_open = True
            rt.metrics.fail_open.labels(route=route).inc()
        _log.warning("auditor failed (%s); fail_mode=open lets the request through unaudited", cause)
        return AuditOutcome(error=cause)
    raise AuditFailedError(
        f"the auditor failed ({cause}); fail_mode is closed, so the request was not served"
    ) from None


# ---------------------------------------------------------------- request parsing


@dataclass
class _Call:
    kind: str  # "chat" | "completions"
    body: dict[str, Any]
    policy: str | None
    steering: list[Any] | None
    prompt_items: list[AuditInput]
    messages: tuple[dict[str, str], ...] | None
    prompts: list[str]
    stream: bool
    request_id: str
    forward: bytes
    """The body as forwarded to an upstream: ASCII JSON, so a string holding a lone surrogate (a
    valid JSON escape, such as half an emoji cut off) goes out as the escape it came as (UTF-8
    cannot encode it). Serialized once, when the request is read: that also refuses numbers JSON
    cannot carry."""
    engine: PolicyEngine | None = None
    """The policy (``policy``, or the default) as resolved once for the whole call: the prompt,
    the completion and every chunk of a stream are audited by the same version of it, even when
    a reload replaces or removes it while the upstream answers."""

    def completion_item(self, text: str, index: int = 0) -> AuditInput:
        if self.messages is not None:
            return AuditInput(messages=self.messages, completion=text)
        return AuditInput(prompt=self.prompts[min(index, len(self.prompts) - 1)], completion=text)


async def _parse(request: Request, kind: str) -> _Call:
    try:
        body = json.loads(await request.body() or b"null")
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise BadRequestError(NESTED_TOO_DEEPLY) from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    policy = body.pop("auditor_policy", None) or request.headers.get("x-auditor-policy")
    if policy is not None and not isinstance(policy, str):
        raise BadRequestError("auditor_policy must be a policy name (string)")
    steering = body.pop("steering", None)
    if steering is not None and not isinstance(steering, list):
        raise BadRequestError("steering must be a list of {feature, mode, value} objects")
    messages = None
    prompts: list[str] = []
    if kind == "chat":
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise BadRequestError("messages: required, a non-empty list of {role, content} objects")
        checked = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequestError(f"messages[{i}] must be an object with a string 'role'")
            checked.append({"role": m["role"], "content": message_text(m, f"messages[{i}]")})
        messages = tuple(checked)
        items = [AuditInput(messages=messages)]
    else:
        raw = body.get("prompt")
        if isinstance(raw, str):
            prompts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
            prompts = list(raw)
        else:
            raise BadRequestError("prompt: required, a string or a non-empty list of strings")
        items = [AuditInput(prompt=p) for p in prompts]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError("stream must be true or false")
    try:  # as it will be forwarded: Python reads NaN, Infinity and 1e999 as numbers, JSON has none
        forward = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("ascii")
    except ValueError:
        raise BadRequestError(
            "the body holds a number JSON cannot carry (NaN, Infinity, or one beyond a double's range, such as 1e999)"
        ) from None
    return _Call(kind, body, policy, steering, items, messages, prompts, stream, uuid.uuid4().hex, forward)


# ---------------------------------------------------------------- routes


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, audited (proxied to ``upstream`` or generated here)."""
    return await _handle(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI text completions, audited (proxied to ``upstream`` or generated here)."""
    return await _handle(request, "completions")


async def _handle(request: Request, kind: str) -> Response:
    rt = get_runtime(request)
    call = await _parse(request, kind)
    if call.steering is not None:
        if rt.http is not None:
            raise BadRequestError("steering needs the sidecar's own model; it is not available with --upstream")
        check_bearer(rt.settings, request.headers)
    if rt.http is None:
        _check_servable(call.body)
    try:
        call.engine = rt.engine(call.policy)
        pre = await guarded_audit(rt, request, call.prompt_items, policy=call.engine, source="prompt", request_id=call.request_id)
    except ServerError as exc:
        raise _with_verdict(exc, None) from None
    try:
        return await _answer(rt, request, call, pre)
    except ServerError as exc:
        raise _with_verdict(exc, pre) from None


def _with_verdict(exc: ServerError, pre: AuditOutcome | None) -> ServerError:
    """``exc`` with the ``X-Auditor-Verdict`` header: ``error`` when the auditor failed, else the
    prompt's verdict once it was audited (an upstream that failed after an allowed prompt)."""
    if exc.type == "auditor_error":
        extra = {"X-Auditor-Verdict": "error"}
    elif pre is not None:
        extra = pre.headers()
    else:
        return exc
    exc.headers = {**(exc.headers or {}), **extra}
    return exc


async def _answer(rt: Runtime, request: Request, call: _Call, pre: AuditOutcome) -> Response:
    """The answer to a call whose prompt was audited: 400 when it is blocked, else proxied or served."""
    for i in range(len(pre.results)):
        if pre.blocked(i):
            request.state.outcome = "blocked"
            reason = blocked_reason(pre.engine, pre.results[i].verdict)
            return JSONResponse(
                error_body(reason, "policy_violation", "content_filter", auditor={"prompt": pre.summary()}),
                status_code=400,
                headers=pre.headers(),
            )
    if rt.http is not None:
        if call.stream:
            return await _proxy_stream(rt, request, call, pre)
        return await _proxy(rt, request, call, pre)
    return await _serve(rt, request, call, pre)


# ---------------------------------------------------------------- proxy


def _forward_headers(rt: Runtime, request: Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS | {"content-type"}}
    headers["content-type"] = "application/json"
    headers.pop("authorization", None)
    if rt.settings.upstream_api_key is not None:
        headers["authorization"] = f"Bearer {rt.settings.upstream_api_key.get_secret_value()}"
    elif not rt.settings.auth_all_routes and "authorization" in request.headers:
        # The client's key is meant for the upstream, unless it is this server's own token.
        headers["authorization"] = request.headers["authorization"]
    return headers


def _path(call: _Call) -> str:
    return "/v1/chat/completions" if call.kind == "chat" else "/v1/completions"


def _choice_text(call: _Call, choice: dict[str, Any]) -> str:
    if call.kind == "chat":
        message = choice.get("message")
        if not isinstance(message, dict):
            return ""
        content = message.get("content")
        return with_tool_calls(content if isinstance(content, str) else "", message)
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _annotation(pre: AuditOutcome, post: AuditOutcome | None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": pre.summary()}
    if post is not None:
        out["completion"] = [post.summary(i) for i in range(len(post.results))] if post.error is None else [post.summary()]
    out["verdict"] = _worst(pre, post)
    return out


def _worst(pre: AuditOutcome, post: AuditOutcome | None) -> str:
    actions = [pre.action] + ([post.action] if post is not None else [])
    if "error" in actions:
        return "error" if not any(a == "block" for a in actions) else "block"
    return max(actions, key=_RANK.__getitem__)


def _verdict_headers(pre: AuditOutcome, post: AuditOutcome | None) -> dict[str, str]:
    headers = pre.headers()
    headers["X-Auditor-Verdict"] = _worst(pre, post)
    return headers


async def _proxy(rt: Runtime, request: Request, call: _Call, pre: AuditOutcome) -> Response:
    import httpx

    assert rt.http is not None  # _handle only proxies with an upstream client
    t0 = time.perf_counter()
    route = _path(call)
    try:
        resp = await _while_connected(request, rt.http.post(route, content=call.forward, headers=_forward_headers(rt, request)))
    except httpx.HTTPError as exc:
        rt.metrics.upstream_duration.labels(route=route, outcome="error").observe(time.perf_counter() - t0)
        raise UpstreamError(f"the upstream {rt.settings.upstream} could not be reached: {type(exc).__name__}") from None
    if resp is None:  # the client left: the upstream call is dropped and nothing is audited
        request.state.outcome = "client_error"
        return Response(status_code=499)
    rt.metrics.upstream_duration.labels(route=route, outcome=str(resp.status_code)).observe(time.perf_counter() - t0)
    if resp.status_code >= 400:
        request.state.outcome = "upstream_error"
        return Response(
            resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type"), headers=pre.headers()
        )
    data = _upstream_json(rt, resp)
    choices = _choices(data)
    items = [call.completion_item(_choice_text(call, c), _index(c)) for c in choices]
    post = (
        await guarded_audit(rt, request, items, policy=call.engine, source="completion", request_id=call.request_id)
        if items
        else AuditOutcome(engine=pre.engine)
    )
    _filter_choices(call, choices, post)
    data["auditor"] = _annotation(pre, post)
    if post.action == "block":
        request.state.outcome = "blocked"
    return JSONResponse(data, headers=_verdict_headers(pre, post))


def _upstream_json(rt: Runtime, resp: Any) -> dict[str, Any]:
    """The upstream's answer as a completion object; anything else is the upstream's failure (502),
    not something to relay unaudited."""
    try:
        data = resp.json()
    except (ValueError, RecursionError):
        data = None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        kind = resp.headers.get("content-type") or "no content type"
        raise UpstreamError(
            f"the upstream {rt.settings.upstream} answered {resp.status_code} with a body that is not an "
            f"OpenAI completion object ({kind}, {len(resp.content)} bytes); check that --upstream points "
            "at an OpenAI-compatible server's base URL"
        )
    return data


def _filter_choices(call: _Call, choices: list[dict[str, Any]], post: AuditOutcome) -> None:
    for i, choice in enumerate(choices):
        if post.blocked(i):
            if call.kind == "chat":
                message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
                kept = {k: v for k, v in message.items() if k not in ("tool_calls", "function_call")}
                choice["message"] = {**kept, "content": ""}
            else:
                choice["text"] = ""
            choice["finish_reason"] = "content_filter"


async def _upstream_events(rt: Runtime, request: Request, call: _Call, t0: float) -> tuple[Any, Any]:
    """Open the upstream stream; returns (response, context manager) for the caller to close."""
    import httpx

    assert rt.http is not None
    ctx = rt.http.stream("POST", _path(call), content=call.forward, headers=_forward_headers(rt, request))
    try:
        resp = await ctx.__aenter__()
    except httpx.HTTPError as exc:
        rt.metrics.upstream_duration.labels(route=_path(call), outcome="error").observe(time.perf_counter() - t0)
        raise UpstreamError(f"the upstream {rt.settings.upstream} could not be reached: {type(exc).__name__}") from None
    return resp, ctx


async def _iter_chunks(resp: Any) -> AsyncIterator[dict[str, Any]]:
    """The chunks of the upstream's stream, until ``data: [DONE]``.

    A stream that breaks off, or whose body just ends before it finished, raises
    :class:`UpstreamError`: a clean close is not proof of a complete answer (an upstream that
    crashes or restarts mid-generation closes its connection cleanly too), and relaying the
    part as a whole answer would tell the client it got all of it. Finished means ``[DONE]``
    arrived or, for upstreams that omit it, every choice seen has a ``finish_reason``."""
    import httpx

    seen: set[int] = set()
    finished: set[int] = set()
    lines = resp.aiter_lines()
    while True:
        try:
            line = await lines.__anext__()
        except StopAsyncIteration:
            if seen and seen <= finished:
                return
            raise UpstreamError(_unfinished(seen - finished)) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream's stream broke off: {type(exc).__name__}: {exc}") from None
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            obj = json.loads(payload)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(obj, dict):
            obj.pop("auditor", None)  # only this sidecar annotates what it releases
            for c in _choices(obj):
                seen.add(_index(c))
                if c.get("finish_reason") is not None:
                    finished.add(_index(c))
            yield obj


def _unfinished(open_choices: set[int]) -> str:
    """The message of an upstream stream whose body ended before it finished."""
    which = (
        f"choice{'s' if len(open_choices) > 1 else ''} {', '.join(str(i) for i in sorted(open_choices))} "
        "got no finish_reason"
        if open_choices
        else "it sent no choice at all"
    )
    return (
        f"the upstream's stream ended before it finished (no data: [DONE], and {which}), so the answer "
        "is incomplete; the upstream probably stopped mid-generation (crashed, restarted or timed out): "
        "check its logs and retry the request"
    )


def _chunk_text(call: _Call, chunk: dict[str, Any], started: set[int] | frozenset[int] = frozenset()) -> dict[int, str]:
    """Each choice's new text in a stream chunk: content, and for chat the pieces of tool calls
    (a call's name starts a new line, as in :func:`~auditor.text.with_tool_calls`, when the
    choices in ``started`` or this chunk already have text)."""
    out: dict[int, str] = {}
    for c in _choices(chunk):
        idx = _index(c)
        if call.kind == "chat":
            delta = c.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            content = delta.get("content")
            # with_tool_calls only asks whether text came before: one stand-in character says so.
            before = "." if idx in started or out.get(idx) else ""
            text = before + (content if isinstance(content, str) else "")
            text = with_tool_calls(text, delta)[len(before) :]
        else:
            text = c.get("text") if isinstance(c.get("text"), str) else ""
        out[idx] = out.get(idx, "") + text
    return out


def _choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The choice objects of an upstream answer or chunk (anything else in the list is skipped)."""
    choices = data.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _index(choice: dict[str, Any]) -> int:
    idx = choice.get("index", 0)
    return idx if isinstance(idx, int) and not isinstance(idx, bool) else 0


def _filtered_chunk(call: _Call, template: dict[str, Any], index: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "finish_reason": "content_filter"}
    if call.kind == "chat":
        choice["delta"] = {}
    else:
        choice["text"] = ""
    return {**_chunk_base(template, call), "choices": [choice]}


def _chunk_base(template: dict[str, Any], call: _Call) -> dict[str, Any]:
    return {
        "id": template.get("id", f"auditor-{call.request_id}"),
        "object": template.get("object", "chat.completion.chunk" if call.kind == "chat" else "text_completion"),
        "created": template.get("created", int(time.time())),
        "model": template.get("model", "auditor"),
    }


def _final_chunk(call: _Call, template: dict[str, Any], annotation: dict[str, Any]) -> dict[str, Any]:
    return {**_chunk_base(template, call), "choices": [], "auditor": annotation}


async def _proxy_stream(rt: Runtime, request: Request, call: _Call, pre: AuditOutcome) -> Response:
    t0 = time.perf_counter()
    route = _path(call)
    resp, ctx = await _upstream_events(rt, request, call, t0)
    if resp.status_code >= 400:
        content = await resp.aread()
        await ctx.__aexit__(None, None, None)
        rt.metrics.upstream_duration.labels(route=route, outcome=str(resp.status_code)).observe(time.perf_counter() - t0)
        request.state.outcome = "upstream_error"
        return Response(content, status_code=resp.status_code, media_type=resp.headers.get("content-type"), headers=pre.headers())
    if rt.settings.stream_mode == "chunked" and call.body.get("n", 1) in (None, 1):
        return StreamingResponse(
            _chunked_release(rt, request, call, pre, resp, ctx, t0),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **pre.headers()},
        )
    try:
        chunks = await _while_connected(request, _all_chunks(resp))
    finally:
        await ctx.__aexit__(None, None, None)
        rt.metrics.upstream_duration.labels(route=route, outcome=str(resp.status_code)).observe(time.perf_counter() - t0)
    if chunks is None:  # the client left: nobody reads an answer, so nothing is audited
        request.state.outcome = "client_error"
        return Response(status_code=499)
    return await _release_held(rt, request, call, pre, chunks)


async def _while_connected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None as soon as the client disconnects (``work`` is then cancelled):
    an upstream answer is awaited whole (a completion, or a stream held back until it ends), so
    without a watch on the client a long generation would be waited for (and the upstream kept
    generating) to its end for a client long gone, and then audited."""
    collect = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
            # Let it unwind before the caller closes the upstream response it reads.
            await asyncio.gather(collect, return_exceptions=True)
    if not collect.cancelled():
        return collect.result()  # the upstream's own failure (UpstreamError) raises here
    return None


async def _all_chunks(resp: Any) -> list[dict[str, Any]]:
    return [c async for c in _iter_chunks(resp)]


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the request body has been read by now)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _release_held(
    rt: Runtime, request: Request, call: _Call, pre: AuditOutcome, chunks: list[dict[str, Any]]
) -> Response:
    """Audit a fully buffered stream, then release it (blocked choices end with content_filter)."""
    texts: dict[int, str] = {}
    for chunk in chunks:
        for idx, text in _chunk_text(call, chunk, {i for i, t in texts.items() if t}).items():
            texts[idx] = texts.get(idx, "") + text
    indices = sorted(texts) or [0]
    items = [call.completion_item(texts.get(i, ""), i) for i in indices]
    post = await guarded_audit(rt, request, items, policy=call.engine, source="completion", request_id=call.request_id)
    blocked = {idx for pos, idx in enumerate(indices) if post.blocked(pos)}
    template = chunks[0] if chunks else {}
    events: list[bytes] = []
    for chunk in chunks:
        kept = [c for c in _choices(chunk) if _index(c) not in blocked]
        if chunk.get("choices") and not kept:
            continue
        events.append(sse_event({**chunk, "choices": kept} if chunk.get("choices") else chunk))
    for idx in sorted(blocked):
        events.append(sse_event(_filtered_chunk(call, template, idx)))
    events.append(sse_event(_final_chunk(call, template, _annotation(pre, post))))
    events.append(b"data: [DONE]\n\n")
    if blocked:
        request.state.outcome = "blocked"

    async def body() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={**SSE_HEADERS, **_verdict_headers(pre, post)}
    )


async def _chunked_release(
    rt: Runtime, request: Request, call: _Call, pre: AuditOutcome, resp: Any, ctx: Any, t0: float
) -> AsyncIterator[bytes]:
    """Audit the completion so far every ``stream_chunk_chars`` characters; release what passed."""
    step = rt.settings.stream_chunk_chars
    held: list[dict[str, Any]] = []
    released = ""
    pending = ""
    template: dict[str, Any] = {}
    post: AuditOutcome | None = None
    route = _path(call)
    seen = _StreamVerdict()
    engine = None
    try:
        # An incremental audit keeps the KV cache of the prompt and of what was released,
        # so each chunk costs a forward over its own tokens only, and the chunks of concurrent
        # streams that meet in a batch share that forward (MicroBatcher.feed).
        engine = call.engine
        stream = rt.auditor.stream(call.completion_item(""), policy=engine) if engine is not None else None
        finished = False
        unaudited = False  # the completion outgrew what the auditor reads and failed open: pass the rest
        chunks = _iter_chunks(resp)
        while not finished:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                finished = True
                chunk = None
            except ServerError as exc:
                # The upstream broke off, or its body ended unfinished, after the headers went out:
                # the stream ends with the error and what was not audited yet is not released.
                request.state.outcome = outcome_for(exc)
                yield sse_event(error_body(exc.message, exc.type, exc.code))
                yield b"data: [DONE]\n\n"
                return
            if unaudited:
                if chunk is not None:
                    yield sse_event(chunk)
                continue
            if chunk is not None:
                template = template or chunk
                held.append(chunk)
                pending += _chunk_text(call, chunk, {0} if released or pending else set()).get(0, "")
                if len(pending) < step:
                    continue
            if not held:
                continue
            try:
                if stream is not None:
                    post = await guarded_stream_feed(
                        rt, request, stream, pending, seen, source="completion", request_id=call.request_id
                    )
                else:
                    post = await guarded_audit(
                        rt,
                        request,
                        [call.completion_item(released + pending)],
                        policy=call.engine,
                        source="completion",
                        request_id=call.request_id,
                    )
            except ServerError as exc:
                # The headers went out with the prompt's verdict; the stream ends with the error
                # (an OpenAI client raises it) and nothing unaudited is released.
                request.state.outcome = outcome_for(exc)
                yield sse_event(error_body(exc.message, exc.type, exc.code))
                yield b"data: [DONE]\n\n"
                return
            if post.blocked(0):
                request.state.outcome = "blocked"
                yield sse_event(_filtered_chunk(call, template, 0))
                yield sse_event(_final_chunk(call, template, _annotation(pre, post)))
                yield b"data: [DONE]\n\n"
                return
            for c in held:
                yield sse_event(c)
            released += pending
            pending = ""
            held = []
            # Feeding a stream past the auditor's limit again would fail (and count) again.
            unaudited = post.error is not None and post.error.startswith(CompletionTooLongError.code)
        yield sse_event(_final_chunk(call, template, _annotation(pre, post)))
        yield b"data: [DONE]\n\n"
    finally:
        seen.count(rt, engine)
        await ctx.__aexit__(None, None, None)
        rt.metrics.upstream_duration.labels(route=route, outcome=str(resp.status_code)).observe(time.perf_counter() - t0)


# ---------------------------------------------------------------- serve mode


def _gen_item(call: _Call) -> AuditInput:
    if call.messages is not None:
        return AuditInput(messages=call.messages)
    if len(call.prompts) != 1:
        raise BadRequestError("the sidecar's own model completes one prompt per request; send a single string")
    return AuditInput(prompt=call.prompts[0])


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequestError(f"{key} must be a number between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def _stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise BadRequestError("stop must be a string or a list of strings")


async def _run_generation(
    rt: Runtime,
    item: AuditInput,
    *,
    max_tokens: int,
    temperature: float,
    stop: list[str],
    steering: list[Any] | None,
    compare: bool,
    policy: str | PolicyEngine | None,
    seed: int | None = None,
) -> Any:
    from auditor.steering import generate, parse_intervention

    engine = rt.engine(policy)
    library = rt.auditor.library
    try:
        interventions = [parse_intervention(s, library) for s in steering or []]
    except AuditorError as exc:
        raise BadRequestError(exc.message) from None
    if max_tokens > rt.settings.max_generate_tokens:
        raise BadRequestError(
            f"max_tokens is {max_tokens}; this server generates at most {rt.settings.max_generate_tokens} (max_generate_tokens)"
        )
    counts = await asyncio.get_running_loop().run_in_executor(rt.prep, rt.count_tokens, [item])
    if counts[0] + max_tokens > rt.settings.max_tokens:
        from auditor.server.errors import TooLargeError

        raise TooLargeError(
            f"the prompt has {counts[0]} tokens; with max_tokens {max_tokens} it is over the limit of "
            f"{rt.settings.max_tokens} tokens (max_tokens setting)"
        )

    def run() -> Any:
        return generate(
            rt.auditor,
            item,
            max_tokens=max_tokens,
            temperature=temperature,
            interventions=interventions,
            compare=compare,
            policy=engine,
            stop=stop or None,
            seed=seed,
            cuda_graph=rt.settings.cuda_graphs,
        )

    try:
        result = await rt.batcher.run_model(run)
    except AuditorError as exc:
        raise BadRequestError(exc.message) from None
    for iv in interventions:
        rt.metrics.interventions.labels(mode=iv.mode).inc()
    for trig in result.triggered:
        for spec in trig.interventions:
            mode = spec.split("=", 1)[-1].split(":", 1)[0]
            rt.metrics.interventions.labels(mode=mode if mode in ("clamp", "scale", "add") else "other").inc()
    if engine is not None and result.verdict is not None:
        audited = (
            AuditInput(messages=item.messages, completion=result.text)
            if item.messages is not None
            else AuditInput(prompt=item.prompt, completion=result.text)
        )
        await rt.record([result.verdict], [audited], engine, source="completion", request_id=None)
    return result, engine


# Request fields the sidecar's own model cannot honour, with the value that asks for nothing
# (a client sending that value, as some SDKs do, is served as usual).
_SERVE_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}


def _check_servable(body: dict[str, Any]) -> None:
    """Refuse what the sidecar's own model would otherwise silently ignore (one choice, plain
    text): a client asking for two choices or a tool call must not get one text back as if served."""
    for key, neutral in _SERVE_UNSUPPORTED.items():
        value = body.get(key)
        if any(value == n and type(value) is type(n) for n in neutral):
            continue
        if key in ("tool_choice", "function_call") and not (body.get("tools") or body.get("functions")):
            continue  # a choice among no tools asks for nothing
        raise BadRequestError(
            f"{key}={json.dumps(value)} is not supported by the sidecar's own model, which answers one "
            f"plain-text choice per request; leave {key} out, or run the sidecar with --upstream to "
            "forward it to a model server"
        )


async def _serve(rt: Runtime, request: Request, call: _Call, pre: AuditOutcome) -> Response:
    body = call.body
    default_max = min(16 if call.kind == "completions" else rt.settings.max_generate_tokens, rt.settings.max_generate_tokens)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = int(_number(body, key, default_max, 1, 1e9))
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    seed = body.get("seed")
    result, engine = await _run_generation(
        rt,
        _gen_item(call),
        max_tokens=max_tokens,
        temperature=temperature,
        stop=_stop_list(body),
        steering=call.steering,
        compare=False,
        policy=call.engine,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
    )
    post = AuditOutcome([result], engine)
    blocked = post.blocked(0)
    text = "" if blocked else result.text
    finish = "content_filter" if blocked else result.finish_reason
    created = int(time.time())
    model_name = rt.auditor.model.name
    rid = ("chatcmpl-" if call.kind == "chat" else "cmpl-") + call.request_id
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.tokens),
        "total_tokens": result.prompt_tokens + len(result.tokens),
    }
    annotation = _annotation(pre, post)
    if result.steered:
        annotation["steered"] = True
    if blocked:
        request.state.outcome = "blocked"
    headers = _verdict_headers(pre, post)
    if not call.stream:
        if call.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        data = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model_name,
            "choices": [choice],
            "usage": usage,
            "auditor": annotation,
        }
        return JSONResponse(data, headers=headers)
    template = {
        "id": rid,
        "object": "chat.completion.chunk" if call.kind == "chat" else "text_completion",
        "created": created,
        "model": model_name,
    }
    events: list[bytes] = []
    pieces = re.findall(r"\s*\S+|\s+", text)
    if call.kind == "chat":
        events.append(sse_event({**template, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
        for piece in pieces:
            events.append(sse_event({**template, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}))
        events.append(sse_event({**template, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    else:
        for piece in pieces:
            events.append(sse_event({**template, "choices": [{"index": 0, "text": piece, "finish_reason": None}]}))
        events.append(sse_event({**template, "choices": [{"index": 0, "text": "", "finish_reason": finish}]}))
    events.append(sse_event({**template, "choices": [], "usage": usage, "auditor": annotation}))
    events.append(b"data: [DONE]\n\n")

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    return StreamingResponse(stream(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: generate with explicit steering on the sidecar's own model."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    """Plain-text prompt to continue."""
    messages: list[dict[str, Any]] | None = None
    """A chat to answer (the assistant turn is generated)."""
    max_tokens: int = Field(default=32, ge=1)
    """Tokens to generate (at most the server's ``max_generate_tokens``)."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0 is greedy."""
    seed: int | None = None
    """Makes sampling repeatable."""
    stop: list[str] | None = None
    """Stop strings."""
    steering: list[dict[str, Any]] = Field(default_factory=list)
    """Interventions: ``{feature, mode: clamp|scale|add, value, positions?: active|all}``."""
    compare: bool = False
    """Also generate without steering and return both, with the steered features' activations."""
    policy: str | None = None
    """Policy evaluated on the completion (its ``steer`` actions switch on live)."""


@router.post("/v1/generate")
async def generate_route(body: GenerateRequest, request: Request) -> JSONResponse:
    """Steered generation: the text, the default text (``compare``) and per-token feature activations."""
    rt = get_runtime(request)
    if (body.prompt is None) == (body.messages is None):
        raise BadRequestError("give exactly one of 'prompt' or 'messages'")
    if body.messages is not None:
        msgs = tuple(
            {"role": str(m.get("role")), "content": message_text(m, f"messages[{i}]")}
            for i, m in enumerate(body.messages)
        )
        item = AuditInput(messages=msgs)
    else:
        item = AuditInput(prompt=body.prompt)
    result, engine = await _run_generation(
        rt,
        item,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        stop=body.stop or [],
        steering=body.steering,
        compare=body.compare,
        policy=body.policy,
        seed=body.seed,
    )
    verdict = result.verdict
    out: dict[str, Any] = {
        "text": result.text,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "steered": result.steered,
        "interventions": result.interventions,
        "feature_traces": result.feature_traces,
        "steered_traces": result.steered_traces,
        "verdict": verdict.action if verdict is not None else "allow",
        "policy": engine.name if engine is not None else None,
        "matches": [m.rule_id for m in verdict.matches] if verdict is not None else [],
    }
    if body.compare:
        out.update(
            {
                "default_text": result.default_text,
                "default_tokens": result.default_tokens,
                "default_finish_reason": result.default_finish_reason,
                "default_traces": result.default_traces,
            }
        )
    return JSONResponse(out, headers={"X-Auditor-Verdict": out["verdict"]})
