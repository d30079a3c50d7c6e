"""The maxima of a matrix's rows in pieces, as one Triton kernel on CUDA.

The two-level top-k of a wide TopK SAE (:func:`auditor.sae.sae._row_topk_pieces`) starts with
the maxima of ``piece``-wide pieces of every row of the pre-activations ``[N, W]``: one read of
the matrix. torch's reduction is slow at such narrow rows on CUDA (an H100, 16,384 x 131,072
bfloat16: 17.7 ms for 16-wide pieces, against 1.5 ms for one read of the matrix), so this kernel
reads each program's 64 pieces as a ``[64, piece]`` tile and writes their maxima.

:func:`usable` says whether the SAE may rank in two levels with it: not without Triton (it ships
with torch's CUDA builds), with ``AUDITOR_TOPK_TRITON=0`` (read once, at the first wide TopK
encode on CUDA), for float64 (the kernel compares in float32, where float64 values can tie), or
once the kernel has failed to compile or launch (logged once). The SAE then ranks in one level.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_ENV = "AUDITOR_TOPK_TRITON"
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})  # exact in float32, where the kernel compares
_failed: list[BaseException] = []


@functools.cache
def kernel() -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """``piece_max(pre, piece)``: ``pre [N, W]`` (contiguous, on CUDA, one of :data:`DTYPES`, ``W``
    a multiple of ``piece``, a power of two) -> ``[N, W / piece]``, each piece's maximum (a NaN
    wins its piece, as in ``torch.amax``); None without Triton or with the switch off. After a
    failure it computes with ``torch.amax`` (correct, slow: :func:`usable` turns False)."""
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        from auditor.sae import _piece_max_triton
    except ImportError:
        log.info("Triton is not installed: wide TopK SAEs rank their latents in one level on CUDA")
        return None

    def piece_max(pre: torch.Tensor, piece: int) -> torch.Tensor:
        if not _failed:
            try:
                return _piece_max_triton.piece_max(pre, piece)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - a GPU or driver Triton cannot compile for
                _failed.append(exc)
                log.warning(
                    "the Triton kernel for wide TopK SAEs failed (%s: %s); they rank in one level from now on",
                    type(exc).__name__, exc,
                )
        n, w = pre.shape
        return pre.view(n, w // piece, piece).amax(-1)

    return piece_max


def usable(dtype: torch.dtype) -> bool:
    """Whether the two-level top-k may take :func:`kernel` for pre-activations of ``dtype``."""
    return dtype in DTYPES and not _failed and kernel() is not None
