"""A tiny random Llama with a one-token-per-character tokenizer and a random SAE, built in the test."""

from __future__ import annotations

import string

import pytest
import torch
import transformers

from auditor.models import LoadedModel, get_adapter
from auditor.pipeline import Auditor
from auditor.sae import SAE, SAEConfig

HIDDEN = 32
D_SAE = 48
HOOKPOINT = "blocks.1.hook_resid_post"
SPECIALS = ["<s>", "</s>", "<pad>"]
CHARS = list(string.ascii_letters + string.digits + " .,!?'-")


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_auditor() -> Auditor:
    tok = _tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = transformers.LlamaForCausalLM(config).eval().requires_grad_(False)
    adapter = get_adapter(model)
    loaded = LoadedModel(
        model=model,
        tokenizer=tok,
        name="tiny-llama",
        adapter=adapter,
        d_model=adapter.d_model(model),
        n_layers=adapter.n_layers(model),
        device=torch.device("cpu"),
    )
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(HIDDEN, D_SAE, generator=gen)
    w = w / w.norm(dim=0, keepdim=True)
    cfg = SAEConfig(architecture="standard", d_in=HIDDEN, d_sae=D_SAE, metadata={"hook_name": HOOKPOINT, "model_name": "tiny"})
    sae = SAE.from_tensors(
        cfg, {"W_enc": w, "b_enc": -torch.rand(D_SAE, generator=gen) * 0.3, "W_dec": w.T.contiguous(), "b_dec": torch.zeros(HIDDEN)}
    )
    return Auditor(loaded, sae, hookpoint=HOOKPOINT)
