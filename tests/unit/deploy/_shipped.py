"""The shipped deployment files, read the way Prometheus and Grafana read them.

Shared by the file checks here and the live Prometheus test in
``tests/integration/test_deploy_prometheus.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES_FILE = DEPLOY / "prometheus" / "rules" / "auditor.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "auditor.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "auditor.json"
K8S = DEPLOY / "k8s"

#: What Grafana puts in for its variables when it runs a query; the live test's
#: traffic all falls inside these windows.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${instance}": ".*",
    "$instance": ".*",
}

_ZERO_FALLBACK = re.compile(r"\s+or\s+(?:on\s*\(\s*\)\s+)?(?:label_replace\(\s*)?vector\(0\).*\Z", re.S)
_COMPARISON = re.compile(r"^(?P<lhs>.+?)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?-?[0-9.]+(?:e[+-]?[0-9]+)?\s*$", re.S)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it sits (for failure messages)."""

    where: str
    expr: str


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def grafana_expr(expr: str) -> str:
    """``expr`` with Grafana's variables replaced as Grafana would before sending it."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable left in {expr!r}; add it to GRAFANA_VARIABLES")
    return expr


def dashboard_queries(dash: dict[str, Any] | None = None) -> list[Query]:
    """Every PromQL expression of the dashboard: panel targets and annotation queries."""
    dash = dashboard() if dash is None else dash
    out: list[Query] = []
    for panel in dash["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out.append(Query(f"panel {inner['title']!r} target {target['refId']}", grafana_expr(target["expr"])))
    for ann in dash.get("annotations", {}).get("list", []):
        if "expr" in ann:
            out.append(Query(f"annotation {ann['name']!r}", grafana_expr(ann["expr"])))
    return out


def variable_queries(dash: dict[str, Any] | None = None) -> list[Query]:
    """The metric selectors inside ``label_values(selector, label)`` template variables."""
    dash = dashboard() if dash is None else dash
    out: list[Query] = []
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((?P<sel>.+),\s*(?P<label>\w+)\)", query)
        if m is None:
            raise ValueError(f"variable {var['name']}: expected label_values(selector, label), got {query!r}")
        out.append(Query(f"variable {var['name']!r}", m["sel"]))
    return out


def alert_rules(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def rule_queries(path: Path = RULES_FILE) -> list[Query]:
    return [Query(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in alert_rules(path)]


def without_zero_fallback(expr: str) -> str:
    """``expr`` less a trailing ``or [on()] [label_replace(]vector(0)...`` (which draws 0 where the
    sidecar has exported no series yet): the signal that real traffic must give data for."""
    return _ZERO_FALLBACK.sub("", expr)


def comparison_lhs(expr: str) -> str | None:
    """The signal of an alert written ``<signal> <op> <number>``, else None."""
    m = _COMPARISON.match(expr.strip())
    return m["lhs"] if m else None


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (label names, functions and keywords left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or m[0] in _KEYWORDS:
            continue  # a function, an aggregation or a keyword
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the exponent of a number like 1e3
        names.add(m[0])
    return names


def _families() -> list[Any]:
    from prometheus_client import CollectorRegistry

    from auditor.metrics import AuditorMetrics

    registry = CollectorRegistry()
    AuditorMetrics(registry)
    return list(registry.collect())


def exported_families() -> set[str]:
    """Metric family names the sidecar registers (``auditor_requests`` for ``auditor_requests_total``)."""
    return {family.name for family in _families()}


def exported_names() -> set[str]:
    """Every series name the sidecar's metrics module can expose (from a fresh registry)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
        "summary": ("", "_sum", "_count", "_created"),
    }
    return {family.name + suffix for family in _families() for suffix in suffixes[family.type]}


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/k8s (the kustomization itself left out)."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path, doc))
    return docs
