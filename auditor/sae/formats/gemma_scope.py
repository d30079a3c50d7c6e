"""Gemma Scope (Google DeepMind): ``params.npz``; Gemma Scope 2: ``params.safetensors``.

Keys ``W_enc [d, M]``, ``W_dec [M, d]``, ``b_enc [M]``, ``b_dec [d]``, ``threshold [M]``
(some releases spell them lowercase, ``w_enc``). JumpReLU on the raw activations:
``pre = x W_enc + b_enc; f = relu(pre) * (pre > threshold)``, no b_dec subtraction.
The path is the ``params.*`` file or the folder holding it. Hookpoint: a
``layer_N`` path part with a ``-res`` release name gives ``blocks.N.hook_resid_post``
(``-mlp``: ``hook_mlp_out``); anything else leaves it unset.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from auditor.errors import SAEFormatError
from auditor.sae.formats import SAEFormat
from auditor.sae.formats._common import LoadOptions, build_sae, make_config, matrix, read_safetensors, tl_hook
from auditor.sae.sae import SAE

__all__ = ["FORMAT"]

_FILES = ("params.npz", "params.safetensors")
_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _params_file(path: Path) -> Path | None:
    if path.is_file() and path.name in _FILES:
        return path
    if path.is_dir():
        for name in _FILES:
            if (path / name).is_file():
                return path / name
    return None


def _read(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SAEFormatError(str(file), f"cannot read npz: {exc}") from exc


def _hook(file: Path) -> str | None:
    parts = file.resolve().parts
    layer = next((m.group(1) for p in parts if (m := re.fullmatch(r"layer_(\d+)", p))), None)
    if layer is None:
        return None
    text = "/".join(parts).lower()
    if "-res" in text:
        return tl_hook(layer, "resid_post")
    if "-mlp" in text:
        return tl_hook(layer, "mlp_out")
    return None


def _load(path: Path, opts: LoadOptions) -> SAE:
    file = _params_file(path)
    if file is None:
        raise SAEFormatError(str(path), f"not a Gemma Scope SAE: no {' or '.join(_FILES)}")
    raw = _read(file)
    by_lower = {k.lower(): v for k, v in raw.items()}
    missing = [k for k in _KEYS if k.lower() not in by_lower]
    if missing:
        raise SAEFormatError(str(file), f"missing keys {missing} (found {sorted(raw)})")
    tensors = {k: by_lower[k.lower()] for k in _KEYS}
    d_in, d_sae = matrix(tensors, "W_enc", file, "[d_in, d_sae]").shape
    cfg = make_config(
        file,
        {
            "architecture": "jumprelu",
            "d_in": int(d_in),
            "d_sae": int(d_sae),
            "dtype": str(tensors["W_enc"].dtype).removeprefix("torch."),
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "metadata": {"hook_name": _hook(file)},
        },
    )
    return build_sae(cfg, tensors, file, opts)


FORMAT = SAEFormat(
    name="gemma_scope",
    description="Gemma Scope params.npz / Gemma Scope 2 params.safetensors (JumpReLU)",
    detect=lambda path: _params_file(path) is not None,
    load=_load,
)
