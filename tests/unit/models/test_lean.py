"""Lean streamed forwards: Llama-family decoder layers by the kernel library's calls, equal to
``transformers``' forward to float rounding, used only where nothing else could differ."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from auditor.models import capture, lean, skinny
from auditor.models.adapters import get_adapter
from auditor.models.hookpoints import parse_hookpoint
from auditor.models.hooks import scoped
from auditor.models.streams import StreamCache, capture_streams
from tests.unit.models.conftest import CONFIGS, ROUNDS, VOCAB, build_model, feed_in_rounds
from tests.unit.models.test_skinny import needs_kernel, spy_on

LEAN_FAMILIES = {"llama", "qwen2"}  # the tiny test configs of mistral have a sliding window
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"]


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _seqs(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


class _Spy:
    """Counts the lean forwards that returned (the real function runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = lean.capture_lean

        def counted(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            self.calls += 1  # forwards that returned
            return out

        monkeypatch.setattr(lean, "capture_lean", counted)


# ---------------------------------------------------------------- the C pieces against torch


@needs_kernel
@pytest.mark.parametrize("d", [576, 37])
def test_rmsnorm_matches_llama_rmsnorm(d: int) -> None:
    fns = skinny.library()
    norm = LlamaRMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(7, d) * 3
    y = torch.empty_like(x)
    fns.rmsnorm(_ptr(x), _ptr(norm.weight), _ptr(y), 7, d, 1e-5)
    torch.testing.assert_close(y, norm(x).detach(), rtol=2e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("head_dim", [8, 64])
def test_rope_matches_rotate_half(head_dim: int) -> None:
    fns = skinny.library()
    n, heads = 5, 3
    q = torch.randn(n, heads, head_dim)
    angles = torch.rand(n, head_dim // 2) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    want, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos[None], sin[None])
    got = q.clone()
    fns.rope(_ptr(got), _ptr(cos), _ptr(sin), n, heads, head_dim)
    torch.testing.assert_close(got, want[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_silu_mul_matches_torch_over_the_whole_range() -> None:
    fns = skinny.library()
    g = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, 88.0, 89.0, -88.0, -104.0])])
    g = torch.cat([g, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    u = torch.rand_like(g) + 0.5
    out = torch.empty_like(g)
    fns.silu_mul(_ptr(g), _ptr(u), _ptr(out), g.numel())
    want = F.silu(g) * u
    finite = torch.isfinite(g)
    torch.testing.assert_close(out[finite], want[finite], rtol=1e-6, atol=1e-30)
    assert out[-3] == float("inf") and out[-1].isnan()  # silu(inf) = inf; NaN stays NaN
    # An odd count: the scalar tail gives the vector lanes' values.
    tail = torch.empty(5)
    fns.silu_mul(_ptr(g[:5]), _ptr(u[:5]), _ptr(tail), 5)
    torch.testing.assert_close(tail, want[:5], rtol=1e-6, atol=0)


@needs_kernel
def test_linear_add_adds_the_product_in_place() -> None:
    fns = skinny.library()
    x, w, b = torch.randn(11, 40), torch.randn(13, 40), torch.randn(13)
    y0 = torch.randn(11, 13)
    y = y0.clone()
    fns.linear_add(_ptr(x), _ptr(w), _ptr(b), _ptr(y), 11, 13, 40, 2)
    assert torch.equal(y, y0 + skinny.linear(x, w, b))
    torch.testing.assert_close(y, y0 + F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, held: int, threads: int) -> torch.Tensor:
    fns = skinny.library()
    n, hq, d = q.shape
    kv, cap = cache_k.shape[0], cache_k.shape[1]
    out = torch.empty_like(q)
    scratch = torch.empty(threads, held + n)
    fns.attend(_ptr(q), _ptr(k), _ptr(v), _ptr(cache_k), _ptr(cache_v), cap, held, n, hq, kv, d, d**-0.5, _ptr(out), _ptr(scratch), threads)
    return out


@needs_kernel
@pytest.mark.parametrize(("held", "n", "hq", "kv", "d"), [(0, 1, 2, 2, 8), (0, 9, 4, 2, 8), (300, 16, 9, 3, 64), (37, 5, 4, 1, 128), (20, 3, 2, 2, 24)])
@pytest.mark.parametrize("threads", [1, 2])
def test_attend_matches_sdpa_against_the_cache(held: int, n: int, hq: int, kv: int, d: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(held + n)
    cap = held + n + 7
    cache_k, cache_v = torch.randn(kv, cap, d, generator=gen), torch.randn(kv, cap, d, generator=gen)
    q, k, v = torch.randn(n, hq, d, generator=gen), torch.randn(n, kv, d, generator=gen), torch.randn(n, kv, d, generator=gen)
    before = cache_k.clone()
    got = _attend(q, k, v, cache_k, cache_v, held, threads)
    # The new keys and values are written after the held ones, nothing else moves.
    assert torch.equal(cache_k[:, held : held + n], k.transpose(0, 1)) and torch.equal(cache_v[:, held : held + n], v.transpose(0, 1))
    assert torch.equal(cache_k[:, :held], before[:, :held]) and torch.equal(cache_k[:, held + n :], before[:, held + n :])
    keys, values = cache_k[None, :, : held + n], cache_v[None, :, : held + n]
    mask = torch.arange(held + n)[None, :] <= torch.arange(held, held + n)[:, None]
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.repeat_interleave(hq // kv, 1), values.repeat_interleave(hq // kv, 1), attn_mask=mask, scale=d**-0.5
    )
    torch.testing.assert_close(got, want[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_attend_spreads_a_nan_only_to_the_queries_that_see_it() -> None:
    held, n, hq, kv, d = 6, 4, 2, 1, 8
    cache_k, cache_v = torch.randn(kv, 12, d), torch.randn(kv, 12, d)
    q, k, v = torch.randn(n, hq, d), torch.randn(n, kv, d), torch.randn(n, kv, d)
    k[2, 0, 3] = float("nan")  # new token 2: seen by queries 2 and 3
    got = _attend(q, k, v, cache_k, cache_v, held, 2)
    assert got[:2].isfinite().all() and got[2:].isnan().all()


# ---------------------------------------------------------------- the streamed forward


@needs_kernel
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_which_families_take_the_lean_forward(family: str) -> None:
    model = build_model(family)
    adapter = get_adapter(model)
    found = lean.plan(model, adapter)
    assert (found is not None) == (family in LEAN_FAMILIES)
    if found is not None:
        with torch.inference_mode():
            assert lean.supported(model, adapter, parse_hookpoint(HOOKS[-1]))


@needs_kernel
@pytest.mark.parametrize("family", sorted(LEAN_FAMILIES))
@pytest.mark.parametrize("hook", HOOKS)
def test_lean_streams_equal_the_transformers_forward(family: str, hook: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(family)
    seqs = _seqs([23, 9, 17])
    _check_first(model, hook)
    spy = _Spy(monkeypatch)
    got = feed_in_rounds(model, hook, seqs)[0]
    assert spy.calls == len(ROUNDS)
    monkeypatch.setenv("AUDITOR_LEAN_LAYERS", "0")
    plain = feed_in_rounds(model, hook, seqs)[0]
    assert spy.calls == len(ROUNDS)
    for seq, a, b in zip(seqs, got, plain):
        whole = capture(model, torch.tensor([seq]), None, [hook])[hook][0]
        torch.testing.assert_close(a, whole, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_prompt_longer_than_the_kernel_rows_runs_in_transformers_and_chunks_continue_lean(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("llama")
    hook = HOOKS[-1]
    [seq] = _seqs([skinny.MAX_ROWS + 30], seed=4)
    _check_first(model, hook)
    spy = _Spy(monkeypatch)
    cut = skinny.MAX_ROWS + 10
    got = feed_in_rounds(model, hook, [seq], [[(0, cut)], [(cut, cut + 4)], [(cut + 4, len(seq))]])[0][0]
    assert spy.calls == 2  # not the long first forward
    torch.testing.assert_close(got, capture(model, torch.tensor([seq]), None, [hook])[hook][0], rtol=1e-4, atol=1e-4)


def _check_first(model: torch.nn.Module, hook: str) -> None:
    """Run (or recall) the one-off check, so that a spy counts the streams' forwards alone."""
    with torch.inference_mode():
        assert lean.supported(model, get_adapter(model), parse_hookpoint(hook))


def _lean_llama(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, _Spy]:
    """The tiny llama (or ``model``), checked, with a spy that saw one round run lean."""
    model = model if model is not None else build_model("llama")
    _check_first(model, HOOKS[-1])
    spy = _Spy(monkeypatch)
    assert _one_round(model, spy)[0] == 1
    return model, spy


def _one_round(model: torch.nn.Module, spy: _Spy) -> tuple[int, torch.Tensor]:
    before = spy.calls
    [out] = capture_streams(model, HOOKS[-1], [StreamCache()], [_seqs([7], seed=9)[0]])
    return spy.calls - before, out


@needs_kernel
def test_hooks_that_would_fire_send_the_forward_to_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    model, spy = _lean_llama(monkeypatch)
    seen: list[int] = []
    mlp = model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda module, args, out: seen.append(1))
    try:
        calls, _ = _one_round(model, spy)
        assert calls == 0 and seen == [1]  # a user's hook runs, so transformers' forward does
    finally:
        handle.remove()
    # A hook another thread installed for its own forwards does not fire here: the lean forward runs.
    box: dict[str, Any] = {}
    other = threading.Thread(target=lambda: box.update(h=mlp.register_forward_hook(scoped(lambda *a: seen.append(2), this_thread=True))))
    other.start()
    other.join()
    try:
        calls, _ = _one_round(model, spy)
        assert calls == 1 and seen == [1]
    finally:
        box["h"].remove()


@needs_kernel
def test_suspended_kernel_switched_off_or_other_dtypes_run_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    model, spy = _lean_llama(monkeypatch)
    with skinny.suspended():
        assert _one_round(model, spy)[0] == 0
    monkeypatch.setenv("AUDITOR_LEAN_LAYERS", "off")
    assert _one_round(model, spy)[0] == 0
    monkeypatch.delenv("AUDITOR_LEAN_LAYERS")
    half = copy.deepcopy(model).to(torch.bfloat16)
    calls, out = _one_round(half, spy)
    assert calls == 0 and out.dtype == torch.bfloat16


@needs_kernel
def test_a_model_that_computes_otherwise_fails_the_check_and_keeps_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' RMSNorm computing otherwise (as a new release might): the plan is found, the check catches it."""
    model = copy.deepcopy(build_model("llama"))
    norm = type(model.model.layers[0].input_layernorm)
    plain = norm.forward
    monkeypatch.setattr(norm, "forward", lambda self, x: plain(self, x) * 1.5)
    adapter = get_adapter(model)
    assert lean.plan(model, adapter) is not None
    with torch.inference_mode():
        assert not lean.supported(model, adapter, parse_hookpoint(HOOKS[-1]))
    spy = _Spy(monkeypatch)
    seqs = _seqs([23, 9, 17])
    got = feed_in_rounds(model, HOOKS[-1], seqs)[0]
    assert spy.calls == 0
    for seq, a in zip(seqs, got):
        torch.testing.assert_close(a, capture(model, torch.tensor([seq]), None, [HOOKS[-1]])[HOOKS[-1]][0], rtol=1e-4, atol=1e-4)


@needs_kernel
def test_the_default_model_streams_through_lean_layers(default_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = default_model.model
    hook = "blocks.15.hook_resid_post"
    _check_first(model, hook)
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(100, 40000, (81,), generator=gen).tolist()
    spy = _Spy(monkeypatch)
    got = feed_in_rounds(model, hook, [seq], [[(0, 49)], [(49, 65)], [(65, 66)], [(66, 81)]])[0][0]
    assert spy.calls == 4
    want = capture(model, torch.tensor([seq]), None, [hook])[hook][0]
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert err.max() < 1e-4, err.max()
    # Its GGUF is Q4_1: every decoder weight is read in its 4-bit form, with the same activations.
    linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * len(model.model.layers) and all(skinny.packed(m.weight) is not None for m in linears)
    with skinny.unpacked():
        assert torch.equal(feed_in_rounds(model, hook, [seq], [[(0, 49)], [(49, 65)], [(65, 66)], [(66, 81)]])[0][0], got)


@needs_kernel
def test_a_replaced_module_makes_a_new_plan_and_its_weights_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    model = copy.deepcopy(build_model("llama"))
    adapter = get_adapter(model)
    _check_first(model, HOOKS[-1])
    first = lean.available(model, adapter, [parse_hookpoint(HOOKS[-1])], 4)
    old = model.model.layers[1].mlp.down_proj
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.normal_(0.0, 0.3)
    model.model.layers[1].mlp.down_proj = new
    second = lean.available(model, adapter, [parse_hookpoint(HOOKS[-1])], 4)
    assert second is not None and second is not first and second.layers[1].down is new
    spy = _Spy(monkeypatch)
    seqs = _seqs([23, 9, 17])
    got = feed_in_rounds(model, HOOKS[-1], seqs)[0]
    assert spy.calls >= len(ROUNDS)  # the new plan's check, then every round
    for seq, a in zip(seqs, got):
        torch.testing.assert_close(a, capture(model, torch.tensor([seq]), None, [HOOKS[-1]])[HOOKS[-1]][0], rtol=1e-4, atol=1e-4)


@needs_kernel
def test_copies_and_pickles_of_a_model_carry_no_plan() -> None:
    import pickle

    import transformers

    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()  # no other test's hooks on it
    _check_first(model, HOOKS[-1])
    twin = copy.deepcopy(model)
    assert twin not in lean._plans
    assert b"auditor.models.lean" not in pickle.dumps(model)
    assert model in lean._plans


@needs_kernel
@pytest.mark.parametrize("family", sorted(LEAN_FAMILIES))
def test_whole_layers_in_one_call_equal_the_layer_by_layer_calls(family: str) -> None:
    """One hookpoint: the layers before it run in one call of the library; with two, layer by layer."""
    model = build_model(family)
    adapter = get_adapter(model)
    points = [parse_hookpoint(h) for h in ("blocks.2.hook_resid_post", "blocks.0.hook_resid_pre")]
    [seq] = _seqs([11], seed=5)
    with torch.inference_mode():
        found = lean.available(model, adapter, points[:1], len(seq))
        assert found is not None
        outs = []
        for chosen in (points[:1], points):
            cache = StreamCache()
            first = lean.capture_lean(model, found, chosen, [cache], [(0, 7)], torch.tensor(seq[:7]), torch.arange(7))
            cache.length = 7
            second = lean.capture_lean(model, found, chosen, [cache], [(0, 4)], torch.tensor(seq[7:]), torch.arange(7, 11))
            outs.append(torch.cat([first[HOOKS[-1]], second[HOOKS[-1]]], dim=1))
    assert torch.equal(outs[0], outs[1])


@needs_kernel
def test_transformers_output_hooks_left_by_a_hidden_states_forward_keep_the_lean_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward asked for hidden states installs recording hooks on every layer for good; they record
    only inside such a forward, so lean forwards go on (and give the same activations)."""
    model = copy.deepcopy(build_model("llama"))
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), output_hidden_states=True, output_attentions=True)
    assert any(m._forward_hooks for m in model.model.layers.modules())
    spy = _Spy(monkeypatch)
    seqs = _seqs([23, 9, 17])
    got = feed_in_rounds(model, HOOKS[-1], seqs)[0]
    assert spy.calls >= len(ROUNDS)
    for seq, a in zip(seqs, got):
        torch.testing.assert_close(a, capture(model, torch.tensor([seq]), None, [HOOKS[-1]])[HOOKS[-1]][0], rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_forward_set_on_a_module_or_a_subclass_elsewhere_keeps_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    model, spy = _lean_llama(monkeypatch, copy.deepcopy(build_model("llama")))
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x) * 2  # type: ignore[method-assign]
    calls, out = _one_round(model, spy)
    assert calls == 0
    del mlp.forward
    assert not torch.allclose(out, _one_round(model, spy)[1])  # the override ran, in transformers' forward
    assert spy.calls == 2

    class Elsewhere(type(model)):  # type: ignore[misc]
        pass

    other = copy.deepcopy(model)
    other.__class__ = Elsewhere
    assert lean.plan(other, get_adapter(other)) is None


@needs_kernel
def test_modules_changed_in_place_make_a_new_plan() -> None:
    """An activation swapped for another, or a projection parametrized (its class changes in place):
    the plan is made again and refuses them."""
    from torch.nn.utils import parametrize

    model = copy.deepcopy(build_model("llama"))
    adapter = get_adapter(model)
    points = [parse_hookpoint(HOOKS[-1])]
    _check_first(model, HOOKS[-1])
    assert lean.available(model, adapter, points, 4) is not None
    act = model.model.layers[1].mlp.act_fn
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert lean.available(model, adapter, points, 4) is None
    model.model.layers[1].mlp.act_fn = act
    assert lean.available(model, adapter, points, 4) is not None

    class Doubled(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2

    parametrize.register_parametrization(model.model.layers[0].self_attn.q_proj, "weight", Doubled())
    assert lean.available(model, adapter, points, 4) is None
    seqs = _seqs([23, 9, 17])
    for seq, a in zip(seqs, feed_in_rounds(model, HOOKS[-1], seqs)[0]):
        torch.testing.assert_close(a, capture(model, torch.tensor([seq]), None, [HOOKS[-1]])[HOOKS[-1]][0], rtol=1e-4, atol=1e-4)


def _four_bit_llama(kinds: tuple[str, ...] = ("Q4_1",)) -> tuple[torch.nn.Module, list[torch.nn.Linear]]:
    """The tiny Llama with every decoder linear weight as a 4-bit file gives it (``kinds`` in turn,
    seeded by position), and those linear modules in order."""
    from tests.unit.models.test_skinny import four_bit

    model = copy.deepcopy(build_model("llama"))
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(four_bit(lin.out_features, lin.in_features, kinds[i % len(kinds)], seed=i))
    return model, linears


@needs_kernel
@pytest.mark.parametrize("hook", [HOOKS[-1], HOOKS[1]])
def test_lean_forwards_read_4bit_weights_packed_with_the_same_activations(hook: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose weights came from a 4-bit file: the whole layers' call and the layer-by-layer
    calls read the codes; the activations are those from the float32 weights, to the bit."""
    from tests.unit.models.test_skinny import four_bit

    model, linears = _four_bit_llama(("Q4_0", "Q4_1"))
    _check_first(model, hook)
    seqs = _seqs([23, 9, 17], seed=6)
    spy = _Spy(monkeypatch)
    calls = spy_on(monkeypatch, "linear_q4")
    layer_calls = spy_on(monkeypatch, "layers")
    got = feed_in_rounds(model, hook, seqs)[0]
    quants = [list(c[-4][: 21 * c[3]]) for c in layer_calls]  # each call's 4-bit pointers
    assert spy.calls == len(ROUNDS)
    assert all(skinny.packed(lin.weight) is not None for lin in linears)
    # The whole layers' call reads every product's codes; past it, the audited layer's own products too.
    assert len(quants) == len(ROUNDS) and all(all(q) for q in quants)
    assert len(calls) == (len(ROUNDS) * 4 if hook == HOOKS[1] else 0)
    with skinny.unpacked():
        plain = feed_in_rounds(model, hook, seqs)[0]
    assert spy.calls == 2 * len(ROUNDS)
    quants = [list(c[-4][: 21 * c[3]]) for c in layer_calls]
    assert len(quants) == 2 * len(ROUNDS) and not any(any(q) for q in quants[len(ROUNDS) :])
    assert len(calls) == (len(ROUNDS) * 4 if hook == HOOKS[1] else 0)
    for seq, a, b in zip(seqs, got, plain):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, capture(model, torch.tensor([seq]), None, [hook])[hook][0], rtol=1e-4, atol=1e-4)
    # A weight written in place is read as it is now.
    with torch.no_grad():
        linears[0].weight.copy_(four_bit(linears[0].out_features, linears[0].in_features, seed=99))
    again = feed_in_rounds(model, hook, seqs)[0]
    for seq, a in zip(seqs, again):
        torch.testing.assert_close(a, capture(model, torch.tensor([seq]), None, [hook])[hook][0], rtol=1e-4, atol=1e-4)
    assert not torch.equal(again[0], got[0])
    # Written through .data (no version counter moves), then forgotten: read as it is now, in the
    # whole layers' call (its cached pointers) and past it.
    linears[3].weight.data.copy_(four_bit(linears[3].out_features, linears[3].in_features, seed=98))
    skinny.forget(linears[3].weight)
    after = feed_in_rounds(model, hook, seqs)[0]  # first: the cached pointers see the forget()
    with skinny.unpacked():
        want = feed_in_rounds(model, hook, seqs)[0]
    for a, b in zip(after, want):
        assert torch.equal(a, b)
    # The same storage seen through a transposed view (o_proj is square here): not contiguous, it
    # sends the forward to transformers.
    w = linears[3].weight
    assert w.shape[0] == w.shape[1]
    address = w.data_ptr()
    w.data = w.data.t()
    assert w.data_ptr() == address
    before = spy.calls
    for seq, a in zip(seqs, feed_in_rounds(model, hook, seqs)[0]):
        torch.testing.assert_close(a, capture(model, torch.tensor([seq]), None, [hook])[hook][0], rtol=1e-4, atol=1e-4)
    assert spy.calls == before


@needs_kernel
@pytest.mark.parametrize("hook", [HOOKS[-1], HOOKS[1]])
def test_lean_forwards_find_4bit_weights_written_through_data(
    hook: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A write through ``.data`` moves no version counter; each call compares one row of every weight
    it reads as codes first, computes nothing where one differs, and reads those weights anew: in
    the whole layers' call and in the audited layer's own products past it."""
    from tests.unit.models.test_skinny import four_bit

    model, linears = _four_bit_llama()
    # Layer 0's k in the whole layers' call; the last product read: the call's (blocks.2's
    # resid_post) or the audited layer's own o (blocks.1's attn_out).
    written = (1, len(linears) - 1) if hook == HOOKS[-1] else (1, 7 + 3)
    monkeypatch.setattr(skinny, "_warned_stale", False)
    _check_first(model, hook)
    seqs = _seqs([23, 9, 17], seed=8)
    feed_in_rounds(model, hook, seqs)  # packs and caches the pointers
    assert skinny._loaded is not None and skinny._loaded[0] is not None
    fns, detail = skinny._loaded
    layer_calls: list[tuple[int, int, list[int]]] = []  # each call's turn, result and stale flags

    def spy(*args: Any) -> Any:
        differ = fns.layers(*args)
        layer_calls.append((args[-2], differ, list(args[-1])))
        return differ

    monkeypatch.setattr(skinny, "_loaded", (fns._replace(layers=spy), detail))
    # Every row of two weights, and nothing of the version counters: found at the next call.
    for index in written:
        lin = linears[index]
        lin.weight.data.copy_(four_bit(lin.out_features, lin.in_features, seed=90 + index))
    with caplog.at_level("WARNING", logger="auditor.models.skinny"):
        got = feed_in_rounds(model, hook, seqs)[0]
    assert "no longer match its 4-bit form" in caplog.text
    first = list(layer_calls)
    with skinny.unpacked():
        want = feed_in_rounds(model, hook, seqs)[0]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # The first call found them (and computed nothing), the second read them packed anew.
    in_call = [i for i in written if i < len(first[0][2])]
    assert [c[1] for c in first] == [len(in_call)] + [0] * len(ROUNDS)
    assert [i for i, bad in enumerate(first[0][2]) if bad] == in_call
    assert all(skinny.packed(linears[i].weight) is not None for i in written)


@needs_kernel
def test_lean_forwards_read_float32_weights_while_another_thread_keeps_writing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tries find a weight changed under them (written through ``.data`` before each): the third
    reads the float32 weights, never a stale form."""
    from tests.unit.models.test_skinny import four_bit

    model, linears = _four_bit_llama()
    hook = HOOKS[-1]
    _check_first(model, hook)
    seqs = _seqs([12], seed=9)
    feed_in_rounds(model, hook, seqs, [[(0, 12)]])
    assert skinny._loaded is not None and skinny._loaded[0] is not None
    fns, detail = skinny._loaded
    real, quants, seed = fns.layers, [], [200]
    target = linears[0]

    def writer(*args: Any) -> Any:  # another thread's write, just before each call reads the weights
        seed[0] += 1
        target.weight.data.copy_(four_bit(target.out_features, target.in_features, seed=seed[0]))
        quants.append((list(args[-4]), args[-2]))  # the codes' pointers, the turn
        return real(*args)

    monkeypatch.setattr(skinny, "_loaded", (fns._replace(layers=writer), detail))
    got = feed_in_rounds(model, hook, seqs, [[(0, 12)]])[0]
    assert len(quants) == 3 and all(quants[0][0]) and all(quants[1][0])
    assert not any(quants[2][0]) and quants[2][1] == -1  # the third: no codes, nothing to check
    monkeypatch.setattr(skinny, "_loaded", (fns, detail))  # the writer gone
    after = spy_on(monkeypatch, "layers")
    with skinny.unpacked():
        want = feed_in_rounds(model, hook, seqs, [[(0, 12)]])[0]
    assert torch.equal(got[0], want[0])
    # The next calls read the codes again (packed once more), checked.
    feed_in_rounds(model, hook, seqs, [[(0, 12)]])
    assert all(after[-1][-4]) and after[-1][-2] >= 0 and len(after) == 2


@needs_kernel
def test_each_depth_turns_over_every_row_while_depths_take_turns() -> None:
    """Audits at two depths taking turns on one model: a write through ``.data`` to one row of a
    weight only the deeper call reads is found when that row's turn comes, whatever its parity."""
    from auditor.models.streams import StreamCache, capture_streams
    from tests.unit.models.test_skinny import four_bit

    model, linears = _four_bit_llama()
    shallow, deep = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"
    _check_first(model, shallow)
    _check_first(model, deep)
    seq = _seqs([5], seed=3)[0]

    def run(hook: str, on: torch.nn.Module = model) -> torch.Tensor:
        return capture_streams(on, hook, [StreamCache()], [seq])[0]

    target = model.model.layers[2].self_attn.q_proj  # read by the deeper call's layers alone
    rows = target.out_features
    new = four_bit(rows, target.in_features, seed=77)
    for row in (1, 2):  # both parities
        run(shallow), run(deep)  # packed, pointers kept
        target.weight.data[row] = new[row]  # through .data: no version counter moves
        other = copy.deepcopy(model)
        with skinny.unpacked():
            want = run(deep, other)
        stale = 0
        while not torch.equal(run(deep), want):
            run(shallow)
            stale += 1
            assert stale <= rows, f"row {row} not found in {rows} calls"
        for _ in range(3):
            run(shallow)
            assert torch.equal(run(deep), want)
