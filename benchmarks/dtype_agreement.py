"""Benchmark: the default model in float32 against a lower precision: speed and verdict agreement.

The shipped thresholds were calibrated on float32 activations. This audits the texts of
``datasets/safety-v1`` (every file, interleaved; ``--texts`` caps them) with the default model,
SAE and policy in float32 and in ``--dtype`` (default bfloat16; the SAE and the policy stay in
float32 either way), in the same process, and reports texts/s for each, how many verdict
actions agree, how many rows match exactly the same rules, the flips by kind, and how far rule
scores move. Prints one JSON object and a summary.

    python benchmarks/dtype_agreement.py [--dtype bfloat16] [--texts N] [--chunk 64]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.pipeline import Auditor  # noqa: E402
from auditor.text import AuditInput  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def dataset_texts(limit: int | None) -> list[str]:
    """Texts of every ``datasets/safety-v1`` file, interleaved so a cap keeps every category."""
    files = [
        [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        for f in sorted((REPO / "datasets" / "safety-v1").glob("*.jsonl"))
    ]
    out = [rows[i] for i in range(max(map(len, files))) for rows in files if i < len(rows)]
    return out[:limit] if limit else out


def audit(auditor: Auditor, items: list[AuditInput], chunk: int) -> tuple[list[Any], float]:
    t0 = time.perf_counter()
    results = [r for i in range(0, len(items), chunk) for r in auditor.run(items[i : i + chunk])]
    return results, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--texts", type=int, default=0, help="at most this many texts (0: all)")
    ap.add_argument("--chunk", type=int, default=64, help="texts per Auditor.run call")
    args = ap.parse_args(argv)
    items = [AuditInput(text=t) for t in dataset_texts(args.texts or None)]
    policy = str(REPO / "policies" / "default.yaml")
    ref_auditor = Auditor.load(policy=policy)
    low_auditor = Auditor.load(policy=policy, dtype=args.dtype)
    audit(ref_auditor, items[:8], args.chunk)  # warm both
    audit(low_auditor, items[:8], args.chunk)
    ref, t_ref = audit(ref_auditor, items, args.chunk)
    low, t_low = audit(low_auditor, items, args.chunk)

    flips: collections.Counter[str] = collections.Counter()
    same_action = same_rules = 0
    score_diffs: list[float] = []
    for a, b in zip(ref, low):
        va, vb = a.verdict, b.verdict
        same_action += va.action == vb.action
        if va.action != vb.action:
            flips[f"{va.action}->{vb.action}"] += 1
        same_rules += {m.rule_id for m in va.matches} == {m.rule_id for m in vb.matches}
        score_diffs.extend(abs(va.scores[r] - vb.scores[r]) for r in va.scores)
    score_diffs.sort()
    n = len(items)
    result = {
        "benchmark": "dtype_agreement",
        "dtype": args.dtype,
        "texts": n,
        "threads": torch.get_num_threads(),
        "float32_texts_per_s": n / t_ref,
        "low_texts_per_s": n / t_low,
        "speedup": t_ref / t_low,
        "same_action": same_action,
        "same_matched_rules": same_rules,
        "action_flips": dict(flips),
        "rule_score_abs_diff_median": score_diffs[len(score_diffs) // 2],
        "rule_score_abs_diff_p99": score_diffs[int(len(score_diffs) * 0.99)],
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"{n} texts: float32 {n / t_ref:.1f} texts/s, {args.dtype} {n / t_low:.1f} texts/s ({t_ref / t_low:.2f}x); "
          f"same action {same_action}/{n} ({100 * same_action / n:.1f}%), same matched rules {same_rules}/{n}; "
          f"flips {dict(flips)}")
    return result


if __name__ == "__main__":
    main()
