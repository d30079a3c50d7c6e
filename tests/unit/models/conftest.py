"""Tiny random models of every supported family, built in the test process."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from torch import nn

VOCAB = 97
HIDDEN = 32
LAYERS = 3


def _llama_like(cls: type) -> Callable[[], object]:
    def build() -> object:
        return cls(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
        )

    return build


def _gemma3_text() -> object:
    return transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=4,
    )


CONFIGS: dict[str, Callable[[], object]] = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "llama": _llama_like(transformers.LlamaConfig),
    "mistral": _llama_like(transformers.MistralConfig),
    "gemma": _llama_like(transformers.GemmaConfig),
    "gemma2": _llama_like(transformers.Gemma2Config),
    "gemma3_text": _gemma3_text,
    "qwen2": _llama_like(transformers.Qwen2Config),
    "qwen3": _llama_like(transformers.Qwen3Config),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
        use_parallel_residual=False,
    ),
}

_CACHE: dict[str, nn.Module] = {}


def build_model(family: str) -> nn.Module:
    """A seeded tiny random ``*ForCausalLM`` of ``family``, in eval mode."""
    if family not in _CACHE:
        torch.manual_seed(0)
        config = CONFIGS[family]()
        model = transformers.AutoModelForCausalLM.from_config(config)
        # Random init gives tiny activations; widen the weights so differences are visible.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.3)
        _CACHE[family] = model.eval()
    return _CACHE[family]


@pytest.fixture(params=sorted(CONFIGS))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def model(family: str) -> nn.Module:
    return build_model(family)


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 7), generator=generator)  # [B, T]


# Three streams of different lengths, uneven chunks: one joins late, one skips a round, one grows
# a token at a time, so rounds mix 1-token and many-token slices.
ROUNDS: list[list[tuple[int, int] | None]] = [
    [(0, 6), (0, 1), None],
    [(6, 7), (1, 2), (0, 10)],
    [(7, 15), None, (10, 11)],
    [(15, 23), (2, 9), (11, 17)],
]


def feed_in_rounds(
    model: nn.Module, hook: str, seqs: list[list[int]], rounds: list[list[tuple[int, int] | None]] = ROUNDS
) -> tuple[list[torch.Tensor], list[object]]:
    """Each sequence fed to ``capture_streams`` in the rounds' cuts (None: that stream skips the
    round); each sequence's activations joined, and its cache."""
    from auditor.models.streams import StreamCache, capture_streams

    caches = [StreamCache() for _ in seqs]
    parts: list[list[torch.Tensor]] = [[] for _ in seqs]
    for cuts in rounds:
        live = [i for i, cut in enumerate(cuts) if cut is not None]
        outs = capture_streams(model, hook, [caches[i] for i in live], [seqs[i][cuts[i][0] : cuts[i][1]] for i in live])  # type: ignore[index]
        for i, out in zip(live, outs):
            parts[i].append(out)
    return [torch.cat(p) for p in parts], list(caches)

