"""Shared pieces for the alert tests: an alert factory and a real loopback webhook receiver."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from auditor.alerts import Alert


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx honours proxy variables; the receivers here are on loopback.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def make_alert(**overrides: Any) -> Alert:
    fields: dict[str, Any] = {
        "rule_id": "fraud-completion",
        "severity": "high",
        "category": "deception",
        "policy_name": "default",
        "policy_hash": "abc123",
        "action": "alert",
        "score": 1.5,
        "labels": {"team": "trust-safety"},
        "annotations": {"summary": "Fraud assistance"},
        "text": "send the fee to claim your prize",
        "source": "completion",
    }
    fields.update(overrides)
    return Alert(**fields)


@pytest.fixture
def alert_factory() -> Callable[..., Alert]:
    return make_alert


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def ids_in(body: Any) -> list[str]:
    """Alert ids in a request body: a webhook batch, one webhook alert, or an Alertmanager array."""
    if isinstance(body, list):
        return [a["annotations"]["alert_id"] for a in body]
    if "alerts" in body:
        return [a["id"] for a in body["alerts"]]
    return [body["id"]]


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 that records the alert ids POSTed to it.

    ``status`` is the answer to every request; ``reject_ids`` makes a request
    that contains one of those ids answer 400. It can be stopped and started
    again on the same port.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.status = 200
        self.reject_ids: set[str] = set()
        self.requests: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def received_ids(self) -> list[str]:
        """Ids in every accepted request, in arrival order (repeats kept)."""
        with self._lock:
            return [i for body in self.requests for i in ids_in(body)]

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                status = receiver.status
                if any(i in receiver.reject_ids for i in ids_in(body)):
                    status = 400
                if status == 200:
                    with receiver._lock:
                        receiver.requests.append(body)
                        receiver.headers.append(dict(self.headers))
                        receiver.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    rec = WebhookReceiver()
    rec.start()
    yield rec
    rec.stop()
