"""Benchmark: the TopK SAE's per-row top-k, ``torch.topk`` against the block-maxima selection.

``auditor.sae.sae._row_topk`` ranks only the 64-wide blocks whose maxima are among a row's
``k`` largest (exact: the same values as ``torch.topk``); the SAE uses it on the CPU for rows of
16,384 latents or more. This times both on random pre-activations for SAE widths from the shipped
4,608 to 131,072, checks they agree, and prints one JSON object and a table (ms, best of
``--repeats`` after a warm-up).

``--variants`` times, per shape, the ways the selection can be run instead (one level at block
widths 64-512, two levels at block / piece widths, and the one pass over the row each needs, with
a plain sum over the row as the memory-bandwidth yardstick; ``--compiled`` adds the pieces'
maxima as a ``torch.compile``d reduction). ``--shapes`` replaces the shapes
(``ROWSxWIDTHxK,...``), ``--dtype`` the pre-activations' dtype.

    PYTHONPATH=. python benchmarks/topk_rows.py [--device cpu] [--repeats 10] [--threads N]
    python benchmarks/topk_rows.py --device cuda --dtype bfloat16 --shapes 16384x131072x64 --variants
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

from auditor.sae import piece_max  # noqa: E402
from auditor.sae.sae import _row_topk, _row_topk_pieces  # noqa: E402

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


ONE_LEVEL = (64, 128, 256, 512)
TWO_LEVEL = ((128, 16), (256, 8), (256, 16), (256, 32), (512, 16), (512, 32), (1024, 32), (1024, 64))
PIECES = (8, 16, 32, 64, 128, 256)


def variants(pre: torch.Tensor, k: int, device: torch.device, repeats: int, compiled: bool) -> dict[str, Any]:
    """ms of each selection variant on ``pre`` (and whether its values equal torch.topk's), and of
    the one pass over the row each variant starts with."""
    n, w = pre.shape
    ref = pre.topk(k, dim=-1).values
    out: dict[str, Any] = {"sum_ms": best_ms(lambda: pre.sum(), device, repeats),
                           "bytes": pre.numel() * pre.element_size()}
    out["sum_gb_s"] = out["bytes"] / out["sum_ms"] / 1e6
    for piece in PIECES:
        if w % piece == 0:
            out[f"amax_{piece}_ms"] = best_ms(lambda p=piece: pre.view(n, w // p, p).amax(-1), device, repeats)
    for piece in (16, 32):
        # Pieces' maxima by max pooling, and of strided pieces (element j of each piece-sized lane of a
        # block of piece^2: an outer reduction, read along the rows).
        out[f"maxpool_{piece}_ms"] = best_ms(
            lambda p=piece: torch.nn.functional.max_pool1d(pre.view(n, 1, w), p), device, repeats)
        if w % (piece * piece) == 0:
            out[f"lanes_{piece}_ms"] = best_ms(
                lambda p=piece: pre.view(n, w // (p * p), p, p).amax(2), device, repeats)
    triton_max = piece_max.kernel() if device.type == "cuda" else None
    if triton_max is not None:
        for piece in (16, 32):
            want = pre.view(n, w // piece, piece).amax(-1)
            out[f"triton_{piece}_exact"] = bool(torch.equal(triton_max(pre, piece), want))
            out[f"triton_{piece}_ms"] = best_ms(lambda p=piece: triton_max(pre, p), device, repeats)
        for block, piece in ((256, 16), (256, 32), (512, 32), (1024, 32)):
            if w % block == 0 and k * block < w:
                fn = lambda b=block, p=piece: _row_topk_pieces(pre, k, b, p, triton_max)  # noqa: E731
                values, indices = fn()
                name = f"block_{block}_piece_{piece}_triton"
                out[f"{name}_ms"] = best_ms(fn, device, repeats)
                out[f"{name}_exact"] = bool(torch.equal(values, ref) and torch.equal(pre.gather(1, indices), values))
    if compiled:
        for piece in (16, 32):
            try:
                fn = torch.compile(lambda t, p=piece: t.view(t.shape[0], -1, p).amax(-1), dynamic=False)
                out[f"amax_{piece}_compiled_ms"] = best_ms(lambda f=fn: f(pre), device, repeats)
            except Exception as exc:  # noqa: BLE001 - a build without a compiler backend is reported
                out[f"amax_{piece}_compiled_ms"] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
    configs = [(b, 0) for b in ONE_LEVEL] + list(TWO_LEVEL)
    for block, piece in configs:
        if w % block or k * block >= w:
            continue
        name = f"block_{block}" + (f"_piece_{piece}" if piece else "")
        fn = lambda b=block, p=piece: _row_topk(pre, k, blocks=True, block=b, sub=p)  # noqa: E731
        values, indices = fn()
        out[f"{name}_ms"] = best_ms(fn, device, repeats)
        out[f"{name}_exact"] = bool(torch.equal(values, ref) and torch.equal(pre.gather(1, indices), values))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--shapes", default="", help="ROWSxWIDTHxK,... (default: the shapes in SHAPES)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--variants", action="store_true", help="also time the selection's variants per shape")
    ap.add_argument("--compiled", action="store_true", help="with --variants: the pieces' maxima torch.compile'd")
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")]  # type: ignore[misc]
        except ValueError:
            ap.error(f"--shapes {args.shapes!r}: give ROWSxWIDTHxK items separated by commas, e.g. 16384x131072x64")
        if any(len(shape) != 3 for shape in shapes):
            ap.error(f"--shapes {args.shapes!r}: each item needs three numbers, ROWSxWIDTHxK")
        bad = [shape for shape in shapes if shape[0] < 0 or shape[1] < 1 or not 1 <= shape[2] <= shape[1]]
        if bad:
            ap.error(f"--shapes {args.shapes!r}: rows >= 0, width >= 1 and 1 <= k <= width; {bad[0]} is not")
    if args.compiled and not args.variants:
        ap.error("--compiled times a variant: give --variants too")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n, w, k in shapes:
        pre = torch.randn(n, w, generator=gen, device=device).to(dtype)
        values, indices = _row_topk(pre, k)
        ref = pre.topk(k, dim=-1)
        same = bool(torch.equal(values, ref.values) and torch.equal(pre.gather(1, indices), values))
        t_ref = best_ms(lambda: pre.topk(k, dim=-1), device, args.repeats)
        t_row = best_ms(lambda: _row_topk(pre, k), device, args.repeats)
        rows.append({"rows": n, "width": w, "k": k, "torch_topk_ms": t_ref, "row_topk_ms": t_row,
                     "speedup": t_ref / t_row, "same_values": same})
        if args.variants:
            rows[-1]["variants"] = variants(pre, k, device, args.repeats, args.compiled)
    result = {"benchmark": "topk_rows", "device": str(device), "dtype": args.dtype,
              "threads": torch.get_num_threads(), "shapes": rows}
    print(json.dumps(result, indent=2))
    print()
    print(f"{'rows':>6} {'width':>7} {'k':>3} {'torch.topk ms':>14} {'_row_topk ms':>13} {'speedup':>8}")
    for r in rows:
        print(f"{r['rows']:>6} {r['width']:>7} {r['k']:>3} {r['torch_topk_ms']:>14.3f} {r['row_topk_ms']:>13.3f} "
              f"{r['speedup']:>7.2f}x{'' if r['same_values'] else '  MISMATCH'}")
    for r in rows:
        if "variants" in r:
            v = r["variants"]
            print(f"\n{r['rows']} x {r['width']}, k={r['k']}: the row read by a sum {v['sum_ms']:.3f} ms "
                  f"({v['sum_gb_s']:.0f} GB/s)")
            for name, value in v.items():
                if name.endswith("_ms") and name != "sum_ms":
                    exact = v.get(name[:-3] + "_exact")
                    shown = f"{value:.3f}" if isinstance(value, float) else value
                    print(f"  {name[:-3]:<24} {shown} ms{'' if exact in (None, True) else '  MISMATCH'}")
    return result


if __name__ == "__main__":
    main()
