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

from auditor.models.adapters import ArchitectureAdapter, get_adapter
from auditor.models.hookpoints import Hookpoint
from auditor.models.hooks import hooks, resolve_hookpoints

__all__ = ["capture", "position_ids_from_mask"]


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
    if attention_mask is None:
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        attention_mask = torch.ones((input_ids.shape[0], past + n_new), dtype=torch.long, device=input_ids.device)
    deepest = max(points, key=lambda p: p.depth)
    captured: dict[str, torch.Tensor] = {}

    def record(tensor: torch.Tensor, *, hook: Hookpoint) -> None:
        # Clone: the caller keeps these after later layers (or other hooks) have run.
        captured[hook.name] = tensor.detach().clone()
        if stop_early and hook == deepest:
            raise _StopForward

    device = _device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    with torch.inference_mode(), hooks(model, [(p, record) for p in points], adapter=adapter):
        try:
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask)[:, -n_new:],
                use_cache=past_key_values is not None,
                **({_cache_keyword(model): past_key_values} if past_key_values is not None else {}),
            )
        except _StopForward:
            pass
    real = attention_mask[:, -n_new:].to(torch.bool).unsqueeze(-1)  # [B, T_new, 1]
    return {p.name: torch.where(real, captured[p.name], 0.0) for p in points}


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.x names the KV cache argument ``cache`` (``past_key_values`` is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")
