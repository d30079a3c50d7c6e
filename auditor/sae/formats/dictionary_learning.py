"""saprmarks/dictionary_learning: ``ae.pt`` + ``config.json``.

``config.json["trainer"]`` names the class (``dict_class``) and gives
``activation_dim``, ``dict_size``, ``k``, ``lm_name``, ``layer``, ``submodule_name``.
State dicts per class and how they map (``nn.Linear`` weights are ``[out, in]``):

- AutoEncoder: ``relu(encoder(x - bias))``; ``encoder.weight [M, d]``, ``encoder.bias``,
  ``decoder.weight [d, M]``, ``bias [d]`` -> standard, b_dec = bias, subtract it.
- AutoEncoderTopK: ``topk(relu(encoder(x - b_dec)), k)``; plus ``b_dec`` and buffers
  ``k``, ``threshold`` (the threshold is only used on request there, so ignored) -> topk.
- BatchTopKSAE: inference ``relu(encoder(x - b_dec)) * (. > threshold)`` with a scalar
  ``threshold`` buffer -> batchtopk with that value in every slot. The library saves one
  threshold (a 0-d tensor) and its loader refuses any other shape, so a per-latent
  vector there is refused too.
- GatedAutoEncoder: ``x_enc = encoder(x - decoder_bias)`` (no bias), gate
  ``x_enc + gate_bias > 0``, magnitude ``relu(exp(r_mag) * x_enc + mag_bias)`` -> gated.
- JumpReluAutoEncoder: ``W_enc [d, M]``, ``b_enc``, ``W_dec [M, d]``, ``b_dec``,
  ``threshold``; ``apply_b_dec_to_input`` is False (an attribute, not saved) -> jumprelu.

Decode is ``decoder(f) + b_dec`` for all of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from auditor.errors import SAEFormatError
from auditor.sae.formats import SAEFormat
from auditor.sae.formats._common import (
    ConfigFields,
    LoadOptions,
    build_sae,
    make_config,
    matrix,
    read_json,
    read_torch_state,
    require,
    tl_hook,
)
from auditor.sae.sae import SAE

__all__ = ["FORMAT", "hook_from_submodule"]

_SUBMODULE = re.compile(r"^(resid_post|resid_pre|mlp_out|attn_out|mlp|attn)_layer_(\d+)$")


def hook_from_submodule(name: str | None) -> str | None:
    """``resid_post_layer_12`` -> ``blocks.12.hook_resid_post``; None if not of that form."""
    m = _SUBMODULE.match(name or "")
    return tl_hook(m.group(2), m.group(1)) if m else None


def _encoder(s: dict[str, Any], source: Path) -> Tensor:
    return matrix(s, "encoder.weight", source, "[dict_size, activation_dim]").T


def _decoder(s: dict[str, Any], source: Path) -> Tensor:
    return matrix(s, "decoder.weight", source, "[activation_dim, dict_size]").T


def _linear_sae(s: dict[str, Any], source: Path, b_dec_key: str) -> dict[str, Tensor]:
    return {
        "W_enc": _encoder(s, source),
        "b_enc": s["encoder.bias"],
        "W_dec": _decoder(s, source),
        "b_dec": s[b_dec_key],
    }


def _batch_topk(s: dict[str, Any], source: Path) -> dict[str, Tensor]:
    out = _linear_sae(s, source, "b_dec")
    stored = s["threshold"]
    if isinstance(stored, Tensor) and stored.numel() != 1:
        raise SAEFormatError(
            str(source),
            f"tensor 'threshold' has shape {list(stored.shape)}, but a BatchTopKSAE keeps one "
            "threshold for all latents (dictionary_learning saves a 0-d tensor and cannot load "
            "this file either); for per-latent thresholds save the SAE as a SAELens folder with "
            "architecture 'jumprelu' and apply_b_dec_to_input true, which encodes the same way",
        )
    threshold = ConfigFields(s, source).number("threshold", required=True)
    out["threshold"] = torch.full((out["W_enc"].shape[1],), threshold, dtype=out["W_enc"].dtype)
    return out


def _gated(s: dict[str, Any], source: Path) -> dict[str, Tensor]:
    return {
        "W_enc": _encoder(s, source),
        "b_gate": s["gate_bias"],
        "r_mag": s["r_mag"],
        "b_mag": s["mag_bias"],
        "W_dec": _decoder(s, source),
        "b_dec": s["decoder_bias"],
    }


def _jumprelu(s: dict[str, Any], source: Path) -> dict[str, Tensor]:
    return {k: s[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


Converter = Callable[[dict[str, Any], Path], dict[str, Tensor]]

# dict_class -> (architecture, apply_b_dec_to_input, required keys, converter)
_CLASSES: dict[str, tuple[str, bool, list[str], Converter]] = {
    "AutoEncoder": (
        "standard", True, ["encoder.weight", "encoder.bias", "decoder.weight", "bias"],
        lambda s, source: _linear_sae(s, source, "bias"),
    ),
    "AutoEncoderTopK": (
        "topk", True, ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec"],
        lambda s, source: _linear_sae(s, source, "b_dec"),
    ),
    "BatchTopKSAE": (
        "batchtopk", True, ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "threshold"],
        _batch_topk,
    ),
    "GatedAutoEncoder": (
        "gated", True,
        ["encoder.weight", "gate_bias", "r_mag", "mag_bias", "decoder.weight", "decoder_bias"],
        _gated,
    ),
    "JumpReluAutoEncoder": (
        "jumprelu", False, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], _jumprelu,
    ),
}


def _files(path: Path) -> tuple[Path, Path] | None:
    folder = path if path.is_dir() else path.parent
    ae = path if path.is_file() else folder / "ae.pt"
    cfg = folder / "config.json"
    if ae.is_file() and ae.suffix == ".pt" and cfg.is_file():
        return ae, cfg
    return None


def _detect(path: Path) -> bool:
    files = _files(path)
    if files is None:
        return False
    try:
        trainer = read_json(files[1]).get("trainer")
    except SAEFormatError:
        return False
    return isinstance(trainer, dict) and "dict_class" in trainer


def _load(path: Path, opts: LoadOptions) -> SAE:
    files = _files(path)
    if files is None:
        raise SAEFormatError(str(path), "not a dictionary_learning SAE: need ae.pt and config.json")
    ae_path, cfg_path = files
    config = ConfigFields(read_json(cfg_path), cfg_path)
    trainer = config.section("trainer")
    if "dict_class" not in trainer.data:
        raise SAEFormatError(str(cfg_path), "missing trainer.dict_class")
    dict_class = str(trainer.data["dict_class"])
    if dict_class not in _CLASSES:
        raise SAEFormatError(
            str(cfg_path), f"unsupported dict_class {dict_class!r}; supported: {', '.join(_CLASSES)}"
        )
    arch, apply_b_dec, keys, convert = _CLASSES[dict_class]
    state = read_torch_state(ae_path)
    require(state, keys, ae_path)
    tensors = convert(state, ae_path)
    d_in, d_sae = matrix(tensors, "W_enc", ae_path, "[activation_dim, dict_size]").shape
    for name, want in (("activation_dim", d_in), ("dict_size", d_sae)):
        if trainer.integer(name) not in (None, want):
            raise SAEFormatError(
                str(cfg_path), f"trainer.{name}={trainer.data[name]} but the weights say {want}"
            )
    k = opts.k
    if k is None and arch in ("topk", "batchtopk"):
        k = trainer.integer("k")
        if k is None:
            k = ConfigFields(state, ae_path).integer("k")
    submodule = trainer.text("submodule_name")
    cfg = make_config(
        cfg_path,
        {
            "architecture": arch,
            "d_in": int(d_in),
            "d_sae": int(d_sae),
            "k": k if arch in ("topk", "batchtopk") else None,
            "dtype": str(tensors["W_enc"].dtype).removeprefix("torch."),
            "apply_b_dec_to_input": apply_b_dec,
            "normalize_activations": "none",
            "metadata": {
                "model_name": trainer.text("lm_name"),
                "hook_name": hook_from_submodule(submodule),
                "context_size": config.section("buffer").integer("ctx_len"),
                "layer": trainer.data.get("layer"),
                "submodule_name": submodule,
                "dict_class": dict_class,
            },
        },
    )
    return build_sae(cfg, tensors, ae_path, opts)


FORMAT = SAEFormat(
    name="dictionary_learning",
    description="saprmarks/dictionary_learning: ae.pt + config.json (trainer.dict_class)",
    detect=_detect,
    load=_load,
)
