"""OpenAI sparse_autoencoder (GPT-2 small): a ``.pt`` state dict.

Keys ``pre_bias [d]``, ``encoder.weight [n, d]``, ``latent_bias [n]``,
``decoder.weight [d, n]``, optional ``activation`` (class name) and
``activation_state_dict`` (``{"k": ...}``); training buffers such as
``stats_last_nonzero`` are ignored. OpenAI's reader: TopK activation implies the
input is layer-normed (``(x - mu) / (std + 1e-5)``, undone on decode);
``latents = act(encoder(x - pre_bias) + latent_bias)``, ``recons = decoder(latents) + pre_bias``.
So TopK -> ``topk`` + ``layer_norm`` + ``apply_b_dec_to_input`` with ``b_dec = pre_bias``;
a missing ``activation`` means ReLU without normalization, as in their reader.
TopK without a stored k uses 32 (the v5 release); ``k=`` overrides.
"""

from __future__ import annotations

from pathlib import Path

from auditor.errors import SAEFormatError
from auditor.sae.formats import SAEFormat
from auditor.sae.formats._common import (
    ConfigFields,
    LoadOptions,
    build_sae,
    make_config,
    matrix,
    read_torch_state,
    require,
    torch_state_keys,
)
from auditor.sae.sae import SAE

__all__ = ["DEFAULT_K", "FORMAT"]

DEFAULT_K = 32
_KEYS = ["pre_bias", "encoder.weight", "latent_bias", "decoder.weight"]


def _load(path: Path, opts: LoadOptions) -> SAE:
    if not path.is_file():
        raise SAEFormatError(str(path), "an OpenAI SAE is a single .pt file")
    state = read_torch_state(path)
    require(state, _KEYS, path)
    activation = str(state.get("activation", "ReLU"))
    if activation not in ("TopK", "ReLU"):
        raise SAEFormatError(str(path), f"unsupported activation {activation!r} (TopK, ReLU)")
    d_sae, d_in = matrix(state, "encoder.weight", path, "[d_sae, d_in]").shape
    topk = activation == "TopK"
    k = opts.k
    if topk and k is None:
        k = ConfigFields(state, path).section("activation_state_dict").integer("k")
        k = DEFAULT_K if k is None else k
    cfg = make_config(
        path,
        {
            "architecture": "topk" if topk else "standard",
            "d_in": int(d_in),
            "d_sae": int(d_sae),
            "k": k if topk else None,
            "dtype": str(state["encoder.weight"].dtype).removeprefix("torch."),
            "apply_b_dec_to_input": True,
            "normalize_activations": "layer_norm" if topk else "none",
            "metadata": {"model_name": "gpt2"},
        },
    )
    tensors = {
        "W_enc": state["encoder.weight"].T,
        "b_enc": state["latent_bias"],
        "W_dec": matrix(state, "decoder.weight", path, "[d_in, d_sae]").T,
        "b_dec": state["pre_bias"],
    }
    return build_sae(cfg, tensors, path, opts)


FORMAT = SAEFormat(
    name="openai",
    description="OpenAI sparse_autoencoder .pt (pre_bias, latent_bias; TopK + layer norm)",
    detect=lambda path: "pre_bias" in torch_state_keys(path),
    load=_load,
)
