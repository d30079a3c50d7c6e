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
    LoadOptions,
    build_sae,
    make_config,
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
    hp = read_json(hp_path)
    require(hp, ["d_model", "jump_relu_threshold", "dataset_average_activation_norm"], hp_path)
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_in != hook_out:
        raise SAEFormatError(
            str(hp_path), f"hook_point_in {hook_in!r} != hook_point_out {hook_out!r}: a transcoder"
        )
    norm_in = hp["dataset_average_activation_norm"].get("in")
    if not norm_in or norm_in <= 0:
        raise SAEFormatError(str(hp_path), "dataset_average_activation_norm.in must be > 0")
    weights = read_safetensors(path / _WEIGHTS)
    require(weights, ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"], path / _WEIGHTS)
    d_sae, d_in = weights["encoder.weight"].shape
    scale = math.sqrt(int(hp["d_model"])) / float(norm_in)
    cfg = make_config(
        hp_path,
        {
            "architecture": "jumprelu",
            "d_in": int(d_in),
            "d_sae": int(d_sae),
            "dtype": str(weights["encoder.weight"].dtype).removeprefix("torch."),
            "apply_b_dec_to_input": False,
            "normalize_activations": "expected_average_only_in",
            "activation_norm_scaling_factor": scale,
            "metadata": {"model_name": hp.get("model_name"), "hook_name": hook_in},
        },
    )
    threshold = torch.full((int(d_sae),), float(hp["jump_relu_threshold"]) * scale)
    tensors = {
        "W_enc": weights["encoder.weight"].T,
        "b_enc": weights["encoder.bias"],
        "W_dec": weights["decoder.weight"].T,
        "b_dec": weights["decoder.bias"],
        "threshold": threshold.to(weights["encoder.weight"].dtype),
    }
    return build_sae(cfg, tensors, path / _WEIGHTS, opts)


FORMAT = SAEFormat(
    name="llama_scope",
    description="Llama Scope: hyperparams.json + checkpoints/final.safetensors (JumpReLU)",
    detect=_detect,
    load=_load,
)
