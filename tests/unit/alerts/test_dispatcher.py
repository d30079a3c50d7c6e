"""AlertDispatcher with real loopback HTTP receivers: delivery, outages, overflow, restarts, cooldown."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from auditor.alerts import AlertDispatcher, AlertmanagerSink, AlertsConfig, AuditLog, WebhookSink, backoff_delay

from .conftest import WebhookReceiver, free_port, make_alert, wait_until

FAST = {"retry_initial_s": 0.01, "retry_max_s": 0.05, "max_attempts": 2}


class Recorder:
    """Collects on_delivery calls (from worker threads)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def __call__(self, sink: str, result: str) -> None:
        with self._lock:
            self.counts[(sink, result)] += 1


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "alerts.sqlite3", text_mode="store") as opened:
        yield opened


def test_deliveries_arrive(log: AuditLog, receiver: WebhookReceiver) -> None:
    recorder = Recorder()
    alerts = [make_alert() for _ in range(25)]
    with AlertDispatcher(log, [WebhookSink(receiver.url)], batch_size=7, on_delivery=recorder, **FAST) as d:
        for i in range(0, 25, 5):
            d.submit(alerts[i : i + 5])
        assert wait_until(lambda: len(receiver.received_ids()) >= 25)
        assert wait_until(lambda: d.stats().sinks["webhook"].pending == 0)
        stats = d.stats()
    assert sorted(receiver.received_ids()) == sorted(a.id for a in alerts)
    assert all(len(ids) <= 7 for ids in map(lambda b: b["alerts"], receiver.requests))
    assert {log.delivery_state(a.id, "webhook") for a in alerts} == {"delivered"}
    assert stats.submitted == stats.logged == 25
    assert stats.sinks["webhook"].delivered == 25
    assert recorder.counts == Counter({("webhook", "success"): 25})


def test_submit_does_not_wait_on_a_hung_sink(log: AuditLog) -> None:
    # A listener that never accepts: connections open, requests hang until the client timeout.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    url = f"http://127.0.0.1:{hung.getsockname()[1]}/hook"
    d = AlertDispatcher(log, [WebhookSink(url, timeout=1.0)], **FAST)
    d.start()
    try:
        time.sleep(0.05)
        started = time.monotonic()
        for _ in range(20):
            d.submit([make_alert()])
        elapsed = time.monotonic() - started
        # A submit that waited on the sink would take >= 1 s each (20 s in all).
        assert elapsed < 2.0, f"submit blocked for {elapsed:.2f} s"
        assert log.count() == 20
    finally:
        assert d.close(timeout=0.2) is False
        hung.close()
    assert log.pending_count("webhook") == 20


def test_outage_then_recovery_on_same_port(log: AuditLog) -> None:
    receiver = WebhookReceiver(port=free_port())  # nothing listens yet: connection refused
    recorder = Recorder()
    d = AlertDispatcher(log, [WebhookSink(receiver.url, timeout=2.0)], on_delivery=recorder, **FAST)
    d.start()
    sent = []
    try:
        for _ in range(6):
            batch = [make_alert() for _ in range(5)]
            d.submit(batch)
            sent.extend(batch)
            time.sleep(0.03)
        assert wait_until(lambda: d.stats().sinks["webhook"].down)
        assert wait_until(lambda: recorder.counts[("webhook", "failure")] > 0)
        assert log.pending_count("webhook") == 30
        receiver.start()
        assert wait_until(lambda: set(receiver.received_ids()) >= {a.id for a in sent})
        assert wait_until(lambda: log.pending_count("webhook") == 0)
        assert not d.stats().sinks["webhook"].down
        assert d.close(timeout=5) is True
    finally:
        d.close(timeout=1)
        receiver.stop()
    assert recorder.counts[("webhook", "success")] == 30
    assert recorder.counts[("webhook", "retry")] > 0


def test_queue_overflow_is_delivered_after_recovery(log: AuditLog) -> None:
    receiver = WebhookReceiver(port=free_port())
    d = AlertDispatcher(log, [WebhookSink(receiver.url, timeout=2.0)], queue_size=3, batch_size=4, **FAST)
    d.start()
    sent = []
    try:
        for _ in range(20):
            batch = [make_alert() for _ in range(3)]
            sent.extend(d.submit(batch))
        assert d.stats().sinks["webhook"].overflowed > 0
        assert d.stats().sinks["webhook"].queued <= 3
        receiver.start()
        assert wait_until(lambda: set(receiver.received_ids()) >= {a.id for a in sent}, timeout=20)
        assert wait_until(lambda: log.pending_count("webhook") == 0)
    finally:
        d.close(timeout=5)
        receiver.stop()
    assert len(sent) == 60


def test_restart_requeues_undelivered(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite3"
    receiver = WebhookReceiver(port=free_port())
    with AuditLog(path, text_mode="store") as log:
        d = AlertDispatcher(log, [WebhookSink(receiver.url, timeout=2.0)], **FAST)
        d.start()
        sent = d.submit([make_alert() for _ in range(8)])
        assert d.close(timeout=0.5) is False  # the sink is down: nothing drained
    assert receiver.received_ids() == []
    receiver.start()
    try:
        with AuditLog(path, text_mode="store") as log, AlertDispatcher(
            log, [WebhookSink(receiver.url)], **FAST
        ) as d2:
            assert wait_until(lambda: set(receiver.received_ids()) >= {a.id for a in sent})
            assert wait_until(lambda: log.pending_count("webhook") == 0)
            assert d2.stats().sinks["webhook"].delivered == 8
    finally:
        receiver.stop()


def test_rejected_alert_is_dropped_and_the_rest_delivered(log: AuditLog, receiver: WebhookReceiver) -> None:
    recorder = Recorder()
    alerts = [make_alert() for _ in range(5)]
    receiver.reject_ids = {alerts[2].id}
    d = AlertDispatcher(log, [WebhookSink(receiver.url)], on_delivery=recorder, **FAST)
    d.submit(alerts)  # before start: all five go out as one batch
    d.start()
    try:
        assert wait_until(lambda: log.delivery_state(alerts[2].id, "webhook") == "dropped")
        assert wait_until(lambda: log.pending_count("webhook") == 0)
    finally:
        assert d.close(timeout=5) is True
    assert sorted(receiver.received_ids()) == sorted(a.id for i, a in enumerate(alerts) if i != 2)
    assert recorder.counts == Counter({("webhook", "success"): 4, ("webhook", "dropped"): 1})
    assert log.get(alerts[2].id) is not None  # still audited
    assert log.requeue("webhook") == 1


def test_cooldown_suppresses_duplicates(log: AuditLog) -> None:
    now = [1000.0]
    d = AlertDispatcher(log, [], cooldown_s=60, dedup_by=["request_id"], clock=lambda: now[0])
    first = d.submit([make_alert(request_id="r1"), make_alert(request_id="r1")])
    assert len(first) == 1
    assert d.submit([make_alert(request_id="r1")]) == []
    assert len(d.submit([make_alert(request_id="r2")])) == 1  # other dedup key
    assert len(d.submit([make_alert(request_id="r1", rule_id="other")])) == 1  # other rule
    now[0] += 59.9
    assert d.submit([make_alert(request_id="r1")]) == []
    now[0] += 0.2  # 60.1 s after the one that was emitted
    assert len(d.submit([make_alert(request_id="r1")])) == 1
    stats = d.stats()
    assert (stats.submitted, stats.logged, stats.suppressed) == (7, 4, 3)
    assert stats.suppressed_by_rule == {"fraud-completion": 3}
    assert log.count() == 4
    d.close()


@pytest.mark.parametrize(
    ("dedup_by", "second", "suppressed"),
    [
        (["request_id", "text_sha256"], {"request_id": "r1", "text": "same"}, True),
        (["request_id", "text_sha256"], {"request_id": "r1", "text": "different"}, False),
        (["labels"], {"labels": {"team": "trust-safety"}}, True),
        (["labels"], {"labels": {"team": "other"}}, False),
        (["source"], {"source": "prompt"}, False),
        ([], {"request_id": "anything"}, True),
    ],
)
def test_dedup_key_fields(log: AuditLog, dedup_by: list, second: dict, suppressed: bool) -> None:
    d = AlertDispatcher(log, [], cooldown_s=60, dedup_by=dedup_by)
    d.submit([make_alert(request_id="r1", text="same")])
    assert (d.submit([make_alert(**second)]) == []) is suppressed
    d.close()


def test_no_cooldown_keeps_everything(log: AuditLog) -> None:
    d = AlertDispatcher(log, [], cooldown_s=0)
    assert len(d.submit([make_alert(request_id="r1") for _ in range(4)])) == 4
    d.close()


def test_close_drains_and_refuses_more(log: AuditLog, receiver: WebhookReceiver) -> None:
    d = AlertDispatcher(log, [WebhookSink(receiver.url)], **FAST)
    d.start()
    sent = d.submit([make_alert() for _ in range(40)])
    assert d.close(timeout=10) is True
    assert sorted(receiver.received_ids()) == sorted(a.id for a in sent)
    with pytest.raises(RuntimeError, match="after close"):
        d.submit([make_alert()])


def test_text_mode_applies_to_sinks(tmp_path: Path, receiver: WebhookReceiver) -> None:
    config = AlertsConfig(
        log_path=tmp_path / "alerts.sqlite3",
        text_mode="hash",
        cooldown_s=0,
        sinks=[{"type": "webhook", "url": receiver.url}],
        **FAST,
    )
    alert = make_alert(text="private words")
    with AlertDispatcher.from_config(config) as d:
        (stored,) = d.submit([alert])
    assert stored.text is None and stored.text_sha256 == alert.text_sha256
    (body,) = receiver.requests
    assert body["alerts"][0]["text"] is None
    assert body["alerts"][0]["text_sha256"] == alert.text_sha256


def test_hook_errors_do_not_stop_delivery(log: AuditLog, receiver: WebhookReceiver, caplog) -> None:
    def broken(sink: str, result: str) -> None:
        raise ValueError("metrics backend down")

    with AlertDispatcher(log, [WebhookSink(receiver.url)], on_delivery=broken, **FAST) as d:
        sent = d.submit([make_alert() for _ in range(3)])
        assert wait_until(lambda: len(receiver.received_ids()) == 3)
        assert wait_until(lambda: log.pending_count("webhook") == 0)
    assert sorted(receiver.received_ids()) == sorted(a.id for a in sent)
    assert "on_delivery hook failed" in caplog.text


def test_duplicate_sink_names_rejected(log: AuditLog) -> None:
    sinks = [WebhookSink("http://127.0.0.1:1/a"), WebhookSink("http://127.0.0.1:1/b")]
    with pytest.raises(ValueError, match="sink names must be unique; repeated: webhook"):
        AlertDispatcher(log, sinks)
    for sink in sinks:
        sink.close()


@pytest.mark.parametrize(("initial", "cap"), [(0.5, 30.0), (0.01, 0.05), (1.0, 1.0)])
def test_backoff_doubles_with_jitter_and_is_capped(initial: float, cap: float) -> None:
    rng = random.Random(7)
    for failures in range(1, 80):
        ceiling = min(cap, initial * 2 ** (failures - 1))
        delays = [backoff_delay(failures, initial, cap, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > 0  # jittered, not a fixed schedule


def test_alertmanager_active_set_restored_on_start(tmp_path: Path, receiver: WebhookReceiver) -> None:
    # The loopback receiver stands in for Alertmanager's POST /api/v2/alerts.
    base = f"http://127.0.0.1:{receiver.port}"
    path = tmp_path / "alerts.sqlite3"
    with AuditLog(path) as log:
        with AlertDispatcher(log, [AlertmanagerSink(base, resolve_timeout_s=300, resend_interval_s=60)]) as d:
            sent = d.submit([make_alert(), make_alert()])
        assert sorted(receiver.received_ids()) == sorted(a.id for a in sent)
        stale = make_alert(created_at=datetime.now(timezone.utc) - timedelta(seconds=400))
        # Delivered, but older than resolve_timeout_s: resolved at Alertmanager, never re-sent.
        log.append([stale], sinks=["alertmanager"])
        log.mark_delivered("alertmanager", [stale.id])
        receiver.requests.clear()
        # A new process: nothing submitted, yet the still-active alerts are re-sent.
        sink = AlertmanagerSink(base, resolve_timeout_s=300, resend_interval_s=0.2)
        with AlertDispatcher(log, [sink]):
            assert sink.active == 2
            assert wait_until(lambda: len(receiver.requests) >= 2)
    assert set(receiver.received_ids()) == {a.id for a in sent}


def test_retention_runs_at_start_and_then_every_interval(log: AuditLog) -> None:
    now = datetime.now(timezone.utc)
    log.append([make_alert(created_at=now - timedelta(days=40)), make_alert(created_at=now - timedelta(days=10))])
    clock = [0.0]
    d = AlertDispatcher(log, [], retention_days=30, max_alerts=3, prune_interval_s=600, clock=lambda: clock[0])
    d.start()
    assert log.count() == 1  # the 40-day-old alert went at start
    for _ in range(4):
        d.submit([make_alert(created_at=now)])
    assert log.count() == 5  # within the interval: no pruning yet
    clock[0] += 601
    d.submit([make_alert(created_at=now)])
    assert log.count() == 3  # max_alerts keeps the newest three
    assert d.stats().pruned == 1 + 3
    d.close()


def test_retention_is_off_by_default(log: AuditLog) -> None:
    log.append([make_alert(created_at=datetime(2000, 1, 1, tzinfo=timezone.utc))])
    d = AlertDispatcher(log, [])
    d.start()
    assert d.prune() == 0 and log.count() == 1
    d.close()


def test_retention_settings_come_from_the_config(tmp_path: Path) -> None:
    cfg = AlertsConfig(log_path=tmp_path / "a.sqlite3", retention_days=7, max_alerts=100, prune_interval_s=60)
    d = AlertDispatcher.from_config(cfg)
    assert (d.retention_days, d.max_alerts, d.prune_interval_s) == (7, 100, 60)
    d.close()
    with pytest.raises(ValueError, match="retention_days"):
        AlertsConfig(retention_days=0)
