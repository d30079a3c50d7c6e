"""Capture residual-stream activations at named hookpoints, stopping the forward early.

Example::

    acts = capture(model, input_ids, attention_mask, ["blocks.15.hook_resid_post"])
    acts["blocks.15.hook_resid_post"]  # [B, T, d_model]
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from auditor._cuda import to_device
from auditor.models import skinny
from auditor.models.adapters import ArchitectureAdapter, get_adapter
from auditor.models.hookpoints import Hookpoint
from auditor.models.hooks import hooks, resolve_hookpoints

__all__ = ["capture", "capture_packed", "pack_rows", "packing_supported", "position_ids_from_mask"]


class _StopForward(Exception):
    """Raised by the deepest capture hook to end the forward pass; never leaves :func:`capture`."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift them.

    ``attention_mask`` is ``[B, T]`` with 1 for real tokens; returns ``[B, T]`` int64 with
    the first real token of each row at position 0 (padding positions get 0).
    """
    mask = attention_mask.to(torch.long)
    return (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]


def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    hookpoints: Sequence[str | Hookpoint],
    *,
    stop_early: bool = True,
    adapter: ArchitectureAdapter | None = None,
    past_key_values: Any | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on a batch and return the activation ``[B, T, d_model]`` at each hookpoint.

    ``input_ids`` and ``attention_mask`` are ``[B, T]``; padding may be on either side.
    Position ids are derived from the mask, so a padded row gives the same activations on
    its real tokens as the row run alone. Activations at padding positions are set to 0.
    With ``stop_early`` the forward ends right after the deepest requested hookpoint, so
    later layers and the LM head never run. Hooks already installed with
    :func:`~auditor.models.hooks.hooks` (steering, for example) stay active and run
    before the capture hooks. Keys of the result are the canonical hookpoint names.

    ``past_key_values`` (a ``transformers`` cache, e.g. ``DynamicCache()``) continues a
    sequence: ``input_ids`` are then only the new tokens ``[B, T_new]``, the cache is
    extended in place, and ``attention_mask`` (if given) covers past and new tokens
    ``[B, T_past + T_new]``. With ``stop_early`` only the layers up to the deepest hooked
    one get cache entries, which is all later calls need as long as they stop there too.
    """
    adapter = adapter or get_adapter(model)
    points = list(dict.fromkeys(resolve_hookpoints(model, hookpoints, adapter)))
    if not points:
        return {}
    n_new = input_ids.shape[1]
    device = _device(model)
    # A batch without padding (no mask, or one known on the host) needs neither a mask nor
    # position ids: the model's causal attention and its own positions (0, 1, ...) give the same
    # activations, and no check on the device waits for the GPU (whether a mask can be dropped,
    # whether position ids restart for packed sequences: each reads a tensor back).
    padded = past_key_values is not None or (
        attention_mask is not None and (attention_mask.device.type != "cpu" or not bool(attention_mask.all()))
    )
    if not padded:
        captured = _run_capturing(model, points, adapter, stop_early, input_ids=to_device(input_ids, device), use_cache=False)
        return {p.name: captured[p.name] for p in points}
    if attention_mask is None:
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        attention_mask = torch.ones((input_ids.shape[0], past + n_new), dtype=torch.long, device=input_ids.device)
    positions = to_device(position_ids_from_mask(attention_mask)[:, -n_new:], device)
    attention_mask = to_device(attention_mask, device)
    captured = _run_capturing(
        model,
        points,
        adapter,
        stop_early,
        input_ids=to_device(input_ids, device),
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=past_key_values is not None,
        **({_cache_keyword(model): past_key_values} if past_key_values is not None else {}),
    )
    real = attention_mask[:, -n_new:].to(torch.bool).unsqueeze(-1)  # [B, T_new, 1]
    return {p.name: torch.where(real, captured[p.name], 0.0) for p in points}


def _run_capturing(
    model: nn.Module, points: list[Hookpoint], adapter: ArchitectureAdapter, stop_early: bool, **inputs: Any
) -> dict[str, torch.Tensor]:
    """Run ``model(**inputs)`` recording each hookpoint's output; with ``stop_early`` end after the deepest."""
    deepest = max(points, key=lambda p: p.depth)
    captured: dict[str, torch.Tensor] = {}

    def record(tensor: torch.Tensor, *, hook: Hookpoint) -> None:
        # Clone: the caller keeps these after later layers (or other hooks) have run.
        captured[hook.name] = tensor.detach().clone()
        if stop_early and hook == deepest:
            raise _StopForward

    # This thread's forward only: two threads auditing on one model must not record (or stop)
    # each other's forwards. Few-row products on the CPU take the auditor's kernel (auditor.models.skinny).
    skinny.install(model)
    with (
        torch.inference_mode(),
        hooks(model, [(p, record) for p in points], adapter=adapter, this_thread=True),
        skinny.enabled(),
    ):
        try:
            model(**inputs)
        except _StopForward:
            pass
    return captured


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.x names the KV cache argument ``cache`` (``past_key_values`` is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Group sequences (by index) into as few rows of at most ``row_tokens`` tokens as fit, balanced.

    Longest first, each into the currently shortest row that still has room (a new row
    when none has), so rows come out of similar length and padding to the longest row
    stays small. A sequence longer than ``row_tokens`` gets a row of its own, and then
    the rows' capacity grows to its length (every row is padded to the longest anyway).
    """
    total = sum(lengths)
    row_tokens = max([max(1, row_tokens), *lengths])
    n_rows = max(1, -(-total // row_tokens))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    used = [0] * n_rows
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        r = min(range(len(rows)), key=lambda k: used[k])
        if used[r] and used[r] + n > row_tokens:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += n
    return [sorted(r) for r in rows if r]


def capture_packed(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    hookpoints: Sequence[str | Hookpoint],
    *,
    row_tokens: int,
    adapter: ArchitectureAdapter | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`capture` (stopping early) with several sequences packed into each forward row.

    Each row of ``input_ids [B, T]`` (real tokens where ``attention_mask`` is 1, any padding
    side) is cut out and laid end to end with others in rows of at most ``row_tokens``
    tokens; position ids restart at 0 for each sequence, and with no attention mask and no
    cache ``transformers`` turns the restarts into a block-diagonal causal mask, so no token
    sees another sequence. Padding work disappears: a batch of mixed lengths costs its real
    tokens, not ``B x longest``. Results come back in the input's ``[B, T, d]`` layout, zero
    at padding. Only for models where :func:`packing_supported` holds.
    """
    adapter = adapter or get_adapter(model)
    points = list(dict.fromkeys(resolve_hookpoints(model, hookpoints, adapter)))
    if not points:
        return {}
    device = _device(model)
    real = attention_mask.to(torch.bool)
    lengths = real.sum(1).tolist()
    groups = pack_rows(lengths, row_tokens)
    width = max(sum(lengths[i] for i in g) for g in groups)
    ids = torch.zeros((len(groups), width), dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    # Each real token's place in the packed rows (row, column) and in the [B, T] layout (b, t).
    src_row, src_col, dest_b, dest_t = [], [], [], []
    for r, g in enumerate(groups):
        col = 0
        for i in g:
            n = lengths[i]
            ids[r, col : col + n] = input_ids[i][real[i]]
            pos[r, col : col + n] = torch.arange(n)
            src_row.append(torch.full((n,), r, dtype=torch.long))
            src_col.append(torch.arange(col, col + n))
            dest_b.append(torch.full((n,), i, dtype=torch.long))
            dest_t.append(real[i].nonzero().flatten())
            col += n
        # The tail is one more "sequence" (positions from 0): causal attention keeps it out of the others.
        pos[r, col:] = torch.arange(width - col)
    captured = _run_capturing(
        model, points, adapter, True, input_ids=to_device(ids, device), position_ids=to_device(pos, device), use_cache=False
    )
    src = (to_device(torch.cat(src_row), device), to_device(torch.cat(src_col), device))
    dest = (to_device(torch.cat(dest_b), device), to_device(torch.cat(dest_t), device))
    b, t = input_ids.shape
    out: dict[str, torch.Tensor] = {}
    for p in points:
        packed = captured[p.name]  # [R, width, d]
        full = packed.new_zeros((b, t, packed.shape[-1]))
        full[dest] = packed[src]
        out[p.name] = full
    return out


def packing_supported(model: nn.Module, hookpoint: str | Hookpoint, *, adapter: ArchitectureAdapter | None = None) -> bool:
    """Whether packed rows give this model's padded-batch activations at ``hookpoint`` (checked on two short sequences).

    Packing relies on ``transformers`` deriving a block-diagonal mask from restarting
    position ids; a model family (or version) that does not would let sequences attend to
    each other, which this check catches.
    """
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 8:
        return False
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 1000), (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    try:
        padded = capture(model, ids, mask, [hookpoint], adapter=adapter)
        packed = capture_packed(model, ids, mask, [hookpoint], row_tokens=64, adapter=adapter)
    except Exception:  # a model that rejects position_ids without a mask, for example
        return False
    return agrees(next(iter(padded.values())), next(iter(packed.values())))


def agrees(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether activations ``got [..., d]`` equal ``want`` up to the rounding of their dtype.

    Token by token: the difference's norm under ``max(1e-3, 8 eps)`` of the token's own
    activation norm (1e-3 in float32; 1/16 in bfloat16, where one rounding is 1/256 and GEMMs of
    different shapes round differently on a GPU). Per token, so one token's outlier activation
    (attention sinks reach 10^4) does not hide the others' errors. A model that lets sequences
    see each other, or ignores position ids, is off by about the activations' own size.
    """
    if got.shape != want.shape:
        return False
    tol = max(1e-3, 8 * torch.finfo(want.dtype).eps) if want.is_floating_point() else 1e-3
    w = want.float().reshape(-1, want.shape[-1])
    err = (got.float().reshape(-1, want.shape[-1]) - w).norm(dim=-1)
    return bool((err <= tol * w.norm(dim=-1)).all())
