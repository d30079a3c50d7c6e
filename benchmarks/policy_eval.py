"""Benchmark: policy evaluation time for 100 random rules over a random 4,608-latent library.

Builds a random library and policy in memory (every agg, all/any/not nesting,
lists, macros, scopes, for_tokens, exceptions), compiles it once, and times
``PolicyEngine.evaluate`` on random sparse activations (on a CPU, in turns with the evaluation's
torch program, ``PolicyEngine.host_program`` off, and the host program's NumPy and C twins at any
size). Prints one JSON object and a summary line with
the median evaluation time per 1,000 tokens and, of it, the median time of building the verdict
objects from the rules' scores (the host side, which grows with matches).

    PYTHONPATH=. python benchmarks/policy_eval.py [--rules 100] [--batch 8] [--tokens 128] [--repeats 30]
        [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import torch

from auditor.features.library import FeatureLibrary
from auditor.models import skinny
import auditor.policy.engine as engine_module
from auditor.policy.engine import AuditBatch, PolicyEngine
from auditor.policy.compile import compile_policy
from auditor.policy.schema import Policy

D_SAE = 4608
CATEGORIES = ["bias", "deception", "dangerous", "self_harm", "privacy"]


def random_library(rng: random.Random, n_features: int) -> FeatureLibrary:
    indices = rng.sample(range(D_SAE), n_features)
    features = [
        {"name": f"{CATEGORIES[i % len(CATEGORIES)]}.f{i}", "index": idx, "category": CATEGORIES[i % len(CATEGORIES)]}
        for i, idx in enumerate(indices)
    ]
    return FeatureLibrary.model_validate(
        {
            "apiVersion": "auditor/v1",
            "kind": "FeatureLibrary",
            "id": "bench",
            "sae": {"id": "bench-4608", "model": "m", "hookpoint": "blocks.15.hook_resid_post", "d_sae": D_SAE},
            "features": features,
        }
    )


def random_leaf(rng: random.Random, names: list[str]) -> dict[str, Any]:
    agg = rng.choice(["max", "mean", "count_above", "fraction_above"])
    kind = rng.random()
    if kind < 0.6:
        leaf: dict[str, Any] = {"feature": rng.choice(names)}
    elif kind < 0.85:
        leaf = {"features": rng.sample(names, rng.randint(2, 4))}
    else:
        leaf = {"list": f"l{rng.randrange(10)}"}
    leaf["agg"] = agg
    if agg == "count_above":
        leaf["above"], leaf["threshold"] = rng.choice([0.5, 1.0, 2.0]), float(rng.randint(1, 5))
    elif agg == "fraction_above":
        leaf["above"], leaf["threshold"] = rng.choice([0.5, 1.0, 2.0]), rng.choice([0.05, 0.1, 0.25])
    else:
        leaf["threshold"] = rng.choice([0.5, 1.0, 2.0, 4.0])
    return leaf


def random_condition(rng: random.Random, names: list[str], depth: int) -> dict[str, Any]:
    r = rng.random()
    if depth == 0 or r < 0.35:
        return random_leaf(rng, names)
    if r < 0.45:
        return {"macro": f"m{rng.randrange(5)}"} if depth < 3 else random_leaf(rng, names)
    if r < 0.55:
        return {"not": random_condition(rng, names, depth - 1)}
    key = "all" if r < 0.8 else "any"
    return {key: [random_condition(rng, names, depth - 1) for _ in range(rng.randint(2, 3))]}


def random_policy(rng: random.Random, names: list[str], n_rules: int) -> Policy:
    rules = []
    for i in range(n_rules):
        rule: dict[str, Any] = {
            "id": f"rule-{i}",
            "severity": rng.choice(["low", "medium", "high", "critical"]),
            "category": rng.choice(CATEGORIES),
            "scope": rng.choice(["any", "prompt", "completion"]),
            "condition": random_condition(rng, names, 3),
            "actions": [rng.choice(["alert", "block", "annotate"])],
        }
        if rng.random() < 0.2:
            rule["for_tokens"] = rng.randint(2, 4)
        if rng.random() < 0.2:
            rule["exceptions"] = [{"name": "benign", "condition": random_leaf(rng, names)}]
        rules.append(rule)
    return Policy.model_validate(
        {
            "apiVersion": "auditor/v1",
            "kind": "Policy",
            "metadata": {"name": "bench"},
            "library": "bench",
            "lists": {f"l{i}": rng.sample(names, 3) for i in range(10)},
            "macros": {f"m{i}": random_condition(rng, names, 1) for i in range(5)},
            "rules": rules,
        }
    )


def verdict_build_times(engine: PolicyEngine, batch: AuditBatch, repeats: int) -> list[float]:
    """Seconds of what :meth:`PolicyEngine.evaluate` adds to the rules' tensors, ``repeats`` times
    after one untimed call: from the rule tensors computed once, the one copy to the host (which
    waits for the device) and the Python that builds the verdict objects."""
    with torch.inference_mode():
        r = engine._rule_tensors(batch)
        engine._pending(r, batch.tokens).verdicts()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine._pending(r, batch.tokens).verdicts()
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=100)
    parser.add_argument("--features", type=int, default=400, help="labelled features in the random library")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        # On a shared CPU, more threads than free cores makes every op wait on the others.
        torch.set_num_threads(args.threads)

    rng = random.Random(args.seed)
    library = random_library(rng, args.features)
    policy = random_policy(rng, library.names, args.rules)
    t0 = time.perf_counter()
    compiled = compile_policy(policy, library, base_dir=".", path="<bench>")
    engine = PolicyEngine(policy, library, compiled)
    compile_ms = (time.perf_counter() - t0) * 1e3

    g = torch.Generator().manual_seed(args.seed)
    b, t = args.batch, args.tokens
    # Sparse non-negative activations, about 32 active latents per token (TopK-like).
    full = torch.rand(b, t, D_SAE, generator=g) * (torch.rand(b, t, D_SAE, generator=g) < 32 / D_SAE) * 8.0
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, 0] = False  # BOS
    mask[b // 2 :, t * 3 // 4 :] = False  # padding on half the rows
    comp = torch.arange(t).expand(b, t) >= t // 2
    dev = torch.device(args.device)
    batch = AuditBatch(full[..., engine.watched].to(dev), mask.to(dev), comp.to(dev))

    # On a CPU, batches up to auditor.policy._host.MAX_ELEMENTS go through the program's host
    # twin, in C where the kernel library builds, else NumPy ("engine": what the engine picks);
    # the torch program (host_program off) and the C and NumPy twins at any size are timed in
    # turns with it.
    programs = ["engine", "torch", "numpy", "c"] if dev.type == "cpu" else ["engine"]
    if dev.type == "cpu" and skinny.library() is None:
        programs.remove("c")
    limit = engine_module.HOST_MAX_ELEMENTS

    def pick(program: str) -> None:
        engine.host_program = program != "torch"
        engine._numpy.native = program != "numpy"
        engine_module.HOST_MAX_ELEMENTS = 1 << 62 if program in ("numpy", "c") else limit

    for program in programs * 3:
        pick(program)
        engine.evaluate(batch)
    times: dict[str, list[float]] = {program: [] for program in programs}
    matched = 0
    for _ in range(args.repeats):
        for program in programs:
            pick(program)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            verdicts = engine.evaluate(batch)
            times[program].append(time.perf_counter() - start)
            matched = sum(len(v.matches) for v in verdicts)
    pick("engine")
    median_s = statistics.median(times["engine"])
    host_times = verdict_build_times(engine, batch, args.repeats)  # the host side of a verdict alone
    tokens = b * t
    result = {
        "rules": len(compiled.rules),
        "leaves": len(compiled.leaves),
        "nodes": compiled.n_nodes,
        "watched": int(engine.watched.numel()),
        "batch": b,
        "tokens_per_row": t,
        "tokens": tokens,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "compile_ms": round(compile_ms, 2),
        "median_batch_ms": round(median_s * 1e3, 3),
        "p90_batch_ms": round(sorted(times["engine"])[int(0.9 * (len(times["engine"]) - 1))] * 1e3, 3),
        "ms_per_1k_tokens": round(median_s * 1e3 * 1000 / tokens, 3),
        # What the engine picked: the host program's C twin at any size, NumPy's up to its limit.
        "host_program": dev.type == "cpu" and ("c" in programs or b * t * int(engine.watched.numel()) <= limit),
        "c_twin": "c" in programs,
        **{
            f"{program}_program_ms_per_1k_tokens": round(statistics.median(times[program]) * 1e3 * 1000 / tokens, 3)
            for program in ("torch", "numpy", "c") if program in times
        },
        "matches_per_batch": matched,
        "verdicts_median_ms": round(statistics.median(host_times) * 1e3, 3),
    }
    print(json.dumps(result))
    print(
        f"policy_eval: {result['rules']} rules, {result['leaves']} leaves, {result['watched']} watched latents: "
        f"{result['ms_per_1k_tokens']} ms per 1,000 tokens (median of {args.repeats}, batch {b}x{t}, {dev}"
        + (
            f"; {('the C twin' if result['c_twin'] else 'the NumPy program') if result['host_program'] else 'the torch program (past the NumPy limit)'}; "
            f"torch {result['torch_program_ms_per_1k_tokens']} ms, NumPy {result['numpy_program_ms_per_1k_tokens']} ms"
            + (f", C {result['c_program_ms_per_1k_tokens']} ms" if result["c_twin"] else "")
            if "torch" in times else ""
        )
        + "); "
        f"building the verdicts of {matched} matches {result['verdicts_median_ms']} ms a batch"
    )


if __name__ == "__main__":
    main()
