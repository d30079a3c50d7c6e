"""The alert record: what the audit log stores and what sinks deliver.

An :class:`Alert` is one matched policy rule on one audited text. It is built
from plain fields (see :func:`alerts_from_verdict` for the bridge from the
policy engine's ``Verdict``), so this module depends on nothing but pydantic.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SEVERITIES",
    "Alert",
    "AlertFeature",
    "Severity",
    "Source",
    "alerts_from_verdict",
    "merge_spans",
    "severity_rank",
    "text_sha256",
]

Severity = Literal["info", "low", "medium", "high", "critical"]
Source = Literal["prompt", "completion", "any"]

# Ordered from least to most severe; the index is the rank used by `min_severity` filters.
SEVERITIES: tuple[Severity, ...] = ("info", "low", "medium", "high", "critical")


def severity_rank(severity: str) -> int:
    """Position of ``severity`` in :data:`SEVERITIES` (``info`` = 0 ... ``critical`` = 4)."""
    return SEVERITIES.index(severity)  # type: ignore[arg-type]


def text_sha256(text: str) -> str:
    """Hex SHA-256 of the UTF-8 bytes of ``text`` (the key that survives ``text_mode="hash"``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _new_id() -> str:
    return uuid.uuid4().hex


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AlertFeature(BaseModel):
    """One piece of evidence behind an alert: a condition leaf's value against its threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Feature, probe or anomaly name as the policy wrote it (e.g. ``deception.fraud``)."""
    value: float
    """The aggregated value the leaf measured on the scoped tokens."""
    threshold: float
    """The threshold the value was compared with."""
    agg: str | None = None
    """Aggregation over tokens (``max``, ``mean``, ``count_above``, ...), when known."""
    fired: bool = True
    """Whether this leaf's own condition held (a rule may match through some leaves only)."""


class Alert(BaseModel):
    """One matched rule on one audited text.

    Example::

        alert = Alert(rule_id="fraud-completion", severity="high", category="deception",
                      policy_name="default", policy_hash="ab12", action="block", score=1.7,
                      text="Send the fee to claim your prize", source="completion")
        alert.text_sha256  # filled from the text
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=_new_id)
    """Random identifier (uuid4 hex); the key in the audit log and at every sink."""
    created_at: datetime = Field(default_factory=_utcnow)
    """When the alert was raised; always timezone-aware UTC."""
    rule_id: str
    """The policy rule that matched (Alertmanager's ``alertname``)."""
    description: str = ""
    """The rule's description."""
    severity: Severity
    """Rule severity."""
    category: str
    """Rule category (bias, deception, dangerous, ...)."""
    policy_name: str
    """Name of the policy the rule belongs to."""
    policy_hash: str
    """Hash of the policy that raised the alert (its rules, library and probes), as
    ``GET /v1/policies`` and ``auditor policy list`` show it: which version of the rule fired."""
    action: Literal["allow", "alert", "block"]
    """The verdict's overall action for the audited text."""
    score: float
    """The rule's score (>= 1 means the condition held)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """The rule's labels (routing keys for Alertmanager)."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """The rule's annotations (summary, runbook, ...)."""
    features: list[AlertFeature] = Field(default_factory=list)
    """Evidence: the condition leaves with their values and thresholds."""
    token_spans: list[tuple[int, int]] = Field(default_factory=list)
    """Half-open token index spans where the evidence fired, sorted and merged."""
    request_id: str | None = None
    """The audited request's id, when the caller has one."""
    text: str | None = None
    """The audited text, when the configured ``text_mode`` keeps it."""
    text_sha256: str | None = None
    """SHA-256 of the audited text (computed from ``text`` when not given)."""
    source: Source = "any"
    """Which text the alert is about: the prompt, the completion, or both."""
    status: Literal["firing", "resolved"] = "firing"
    """Alert state, with Alertmanager's meaning."""

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # Naive datetimes are ambiguous across hosts; the log orders by absolute time.
        if value.tzinfo is None:
            raise ValueError("created_at must be timezone-aware (use datetime.now(timezone.utc))")
        return value.astimezone(timezone.utc)

    @field_validator("token_spans")
    @classmethod
    def _spans(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for start, end in value:
            if not 0 <= start <= end:
                raise ValueError(f"token span ({start}, {end}) must satisfy 0 <= start <= end")
        return value

    @model_validator(mode="after")
    def _hash_text(self) -> Alert:
        if self.text is not None:
            digest = text_sha256(self.text)
            if self.text_sha256 is None:
                object.__setattr__(self, "text_sha256", digest)
            elif self.text_sha256 != digest:
                raise ValueError("text_sha256 does not match text; leave text_sha256 unset to compute it")
        return self


def merge_spans(spans: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    """Sort half-open ``(start, end)`` spans and merge the ones that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class _LeafLike(Protocol):
    name: str
    agg: str | None
    value: float
    threshold: float
    fired: bool
    token_spans: list[tuple[int, int]]


class _MatchLike(Protocol):
    rule_id: str
    description: str
    severity: str
    category: str
    actions: list[str]
    score: float
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    explanation: list[_LeafLike]


class _VerdictLike(Protocol):
    action: str
    matches: list[_MatchLike]


def alerts_from_verdict(
    verdict: _VerdictLike,
    *,
    policy_name: str,
    policy_hash: str,
    source: Source = "any",
    text: str | None = None,
    request_id: str | None = None,
    when: Collection[str] = ("alert", "block"),
) -> list[Alert]:
    """One :class:`Alert` per matched rule whose actions include any of ``when``.

    ``verdict`` is the policy engine's ``Verdict`` (read by attribute: ``action``,
    ``matches[*].rule_id/description/severity/category/actions/score/labels/
    annotations/explanation``). Blocking rules alert by default so that every
    block leaves a record.
    """
    alerts = []
    for match in verdict.matches:
        if not any(action in when for action in match.actions):
            continue
        leaves = list(match.explanation)
        alerts.append(
            Alert(
                rule_id=match.rule_id,
                description=match.description,
                severity=match.severity,  # type: ignore[arg-type]
                category=match.category,
                policy_name=policy_name,
                policy_hash=policy_hash,
                action=verdict.action,  # type: ignore[arg-type]
                score=float(match.score),
                labels=dict(match.labels),
                annotations=dict(match.annotations),
                features=[
                    AlertFeature(
                        name=leaf.name,
                        value=float(leaf.value),
                        threshold=float(leaf.threshold),
                        agg=leaf.agg,
                        fired=bool(leaf.fired),
                    )
                    for leaf in leaves
                ],
                token_spans=merge_spans(span for leaf in leaves if leaf.fired for span in leaf.token_spans),
                request_id=request_id,
                text=text,
                source=source,
            )
        )
    return alerts
