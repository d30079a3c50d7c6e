"""Synthetic labelled rows and pooled features with planted signal, for discovery/calibration tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from auditor.features.labelled import LabelledRow, Pooled, assign_split

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "home", "fast", "today"]
SIGNAL = {"bias": "stereotype", "deception": "scam", "dangerous": "bomb"}


def planted_latent(category: str) -> int:
    """The latent that carries ``category`` (3, 6, 9, ...)."""
    return 3 * (sorted(SIGNAL).index(category) + 1)


def synthetic(
    *,
    categories: tuple[str, ...] = ("bias", "deception"),
    n_per: int = 60,
    d_sae: int = 24,
    d_in: int = 8,
    seed: int = 0,
) -> tuple[list[LabelledRow], Pooled]:
    """Rows of each category plus twice as many benign rows; pooled features where the
    category's planted latent fires (max pooled ~2-4, at the token spelling its signal word),
    latent 1 fires on benign text only, and ``resid_mean`` carries one direction per category."""
    g = np.random.default_rng(seed)
    rows: list[LabelledRow] = []
    tokens: list[list[str]] = []
    for cat in (*categories, "benign"):
        n = n_per * (2 if cat == "benign" else 1)
        for i in range(n):
            words = list(g.choice(WORDS, size=6))
            if cat != "benign":
                words[int(g.integers(0, 6))] = SIGNAL[cat]
            text = " ".join(words)
            kind = "prompt" if i % 2 == 0 else "completion"
            rows.append(LabelledRow(f"{cat}-{i:04d}", cat, kind, text, near_miss=(cat == "benign" and i % 5 == 0)))
            tokens.append(["<s>", *[f" {w}" for w in words]])
    n = len(rows)
    active = g.random((n, d_sae)) < 0.25
    mx = np.where(active, g.exponential(0.6, (n, d_sae)), 0.0)
    resid = g.normal(size=(n, d_in))
    for r, row in enumerate(rows):
        if row.category == "benign":
            mx[r, 1] = 1.0 + g.random()
        else:
            mx[r, 1] = 0.0
            if g.random() < 0.9:
                mx[r, planted_latent(row.category)] = 2.0 + 2.0 * g.random()
            resid[r, sorted(SIGNAL).index(row.category)] += 2.5
    argmax = np.full((n, d_sae), -1, dtype=np.int16)
    for r in range(n):
        on = mx[r] > 0
        argmax[r, on] = g.integers(1, len(tokens[r]), size=int(on.sum()))
        for cat in categories:
            lat = planted_latent(cat)
            if rows[r].category == cat and mx[r, lat] > 0:
                argmax[r, lat] = tokens[r].index(f" {SIGNAL[cat]}")
    lengths = torch.tensor([len(t) - 1 for t in tokens])
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    pooled = Pooled(
        ids=[r.id for r in rows],
        hookpoint="blocks.1.hook_resid_post",
        max=torch.tensor(mx, dtype=torch.float32),
        mean=torch.tensor(mx * 0.3, dtype=torch.float32),
        argmax=torch.tensor(argmax),
        resid_mean=torch.tensor(resid, dtype=torch.float32),
        recon=torch.tensor(g.uniform(0.1, 0.5, int(offsets[-1])), dtype=torch.float32),
        recon_offsets=offsets,
        tokens=tokens,
    )
    return rows, pooled


def synthetic_split(rows: list[LabelledRow]) -> dict[str, str]:
    return assign_split(rows)  # type: ignore[return-value]


def tiny_model_dir(path: Path) -> Path:
    """Save a tiny random Llama with a word-level tokenizer (offsets, BOS, pad) to ``path``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({*WORDS, *SIGNAL.values(), "weather", "lovely", "recipe", "walk", "sure", "."})
    vocab = {"[UNK]": 0, "<s>": 1, "<pad>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=1,
        pad_token_id=2,
        eos_token_id=2,
        # Large weights so token identity dominates a random SAE's biases (the default 0.02 leaves
        # activations too small for any latent to tell tokens apart).
        initializer_range=0.5,
    )
    model = transformers.LlamaForCausalLM(cfg)
    out = Path(path)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
