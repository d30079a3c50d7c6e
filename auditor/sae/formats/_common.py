"""Helpers shared by the format readers: file reading, config building, hookpoint names."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, overload

import torch
from pydantic import ValidationError
from torch import Tensor

from auditor.errors import SAEFormatError
from auditor.sae.config import SAEConfig
from auditor.sae.sae import SAE

__all__ = [
    "ConfigFields",
    "LoadOptions",
    "build_sae",
    "make_config",
    "matrix",
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


def _shown(value: Any) -> str:
    """A short description of a bad value for an error message."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


@dataclass(frozen=True)
class ConfigFields:
    """Typed reads from one mapping of an SAE file (a JSON config, a section of it, a state dict).

    A value of the wrong type raises :class:`SAEFormatError` naming the file and the dotted
    field (``trainer.k``) and saying what the field must hold; a missing or null field reads
    as None unless ``required``.

    Example::

        hp = ConfigFields(read_json(path), path)
        norm = hp.section("dataset_average_activation_norm").number("in", required=True, positive=True)
    """

    data: Mapping[str, Any]
    """The mapping read from."""
    source: Path
    """File the mapping came from, named in errors."""
    prefix: str = ""
    """Dotted path of this mapping inside the file (``"trainer."``), empty at the top."""

    def fail(self, key: str, rule: str) -> NoReturn:
        """Raise :class:`SAEFormatError` for field ``key``: it breaks ``rule``."""
        name = self.prefix + key
        got = f", got {_shown(self.data[key])}" if key in self.data else ""
        raise SAEFormatError(str(self.source), f"field {name!r} {rule}{got}; correct it in this file")

    def section(self, key: str) -> ConfigFields:
        """The nested mapping ``key`` (empty when missing or null)."""
        value = self.data.get(key)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            self.fail(key, "must be an object of named fields")
        return ConfigFields(value, self.source, f"{self.prefix}{key}.")

    def _present(self, key: str, required: bool) -> Any:
        value = self.data.get(key)
        if value is None and required:
            self.fail(key, "is required")
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()  # torch state dicts keep scalars such as k as 0-d tensors
        return value

    @overload
    def integer(self, key: str, *, required: Literal[True], positive: bool = ...) -> int: ...
    @overload
    def integer(self, key: str, *, required: bool = ..., positive: bool = ...) -> int | None: ...
    def integer(self, key: str, *, required: bool = False, positive: bool = False) -> int | None:
        """Field ``key`` as an int (a float with no fractional part counts; bools and strings do not)."""
        value = self._present(key, required)
        if value is None:
            return None
        whole = isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not (isinstance(value, int) or whole):
            self.fail(key, "must be a whole number")
        if positive and value <= 0:
            self.fail(key, "must be > 0")
        return int(value)

    @overload
    def number(self, key: str, *, required: Literal[True], positive: bool = ...) -> float: ...
    @overload
    def number(self, key: str, *, required: bool = ..., positive: bool = ...) -> float | None: ...
    def number(self, key: str, *, required: bool = False, positive: bool = False) -> float | None:
        """Field ``key`` as a finite float (ints count; bools, strings, NaN and inf do not)."""
        value = self._present(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, "must be a finite number")
        if positive and value <= 0:
            self.fail(key, "must be > 0")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        """Field ``key`` as a JSON boolean (``default`` when missing or null); a string such as
        ``"false"`` is refused, not read as true."""
        value = self._present(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, "must be true or false (a JSON boolean, not a string or number)")
        return value

    def text(self, key: str) -> str | None:
        """Field ``key`` as a string, or None when missing or null."""
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            self.fail(key, "must be a string")
        return value


def matrix(tensors: Mapping[str, Any], key: str, source: Path, layout: str) -> Tensor:
    """``tensors[key]`` checked to be a 2-D tensor; ``layout`` names its axes (``"[d_sae, d_in]"``)."""
    value = tensors[key]
    if not isinstance(value, Tensor) or value.ndim != 2:
        raise SAEFormatError(
            str(source),
            f"tensor {key!r} must be 2-D {layout}, got {_shown(value)}; the file is damaged "
            "or holds another kind of model: re-export or re-download it",
        )
    return value


def make_config(source: Path, fields: dict[str, Any]) -> SAEConfig:
    """Validate config ``fields``; a pydantic error becomes :class:`SAEFormatError`."""
    try:
        return SAEConfig.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {_shown(e['input'])})" if e["loc"]
            else f"config: {e['msg']}"
            for e in exc.errors()
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
