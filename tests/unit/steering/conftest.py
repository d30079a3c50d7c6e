"""A tiny random Llama with a character tokenizer, random SAEs and a tiny library, built in the test."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
import transformers

from auditor.models import LoadedModel, get_adapter
from auditor.pipeline import Auditor
from auditor.sae import SAE, SAEConfig

HIDDEN = 32
D_SAE = 64
HOOKPOINT = "blocks.1.hook_resid_post"
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHARS = list(string.ascii_letters + string.digits + " .,!?'\n:-")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character, ChatML-style special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        eos_token_id=4,
        bos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
        # A zero end-of-sequence row keeps greedy completions long enough to compare.
        model.lm_head.weight[4].zero_()
    model.generation_config.eos_token_id = 4
    return model.eval().requires_grad_(False)


def random_sae(
    *,
    architecture: str = "standard",
    normalize: str = "none",
    tied: bool = True,
    seed: int = 0,
    d_in: int = HIDDEN,
    d_sae: int = D_SAE,
    hookpoint: str = HOOKPOINT,
) -> SAE:
    """A random SAE; ``tied`` uses unit encoder columns with ``W_dec = W_enc.T`` (so ``<W_dec[i], W_enc[:, i]> = 1``)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_sae, generator=gen)
    w = w / w.norm(dim=0, keepdim=True)
    w_dec = w.T.contiguous() if tied else torch.randn(d_sae, d_in, generator=gen) * 0.3
    cfg = SAEConfig(
        architecture=architecture,  # type: ignore[arg-type]
        d_in=d_in,
        d_sae=d_sae,
        k=8 if architecture == "topk" else None,
        normalize_activations=normalize,  # type: ignore[arg-type]
        activation_norm_scaling_factor=0.37 if normalize == "expected_average_only_in" else None,
        apply_b_dec_to_input=architecture == "topk",
        metadata={"hook_name": hookpoint, "model_name": "tiny"},
    )
    tensors = {
        "W_enc": w,
        "b_enc": -torch.rand(d_sae, generator=gen) * 0.5,
        "W_dec": w_dec,
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
    }
    if architecture in ("jumprelu", "batchtopk"):
        tensors["threshold"] = torch.full((d_sae,), 0.2)
    return SAE.from_tensors(cfg, tensors)


LIBRARY_YAML = f"""apiVersion: auditor/v1
kind: FeatureLibrary
id: tiny-steer
sae:
  id: tiny-steer-sae
  model: tiny
  hookpoint: {HOOKPOINT}
  path: sae
  d_sae: {D_SAE}
features:
  - {{name: deception.fraud, index: 5, category: deception}}
  - {{name: mood.sad, index: 9, category: mood}}
  - {{name: topic.weather, index: 20, category: topic}}
"""


@pytest.fixture(scope="session")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return build_tokenizer()


def make_loaded(tokenizer: transformers.PreTrainedTokenizerFast) -> LoadedModel:
    """A fresh tiny model (same weights every time) with ``tokenizer``, as :func:`load_model` returns it."""
    model = build_model(len(tokenizer))
    adapter = get_adapter(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name="tiny-llama",
        adapter=adapter,
        d_model=adapter.d_model(model),
        n_layers=adapter.n_layers(model),
        device=torch.device("cpu"),
    )


@pytest.fixture(scope="session")
def loaded(tokenizer: transformers.PreTrainedTokenizerFast) -> LoadedModel:
    return make_loaded(tokenizer)


@pytest.fixture(scope="session")
def library_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lib")
    path = folder / "library.yaml"
    path.write_text(LIBRARY_YAML)
    return path


@pytest.fixture(scope="session")
def library(library_path: Path):  # type: ignore[no-untyped-def]
    from auditor.features import load_library

    return load_library(library_path)


@pytest.fixture
def sae() -> SAE:
    return random_sae()


@pytest.fixture
def auditor(loaded: LoadedModel, sae: SAE, library) -> Auditor:  # type: ignore[no-untyped-def]
    return Auditor(loaded, sae, hookpoint=HOOKPOINT, library=library)


def tiny_auditor(folder: Path, device: str, rules: str) -> Auditor:
    """The tiny model and a random SAE on ``device``, audited with a policy of ``rules`` (YAML
    list items, indented two spaces) over :data:`LIBRARY_YAML`, written into ``folder``."""
    from auditor.models import wrap_model
    from auditor.policy import load_policy

    (folder / "library.yaml").write_text(LIBRARY_YAML)
    (folder / "policy.yaml").write_text(
        f"apiVersion: auditor/v1\nkind: Policy\nmetadata: {{name: tiny}}\nlibrary: {folder / 'library.yaml'}\nrules:\n{rules}"
    )
    engine = load_policy(folder / "policy.yaml")
    tok = build_tokenizer()
    return Auditor(wrap_model(build_model(len(tok)).to(device), tok), random_sae().to(device), hookpoint=HOOKPOINT,
                   library=engine.library, policy=engine)
