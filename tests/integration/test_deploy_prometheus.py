"""The shipped Prometheus files against a real sidecar and a real Prometheus.

Starts ``auditor serve`` (the real default model, a random 64-latent SAE, a
low-threshold policy), a loopback stand-in for the upstream server and the alert
webhook, and Debian's ``prometheus`` with the shipped scrape job and rules
(templated to loopback and a 1 s interval). After traffic that matches rules,
fails open, delivers and fails to deliver alerts, and reloads policies (one
rejected), every dashboard query must return data through the HTTP API, every
alert expression must parse and its signal (the part before the threshold) must
return data, and the alerts that traffic provokes must fire.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import make_random_sae
from tests.unit.deploy._shipped import (
    PROMETHEUS_CONFIG,
    RULES_FILE,
    Query,
    comparison_lhs,
    dashboard_queries,
    rule_queries,
    variable_queries,
    without_zero_fallback,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"
TEXTS = [
    "Send the wire transfer today or your account will be closed forever.",
    "The committee met on Tuesday to discuss the new library budget.",
]

POLICY = f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: deploy-test}}
library: {TINY}
rules:
  # A random SAE reconstructs nothing, so every input matches this one.
  - id: recon-critical
    severity: critical
    category: anomaly
    condition: {{anomaly: {{threshold: 0.01}}}}
    actions: [alert]
  - id: fraud-any
    severity: high
    category: deception
    condition: {{feature: deception.fraud, agg: max, threshold: 0.05}}
    actions: [alert]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Any, timeout_s: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{tail}")
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class _Loopback(http.server.BaseHTTPRequestHandler):
    """The upstream OpenAI-compatible server and the alert webhook, in one."""

    alerts: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/hook":
            type(self).alerts.extend(body.get("alerts", [body]))
            reply: dict[str, Any] = {}
        else:
            reply = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "test"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": TEXTS[0]}, "finish_reason": "stop"}
                ],
            }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Stack:
    auditor: str
    prometheus: str
    policy: Path
    loopback: type[_Loopback]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed; run `bash scripts/install_test_deps.sh`")
    tmp = tmp_path_factory.mktemp("deploy")
    sae = make_random_sae(tmp / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")
    policies = tmp / "policies"
    policies.mkdir()
    policy = policies / "deploy-test.yaml"
    policy.write_text(POLICY)

    _Loopback.alerts = []
    loopback = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Loopback)
    threading.Thread(target=loopback.serve_forever, daemon=True).start()
    loop_url = f"http://127.0.0.1:{loopback.server_address[1]}"

    port = _free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "sae": str(sae),
        "policies": [str(policies)],
        "upstream": loop_url,
        # Fail open, with a queue of one and a long batch wait, so a burst of proxied
        # requests overloads the auditor and is let through unaudited.
        "fail_mode": "open",
        "queue_size": 1,
        "batch_max_wait_ms": 200,
        "data_dir": str(tmp / "data"),
        "log_level": "warning",
        "alerts": {
            "cooldown_s": 0,
            "max_attempts": 1,
            "retry_initial_s": 0.05,
            "sinks": [
                {"type": "webhook", "name": "hook", "url": f"{loop_url}/hook"},
                # Nothing listens there: every delivery fails.
                {"type": "webhook", "name": "dead", "url": f"http://127.0.0.1:{_free_port()}/hook", "timeout_s": 1},
            ],
        },
    }
    config_path = tmp / "auditor.yaml"
    config_path.write_text(yaml.safe_dump(config))
    auditor_log = tmp / "auditor.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITOR_") or k == "AUDITOR_CACHE_DIR"}
    with auditor_log.open("wb") as out:
        auditor = subprocess.Popen(
            [str(Path(sys.executable).parent / "auditor"), "serve", "--config", str(config_path)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp,
        )

    # The shipped scrape job and rules, pointed at this sidecar and scraped every second.
    prom_cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    prom_cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    prom_cfg["rule_files"] = [str(RULES_FILE)]
    prom_cfg.pop("alerting")
    [job] = [j for j in prom_cfg["scrape_configs"] if j["job_name"] == "sae-auditor"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    job["scrape_interval"] = "1s"
    prom_cfg["scrape_configs"] = [job]
    prom_path = tmp / "prometheus.yml"
    prom_path.write_text(yaml.safe_dump(prom_cfg))
    prom_port = _free_port()
    prom_log = tmp / "prometheus.log"
    with prom_log.open("wb") as out:
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={prom_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        prom = f"http://127.0.0.1:{prom_port}"
        _wait("prometheus /-/ready", lambda: httpx.get(f"{prom}/-/ready", timeout=2).status_code == 200, 30, prometheus, prom_log)
        _wait("sidecar /readyz", lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, 180, auditor, auditor_log)
        yield Stack(base, prom, policy, _Loopback)
    finally:
        _stop(prometheus)
        _stop(auditor)
        loopback.shutdown()
        loopback.server_close()


def _query(stack: Stack, expr: str) -> dict[str, Any]:
    resp = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = resp.json()
    assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
    return body["data"]


def _has_data(stack: Stack, expr: str) -> bool:
    return bool(_query(stack, expr)["result"])


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Stack:
    """Drive every code path the dashboard and the rules look at, then let Prometheus scrape it."""
    client = httpx.Client(base_url=stack.auditor, timeout=60)
    chat = {"model": "test", "messages": [{"role": "user", "content": TEXTS[0]}]}

    # Audits: the first alone, so a scrape sees its counters before the rest add to them.
    first = client.post("/v1/audit", json={"text": TEXTS[0], "id": "a0"})
    assert first.status_code == 200, first.text
    assert "recon-critical" in [m["rule_id"] for m in first.json()["matches"]]
    _wait("a scrape of the first audit", lambda: _has_data(stack, "auditor_rule_matches_total"), 20)
    time.sleep(1.5)
    for i in range(7):
        resp = client.post("/v1/audit", json={"text": TEXTS[i % 2], "id": f"a{i + 1}"})
        assert resp.status_code == 200 and resp.json()["verdict"] == "alert", resp.text

    # Proxy: one request audited and forwarded, then a burst that overflows the queue.
    resp = client.post("/v1/chat/completions", json=chat)
    assert resp.status_code == 200 and resp.headers["X-Auditor-Verdict"] == "alert", resp.text
    with ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda _: httpx.post(f"{stack.auditor}/v1/chat/completions", json=chat, timeout=60), range(8)))
    assert all(r.status_code == 200 for r in burst), [r.text for r in burst]
    assert "error" in {r.headers["X-Auditor-Verdict"] for r in burst}, "no request failed open"

    # Policy reloads: a broken file is rejected (the old set stays), the restored one loads, and a
    # second broken edit is left in place, so the sidecar ends on a failed reload (the alert's state).
    good = stack.policy.read_text()
    broken = good.replace("severity: critical", "severity: apocalyptic")
    stack.policy.write_text(broken)
    rejected = client.post("/v1/policies/reload")
    assert rejected.status_code == 422 and rejected.json()["errors"], rejected.text
    stack.policy.write_text(good)
    assert client.post("/v1/policies/reload").status_code == 200
    assert _sample_value(client, "auditor_policy_last_reload_success") == 1
    stack.policy.write_text(broken)
    assert client.post("/v1/policies/reload").status_code == 422
    assert _sample_value(client, "auditor_policy_last_reload_success") == 0
    client.close()

    _wait("alert deliveries to both sinks", lambda: _has_data(
        stack, 'auditor_alert_deliveries_total{sink="dead", result="failure"} and on() auditor_alert_deliveries_total{sink="hook", result="success"}'), 30)
    _wait("the rejected reload to be scraped", lambda: _has_data(stack, 'auditor_policy_last_reload_success == 0'), 20)
    time.sleep(3)  # a few more scrapes, so every rate() has two samples after the last change
    assert stack.loopback.alerts, "the webhook sink delivered nothing"
    return stack


def _sample_value(client: httpx.Client, name: str) -> float:
    """The value of an unlabelled metric on the sidecar's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for sample in fam.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} is not exported")


def _ids(queries: list[Query]) -> list[str]:
    return [q.where for q in queries]


DASHBOARD_QUERIES = dashboard_queries() + variable_queries()
RULE_QUERIES = rule_queries()


@pytest.mark.parametrize("query", DASHBOARD_QUERIES, ids=_ids(DASHBOARD_QUERIES))
def test_dashboard_query_returns_data(traffic: Stack, query: Query) -> None:
    data = _query(traffic, query.expr)
    assert data["result"], f"{query.where}: no data for {query.expr}"
    # A panel that falls back to 0 without series must still get them from the traffic.
    signal = without_zero_fallback(query.expr)
    assert _query(traffic, signal)["result"], f"{query.where}: no data for {signal}"


@pytest.mark.parametrize("query", RULE_QUERIES, ids=_ids(RULE_QUERIES))
def test_alert_expression_parses_and_its_signal_has_data(traffic: Stack, query: Query) -> None:
    _query(traffic, query.expr)  # parses and evaluates (an alert that is not firing returns nothing)
    signal = comparison_lhs(query.expr)
    assert signal is not None, query
    assert _query(traffic, signal)["result"], f"{query.where}: no data for its signal {signal}"


def test_rules_load_and_evaluate_cleanly(traffic: Stack) -> None:
    groups = httpx.get(f"{traffic.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {q.where.removeprefix("rule ") for q in RULE_QUERIES}
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))


@pytest.mark.parametrize("alert", ["AuditorPolicyReloadFailed", "AuditorCriticalMatchesSurge"])
def test_provoked_alerts_fire(traffic: Stack, alert: str) -> None:
    firing = f'ALERTS{{alertname="{alert}", alertstate="firing", job="sae-auditor"}}'
    _wait(f"{alert} to fire", lambda: _has_data(traffic, firing), 10)


def test_healthy_sidecar_raises_no_health_alerts(traffic: Stack) -> None:
    for alert in ("AuditorDown", "AuditorNotReady", "AuditorQueueSaturated"):
        assert not _has_data(traffic, f'ALERTS{{alertname="{alert}"}}'), alert
