"""Alerts: the durable audit log, the sinks (webhook, Alertmanager) and the dispatcher between them.

Nothing here imports FastAPI or prometheus-client; metrics attach through
``AlertDispatcher(on_delivery=...)`` and :meth:`AlertDispatcher.stats`.
"""

from __future__ import annotations

from auditor.alerts.config import (
    AlertmanagerSinkConfig,
    AlertsConfig,
    SinkConfig,
    TextMode,
    WebhookSinkConfig,
    load_alerts_config,
)
from auditor.alerts.dispatcher import AlertDispatcher, DeliveryResult, DispatcherStats, SinkStats, backoff_delay
from auditor.alerts.log import SCHEMA_VERSION, AuditLog, apply_text_mode
from auditor.alerts.model import (
    SEVERITIES,
    Alert,
    AlertFeature,
    Severity,
    Source,
    alerts_from_verdict,
    severity_rank,
    text_sha256,
)
from auditor.alerts.sinks import AlertmanagerSink, DeliveryError, Sink, WebhookSink, build_sink

__all__ = [
    "SCHEMA_VERSION",
    "SEVERITIES",
    "Alert",
    "AlertDispatcher",
    "AlertFeature",
    "AlertmanagerSink",
    "AlertmanagerSinkConfig",
    "AlertsConfig",
    "AuditLog",
    "DeliveryError",
    "DeliveryResult",
    "DispatcherStats",
    "Severity",
    "Sink",
    "SinkConfig",
    "SinkStats",
    "Source",
    "TextMode",
    "WebhookSink",
    "WebhookSinkConfig",
    "alerts_from_verdict",
    "apply_text_mode",
    "backoff_delay",
    "build_sink",
    "load_alerts_config",
    "severity_rank",
    "text_sha256",
]
