"""The OpenAI-compatible proxy on real servers: the official ``openai`` SDK talks to a sidecar
that proxies to another sidecar in serve mode (its own model generates) on another loopback port.

Policies with threshold 0 fire on any in-scope token, so blocking is deterministic on the real
model: ``block-prompt`` blocks every prompt, ``block-completion`` every completion, ``quiet``
never fires. Auditor failures are real timeouts (``request_timeout_s`` far below one forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from auditor.server.app import create_app
from auditor.server.background import BackgroundServer
from auditor.pipeline import default_policy_path
from auditor.server.runtime import NO_POLICY_NOTE
from auditor.server.settings import Settings
from tests.conftest import make_random_sae, sidecars, write_fraud_policy

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 8


def _policy(folder: Path, name: str, threshold: float, scope: str) -> None:
    write_fraud_policy(folder, name, threshold, scope=scope, severity="critical", actions="[alert, block]")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BackgroundServer]]:
    root = tmp_path_factory.mktemp("proxy")
    sae = make_random_sae(root / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")
    pol = root / "policies"
    pol.mkdir()
    _policy(pol, "quiet", 1e6, "any")
    _policy(pol, "block-prompt", 0.0, "prompt")
    _policy(pol, "block-completion", 0.0, "completion")
    # The upstream: the sidecar in serve mode with its defaults (embedded model, default SAE and policy).
    upstream = BackgroundServer(create_app(Settings.load(flags={"data_dir": str(root / "up")}, env={}))).start()
    common = {"sae": str(sae), "policies": [str(pol)], "default_policy": "quiet", "upstream": upstream.url}
    variants: dict[str, dict[str, Any]] = {
        "proxy": {},
        "chunked": {"stream_mode": "chunked", "stream_chunk_chars": 6},
        "closed": {"request_timeout_s": 1e-9, "fail_mode": "closed"},
        "open": {"request_timeout_s": 1e-9, "fail_mode": "open"},
    }
    with sidecars(root, common, variants, upstream=upstream) as started:
        upstream.wait_ready()
        yield started


_CLIENTS: dict[str, openai.OpenAI] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.popitem()[1].close()


def _client(server: BackgroundServer) -> openai.OpenAI:
    """One SDK client per server for the module (closed at teardown)."""
    if server.url not in _CLIENTS:
        _CLIENTS[server.url] = openai.OpenAI(base_url=server.url + "/v1", api_key="client-key", max_retries=0, timeout=120)
    return _CLIENTS[server.url]


def _upstream_calls(servers: dict[str, BackgroundServer]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(servers["upstream"].url + "/metrics").text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "auditor_requests_total" and s.labels["route"] == "/v1/chat/completions"
    )


def test_upstream_serve_mode_reports_its_policy_state(servers: dict[str, BackgroundServer]) -> None:
    listing = httpx.get(servers["upstream"].url + "/v1/policies").json()
    if default_policy_path().is_file():
        assert listing["policies"] and listing["note"] is None
    else:
        assert listing["policies"] == [] and listing["note"] == NO_POLICY_NOTE
        audit = httpx.post(servers["upstream"].url + "/v1/audit", json={"text": "hello"}, timeout=60).json()
        assert audit["verdict"] == "allow" and audit["scores"] == {} and audit["policy"] is None


def test_chat_non_streaming_matches_the_upstream_and_carries_the_verdict(servers: dict[str, BackgroundServer]) -> None:
    direct = _client(servers["upstream"]).chat.completions.create(model="m", messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    raw = _client(servers["proxy"]).chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, max_tokens=MAX_TOKENS  # type: ignore[arg-type]
    )
    assert raw.headers["x-auditor-verdict"] == "allow" and raw.headers["x-auditor-policy"] == "quiet"
    resp = raw.parse()
    assert resp.choices[0].message.content == direct.choices[0].message.content
    assert resp.choices[0].message.content and resp.choices[0].finish_reason in ("stop", "length")
    annotation = (resp.model_extra or {})["auditor"]
    assert annotation["verdict"] == "allow" and annotation["prompt"]["policy"] == "quiet"
    assert annotation["completion"][0]["verdict"] == "allow"


def test_chat_streaming_hold_releases_the_same_text_and_a_final_annotation(servers: dict[str, BackgroundServer]) -> None:
    full = _client(servers["proxy"]).chat.completions.create(model="m", messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    with _client(servers["proxy"]).chat.completions.with_streaming_response.create(
        model="m", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True  # type: ignore[arg-type]
    ) as raw:
        # Held back and audited before the first byte, so the header has the completion's verdict too.
        assert raw.headers["x-auditor-verdict"] == "allow"
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and (chunks[-1].model_extra or {})["auditor"]["verdict"] == "allow"


def test_completions_route_streaming_and_not(servers: dict[str, BackgroundServer]) -> None:
    client = _client(servers["proxy"])
    plain = client.completions.create(model="m", prompt="The capital of France is", max_tokens=MAX_TOKENS)
    assert plain.choices[0].text and (plain.model_extra or {})["auditor"]["verdict"] == "allow"
    stream = client.completions.create(model="m", prompt="The capital of France is", max_tokens=MAX_TOKENS, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text


def test_blocked_prompt_is_never_forwarded(servers: dict[str, BackgroundServer]) -> None:
    before = _upstream_calls(servers)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            _client(servers["proxy"]).chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=stream,  # type: ignore[arg-type]
                extra_body={"auditor_policy": "block-prompt"},
            )
        error = info.value.response.json()["error"]
        assert info.value.status_code == 400 and info.value.response.headers["x-auditor-verdict"] == "block"
        assert error["type"] == "policy_violation" and error["code"] == "content_filter"
        assert "blocked by policy 'block-prompt'" in error["message"] and "block-prompt-rule (critical)" in error["message"]
    assert _upstream_calls(servers) == before


def test_blocked_completion_ends_with_content_filter(servers: dict[str, BackgroundServer]) -> None:
    client = _client(servers["proxy"])
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, max_tokens=MAX_TOKENS, extra_headers={"X-Auditor-Policy": "block-completion"}  # type: ignore[arg-type]
    )
    resp = raw.parse()
    assert raw.headers["x-auditor-verdict"] == "block"
    assert resp.choices[0].finish_reason == "content_filter" and resp.choices[0].message.content == ""
    assert (resp.model_extra or {})["auditor"]["completion"][0]["matches"][0]["rule_id"] == "block-completion-rule"

    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,  # type: ignore[arg-type]
            extra_body={"auditor_policy": "block-completion"},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["content_filter"]
    assert (chunks[-1].model_extra or {})["auditor"]["verdict"] == "block"


def test_chunked_release_streams_audited_chunks(servers: dict[str, BackgroundServer]) -> None:
    client = _client(servers["chunked"])
    full = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    blocked = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,  # type: ignore[arg-type]
            extra_body={"auditor_policy": "block-completion"},
        )
    )
    # The first audited chunk already matches, so nothing of the completion is released.
    assert "".join(c.choices[0].delta.content or "" for c in blocked if c.choices) == ""
    assert [c.choices[0].finish_reason for c in blocked if c.choices] == ["content_filter"]


def test_concurrent_chunked_streams_each_release_their_own_completion(servers: dict[str, BackgroundServer]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = _client(servers["chunked"])
    asks = [[{"role": "user", "content": q}] for q in ("Name three colours.", "Name two rivers.", "Say hello.", "Count to five.")]
    wants = [client.chat.completions.create(model="m", messages=m, max_tokens=MAX_TOKENS).choices[0].message.content for m in asks]  # type: ignore[arg-type]

    def streamed(messages: list[dict[str, str]]) -> str:
        chunks = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS, stream=True)  # type: ignore[arg-type]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    # The streams' chunks are audited in shared batches where they meet; each keeps its own text.
    with ThreadPoolExecutor(len(asks)) as pool:
        assert list(pool.map(streamed, asks)) == wants
    assert len(set(wants)) > 1


def test_fail_closed_is_an_auditor_error_not_a_policy_block(servers: dict[str, BackgroundServer]) -> None:
    before = _upstream_calls(servers)
    with pytest.raises(openai.APIStatusError) as info:
        _client(servers["closed"]).chat.completions.create(model="m", messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    assert info.value.status_code == 503
    error = info.value.response.json()["error"]
    assert error["type"] == "auditor_error" and error["code"] == "auditor_unavailable"
    assert "audit_timeout" in error["message"] and "fail_mode is closed" in error["message"]
    assert _upstream_calls(servers) == before


def test_fail_open_forwards_unaudited_and_says_so(servers: dict[str, BackgroundServer]) -> None:
    raw = _client(servers["open"]).chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, max_tokens=MAX_TOKENS  # type: ignore[arg-type]
    )
    assert raw.headers["x-auditor-verdict"] == "error"
    resp = raw.parse()
    assert resp.choices[0].message.content
    annotation = (resp.model_extra or {})["auditor"]
    assert annotation["prompt"]["fail_open"] is True and annotation["verdict"] == "error"
    metrics = httpx.get(servers["open"].url + "/metrics").text
    # Both audits (prompt and completion) failed; the request is counted once as let through.
    assert 'auditor_fail_open_total{route="/v1/chat/completions"} 1.0' in metrics
    assert 'auditor_errors_total{kind="timeout"} 2.0' in metrics


def test_serve_mode_generate_with_steering_and_compare(servers: dict[str, BackgroundServer]) -> None:
    url = servers["upstream"].url
    body = {"prompt": "The weather today is", "max_tokens": 6, "steering": [{"feature": 7, "mode": "add", "value": 80.0}], "compare": True}
    out = httpx.post(url + "/v1/generate", json=body, timeout=120).json()
    assert out["steered"] is True and out["default_text"] is not None
    assert out["text"] != out["default_text"]
    [trace] = out["feature_traces"].values()
    assert len(trace) == len(out["tokens"])
    bad = httpx.post(url + "/v1/generate", json={**body, "steering": [{"feature": 7, "mode": "twist", "value": 1}]}, timeout=60)
    assert bad.status_code == 422 and "twist" in bad.json()["error"]["message"]
    # The OpenAI route takes the same steering as an extension field.
    steered = _client(servers["upstream"]).completions.create(
        model="m", prompt="The weather today is", max_tokens=6, extra_body={"steering": body["steering"]}
    )
    assert steered.choices[0].text == out["text"]
    assert (steered.model_extra or {})["auditor"].get("steered") is True
