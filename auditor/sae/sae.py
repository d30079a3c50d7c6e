"""The canonical SAE: SAELens v6 parameters, one encode/decode for every architecture.

With ``x' = norm_in(x) - b_dec * apply_b_dec_to_input`` (``x`` is ``[N, d_in]``):

- standard:  ``f = relu(x' W_enc + b_enc)``
- jumprelu:  ``pre = x' W_enc + b_enc; f = relu(pre) * (pre > threshold)``
- batchtopk: stored as a JumpReLU whose ``threshold`` holds one global value in every
  slot (the inference rule of BatchTopK SAEs); ``architecture`` stays ``"batchtopk"``
  so the provenance survives and ``k`` is kept for reference, but encode is the
  jumprelu rule, so it is per token and needs no batch.
- gated:     ``f = (x' W_enc + b_gate > 0) * relu(x' (W_enc * exp(r_mag)) + b_mag)``
- topk:      ``pre = x' W_enc + b_enc``; keep the ``k`` largest per row, relu them,
  zero the rest.

Decode: ``x_hat = f W_dec + b_dec``, then undo ``norm_in``.

Normalization (``cfg.normalize_activations``):

- ``none``.
- ``expected_average_only_in``: ``x * s`` with the stored scalar
  ``s = cfg.activation_norm_scaling_factor``; decode divides by ``s``.
  :meth:`SAE.fold_activation_norm_scaling` folds ``s`` into the weights.
- ``constant_norm_rescale``: each row scaled to norm ``sqrt(d_in)``; decode multiplies
  by that row's ``||x|| / sqrt(d_in)``.
- ``layer_norm``: ``(x - mu) / (std + 1e-5)`` per row (unbiased std, as SAELens and
  OpenAI do); decode computes ``y * std + mu``.

The two per-row modes need the factors of the rows that were encoded, so
:meth:`SAE.encode_with_norm` returns them as a :class:`NormState` that
:meth:`SAE.decode` takes back. Nothing is stashed on the module, so one SAE can
serve concurrent requests. :meth:`SAE.forward` threads the state through.

Example::

    sae = SAE(SAEConfig(d_in=16, d_sae=64))
    f = sae.encode(x)                     # [N, 64]
    watched = sae.encode(x, [3, 7])       # [N, 2], reads only W_enc[:, [3, 7]]
    x_hat = sae(x)                        # [N, 16]
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from auditor.errors import SAEFormatError, UnknownKeyError
from auditor.models import skinny
from auditor.sae import piece_max
from auditor.sae.config import SAEConfig

__all__ = ["CFG_FILENAME", "WEIGHTS_FILENAME", "NormState", "SAE", "WatchedEncoding", "dtype_from_name", "param_shapes"]

# The parameters a per-latent encode reads, by architecture (TopK ranks every latent: none).
_PER_LATENT_PARAMS: dict[str, tuple[str, ...]] = {
    "standard": ("W_enc", "b_enc"),
    "jumprelu": ("W_enc", "b_enc", "threshold"),
    "batchtopk": ("W_enc", "b_enc", "threshold"),
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag"),
}
_COLUMNS_KEPT = 8  # watch-lists whose parameter columns an SAE keeps (see SAE._watch_columns)
_columns_lock = threading.Lock()

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
LAYER_NORM_EPS = 1e-5

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` or ``"torch.bfloat16"`` -> ``torch.bfloat16``; a torch dtype passes through."""
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise UnknownKeyError("dtype", name, _DTYPES)
    return _DTYPES[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class NormState(NamedTuple):
    """How to undo ``norm_in`` for the rows just encoded: ``x = y * scale + shift``."""

    scale: Tensor
    """``[N, 1]`` per-row factor (or a 0-d tensor for a global one)."""
    shift: Tensor
    """``[N, 1]`` per-row offset (or a 0-d zero)."""


class WatchedEncoding(NamedTuple):
    """What :meth:`SAE.encode_watched` returns."""

    features: Tensor
    """``[N, U]`` the requested latents, in the order asked for."""
    state: NormState
    """How to undo the input normalization (for :meth:`SAE.decode` or steering deltas)."""
    recon_error: Tensor | None
    """``[N]`` relative reconstruction error ``||x - x_hat|| / ||x||`` when asked for."""
    full: Tensor | None
    """``[N, d_sae]`` every latent, when asked for."""


def _relative_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """``||x - x_hat|| / ||x||`` per row ``[N]``; a zero row gives its absolute error (0 when exact)."""
    err = (x - x_hat).norm(dim=-1)
    norm = x.norm(dim=-1)
    return torch.where(norm > 0, err / norm.clamp_min(torch.finfo(x.dtype).tiny), err)


_FUSED_ADDMM_RELU = getattr(torch, "_addmm_activation", None)


def _few_row_product(
    bias: Tensor, x: Tensor, w: Tensor, rows: Callable[[], Tensor | None] | None = None
) -> Tensor | None:
    """``addmm(bias, x, w)`` over every latent by the auditor's few-row CPU kernel
    (:func:`auditor.models.skinny.encoder_product`: a few rows read ``W_enc`` at memory speed,
    where the BLAS product does not; ``rows()``, ``w`` transposed and contiguous, asked for only
    when the kernel runs, lets it read the weights as a linear layer's), or None where it does
    not apply (then torch's runs)."""
    return skinny.encoder_product(bias, x, w, rows) if x.device.type == "cpu" else None


_ENCODER_ROWS_MAX_BYTES = 128 << 20  # W_enc kept transposed for the few-row kernel up to this size


def _addmm_relu(bias: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """``relu(x @ w + bias)``: on CUDA bias and ReLU run in the GEMM's epilogue (one pass over the output)."""
    if _FUSED_ADDMM_RELU is not None and x.is_cuda:
        return _FUSED_ADDMM_RELU(bias, x, w)
    return torch.addmm(bias, x, w).relu_()


# bfloat16 activations meet float32 weights: the watch-list GEMM runs on the tensor cores as
# one bfloat16 GEMM against the weights split into three bfloat16 terms (see _split_bf16).
_SPLIT_TERMS = 3
_SPLIT_DEVICES = frozenset({"cuda"})  # where SAE.encode_watched takes bfloat16 activations as they come
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) (CUDA, torch >= 2.8)
_SPLIT_KEY = "W_enc:bf16-terms"  # the split columns' entry in a watch-list's kept columns
_OFFSET_KEY = "b_dec:offset"


def _split_bf16(w: Tensor, terms: int = _SPLIT_TERMS, align: int = 8) -> Tensor:
    """float32 ``w [d, L]`` as ``terms`` bfloat16 matrices side by side, ``[d, terms * L']``: each
    the bfloat16 rounding of what the earlier ones left of ``w`` (the remainder is exact in
    float32), ``L`` padded with zero columns to ``L'``, a multiple of ``align`` (GEMMs whose
    rows are not 16-byte aligned run on slow kernels). Three terms carry 24 significant bits,
    float32's own, and bfloat16 has float32's exponent range: their sum is ``w`` to the last bit
    for magnitudes from about 2^-100 (below, the last term falls among bfloat16's subnormals: an
    error under 1e-40) up to float32's largest values (which round to infinity in bfloat16)."""
    d, width = w.shape
    out = w.new_zeros((d, terms, -(-width // align) * align), dtype=torch.bfloat16)
    rest = w
    for t in range(terms):
        out[:, t, :width] = term = rest.to(torch.bfloat16)
        rest = rest - term.float()
    return out.view(d, -1)


def _split_mm(x: Tensor, split: Tensor, width: int, terms: int = _SPLIT_TERMS) -> Tensor:
    """``x [N, d]`` (bfloat16) times the float32 ``[d, width]`` matrix that ``split``
    (:func:`_split_bf16`) holds, in float32: one bfloat16 GEMM accumulating in float32 (on CUDA
    with ``out_dtype``, on the tensor cores), then the terms summed. Every product of a bfloat16
    ``x`` and a term is exact in float32, so this is a float32 GEMM up to the order of its sums;
    elsewhere the same products run as a float32 GEMM (what the tests compare against)."""
    if x.is_cuda:
        y = torch.mm(x, split, out_dtype=torch.float32)
    else:
        y = x.float() @ split.float()
    # The terms' width spelled out: a view with -1 cannot infer it for zero rows.
    return y.view(y.shape[0], terms, split.shape[1] // terms).sum(1)[:, :width]


_TOPK_BLOCK = 64  # block width on the CPU (benchmarks/topk_rows.py)
_BLOCK_TOPK_MIN_WIDTH = 16384  # on the CPU
_BLOCK_TOPK_MIN_WIDTH_GPU = 65536  # on CUDA: measured at 65,536 and 131,072 latents (gpu_llama8b.py --encode-variants)


def _cuda_topk_widths(width: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """Block and piece widths of the block-maxima top-k on CUDA (piece 0: one level). Timed on an
    H100, 16,384 rows, k=64, bfloat16 (``benchmarks/topk_rows.py --variants``; 131,072 / 65,536
    latents): with the pieces' maxima as a Triton kernel (:mod:`auditor.sae.piece_max`), 256-wide
    blocks of 32-wide pieces, 3.4 / 2.3 ms (16-wide pieces 3.9 / 2.6); without it one level, 256
    / 128-wide blocks, 6.7 / 4.9 ms. torch's own maxima of 16-wide pieces take 17.7 ms at 131,072
    latents (256-wide blocks: 3.3), so two levels run only with the kernel
    (:func:`auditor.sae.piece_max.usable` for ``dtype``)."""
    if piece_max.usable(dtype):
        return 256, 32
    return (256 if width >= 131072 else 128), 0


def _row_topk(
    pre: Tensor, k: int, *, blocks: bool | None = None, block: int | None = None, sub: int | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest values of each row of ``pre [N, W]`` and their column indices (both ``[N, k]``).

    For wide rows (``W >= 16,384`` on the CPU, ``W >= 65,536`` on CUDA) the maxima of blocks of
    ``block`` columns pick the ``k`` blocks that can hold the top ``k`` (an element outside them has
    ``k`` block maxima at least as large), and only those ``block * k`` candidates are ranked: the
    same values as :func:`torch.topk`, 1.3-2.2x faster on the CPU with 64-wide blocks
    (``benchmarks/topk_rows.py``) and 1.6x (65,536, 128-wide) / 2.7x (131,072, 256-wide) on an
    H100 at 16,384 rows; in two levels with the Triton pieces' maxima 3.4x / 5.3x (``topk_rows.py
    --device cuda --dtype bfloat16 --variants``). With ``sub`` (a divisor of
    ``block``) the row is read once for the maxima of ``sub``-wide pieces, the blocks' maxima
    come from those, and the same argument applied to the pieces of the ``k`` chosen blocks picks
    ``k`` pieces: only ``sub * k`` elements are ranked (:func:`_row_topk_pieces`). Narrower rows
    and other devices use :func:`torch.topk`. ``blocks`` forces the choice (True still needs a
    width that is a multiple of ``block`` and above ``block * k``); ``block`` and ``sub``
    override the widths (``sub=0``: one level).
    """
    n, w = pre.shape
    cuda = pre.device.type == "cuda"
    if blocks is None:
        if pre.device.type == "cpu":
            blocks = w >= _BLOCK_TOPK_MIN_WIDTH
        else:
            blocks = cuda and w >= _BLOCK_TOPK_MIN_WIDTH_GPU
    cuda_block, cuda_sub = _cuda_topk_widths(w, pre.dtype) if cuda else (_TOPK_BLOCK, 0)
    block = cuda_block if block is None else block
    if not blocks or w % block or k * block >= w:
        top = pre.topk(k, dim=-1)
        return top.values, top.indices
    if sub is None:
        sub = cuda_sub
    if sub and sub < block and block % sub == 0:
        usable = cuda and pre.is_contiguous() and not sub & (sub - 1) and piece_max.usable(pre.dtype)
        fast = piece_max.kernel() if usable else None
        return _row_topk_pieces(pre, k, block, sub, fast)
    grid = pre.view(n, w // block, block)
    chosen = grid.amax(-1).topk(k, dim=-1).indices  # [N, k] blocks
    top = _pick(grid, chosen).topk(k, dim=-1)
    # Candidate j is element j % block of chosen block j // block.
    cols = chosen.gather(1, top.indices.div(block, rounding_mode="floor")) * block + top.indices.remainder(block)
    return top.values, cols


def _pick(groups: Tensor, chosen: Tensor) -> Tensor:
    """The groups ``chosen [N, k]`` of ``groups [N, G, width]``, side by side: ``[N, k * width]``
    (candidate ``j`` is element ``j % width`` of group ``chosen[:, j // width]``)."""
    n, k = chosen.shape
    width = groups.shape[-1]
    return groups.gather(1, chosen.unsqueeze(-1).expand(n, k, width)).reshape(n, k * width)


def _row_topk_pieces(
    pre: Tensor, k: int, block: int, sub: int, maxima_of: Callable[[Tensor, int], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`_row_topk` in two levels: ``pre [N, W]`` read once for the maxima of its
    ``sub``-wide pieces; the blocks' maxima (``block // sub`` pieces each) choose ``k`` blocks,
    whose pieces' maxima choose ``k`` pieces (the ``k`` largest piece maxima of the row: a piece
    outside the chosen blocks has ``k`` block maxima, each some piece's maximum, at least as
    large), and the ``sub * k`` elements of those pieces hold the row's top ``k`` values (an
    element outside them has ``k`` piece maxima at least as large). ``maxima_of(pre, sub)``
    replaces how the pieces' maxima ``[N, W / sub]`` are computed."""
    n, w = pre.shape
    per = block // sub
    pieces = pre.view(n, w // sub, sub)
    maxima = pieces.amax(-1) if maxima_of is None else maxima_of(pre, sub)  # [N, W / sub]: the one pass over the row
    by_block = maxima.view(n, w // block, per)
    chosen_blocks = by_block.amax(-1).topk(k, dim=-1).indices  # [N, k]
    cand_max = _pick(by_block, chosen_blocks)  # [N, k * per] piece maxima
    top_pieces = cand_max.topk(k, dim=-1).indices
    chosen = chosen_blocks.gather(1, top_pieces.div(per, rounding_mode="floor")) * per + top_pieces.remainder(per)
    cand = _pick(pieces, chosen)  # [N, k * sub] elements
    top = cand.topk(k, dim=-1)
    cols = chosen.gather(1, top.indices.div(sub, rounding_mode="floor")) * sub + top.indices.remainder(sub)
    return top.values, cols


def _non_finite(name: str, stored: Tensor, loaded: Tensor) -> str:
    """Why the parameter ``name`` is refused: NaN/inf in the file, or an overflow of the chosen dtype."""
    if bool(torch.isfinite(stored).all()):
        peak = float(stored.detach().abs().max())
        return (
            f"tensor {name!r} overflows {_dtype_name(loaded.dtype)} (values up to {peak:.3g}); "
            "load it in float32 or bfloat16 (dtype=...)"
        )
    bad = int((~torch.isfinite(stored)).sum())
    return (
        f"tensor {name!r} has NaN or infinite values ({bad} of {stored.numel()}); the weights are "
        "broken (a diverged training run or a damaged export): re-export or re-download the SAE"
    )


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes for ``cfg.architecture``."""
    shapes: dict[str, tuple[int, ...]] = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (cfg.d_sae,)
    if cfg.architecture == "gated":
        # SAELens gated SAEs have no b_enc: the gate and magnitude paths carry their own biases.
        del shapes["b_enc"]
        shapes.update({"b_gate": (cfg.d_sae,), "r_mag": (cfg.d_sae,), "b_mag": (cfg.d_sae,)})
    return shapes


class SAE(nn.Module):
    """A sparse autoencoder in canonical (SAELens v6) form; see the module docstring."""

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        torch_dtype = dtype_from_name(dtype if dtype is not None else cfg.dtype)
        for name, shape in param_shapes(cfg).items():
            tensor = torch.zeros(shape, device=device, dtype=torch_dtype)
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tensors(
        cls,
        cfg: SAEConfig,
        tensors: Mapping[str, Tensor],
        *,
        source: str = "<tensors>",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> SAE:
        """Build an SAE from canonical tensors, checking names and shapes.

        Missing or extra keys, wrong shapes and NaN or infinite values (also those that a
        narrower ``dtype`` overflows to) raise :class:`SAEFormatError` naming ``source`` (the
        file they came from). ``dtype`` defaults to the tensors' own.
        """
        shapes = param_shapes(cfg)
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise SAEFormatError(
                source,
                f"missing tensors {missing} for a {cfg.architecture!r} SAE "
                f"(found {sorted(tensors)})",
            )
        extra = sorted(set(tensors) - set(shapes))
        if extra:
            raise SAEFormatError(
                source,
                f"unexpected tensors {extra} for a {cfg.architecture!r} SAE "
                f"(expected {sorted(shapes)})",
            )
        for name, shape in shapes.items():
            if not isinstance(tensors[name], Tensor):
                raise SAEFormatError(source, f"{name!r} is a {type(tensors[name]).__name__}, not a tensor")
            got = tuple(tensors[name].shape)
            if got != shape:
                raise SAEFormatError(
                    source,
                    f"tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                    f"(d_in={cfg.d_in}, d_sae={cfg.d_sae})",
                )
        chosen = dtype if dtype is not None else tensors["W_enc"].dtype
        torch_dtype = dtype_from_name(chosen)
        cfg = cfg.model_copy(update={"dtype": _dtype_name(torch_dtype)})
        sae = cls(cfg, device="meta")
        for name in shapes:
            value = tensors[name].detach().to(device=device, dtype=torch_dtype).contiguous()
            # One reduction per tensor: a NaN or inf weight would turn every encode into NaN.
            if not bool(torch.isfinite(value).all()):
                raise SAEFormatError(source, _non_finite(name, tensors[name], value))
            setattr(sae, name, nn.Parameter(value, requires_grad=False))
        return sae

    # ------------------------------------------------------------------ normalization

    def norm_in(self, x: Tensor) -> tuple[Tensor, NormState]:
        """Normalize ``x [N, d_in]``; return it with the state that :meth:`decode` undoes."""
        mode = self.cfg.normalize_activations
        if mode == "none":
            return x, self._global_state(x, 1.0)
        if mode == "expected_average_only_in":
            factor = self.cfg.activation_norm_scaling_factor
            if factor is None:  # excluded by SAEConfig's validator; kept for the type checker
                raise ValueError("activation_norm_scaling_factor is not set")
            return x * factor, self._global_state(x, 1.0 / factor)
        zero = x.new_zeros(())
        if mode == "constant_norm_rescale":
            # A zero row (e.g. padding) stays zero instead of turning into NaN.
            norm = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps)  # [N, 1]
            coeff = math.sqrt(self.cfg.d_in) / norm
            return x * coeff, NormState(norm / math.sqrt(self.cfg.d_in), zero)
        mu = x.mean(dim=-1, keepdim=True)  # [N, 1]
        centered = x - mu
        std = centered.std(dim=-1, keepdim=True)  # [N, 1]
        return centered / (std + LAYER_NORM_EPS), NormState(std, mu)

    def _global_state(self, x: Tensor, scale: float) -> NormState:
        """The state of a global (or no) normalization: 0-d ``scale`` and zero, made once per device
        and dtype (per-token calls while decoding would otherwise launch two fills each)."""
        key = (x.device, x.dtype, scale)
        cache: dict[tuple[torch.device, torch.dtype, float], NormState] = self.__dict__.setdefault("_state_cache", {})
        state = cache.get(key)
        if state is None:
            state = cache[key] = NormState(torch.tensor(scale, dtype=x.dtype, device=x.device), x.new_zeros(()))
        return state

    def _needs_row_state(self) -> bool:
        return self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm")

    # ------------------------------------------------------------------ encode

    def _feature_index(self, features: Tensor | Sequence[int]) -> Tensor:
        idx = torch.as_tensor(features, dtype=torch.long, device=self.W_enc.device).reshape(-1)
        # Range check on CPU only: on an accelerator it would force a sync per encode, and
        # index_select rejects bad indices there anyway.
        if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.d_sae):
            raise IndexError(
                f"feature indices must be in [0, {self.cfg.d_sae}); got "
                f"min {int(idx.min())}, max {int(idx.max())}"
            )
        return idx

    def _watch_columns(self, features: Tensor | Sequence[int]) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The latent indices of ``features`` and, for per-latent architectures, the columns of
        the parameters an encode reads (``W_enc``, biases, thresholds) at those indices.

        Gathering ``d_in x len(features)`` scattered columns costs more than the watch-list
        matmul itself on a CPU (a 576 x 75 gather from 4,608-wide rows: ~0.15 ms, against 0.02 ms
        for the matmul of a 28-token text), so for a watch-list tensor that callers pass again and
        again (a policy's ``watched``) the columns are kept, together with that very tensor,
        and used while neither it nor the parameters have changed (same storage, no in-place
        write: tensors' version counters). Lists, and inference-mode tensors (which keep no
        version counter), are gathered on every call. A TopK SAE keeps the checked index alone.
        """
        names = _PER_LATENT_PARAMS.get(self.cfg.architecture)
        params = [getattr(self, name) for name in names] if names else []
        # The kept columns also hold the bfloat16 split (_split_columns), which folds in -b_dec W_enc
        # and the input scale: b_dec and those settings are part of the stamp too.
        stamped = [*params, self.b_dec] if names else params
        cfg = self.cfg
        stamp: tuple[object, ...] | None = None
        cache: dict[int, tuple[Tensor, tuple[object, ...], Tensor, dict[str, Tensor] | None]] | None = None
        if isinstance(features, Tensor) and not features.is_inference() and not any(p.is_inference() for p in stamped):
            stamp = (
                features._version,
                features.device,
                cfg.normalize_activations,
                cfg.activation_norm_scaling_factor,
                cfg.apply_b_dec_to_input,
                *((p.data_ptr(), p._version) for p in stamped),
            )
            cache = self.__dict__.setdefault("_columns_cache", {})
            hit = cache.get(id(features))
            if hit is not None and hit[0] is features and hit[1] == stamp:
                return hit[2], hit[3]
        idx = self._feature_index(features)
        cols = None
        if names:
            # Outside inference mode: the kept columns must serve later calls made without it too.
            with torch.inference_mode(False):
                cols = {name: p.detach().index_select(-1, idx) for name, p in zip(names, params)}
        # TopK reads no columns, but keeping its checked index saves the range check per call.
        if cache is not None and stamp is not None:
            with _columns_lock:
                while len(cache) >= _COLUMNS_KEPT:
                    cache.pop(next(iter(cache)))
                cache[id(features)] = (features, stamp, idx, cols)
        return idx, cols

    def _encode_normed(self, xn: Tensor, idx: Tensor | None, cols: dict[str, Tensor] | None = None) -> Tensor:
        """Encode already-normalized rows ``xn [N, d_in]``; ``idx`` picks latents (``cols``: the
        per-latent parameters' columns at ``idx``, from :meth:`_watch_columns`)."""
        xn = self._centered(xn)
        arch = self.cfg.architecture
        if arch == "topk":
            # Top-k ranks all latents, so a watch-list encode still needs every pre-activation.
            indices, values = self._topk_normed(xn)
            return self._dense(indices, values) if idx is None else self._picked(indices, values, idx)

        # The other rules are per latent: slice the W_enc columns before the matmul.
        def pick(t: Tensor, name: str) -> Tensor:
            if idx is None:
                return t
            return cols[name] if cols is not None else t.index_select(-1, idx)

        # addmm puts the bias in the matmul (cuBLAS applies it in the GEMM epilogue); the
        # activation then runs in place: one [N, n_latents] tensor, written once, read once.
        few = _few_row_product(self.b_enc, xn, self.W_enc, self._encoder_rows) if idx is None and arch != "gated" else None  # [N, d_sae]
        if arch == "standard":
            if few is not None:
                return few.relu_()
            return _addmm_relu(pick(self.b_enc, "b_enc"), xn, pick(self.W_enc, "W_enc"))  # [N, n_latents]
        if arch in ("jumprelu", "batchtopk"):
            pre = few if few is not None else torch.addmm(pick(self.b_enc, "b_enc"), xn, pick(self.W_enc, "W_enc"))
            return pre.mul_(pre > pick(self.threshold, "threshold")).relu_()
        return self._rule(xn @ pick(self.W_enc, "W_enc"), pick)  # [N, n_latents]

    def _rule(self, proj: Tensor, pick: Callable[[Tensor, str], Tensor]) -> Tensor:
        """The latents from ``proj = x' W_enc`` (float32, no bias yet; written in place);
        ``pick(param, name)`` gives a per-latent parameter's watched columns."""
        arch = self.cfg.architecture
        if arch == "standard":
            return proj.add_(pick(self.b_enc, "b_enc")).relu_()
        if arch in ("jumprelu", "batchtopk"):
            pre = proj.add_(pick(self.b_enc, "b_enc"))
            return pre.mul_(pre > pick(self.threshold, "threshold")).relu_()
        gate = (proj + pick(self.b_gate, "b_gate")) > 0
        # x' (W_enc * exp(r_mag)) == (x' W_enc) * exp(r_mag): reuse the one projection.
        return torch.addcmul(pick(self.b_mag, "b_mag"), proj, torch.exp(pick(self.r_mag, "r_mag"))).relu_().mul_(gate)

    def _splits(self, x: Tensor) -> bool:
        """Whether a watch-list encode of ``x`` runs as :func:`_split_mm`: bfloat16 rows on a device
        of ``_SPLIT_DEVICES`` (CUDA, with torch's ``mm(..., out_dtype=)``), float32 weights on that
        device, a per-latent rule and a normalization that is one scalar (folded into the split
        columns) or none. Casting the rows to float32 instead would run the GEMM on CUDA's
        float32 cores, several times slower than the tensor cores at these shapes."""
        return (
            x.dtype == torch.bfloat16
            and x.device.type in _SPLIT_DEVICES
            and (_MM_OUT_DTYPE or not x.is_cuda)
            and x.device == self.W_enc.device
            and self.W_enc.dtype == torch.float32
            and self.cfg.architecture != "topk"
            and self.cfg.normalize_activations in ("none", "expected_average_only_in")
        )

    def _split_columns(self, cols: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The watched ``W_enc`` columns with the input scale folded in, split into bfloat16 terms,
        and ``-b_dec W_enc`` when ``b_dec`` is subtracted from the input (``x' W = (s x) W - b_dec
        W``); kept in ``cols`` (a watch-list's kept columns, :meth:`_watch_columns`)."""
        split = cols.get(_SPLIT_KEY)
        if split is not None:
            return split, cols.get(_OFFSET_KEY)
        with torch.inference_mode(False):  # kept for calls made outside inference mode too
            w = cols["W_enc"]
            scale = self.cfg.activation_norm_scaling_factor
            split = _split_bf16(w * scale if self.cfg.normalize_activations == "expected_average_only_in" else w)
            offset = -(self.b_dec.detach() @ w) if self.cfg.apply_b_dec_to_input else None
        # Threads share the kept columns: the offset goes in first, so that a thread that finds the
        # split also finds its offset (the other way round, it could read the split alone).
        if offset is not None:
            cols[_OFFSET_KEY] = offset
        cols[_SPLIT_KEY] = split
        return split, offset

    def _encode_split(self, x: Tensor, features: Tensor | Sequence[int]) -> tuple[Tensor, NormState]:
        """The latents ``features`` of bfloat16 rows ``x`` (:meth:`_splits`) and their norm state."""
        self._check_rows(x)
        cols = self._watch_columns(features)[1]
        assert cols is not None  # per-latent rules keep columns
        split, offset = self._split_columns(cols)
        proj = _split_mm(x, split, cols["W_enc"].shape[1])
        if offset is not None:
            proj.add_(offset)
        factor = self.cfg.activation_norm_scaling_factor
        scale = 1.0 / factor if self.cfg.normalize_activations == "expected_average_only_in" and factor is not None else 1.0
        return self._rule(proj, lambda t, name: cols[name]), self._global_state(self.W_enc, scale)

    def _check_rows(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected activations [N, {self.cfg.d_in}], got {list(x.shape)}")

    def _input(self, x: Tensor) -> Tensor:
        """``x`` checked to be ``[N, d_in]`` and cast to the SAE's dtype and device."""
        self._check_rows(x)
        return x.to(dtype=self.W_enc.dtype, device=self.W_enc.device)

    def _centered(self, xn: Tensor) -> Tensor:
        """Normalized rows with ``b_dec`` subtracted when the SAE applies it to its input."""
        return xn - self.b_dec if self.cfg.apply_b_dec_to_input else xn

    def _topk_normed(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        """TopK codes of normalized rows whose ``b_dec`` is already subtracted: indices, relu'd values ``[N, k]``."""
        return self._topk_of(self._topk_pre(xn))

    def _topk_pre(self, xn: Tensor) -> Tensor:
        """A TopK SAE's pre-activations ``[N, d_sae]`` of normalized, centered rows."""
        pre = _few_row_product(self.b_enc, xn, self.W_enc, self._encoder_rows)  # [N, d_sae]
        return pre if pre is not None else torch.addmm(self.b_enc, xn, self.W_enc)

    def _global_scale(self) -> float | None:
        """What :meth:`decode` multiplies by to undo a global (or no) input normalization, or
        None for a per-row one; the same float32 number :meth:`norm_in`'s state holds."""
        mode, factor = self.cfg.normalize_activations, self.cfg.activation_norm_scaling_factor
        kept = self.__dict__.get("_scale_kept")
        if kept is not None and kept[0] == (mode, factor):
            return kept[1]
        scale = None
        if mode == "none":
            scale = 1.0
        elif mode == "expected_average_only_in" and factor is not None:
            scale = float(torch.tensor(1.0 / factor, dtype=torch.float32))
        self.__dict__["_scale_kept"] = ((mode, factor), scale)
        return scale

    def _topk_k(self) -> int:
        return min(self.cfg.k if self.cfg.k is not None else self.cfg.d_sae, self.cfg.d_sae)

    def _topk_of(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = _row_topk(pre, self._topk_k())
        return indices, torch.relu(values)

    _KEPT = ("_encoder_rows_kept", "_columns_cache", "_slot_kept")  # what an SAE derives and keeps

    def _drop_kept(self) -> None:
        """Forget what was derived from the weights (:meth:`_encoder_rows`, :meth:`_watch_columns`)."""
        for name in self._KEPT:
            self.__dict__.pop(name, None)

    def __getstate__(self) -> dict[str, object]:
        # Pickles and deep copies leave the kept copies out: they are remade on first use.
        state = super().__getstate__()  # type: ignore[misc]
        return {k: v for k, v in state.items() if k not in self._KEPT}

    def _encoder_rows(self) -> Tensor | None:
        """``W_enc`` transposed and contiguous, ``[d_sae, d_in]``, for the CPU few-row kernel: it
        reads that layout as a linear layer's weight, one row per latent, 1.5x faster than the
        ``[d_in, d_sae]`` layout at 21 rows (2.1 against 3.2 ms for the shipped 576 x 4,608 encoder
        right after a forward; ``benchmarks/few_row_kernel.py``). Kept while ``W_enc`` is unchanged
        (same storage, no in-place write that its version counter sees: writes through ``.data``
        or a NumPy view are not seen, as for :meth:`_watch_columns`; ``.to()`` and the like drop
        it); None off the CPU, for a ``W_enc`` above 128 MiB (the copy would double the SAE's
        largest tensor), for an inference tensor (no version counter to tell a change by), and in
        code ``torch.compile`` traces (which runs torch's product)."""
        w = self.W_enc
        if torch.compiler.is_compiling() or w.device.type != "cpu" or w.dtype != torch.float32 or w.is_inference():
            return None
        if w.numel() * w.element_size() > _ENCODER_ROWS_MAX_BYTES:
            return None
        stamp = (w.data_ptr(), w._version, tuple(w.shape), w.stride())
        kept = self.__dict__.get("_encoder_rows_kept")
        if kept is not None and kept[0] == stamp:
            return kept[1]
        with torch.inference_mode(False), torch.no_grad():
            rows = w.detach().t().contiguous()
        self.__dict__["_encoder_rows_kept"] = (stamp, rows)
        return rows

    def _dense(self, indices: Tensor, values: Tensor) -> Tensor:
        """TopK codes ``indices`` / ``values [N, k]`` as the dense ``[N, d_sae]`` (zeros elsewhere)."""
        return values.new_zeros((values.shape[0], self.cfg.d_sae)).scatter_(-1, indices, values)

    def _picked(self, indices: Tensor, values: Tensor, idx: Tensor) -> Tensor:
        """TopK codes ``indices`` / ``values [N, k]`` at the latents ``idx [m]``: ``[N, m]``, what
        ``_dense(indices, values).index_select(-1, idx)`` gives, without the ``[N, d_sae]`` codes
        (4.3 GB for 16,384 tokens of a 131k-latent SAE in bfloat16). Each latent gets a slot (one
        of its places in ``idx``; slot ``m`` for the unwatched), the codes are scattered into
        ``[N, m + 1]`` slots, and each place of ``idx`` reads its latent's slot (a latent listed
        twice reads the same slot twice)."""
        slot, m, place_slot = self._slot_table(idx)
        slots = values.new_zeros((values.shape[0], m + 1)).scatter_(-1, slot[indices], values)
        return slots.index_select(-1, place_slot)

    def _slot_table(self, idx: Tensor) -> tuple[Tensor, int, Tensor]:
        """:meth:`_picked`'s slots: each latent's ``[d_sae]`` (``m = idx.numel()`` for the
        unwatched), ``m``, and the slot each place of ``idx`` reads ``[m]``. Kept for the last
        ``idx`` tensor (a policy's watch-list index, which :meth:`_watch_columns` keeps, is the same
        object call after call) while its version is unchanged; an inference tensor's every call."""
        kept = self.__dict__.get("_slot_kept")
        version = None if idx.is_inference() else idx._version
        if kept is not None and kept[0] is idx and version is not None and kept[1] == version and kept[2] == self.cfg.d_sae:
            return kept[3]
        m = idx.numel()
        # Normal tensors even when made in inference mode: kept, they may serve a later call
        # that records a graph for backward (as _watch_columns' columns).
        with torch.inference_mode(False):
            slot = torch.full((self.cfg.d_sae,), m, dtype=torch.long, device=idx.device)
            slot[idx] = torch.arange(m, device=idx.device)
            # index_select rejects an index out of range (-1 included), as the dense path's does:
            # on an accelerator _feature_index leaves that check to it.
            table = (slot, m, slot.index_select(0, idx))
        if version is not None:
            self.__dict__["_slot_kept"] = (idx, version, self.cfg.d_sae, table)
        return table

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor, NormState]:
        """A TopK SAE's codes in sparse form: ``indices [N, k]``, ``values [N, k]`` and the norm state.

        ``values`` may hold zeros (a negative pre-activation among the top k). The dense
        :meth:`encode` equals scattering ``values`` at ``indices`` into zeros; :meth:`decode_sparse`
        reconstructs from these rows of ``W_dec`` alone.
        """
        if self.cfg.architecture != "topk":
            raise ValueError(f"encode_topk needs a topk SAE, this one is {self.cfg.architecture!r}")
        x = self._input(x)
        xn, state = self.norm_in(x)
        indices, values = self._topk_normed(self._centered(xn))
        return indices, values, state

    def decode_sparse(self, indices: Tensor, values: Tensor, norm: NormState | None = None) -> Tensor:
        """:meth:`decode` of codes given as ``indices`` / ``values [N, k]`` (zeros elsewhere).

        Reads only the ``k`` addressed rows of ``W_dec`` per row (an ``embedding_bag``), so a
        TopK reconstruction costs ``k / d_sae`` of the dense one; equal to ``decode`` of the
        dense codes up to float summation order.
        """
        values = values.to(dtype=self.W_dec.dtype, device=self.W_dec.device)
        y = torch.nn.functional.embedding_bag(
            indices.to(self.W_dec.device), self.W_dec, per_sample_weights=values, mode="sum"
        )
        return self._decode_out(y + self.b_dec, norm)

    def encode_with_norm(
        self, x: Tensor, features: Tensor | Sequence[int] | None = None
    ) -> tuple[Tensor, NormState]:
        """Like :meth:`encode`, also returning the :class:`NormState` that :meth:`decode` needs."""
        if features is not None and self._splits(x):
            return self._encode_split(x, features)
        x = self._input(x)
        xn, state = self.norm_in(x)
        if features is None:
            return self._encode_normed(xn, None), state
        return self._encode_normed(xn, *self._watch_columns(features)), state

    def encode_watched(
        self, x: Tensor, features: Tensor | Sequence[int], *, recon_error: bool = False, full: bool = False
    ) -> WatchedEncoding:
        """The latents ``features`` of ``x [N, d_in]``, plus what else one pass can give.

        The cheapest encode that serves the request: only the listed ``W_enc`` columns for
        per-latent architectures, unless the reconstruction error (``recon_error``, which
        needs every latent) or the full codes (``full``) are asked for, in which case one
        full encode serves all three; TopK always ranks every latent and reconstructs from
        its ``k`` codes (:meth:`decode_sparse`). The error is :meth:`reconstruction_error`'s.
        """
        if not (recon_error or full) and self._splits(x):
            return WatchedEncoding(*self._encode_split(x, features), None, None)
        x = self._input(x)
        idx, cols = self._watch_columns(features)
        dense: Tensor | None = None
        x_hat: Tensor | None = None
        if self.cfg.architecture == "topk" and not full:
            xn, state = self.norm_in(x)
            pre = self._topk_pre(self._centered(xn))
            scale = self._global_scale()
            if scale is not None:
                # A few CPU rows: the rest of the encode in one call of the kernel library (its
                # torch operations cost several times their work right after a forward).
                slot, m, place_slot = self._slot_table(idx)
                w_dec = self.W_dec if recon_error else None
                xc = x if x.is_contiguous() else x.contiguous()
                tail = skinny.topk_tail(pre, self._topk_k(), slot, m, place_slot, xc, w_dec, self.b_dec, scale)
                if tail is not None:
                    return WatchedEncoding(tail[0], state, tail[1], None)
            indices, values = self._topk_of(pre)
            picked = self._picked(indices, values, idx)
            if recon_error:
                x_hat = self.decode_sparse(indices, values, state)
        elif self.cfg.architecture == "topk":  # the full codes asked for too
            indices, values, state = self.encode_topk(x)
            dense = self._dense(indices, values)
            picked = dense.index_select(-1, idx)
            if recon_error:
                x_hat = self.decode_sparse(indices, values, state)
        elif recon_error or full:
            dense, state = self.encode_with_norm(x)
            picked = dense.index_select(-1, idx)
            if recon_error:
                x_hat = self.decode(dense, state)
        else:
            xn, state = self.norm_in(x)
            picked = self._encode_normed(xn, idx, cols)
        err = _relative_error(x, x_hat) if x_hat is not None else None
        return WatchedEncoding(picked, state, err, dense if full else None)

    def subset(self, features: Tensor | Sequence[int]) -> SAE:
        """An SAE of only the latents ``features``, in that order: its :meth:`encode` equals
        ``encode(x, features)`` and costs one matmul with no column gathering.

        For callers that encode the same watch-list many times (the steering hook, once per
        generated token): the columns are copied once, here. The copy does not follow later
        changes to this SAE's weights. TopK ranks every latent, so it has no subset.
        """
        if self.cfg.architecture == "topk":
            raise ValueError("a topk SAE ranks all latents per token; it cannot be cut to a subset of them")
        idx = self._feature_index(features)
        tensors = {
            name: p.detach() if name == "b_dec" else p.detach().index_select(1 if name == "W_enc" else 0, idx)
            for name, p in self.named_parameters()
        }
        # k is only provenance for the per-latent rules (batchtopk): it does not apply to a subset.
        cfg = self.cfg.model_copy(update={"d_sae": int(idx.numel()), "k": None})
        return SAE.from_tensors(cfg, tensors, source="<subset>", device=self.W_enc.device)

    def encode(self, x: Tensor, features: Tensor | Sequence[int] | None = None) -> Tensor:
        """Latent activations: ``x [N, d_in]`` -> ``[N, d_sae]``, or ``[N, len(features)]``.

        With ``features`` only those ``W_enc`` columns are multiplied (standard, jumprelu,
        batchtopk, gated). TopK must rank all latents, so it computes the full
        pre-activations and gathers the requested columns.
        """
        return self.encode_with_norm(x, features)[0]

    # ------------------------------------------------------------------ decode

    def decode(self, f: Tensor, norm: NormState | None = None) -> Tensor:
        """``f [N, d_sae]`` -> ``x_hat [N, d_in]``: ``f W_dec + b_dec``, then undo ``norm_in``.

        ``norm`` comes from :meth:`encode_with_norm`; it is required for
        ``constant_norm_rescale`` and ``layer_norm`` (per-row factors), optional otherwise.
        """
        f = f.to(dtype=self.W_dec.dtype, device=self.W_dec.device)
        return self._decode_out(f @ self.W_dec + self.b_dec, norm)  # [N, d_in]

    def _decode_out(self, y: Tensor, norm: NormState | None) -> Tensor:
        """Undo ``norm_in`` on a reconstruction ``y`` in the SAE's input space."""
        if norm is None:
            if self._needs_row_state():
                raise ValueError(
                    f"decode with normalize_activations={self.cfg.normalize_activations!r} "
                    "needs the NormState returned by encode_with_norm"
                )
            if self.cfg.normalize_activations == "expected_average_only_in":
                factor = self.cfg.activation_norm_scaling_factor
                return y if factor is None else y / factor
            return y
        return y * norm.scale + norm.shift

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``decode(encode(x))`` of ``x [N, d_in]``."""
        f, state = self.encode_with_norm(x)
        return self.decode(f, state)

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """Relative error ``||x - x_hat|| / ||x||`` per row, ``[N]`` (0 for a zero row)."""
        x = x.to(dtype=self.W_enc.dtype, device=self.W_enc.device)
        return _relative_error(x, self.forward(x))

    # ------------------------------------------------------------------ transforms

    @torch.no_grad()
    def fold_activation_norm_scaling(self) -> SAE:
        """Fold the ``expected_average_only_in`` factor ``s`` into the weights, in place.

        ``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``; pre-activations (hence thresholds,
        gates and biases) are unchanged. Afterwards ``normalize_activations`` is ``none``
        and encode/decode give the same results on raw activations.
        """
        factor = self.cfg.activation_norm_scaling_factor
        if self.cfg.normalize_activations != "expected_average_only_in" or factor is None:
            return self
        self.W_enc.mul_(factor)
        self.W_dec.div_(factor)
        self.b_dec.div_(factor)
        self.cfg = self.cfg.model_copy(
            update={"normalize_activations": "none", "activation_norm_scaling_factor": None}
        )
        return self

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep cfg.dtype in step with the weights after .to()/.half()/...; what was kept from the
        # old weights goes (.to() sets .data: the version counters do not move, and the new
        # storage may take the old one's address).
        self._drop_kept()
        out = super()._apply(fn, recurse)
        self.cfg = self.cfg.model_copy(update={"dtype": _dtype_name(self.W_enc.dtype)})
        return out

    # ------------------------------------------------------------------ files

    def tensors(self) -> dict[str, Tensor]:
        """Canonical parameters by SAELens name (the ``sae_weights.safetensors`` keys)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens v6 layout) into ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg.model_copy(update={"dtype": _dtype_name(self.W_enc.dtype)})
        (folder / CFG_FILENAME).write_text(
            json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
        )
        save_file(
            {k: v.cpu().contiguous() for k, v in self.tensors().items()},
            str(folder / WEIGHTS_FILENAME),
        )
        return folder

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> SAE:
        """Read a SAELens folder (v6 or pre-6.0 ``cfg.json``); see ``formats.saelens``."""
        from auditor.sae.formats.saelens import load_saelens

        return load_saelens(Path(path), device=device, dtype=dtype)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"architecture={c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, "
            f"normalize={c.normalize_activations}, hook={c.metadata.hook_name}"
        )
