"""Every Prometheus metric the auditor exports, in one place.

Names follow Prometheus conventions: one ``auditor_`` prefix, base units
(seconds, bytes), ``_total`` on counters, and bounded label values only: route
templates, outcomes, rule ids and policy names from the loaded policy set, sink
names from the configuration. A raw feature index or any text never becomes a
label value.

The registry is passed in, never the process-global default one, so tests and
several apps in one process each build their own:

    registry = CollectorRegistry()
    metrics = AuditorMetrics(registry)
    metrics.requests.labels(route="/v1/audit", outcome="ok").inc()
    text = render(registry)
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = [
    "AuditorMetrics",
    "CONTENT_TYPE_LATEST",
    "LATENCY_BUCKETS_S",
    "STAGES",
    "render",
]

#: Pipeline stages timed by ``auditor_audit_stage_duration_seconds``.
STAGES = ("tokenize", "forward", "encode", "evaluate")

#: Latency buckets in seconds with millisecond resolution at the low end (1 ms .. 30 s).
LATENCY_BUCKETS_S = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)

_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)

# The most "strong" action of a rule, for the rule-match label.
_ACTION_ORDER = ("block", "steer", "alert", "annotate")


# Label values known before any event, whose series start at 0 (see AuditorMetrics.__init__).
FAIL_OPEN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/beta/litellm_basic_guardrail_api")
FAILURE_KINDS = ("timeout", "overloaded", "completion_too_long", "internal")
DELIVERY_RESULTS = ("success", "retry", "failure", "dropped")


def rule_action(actions: Iterable[str]) -> str:
    """The strongest action of a rule (block > steer > alert > annotate), ``none`` for none."""
    names = set(actions)
    return next((a for a in _ACTION_ORDER if a in names), "none")


class AuditorMetrics:
    """The auditor's metrics, registered in ``registry``.

    Attributes are the prometheus-client metric objects; helpers below record
    the composite events (a verdict with its matches, a policy reload).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tokens_audited = Counter(
            "auditor_tokens_audited_total",
            "Content tokens run through the SAE and the policies.",
            registry=registry,
        )
        self.requests = Counter(
            "auditor_requests_total",
            "HTTP requests by route template and outcome (ok, blocked, client_error, "
            "unauthorized, too_large, overloaded, timeout, not_ready, auditor_error, upstream_error).",
            ["route", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "auditor_request_duration_seconds",
            "Wall time of HTTP requests by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.verdicts = Counter(
            "auditor_verdicts_total",
            "Policy verdicts by policy and action (allow, alert, block).",
            ["policy", "action"],
            registry=registry,
        )
        self.rule_matches = Counter(
            "auditor_rule_matches_total",
            "Matched rules by rule id, severity and strongest action.",
            ["policy", "rule", "severity", "action"],
            registry=registry,
        )
        self.interventions = Counter(
            "auditor_interventions_total",
            "Steering interventions applied during generation, by mode (clamp, scale, add).",
            ["mode"],
            registry=registry,
        )
        self.stage_duration = Histogram(
            "auditor_audit_stage_duration_seconds",
            "Time per audit pipeline stage and micro-batch.",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.audit_duration = Histogram(
            "auditor_audit_duration_seconds",
            "Time from enqueueing an audit (or a streamed chunk) to its verdict (queue wait included).",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.batch_size = Histogram(
            "auditor_batch_size",
            "Inputs (and streamed chunks) per micro-batch.",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "auditor_batch_tokens",
            "Tokens per micro-batched forward.",
            buckets=_BATCH_TOKEN_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "auditor_queue_depth",
            "Audit requests waiting for the model.",
            registry=registry,
        )
        self.model_workers = Gauge(
            "auditor_model_workers",
            "Threads running audits and generation side by side on the one loaded model.",
            registry=registry,
        )
        self.gc_frozen_objects = Gauge(
            "auditor_gc_frozen_objects",
            "Objects in Python's permanent generation, which garbage collections skip (auditor serve freezes what "
            "loading left alive; 0 when the app runs in a process of yours).",
            registry=registry,
        )
        self.gc_frozen_objects.set_function(gc.get_freeze_count)
        self.queue_capacity = Gauge(
            "auditor_queue_capacity",
            "Most audit requests that may wait; beyond it requests get 503.",
            registry=registry,
        )
        self.policy = Info(
            "auditor_policy",
            "The policy set in service (hash over the loaded policies).",
            registry=registry,
        )
        self.policies_loaded = Gauge(
            "auditor_policies_loaded",
            "Number of policies in service.",
            registry=registry,
        )
        self.policy_reloads = Counter(
            "auditor_policy_reloads_total",
            "Policy reload attempts by result (success, failure); the initial load counts.",
            ["result"],
            registry=registry,
        )
        self.policy_reload_ok = Gauge(
            "auditor_policy_last_reload_success",
            "1 when the latest policy load or reload succeeded; 0 while the latest one failed "
            "(the previous policy set stays in service until a reload succeeds).",
            registry=registry,
        )
        self.alert_deliveries = Counter(
            "auditor_alert_deliveries_total",
            "Alert delivery outcomes by sink and result (success, retry, failure, dropped).",
            ["sink", "result"],
            registry=registry,
        )
        self.alerts_logged = Counter(
            "auditor_alerts_logged_total",
            "Alerts written to the audit log.",
            registry=registry,
        )
        self.fail_open = Counter(
            "auditor_fail_open_total",
            "Requests let through unaudited because the auditor failed and fail_mode is open.",
            ["route"],
            registry=registry,
        )
        self.auditor_errors = Counter(
            "auditor_errors_total",
            "Audits that failed inside the auditor (not policy blocks), by kind (timeout, overloaded, "
            "completion_too_long, internal).",
            ["kind"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "auditor_upstream_request_duration_seconds",
            "Latency of proxied upstream requests (to the last byte) by route and outcome.",
            ["route", "outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.ready = Gauge(
            "auditor_ready",
            "1 once the model and policies are loaded.",
            registry=registry,
        )
        # Labelled counters exist only once a label set is used, and increase() over a series
        # that first appears at 6 is 0: a first burst would never fire an alert. Every label set
        # known in advance starts at 0 here (policies' and sinks' when they are loaded).
        for result in ("success", "failure"):
            self.policy_reloads.labels(result=result)
        for route in FAIL_OPEN_ROUTES:
            self.fail_open.labels(route=route)
        for kind in FAILURE_KINDS:
            self.auditor_errors.labels(kind=kind)
        self._primed_verdicts: set[tuple[str, ...]] = set()
        self._primed_matches: set[tuple[str, ...]] = set()

    # ------------------------------------------------------------ helpers

    def observe_stages(self, timings: dict[str, float]) -> None:
        """Record one batch's per-stage seconds (keys from :data:`STAGES`)."""
        for stage in STAGES:
            self.stage_duration.labels(stage=stage).observe(timings.get(stage, 0.0))

    def observe_verdict(self, policy: str, verdict: Any) -> None:
        """Count a policy verdict and its matched rules."""
        self.verdicts.labels(policy=policy, action=verdict.action).inc()
        self.observe_matches(policy, verdict.matches)

    def observe_matches(self, policy: str, matches: Any) -> None:
        """Count matched rules (``auditor_rule_matches_total``)."""
        for match in matches:
            self.rule_matches.labels(
                policy=policy,
                rule=match.rule_id,
                severity=match.severity,
                action=rule_action(match.actions),
            ).inc()

    def set_policy(self, policy_hash: str, names: list[str], engines: Iterable[Any] = ()) -> None:
        """Publish the policy set in service; the verdict and rule-match series of ``engines``
        (the loaded policies) start at 0, so the first matches count as an increase."""
        self.policy.info({"hash": policy_hash or "none", "policies": ",".join(sorted(names)) or "none"})
        self.policies_loaded.set(len(names))
        engines = list(engines)
        if not engines:
            return
        verdicts = {(e.name, action) for e in engines for action in ("allow", "alert", "block")}
        matches = {
            (e.name, r.id, r.severity, rule_action(r.actions)) for e in engines for r in e.rules if r.enabled
        }
        # Series of rules and policies no longer in service stop being exported (a reload that
        # removed them would otherwise leave them on dashboards until a restart).
        for labels in self._primed_verdicts - verdicts:
            self.verdicts.remove(*labels)
        for labels in self._primed_matches - matches:
            self.rule_matches.remove(*labels)
        for policy, action in verdicts:
            self.verdicts.labels(policy=policy, action=action)
        for policy, rule, severity, action in matches:
            self.rule_matches.labels(policy=policy, rule=rule, severity=severity, action=action)
        self._primed_verdicts, self._primed_matches = verdicts, matches

    def prime_sinks(self, sinks: Iterable[str]) -> None:
        """Start the delivery series of the alert sinks at 0."""
        for sink in sinks:
            for result in DELIVERY_RESULTS:
                self.alert_deliveries.labels(sink=sink, result=result)

    def on_delivery(self, sink: str, result: str) -> None:
        """``AlertDispatcher(on_delivery=...)`` callback."""
        self.alert_deliveries.labels(sink=sink, result=result).inc()


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(registry)
