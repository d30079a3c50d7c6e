"""A tiny random Llama, a real (BPE) tokenizer trained on a tiny corpus, both built in the test process."""

from __future__ import annotations

import json
import random
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

VOCAB = 128
HIDDEN = 32
LAYERS = 2
HOOKPOINT = "blocks.0.hook_resid_post"

_WORDS = (
    "the a cat dog bird sat ran flew over under near house tree river quickly slowly red blue green "
    "small large old young man woman child saw heard found lost kept money bank account password "
    "send click link free offer today market price rose fell because when after before and but"
).split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` short pseudo-English documents, the same for the same seed."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(240)


@pytest.fixture(scope="session")
def tokenizer(documents: list[str]) -> Any:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(documents, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    built = transformers.LlamaForCausalLM(config).eval()
    built.requires_grad_(False)
    return built


@pytest.fixture()
def corpus_file(tmp_path: Path, documents: list[str]) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d, "source": "test"}) + "\n" for d in documents))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors train several times faster on one thread when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
