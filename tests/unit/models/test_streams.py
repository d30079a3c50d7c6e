"""Streamed forwards: many sequences' new tokens in one forward, each with its own KV cache."""

from __future__ import annotations

import pytest
import torch
import transformers

from auditor.models import capture
from auditor.models.streams import StreamCache, capture_streams, enable_streams, streams_supported
from tests.unit.models.conftest import CONFIGS, VOCAB, build_model, feed_in_rounds

HOOK = "blocks.1.hook_resid_post"
# Families whose attention has a sliding window or soft-capping: the per-stream attention is
# plain causal SDPA, so these keep one transformers cache and one forward per stream.
NOT_SUPPORTED = {"mistral", "gemma2", "gemma3_text"}


def _seqs(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _whole(model: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    return capture(model, torch.tensor([seq]), None, [HOOK])[HOOK][0]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_streams_fed_in_rounds_match_whole_sequences(family: str) -> None:
    model = build_model(family)
    supported = streams_supported(model, HOOK)
    assert supported == (family not in NOT_SUPPORTED)
    if not supported:
        with pytest.raises(NotImplementedError, match="streamed forwards"):
            capture_streams(model, HOOK, [StreamCache()], [[1, 2]])
        return
    seqs = _seqs([23, 9, 17])
    parts, caches = feed_in_rounds(model, HOOK, seqs)
    for seq, got, cache in zip(seqs, parts, caches):
        torch.testing.assert_close(got, _whole(model, seq), rtol=1e-4, atol=1e-4)
        assert cache.length == len(seq)  # type: ignore[attr-defined]


def test_crop_forgets_the_tail_and_the_stream_continues_from_there() -> None:
    model = build_model("llama")
    [seq, other] = _seqs([20, 8], seed=3)
    cache = StreamCache()
    capture_streams(model, HOOK, [cache], [seq[:14]])
    cache.crop(-4)  # the last four tokens were re-split: redo them differently
    assert cache.length == 10
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(3)
    tail = capture_streams(model, HOOK, [cache], [other])[0]
    torch.testing.assert_close(tail, _whole(model, seq[:10] + other)[10:], rtol=1e-4, atol=1e-4)


def test_buffers_grow_past_their_first_capacity() -> None:
    model = build_model("qwen2")
    [seq] = _seqs([150], seed=5)  # the first buffer holds 64 tokens
    cache = StreamCache()
    got = [capture_streams(model, HOOK, [cache], [seq[a : a + 50]])[0] for a in range(0, 150, 50)]
    torch.testing.assert_close(torch.cat(got), _whole(model, seq), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_ordinary_forwards_are_unchanged_once_streams_are_enabled(family: str) -> None:
    config = CONFIGS[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor(_seqs([7, 7], seed=2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row: the attention mask matters
    before = capture(model, ids, mask, [HOOK], stop_early=False)[HOOK]
    logits_before = model(input_ids=ids, attention_mask=mask).logits
    assert enable_streams(model)
    assert model.config._attn_implementation.startswith("auditor_streams_")
    assert torch.equal(capture(model, ids, mask, [HOOK], stop_early=False)[HOOK], before)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)
    assert enable_streams(model)  # once is enough; again is a no-op


def test_bad_calls_say_what_was_wrong() -> None:
    model = build_model("llama")
    with pytest.raises(ValueError, match="at least one new token"):
        capture_streams(model, HOOK, [StreamCache()], [[]])
    with pytest.raises(ValueError, match="one list of new token ids per cache"):
        capture_streams(model, HOOK, [StreamCache(), StreamCache()], [[1]])


def test_a_compiled_model_keeps_one_forward_per_stream() -> None:
    from auditor.models import LoadedModel, compile_layers, get_adapter

    config = CONFIGS["llama"]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    adapter = get_adapter(model)
    loaded = LoadedModel(
        model=model, tokenizer=None, name="tiny", adapter=adapter, d_model=adapter.d_model(model),
        n_layers=adapter.n_layers(model), device=torch.device("cpu"),
    )
    assert compile_layers(loaded, backend="eager") > 0
    assert not streams_supported(model, HOOK)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streams_on_cuda_match_whole_sequences(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval().to("cuda", dtype)
    assert streams_supported(model, HOOK)
    seqs = _seqs([30, 12], seed=7)
    caches = [StreamCache(), StreamCache()]
    parts: list[list[torch.Tensor]] = [[], []]
    for cuts in ([(0, 10), (0, 1)], [(10, 11), (1, 12)], [(11, 30), None]):
        live = [i for i, cut in enumerate(cuts) if cut is not None]
        outs = capture_streams(model, HOOK, [caches[i] for i in live], [seqs[i][cuts[i][0] : cuts[i][1]] for i in live])  # type: ignore[index]
        for i, out in zip(live, outs):
            assert out.device.type == "cuda" and out.dtype == dtype
            parts[i].append(out)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for seq, got in zip(seqs, parts):
        torch.testing.assert_close(torch.cat(got).float(), _whole(model, seq).float(), rtol=tol, atol=tol)


def test_bfloat16_models_pass_the_checks_that_catch_real_faults() -> None:
    from auditor.models import packing_supported

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    model = model.to(torch.bfloat16)
    # bfloat16 rounds at 1/256 (on a GPU, GEMMs of other shapes round differently: streamed and
    # packed forwards differ from plain ones by that much), which the checks allow; they still
    # fail when position ids are ignored.
    assert streams_supported(model, HOOK) and packing_supported(model, HOOK)
    forward = model.forward
    model.forward = lambda *a, position_ids=None, **k: forward(*a, **k)  # type: ignore[method-assign]
    assert not streams_supported(model, HOOK) and not packing_supported(model, HOOK)
