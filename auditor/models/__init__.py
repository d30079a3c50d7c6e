"""Models: loading, architecture adapters, TransformerLens-style hooks and activation capture."""

from __future__ import annotations

from auditor.models.adapters import ADAPTERS, ArchitectureAdapter, get_adapter
from auditor.models.capture import capture, capture_packed, pack_rows, packing_supported, position_ids_from_mask
from auditor.models.compiled import compile_layers
from auditor.models.hookpoints import HOOK_KINDS, HookKind, Hookpoint, parse_hookpoint
from auditor.models.hooks import HookFn, hooks, resolve_hookpoints
from auditor.models.loading import (
    DEFAULT_MODEL_NAME,
    MODEL_DTYPES,
    ModelDType,
    LoadedModel,
    ModelShape,
    cache_root,
    check_model_and_tokenizer,
    check_sae_compatible,
    default_model_path,
    load_model,
    model_shape,
    parse_device,
    wrap_model,
)
from auditor.models.streams import StreamCache, capture_streams, enable_streams, streams_supported

__all__ = [
    "ADAPTERS",
    "DEFAULT_MODEL_NAME",
    "MODEL_DTYPES",
    "ModelDType",
    "HOOK_KINDS",
    "ArchitectureAdapter",
    "HookFn",
    "HookKind",
    "Hookpoint",
    "LoadedModel",
    "ModelShape",
    "cache_root",
    "capture",
    "capture_packed",
    "capture_streams",
    "check_model_and_tokenizer",
    "check_sae_compatible",
    "compile_layers",
    "default_model_path",
    "enable_streams",
    "get_adapter",
    "hooks",
    "load_model",
    "model_shape",
    "pack_rows",
    "packing_supported",
    "parse_device",
    "parse_hookpoint",
    "position_ids_from_mask",
    "resolve_hookpoints",
    "streams_supported",
    "StreamCache",
    "wrap_model",
]
