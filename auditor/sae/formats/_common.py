"""Helpers shared by the format readers: file reading, config building, hookpoint names."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from auditor.errors import SAEFormatError
from auditor.sae.config import SAEConfig
from auditor.sae.sae import SAE

__all__ = [
    "LoadOptions",
    "build_sae",
    "make_config",
    "read_json",
    "read_safetensors",
    "read_torch_state",
    "require",
    "torch_state_keys",
    "tl_hook",
]


@dataclass(frozen=True)
class LoadOptions:
    """What the caller asks of every reader."""

    device: str | torch.device = "cpu"
    """Device the parameters are placed on."""
    dtype: str | torch.dtype | None = None
    """Parameter dtype; None keeps the file's."""
    k: int | None = None
    """Override of k for TopK files whose own value is missing or to be replaced."""


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, or raise :class:`SAEFormatError` saying why not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAEFormatError(str(path), f"cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SAEFormatError(str(path), f"expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise SAEFormatError(str(path), f"cannot read safetensors: {exc}") from exc


def _torch_load(path: Path) -> object:
    try:
        # mmap keeps multi-GB checkpoints lazy; legacy (non-zip) files cannot be mapped.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def read_torch_state(path: Path) -> dict[str, Any]:
    """A ``torch.save``-d state dict (tensors plus plain values), loaded without pickle code."""
    try:
        state = _torch_load(path)
    except Exception as exc:  # torch raises a zoo of types for a bad or unsafe file
        raise SAEFormatError(str(path), f"cannot read torch checkpoint: {exc}") from exc
    if not isinstance(state, Mapping):
        raise SAEFormatError(
            str(path), f"expected a state dict, found a {type(state).__name__}"
        )
    return dict(state)


def torch_state_keys(path: Path) -> set[str]:
    """Keys of a torch state dict, or an empty set when it is not one (used by detectors)."""
    if not path.is_file() or path.suffix not in (".pt", ".pth", ".bin"):
        return set()
    try:
        state = _torch_load(path)
    except Exception:  # not a readable checkpoint: simply not this format
        return set()
    return set(state) if isinstance(state, Mapping) else set()


def require(tensors: Mapping[str, Any], keys: list[str], source: Path) -> None:
    """Raise :class:`SAEFormatError` listing the ``keys`` missing from ``tensors``."""
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise SAEFormatError(
            str(source), f"missing keys {missing} (found {sorted(map(str, tensors))})"
        )


def make_config(source: Path, fields: dict[str, Any]) -> SAEConfig:
    """Validate config ``fields``; a pydantic error becomes :class:`SAEFormatError`."""
    try:
        return SAEConfig.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise SAEFormatError(str(source), f"invalid SAE config: {problems}") from exc


def build_sae(
    cfg: SAEConfig, tensors: Mapping[str, Tensor], source: Path, opts: LoadOptions
) -> SAE:
    """Canonical tensors -> :class:`SAE` on the requested device and dtype."""
    return SAE.from_tensors(cfg, tensors, source=str(source), device=opts.device, dtype=opts.dtype)


_SITES = {
    "resid_post": "hook_resid_post",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "mlp_out": "hook_mlp_out",
    "mlp": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "self_attn": "hook_attn_out",
    "attn": "hook_attn_out",
}


def tl_hook(layer: int | str, site: str = "resid_post") -> str:
    """``(15, "resid_post")`` -> ``blocks.15.hook_resid_post`` (TransformerLens name)."""
    return f"blocks.{int(layer)}.{_SITES[site]}"


_TL_HOOK = re.compile(r"^blocks\.\d+\.hook_[a-z_]+$")


def is_tl_hook(name: str) -> bool:
    """Whether ``name`` is already a ``blocks.L.hook_*`` name."""
    return bool(_TL_HOOK.match(name))
