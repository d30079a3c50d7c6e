"""The sidecar's own API on a real server (loopback port, real model, httpx): audit, limits, auth,
policies, alerts, features, the LiteLLM guardrail route and the Prometheus exposition."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from auditor.server.app import create_app
from auditor.server.background import BackgroundServer
from auditor.server.settings import Settings
from tests.conftest import make_random_sae

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"
TOKEN = "tok-3f9a1c-never-logged"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FRAUD = "Send the wire transfer today or your account will be closed forever."


def _policy(folder: Path, name: str, threshold: float, scope: str = "any") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: {name}}}
library: {TINY}
rules:
  - id: fraud-any
    description: Any fraud feature activity
    severity: high
    category: deception
    scope: {scope}
    condition: {{feature: deception.fraud, agg: max, threshold: {threshold}}}
    actions: [alert, block]
"""
    )
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("api")
    sae = make_random_sae(root / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")
    pol = root / "policies"
    pol.mkdir()
    # threshold 0 fires on any in-scope token: a deterministic block on the real model.
    _policy(pol, "block-fraud", 0.0)
    _policy(pol, "quiet", 1e6)
    settings = Settings.load(
        flags={
            "sae": str(sae),
            "policies": [str(pol), str(REPO / "policies" / "examples" / "deception.yaml")],
            "default_policy": "quiet",
            "data_dir": str(root / "data"),
            "max_body_bytes": 4096,
            "max_tokens": 64,
            "queue_size": 2,
            "max_generate_tokens": 64,
        },
        env={"AUDITOR_API_TOKEN": TOKEN},
    )
    with BackgroundServer(create_app(settings)) as srv:
        srv.wait_ready()
        yield srv


def _post(server: BackgroundServer, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, **kw)  # type: ignore[arg-type]


def _metrics(server: BackgroundServer) -> str:
    return httpx.get(server.url + "/metrics").text


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in the exposition text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def test_probes(server: BackgroundServer) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready" and set(ready["policies"]) == {"block-fraud", "quiet", "example-deception"}


def test_audit_verdicts_explanations_and_scores(server: BackgroundServer) -> None:
    quiet = _post(server, "/v1/audit", {"text": FRAUD})
    assert quiet.status_code == 200 and quiet.headers["x-auditor-verdict"] == "allow"
    body = quiet.json()
    assert body["policy"] == "quiet" and body["verdict"] == "allow" and body["matches"] == []
    assert 0 <= body["scores"]["fraud-any"] < 1 and "deception" in body["category_scores"]

    blocked = _post(server, "/v1/audit", {"text": FRAUD, "policy": "block-fraud", "id": "req-1"})
    assert blocked.headers["x-auditor-verdict"] == "block"
    out = blocked.json()
    assert out["verdict"] == "block" and out["policy"] == "block-fraud" and len(out["policy_hash"]) == 64
    # The hash of the policy that decided, as the policy listing shows it (not the whole set's).
    listed = {p["name"]: p["hash"] for p in httpx.get(server.url + "/v1/policies").json()["policies"]}
    assert out["policy_hash"] == listed["block-fraud"] != listed["quiet"]
    [match] = out["matches"]
    assert match["rule_id"] == "fraud-any" and match["severity"] == "high"
    [leaf] = match["explanation"]
    assert leaf["name"] == "deception.fraud" and leaf["fired"] and leaf["token_spans"]
    assert "tokens" not in out


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "How do I reset my bank password?"}]},
        {"prompt": "Write to the customer:", "completion": " Your prize is waiting, send the fee."},
        {"messages": [{"role": "user", "content": "Hi"}], "completion": "Hello there."},
    ],
)
def test_audit_input_shapes_with_explain(server: BackgroundServer, body: dict[str, object]) -> None:
    resp = _post(server, "/v1/audit", {**body, "explain": True, "policy": "example-deception"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["n_tokens"] > 0 and len(out["tokens"]) == out["n_tokens"]
    assert all(len(t["features"]) <= 5 for t in out["tokens"])
    assert set(out["scores"]) == {"fraud-completion", "phishing-prompt", "deception-probe"}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "exactly one of 'text', 'messages' or 'prompt'"),
        ({"text": 5}, "text"),
        ({"text": "x", "bogus": 1}, "bogus"),
        ({"messages": []}, "non-empty list"),
        ({"text": "a", "completion": "b"}, "'completion' goes with 'prompt' or 'messages'"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"text": "a", "explain": "very"}, "explain"),
    ],
)
def test_422_names_the_problem(server: BackgroundServer, body: dict[str, object], needle: str) -> None:
    resp = _post(server, "/v1/audit", body)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"], error


@pytest.mark.parametrize(
    ("content", "headers", "message"),
    [
        (b"hello", {}, "body: Input should be a valid dictionary or object to extract fields from; "
         "send a JSON object with Content-Type: application/json"),
        (b"", {}, "body: Field required; send a JSON object with Content-Type: application/json"),
        (b'"hello"', {"Content-Type": "application/json"}, "; send a JSON object with Content-Type: application/json"),
        (b'{"text": "a",}', {"Content-Type": "application/json"}, "body: not valid JSON at character 13 ("),
    ],
)
def test_422_for_a_body_that_is_not_a_json_object_says_how_to_send_one(
    server: BackgroundServer, content: bytes, headers: dict[str, str], message: str
) -> None:
    resp = httpx.post(server.url + "/v1/audit", content=content, headers=headers, timeout=60)
    assert resp.status_code == 422
    assert message in resp.json()["error"]["message"], resp.json()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"n": 2}, "n=2 is not supported"),
        ({"n": "two"}, 'n="two" is not supported'),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools=[{"),
        ({"response_format": {"type": "json_object"}}, "response_format="),
        ({"logprobs": True}, "logprobs=true"),
    ],
)
def test_serve_mode_refuses_what_its_own_model_cannot_do(
    server: BackgroundServer, extra: dict[str, object], needle: str
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    resp = _post(server, "/v1/chat/completions", {**body, **extra})
    assert resp.status_code == 422
    message = resp.json()["error"]["message"]
    assert needle in message and "one plain-text choice per request" in message and "--upstream" in message
    # The values that ask for nothing are served as usual (SDKs send some of them by default).
    neutral = {"n": 1, "tools": [], "tool_choice": "auto", "logprobs": False, "response_format": {"type": "text"}}
    assert _post(server, "/v1/chat/completions", {**body, **neutral}).status_code == 200


def test_unknown_policy_is_404_listing_the_loaded_ones(server: BackgroundServer) -> None:
    resp = _post(server, "/v1/audit", {"text": "hi", "policy": "nope"})
    assert resp.status_code == 404
    assert "quiet" in resp.json()["error"]["message"] and "nope" in resp.json()["error"]["message"]


def test_a_lone_surrogate_escape_is_audited_not_an_internal_error(server: BackgroundServer) -> None:
    # Valid JSON (a client that cut a UTF-16 string inside an emoji sends half a pair), which
    # Python decodes to a lone surrogate: the tokenizer refused it with a TypeError, a 500 (and,
    # on the proxy routes, an auditor failure that fail-open let through unaudited).
    internal = _sample(_metrics(server), "auditor_errors_total", kind="internal")
    raw = '{"text": "Send the wire transfer today \\ud83d", "policy": "block-fraud", "id": "surrogate-1", "explain": true}'
    resp = httpx.post(server.url + "/v1/audit", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["verdict"] == "block"
    assert any("\ufffd" in t["token"] for t in resp.json()["tokens"])
    alerts = httpx.get(server.url + "/v1/alerts", params={"request_id": "surrogate-1"}).json()["alerts"]
    assert alerts and alerts[0]["rule_id"] == "fraud-any"  # written to the audit log, not lost
    chat = '{"messages": [{"role": "user", "content": "Hello \\udc00 there"}], "completion": "Sure \\ud800"}'
    resp = httpx.post(server.url + "/v1/audit", content=chat, headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 200, resp.text
    guard = '{"texts": ["Send the wire transfer \\ud83d"], "additional_provider_specific_params": {"policy": "block-fraud"}}'
    resp = httpx.post(server.url + "/beta/litellm_basic_guardrail_api", content=guard, headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 200 and resp.json()["action"] == "BLOCKED", resp.text
    assert _sample(_metrics(server), "auditor_errors_total", kind="internal") == internal


def test_json_nested_too_deeply_is_a_422_in_the_error_shape_not_a_500(server: BackgroundServer) -> None:
    # Under the body limit, but deeper than Python's JSON parser recurses: the chat route's own
    # parser raised RecursionError (a 500 and a traceback per request), FastAPI's answered
    # 400 {"detail": "There was an error parsing the body"}.
    deep = '{"messages": ' + "[" * 1500 + "]" * 1500 + "}"
    assert len(deep) < 4096
    before = _metrics(server)
    for path in ("/v1/audit", "/v1/chat/completions", "/v1/completions", "/beta/litellm_basic_guardrail_api"):
        resp = httpx.post(server.url + path, content=deep, headers={"content-type": "application/json"}, timeout=60)
        assert resp.status_code == 422, (path, resp.text)
        assert "nested too deeply" in resp.json()["error"]["message"] and resp.json()["error"]["code"] == "invalid_request"
    after = _metrics(server)
    assert _sample(after, "auditor_requests_total", route="/v1/audit", outcome="client_error") == 1 + _sample(
        before, "auditor_requests_total", route="/v1/audit", outcome="client_error"
    )
    # FastAPI's other answers take the same error object.
    wrong = httpx.get(server.url + "/v1/audit")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed" and "allow" in wrong.headers
    missing = httpx.get(server.url + "/v1/no-such-route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_413_body_and_tokens_state_the_limit(server: BackgroundServer) -> None:
    big = _post(server, "/v1/audit", {"text": "a" * 5000})
    assert big.status_code == 413 and "4096 bytes" in big.json()["error"]["message"]
    many = _post(server, "/v1/audit", {"text": "word " * 200})
    assert many.status_code == 413
    msg = many.json()["error"]["message"]
    assert "the sidecar audits at most 64 tokens per input (--max-tokens, AUDITOR_MAX_TOKENS)" in msg
    assert int(re.search(r"has (\d+) tokens", msg).group(1)) > 200  # type: ignore[union-attr]
    # A chunked body without Content-Length is cut off the same way.
    chunks = (b"x" * 1024 for _ in range(6))
    streamed = httpx.post(server.url + "/v1/audit", content=chunks, headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_401_on_mutating_routes_and_the_token_never_leaks(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for path, body in (("/v1/policies/reload", None), ("/v1/policies/validate", {"content": "x: 1"})):
        missing = _post(server, path, body)
        wrong = _post(server, path, body, headers={"Authorization": "Bearer wrong-" + TOKEN})
        for resp in (missing, wrong):
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
            assert resp.json()["error"]["type"] == "authentication_error"
            assert TOKEN not in resp.text
        assert _post(server, path, body, headers=AUTH).status_code in (200, 422)
    gen = _post(server, "/v1/generate", {"prompt": "Hi", "max_tokens": 1})
    assert gen.status_code == 401
    # Refused before routing, still counted under the route that was asked for.
    text = _metrics(server)
    assert _sample(text, "auditor_requests_total", route="/v1/policies/reload", outcome="unauthorized") >= 2
    assert _sample(text, "auditor_requests_total", route="/v1/generate", outcome="unauthorized") >= 1
    # Read-only routes stay open without auth_all_routes.
    assert httpx.get(server.url + "/v1/policies").status_code == 200
    assert TOKEN not in caplog.text and TOKEN not in _metrics(server)


def test_503_with_retry_after_when_the_queue_is_full(server: BackgroundServer) -> None:
    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            # Two generations hold the model workers (two on a 2-core CPU); queue_size=2 admits
            # two audits, the rest get 503.
            gens = [
                asyncio.create_task(
                    client.post("/v1/generate", json={"prompt": "Once upon a time", "max_tokens": 48}, headers=AUTH)
                )
                for _ in range(2)
            ]
            await asyncio.sleep(0.5)
            audits = await asyncio.gather(*(client.post("/v1/audit", json={"text": f"text {i}"}) for i in range(6)))
            assert [(await g).status_code for g in gens] == [200, 200]
            return list(audits)

    responses = asyncio.run(scenario())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 2 and codes.count(503) == 4, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "overloaded" and "queue_size" in rejected.json()["error"]["message"]
    assert _sample(_metrics(server), "auditor_requests_total", route="/v1/audit", outcome="overloaded") >= 4


def test_concurrent_requests_share_batches(server: BackgroundServer) -> None:
    before = _metrics(server)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            # Two at a time (queue_size=2): with one model worker each pair lands in one
            # forward; with two, the pair is split between the idle workers and runs side by side.
            out: list[httpx.Response] = []
            for i in range(4):
                out += await asyncio.gather(*(client.post("/v1/audit", json={"text": f"batch {i} {j}"}) for j in range(2)))
            return out

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    after = _metrics(server)
    items = _sample(after, "auditor_batch_size_sum") - _sample(before, "auditor_batch_size_sum")
    batches = _sample(after, "auditor_batch_size_count") - _sample(before, "auditor_batch_size_count")
    workers = _sample(after, "auditor_model_workers")  # auto_workers: 2 on a CPU with 2+ threads
    assert workers in (1, 2)
    assert items == 8 and (batches < 8 if workers == 1 else batches == 8)


def test_policies_list_validate_reload(server: BackgroundServer) -> None:
    listing = httpx.get(server.url + "/v1/policies").json()
    assert listing["default"] == "quiet" and len(listing["hash"]) == 64
    names = {p["name"]: p for p in listing["policies"]}
    assert names["block-fraud"]["rules"][0]["actions"] == ["alert", "block"]

    bad = f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: broken}}
library: {TINY}
rules:
  - id: r1
    severity: extreme
    category: x
    condition: {{feature: deception.fraudd, agg: max, threshold: 1}}
"""
    resp = _post(server, "/v1/policies/validate", {"content": bad}, headers=AUTH)
    assert resp.status_code == 200
    out = resp.json()
    assert out["valid"] is False and out["errors"]
    assert all(e["line"] is not None and e["path"] == "<content>" for e in out["errors"]), out["errors"]
    assert any("severity" in e["message"] for e in out["errors"]), out["errors"]
    good = _post(server, "/v1/policies/validate", {"path": str(REPO / "policies" / "examples" / "deception.yaml")}, headers=AUTH)
    assert good.json()["valid"] is True and good.json()["policies"][0]["name"] == "example-deception"
    empty = _post(server, "/v1/policies/validate", {}, headers=AUTH)
    assert empty.status_code == 422 and "application/yaml" in empty.json()["error"]["message"]
    # A folder the server cannot list is a problem in the answer, not a server error.
    try:
        os.listdir("/proc/1/map_files")  # root in a container lacks CAP_SYS_ADMIN, which listing it needs
    except PermissionError:
        locked = _post(server, "/v1/policies/validate", {"path": "/proc/1/map_files"}, headers=AUTH)
        assert locked.status_code == 200 and locked.json()["valid"] is False, locked.text
        [problem] = locked.json()["errors"]
        assert problem["path"] == "/proc/1/map_files" and "cannot list the policy folder" in problem["message"]
    except OSError:
        pass

    # The policy YAML itself as the body: the same problems, with their lines.
    yaml_headers = {**AUTH, "Content-Type": "application/yaml; charset=utf-8"}
    raw = httpx.post(server.url + "/v1/policies/validate", content=bad.encode(), headers=yaml_headers, timeout=60)
    assert raw.status_code == 200 and raw.json()["errors"] == out["errors"]
    # The shipped example as it is: its relative library path resolves against base_dir, as if
    # the file were saved there; by default against the server's policy folder, where it is not found.
    example = REPO / "policies" / "examples" / "deception.yaml"
    raw_good = httpx.post(
        server.url + "/v1/policies/validate", content=example.read_bytes(), headers=yaml_headers,
        params={"base_dir": str(example.parent)}, timeout=60,
    )
    assert raw_good.json()["valid"] is True and raw_good.json()["base_dir"] == str(example.parent), raw_good.json()
    as_json = _post(server, "/v1/policies/validate", {"content": example.read_text(), "base_dir": str(example.parent)}, headers=AUTH)
    assert as_json.json()["valid"] is True
    elsewhere = _post(server, "/v1/policies/validate", {"content": example.read_text()}, headers=AUTH).json()
    assert elsewhere["valid"] is False and elsewhere["base_dir"] != str(example.parent)
    [problem] = elsewhere["errors"]
    assert problem["path"] == "<content>" and problem["line"] is not None
    assert "auditor-validate-" not in problem["message"] and "feature_libraries" in problem["message"]
    no_dir = _post(server, "/v1/policies/validate", {"content": bad, "base_dir": "/no/such/dir"}, headers=AUTH)
    assert no_dir.status_code == 404 and "base_dir /no/such/dir: no such folder" in no_dir.json()["error"]["message"]
    # YAML sent as JSON: what was wrong and how to send it.
    wrong = httpx.post(server.url + "/v1/policies/validate", content=bad.encode(), headers={**AUTH, "Content-Type": "application/json"})
    assert wrong.status_code == 422
    message = wrong.json()["error"]["message"]
    assert message.startswith("invalid request: body: not valid JSON (expected value at line 1 column 1)"), message
    assert '{"content": "<policy YAML>"}' in message and "Content-Type: application/yaml" in message
    not_utf8 = httpx.post(server.url + "/v1/policies/validate", content=b"rules: \xff\xfe", headers=yaml_headers)
    assert not_utf8.status_code == 422 and "not UTF-8" in not_utf8.json()["error"]["message"]

    before = _sample(_metrics(server), "auditor_policy_reloads_total", result="success")
    reloaded = _post(server, "/v1/policies/reload", None, headers=AUTH)
    assert reloaded.status_code == 200 and reloaded.json()["ok"] and reloaded.json()["hash"] == listing["hash"]
    assert reloaded.json()["changed"] is False
    assert reloaded.json()["policies"] == [p["name"] for p in listing["policies"]]
    metrics = _metrics(server)
    assert _sample(metrics, "auditor_policy_reloads_total", result="success") == before + 1
    assert _sample(metrics, "auditor_policy_info", hash=listing["hash"]) == 1


def test_alerts_query_paging_and_stream(server: BackgroundServer) -> None:
    events: list[dict[str, object]] = []
    subscribed = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", server.url + "/v1/alerts/stream", params={"min_severity": "high"}, timeout=30) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith(": subscribed"):
                    subscribed.set()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(10)
    for i in range(3):
        assert _post(server, "/v1/audit", {"text": f"{FRAUD} ({i})", "policy": "block-fraud", "id": f"page-{i}"}).status_code == 200
    listener.join(10)
    assert events and events[0]["rule_id"] == "fraud-any" and events[0]["severity"] == "high"

    page = httpx.get(server.url + "/v1/alerts", params={"rule_id": "fraud-any", "limit": 2}).json()
    assert len(page["alerts"]) == 2 and page["next"] and page["total"] >= 3
    assert all(a["policy_name"] == "block-fraud" and a["action"] == "block" for a in page["alerts"])
    rest = httpx.get(server.url + "/v1/alerts", params={"rule_id": "fraud-any", "limit": 2, "after": page["next"]}).json()
    ids = [a["id"] for a in page["alerts"]] + [a["id"] for a in rest["alerts"]]
    assert len(ids) == len(set(ids)) and len(rest["alerts"]) >= 1
    # One alert by id, where Alertmanager's generatorURL points.
    first = page["alerts"][0]
    by_id = httpx.get(server.url + f"/v1/alerts/{first['id']}")
    assert by_id.status_code == 200 and by_id.json()["id"] == first["id"] and by_id.json()["rule_id"] == "fraud-any"
    assert isinstance(by_id.json()["deliveries"], dict)
    listed = {p["name"]: p["hash"] for p in httpx.get(server.url + "/v1/policies").json()["policies"]}
    assert by_id.json()["policy_hash"] == listed["block-fraud"]
    gone = httpx.get(server.url + "/v1/alerts/no-such-alert")
    assert gone.status_code == 404 and "no alert 'no-such-alert'" in gone.json()["error"]["message"]
    one = httpx.get(server.url + "/v1/alerts", params={"request_id": "page-1"}).json()
    assert [a["request_id"] for a in one["alerts"]] == ["page-1"]
    assert httpx.get(server.url + "/v1/alerts", params={"min_severity": "extreme"}).status_code == 422

    # Time filters as the CLI takes them: a duration back from now, an ISO time, Unix seconds.
    def fraud_ids(**params: object) -> set[str]:
        resp = httpx.get(server.url + "/v1/alerts", params={"rule_id": "fraud-any", "limit": 1000, **params})
        assert resp.status_code == 200, resp.text
        return {a["id"] for a in resp.json()["alerts"]}

    recent = fraud_ids(since="10m")
    assert set(ids) <= recent
    assert fraud_ids(until="10m") & set(ids) == set()
    newest = max(datetime.fromisoformat(a["created_at"]) for a in page["alerts"])
    assert fraud_ids(since=newest.isoformat()) and not fraud_ids(since=(newest + timedelta(seconds=1)).isoformat())
    from_unix = fraud_ids(since=str(newest.timestamp() - 0.5))
    assert page["alerts"][0]["id"] in from_unix and from_unix <= recent
    # A misspelt parameter is refused, not ignored (which would answer every alert).
    for params in ({"cursor": page["next"]}, {"rule": "fraud-any"}):
        refused = httpx.get(server.url + "/v1/alerts", params=params)
        assert refused.status_code == 422
        assert f"unknown query parameter(s) {next(iter(params))}; accepted: after, category," in refused.json()["error"]["message"]
        assert "(page with after=<the previous page's next>)" in refused.json()["error"]["message"]
    # Bounds the wrong way round match nothing: refused, not answered with an empty page.
    reversed_range = httpx.get(server.url + "/v1/alerts", params={"since": "1h", "until": "2h"})
    assert reversed_range.status_code == 422
    assert re.fullmatch(
        r"since \(\S+Z\) is after until \(\S+Z\), so no alert can match; .*", reversed_range.json()["error"]["message"]
    )
    bad = httpx.get(server.url + "/v1/alerts", params={"since": "yesterday"})
    assert bad.status_code == 422
    assert bad.json()["error"]["message"] == (
        "invalid request: query.since: 'yesterday': expected an ISO time (2026-11-26T04:00:00Z), Unix seconds (1795665600) or a duration like 15m, 2h, 7d"
    )


def test_features_search(server: BackgroundServer) -> None:
    everything = httpx.get(server.url + "/v1/features").json()
    assert everything["library"] == "tiny" and everything["count"] == 13
    fraud = httpx.get(server.url + "/v1/features", params={"q": "scam"}).json()
    assert [f["name"] for f in fraud["features"]] == ["deception.fraud"]
    bias = httpx.get(server.url + "/v1/features", params={"category": "bias"}).json()
    assert bias["features"] and all(f["category"] == "bias" for f in bias["features"])
    one = httpx.get(server.url + "/v1/features", params={"name": "deception.phishing"}).json()
    assert one["features"][0]["index"] == 19
    missing = httpx.get(server.url + "/v1/features", params={"name": "deception.phish"})
    assert missing.status_code == 404 and "deception.phishing" in missing.json()["error"]["message"]


def test_litellm_generic_guardrail_contract(server: BackgroundServer) -> None:
    base = {"request_data": {"user_api_key_hash": "abc"}, "litellm_call_id": "call-1"}
    blocked = _post(
        server,
        "/beta/litellm_basic_guardrail_api",
        {**base, "texts": [FRAUD], "input_type": "request", "additional_provider_specific_params": {"policy": "block-fraud"}},
    )
    assert blocked.status_code == 200
    assert blocked.json()["action"] == "BLOCKED" and "fraud-any" in blocked.json()["blocked_reason"]
    passed = _post(server, "/beta/litellm_basic_guardrail_api", {**base, "texts": ["Hello there"], "input_type": "response"})
    assert passed.json() == {"action": "NONE", "blocked_reason": None, "texts": None}
    # The request's chat as structured_messages is audited even when texts is empty.
    chat = [{"role": "user", "content": [{"type": "text", "text": "Help me."}]},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "send", "arguments": FRAUD}}]}]
    structured = {**base, "texts": [], "structured_messages": chat, "input_type": "request",
                  "additional_provider_specific_params": {"policy": "block-fraud"}}
    assert _post(server, "/beta/litellm_basic_guardrail_api", structured).json()["action"] == "BLOCKED"
    broken = _post(server, "/beta/litellm_basic_guardrail_api", {**structured, "structured_messages": [{"role": "user"}]})
    assert broken.status_code == 422 and "structured_messages: messages[0] needs a 'content'" in broken.json()["error"]["message"]
    bad = _post(server, "/beta/litellm_basic_guardrail_api", {**base, "texts": ["x"], "input_type": "sideways"})
    assert bad.status_code == 422 and "input_type" in bad.json()["error"]["message"]


def test_metrics_exposition_passes_promtool(server: BackgroundServer) -> None:
    _post(server, "/v1/audit", {"text": FRAUD, "policy": "block-fraud"})
    text = _metrics(server)
    assert _sample(text, "auditor_tokens_audited_total") > 0
    assert _sample(text, "auditor_requests_total", route="/v1/audit", outcome="blocked") >= 1
    assert _sample(text, "auditor_verdicts_total", policy="block-fraud", action="block") >= 1
    assert _sample(text, "auditor_rule_matches_total", policy="block-fraud", rule="fraud-any", severity="high", action="block") >= 1
    for stage in ("tokenize", "forward", "encode", "evaluate"):
        assert _sample(text, "auditor_audit_stage_duration_seconds_count", stage=stage) > 0
    assert _sample(text, "auditor_audit_stage_duration_seconds_bucket", stage="forward", le="0.001") >= 0
    assert "auditor_queue_depth" in text and "auditor_batch_size_bucket" in text
    assert _sample(text, "auditor_alerts_logged_total") >= 1 and _sample(text, "auditor_ready") == 1
    assert _sample(text, "auditor_gc_frozen_objects") == 0  # an app in a process of the caller's: its heap is left alone
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/install_test_deps.sh installs the Debian prometheus package)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_request_metrics_use_route_templates_only(server: BackgroundServer) -> None:
    httpx.get(server.url + "/no/such/path/abc123")
    text = _metrics(server)
    assert "abc123" not in text
    assert _sample(text, "auditor_requests_total", route="unmatched", outcome="client_error") >= 1


def test_create_app_loads_nothing_until_started(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    app = create_app(Settings.load(flags={"data_dir": str(tmp_path)}, env={}))
    assert time.perf_counter() - t0 < 1.0
    assert app.state.auditor.runtime is None and not (tmp_path / "auditor-alerts.sqlite3").exists()


def test_a_server_that_could_not_load_counts_its_503s_as_not_ready(tmp_path: Path) -> None:
    settings = Settings.load(flags={"sae": str(tmp_path / "no-such-sae"), "data_dir": str(tmp_path)}, env={})
    with BackgroundServer(create_app(settings)) as srv:
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/healthz").status_code != 503:
            assert time.monotonic() < deadline, "loading should fail on the missing SAE"
            time.sleep(0.05)
        assert httpx.get(srv.url + "/readyz").status_code == 503
        assert _post(srv, "/v1/audit", {"text": "hi"}).status_code == 503
        text = _metrics(srv)
        assert _sample(text, "auditor_requests_total", route="/readyz", outcome="not_ready") == 1
        assert _sample(text, "auditor_requests_total", route="/v1/audit", outcome="not_ready") == 1
        assert _sample(text, "auditor_requests_total", route="/readyz", outcome="server_error") == 0
