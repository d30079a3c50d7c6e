"""Benchmark: the steering hook's own cost per decode step, on the host.

Serve mode on a GPU is bound by the host launching kernels, so what the hook adds per
generated token is its Python and the operations it dispatches. This drives
``SteeringHook`` directly (no model) with small tensors, so the compute is negligible and
what is timed is the overhead: a random ReLU SAE, one clamp, the policy's watched latents
traced, ``--batch`` rows, one position per step after a 128-token prefill; with
``--steer-rules N`` the first N rules of a random policy also steer (evaluated every step).
Prints one JSON object and a line: microseconds per step (best of ``--repeats`` rounds of
``--steps`` steps) and the aten operations one step dispatches.

    PYTHONPATH=. python benchmarks/steering_hook.py [--batch 16] [--steps 500] [--steer-rules 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.models import Hookpoint  # noqa: E402
from auditor.policy.engine import PolicyEngine  # noqa: E402
from auditor.sae import SAE  # noqa: E402
from auditor.steering._hook import SteeringHook  # noqa: E402
from auditor.steering.interventions import ResolvedIntervention  # noqa: E402
from benchmarks.gpu_llama8b import random_engine, random_sae, with_steer_rules  # noqa: E402

D_IN, D_SAE = 64, 8192


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def build(steer_rules: int) -> tuple[SAE, PolicyEngine, ResolvedIntervention]:
    """The GPU script's random ReLU SAE and 100-rule policy (its first ``steer_rules`` rules clamping
    the first watched feature), and that clamp as the requested intervention."""
    cpu = torch.device("cpu")
    sae = random_sae(D_IN, D_SAE, "blocks.1.hook_resid_post", cpu, torch.float32)
    engine = random_engine(D_SAE, cpu)
    first = engine.library.name_for_index(int(engine.watched[0]))
    clamp = ResolvedIntervention(int(engine.watched[0]), "clamp", 0.0, "all", first)
    return sae, with_steer_rules(engine, steer_rules, first), clamp


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steer-rules", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sae, engine, clamp = build(args.steer_rules)
    point = Hookpoint(1, "resid_post")
    b = args.batch
    x = torch.randn(b, 1, D_IN, generator=torch.Generator().manual_seed(1))

    def new_hook() -> SteeringHook:
        hook = SteeringHook(sae, [clamp], engine=engine)
        hook.reset(b, torch.ones(b, dtype=torch.bool))
        hook.set_positions(torch.ones(b, 128, dtype=torch.bool), torch.zeros(b, 128, dtype=torch.bool))
        hook(torch.randn(b, 128, D_IN), hook=point)
        return hook

    def step(hook: SteeringHook) -> None:
        hook.set_positions(torch.ones(b, 1, dtype=torch.bool), torch.ones(b, 1, dtype=torch.bool))
        hook(x, hook=point)

    best = float("inf")
    with torch.inference_mode():
        for _ in range(args.repeats):
            hook = new_hook()
            for _ in range(20):
                step(hook)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(hook)
            best = min(best, (time.perf_counter() - t0) / args.steps)
        counter = _Count()
        with counter:
            step(hook)
    result = {"benchmark": "steering_hook", "batch": b, "steer_rules": args.steer_rules, "steps": args.steps,
              "us_per_step": best * 1e6, "ops_per_step": counter.ops}
    print(json.dumps(result, indent=2))
    print()
    print(f"batch {b}, {args.steer_rules} steering rules: {best * 1e6:.1f} us per decode step, {counter.ops} aten ops")
    return result


if __name__ == "__main__":
    main()
