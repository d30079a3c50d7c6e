"""Corpus reading, context packing, masking, outlier filtering, shuffling and activation shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from auditor.errors import ConfigError
from auditor.models import capture, hooks
from auditor.models.hookpoints import Hookpoint
from auditor.train.activations import (
    ActivationShard,
    ActivationSource,
    NormFilter,
    context_batches,
    load_activations,
    pack_contexts,
    read_corpus,
    save_activations,
    shuffled_batches,
    special_token_ids,
    token_mask,
)

from .conftest import HOOKPOINT


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ('{"text": "ok"}\nnot json\n', ":2: not valid JSON"),
        ('{"body": "x"}\n', ':1: each line needs a string field "text"'),
        ('{"text": 3}\n', ":1: each line needs"),
        ('["text"]\n', ":1: each line needs"),
        ('{"text": "   "}\n\n', "holds no documents"),
    ],
)
def test_read_corpus_rejects_bad_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "c.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_corpus(path)


def test_read_corpus_keeps_order_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "b", "source": "s"}\n\n{"text": "a"}\n')
    assert read_corpus(path) == ["b", "a"]


def test_pack_contexts_starts_each_context_with_bos_and_keeps_the_stream() -> None:
    docs = [[10, 11, 12], [13], [14, 15, 16, 17, 18], [19, 20]]
    contexts = list(pack_contexts(docs, context_size=4, start_id=1, sep_id=2))
    assert all(c[0] == 1 for c in contexts)
    assert all(len(c) == 4 for c in contexts[:-1])
    stream = [t for doc in docs for t in [*doc, 2]]
    assert [t for c in contexts for t in c[1:]] == stream


def test_pack_contexts_drops_a_tail_of_separators_only() -> None:
    contexts = list(pack_contexts([[5, 6]], context_size=4, start_id=1, sep_id=2))
    assert contexts == [[1, 5, 6, 2]]


def test_token_mask_masks_position_zero_special_tokens_and_padding() -> None:
    ids = torch.tensor([[1, 7, 2, 8], [1, 9, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    expected = torch.tensor([[False, True, False, True], [False, True, False, False]])
    assert torch.equal(token_mask(ids, attn, [0, 1, 2]), expected)


def test_context_batches_are_right_padded(tokenizer: Any, documents: list[str]) -> None:
    batches = list(context_batches(tokenizer, documents[:30], context_size=16, batch_size=4))
    for ids, attn in batches:
        assert ids.shape == attn.shape and ids.shape[1] == 16
        assert torch.all(ids[:, 0] == tokenizer.bos_token_id)
        # Padding only at the end of a row.
        assert torch.all(attn[:, 1:] <= attn[:, :-1])
        assert torch.all(ids[attn == 0] == tokenizer.pad_token_id)


def test_norm_filter_drops_rows_above_factor_times_running_median() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 8, generator=gen)
    rows[[3, 50, 120]] *= 40.0
    filt = NormFilter(3.0)
    kept = filt(rows)
    norms = rows.norm(dim=-1)
    reference = rows[norms <= 3.0 * norms.median()]
    torch.testing.assert_close(kept, reference)
    assert filt.dropped == 3 and filt.seen == 200


def test_norm_filter_median_forgets_old_rows() -> None:
    filt = NormFilter(3.0, window=100)
    filt(torch.full((100, 4), 1.0))
    filt(torch.full((100, 4), 10.0))
    assert filt.median == pytest.approx(20.0)  # only the last 100 rows (norm 20) count


def test_norm_filter_without_factor_keeps_everything() -> None:
    rows = torch.randn(10, 4)
    rows[0] *= 1e4
    assert torch.equal(NormFilter(None)(rows), rows)


def test_source_masks_special_positions(model: Any, tokenizer: Any, documents: list[str]) -> None:
    source = ActivationSource(model, tokenizer, HOOKPOINT, documents[:20], context_size=16, model_batch_size=4)
    rows = torch.cat(list(source.chunks()))
    # Reference: capture everything and keep the text tokens.
    parts = []
    for ids, attn in context_batches(tokenizer, documents[:20], 16, 4):
        acts = capture(model, ids, attn, [HOOKPOINT])[HOOKPOINT]
        parts.append(acts[token_mask(ids, attn, special_token_ids(tokenizer))])
    torch.testing.assert_close(rows, torch.cat(parts))
    assert source.stats.masked > 0 and source.stats.epochs == 1


def test_source_drops_outlier_tokens(model: Any, tokenizer: Any, documents: list[str]) -> None:
    """A token whose activation is blown up (like SmolLM2's massive activations) never reaches training."""
    docs = documents[:20]
    batches = list(context_batches(tokenizer, docs, 16, 4))
    text_ids = torch.cat([ids[token_mask(ids, attn, special_token_ids(tokenizer))] for ids, attn in batches])
    # A token that makes up about 2% of the text: rare, like the real massive-activation tokens.
    values, counts = text_ids.unique(return_counts=True)
    target = int(values[(counts - 0.02 * text_ids.numel()).abs().argmin()])
    n_target = int((text_ids == target).sum())
    assert 0 < n_target < 0.1 * text_ids.numel()
    # The source runs one forward per batch, in this order: the hook reads the matching ids.
    batch_ids = iter([ids for ids, _ in batches])

    def blow_up(tensor: torch.Tensor, *, hook: Hookpoint) -> torch.Tensor:
        hit = (next(batch_ids) == target).unsqueeze(-1)
        return torch.where(hit, tensor * 100.0, tensor)

    plain = ActivationSource(model, tokenizer, HOOKPOINT, docs, context_size=16, model_batch_size=4)
    n_plain = sum(chunk.shape[0] for chunk in plain.chunks())

    filt = NormFilter(3.0)
    source = ActivationSource(model, tokenizer, HOOKPOINT, docs, context_size=16, model_batch_size=4, norm_filter=filt)
    with hooks(model, {HOOKPOINT: blow_up}):
        rows = torch.cat(list(source.chunks()))
    assert filt.dropped == n_target
    assert rows.shape[0] == n_plain - n_target
    assert float(rows.norm(dim=-1).max()) <= 3.0 * (filt.median or 0.0)


def test_repeating_source_rereads_the_documents(model: Any, tokenizer: Any, documents: list[str]) -> None:
    docs = documents[:5]
    once = ActivationSource(model, tokenizer, HOOKPOINT, docs, context_size=16, model_batch_size=4)
    n_once = sum(c.shape[0] for c in once.chunks())
    again = ActivationSource(model, tokenizer, HOOKPOINT, docs, context_size=16, model_batch_size=4, repeat=True)
    rows = again.take(3 * n_once)
    assert rows.shape[0] == 3 * n_once
    assert again.stats.epochs >= 2


def test_shuffled_batches_emit_every_row_once() -> None:
    rows = torch.arange(1000, dtype=torch.float32).unsqueeze(-1)
    chunks = list(rows.split(37))
    batches = list(shuffled_batches(chunks, batch_size=64, capacity=256, generator=torch.Generator().manual_seed(0)))
    assert all(b.shape[0] == 64 for b in batches[:-1])
    out = torch.cat(batches).squeeze(-1)
    assert Counter(out.tolist()) == Counter(rows.squeeze(-1).tolist())
    # Mixed: the first batch is not the first 64 rows in order.
    assert not torch.equal(batches[0].squeeze(-1), rows[:64].squeeze(-1))


def test_shard_round_trip(tmp_path: Path) -> None:
    train = torch.randn(50, 8)
    held = torch.randn(10, 8)
    path = save_activations(tmp_path / "acts.safetensors", ActivationShard(train, held, {"hook_name": "blocks.0.hook_resid_post"}))
    shard = load_activations(path)
    assert shard.train.dtype == torch.float16  # the values fit, so the file is half the size
    torch.testing.assert_close(shard.train.float(), train, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(shard.eval.float(), held, atol=1e-2, rtol=1e-3)
    assert shard.metadata["hook_name"] == "blocks.0.hook_resid_post"
    assert shard.d_in == 8


def test_shard_keeps_float32_when_values_exceed_float16(tmp_path: Path) -> None:
    train = torch.randn(5, 4)
    train[0, 0] = 1e6
    path = save_activations(tmp_path / "acts.safetensors", ActivationShard(train, train[:2], {}))
    assert torch.equal(load_activations(path).train, train)


def test_npy_holds_out_the_tail(tmp_path: Path) -> None:
    data = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    np.save(tmp_path / "acts.npy", data)
    shard = load_activations(tmp_path / "acts.npy", eval_rows=10)
    assert shard.train.shape == (90, 4) and shard.eval.shape == (10, 4)
    assert torch.equal(shard.eval, torch.from_numpy(data[90:]))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.safetensors", None, "does not exist"),
        ("acts.bin", b"x", "must be .safetensors or .npy"),
        ("acts.safetensors", b"garbage", "cannot read safetensors"),
    ],
)
def test_load_activations_rejects_bad_files(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_activations(path)


def test_npy_must_be_two_dimensional(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ConfigError, match="2-D"):
        load_activations(tmp_path / "a.npy")


def test_save_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=".safetensors"):
        save_activations(tmp_path / "a.pt", ActivationShard(torch.zeros(2, 2), torch.zeros(1, 2), {}))


def test_corpus_file_fixture_is_read_back(corpus_file: Path, documents: list[str]) -> None:
    assert read_corpus(corpus_file) == documents
    assert json.loads(corpus_file.read_text().splitlines()[0])["source"] == "test"
