"""Webhook and Alertmanager sinks against a real loopback HTTP receiver."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from auditor.alerts import AlertmanagerSink, DeliveryError, WebhookSink

from .conftest import WebhookReceiver, free_port, make_alert

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


def test_webhook_batch(receiver: WebhookReceiver) -> None:
    alerts = [make_alert(), make_alert(severity="critical")]
    sink = WebhookSink(receiver.url, headers={"Authorization": "Bearer s3cret"})
    try:
        sink.send(alerts)
    finally:
        sink.close()
    assert len(receiver.requests) == 1
    body = receiver.requests[0]
    assert body == {"alerts": [a.model_dump(mode="json") for a in alerts]}
    assert receiver.headers[0]["Authorization"] == "Bearer s3cret"
    assert receiver.headers[0]["Content-Type"] == "application/json"


def test_webhook_one_per_request(receiver: WebhookReceiver) -> None:
    alerts = [make_alert() for _ in range(3)]
    sink = WebhookSink(receiver.url, batch=False)
    try:
        sink.send(alerts)
    finally:
        sink.close()
    assert receiver.requests == [a.model_dump(mode="json") for a in alerts]


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (502, True), (503, True), (429, True), (408, True), (400, False), (404, False), (422, False)],
)
def test_http_status_classification(receiver: WebhookReceiver, status: int, retryable: bool) -> None:
    receiver.status = status
    sink = WebhookSink(receiver.url)
    try:
        with pytest.raises(DeliveryError) as info:
            sink.send([make_alert()])
    finally:
        sink.close()
    assert info.value.retryable is retryable
    assert info.value.status == status
    assert str(status) in str(info.value)


def test_connection_refused_is_retryable() -> None:
    sink = WebhookSink(f"http://127.0.0.1:{free_port()}/hook", timeout=2.0)
    try:
        with pytest.raises(DeliveryError) as info:
            sink.send([make_alert()])
    finally:
        sink.close()
    assert info.value.retryable and info.value.status is None


def test_alertmanager_payload() -> None:
    sink = AlertmanagerSink(
        "http://am:9093/", resolve_timeout_s=120, external_url="http://auditor:8080/"
    )
    alert = make_alert(
        created_at=T0,
        labels={"team": "ts", "severity": "info", "alertname": "spoof", "bad-name": "x", "9lives": "y", "empty": ""},
        annotations={"summary": "Fraud"},
        description="scam help",
        request_id="r1",
        score=1.23456,
    )
    try:
        body = sink.payload(alert)
    finally:
        sink.close()
    assert sink.endpoint == "http://am:9093/api/v2/alerts"
    assert body["labels"] == {
        "alertname": "fraud-completion",
        "severity": "high",
        "category": "deception",
        "policy": "default",
        "team": "ts",
        "bad_name": "x",
        "_9lives": "y",
        "alert_id": alert.id,
    }
    assert body["annotations"] == {
        "summary": "Fraud",
        "description": "scam help",
        "alert_id": alert.id,
        "score": "1.235",
        "action": "alert",
        "source": "completion",
        "policy_hash": "abc123",
        "request_id": "r1",
        "text_sha256": alert.text_sha256,
    }
    assert body["startsAt"] == "2026-03-01T08:00:00.000000Z"
    assert body["endsAt"] == "2026-03-01T08:02:00.000000Z"
    assert body["generatorURL"] == f"http://auditor:8080/v1/alerts/{alert.id}"


def test_alertmanager_without_id_label() -> None:
    sink = AlertmanagerSink("http://am:9093", id_label=None)
    try:
        body = sink.payload(make_alert())
    finally:
        sink.close()
    assert set(body["labels"]) == {"alertname", "severity", "category", "policy", "team"}
    assert "generatorURL" not in body


def test_alertmanager_resends_active_until_ends(receiver: WebhookReceiver) -> None:
    now = [T0 + timedelta(seconds=10)]
    base = f"http://127.0.0.1:{receiver.port}"
    sink = AlertmanagerSink(base, resolve_timeout_s=60, resend_interval_s=5, clock=lambda: now[0])
    old = make_alert(created_at=T0 - timedelta(seconds=40))
    new = make_alert(created_at=T0)
    expired = make_alert(created_at=T0 - timedelta(seconds=300))
    try:
        sink.send([old, new])
        sink.restore([expired])  # already past endsAt: never re-sent
        assert sink.active == 2
        sink.tick()
        now[0] = T0 + timedelta(seconds=30)  # `old` ends at T0 + 20 s
        sink.tick()
        now[0] = T0 + timedelta(seconds=61)
        sink.tick()  # nothing active: no request
    finally:
        sink.close()
    assert receiver.paths == ["/api/v2/alerts"] * 3
    assert [sorted(b) for b in map(_ids, receiver.requests)] == [
        sorted([old.id, new.id]),
        sorted([old.id, new.id]),
        [new.id],
    ]
    assert sink.active == 0


def _ids(body: list[dict]) -> list[str]:
    return [a["labels"]["alert_id"] for a in body]
