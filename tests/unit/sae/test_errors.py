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
from auditor.sae.formats._common import ConfigFields


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


def saelens_cfg(tmp: Path, **changes: object) -> Path:
    """A SAELens folder whose cfg.json has ``changes`` applied (a None value removes the key)."""
    folder = saelens_folder(tmp)
    cfg = {**json.loads((folder / "cfg.json").read_text()), **changes}
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return folder


def saelens_nan(tmp: Path) -> Path:
    w_dec = torch.ones(8, 4)
    w_dec[2, 1] = float("nan")
    return saelens_folder(tmp, W_dec=w_dec)


def saelens_rescaled_zero_row(tmp: Path) -> Path:
    w_dec = torch.ones(8, 4)
    w_dec[3] = 0
    folder = saelens_folder(tmp, W_dec=w_dec)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    return folder


def sparsify_folder(tmp: Path, cfg: dict | None = None, **overrides: torch.Tensor) -> Path:
    folder = tmp / "layers.1"
    folder.mkdir()
    tensors = {"encoder.weight": torch.zeros(8, 4), "encoder.bias": torch.zeros(8),
               "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4), **overrides}
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"k": 2, **(cfg or {})}))
    return folder


def openai_file(tmp: Path, **changes: object) -> Path:
    state = {"pre_bias": torch.zeros(4), "encoder.weight": torch.zeros(8, 4), "latent_bias": torch.zeros(8),
             "decoder.weight": torch.zeros(4, 8), "activation": "TopK", "activation_state_dict": {"k": 2}, **changes}
    torch.save(state, tmp / "8.pt")
    return tmp / "8.pt"


def goodfire_file(tmp: Path, **changes: torch.Tensor) -> Path:
    state = {"encoder_linear.weight": torch.zeros(8, 4), "encoder_linear.bias": torch.zeros(8),
             "decoder_linear.weight": torch.zeros(4, 8), "decoder_linear.bias": torch.zeros(4), **changes}
    torch.save(state, tmp / "g.pth")
    return tmp / "g.pth"


def dl_folder(tmp: Path, dict_class: str = "AutoEncoderTopK", config: dict | None = None, **state: object) -> Path:
    folder = tmp / "dl"
    folder.mkdir()
    tensors = {"encoder.weight": torch.zeros(8, 4), "encoder.bias": torch.zeros(8),
               "decoder.weight": torch.zeros(4, 8), "b_dec": torch.zeros(4), "k": torch.tensor(2), **state}
    torch.save(tensors, folder / "ae.pt")
    trainer = {"dict_class": dict_class, "k": 2, "submodule_name": "resid_post_layer_1"}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, **(config or {})}))
    return folder


def llama_scope_folder(tmp: Path, **changes: object) -> Path:
    folder = tmp / "L1R"
    (folder / "checkpoints").mkdir(parents=True)
    save_file({"encoder.weight": torch.zeros(8, 4), "encoder.bias": torch.zeros(8),
               "decoder.weight": torch.zeros(4, 8), "decoder.bias": torch.zeros(4)},
              str(folder / "checkpoints" / "final.safetensors"))
    hp = {"d_model": 4, "jump_relu_threshold": 0.1, "dataset_average_activation_norm": {"in": 2.0},
          "hook_point_in": "blocks.1.hook_resid_post", **changes}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return folder


CASES: list[tuple[str, Callable[[Path], str | Path], dict, type[AuditorError], list[str]]] = [
    ("missing path", lambda t: t / "nope", {}, SAEFormatError, ["nope", "no such file or folder"]),
    ("unknown format", lambda t: saelens_folder(t), {"format": "onnx"}, UnknownKeyError,
     ["unknown SAE format 'onnx'", "known: dictionary_learning, gemma_scope, goodfire, llama_scope, openai, saelens, sparsify"]),
    ("empty folder", empty, {}, SAEFormatError,
     ["matches no known SAE format", "tried: saelens, sparsify, gemma_scope, llama_scope, dictionary_learning, openai, goodfire",
      "pass --format NAME", "format=NAME in Python"]),
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
    ("saelens k not a number", lambda t: saelens_cfg(t, architecture="topk", k="eight"), {}, SAEFormatError,
     ["cfg.json", "field 'k' must be a whole number, got 'eight'"]),
    ("saelens legacy k not a number", lambda t: saelens_cfg(t, k=None, activation_fn_kwargs={"k": [2]}), {}, SAEFormatError,
     ["cfg.json", "field 'activation_fn_kwargs.k' must be a whole number, got [2]"]),
    ("saelens flag as a string", lambda t: saelens_cfg(t, apply_b_dec_to_input="false"), {}, SAEFormatError,
     ["cfg.json", "field 'apply_b_dec_to_input' must be true or false (a JSON boolean, not a string or number), got 'false'"]),
    ("saelens metadata field type", lambda t: saelens_cfg(t, metadata={"context_size": "long"}), {}, SAEFormatError,
     ["cfg.json", "metadata.context_size: Input should be a valid integer", "(got 'long')"]),
    ("saelens metadata not an object", lambda t: saelens_cfg(t, metadata=["x"]), {}, SAEFormatError,
     ["cfg.json", "field 'metadata' must be an object of named fields, got ['x']"]),
    ("saelens NaN weight", saelens_nan, {}, SAEFormatError,
     ["sae_weights.safetensors", "tensor 'W_dec' has NaN or infinite values (1 of 32)"]),
    ("saelens inf weight", lambda t: saelens_folder(t, b_enc=torch.full((8,), float("inf"))), {}, SAEFormatError,
     ["sae_weights.safetensors", "tensor 'b_enc' has NaN or infinite values (8 of 8)"]),
    ("overflow of the chosen dtype", lambda t: saelens_folder(t, W_enc=torch.full((4, 8), 1e6)),
     {"dtype": torch.float16}, SAEFormatError, ["sae_weights.safetensors", "tensor 'W_enc' overflows float16"]),
    ("rescale with a zero decoder row", saelens_rescaled_zero_row, {}, SAEFormatError,
     ["sae_weights.safetensors", "rescale_acts_by_decoder_norm", "1 of the 8 W_dec rows are all zero (latents 3)"]),
    ("sparsify 1-D weight", lambda t: sparsify_folder(t, **{"encoder.weight": torch.zeros(32)}), {}, SAEFormatError,
     ["sae.safetensors", "tensor 'encoder.weight' must be 2-D [d_sae, d_in], got a tensor of shape [32]"]),
    ("sparsify k not a number", lambda t: sparsify_folder(t, {"k": "x"}), {}, SAEFormatError,
     ["cfg.json", "field 'k' must be a whole number, got 'x'"]),
    ("openai 1-D weight", lambda t: openai_file(t, **{"encoder.weight": torch.zeros(32)}), {}, SAEFormatError,
     ["8.pt", "tensor 'encoder.weight' must be 2-D [d_sae, d_in]"]),
    ("openai k not a number", lambda t: openai_file(t, activation_state_dict={"k": "x"}), {}, SAEFormatError,
     ["8.pt", "field 'activation_state_dict.k' must be a whole number, got 'x'"]),
    ("openai bias not a tensor", lambda t: openai_file(t, latent_bias=[0.0] * 8), {}, SAEFormatError,
     ["8.pt", "'b_enc' is a list, not a tensor"]),
    ("goodfire 1-D decoder", lambda t: goodfire_file(t, **{"decoder_linear.weight": torch.zeros(32)}), {},
     SAEFormatError, ["g.pth", "tensor 'decoder_linear.weight' must be 2-D [d_in, d_sae]"]),
    ("dictionary_learning k not a number", lambda t: dl_folder(t, config={"trainer": {
        "dict_class": "AutoEncoderTopK", "k": "eight"}}), {}, SAEFormatError,
     ["config.json", "field 'trainer.k' must be a whole number, got 'eight'"]),
    ("dictionary_learning buffer not an object", lambda t: dl_folder(t, config={"buffer": "oops"}), {}, SAEFormatError,
     ["config.json", "field 'buffer' must be an object of named fields, got 'oops'"]),
    ("dictionary_learning trainer not an object", lambda t: dl_folder(t, config={"trainer": 5}), {}, SAEFormatError,
     ["matches no known SAE format"]),
    ("dictionary_learning 1-D weight", lambda t: dl_folder(t, **{"decoder.weight": torch.zeros(32)}), {}, SAEFormatError,
     ["ae.pt", "tensor 'decoder.weight' must be 2-D [activation_dim, dict_size]"]),
    ("BatchTopK per-latent threshold", lambda t: dl_folder(t, "BatchTopKSAE", threshold=torch.rand(8)), {}, SAEFormatError,
     ["ae.pt", "tensor 'threshold' has shape [8]", "one threshold for all latents", "architecture 'jumprelu'"]),
    ("BatchTopK threshold not a number", lambda t: dl_folder(t, "BatchTopKSAE", threshold="high"), {}, SAEFormatError,
     ["ae.pt", "field 'threshold' must be a finite number, got 'high'"]),
    ("llama scope norm not an object", lambda t: llama_scope_folder(t, dataset_average_activation_norm=5.0), {},
     SAEFormatError, ["hyperparams.json", "field 'dataset_average_activation_norm' must be an object of named fields"]),
    ("llama scope norm a string", lambda t: llama_scope_folder(t, dataset_average_activation_norm={"in": "12"}), {},
     SAEFormatError, ["hyperparams.json", "field 'dataset_average_activation_norm.in' must be a finite number, got '12'"]),
    ("llama scope norm zero", lambda t: llama_scope_folder(t, dataset_average_activation_norm={"in": 0}), {},
     SAEFormatError, ["hyperparams.json", "field 'dataset_average_activation_norm.in' must be > 0, got 0"]),
    ("llama scope threshold a string", lambda t: llama_scope_folder(t, jump_relu_threshold="x"), {},
     SAEFormatError, ["hyperparams.json", "field 'jump_relu_threshold' must be a finite number, got 'x'"]),
    ("llama scope hookpoint not a string", lambda t: llama_scope_folder(t, hook_point_in=3), {},
     SAEFormatError, ["hyperparams.json", "field 'hook_point_in' must be a string, got 3"]),
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


@pytest.mark.parametrize(
    ("value", "expected"),
    [(32, 32), (32.0, 32), (torch.tensor(32), 32), (None, None), (True, "whole number"), ("32", "whole number"),
     (2.5, "whole number"), (0, "must be > 0"), (torch.zeros(2), "whole number")],
    ids=repr,
)
def test_config_fields_integer(value: object, expected: int | str | None) -> None:
    fields = ConfigFields({"k": value}, Path("cfg.json"), "trainer.")
    if not isinstance(expected, str):
        assert fields.integer("k", positive=True) == expected
        return
    with pytest.raises(SAEFormatError) as info:
        fields.integer("k", positive=True)
    assert info.value.path == "cfg.json" and "field 'trainer.k'" in info.value.reason and expected in info.value.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2, 2.0), (0.5, 0.5), (torch.tensor(0.5), 0.5), (float("nan"), "finite number"), (float("inf"), "finite number"),
     (False, "finite number"), ("0.5", "finite number")],
    ids=repr,
)
def test_config_fields_number(value: object, expected: float | str) -> None:
    fields = ConfigFields({"x": value}, Path("hyperparams.json"))
    if isinstance(expected, float):
        assert fields.number("x") == expected
        return
    with pytest.raises(SAEFormatError, match="field 'x' must be a finite number"):
        fields.number("x")


def test_config_fields_required_and_section() -> None:
    fields = ConfigFields({"norm": None, "bad": 3}, Path("hp.json"))
    assert fields.section("norm").data == {} and fields.section("missing").prefix == "missing."
    with pytest.raises(SAEFormatError, match="field 'norm.in' is required"):
        fields.section("norm").number("in", required=True)
    with pytest.raises(SAEFormatError, match="field 'bad' must be an object of named fields, got 3"):
        fields.section("bad")
