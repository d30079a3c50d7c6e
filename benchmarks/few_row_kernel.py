"""Benchmark: the few-row kernel (``auditor.models.skinny``) against torch's matrix product.

Runs every linear layer of the default model's layers up to the audited one (the products a
stopped audit forward runs) on ``R`` rows of activations, by the kernel and by ``F.linear``,
by the kernel again with the float32 weights where it reads their exact 4-bit form
(``skinny.packed``: the default model's weights come from a Q4_1 GGUF; ``skinny.unpacked``),
and the default SAE's full-width encoder product (``addmm`` with ``W_enc``; by the kernel from
``W_enc`` as stored, ``[d_in, d_sae]``, and from the transposed copy the SAE keeps), in turns, for
each ``R`` of ``--rows``; best of ``--repeats``. Shows where the kernel pays
(the auditor uses it up to ``skinny.MAX_ROWS`` rows) and the largest difference from torch's
results.

    PYTHONPATH=. python benchmarks/few_row_kernel.py [--rows 1,4,16,32,48,64,96,128,192,256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from auditor.models import parse_hookpoint, skinny  # noqa: E402
from auditor.pipeline import Auditor  # noqa: E402
from benchmarks.audit_throughput import round_robin  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,32,48,64,96,128,192,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = skinny.status()
    if not kernel["available"]:
        raise SystemExit(f"the few-row kernel cannot run here: {kernel['detail']}")
    auditor = Auditor.load()
    loaded = auditor.model
    depth = parse_hookpoint(auditor.hookpoint).layer
    weights = [
        module.weight
        for layer in range(depth + 1)
        for module in loaded.adapter.layer(loaded.model, layer).modules()
        if isinstance(module, torch.nn.Linear)
    ]
    w_enc, b_enc = auditor.sae.W_enc.detach(), auditor.sae.b_enc.detach()
    w_rows = auditor.sae._encoder_rows()  # W_enc transposed: what the SAE's encodes hand the kernel
    if w_rows is None:
        raise SystemExit("the default SAE keeps no transposed encoder here (not float32 on the CPU)")
    gen = torch.Generator().manual_seed(0)
    results = []
    for rows in [int(r) for r in args.rows.split(",") if r.strip()]:
        inputs = {k: torch.randn(rows, k, generator=gen) for k in {w.shape[1] for w in weights}}

        def by_torch() -> None:
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

        def by_kernel() -> None:
            for w in weights:
                skinny.linear(inputs[w.shape[1]], w)

        def by_kernel_float32() -> None:
            with skinny.unpacked():
                by_kernel()

        x_enc = torch.randn(rows, w_enc.shape[0], generator=gen)

        def enc_by_torch() -> None:
            torch.addmm(b_enc, x_enc, w_enc)

        def enc_by_kernel() -> None:
            skinny.encoder_product(b_enc, x_enc, w_enc)

        def enc_by_kernel_rows() -> None:
            skinny.encoder_product(b_enc, x_enc, w_enc, w_rows)

        with torch.inference_mode():
            t_torch, t_kernel, t_float32, t_enc_torch, t_enc_kernel, t_enc_rows = round_robin(
                [by_torch, by_kernel, by_kernel_float32, enc_by_torch, enc_by_kernel, enc_by_kernel_rows], args.repeats
            )
            got = [skinny.linear(inputs[w.shape[1]], w) for w in weights]
            diff = max(float((y - F.linear(inputs[w.shape[1]], w)).abs().max()) for w, y in zip(weights, got))
            with skinny.unpacked():
                from_float32 = [skinny.linear(inputs[w.shape[1]], w) for w in weights]
            same_bits = all(torch.equal(y, f) for y, f in zip(got, from_float32))
            enc = skinny.encoder_product(b_enc, x_enc, w_enc)
            enc_diff = float((enc - torch.addmm(b_enc, x_enc, w_enc)).abs().max()) if enc is not None else None
            enc_rows = skinny.encoder_product(b_enc, x_enc, w_enc, w_rows)
            rows_diff = float((enc_rows - torch.addmm(b_enc, x_enc, w_enc)).abs().max()) if enc_rows is not None else None
        results.append(
            {
                "rows": rows,
                "torch_s": t_torch,
                "kernel_s": t_kernel,
                "speedup": t_torch / t_kernel,
                "max_abs_diff": diff,
                # The kernel on the float32 weights (skinny.unpacked), and whether the results were the same to the bit.
                "kernel_float32_s": t_float32,
                "packed_same_bits": same_bits,
                # The SAE's full-width encode product (used up to MAX_ROWS rows; above, it declines and times nothing).
                "encoder_torch_s": t_enc_torch,
                "encoder_kernel_s": t_enc_kernel if enc is not None else None,
                "encoder_max_abs_diff": enc_diff,
                # The same product from W_enc transposed (SAE._encoder_rows), as the SAE's encodes run it.
                "encoder_kernel_rows_s": t_enc_rows if enc_rows is not None else None,
                "encoder_rows_max_abs_diff": rows_diff,
            }
        )
    # The row check alone that each product from a 4-bit form runs first (skinny.from_codes: one
    # row of the weight against its codes): the products called on no rows, with and without a row.
    fns = skinny.library()
    assert fns is not None
    forms = [(w, form) for w in weights if (form := skinny.packed(w)) is not None]

    def products(check: bool) -> Callable[[], None]:
        def run() -> None:
            for i, (w, form) in enumerate(forms):
                n, k = w.shape
                fns.linear_q4(None, w.data_ptr(), *(t.data_ptr() for t in form), None, None, 0, n, k, 1, 0, i % n if check else -1)

        return run

    t_unchecked, t_checked = round_robin([products(False), products(True)], max(args.repeats, 20))
    out = {
        "benchmark": "few_row_kernel",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
        "kernel": kernel,
        "max_rows": skinny.MAX_ROWS,
        "layers": depth + 1,
        "linear_layers": len(weights),
        "weights_mb": sum(w.numel() * w.element_size() for w in weights) / 1e6,
        "weights_4bit": sum(skinny.packed(w) is not None for w in weights),
        "packed_mb": sum(t.numel() * t.element_size() for w in weights for t in (skinny.packed(w) or ())) / 1e6,
        "encoder": {"d_in": w_enc.shape[0], "d_sae": w_enc.shape[1], "architecture": auditor.sae.cfg.architecture},
        # Seconds of one row check of every 4-bit weight (the products on no rows, less the same calls checking nothing).
        "row_checks": {"weights": len(forms), "seconds": t_checked - t_unchecked, "calls_unchecked_s": t_unchecked},
        "results": results,
    }
    print(json.dumps(out, indent=2))
    print()
    print(f"{len(weights)} linear layers ({out['weights_mb']:.0f} MB of float32 weights; {out['weights_4bit']} read in 4-bit form,"
          f" {out['packed_mb']:.0f} MB), {torch.get_num_threads()} threads")
    print(f"row checks of the {len(forms)} 4-bit weights (one row each, before their products): "
          f"{(t_checked - t_unchecked) * 1e6:.0f} us ({t_unchecked * 1e6:.0f} us the calls alone)")
    print(f"SAE encoder product: [rows, {w_enc.shape[0]}] x [{w_enc.shape[0]}, {w_enc.shape[1]}] + bias")
    print(f"{'rows':>5} {'torch ms':>9} {'kernel ms':>10} {'speedup':>8} {'max diff':>9} {'float32 w':>10} {'same':>5}"
          f"   {'encoder torch':>13} {'kernel':>7} {'transposed':>10}")
    for r in results:
        enc = f"{r['encoder_kernel_s'] * 1e3:>7.2f}" if r["encoder_kernel_s"] is not None else f"{'-':>7}"
        enc_rows = f"{r['encoder_kernel_rows_s'] * 1e3:>10.2f}" if r["encoder_kernel_rows_s"] is not None else f"{'-':>10}"
        print(
            f"{r['rows']:>5} {r['torch_s'] * 1e3:>9.1f} {r['kernel_s'] * 1e3:>10.1f} {r['speedup']:>7.2f}x {r['max_abs_diff']:>9.1e}"
            f" {r['kernel_float32_s'] * 1e3:>10.1f} {str(r['packed_same_bits']):>5}   {r['encoder_torch_s'] * 1e3:>13.2f} {enc} {enc_rows}"
        )
    return out


if __name__ == "__main__":
    main()
