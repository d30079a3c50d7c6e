"""Alert sinks: where alerts go besides the audit log.

A sink's :meth:`Sink.send` either returns (the receiver accepted the whole
batch) or raises :class:`DeliveryError`, whose ``retryable`` flag tells the
dispatcher whether trying again can help (connection refused, timeout, 5xx,
408, 429) or not (any other 4xx: the receiver rejects the payload itself).
Each sink is driven by one dispatcher worker thread and is not thread-safe.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from auditor.alerts.config import AlertmanagerSinkConfig, SinkConfig, WebhookSinkConfig
from auditor.alerts.model import Alert

__all__ = [
    "AlertmanagerSink",
    "DeliveryError",
    "Sink",
    "WebhookSink",
    "build_sink",
]

_RETRYABLE_STATUS = frozenset({408, 425, 429})
_RESEND_CHUNK = 500
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class DeliveryError(Exception):
    """A sink could not deliver a batch.

    ``retryable`` is False when the receiver rejected the payload itself (so the
    same request would fail again); ``status`` is the HTTP status, if any.
    """

    def __init__(self, sink: str, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(f"{sink}: {message}")
        self.sink = sink
        self.retryable = retryable
        self.status = status


class Sink(ABC):
    """Base class of alert sinks.

    Subclasses implement :meth:`send`. A sink that must repeat itself (like
    Alertmanager's re-send of active alerts) sets ``tick_interval_s`` and
    implements :meth:`tick`; the dispatcher calls it from the sink's worker.
    """

    name: str
    tick_interval_s: float | None = None
    """Seconds between :meth:`tick` calls; None: the sink needs none."""
    active_window_s: float | None = None
    """How far back delivered alerts still matter to the sink (restored via :meth:`restore` on start)."""

    @abstractmethod
    def send(self, alerts: Sequence[Alert]) -> None:
        """Deliver ``alerts`` or raise :class:`DeliveryError`."""

    def tick(self) -> None:
        """Periodic work (may raise :class:`DeliveryError`; the next tick tries again)."""

    def restore(self, alerts: Sequence[Alert]) -> None:
        """Learn alerts delivered before a restart (within ``active_window_s``)."""

    def close(self) -> None:
        """Release connections."""


class _HttpSink(Sink):
    def __init__(
        self,
        name: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.url = url
        self._client = httpx.Client(headers={"User-Agent": "sae-auditor", **(headers or {})}, timeout=timeout)

    def _post(self, url: str, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        try:
            response = self._client.post(url, content=body, headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            # Connection refused, timeouts, protocol errors: the receiver may come back.
            raise DeliveryError(self.name, f"POST {url} failed: {exc!r}", retryable=True) from exc
        if response.is_success:
            return
        status = response.status_code
        retryable = status >= 500 or status in _RETRYABLE_STATUS
        raise DeliveryError(
            self.name,
            f"POST {url} answered {status}: {response.text[:300]}",
            retryable=retryable,
            status=status,
        )

    def close(self) -> None:
        self._client.close()


class WebhookSink(_HttpSink):
    """POST alerts as JSON to ``url``.

    With ``batch=True`` (default) one request per batch carries
    ``{"alerts": [<alert>, ...]}``; with ``batch=False`` each alert is POSTed
    alone as the alert object. Alert objects are :class:`Alert` in JSON form.

    Example::

        sink = WebhookSink("http://127.0.0.1:8080/hook", headers={"Authorization": "Bearer x"})
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        *,
        name: str = "webhook",
        batch: bool = True,
    ) -> None:
        super().__init__(name, url, headers=headers, timeout=timeout)
        self.batch = batch

    def send(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        if self.batch:
            self._post(self.url, {"alerts": [a.model_dump(mode="json") for a in alerts]})
            return
        for alert in alerts:
            # A failure part-way re-sends the earlier ones too: at-least-once delivery.
            self._post(self.url, alert.model_dump(mode="json"))


def _rfc3339(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _label_name(key: str) -> str:
    # Alertmanager rejects label names outside [a-zA-Z_][a-zA-Z0-9_]*.
    if _LABEL_NAME.match(key):
        return key
    cleaned = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    return cleaned if _LABEL_NAME.match(cleaned) else f"_{cleaned}"


class AlertmanagerSink(_HttpSink):
    """Push alerts to Prometheus Alertmanager through its v2 API.

    Each alert becomes ``{labels, annotations, startsAt, endsAt, generatorURL}``
    with labels ``alertname`` (the rule id), ``severity``, ``category``,
    ``policy``, the rule's labels, and ``id_label`` (the alert id; None to let
    events of one rule collapse into one Alertmanager alert). ``endsAt`` is
    ``created_at + resolve_timeout_s``; until then the sink re-sends the alert
    every ``resend_interval_s`` (Alertmanager keeps alerts in memory only and
    expects clients to repeat active alerts).

    Example::

        sink = AlertmanagerSink("http://127.0.0.1:9093", resolve_timeout_s=300)
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        *,
        name: str = "alertmanager",
        resolve_timeout_s: float = 300.0,
        resend_interval_s: float = 60.0,
        external_url: str | None = None,
        id_label: str | None = "alert_id",
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__(name, url, headers=headers, timeout=timeout)
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.resolve_timeout = timedelta(seconds=resolve_timeout_s)
        self.tick_interval_s = resend_interval_s
        self.active_window_s = resolve_timeout_s
        self.external_url = external_url.rstrip("/") if external_url else None
        self.id_label = id_label
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        # alert id -> (endsAt, payload): what `tick` re-sends until it expires.
        self._active: dict[str, tuple[datetime, dict[str, Any]]] = {}

    def payload(self, alert: Alert) -> dict[str, Any]:
        """The Alertmanager ``postableAlert`` object for ``alert``."""
        labels = {_label_name(k): v for k, v in alert.labels.items() if v != ""}
        # Reserved labels last: a rule label cannot masquerade as another rule or severity.
        labels.update(
            alertname=alert.rule_id,
            severity=alert.severity,
            category=alert.category,
            policy=alert.policy_name,
        )
        if self.id_label:
            labels[_label_name(self.id_label)] = alert.id
        annotations = {k: v for k, v in alert.annotations.items() if v != ""}
        if alert.description:
            annotations.setdefault("description", alert.description)
        annotations.update(
            alert_id=alert.id,
            score=f"{alert.score:.4g}",
            action=alert.action,
            source=alert.source,
            policy_hash=alert.policy_hash,
        )
        if alert.request_id:
            annotations["request_id"] = alert.request_id
        if alert.text_sha256:
            annotations["text_sha256"] = alert.text_sha256
        body: dict[str, Any] = {
            "labels": labels,
            "annotations": annotations,
            "startsAt": _rfc3339(alert.created_at),
            "endsAt": _rfc3339(alert.created_at + self.resolve_timeout),
        }
        if self.external_url:
            body["generatorURL"] = f"{self.external_url}/v1/alerts/{alert.id}"
        return body

    def send(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        payloads = [(a, self.payload(a)) for a in alerts]
        self._post(self.endpoint, [p for _, p in payloads])
        self._remember(payloads)

    def restore(self, alerts: Sequence[Alert]) -> None:
        self._remember([(a, self.payload(a)) for a in alerts])

    def _remember(self, payloads: Sequence[tuple[Alert, dict[str, Any]]]) -> None:
        now = self._clock()
        for alert, body in payloads:
            ends = alert.created_at + self.resolve_timeout
            if ends > now:
                self._active[alert.id] = (ends, body)

    @property
    def active(self) -> int:
        """How many delivered alerts are still active (and re-sent)."""
        return len(self._active)

    def tick(self) -> None:
        """Re-send every active alert in one request; forget the ones past ``endsAt``."""
        now = self._clock()
        self._active = {k: v for k, v in self._active.items() if v[0] > now}
        bodies = [body for _, body in self._active.values()]
        for i in range(0, len(bodies), _RESEND_CHUNK):
            self._post(self.endpoint, bodies[i : i + _RESEND_CHUNK])


def build_sink(config: SinkConfig) -> Sink:
    """The sink a :class:`~auditor.alerts.config.SinkConfig` describes."""
    name = config.name or config.type
    if isinstance(config, WebhookSinkConfig):
        return WebhookSink(config.url, config.headers, config.timeout_s, name=name, batch=config.batch)
    if isinstance(config, AlertmanagerSinkConfig):
        return AlertmanagerSink(
            config.url,
            config.headers,
            config.timeout_s,
            name=name,
            resolve_timeout_s=config.resolve_timeout_s,
            resend_interval_s=config.resend_interval_s,
            external_url=config.external_url,
            id_label=config.id_label,
        )
    raise TypeError(f"no sink for configuration {type(config).__name__}")
