"""Benchmark: policy evaluations replayed as CUDA graphs, their speed and the GPU memory they hold.

The random 100-rule policy of ``policy_eval.py`` (the GPU script's) on random sparse features
(about 32 active latents per token, as a TopK SAE gives) of ``--tokens`` tokens per row, at each of
``--batch-sizes``: the decision alone (``matched``) and the whole evaluation, run directly and
replayed as a CUDA graph, and what capturing each graph added to the memory the allocator reserves
(the graph's private pool, which keeps every intermediate tensor of the evaluation) and to the
memory allocated (its static inputs and outputs). Every batch size gets its own graph, whatever
``PolicyEngine.graph_max_tokens`` allows by default. ``--compile`` also measures the evaluation with its
program compiled (``PolicyEngine.compile_program``). Prints one JSON object and a table. Without
CUDA it times the direct runs only (a smoke test).

    python benchmarks/policy_graphs.py [--batch-sizes 1,8,16,32,64] [--tokens 512] [--repeats 10] [--compile]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.policy._graphs import MAX_TOKENS, MAX_TOKENS_COMPILED, EvalGraphs, bucket_rows, bucket_tokens  # noqa: E402
from auditor.policy.compile import compile_policy  # noqa: E402
from auditor.policy.engine import AuditBatch, PolicyEngine  # noqa: E402
from benchmarks.timing import best_time  # noqa: E402
from benchmarks.policy_eval import D_SAE, random_library, random_policy  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8,16,32,64")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rules", type=int, default=100)
    ap.add_argument("--compile", action="store_true", help="also with the evaluation's program compiled")
    ap.add_argument("--warm-up-tokens", default="", help="comma list: instead, for each N a fresh engine whose "
                    "compiled program is warmed up (PolicyEngine.warm_up) on N-token batches, then the compiled "
                    "decision timed at each batch size, directly and as a graph (inductor tunes a dynamic "
                    "program's kernels to the sizes it is first compiled at)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    rng = random.Random(0)
    library = random_library(rng, 400)
    policy = random_policy(rng, library.names, args.rules)
    engine = PolicyEngine(policy, library, compile_policy(policy, library, base_dir=".", path="<bench>"))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    t = args.tokens
    full = torch.rand(max(sizes), t, D_SAE, generator=g)
    full *= (torch.rand(max(sizes), t, D_SAE, generator=g) < 32 / D_SAE) * 8.0
    feats = full[..., engine.watched].contiguous().to(device)
    del full
    mask = torch.ones(max(sizes), t, dtype=torch.bool, device=device)
    comp = torch.zeros_like(mask)
    comp[:, t // 2 :] = True

    if args.warm_up_tokens:
        result = warm_up_sizes(args, device, library, policy, feats, mask, comp, sizes)
        print(json.dumps(result, indent=2))
        print()
        for r in result["rows"]:
            print(f"warmed up at {r['warm_up_tokens']:>4} tokens ({r['warm_up_s']:.1f} s): batch {r['batch_size']:>3} x {t}: "
                  f"compiled decision {r['direct_matched_ms']:.2f} ms directly, {r['graph_matched_ms']:.2f} ms as a graph"
                  if cuda else f"warmed up at {r['warm_up_tokens']} tokens: batch {r['batch_size']}: {r['direct_matched_ms']:.2f} ms")
        return result
    rows = []
    for compiled in (False, True) if args.compile else (False,):
        engine.compile_program = compiled
        for bs in sizes:
            batch = AuditBatch(feats[:bs], mask[:bs], comp[:bs])
            engine.cuda_graphs = False
            start = time.perf_counter()
            verdicts = engine.evaluate(batch)  # with --compile, the first of its kind compiles
            first_s = time.perf_counter() - start
            row: dict[str, Any] = {
                "batch_size": bs, "tokens": bs * t, "compiled": compiled, "first_call_s": first_s,
                "matches_per_text": sum(len(v.matches) for v in verdicts) / bs,
                "direct_matched_ms": 1e3 * best_time(lambda: engine.matched(batch), device, args.repeats),
                "direct_eval_ms": 1e3 * best_time(lambda: engine.evaluate(batch), device, args.repeats),
            }
            if cuda:
                engine.cuda_graphs = True
                engine.graph_max_tokens = bucket_rows(bs) * bucket_tokens(t)
                engine._graphs = EvalGraphs(engine._program_outputs)
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
                engine.evaluate(batch)  # seen
                engine.evaluate(batch)  # captured and replayed
                torch.cuda.synchronize(device)
                assert engine._graphs.captures == 1, "the graph was not captured"
                row["graph_reserved_mib"] = (torch.cuda.memory_reserved(device) - reserved) / 2**20
                row["graph_allocated_mib"] = (torch.cuda.memory_allocated(device) - allocated) / 2**20
                row["graph_matched_ms"] = 1e3 * best_time(lambda: engine.matched(batch), device, args.repeats)
                row["graph_eval_ms"] = 1e3 * best_time(lambda: engine.evaluate(batch), device, args.repeats)
                engine._graphs = EvalGraphs(engine._program_outputs)  # this graph's memory goes back
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
            rows.append(row)
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "rules": len(engine.compiled.rules),
        "leaves": len(engine.compiled.leaves),
        "watched": int(engine.watched.numel()),
        "tokens_per_row": t,
        "default_max_tokens": {"eager": MAX_TOKENS, "compiled": MAX_TOKENS_COMPILED},
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    print()
    for r in rows:
        line = (f"batch {r['batch_size']:>3} x {t} ({r['tokens']:>6} tokens), program {'compiled' if r['compiled'] else 'eager   '}: "
                f"decision {r['direct_matched_ms']:.2f} ms, evaluation {r['direct_eval_ms']:.2f} ms run directly")
        if cuda:
            line += (f"; as a graph {r['graph_matched_ms']:.2f} / {r['graph_eval_ms']:.2f} ms, holding "
                     f"{r['graph_reserved_mib']:.0f} MiB reserved ({r['graph_allocated_mib']:.0f} MiB allocated)")
        print(line + f"; {r['matches_per_text']:.1f} matches a text")
    return result


def warm_up_sizes(args: Any, device: torch.device, library: Any, policy: Any, feats: torch.Tensor, mask: torch.Tensor,
                  comp: torch.Tensor, sizes: list[int]) -> dict[str, Any]:
    """The compiled decision's speed after a warm-up at each of ``--warm-up-tokens``."""
    rows = []
    for n in [int(x) for x in args.warm_up_tokens.split(",")]:
        engine = PolicyEngine(policy, library, compile_policy(policy, library, base_dir=".", path="<bench>"))
        engine.compile_program = True
        start = time.perf_counter()
        engine.warm_up(device, tokens=n)
        warm_s = time.perf_counter() - start
        for bs in sizes:
            batch = AuditBatch(feats[:bs], mask[:bs], comp[:bs])
            engine.cuda_graphs = False
            engine.matched(batch)
            row: dict[str, Any] = {"warm_up_tokens": n, "warm_up_s": warm_s, "batch_size": bs,
                                   "direct_matched_ms": 1e3 * best_time(lambda: engine.matched(batch), device, args.repeats)}
            if device.type == "cuda":
                engine.cuda_graphs = True
                engine.graph_max_tokens = bucket_rows(bs) * bucket_tokens(feats.shape[1])
                engine.matched(batch)  # seen
                engine.matched(batch)  # captured and replayed
                row["graph_matched_ms"] = 1e3 * best_time(lambda: engine.matched(batch), device, args.repeats)
                engine._graphs = EvalGraphs(engine._program_outputs)
            rows.append(row)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "tokens_per_row": feats.shape[1], "rows": rows}


if __name__ == "__main__":
    main()
