"""AlertsConfig validation and sink construction from configuration."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from auditor.alerts import AlertmanagerSink, AlertsConfig, WebhookSink, build_sink


def test_defaults() -> None:
    config = AlertsConfig()
    assert config.text_mode == "hash"
    assert config.sinks == [] and config.sink_names() == []


def test_sinks_parse_by_type_and_build() -> None:
    config = AlertsConfig.model_validate(
        {
            "log_path": "/tmp/x.sqlite3",
            "sinks": [
                {"type": "webhook", "url": "http://127.0.0.1:9/hook", "headers": {"Authorization": "Bearer t"}},
                {"type": "alertmanager", "url": "http://am:9093", "resolve_timeout_s": 120, "resend_interval_s": 30},
                {"type": "webhook", "name": "siem", "url": "https://siem.example/in", "batch": False},
            ],
        }
    )
    assert config.sink_names() == ["webhook", "alertmanager", "siem"]
    sinks = [build_sink(s) for s in config.sinks]
    try:
        assert isinstance(sinks[0], WebhookSink) and sinks[0].batch
        assert isinstance(sinks[1], AlertmanagerSink)
        assert sinks[1].endpoint == "http://am:9093/api/v2/alerts"
        assert sinks[1].tick_interval_s == 30 and sinks[1].active_window_s == 120
        assert isinstance(sinks[2], WebhookSink) and not sinks[2].batch and sinks[2].name == "siem"
    finally:
        for sink in sinks:
            sink.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"text_mode": "keep"}, "text_mode"),
        ({"cooldown_s": -1}, "cooldown_s"),
        ({"queue_size": 0}, "queue_size"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"retry_initial_s": 5, "retry_max_s": 1}, "retry_initial_s .* must not exceed retry_max_s"),
        ({"dedup_by": ["text"]}, "dedup_by"),
        ({"sinks": [{"type": "pager", "url": "http://x"}]}, "type"),
        ({"sinks": [{"type": "webhook", "url": "ftp://x/y"}]}, "http:// or https://"),
        ({"sinks": [{"type": "webhook", "url": "not a url"}]}, "url"),
        ({"sinks": [{"type": "webhook", "url": "http://x", "batch": True, "resend_interval_s": 3}]}, "resend"),
        (
            {"sinks": [{"type": "webhook", "url": "http://a"}, {"type": "webhook", "url": "http://b"}]},
            "both named 'webhook'",
        ),
        (
            {"sinks": [{"type": "alertmanager", "url": "http://a", "resolve_timeout_s": 10, "resend_interval_s": 10}]},
            "resend_interval_s .* must be below resolve_timeout_s",
        ),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_configs(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AlertsConfig.model_validate(data)
