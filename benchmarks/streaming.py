"""Benchmark: auditing a streamed completion chunk by chunk, with and without KV-cache reuse.

A chat prompt plus a completion of ``--tokens`` tokens (text from ``datasets/safety-v1``),
released in chunks of ``--chunk`` tokens. After every chunk the policy's verdict on
everything so far is computed in one of three ways:

* ``single``: one ``Auditor.run`` on the whole completion at the end (the floor);
* ``chunked_reuse``: ``Auditor.stream(...).feed(chunk)``, which runs the model only on the
  new tokens and keeps the KV cache of the prefix (and the prefix's encoded features);
* ``chunked_recompute``: ``Auditor.run`` on prompt + completion so far after every chunk.

Prints one JSON object and a summary table; the goal is ``chunked_reuse / single <= 1.5``.

    PYTHONPATH=. python benchmarks/streaming.py [--tokens 256] [--chunk 16] [--repeats 2]
        [--policy policies/default.yaml] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from auditor.pipeline import Auditor
from auditor.text import AuditInput

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a long, careful answer: how should a small team handle customer data and payments safely?"


def completion_chunks(auditor: Auditor, n_tokens: int, chunk: int) -> list[str]:
    """Text chunks of ``chunk`` tokens each that join into a completion of ``n_tokens`` tokens."""
    texts = [
        json.loads(line)["text"]
        for line in (REPO / "datasets" / "safety-v1" / "benign_a.jsonl").read_text().splitlines()
        if line.strip()
    ]
    tok = auditor.model.tokenizer
    ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"][:n_tokens]
    return [tok.decode(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--policy", default=str(REPO / "policies" / "default.yaml"))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    auditor = Auditor.load(policy=args.policy)
    chunks = completion_chunks(auditor, args.tokens, args.chunk)
    messages = ({"role": "user", "content": PROMPT},)
    full = AuditInput(messages=messages, completion="".join(chunks))
    verdicts: dict[str, Any] = {}
    stages: dict[str, dict[str, float]] = {}  # seconds per pipeline stage, last run of each mode

    def single() -> None:
        [res] = auditor.run([full])
        verdicts["single"] = res.verdict
        stages["single"] = auditor.last_timings.as_dict()

    def reuse() -> None:
        stream = auditor.stream(AuditInput(messages=messages))
        totals: dict[str, float] = {}
        for c in chunks:
            res = stream.feed(c)
            for k, v in stream.last_timings.as_dict().items():
                totals[k] = totals.get(k, 0.0) + v
        verdicts["reuse"] = res.verdict
        stages["reuse"] = totals

    def recompute() -> None:
        so_far = ""
        for c in chunks:
            so_far += c
            [res] = auditor.run([AuditInput(messages=messages, completion=so_far)])
        verdicts["recompute"] = res.verdict

    t_single = best_of(single, args.repeats)
    t_reuse = best_of(reuse, args.repeats)
    t_recompute = best_of(recompute, args.repeats)
    [res] = auditor.run([full])
    same = all(
        v is not None and v.action == verdicts["single"].action and sorted(v.scores) == sorted(verdicts["single"].scores)
        for v in verdicts.values()
    )
    max_score_diff = max(
        abs(v.scores[k] - verdicts["single"].scores[k]) for v in verdicts.values() for k in v.scores
    )
    result = {
        "benchmark": "streaming",
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "model": auditor.model.name,
        "policy": auditor.policy.name if auditor.policy else None,
        "sequence_tokens": len(res.tokens),
        "completion_tokens": args.tokens,
        "chunk_tokens": args.chunk,
        "chunks": len(chunks),
        "single_s": t_single,
        "chunked_reuse_s": t_reuse,
        "chunked_recompute_s": t_recompute,
        "reuse_vs_single": t_reuse / t_single,
        "recompute_vs_single": t_recompute / t_single,
        "verdicts_agree": same,
        "max_score_abs_diff": max_score_diff,
        "stage_s": stages,
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"{'mode':<20} {'seconds':>8} {'x single':>9}")
    for name, t in [("single", t_single), ("chunked, KV reuse", t_reuse), ("chunked, recompute", t_recompute)]:
        print(f"{name:<20} {t:>8.3f} {t / t_single:>8.2f}x")
    for name in ("single", "reuse"):
        print(f"stages ({name}): " + ", ".join(f"{k} {v:.3f} s" for k, v in stages[name].items()))
    return result


if __name__ == "__main__":
    main()
