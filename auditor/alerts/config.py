"""Configuration of the audit log, the alert sinks and the dispatcher between them.

The model is the on-disk format (the ``alerts:`` section of the sidecar
configuration) and validates itself; every field has a docstring.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from auditor.errors import ConfigError

__all__ = [
    "AlertmanagerSinkConfig",
    "AlertsConfig",
    "DedupField",
    "SinkConfig",
    "TextMode",
    "WebhookSinkConfig",
    "load_alerts_config",
]

TextMode = Literal["store", "hash", "drop"]
DedupField = Literal["request_id", "text_sha256", "source", "policy_name", "category", "labels"]


def _check_http_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r} must be an http:// or https:// URL with a host")
    return value


class _SinkBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    """Sink name: the key of its delivery records in the audit log and its metrics label.
    Defaults to the type; required when two sinks have the same type. Renaming a sink
    orphans its undelivered records, so keep names stable."""
    url: str
    """Base URL of the receiver (http or https)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra HTTP headers on every request (e.g. ``Authorization``)."""
    timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of one HTTP request, in seconds."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_http_url(value)


class WebhookSinkConfig(_SinkBase):
    """POST alerts as JSON to any HTTP endpoint."""

    type: Literal["webhook"] = "webhook"
    """Sink type."""
    batch: bool = True
    """True: one POST ``{"alerts": [...]}`` per batch; False: one POST per alert (the alert object)."""


class AlertmanagerSinkConfig(_SinkBase):
    """Push alerts to a Prometheus Alertmanager (``POST {url}/api/v2/alerts``)."""

    type: Literal["alertmanager"] = "alertmanager"
    """Sink type."""
    resolve_timeout_s: float = Field(default=300.0, gt=0)
    """How long an alert stays active: ``endsAt = created_at + resolve_timeout_s``."""
    resend_interval_s: float = Field(default=60.0, gt=0)
    """Active alerts are re-sent this often, so an Alertmanager that restarted
    (it keeps alerts in memory only) learns them again. Keep it well below
    ``resolve_timeout_s``."""
    external_url: str | None = None
    """Where this auditor is reachable; ``generatorURL`` becomes ``{external_url}/v1/alerts/{id}``."""
    id_label: str | None = "alert_id"
    """Label carrying the alert id, so each audited event is its own Alertmanager alert
    (Alertmanager groups them for notification). None: events of one rule with equal
    labels collapse into one Alertmanager alert."""

    @field_validator("external_url")
    @classmethod
    def _external(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)

    @model_validator(mode="after")
    def _intervals(self) -> AlertmanagerSinkConfig:
        if self.resend_interval_s >= self.resolve_timeout_s:
            raise ValueError(
                f"resend_interval_s ({self.resend_interval_s}) must be below resolve_timeout_s "
                f"({self.resolve_timeout_s}), or alerts resolve between re-sends"
            )
        return self


SinkConfig = Annotated[WebhookSinkConfig | AlertmanagerSinkConfig, Field(discriminator="type")]


class AlertsConfig(BaseModel):
    """Audit log, sinks and delivery policy.

    Example::

        AlertsConfig(log_path="alerts.sqlite3", text_mode="hash",
                     sinks=[{"type": "alertmanager", "url": "http://alertmanager:9093"}])
    """

    model_config = ConfigDict(extra="forbid")

    log_path: Path = Path("auditor-alerts.sqlite3")
    """SQLite file of the audit log (created on first use)."""
    text_mode: TextMode = "hash"
    """What the log keeps of the audited text: ``store`` the text and its SHA-256,
    ``hash`` only the SHA-256, ``drop`` neither. Sinks receive what the log keeps."""
    cooldown_s: float = Field(default=60.0, ge=0)
    """Alerts with the same rule and dedup key within this many seconds of the last
    one emitted are suppressed (counted, not logged). 0 disables deduplication."""
    dedup_by: list[DedupField] = Field(default_factory=lambda: ["request_id", "text_sha256"])
    """Alert fields that, with the rule id, form the dedup key."""
    sinks: list[SinkConfig] = Field(default_factory=list)
    """Where alerts are delivered, besides the audit log."""
    queue_size: int = Field(default=1000, ge=1)
    """In-memory queue per sink. Overflow is not lost: it stays undelivered in the
    log and is re-read from there when the sink catches up."""
    batch_size: int = Field(default=100, ge=1)
    """Most alerts sent in one request."""
    max_attempts: int = Field(default=5, ge=1)
    """Attempts per batch before the sink counts as down (its alerts then wait in the log)."""
    retry_initial_s: float = Field(default=0.5, gt=0)
    """First retry delay; doubles per failed attempt, with jitter."""
    retry_max_s: float = Field(default=30.0, gt=0)
    """Cap of the retry delay (also the probe interval while a sink is down)."""
    retention_days: float | None = Field(default=None, gt=0)
    """Delete alerts older than this many days (checked at start and every
    ``prune_interval_s``); None keeps them forever. Alerts still pending delivery stay."""
    max_alerts: int | None = Field(default=None, ge=1)
    """Keep at most this many alerts (the newest); None for no cap. Pending ones stay."""
    prune_interval_s: float = Field(default=3600.0, gt=0)
    """How often retention runs while alerts are being submitted."""

    @model_validator(mode="after")
    def _check(self) -> AlertsConfig:
        if self.retry_initial_s > self.retry_max_s:
            raise ValueError(
                f"retry_initial_s ({self.retry_initial_s}) must not exceed retry_max_s ({self.retry_max_s})"
            )
        seen: dict[str, int] = {}
        for i, sink in enumerate(self.sinks):
            name = sink.name or sink.type
            if name in seen:
                raise ValueError(
                    f"sinks[{seen[name]}] and sinks[{i}] are both named {name!r}; give each a distinct `name`"
                )
            seen[name] = i
        return self

    def sink_names(self) -> list[str]:
        """Names of the configured sinks, in order (``name`` or else the type)."""
        return [sink.name or sink.type for sink in self.sinks]


class _AlertsFile(BaseModel):
    """An alerts configuration file with its settings under ``alerts:``, as in the sidecar's configuration."""

    model_config = ConfigDict(extra="forbid")

    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    """The alert settings."""


def load_alerts_config(path: str | os.PathLike[str]) -> AlertsConfig:
    """Read an alerts configuration file: the settings under ``alerts:`` (the sidecar's layout) or at the top.

    The one reader of such files (``auditor audit --alerts-config``). It reads YAML as
    policies and libraries do (control characters, alias bombs and absurd nesting are
    refused) and reports every problem, unknown keys at any level included, as
    ``FILE:LINE:COLUMN: message`` in one :class:`ConfigError`.

    Example::

        cfg = load_alerts_config("alerts.yaml")     # alerts: {log_path: alerts.sqlite3, sinks: [...]}
    """
    from auditor.features.yamlsource import YamlProblem, located, parse_yaml, pydantic_problems

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (an alerts configuration is a YAML file)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read it: {exc}") from None
    data, smap, problems = parse_yaml(text)
    config: AlertsConfig | None = None
    if not problems:
        data = {} if data is None else data
        if not isinstance(data, dict):
            what = "expected a mapping of alert settings (log_path, sinks, ...), or 'alerts:' holding them"
            problems = [YamlProblem(1, 1, what)]
        else:
            wrapped = "alerts" in data
            if wrapped and data["alerts"] is None:
                data["alerts"] = {}  # an empty section: the defaults
            try:
                if wrapped:
                    config = _AlertsFile.model_validate(data).alerts
                else:
                    config = AlertsConfig.model_validate(data)
            except ValidationError as exc:
                problems = pydantic_problems(exc, data, smap, known_keys=_KNOWN_KEYS)
    if config is None:
        raise ConfigError("\n".join(located(p, prob.line, prob.column, prob.message) for prob in problems))
    return config


# Every key an alerts configuration may hold, for "did you mean" on an unknown one.
_KNOWN_KEYS = {
    "alerts",
    *AlertsConfig.model_fields,
    *WebhookSinkConfig.model_fields,
    *AlertmanagerSinkConfig.model_fields,
}
