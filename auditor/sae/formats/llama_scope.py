"""Llama Scope (OpenMOSS / fnlp): ``hyperparams.json`` + ``checkpoints/final.safetensors``.

Tensors ``encoder.weight [M, d]``, ``encoder.bias``, ``decoder.weight [d, M]``,
``decoder.bias``; a scalar ``jump_relu_threshold`` and the dataset norm
``dataset_average_activation_norm.in`` in ``hyperparams.json``. We read it the way
SAELens does: inputs scaled by ``s = sqrt(d_model) / norm_in``
(``expected_average_only_in``), one global threshold ``jump_relu_threshold * s``
in every slot, no b_dec subtraction. ``hook_point_in`` is already a
TransformerLens name; SAEs whose output hookpoint differs from the input one are
refused (they are transcoders).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from auditor.errors import SAEFormatError
from auditor.sae.formats import SAEFormat
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
from auditor.sae.sae import SAE

__all__ = ["FORMAT"]

_WEIGHTS = Path("checkpoints") / "final.safetensors"


def _detect(path: Path) -> bool:
    return path.is_dir() and (path / "hyperparams.json").is_file() and (path / _WEIGHTS).is_file()


def _load(path: Path, opts: LoadOptions) -> SAE:
    if not _detect(path):
        raise SAEFormatError(
            str(path), "not a Llama Scope folder: need hyperparams.json and checkpoints/final.safetensors"
        )
    hp_path = path / "hyperparams.json"
    raw = read_json(hp_path)
    require(raw, ["d_model", "jump_relu_threshold", "dataset_average_activation_norm"], hp_path)
    hp = ConfigFields(raw, hp_path)
    hook_in = hp.text("hook_point_in")
    hook_out = hp.text("hook_point_out") if "hook_point_out" in raw else hook_in
    if hook_in != hook_out:
        raise SAEFormatError(
            str(hp_path), f"hook_point_in {hook_in!r} != hook_point_out {hook_out!r}: a transcoder"
        )
    norm_in = hp.section("dataset_average_activation_norm").number("in", required=True, positive=True)
    d_model = hp.integer("d_model", required=True, positive=True)
    jump_threshold = hp.number("jump_relu_threshold", required=True)
    weights = read_safetensors(path / _WEIGHTS)
    require(weights, ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"], path / _WEIGHTS)
    w_enc = matrix(weights, "encoder.weight", path / _WEIGHTS, "[d_sae, d_in]")  # nn.Linear: [out, in]
    d_sae, d_in = w_enc.shape
    scale = math.sqrt(d_model) / norm_in
    cfg = make_config(
        hp_path,
        {
            "architecture": "jumprelu",
            "d_in": int(d_in),
            "d_sae": int(d_sae),
            "dtype": str(w_enc.dtype).removeprefix("torch."),
            "apply_b_dec_to_input": False,
            "normalize_activations": "expected_average_only_in",
            "activation_norm_scaling_factor": scale,
            "metadata": {"model_name": raw.get("model_name"), "hook_name": hook_in},
        },
    )
    threshold = torch.full((int(d_sae),), jump_threshold * scale)
    tensors = {
        "W_enc": w_enc.T,
        "b_enc": weights["encoder.bias"],
        "W_dec": matrix(weights, "decoder.weight", path / _WEIGHTS, "[d_in, d_sae]").T,
        "b_dec": weights["decoder.bias"],
        "threshold": threshold.to(w_enc.dtype),
    }
    return build_sae(cfg, tensors, path / _WEIGHTS, opts)


FORMAT = SAEFormat(
    name="llama_scope",
    description="Llama Scope: hyperparams.json + checkpoints/final.safetensors (JumpReLU)",
    detect=_detect,
    load=_load,
)
