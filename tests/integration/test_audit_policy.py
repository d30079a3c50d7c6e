"""`auditor audit --policy` on the real default model: verdicts, scores and explanations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from auditor.cli import main
from auditor.text import AuditInput, sink_token_id
from tests.conftest import make_random_sae

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"
TEXTS = [
    "The committee met on Tuesday to discuss the new library budget.",
    "Send the wire transfer today or your account will be closed forever.",
]


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 64 latents to match the example library's indices, reading SmolLM2's layer 5.
    return make_random_sae(tmp_path_factory.mktemp("sae") / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("policy")
    path = folder / "low.yaml"
    path.write_text(
        f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: low-thresholds}}
library: {TINY}
rules:
  - id: fraud-any
    severity: high
    category: deception
    condition: {{feature: deception.fraud, agg: max, threshold: 0.05}}
    actions: [alert, block]
  - id: stereotype-mean
    severity: low
    category: bias
    scope: completion
    condition: {{feature: bias.gender_stereotype, agg: mean, threshold: 1000.0}}
"""
    )
    return path


def test_policy_verdicts_name_the_driving_features(default_model, sae_dir, policy_file) -> None:  # type: ignore[no-untyped-def]
    from auditor.pipeline import Auditor
    from auditor.policy import load_policy
    from auditor.sae import load_sae

    engine = load_policy(str(policy_file))
    auditor = Auditor(default_model, load_sae(str(sae_dir)), library=engine.library, policy=engine)
    items = [AuditInput(text=t) for t in TEXTS]
    watched = auditor.run(items)  # watch-list encode
    full = auditor.run(items, top_k=5)  # full encode, then gather
    fraud_index = engine.library.feature("deception.fraud").index
    for text, w, f in zip(TEXTS, watched, full):
        assert w.verdict is not None and f.verdict is not None
        assert w.verdict.scores.keys() == {"fraud-any", "stereotype-mean"}
        for rule, score in w.verdict.scores.items():
            torch.testing.assert_close(score, f.verdict.scores[rule], rtol=1e-5, atol=1e-6)
        # Reference: the fraud latent's max over content tokens, from a plain encode.
        batch_ids = [sink_token_id(default_model.tokenizer)] + default_model.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            hs = default_model.model(torch.tensor([batch_ids]), output_hidden_states=True).hidden_states[6][0]
        col = auditor.sae.encode(hs[1:])[:, fraud_index]
        torch.testing.assert_close(w.verdict.scores["fraud-any"], float(col.max()) / 0.05, rtol=1e-4, atol=1e-4)
        fires = bool(col.max() >= 0.05)
        assert ("fraud-any" in [m.rule_id for m in w.verdict.matches]) == fires
        assert w.verdict.action == ("block" if fires else "allow")
        if fires:
            [m] = w.verdict.matches
            [leaf] = m.explanation
            assert leaf.name == "deception.fraud" and leaf.fired
            above = (col >= 0.05).nonzero().flatten() + 1  # token positions (sink at 0)
            covered = {p for a, b in leaf.token_spans for p in range(a, b)}
            assert covered == set(above.tolist())
        assert w.verdict.category_scores["deception"] == w.verdict.scores["fraud-any"]
        assert w.verdict.category_scores["bias"] == w.verdict.scores["stereotype-mean"]


def test_cli_policy_jsonl(tmp_path, capsys, sae_dir, policy_file) -> None:  # type: ignore[no-untyped-def]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["audit", "--policy", str(policy_file), "--sae", str(sae_dir), "--input", str(inp), "--json", "--top-k", "0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["id"] for x in lines] == ["1", "2"]
    for obj in lines:
        assert obj["verdict"] in {"allow", "alert", "block"}
        assert set(obj["scores"]) == {"fraud-any", "stereotype-mean"}
        assert set(obj["category_scores"]) == {"deception", "bias"}
        assert "tokens" not in obj
        for match in obj["matches"]:
            assert match["explanation"] and all(e["name"] for e in match["explanation"])


def test_cli_shipped_example_policy_runs(tmp_path, capsys, sae_dir) -> None:  # type: ignore[no-untyped-def]
    """The shipped example policies (probes, lists, for_tokens, anomaly) evaluate on real activations."""
    for name in ("harms.yaml", "deception.yaml", "anomaly.yaml"):
        policy = REPO / "policies" / "examples" / name
        assert main(["audit", "--policy", str(policy), "--sae", str(sae_dir), "--json", "--top-k", "0", TEXTS[1]]) == 0
        [obj] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert obj["scores"] and all(s >= 0 for s in obj["scores"].values())


def test_cli_alerts_logged_and_delivered_to_webhook(tmp_path, capsys, sae_dir, policy_file) -> None:  # type: ignore[no-untyped-def]
    """Alerts go to the durable log and on to a real webhook receiver on loopback."""
    import http.server
    import threading

    from auditor.alerts import AuditLog

    received: list[dict] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            payload = json.loads(body)
            received.extend(payload if isinstance(payload, list) else payload.get("alerts", [payload]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = tmp_path / "alerts.yaml"
        db = tmp_path / "alerts.sqlite3"
        cfg.write_text(
            f"alerts:\n  log_path: {db}\n  text_mode: store\n  cooldown_s: 0\n"
            f"  sinks:\n    - type: webhook\n      url: http://127.0.0.1:{server.server_address[1]}/hook\n"
        )
        inp = tmp_path / "in.jsonl"
        inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
        argv = ["audit", "--policy", str(policy_file), "--sae", str(sae_dir), "--input", str(inp), "--json",
                "--top-k", "0", "--alerts-config", str(cfg)]
        assert main(argv) == 0
    finally:
        server.shutdown()
        server.server_close()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = [(o["id"], m["rule_id"]) for o in lines for m in o["matches"]]
    assert expected, "the low-threshold fraud rule should fire on at least one text"
    log = AuditLog(db, text_mode="store")
    stored = log.query(limit=100)
    assert sorted((a.request_id, a.rule_id) for a in stored) == sorted(expected)
    for alert in stored:
        assert alert.features and all(f.name == "deception.fraud" for f in alert.features)
        assert alert.text in TEXTS
    assert sorted(a["id"] if "id" in a else a["alert_id"] for a in received) == sorted(a.id for a in stored)
    log.close()


def test_cli_alert_flags_need_a_policy(sae_dir) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "auditor.cli", "audit", "--sae", str(sae_dir), "--audit-log", "x.db", "hello"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "need --policy" in proc.stderr and "Traceback" not in proc.stderr
