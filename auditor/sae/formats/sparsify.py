"""EleutherAI sparsify: ``<hookpoint>/cfg.json`` + ``sae.safetensors``.

Tensors: ``encoder.weight [M, d]``, ``encoder.bias [M]``, ``W_dec [M, d]``, ``b_dec [d]``.
sparsify encodes ``topk(relu((x - b_dec) W_enc^T + b_enc), k)`` and decodes
``top_acts @ W_dec + b_dec``, so it is a TopK SAE with ``apply_b_dec_to_input``.
Transcoders (``transcode``) and skip connections (``W_skip``) map one hookpoint to
another and are refused. The folder name is the hookpoint: ``layers.N`` is the
output of decoder layer N (``blocks.N.hook_resid_post``); ``layers.N.mlp`` and
``layers.N.self_attn`` are that layer's MLP / attention outputs. A ``config.json``
one level up (the training run) gives the model name.
"""

from __future__ import annotations

import re
from pathlib import Path

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
    tl_hook,
)
from auditor.sae.sae import SAE

__all__ = ["FORMAT", "hook_from_sparsify"]

_HOOK = re.compile(r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)[._](\d+)(?:\.(mlp|self_attn|attn))?$")


def hook_from_sparsify(name: str) -> str | None:
    """``layers.15`` -> ``blocks.15.hook_resid_post``; None for names we cannot place."""
    m = _HOOK.match(name)
    if m is None:
        return None
    return tl_hook(m.group(1), m.group(2) or "resid_post")


def _detect(path: Path) -> bool:
    return path.is_dir() and (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file()


def _load(path: Path, opts: LoadOptions) -> SAE:
    if not _detect(path):
        raise SAEFormatError(str(path), "not a sparsify folder: need cfg.json and sae.safetensors")
    raw = read_json(path / "cfg.json")
    weights_path = path / "sae.safetensors"
    weights = read_safetensors(weights_path)
    require(weights, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], weights_path)
    if raw.get("transcode") or "W_skip" in weights or raw.get("skip_connection"):
        raise SAEFormatError(
            str(path), "sparsify transcoders / skip connections are not SAEs and are not supported"
        )
    d_sae, d_in = matrix(weights, "encoder.weight", weights_path, "[d_sae, d_in]").shape
    if raw.get("d_in") not in (None, d_in):
        raise SAEFormatError(
            str(path), f"cfg.json d_in={raw['d_in']} but encoder.weight is [{d_sae}, {d_in}]"
        )
    run_cfg_path = path.parent / "config.json"
    run_cfg = read_json(run_cfg_path) if run_cfg_path.is_file() else {}
    k = opts.k if opts.k is not None else ConfigFields(raw, path / "cfg.json").integer("k")
    if k is None:
        raise SAEFormatError(str(path / "cfg.json"), "missing 'k' (pass k=... to load_sae)")
    cfg = make_config(
        path / "cfg.json",
        {
            "architecture": "topk",
            "d_in": int(d_in),
            "d_sae": int(d_sae),
            "k": k,
            "dtype": str(weights["encoder.weight"].dtype).removeprefix("torch."),
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "metadata": {
                "model_name": run_cfg.get("model"),
                "hook_name": hook_from_sparsify(path.name),
                "sparsify_hookpoint": path.name,
            },
        },
    )
    tensors = {
        "W_enc": weights["encoder.weight"].T,
        "b_enc": weights["encoder.bias"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
    }
    return build_sae(cfg, tensors, weights_path, opts)


FORMAT = SAEFormat(
    name="sparsify",
    description="EleutherAI sparsify: <hookpoint>/cfg.json + sae.safetensors (TopK)",
    detect=_detect,
    load=_load,
)
