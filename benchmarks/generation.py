"""Benchmark: serve-mode generation with policies watching and one steering intervention, against plain generation.

Same prompts, same process, greedy decoding with the KV cache:

* ``plain``: ``model.generate`` (transformers) with ``--new-tokens`` new tokens;
* ``serve``: ``auditor.steering.generate`` with the default policy watching (the features it
  reads recorded every token, its rules with ``steer`` actions evaluated every
  ``--policy-every`` tokens, the verdict on the whole completion at the end) and one
  ``clamp`` intervention on a library feature active throughout. ``--all-rules-steer`` gives
  every rule a steer action, so the whole policy is evaluated while decoding.

Both are timed in turns (round robin, best of ``--repeats``) so load from other processes
falls on both alike. Tokens/s counts generated tokens. Prints one JSON object and a
summary line; the goal is ``serve / plain >= 0.95`` at batch 1 on the CPU default.

    PYTHONPATH=. python benchmarks/generation.py [--new-tokens 32] [--prompts 2] [--repeats 2]
        [--policy policies/default.yaml] [--policy-every 1] [--all-rules-steer] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from auditor.pipeline import Auditor
from auditor.steering import Intervention
from auditor.steering.generate import generate, prompt_for_generation
from auditor.text import AuditInput, tokenize_batch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bank keeps its customers' savings safe, step by step.",
    "Describe a walk through a forest in autumn.",
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--policy", default=str(REPO / "policies" / "default.yaml"))
    ap.add_argument("--policy-every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--all-rules-steer",
        action="store_true",
        help="give every rule of the policy a steer action (clamp its library's first feature), so the whole "
        "policy is evaluated while decoding (the worst case; by default only rules with steer actions are)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    policy_path = Path(args.policy)
    if args.all_rules_steer:
        policy_path = _all_rules_steer(policy_path)
    auditor = Auditor.load(policy=policy_path)
    model, tok = auditor.model.model, auditor.model.tokenizer
    assert auditor.library is not None  # the default policy names its library
    feature = auditor.library.features[0].name
    intervention = Intervention(feature, "clamp", 0.0)
    items = [AuditInput(messages=({"role": "user", "content": p},)) for p in PROMPTS[: args.prompts]]

    def plain() -> int:
        n = 0
        with torch.inference_mode():
            for item in items:
                batch = tokenize_batch(tok, [prompt_for_generation(item)], max_tokens=None)
                out = model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tok.pad_token_id,
                )
                n += out.shape[1] - batch.input_ids.shape[1]
        return n

    def serve() -> int:
        n = 0
        for item in items:
            res = generate(
                auditor,
                item,
                max_tokens=args.new_tokens,
                interventions=[intervention],
                policy_every=args.policy_every,
            )
            n += len(res.token_ids) + (1 if res.finish_reason == "stop" else 0)
        return n

    plain()
    serve()
    best = {"plain": (float("inf"), 1), "serve": (float("inf"), 1)}
    for _ in range(args.repeats):
        for name, fn in [("plain", plain), ("serve", serve)]:
            t0 = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t0
            if dt / n < best[name][0] / best[name][1]:
                best[name] = (dt, n)
    tps = {k: n / t for k, (t, n) in best.items()}
    result = {
        "benchmark": "generation",
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "model": auditor.model.name,
        "policy": auditor.policy.name if auditor.policy else None,
        "intervention": f"{feature}=clamp:0",
        "policy_every": args.policy_every,
        "all_rules_steer": args.all_rules_steer,
        "rules_evaluated_while_decoding": (
            len(auditor.policy.steering_engine.compiled.rules)
            if auditor.policy is not None and auditor.policy.steering_engine is not None
            else 0
        ),
        "batch_size": 1,
        "prompts": len(items),
        "new_tokens": args.new_tokens,
        "plain_tok_s": tps["plain"],
        "serve_tok_s": tps["serve"],
        "serve_vs_plain": tps["serve"] / tps["plain"],
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"plain {tps['plain']:.1f} tok/s, serve (policy + 1 intervention) {tps['serve']:.1f} tok/s, "
          f"ratio {tps['serve'] / tps['plain']:.3f}")
    return result


def _all_rules_steer(path: Path) -> Path:
    """A copy of the policy at ``path`` (next to it, removed at exit) whose every rule also steers."""
    import atexit
    import os
    import tempfile

    import yaml

    from auditor.features import load_library

    data = yaml.safe_load(path.read_text())
    feature = load_library(data["library"]).features[0].name
    for rule in data["rules"]:
        rule.setdefault("actions", ["alert"]).append({"steer": {"feature": feature, "mode": "clamp", "value": 0.0}})
    fd, name = tempfile.mkstemp(prefix=".bench-steer-", suffix=".yaml", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    atexit.register(os.unlink, name)
    return Path(name)


if __name__ == "__main__":
    main()
