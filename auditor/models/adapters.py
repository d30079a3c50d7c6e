"""Architecture adapters: where each model family keeps its layers and sub-blocks.

An adapter maps the TransformerLens hookpoint kinds onto the modules of a Hugging Face
``*ForCausalLM`` (or bare base model). It is found by ``config.model_type`` in a registry;
an unknown type is an :class:`~auditor.errors.UnknownKeyError` that lists the known ones.

What each family's decoder layer does in transformers 5.24 (read from its ``modeling_*.py``):

* every decoder layer returns a plain tensor ``[B, T, d]`` (older releases returned a tuple,
  so :func:`unwrap_output` accepts both);
* attention modules return ``(attn_output, attn_weights)``; MLP modules return a tensor.

``attn_out`` / ``mlp_out`` are the tensors the layer *adds to the residual stream*:

* GPT-2 (``gpt2``): ``h[L].attn`` output[0] (``c_proj`` and dropout included) and ``h[L].mlp``.
  ``resid_post = resid_pre + attn_out + mlp_out``.
* Llama, Mistral, Qwen2, Qwen3, Gemma (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma``):
  ``layers[L].self_attn`` output[0] and ``layers[L].mlp``; same identity. SmolLM2 is ``llama``.
  Gemma multiplies the embeddings by ``sqrt(d_model)`` inside ``embed_tokens``, so
  ``resid_pre`` of layer 0 (the layer's input) includes that scaling.
* Gemma2, Gemma3 (``gemma2``, ``gemma3_text``, ``gemma3``): attention and MLP outputs pass through
  ``post_attention_layernorm`` / ``post_feedforward_layernorm`` before the residual add, so the
  hooks sit on those norms; the identity above holds with these tensors. ``gemma3`` is the
  multimodal wrapper, whose text layers live under ``model.language_model``.
* GPT-NeoX / Pythia (``gpt_neox``): ``layers[L].attention`` output[0] and ``layers[L].mlp``.
  With ``use_parallel_residual`` (the Pythia default) both read ``resid_pre`` and
  ``resid_post = resid_pre + attn_out + mlp_out``; without it the MLP reads
  ``resid_pre + attn_out``; the identity holds both ways (dropout is off in eval).

For every family the model's final norm is *not* part of ``resid_post`` of the last layer,
whereas Hugging Face's ``output_hidden_states[-1]`` is taken after that norm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from auditor.errors import ModelError, UnknownKeyError

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "get_adapter",
    "replace_output",
    "unwrap_output",
]


def unwrap_output(output: Any) -> torch.Tensor:
    """The activation tensor in a module's output: the tensor itself, or element 0 of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot find the activation tensor in a module output of type {type(output).__name__}")


def replace_output(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its activation tensor replaced by ``new``, keeping the container type."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise ModelError(f"cannot replace the activation tensor in a module output of type {type(output).__name__}")


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one model family keeps its decoder layers and sub-blocks.

    Example::

        >>> adapter = get_adapter(model)          # by model.config.model_type
        >>> adapter.layers(model)[3]              # decoder layer 3
        >>> adapter.mlp_module(model, 3)          # the module whose output is mlp_out[3]
    """

    family: str
    """Human-readable family name, used in messages."""
    model_types: tuple[str, ...]
    """The ``config.model_type`` values this adapter serves."""
    layer_paths: tuple[str, ...]
    """Dotted paths to the decoder ``ModuleList``, tried in order (CausalLM wrapper first, then base model)."""
    attn_name: str
    """Attribute of a layer whose output (tensor or element 0 of a tuple) is ``attn_out``."""
    mlp_name: str
    """Attribute of a layer whose output is ``mlp_out``."""
    norm_paths: tuple[str, ...]
    """Dotted paths to the final norm applied after the last layer (before the LM head)."""

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model`` in forward order."""
        for path in self.layer_paths:
            found = _get_path(model, path)
            if isinstance(found, nn.ModuleList):
                return found
        raise ModelError(
            f"{type(model).__name__} looks like {self.family} but has no decoder layers at any of "
            f"{', '.join(self.layer_paths)}"
        )

    def layer(self, model: nn.Module, layer: int) -> nn.Module:
        """Decoder layer ``layer``."""
        return self.layers(model)[layer]

    def attn_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output is ``attn_out`` of ``layer``."""
        return self._sub(model, layer, self.attn_name)

    def mlp_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output is ``mlp_out`` of ``layer``."""
        return self._sub(model, layer, self.mlp_name)

    def _sub(self, model: nn.Module, layer: int, name: str) -> nn.Module:
        module = getattr(self.layer(model, layer), name, None)
        if not isinstance(module, nn.Module):
            raise ModelError(f"{self.family} layer {layer} of {type(model).__name__} has no submodule {name!r}")
        return module

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm the model applies to ``resid_post`` of the last layer before the LM head."""
        for path in self.norm_paths:
            found = _get_path(model, path)
            if isinstance(found, nn.Module):
                return found
        raise ModelError(
            f"{type(model).__name__} looks like {self.family} but has no final norm at any of "
            f"{', '.join(self.norm_paths)}"
        )

    def d_model(self, model: nn.Module) -> int:
        """Width of the residual stream."""
        config = _text_config(model)
        for key in ("hidden_size", "n_embd", "d_model"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        raise ModelError(f"cannot find the hidden size in the config of {type(model).__name__}")

    def n_layers(self, model: nn.Module) -> int:
        """Number of decoder layers."""
        return len(self.layers(model))

    @staticmethod
    def unwrap(output: Any) -> torch.Tensor:
        """The activation tensor in a module output (plain tensor or tuple)."""
        return unwrap_output(output)

    @staticmethod
    def rewrap(output: Any, new: torch.Tensor) -> Any:
        """``output`` with its activation replaced by ``new``."""
        return replace_output(output, new)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no .config; pass a Hugging Face transformers model")
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


_LLAMA_PATHS = ("model.layers", "layers")
_LLAMA_NORM = ("model.norm", "norm")

_BUILTIN: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter("GPT-2", ("gpt2",), ("transformer.h", "h"), "attn", "mlp", ("transformer.ln_f", "ln_f")),
    ArchitectureAdapter("Llama", ("llama", "mistral"), _LLAMA_PATHS, "self_attn", "mlp", _LLAMA_NORM),
    ArchitectureAdapter("Qwen", ("qwen2", "qwen3"), _LLAMA_PATHS, "self_attn", "mlp", _LLAMA_NORM),
    ArchitectureAdapter("Gemma", ("gemma",), _LLAMA_PATHS, "self_attn", "mlp", _LLAMA_NORM),
    ArchitectureAdapter(
        "Gemma2/3",
        ("gemma2", "gemma3_text", "gemma3"),
        ("model.language_model.layers", "language_model.layers", *_LLAMA_PATHS),
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        ("model.language_model.norm", "language_model.norm", *_LLAMA_NORM),
    ),
    ArchitectureAdapter(
        "GPT-NeoX",
        ("gpt_neox",),
        ("gpt_neox.layers", "layers"),
        "attention",
        "mlp",
        ("gpt_neox.final_layer_norm", "final_layer_norm"),
    ),
)


def _build_registry(adapters: Iterable[ArchitectureAdapter]) -> dict[str, ArchitectureAdapter]:
    registry: dict[str, ArchitectureAdapter] = {}
    for adapter in adapters:
        for model_type in adapter.model_types:
            registry[model_type] = adapter
    return registry


ADAPTERS: Mapping[str, ArchitectureAdapter] = _build_registry(_BUILTIN)
"""The built-in registry, keyed by ``config.model_type``."""


def get_adapter(model: nn.Module, registry: Mapping[str, ArchitectureAdapter] | None = None) -> ArchitectureAdapter:
    """The adapter for ``model``, looked up by ``model.config.model_type``.

    Raises :class:`UnknownKeyError` (listing the known architectures) for an unsupported model.
    """
    registry = ADAPTERS if registry is None else registry
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or model_type not in registry:
        raise UnknownKeyError("model architecture", str(model_type), registry.keys())
    return registry[model_type]
