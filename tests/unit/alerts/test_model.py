"""Alert model validation and the bridge from policy verdicts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from auditor.alerts import Alert, alerts_from_verdict, severity_rank
from auditor.alerts.model import merge_spans

from .conftest import make_alert


def test_defaults_and_hash() -> None:
    alert = make_alert(text="héllo")
    assert len(alert.id) == 32 and int(alert.id, 16) >= 0
    assert alert.created_at.tzinfo is not None and alert.created_at.utcoffset() == timedelta(0)
    assert alert.text_sha256 == hashlib.sha256("héllo".encode()).hexdigest()
    assert make_alert().id != make_alert().id


def test_created_at_normalised_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    alert = make_alert(created_at=datetime(2026, 1, 1, 14, 0, tzinfo=plus2))
    assert alert.created_at == datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    assert alert.created_at.tzinfo == timezone.utc


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"created_at": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"severity": "urgent"}, "severity"),
        ({"action": "steer"}, "action"),
        ({"source": "both"}, "source"),
        ({"token_spans": [(5, 2)]}, "0 <= start <= end"),
        ({"token_spans": [(-1, 2)]}, "0 <= start <= end"),
        ({"text": "a", "text_sha256": "0" * 64}, "does not match text"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_alerts(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_alert(**overrides)


def test_hash_without_text_is_kept() -> None:
    alert = make_alert(text=None, text_sha256="ab" * 32)
    assert alert.text is None and alert.text_sha256 == "ab" * 32


def test_json_round_trip() -> None:
    alert = make_alert(token_spans=[(1, 3)], features=[{"name": "x.y", "value": 2.0, "threshold": 1.0}])
    assert Alert.model_validate_json(alert.model_dump_json()) == alert


def test_severity_rank_orders() -> None:
    assert [severity_rank(s) for s in ("info", "low", "medium", "high", "critical")] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("spans", "merged"),
    [
        ([], []),
        ([(5, 7), (1, 2)], [(1, 2), (5, 7)]),
        ([(1, 4), (3, 6)], [(1, 6)]),
        ([(1, 3), (3, 5)], [(1, 5)]),
        ([(2, 9), (3, 4)], [(2, 9)]),
    ],
)
def test_merge_spans(spans: list[tuple[int, int]], merged: list[tuple[int, int]]) -> None:
    assert merge_spans(spans) == merged


# The policy engine's Verdict / RuleMatch / LeafExplanation shapes, as plain data.
@dataclass
class Leaf:
    kind: str
    name: str
    agg: str
    value: float
    threshold: float
    fired: bool
    token_spans: list[tuple[int, int]]


@dataclass
class Match:
    rule_id: str
    description: str
    severity: str
    category: str
    actions: list[str]
    score: float
    labels: dict[str, str]
    annotations: dict[str, str]
    explanation: list[Leaf]


@dataclass
class Verdict:
    action: str
    matches: list[Match]
    scores: dict[str, float] = field(default_factory=dict)


def test_alerts_from_verdict() -> None:
    fraud = Match(
        "fraud", "scam help", "high", "deception", ["alert", "block"], 2.0, {"team": "ts"}, {"summary": "s"},
        [
            Leaf("feature", "deception.fraud", "max", 8.0, 4.0, True, [(3, 5), (9, 10)]),
            Leaf("feature", "fiction.narrative", "mean", 0.1, 1.0, False, [(0, 12)]),
            Leaf("probe", "deception.probe", "max", 0.9, 0.5, True, [(4, 7)]),
        ],
    )
    annotate_only = Match("note", "", "info", "misc", ["annotate"], 1.2, {}, {}, [])
    block_only = Match("weapons", "", "critical", "dangerous", ["block"], 3.0, {}, {}, [])
    verdict = Verdict("block", [fraud, annotate_only, block_only])
    alerts = alerts_from_verdict(
        verdict, policy_name="default", policy_hash="h1", source="completion", text="t", request_id="r9"
    )
    assert [a.rule_id for a in alerts] == ["fraud", "weapons"]
    first = alerts[0]
    assert (first.action, first.severity, first.category, first.score) == ("block", "high", "deception", 2.0)
    assert first.labels == {"team": "ts"} and first.annotations == {"summary": "s"}
    assert [(f.name, f.value, f.threshold, f.fired) for f in first.features] == [
        ("deception.fraud", 8.0, 4.0, True),
        ("fiction.narrative", 0.1, 1.0, False),
        ("deception.probe", 0.9, 0.5, True),
    ]
    # Spans of fired leaves only, merged.
    assert first.token_spans == [(3, 7), (9, 10)]
    assert (first.request_id, first.source, first.text_sha256) == ("r9", "completion", alerts[1].text_sha256)
    only_alert = alerts_from_verdict(verdict, policy_name="p", policy_hash="h", when=("alert",))
    assert [a.rule_id for a in only_alert] == ["fraud"]
