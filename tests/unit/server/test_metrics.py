"""Metric names, units and labels; the exposition passes ``promtool check metrics``."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from auditor.metrics import LATENCY_BUCKETS_S, AuditorMetrics, render, rule_action


def _families(registry: CollectorRegistry) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(render(registry).decode())}


def _filled() -> tuple[CollectorRegistry, AuditorMetrics]:
    registry = CollectorRegistry()
    m = AuditorMetrics(registry)
    m.tokens_audited.inc(12)
    m.requests.labels(route="/v1/audit", outcome="ok").inc()
    m.request_duration.labels(route="/v1/audit").observe(0.004)
    verdict = SimpleNamespace(
        action="block",
        matches=[SimpleNamespace(rule_id="fraud", severity="high", actions=["alert", "block"])],
    )
    m.observe_verdict("default", verdict)
    m.observe_stages({"tokenize": 0.0005, "forward": 0.03, "encode": 0.002, "evaluate": 0.001})
    m.batch_size.observe(4)
    m.batch_tokens.observe(300)
    m.queue_depth.set(3)
    m.set_policy("ab" * 32, ["default", "extra"])
    m.policy_reloads.labels(result="failure").inc()
    m.on_delivery("webhook", "success")
    m.fail_open.labels(route="/v1/chat/completions").inc()
    m.auditor_errors.labels(kind="timeout").inc()
    m.upstream_duration.labels(route="/v1/chat/completions", outcome="200").observe(0.2)
    m.interventions.labels(mode="clamp").inc()
    return registry, m


def test_every_name_has_the_prefix_and_counters_end_in_total() -> None:
    registry, _ = _filled()
    for family in text_string_to_metric_families(render(registry).decode()):
        assert family.name.startswith("auditor_")
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name


def test_registries_are_independent() -> None:
    a, ma = _filled()
    b = CollectorRegistry()
    AuditorMetrics(b)  # a second app in the same process registers the same names without clashing
    assert b"auditor_tokens_audited_total 12.0" in render(a)
    assert b"auditor_tokens_audited_total 0.0" in render(b)
    assert ma.registry is a


def test_helpers_record_verdicts_policy_and_stages() -> None:
    registry, _ = _filled()
    text = render(registry).decode()
    assert 'auditor_verdicts_total{action="block",policy="default"} 1.0' in text
    assert 'auditor_rule_matches_total{action="block",policy="default",rule="fraud",severity="high"} 1.0' in text
    assert f'auditor_policy_info{{hash="{"ab" * 32}",policies="default,extra"}} 1.0' in text
    assert "auditor_policies_loaded 2.0" in text
    # Millisecond-resolution buckets on the stage histogram, in seconds.
    assert 'auditor_audit_stage_duration_seconds_bucket{le="0.001",stage="tokenize"} 1.0' in text
    assert 'auditor_audit_stage_duration_seconds_bucket{le="0.001",stage="forward"} 0.0' in text
    assert LATENCY_BUCKETS_S[0] == 0.001
    # Both reload results are exported from the start, so rate() works before the first failure.
    fresh = CollectorRegistry()
    AuditorMetrics(fresh)
    assert 'auditor_policy_reloads_total{result="failure"} 0.0' in render(fresh).decode()


@pytest.mark.parametrize(
    ("actions", "expected"),
    [(["alert", "block"], "block"), (["annotate", "steer"], "steer"), (["annotate"], "annotate"), ([], "none")],
)
def test_rule_action_label_is_the_strongest_action(actions: list[str], expected: str) -> None:
    assert rule_action(actions) == expected


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/install_test_deps.sh installs the Debian prometheus package)")
    registry, _ = _filled()
    result = subprocess.run([promtool, "check", "metrics"], input=render(registry), capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def _sample_values(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(render(registry).decode())
        for s in f.samples
        if s.name == name
    }


def test_label_sets_known_in_advance_start_at_zero() -> None:
    """A series that first appears at 6 has increase() 0: the first burst of critical matches,
    fail-opens or errors would fire no alert. Every label set known in advance starts at 0."""
    from pathlib import Path

    from auditor.policy import load_policy

    registry = CollectorRegistry()
    m = AuditorMetrics(registry)
    assert _sample_values(registry, "auditor_fail_open_total")[(("route", "/v1/chat/completions"),)] == 0.0
    assert _sample_values(registry, "auditor_errors_total")[(("kind", "timeout"),)] == 0.0
    engine = load_policy(Path(__file__).resolve().parents[3] / "policies" / "examples" / "deception.yaml")
    m.set_policy("ab" * 32, [engine.name], [engine])
    matches = _sample_values(registry, "auditor_rule_matches_total")
    enabled = [r for r in engine.rules if r.enabled]
    assert enabled and len(matches) == len(enabled) and set(matches.values()) == {0.0}
    rule = enabled[0]
    key = (("action", rule_action(rule.actions)), ("policy", engine.name), ("rule", rule.id), ("severity", rule.severity))
    assert key in matches
    verdicts = _sample_values(registry, "auditor_verdicts_total")
    assert {dict(k)["action"] for k in verdicts} == {"allow", "alert", "block"} and set(verdicts.values()) == {0.0}
    m.prime_sinks(["webhook"])
    deliveries = _sample_values(registry, "auditor_alert_deliveries_total")
    assert {dict(k)["result"] for k in deliveries} == {"success", "retry", "failure", "dropped"}


def test_a_reload_that_removes_rules_stops_exporting_their_series() -> None:
    from pathlib import Path

    from auditor.policy import load_policy

    examples = Path(__file__).resolve().parents[3] / "policies" / "examples"
    first, second = load_policy(examples / "deception.yaml"), load_policy(examples / "anomaly.yaml")
    registry = CollectorRegistry()
    m = AuditorMetrics(registry)
    m.set_policy("a" * 64, [first.name], [first])
    rule = next(r for r in first.rules if r.enabled)
    m.rule_matches.labels(policy=first.name, rule=rule.id, severity=rule.severity, action=rule_action(rule.actions)).inc()
    m.set_policy("b" * 64, [second.name], [second])
    policies = {dict(k)["policy"] for k in _sample_values(registry, "auditor_rule_matches_total")}
    assert policies == {second.name}
    assert {dict(k)["policy"] for k in _sample_values(registry, "auditor_verdicts_total")} == {second.name}
    m.set_policy("a" * 64, [first.name], [first])  # back: its series start again at 0
    assert _sample_values(registry, "auditor_rule_matches_total")[
        (("action", rule_action(rule.actions)), ("policy", first.name), ("rule", rule.id), ("severity", rule.severity))
    ] == 0.0
