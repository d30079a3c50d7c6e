"""What a user sees when an SAE cannot be loaded: one table, one message each."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from auditor.errors import AuditorError, ConfigError, SAEFormatError, SAESourceError, UnknownKeyError
from auditor.sae import SAE, SAEConfig, load_sae


def saelens_folder(tmp: Path, **overrides: torch.Tensor) -> Path:
    sae = SAE(SAEConfig(d_in=4, d_sae=8))
    folder = sae.save(tmp / "sae")
    tensors = {**sae.tensors(), **overrides}
    save_file({k: v for k, v in tensors.items() if v is not None}, str(folder / "sae_weights.safetensors"))
    return folder


def renamed_key(tmp: Path) -> Path:
    folder = saelens_folder(tmp)
    tensors = SAE(SAEConfig(d_in=4, d_sae=8)).tensors()
    tensors["W_encoder"] = tensors.pop("W_enc")
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def bad_cfg(tmp: Path) -> Path:
    folder = saelens_folder(tmp)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 8}))
    return folder


def gemma_without_threshold(tmp: Path) -> Path:
    folder = tmp / "layer_1"
    folder.mkdir()
    np.savez(folder / "params.npz", W_enc=np.zeros((4, 8)), W_dec=np.zeros((8, 4)),
             b_enc=np.zeros(8), b_dec=np.zeros(4))
    return folder


def dl_unknown_class(tmp: Path) -> Path:
    folder = tmp / "dl"
    folder.mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder"}}))
    return folder


def empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def not_json(tmp: Path) -> Path:
    folder = saelens_folder(tmp)
    (folder / "cfg.json").write_text("{not json")
    return folder


CASES: list[tuple[str, Callable[[Path], str | Path], dict, type[AuditorError], list[str]]] = [
    ("missing path", lambda t: t / "nope", {}, SAEFormatError, ["nope", "no such file or folder"]),
    ("unknown format", lambda t: saelens_folder(t), {"format": "onnx"}, UnknownKeyError,
     ["unknown SAE format 'onnx'", "known: dictionary_learning, gemma_scope, goodfire, llama_scope, openai, saelens, sparsify"]),
    ("empty folder", empty, {}, SAEFormatError,
     ["matches no known SAE format", "tried: saelens, sparsify, gemma_scope, llama_scope, dictionary_learning, openai, goodfire"]),
    ("wrong key", renamed_key, {}, SAEFormatError, ["sae_weights.safetensors", "missing tensors ['W_enc']", "W_encoder"]),
    ("wrong shape", lambda t: saelens_folder(t, b_enc=torch.zeros(7)), {}, SAEFormatError,
     ["tensor 'b_enc' has shape [7], expected [8]", "d_sae=8"]),
    ("invalid cfg", bad_cfg, {}, SAEFormatError, ["cfg.json", "invalid SAE config", "k is required"]),
    ("unreadable cfg", not_json, {}, SAEFormatError, ["cfg.json", "cannot read JSON"]),
    ("missing gemma key", gemma_without_threshold, {}, SAEFormatError, ["params.npz", "missing keys ['threshold']"]),
    ("forced wrong format", lambda t: saelens_folder(t), {"format": "sparsify"}, SAEFormatError,
     ["not a sparsify folder"]),
    ("unknown dict_class", dl_unknown_class, {}, SAEFormatError,
     ["unsupported dict_class 'CrossCoder'", "AutoEncoderTopK"]),
    ("unknown release", lambda t: "release:nope/x", {}, UnknownKeyError,
     ["unknown SAE release 'nope'", "gemma-scope-2b-pt-res", "gpt2-small-res-jb"]),
    ("bad release sae id", lambda t: "release:gemma-scope-2b-pt-res/layer_x", {}, ConfigError,
     ["has no SAE 'layer_x'", "layer_12/width_16k/average_l0_82"]),
    ("release off the hub", lambda t: "release:openai-gpt2-small-v5-32k/8", {}, SAESourceError,
     ["not on the Hugging Face hub", "resid_post_mlp_v5_32k/autoencoders/8.pt"]),
    ("bad hf uri", lambda t: "hf://just-a-name", {}, SAESourceError, ["expected hf://owner/repo"]),
    ("hub unreachable", lambda t: "hf://someone/missing-repo/layer_1", {"offline": True}, SAESourceError,
     ["cannot fetch repo 'someone/missing-repo'", "local path"]),
]


@pytest.mark.parametrize(("make", "kwargs", "error", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_load_errors(
    tmp_path: Path, make: Callable[[Path], str | Path], kwargs: dict, error: type[AuditorError], fragments: list[str]
) -> None:
    source = make(tmp_path)
    if kwargs.get("offline"):
        kwargs = {**kwargs, "cache_dir": tmp_path / "hf-cache"}
    with pytest.raises(error) as info:
        load_sae(source, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
