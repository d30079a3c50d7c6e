from __future__ import annotations

import pytest
import torch
from torch import nn

from auditor.errors import HookpointError
from auditor.models import skinny
from auditor.models.adapters import get_adapter
from auditor.models.capture import capture, capture_packed, pack_rows, packing_supported, position_ids_from_mask
from auditor.models.hookpoints import Hookpoint
from auditor.models.hooks import hooks
from auditor.models.streams import streams_supported

from .conftest import LAYERS, VOCAB

NAMES = ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_pre"]


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 1, 1, 1]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_capture_matches_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> None:
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(LAYERS - 1)] + ["blocks.0.hook_resid_pre"]
    # With torch's own products the same arithmetic runs as in the plain forward; the few-row
    # kernel (auditor.models.skinny) sums in another order, so it agrees to float rounding.
    with skinny.suspended():
        acts = capture(model, input_ids, torch.ones_like(input_ids), names)
    fast = capture(model, input_ids, torch.ones_like(input_ids), names)
    with torch.inference_mode():
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    assert list(acts) == names == list(fast)
    for layer in range(LAYERS - 1):
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])
        torch.testing.assert_close(fast[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], hidden[0])
    torch.testing.assert_close(fast["blocks.0.hook_resid_pre"], hidden[0])


def test_stop_early_gives_same_activations_and_skips_the_rest(model: nn.Module, input_ids: torch.Tensor) -> None:
    adapter = get_adapter(model)
    ran: list[str] = []
    head = model.get_output_embeddings()
    handles = [
        head.register_forward_hook(lambda *_: ran.append("lm_head")),
        adapter.layer(model, 2).register_forward_pre_hook(lambda *_: ran.append("layer2")),
        adapter.mlp_module(model, 1).register_forward_hook(lambda *_: ran.append("mlp1")),
    ]
    try:
        full = capture(model, input_ids, None, NAMES, stop_early=False)
        assert ran == ["mlp1", "layer2", "lm_head"]
        ran.clear()
        early = capture(model, input_ids, None, NAMES)
        assert ran == ["mlp1"]
        ran.clear()
        capture(model, input_ids, None, ["blocks.1.hook_attn_out"])
        assert ran == []
    finally:
        for handle in handles:
            handle.remove()
    assert set(early) == set(NAMES)
    for name in NAMES:
        torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_runs(model: nn.Module, side: str) -> None:
    generator = torch.Generator().manual_seed(2)
    lengths = [7, 4, 1]
    rows = [torch.randint(1, VOCAB, (n,), generator=generator) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, T], pad id 0
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = row
        mask[i, span] = 1
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", f"blocks.{LAYERS - 1}.hook_resid_post"]
    batch = capture(model, input_ids, mask, names)
    for i, row in enumerate(rows):
        single = capture(model, row[None], torch.ones(1, len(row), dtype=torch.long), names)
        real = mask[i].bool()
        for name in names:
            torch.testing.assert_close(batch[name][i][real], single[name][0], rtol=1e-4, atol=1e-4)
            assert torch.equal(batch[name][i][~real], torch.zeros_like(batch[name][i][~real]))


def test_a_batch_without_padding_reaches_the_model_without_a_mask(model: nn.Module, input_ids: torch.Tensor) -> None:
    # The host knows there is no padding: the model gets no mask (on a GPU, its check whether a
    # mask can be dropped would wait for the device), and the activations are those of the
    # same rows beside a padding column, which takes the masked path.
    seen: list[object] = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        plain = capture(model, input_ids, torch.ones_like(input_ids), NAMES)
        padded_ids = torch.cat([input_ids, torch.zeros_like(input_ids[:, :1])], dim=1)
        mask = torch.ones_like(padded_ids)
        mask[:, -1] = 0
        padded = capture(model, padded_ids, mask, NAMES)
    finally:
        handle.remove()
    assert seen[0] is None and isinstance(seen[1], torch.Tensor)
    t = input_ids.shape[1]
    for name in NAMES:
        torch.testing.assert_close(plain[name], padded[name][:, :t], rtol=1e-5, atol=1e-5)
        assert torch.equal(padded[name][:, t:], torch.zeros_like(padded[name][:, t:]))


def test_capture_sees_steering_hooks(model: nn.Module, input_ids: torch.Tensor) -> None:
    def zero(tensor: torch.Tensor, *, hook: Hookpoint) -> torch.Tensor:
        return torch.zeros_like(tensor)

    with hooks(model, {"blocks.1.hook_attn_out": zero, "blocks.1.hook_mlp_out": zero}):
        acts = capture(model, input_ids, None, ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], acts["blocks.1.hook_resid_pre"])


def test_capture_deduplicates_and_accepts_hookpoints(model: nn.Module, input_ids: torch.Tensor) -> None:
    names = ["blocks.0.hook_mlp_out", Hookpoint(0, "mlp_out"), " blocks.0.hook_mlp_out"]
    acts = capture(model, input_ids, None, names)
    assert list(acts) == ["blocks.0.hook_mlp_out"]
    assert acts["blocks.0.hook_mlp_out"].shape == (*input_ids.shape, get_adapter(model).d_model(model))
    assert capture(model, input_ids, None, []) == {}


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("blocks.1.hook_resid_mid", "malformed hookpoint"),
        (f"blocks.{LAYERS}.hook_mlp_out", rf"valid layers: 0\.\.{LAYERS - 1}"),
    ],
)
def test_capture_rejects_bad_hookpoints(model: nn.Module, input_ids: torch.Tensor, name: str, match: str) -> None:
    with pytest.raises(HookpointError, match=match):
        capture(model, input_ids, None, ["blocks.0.hook_resid_post", name])


@pytest.mark.parametrize(
    ("lengths", "row_tokens"),
    [([5, 9, 3, 7, 2], 12), ([30, 2, 2], 8), ([1], 4), ([4, 4, 4, 4], 8), ([6, 6, 6], 100), ([200, 10, 10, 10], 64)],
)
def test_pack_rows_places_every_sequence_once_within_the_budget(lengths: list[int], row_tokens: int) -> None:
    rows = pack_rows(lengths, row_tokens)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    capacity = max(row_tokens, *lengths)  # an oversized sequence widens every row to its length
    for r in rows:
        assert sum(lengths[i] for i in r) <= capacity
    # Few rows: greedy balancing may need one more than the ideal count.
    assert len(rows) <= -(-sum(lengths) // capacity) + 1
    # Padding never exceeds what padding every sequence to the longest would cost.
    assert len(rows) * max(sum(lengths[i] for i in r) for r in rows) <= len(lengths) * max(lengths)


@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_capture_equals_padded_capture(model: nn.Module, side: str) -> None:
    generator = torch.Generator().manual_seed(3)
    lengths = [7, 4, 1, 6, 3]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)  # [B, T], pad id 0
    mask = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        input_ids[i, span] = torch.randint(1, VOCAB, (n,), generator=generator)
        mask[i, span] = 1
    names = ["blocks.0.hook_resid_pre", f"blocks.{LAYERS - 1}.hook_resid_post"]
    assert packing_supported(model, names[-1])
    padded = capture(model, input_ids, mask, names)
    for row_tokens in (8, 12, 64):  # several rows, rows with 2-3 texts, one row for all
        packed = capture_packed(model, input_ids, mask, names, row_tokens=row_tokens)
        for name in names:
            assert packed[name].shape == padded[name].shape
            torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-4)
            assert torch.equal(packed[name][~mask.bool()], torch.zeros_like(packed[name][~mask.bool()]))


def test_packing_check_fails_when_position_restarts_are_ignored(model: nn.Module) -> None:
    forward = model.forward

    def no_restarts(*args: object, position_ids: torch.Tensor | None = None, **kwargs: object) -> object:
        return forward(*args, **kwargs)  # positions (and the packed mask) come from the row itself

    model.forward = no_restarts  # type: ignore[method-assign]
    try:
        assert not packing_supported(model, f"blocks.{LAYERS - 1}.hook_resid_post")
        assert not streams_supported(model, f"blocks.{LAYERS - 1}.hook_resid_post")  # positions matter there too
    finally:
        del model.forward  # the class's forward again: the model is shared with later tests


def test_agreement_is_judged_token_by_token_and_by_dtype() -> None:
    from auditor.models.capture import agrees

    want = torch.tensor([[[1.0e4, 0.0], [1.0, 1.0]]])  # an attention-sink-sized first token
    assert agrees(want, want.clone())
    assert not agrees(want, torch.tensor([[[1.0e4, 0.0], [1.5, 1.0]]]))  # the small token is off by half
    assert not agrees(want, want[:, :1])  # shapes differ
    near = want * (1 + 2**-7)  # two bfloat16 roundings
    assert agrees(want.bfloat16(), near.bfloat16()) and not agrees(want, near)
