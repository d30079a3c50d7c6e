"""Benchmark: the TopK SAE's per-row top-k, ``torch.topk`` against the block-maxima selection.

``auditor.sae.sae._row_topk`` ranks only the 64-wide blocks whose maxima are among a row's
``k`` largest (exact: the same values as ``torch.topk``); the SAE uses it on the CPU for rows of
16,384 latents or more. This times both on random pre-activations for SAE widths from the shipped
4,608 to 131,072, checks they agree, and prints one JSON object and a table (ms, best of
``--repeats`` after a warm-up).

    PYTHONPATH=. python benchmarks/topk_rows.py [--device cpu] [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.sae.sae import _row_topk  # noqa: E402

# (rows, width, k): the shipped SAE's shape at batch sizes 8 and 32 x ~21 tokens, and wide SAEs.
SHAPES = [(168, 4608, 32), (672, 4608, 32), (256, 16384, 32), (256, 32768, 64), (1024, 32768, 32),
          (256, 65536, 64), (16, 131072, 64), (1024, 131072, 64)]


def best_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n, w, k in SHAPES:
        pre = torch.randn(n, w, generator=gen, device=device)
        values, indices = _row_topk(pre, k)
        ref = pre.topk(k, dim=-1)
        same = bool(torch.equal(values, ref.values) and torch.equal(pre.gather(1, indices), values))
        t_ref = best_ms(lambda: pre.topk(k, dim=-1), device, args.repeats)
        t_row = best_ms(lambda: _row_topk(pre, k), device, args.repeats)
        rows.append({"rows": n, "width": w, "k": k, "torch_topk_ms": t_ref, "row_topk_ms": t_row,
                     "speedup": t_ref / t_row, "same_values": same})
    result = {"benchmark": "topk_rows", "device": str(device), "threads": torch.get_num_threads(), "shapes": rows}
    print(json.dumps(result, indent=2))
    print()
    print(f"{'rows':>6} {'width':>7} {'k':>3} {'torch.topk ms':>14} {'_row_topk ms':>13} {'speedup':>8}")
    for r in rows:
        print(f"{r['rows']:>6} {r['width']:>7} {r['k']:>3} {r['torch_topk_ms']:>14.3f} {r['row_topk_ms']:>13.3f} "
              f"{r['speedup']:>7.2f}x{'' if r['same_values'] else '  MISMATCH'}")
    return result


if __name__ == "__main__":
    main()
