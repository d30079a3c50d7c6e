"""A client that leaves while the proxy holds back a stream: the sidecar stops reading the
upstream (closing the connection is how an OpenAI-compatible server learns to stop generating)
and audits nothing for an answer nobody will read, in both stream modes.

The upstream is a small OpenAI-shaped server on a loopback port that streams slowly and records
whether each stream ran to its end or was cut off by the sidecar; the sidecars in front of it are
real, with the embedded model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from auditor.server.background import BackgroundServer
from tests.conftest import proxied_sidecars, sse_chunk, write_fraud_policy

pytestmark = pytest.mark.integration

WORDS = 200
DELAY_S = 0.05  # the whole stream takes 10 s
ENDED: list[str] = []  # "finished" or "cut off", one per stream the upstream served
ENDED_LOCK = threading.Lock()


def _upstream() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if not (await request.json()).get("stream"):  # a completion that takes as long as the stream
            await asyncio.sleep(WORDS * DELAY_S)
            return JSONResponse({"id": "up-1", "object": "chat.completion", "created": 1, "model": "up",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "Done."},
                                              "finish_reason": "stop"}]})

        async def events() -> AsyncIterator[bytes]:
            how = "cut off"
            try:
                for i in range(WORDS):
                    yield sse_chunk({"content": f" word{i}"})
                    await asyncio.sleep(DELAY_S)
                yield b"data: [DONE]\n\n"
                how = "finished"
            finally:
                with ENDED_LOCK:
                    ENDED.append(how)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BackgroundServer]]:
    root = tmp_path_factory.mktemp("disconnect")
    pol = root / "policies"
    pol.mkdir()
    write_fraud_policy(pol, "quiet", 1e6, scope="any", severity="high", actions="[alert, block]")
    variants: dict[str, dict[str, Any]] = {"hold": {}, "chunked": {"stream_mode": "chunked", "stream_chunk_chars": 40}}
    with proxied_sidecars(root, _upstream(), {"policies": [str(pol)]}, variants) as started:
        yield started


def _sum(server: BackgroundServer, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _verdicts(server: BackgroundServer) -> float:
    return _sum(server, "auditor_verdicts_total")


@pytest.mark.parametrize("mode", ["hold", "chunked"])
def test_a_client_that_leaves_mid_stream_stops_the_upstream_stream(servers: dict[str, BackgroundServer], mode: str) -> None:
    server = servers[mode]
    with ENDED_LOCK:
        ENDED.clear()
    verdicts = _verdicts(server)
    body = {"model": "up", "messages": [{"role": "user", "content": "Count."}], "stream": True}
    start = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as client:
        try:
            with client.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
                for _ in resp.iter_lines():  # chunked mode: read for a second, then leave
                    if time.monotonic() - start > 1.0:
                        break
        except httpx.ReadTimeout:  # hold mode sends nothing before the stream ends
            pass
    left = time.monotonic()
    while time.monotonic() - left < 5.0 and not ENDED:
        time.sleep(0.05)
    # Before: the held stream was read to its end (10 s) for a client long gone, then audited.
    assert ENDED == ["cut off"], ENDED
    if mode == "hold":
        time.sleep(0.5)
        assert _verdicts(server) - verdicts == 1  # the prompt's: no completion audited after the client left


def test_a_client_that_leaves_a_completion_is_answered_at_once_and_nothing_is_audited(
    servers: dict[str, BackgroundServer],
) -> None:
    server = servers["hold"]
    verdicts = _verdicts(server)
    gone = _sum(server, "auditor_requests_total", route="/v1/chat/completions", outcome="client_error")
    body = {"model": "up", "messages": [{"role": "user", "content": "Count."}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    left = time.monotonic()
    while time.monotonic() - left < 5.0:
        if _sum(server, "auditor_requests_total", route="/v1/chat/completions", outcome="client_error") > gone:
            break
        time.sleep(0.1)
    # Before: the sidecar waited the upstream's 10 s out, audited the completion and counted an "ok".
    assert _sum(server, "auditor_requests_total", route="/v1/chat/completions", outcome="client_error") == gone + 1
    assert _verdicts(server) - verdicts == 1  # the prompt's
