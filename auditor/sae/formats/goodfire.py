"""Goodfire Llama SAEs: a ``.pth``/``.pt`` state dict.

Keys ``encoder_linear.weight [M, d]``, ``encoder_linear.bias [M]``,
``decoder_linear.weight [d, M]``, ``decoder_linear.bias [d]``;
``f = relu(encoder_linear(x))``, ``x_hat = decoder_linear(f)``: a standard SAE
without b_dec subtraction. The file name (``Llama-3.1-8B-Instruct-SAE-l19.pth``)
gives the layer (``lN`` is the output of decoder layer N) and the model. Goodfire's
releases in this layout are on Meta's Llama models (Llama 3.1 8B and 3.3 70B
Instruct, whose hub ids are ``meta-llama/<name>``), so a ``Llama-...`` name becomes
that id; any other name leaves the model unset, as the file does not say whose it is.
"""

from __future__ import annotations

import re
from pathlib import Path

from auditor.errors import SAEFormatError
from auditor.sae.formats import SAEFormat
from auditor.sae.formats._common import (
    LoadOptions,
    build_sae,
    make_config,
    matrix,
    read_torch_state,
    require,
    tl_hook,
    torch_state_keys,
)
from auditor.sae.sae import SAE

__all__ = ["FORMAT"]

_KEYS = ["encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"]
_NAME = re.compile(r"^(?P<model>.+)-SAE-l(?P<layer>\d+)$")


def _model_id(name: str) -> str | None:
    """``Llama-3.1-8B-Instruct`` -> ``meta-llama/Llama-3.1-8B-Instruct``; None for other models."""
    return f"meta-llama/{name}" if name.startswith("Llama-") else None


def _load(path: Path, opts: LoadOptions) -> SAE:
    if not path.is_file():
        raise SAEFormatError(str(path), "a Goodfire SAE is a single .pth/.pt file")
    state = read_torch_state(path)
    require(state, _KEYS, path)
    w_enc = matrix(state, "encoder_linear.weight", path, "[d_sae, d_in]")  # nn.Linear: [out, in]
    d_sae, d_in = w_enc.shape
    m = _NAME.match(path.stem)
    cfg = make_config(
        path,
        {
            "architecture": "standard",
            "d_in": int(d_in),
            "d_sae": int(d_sae),
            "dtype": str(state["encoder_linear.weight"].dtype).removeprefix("torch."),
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "metadata": {
                "model_name": _model_id(m.group("model")) if m else None,
                "hook_name": tl_hook(m.group("layer")) if m else None,
            },
        },
    )
    tensors = {
        "W_enc": w_enc.T,
        "b_enc": state["encoder_linear.bias"],
        "W_dec": matrix(state, "decoder_linear.weight", path, "[d_in, d_sae]").T,
        "b_dec": state["decoder_linear.bias"],
    }
    return build_sae(cfg, tensors, path, opts)


FORMAT = SAEFormat(
    name="goodfire",
    description="Goodfire .pth (encoder_linear / decoder_linear, ReLU)",
    detect=lambda path: "encoder_linear.weight" in torch_state_keys(path),
    load=_load,
)
