"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``).

Reads the v6 layout (``architecture``, ``metadata``) and the pre-6.0 one
(``hook_point``/``hook_name`` at top level, ``activation_fn_str`` with
``activation_fn_kwargs: {k}``, ``architecture`` possibly missing, boolean or
string ``normalize_activations``, ``finetuning_scaling_factor``, ``log_threshold``).
This is also :meth:`SAE.load`, the reader of what :meth:`SAE.save` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from auditor.errors import SAEFormatError
from auditor.sae.formats import SAEFormat
from auditor.sae.config import SAEConfig
from auditor.sae.formats._common import (
    ConfigFields,
    LoadOptions,
    build_sae,
    make_config,
    matrix,
    read_json,
    read_safetensors,
    require,
)
from auditor.sae.sae import CFG_FILENAME, SAE, WEIGHTS_FILENAME, param_shapes

__all__ = ["FORMAT", "config_from_saelens", "load_saelens"]

# Top-level keys of a pre-6.0 cfg.json that v6 moved under ``metadata``.
_LEGACY_METADATA = {
    "model_name": "model_name",
    "hook_name": "hook_name",
    "hook_point": "hook_name",
    "hook_head_index": "hook_head_index",
    "hook_point_head_index": "hook_head_index",
    "prepend_bos": "prepend_bos",
    "context_size": "context_size",
    "dataset_path": "dataset_path",
    "model_from_pretrained_kwargs": "model_from_pretrained_kwargs",
    "sae_lens_training_version": "sae_lens_training_version",
    "neuronpedia_id": "neuronpedia_id",
    "hook_layer": "hook_layer",
}
_NORMALIZE = {
    None: "none",
    False: "none",
    "none": "none",
    "": "none",
    True: "expected_average_only_in",
    "expected_average": "expected_average_only_in",
    "expected_average_only_in": "expected_average_only_in",
    "constant_norm_rescale": "constant_norm_rescale",
    "layer_norm": "layer_norm",
}


def _architecture(raw: dict[str, Any], source: Path) -> str:
    act = raw.get("activation_fn_str", raw.get("activation_fn"))
    arch = raw.get("architecture")
    if arch is None or (arch == "standard" and act == "topk"):
        # Pre-6.0 TopK SAEs were "standard" + activation_fn "topk".
        if act in (None, "relu"):
            return "standard"
        if act == "topk":
            return "topk"
        raise SAEFormatError(str(source), f"unsupported activation_fn {act!r} (relu, topk)")
    return str(arch)


def config_from_saelens(raw: dict[str, Any], source: Path) -> SAEConfig:
    """A v6 or pre-6.0 SAELens ``cfg.json`` dict -> :class:`SAEConfig`."""
    if raw.get("reshape_activations", "none") != "none":
        raise SAEFormatError(
            str(source),
            f"reshape_activations={raw['reshape_activations']!r} is not supported "
            "(only SAEs on [tokens, d_in] activations)",
        )
    norm_raw = raw.get("normalize_activations", "none")
    if not isinstance(norm_raw, (str, bool, type(None))) or norm_raw not in _NORMALIZE:
        raise SAEFormatError(
            str(source),
            f"unknown normalize_activations {norm_raw!r}; known: "
            "none, expected_average_only_in, constant_norm_rescale, layer_norm",
        )
    fields = ConfigFields(raw, source)
    metadata: dict[str, Any] = dict(fields.section("metadata").data)
    for old, new in _LEGACY_METADATA.items():
        if old in raw and metadata.get(new) is None:
            metadata[new] = raw[old]
    normalize = _NORMALIZE[norm_raw]
    factor = raw.get("activation_norm_scaling_factor")
    if normalize == "expected_average_only_in" and factor is None:
        # SAELens folds the factor into the weights when training ends and applies no
        # runtime scaling without one, so such a file is read as already folded.
        normalize = "none"
        metadata.setdefault("normalize_activations_in_file", norm_raw)
    k = fields.integer("k") if "k" in raw else fields.section("activation_fn_kwargs").integer("k")
    cfg: dict[str, Any] = {
        "architecture": _architecture(raw, source),
        "d_in": raw.get("d_in"),
        "d_sae": raw.get("d_sae"),
        "k": k,
        "dtype": str(raw.get("dtype", "float32")).removeprefix("torch."),
        # SAELens' default has always been to subtract b_dec.
        "apply_b_dec_to_input": fields.flag("apply_b_dec_to_input", True),
        "normalize_activations": normalize,
        "activation_norm_scaling_factor": factor,
        "metadata": metadata,
    }
    return make_config(source, cfg)


def _tensors(raw_cfg: dict[str, Any], weights: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    tensors = dict(weights)
    if "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and raw_cfg.get("finetuning_scaling_factor", False):
        # Old SAELens decoded (f * scaling_factor) @ W_dec: fold it into the decoder rows.
        if "W_dec" not in tensors:
            raise SAEFormatError(str(source), "missing tensor 'W_dec'")
        tensors["W_dec"] = tensors["W_dec"] * scaling[:, None]
    if raw_cfg.get("rescale_acts_by_decoder_norm"):
        tensors = _fold_decoder_norm(raw_cfg, tensors, source)
    canonical = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "r_mag", "b_mag"}
    return {k: v for k, v in tensors.items() if k in canonical}


def _fold_decoder_norm(
    raw_cfg: dict[str, Any], tensors: dict[str, Tensor], source: Path
) -> dict[str, Tensor]:
    """Fold ``rescale_acts_by_decoder_norm`` (pre-acts times ||W_dec row||, undone on decode).

    With ``n = ||W_dec[i]||`` that is ``W_enc * n``, ``b_enc * n``, ``W_dec / n``: exact
    for relu and top-k (positive scaling keeps the order). Other rules are refused.
    """
    arch = _architecture(raw_cfg, source)
    if arch not in ("standard", "topk"):
        raise SAEFormatError(
            str(source), f"rescale_acts_by_decoder_norm is only supported for standard/topk, not {arch!r}"
        )
    require(tensors, ["W_enc", "b_enc", "W_dec"], source)
    n = matrix(tensors, "W_dec", source, "[d_sae, d_in]").norm(dim=-1)  # [d_sae]
    dead = (n == 0).nonzero().flatten().tolist()
    if dead:
        shown = ", ".join(map(str, dead[:10])) + (", ..." if len(dead) > 10 else "")
        raise SAEFormatError(
            str(source),
            f"rescale_acts_by_decoder_norm is set but {len(dead)} of the {n.numel()} W_dec rows "
            f"are all zero (latents {shown}), and the rescaling divides by each row's norm; "
            "remove those latents from the SAE or give them a non-zero decoder row",
        )
    return {
        **tensors,
        "W_enc": tensors["W_enc"] * n,
        "b_enc": tensors["b_enc"] * n,
        "W_dec": tensors["W_dec"] / n[:, None],
    }


def load_saelens(path: Path, *, device: Any = "cpu", dtype: Any = None) -> SAE:
    """Read a SAELens folder into an :class:`SAE`."""
    if not path.exists():
        raise SAEFormatError(str(path), "no such file or folder")
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise SAEFormatError(str(path), f"not a SAELens folder: {name} is missing")
    raw = read_json(path / CFG_FILENAME)
    cfg = config_from_saelens(raw, path / CFG_FILENAME)
    weights = read_safetensors(path / WEIGHTS_FILENAME)
    tensors = _tensors(raw, weights, path / WEIGHTS_FILENAME)
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise SAEFormatError(
            str(path / WEIGHTS_FILENAME),
            f"missing tensors {missing} for a {cfg.architecture!r} SAE (found {sorted(weights)})",
        )
    tensors = {k: v for k, v in tensors.items() if k in expected}
    return build_sae(cfg, tensors, path / WEIGHTS_FILENAME, LoadOptions(device=device, dtype=dtype))


def _detect(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILENAME).is_file() and (path / WEIGHTS_FILENAME).is_file()


def _load(path: Path, opts: LoadOptions) -> SAE:
    sae = load_saelens(path, device=opts.device, dtype=opts.dtype)
    if opts.k is not None and sae.cfg.architecture == "topk":
        sae.cfg = make_config(path, {**sae.cfg.model_dump(), "k": opts.k})
    return sae


FORMAT = SAEFormat(
    name="saelens",
    description="SAELens folder: cfg.json + sae_weights.safetensors (v6 and pre-6.0 configs)",
    detect=_detect,
    load=_load,
)
