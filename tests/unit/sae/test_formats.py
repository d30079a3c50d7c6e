"""Every format: files written in the real layout, loaded, checked against the format's own formula."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.testing import assert_close

from auditor.sae import SAE, load_sae

from ._reference import D_IN, D_SAE, K, LN_EPS, N, topk_relu

Ref = Callable[[Tensor], Tensor]


@dataclass
class Case:
    path: Path
    format: str
    encode: Ref  # the format's own encode formula on raw tensors
    forward: Ref  # the format's own reconstruction
    hook_name: str | None
    architecture: str


def rand(gen: torch.Generator, *shape: int, scale: float = 0.4) -> Tensor:
    return torch.randn(*shape, generator=gen) * scale


def relu(t: Tensor) -> Tensor:
    return torch.clamp(t, min=0)


def saelens_v6(tmp: Path, gen: torch.Generator) -> Case:
    folder = tmp / "blocks.3.hook_resid_post"
    folder.mkdir()
    w = {
        "W_enc": rand(gen, D_IN, D_SAE),
        "b_enc": rand(gen, D_SAE),
        "W_dec": rand(gen, D_SAE, D_IN),
        "b_dec": rand(gen, D_IN),
        "threshold": torch.rand(D_SAE, generator=gen) * 0.5,
    }
    save_file(w, str(folder / "sae_weights.safetensors"))
    save_file({"sparsity": torch.zeros(D_SAE)}, str(folder / "sparsity.safetensors"))
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_post",
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": 128,
            "dataset_path": "Skylion007/openwebtext",
            "sae_lens_version": "6.5.0",
        },
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))

    def enc(x: Tensor) -> Tensor:
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        return relu(pre) * (pre > w["threshold"])

    return Case(folder, "saelens", enc, lambda x: enc(x) @ w["W_dec"] + w["b_dec"],
                "blocks.3.hook_resid_post", "jumprelu")


def saelens_legacy_topk(tmp: Path, gen: torch.Generator) -> Case:
    folder = tmp / "legacy"
    folder.mkdir()
    w = {
        "W_enc": rand(gen, D_IN, D_SAE),
        "b_enc": rand(gen, D_SAE),
        "W_dec": rand(gen, D_SAE, D_IN),
        "b_dec": rand(gen, D_IN),
        "scaling_factor": torch.rand(D_SAE, generator=gen) + 0.5,
    }
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "model_name": "gpt2-small",
        "hook_point": "blocks.7.hook_resid_pre",
        "hook_point_layer": 7,
        "hook_point_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": True,
        "normalize_activations": False,
        "context_size": 128,
        "prepend_bos": True,
        "sae_lens_training_version": "3.0.0",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))

    def enc(x: Tensor) -> Tensor:
        return topk_relu(x @ w["W_enc"] + w["b_enc"], K)

    def fwd(x: Tensor) -> Tensor:
        return (enc(x) * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"]

    return Case(folder, "saelens", enc, fwd, "blocks.7.hook_resid_pre", "topk")


def saelens_v6_topk_rescaled(tmp: Path, gen: torch.Generator) -> Case:
    folder = tmp / "topk"
    folder.mkdir()
    w = {
        "W_enc": rand(gen, D_IN, D_SAE),
        "b_enc": rand(gen, D_SAE),
        "W_dec": rand(gen, D_SAE, D_IN),
        "b_dec": rand(gen, D_IN),
    }
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "dtype": "float32",
           "apply_b_dec_to_input": True,
           # No stored factor: SAELens has folded it already and applies no runtime scaling.
           "normalize_activations": "expected_average_only_in",
           "rescale_acts_by_decoder_norm": True, "metadata": {"hook_name": None}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    n = w["W_dec"].norm(dim=-1)

    def enc(x: Tensor) -> Tensor:
        return topk_relu(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n, K)

    return Case(folder, "saelens", enc, lambda x: (enc(x) / n) @ w["W_dec"] + w["b_dec"], None, "topk")


def sparsify(tmp: Path, gen: torch.Generator) -> Case:
    folder = tmp / "layers.3"
    folder.mkdir()
    w = {
        "encoder.weight": rand(gen, D_SAE, D_IN),
        "encoder.bias": rand(gen, D_SAE),
        "W_dec": rand(gen, D_SAE, D_IN),
        "b_dec": rand(gen, D_IN),
    }
    save_file(w, str(folder / "sae.safetensors"))
    cfg = {"expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
           "multi_topk": False, "skip_connection": False, "d_in": D_IN}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (tmp / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "hookpoints": ["layers.3"]}))

    def enc(x: Tensor) -> Tensor:
        pre = relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
        top = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    return Case(folder, "sparsify", enc, lambda x: enc(x) @ w["W_dec"] + w["b_dec"],
                "blocks.3.hook_resid_post", "topk")


def _gemma(tmp: Path, gen: torch.Generator, *, lowercase: bool, safetensors: bool) -> Case:
    folder = tmp / "gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    w = {
        "W_enc": rand(gen, D_IN, D_SAE),
        "W_dec": rand(gen, D_SAE, D_IN),
        "b_enc": rand(gen, D_SAE),
        "b_dec": rand(gen, D_IN),
        "threshold": torch.rand(D_SAE, generator=gen) * 0.5,
    }
    stored = {(k.lower() if lowercase else k): v for k, v in w.items()}
    if safetensors:
        save_file(stored, str(folder / "params.safetensors"))
    else:
        np.savez(folder / "params.npz", **{k: v.numpy() for k, v in stored.items()})

    def enc(x: Tensor) -> Tensor:
        pre = x @ w["W_enc"] + w["b_enc"]
        return (pre > w["threshold"]) * relu(pre)

    return Case(folder, "gemma_scope", enc, lambda x: enc(x) @ w["W_dec"] + w["b_dec"],
                "blocks.5.hook_resid_post", "jumprelu")


def gemma_npz(tmp: Path, gen: torch.Generator) -> Case:
    return _gemma(tmp, gen, lowercase=False, safetensors=False)


def gemma_npz_lowercase(tmp: Path, gen: torch.Generator) -> Case:
    return _gemma(tmp, gen, lowercase=True, safetensors=False)


def gemma_scope_2(tmp: Path, gen: torch.Generator) -> Case:
    return _gemma(tmp, gen, lowercase=True, safetensors=True)


def llama_scope(tmp: Path, gen: torch.Generator) -> Case:
    folder = tmp / "Llama3_1-8B-Base-L4R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    w = {
        "encoder.weight": rand(gen, D_SAE, D_IN),
        "encoder.bias": rand(gen, D_SAE),
        "decoder.weight": rand(gen, D_IN, D_SAE),
        "decoder.bias": rand(gen, D_IN),
    }
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    norm_in, thr = 7.5, 0.3
    hp = {"d_model": D_IN, "d_sae": D_SAE, "jump_relu_threshold": thr,
          "hook_point_in": "blocks.4.hook_resid_post", "hook_point_out": "blocks.4.hook_resid_post",
          "dataset_average_activation_norm": {"in": norm_in, "out": norm_in}}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    s = math.sqrt(D_IN) / norm_in

    def enc(x: Tensor) -> Tensor:
        pre = (x * s) @ w["encoder.weight"].T + w["encoder.bias"]
        return relu(pre) * (pre > thr * s)

    def fwd(x: Tensor) -> Tensor:
        return (enc(x) @ w["decoder.weight"].T + w["decoder.bias"]) / s

    return Case(folder, "llama_scope", enc, fwd, "blocks.4.hook_resid_post", "jumprelu")


def openai(tmp: Path, gen: torch.Generator) -> Case:
    path = tmp / "8.pt"
    state = {
        "pre_bias": rand(gen, D_IN),
        "latent_bias": rand(gen, D_SAE),
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "encoder.weight": rand(gen, D_SAE, D_IN),
        "decoder.weight": rand(gen, D_IN, D_SAE),
        "activation": "TopK",
        "activation_state_dict": {"k": K, "postact_fn": "ReLU"},
    }
    torch.save(state, path)

    def ln(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        return (x - mu) / (std + LN_EPS), mu, std

    def enc(x: Tensor) -> Tensor:
        xn, _, _ = ln(x)
        pre = (xn - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
        return topk_relu(pre, K)

    def fwd(x: Tensor) -> Tensor:
        _, mu, std = ln(x)
        recons = enc(x) @ state["decoder.weight"].T + state["pre_bias"]
        return recons * std + mu

    return Case(path, "openai", enc, fwd, None, "topk")


def goodfire(tmp: Path, gen: torch.Generator) -> Case:
    path = tmp / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    state = {
        "encoder_linear.weight": rand(gen, D_SAE, D_IN),
        "encoder_linear.bias": rand(gen, D_SAE),
        "decoder_linear.weight": rand(gen, D_IN, D_SAE),
        "decoder_linear.bias": rand(gen, D_IN),
    }
    torch.save(state, path)

    def enc(x: Tensor) -> Tensor:
        return relu(x @ state["encoder_linear.weight"].T + state["encoder_linear.bias"])

    def fwd(x: Tensor) -> Tensor:
        return enc(x) @ state["decoder_linear.weight"].T + state["decoder_linear.bias"]

    return Case(path, "goodfire", enc, fwd, "blocks.19.hook_resid_post", "standard")


def _dl_write(tmp: Path, dict_class: str, state: dict) -> Path:
    folder = tmp / "resid_post_layer_3" / "trainer_0"
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    cfg = {
        "trainer": {"dict_class": dict_class, "trainer_class": "X", "activation_dim": D_IN,
                    "dict_size": D_SAE, "k": K, "lm_name": "EleutherAI/pythia-70m-deduped",
                    "layer": 3, "submodule_name": "resid_post_layer_3"},
        "buffer": {"d_submodule": D_IN, "ctx_len": 128},
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def dl_autoencoder(tmp: Path, gen: torch.Generator) -> Case:
    s = {"bias": rand(gen, D_IN), "encoder.weight": rand(gen, D_SAE, D_IN),
         "encoder.bias": rand(gen, D_SAE), "decoder.weight": rand(gen, D_IN, D_SAE)}

    def enc(x: Tensor) -> Tensor:
        return relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])

    return Case(_dl_write(tmp, "AutoEncoder", s), "dictionary_learning", enc,
                lambda x: enc(x) @ s["decoder.weight"].T + s["bias"], "blocks.3.hook_resid_post", "standard")


def dl_topk(tmp: Path, gen: torch.Generator) -> Case:
    s = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.2),
         "decoder.weight": rand(gen, D_IN, D_SAE), "encoder.weight": rand(gen, D_SAE, D_IN),
         "encoder.bias": rand(gen, D_SAE), "b_dec": rand(gen, D_IN)}

    def enc(x: Tensor) -> Tensor:
        post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        top = post.topk(K, dim=-1)
        return torch.zeros_like(post).scatter(-1, top.indices, top.values)

    return Case(_dl_write(tmp, "AutoEncoderTopK", s), "dictionary_learning", enc,
                lambda x: enc(x) @ s["decoder.weight"].T + s["b_dec"], "blocks.3.hook_resid_post", "topk")


def dl_batch_topk(tmp: Path, gen: torch.Generator) -> Case:
    s = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.3),
         "decoder.weight": rand(gen, D_IN, D_SAE), "encoder.weight": rand(gen, D_SAE, D_IN),
         "encoder.bias": rand(gen, D_SAE), "b_dec": rand(gen, D_IN)}

    def enc(x: Tensor) -> Tensor:
        post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return post * (post > s["threshold"])

    return Case(_dl_write(tmp, "BatchTopKSAE", s), "dictionary_learning", enc,
                lambda x: enc(x) @ s["decoder.weight"].T + s["b_dec"], "blocks.3.hook_resid_post", "batchtopk")


def dl_gated(tmp: Path, gen: torch.Generator) -> Case:
    s = {"decoder_bias": rand(gen, D_IN), "encoder.weight": rand(gen, D_SAE, D_IN),
         "r_mag": rand(gen, D_SAE, scale=0.2), "gate_bias": rand(gen, D_SAE),
         "mag_bias": rand(gen, D_SAE), "decoder.weight": rand(gen, D_IN, D_SAE)}

    def enc(x: Tensor) -> Tensor:
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        f_gate = (x_enc + s["gate_bias"] > 0).float()
        return f_gate * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])

    return Case(_dl_write(tmp, "GatedAutoEncoder", s), "dictionary_learning", enc,
                lambda x: enc(x) @ s["decoder.weight"].T + s["decoder_bias"], "blocks.3.hook_resid_post", "gated")


def dl_jumprelu(tmp: Path, gen: torch.Generator) -> Case:
    s = {"W_enc": rand(gen, D_IN, D_SAE), "b_enc": rand(gen, D_SAE), "W_dec": rand(gen, D_SAE, D_IN),
         "b_dec": rand(gen, D_IN), "threshold": torch.rand(D_SAE, generator=gen) * 0.5}

    def enc(x: Tensor) -> Tensor:
        pre = x @ s["W_enc"] + s["b_enc"]
        return relu(pre * (pre > s["threshold"]))

    return Case(_dl_write(tmp, "JumpReluAutoEncoder", s), "dictionary_learning", enc,
                lambda x: enc(x) @ s["W_dec"] + s["b_dec"], "blocks.3.hook_resid_post", "jumprelu")


BUILDERS = [saelens_v6, saelens_legacy_topk, saelens_v6_topk_rescaled, sparsify, gemma_npz, gemma_npz_lowercase, gemma_scope_2,
            llama_scope, openai, goodfire, dl_autoencoder, dl_topk, dl_batch_topk, dl_gated, dl_jumprelu]


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_format_loads_and_matches_its_own_formula(tmp_path: Path, builder: Callable[..., Case]) -> None:
    case = builder(tmp_path, torch.Generator().manual_seed(7))
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3)) * 2 + 0.3
    f_ref = case.encode(x)
    assert (f_ref > 0).any()
    detected = load_sae(case.path)
    forced = load_sae(case.path, format=case.format)
    for sae in (detected, forced):
        assert sae.cfg.architecture == case.architecture
        assert sae.cfg.metadata.hook_name == case.hook_name
        assert_close(sae.encode(x), f_ref)
        assert_close(sae(x), case.forward(x), atol=1e-5, rtol=1e-5)
    idx = [1, 9, 40]
    assert_close(detected.encode(x, idx), f_ref[:, idx])

    saved = detected.save(tmp_path / "saved")
    again = load_sae(saved)
    assert again.cfg == detected.cfg
    for name, tensor in detected.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name
    assert torch.equal(again.encode(x), detected.encode(x))
    assert_close(again(x), detected(x))


def test_format_device_and_dtype_options(tmp_path: Path) -> None:
    case = goodfire(tmp_path, torch.Generator().manual_seed(1))
    sae = load_sae(case.path, dtype=torch.float64, device="cpu")
    assert sae.W_enc.dtype == torch.float64 and sae.cfg.dtype == "float64"


def test_openai_k_override_and_relu_variant(tmp_path: Path) -> None:
    case = openai(tmp_path, torch.Generator().manual_seed(2))
    assert load_sae(case.path, k=4).cfg.k == 4
    state = torch.load(case.path, weights_only=True)
    del state["activation"], state["activation_state_dict"]
    relu_path = tmp_path / "relu.pt"
    torch.save(state, relu_path)
    sae = load_sae(relu_path)
    assert (sae.cfg.architecture, sae.cfg.normalize_activations) == ("standard", "none")
    x = torch.randn(N, D_IN)
    ref = relu((x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"])
    assert_close(sae.encode(x), ref)


def test_sae_load_is_the_saelens_reader(tmp_path: Path) -> None:
    case = saelens_legacy_topk(tmp_path, torch.Generator().manual_seed(4))
    sae = SAE.load(case.path)
    assert sae.cfg.k == K and sae.cfg.metadata.model_extra["sae_lens_training_version"] == "3.0.0"


def test_goodfire_model_id_only_for_llama_names(tmp_path: Path) -> None:
    case = goodfire(tmp_path, torch.Generator().manual_seed(5))
    assert load_sae(case.path).cfg.metadata.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    other = case.path.with_name("SmolLM2-135M-Instruct-SAE-l15.pth")
    case.path.rename(other)
    meta = load_sae(other).cfg.metadata
    assert (meta.model_name, meta.hook_name) == (None, "blocks.15.hook_resid_post")
