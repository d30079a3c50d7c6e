"""A policy reload while the upstream is still answering: the proxied request keeps the policy
version that audited its prompt, for its completion too (held, chunked and not streamed).

The upstream is a small OpenAI-shaped server on a loopback port that waits, once a request has
arrived, until the test has reloaded the sidecar's policies; the sidecars in front of it are real,
with the embedded model. ``pinned`` never fires (threshold 1e6); the reload either removes it or
rewrites it to block every completion (threshold 0), so a completion audited by anything but the
version that audited the prompt shows.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.conftest import proxied_sidecars, sse_chunk, write_fraud_policy

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Summarise the plan."}]
ANSWER = "The plan is simple: we meet at noon, review the notes and ship the release on Friday."

ARRIVED = threading.Event()
GATE = threading.Event()


def _upstream() -> FastAPI:
    """Answers once the test opens ``GATE`` (``ARRIVED`` says a request is waiting)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        ARRIVED.set()
        await asyncio.to_thread(GATE.wait, 60)
        if not body.get("stream"):
            return JSONResponse({"id": "up-1", "object": "chat.completion", "created": 1, "model": "up",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                              "finish_reason": "stop"}]})
        words = ANSWER.split(" ")
        pieces = [sse_chunk({"role": "assistant", "content": ""})]
        pieces += [sse_chunk({"content": (" " if i else "") + w}) for i, w in enumerate(words)]
        pieces += [sse_chunk({}, "stop"), b"data: [DONE]\n\n"]
        return StreamingResponse(iter(pieces), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("reload-inflight")
    folders = {}
    for name in ("hold", "chunked"):
        folders[name] = root / f"policies-{name}"
        folders[name].mkdir()
        write_fraud_policy(folders[name], "quiet", 1e6, scope="any", severity="high", actions="[alert, block]")
    variants = {
        "hold": {"policies": [str(folders["hold"])]},
        "chunked": {"policies": [str(folders["chunked"])], "stream_mode": "chunked", "stream_chunk_chars": 24},
    }
    with proxied_sidecars(root, _upstream(), {"default_policy": "quiet"}, variants) as started:
        yield {"servers": started, "folders": folders}


def _pinned(folder: Path, threshold: float) -> None:
    write_fraud_policy(folder, "pinned", threshold, scope="completion", severity="high", actions="[alert, block]")


def _call(url: str, stream: bool) -> tuple[int, str, dict[str, Any] | None, str]:
    """Status, body, the ``auditor`` annotation (a stream's final chunk) and the completion's
    text of one proxied chat."""
    body = {"model": "up", "messages": MESSAGES, "stream": stream, "auditor_policy": "pinned"}
    with httpx.Client(timeout=120) as client:
        resp = client.post(url + "/v1/chat/completions", json=body)
    if resp.status_code != 200:
        return resp.status_code, resp.text, None, ""
    if not stream:
        data = resp.json()
        return 200, resp.text, data["auditor"], data["choices"][0]["message"]["content"]
    events = [json.loads(line[5:]) for line in resp.text.splitlines() if line.startswith("data:") and "[DONE]" not in line]
    annotations = [e["auditor"] for e in events if "auditor" in e]
    content = "".join(c.get("delta", {}).get("content") or "" for e in events for c in e.get("choices") or [])
    return 200, resp.text, annotations[-1] if annotations else None, content


@pytest.mark.parametrize(
    ("server", "stream"), [("hold", False), ("hold", True), ("chunked", True)], ids=["non-stream", "hold", "chunked"]
)
@pytest.mark.parametrize("change", ["removed", "now-blocking"])
def test_a_reload_during_the_upstream_call_does_not_change_the_calls_policy(
    servers: dict[str, Any], server: str, stream: bool, change: str
) -> None:
    url, folder = servers["servers"][server].url, servers["folders"][server]
    _pinned(folder, 1e6)
    assert httpx.post(url + "/v1/policies/reload").json()["ok"]
    ARRIVED.clear()
    GATE.clear()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_call, url, stream)
        try:
            assert ARRIVED.wait(60), "the request never reached the upstream"
            if change == "removed":
                (folder / "pinned.yaml").unlink()
            else:
                _pinned(folder, 0.0)
            reload = httpx.post(url + "/v1/policies/reload").json()
            assert reload["ok"] and ("pinned" in reload["policies"]) == (change != "removed")
        finally:
            GATE.set()
        status, text, annotation, content = answer.result(120)
    # Before: 404 "unknown policy 'pinned'" after the upstream had answered (held and not
    # streamed), a stream cut off after its headers (chunked), or a completion blocked by a
    # policy version that never saw the prompt.
    assert status == 200, text
    assert annotation is not None, text
    assert annotation["prompt"]["policy"] == "pinned" and annotation["completion"][0]["policy"] == "pinned"
    assert annotation["verdict"] == "allow" and annotation["completion"][0]["verdict"] == "allow", annotation
    assert content == ANSWER
