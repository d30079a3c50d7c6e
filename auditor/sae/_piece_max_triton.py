"""The Triton kernel behind :mod:`auditor.sae.piece_max` (imported only where Triton is installed:
Triton resolves a kernel's helpers as module globals)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from auditor.sae.piece_max import DTYPES

PIECES_PER_PROGRAM = 64


@triton.jit
def _max_nan(a, b):  # type: ignore[no-untyped-def]
    # A NaN wins, as in torch.amax (tl.max's maximum would drop it): a piece holding one ranks
    # first, as torch.topk ranks NaN above every number.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _piece_max(x_ptr, out_ptr, total, PIECE: tl.constexpr, PIECES: tl.constexpr):  # type: ignore[no-untyped-def]
    # 64-bit offsets: 16,384 rows of 131,072 latents are 2^31 elements.
    ids = tl.program_id(0).to(tl.int64) * PIECES + tl.arange(0, PIECES).to(tl.int64)
    offs = ids[:, None] * PIECE + tl.arange(0, PIECE)[None, :]
    x = tl.load(x_ptr + offs, mask=ids[:, None] < total, other=float("-inf")).to(tl.float32)
    tl.store(out_ptr + ids, tl.reduce(x, 1, _max_nan), mask=ids < total)


def piece_max(pre: torch.Tensor, piece: int) -> torch.Tensor:
    """See :func:`auditor.sae.piece_max.kernel`."""
    n, w = pre.shape
    if not pre.is_contiguous() or w % piece or piece & (piece - 1):
        raise ValueError(
            f"piece_max needs a contiguous [N, W] with W a multiple of a power-of-two piece; got {tuple(pre.shape)}, {piece}"
        )
    if pre.dtype not in DTYPES:
        raise ValueError(f"piece_max compares in float32: {pre.dtype} values could tie there")
    out = pre.new_empty((n, w // piece))
    total = out.numel()
    if total:
        # Triton launches on the current device's current stream: make them the tensor's.
        with torch.cuda.device(pre.device) if pre.is_cuda else contextlib.nullcontext():
            _piece_max[(triton.cdiv(total, PIECES_PER_PROGRAM),)](pre, out, total, PIECE=piece, PIECES=PIECES_PER_PROGRAM)
    return out

