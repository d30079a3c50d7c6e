"""The maxima of a matrix's rows in pieces, as one Triton kernel on CUDA.

The two-level top-k of a wide TopK SAE (:func:`auditor.sae.sae._row_topk_pieces`) starts with
the maxima of ``piece``-wide pieces of every row of the pre-activations ``[N, W]``: one read of
the matrix. torch's reduction is slow at such narrow rows on CUDA (an H100, 16,384 x 131,072
bfloat16: 17.7 ms for 16-wide pieces, against 1.5 ms for one read of the matrix), so this kernel
reads each program's 64 pieces as a ``[64, piece]`` tile and writes their maxima.

:func:`kernel` returns the function, or None where it cannot run: no Triton (it ships with
torch's CUDA builds), or ``AUDITOR_TOPK_TRITON=0``. The SAE then ranks in one level.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_ENV = "AUDITOR_TOPK_TRITON"
_PIECES_PER_PROGRAM = 64


@functools.cache
def kernel() -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """``piece_max(pre, piece)``: ``pre [N, W]`` (contiguous, ``W`` a multiple of ``piece``, a
    power of two) -> ``[N, W / piece]``, each piece's maximum; None without Triton."""
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        log.info("Triton is not installed: wide TopK SAEs rank their latents in one level on CUDA")
        return None

    @triton.jit
    def _piece_max(x_ptr, out_ptr, total, PIECE: tl.constexpr, PIECES: tl.constexpr):  # type: ignore[no-untyped-def]
        # 64-bit offsets: 16,384 rows of 131,072 latents are 2^31 elements.
        ids = tl.program_id(0).to(tl.int64) * PIECES + tl.arange(0, PIECES).to(tl.int64)
        offs = ids[:, None] * PIECE + tl.arange(0, PIECE)[None, :]
        x = tl.load(x_ptr + offs, mask=ids[:, None] < total, other=float("-inf"))
        tl.store(out_ptr + ids, tl.max(x, axis=1), mask=ids < total)

    def piece_max(pre: torch.Tensor, piece: int) -> torch.Tensor:
        n, w = pre.shape
        if not pre.is_contiguous() or w % piece or piece & (piece - 1):
            raise ValueError(f"piece_max needs a contiguous [N, W] with W a multiple of a power-of-two piece; got {tuple(pre.shape)}, {piece}")
        out = pre.new_empty((n, w // piece))
        total = out.numel()
        if total:
            _piece_max[(triton.cdiv(total, _PIECES_PER_PROGRAM),)](pre, out, total, PIECE=piece, PIECES=_PIECES_PER_PROGRAM)
        return out

    return piece_max
