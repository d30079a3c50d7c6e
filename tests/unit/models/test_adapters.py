from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from auditor.errors import ModelError, UnknownKeyError
from auditor.models.adapters import ADAPTERS, get_adapter, replace_output, unwrap_output

from .conftest import HIDDEN, LAYERS, VOCAB

EXPECTED_TYPES = {
    "gpt2",
    "llama",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "qwen2",
    "qwen3",
    "gpt_neox",
}


def test_registry_covers_the_supported_families() -> None:
    assert set(ADAPTERS) == EXPECTED_TYPES


def test_adapter_finds_layers_and_sizes(model: nn.Module) -> None:
    adapter = get_adapter(model)
    assert model.config.model_type in adapter.model_types
    assert adapter.d_model(model) == HIDDEN
    assert adapter.n_layers(model) == LAYERS
    layers = adapter.layers(model)
    assert len(layers) == LAYERS
    for index in range(LAYERS):
        assert adapter.attn_module(model, index) in set(layers[index].modules())
        assert adapter.mlp_module(model, index) in set(layers[index].modules())
    assert adapter.final_norm(model) not in set(layers.modules())


def test_adapter_works_on_the_bare_base_model(model: nn.Module) -> None:
    base = model.base_model
    adapter = get_adapter(base)
    assert adapter.layers(base) is get_adapter(model).layers(model)
    assert adapter.final_norm(base) is get_adapter(model).final_norm(model)


def test_gemma3_multimodal_wrapper_reaches_text_layers() -> None:
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=1
    )
    model = transformers.Gemma3ForConditionalGeneration(config)
    adapter = get_adapter(model)
    assert adapter.family == "Gemma2/3"
    assert adapter.n_layers(model) == 2
    assert adapter.d_model(model) == HIDDEN
    assert adapter.layers(model) is model.model.language_model.layers


def test_unknown_architecture_lists_known_ones() -> None:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.BertModel(config)
    with pytest.raises(UnknownKeyError) as info:
        get_adapter(model)
    assert info.value.key == "bert"
    assert set(info.value.known) == EXPECTED_TYPES
    message = str(info.value)
    assert "unknown model architecture 'bert'" in message
    for model_type in EXPECTED_TYPES:
        assert model_type in message


def test_object_without_config_is_unknown() -> None:
    with pytest.raises(UnknownKeyError, match="known: gemma"):
        get_adapter(nn.Linear(2, 2))


def test_unwrap_and_replace_tensor_and_tuple() -> None:
    a = torch.ones(1, 2, 3)
    b = torch.zeros(1, 2, 3)
    weights = torch.full((1, 1, 2, 2), 0.5)
    assert unwrap_output(a) is a
    assert replace_output(a, b) is b
    out = replace_output((a, weights), b)
    assert isinstance(out, tuple) and out[0] is b and out[1] is weights
    assert unwrap_output((a, None)) is a
    assert replace_output([a, None], b) == [b, None]


@pytest.mark.parametrize("bad", [None, (), ("x",), {"hidden": torch.ones(1)}])
def test_unwrap_rejects_outputs_without_a_tensor(bad: object) -> None:
    with pytest.raises(ModelError, match="cannot find the activation tensor"):
        unwrap_output(bad)
