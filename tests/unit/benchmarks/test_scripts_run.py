"""The benchmark scripts still run end to end (their smallest settings), so they do not rot between measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def run_script(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def first_json(out: str) -> dict:
    """The JSON object a benchmark prints before its summary table."""
    obj, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
    return obj


def test_gpu_script_smoke_runs_on_cpu() -> None:
    out = first_json(run_script("benchmarks/gpu_llama8b.py", "--tiny", "--repeats", "1", "--steer-rules", "5"))
    assert out["tiny"] is True and out["steer_rules"] == 5
    assert [r["batch_size"] for r in out["generation"]] == [1, 16]
    assert all(r["serve_tok_s"] > 0 and r["plain_tok_s"] > 0 for r in out["generation"])
    assert all(0 < r["watch_plus_eval_share"] for r in out["encode"])


def test_policy_eval_script_runs() -> None:
    out = first_json(run_script("benchmarks/policy_eval.py", "--rules", "20", "--repeats", "3", "--tokens", "16"))
    assert out["rules"] == 20 and out["watched"] > 0
